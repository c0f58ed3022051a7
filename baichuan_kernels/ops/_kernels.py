"""Wiring shared by the ops files: find an op's kernel ops and give each the op's one autograd.

An op ``<name>`` with kernels has a C++ pair ``torch.ops.baichuan.<name>_fwd/_bwd`` (from ``_C``: one
op serving the "cpu" and "cuda" backends, dispatched by device) and a Triton pair
``torch.ops.baichuan_triton.<name>_fwd/_bwd`` (defined by ``baichuan_kernels/triton/<module>.py``).
Every pair gets the same fake kernels and the same autograd definition, written once in the op's file.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

from .. import _extension, registry
from ..registry import Backend


def register_kernels(
    name: str,
    *,
    triton_module: str,
    fwd_fake: Callable,
    bwd_fake: Callable,
    setup_context: Callable,
    make_backward: Callable,
) -> dict[Backend, tuple]:
    """Register fakes + autograd on every available kernel pair of op ``name``.

    ``make_backward(bwd_op)`` returns the autograd backward that calls that backend's backward op.
    Returns ``{backend: (fwd_op, bwd_op)}`` for the backends whose ops exist in this process.
    """
    kernels: dict[Backend, tuple] = {}

    def add(backend: Backend, namespace) -> None:
        fwd = getattr(namespace, f"{name}_fwd").default
        bwd = getattr(namespace, f"{name}_bwd").default
        torch.library.register_fake(fwd)(fwd_fake)
        torch.library.register_fake(bwd)(bwd_fake)
        torch.library.register_autograd(fwd, make_backward(bwd), setup_context=setup_context)
        kernels[backend] = (fwd, bwd)

    if _extension.extension_error() is None:
        add(Backend.CPU, torch.ops.baichuan)
        if _extension.cuda_compiled():
            kernels[Backend.CUDA] = kernels[Backend.CPU]  # the same torch op, dispatched by device
    if registry.TRITON_IMPORT_ERROR is None:
        importlib.import_module(f"baichuan_kernels.triton.{triton_module}")  # defines torch.ops.baichuan_triton.*
        add(Backend.TRITON, torch.ops.baichuan_triton)
    return kernels

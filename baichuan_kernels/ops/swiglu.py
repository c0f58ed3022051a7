"""swiglu: the one file that knows every backend of the SwiGLU activation ``silu(gate) * up``.

* reference — :func:`baichuan_kernels.reference.swiglu.swiglu_ref` (plain autograd)
* cpu, cuda — ``torch.ops.baichuan.swiglu_fwd/bwd`` (csrc/cpu/swiglu.cpp, csrc/cuda/swiglu.cu)
* triton    — ``torch.ops.baichuan_triton.swiglu_fwd/bwd`` (baichuan_kernels/triton/swiglu.py)

Fused layout: the kernels take ``[N, F]`` row views (unit stride along F, any row stride), so
``gate, up = h.chunk(2, -1)`` of one ``[..., 2F]`` matmul output ``h`` goes in without a copy (the
inputs are flattened with ``reshape``, a view for such slices). Outputs and gradients are fresh
contiguous tensors; autograd places ``dgate``/``dup`` into ``dh`` through the slices' backward.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _extension, registry
from .._validation import FLOAT_DTYPES_F64, check_same_device, check_same_dtype, check_shape, check_tensor
from ..reference.swiglu import swiglu_ref
from ..registry import Backend, Impl

__all__ = ["swiglu"]

# Kernel ops per backend: (forward op, backward op).
_KERNELS: dict[Backend, tuple] = {}


def _fwd_fake(gate, up):
    return gate.new_empty(gate.shape)  # [N, F] contiguous


def _bwd_fake(dy, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _as_rows(t: torch.Tensor, N: int, F: int) -> torch.Tensor:
    """``t`` as an ``[N, F]`` row view the kernels accept (a view whenever the layout allows it)."""
    r = t.reshape(N, F)
    if (F > 1 and r.stride(1) != 1) or (N > 1 and r.stride(0) < F):  # e.g. stride-0 expanded grads
        r = r.contiguous()
    return r


def _setup_context(ctx, inputs, output):
    gate, up = inputs
    ctx.save_for_backward(gate, up)


def _make_backward(bwd_op):
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        N, F = gate.shape
        return bwd_op(_as_rows(dy, N, F), gate, up)

    return backward


def _register_kernel(backend: Backend, fwd_op, bwd_op) -> None:
    torch.library.register_fake(fwd_op)(_fwd_fake)
    torch.library.register_fake(bwd_op)(_bwd_fake)
    torch.library.register_autograd(fwd_op, _make_backward(bwd_op), setup_context=_setup_context)
    _KERNELS[backend] = (fwd_op, bwd_op)


if _extension.extension_error() is None:
    _register_kernel(Backend.CPU, torch.ops.baichuan.swiglu_fwd.default, torch.ops.baichuan.swiglu_bwd.default)
    if _extension.cuda_compiled():
        _KERNELS[Backend.CUDA] = _KERNELS[Backend.CPU]  # the same torch op, dispatched by device
if registry.TRITON_IMPORT_ERROR is None:
    from ..triton import swiglu as _triton  # noqa: F401  (defines torch.ops.baichuan_triton.swiglu_*)

    _register_kernel(Backend.TRITON, torch.ops.baichuan_triton.swiglu_fwd.default,
                     torch.ops.baichuan_triton.swiglu_bwd.default)


def _kernel_dtypes(gate: torch.Tensor, up: torch.Tensor) -> Optional[str]:
    if gate.dtype == torch.float64:
        return "float64 runs on the reference backend only"
    return None


registry.register(
    "swiglu",
    Impl(Backend.CUDA, _kernel_dtypes),
    Impl(Backend.TRITON, _kernel_dtypes),
    Impl(Backend.CPU, _kernel_dtypes),
)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``silu(gate) * up`` elementwise, any shape, in the inputs' dtype (fp32 math, one rounding).
    fwd+bwd. ``gate`` and ``up`` may be the two halves of one fused ``[..., 2F]`` projection
    (``h[..., :F]``, ``h[..., F:]``): the kernels read them in place, without copies."""
    check_tensor("gate", gate, dtypes=FLOAT_DTYPES_F64)
    check_tensor("up", up, dtypes=FLOAT_DTYPES_F64)
    check_shape("up", up, gate.shape, "the shape of gate")
    check_same_dtype(gate=gate, up=up)
    check_same_device(gate=gate, up=up)
    chosen = registry.resolve("swiglu", backend, (gate, up), gate, up)
    if chosen is Backend.REFERENCE:
        return swiglu_ref(gate, up)
    fwd, _ = _KERNELS[chosen]
    F = gate.shape[-1] if gate.dim() > 0 else 1
    N = math.prod(gate.shape[:-1]) if gate.dim() > 0 else 1
    y = fwd(_as_rows(gate, N, F), _as_rows(up, N, F))  # [N, F]
    return y.view(gate.shape)

"""``norm_head_weight``: NormHead (rows of the LM head L2-normalised), every backend.

* reference — :func:`baichuan_kernels.reference.norm_head.norm_head_weight_ref` (plain autograd)
* cpu, cuda — ``torch.ops.baichuan.norm_head_weight_fwd/bwd`` (csrc/cpu/norm_head.cpp,
  csrc/cuda/norm_head.cu; one op dispatched by device)
* triton    — ``torch.ops.baichuan_triton.norm_head_weight_fwd/bwd`` (baichuan_kernels/triton/norm_head.py)

The forward also returns ``rinv = 1 / max(‖W[v]‖, eps)`` (fp32 [V]), saved for the backward
``dW = rinv · (g − Ŵ (g·Ŵ))`` (``rinv · g`` for rows with ‖W‖ < eps).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import registry
from .._validation import FLOAT_DTYPES_F64, check_positive, check_tensor
from ..reference.norm_head import norm_head_weight_ref
from ..registry import Backend, Impl
from ._kernels import register_kernels

__all__ = ["norm_head_weight"]


def _fwd_fake(weight, eps):
    return torch.empty_like(weight), weight.new_empty(weight.shape[0], dtype=torch.float32)


def _bwd_fake(grad, weight, rinv, eps):
    return torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    weight, eps = inputs
    _out, rinv = output
    ctx.mark_non_differentiable(rinv)
    ctx.eps = eps
    ctx.save_for_backward(weight, rinv)


def _make_backward(bwd_op):
    def backward(ctx, grad, _drinv):
        weight, rinv = ctx.saved_tensors
        return bwd_op(grad.contiguous(), weight, rinv, ctx.eps), None

    return backward


_KERNELS = register_kernels(
    "norm_head_weight", triton_module="norm_head", fwd_fake=_fwd_fake, bwd_fake=_bwd_fake,
    setup_context=_setup_context, make_backward=_make_backward,
)


def _kernel_dtypes(weight: torch.Tensor, *args) -> Optional[str]:
    if weight.dtype == torch.float64:
        return "float64 runs on the reference backend only"
    return None


registry.register(
    "norm_head_weight",
    Impl(Backend.CUDA, _kernel_dtypes),
    Impl(Backend.TRITON, _kernel_dtypes),
    Impl(Backend.CPU, _kernel_dtypes),
)


def norm_head_weight(weight: torch.Tensor, eps: float = 1e-12, *, backend: str = "auto") -> torch.Tensor:
    """Rows of ``weight: [V, D]`` divided by ``max(‖row‖₂, eps)`` (fp32 math), in weight's dtype. fwd+bwd."""
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES_F64, ndim=2)
    if weight.numel() == 0:
        raise ValueError(f"weight must not be empty, got shape {tuple(weight.shape)}")
    check_positive("eps", eps)
    chosen = registry.resolve("norm_head_weight", backend, (weight,), weight, eps)
    if chosen is Backend.REFERENCE:
        return norm_head_weight_ref(weight, eps)
    fwd, _ = _KERNELS[chosen]
    out, _rinv = fwd(weight.contiguous(), float(eps))
    return out

"""rms_norm: the one file that knows every backend of RMSNorm.

* reference — :func:`baichuan_kernels.reference.rms_norm.rms_norm_ref` (plain autograd)
* cpu, cuda — ``torch.ops.baichuan.rms_norm_fwd/bwd`` from ``baichuan_kernels._C`` (one op, dispatched
  by device: csrc/cpu/rms_norm.cpp, csrc/cuda/rms_norm.cu)
* triton    — ``torch.ops.baichuan_triton.rms_norm_fwd/bwd`` (baichuan_kernels/triton/rms_norm.py)

Every kernel op gets the same fake (meta) kernel and the same autograd definition, written once here.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import registry
from .._validation import FLOAT_DTYPES_F64, check_positive, check_same_device, check_same_dtype, check_shape, check_tensor
from ..reference.rms_norm import rms_norm_ref
from ..registry import Backend, Impl
from ._kernels import register_kernels


def _fwd_fake(x, residual, weight, eps):
    # x: [N, D] -> y [N, D], residual_out [N, D] or [0], rstd fp32 [N]
    residual_out = torch.empty_like(x) if residual is not None else x.new_empty(0)
    return torch.empty_like(x), residual_out, x.new_empty(x.shape[0], dtype=torch.float32)


def _bwd_fake(dy, dresidual_out, s, weight, rstd):
    return torch.empty_like(s), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, residual, weight, _eps = inputs
    _y, residual_out, rstd = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(residual_out if ctx.has_residual else x, weight, rstd)


def _make_backward(bwd_op):
    def backward(ctx, dy, dresidual_out, _drstd):
        s, weight, rstd = ctx.saved_tensors
        dresidual_out = dresidual_out.contiguous() if ctx.has_residual else None
        # Gradients can arrive as stride-0 expanded views (y.sum().backward()): make them dense.
        dx, dweight = bwd_op(dy.contiguous(), dresidual_out, s, weight, rstd)
        return dx, (dx if ctx.has_residual else None), dweight, None

    return backward


_KERNELS = register_kernels(
    "rms_norm", triton_module="rms_norm", fwd_fake=_fwd_fake, bwd_fake=_bwd_fake,
    setup_context=_setup_context, make_backward=_make_backward,
)


def _kernel_dtypes(x: torch.Tensor) -> Optional[str]:
    if x.dtype == torch.float64:
        return "float64 runs on the reference backend only"
    return None


def _triton_limits(x: torch.Tensor) -> Optional[str]:
    from ..triton.rms_norm import MAX_D

    if x.shape[-1] > MAX_D:
        return f"the Triton kernel holds a row in registers: D ≤ {MAX_D}, got {x.shape[-1]}"
    return _kernel_dtypes(x)


registry.register(
    "rms_norm",
    Impl(Backend.CUDA, _kernel_dtypes),
    Impl(Backend.TRITON, _triton_limits),
    Impl(Backend.CPU, _kernel_dtypes),
)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    residual: Optional[torch.Tensor] = None,
    backend: str = "auto",
):
    """RMSNorm over the last dimension, with an optional fused residual add.

    ``x: [..., D]``, ``weight: [D]`` (same dtype: fp32/bf16/fp16, or float64 on the reference)::

        y = weight · x / sqrt(mean(x², -1) + eps)      variance and products in fp32, y in x's dtype

    With ``residual`` (shape of x): ``s = x + residual`` (rounded to x's dtype), returns
    ``(rms_norm(s), s)`` — the pre-norm block's add and norm in one pass. Differentiable in x,
    residual and weight.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES_F64, min_ndim=1)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES_F64, ndim=1)
    D = x.shape[-1]
    if D == 0:
        raise ValueError(f"x must have a non-empty last dimension D, got shape {tuple(x.shape)}")
    check_shape("weight", weight, (D,), "the last dimension of x")
    if residual is not None:
        check_tensor("residual", residual, dtypes=FLOAT_DTYPES_F64)
        check_shape("residual", residual, x.shape, "the shape of x")
    check_same_device(x=x, weight=weight, residual=residual)
    check_same_dtype(x=x, weight=weight, residual=residual)
    check_positive("eps", eps, allow_zero=True)

    chosen = registry.resolve("rms_norm", backend, (x, weight, residual), x)
    if chosen is Backend.REFERENCE:
        return rms_norm_ref(x, weight, eps, residual=residual)
    fwd, _ = _KERNELS[chosen]
    x2 = x.reshape(-1, D).contiguous()  # [N, D]
    res2 = residual.reshape(-1, D).contiguous() if residual is not None else None
    y, residual_out, _rstd = fwd(x2, res2, weight.contiguous(), float(eps))
    if residual is None:
        return y.view(x.shape)
    return y.view(x.shape), residual_out.view(x.shape)

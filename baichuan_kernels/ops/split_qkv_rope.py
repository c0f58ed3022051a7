"""split_qkv_rope: the one file that knows every backend of the fused W_pack split + RoPE.

* reference — :func:`baichuan_kernels.reference.split_qkv_rope.split_qkv_rope_ref`
* cpu, cuda — ``torch.ops.baichuan.split_qkv_rope_fwd/bwd`` (csrc/cpu/rope.cpp, csrc/cuda/rope.cu)
* triton    — ``torch.ops.baichuan_triton.split_qkv_rope_fwd/bwd`` (baichuan_kernels/triton/split_qkv_rope.py)

Forward: ``qkv`` read once, q/k (rotated) and v written once. Backward: ``dq, dk, dv`` (any strides
with unit stride along Dh) read once, ``dqkv`` written once (the transposed rotation for dq, dk).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import registry
from .._validation import FLOAT_DTYPES_F64, check_tensor
from ..reference.split_qkv_rope import split_qkv_rope_ref
from ..registry import Backend, Impl
from ._kernels import register_kernels
from .rope import _check_cos_sin, _check_int, _check_positions, heads_view, kernel_limits, kernel_tables

__all__ = ["split_qkv_rope"]


def _fwd_fake(qkv, cos, sin, position_ids, num_heads):
    B, T, three_d = qkv.shape
    shape = (B, T, num_heads, three_d // (3 * num_heads))
    return qkv.new_empty(shape), qkv.new_empty(shape), qkv.new_empty(shape)


def _bwd_fake(dq, dk, dv, cos, sin, position_ids):
    B, T, H, Dh = dq.shape
    return dq.new_empty((B, T, 3 * H * Dh))


def _setup_context(ctx, inputs, output):
    _qkv, cos, sin, position_ids, _num_heads = inputs
    ctx.save_for_backward(cos, sin, position_ids)


def _make_backward(bwd_op):
    def backward(ctx, dq, dk, dv):
        cos, sin, position_ids = ctx.saved_tensors
        dqkv = bwd_op(heads_view(dq), heads_view(dk), heads_view(dv), cos, sin, position_ids)
        return dqkv, None, None, None, None

    return backward


_KERNELS = register_kernels(
    "split_qkv_rope", triton_module="split_qkv_rope", fwd_fake=_fwd_fake, bwd_fake=_bwd_fake,
    setup_context=_setup_context, make_backward=_make_backward,
)


def _limits(qkv, cos, sin, num_heads=None, position_ids=None) -> Optional[str]:
    return kernel_limits(qkv, cos, sin)


registry.register(
    "split_qkv_rope", Impl(Backend.CUDA, _limits), Impl(Backend.TRITON, _limits), Impl(Backend.CPU, _limits)
)


def split_qkv_rope(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    num_heads: int,
    position_ids: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``qkv: [B, T, 3·D]`` (the W_pack output, blocks ``[q | k | v]``) → ``q, k, v: [B, T, H, Dh]``
    (fresh contiguous tensors) with RoPE (rows of ``cos, sin: [S, Dh]``) applied to q and k in the
    same pass. fwd+bwd."""
    check_tensor("qkv", qkv, dtypes=FLOAT_DTYPES_F64, ndim=3)
    num_heads = _check_int("num_heads", num_heads, minimum=1)
    if qkv.numel() == 0:
        raise ValueError(f"qkv must not be empty, got shape {tuple(qkv.shape)}")
    B, T, three_d = qkv.shape
    if three_d % (3 * num_heads):
        raise ValueError(
            f"qkv's last dim (3*D = {three_d}) must be divisible by 3 * num_heads = {3 * num_heads}"
        )
    Dh = three_d // (3 * num_heads)
    if Dh % 2:
        raise ValueError(
            f"qkv's head dim Dh = D / num_heads = {three_d // 3} / {num_heads} = {Dh} must be even for "
            "rotate-half RoPE"
        )
    _check_cos_sin(cos, sin, Dh, qkv, "qkv")
    _check_positions(position_ids, B, T, cos.shape[0], qkv, "qkv")
    chosen = registry.resolve(
        "split_qkv_rope", backend, (qkv, cos, sin, position_ids),
        qkv, cos, sin, num_heads=num_heads, position_ids=position_ids,
    )
    if chosen is Backend.REFERENCE:
        return split_qkv_rope_ref(qkv, cos, sin, num_heads=num_heads, position_ids=position_ids)
    fwd = _KERNELS[chosen][0]
    return fwd(qkv.contiguous(), *kernel_tables(cos, sin, position_ids), num_heads)

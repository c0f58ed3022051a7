"""``split_qkv_rope``: the public op (reference backend; kernels arrive in later issues)."""

from __future__ import annotations

from typing import Optional

import torch

from .. import registry
from .._validation import FLOAT_DTYPES_F64, check_tensor
from ..reference.split_qkv_rope import split_qkv_rope_ref
from .rope import _check_cos_sin, _check_int, _check_positions

__all__ = ["split_qkv_rope"]

registry.register("split_qkv_rope")


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
    with RoPE (rows of ``cos, sin: [S, Dh]``) applied to q and k. fwd+bwd."""
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
        raise ValueError(f"head dim Dh = D / num_heads = {Dh} must be even for rotate-half RoPE")
    _check_cos_sin(cos, sin, Dh, qkv, "qkv")
    _check_positions(position_ids, B, T, cos.shape[0], qkv, "qkv")
    registry.resolve(
        "split_qkv_rope", backend, (qkv, cos, sin, position_ids),
        qkv, cos, sin, num_heads=num_heads, position_ids=position_ids,
    )
    return split_qkv_rope_ref(qkv, cos, sin, num_heads=num_heads, position_ids=position_ids)

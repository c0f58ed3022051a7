"""``decode_attention``: the public op (reference backend; kernels arrive in later issues)."""

from __future__ import annotations

from typing import Optional

import torch

from .. import registry
from .._validation import FLOAT_DTYPES_F64, check_same_device, check_same_dtype, check_shape, check_tensor
from ..reference.decode_attention import decode_attention_ref
from .attention import check_alibi_slopes, check_softmax_scale

__all__ = ["decode_attention"]

registry.register("decode_attention")


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    alibi_slopes: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of the newest token ``q: [B, 1, H, Dh]`` (position ``cache_seqlens[b] - 1``) over the
    first ``cache_seqlens[b]`` rows of ``k_cache, v_cache: [B, S_max, H, Dh]`` → ``[B, 1, H, Dh]``.

    ALiBi bias ``alibi_slopes[h] · (j - (L - 1))``; a sequence with ``cache_seqlens[b] == 0`` gives zeros.
    """
    check_tensor("q", q, dtypes=FLOAT_DTYPES_F64, ndim=4)
    check_tensor("k_cache", k_cache, dtypes=FLOAT_DTYPES_F64, ndim=4)
    check_tensor("v_cache", v_cache, dtypes=FLOAT_DTYPES_F64, ndim=4)
    B, one, H, Dh = q.shape
    if one != 1:
        raise ValueError(f"q must have shape [B, 1, H, Dh] (one new token), got {tuple(q.shape)}")
    if q.numel() == 0:
        raise ValueError(f"q must not be empty, got shape {tuple(q.shape)}")
    S_max = k_cache.shape[1]
    check_shape("k_cache", k_cache, (B, S_max, H, Dh), "[B, S_max, H, Dh] matching q")
    check_shape("v_cache", v_cache, k_cache.shape, "the shape of k_cache")
    check_same_dtype(q=q, k_cache=k_cache, v_cache=v_cache)
    check_tensor("cache_seqlens", cache_seqlens, dtypes=(torch.int32,), ndim=1)
    check_shape("cache_seqlens", cache_seqlens, (B,), "one length per batch row of q")
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens)
    lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
    if lo < 0 or hi > S_max:
        raise ValueError(f"cache_seqlens must lie in [0, S_max={S_max}], got values in [{lo}, {hi}]")
    check_alibi_slopes(alibi_slopes, H, q, "q")
    check_softmax_scale(softmax_scale)
    registry.resolve(
        "decode_attention", backend, (q, k_cache, v_cache, cache_seqlens, alibi_slopes),
        q, k_cache, v_cache, cache_seqlens, alibi_slopes=alibi_slopes, softmax_scale=softmax_scale,
    )
    return decode_attention_ref(
        q, k_cache, v_cache, cache_seqlens, alibi_slopes=alibi_slopes, softmax_scale=softmax_scale
    )

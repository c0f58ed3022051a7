"""``attention``: the public op (reference backend; kernels arrive in later issues)."""

from __future__ import annotations

from typing import Optional

import torch

from .. import registry
from .._validation import (
    FLOAT_DTYPES_F64,
    check_positive,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
)
from ..reference.attention import attention_ref
from .rope import _check_int

__all__ = ["attention"]

SLOPE_DTYPES = (torch.float32, torch.float64)

registry.register("attention")


def check_alibi_slopes(alibi_slopes, H: int, ref: torch.Tensor, ref_name: str) -> None:
    """alibi_slopes: None or fp32/fp64 ``[H]`` on ref's device."""
    if alibi_slopes is None:
        return
    check_tensor("alibi_slopes", alibi_slopes, dtypes=SLOPE_DTYPES, ndim=1)
    check_shape("alibi_slopes", alibi_slopes, (H,), f"one slope per head of {ref_name}")
    check_same_device(**{ref_name: ref, "alibi_slopes": alibi_slopes})


def check_softmax_scale(softmax_scale) -> None:
    if softmax_scale is not None:
        check_positive("softmax_scale", softmax_scale)


def _check_cu_seqlens(cu_seqlens, max_seqlen, total: int, q: torch.Tensor) -> None:
    check_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32,), ndim=1)
    check_same_device(q=q, cu_seqlens=cu_seqlens)
    if cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must have num_seqs + 1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if min(lengths) < 0:
        raise ValueError("cu_seqlens must be non-decreasing")
    if bounds[-1] != total:
        raise ValueError(f"cu_seqlens must end at total_T = q.shape[0] = {total}, got {bounds[-1]}")
    if max_seqlen is not None:
        max_seqlen = _check_int("max_seqlen", max_seqlen, minimum=1)
        if max_seqlen < max(lengths):
            raise ValueError(f"max_seqlen ({max_seqlen}) is shorter than the longest sequence ({max(lengths)})")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    alibi_slopes: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Self-attention of ``q, k, v: [B, T, H, Dh]``, or packed ``[total_T, H, Dh]`` sequences split by
    ``cu_seqlens: int32 [num_seqs + 1]`` (each attends only within itself, positions from 0).

    Optional ALiBi bias ``alibi_slopes[h] · (j - i)`` (fp32), scale ``softmax_scale`` (default
    1/sqrt(Dh)), causal mask by default. Output like q. fwd+bwd.
    """
    packed = cu_seqlens is not None
    rank = 3 if packed else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES_F64, ndim=rank)
    check_shape("k", k, q.shape, "the shape of q")
    check_shape("v", v, q.shape, "the shape of q")
    check_same_dtype(q=q, k=k, v=v)
    check_same_device(q=q, k=k, v=v)
    if q.numel() == 0:
        raise ValueError(f"q must not be empty, got shape {tuple(q.shape)}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    check_alibi_slopes(alibi_slopes, q.shape[-2], q, "q")
    check_softmax_scale(softmax_scale)
    if packed:
        _check_cu_seqlens(cu_seqlens, max_seqlen, q.shape[0], q)
    elif max_seqlen is not None:
        raise ValueError("max_seqlen is only used with cu_seqlens (packed [total_T, H, Dh] inputs)")
    registry.resolve(
        "attention", backend, (q, k, v, alibi_slopes, cu_seqlens), q, k, v,
        causal=causal, alibi_slopes=alibi_slopes, softmax_scale=softmax_scale,
        cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
    )
    return attention_ref(
        q, k, v, causal=causal, alibi_slopes=alibi_slopes, softmax_scale=softmax_scale,
        cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
    )

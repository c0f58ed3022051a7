"""``rope_cos_sin`` and ``apply_rope``: the public ops (reference backend; kernels arrive later)."""

from __future__ import annotations

import operator
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
from ..reference.rope import apply_rope_ref, rope_cos_sin_ref

__all__ = ["rope_cos_sin", "apply_rope"]

INDEX_DTYPES = (torch.int32, torch.int64)

registry.register("rope_cos_sin")
registry.register("apply_rope")


def _check_int(name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_cos_sin(cos, sin, Dh: int, ref: torch.Tensor, ref_name: str) -> None:
    """cos/sin: float ``[S, Dh]`` tables on ref's device."""
    check_tensor("cos", cos, dtypes=FLOAT_DTYPES_F64, ndim=2)
    check_tensor("sin", sin, dtypes=FLOAT_DTYPES_F64, ndim=2)
    if cos.shape[1] != Dh:
        raise ValueError(f"cos must have shape [S, {Dh}] (Dh of {ref_name}), got {tuple(cos.shape)}")
    check_shape("sin", sin, cos.shape, "the shape of cos")
    check_same_device(**{ref_name: ref, "cos": cos, "sin": sin})


def _check_positions(position_ids, B: int, T: int, S: int, ref: torch.Tensor, ref_name: str) -> None:
    """position_ids: integer ``[B, T]`` with values in [0, S); without it T <= S."""
    if position_ids is None:
        if T > S:
            raise ValueError(f"cos/sin have {S} rows but {ref_name} has T={T} positions (pass longer tables)")
        return
    check_tensor("position_ids", position_ids, dtypes=INDEX_DTYPES, ndim=2)
    check_shape("position_ids", position_ids, (B, T), f"[B, T] of {ref_name}")
    check_same_device(**{ref_name: ref, "position_ids": position_ids})
    lo, hi = int(position_ids.min()), int(position_ids.max())
    if lo < 0:
        raise ValueError(f"position_ids must be >= 0, got {lo}")
    if hi >= S:
        raise ValueError(f"position_ids has position {hi} but cos/sin have only {S} rows")


def rope_cos_sin(
    T: int, Dh: int = 128, base: float = 10000.0, *, device=None, offset: int = 0, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos, sin: [T, Dh]`` for positions ``offset .. offset+T-1``, rotate-half layout
    (dims i and i + Dh/2 share the frequency ``base^(-2i/Dh)``); angles in fp32."""
    T = _check_int("T", T, minimum=1)
    Dh = _check_int("Dh", Dh, minimum=2)
    if Dh % 2:
        raise ValueError(f"Dh must be even (rotate-half pairs dim i with i + Dh/2), got {Dh}")
    check_positive("base", base)
    offset = _check_int("offset", offset, minimum=0)
    registry.resolve("rope_cos_sin", backend, ())
    return rope_cos_sin_ref(T, Dh, float(base), device=device, offset=offset)


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    position_ids: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q, k: [B, T, H, Dh]`` with rows of ``cos, sin: [S, Dh]`` (row ``position_ids[b, t]``,
    or row t without ``position_ids``). fp32 math, results in the input dtype. fwd+bwd."""
    check_tensor("q", q, dtypes=FLOAT_DTYPES_F64, ndim=4)
    check_tensor("k", k, dtypes=FLOAT_DTYPES_F64, ndim=4)
    check_shape("k", k, q.shape, "the shape of q")
    check_same_dtype(q=q, k=k)
    check_same_device(q=q, k=k)
    if q.numel() == 0:
        raise ValueError(f"q must not be empty, got shape {tuple(q.shape)}")
    B, T, H, Dh = q.shape
    if Dh % 2:
        raise ValueError(f"head dim Dh of q must be even for rotate-half RoPE, got {Dh}")
    _check_cos_sin(cos, sin, Dh, q, "q")
    _check_positions(position_ids, B, T, cos.shape[0], q, "q")
    registry.resolve("apply_rope", backend, (q, k, cos, sin, position_ids), q, k, cos, sin, position_ids=position_ids)
    return apply_rope_ref(q, k, cos, sin, position_ids=position_ids)

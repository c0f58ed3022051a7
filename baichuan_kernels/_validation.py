"""Input checks shared by every public op: clear errors that name the offending argument.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (shape, device,
stride, emptiness) with the argument's name in the message, before any kernel runs.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOAT_DTYPES_F64 = FLOAT_DTYPES + (torch.float64,)


def check_tensor(
    name: str,
    t,
    *,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    ndim: Optional[int | Sequence[int]] = None,
    min_ndim: Optional[int] = None,
) -> torch.Tensor:
    """Type, dtype and rank of one argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None:
        ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in ranks:
            raise ValueError(f"{name} must have {' or '.join(map(str, ranks))} dimensions, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")
    return t


def check_same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    """All given tensors live on one device."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"tensors must be on the same device: {listing}")
    return next(iter(devices))


def check_same_dtype(**tensors: Optional[torch.Tensor]) -> torch.dtype:
    present = {k: v for k, v in tensors.items() if v is not None}
    dtypes = {v.dtype for v in present.values()}
    if len(dtypes) > 1:
        listing = ", ".join(f"{k} is {str(v.dtype).replace('torch.', '')}" for k, v in present.items())
        raise TypeError(f"tensors must have the same dtype: {listing}")
    return next(iter(dtypes))


def check_shape(name: str, t: torch.Tensor, shape: Iterable[int], what: str = "") -> None:
    shape = tuple(shape)
    if tuple(t.shape) != shape:
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {shape}{extra}, got {tuple(t.shape)}")


def check_positive(name: str, value, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero) or value != value:
        raise ValueError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, got {value}")


def shares_elements(a: torch.Tensor, b: torch.Tensor) -> Optional[bool]:
    """Whether two strided tensors of one device share an element of memory: True or False, exactly,
    when both lie in disjoint byte ranges or are same-shape, same-stride views whose strides nest
    (each at least the span of the ones below: every layout a dense tensor's views have); None when
    the layouts are too irregular to decide cheaply. No memory is touched: offsets only."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def byte_span(t: torch.Tensor) -> tuple[int, int]:  # [first, last] byte offsets into the storage
        lo = hi = t.storage_offset()
        for n, s in zip(t.shape, t.stride()):
            lo, hi = lo + min(0, (n - 1) * s), hi + max(0, (n - 1) * s)
        return lo * t.element_size(), (hi + 1) * t.element_size() - 1

    (alo, ahi), (blo, bhi) = byte_span(a), byte_span(b)
    if ahi < blo or bhi < alo:
        return False
    if a.dtype != b.dtype or a.shape != b.shape or a.stride() != b.stride():
        return None
    dims = sorted((abs(s), n) for n, s in zip(a.shape, a.stride()) if n > 1)  # ascending strides
    if any(s == 0 for s, _ in dims) or any(hi_s < lo_s * lo_n for (lo_s, lo_n), (hi_s, _) in zip(dims, dims[1:])):
        return None
    dims.reverse()

    # Is d = sum(c_i * s_i) with |c_i| < n_i? With nested strides the lower terms sum to less than s_i
    # in magnitude, so c_i is d / s_i rounded down or up: at most two branches per dimension.
    def reachable(d: int, i: int) -> bool:
        if i == len(dims):
            return d == 0
        s, n = dims[i]
        return any(abs(c) < n and reachable(d - c * s, i + 1) for c in {d // s, -(-d // s)})

    return reachable(abs(b.storage_offset() - a.storage_offset()), 0)


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` address exactly the same elements in the same order."""
    return (a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            and a.data_ptr() == b.data_ptr())

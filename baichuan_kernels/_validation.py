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

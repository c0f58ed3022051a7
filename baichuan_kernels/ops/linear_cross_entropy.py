"""``linear_cross_entropy``: the public op (reference backend; kernels arrive in later issues)."""

from __future__ import annotations

import torch

from .. import registry
from .._validation import FLOAT_DTYPES_F64, check_positive, check_same_device, check_same_dtype, check_tensor
from ..reference.linear_cross_entropy import linear_cross_entropy_ref
from .rope import _check_int

__all__ = ["linear_cross_entropy"]

REDUCTIONS = ("mean", "sum", "none")
# The reference backend materialises at most this many logits at a time (64 MB in fp32).
REFERENCE_CHUNK_ELEMENTS = 1 << 24

registry.register("linear_cross_entropy")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    norm_head: bool = True,
    z_loss_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, z)`` for ``hidden: [N, D]``, head ``weight: [V, D]`` and ``labels: [N]``.

    ``logits = hidden @ normalize(weight)ᵀ`` (plain ``weight`` when ``norm_head=False``) in fp32, chunk
    by chunk; ``ce`` = mean cross-entropy and ``z`` = mean of ``max_v logits²`` over the rows whose
    label is not ``ignore_index``; ``loss = ce + z_loss_weight · z``. ``reduction="sum"`` sums,
    ``"none"`` gives per-row ``[N]`` vectors. fp32 results (float64 for float64). fwd+bwd into
    hidden and weight.
    """
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES_F64, ndim=2)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES_F64, ndim=2)
    check_tensor("labels", labels, dtypes=(torch.int32, torch.int64), ndim=1)
    N, D = hidden.shape
    V = weight.shape[0]
    if hidden.numel() == 0:
        raise ValueError(f"hidden must not be empty, got shape {tuple(hidden.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"weight must not be empty, got shape {tuple(weight.shape)}")
    if weight.shape[1] != D:
        raise ValueError(f"weight must have shape [V, D={D}] (D of hidden), got {tuple(weight.shape)}")
    if labels.shape[0] != N:
        raise ValueError(f"labels must have shape [N={N}] (rows of hidden), got {tuple(labels.shape)}")
    check_same_dtype(hidden=hidden, weight=weight)
    check_same_device(hidden=hidden, weight=weight, labels=labels)
    if not isinstance(norm_head, bool):
        raise TypeError(f"norm_head must be a bool, got {type(norm_head).__name__}")
    check_positive("z_loss_weight", z_loss_weight, allow_zero=True)
    ignore_index = _check_int("ignore_index", ignore_index, minimum=-(2**63))
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        raise ValueError(
            f"labels must be in [0, V={V}) or ignore_index={ignore_index}; got {int(labels[bad][0])}"
        )
    registry.resolve(
        "linear_cross_entropy", backend, (hidden, weight, labels), hidden, weight, labels,
        norm_head=norm_head, z_loss_weight=z_loss_weight, ignore_index=ignore_index, reduction=reduction,
    )
    chunk = None if N * V <= REFERENCE_CHUNK_ELEMENTS else max(1, REFERENCE_CHUNK_ELEMENTS // V)
    return linear_cross_entropy_ref(
        hidden, weight, labels, norm_head=norm_head, z_loss_weight=float(z_loss_weight),
        ignore_index=ignore_index, reduction=reduction, chunk_size=chunk,
    )

"""``norm_head_weight``: the public op (reference backend; kernels arrive in later issues)."""

from __future__ import annotations

import torch

from .. import registry
from .._validation import FLOAT_DTYPES_F64, check_positive, check_tensor
from ..reference.norm_head import norm_head_weight_ref

__all__ = ["norm_head_weight"]

registry.register("norm_head_weight")


def norm_head_weight(weight: torch.Tensor, eps: float = 1e-12, *, backend: str = "auto") -> torch.Tensor:
    """Rows of ``weight: [V, D]`` divided by ``max(‖row‖₂, eps)`` (fp32 math), in weight's dtype. fwd+bwd."""
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES_F64, ndim=2)
    if weight.numel() == 0:
        raise ValueError(f"weight must not be empty, got shape {tuple(weight.shape)}")
    check_positive("eps", eps)
    registry.resolve("norm_head_weight", backend, (weight,), weight, eps)
    return norm_head_weight_ref(weight, eps)

"""RMSNorm reference (BAICHUAN2_SPEC.md §3)."""

from __future__ import annotations

from typing import Optional

import torch


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, residual: Optional[torch.Tensor] = None
):
    """RMSNorm over the last dimension, optionally after a fused residual add.

    ``x: [..., D]``, ``weight: [D]``::

        s = x + residual            (in x's dtype; only when residual is given)
        r = 1 / sqrt(mean(s², -1) + eps)          computed in fp32 (float64 for float64 inputs)
        y = weight · s · r                         rounded once to x's dtype

    Returns ``y``, or ``(y, s)`` with a residual. Differentiable by autograd; float64-capable.
    """
    s = x if residual is None else x + residual
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    sf = s.to(acc)
    r = torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)
    y = (sf * r * weight.to(acc)).to(x.dtype)
    return y if residual is None else (y, s)

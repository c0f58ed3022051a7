"""RMSNorm reference (BAICHUAN2_SPEC.md §3)."""

from __future__ import annotations

from typing import Optional

import torch

OVERFLOW_SCALE = 2.0**-96  # rows whose fp32 sum of squares overflows are rescaled by this


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, residual: Optional[torch.Tensor] = None
):
    """RMSNorm over the last dimension, optionally after a fused residual add.

    ``x: [..., D]``, ``weight: [D]``::

        s = x + residual            (in x's dtype; only when residual is given)
        r = 1 / sqrt(mean(s², -1) + eps)          computed in fp32 (float64 for float64 inputs)
        y = weight · s · r                         rounded once to x's dtype

    Large magnitudes: a row whose fp32 sum of squares overflows (|s| beyond ~1.8e19, which bf16 and
    fp32 inputs reach) is normalised scaled by 2^-96 (exact): ``y = weight · (2^-96·s) /
    sqrt(mean((2^-96·s)²) + eps·2^-192)`` stays ``weight · s / rms`` instead of collapsing to 0
    (rsqrt(inf)), and so do its gradients. A ±inf or NaN in a row still gives NaN/0 in that row only.

    Returns ``y``, or ``(y, s)`` with a residual. Differentiable by autograd; float64-capable.
    """
    s = x if residual is None else x + residual
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    sf = s.to(acc)
    overflow = torch.isinf(sf.detach().pow(2).mean(-1, keepdim=True))  # [..., 1]
    f = torch.where(overflow, OVERFLOW_SCALE, 1.0).to(acc)  # exact power of two: 1 for every finite sum
    sc = sf * f  # the row, rescaled where needed (exact); r below is 1 / rms of sc
    r = torch.rsqrt(sc.pow(2).mean(-1, keepdim=True) + eps * f * f)
    y = (sc * r * weight.to(acc)).to(x.dtype)  # sc · r = s / rms(s): no overflow in autograd either
    return y if residual is None else (y, s)

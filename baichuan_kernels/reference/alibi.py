"""ALiBi slopes reference (BAICHUAN2_SPEC.md §5.1; the ALiBi paper / BLOOM rule)."""

from __future__ import annotations

import math

import torch


def _power_of_two_slopes(m: int) -> list[float]:
    """slope_k = 2^(-8·(k+1)/m), k = 0 .. m-1 (m a power of two): a geometric sequence starting at
    2^(-8/m) with that same ratio."""
    return [2.0 ** (-8.0 * (k + 1) / m) for k in range(m)]


def alibi_slopes_ref(num_heads: int) -> torch.Tensor:
    """fp32 ``[num_heads]`` ALiBi slopes.

    * ``num_heads`` a power of two: the geometric sequence above.
    * otherwise, with ``p = 2^floor(log2 num_heads)``: the ``p`` slopes of ``p`` heads, followed by
      the even-indexed slopes (0, 2, 4, …) of ``2p`` heads, of which the first ``num_heads - p``.

    For Baichuan2-13B (40 heads) that is 2^(-k/4), k = 1..32, then 2^(-(2m+1)/8), m = 0..7; head
    32 has the largest slope. Built as Python floats, then turned into an fp32 tensor (on CPU).
    """
    p = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = _power_of_two_slopes(p)
    if p != num_heads:
        slopes += _power_of_two_slopes(2 * p)[0::2][: num_heads - p]
    return torch.tensor(slopes, dtype=torch.float32)

"""Helpers shared by the Triton kernels."""

from __future__ import annotations

import triton
import triton.language as tl

from ..registry import TRITON_INTERPRET

# The Triton interpreter (3.2–3.9) converts fp32 -> bf16 by truncation, the GPU rounds to nearest
# even. Under the interpreter we round explicitly first, so CPU tests see the GPU's rounding.
INTERPRETING: tl.constexpr = tl.constexpr(TRITON_INTERPRET)


@triton.jit
def cast_to(x, dtype: tl.constexpr):
    """``x.to(dtype)`` for an fp32 ``x``, rounding to nearest even on the GPU and the interpreter alike."""
    if INTERPRETING:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)

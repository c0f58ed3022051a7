"""``alibi_slopes``: the public op (reference only: a handful of Python floats)."""

from __future__ import annotations

import torch

from .. import registry
from ..reference.alibi import alibi_slopes_ref
from .rope import _check_int

__all__ = ["alibi_slopes"]

MAX_HEADS = 2**16  # far above any model; bounds the Python list the rule builds (2**40 heads never returned)

registry.register("alibi_slopes")


def alibi_slopes(num_heads: int, *, backend: str = "auto") -> torch.Tensor:
    """fp32 ``[num_heads]`` ALiBi slopes (BLOOM rule, including non-power-of-2 head counts), on CPU."""
    num_heads = _check_int("num_heads", num_heads, minimum=1, maximum=MAX_HEADS)
    registry.resolve("alibi_slopes", backend, ())
    return alibi_slopes_ref(num_heads)

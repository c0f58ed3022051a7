"""SwiGLU activation reference (BAICHUAN2_SPEC.md §7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The gated activation of the Baichuan 2 MLP, elementwise over any shape::

        y = silu(gate) · up = gate · σ(gate) · up

    Computed in fp32 (float64 for float64 inputs) and rounded once to the inputs' dtype, the way a
    fused kernel does. ``gate`` and ``up`` have the same shape and dtype. Differentiable by autograd.
    """
    acc = torch.float64 if gate.dtype == torch.float64 else torch.float32
    y = F.silu(gate.to(acc)) * up.to(acc)  # [...]
    return y.to(gate.dtype)

"""``swiglu``: the public op (reference backend; kernels arrive in later issues)."""

from __future__ import annotations

import torch

from .. import registry
from .._validation import FLOAT_DTYPES_F64, check_same_device, check_same_dtype, check_shape, check_tensor
from ..reference.swiglu import swiglu_ref

__all__ = ["swiglu"]

registry.register("swiglu")


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``silu(gate) * up`` elementwise, any shape, in the inputs' dtype (fp32 math). fwd+bwd."""
    check_tensor("gate", gate, dtypes=FLOAT_DTYPES_F64)
    check_tensor("up", up, dtypes=FLOAT_DTYPES_F64)
    check_shape("up", up, gate.shape, "the shape of gate")
    check_same_dtype(gate=gate, up=up)
    check_same_device(gate=gate, up=up)
    registry.resolve("swiglu", backend, (gate, up), gate, up)
    return swiglu_ref(gate, up)

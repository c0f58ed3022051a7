"""``quantize_weight``, ``dequantize_weight``, ``quant_matmul``: the public ops (reference backend;
kernels arrive in later issues). The packed formats are documented in
:mod:`baichuan_kernels.reference.quant_matmul`."""

from __future__ import annotations

import torch

from .. import registry
from .._validation import FLOAT_DTYPES_F64, check_same_device, check_tensor
from ..reference.quant_matmul import (
    GROUP_SIZES_4BIT,
    QuantizedWeight,
    dequantize_weight_ref,
    quant_matmul_ref,
    quantize_weight_ref,
)
from .rope import _check_int

__all__ = ["QuantizedWeight", "quantize_weight", "dequantize_weight", "quant_matmul"]

registry.register("quantize_weight")
registry.register("dequantize_weight")
registry.register("quant_matmul")


def _check_qweight(qweight) -> QuantizedWeight:
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight must be a QuantizedWeight (from quantize_weight), got {type(qweight).__name__}")
    return qweight


def _qweight_tensors(qweight: QuantizedWeight) -> tuple:
    return (qweight.data, qweight.scales, qweight.zeros)


def quantize_weight(
    weight: torch.Tensor, *, bits: int, group_size: int = 128, backend: str = "auto"
) -> QuantizedWeight:
    """``weight: [N, K]`` → int8 per-output-channel symmetric (``bits=8``; group_size unused) or int4
    group-wise asymmetric over K (``bits=4``, ``group_size`` in 32/64/128 dividing K)."""
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES_F64, ndim=2)
    if weight.numel() == 0:
        raise ValueError(f"weight must not be empty, got shape {tuple(weight.shape)}")
    bits = _check_int("bits", bits, minimum=0)
    group_size = _check_int("group_size", group_size, minimum=1)
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    K = weight.shape[1]
    if bits == 4:
        if group_size not in GROUP_SIZES_4BIT:
            raise ValueError(f"group_size must be one of {GROUP_SIZES_4BIT} for bits=4, got {group_size}")
        if K % group_size:
            raise ValueError(f"group_size {group_size} must divide K = weight.shape[1] = {K}")
    registry.resolve("quantize_weight", backend, (weight,), weight, bits=bits, group_size=group_size)
    return quantize_weight_ref(weight, bits=bits, group_size=group_size)


def dequantize_weight(qweight: QuantizedWeight, *, backend: str = "auto") -> torch.Tensor:
    """The fp32 ``[N, K]`` weight that ``qweight`` encodes."""
    _check_qweight(qweight)
    registry.resolve("dequantize_weight", backend, _qweight_tensors(qweight), qweight)
    return dequantize_weight_ref(qweight)


def quant_matmul(x: torch.Tensor, qweight: QuantizedWeight, *, backend: str = "auto") -> torch.Tensor:
    """``x: [..., K] @ dequantize(qweight)ᵀ → [..., N]``, fp32 accumulation, in x's dtype."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES_F64, min_ndim=1)
    _check_qweight(qweight)
    N, K = qweight.shape
    if x.shape[-1] != K:
        raise ValueError(f"x must have shape [..., K={K}] (K of qweight), got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")
    check_same_device(x=x, qweight=qweight.data)
    registry.resolve("quant_matmul", backend, (x,) + _qweight_tensors(qweight), x, qweight)
    return quant_matmul_ref(x, qweight)

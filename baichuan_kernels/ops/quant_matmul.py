"""``quantize_weight``, ``dequantize_weight``, ``quant_matmul``: the one file that knows every backend of
the weight-only quantized matmul. The packed formats are documented in
:mod:`baichuan_kernels.reference.quant_matmul` (``dequantize_weight`` is their semantic definition).

* reference — :func:`~baichuan_kernels.reference.quant_matmul.quant_matmul_ref` (dequantise, fp32 matmul)
* cpu, cuda — ``torch.ops.baichuan.quant_matmul_fwd`` (one op, dispatched by device):
  csrc/cpu/quant_matmul.cpp (GEMV for M ≤ 16, dequantise + at::mm above), csrc/cuda/quant_matmul.cu
  (the decode GEMV: bf16/fp16 x, M ≤ 16 rows)
* triton    — ``torch.ops.baichuan_triton.quant_matmul_fwd`` (baichuan_kernels/triton/quant_matmul.py,
  the GEMM for prefill-sized M; any M)

``backend="auto"`` on a GPU: the CUDA GEMV for M ≤ 16 bf16/fp16 rows, the Triton GEMM otherwise.
The quantized weight is frozen: the op is differentiable in x only (``dx = dy @ dequantize(w)``,
one autograd definition shared by every kernel), so adapters can train on top of a quantized model.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _extension, registry
from .._validation import FLOAT_DTYPES_F64, check_same_device, check_tensor
from ..reference.quant_matmul import (
    GROUP_SIZES_4BIT,
    QuantizedWeight,
    _unpack_nibbles,
    dequantize_weight_ref,
    quant_matmul_ref,
    quantize_weight_ref,
)
from ..registry import Backend, Impl
from .rope import _check_int

__all__ = ["QuantizedWeight", "quantize_weight", "dequantize_weight", "quant_matmul"]

CUDA_GEMV_MAX_M = 16  # rows of x the CUDA GEMV takes; larger M goes to the Triton GEMM

# Kernel op per backend: quant_matmul_fwd(x [M, K], qdata, scales, zeros, bits, group_size, codebook)
# -> y [M, N]. NF4 reaches the kernels as bits=4 with zeros None and the fp32 [16] codebook.
_KERNELS: dict[Backend, object] = {}


def _fwd_fake(x, qdata, scales, zeros, bits, group_size, codebook=None):
    return x.new_empty(x.shape[0], qdata.shape[0])  # [M, N]


def _dequantize_tensors(qdata, scales, zeros, bits: int, group_size: int, codebook=None) -> torch.Tensor:
    """fp32 ``[N, K]`` from the raw tensors (the reference formula, usable while tracing)."""
    if bits == 8:
        return qdata.float() * scales[:, None]
    N = qdata.shape[0]
    if codebook is not None:  # NF4
        q = _unpack_nibbles(qdata).long().view(N, -1, group_size)  # [N, G, group]
        return (codebook[q] * scales[..., None]).view(N, -1)
    q = _unpack_nibbles(qdata).float().view(N, -1, group_size)  # [N, G, group]
    return (q * scales[..., None] + zeros[..., None]).view(N, -1)


def _setup_context(ctx, inputs, output):
    _x, qdata, scales, zeros, bits, group_size = inputs[:6]
    codebook = inputs[6] if len(inputs) > 6 else None
    ctx.bits, ctx.group_size = bits, group_size
    ctx.has_zeros, ctx.has_codebook = zeros is not None, codebook is not None
    ctx.save_for_backward(qdata, scales, zeros if zeros is not None else scales,
                          codebook if codebook is not None else scales)


def _backward(ctx, dy):
    qdata, scales, zeros, codebook = ctx.saved_tensors
    w = _dequantize_tensors(qdata, scales, zeros if ctx.has_zeros else None, ctx.bits, ctx.group_size,
                            codebook if ctx.has_codebook else None)  # [N, K]
    dx = (dy.float() @ w).to(dy.dtype)  # [M, K]
    return dx, None, None, None, None, None, None


def _register_kernel(backend: Backend, fwd_op) -> None:
    torch.library.register_fake(fwd_op)(_fwd_fake)
    torch.library.register_autograd(fwd_op, _backward, setup_context=_setup_context)
    _KERNELS[backend] = fwd_op


if _extension.extension_error() is None and hasattr(torch.ops.baichuan, "quant_matmul_fwd"):
    _register_kernel(Backend.CPU, torch.ops.baichuan.quant_matmul_fwd.default)
    if _extension.cuda_compiled():
        _KERNELS[Backend.CUDA] = _KERNELS[Backend.CPU]  # the same torch op, dispatched by device
# Whether the loaded extension's op takes the NF4 codebook (an older _C has the 6-argument schema).
_NF4_IN_C = Backend.CPU in _KERNELS and any(a.name == "codebook" for a in _KERNELS[Backend.CPU]._schema.arguments)
if registry.TRITON_IMPORT_ERROR is None:
    from ..triton import quant_matmul as _triton  # noqa: F401  (defines torch.ops.baichuan_triton.quant_matmul_fwd)

    _register_kernel(Backend.TRITON, torch.ops.baichuan_triton.quant_matmul_fwd.default)


def _kernel_dtypes(x: torch.Tensor, bits: int) -> Optional[str]:
    if x.dtype == torch.float64:
        return "float64 runs on the reference backend only"
    return None


def _cuda_limits(x: torch.Tensor, bits: int) -> Optional[str]:
    if bits == "nf4" and not _NF4_IN_C:
        return "the loaded baichuan_kernels._C predates NF4 (no codebook argument): rebuild the extension"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"the CUDA GEMV takes bfloat16/float16 x, got {str(x.dtype).replace('torch.', '')}"
    M = x.numel() // x.shape[-1]
    if M > CUDA_GEMV_MAX_M:
        return f"the CUDA GEMV serves decode shapes (M ≤ {CUDA_GEMV_MAX_M} rows of x, got {M}): use triton"
    return None


def _cpu_limits(x: torch.Tensor, bits: int) -> Optional[str]:
    if "cpu" in str(x.device) and Backend.CPU not in _KERNELS:
        return "the loaded baichuan_kernels._C predates quant_matmul: rebuild the extension"
    if bits == "nf4" and not _NF4_IN_C:
        return "the loaded baichuan_kernels._C predates NF4 (no codebook argument): rebuild the extension"
    return _kernel_dtypes(x, bits)


registry.register("quantize_weight")
registry.register("dequantize_weight")
registry.register(
    "quant_matmul",
    Impl(Backend.CUDA, _cuda_limits),
    Impl(Backend.TRITON, _kernel_dtypes),
    Impl(Backend.CPU, _cpu_limits),
)


def _check_qweight(qweight) -> QuantizedWeight:
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"qweight must be a QuantizedWeight (from quantize_weight), got {type(qweight).__name__}")
    return qweight


def _qweight_tensors(qweight: QuantizedWeight) -> tuple:
    return (qweight.data, qweight.scales, qweight.zeros, qweight.codebook)


def check_bits(bits):
    """``bits`` as given (4, 8 or ``"nf4"``); TypeError/ValueError naming it otherwise."""
    if isinstance(bits, str):
        if bits != "nf4":
            raise ValueError(f"bits must be 4, 8 or 'nf4', got {bits!r}")
        return bits
    bits = _check_int("bits", bits, minimum=0)
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4, 8 or 'nf4', got {bits}")
    return bits


def quantize_weight(
    weight: torch.Tensor, *, bits, group_size: int = 128, backend: str = "auto"
) -> QuantizedWeight:
    """``weight: [N, K]`` → int8 per-output-channel symmetric (``bits=8``; group_size unused), int4
    group-wise asymmetric over K (``bits=4``) or NF4 absmax blocks over K (``bits="nf4"``; the NF4
    codebook, without bitsandbytes' double quantisation of the absmax); ``group_size`` in 32/64/128
    dividing K for 4 bits and NF4."""
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES_F64, ndim=2)
    if weight.numel() == 0:
        raise ValueError(f"weight must not be empty, got shape {tuple(weight.shape)}")
    bits = check_bits(bits)
    group_size = _check_int("group_size", group_size, minimum=1)
    K = weight.shape[1]
    if bits in (4, "nf4"):
        if group_size not in GROUP_SIZES_4BIT:
            raise ValueError(f"group_size must be one of {GROUP_SIZES_4BIT} for bits={bits!r}, got {group_size}")
        if K % group_size:
            raise ValueError(f"group_size {group_size} must divide K = weight.shape[1] = {K}")
    registry.resolve("quantize_weight", backend, (weight,), weight, bits=bits, group_size=group_size)
    return quantize_weight_ref(weight, bits=bits, group_size=group_size)


def dequantize_weight(qweight: QuantizedWeight, *, backend: str = "auto") -> torch.Tensor:
    """The fp32 ``[N, K]`` weight that ``qweight`` encodes."""
    _check_qweight(qweight)
    registry.resolve("dequantize_weight", backend, _qweight_tensors(qweight), qweight)
    return dequantize_weight_ref(qweight)


def _check_x(x: torch.Tensor, K: int) -> None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES_F64, min_ndim=1)
    if x.shape[-1] != K:
        raise ValueError(f"x must have shape [..., K={K}] (K of qweight), got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")


def _quant_matmul(x, data, scales, zeros, bits, group_size: int, N: int, K: int, backend: str, codebook=None):
    """Backend choice and kernel call on validated inputs (shared with :class:`~baichuan_kernels.nn.QuantLinear`)."""
    chosen = registry.resolve("quant_matmul", backend, (x, data, scales, zeros, codebook), x, bits)
    if chosen is Backend.REFERENCE:
        return quant_matmul_ref(x, QuantizedWeight(data, scales, zeros, bits, group_size, (N, K), codebook))
    x2 = x.reshape(-1, K).contiguous()  # [M, K]
    args = (x2, data.contiguous(), scales.contiguous(), zeros.contiguous() if zeros is not None else None,
            4 if bits == "nf4" else bits, group_size)
    y = _KERNELS[chosen](*args, codebook.contiguous()) if codebook is not None else _KERNELS[chosen](*args)
    return y.view(*x.shape[:-1], N)


def quant_matmul(x: torch.Tensor, qweight: QuantizedWeight, *, backend: str = "auto") -> torch.Tensor:
    """``x: [..., K] @ dequantize(qweight)ᵀ → [..., N]``, fp32 accumulation, in x's dtype.

    Dequantisation is fused into the kernels (the packed weight is read once). Differentiable in x.
    """
    _check_qweight(qweight)
    N, K = qweight.shape
    _check_x(x, K)
    check_same_device(x=x, qweight=qweight.data)
    return _quant_matmul(x, qweight.data, qweight.scales, qweight.zeros, qweight.bits, qweight.group_size, N, K,
                         backend, qweight.codebook)

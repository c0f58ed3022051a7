"""Weight-only quantized matmul in Triton (the GEMM path for large M): ``y = x @ dequantize(w)ᵀ``.

Formats: :mod:`baichuan_kernels.reference.quant_matmul`. One program computes a ``[BLOCK_M, BLOCK_N]``
tile of ``y`` and walks K. The integer codes are exact in bf16/fp16 (|q| ≤ 127), so the tensor-core
``tl.dot`` runs on the *codes* and the scales are applied to its fp32 result — the weights are never
rounded to the activation dtype:

* bits = 8 (per-channel): ``acc += x_tile @ q_tileᵀ`` over all K, then ``y = acc · scale[n]``.
* bits = 4 (group-wise): one K step is one group (``BLOCK_K = group_size``). The packed bytes of the
  group ``[group/2, BLOCK_N]`` give the low-nibble codes (even k) and high-nibble codes (odd k); x is
  loaded as its even and odd columns, so ``d = x_even @ q_low + x_odd @ q_high`` and
  ``acc += d · scale[n, g] + (Σ_k x[m, k]) · zero[n, g]``.
* NF4 (bits = 4 with a codebook): the same walk; each code is looked up in the 16-entry fp32
  codebook (a gather from one 64-byte table that stays in L1) and ``acc += d · absmax[n, g]``. The
  levels are not exact in bf16, so for bf16 x each level is split into a bf16 head and a bf16 tail
  (``hi + lo`` carries 16 mantissa bits) and two dots run; fp16 keeps 11 bits (one dot).

Under the interpreter bf16 ``tl.dot`` is wrong, so the dot operands are fp32 there (exact as well).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..registry import TRITON_INTERPRET
from ._common import cast_to

_TORCH_TO_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _quant_matmul_fwd_kernel(
    X,  # *T    [M, K] activations (contiguous)
    Q,  # *int8 [N, K] (BITS=8) | *uint8 [N, K/2] (BITS=4, even k in the low nibble)
    S,  # *fp32 [N] (BITS=8) | [N, K/GROUP] (BITS=4) scales
    Z,  # *fp32 [N, K/GROUP] zeros: the value of code 0 (BITS=4; unused for BITS=8 and NF4)
    CB,  # *fp32 [16] NF4 codebook (NF4 only)
    Y,  # *T    [M, N] output
    M,
    N,
    K,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,  # group size (BITS=4); BLOCK_K == GROUP
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # operand dtype of tl.dot: x's dtype on GPU, fp32 under the interpreter
    NF4: tl.constexpr,  # codes decode through CB (BITS=4)
    SPLIT: tl.constexpr,  # NF4 with bf16 operands: levels as bf16 head + tail
    IEEE: tl.constexpr,  # fp32 operands: full-precision dot (no tf32)
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    m_mask = rm < M
    n_mask = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if BITS == 8:
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)  # [BK]
            k_mask = kk < K
            x = tl.load(X + rm64[:, None] * K + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            q = tl.load(Q + rn64[None, :] * K + kk[:, None], mask=n_mask[None, :] & k_mask[:, None], other=0)
            a = x.to(tl.float32).to(DOT_DTYPE)
            b = q.to(tl.float32).to(DOT_DTYPE)  # [BK, BN], exact
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        s = tl.load(S + rn64, mask=n_mask, other=0.0)
        acc = acc * s[None, :]
    else:
        HALF: tl.constexpr = BLOCK_K // 2
        G = K // GROUP
        jj = tl.arange(0, HALF)  # byte index within the group
        for g in range(0, G):
            k0 = g * GROUP
            x_base = X + rm64[:, None] * K + k0 + 2 * jj[None, :]  # [BM, HALF] even columns
            x_even = tl.load(x_base, mask=m_mask[:, None], other=0.0).to(tl.float32)
            x_odd = tl.load(x_base + 1, mask=m_mask[:, None], other=0.0).to(tl.float32)
            p = tl.load(Q + rn64[None, :] * (K // 2) + k0 // 2 + jj[:, None], mask=n_mask[None, :], other=0)
            p = p.to(tl.int32)  # [HALF, BN]
            if NF4:
                w_lo = tl.load(CB + (p & 15))  # [HALF, BN] fp32 levels
                w_hi = tl.load(CB + (p >> 4))
            else:
                w_lo = (p & 15).to(tl.float32)
                w_hi = (p >> 4).to(tl.float32)
            q_lo = w_lo.to(DOT_DTYPE)
            q_hi = w_hi.to(DOT_DTYPE)
            if IEEE:
                d = tl.dot(x_even.to(DOT_DTYPE), q_lo, input_precision="ieee")
                d = tl.dot(x_odd.to(DOT_DTYPE), q_hi, d, input_precision="ieee")
            else:
                d = tl.dot(x_even.to(DOT_DTYPE), q_lo)
                d = tl.dot(x_odd.to(DOT_DTYPE), q_hi, d)
            if SPLIT:  # the tails w - bf16(w)
                d = tl.dot(x_even.to(DOT_DTYPE), (w_lo - q_lo.to(tl.float32)).to(DOT_DTYPE), d)
                d = tl.dot(x_odd.to(DOT_DTYPE), (w_hi - q_hi.to(tl.float32)).to(DOT_DTYPE), d)
            s = tl.load(S + rn64 * G + g, mask=n_mask, other=0.0)
            if NF4:
                acc += d * s[None, :]
            else:
                xs = tl.sum(x_even, axis=1) + tl.sum(x_odd, axis=1)  # [BM]
                z = tl.load(Z + rn64 * G + g, mask=n_mask, other=0.0)
                acc += d * s[None, :] + xs[:, None] * z[None, :]
    y_ptrs = Y + rm64[:, None] * N + rn64[None, :]
    tl.store(y_ptrs, cast_to(acc, Y.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _launch_config(M: int, bits: int, group_size: int):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    block_k = group_size if bits == 4 else 64
    if TRITON_INTERPRET:
        return 16, 32, block_k, 4, 1
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128
    block_n = 64 if M <= 64 else 128
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    return block_m, block_n, block_k, num_warps, 3 if block_k >= 128 else 4


@torch.library.custom_op("baichuan_triton::quant_matmul_fwd", mutates_args=())
def quant_matmul_fwd(
    x: torch.Tensor, qdata: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], bits: int,
    group_size: int, codebook: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    M, K = x.shape
    N = qdata.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return y
    bm, bn, bk, num_warps, num_stages = _launch_config(M, bits, group_size)
    dot_dtype = tl.float32 if TRITON_INTERPRET else _TORCH_TO_TL[x.dtype]
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _quant_matmul_fwd_kernel[grid](
        x, qdata, scales, zeros if zeros is not None else scales, codebook if codebook is not None else scales,
        y, M, N, K,
        BITS=bits, GROUP=group_size if bits == 4 else 1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        DOT_DTYPE=dot_dtype, IEEE=x.dtype == torch.float32, NF4=codebook is not None,
        SPLIT=codebook is not None and not TRITON_INTERPRET and x.dtype == torch.bfloat16,
        num_warps=num_warps, num_stages=num_stages,
    )
    return y

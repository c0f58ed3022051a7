"""Decode attention in Triton: split-K flash-decoding with an optional ALiBi bias.

One new query per sequence against the first ``L = cache_seqlens[b]`` rows of the KV cache. The cache
of each (batch, head) is cut into ``num_splits`` partitions of ``SPLIT_LEN`` keys; one program per
(partition, head, batch) walks its partition ``BLOCK_N`` keys at a time with an online softmax in fp32
(log2 domain, bias ``slope_h · (j - (L - 1))`` computed in fp32) and writes its partial max, sum and
unnormalised output; a combine program per (head, batch) rescales and sums the partials in a fixed
order. Partitions past L do nothing; ``L = 0`` gives zeros; an ``L`` outside ``[0, S_max]`` (not checked
on the host for GPU tensors: no sync) reads at most ``S_max`` rows and gives a NaN row. The split plan
is :func:`baichuan_kernels.ops.decode_attention.decode_split_plan` (shared with the CUDA launcher).
The q·k products are elementwise fp32 multiply + row sums (a single query row is no tensor-core shape); the kernel is bound by reading K, V.

Shapes: q [B, H, Dh]; k_cache, v_cache [B, S_max, H, Dh] contiguous; cache_seqlens int32 [B];
alibi_slopes fp32 [H] or None; out [B, H, Dh].
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..registry import TRITON_INTERPRET
from ._common import cast_to
from .attention import HEAD_DIMS, LOG2E


@triton.jit
def _decode_split_kernel(
    Q,  # *T [B, H, D]
    K, V,  # *T [B, S_max, H, D]
    LENS,  # *i32 [B]
    SLOPES,  # *fp32 [H]
    M_PART, L_PART,  # *fp32 [B, H, NUM_SPLITS]
    ACC_PART,  # *fp32 [B, H, NUM_SPLITS, D]
    qk_scale,  # softmax_scale · log2(e)
    H,
    S_max,
    SPLIT_LEN,  # keys per partition (a multiple of BLOCK_N)
    NUM_SPLITS,
    HEAD_DIM: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    split = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    L = tl.load(LENS + b)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n0 = tl.arange(0, BLOCK_N)
    q = tl.load(Q + (b * H + h).to(tl.int64) * HEAD_DIM + offs_d).to(tl.float32) * qk_scale
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(SLOPES + h).to(tl.float32) * 1.4426950408889634
    row_stride = H * HEAD_DIM
    base = b.to(tl.int64) * S_max * row_stride + h * HEAD_DIM
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, tl.minimum(L, S_max))  # never past the cache, whatever L says
    m_i = tl.full([], float("-inf"), dtype=tl.float32)
    l_i = tl.full([], 0.0, dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + offs_n0
        n_mask = offs_n < hi
        offs = base + offs_n[:, None].to(tl.int64) * row_stride + offs_d[None, :]
        k = tl.load(K + offs, mask=n_mask[:, None], other=0.0).to(tl.float32)
        v_raw = tl.load(V + offs, mask=n_mask[:, None], other=0.0)  # issued with K: both in flight
        s = tl.sum(k * q[None, :], 1)  # [BLOCK_N]
        if HAS_ALIBI:
            s += slope2 * (offs_n - (L - 1)).to(tl.float32)
        s = tl.where(n_mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        # every score so far -inf (masked, or -inf by value): shift by 0 so p = alpha = 0, not NaN
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use)
        l_i = l_i * alpha + tl.sum(p, 0)
        p_r = cast_to(p, V.dtype.element_ty).to(tl.float32)
        acc = acc * alpha + tl.sum(p_r[:, None] * v_raw.to(tl.float32), 0)
        m_i = m_new
    part = (b * H + h).to(tl.int64) * NUM_SPLITS + split
    tl.store(M_PART + part, m_i)
    tl.store(L_PART + part, l_i)
    tl.store(ACC_PART + part * HEAD_DIM + offs_d, acc)


@triton.jit
def _decode_combine_kernel(
    M_PART, L_PART, ACC_PART,  # fp32 partials
    O,  # *T [B, H, D]
    LENS,  # *i32 [B]
    H,
    S_max,
    NUM_SPLITS,
    HEAD_DIM: tl.constexpr,
    SPLITS_POW2: tl.constexpr,
):
    h = tl.program_id(0)
    b = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_POW2)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < NUM_SPLITS
    row = (b * H + h).to(tl.int64)
    m = tl.load(M_PART + row * NUM_SPLITS + offs_s, mask=s_mask, other=float("-inf"))
    l = tl.load(L_PART + row * NUM_SPLITS + offs_s, mask=s_mask, other=0.0)
    acc = tl.load(ACC_PART + (row * NUM_SPLITS + offs_s[:, None]) * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None],
                  other=0.0)
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_safe))
    l_tot = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(l_tot > 0.0, l_tot, 1.0)
    L = tl.load(LENS + b)
    out = tl.where((L < 0) | (L > S_max), float("nan"), out)  # a length outside the cache: a NaN row
    tl.store(O + row * HEAD_DIM + offs_d, cast_to(out, O.dtype.element_ty))


def _split_plan(B: int, H: int, S_max: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_N, num_splits, SPLIT_LEN, num_warps). On a GPU the shared plan (about 4 programs per
    SM); under the interpreter 16-key blocks and 4 splits, so small test shapes cross split borders."""
    from ..ops.decode_attention import decode_split_plan, sm_count

    if TRITON_INTERPRET or device.type != "cuda":
        block_n, sms = 16, max(1, B * H)  # sms = B·H: about 4 splits
    else:
        block_n, sms = 64, sm_count(device.index if device.index is not None else torch.cuda.current_device())
    num_splits, split_len = decode_split_plan(B, H, S_max, sms, align=block_n)
    return block_n, num_splits, split_len, 4


@torch.library.custom_op("baichuan_triton::decode_attention_fwd", mutates_args=())
def decode_attention_fwd(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
    alibi_slopes: Optional[torch.Tensor], softmax_scale: float,
) -> torch.Tensor:
    B, H, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"the Triton decode kernel supports head dims {HEAD_DIMS}, got Dh = {D}")
    S_max = k_cache.shape[1]
    out = torch.empty_like(q)
    if B == 0:
        return out
    block_n, num_splits, split_len, warps = _split_plan(B, H, S_max, q.device)
    m_part = torch.empty(B, H, num_splits, device=q.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(B, H, num_splits, D, device=q.device, dtype=torch.float32)
    _decode_split_kernel[(num_splits, H, B)](
        q, k_cache, v_cache, cache_seqlens, alibi_slopes if alibi_slopes is not None else m_part,
        m_part, l_part, acc_part, softmax_scale * LOG2E, H, S_max, split_len, num_splits,
        HEAD_DIM=D, HAS_ALIBI=alibi_slopes is not None, BLOCK_N=block_n, num_warps=warps,
    )
    _decode_combine_kernel[(H, B)](
        m_part, l_part, acc_part, out, cache_seqlens, H, S_max, num_splits, HEAD_DIM=D, SPLITS_POW2=triton.next_power_of_2(num_splits),
    )
    return out

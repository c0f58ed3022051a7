"""Flash attention backward kernels (Triton): deterministic, no atomics, P recomputed from the saved lse.

1. ``attn_bwd_dq_kernel``, one program per query block (launched first): computes
   ``delta = rowsum(dO · O)`` for its rows (the preprocess, fused: dO is loaded anyway), stores it,
   and accumulates dq over the key blocks it can see (full blocks without mask math, then the
   diagonal / sequence-end blocks).
2. ``attn_bwd_dkdv_kernel``, one program per key block (K, V, dk, dv resident), loops over the query
   blocks that see it: the diagonal blocks (masked), the full blocks (no mask math), the tail.

ALiBi as in the forward (:func:`alibi_bias`): split for 16-bit inputs — one FMA per score, the row part
folded into the per-row lse vector, relative to the program's own block start — exact for fp32.
Shapes: Q, K, V, O, DO, DQ, DK, DV: [total_T, H, Dh]; LSE, DELTA: fp32 [H, total_T]; CU int32 [S+1].
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import cast_to
from .attention_fwd import alibi_bias, alibi_row, load_rows, scores, seq_view


@triton.jit
def _dq_block(dq, q, do, row_lse2, delta, k_view, v_view, n0, m0, offs_n0, offs_d, offs_m, L, row_stride,
              qk_scale, slope2, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, ALIBI_SPLIT: tl.constexpr,
              USE_TMA: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    offs_n = n0 + offs_n0
    k = load_rows(k_view, n0, offs_n, offs_d, L, row_stride, USE_TMA, MASKED)
    v = load_rows(v_view, n0, offs_n, offs_d, L, row_stride, USE_TMA, MASKED)
    bias = alibi_bias(slope2, offs_m, offs_n, m0, ALIBI_SPLIT)
    s = scores(q, k, bias, offs_m, offs_n, L, qk_scale, CAUSAL, HAS_ALIBI, DOT_DTYPE, DOT_PRECISION, MASKED)
    p = tl.exp2(s - row_lse2[:, None])  # exact 0 where masked; rows past L have lse = +inf
    dp = tl.dot(do.to(DOT_DTYPE), tl.trans(v.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(DOT_DTYPE), k.to(DOT_DTYPE), input_precision=DOT_PRECISION)


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, O, DO,  # *T [total_T, H, D]
    LSE, DELTA,  # *fp32 [H, total_T] (DELTA written here)
    DQ,  # *T [total_T, H, D]
    CU, SLOPES,
    qk_scale, sm_scale, total_T, H,
    MAX_SEQLEN_BUCKET,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, ALIBI_SPLIT: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest causal rows first
    h = tl.program_id(1)
    seq = tl.program_id(2)
    start = tl.load(CU + seq)
    L = tl.load(CU + seq + 1) - start
    m0 = pid_m * BLOCK_M
    if m0 < L:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_stride = H * HEAD_DIM
        base = start.to(tl.int64) * row_stride + h * HEAD_DIM
        m_mask = offs_m < L
        q = load_rows(seq_view(Q, base, L, row_stride, BLOCK_M, HEAD_DIM, USE_TMA), m0, offs_m, offs_d, L,
                      row_stride, USE_TMA, True)
        do = load_rows(seq_view(DO, base, L, row_stride, BLOCK_M, HEAD_DIM, USE_TMA), m0, offs_m, offs_d, L,
                       row_stride, USE_TMA, True)
        o = load_rows(seq_view(O, base, L, row_stride, BLOCK_M, HEAD_DIM, USE_TMA), m0, offs_m, offs_d, L,
                      row_stride, USE_TMA, True)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # the fused preprocess
        stat_base = h.to(tl.int64) * total_T + start
        tl.store(DELTA + stat_base + offs_m, delta, mask=m_mask)
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(SLOPES + h).to(tl.float32) * 1.4426950408889634
        row_lse2 = tl.load(LSE + stat_base + offs_m, mask=m_mask, other=float("inf")) * 1.4426950408889634
        if HAS_ALIBI:
            row_lse2 += alibi_row(slope2, offs_m, m0, ALIBI_SPLIT)  # once per program
        k_view = seq_view(K, base, L, row_stride, BLOCK_N, HEAD_DIM, USE_TMA)
        v_view = seq_view(V, base, L, row_stride, BLOCK_N, HEAD_DIM, USE_TMA)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        if CAUSAL:
            hi = tl.minimum(L, m0 + BLOCK_M)
            full_hi = (tl.minimum(m0 + 1, L) // BLOCK_N) * BLOCK_N
        else:
            hi = L
            full_hi = (L // BLOCK_N) * BLOCK_N
        for n0 in range(0, full_hi, BLOCK_N):
            dq = _dq_block(dq, q, do, row_lse2, delta, k_view, v_view, n0, m0, offs_n0, offs_d, offs_m, L, row_stride,
                           qk_scale, slope2, CAUSAL, HAS_ALIBI, ALIBI_SPLIT, USE_TMA, DOT_DTYPE, DOT_PRECISION, False)
        for n0 in range(full_hi, hi, BLOCK_N):
            dq = _dq_block(dq, q, do, row_lse2, delta, k_view, v_view, n0, m0, offs_n0, offs_d, offs_m, L, row_stride,
                           qk_scale, slope2, CAUSAL, HAS_ALIBI, ALIBI_SPLIT, USE_TMA, DOT_DTYPE, DOT_PRECISION, True)
        tl.store(DQ + base + offs_m[:, None].to(tl.int64) * row_stride + offs_d[None, :],
                 cast_to(dq * sm_scale, DQ.dtype.element_ty), mask=m_mask[:, None])


@triton.jit
def _dkdv_block(dk, dv, k, v, q_view, do_view, LSE, DELTA, stat_base, m0, n0, offs_m0, offs_d, offs_n, L,
                row_stride, qk_scale, slope2, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, ALIBI_SPLIT: tl.constexpr,
                USE_TMA: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    offs_m = m0 + offs_m0
    q = load_rows(q_view, m0, offs_m, offs_d, L, row_stride, USE_TMA, MASKED)
    do = load_rows(do_view, m0, offs_m, offs_d, L, row_stride, USE_TMA, MASKED)
    if MASKED:
        m_mask = offs_m < L
        row_lse2 = tl.load(LSE + stat_base + offs_m, mask=m_mask, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + stat_base + offs_m, mask=m_mask, other=0.0)
    else:
        row_lse2 = tl.load(LSE + stat_base + offs_m) * 1.4426950408889634
        delta = tl.load(DELTA + stat_base + offs_m)
    if HAS_ALIBI:
        row_lse2 += alibi_row(slope2, offs_m, n0, ALIBI_SPLIT)  # relative to the resident key block
    s = scores(q, k, alibi_bias(slope2, offs_m, offs_n, n0, ALIBI_SPLIT), offs_m, offs_n, L, qk_scale, CAUSAL,
               HAS_ALIBI, DOT_DTYPE, DOT_PRECISION, MASKED)
    p = tl.exp2(s - row_lse2[:, None])  # exact 0 where masked or past the sequence (lse = +inf)
    p_r = cast_to(p, v.dtype).to(DOT_DTYPE)
    dv += tl.dot(tl.trans(p_r), do.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    dp = tl.dot(do.to(DOT_DTYPE), tl.trans(v.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dk += tl.dot(tl.trans(ds.to(DOT_DTYPE)), q.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO,  # *T [total_T, H, D]
    LSE, DELTA,  # *fp32 [H, total_T]
    DK, DV,  # *T [total_T, H, D]
    CU, SLOPES,
    qk_scale, sm_scale, total_T, H,
    MAX_SEQLEN_BUCKET,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, ALIBI_SPLIT: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)  # causal: the first key blocks see the most queries and start first
    h = tl.program_id(1)
    seq = tl.program_id(2)
    start = tl.load(CU + seq)
    L = tl.load(CU + seq + 1) - start
    n0 = pid_n * BLOCK_N
    if n0 < L:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_stride = H * HEAD_DIM
        base = start.to(tl.int64) * row_stride + h * HEAD_DIM
        n_mask = offs_n < L
        k = load_rows(seq_view(K, base, L, row_stride, BLOCK_N, HEAD_DIM, USE_TMA), n0, offs_n, offs_d, L,
                      row_stride, USE_TMA, True)
        v = load_rows(seq_view(V, base, L, row_stride, BLOCK_N, HEAD_DIM, USE_TMA), n0, offs_n, offs_d, L,
                      row_stride, USE_TMA, True)
        q_view = seq_view(Q, base, L, row_stride, BLOCK_M, HEAD_DIM, USE_TMA)
        do_view = seq_view(DO, base, L, row_stride, BLOCK_M, HEAD_DIM, USE_TMA)
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(SLOPES + h).to(tl.float32) * 1.4426950408889634
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        stat_base = h.to(tl.int64) * total_T + start
        # [lo, diag_end): query blocks crossing the diagonal (masked); [diag_end, full_end): every row
        # sees every key of this block (no mask math; needs the key block inside the sequence);
        # [max(diag_end, full_end), L): the sequence-end tail (masked).
        if CAUSAL:
            lo = (n0 // BLOCK_M) * BLOCK_M
            diag_end = tl.minimum(tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M, L)
        else:
            lo = 0
            diag_end = 0
        full_end = tl.where(n0 + BLOCK_N <= L, (L // BLOCK_M) * BLOCK_M, 0)
        for m0 in range(lo, diag_end, BLOCK_M):
            dk, dv = _dkdv_block(dk, dv, k, v, q_view, do_view, LSE, DELTA, stat_base, m0, n0, offs_m0,
                                 offs_d, offs_n, L, row_stride, qk_scale, slope2, CAUSAL, HAS_ALIBI, ALIBI_SPLIT, USE_TMA,
                                 DOT_DTYPE, DOT_PRECISION, True)
        for m0 in range(diag_end, full_end, BLOCK_M):
            dk, dv = _dkdv_block(dk, dv, k, v, q_view, do_view, LSE, DELTA, stat_base, m0, n0, offs_m0,
                                 offs_d, offs_n, L, row_stride, qk_scale, slope2, CAUSAL, HAS_ALIBI, ALIBI_SPLIT, USE_TMA,
                                 DOT_DTYPE, DOT_PRECISION, False)
        for m0 in range(tl.maximum(diag_end, full_end), L, BLOCK_M):
            dk, dv = _dkdv_block(dk, dv, k, v, q_view, do_view, LSE, DELTA, stat_base, m0, n0, offs_m0,
                                 offs_d, offs_n, L, row_stride, qk_scale, slope2, CAUSAL, HAS_ALIBI, ALIBI_SPLIT, USE_TMA,
                                 DOT_DTYPE, DOT_PRECISION, True)
        kv_offs = base + offs_n[:, None].to(tl.int64) * row_stride + offs_d[None, :]
        tl.store(DK + kv_offs, cast_to(dk * sm_scale, DK.dtype.element_ty), mask=n_mask[:, None])
        tl.store(DV + kv_offs, cast_to(dv, DV.dtype.element_ty), mask=n_mask[:, None])

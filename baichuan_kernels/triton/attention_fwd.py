"""Flash attention forward kernel (Triton) and the tile helpers the backward shares.

One program per (query block of BLOCK_M rows, head, sequence). Scores in the log2 domain
(``qk_scale`` = softmax_scale · log2(e), ``exp2``). ALiBi ``slope·log2(e)·(j - i)`` comes two ways
(constexpr ``ALIBI_SPLIT``): 16-bit inputs split it into a per-column vector ``slope·log2(e)·(j - r)``
(r = the program's first query, or first key in dk/dv) — one fp32 FMA per score — and a per-row term
that cancels in the softmax and is only applied to the lse; fp32 inputs add the exact per-score
``(j - i)`` term (the split form puts the relevant scores at magnitude slope·BLOCK and costs fp32 a few
ulps there; far below 16-bit rounding). Causal programs never load a key block past their diagonal;
key blocks unmasked for every row of the program run a loop without any mask math (``MASKED=False``),
only the diagonal / sequence-end blocks apply it.

Loads: ``USE_TMA`` (sm_90) builds one tensor descriptor per (sequence, head) in the kernel
(``tl.make_tensor_descriptor``, shape [L, Dh]: rows past the sequence come back as zeros, like the
masked pointer loads of ``USE_TMA=False`` used on sm_80). Both paths run under the interpreter.

Shapes: Q, K, V, O: [total_T, H, Dh] contiguous; CU int32 [S+1]; SLOPES fp32 [H]; LSE fp32 [H, total_T].
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import cast_to


@triton.jit
def seq_view(X, base, L, row_stride, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    """The [L, Dh] rows of one (sequence, head): a TMA descriptor with [BLOCK, Dh] boxes, or a pointer."""
    if USE_TMA:
        view = tl.make_tensor_descriptor(X + base, shape=[L, HEAD_DIM], strides=[row_stride, 1],
                                         block_shape=[BLOCK, HEAD_DIM])
    else:
        view = X + base
    return view


@triton.jit
def load_rows(view, r0, offs_r, offs_d, L, row_stride, USE_TMA: tl.constexpr, MASKED: tl.constexpr):
    """[BLOCK, Dh] rows ``r0 + offs_r`` of a :func:`seq_view`; zeros past L (``MASKED`` or TMA)."""
    if USE_TMA:
        x = view.load([r0, 0])
    else:
        ptrs = view + offs_r[:, None].to(tl.int64) * row_stride + offs_d[None, :]
        if MASKED:
            x = tl.load(ptrs, mask=(offs_r < L)[:, None], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def alibi_bias(slope2, offs_m, offs_n, ref, ALIBI_SPLIT: tl.constexpr):
    """ALiBi (log2 domain) for a [BLOCK_M, BLOCK_N] tile: the column part ``slope2·(j - ref)``
    ([1, BLOCK_N], pair it with :func:`alibi_row`) when split, else the exact ``slope2·(j - i)``."""
    if ALIBI_SPLIT:
        bias = (slope2 * (offs_n - ref).to(tl.float32))[None, :]
    else:
        bias = slope2 * (offs_n[None, :] - offs_m[:, None]).to(tl.float32)
    return bias


@triton.jit
def alibi_row(slope2, offs_m, ref, ALIBI_SPLIT: tl.constexpr):
    """The per-row term the split form leaves out of the scores: ``slope2·(i - ref)`` (0 if exact)."""
    if ALIBI_SPLIT:
        row = slope2 * (offs_m - ref).to(tl.float32)
    else:
        row = tl.zeros_like(offs_m).to(tl.float32)
    return row


@triton.jit
def scores(q, k, bias, offs_m, offs_n, L, qk_scale, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr,
           DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """log2-domain scores [BLOCK_M, BLOCK_N]: ``q·kᵀ·qk_scale + bias`` (with ALiBi; bias broadcasts to
    the tile: the forward's [1, BLOCK_N] column term, the backward's exact [BLOCK_M, BLOCK_N] term),
    -inf past the sequence or in the causal future when ``MASKED`` (the caller guarantees nothing is
    masked otherwise)."""
    s = tl.dot(q.to(DOT_DTYPE), tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
    if HAS_ALIBI:
        s = s * qk_scale + bias
    else:
        s = s * qk_scale
    if MASKED:
        valid = offs_n[None, :] < L
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
    return s


@triton.jit
def _fwd_block(acc, l_i, m_i, q, k_view, v_view, n0, m0, offs_n0, offs_d, offs_m, L, row_stride, qk_scale, slope2,
               CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, ALIBI_SPLIT: tl.constexpr, USE_TMA: tl.constexpr,
               DOT_DTYPE: tl.constexpr,
               DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """One key block of the online softmax; returns the updated (acc, l_i, m_i)."""
    offs_n = n0 + offs_n0
    k = load_rows(k_view, n0, offs_n, offs_d, L, row_stride, USE_TMA, MASKED)
    v = load_rows(v_view, n0, offs_n, offs_d, L, row_stride, USE_TMA, MASKED)
    bias = alibi_bias(slope2, offs_m, offs_n, m0, ALIBI_SPLIT)
    s = scores(q, k, bias, offs_m, offs_n, L, qk_scale, CAUSAL, HAS_ALIBI, DOT_DTYPE, DOT_PRECISION, MASKED)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p_v = cast_to(p, v.dtype).to(DOT_DTYPE)  # P rounded to V's dtype, as the reference
    acc = acc * alpha[:, None] + tl.dot(p_v, v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def attn_fwd_kernel(
    Q, K, V,  # *T [total_T, H, D]
    O,  # *T [total_T, H, D]
    LSE,  # *fp32 [H, total_T]
    CU,  # *i32 [S+1]
    SLOPES,  # *fp32 [H] (read only when HAS_ALIBI)
    qk_scale,  # softmax_scale · log2(e)
    total_T,
    H,
    MAX_SEQLEN_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    ALIBI_SPLIT: tl.constexpr,
    USE_TMA: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Longest causal blocks (the last query blocks) first: shorter tail of the wave.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
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
        q_view = seq_view(Q, base, L, row_stride, BLOCK_M, HEAD_DIM, USE_TMA)
        k_view = seq_view(K, base, L, row_stride, BLOCK_N, HEAD_DIM, USE_TMA)
        v_view = seq_view(V, base, L, row_stride, BLOCK_N, HEAD_DIM, USE_TMA)
        q = load_rows(q_view, m0, offs_m, offs_d, L, row_stride, USE_TMA, True)
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(SLOPES + h).to(tl.float32) * 1.4426950408889634
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        # Key blocks below full_hi are unmasked for every row (inside the sequence and, causal, at or
        # before the block's first query); [full_hi, hi) apply the mask; causal stops at the diagonal.
        if CAUSAL:
            hi = tl.minimum(L, m0 + BLOCK_M)
            full_hi = (tl.minimum(m0 + 1, L) // BLOCK_N) * BLOCK_N
        else:
            hi = L
            full_hi = (L // BLOCK_N) * BLOCK_N
        for n0 in range(0, full_hi, BLOCK_N):
            acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_view, v_view, n0, m0, offs_n0, offs_d, offs_m, L,
                                       row_stride, qk_scale, slope2, CAUSAL, HAS_ALIBI, ALIBI_SPLIT, USE_TMA, DOT_DTYPE,
                                       DOT_PRECISION, False)
        for n0 in range(full_hi, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_view, v_view, n0, m0, offs_n0, offs_d, offs_m, L,
                                       row_stride, qk_scale, slope2, CAUSAL, HAS_ALIBI, ALIBI_SPLIT, USE_TMA, DOT_DTYPE,
                                       DOT_PRECISION, True)
        has = l_i > 0.0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        tl.store(O + base + offs_m[:, None].to(tl.int64) * row_stride + offs_d[None, :],
                 cast_to(out, O.dtype.element_ty), mask=m_mask[:, None])
        # natural-log lse with ALiBi's row term put back; +inf for a row with no allowed key
        lse2 = m_i + tl.log2(tl.where(has, l_i, 1.0))
        if HAS_ALIBI:
            lse2 -= alibi_row(slope2, offs_m, m0, ALIBI_SPLIT)
        lse = tl.where(has, lse2 * 0.6931471805599453, float("inf"))
        tl.store(LSE + h.to(tl.int64) * total_T + start + offs_m, lse, mask=m_mask)

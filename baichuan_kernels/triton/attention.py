"""Flash attention in Triton: ALiBi / causal, packed (varlen) sequences, forward and backward.

Forward: one program per (query block of BLOCK_M rows, head, sequence); grid
``(cdiv(max_seqlen, BLOCK_M), H, num_seqs)``. Online softmax in fp32 in the log2 domain (the scale is
multiplied by log2(e) once, the ALiBi slope too, then ``exp2``); the bias ``slope_h · (j - i)`` is
computed in fp32 inside the kernel; causal programs stop at their diagonal block (block skipping).
The probabilities are rounded to the value dtype before ``P @ V`` (as the reference does). The
natural-log logsumexp per query row is saved (``lse: fp32 [H, total_T]``).

Backward (deterministic, no atomics): ``delta = rowsum(dO · O)`` in a preprocess kernel, then one
kernel per key block accumulating dk, dv over the query blocks it can see, and one kernel per query
block accumulating dq over its key blocks; both recompute P from q, k and the saved lse.

``tl.dot`` operands are cast to the constexpr ``DOT_DTYPE``: the input dtype on a GPU (tensor cores:
wgmma on sm_90, mma on sm_80), fp32 under the interpreter (whose bf16 dot is wrong). fp32 inputs use
``input_precision="ieee"`` (no tf32). On a GPU the backward also rounds dS to the input dtype before
its two matmuls (the usual flash-attention trade); the interpreter keeps it in fp32.

Shapes: q, k, v, out, dout, dq, dk, dv: [total_T, H, Dh] contiguous; cu_seqlens int32 [S+1];
alibi_slopes fp32 [H] or None; lse, delta: fp32 [H, total_T].
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..registry import TRITON_INTERPRET
from ._common import cast_to

HEAD_DIMS = (16, 32, 64, 128)
LOG2E = 1.4426950408889634

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def dot_dtype(dtype: torch.dtype):
    """tl.dot operand dtype: fp32 under the interpreter, the input dtype on a GPU."""
    return tl.float32 if TRITON_INTERPRET else _TL_DTYPES[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: exact fp32 products ("ieee", no tf32); 16-bit inputs: the default (tensor cores)."""
    return "ieee" if dtype == torch.float32 or TRITON_INTERPRET else "tf32"


def _configs(gpu: list[triton.Config], interp: triton.Config) -> list[triton.Config]:
    return [interp] if TRITON_INTERPRET else gpu


# sm_90: BLOCK_M 128 x BLOCK_N 64/128 with 8 warps (two warpgroups of wgmma), 3 stages; sm_80: 4 warps
# and fewer stages also offered (the autotuner drops configs that exceed shared memory).
_FWD_CONFIGS = _configs(
    [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    ],
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1),
)
_BWD_CONFIGS = _configs(
    [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8, num_stages=2),
    ],
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1),
)
_DQ_CONFIGS = _configs(
    [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    ],
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1),
)
# Tuned once per head dim and mask kind (the sequence length is left out: fewer compilations).
_AUTOTUNE_KEY = ["HEAD_DIM", "CAUSAL", "HAS_ALIBI"]


@triton.jit
def _scores(q, k, offs_m, offs_n, L, qk_scale, slope2, CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr,
            DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr = True):
    """log2-domain scores of a [BLOCK_M, D] query block against a [BLOCK_N, D] key block; -inf where
    the key is past the sequence or (causal) in the future. ``MASKED=False``: the caller guarantees
    that no key of the block is masked for any row (the mask is skipped)."""
    s = tl.dot(q.to(DOT_DTYPE), tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * qk_scale
    if HAS_ALIBI:
        s += slope2 * (offs_n[None, :] - offs_m[:, None]).to(tl.float32)
    if MASKED:
        valid = offs_n[None, :] < L
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
    return s


@triton.jit
def _fwd_block(acc, l_i, m_i, q, K, V, base, row_stride, offs_d, offs_m, offs_n, L, qk_scale, slope2,
               CAUSAL: tl.constexpr, HAS_ALIBI: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
               MASKED: tl.constexpr):
    """One key block of the forward's online softmax; returns the updated (acc, l_i, m_i)."""
    kv_offs = base + offs_n[:, None].to(tl.int64) * row_stride + offs_d[None, :]
    if MASKED:
        n_mask = offs_n < L
        k = tl.load(K + kv_offs, mask=n_mask[:, None], other=0.0)
        v = tl.load(V + kv_offs, mask=n_mask[:, None], other=0.0)
    else:
        k = tl.load(K + kv_offs)
        v = tl.load(V + kv_offs)
    s = _scores(q, k, offs_m, offs_n, L, qk_scale, slope2, CAUSAL, HAS_ALIBI, DOT_DTYPE, DOT_PRECISION, MASKED)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p_v = cast_to(p, V.dtype.element_ty).to(DOT_DTYPE)
    acc = acc * alpha[:, None] + tl.dot(p_v, v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.autotune(configs=_FWD_CONFIGS, key=_AUTOTUNE_KEY)
@triton.jit
def _attn_fwd_kernel(
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
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
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
        q_offs = base + offs_m[:, None].to(tl.int64) * row_stride + offs_d[None, :]
        q = tl.load(Q + q_offs, mask=m_mask[:, None], other=0.0)
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(SLOPES + h).to(tl.float32) * 1.4426950408889634
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        # Key blocks below full_hi are unmasked for every row of this block (inside the sequence and,
        # causal, at or before the first query); the rest (diagonal / sequence end) apply the mask.
        # Causal programs stop at their diagonal block.
        if CAUSAL:
            hi = tl.minimum(L, m0 + BLOCK_M)
            full_hi = (tl.minimum(m0 + 1, L) // BLOCK_N) * BLOCK_N
        else:
            hi = L
            full_hi = (L // BLOCK_N) * BLOCK_N
        for n0 in range(0, full_hi, BLOCK_N):
            acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, K, V, base, row_stride, offs_d, offs_m, n0 + offs_n0, L,
                                       qk_scale, slope2, CAUSAL, HAS_ALIBI, DOT_DTYPE, DOT_PRECISION, False)
        for n0 in range(full_hi, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, K, V, base, row_stride, offs_d, offs_m, n0 + offs_n0, L,
                                       qk_scale, slope2, CAUSAL, HAS_ALIBI, DOT_DTYPE, DOT_PRECISION, True)
        has = l_i > 0.0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        tl.store(O + base + offs_m[:, None].to(tl.int64) * row_stride + offs_d[None, :],
                 cast_to(out, O.dtype.element_ty), mask=m_mask[:, None])
        # natural-log lse; +inf for a row with no allowed key (its recomputed probabilities are 0)
        lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("inf"))
        tl.store(LSE + h.to(tl.int64) * total_T + start + offs_m, lse, mask=m_mask)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO,  # *T [total_T, H, D]
    DELTA,  # *fp32 [H, total_T]
    total_T,
    H,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = rows < total_T
    offs = rows[:, None].to(tl.int64) * (H * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :]
    o = tl.load(O + offs, mask=mask[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=mask[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + h.to(tl.int64) * total_T + rows, tl.sum(o * do, 1), mask=mask)


@triton.autotune(configs=_BWD_CONFIGS, key=_AUTOTUNE_KEY)
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO,  # *T [total_T, H, D]
    LSE, DELTA,  # *fp32 [H, total_T]
    DK, DV,  # *T [total_T, H, D]
    CU,
    SLOPES,
    qk_scale,  # softmax_scale · log2(e)
    sm_scale,
    total_T,
    H,
    MAX_SEQLEN_BUCKET,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
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
        kv_offs = base + offs_n[:, None].to(tl.int64) * row_stride + offs_d[None, :]
        k = tl.load(K + kv_offs, mask=n_mask[:, None], other=0.0)
        v = tl.load(V + kv_offs, mask=n_mask[:, None], other=0.0)
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(SLOPES + h).to(tl.float32) * 1.4426950408889634
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        stat_base = h.to(tl.int64) * total_T + start
        if CAUSAL:
            lo = (n0 // BLOCK_M) * BLOCK_M
        else:
            lo = 0
        for m0 in range(lo, L, BLOCK_M):
            offs_m = m0 + offs_m0
            m_mask = offs_m < L
            q_offs = base + offs_m[:, None].to(tl.int64) * row_stride + offs_d[None, :]
            q = tl.load(Q + q_offs, mask=m_mask[:, None], other=0.0)
            do = tl.load(DO + q_offs, mask=m_mask[:, None], other=0.0)
            lse2 = tl.load(LSE + stat_base + offs_m, mask=m_mask, other=float("inf")) * 1.4426950408889634
            delta = tl.load(DELTA + stat_base + offs_m, mask=m_mask, other=0.0)
            s = _scores(q, k, offs_m, offs_n, L, qk_scale, slope2, CAUSAL, HAS_ALIBI, DOT_DTYPE, DOT_PRECISION)
            p = tl.exp2(s - lse2[:, None])  # exact 0 where masked or past the sequence
            p = tl.where(m_mask[:, None], p, 0.0)
            p_r = cast_to(p, V.dtype.element_ty).to(DOT_DTYPE)
            dv += tl.dot(tl.trans(p_r), do.to(DOT_DTYPE), input_precision=DOT_PRECISION)
            dp = tl.dot(do.to(DOT_DTYPE), tl.trans(v.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(DOT_DTYPE)), q.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        tl.store(DK + kv_offs, cast_to(dk * sm_scale, DK.dtype.element_ty), mask=n_mask[:, None])
        tl.store(DV + kv_offs, cast_to(dv, DV.dtype.element_ty), mask=n_mask[:, None])


@triton.autotune(configs=_DQ_CONFIGS, key=_AUTOTUNE_KEY)
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO,  # *T [total_T, H, D]
    LSE, DELTA,  # *fp32 [H, total_T]
    DQ,  # *T [total_T, H, D]
    CU,
    SLOPES,
    qk_scale,
    sm_scale,
    total_T,
    H,
    MAX_SEQLEN_BUCKET,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
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
        q_offs = base + offs_m[:, None].to(tl.int64) * row_stride + offs_d[None, :]
        q = tl.load(Q + q_offs, mask=m_mask[:, None], other=0.0)
        do = tl.load(DO + q_offs, mask=m_mask[:, None], other=0.0)
        stat_base = h.to(tl.int64) * total_T + start
        lse2 = tl.load(LSE + stat_base + offs_m, mask=m_mask, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + stat_base + offs_m, mask=m_mask, other=0.0)
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(SLOPES + h).to(tl.float32) * 1.4426950408889634
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        if CAUSAL:
            hi = tl.minimum(L, m0 + BLOCK_M)
        else:
            hi = L
        for n0 in range(0, hi, BLOCK_N):
            offs_n = n0 + offs_n0
            n_mask = offs_n < L
            kv_offs = base + offs_n[:, None].to(tl.int64) * row_stride + offs_d[None, :]
            k = tl.load(K + kv_offs, mask=n_mask[:, None], other=0.0)
            v = tl.load(V + kv_offs, mask=n_mask[:, None], other=0.0)
            s = _scores(q, k, offs_m, offs_n, L, qk_scale, slope2, CAUSAL, HAS_ALIBI, DOT_DTYPE, DOT_PRECISION)
            p = tl.exp2(s - lse2[:, None])
            dp = tl.dot(do.to(DOT_DTYPE), tl.trans(v.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(DOT_DTYPE), k.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        tl.store(DQ + q_offs, cast_to(dq * sm_scale, DQ.dtype.element_ty), mask=m_mask[:, None])


def _check(q: torch.Tensor) -> None:
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"the Triton attention kernels support head dims {HEAD_DIMS}, got Dh = {q.shape[-1]}")


def _bucket(max_seqlen: int) -> int:
    return triton.next_power_of_2(max(int(max_seqlen), 1))


@torch.library.custom_op("baichuan_triton::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, alibi_slopes: Optional[torch.Tensor],
    softmax_scale: float, causal: bool, max_seqlen: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q)
    total_T, H, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(H, total_T, device=q.device, dtype=torch.float32)
    S = cu_seqlens.shape[0] - 1
    if total_T == 0 or S == 0 or max_seqlen == 0:
        return out, lse
    grid = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), H, S)  # noqa: E731
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens, alibi_slopes if alibi_slopes is not None else lse,
        softmax_scale * LOG2E, total_T, H, _bucket(max_seqlen),
        HEAD_DIM=D, CAUSAL=causal, HAS_ALIBI=alibi_slopes is not None, DOT_DTYPE=dot_dtype(q.dtype),
        DOT_PRECISION=dot_precision(q.dtype),
    )
    return out, lse


@torch.library.custom_op("baichuan_triton::attention_bwd", mutates_args=())
def attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens: torch.Tensor, alibi_slopes: Optional[torch.Tensor], softmax_scale: float, causal: bool,
    max_seqlen: int, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Always deterministic: the two-kernel backward uses no atomics.
    _check(q)
    total_T, H, D = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    S = cu_seqlens.shape[0] - 1
    if total_T == 0 or S == 0 or max_seqlen == 0:
        return dq, dk, dv
    delta = torch.empty(H, total_T, device=q.device, dtype=torch.float32)
    block = 16 if TRITON_INTERPRET else 64
    _attn_bwd_preprocess_kernel[(triton.cdiv(total_T, block), H)](out, dout, delta, total_T, H, HEAD_DIM=D, BLOCK=block)
    slopes = alibi_slopes if alibi_slopes is not None else lse
    common = dict(HEAD_DIM=D, CAUSAL=causal, HAS_ALIBI=alibi_slopes is not None, DOT_DTYPE=dot_dtype(q.dtype),
                  DOT_PRECISION=dot_precision(q.dtype))
    grid_n = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_N"]), H, S)  # noqa: E731
    _attn_bwd_dkdv_kernel[grid_n](
        q, k, v, dout, lse, delta, dk, dv, cu_seqlens, slopes, softmax_scale * LOG2E, softmax_scale,
        total_T, H, _bucket(max_seqlen), **common,
    )
    grid_m = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), H, S)  # noqa: E731
    _attn_bwd_dq_kernel[grid_m](
        q, k, v, dout, lse, delta, dq, cu_seqlens, slopes, softmax_scale * LOG2E, softmax_scale,
        total_T, H, _bucket(max_seqlen), **common,
    )
    return dq, dk, dv

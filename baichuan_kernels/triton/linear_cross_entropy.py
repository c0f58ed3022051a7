"""Fused LM head (NormHead) + cross-entropy + max-z loss in Triton: forward statistics and grad-logits.

Semantics: :mod:`baichuan_kernels.reference.linear_cross_entropy`; the algorithm and the kernel op
contract are those of csrc/common/linear_cross_entropy_checks.h (same schemas, same outputs).

* ``_lce_stats_kernel`` — one program per ``BLOCK_N`` rows walks the vocabulary in ``BLOCK_V`` tiles:
  each ``[BLOCK_N, BLOCK_V]`` tile of logits is a ``tl.dot`` over ``BLOCK_D`` slices of hidden and
  weight (fp32 accumulator), scaled by ``rinv`` (NormHead), and folded into per-row running max /
  argmax / sum of exp (online logsumexp) and the target logit. No logits ever reach memory.
* ``_lce_grad_kernel`` — for a chunk of rows, a 2-D grid of tiles recomputes the logits and writes
  ``g · (softmax − onehot) · rinv`` (the gradient of ``h @ Wᵀ``) into the chunk buffer ``[C, V]``;
  ``dH_c = G @ W`` and ``A += Gᵀ @ h_c`` are torch GEMMs (cuBLAS on the GPU, bf16 in / fp32 out),
  followed by the exact NormHead backward ``dW = A − rinv² (A·W) W`` per row.

Extra memory: one ``[C, V]`` gradient chunk (grads only). Under the interpreter ``tl.dot`` on bf16 is
wrong, so the dot operands are cast to ``DOT_DTYPE`` (fp32 when interpreting, the input dtype on GPU);
fp32 inputs use ``input_precision="ieee"`` (no TF32).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..registry import TRITON_INTERPRET
from ._common import cast_to

NORM_HEAD_EPS = 1e-12


@triton.jit
def _logits_tile(
    H, W, RINV, offs_n, offs_v, N, V, D,
    NORM_HEAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """fp32 ``[BLOCK_N, BLOCK_V]`` tile of ``h @ Ŵᵀ`` (columns ≥ V are -inf)."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    n_mask = offs_n < N
    v_mask = offs_v < V
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        h = tl.load(H + offs_n[:, None] * D + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(W + offs_v[:, None] * D + offs_d[None, :], mask=v_mask[:, None] & d_mask[None, :], other=0.0)
        acc = tl.dot(h.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=PRECISION)
    if NORM_HEAD:
        r = tl.load(RINV + offs_v, mask=v_mask, other=0.0)
        acc = acc * r[None, :]
    return tl.where(v_mask[None, :], acc, float("-inf"))


@triton.jit
def _lce_stats_kernel(
    H,  # *T [N, D] hidden
    W,  # *T [V, D] head weight (un-normalised)
    RINV,  # *fp32 [V] 1 / max(‖W[v]‖, eps) (read when NORM_HEAD)
    LABELS,  # *int64 [N]
    CE,  # *fp32 [N] lse − target (0 at ignored rows)
    ROW_MAX,  # *fp32 [N] max logit (0 at ignored rows)
    ARGMAX,  # *int64 [N] first index of the max (0 at ignored rows)
    LSE,  # *fp32 [N] logsumexp (every row), for the gradient kernel
    N, V, D, ignore_index,
    NORM_HEAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    y = tl.load(LABELS + offs_n, mask=n_mask, other=ignore_index)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    am = tl.zeros([BLOCK_N], dtype=tl.int64)
    tgt = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        logits = _logits_tile(H, W, RINV, offs_n, offs_v, N, V, D, NORM_HEAD, BLOCK_N, BLOCK_V, BLOCK_D,
                              DOT_DTYPE, PRECISION)
        tile_max = tl.max(logits, axis=1)
        tile_arg = tl.argmax(logits, axis=1).to(tl.int64) + v0
        am = tl.where(tile_max > m, tile_arg, am)  # strict: the first maximum wins
        new_m = tl.maximum(m, tile_max)
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(logits - new_m[:, None]), axis=1)
        m = new_m
        tgt += tl.sum(tl.where(offs_v[None, :] == y[:, None], logits, 0.0), axis=1)
    # An infinite logit: logsumexp = +inf (as torch.logsumexp), not inf - inf = NaN. A NaN logit makes s
    # NaN; the row max follows (the GPU max reductions skip NaN), as the reference's amax does.
    lse = tl.where(m == float("inf"), m, m + tl.log(s))
    m = tl.where((s != s) & (m != float("inf")), s, m)
    keep = y != ignore_index
    tl.store(CE + offs_n, tl.where(keep, lse - tgt, 0.0), mask=n_mask)
    tl.store(ROW_MAX + offs_n, tl.where(keep, m, 0.0), mask=n_mask)
    tl.store(ARGMAX + offs_n, tl.where(keep, am, 0), mask=n_mask)
    tl.store(LSE + offs_n, lse, mask=n_mask)


@triton.jit
def _lce_grad_kernel(
    H,  # *T [n, D] hidden rows of this chunk
    W,  # *T [V, D]
    RINV,  # *fp32 [V] (read when NORM_HEAD)
    LABELS,  # *int64 [n]
    LSE,  # *fp32 [n]
    ROW_GRAD,  # *fp32 [n] CE weight per row (0 at ignored rows is applied here)
    G,  # *G_T [n, V] out: g · (softmax − onehot) · rinv
    N, V, D, ignore_index,
    NORM_HEAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    n_mask = offs_n < N
    v_mask = offs_v < V
    logits = _logits_tile(H, W, RINV, offs_n, offs_v, N, V, D, NORM_HEAD, BLOCK_N, BLOCK_V, BLOCK_D,
                          DOT_DTYPE, PRECISION)
    y = tl.load(LABELS + offs_n, mask=n_mask, other=ignore_index)
    lse = tl.load(LSE + offs_n, mask=n_mask, other=0.0)
    g = tl.load(ROW_GRAD + offs_n, mask=n_mask, other=0.0)
    g = tl.where(y != ignore_index, g, 0.0)
    p = tl.exp(logits - lse[:, None]) - tl.where(offs_v[None, :] == y[:, None], 1.0, 0.0)
    p = p * g[:, None]
    if NORM_HEAD:
        r = tl.load(RINV + offs_v, mask=v_mask, other=0.0)
        p = p * r[None, :]
    tl.store(G + offs_n[:, None] * V + offs_v[None, :], cast_to(p, G.dtype.element_ty),
             mask=n_mask[:, None] & v_mask[None, :])


_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _config(dtype: torch.dtype, N: int, D: int) -> dict:
    """Block sizes: small under the interpreter (each program instance costs ~1 ms), MMA-sized on GPU."""
    prec = "ieee" if dtype == torch.float32 else "tf32"
    if TRITON_INTERPRET:
        return dict(BLOCK_N=16, BLOCK_V=64, BLOCK_D=32, DOT_DTYPE=tl.float32, PRECISION=prec)
    block_n = 64 if N >= 64 else 16
    big = dtype != torch.float32
    return dict(BLOCK_N=block_n, BLOCK_V=128, BLOCK_D=64 if big else 32, DOT_DTYPE=_TL_DTYPE[dtype],
                PRECISION=prec, num_warps=8 if block_n == 64 else 4, num_stages=3)


def _rinv(weight: torch.Tensor) -> torch.Tensor:
    """fp32 [V] 1 / max(‖W[v]‖, eps), in row chunks (no full fp32 copy of W)."""
    V, D = weight.shape
    out = torch.empty(V, device=weight.device, dtype=torch.float32)
    step = max(1, (1 << 24) // max(D, 1))
    for v0 in range(0, V, step):
        w = weight[v0:v0 + step].float()
        norm = torch.linalg.vector_norm(w, dim=1)
        # a row whose fp32 norm overflows (bf16 weights beyond ~1.8e19): 2^-96 / ‖2^-96 W‖, as the reference
        scaled = torch.linalg.vector_norm(w * 2.0**-96, dim=1).reciprocal() * 2.0**-96
        out[v0:v0 + step] = torch.where(norm.isinf(), scaled, norm.clamp_min(NORM_HEAD_EPS).reciprocal())
    return out


def _norm_head_backward_(acc: torch.Tensor, weight: torch.Tensor, rinv: torch.Tensor) -> None:
    """In place on ``acc = rinv ⊙ dŴ``: ``dW = acc − rinv² (acc·W) W`` (rows with ‖W‖ < eps keep acc)."""
    V, D = weight.shape
    step = max(1, (1 << 24) // max(D, 1))
    for v0 in range(0, V, step):
        a, w, r = acc[v0:v0 + step], weight[v0:v0 + step].float(), rinv[v0:v0 + step]
        coef = (a * w).sum(1) * r * r
        coef = torch.where(r < 1.0 / NORM_HEAD_EPS, coef, torch.zeros_like(coef))
        a.sub_(w * coef[:, None])


def _stats(hidden, weight, labels, rinv, norm_head, ignore_index):
    N, D = hidden.shape
    V = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    ce, row_max, lse = torch.empty(N, **f32), torch.empty(N, **f32), torch.empty(N, **f32)
    argmax = torch.empty(N, device=hidden.device, dtype=torch.int64)
    if N > 0:
        cfg = _config(hidden.dtype, N, D)
        _lce_stats_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
            hidden, weight, rinv if norm_head else ce, labels, ce, row_max, argmax, lse, N, V, D, ignore_index,
            NORM_HEAD=norm_head, **cfg,
        )
    return ce, row_max, argmax, lse


def _chunk_rows(chunk_size: int, N: int, V: int) -> int:
    c = chunk_size if chunk_size > 0 else max(1, (1 << 26) // max(V, 1))
    return max(1, min(c, max(N, 1)))


def _grads(hidden, weight, labels, rinv, lse, row_grad, norm_head, ignore_index, chunk_size, grad_hidden,
           grad_weight):
    """fp32 (dhidden [N, D] or [0], dweight [V, D] or [0]): the CE gradient with per-row weights."""
    N, D = hidden.shape
    V = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    dh = torch.empty(N, D, **f32) if grad_hidden else torch.empty(0, **f32)
    dw = torch.zeros(V, D, **f32) if grad_weight else torch.empty(0, **f32)
    if not (grad_hidden or grad_weight) or N == 0:
        return dh, dw
    native16 = hidden.is_cuda and hidden.dtype != torch.float32
    g_dtype = hidden.dtype if native16 else torch.float32
    w_op = weight if native16 else weight.float()  # [V, D]
    C = _chunk_rows(chunk_size, N, V)
    buf = torch.empty(C, V, device=hidden.device, dtype=g_dtype)  # the one gradient chunk
    cfg = _config(hidden.dtype, C, D)
    for r0 in range(0, N, C):
        n = min(C, N - r0)
        h = hidden[r0:r0 + n]
        g = buf[:n]
        _lce_grad_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"]))](
            h, weight, rinv if norm_head else lse, labels[r0:r0 + n], lse[r0:r0 + n], row_grad[r0:r0 + n], g,
            n, V, D, ignore_index, NORM_HEAD=norm_head, **cfg,
        )
        if native16:
            # bf16/fp16 operands, fp32 results written in place (no [V, D] temporary per chunk)
            if grad_hidden:
                torch.mm(g, w_op, out_dtype=torch.float32, out=dh[r0:r0 + n])
            if grad_weight:
                torch.addmm(dw, g.t(), h, out_dtype=torch.float32, out=dw)
        else:
            if grad_hidden:
                torch.mm(g, w_op, out=dh[r0:r0 + n])
            if grad_weight:
                dw.addmm_(g.t(), h.float())
    if grad_weight and norm_head:
        _norm_head_backward_(dw, weight, rinv)
    return dh, dw


def _reduce(ce_rows, row_max, labels, ignore_index, z_loss_weight, reduction):
    z_rows = row_max * row_max
    if reduction == "none":
        return ce_rows + z_loss_weight * z_rows, ce_rows, z_rows
    ce, z = ce_rows.sum(), z_rows.sum()
    if reduction == "mean":
        kept = (labels != ignore_index).sum().clamp_min(1).float()
        ce, z = ce / kept, z / kept
    return ce + z_loss_weight * z, ce, z


def _prepare(hidden, weight, labels, norm_head, ignore_index):
    if labels.dtype != torch.int64:
        labels = labels.long()
    V = weight.shape[0]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        raise ValueError(f"labels must be in [0, V={V}) or ignore_index={ignore_index}")
    rinv = _rinv(weight) if norm_head else torch.empty(0, device=hidden.device, dtype=torch.float32)
    return labels.contiguous(), rinv


@torch.library.custom_op("baichuan_triton::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, norm_head: bool, z_loss_weight: float,
    ignore_index: int, reduction: str, chunk_size: int, grad_hidden: bool, grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    labels, rinv = _prepare(hidden, weight, labels, norm_head, ignore_index)
    ce_rows, row_max, argmax, lse = _stats(hidden, weight, labels, rinv, norm_head, ignore_index)
    ones = torch.ones_like(lse)
    dh, dw = _grads(hidden, weight, labels, rinv, lse, ones, norm_head, ignore_index, chunk_size, grad_hidden,
                    grad_weight)
    loss, ce, z = _reduce(ce_rows, row_max, labels, ignore_index, z_loss_weight, reduction)
    return loss, ce, z, row_max, argmax, rinv, dh, dw


@torch.library.custom_op("baichuan_triton::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, grad_rows: torch.Tensor, norm_head: bool,
    ignore_index: int, chunk_size: int, grad_hidden: bool, grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    labels, rinv = _prepare(hidden, weight, labels, norm_head, ignore_index)
    _ce, _max, _arg, lse = _stats(hidden, weight, labels, rinv, norm_head, ignore_index)
    return _grads(hidden, weight, labels, rinv, lse, grad_rows.float().contiguous(), norm_head, ignore_index,
                  chunk_size, grad_hidden, grad_weight)


def triton_limits(hidden: torch.Tensor) -> Optional[str]:
    if hidden.dtype == torch.float64:
        return "float64 runs on the reference backend only"
    return None

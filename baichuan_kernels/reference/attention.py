"""Causal self-attention reference with an optional ALiBi bias (BAICHUAN2_SPEC.md §5, §6).

For one sequence, head h, query i and key j::

    s[h, i, j] = scale · <q[i, h], k[j, h]> + slope_h · (j - i)        (bias only with ALiBi)
    s[h, i, j] = -inf                            where j > i            (causal)
    p[h, i, :] = softmax_j(s[h, i, :])
    o[i, h]    = Σ_j p[h, i, j] · v[j, h]

``scale`` defaults to 1/sqrt(Dh). The bias is the relative form ``slope · (j - i)`` in fp32 (the
form Baichuan2-13B trained with; softmax makes it equal to the absolute form ``slope · j``).

Precision: scores, bias and softmax in fp32 (float64 for float64 inputs). The probabilities are
rounded to the input dtype before the P·V product (as fused kernels do for their second matmul),
which is accumulated in fp32 and rounded once to q's dtype. A row with no allowed key gives zeros.

Packed (varlen) inputs ``[total_T, H, Dh]`` with ``cu_seqlens = [0, T_0, T_0+T_1, ...]`` hold several
sequences back to back; each attends only within itself and its positions restart at 0. The
reference materialises the scores, one sequence at a time.
"""

from __future__ import annotations

from typing import Optional

import torch


def _softmax_rows(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis where ``-inf`` marks disallowed keys; all-``-inf`` rows give 0."""
    m = scores.amax(dim=-1, keepdim=True).detach()  # the shift does not change the result
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(scores - m)
    denom = e.sum(dim=-1, keepdim=True)
    return e / torch.where(denom > 0, denom, torch.ones_like(denom))


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    alibi_slopes: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """Dense attention of ``q, k, v: [B, T, H, Dh]`` → ``[B, T, H, Dh]``."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    T = q.shape[1]
    qf = q.to(acc).transpose(1, 2)  # [B, H, T, Dh]
    kf = k.to(acc).transpose(1, 2)  # [B, H, T, Dh]
    vf = v.to(acc).transpose(1, 2)  # [B, H, T, Dh]
    scores = (qf @ kf.transpose(-1, -2)) * scale  # [B, H, T, T]
    pos = torch.arange(T, device=q.device)
    rel = (pos[None, :] - pos[:, None]).to(acc)  # [T, T]: j - i
    if alibi_slopes is not None:
        scores = scores + alibi_slopes.to(acc)[:, None, None] * rel  # [H, 1, 1] · [T, T]
    if causal:
        scores = scores.masked_fill(rel > 0, float("-inf"))
    p = _softmax_rows(scores)  # [B, H, T, T]
    out = p.to(v.dtype).to(acc) @ vf  # [B, H, T, Dh]
    return out.transpose(1, 2).to(q.dtype)


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    alibi_slopes: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
) -> torch.Tensor:
    """Self-attention of ``q, k, v: [B, T, H, Dh]`` (or packed ``[total_T, H, Dh]`` with
    ``cu_seqlens: int32 [S+1]``) → same shape as ``q``, in q's dtype.

    ``alibi_slopes: [H]`` adds ``slope_h · (j - i)``; ``max_seqlen`` (the longest packed sequence)
    is only a hint for kernels and is not needed here. Differentiable by autograd.
    """
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    if cu_seqlens is None:
        return _attend(q, k, v, causal, alibi_slopes, scale)
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            seq = slice(start, end)
            o = _attend(q[None, seq], k[None, seq], v[None, seq], causal, alibi_slopes, scale)  # [1, T_s, H, Dh]
            outs.append(o[0])
    if not outs:
        return q.new_zeros(q.shape)
    return torch.cat(outs, dim=0)  # [total_T, H, Dh]

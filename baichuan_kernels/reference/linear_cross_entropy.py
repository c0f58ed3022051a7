"""Fused LM-head + cross-entropy + max-z loss reference (BAICHUAN2_SPEC.md §8, §9).

For rows ``n`` of ``hidden: [N, D]`` and the head ``weight: [V, D]``::

    Ŵ          = normalize(weight) rows (NormHead, eps 1e-12)      or weight itself (norm_head=False)
    logits[n]  = hidden[n] @ Ŵᵀ                                      [V], fp32 (float64 for float64)
    ce[n]      = logsumexp(logits[n]) - logits[n, labels[n]]
    z[n]       = max_v(logits[n, v])²                                (the max logit, not logsumexp)

Rows with ``labels[n] == ignore_index`` count in neither term. Reductions:

* ``"mean"``: ``ce = Σ ce[n] / M``, ``z = Σ z[n] / M`` over the M kept rows; ``loss = ce + w·z``.
  With no kept row all three are 0 (and so are their gradients), never NaN.
* ``"sum"``: the same sums without dividing.
* ``"none"``: the per-row ``[N]`` vectors (0 at ignored rows) and ``loss[n] = ce[n] + w·z[n]``.

Results are fp32 (float64 for float64 inputs). The released Baichuan 2 code averaged max-z over
every position in bf16; masking and fp32 are deliberate here (spec §9).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from .norm_head import norm_head_weight_ref


def _row_terms(h: torch.Tensor, w_hat: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``[2, n]``: per-row CE and max-z for one chunk of rows (0 at ignored rows)."""
    logits = h @ w_hat.T  # [n, V]
    keep = labels != ignore_index  # [n]
    target = logits.gather(1, torch.where(keep, labels, 0)[:, None])[:, 0]  # [n]
    ce = torch.logsumexp(logits, dim=-1) - target  # [n]
    z = logits.amax(dim=-1).square()  # [n]
    return torch.stack((torch.where(keep, ce, 0.0), torch.where(keep, z, 0.0)))


def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    norm_head: bool = True,
    z_loss_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, z)`` of ``hidden: [N, D]``, ``weight: [V, D]``, ``labels: [N]``.

    ``chunk_size`` rows are processed at a time (all at once when None). Under autograd each chunk
    is recomputed in the backward pass (``torch.utils.checkpoint``), so at most one ``[chunk, V]``
    block of logits is alive at a time, also at V = 125,696. Differentiable into hidden and weight.
    """
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    w = weight.to(acc)  # [V, D]
    w_hat = norm_head_weight_ref(w) if norm_head else w  # [V, D]
    h = hidden.to(acc)  # [N, D]
    labels = labels.long()  # [N]
    N = h.shape[0]

    step = N if not chunk_size else chunk_size
    recompute = chunk_size is not None and torch.is_grad_enabled() and (h.requires_grad or w_hat.requires_grad)
    parts = []
    for start in range(0, N, max(step, 1)):
        rows = slice(start, start + step)
        if recompute:
            parts.append(checkpoint(_row_terms, h[rows], w_hat, labels[rows], ignore_index, use_reentrant=False))
        else:
            parts.append(_row_terms(h[rows], w_hat, labels[rows], ignore_index))
    terms = torch.cat(parts, dim=1) if parts else h.new_zeros(2, 0)  # [2, N]
    ce_rows, z_rows = terms[0], terms[1]

    if reduction == "none":
        return ce_rows + z_loss_weight * z_rows, ce_rows, z_rows
    ce, z = ce_rows.sum(), z_rows.sum()
    if reduction == "mean":
        kept = (labels != ignore_index).sum().clamp_min(1).to(acc)
        ce, z = ce / kept, z / kept
    return ce + z_loss_weight * z, ce, z

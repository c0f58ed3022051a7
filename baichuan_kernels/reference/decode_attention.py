"""Single-token attention over a KV cache, for generation (BAICHUAN2_SPEC.md §5, §6).

Batch ``b`` holds ``L = cache_seqlens[b]`` valid cache rows (positions 0 .. L-1); its query is the
newest token, at position ``L - 1``, and its key/value are already in the cache. For head h::

    s[j] = scale · <q[h], k_cache[j, h]> + slope_h · (j - (L - 1))       j = 0 .. L-1
    o[h] = Σ_j softmax(s)[j] · v_cache[j, h]

Cache rows ``j >= L`` are never read (they may hold garbage). This equals the last row of causal
:func:`attention_ref` over the valid prefix; same precision rules (fp32 scores/softmax, float64
for float64 inputs, probabilities rounded to the input dtype before P·V). ``L = 0`` gives zeros; an
``L`` outside ``[0, S_max]`` (the public API refuses it for CPU tensors; GPU tensors are not checked
on the host) gives a NaN row, as the kernels do.
"""

from __future__ import annotations

from typing import Optional

import torch

from .attention import _softmax_rows


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    alibi_slopes: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
) -> torch.Tensor:
    """``q: [B, 1, H, Dh]``, ``k_cache, v_cache: [B, S_max, H, Dh]``, ``cache_seqlens: [B]`` →
    ``[B, 1, H, Dh]`` in q's dtype."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    S_max = k_cache.shape[1]
    if S_max == 0:  # an empty cache: every sequence has L = 0 (no key to attend to)
        return q.masked_fill(torch.ones_like(q, dtype=torch.bool), 0.0)  # zeros like q, still in its graph
    L = cache_seqlens.to(device=q.device, dtype=torch.long)  # [B]
    j = torch.arange(S_max, device=q.device)  # [S_max]
    valid = j[None, :] < L[:, None]  # [B, S_max]

    qf = q.to(acc).transpose(1, 2)  # [B, H, 1, Dh]
    kf = k_cache.to(acc).transpose(1, 2)  # [B, H, S_max, Dh]
    vf = v_cache.to(acc).transpose(1, 2)  # [B, H, S_max, Dh]
    keep = valid[:, None, :, None]  # [B, 1, S_max, 1]
    kf = torch.where(keep, kf, torch.zeros_like(kf))  # rows j >= L never reach the result
    vf = torch.where(keep, vf, torch.zeros_like(vf))
    scores = (qf @ kf.transpose(-1, -2)) * scale  # [B, H, 1, S_max]
    if alibi_slopes is not None:
        rel = (j[None, :] - (L[:, None] - 1)).to(acc)  # [B, S_max]: j - (L-1)
        scores = scores + alibi_slopes.to(acc)[None, :, None, None] * rel[:, None, None, :]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = _softmax_rows(scores)  # [B, H, 1, S_max]
    out = p.to(v_cache.dtype).to(acc) @ vf  # [B, H, 1, Dh]
    bad = ((L < 0) | (L > S_max))[:, None, None, None]  # [B, 1, 1, 1]
    out = out.masked_fill(bad, float("nan"))
    return out.transpose(1, 2).to(q.dtype)

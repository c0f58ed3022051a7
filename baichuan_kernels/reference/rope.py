"""Rotary position embedding reference, rotate-half (GPT-NeoX / HF-LLaMA) layout (BAICHUAN2_SPEC.md §4).

Baichuan2-7B rotates q and k with::

    inv_freq[i] = base^(-2i/Dh)                 i = 0 .. Dh/2-1, fp32
    angle[p, i] = p · inv_freq[i]               fp32
    cos = cos(cat(angle, angle)), sin = sin(cat(angle, angle))       [T, Dh]
    rotate_half(x) = cat(-x[Dh/2:], x[:Dh/2])
    x' = x · cos[p] + rotate_half(x) · sin[p]

so dimension i is paired with dimension i + Dh/2 (not with its neighbour), and both share the
frequency inv_freq[i]. The rotation runs in fp32 (float64 for float64 inputs) and the result is cast
back to the input dtype.
"""

from __future__ import annotations

from typing import Optional

import torch


def rope_cos_sin_ref(
    T: int, Dh: int = 128, base: float = 10000.0, *, device=None, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos, sin: [T, Dh]`` for positions ``offset .. offset+T-1`` (angles computed in fp32)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, Dh, 2, device=device, dtype=torch.float32) / Dh))  # [Dh/2]
    t = torch.arange(offset, offset + T, device=device, dtype=torch.float32)  # [T]
    angle = torch.outer(t, inv_freq)  # [T, Dh/2]
    emb = torch.cat((angle, angle), dim=-1)  # [T, Dh]
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    position_ids: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q, k: [B, T, H, Dh]`` by the rows of ``cos, sin: [S, Dh]``.

    Row ``position_ids[b, t]`` of cos/sin rotates token ``t`` of batch ``b``; without
    ``position_ids`` token ``t`` uses row ``t`` (so ``S >= T``). Returns ``(q', k')`` in the input dtype.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    T = q.shape[1]
    if position_ids is None:
        c, s = cos[:T], sin[:T]  # [T, Dh]
        c, s = c[None, :, None, :], s[None, :, None, :]  # [1, T, 1, Dh]
    else:
        c, s = cos[position_ids.long()], sin[position_ids.long()]  # [B, T, Dh]
        c, s = c[:, :, None, :], s[:, :, None, :]  # [B, T, 1, Dh]
    c, s = c.to(acc), s.to(acc)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.to(acc)  # [B, T, H, Dh]
        return (xf * c + _rotate_half(xf) * s).to(x.dtype)

    return rotate(q), rotate(k)

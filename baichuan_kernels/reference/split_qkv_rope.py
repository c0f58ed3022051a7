"""Split of the fused W_pack projection into q, k, v plus RoPE on q and k (BAICHUAN2_SPEC.md §2, §4, §6)."""

from __future__ import annotations

from typing import Optional

import torch

from .rope import apply_rope_ref


def split_qkv_rope_ref(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    num_heads: int,
    position_ids: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``qkv: [B, T, 3·D]`` (the W_pack output) → ``q, k, v: [B, T, H, Dh]`` with ``Dh = D / H``.

    Layout of the last axis: ``[q | k | v]``, each block of D features holding H heads of Dh
    contiguous features (``view(B, T, 3, H, Dh)``). q and k are rotated as in :func:`apply_rope_ref`;
    v is passed through. The outputs are fresh contiguous tensors (they do not alias ``qkv``).
    """
    B, T, three_d = qkv.shape
    Dh = three_d // (3 * num_heads)
    parts = qkv.view(B, T, 3, num_heads, Dh)  # [B, T, 3, H, Dh]
    q, k, v = parts.unbind(dim=2)  # each [B, T, H, Dh]
    q, k = apply_rope_ref(q, k, cos, sin, position_ids=position_ids)
    return q.contiguous(), k.contiguous(), v.contiguous()

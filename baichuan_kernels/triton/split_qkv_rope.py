"""split_qkv_rope in Triton: the W_pack output ``qkv: [B, T, 3·H·Dh]`` → ``q, k, v: [B, T, H, Dh]``
with RoPE on q and k, and the backward ``dq, dk, dv → dqkv``, each ONE launch of the RoPE kernel of
rope.py (one program per token: qkv read once, q/k/v written once; v is a plain copy).
"""

from __future__ import annotations

from typing import Optional

import torch

from .rope import launch_rope


@torch.library.custom_op("baichuan_triton::split_qkv_rope_fwd", mutates_args=())
def split_qkv_rope_fwd(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: Optional[torch.Tensor],
                       num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, three_d = qkv.shape
    Dh = three_d // (3 * num_heads)
    parts = qkv.view(B, T, 3, num_heads, Dh)  # [B, T, 3, H, Dh]
    q, k, v = (torch.empty((B, T, num_heads, Dh), dtype=qkv.dtype, device=qkv.device) for _ in range(3))
    launch_rope([(parts[:, :, 0], q), (parts[:, :, 1], k), (parts[:, :, 2], v)], cos, sin, position_ids,
                transpose=False)
    return q, k, v


@torch.library.custom_op("baichuan_triton::split_qkv_rope_bwd", mutates_args=())
def split_qkv_rope_bwd(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       position_ids: Optional[torch.Tensor]) -> torch.Tensor:
    B, T, H, Dh = dq.shape
    dqkv = torch.empty((B, T, 3 * H * Dh), dtype=dq.dtype, device=dq.device)
    parts = dqkv.view(B, T, 3, H, Dh)
    launch_rope([(dq, parts[:, :, 0]), (dk, parts[:, :, 1]), (dv, parts[:, :, 2])], cos, sin, position_ids,
                transpose=True)
    return dqkv

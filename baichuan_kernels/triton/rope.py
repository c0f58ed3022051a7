"""Rotate-half RoPE in Triton: one kernel for apply_rope (forward, backward, in place) and for the
fused W_pack split ``split_qkv_rope`` (forward and backward; launchers in split_qkv_rope.py).

One program handles one token (b, t): it reads the token's fp32 cos/sin row once (row
``position_ids[b, t]``, or t) and applies it to every head of up to three "planes" — a strided
``[B, T, H, Dh]`` source and destination — rotating the first two and copying the third (v). Each
plane is an ``[H, Dh/2]`` tile pair (first and second halves of every head), fp32 math:

    forward     y1 = x1 c1 − x2 s1,   y2 = x2 c2 + x1 s2        (x cos + rotate_half(x) sin)
    transposed  y1 = x1 c1 + x2 s2,   y2 = x2 c2 − x1 s1        (the backward)

where x1 = x[..., :Dh/2], x2 = x[..., Dh/2:], c1/c2 and s1/s2 the halves of the cos/sin row.
Source and destination may be the same tensor (in place): a program reads its tile before writing it.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import cast_to


@triton.jit
def _rope_plane(X, sxb, sxt, sxh, Y, syb, syt, syh, b, t, c1, c2, s1, s2, H, HALF,
                ROTATE: tl.constexpr, TRANSPOSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    hs = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (hs < H) & (cols < HALF)
    xp = X + b * sxb + t * sxt + hs * sxh + cols  # [BLOCK_H, BLOCK_HALF] first halves
    yp = Y + b * syb + t * syt + hs * syh + cols
    if ROTATE:
        x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
        if TRANSPOSE:
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        tl.store(yp, cast_to(y1, Y.dtype.element_ty), mask=mask)
        tl.store(yp + HALF, cast_to(y2, Y.dtype.element_ty), mask=mask)
    else:  # plain copy, no arithmetic
        tl.store(yp, tl.load(xp, mask=mask, other=0.0), mask=mask)
        tl.store(yp + HALF, tl.load(xp + HALF, mask=mask, other=0.0), mask=mask)


@triton.jit
def _rope_kernel(
    X0, sx0b, sx0t, sx0h, Y0, sy0b, sy0t, sy0h,  # plane 0 (q / dq): *T [B, T, H, Dh] source, destination
    X1, sx1b, sx1t, sx1h, Y1, sy1b, sy1t, sy1h,  # plane 1 (k / dk)
    X2, sx2b, sx2t, sx2h, Y2, sy2b, sy2t, sy2h,  # plane 2 (v / dv), copied; used when HAS_COPY
    COS,  # *fp32 [S, Dh]
    SIN,  # *fp32 [S, Dh]
    POS,  # *int64 [B, T] position ids (read when HAS_POS)
    T, H, HALF,  # tokens per sequence, heads, Dh / 2
    HAS_POS: tl.constexpr,
    HAS_COPY: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    bt = tl.program_id(0).to(tl.int64)
    b = bt // T
    t = bt % T
    if HAS_POS:
        p = tl.load(POS + bt).to(tl.int64)
    else:
        p = t
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    cmask = cols < HALF
    row = p * 2 * HALF
    c1 = tl.load(COS + row + cols, mask=cmask, other=0.0)
    c2 = tl.load(COS + row + HALF + cols, mask=cmask, other=0.0)
    s1 = tl.load(SIN + row + cols, mask=cmask, other=0.0)
    s2 = tl.load(SIN + row + HALF + cols, mask=cmask, other=0.0)
    _rope_plane(X0, sx0b, sx0t, sx0h, Y0, sy0b, sy0t, sy0h, b, t, c1, c2, s1, s2, H, HALF,
                True, TRANSPOSE, BLOCK_H, BLOCK_HALF)
    _rope_plane(X1, sx1b, sx1t, sx1h, Y1, sy1b, sy1t, sy1h, b, t, c1, c2, s1, s2, H, HALF,
                True, TRANSPOSE, BLOCK_H, BLOCK_HALF)
    if HAS_COPY:
        _rope_plane(X2, sx2b, sx2t, sx2h, Y2, sy2b, sy2t, sy2h, b, t, c1, c2, s1, s2, H, HALF,
                    False, TRANSPOSE, BLOCK_H, BLOCK_HALF)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def launch_rope(planes, cos: torch.Tensor, sin: torch.Tensor, position_ids: Optional[torch.Tensor],
                transpose: bool) -> None:
    """planes: 2 or 3 (source, destination) pairs of [B, T, H, Dh] tensors (unit stride along Dh);
    the first two are rotated, the third copied."""
    src0 = planes[0][0]
    B, T, H, Dh = src0.shape
    if src0.numel() == 0:
        return
    args = []
    for i in range(3):
        x, y = planes[i] if i < len(planes) else planes[0]
        args += [x, *_strides(x), y, *_strides(y)]
    block_h, block_half = triton.next_power_of_2(H), triton.next_power_of_2(Dh // 2)
    num_warps = 4 if block_h * block_half <= 2048 else 8
    _rope_kernel[(B * T,)](
        *args, cos, sin, position_ids if position_ids is not None else cos, T, H, Dh // 2,
        HAS_POS=position_ids is not None, HAS_COPY=len(planes) == 3, TRANSPOSE=transpose,
        BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=num_warps,
    )


@torch.library.custom_op("baichuan_triton::apply_rope_fwd", mutates_args=())
def apply_rope_fwd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   position_ids: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    qo, ko = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    launch_rope([(q, qo), (k, ko)], cos, sin, position_ids, transpose=False)
    return qo, ko


@torch.library.custom_op("baichuan_triton::apply_rope_bwd", mutates_args=())
def apply_rope_bwd(dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   position_ids: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    dqi = torch.empty(dq.shape, dtype=dq.dtype, device=dq.device)
    dki = torch.empty(dk.shape, dtype=dk.dtype, device=dk.device)
    launch_rope([(dq, dqi), (dk, dki)], cos, sin, position_ids, transpose=True)
    return dqi, dki


@torch.library.custom_op("baichuan_triton::apply_rope_inplace", mutates_args=("q", "k"))
def apply_rope_inplace(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       position_ids: Optional[torch.Tensor]) -> None:
    launch_rope([(q, q), (k, k)], cos, sin, position_ids, transpose=False)

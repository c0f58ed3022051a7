"""NormHead in Triton: ``Ŵ[v] = W[v] / max(‖W[v]‖₂, eps)`` and its backward, fp32 math.

One program per row walks the row in ``BLOCK_D`` slices twice (sum of squares, then the output), so
any D works. Backward of a row (Ŵ = W · rinv in fp32, g the incoming gradient)::

    dW = rinv · (g − Ŵ (g·Ŵ))      when ‖W‖ ≥ eps,   dW = rinv · g   otherwise.

Shapes: weight, w_hat, grad, dweight [V, D] contiguous; rinv fp32 [V].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..registry import TRITON_INTERPRET
from ._common import cast_to


@triton.jit
def _norm_head_fwd_kernel(
    W,  # *T [V, D]
    OUT,  # *T [V, D] normalised rows
    RINV,  # *fp32 [V] 1 / max(‖W[v]‖, eps)
    D, eps,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ss = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        w = tl.load(W + row * D + cols, mask=cols < D, other=0.0).to(tl.float32)
        ss += w * w
    total = tl.sum(ss, axis=0)
    # ‖W[v]‖ beyond ~1.8e19 overflows the fp32 sum of squares (bf16 weights reach 3.4e38): recompute it
    # on the row scaled by 2^-96 (exact), as the reference does, instead of giving Ŵ = 0.
    f = tl.where(total == float("inf"), 1.262177448353619e-29, 1.0)
    if total == float("inf"):
        ss = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            w = tl.load(W + row * D + cols, mask=cols < D, other=0.0).to(tl.float32) * f
            ss += w * w
        total = tl.sum(ss, axis=0)
    r = f / tl.maximum(tl.sqrt(total), eps * f)
    tl.store(RINV + row, r)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        w = tl.load(W + row * D + cols, mask=cols < D, other=0.0).to(tl.float32)
        tl.store(OUT + row * D + cols, cast_to(w * r, OUT.dtype.element_ty), mask=cols < D)


@triton.jit
def _norm_head_bwd_kernel(
    G,  # *T [V, D] gradient of the normalised rows
    W,  # *T [V, D]
    RINV,  # *fp32 [V]
    DW,  # *T [V, D]
    D, inv_eps,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    r = tl.load(RINV + row)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        g = tl.load(G + row * D + cols, mask=cols < D, other=0.0).to(tl.float32)
        w = tl.load(W + row * D + cols, mask=cols < D, other=0.0).to(tl.float32)
        acc += g * (w * r)  # Ŵ first: g · w alone overflows fp32 for rows near the bf16 range
    dot = tl.where(r < inv_eps, tl.sum(acc, axis=0), 0.0)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        g = tl.load(G + row * D + cols, mask=cols < D, other=0.0).to(tl.float32)
        w = tl.load(W + row * D + cols, mask=cols < D, other=0.0).to(tl.float32)
        tl.store(DW + row * D + cols, cast_to(r * (g - w * r * dot), DW.dtype.element_ty), mask=cols < D)


def _block(D: int) -> int:
    cap = 256 if TRITON_INTERPRET else 2048
    return min(cap, triton.next_power_of_2(max(D, 1)))


@torch.library.custom_op("baichuan_triton::norm_head_weight_fwd", mutates_args=())
def norm_head_weight_fwd(weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    V, D = weight.shape
    out = torch.empty_like(weight)
    rinv = torch.empty(V, device=weight.device, dtype=torch.float32)
    if V > 0:
        _norm_head_fwd_kernel[(V,)](weight, out, rinv, D, eps, BLOCK_D=_block(D))
    return out, rinv


@torch.library.custom_op("baichuan_triton::norm_head_weight_bwd", mutates_args=())
def norm_head_weight_bwd(grad: torch.Tensor, weight: torch.Tensor, rinv: torch.Tensor, eps: float) -> torch.Tensor:
    V, D = weight.shape
    dw = torch.empty_like(weight)
    if V > 0:
        _norm_head_bwd_kernel[(V,)](grad, weight, rinv, dw, D, 1.0 / eps, BLOCK_D=_block(D))
    return dw

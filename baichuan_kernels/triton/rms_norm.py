"""RMSNorm (+ fused residual add) in Triton: forward and backward kernels and their launchers.

One program normalises one row held entirely in registers (``BLOCK_D`` = next power of two ≥ D),
so x is read once and y written once. The backward runs a fixed number of persistent programs, each
walking a strided set of rows and accumulating its own fp32 partial of dweight; the partials are
summed in a fixed order afterwards, so dweight is deterministic (no atomics).

All arithmetic is fp32: values are upcast right after ``tl.load`` (which also keeps the Triton
interpreter, whose bf16 arithmetic is wrong, honest on CPU).

Shapes: x, residual, y, residual_out, dy, dx: [N, D] contiguous; weight, dweight: [D]; rstd: fp32 [N].
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..registry import TRITON_INTERPRET
from ._common import cast_to

MAX_D = 65536  # one row must fit the registers of one program


@triton.jit
def _rms_norm_fwd_kernel(
    X,  # *T  [N, D] input
    RES,  # *T  [N, D] residual (read only when HAS_RESIDUAL)
    W,  # *T  [D] weight
    Y,  # *T  [N, D] output
    RES_OUT,  # *T  [N, D] x + residual, rounded to T (written only when HAS_RESIDUAL)
    RSTD,  # *fp32 [N] 1 / rms of each row, saved for the backward
    D,  # row length
    eps,  # added to mean(s²)
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    offs = row * D + cols
    s = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(RES + offs, mask=mask, other=0.0).to(tl.float32)
        s_stored = cast_to(s, RES_OUT.dtype.element_ty)
        tl.store(RES_OUT + offs, s_stored, mask=mask)
        s = s_stored.to(tl.float32)  # normalise exactly the value the next layer sees
    ss = tl.sum(s * s, axis=0)
    # |s| beyond ~1.8e19 (bf16/fp32) overflows the fp32 sum of squares: recompute it on the row scaled
    # by 2^-96 (exact), as the reference does, so y stays w·s/rms instead of 0. f = 1 otherwise.
    f = tl.where(ss == float("inf"), 1.262177448353619e-29, 1.0)
    if ss == float("inf"):
        ss = tl.sum((s * f) * (s * f), axis=0)
    rstd = f / tl.sqrt(ss / D + eps * f * f)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, cast_to(s * rstd * w, Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,  # *T  [N, D] gradient of y
    DRES_OUT,  # *T  [N, D] gradient of residual_out (read only when HAS_DRESIDUAL)
    S,  # *T  [N, D] the normalised input (x, or x + residual)
    W,  # *T  [D] weight
    RSTD,  # *fp32 [N]
    DX,  # *T  [N, D] gradient of x (and of residual)
    DW_PARTIAL,  # *fp32 [num_programs, D] this program's share of dweight
    N,
    D,
    ROWS_PER_PROGRAM,  # ceil(N / num_programs)
    HAS_DRESIDUAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(0, ROWS_PER_PROGRAM):
        row = pid + i * num_programs  # int64: row * D may exceed 2**31
        mask = col_mask & (row < N)
        offs = row * D + cols
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row, mask=row < N, other=0.0)
        xhat = tl.load(S + offs, mask=mask, other=0.0).to(tl.float32) * rstd
        g = dy * w
        mean_dot = tl.sum(g * xhat, axis=0) / D
        ds = rstd * (g - xhat * mean_dot)
        if HAS_DRESIDUAL:
            ds += tl.load(DRES_OUT + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, cast_to(ds, DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(DW_PARTIAL + pid * D + cols, dw, mask=col_mask)


def _launch_config(D: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(max(D, 1))
    num_warps = 4 if block_d <= 2048 else 8 if block_d <= 8192 else 16
    return block_d, num_warps


def _bwd_programs(N: int, device: torch.device) -> int:
    """Persistent programs for the backward: a few per SM on a GPU, a handful when interpreting."""
    if TRITON_INTERPRET or device.type != "cuda":
        return max(1, min(N, 8))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(N, 4 * sms))


@torch.library.custom_op("baichuan_triton::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(
    x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    N, D = x.shape
    y = torch.empty_like(x)
    residual_out = torch.empty_like(x) if residual is not None else x.new_empty(0)
    rstd = torch.empty(N, device=x.device, dtype=torch.float32)
    if N > 0:
        block_d, num_warps = _launch_config(D)
        _rms_norm_fwd_kernel[(N,)](
            x, residual if residual is not None else x, weight, y,
            residual_out if residual is not None else y, rstd, D, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_D=block_d, num_warps=num_warps,
        )
    return y, residual_out, rstd


@torch.library.custom_op("baichuan_triton::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(
    dy: torch.Tensor, dresidual_out: Optional[torch.Tensor], s: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    N, D = s.shape
    dx = torch.empty_like(s)
    if N == 0:
        return dx, torch.zeros_like(weight)
    programs = _bwd_programs(N, s.device)
    dw_partial = torch.empty(programs, D, device=s.device, dtype=torch.float32)  # [P, D]
    block_d, num_warps = _launch_config(D)
    _rms_norm_bwd_kernel[(programs,)](
        dy, dresidual_out if dresidual_out is not None else dy, s, weight, rstd, dx, dw_partial, N, D,
        triton.cdiv(N, programs),
        HAS_DRESIDUAL=dresidual_out is not None, BLOCK_D=block_d, num_warps=num_warps,
    )
    return dx, dw_partial.sum(0).to(weight.dtype)

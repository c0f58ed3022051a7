"""SwiGLU in Triton: ``y = silu(gate) * up`` forward and backward kernels and their launchers.

Elementwise over ``[N, F]`` row views: gate, up and dy may have any row stride (unit stride along F),
so the two halves of one fused ``[N, 2F]`` matmul output are read in place. Program (row, block)
handles ``BLOCK`` columns of one row; all arithmetic in fp32 (upcast right after ``tl.load``), each
output rounded once.

    forward   y     = g σ(g) u
    backward  dgate = dy u σ(g) (1 + g (1 − σ(g))),   dup = dy g σ(g)

Shapes: gate, up, dy: [N, F] (row strides given); y, dgate, dup: [N, F] contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..registry import TRITON_INTERPRET
from ._common import cast_to


@triton.jit
def _swiglu_fwd_kernel(
    G,  # *T [N, F] gate, row stride stride_g
    U,  # *T [N, F] up, row stride stride_u
    Y,  # *T [N, F] output, contiguous
    F,  # row length
    stride_g,
    stride_u,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    tl.store(Y + row * F + cols, cast_to(g * sig * u, Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DY,  # *T [N, F] gradient of y, row stride stride_dy
    G,  # *T [N, F] gate
    U,  # *T [N, F] up
    DG,  # *T [N, F] gradient of gate, row stride stride_dg (F, or 2F: a half of dh)
    DU,  # *T [N, F] gradient of up, row stride stride_du
    F,
    stride_dy,
    stride_g,
    stride_u,
    stride_dg,
    stride_du,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = g * sig
    tl.store(DU + row * stride_du + cols, cast_to(dy * silu, DU.dtype.element_ty), mask=mask)
    tl.store(DG + row * stride_dg + cols, cast_to(dy * u * (sig + silu * (1.0 - sig)), DG.dtype.element_ty), mask=mask)


def _block(F: int) -> tuple[int, int]:
    """Columns per program and warps: 1024 on the GPU (16-byte accesses per thread); under the
    interpreter one program per row (the tests' rows are short)."""
    if TRITON_INTERPRET:
        return triton.next_power_of_2(max(F, 1)), 1
    return 1024, 4


def _row_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def _launch_fwd(gate, up, y) -> None:
    N, F = gate.shape
    if N > 0 and F > 0:
        block, warps = _block(F)
        _swiglu_fwd_kernel[(N, triton.cdiv(F, block))](
            gate, up, y, F, _row_stride(gate), _row_stride(up), BLOCK=block, num_warps=warps)


@torch.library.custom_op("baichuan_triton::swiglu_fwd", mutates_args=())
def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    y = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    _launch_fwd(gate, up, y)
    return y


def _launch_bwd(dy, gate, up, dgate, dup) -> None:
    N, F = gate.shape
    if N > 0 and F > 0:
        block, warps = _block(F)
        _swiglu_bwd_kernel[(N, triton.cdiv(F, block))](
            dy, gate, up, dgate, dup, F, _row_stride(dy), _row_stride(gate), _row_stride(up),
            _row_stride(dgate), _row_stride(dup), BLOCK=block, num_warps=warps)


@torch.library.custom_op("baichuan_triton::swiglu_bwd", mutates_args=())
def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    N, F = gate.shape
    dgate = torch.empty((N, F), device=gate.device, dtype=gate.dtype)
    dup = torch.empty((N, F), device=gate.device, dtype=gate.dtype)
    _launch_bwd(dy, gate, up, dgate, dup)
    return dgate, dup


@torch.library.custom_op("baichuan_triton::swiglu_packed_fwd", mutates_args=())
def swiglu_packed_fwd(h: torch.Tensor) -> torch.Tensor:
    """h: [N, 2F] = [gate | up] (any row stride) -> y [N, F]; the halves are read in place."""
    N, F = h.shape[0], h.shape[1] // 2
    y = torch.empty((N, F), device=h.device, dtype=h.dtype)
    _launch_fwd(h[:, :F], h[:, F:], y)
    return y


@torch.library.custom_op("baichuan_triton::swiglu_packed_bwd", mutates_args=())
def swiglu_packed_bwd(dy: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """dy [N, F], h [N, 2F] -> dh [N, 2F]: dgate and dup written straight into its halves."""
    N, F = h.shape[0], h.shape[1] // 2
    dh = torch.empty((N, 2 * F), device=h.device, dtype=h.dtype)
    _launch_bwd(dy, h[:, :F], h[:, F:], dh[:, :F], dh[:, F:])
    return dh

"""swiglu: the one file that knows every backend of the SwiGLU activation ``silu(gate) * up``.

* reference — :func:`baichuan_kernels.reference.swiglu.swiglu_ref` (plain autograd)
* cpu, cuda — ``torch.ops.baichuan.swiglu_fwd/bwd`` (csrc/cpu/swiglu.cpp, csrc/cuda/swiglu.cu)
* triton    — ``torch.ops.baichuan_triton.swiglu_fwd/bwd`` (baichuan_kernels/triton/swiglu.py)

Fused layout (one ``[..., 2F]`` gate/up projection output ``h``), two ways, both without copies in
the forward:

* ``swiglu(h)`` (``up=None``) — the packed ops ``swiglu_packed_fwd/bwd`` take h itself: the halves
  are read in place and the backward writes ``dgate``/``dup`` straight into the halves of ONE
  ``dh [N, 2F]`` (3 + 5 memory passes in all, like separate tensors). Use this in an MLP.
* ``swiglu(*h.chunk(2, -1))`` — the kernels take ``[N, F]`` row views (unit stride along F, any
  row stride; flattened with ``reshape``, a view for such slices), so the forward reads in place too;
  the backward returns separate ``dgate``/``dup`` and autograd's slice backward assembles ``dh``
  (a zero-fill, two copies and an add: torch's cost, not a kernel's).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _extension, registry
from .._validation import FLOAT_DTYPES_F64, check_same_device, check_same_dtype, check_shape, check_tensor
from ..reference.swiglu import swiglu_ref
from ..registry import Backend, Impl

__all__ = ["swiglu"]

# Kernel ops per backend: (forward op, backward op); the packed (fused-layout) pair likewise.
_KERNELS: dict[Backend, tuple] = {}
_PACKED: dict[Backend, tuple] = {}


def _fwd_fake(gate, up):
    return gate.new_empty(gate.shape)  # [N, F] contiguous


def _bwd_fake(dy, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _as_rows(t: torch.Tensor, N: int, F: int) -> torch.Tensor:
    """``t`` as an ``[N, F]`` row view the kernels accept (a view whenever the layout allows it)."""
    r = t.reshape(N, F)
    if (F > 1 and r.stride(1) != 1) or (N > 1 and r.stride(0) < F):  # e.g. stride-0 expanded grads
        r = r.contiguous()
    return r


def _setup_context(ctx, inputs, output):
    gate, up = inputs
    ctx.save_for_backward(gate, up)


def _make_backward(bwd_op):
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        N, F = gate.shape
        return bwd_op(_as_rows(dy, N, F), gate, up)

    return backward


def _packed_fwd_fake(h):
    return h.new_empty((h.shape[0], h.shape[1] // 2))  # [N, F]


def _packed_bwd_fake(dy, h):
    return h.new_empty(h.shape)  # dh [N, 2F] contiguous


def _packed_setup_context(ctx, inputs, output):
    (h,) = inputs
    ctx.save_for_backward(h)


def _make_packed_backward(bwd_op):
    def backward(ctx, dy):
        (h,) = ctx.saved_tensors
        return bwd_op(_as_rows(dy, h.shape[0], h.shape[1] // 2), h)

    return backward


def _register_kernel(backend: Backend, ns) -> None:
    fwd_op, bwd_op = ns.swiglu_fwd.default, ns.swiglu_bwd.default
    torch.library.register_fake(fwd_op)(_fwd_fake)
    torch.library.register_fake(bwd_op)(_bwd_fake)
    torch.library.register_autograd(fwd_op, _make_backward(bwd_op), setup_context=_setup_context)
    _KERNELS[backend] = (fwd_op, bwd_op)
    if hasattr(ns, "swiglu_packed_fwd"):  # (an extension built before the packed ops: chunk path only)
        pfwd, pbwd = ns.swiglu_packed_fwd.default, ns.swiglu_packed_bwd.default
        torch.library.register_fake(pfwd)(_packed_fwd_fake)
        torch.library.register_fake(pbwd)(_packed_bwd_fake)
        torch.library.register_autograd(pfwd, _make_packed_backward(pbwd), setup_context=_packed_setup_context)
        _PACKED[backend] = (pfwd, pbwd)


if _extension.extension_error() is None:
    _register_kernel(Backend.CPU, torch.ops.baichuan)
    if _extension.cuda_compiled():
        _KERNELS[Backend.CUDA] = _KERNELS[Backend.CPU]  # the same torch op, dispatched by device
        if Backend.CPU in _PACKED:
            _PACKED[Backend.CUDA] = _PACKED[Backend.CPU]
if registry.TRITON_IMPORT_ERROR is None:
    from ..triton import swiglu as _triton  # noqa: F401  (defines torch.ops.baichuan_triton.swiglu_*)

    _register_kernel(Backend.TRITON, torch.ops.baichuan_triton)


def _kernel_dtypes(gate: torch.Tensor, up: Optional[torch.Tensor]) -> Optional[str]:
    if gate.dtype == torch.float64:
        return "float64 runs on the reference backend only"
    return None


registry.register(
    "swiglu",
    Impl(Backend.CUDA, _kernel_dtypes),
    Impl(Backend.TRITON, _kernel_dtypes),
    Impl(Backend.CPU, _kernel_dtypes),
)


def swiglu(gate: torch.Tensor, up: Optional[torch.Tensor] = None, *, backend: str = "auto") -> torch.Tensor:
    """``silu(gate) * up`` elementwise, any shape, in the inputs' dtype (fp32 math, one rounding).
    fwd+bwd.

    Fused layout: ``swiglu(h)`` with ``up=None`` takes one ``[..., 2F]`` gate/up projection output
    ``h = [gate | up]`` and returns ``[..., F]`` — read in place, and the backward writes ``dh``
    directly (no copies either way). ``swiglu(h[..., :F], h[..., F:])`` also reads in place (the
    kernels take row strides) but its backward goes through autograd's slice backward."""
    if up is None:
        return _swiglu_packed(gate, backend)
    check_tensor("gate", gate, dtypes=FLOAT_DTYPES_F64)
    check_tensor("up", up, dtypes=FLOAT_DTYPES_F64)
    check_shape("up", up, gate.shape, "the shape of gate")
    check_same_dtype(gate=gate, up=up)
    check_same_device(gate=gate, up=up)
    chosen = registry.resolve("swiglu", backend, (gate, up), gate, up)
    if chosen is Backend.REFERENCE:
        return swiglu_ref(gate, up)
    fwd, _ = _KERNELS[chosen]
    F = gate.shape[-1] if gate.dim() > 0 else 1
    N = math.prod(gate.shape[:-1]) if gate.dim() > 0 else 1
    y = fwd(_as_rows(gate, N, F), _as_rows(up, N, F))  # [N, F]
    return y.view(gate.shape)


def _swiglu_packed(h: torch.Tensor, backend: str) -> torch.Tensor:
    check_tensor("gate", h, dtypes=FLOAT_DTYPES_F64, min_ndim=1)
    if h.shape[-1] % 2:
        raise ValueError(
            f"gate must have an even last dim when up is None (the fused [gate | up] layout), got {tuple(h.shape)}"
        )
    F = h.shape[-1] // 2
    chosen = registry.resolve("swiglu", backend, (h,), h, None)
    if chosen is Backend.REFERENCE or chosen not in _PACKED:
        gate, up = h[..., :F], h[..., F:]
        return swiglu_ref(gate, up) if chosen is Backend.REFERENCE else swiglu(gate, up, backend=chosen.value)
    N = math.prod(h.shape[:-1])
    y = _PACKED[chosen][0](_as_rows(h, N, 2 * F))  # [N, F]
    return y.view(*h.shape[:-1], F)

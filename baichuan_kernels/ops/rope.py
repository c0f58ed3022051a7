"""``rope_cos_sin``, ``apply_rope`` and ``apply_rope_``: the one file that knows every backend of RoPE.

* reference — :mod:`baichuan_kernels.reference.rope` (plain autograd; also the cos/sin tables, whose
  ``offset`` gives the rows of KV-cache decoding steps: no kernel needed for a [T, Dh] table)
* cpu, cuda — ``torch.ops.baichuan.apply_rope_fwd/bwd/inplace`` (csrc/cpu/rope.cpp, csrc/cuda/rope.cu)
* triton    — ``torch.ops.baichuan_triton.apply_rope_fwd/bwd/inplace`` (baichuan_kernels/triton/rope.py)

The kernels take q, k with unit stride along Dh and any other strides (views of the W_pack output
go in without copies), fp32 cos/sin tables and int64 position ids; the public functions convert the
(small) tables and ids. The backward applies the transposed rotation. No gradient flows to cos/sin
from the kernels: tables that require grad run on the reference.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch

from .. import _extension, registry
from .._validation import (
    FLOAT_DTYPES_F64,
    check_positive,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_tensor,
    same_view,
    shares_elements,
)
from ..reference.rope import apply_rope_ref, rope_cos_sin_ref
from ..registry import Backend, Impl

__all__ = ["rope_cos_sin", "apply_rope", "apply_rope_"]

INDEX_DTYPES = (torch.int32, torch.int64)
# Positions are fp32 in the tables (spec): beyond 2**24 consecutive positions are no longer distinct.
MAX_FP32_POSITION = 2**24

# Kernel ops per backend: (forward op, backward op, in-place op).
_KERNELS: dict[Backend, tuple] = {}


def _fwd_fake(q, k, cos, sin, position_ids):
    return q.new_empty(q.shape), k.new_empty(k.shape)  # contiguous [B, T, H, Dh]


def _inplace_fake(q, k, cos, sin, position_ids):
    return None


def heads_view(t: torch.Tensor) -> torch.Tensor:
    """``t: [B, T, H, Dh]`` with unit stride along Dh (a copy only when it has none)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def kernel_tables(cos, sin, position_ids):
    """fp32 contiguous cos/sin and int64 contiguous position ids, as the kernels take them."""
    cos = cos.to(torch.float32).contiguous()
    sin = sin.to(torch.float32).contiguous()
    if position_ids is not None:
        position_ids = position_ids.to(torch.int64).contiguous()
    return cos, sin, position_ids


def _setup_context(ctx, inputs, output):
    _q, _k, cos, sin, position_ids = inputs
    ctx.save_for_backward(cos, sin, position_ids)


def _make_backward(bwd_op):
    def backward(ctx, dq, dk):
        cos, sin, position_ids = ctx.saved_tensors
        dq_in, dk_in = bwd_op(heads_view(dq), heads_view(dk), cos, sin, position_ids)
        return dq_in, dk_in, None, None, None

    return backward


def _register_kernel(backend: Backend, fwd_op, bwd_op, inplace_op) -> None:
    torch.library.register_fake(fwd_op)(_fwd_fake)
    torch.library.register_fake(bwd_op)(_fwd_fake)
    torch.library.register_fake(inplace_op)(_inplace_fake)
    torch.library.register_autograd(fwd_op, _make_backward(bwd_op), setup_context=_setup_context)
    _KERNELS[backend] = (fwd_op, bwd_op, inplace_op)


if _extension.extension_error() is None:
    _ops = torch.ops.baichuan
    _register_kernel(Backend.CPU, _ops.apply_rope_fwd.default, _ops.apply_rope_bwd.default,
                     _ops.apply_rope_inplace.default)
    if _extension.cuda_compiled():
        _KERNELS[Backend.CUDA] = _KERNELS[Backend.CPU]  # the same torch op, dispatched by device
if registry.TRITON_IMPORT_ERROR is None:
    from ..triton import rope as _triton  # noqa: F401  (defines torch.ops.baichuan_triton.apply_rope_*)

    _tops = torch.ops.baichuan_triton
    _register_kernel(Backend.TRITON, _tops.apply_rope_fwd.default, _tops.apply_rope_bwd.default,
                     _tops.apply_rope_inplace.default)


def kernel_limits(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Optional[str]:
    """Why the RoPE kernels cannot take these inputs (None: they can)."""
    if x.dtype == torch.float64:
        return "float64 runs on the reference backend only"
    if cos.requires_grad or sin.requires_grad:
        return "gradients w.r.t. cos/sin are computed by the reference only"
    return None


def _apply_limits(q, k, cos, sin, position_ids=None) -> Optional[str]:
    return kernel_limits(q, cos, sin)


def _inplace_limits(q, k, cos, sin, position_ids=None) -> Optional[str]:
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return "the in-place kernels have no autograd (use apply_rope for training)"
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        return "the in-place kernels need q and k with unit stride along Dh"
    if q is k or (not torch.compiler.is_compiling() and same_view(q, k)):
        return "q and k must be different tensors (the reference rotates one tensor given as both)"
    return kernel_limits(q, cos, sin)


registry.register("rope_cos_sin")
registry.register(
    "apply_rope", Impl(Backend.CUDA, _apply_limits), Impl(Backend.TRITON, _apply_limits), Impl(Backend.CPU, _apply_limits)
)
registry.register(
    "apply_rope_", Impl(Backend.CUDA, _inplace_limits), Impl(Backend.TRITON, _inplace_limits),
    Impl(Backend.CPU, _inplace_limits),
)


def _check_int(name: str, value, *, minimum: int, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def _check_cos_sin(cos, sin, Dh: int, ref: torch.Tensor, ref_name: str) -> None:
    """cos/sin: float ``[S, Dh]`` tables on ref's device."""
    check_tensor("cos", cos, dtypes=FLOAT_DTYPES_F64, ndim=2)
    check_tensor("sin", sin, dtypes=FLOAT_DTYPES_F64, ndim=2)
    if cos.shape[1] != Dh:
        raise ValueError(f"cos must have shape [S, {Dh}] (Dh of {ref_name}), got {tuple(cos.shape)}")
    check_shape("sin", sin, cos.shape, "the shape of cos")
    check_same_device(**{ref_name: ref, "cos": cos, "sin": sin})


def _check_positions(position_ids, B: int, T: int, S: int, ref: torch.Tensor, ref_name: str) -> None:
    """position_ids: integer ``[B, T]`` with values in [0, S); without it T <= S."""
    if position_ids is None:
        if T > S:
            raise ValueError(f"cos/sin have {S} rows but {ref_name} has T={T} positions (pass longer tables)")
        return
    check_tensor("position_ids", position_ids, dtypes=INDEX_DTYPES, ndim=2)
    check_shape("position_ids", position_ids, (B, T), f"[B, T] of {ref_name}")
    check_same_device(**{ref_name: ref, "position_ids": position_ids})
    if torch.compiler.is_compiling():
        # Value checks would be data-dependent (graph breaks); the kernels check bounds themselves
        # (CPU: error, CUDA: device assert), the reference's indexing raises.
        return
    lo, hi = int(position_ids.min()), int(position_ids.max())
    if lo < 0:
        raise ValueError(f"position_ids must be >= 0, got {lo}")
    if hi >= S:
        raise ValueError(f"position_ids has position {hi} but cos/sin have only {S} rows")


def rope_cos_sin(
    T: int, Dh: int = 128, base: float = 10000.0, *, device=None, offset: int = 0, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos, sin: [T, Dh]`` for positions ``offset .. offset+T-1``, rotate-half layout
    (dims i and i + Dh/2 share the frequency ``base^(-2i/Dh)``); angles in fp32."""
    T = _check_int("T", T, minimum=1)
    Dh = _check_int("Dh", Dh, minimum=2)
    if Dh % 2:
        raise ValueError(f"Dh must be even (rotate-half pairs dim i with i + Dh/2), got {Dh}")
    check_positive("base", base)
    offset = _check_int("offset", offset, minimum=0)
    if offset + T > MAX_FP32_POSITION:
        raise ValueError(
            f"offset + T must be <= 2**24 = {MAX_FP32_POSITION} (positions are fp32 and must stay exact), "
            f"got offset={offset}, T={T}"
        )
    registry.resolve("rope_cos_sin", backend, ())
    cos, sin = rope_cos_sin_ref(T, Dh, float(base), device=device, offset=offset)
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(cos).all() & torch.isfinite(sin).all()):
        # e.g. base = 1e-300: base^(-2i/Dh) overflows fp32 and the angles become inf / NaN
        raise ValueError(f"base = {base} gives non-finite fp32 RoPE angles for Dh = {Dh}; use a base >= 1")
    return cos, sin


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    position_ids: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q, k: [B, T, H, Dh]`` with rows of ``cos, sin: [S, Dh]`` (row ``position_ids[b, t]``,
    or row t without ``position_ids``). fp32 math, results in the input dtype. fwd+bwd.
    ``q``/``k`` may be strided views (unit stride along Dh): the kernels read them in place."""
    _check_apply_rope(q, k, cos, sin, position_ids)
    chosen = registry.resolve(
        "apply_rope", backend, (q, k, cos, sin, position_ids), q, k, cos, sin, position_ids=position_ids
    )
    if chosen is Backend.REFERENCE:
        return apply_rope_ref(q, k, cos, sin, position_ids=position_ids)
    fwd = _KERNELS[chosen][0]
    return fwd(heads_view(q), heads_view(k), *kernel_tables(cos, sin, position_ids))


def _check_apply_rope(q, k, cos, sin, position_ids) -> None:
    check_tensor("q", q, dtypes=FLOAT_DTYPES_F64, ndim=4)
    check_tensor("k", k, dtypes=FLOAT_DTYPES_F64, ndim=4)
    check_shape("k", k, q.shape, "the shape of q")
    check_same_dtype(q=q, k=k)
    check_same_device(q=q, k=k)
    if q.numel() == 0:
        raise ValueError(f"q must not be empty, got shape {tuple(q.shape)}")
    B, T, H, Dh = q.shape
    if Dh % 2:
        raise ValueError(f"head dim Dh of q must be even for rotate-half RoPE, got {Dh}")
    _check_cos_sin(cos, sin, Dh, q, "q")
    _check_positions(position_ids, B, T, cos.shape[0], q, "q")


def apply_rope_(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    position_ids: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place :func:`apply_rope` for inference: rotates ``q, k: [B, T, H, Dh]`` where they lie
    (e.g. views of the W_pack output) and returns them. Same semantics and arguments; the kernels
    have no autograd (with grad-requiring inputs ``"auto"`` runs the reference, whose in-place copy
    autograd tracks)."""
    _check_apply_rope(q, k, cos, sin, position_ids)
    if not torch.compiler.is_compiling():
        for name, t in (("q", q), ("k", k)):
            if torch._debug_has_internal_overlap(t) == 1:  # 1: certain overlap (a stride 0 over size > 1)
                raise ValueError(
                    f"{name} has elements that share memory (e.g. an expanded view, stride {tuple(t.stride())}): "
                    "it cannot be rotated in place; pass a dense tensor, or use apply_rope"
                )
        if not same_view(q, k) and shares_elements(q, k) is not False:
            raise ValueError(
                "q and k share memory (overlapping views of one buffer, or a layout too irregular to rule "
                f"that out: q strides {tuple(q.stride())} at offset {q.storage_offset()}, k strides "
                f"{tuple(k.stride())} at offset {k.storage_offset()}): they cannot both be rotated in place; "
                "pass disjoint views (e.g. the q and k slices of the W_pack output), or use apply_rope"
            )
    chosen = registry.resolve(
        "apply_rope_", backend, (q, k, cos, sin, position_ids), q, k, cos, sin, position_ids=position_ids
    )
    if chosen is Backend.REFERENCE:
        q_rot, k_rot = apply_rope_ref(q, k, cos, sin, position_ids=position_ids)
        q.copy_(q_rot)
        k.copy_(k_rot)
        return q, k
    _KERNELS[chosen][2](q, k, *kernel_tables(cos, sin, position_ids))
    return q, k

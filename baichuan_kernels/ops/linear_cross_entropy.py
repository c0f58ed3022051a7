"""``linear_cross_entropy``: NormHead + LM head + cross-entropy + max-z loss, chunked, every backend.

* reference — :func:`baichuan_kernels.reference.linear_cross_entropy.linear_cross_entropy_ref`
  (row chunks under ``torch.utils.checkpoint``)
* cpu, cuda — ``torch.ops.baichuan.linear_cross_entropy_fwd/bwd`` (one op dispatched by device:
  csrc/cpu/linear_cross_entropy.cpp, csrc/cuda/linear_cross_entropy.cu; the shared chunk loop and the
  algorithm are documented in csrc/common/linear_cross_entropy_checks.h)
* triton    — ``torch.ops.baichuan_triton.linear_cross_entropy_fwd/bwd``
  (baichuan_kernels/triton/linear_cross_entropy.py)

Gradient strategy (the same for every kernel backend, written once here):

* ``reduction="mean"/"sum"``: the CE gradient is computed *in the forward pass* for unit row weights
  (every kept row has the same upstream weight), while each chunk of logits is in memory; the
  backward only scales it by the upstream gradient — in place, so a second backward through the
  same graph (``retain_graph=True``) raises PyTorch's "modified by an inplace operation" error.
* ``reduction="none"``: rows have different upstream weights, so the backward runs the
  memory-bounded second pass ``linear_cross_entropy_bwd`` (logits recomputed chunk by chunk).
* the max-z term ``z[n] = max_v logits[n, v]²`` has a one-hot gradient ``2 · max · onehot(argmax)``:
  it is added here from the saved per-row max and argmax (a gather of Ŵ rows and an index_add into
  dW through the NormHead Jacobian), no logits needed. Ties between equal maxima go to the first
  index (the reference's ``amax`` would split the gradient between them).
* the NormHead gradient is exact: ``dW = rinv · (dŴ − Ŵ (dŴ·Ŵ))`` per row, rinv = 1 / max(‖W‖, 1e-12).

Memory: one ``[chunk, V]`` fp32 block of logits (+ its 16-bit copy on CUDA) besides the inputs, the
fp32 gradient accumulators ([N, D] and [V, D]) and the gradients. The default chunk comes from free
memory on CUDA (``torch.cuda.mem_get_info``) and from a fixed 256 MiB budget on the CPU.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import registry
from .._validation import FLOAT_DTYPES_F64, check_positive, check_same_device, check_same_dtype, check_tensor
from ..reference.linear_cross_entropy import linear_cross_entropy_ref
from ..registry import Backend, Impl
from ._kernels import register_kernels
from .rope import _check_int

__all__ = ["linear_cross_entropy", "default_chunk_size"]

REDUCTIONS = ("mean", "sum", "none")
# The reference backend materialises at most this many logits at a time (64 MB in fp32).
REFERENCE_CHUNK_ELEMENTS = 1 << 24
# Kernel backends: logits chunk budget on the CPU, and the cap / share of free memory on CUDA.
CPU_CHUNK_BYTES = 256 << 20
CUDA_CHUNK_MAX_BYTES = 1 << 30
CUDA_CHUNK_FREE_FRACTION = 16

# Kernel ops per backend: (forward op, recompute-backward op).


def default_chunk_size(N: int, V: int, device: torch.device) -> int:
    """Rows of logits per chunk: a fixed 256 MiB fp32 budget on the CPU; on CUDA 1/16 of the free memory
    (at most 1 GiB: ~1400 rows at V = 125,696, GEMMs still large), counting the fp32 logits and their
    16-bit copy (6 bytes per logit)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget = min(CUDA_CHUNK_MAX_BYTES, free // CUDA_CHUNK_FREE_FRACTION)
        rows = budget // (6 * V)
        rows = rows // 128 * 128 if rows >= 256 else rows
    else:
        rows = CPU_CHUNK_BYTES // (4 * V)
    return int(max(1, min(rows, max(N, 1))))


def _fwd_fake(hidden, weight, labels, norm_head, z_loss_weight, ignore_index, reduction, chunk_size,
              grad_hidden, grad_weight):
    N, D = hidden.shape
    V = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    shape = (N,) if reduction == "none" else ()
    return (
        torch.empty(shape, **f32), torch.empty(shape, **f32), torch.empty(shape, **f32),
        torch.empty(N, **f32), torch.empty(N, device=hidden.device, dtype=torch.int64),
        torch.empty(V if norm_head else 0, **f32),
        torch.empty((N, D) if grad_hidden else (0,), **f32),
        torch.empty((V, D) if grad_weight else (0,), **f32),
    )


def _bwd_fake(hidden, weight, labels, grad_rows, norm_head, ignore_index, chunk_size, grad_hidden, grad_weight):
    N, D = hidden.shape
    V = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    return torch.empty((N, D) if grad_hidden else (0,), **f32), torch.empty((V, D) if grad_weight else (0,), **f32)


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, norm_head, z_loss_weight, ignore_index, reduction, chunk_size, _gh, _gw = inputs
    _loss, _ce, _z, row_max, argmax, rinv, dh, dw = output
    ctx.set_materialize_grads(False)  # unused outputs get None, never [V, D] zeros
    ctx.mark_non_differentiable(row_max, argmax, rinv, dh, dw)
    ctx.norm_head, ctx.z_loss_weight, ctx.ignore_index = norm_head, z_loss_weight, ignore_index
    ctx.reduction, ctx.chunk_size = reduction, chunk_size
    ctx.save_for_backward(hidden, weight, labels, row_max, argmax, rinv, dh, dw)


def _add(a, b):
    return b if a is None else (a if b is None else a + b)


def _plain(t: torch.Tensor) -> bool:
    """A real tensor we may scale in place (not a fake / functional tensor under torch.compile)."""
    return type(t) is torch.Tensor and not torch.compiler.is_compiling()


def _make_backward(bwd_op):
    def backward(ctx, g_loss, g_ce, g_z, *_unused):
        hidden, weight, labels, row_max, argmax, rinv, dh_unit, dw_unit = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w):
            return (None,) * 10
        keep = labels != ctx.ignore_index
        # Upstream weight of each term: loss = ce + w·z.
        g_ce_t = _add(g_loss, g_ce)
        g_z_t = _add(None if g_loss is None or ctx.z_loss_weight == 0 else g_loss * ctx.z_loss_weight, g_z)
        if ctx.reduction == "mean":
            kept = keep.sum().clamp_min(1).to(torch.float32)
            g_ce_t = None if g_ce_t is None else g_ce_t.float() / kept
            g_z_t = None if g_z_t is None else g_z_t.float() / kept

        dH = dW = None
        if g_ce_t is not None:
            have = (not need_h or dh_unit.numel() > 0) and (not need_w or dw_unit.numel() > 0)
            if ctx.reduction != "none" and have:
                scale = g_ce_t.float()
                if _plain(dw_unit) and _plain(dh_unit):
                    dH = dh_unit.mul_(scale) if need_h else None
                    dW = dw_unit.mul_(scale) if need_w else None
                else:
                    dH = dh_unit * scale if need_h else None
                    dW = dw_unit * scale if need_w else None
            else:
                rows = g_ce_t.float().expand(labels.shape[0]).contiguous()
                dH, dW = bwd_op(hidden, weight, labels, rows, ctx.norm_head, ctx.ignore_index, ctx.chunk_size,
                                need_h, need_w)
        if g_z_t is not None:
            # d z[n] / d logits[n, :] = 2 · max[n] · onehot(argmax[n]) (row_max is 0 at ignored rows).
            s = 2.0 * row_max * torch.where(keep, g_z_t.float().expand(labels.shape[0]), 0.0)  # [N]
            w_rows = weight.index_select(0, argmax).float()  # [N, D] rows of W at the argmax
            if ctx.norm_head:
                r = rinv.index_select(0, argmax)  # [N]
                w_hat = w_rows * r[:, None]
            else:
                w_hat = w_rows
            if need_h:
                dz = s[:, None] * w_hat
                dH = dz if dH is None else dH.add_(dz)
            if need_w:
                contrib = s[:, None] * hidden.float()  # dŴ[argmax[n]] += contrib[n]
                if ctx.norm_head:  # through the NormHead Jacobian, row by row (it is linear)
                    dot = (contrib * w_hat).sum(1)
                    dot = torch.where(r < 1e12, dot, 0.0)
                    contrib = r[:, None] * (contrib - w_hat * dot[:, None])
                if dW is None:
                    dW = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
                dW = dW.index_add_(0, argmax, contrib)
        if need_h:
            dH = torch.zeros(hidden.shape, device=hidden.device, dtype=hidden.dtype) if dH is None else dH.to(hidden.dtype)
        if need_w:
            dW = torch.zeros_like(weight) if dW is None else dW.to(weight.dtype)
        return (dH if need_h else None, dW if need_w else None) + (None,) * 8

    return backward


_KERNELS = register_kernels(
    "linear_cross_entropy", triton_module="linear_cross_entropy", fwd_fake=_fwd_fake, bwd_fake=_bwd_fake,
    setup_context=_setup_context, make_backward=_make_backward,
)


def _kernel_dtypes(hidden: torch.Tensor, *args, **kwargs) -> Optional[str]:
    if hidden.dtype == torch.float64:
        return "float64 runs on the reference backend only"
    return None


registry.register(
    "linear_cross_entropy",
    Impl(Backend.CUDA, _kernel_dtypes),
    Impl(Backend.TRITON, _kernel_dtypes),
    Impl(Backend.CPU, _kernel_dtypes),
)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    norm_head: bool = True,
    z_loss_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, z)`` for ``hidden: [N, D]``, head ``weight: [V, D]`` and ``labels: [N]``.

    ``logits = hidden @ normalize(weight)ᵀ`` (plain ``weight`` when ``norm_head=False``) in fp32, chunk
    by chunk; ``ce`` = mean cross-entropy and ``z`` = mean of ``max_v logits²`` over the rows whose
    label is not ``ignore_index``; ``loss = ce + z_loss_weight · z``. ``reduction="sum"`` sums,
    ``"none"`` gives per-row ``[N]`` vectors. fp32 results (float64 for float64). fwd+bwd into
    hidden and weight. ``chunk_size``: rows of logits per chunk (default: :func:`default_chunk_size`).
    """
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES_F64, ndim=2)
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES_F64, ndim=2)
    check_tensor("labels", labels, dtypes=(torch.int32, torch.int64), ndim=1)
    N, D = hidden.shape
    V = weight.shape[0]
    if hidden.numel() == 0:
        raise ValueError(f"hidden must not be empty, got shape {tuple(hidden.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"weight must not be empty, got shape {tuple(weight.shape)}")
    if weight.shape[1] != D:
        raise ValueError(f"weight must have shape [V, D={D}] (D of hidden), got {tuple(weight.shape)}")
    if labels.shape[0] != N:
        raise ValueError(f"labels must have shape [N={N}] (rows of hidden), got {tuple(labels.shape)}")
    check_same_dtype(hidden=hidden, weight=weight)
    check_same_device(hidden=hidden, weight=weight, labels=labels)
    if not isinstance(norm_head, bool):
        raise TypeError(f"norm_head must be a bool, got {type(norm_head).__name__}")
    check_positive("z_loss_weight", z_loss_weight, allow_zero=True)
    if z_loss_weight == float("inf"):  # inf · 0 at ignored rows: NaN
        raise ValueError(f"z_loss_weight must be finite, got {z_loss_weight}")
    ignore_index = _check_int("ignore_index", ignore_index, minimum=-(2**63), maximum=2**63 - 1)  # int64 labels
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None:  # more rows than N is one chunk (and keeps the kernels' int64 argument in range)
        chunk_size = min(_check_int("chunk_size", chunk_size, minimum=1), max(N, 1))
    if not torch.compiler.is_compiling():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            raise ValueError(
                f"labels must be in [0, V={V}) or ignore_index={ignore_index}; got {int(labels[bad][0])}"
            )
    chosen = registry.resolve(
        "linear_cross_entropy", backend, (hidden, weight, labels), hidden, weight, labels,
        norm_head=norm_head, z_loss_weight=z_loss_weight, ignore_index=ignore_index, reduction=reduction,
    )
    if chosen is Backend.REFERENCE:
        chunk = chunk_size
        if chunk is None:
            chunk = None if N * V <= REFERENCE_CHUNK_ELEMENTS else max(1, REFERENCE_CHUNK_ELEMENTS // V)
        return linear_cross_entropy_ref(
            hidden, weight, labels, norm_head=norm_head, z_loss_weight=float(z_loss_weight),
            ignore_index=ignore_index, reduction=reduction, chunk_size=chunk,
        )
    fwd, _ = _KERNELS[chosen]
    if chunk_size is None:
        chunk_size = default_chunk_size(N, V, hidden.device)
    # The gradient is computed in the forward pass for "mean"/"sum" (see the module docstring).
    in_fwd = torch.is_grad_enabled() and reduction != "none"
    loss, ce, z, *_ = fwd(
        hidden.contiguous(), weight.contiguous(), labels.contiguous(), norm_head, float(z_loss_weight),
        ignore_index, reduction, int(chunk_size), in_fwd and hidden.requires_grad, in_fwd and weight.requires_grad,
    )
    return loss, ce, z

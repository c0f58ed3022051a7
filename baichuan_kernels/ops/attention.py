"""``attention``: the one file that knows every backend of flash attention.

* reference — :func:`baichuan_kernels.reference.attention.attention_ref` (materialises the scores)
* cpu, cuda — ``torch.ops.baichuan.attention_fwd/bwd`` from ``baichuan_kernels._C`` (one op, dispatched
  by device: csrc/cpu/attention.cpp, csrc/cuda/attention.cu). The cuda backend refuses inputs whose
  needed CUDA kernel (forward; backward when a gradient is needed) is not registered in the build.
* triton    — ``torch.ops.baichuan_triton.attention_fwd/bwd`` (baichuan_kernels/triton/attention.py)
* :func:`attention_xformers` — not a registry backend: xformers' memory-efficient attention with a
  materialised ALiBi bias (the path Baichuan 2 was trained with), a peer for benchmarks and GPU tests.

Kernel ops take packed ``[total_T, H, Dh]`` inputs with ``cu_seqlens``; dense ``[B, T, H, Dh]`` inputs
are viewed as B sequences of T. Every kernel op gets the same fake kernel and the same autograd.
"""

from __future__ import annotations

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
)
from ..reference.attention import attention_ref
from ..registry import Backend, Impl
from ._kernels import register_kernels
from .rope import _check_int

__all__ = ["attention", "attention_xformers"]

SLOPE_DTYPES = (torch.float32, torch.float64)
HEAD_DIMS = (16, 32, 64, 128)  # supported by every attention kernel (csrc/common/attention_checks.h)
CUDA_HEAD_DIMS = (64, 128)  # csrc/cuda/attention.cu and decode_attention.cu


def _fwd_fake(q, k, v, cu_seqlens, alibi_slopes, softmax_scale, causal, max_seqlen):
    # q: [total_T, H, Dh] -> out [total_T, H, Dh], lse fp32 [H, total_T]
    return torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


def _bwd_fake(dout, q, k, v, out, lse, cu_seqlens, alibi_slopes, softmax_scale, causal, max_seqlen, deterministic):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, alibi_slopes, softmax_scale, causal, max_seqlen = inputs
    out, lse = output
    ctx.has_slopes = alibi_slopes is not None
    saved = (q, k, v, out, lse, cu_seqlens) + ((alibi_slopes,) if ctx.has_slopes else ())
    ctx.save_for_backward(*saved)
    ctx.softmax_scale, ctx.causal, ctx.max_seqlen = softmax_scale, causal, max_seqlen


def _make_backward(bwd_op):
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_seqlens, *rest = ctx.saved_tensors
        slopes = rest[0] if ctx.has_slopes else None
        # dout can be a stride-0 expanded view (out.sum().backward()): make it dense.
        dq, dk, dv = bwd_op(dout.contiguous(), q, k, v, out, lse, cu_seqlens, slopes, ctx.softmax_scale,
                            ctx.causal, ctx.max_seqlen, True)
        return dq, dk, dv, None, None, None, None, None

    return backward


def _has_cuda_kernel(op: str) -> bool:
    return _extension.extension_error() is None and torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")


# Decided once at import (the CUDA kernels register when _C loads): keeps resolve() traceable.
_CUDA_FWD = _has_cuda_kernel("baichuan::attention_fwd")
_CUDA_BWD = _has_cuda_kernel("baichuan::attention_bwd")

_KERNELS = register_kernels(
    "attention", triton_module="attention", fwd_fake=_fwd_fake, bwd_fake=_bwd_fake,
    setup_context=_setup_context, make_backward=_make_backward,
)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _kernel_limits(q, k, v, alibi_slopes=None, **kwargs) -> Optional[str]:
    if q.dtype == torch.float64:
        return "float64 runs on the reference backend only"
    if _needs_grad(alibi_slopes):
        return "a gradient for alibi_slopes runs on the reference backend only (the kernels treat slopes as constants)"
    if q.shape[-1] not in HEAD_DIMS:
        return f"the attention kernels support head dims Dh in {HEAD_DIMS}, got Dh = {q.shape[-1]}"
    return None


def _cuda_limits(q, k, v, alibi_slopes=None, **kwargs) -> Optional[str]:
    if not _CUDA_FWD:
        return "this build has no CUDA kernel for baichuan::attention_fwd"
    if _needs_grad(q, k, v) and not _CUDA_BWD:
        return "a gradient is needed and this build has no CUDA kernel for baichuan::attention_bwd"
    if q.dtype == torch.float32:
        return "the CUDA tensor-core forward takes fp16/bf16 only (fp32 stays fp32-accurate on Triton / CPU)"
    if q.shape[-1] not in CUDA_HEAD_DIMS:
        return f"the CUDA attention kernel supports Dh in {CUDA_HEAD_DIMS}, got Dh = {q.shape[-1]}"
    return _kernel_limits(q, k, v, alibi_slopes=alibi_slopes, **kwargs)


# "auto" tries Triton before CUDA for this op: the CUDA forward (mma.sync, no backward) measured
# 293-320 TFLOP/s against Triton's 336-403 on the H200 (benchmarks/results/h200-20261126.md), and only
# Triton is a full training path. backend="cuda" stays callable explicitly.
AUTO_ORDER = (Backend.TRITON, Backend.CUDA, Backend.CPU)

registry.register(
    "attention",
    Impl(Backend.CUDA, _cuda_limits),
    Impl(Backend.TRITON, _kernel_limits),
    Impl(Backend.CPU, _kernel_limits),
    fastest_first=AUTO_ORDER,
)


def check_alibi_slopes(alibi_slopes, H: int, ref: torch.Tensor, ref_name: str) -> None:
    """alibi_slopes: None or fp32/fp64 ``[H]`` on ref's device."""
    if alibi_slopes is None:
        return
    check_tensor("alibi_slopes", alibi_slopes, dtypes=SLOPE_DTYPES, ndim=1)
    check_shape("alibi_slopes", alibi_slopes, (H,), f"one slope per head of {ref_name}")
    check_same_device(**{ref_name: ref, "alibi_slopes": alibi_slopes})


def check_softmax_scale(softmax_scale) -> None:
    if softmax_scale is not None:
        check_positive("softmax_scale", softmax_scale)
        if softmax_scale == float("inf"):  # every score ±inf or NaN: no softmax
            raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")


def _check_cu_seqlens(cu_seqlens, max_seqlen, total: int, q: torch.Tensor) -> int:
    """Validates cu_seqlens (and max_seqlen); returns the length of the longest sequence."""
    check_tensor("cu_seqlens", cu_seqlens, dtypes=(torch.int32,), ndim=1)
    check_same_device(q=q, cu_seqlens=cu_seqlens)
    if cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must have num_seqs + 1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if min(lengths) < 0:
        raise ValueError("cu_seqlens must be non-decreasing")
    if bounds[-1] != total:
        raise ValueError(f"cu_seqlens must end at total_T = q.shape[0] = {total}, got {bounds[-1]}")
    if max_seqlen is not None:
        max_seqlen = _check_int("max_seqlen", max_seqlen, minimum=1)
        if max_seqlen < max(lengths):
            raise ValueError(f"max_seqlen ({max_seqlen}) is shorter than the longest sequence ({max(lengths)})")
    return max(lengths)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    alibi_slopes: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Self-attention of ``q, k, v: [B, T, H, Dh]``, or packed ``[total_T, H, Dh]`` sequences split by
    ``cu_seqlens: int32 [num_seqs + 1]`` (each attends only within itself, positions from 0).

    Optional ALiBi bias ``alibi_slopes[h] · (j - i)`` (fp32), scale ``softmax_scale`` (default
    1/sqrt(Dh)), causal mask by default. Output like q. fwd+bwd.
    """
    packed = cu_seqlens is not None
    rank = 3 if packed else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES_F64, ndim=rank)
    check_shape("k", k, q.shape, "the shape of q")
    check_shape("v", v, q.shape, "the shape of q")
    check_same_dtype(q=q, k=k, v=v)
    check_same_device(q=q, k=k, v=v)
    if q.numel() == 0:
        raise ValueError(f"q must not be empty, got shape {tuple(q.shape)}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    check_alibi_slopes(alibi_slopes, q.shape[-2], q, "q")
    check_softmax_scale(softmax_scale)
    if packed:
        longest = _check_cu_seqlens(cu_seqlens, max_seqlen, q.shape[0], q)
    elif max_seqlen is not None:
        raise ValueError("max_seqlen is only used with cu_seqlens (packed [total_T, H, Dh] inputs)")
    chosen = registry.resolve(
        "attention", backend, (q, k, v, alibi_slopes, cu_seqlens), q, k, v,
        causal=causal, alibi_slopes=alibi_slopes, softmax_scale=softmax_scale,
        cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
    )
    if chosen is Backend.REFERENCE:
        return attention_ref(
            q, k, v, causal=causal, alibi_slopes=alibi_slopes, softmax_scale=softmax_scale,
            cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
        )
    fwd, _ = _KERNELS[chosen]
    H, Dh = q.shape[-2], q.shape[-1]
    scale = float(softmax_scale) if softmax_scale is not None else Dh ** -0.5
    slopes = alibi_slopes.to(torch.float32).contiguous() if alibi_slopes is not None else None
    if packed:
        cu = cu_seqlens.contiguous()
        # The kernels size their grids by it: the true longest sequence (max_seqlen is a validated
        # upper bound; a loose one, e.g. 2**40, launched ~2**36 idle programs on Triton: a hang).
        seqlen = longest
        q3, k3, v3 = q.contiguous(), k.contiguous(), v.contiguous()
    else:
        B, T = q.shape[0], q.shape[1]
        cu = torch.arange(0, B * T + 1, T, device=q.device, dtype=torch.int32)  # B sequences of T
        seqlen = T
        q3, k3, v3 = (t.reshape(B * T, H, Dh).contiguous() for t in (q, k, v))
    out, _lse = fwd(q3, k3, v3, cu, slopes, scale, causal, seqlen)
    return out.view(q.shape)


def attention_xformers(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    alibi_slopes: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
) -> torch.Tensor:
    """Dense ``[B, T, H, Dh]`` attention through ``xformers.ops.memory_efficient_attention`` with a
    materialised ``[B, H, T, T]`` ALiBi + causal bias in q's dtype (how Baichuan 2 was trained). A
    benchmark peer and GPU cross-check; needs xformers and CUDA tensors (raises RuntimeError otherwise).
    """
    try:
        import xformers.ops as xops
    except Exception as exc:  # ImportError or a broken install
        raise RuntimeError(f"xformers is not importable ({type(exc).__name__}: {exc})") from None
    if not q.is_cuda:
        raise RuntimeError("attention_xformers needs CUDA tensors")
    B, T, H, Dh = q.shape
    scale = float(softmax_scale) if softmax_scale is not None else Dh ** -0.5
    if alibi_slopes is None and not causal:
        bias = None
    elif alibi_slopes is None:
        bias = xops.LowerTriangularMask()
    else:
        pos = torch.arange(T, device=q.device)
        rel = (pos[None, :] - pos[:, None]).to(torch.float32)  # [T, T]: j - i
        pad = (T + 7) // 8 * 8  # xformers wants the bias' last dim 8-aligned: allocate wider, slice
        storage = torch.empty(B, H, T, pad, device=q.device, dtype=q.dtype)
        bias = storage[..., :T]
        full = alibi_slopes.to(torch.float32)[:, None, None] * rel  # [H, T, T]
        if causal:
            full = full.masked_fill(rel > 0, float("-inf"))
        bias.copy_(full.to(q.dtype).expand(B, H, T, T))
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale)

"""``decode_attention``: every backend of single-token attention over a KV cache.

* reference — :func:`baichuan_kernels.reference.decode_attention.decode_attention_ref`
* cpu, cuda — ``torch.ops.baichuan.decode_attention_fwd`` (csrc/cpu/decode_attention.cpp,
  csrc/cuda/decode_attention.cu; the cuda backend refuses when the build has no CUDA kernel for it)
* triton    — ``torch.ops.baichuan_triton.decode_attention_fwd`` (split-K flash-decoding)

Inference only: the kernels have no backward, so inputs that need a gradient go to the reference.

No host synchronisation on a GPU: the range of ``cache_seqlens`` is checked on the host (ValueError)
only for CPU tensors; on a GPU the kernels read at most ``S_max`` rows whatever the lengths, and a
sequence with ``cache_seqlens[b]`` outside ``[0, S_max]`` gets a NaN output row (loud, never an
out-of-bounds read). The split-K plan (:func:`decode_split_plan`) is shared by the Triton kernel and
mirrored by the CUDA launcher (csrc/cuda/decode_attention.cu, same constants).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .. import _extension, registry
from .._validation import FLOAT_DTYPES_F64, check_same_device, check_same_dtype, check_shape, check_tensor
from ..reference.decode_attention import decode_attention_ref
from ..registry import Backend, Impl
from .attention import CUDA_HEAD_DIMS, HEAD_DIMS, _has_cuda_kernel, _needs_grad, check_alibi_slopes, check_softmax_scale

__all__ = ["decode_attention", "decode_split_plan"]

# Split-K plan constants (csrc/cuda/decode_attention.cu uses the same numbers).
SPLIT_ALIGN = 64  # keys per split are a multiple of this (one Triton BLOCK_N)
CTAS_PER_SM = 4  # target number of (split, head, batch) programs per SM
MAX_SPLITS = 128


def decode_split_plan(B: int, H: int, S_max: int, sms: int, align: int = SPLIT_ALIGN) -> tuple[int, int]:
    """``(num_splits, split_len)`` for a decode over ``[B, S_max, H, Dh]`` caches on ``sms`` SMs.

    Enough splits that ``B · H · num_splits`` is about ``CTAS_PER_SM · sms`` programs (a batch-1
    decode still fills the GPU), each split at least ``align`` keys; ``split_len`` a multiple of
    ``align``; every split starts below ``S_max``."""
    bh = max(1, B * H)
    want = max(1, -(-CTAS_PER_SM * sms // bh))
    by_len = max(1, -(-S_max // align))
    splits = max(1, min(want, by_len, MAX_SPLITS))
    split_len = -(-max(1, -(-S_max // splits)) // align) * align
    splits = max(1, -(-max(S_max, 1) // split_len))
    return splits, split_len


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Multiprocessor count of a CUDA device (cached: the query costs microseconds)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count

_KERNELS: dict[Backend, object] = {}


def _fwd_fake(q, k_cache, v_cache, cache_seqlens, alibi_slopes, softmax_scale):
    return torch.empty_like(q)  # [B, H, Dh]


_CUDA_FWD = _has_cuda_kernel("baichuan::decode_attention_fwd")

if _extension.extension_error() is None:
    torch.library.register_fake(torch.ops.baichuan.decode_attention_fwd.default)(_fwd_fake)
    _KERNELS[Backend.CPU] = torch.ops.baichuan.decode_attention_fwd.default
    if _extension.cuda_compiled():
        _KERNELS[Backend.CUDA] = _KERNELS[Backend.CPU]
if registry.TRITON_IMPORT_ERROR is None:
    from ..triton import decode_attention as _triton  # noqa: F401

    torch.library.register_fake(torch.ops.baichuan_triton.decode_attention_fwd.default)(_fwd_fake)
    _KERNELS[Backend.TRITON] = torch.ops.baichuan_triton.decode_attention_fwd.default


def _kernel_limits(q, k_cache, v_cache, cache_seqlens, alibi_slopes=None, **kwargs) -> Optional[str]:
    if q.dtype == torch.float64:
        return "float64 runs on the reference backend only"
    if q.shape[-1] not in HEAD_DIMS:
        return f"the decode attention kernels support head dims Dh in {HEAD_DIMS}, got Dh = {q.shape[-1]}"
    if _needs_grad(q, k_cache, v_cache, alibi_slopes):
        return "the decode attention kernels have no backward (inputs require grad)"
    return None


def _cuda_limits(q, k_cache, v_cache, cache_seqlens, alibi_slopes=None, **kwargs) -> Optional[str]:
    if not _CUDA_FWD:
        return "this build has no CUDA kernel for baichuan::decode_attention_fwd"
    if q.shape[-1] not in CUDA_HEAD_DIMS:
        return f"the CUDA decode kernel supports Dh in {CUDA_HEAD_DIMS}, got Dh = {q.shape[-1]}"
    return _kernel_limits(q, k_cache, v_cache, cache_seqlens, alibi_slopes=alibi_slopes, **kwargs)


registry.register(
    "decode_attention",
    Impl(Backend.CUDA, _cuda_limits),
    Impl(Backend.TRITON, _kernel_limits),
    Impl(Backend.CPU, _kernel_limits),
)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    alibi_slopes: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of the newest token ``q: [B, 1, H, Dh]`` (position ``cache_seqlens[b] - 1``) over the
    first ``cache_seqlens[b]`` rows of ``k_cache, v_cache: [B, S_max, H, Dh]`` → ``[B, 1, H, Dh]``.

    ALiBi bias ``alibi_slopes[h] · (j - (L - 1))``; a sequence with ``cache_seqlens[b] == 0`` gives zeros.
    """
    check_tensor("q", q, dtypes=FLOAT_DTYPES_F64, ndim=4)
    check_tensor("k_cache", k_cache, dtypes=FLOAT_DTYPES_F64, ndim=4)
    check_tensor("v_cache", v_cache, dtypes=FLOAT_DTYPES_F64, ndim=4)
    B, one, H, Dh = q.shape
    if one != 1:
        raise ValueError(f"q must have shape [B, 1, H, Dh] (one new token), got {tuple(q.shape)}")
    if q.numel() == 0:
        raise ValueError(f"q must not be empty, got shape {tuple(q.shape)}")
    S_max = k_cache.shape[1]
    check_shape("k_cache", k_cache, (B, S_max, H, Dh), "[B, S_max, H, Dh] matching q")
    check_shape("v_cache", v_cache, k_cache.shape, "the shape of k_cache")
    check_same_dtype(q=q, k_cache=k_cache, v_cache=v_cache)
    check_tensor("cache_seqlens", cache_seqlens, dtypes=(torch.int32,), ndim=1)
    check_shape("cache_seqlens", cache_seqlens, (B,), "one length per batch row of q")
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens)
    if cache_seqlens.device.type == "cpu" and B > 0:  # on a GPU: no host sync, NaN rows instead (above)
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
        if lo < 0 or hi > S_max:
            raise ValueError(f"cache_seqlens must lie in [0, S_max={S_max}], got values in [{lo}, {hi}]")
    check_alibi_slopes(alibi_slopes, H, q, "q")
    check_softmax_scale(softmax_scale)
    chosen = registry.resolve(
        "decode_attention", backend, (q, k_cache, v_cache, cache_seqlens, alibi_slopes),
        q, k_cache, v_cache, cache_seqlens, alibi_slopes=alibi_slopes, softmax_scale=softmax_scale,
    )
    if chosen is Backend.REFERENCE:
        return decode_attention_ref(
            q, k_cache, v_cache, cache_seqlens, alibi_slopes=alibi_slopes, softmax_scale=softmax_scale
        )
    scale = float(softmax_scale) if softmax_scale is not None else Dh ** -0.5
    slopes = alibi_slopes.to(torch.float32).contiguous() if alibi_slopes is not None else None
    out = _KERNELS[chosen](q[:, 0].contiguous(), k_cache.contiguous(), v_cache.contiguous(),
                           cache_seqlens.contiguous(), slopes, scale)  # [B, H, Dh]
    return out.view(B, 1, H, Dh)

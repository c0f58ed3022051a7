"""Flash attention in Triton: ALiBi / causal, packed (varlen) sequences, forward and backward.

The kernels: :mod:`.attention_fwd` (forward, tile helpers) and :mod:`.attention_bwd` (dq with the
fused ``delta = rowsum(dO · O)``, then dk/dv; deterministic, no atomics). This file holds the tiling
policy (autotune configs per architecture, shared-memory pruning, TMA or pointer loads) and the two
``torch.library`` ops.

Numerics: online softmax in fp32 in the log2 domain (scale folded into log2(e), ALiBi as one FMA per
score), P rounded to the value dtype before ``P @ V`` (as the reference does), natural-log lse saved
(``lse: fp32 [H, total_T]``). ``tl.dot`` operands are cast to the constexpr ``DOT_DTYPE``: the input
dtype on a GPU (wgmma on sm_90, mma on sm_80), fp32 under the interpreter (whose bf16 dot is wrong).
fp32 inputs use ``input_precision="ieee"`` (no tf32). On a GPU the backward rounds dS to the input
dtype before its two matmuls (the usual flash-attention trade); the interpreter keeps it in fp32.

Shapes: q, k, v, out, dout, dq, dk, dv: [total_T, H, Dh] contiguous; cu_seqlens int32 [S+1];
alibi_slopes fp32 [H] or None; lse, delta: fp32 [H, total_T].
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..registry import TRITON_INTERPRET
from .attention_bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel
from .attention_fwd import attn_fwd_kernel

HEAD_DIMS = (16, 32, 64, 128)
LOG2E = 1.4426950408889634

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# Tensor-descriptor (TMA) loads: "auto" = on sm_90+ when this Triton has tl.make_tensor_descriptor;
# "0"/"1" force them off/on (benchmark A/B). Read once, at import. Tests set TMA_MODE directly: the
# interpreter runs both load paths.
TMA_MODE: str = os.environ.get("BAICHUAN_ATTN_TMA", "auto")
_HAS_TMA = hasattr(tl, "make_tensor_descriptor")
_CAPABILITY = torch.cuda.get_device_capability() if torch.cuda.is_available() and not TRITON_INTERPRET else (0, 0)


def dot_dtype(dtype: torch.dtype):
    """tl.dot operand dtype: fp32 under the interpreter, the input dtype on a GPU."""
    return tl.float32 if TRITON_INTERPRET else _TL_DTYPES[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: exact fp32 products ("ieee", no tf32); 16-bit inputs: the default (tensor cores)."""
    return "ieee" if dtype == torch.float32 or TRITON_INTERPRET else "tf32"


def _cfg(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# The interpreter gets exactly one config per kernel (autotune with several fails there); tests swap
# in others through ``kernel.configs`` to run both tile shapes.
INTERP_CONFIGS = {"fwd": _cfg(16, 16, 4, 1), "dq": _cfg(32, 16, 4, 1), "dkdv": _cfg(16, 32, 4, 1)}
# sm_90: 128-row query tiles with two warpgroups (8 warps) and 3-4 stages of K/V in flight for the
# forward; the backward after Triton's Hopper tutorial (dk/dv: 32-64 query rows x 128 keys resident;
# dq: 128 query rows x 32-64 keys). sm_80: 4 warps, fewer stages (164 KB of shared memory).
_GPU_CONFIGS = {
    9: {
        "fwd": [_cfg(128, 128, 8, 3), _cfg(128, 64, 8, 3), _cfg(128, 64, 8, 4), _cfg(128, 128, 8, 2),
                _cfg(128, 64, 4, 3), _cfg(64, 64, 4, 3)],
        "dkdv": [_cfg(32, 128, 4, 5), _cfg(64, 128, 8, 3), _cfg(32, 128, 8, 4), _cfg(64, 64, 4, 3),
                 _cfg(16, 128, 4, 4)],
        "dq": [_cfg(128, 32, 4, 5), _cfg(128, 64, 8, 3), _cfg(128, 32, 8, 4), _cfg(64, 64, 4, 3),
               _cfg(64, 32, 4, 4)],
    },
    8: {
        "fwd": [_cfg(128, 64, 4, 3), _cfg(128, 64, 8, 2), _cfg(128, 32, 4, 3), _cfg(64, 64, 4, 3),
                _cfg(128, 128, 8, 2)],
        "dkdv": [_cfg(32, 128, 4, 3), _cfg(64, 64, 4, 2), _cfg(32, 64, 4, 3), _cfg(64, 128, 8, 2)],
        "dq": [_cfg(128, 32, 4, 3), _cfg(64, 64, 4, 2), _cfg(64, 32, 4, 3), _cfg(128, 64, 8, 2)],
    },
}


def _configs(kind: str) -> list[triton.Config]:
    if TRITON_INTERPRET:
        return [INTERP_CONFIGS[kind]]
    return _GPU_CONFIGS[9 if _CAPABILITY[0] >= 9 else 8][kind]


def _smem_bytes(kind: str, cfg: triton.Config, head_dim: int, elem: int) -> int:
    """Rough shared memory of a config: the resident tile plus ``num_stages`` buffers of the two
    streamed tiles (the backward streams two [rows, Dh] tiles per step as well)."""
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    resident, streamed = (bm, bn) if kind in ("fwd", "dq") else (bn, bm)
    return elem * head_dim * (resident + 2 * cfg.num_stages * streamed) + (4 * bm * bn if kind != "fwd" else 0)


def _max_smem() -> int:
    try:
        from triton.runtime import driver
        return int(driver.active.utils.get_device_properties(torch.cuda.current_device())["max_shared_mem"])
    except Exception:  # an older / other driver API: let the autotuner's OutOfResources guard decide
        return 1 << 30


def _pruner(kind: str):
    def prune(configs, named_args, **kwargs):
        elem = named_args["Q"].element_size()
        budget = _max_smem()
        fits = [c for c in configs if _smem_bytes(kind, c, kwargs["HEAD_DIM"], elem) <= budget]
        return fits or [min(configs, key=lambda c: _smem_bytes(kind, c, kwargs["HEAD_DIM"], elem))]
    return prune


# Tuned per sequence-length bucket, head dim, mask kind and load path (the dtype is added by Triton).
_AUTOTUNE_KEY = ["MAX_SEQLEN_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_ALIBI", "USE_TMA"]


def _autotuned(kernel, kind: str):
    return triton.autotune(configs=_configs(kind), key=_AUTOTUNE_KEY,
                           prune_configs_by={"early_config_prune": _pruner(kind)})(kernel)


_attn_fwd = _autotuned(attn_fwd_kernel, "fwd")
_attn_bwd_dq = _autotuned(attn_bwd_dq_kernel, "dq")
_attn_bwd_dkdv = _autotuned(attn_bwd_dkdv_kernel, "dkdv")


def _tma_alloc(size: int, alignment: int, stream):
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _use_tma(*tensors: torch.Tensor) -> bool:
    """TMA loads: sm_90+ (or forced; the interpreter runs them too), 16-byte aligned bases."""
    if TMA_MODE == "0" or not _HAS_TMA:
        return False
    if TMA_MODE != "1" and (TRITON_INTERPRET or _CAPABILITY[0] < 9):
        return False
    if any(t.data_ptr() % 16 for t in tensors):
        return False
    if not TRITON_INTERPRET:
        # In-kernel descriptors need a global scratch allocator; a ContextVar, so set it in the
        # calling thread (autograd runs the backward in its own thread) unless the caller has one.
        from triton.runtime import _allocation
        if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            triton.set_allocator(_tma_alloc)
    return True


def _check(q: torch.Tensor) -> None:
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"the Triton attention kernels support head dims {HEAD_DIMS}, got Dh = {q.shape[-1]}")


def _bucket(max_seqlen: int) -> int:
    """Autotune bucket of the longest sequence: powers of two from 128 to 16384."""
    return min(max(triton.next_power_of_2(max(int(max_seqlen), 1)), 128), 16384)


@torch.library.custom_op("baichuan_triton::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, alibi_slopes: Optional[torch.Tensor],
    softmax_scale: float, causal: bool, max_seqlen: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q)
    total_T, H, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(H, total_T, device=q.device, dtype=torch.float32)
    S = cu_seqlens.shape[0] - 1
    if total_T == 0 or S == 0 or max_seqlen == 0:
        return out, lse
    grid = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), H, S)  # noqa: E731
    _attn_fwd[grid](
        q, k, v, out, lse, cu_seqlens, alibi_slopes if alibi_slopes is not None else lse,
        softmax_scale * LOG2E, total_T, H, _bucket(max_seqlen),
        HEAD_DIM=D, CAUSAL=causal, HAS_ALIBI=alibi_slopes is not None, ALIBI_SPLIT=q.dtype != torch.float32,
        USE_TMA=_use_tma(q, k, v),
        DOT_DTYPE=dot_dtype(q.dtype), DOT_PRECISION=dot_precision(q.dtype),
    )
    return out, lse


@torch.library.custom_op("baichuan_triton::attention_bwd", mutates_args=())
def attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens: torch.Tensor, alibi_slopes: Optional[torch.Tensor], softmax_scale: float, causal: bool,
    max_seqlen: int, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Always deterministic: the two-kernel backward uses no atomics. dq runs first: it writes delta.
    _check(q)
    total_T, H, D = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    S = cu_seqlens.shape[0] - 1
    if total_T == 0 or S == 0 or max_seqlen == 0:
        return dq, dk, dv
    delta = torch.empty(H, total_T, device=q.device, dtype=torch.float32)  # written by the dq kernel
    slopes = alibi_slopes if alibi_slopes is not None else lse
    common = dict(HEAD_DIM=D, CAUSAL=causal, HAS_ALIBI=alibi_slopes is not None,
                  ALIBI_SPLIT=q.dtype != torch.float32, USE_TMA=_use_tma(q, k, v, out, dout), DOT_DTYPE=dot_dtype(q.dtype),
                  DOT_PRECISION=dot_precision(q.dtype))
    scales = (softmax_scale * LOG2E, softmax_scale, total_T, H, _bucket(max_seqlen))
    grid_m = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), H, S)  # noqa: E731
    _attn_bwd_dq[grid_m](q, k, v, out, dout, lse, delta, dq, cu_seqlens, slopes, *scales, **common)
    grid_n = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_N"]), H, S)  # noqa: E731
    _attn_bwd_dkdv[grid_n](q, k, v, dout, lse, delta, dk, dv, cu_seqlens, slopes, *scales, **common)
    return dq, dk, dv

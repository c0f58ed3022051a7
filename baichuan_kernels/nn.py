"""torch.nn modules over the baichuan_kernels ops. The backend is a constructor argument."""

from __future__ import annotations

import math
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .ops.alibi import alibi_slopes
from .ops.attention import attention
from .ops.decode_attention import decode_attention
from .ops.norm_head import norm_head_weight
from .ops.rms_norm import rms_norm
from .ops.rope import rope_cos_sin
from .ops.split_qkv_rope import split_qkv_rope
from .ops.swiglu import swiglu

__all__ = ["RMSNorm", "SwiGLU", "RotaryEmbedding", "AlibiSlopes", "Attention", "NormHead", "backend_for"]

# A backend name for every op a module calls, or a mapping {op_name: backend, "default": backend}.
BackendSpec = Union[str, Mapping[str, str]]


class RMSNorm(nn.Module):
    """RMSNorm with an optional fused residual add (Baichuan 2's pre-norm blocks).

    ``forward(x)`` returns ``y``; ``forward(x, residual=r)`` returns ``(y, x + r)``. The weight is
    cast to the activation dtype on the way in (fp32 master weights under bf16 compute).
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, backend: BackendSpec = "auto", device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.backend = backend_for(backend, "rms_norm")
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return rms_norm(x, weight, self.eps, residual=residual, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, backend={self.backend!r}"


def backend_for(backend: BackendSpec, op: str) -> str:
    """The backend name for ``op``: ``backend`` itself, or ``backend[op]`` / ``backend["default"]``."""
    if isinstance(backend, str):
        return backend
    return backend.get(op, backend.get("default", "auto"))


class SwiGLU(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))`` (Baichuan 2's MLP, no biases).

    ``fused=False`` keeps the Hugging Face layout (``gate_proj``, ``up_proj``, ``down_proj``);
    ``fused=True`` holds gate and up as one ``gate_up_proj`` weight ``[2F, D]`` (rows [0:F) gate,
    [F:2F) up), one matmul instead of two.
    """

    def __init__(self, dim: int, hidden_dim: int, *, fused: bool = False, backend: BackendSpec = "auto",
                 device=None, dtype=None):
        super().__init__()
        self.fused = fused
        self.hidden_dim = hidden_dim
        self.backend = backend_for(backend, "swiglu")
        kw = dict(bias=False, device=device, dtype=dtype)
        if fused:
            self.gate_up_proj = nn.Linear(dim, 2 * hidden_dim, **kw)
        else:
            self.gate_proj = nn.Linear(dim, hidden_dim, **kw)
            self.up_proj = nn.Linear(dim, hidden_dim, **kw)
        self.down_proj = nn.Linear(hidden_dim, dim, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:  # the packed op reads [gate | up] in place and writes dh directly (no slice backward)
            return self.down_proj(swiglu(self.gate_up_proj(x), backend=self.backend))
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), backend=self.backend))


class RotaryEmbedding(nn.Module):
    """fp32 rotate-half RoPE tables ``cos, sin: [S, Dh]`` (``bk.rope_cos_sin``), grown on demand.

    The tables are plain attributes, not buffers: they never enter the state_dict, are never cast
    by ``model.to(bfloat16)`` (they must stay fp32, spec §4) and are rebuilt on the device asked
    for. ``tables(n, device)`` returns tables with at least ``n`` rows: past ``max_positions`` they
    are extended (no interpolation or NTK scaling, as in the released 7B code).
    """

    def __init__(self, head_dim: int, max_positions: int = 4096, base: float = 10000.0, *,
                 backend: BackendSpec = "auto"):
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.base = base
        self.backend = backend_for(backend, "rope_cos_sin")
        self._cos: Optional[torch.Tensor] = None
        self._sin: Optional[torch.Tensor] = None

    def tables(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device(device)
        cos = self._cos
        if cos is None or cos.device != device or cos.shape[0] < n:
            rows = max(n, self.max_positions)
            self._cos, self._sin = rope_cos_sin(rows, self.head_dim, self.base, device=device, backend=self.backend)
        return self._cos, self._sin

    def forward(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tables(n, device)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_positions={self.max_positions}, base={self.base}"


class AlibiSlopes(nn.Module):
    """fp32 ALiBi slopes ``[H]`` (``bk.alibi_slopes``), a plain attribute moved lazily to the device."""

    def __init__(self, num_heads: int, *, backend: BackendSpec = "auto"):
        super().__init__()
        self.num_heads = num_heads
        self._slopes = alibi_slopes(num_heads, backend=backend_for(backend, "alibi_slopes"))

    def forward(self, device) -> torch.Tensor:
        if self._slopes.device != torch.device(device):
            self._slopes = self._slopes.to(device)
        return self._slopes


class Attention(nn.Module):
    """Baichuan 2 self-attention: fused QKV ``W_pack [3D, D]`` → RoPE (``split_qkv_rope``) or ALiBi →
    causal ``bk.attention`` → ``o_proj [D, D]``. No biases.

    ``forward(x, cos=, sin=, position_ids=, alibi_slopes=, cu_seqlens=, max_seqlen=, cache=)``:

    * ``x: [B, T, D]`` dense batches (every row a full causal sequence), or ``x: [1, N, D]`` with
      ``cu_seqlens`` for packed/unpadded sequences (varlen attention, no T×T mask anywhere);
    * ``position_ids [B, T]`` select RoPE rows (default ``0..T-1``); RoPE needs ``cos, sin``;
    * ``cache = (k_cache, v_cache, rows, cols, seqlens)`` writes this call's keys/values into the
      ``[B, S_max, H, Dh]`` caches at ``[rows, cols]`` (one per token). With ``seqlens`` (int32
      ``[B]``, lengths after the write) the call is a decode step (``x: [B, 1, D]``, through
      ``bk.decode_attention``); without, a prefill of empty caches (plain attention over ``x``).
    """

    def __init__(self, dim: int, num_heads: int, *, pos_emb: str, backend: BackendSpec = "auto",
                 device=None, dtype=None):
        super().__init__()
        if pos_emb not in ("rope", "alibi"):
            raise ValueError(f"pos_emb must be 'rope' or 'alibi', got {pos_emb!r}")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim, self.num_heads, self.head_dim, self.pos_emb = dim, num_heads, dim // num_heads, pos_emb
        self.qkv_backend = backend_for(backend, "split_qkv_rope")
        self.attn_backend = backend_for(backend, "attention")
        self.decode_backend = backend_for(backend, "decode_attention")
        self.W_pack = nn.Linear(dim, 3 * dim, bias=False, device=device, dtype=dtype)
        self.o_proj = nn.Linear(dim, dim, bias=False, device=device, dtype=dtype)

    def forward(self, x, *, cos=None, sin=None, position_ids=None, alibi_slopes=None,
                cu_seqlens=None, max_seqlen=None, cache=None):
        B, T, D = x.shape
        H, Dh = self.num_heads, self.head_dim
        qkv = self.W_pack(x)  # [B, T, 3D]
        if self.pos_emb == "rope":
            q, k, v = split_qkv_rope(qkv, cos, sin, num_heads=H, position_ids=position_ids,
                                     backend=self.qkv_backend)  # each [B, T, H, Dh]
            slopes = None
        else:
            q, k, v = (t.contiguous() for t in qkv.view(B, T, 3, H, Dh).unbind(dim=2))  # each [B, T, H, Dh]
            slopes = alibi_slopes
        if cache is not None:
            k_cache, v_cache, rows, cols, seqlens = cache
            k_cache[rows, cols] = k.reshape(-1, H, Dh).to(k_cache.dtype)
            v_cache[rows, cols] = v.reshape(-1, H, Dh).to(v_cache.dtype)
            if seqlens is not None:  # decode: one new token per row, attend over the cache
                o = decode_attention(q, k_cache, v_cache, seqlens, alibi_slopes=slopes,
                                     backend=self.decode_backend)  # [B, 1, H, Dh]
                return self.o_proj(o.reshape(B, T, D))
        if cu_seqlens is not None:  # packed sequences in one row: [1, N, ...]
            o = attention(q[0], k[0], v[0], causal=True, alibi_slopes=slopes, cu_seqlens=cu_seqlens,
                          max_seqlen=max_seqlen, backend=self.attn_backend)[None]  # [1, N, H, Dh]
        else:
            o = attention(q, k, v, causal=True, alibi_slopes=slopes, backend=self.attn_backend)  # [B, T, H, Dh]
        return self.o_proj(o.reshape(B, T, D))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, pos_emb={self.pos_emb!r}"


class NormHead(nn.Module):
    """Baichuan 2's LM head: ``logits = h @ normalize(W)ᵀ`` with ``W: [V, D]`` rows L2-normalised
    (``bk.norm_head_weight``, eps 1e-12). ``normalize=False`` gives a plain linear head.

    The parameter always holds the raw (un-normalised) rows, as released checkpoints store them.
    Train mode normalises on every forward (gradients flow through the normalisation); eval mode
    caches the normalised weight until the parameter changes (in-place update, new tensor or
    device/dtype move) or the module goes back to train mode.
    """

    def __init__(self, dim: int, vocab_size: int, *, normalize: bool = True, backend: BackendSpec = "auto",
                 device=None, dtype=None):
        super().__init__()
        self.normalize = normalize
        self.backend = backend_for(backend, "norm_head_weight")
        self.weight = nn.Parameter(torch.empty(vocab_size, dim, device=device, dtype=dtype))
        self._cache: Optional[tuple] = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # U(±1/sqrt(D)), as the HF NormHead
        self._cache = None

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def normalized_weight(self) -> torch.Tensor:
        w = self.weight
        if not self.normalize:
            return w
        if self.training or torch.compiler.is_compiling() or torch.is_grad_enabled():
            return norm_head_weight(w, backend=self.backend)
        key = (w.data_ptr(), w._version, w.device, w.dtype)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, norm_head_weight(w, backend=self.backend))
        return self._cache[1]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        w = self.normalized_weight()
        return F.linear(h, w if w.dtype == h.dtype else w.to(h.dtype))

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[1]}, vocab_size={self.weight.shape[0]}, normalize={self.normalize}"


from .ops.quant_matmul import QuantizedWeight as _QuantizedWeight  # noqa: E402
from .ops.quant_matmul import _check_x as _check_quant_x, _quant_matmul, quantize_weight as _quantize_weight  # noqa: E402
from .reference.quant_matmul import nf4_codebook as _nf4_codebook  # noqa: E402

__all__.append("QuantLinear")


class QuantLinear(nn.Module):
    """A bias-free linear layer ``y = x @ Wᵀ`` whose weight ``W: [out_features, in_features]`` is stored
    quantized (``bits=8``: int8 per output channel; ``bits=4``: int4 groups of ``group_size`` along K;
    ``bits="nf4"``: NF4 codes with an absmax per block of ``group_size`` along K; formats in :mod:`baichuan_kernels.reference.quant_matmul`) and multiplied by
    :func:`~baichuan_kernels.quant_matmul` with the dequantisation fused in the kernel.

    Buffers (in the state dict, saveable with safetensors): ``qdata``, ``scales`` (fp32) and, for
    4 bits, ``zeros`` (fp32); for NF4 ``codebook`` (fp32 [16]) instead of ``zeros``. ``module.to(dtype)`` leaves them as they are (no rounding of the
    scales). The weight is frozen; gradients flow to ``x`` only. Build one with :meth:`from_linear`
    or :func:`baichuan_kernels.quantize.quantize_model`.
    """

    def __init__(self, in_features: int, out_features: int, *, bits, group_size: int = 128,
                 backend: str = "auto", device=None):
        super().__init__()
        if bits not in (4, 8, "nf4"):
            raise ValueError(f"bits must be 4, 8 or 'nf4', got {bits!r}")
        if bits in (4, "nf4") and (group_size not in (32, 64, 128) or in_features % group_size):
            raise ValueError(f"group_size must be 32, 64 or 128 and divide in_features={in_features} for "
                             f"bits={bits!r}, got {group_size}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = in_features if bits == 8 else group_size
        self.backend = backend
        N, K = out_features, in_features
        if bits == 8:
            qdata, groups = torch.zeros(N, K, dtype=torch.int8, device=device), None
            scales = torch.zeros(N, dtype=torch.float32, device=device)
        else:
            groups = K // group_size
            qdata = torch.zeros(N, K // 2, dtype=torch.uint8, device=device)
            scales = torch.zeros(N, groups, dtype=torch.float32, device=device)
        self.register_buffer("qdata", qdata)
        self.register_buffer("scales", scales)
        nf4 = bits == "nf4"
        self.register_buffer("zeros", None if groups is None or nf4 else torch.zeros_like(scales))
        self.register_buffer("codebook", _nf4_codebook(device) if nf4 else None)

    @classmethod
    def from_quantized(cls, qweight: _QuantizedWeight, *, backend: str = "auto") -> "QuantLinear":
        N, K = qweight.shape
        module = cls(K, N, bits=qweight.bits, group_size=128 if qweight.bits == 8 else qweight.group_size,
                     backend=backend, device="meta")
        module.qdata, module.scales, module.zeros = qweight.data, qweight.scales, qweight.zeros
        module.codebook = qweight.codebook
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, bits: int, group_size: int = 128, backend: str = "auto") -> "QuantLinear":
        """Quantize a bias-free ``nn.Linear`` (on its device; math in fp32)."""
        if linear.bias is not None:
            raise ValueError("linear has a bias: QuantLinear is bias-free (Baichuan 2's projections have none)")
        with torch.no_grad():
            qweight = _quantize_weight(linear.weight.detach(), bits=bits, group_size=group_size)
        return cls.from_quantized(qweight, backend=backend)

    @property
    def qweight(self) -> _QuantizedWeight:
        return _QuantizedWeight(self.qdata, self.scales, self.zeros, self.bits, self.group_size,
                                (self.out_features, self.in_features), self.codebook)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_quant_x(x, self.in_features)
        return _quant_matmul(x, self.qdata, self.scales, self.zeros, self.bits, self.group_size,
                             self.out_features, self.in_features, self.backend, self.codebook)

    def _apply(self, fn, recurse=True):
        keep = {"scales": self.scales, "zeros": self.zeros, "codebook": self.codebook}
        super()._apply(fn, recurse)
        for name, old in keep.items():  # a dtype cast (model.to(torch.bfloat16)) must not round the scales
            new = getattr(self, name)
            if new is not None and new.dtype != torch.float32:
                setattr(self, name, old.to(device=new.device))
        return self

    def extra_repr(self) -> str:
        gs = f", group_size={self.group_size}" if self.bits != 8 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits!r}{gs}, "
                f"backend={self.backend!r}")

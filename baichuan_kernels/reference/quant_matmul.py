"""Weight-only quantization reference: int8 per-channel, int4 group-wise and NF4 (BAICHUAN2_SPEC.md §12).

Our own formats. The released 4-bit checkpoints use bitsandbytes NF4 with double-quantised absmax;
:mod:`minitrain.nf4` reads that format into the ``bits="nf4"`` layout below (bitsandbytes not needed).
A weight ``W: [N, K]`` (N output features, K input features) becomes a :class:`QuantizedWeight`:

**bits = 8** (per output channel, symmetric)::

    scales[n] = max_k |W[n, k]| / 127                              fp32 [N]
    data[n, k] = clamp(round(W[n, k] / scales[n]), -127, 127)       int8 [N, K]
    W[n, k] ≈ data[n, k] · scales[n]

``group_size`` is recorded as K (the whole row is one group). ``zeros`` is None.

**bits = 4** (group-wise over K, asymmetric; groups of ``group_size`` ∈ {32, 64, 128})::

    g = k // group_size
    zeros[n, g]  = min of the group                                 fp32 [N, K/group_size]
    scales[n, g] = (max - min of the group) / 15                    fp32 [N, K/group_size]
    q[n, k]      = clamp(round((W[n, k] - zeros[n, g]) / scales[n, g]), 0, 15)
    W[n, k]      ≈ q[n, k] · scales[n, g] + zeros[n, g]

``zeros`` is a *float* offset — the value code 0 decodes to — not an integer zero point, so a group
that does not straddle 0 keeps its full 16 levels and a constant group (scale 0) is exact.
(torch's ``_weight_int4pack_mm`` uses ``(q - 8) · scale + zero``, i.e. ``zero = zeros + 8·scale``.)
Codes are packed two per byte along K: ``data[n, k // 2]`` (uint8 ``[N, K/2]``) holds
``q[n, k]`` for even k in its low nibble and ``q[n, k + 1]`` in its high nibble.

**bits = "nf4"** (NormalFloat-4, QLoRA; blocks of ``group_size`` ∈ {32, 64, 128} along K, symmetric)::

    g = k // group_size
    scales[n, g] = max of |W| over the group (absmax)                fp32 [N, K/group_size]
    q[n, k]      = the index of the codebook entry nearest W[n, k] / scales[n, g]
    W[n, k]      ≈ codebook[q[n, k]] · scales[n, g]

``codebook`` is fp32 ``[16]``: :data:`NF4_CODEBOOK` (the 16 NF4 levels in [-1, 1], ascending, with an
exact 0 at code 7; any 16-entry table decodes the same way). ``zeros`` is None. Codes are packed as
for bits = 4 (even k low nibble) — note that bitsandbytes' own packing is the other way round; the
reader swaps the nibbles once at load time.

Round-trip error per element is at most ``scales / 2`` (int4, plus fp32 rounding); NF4 at most half
the largest gap between codebook levels (0.16) times the absmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

GROUP_SIZES_4BIT = (32, 64, 128)  # also the NF4 block sizes our kernels take

# The NF4 levels: quantiles of a standard normal, rescaled to [-1, 1] with an exact zero (QLoRA,
# Dettmers et al. 2023; the table bitsandbytes ships as its "nf4" quant map).
NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def nf4_codebook(device=None) -> torch.Tensor:
    """:data:`NF4_CODEBOOK` as fp32 ``[16]``."""
    return torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=device)


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A quantized ``[N, K]`` weight (the layout is in this module's docstring)."""

    data: torch.Tensor  # int8 [N, K] (bits=8) | uint8 [N, K/2] (bits=4, "nf4": two codes per byte)
    scales: torch.Tensor  # fp32 [N] (bits=8) | fp32 [N, K/group_size] (bits=4; "nf4": absmax)
    zeros: Optional[torch.Tensor]  # None (bits=8, "nf4") | fp32 [N, K/group_size]: value of code 0 (bits=4)
    bits: object  # 4 | 8 | "nf4"
    group_size: int
    shape: tuple[int, int]  # (N, K) of the float weight
    codebook: Optional[torch.Tensor] = None  # fp32 [16] (bits="nf4") | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        N, K = self.shape
        if self.bits != "nf4" and self.codebook is not None:
            raise ValueError(f"codebook must be None for bits={self.bits}")
        if self.bits == 8:
            expected = {"data": (torch.int8, (N, K)), "scales": (torch.float32, (N,))}
            if self.zeros is not None:
                raise ValueError("zeros must be None for bits=8 (symmetric int8)")
        elif self.bits == "nf4":
            if self.group_size not in GROUP_SIZES_4BIT or K % self.group_size:
                raise ValueError(f"group_size {self.group_size} must be one of {GROUP_SIZES_4BIT} and divide K={K} "
                                 "for bits='nf4'")
            if self.zeros is not None:
                raise ValueError("zeros must be None for bits='nf4' (symmetric absmax blocks)")
            expected = {
                "data": (torch.uint8, (N, K // 2)),
                "scales": (torch.float32, (N, K // self.group_size)),
                "codebook": (torch.float32, (16,)),
            }
        elif self.bits == 4:
            if self.group_size <= 0 or K % self.group_size or K % 2:
                raise ValueError(f"group_size {self.group_size} must divide K={K} (K even) for bits=4")
            G = K // self.group_size
            expected = {
                "data": (torch.uint8, (N, K // 2)),
                "scales": (torch.float32, (N, G)),
                "zeros": (torch.float32, (N, G)),
            }
        else:
            raise ValueError(f"bits must be 4, 8 or 'nf4', got {self.bits!r}")
        for name, (dtype, shape) in expected.items():
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"QuantizedWeight.{name} must be {dtype} {shape} for bits={self.bits}, got {got}")
        parts = {name: t for name, t in (("data", self.data), ("scales", self.scales), ("zeros", self.zeros),
                                         ("codebook", self.codebook)) if t is not None}
        if len({t.device for t in parts.values()}) > 1:
            listing = ", ".join(f"{name} on {t.device}" for name, t in parts.items())
            raise ValueError(f"QuantizedWeight tensors must be on one device: {listing}")

    @property
    def device(self) -> torch.device:
        return self.data.device

    def to(self, device) -> "QuantizedWeight":
        """The same weight on another device."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedWeight(move(self.data), move(self.scales), move(self.zeros), self.bits, self.group_size,
                               self.shape, move(self.codebook))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors only (the integers as int64 tensors), so ``safetensors`` can save it. NF4 is
        ``bits`` 4 plus a ``codebook`` entry."""
        sd = {
            "data": self.data,
            "scales": self.scales,
            "bits": torch.tensor(4 if self.bits == "nf4" else self.bits, dtype=torch.int64),
            "group_size": torch.tensor(self.group_size, dtype=torch.int64),
            "shape": torch.tensor(self.shape, dtype=torch.int64),
        }
        if self.zeros is not None:
            sd["zeros"] = self.zeros
        if self.codebook is not None:
            sd["codebook"] = self.codebook
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict) -> "QuantizedWeight":
        """Inverse of :meth:`state_dict` (the integers may be ints or tensors)."""
        as_int = lambda v: int(v.item()) if isinstance(v, torch.Tensor) else int(v)  # noqa: E731
        shape = sd["shape"].tolist() if isinstance(sd["shape"], torch.Tensor) else sd["shape"]
        bits = "nf4" if sd.get("codebook") is not None else as_int(sd["bits"])
        return cls(sd["data"], sd["scales"], sd.get("zeros"), bits, as_int(sd["group_size"]), tuple(shape),
                   sd.get("codebook"))


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[N, K]`` in 0..15 → ``[N, K/2]``: even k low nibble, odd k high nibble."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def _unpack_nibbles(data: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pack_nibbles`: ``[N, K/2]`` → uint8 codes ``[N, K]``."""
    low, high = data & 0xF, data >> 4  # [N, K/2] each: k even, k odd
    return torch.stack((low, high), dim=-1).flatten(-2)  # [N, K]


def quantize_weight_ref(weight: torch.Tensor, *, bits: int, group_size: int = 128) -> QuantizedWeight:
    """Quantize ``weight: [N, K]`` (math in fp32, float64 for float64 weights)."""
    N, K = weight.shape
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(acc)  # [N, K]
    if bits == 8:
        scales = (w.abs().amax(dim=1) / 127).float()  # [N]
        s = scales.to(acc)
        safe = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row quantizes to 0
        data = torch.round(w / safe[:, None]).clamp(-127, 127).to(torch.int8)  # [N, K]
        return QuantizedWeight(data, scales, None, 8, K, (N, K))
    G = K // group_size
    wg = w.view(N, G, group_size)  # [N, G, group]
    if bits == "nf4":
        absmax = wg.abs().amax(dim=-1)  # [N, G]
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        cb = nf4_codebook(weight.device)
        q = nf4_encode(wg / safe[..., None], cb)  # [N, G, group]
        return QuantizedWeight(_pack_nibbles(q.view(N, K)), absmax.float(), None, "nf4", group_size, (N, K), cb)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)  # [N, G]
    scales, zeros = ((hi - lo) / 15).float(), lo.float()
    s, z = scales.to(acc), zeros.to(acc)
    safe = torch.where(s > 0, s, torch.ones_like(s))  # a constant group is exactly its offset
    q = torch.round((wg - z[..., None]) / safe[..., None]).clamp(0, 15).to(torch.uint8)  # [N, G, group]
    return QuantizedWeight(_pack_nibbles(q.view(N, K)), scales, zeros, 4, group_size, (N, K))


def nf4_encode(v: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """uint8 index of the ``codebook [16]`` entry nearest each element of ``v`` (any shape; ties go to
    the lower index)."""
    cb = codebook.to(v.dtype)
    mid = (cb[1:] + cb[:-1]) / 2  # [15] decision thresholds between neighbouring levels
    return torch.bucketize(v.contiguous(), mid, right=False).to(torch.uint8)


def dequantize_weight_ref(qweight: QuantizedWeight) -> torch.Tensor:
    """The float32 ``[N, K]`` weight the quantized one stands for."""
    N, K = qweight.shape
    if qweight.bits == 8:
        return qweight.data.float() * qweight.scales[:, None]  # [N, K]
    G = K // qweight.group_size
    if qweight.bits == "nf4":
        q = _unpack_nibbles(qweight.data).long().view(N, G, qweight.group_size)  # [N, G, group]
        return (qweight.codebook[q] * qweight.scales[..., None]).view(N, K)
    q = _unpack_nibbles(qweight.data).float().view(N, G, qweight.group_size)  # [N, G, group]
    w = q * qweight.scales[..., None] + qweight.zeros[..., None]
    return w.view(N, K)


def quant_matmul_ref(x: torch.Tensor, qweight: QuantizedWeight) -> torch.Tensor:
    """``x: [..., K]`` → ``x @ dequantize(qweight)ᵀ: [..., N]``, accumulated in fp32 (float64 for
    float64 x), returned in x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = dequantize_weight_ref(qweight).to(acc)  # [N, K]
    return (x.to(acc) @ w.T).to(x.dtype)

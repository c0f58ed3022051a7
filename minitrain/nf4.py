"""bitsandbytes NF4 checkpoints (the format of the released Baichuan2-*-4bits models) → our NF4 layout,
without bitsandbytes.

The released 4-bit models' ``config.json`` carries a ``quantization_config`` of ``load_in_4bit: true``,
``bnb_4bit_quant_type: "nf4"``, ``bnb_4bit_use_double_quant: true``, ``bnb_4bit_compute_dtype:
"bfloat16"``. Only the five projections of every layer (``W_pack``, ``o_proj``, ``gate_proj``,
``up_proj``, ``down_proj``) are 4-bit; embeddings, norms and the lm_head (NormHead) stay fp16/bf16
(BAICHUAN2_SPEC.md §12).

**The serialized format** (bitsandbytes ``Params4bit`` + ``QuantState``, written into a state dict),
for one weight ``W: [N, K]`` under the module prefix ``P`` (e.g. ``model.layers.0.self_attn.W_pack``):

* ``P.weight`` — uint8 ``[ceil(N·K / 2), 1]``: W flattened row-major (flat index ``i = n·K + k``),
  one 4-bit code per element, two per byte; byte ``j`` holds element ``2j`` in its **high** nibble
  and element ``2j + 1`` in its low nibble.
* ``P.weight.quant_map`` — fp32 ``[16]``: the codebook (for ``nf4`` the NF4 levels,
  :data:`baichuan_kernels.reference.quant_matmul.NF4_CODEBOOK`).
* ``P.weight.absmax`` — one scale per block of ``blocksize`` consecutive flat elements (``nblocks =
  ceil(N·K / blocksize)``): fp32 without double quantisation; with it, uint8 codes of a second,
  8-bit blockwise quantisation of the absmax values.
* double quantisation only: ``P.weight.nested_absmax`` fp32 ``[ceil(nblocks / nested_blocksize)]``
  and ``P.weight.nested_quant_map`` fp32 ``[256]`` (the 8-bit code table in [-1, 1]).
* ``P.weight.quant_state.bitsandbytes__nf4`` — uint8 bytes of a UTF-8 JSON object: ``quant_type``
  ("nf4"), ``blocksize`` (64 by default), ``dtype`` (the float weight's torch dtype name, e.g.
  "bfloat16"), ``shape`` ([N, K]); with double quantisation also ``nested_blocksize`` (256),
  ``nested_dtype`` ("float32") and ``nested_offset`` (a float).

Decoding: ``absmax[b] = nested_quant_map[absmax_code[b]] · nested_absmax[b // nested_blocksize] +
nested_offset`` (the offset is the mean of the absmax values, subtracted before the nested
quantisation), then ``W_flat[i] = quant_map[code_i] · absmax[i // blocksize]``.

An older bitsandbytes (the one Baichuan's own ``modeling_baichuan.py`` targets) pickled the state as
``P.weight.data`` + ``P.weight.quant_state``, a list ``[absmax, shape, dtype, blocksize,
compressed_stats, quant_type, ...]`` with ``compressed_stats`` None or ``[offset, [nested_absmax,
nested_quant_map, nested_blocksize, ...]]``: :func:`from_bnb_legacy_state` reads that (from code
reading; not checked against the released file).

**Into our layout**: when ``blocksize`` divides K, block b is row ``b // (K / blocksize)``, so the
absmax vector is ``[N, K / blocksize]``; our kernels take blocks of 32/64/128, so a larger blocksize
(a multiple of 128) repeats each absmax over its 128-wide sub-blocks (exact). The nibbles are swapped
to our order (even k low). A blocksize that does not divide K (blocks straddling rows) or K odd →
ValueError.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import nn

from baichuan_kernels.nn import QuantLinear, backend_for
from baichuan_kernels.quantize import QUANTIZED_MODULE_NAMES
from baichuan_kernels.reference.quant_matmul import (
    GROUP_SIZES_4BIT,
    QuantizedWeight,
    nf4_codebook,
    nf4_encode,
)

__all__ = ["QS_KEY", "dynamic_map", "to_bnb_nf4", "from_bnb_nf4", "from_bnb_legacy_state", "is_bnb_nf4_state",
           "is_bnb_nf4_checkpoint", "load_bnb_nf4_checkpoint"]

QS_KEY = "quant_state.bitsandbytes__nf4"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def dynamic_map() -> torch.Tensor:
    """A signed 8-bit "dynamic" code table (fp32 [256], ascending, in [-1, 1]): 7 decades of
    magnitude, decade i (scale 10^(i-6)) holding 2^i evenly spaced levels in (0.1, 1), both signs,
    plus 0 and 1 — the structure of bitsandbytes' default table for the nested absmax."""
    vals = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2 ** i + 1, dtype=torch.float64)
        mids = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)).tolist()
        vals += mids + [-v for v in mids]
    return torch.tensor(sorted(vals), dtype=torch.float32)


def _encode_nearest(v: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return nf4_encode(v, table)  # nearest entry of an ascending table (ties to the lower index)


def to_bnb_nf4(weight: torch.Tensor, *, blocksize: int = 64, double_quant: bool = True,
               nested_blocksize: int = 256) -> dict[str, torch.Tensor]:
    """Our own writer of the bitsandbytes NF4 format (for tests and interchange): ``weight [N, K]`` →
    the tensors of the format, keyed relative to ``P.`` (``weight``, ``weight.absmax``, ...)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    N, K = weight.shape
    flat = weight.detach().float().reshape(-1)  # [N·K]
    n = flat.numel()
    nblocks = math.ceil(n / blocksize)
    padded = torch.nn.functional.pad(flat, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    absmax = padded.abs().amax(dim=1)  # [nblocks]
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = nf4_encode(padded / safe[:, None], nf4_codebook()).reshape(-1)[: n + n % 2]  # [n (+1)]
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    packed = (codes[0::2] << 4) | codes[1::2]  # element 2j high nibble, 2j+1 low
    out = {"weight": packed.view(-1, 1).contiguous(), "weight.quant_map": nf4_codebook()}
    meta = {"quant_type": "nf4", "blocksize": blocksize, "dtype": str(weight.dtype).replace("torch.", ""),
            "shape": [N, K]}
    if double_quant:
        offset = absmax.mean()
        centred = absmax - offset
        nb2 = math.ceil(nblocks / nested_blocksize)
        c = torch.nn.functional.pad(centred, (0, nb2 * nested_blocksize - nblocks)).view(nb2, nested_blocksize)
        absmax2 = c.abs().amax(dim=1)  # [nb2]
        safe2 = torch.where(absmax2 > 0, absmax2, torch.ones_like(absmax2))
        table = dynamic_map()
        qabs = _encode_nearest(c / safe2[:, None], table).reshape(-1)[:nblocks]
        out.update({"weight.absmax": qabs, "weight.nested_absmax": absmax2, "weight.nested_quant_map": table})
        meta.update({"nested_blocksize": nested_blocksize, "nested_dtype": "float32", "nested_offset": float(offset)})
    else:
        out["weight.absmax"] = absmax
    out[f"weight.{QS_KEY}"] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    return out


def _absmax_values(absmax: torch.Tensor, nested: Optional[tuple], nblocks: int) -> torch.Tensor:
    """fp32 [nblocks] absmax, undoing the double quantisation when ``nested = (absmax2, table,
    blocksize2, offset)``."""
    absmax = absmax.reshape(-1)
    if absmax.numel() != nblocks:
        raise ValueError(f"absmax has {absmax.numel()} entries, expected {nblocks} blocks")
    if nested is None:
        if absmax.dtype == torch.uint8:
            raise ValueError("absmax is uint8 (double-quantised) but the nested statistics are missing")
        return absmax.float()
    absmax2, table, bs2, offset = nested
    if absmax.dtype != torch.uint8:
        raise ValueError(f"double-quantised absmax must be uint8 codes, got {absmax.dtype}")
    table, absmax2 = table.float().reshape(-1), absmax2.float().reshape(-1)
    if table.numel() != 256:
        raise ValueError(f"nested_quant_map must have 256 entries, got {table.numel()}")
    if absmax2.numel() != math.ceil(nblocks / bs2):
        raise ValueError(f"nested_absmax has {absmax2.numel()} entries, expected {math.ceil(nblocks / bs2)}")
    idx = torch.arange(nblocks) // bs2
    return table[absmax.long()] * absmax2[idx] + float(offset)


def _to_ours(packed: torch.Tensor, codebook: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int,
             quant_type: str) -> QuantizedWeight:
    if quant_type != "nf4":
        raise ValueError(f"only quant_type 'nf4' is supported, got {quant_type!r}")
    if len(shape) != 2:
        raise ValueError(f"the quantized weight must be 2-D, got shape {list(shape)}")
    N, K = (int(s) for s in shape)
    if K % 2 or K % blocksize:
        raise ValueError(f"blocksize {blocksize} must divide K = {K} (K even) to map blocks onto rows")
    group = blocksize if blocksize in GROUP_SIZES_4BIT else 128
    if blocksize % group:
        raise ValueError(f"blocksize {blocksize} must be 32, 64, 128 or a multiple of 128")
    packed = packed.reshape(-1)
    if packed.dtype != torch.uint8 or packed.numel() != N * K // 2:
        raise ValueError(f"weight must be {N * K // 2} uint8 bytes, got {packed.dtype} {packed.numel()}")
    codebook = codebook.float().reshape(-1).contiguous()
    if codebook.numel() != 16:
        raise ValueError(f"quant_map must have 16 entries, got {codebook.numel()}")
    data = (((packed & 0xF) << 4) | (packed >> 4)).view(N, K // 2)  # to even k low nibble
    scales = absmax.view(N, K // blocksize).repeat_interleave(blocksize // group, dim=1)  # [N, K/group]
    return QuantizedWeight(data.contiguous(), scales.contiguous(), None, "nf4", group, (N, K), codebook)


def is_bnb_nf4_state(tensors: Mapping[str, torch.Tensor], prefix: str = "") -> bool:
    """Whether ``tensors`` hold a serialized NF4 weight under ``prefix`` (e.g. ``"…W_pack."``)."""
    return f"{prefix}weight.{QS_KEY}" in tensors


def from_bnb_nf4(tensors: Mapping[str, torch.Tensor], prefix: str = "") -> QuantizedWeight:
    """Read one serialized bitsandbytes NF4 weight (keys ``{prefix}weight``, ``{prefix}weight.absmax``,
    ... as in this module's docstring) into a ``bits="nf4"`` :class:`QuantizedWeight` (CPU)."""
    key = f"{prefix}weight"
    for k in (key, f"{key}.absmax", f"{key}.quant_map", f"{key}.{QS_KEY}"):
        if k not in tensors:
            raise ValueError(f"missing {k!r}: not a serialized bitsandbytes NF4 weight")
    meta = json.loads(bytes(tensors[f"{key}.{QS_KEY}"].to(torch.uint8).tolist()).decode("utf-8"))
    shape, blocksize = meta["shape"], int(meta["blocksize"])
    nblocks = math.ceil(math.prod(shape) / blocksize)
    nested = None
    if f"{key}.nested_absmax" in tensors:
        nested = (tensors[f"{key}.nested_absmax"], tensors[f"{key}.nested_quant_map"], int(meta["nested_blocksize"]),
                  float(meta["nested_offset"]))
    absmax = _absmax_values(tensors[f"{key}.absmax"], nested, nblocks)
    return _to_ours(tensors[key], tensors[f"{key}.quant_map"], absmax, shape, blocksize, meta["quant_type"])


def from_bnb_legacy_state(packed: torch.Tensor, state: list) -> QuantizedWeight:
    """The older pickled form: ``packed`` (``P.weight.data``) and the list ``P.weight.quant_state``."""
    if not isinstance(state, (list, tuple)) or len(state) < 6:
        raise ValueError("quant_state must be the list [absmax, shape, dtype, blocksize, compressed_stats, "
                         "quant_type, ...]")
    absmax, shape, _dtype, blocksize, stats, quant_type = state[:6]
    blocksize = int(blocksize)
    nblocks = math.ceil(math.prod(shape) / blocksize)
    nested = None
    if stats is not None:
        offset, state2 = stats
        nested = (state2[0], state2[1], int(state2[2]), float(offset))
    codebook = state[6] if len(state) > 6 and isinstance(state[6], torch.Tensor) else nf4_codebook()
    return _to_ours(packed, codebook, _absmax_values(absmax, nested, nblocks), list(shape), blocksize, quant_type)


def is_bnb_nf4_checkpoint(path: Union[str, Path]) -> bool:
    """Whether ``path`` is an HF directory whose config.json declares bitsandbytes NF4 4-bit weights
    (``quantization_config``: ``load_in_4bit`` and ``bnb_4bit_quant_type`` "nf4")."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        q = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return bool(q.get("load_in_4bit")) and q.get("bnb_4bit_quant_type", "fp4") == "nf4"


def load_bnb_nf4_checkpoint(path: Union[str, Path], *, dtype: Optional[torch.dtype] = None,
                            device: Union[str, torch.device] = "cpu", backend: Optional[str] = None,
                            pos_emb: Optional[str] = None):
    """An HF Baichuan 2 directory whose projections are bitsandbytes NF4 (serialized keys) → our
    :class:`~minitrain.model.Baichuan2` with NF4 ``QuantLinear`` projections; the other tensors load as
    stored (or in ``dtype``). The position encoding is decided from the directory's evidence as for
    :func:`minitrain.hf.load_hf_checkpoint` (``pos_emb`` overrides it)."""
    from .config import config_from_dict, config_to_dict
    from .hf import config_from_hf, read_hf_state_dict
    from .model import Baichuan2

    path = Path(path)
    state = read_hf_state_dict(path)
    config = config_from_hf(json.loads((path / "config.json").read_text()), pos_emb=pos_emb, directory=path,
                            state_dict_keys=state.keys())
    if backend is not None:
        config = config_from_dict({**config_to_dict(config), "backend": backend})
    with torch.device("meta"):
        model = Baichuan2(config)
    qbackend = backend_for(model.config.backends(), "quant_matmul")
    names = set(QUANTIZED_MODULE_NAMES)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in names and isinstance(child, nn.Linear):
                prefix = f"{parent_name}.{child_name}." if parent_name else f"{child_name}."
                qw = from_bnb_nf4(state, prefix)
                if qw.shape != (child.out_features, child.in_features):
                    raise ValueError(f"{prefix}weight has shape {qw.shape}, the model expects "
                                     f"{(child.out_features, child.in_features)}")
                setattr(parent, child_name, QuantLinear(child.in_features, child.out_features, bits="nf4",
                                                        group_size=qw.group_size, backend=qbackend, device="meta"))
                for k in [k for k in state if k.startswith(prefix)]:
                    del state[k]
                state.update({f"{prefix}qdata": qw.data, f"{prefix}scales": qw.scales,
                              f"{prefix}codebook": qw.codebook})
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        shapes = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        raise ValueError(f"{path}: state does not match the model (missing {missing[:10]}, unexpected "
                         f"{extra[:10]}, wrong shape {shapes[:10]})")
    model.materialize(device, dtype or state["lm_head.weight"].dtype, init=False)
    model.load_state_dict(state)
    return model

"""Weight-only quantized Baichuan 2 models (``python -m minitrain quantize`` / ``generate``).

:func:`quantize` applies :func:`baichuan_kernels.quantize.quantize_model` (``W_pack``, ``o_proj``,
``gate_proj``, ``up_proj``, ``down_proj`` of every layer become ``QuantLinear``; embeddings, norms and
the lm_head keep their dtype). :func:`save_quantized_model` writes one safetensors file: the state
dict (``qdata``/``scales``/``zeros`` buffers for the quantized projections) and, in the safetensors
metadata, ``format = "minitrain.quantized"``, the model config (JSON), ``bits`` ("4", "8" or "nf4"; NF4
modules also hold their ``codebook`` buffer) and ``group_size``.
:func:`load_quantized_model` rebuilds ``Baichuan2(config)`` on meta, swaps in empty ``QuantLinear``
modules of the same shapes (no re-quantization), allocates and loads the saved tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from baichuan_kernels.nn import QuantLinear, backend_for
from baichuan_kernels.quantize import QUANTIZED_MODULE_NAMES, quantize_model

from .config import config_from_dict, config_to_dict
from .model import Baichuan2

__all__ = ["FORMAT", "quantize", "save_quantized_model", "load_quantized_model", "is_quantized_file",
           "quantization_of"]

FORMAT = "minitrain.quantized"
PathLike = Union[str, Path]


def _quant_backend(model: Baichuan2) -> str:
    return backend_for(model.config.backends(), "quant_matmul")


def quantize(model: Baichuan2, bits, group_size: int = 128) -> Baichuan2:
    """Quantize ``model``'s projections in place (on their device) and return it (``bits`` 4, 8 or
    ``"nf4"``)."""
    return quantize_model(model, bits, group_size, backend=_quant_backend(model))


def quantization_of(model: nn.Module) -> Optional[tuple[int, int]]:
    """``(bits, group_size)`` of the model's ``QuantLinear`` modules, or ``None`` when it has none."""
    found = {(m.bits, 128 if m.bits == 8 else m.group_size) for m in model.modules() if isinstance(m, QuantLinear)}
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"mixed quantization settings {sorted(found, key=str)}")
    return found.pop()


def save_quantized_model(model: Baichuan2, file: PathLike) -> None:
    """One safetensors file: the quantized state dict + metadata (format, config, bits, group_size)."""
    from safetensors.torch import save_file

    q = quantization_of(model)
    if q is None:
        raise ValueError("the model has no QuantLinear modules: quantize it first")
    bits, group_size = q
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "config": json.dumps(config_to_dict(model.config)), "bits": str(bits),
            "group_size": str(group_size)}
    save_file(state, str(file), metadata=meta)


def _metadata(file: PathLike) -> Optional[dict[str, str]]:
    path = Path(file)
    if not path.is_file():
        return None
    try:  # the safetensors header: u64 little-endian length, then JSON
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return None
            n = int.from_bytes(head, "little")
            if n > 100_000_000:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def is_quantized_file(path: PathLike) -> bool:
    """Whether ``path`` is a file written by :func:`save_quantized_model`."""
    return _metadata(path) is not None


def load_quantized_model(path: PathLike, *, dtype: Optional[torch.dtype] = None,
                         device: Union[str, torch.device] = "cpu", backend: Optional[str] = None) -> Baichuan2:
    """Rebuild the model saved by :func:`save_quantized_model`. ``dtype`` (default: the saved one)
    applies to the unquantized tensors; the quantized buffers load as saved (scales stay fp32)."""
    from safetensors.torch import load_file

    meta = _metadata(path)
    if meta is None:
        raise ValueError(f"{path} is not a minitrain quantized model file")
    cfg = json.loads(meta["config"])
    if backend is not None:
        cfg = {**cfg, "backend": backend}
    bits = "nf4" if meta["bits"] == "nf4" else int(meta["bits"])
    group_size = int(meta["group_size"])
    with torch.device("meta"):
        model = Baichuan2(config_from_dict(cfg))
    qbackend = _quant_backend(model)
    names = set(QUANTIZED_MODULE_NAMES)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in names and isinstance(child, nn.Linear):
                setattr(parent, child_name, QuantLinear(child.in_features, child.out_features, bits=bits,
                                                        group_size=group_size, backend=qbackend, device="meta"))
    state = load_file(str(path))
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

"""Hugging Face Baichuan 2 checkpoints ↔ :class:`~minitrain.model.Baichuan2` (BAICHUAN2_SPEC.md §1–2).

Our module names are the official ones, so state-dict keys map one to one: ``model.embed_tokens.weight``,
``model.layers.{i}.{input_layernorm,post_attention_layernorm}.weight``,
``model.layers.{i}.self_attn.{W_pack,o_proj}.weight``, ``model.layers.{i}.mlp.{gate_proj,up_proj,down_proj}.weight``,
``model.norm.weight``, ``lm_head.weight`` (NormHead rows stored raw, un-normalised, as released; our
NormHead never rewrites its parameter, so they round-trip bit for bit).

Files: ``model.safetensors`` / ``pytorch_model.bin`` (single) or ``*.index.json`` + shards
(``{"metadata": {"total_size": bytes}, "weight_map": {key: file}}``). ``.bin`` files are read with
``torch.load(weights_only=True, mmap=True)``.

config.json → position encoding (RoPE for 7B, ALiBi for 13B): decided from evidence, never guessed, by
:mod:`minitrain.hf_pos_emb` — our ``"pos_emb"`` field (we always write it), the directory's own
``modeling_baichuan.py`` (parsed, not run), a ``rotary_emb.inv_freq`` key in the state dict, the released
shapes (4096/32 layers = 7B, 5120/40 = 13B). Conflicting or absent evidence raises
:class:`~minitrain.hf_pos_emb.PositionEncodingError`; ``pos_emb=`` (CLI ``--pos-emb``) overrides.
``max_position_embeddings`` decides nothing. ``rotary_emb.inv_freq`` keys are checked against our RoPE
frequencies and not loaded (we compute them). ``"norm_head"`` defaults to true (every Baichuan 2
checkpoint). Our checkpoints written by :func:`save_hf_checkpoint` keep the official fields, so the
original ``modeling_baichuan.py`` files can load them.

Our own single-file format (``save_checkpoint`` / ``load_model``): ``torch.save({"format":
"minitrain.model", "config": config_to_dict(config), "model": state_dict})``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch

from .config import Baichuan2Config, config_from_dict, config_to_dict
from .hf_pos_emb import ROTARY_KEY_SUFFIX, PositionEncodingError, decide_pos_emb
from .model import Baichuan2

__all__ = ["config_from_hf", "config_to_hf", "load_hf_checkpoint", "save_hf_checkpoint", "read_hf_state_dict",
           "save_checkpoint", "load_model", "check_pos_emb_matches", "CheckpointMismatchError",
           "PositionEncodingError"]

PathLike = Union[str, os.PathLike]
SAFE_INDEX, SAFE_FILE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_FILE = "pytorch_model.bin.index.json", "pytorch_model.bin"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the model (one error listing every difference)."""


# ------------------------------------------------------------------------------------------ config
def config_from_hf(d: dict[str, Any], *, pos_emb: Optional[str] = None, directory: Optional[PathLike] = None,
                   state_dict_keys: Optional[Iterable[str]] = None, **overrides: Any) -> Baichuan2Config:
    """Our config from a Baichuan 2 ``config.json`` dict (``overrides``: e.g. ``backend="cpu"``).

    The position encoding comes from evidence (:func:`minitrain.hf_pos_emb.decide_pos_emb`): ``d``'s
    ``pos_emb`` field and released shapes, plus ``directory``'s modeling file and ``state_dict_keys``'
    rotary buffers when given. ``pos_emb`` ("rope" | "alibi") overrides all of it. Raises
    :class:`PositionEncodingError` on conflicting or no evidence."""
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"config.json lacks the Baichuan 2 fields {missing}")
    if d.get("tie_word_embeddings", False):
        raise ValueError("config.json has tie_word_embeddings=true; Baichuan 2 has an untied lm_head")
    kv_heads = d.get("num_key_value_heads", d["num_attention_heads"])
    if kv_heads != d["num_attention_heads"]:
        raise ValueError(f"num_key_value_heads={kv_heads}: Baichuan 2 is multi-head (no GQA)")
    where = "config.json" if directory is None else str(Path(directory))
    pos_emb = decide_pos_emb(d, override=pos_emb, directory=None if directory is None else Path(directory),
                             state_dict_keys=state_dict_keys, where=where)
    max_len = d.get("model_max_length", d.get("max_position_embeddings", 4096))
    fields = dict(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"], pos_emb=pos_emb,
        norm_head=bool(d.get("norm_head", True)), z_loss_weight=float(d.get("z_loss_weight", 0.0) or 0.0),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=float(d.get("rope_theta", 10000.0)),
        max_position_embeddings=int(d.get("max_position_embeddings", max_len)), seq_len=int(max_len),
        initializer_range=float(d.get("initializer_range", 0.02)),
        pad_token_id=d.get("pad_token_id", 0), bos_token_id=d.get("bos_token_id", 1), eos_token_id=d.get("eos_token_id", 2),
    )
    fields.update(overrides)
    return Baichuan2Config(**fields)


def config_to_hf(config: Baichuan2Config, dtype: Optional[torch.dtype] = None) -> dict[str, Any]:
    """A Baichuan 2 ``config.json`` dict (the official fields plus our explicit ``pos_emb``/``norm_head``)."""
    d: dict[str, Any] = {
        "architectures": ["BaichuanForCausalLM"], "model_type": "baichuan",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "hidden_act": "silu", "model_max_length": config.seq_len,
        "rms_norm_eps": config.rms_norm_eps, "initializer_range": config.initializer_range,
        "pad_token_id": config.pad_token_id, "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id, "tie_word_embeddings": False, "use_cache": True,
        "z_loss_weight": config.z_loss_weight, "pos_emb": config.pos_emb, "norm_head": config.norm_head,
    }
    if config.pos_emb == "rope":  # the 7B layout: its presence is what marks RoPE in released files
        d["max_position_embeddings"] = config.max_position_embeddings
        if config.rope_theta != 10000.0:
            d["rope_theta"] = config.rope_theta
    if dtype is not None:
        d["torch_dtype"] = str(dtype).removeprefix("torch.")
    return d


# ------------------------------------------------------------------------------------------- files
def _shard_files(path: Path) -> tuple[list[Path], Optional[dict[str, str]]]:
    """The weight files of an HF directory and the index's weight_map (None for a single file)."""
    for index_name, single in ((SAFE_INDEX, SAFE_FILE), (BIN_INDEX, BIN_FILE)):
        if (path / index_name).is_file():
            weight_map = json.loads((path / index_name).read_text())["weight_map"]
            return [path / f for f in sorted(set(weight_map.values()))], weight_map
        if (path / single).is_file():
            return [path / single], None
    raise FileNotFoundError(f"{path} holds none of {SAFE_INDEX}, {SAFE_FILE}, {BIN_INDEX}, {BIN_FILE}")


def _open_file(file: Path) -> dict[str, Any]:
    """key → tensor-like (a lazy safetensors slice or an mmap'd tensor)."""
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint shard {file} (listed in the index) does not exist")
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        handle = safe_open(str(file), framework="pt", device="cpu")
        return {k: _LazySafe(handle, k) for k in handle.keys()}
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) pickle format cannot be mmap'd
        return torch.load(file, map_location="cpu", weights_only=True)


class _LazySafe:
    def __init__(self, handle, key):
        self.handle, self.key = handle, key
        self.shape = tuple(handle.get_slice(key).get_shape())

    def load(self) -> torch.Tensor:
        return self.handle.get_tensor(self.key)


def _load(t) -> torch.Tensor:
    return t.load() if isinstance(t, _LazySafe) else t


def read_hf_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory (all shards), loaded into memory."""
    files, _ = _shard_files(Path(path))
    return {k: _load(t) for f in files for k, t in _open_file(f).items()}


def _check_keys(found: dict[str, tuple], expected: dict[str, tuple], where: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [f"{k}: checkpoint {found[k]} vs model {expected[k]}"
                 for k in sorted(set(found) & set(expected)) if tuple(found[k]) != tuple(expected[k])]
    if missing or unexpected or misshaped:
        def block(title, items):
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            return f"\n  {title} ({len(items)}):" + "".join(f"\n    {x}" for x in shown) if items else ""
        raise CheckpointMismatchError(
            f"checkpoint {where} does not match the Baichuan 2 model:"
            + block("missing keys", missing) + block("unexpected keys", unexpected)
            + block("mis-shaped keys", misshaped))


def _drop_rotary_buffers(shards: dict[Path, dict[str, Any]], config: Baichuan2Config, where: str) -> None:
    """Remove ``*.rotary_emb.inv_freq`` keys (some exporters store them; we compute the frequencies) from a
    RoPE checkpoint after checking each equals ours (``rope_theta``, head_dim). ALiBi: left for _check_keys."""
    if config.pos_emb != "rope":
        return
    dh = config.head_dim
    ours = 1.0 / config.rope_theta ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh)  # [Dh/2]
    for shard in shards.values():
        for key in [k for k in shard if k.endswith(ROTARY_KEY_SUFFIX)]:
            t = _load(shard.pop(key))
            eps = max(torch.finfo(t.dtype).eps, torch.finfo(torch.float32).eps) if t.is_floating_point() else 0.0
            if tuple(t.shape) != tuple(ours.shape) or not torch.allclose(t.double(), ours, rtol=4 * eps, atol=0.0):
                raise CheckpointMismatchError(
                    f"checkpoint {where}: {key} {tuple(t.shape)} is not the RoPE frequency table of head_dim {dh} "
                    f"and rope_theta {config.rope_theta:g} (the config's)")


def load_hf_checkpoint(path: PathLike, *, config: Optional[Baichuan2Config] = None,
                       dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu",
                       backend: Optional[str] = None, pos_emb: Optional[str] = None) -> Baichuan2:
    """Load an HF Baichuan 2 directory. ``config`` (default: from config.json) and ``backend``
    (overrides config's) choose the model; ``dtype`` defaults to the checkpoint's dtype. Every key and
    shape is checked before any weight is copied; the model is filled one shard at a time.

    Position encoding: from the evidence in the directory (config.json, modeling_baichuan.py, the
    state-dict keys, released shapes; see :mod:`minitrain.hf_pos_emb`), logged with its source; conflicting
    or no evidence raises :class:`PositionEncodingError`. ``pos_emb`` ("rope" | "alibi") overrides the
    evidence, as does an explicit ``config`` (its ``pos_emb``; both given must agree); a warning is logged
    for each piece of evidence the override contradicts."""
    path = Path(path)
    if config is not None and pos_emb is not None and pos_emb != config.pos_emb:
        raise PositionEncodingError(f"pos_emb={pos_emb!r} contradicts the given config's pos_emb={config.pos_emb!r}")
    files, weight_map = _shard_files(path)
    shards = {f: _open_file(f) for f in files}  # safetensors: headers only; .bin: mmap'd
    found = {k: tuple(t.shape) for s in shards.values() for k, t in s.items()}
    if weight_map is not None:
        not_in_files = sorted(set(weight_map) - set(found))
        if not_in_files:
            raise CheckpointMismatchError(f"{path}: the index lists keys its shards lack: {not_in_files[:20]}")
    if config is None or (path / "config.json").is_file():
        hf = json.loads((path / "config.json").read_text())
    else:
        hf = {}  # an explicit config needs no config.json
    if config is None:
        config = config_from_hf(hf, pos_emb=pos_emb, directory=path, state_dict_keys=found)
    else:  # explicit config: its pos_emb is the override (still logged, and checked against the evidence)
        decide_pos_emb(hf, override=config.pos_emb, override_source="config= argument", directory=path,
                       state_dict_keys=found, where=str(path))
    if backend is not None:
        config = config_from_dict({**config_to_dict(config), "backend": backend})
    _drop_rotary_buffers(shards, config, str(path))
    found = {k: tuple(t.shape) for s in shards.values() for k, t in s.items()}
    with torch.device("meta"):
        model = Baichuan2(config)
    params = model.state_dict(keep_vars=True)
    _check_keys(found, {k: tuple(v.shape) for k, v in params.items()}, str(path))
    if dtype is None:
        dtype = _load(next(t for s in shards.values() for t in s.values())).dtype
    model.materialize(device, dtype, init=False)
    params = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for shard in shards.values():
            for key, t in shard.items():
                params[key].copy_(_load(t))
    return model


def save_hf_checkpoint(model: Baichuan2, path: PathLike, *, safetensors: bool = True,
                       max_shard_size: Optional[int] = None) -> None:
    """Write ``config.json`` and the weights (official keys, tensors as they are) to directory ``path``.
    ``max_shard_size`` (bytes) splits them into shards with an index json, as released checkpoints."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    dtype = state["lm_head.weight"].dtype
    (path / "config.json").write_text(json.dumps(config_to_hf(model.config, dtype), indent=2) + "\n")
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if max_shard_size is not None and groups[-1] and size + nbytes > max_shard_size:
            groups.append({})
            size = 0
        groups[-1][k] = v
        size += nbytes
    stem, ext = ("model", "safetensors") if safetensors else ("pytorch_model", "bin")
    names = ([f"{stem}.{ext}"] if len(groups) == 1 else
             [f"{stem}-{i + 1:05d}-of-{len(groups):05d}.{ext}" for i in range(len(groups))])
    for name, group in zip(names, groups):
        if safetensors:
            from safetensors.torch import save_file

            save_file(group, str(path / name), metadata={"format": "pt"})
        else:
            torch.save(group, path / name)
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                 "weight_map": {k: name for name, g in zip(names, groups) for k in g}}
        (path / (SAFE_INDEX if safetensors else BIN_INDEX)).write_text(json.dumps(index, indent=2) + "\n")


# --------------------------------------------------------------------------------- our own format
def save_checkpoint(model: Baichuan2, file: PathLike) -> None:
    """Our single-file format: config + state_dict in one ``torch.save``."""
    torch.save({"format": "minitrain.model", "config": config_to_dict(model.config),
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, file)


def check_pos_emb_matches(pos_emb: Optional[str], config: Baichuan2Config, path: PathLike) -> None:
    """A ``pos_emb`` override given for a file that states its own config must agree with it."""
    if pos_emb is not None and pos_emb != config.pos_emb:
        raise PositionEncodingError(f"{path} is a minitrain file whose config says pos_emb={config.pos_emb!r}; "
                         f"pos_emb={pos_emb!r} (--pos-emb) can only override what an HF directory's evidence says")


def load_model(path: PathLike, *, dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu",
               backend: Optional[str] = None, pos_emb: Optional[str] = None) -> Baichuan2:
    """An HF directory (see :func:`load_hf_checkpoint`; ``pos_emb`` overrides its position-encoding
    evidence) or a file written by :func:`save_checkpoint` (its config is explicit; ``pos_emb``, if given,
    must agree with it)."""
    path = Path(path)
    if path.is_dir():
        return load_hf_checkpoint(path, dtype=dtype, device=device, backend=backend, pos_emb=pos_emb)
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != "minitrain.model":
        raise ValueError(f"{path} is neither an HF Baichuan 2 directory nor a minitrain model file")
    check_pos_emb_matches(pos_emb, config_from_dict(blob["config"]), path)
    cfg = blob["config"] if backend is None else {**blob["config"], "backend": backend}
    with torch.device("meta"):
        model = Baichuan2(config_from_dict(cfg))
    params = model.state_dict(keep_vars=True)
    state = blob["model"]
    _check_keys({k: tuple(v.shape) for k, v in state.items()}, {k: tuple(v.shape) for k, v in params.items()}, str(path))
    model.materialize(device, dtype or state["lm_head.weight"].dtype, init=False)
    model.load_state_dict(state)
    return model

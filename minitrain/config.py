"""Model configurations (BAICHUAN2_SPEC.md §1). Frozen dataclasses; ``dataclasses.replace`` makes variants.

Architecture choices are explicit fields, never inferred from sizes: ``pos_emb`` ("rope" for 7B,
"alibi" for 13B), ``norm_head`` (NormHead vs a plain linear head), ``z_loss_weight`` (max-z loss;
2e-4 reproduces pre-training, the released configs have 0). ``backend`` picks the kernels of every
op ("auto" | "cuda" | "triton" | "cpu" | "reference"); ``backend_overrides`` pins single ops, e.g.
``(("attention", "reference"),)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Union

__all__ = ["Baichuan2Config", "PRESETS", "get_config", "config_to_dict", "config_from_dict"]

_BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")


@dataclass(frozen=True)
class Baichuan2Config:
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F (SwiGLU width)
    num_layers: int
    num_heads: int  # MHA: as many K/V heads as Q heads
    pos_emb: str  # "rope" (7B) | "alibi" (13B)
    norm_head: bool = True
    z_loss_weight: float = 0.0
    backend: str = "auto"
    backend_overrides: tuple[tuple[str, str], ...] = ()
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096  # RoPE table rows built up front (grown on demand past it)
    seq_len: int = 4096  # training sequence length
    initializer_range: float = 0.02
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "max_position_embeddings", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.pos_emb not in ("rope", "alibi"):
            raise ValueError(f"pos_emb must be 'rope' or 'alibi', got {self.pos_emb!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.pos_emb == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if not isinstance(self.norm_head, bool):
            raise TypeError(f"norm_head must be a bool, got {type(self.norm_head).__name__}")
        if not (self.z_loss_weight >= 0 and math.isfinite(self.z_loss_weight)):
            raise ValueError(f"z_loss_weight must be finite and >= 0, got {self.z_loss_weight}")
        if not (self.rms_norm_eps > 0):
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        object.__setattr__(self, "backend_overrides", tuple(tuple(p) for p in self.backend_overrides))
        for backend in (self.backend, *(b for _, b in self.backend_overrides)):
            if backend not in _BACKENDS:
                raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def backends(self) -> Union[str, dict[str, str]]:
        """What the modules take as ``backend=``: one name, or a per-op mapping with a default."""
        if not self.backend_overrides:
            return self.backend
        return {"default": self.backend, **dict(self.backend_overrides)}


PRESETS: dict[str, Baichuan2Config] = {
    "7b": Baichuan2Config(vocab_size=125_696, hidden_size=4096, intermediate_size=11_008, num_layers=32,
                          num_heads=32, pos_emb="rope"),
    "13b": Baichuan2Config(vocab_size=125_696, hidden_size=5120, intermediate_size=13_696, num_layers=40,
                           num_heads=40, pos_emb="alibi"),
    # Small models that train on a 2-core CPU in minutes (head_dim 64; FFN = 8/3·D rounded up to a
    # multiple of 128, Baichuan's rule, which also keeps every width divisible by the int4 group sizes).
    "tiny-rope": Baichuan2Config(vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4,
                                 num_heads=4, pos_emb="rope", max_position_embeddings=256, seq_len=256),
    "tiny-alibi": Baichuan2Config(vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4,
                                  num_heads=4, pos_emb="alibi", max_position_embeddings=256, seq_len=256),
}


def get_config(name: str, **overrides: Any) -> Baichuan2Config:
    try:
        config = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
    return dataclasses.replace(config, **overrides) if overrides else config


def config_to_dict(config: Baichuan2Config) -> dict[str, Any]:
    d = dataclasses.asdict(config)
    d["backend_overrides"] = [list(p) for p in config.backend_overrides]
    return d


def config_from_dict(d: dict[str, Any]) -> Baichuan2Config:
    known = {f.name for f in dataclasses.fields(Baichuan2Config)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown Baichuan2Config fields: {unknown}")
    return Baichuan2Config(**d)

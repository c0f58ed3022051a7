"""Training settings: one frozen dataclass, :class:`TrainConfig`; every field is a ``train`` flag.

Precedence: the dataclass defaults < a config file (``--config FILE``: TOML, or YAML when PyYAML is
installed; keys are the field names, ``-`` or ``_``) < command-line flags. ``--max-steps 50`` sets
``max_steps``; a bool field ``x`` has ``--x`` / ``--no-x``.

Recipe defaults (BAICHUAN2_SPEC.md §11): AdamW β (0.9, 0.95), weight decay 0.1 on every matrix
(none on the RMSNorm weights; the embedding and the NormHead are decayed like any matrix, since the
report exempts only norms — ``decay_embeddings=False`` changes that), grad-norm clip 0.5, max-z
loss 2e-4, linear warm-up then cosine decay to ``min_lr_ratio`` × peak. The warm-up is 2,000 steps,
scaled for short runs: ``min(2000, max(1, max_steps // 10))`` unless ``warmup_steps`` is set. Peak LR
``lr`` defaults per preset: 2e-4 (7b), 1.5e-4 (13b), 3e-3 (tiny presets, which train for minutes).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, fields
from typing import Any, Optional

__all__ = ["TrainConfig", "add_arguments", "config_from_args", "load_config_file", "PEAK_LR"]

PEAK_LR = {"7b": 2e-4, "13b": 1.5e-4}
_TINY_LR = 3e-3


@dataclass(frozen=True)
class TrainConfig:
    # --- model
    preset: str = "tiny-rope"  # a minitrain.config.PRESETS name
    seq_len: Optional[int] = 128  # tokens per training sequence (None: the preset's seq_len)
    layers: Optional[int] = None  # decoder layers (None: the preset's; fewer for quick experiments)
    backend: str = "auto"  # kernel backend of every op
    z_loss_weight: float = 2e-4
    # --- data
    data: Optional[str] = None  # directory with manifest.json (token shards); None: build from --corpus
    corpus: str = "stdlib"  # "stdlib" (the running Python's Lib/*.py, no tests) or a text file / directory
    corpus_max_bytes: int = 3_000_000  # cap on the embedded corpus (speed)
    tokenizer: Optional[str] = None  # a SentencePiece .model (e.g. the official one); None: train one
    vocab_size: int = 4096  # of the trained tokenizer (the model's vocab follows the tokenizer)
    shard_tokens: int = 1 << 24  # tokens per shard file
    document_masking: bool = True  # segment ids → varlen attention; False: plain causal rows
    # --- optimisation
    max_steps: int = 500
    batch_size: int = 16  # sequences per optimizer step (global, over accumulation and ranks)
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: Optional[float] = None  # peak LR (None: PEAK_LR by preset)
    min_lr_ratio: float = 0.1
    warmup_steps: Optional[int] = None  # None: min(2000, max(1, max_steps // 10))
    weight_decay: float = 0.1
    decay_embeddings: bool = True
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 0.5
    seed: int = 0
    # --- execution
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # autocast dtype: auto = bf16 on GPU, fp32 on CPU; master weights stay fp32
    activation_checkpointing: str = "none"  # none | full | selective (every ac_every-th layer) | op (policy)
    ac_every: int = 2
    compile: bool = False  # torch.compile each decoder layer
    num_threads: Optional[int] = None  # torch CPU threads (None: torch's default; 1 is faster on a busy machine)
    # --- fault tolerance (minitrain/guard.py)
    on_nonfinite: str = "stop"  # skip | stop: policy for a step whose loss/grad norm is NaN/inf or whose loss spikes
    loss_spike_factor: float = 0.0  # > 0: a loss above this × the running mean is a bad step too (0: off)
    loss_spike_window: int = 50  # accepted steps in that running mean
    # --- output
    out: str = "runs/minitrain"
    resume: bool = False  # continue from OUT/checkpoints/latest
    overwrite: bool = False  # start afresh in an OUT that already holds a run (else: an error)
    save_every: int = 100  # checkpoint every N steps (and at the end); 0: only at the end
    keep_checkpoints: int = 2
    export_hf: bool = True  # consolidated safetensors (HF layout) under OUT/hf at the end
    log_every: int = 10
    eval_every: int = 100  # validation CE every N steps (0: only at the end)
    eval_batches: int = 8
    progress: bool = True
    tensorboard: bool = True  # when tensorboard is installed
    plot: bool = True  # OUT/loss.png
    sample_tokens: int = 120  # sample generation at the end (0: none)
    sample_prompt: str = "def "

    def __post_init__(self):
        from .config import PRESETS

        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; known: {sorted(PRESETS)}")
        for name in ("max_steps", "batch_size", "grad_accum", "vocab_size", "shard_tokens", "keep_checkpoints",
                     "log_every", "eval_batches", "ac_every", "corpus_max_bytes", "loss_spike_window"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("save_every", "eval_every", "sample_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.layers is not None and self.layers < 1:
            raise ValueError(f"layers must be >= 1, got {self.layers}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        if self.activation_checkpointing not in ("none", "full", "selective", "op"):
            raise ValueError(f"activation_checkpointing must be none|full|selective|op, got {self.activation_checkpointing!r}")
        if self.on_nonfinite not in ("skip", "stop"):
            raise ValueError(f"on_nonfinite must be skip|stop, got {self.on_nonfinite!r}")
        if not (self.loss_spike_factor == 0 or self.loss_spike_factor >= 1) or math.isnan(self.loss_spike_factor):
            raise ValueError(f"loss_spike_factor must be 0 (off) or >= 1, got {self.loss_spike_factor!r}")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"dtype must be auto|fp32|bf16|fp16, got {self.dtype!r}")
        if self.corpus != "stdlib" and self.data is None and not os.path.exists(self.corpus):
            raise FileNotFoundError(f"--corpus {self.corpus!r}: neither 'stdlib' nor an existing file or directory")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.data is not None and not os.path.isfile(os.path.join(self.data, "manifest.json")):
            raise FileNotFoundError(f"--data {self.data!r}: no manifest.json there (build one with minitrain.data)")
        if self.tokenizer is not None and not os.path.isfile(self.tokenizer):
            raise FileNotFoundError(f"--tokenizer {self.tokenizer!r}: no such file")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else PEAK_LR.get(self.preset, _TINY_LR)

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(2000, max(1, self.max_steps // 10))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------- CLI
def _field_type(f) -> type:
    t = typing.get_type_hints(TrainConfig)[f.name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return args[0] if args else t


_HELP = {
    "data": "directory with manifest.json and token shards; every shard's size and sha256 are checked against "
            "the manifest when the run opens it (a clear error naming a truncated or corrupted shard)",
    "on_nonfinite": "skip|stop: what to do with a bad step (loss or gradient norm NaN/inf, or a loss spike): skip = no "
                    "optimizer update (parameters and optimizer state unchanged; the batch is consumed; counted "
                    "as skipped_steps and logged with \"skipped\": true in metrics.jsonl); stop = update and save "
                    "nothing, exit with status 3 and the reason (the last checkpoint stays intact)",
    "loss_spike_factor": "a loss above this factor × the mean loss of the last --loss-spike-window accepted steps "
                         "is a bad step (handled by --on-nonfinite); 0 turns spike detection off",
    "loss_spike_window": "accepted steps in the running mean of --loss-spike-factor",
    "resume": "continue from OUT/checkpoints/latest, bit-exactly (model, optimizer, RNG, data position, "
              "metrics); a checkpoint that fails its size/sha256 check is refused with an error naming the "
              "file and the newest complete checkpoint to fall back to",
    "save_every": "checkpoint every N steps (and at the end); 0: only at the end. Writes are atomic: a crash "
                  "at any moment (kill -9 included) leaves OUT/checkpoints/latest naming a complete checkpoint",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per field (default None: 'not given', so a config file's value survives)."""
    p.add_argument("--config", help="TOML (or YAML) file of TrainConfig fields; flags override it")
    for f in fields(TrainConfig):
        flag, t = "--" + f.name.replace("_", "-"), _field_type(f)
        default = f.default
        text = (_HELP[f.name] + " " if f.name in _HELP else "") + f"(default {default})"
        if t is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            p.add_argument(flag, dest=f.name, type=t, default=None, help=text)


def load_config_file(path: str) -> dict[str, Any]:
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: YAML config files need PyYAML (or use TOML)") from None
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    else:
        import tomllib

        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of TrainConfig fields")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown TrainConfig fields {unknown}; known: {sorted(known)}")
    return data


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = load_config_file(args.config) if getattr(args, "config", None) else {}
    for f in fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return TrainConfig(**values)

"""Crash-safe training checkpoints (torch.distributed.checkpoint, sharded) and the consolidated export.

Layout under ``OUT/checkpoints``::

    step_000100/          model + optimizer (DCP: one file per rank + .metadata), trainer.json
                          (step, scheduler, data position, configs), rng_rank{r}.pt, checksums.json
    latest                the name of the newest complete step directory (one line)

Atomicity: every rank writes into ``step_N.tmp``; after a barrier rank 0 writes the checksums, fsyncs
every file and the directory, renames it to ``step_N`` and then replaces ``latest`` (written to a
temporary file, fsynced, ``os.replace``d). A crash at any moment (kill -9 included) leaves ``latest``
naming a complete checkpoint; leftover ``*.tmp`` directories are removed by the next save. At load the
sha256 of every file is checked against checksums.json (a clear error on corruption).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .distributed import barrier, world

__all__ = ["CheckpointError", "save", "load", "verify", "latest_checkpoint", "gather_full_model", "save_consolidated"]


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupted."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def latest_checkpoint(root) -> Optional[Path]:
    """The directory that ``root/latest`` names, or None when there is none yet."""
    root = Path(root)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist")
    return path


def save(root, step: int, model, optimizer, trainer_state: dict, keep: int = 2) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank, n = world()
    root = Path(root)
    final, tmp = root / f"step_{step:06d}", root / f"step_{step:06d}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp"):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        tmp.mkdir()
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    barrier()
    if rank == 0:
        (tmp / "trainer.json").write_text(json.dumps({**trainer_state, "step": step, "world_size": n}, indent=1))
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        sums = {}
        for p in files:
            with open(p, "rb+") as fh:
                os.fsync(fh.fileno())
            sums[p.name] = _sha256(p)
        _write_atomic(tmp / "checksums.json", json.dumps(sums, indent=1))
        if final.exists():  # a re-save of the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_atomic(root / "latest", final.name + "\n")
        steps = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in steps[:-keep]:
            if old != final:
                shutil.rmtree(old)
    barrier()
    return final


def verify(path: Path) -> dict:
    sums_file = path / "checksums.json"
    if not sums_file.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: no checksums.json")
    try:
        sums = json.loads(sums_file.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {path} is corrupted: checksums.json does not parse") from None
    for name, digest in sums.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} fails its sha256 check")
    return json.loads((path / "trainer.json").read_text())


def load(path, model, optimizer) -> dict:
    """Collective: restore model, optimizer and this rank's RNG; returns trainer.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    state = verify(path)
    rank, n = world()
    if state["world_size"] != n:
        raise CheckpointError(f"checkpoint {path} was written by {state['world_size']} ranks, this run has {n} "
                              "(the data order and RNG streams are per rank: resume with the same world size)")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process")
        dcp.load(sd, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    _set_rng_state(torch.load(path / f"rng_rank{rank}.pt", weights_only=False))
    return state


def gather_full_model(model, config):
    """Collective: the full fp32 weights in a fresh, plain (unsharded, unwrapped) model on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from .model import Baichuan2

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    plain = None
    if world()[0] == 0:
        with torch.device("meta"):
            plain = Baichuan2(config)
        plain.materialize("cpu", torch.float32, init=False)
        plain.load_state_dict(full)
    barrier()
    return plain


def save_consolidated(plain_model, out_dir, tokenizer: Optional[Path] = None) -> Path:
    """HF layout (config.json + model.safetensors, + tokenizer.model), written to a temporary name first."""
    from .hf import save_hf_checkpoint

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf_checkpoint(plain_model, tmp)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, tmp / "tokenizer.model")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out

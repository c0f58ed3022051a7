"""Crash-safe training checkpoints (torch.distributed.checkpoint, sharded) and the consolidated export.

Layout under ``OUT/checkpoints``::

    step_000100/          model + optimizer (DCP: one file per rank + .metadata), trainer.json
                          (step, scheduler, data position, configs), rng_rank{r}.pt, checksums.json
    latest                the name of the newest complete step directory (one line)

Atomicity: every rank writes into ``step_N.tmp``; after a barrier rank 0 writes the checksums, fsyncs
every file and the directory, renames it to ``step_N`` and then replaces ``latest`` (written to a
temporary file, fsynced, ``os.replace``d). A crash at any moment (kill -9 included) leaves ``latest``
naming a complete checkpoint; leftover ``*.tmp`` directories are removed by the next save (and a
complete ``step_N`` that ``latest`` does not name yet is replaced when step N is saved again).
tests/test_faults.py kills runs at seeded-random phases of a save (SAVE_PHASES, also with a torn file)
and during steps, and resumes them bit-exactly.

checksums.json: ``{"format": 2, "files": {name: {"bytes": size, "sha256": hex}}, "sha256": hex of the
files table}`` (the last guards checksums.json itself). At load every file's size, then sha256, is
checked: a truncated or corrupted file is a :class:`CheckpointError` naming the file and the mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .distributed import barrier, world

__all__ = ["CheckpointError", "save", "load", "load_latest", "verify", "latest_checkpoint", "complete_checkpoints",
           "gather_full_model",
           "save_consolidated", "SAVE_PHASES"]

# the moments of a save, in order, at which ``save(..., hook=)`` is called (fault-injection tests)
SAVE_PHASES = ("tmpdir", "dcp", "rng", "trainer", "checksums", "renamed", "latest")


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


def _files_digest(files: dict) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def save(root, step: int, model, optimizer, trainer_state: dict, keep: int = 2,
         hook: Optional[Callable[[str, Path], None]] = None) -> Path:
    """Collective: every rank calls it. Returns the final directory. ``hook(f"save:{step}:{phase}", tmp_dir)``
    is called at each of SAVE_PHASES (rank 0 only for the phases after "rng")."""
    hook = hook or (lambda _name, _dir: None)
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
    hook(f"save:{step}:tmpdir", tmp)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    hook(f"save:{step}:dcp", tmp)
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    hook(f"save:{step}:rng", tmp)
    barrier()
    if rank == 0:
        (tmp / "trainer.json").write_text(json.dumps({**trainer_state, "step": step, "world_size": n}, indent=1))
        hook(f"save:{step}:trainer", tmp)
        files = {}
        for p in sorted(p for p in tmp.iterdir() if p.is_file()):
            with open(p, "rb+") as fh:
                os.fsync(fh.fileno())
            files[p.name] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        sums = {"format": 2, "files": files, "sha256": _files_digest(files)}
        _write_atomic(tmp / "checksums.json", json.dumps(sums, indent=1))
        hook(f"save:{step}:checksums", tmp)
        if final.exists():  # a re-save of the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        hook(f"save:{step}:renamed", final)
        _write_atomic(root / "latest", final.name + "\n")
        hook(f"save:{step}:latest", final)
        steps = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in steps[:-keep]:
            if old != final:
                shutil.rmtree(old)
    barrier()
    return final


def verify(path: Path) -> dict:
    """Check every file of a checkpoint against checksums.json (size, then sha256); returns trainer.json.
    Raises :class:`CheckpointError` naming the first file that is missing, truncated or corrupted."""
    path = Path(path)
    sums_file = path / "checksums.json"
    if not sums_file.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: no checksums.json")
    try:
        sums = json.loads(sums_file.read_text())
        if "format" not in sums:  # format 1: {name: sha256}
            sums = {"files": {k: {"sha256": v} for k, v in sums.items()}}
        files = sums["files"]
        ok = "sha256" not in sums or sums["sha256"] == _files_digest(files)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise CheckpointError(f"checkpoint {path} is corrupted: {sums_file} fails its own checksum "
                              "(checksum mismatch)")
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {f} is missing")
        size = f.stat().st_size
        if "bytes" in want and size != want["bytes"]:
            raise CheckpointError(f"checkpoint {path} is corrupted: {f} has {size} bytes, checksums.json says "
                                  f"{want['bytes']} (size mismatch: truncated or overwritten)")
        if _sha256(f) != want["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupted: {f} fails its sha256 check (checksum mismatch)")
    return json.loads((path / "trainer.json").read_text())


def complete_checkpoints(root) -> list[Path]:
    """The ``step_N`` directories under ``root`` that pass :func:`verify`, newest first."""
    out = []
    for p in sorted(Path(root).glob("step_*"), reverse=True):
        if p.is_dir() and not p.name.endswith(".tmp"):
            try:
                verify(p)
            except (CheckpointError, OSError, ValueError):
                continue
            out.append(p)
    return out


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


def load_latest(root, model, optimizer) -> tuple[Optional[Path], Optional[dict]]:
    """Collective: :func:`load` of the checkpoint ``root/latest`` names -> (its path, trainer.json), or
    (None, None) when there is none yet. A broken one is refused (no silent fall-back to an older
    checkpoint, which would discard steps unnoticed): the error names the bad file and the newest
    complete checkpoint, to which ``latest`` can be pointed by hand."""
    root = Path(root)
    try:
        latest = latest_checkpoint(root)
        return latest, None if latest is None else load(latest, model, optimizer)
    except CheckpointError as exc:
        ok = complete_checkpoints(root)
        hint = (f"the newest complete checkpoint is {ok[0].name}: to resume from it, write {ok[0].name!r} into "
                f"{root / 'latest'}" if ok else "no complete checkpoint is left: start afresh with --overwrite")
        raise CheckpointError(f"--resume refused: {exc}; {hint}") from None


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

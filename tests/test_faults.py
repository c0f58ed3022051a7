"""Trainer fault tolerance (minitrain/faults.py injects the faults, inert unless MINITRAIN_FAULTS is set):

1. kill -9 during training steps and during checkpoint writes, at seeded-random moments (6 trials;
   FAULT_TRIALS_PER_KIND=k draws k times as many, for a longer soak): the run
   freezes itself at the chosen point (SIGSTOP, seen by waitpid: no timing involved) and is SIGKILLed
   there; `latest` names the last complete checkpoint, which verifies and resumes to a final state
   (parameters, optimizer, RNG, data position, trainer state, metrics) identical to an uninterrupted run.
2. truncated / bit-flipped checkpoint files: an error naming the file and the size or checksum
   mismatch. Policy (documented in --help): --resume REFUSES a broken `latest` and names the newest
   complete checkpoint; pointing `latest` at it resumes bit-exactly.
3. truncated / corrupted data shards: an error naming the shard, also on resume.
4. --on-nonfinite skip|stop and --loss-spike-factor, with a NaN loss, an inf gradient and a loss
   spike injected at chosen steps.
"""

import json
import os
import math
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sentencepiece")

from minitrain import checkpoint as ckpt  # noqa: E402
from minitrain.__main__ import main  # noqa: E402
from minitrain.checkpoint import CheckpointError  # noqa: E402
from minitrain.data import DataError, build_dataset, stdlib_documents, train_tokenizer  # noqa: E402
from minitrain.guard import BadStepError  # noqa: E402
from minitrain.train import train  # noqa: E402
from minitrain.train_config import TrainConfig  # noqa: E402
from _runs import cli_flags, read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# 2 layers of the tiny preset (width 256), 2 sequences of 32 tokens a step: ~0.1 s a step on one thread
TINY = dict(device="cpu", seq_len=32, batch_size=2, layers=2, progress=False, tensorboard=False, plot=False,
            sample_tokens=0, export_hf=False, num_threads=1, eval_batches=1)
# the kill/resume runs: checkpoints at 3, 6 and 7 (the end), records at 1, 2, 4, 6, 7: a checkpoint
# between two records, so the metrics accumulators must survive the resume too
RUN = dict(max_steps=7, save_every=3, keep_checkpoints=3, log_every=2, **TINY)
SAVES = (3, 6, 7)
TIMING = {"tokens_per_s", "mfu", "peak_mem_gb"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data")
    docs = stdlib_documents(60_000)
    return str(build_dataset(tmp / "data", docs, train_tokenizer(docs, str(tmp / "tok"), 512)))


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train(TrainConfig(data=data_dir, out=str(out), **RUN))
    return out


# ------------------------------------------------------------------------------------- helpers


def _records(out) -> list[dict]:
    """metrics.jsonl without the timings (NaN made comparable)."""
    nan = lambda v: "NaN" if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
    return [{k: nan(v) for k, v in r.items() if k not in TIMING} for r in read_metrics(out)]


def _equal(a, b) -> bool:
    """Exact, recursive equality of checkpoint contents (tensors bit for bit, dtypes included)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _dcp(path: Path) -> dict:
    """{"model": ..., "optim": ...} of a checkpoint directory, read into plain tensors."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    f = path.parent / (path.name + ".pt")
    dcp_to_torch_save(str(path), str(f))
    try:
        return torch.load(f, weights_only=False)
    finally:
        f.unlink()


def _trainer_state(path: Path) -> dict:
    state = json.loads((path / "trainer.json").read_text())
    for k in ("out", "resume", "on_nonfinite", "loss_spike_factor"):  # how the run was started, not its state
        state["train_config"].pop(k)
    return state


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    assert _equal(_dcp(a), _dcp(b)), f"model/optimizer differ: {a} vs {b}"
    assert _equal(torch.load(a / "rng_rank0.pt", weights_only=False), torch.load(b / "rng_rank0.pt", weights_only=False))
    assert _trainer_state(a) == _trainer_state(b)


def _assert_same_run(ref: Path, out: Path, step: int) -> None:
    """Metrics (all but timings) and the checkpoint of ``step`` identical."""
    assert _records(out) == _records(ref)
    name = f"step_{step:06d}"
    assert (out / "checkpoints" / "latest").read_text().strip() == name
    _assert_same_checkpoint(ref / "checkpoints" / name, out / "checkpoints" / name)


def _snapshot(root: Path) -> dict:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------- 1. kill -9 and resume
def _trials(n_per_kind: int = int(os.environ.get("FAULT_TRIALS_PER_KIND", "1")), seed: int = 2026) -> list[str]:
    """Seeded-random halting points, stratified so every kind of moment is hit: during a step before
    the first checkpoint (metrics of step 1 already written), during a later step, in a checkpoint write
    before its files are complete (plain or with a torn file), once complete but before `latest`
    names it, and after `latest` names it but before pruning."""
    rng = random.Random(seed)
    early = ["step:1:logged"] + [f"step:{k}:{p}" for k in (2, 3) for p in ("backward", "optimizer")] + ["step:2:logged"]
    later = [f"step:{k}:{p}" for k in range(4, 8) for p in ("backward", "optimizer")] + ["step:4:logged", "step:6:logged"]
    writing = [f"save:{n}:{p}" for n in SAVES for p in ("tmpdir", "dcp", "rng", "trainer")] + \
              [f"save:{n}:{p}+torn" for n in SAVES for p in ("dcp", "rng", "trainer")]
    done = [f"save:{n}:{p}" for n in SAVES for p in ("checksums", "renamed")]
    named = [f"save:{n}:latest" for n in SAVES[:-1]]
    kinds = ((early, 1), (later, 1), (writing, 2), (done, 1), (named, 1))
    return [p for kind, n in kinds for p in rng.sample(kind, min(len(kind), n * n_per_kind))]


def _expected_latest(point: str):
    kind, n, phase = point.split(":")
    n = int(n)
    last = n if kind == "save" and phase == "latest" else max([s for s in SAVES if s < n], default=None)
    return None if last is None else f"step_{last:06d}"


def _run_until_halt(point: str, args: list[str], log: Path) -> None:
    """Start a training run that freezes itself at ``point``, then kill -9 it there."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MINITRAIN_FAULTS": json.dumps({"halt": point})}
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "minitrain", "train", *args], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    watchdog = threading.Timer(240, proc.kill)  # only if the run hangs: a halted run stops long before
    watchdog.start()
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)  # returns when the run stops itself (or ends)
    finally:
        watchdog.cancel()
    if not os.WIFSTOPPED(status):
        proc.returncode = status
        pytest.fail(f"the run did not halt at {point} (wait status {status}):\n{log.read_text()[-3000:]}")
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert f"fault injection: halted at {point}" in log.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("point", _trials())
def test_kill9_then_resume_equals_uninterrupted(point, reference, data_dir, tmp_path):
    out = tmp_path / "run"
    args = cli_flags(dict(data=data_dir, out=str(out), **RUN))
    _run_until_halt(point, args, tmp_path / "stderr.txt")

    ck = out / "checkpoints"
    want = _expected_latest(point)
    latest = ckpt.latest_checkpoint(ck)
    assert (latest.name if latest else None) == want, (point, latest)
    if latest is None:  # records of steps no checkpoint holds: the resume must drop them
        assert read_metrics(out)[0]["step"] == 1
    else:
        ckpt.verify(latest)  # the last complete checkpoint is intact
        _assert_same_checkpoint(reference / "checkpoints" / want, latest)

    train(TrainConfig(data=data_dir, out=str(out), resume=True, **RUN))
    _assert_same_run(reference, out, RUN["max_steps"])
    kept = sorted(p.name for p in ck.iterdir())
    assert kept == ["latest"] + [f"step_{s:06d}" for s in SAVES], kept  # no leftover *.tmp


def test_trials_cover_every_kind_of_moment():
    points = _trials(1)
    assert len(points) == 6 and len(set(points)) == 6
    assert [_expected_latest(p) is None for p in points].count(True) >= 1  # killed before any checkpoint
    assert any(p.startswith("save:") and ":latest" not in p for p in points)


# ------------------------------------------------------------------ 2. broken checkpoint files
def _flip(path: Path, at: float = 0.5) -> None:
    raw = bytearray(path.read_bytes())
    raw[int(len(raw) * at)] ^= 0x10
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 7)


def test_verify_names_every_truncated_or_corrupted_file(reference, tmp_path):
    good = reference / "checkpoints" / "step_000007"
    names = sorted(p.name for p in good.iterdir())
    assert names == [".metadata", "__0_0.distcp", "checksums.json", "rng_rank0.pt", "trainer.json"]
    for name in names:
        for damage, what in ((_truncate, "size mismatch"), (_flip, "checksum mismatch")):
            bad = tmp_path / f"{damage.__name__}{name}" / "step_000007"
            shutil.copytree(good, bad)
            damage(bad / name)
            if name == "checksums.json":  # guarded by its own digest (or no longer parses)
                what = "fails its own checksum"
            with pytest.raises(CheckpointError, match=f"{re.escape(str(bad))} is corrupted: "
                                                      f"{re.escape(str(bad / name))} .*{what}"):
                ckpt.verify(bad)
    old = tmp_path / "format1" / "step_000007"  # checkpoints written before sizes were recorded still verify
    shutil.copytree(good, old)
    files = json.loads((good / "checksums.json").read_text())["files"]
    (old / "checksums.json").write_text(json.dumps({k: v["sha256"] for k, v in files.items()}))
    assert ckpt.verify(old)["step"] == 7
    _flip(old / "rng_rank0.pt")
    with pytest.raises(CheckpointError, match="rng_rank0.pt fails its sha256 check"):
        ckpt.verify(old)
    missing = tmp_path / "missing" / "step_000007"
    shutil.copytree(good, missing)
    (missing / "rng_rank0.pt").unlink()
    with pytest.raises(CheckpointError, match="incomplete: .*rng_rank0.pt is missing"):
        ckpt.verify(missing)


@pytest.mark.parametrize("damage", [_truncate, _flip])
def test_resume_refuses_a_broken_latest_and_names_the_fallback(damage, reference, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    f = run / "checkpoints" / "step_000007" / "__0_0.distcp"
    damage(f)
    before = _snapshot(run)
    cfg = dict(data=data_dir, out=str(run), **RUN)
    what = "size mismatch" if damage is _truncate else "checksum mismatch"
    with pytest.raises(CheckpointError, match=f"--resume refused: .*{re.escape(str(f))}.*{what}.*newest complete "
                                              f"checkpoint is step_000006: .*write 'step_000006' into "
                                              f"{re.escape(str(run / 'checkpoints' / 'latest'))}"):
        train(TrainConfig(resume=True, **cfg))
    assert main(["train", *cli_flags(cfg), "--resume"]) == 2  # the CLI: the same message, no traceback
    assert f"error: --resume refused: checkpoint {f.parent} is corrupted: {f}" in capsys.readouterr().err
    assert _snapshot(run) == before  # nothing written

    if damage is _flip:  # the documented fallback: point `latest` at the named checkpoint
        (run / "checkpoints" / "latest").write_text("step_000006\n")
        train(TrainConfig(resume=True, **cfg))
        _assert_same_run(reference, run, 7)


def test_resume_with_no_complete_checkpoint_left_says_so(reference, data_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for s in SAVES:
        _flip(run / "checkpoints" / f"step_{s:06d}" / "trainer.json")
    with pytest.raises(CheckpointError, match="trainer.json fails its sha256 .*no complete checkpoint is left"):
        train(TrainConfig(data=data_dir, out=str(run), resume=True, **RUN))


# ------------------------------------------------------------------------ 3. broken data shards
@pytest.mark.parametrize("damage", [_truncate, _flip])
def test_a_broken_data_shard_is_named(damage, reference, data_dir, tmp_path, capsys):
    broken = tmp_path / "data"
    shutil.copytree(data_dir, broken)
    shard = broken / "train_000.bin"
    damage(shard)
    what = "size mismatch" if damage is _truncate else "checksum mismatch"
    with pytest.raises(DataError, match=f"shard {re.escape(str(shard))} is corrupted: .*{what}"):
        train(TrainConfig(data=str(broken), out=str(tmp_path / "fresh"), **RUN))
    assert not (tmp_path / "fresh").exists()
    run = tmp_path / "run"  # a resume re-checks the shards too
    shutil.copytree(reference, run)
    (run / "checkpoints" / "latest").write_text("step_000003\n")
    before = _snapshot(run)
    assert main(["train", *cli_flags(dict(data=str(broken), out=str(run), **RUN)), "--resume"]) == 2
    assert f"error: shard {shard} is corrupted" in capsys.readouterr().err
    assert _snapshot(run) == before


# ------------------------------------------------------------------- 4. the bad-step policy
POLICY = dict(max_steps=6, save_every=1, keep_checkpoints=6, log_every=1, **TINY)
POISON = {"2": "nan", "3": "inf_grad", "5": "spike"}  # steps 2, 3 and 5 are bad (1, 4, 6 are not)


@pytest.fixture(scope="module")
def clean(data_dir, tmp_path_factory):
    """No fault; spike detection on (it must not fire on a healthy run)."""
    out = tmp_path_factory.mktemp("clean") / "run"
    train(TrainConfig(data=data_dir, out=str(out), loss_spike_factor=3.0, **POLICY))
    return out


def _ck(out, step):
    return Path(out) / "checkpoints" / f"step_{step:06d}"


def test_skip_policy_leaves_bad_steps_without_effect(clean, data_dir, tmp_path, monkeypatch):
    assert all(r["skipped_steps"] == 0 and "skipped" not in r for r in read_metrics(clean))
    monkeypatch.setenv("MINITRAIN_FAULTS", json.dumps({"poison": POISON}))
    out = tmp_path / "run"
    cfg = dict(data=data_dir, out=str(out), on_nonfinite="skip", loss_spike_factor=3.0, **POLICY)
    train(TrainConfig(**cfg))
    recs, ref = read_metrics(out), read_metrics(clean)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert [r.get("skipped", False) for r in recs] == [False, True, True, False, True, False]
    assert [r["skipped_steps"] for r in recs] == [0, 1, 2, 2, 3, 3]
    assert _records(out)[0] == _records(clean)[0]  # before the first fault: the clean run
    assert np.isnan(recs[1]["loss"]) and recs[2]["grad_norm"] == float("inf") and recs[4]["loss"] > 1000
    assert recs[1]["loss_avg"] is None and recs[3]["loss_avg"] == recs[3]["loss"]  # over accepted steps only
    assert [r["lr"] for r in recs] == [r["lr"] for r in ref]  # the schedule advances over skipped steps
    assert [r["tokens"] for r in recs] == [r["tokens"] for r in ref]  # their batches are consumed
    _assert_same_checkpoint(_ck(clean, 1), _ck(out, 1))

    states = {s: _dcp(_ck(out, s)) for s in range(1, 7)}
    for before, after, skipped in ((1, 2, True), (2, 3, True), (3, 4, False), (4, 5, True), (5, 6, False)):
        a, b = states[before], states[after]
        same = _equal(a["model"], b["model"]) and _equal(a["optim"]["state"], b["optim"]["state"])
        assert same == skipped, (before, after)  # parameters and Adam state (step count too) untouched
    assert all(float(v["step"]) == 3 for v in states[6]["optim"]["state"].values())  # 3 updates in 6 steps

    monkeypatch.setenv("MINITRAIN_FAULTS", json.dumps({"poison": {"2": "nan"}}))  # a run that ends on a skip
    end = train(TrainConfig(**{**cfg, "out": str(tmp_path / "end"), "max_steps": 2, "plot": True}))
    assert end["step"] == 2 and end["loss_avg"] is None  # no accepted step since the last record
    assert end["plot"] == str(tmp_path / "end" / "loss.png")

    # bit-exact otherwise: resuming after the skips (the guard's window and count are in the checkpoint)
    # reproduces the rest of the run exactly
    monkeypatch.delenv("MINITRAIN_FAULTS")
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    for s in (4, 5, 6):
        shutil.rmtree(_ck(resumed, s))
    (resumed / "checkpoints" / "latest").write_text("step_000003\n")
    monkeypatch.setenv("MINITRAIN_FAULTS", json.dumps({"poison": {"5": "spike"}}))
    train(TrainConfig(**{**cfg, "out": str(resumed)}, resume=True))
    _assert_same_run(out, resumed, 6)


def test_stop_policy_exits_non_zero_and_saves_nothing(clean, data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    cfg = dict(data=data_dir, out=str(out), **POLICY)  # --on-nonfinite stop is the default
    monkeypatch.setenv("MINITRAIN_FAULTS", json.dumps({"poison": {"3": "nan"}}))
    assert main(["train", *cli_flags(cfg)]) == 3
    err = capsys.readouterr().err
    assert ("error: step 3: the loss is nan; stopping (--on-nonfinite stop): nothing of this step was applied "
            f"or saved; the last checkpoint is {_ck(out, 2)}") in err
    assert ckpt.latest_checkpoint(out / "checkpoints") == _ck(out, 2)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000001", "step_000002"]
    _assert_same_checkpoint(_ck(clean, 2), _ck(out, 2))
    assert [r["step"] for r in read_metrics(out)] == [1, 2]

    monkeypatch.setenv("MINITRAIN_FAULTS", json.dumps({"poison": {"2": "spike"}}))
    with pytest.raises(BadStepError, match=r"step 2: the loss .* spikes above 3 × .*the mean of the last 1 accepted"):
        train(TrainConfig(**{**cfg, "out": str(tmp_path / "spike")}, loss_spike_factor=3.0))
    # a finite loss with an inf gradient: before, clipping made that gradient NaN, AdamW wrote NaN into the
    # weights and a checkpoint at that step stored them (the loss check came only at the next step); now
    # nothing is applied
    monkeypatch.setenv("MINITRAIN_FAULTS", json.dumps({"poison": {"1": "inf_grad"}}))
    with pytest.raises(BadStepError, match=r"step 1: the gradient norm is inf; .*no checkpoint yet"):
        train(TrainConfig(**{**cfg, "out": str(tmp_path / "grad")}))
    assert not (tmp_path / "grad" / "checkpoints").exists()


def test_policy_options_are_validated_and_documented(capsys):
    with pytest.raises(ValueError, match=r"on_nonfinite must be skip\|stop"):
        TrainConfig(on_nonfinite="ignore")
    with pytest.raises(ValueError, match="loss_spike_factor must be 0 .off. or >= 1"):
        TrainConfig(loss_spike_factor=0.5)
    with pytest.raises(ValueError, match="loss_spike_window must be a positive int"):
        TrainConfig(loss_spike_window=0)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("--on-nonfinite", "skip = no optimizer update", "stop = update and save nothing",
                   "--loss-spike-factor", "--loss-spike-window", "kill -9 included", "size/sha256",
                   "sha256 are checked against the manifest"):
        assert needle in text, needle

"""minitrain train: the default job (shortened), bit-exact resume (kill -9 at chosen points: test_faults.py), bad configs,
config files, the schedule, the FLOP formula and bench-model on the CPU."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("sentencepiece")

from minitrain.__main__ import main  # noqa: E402
from minitrain.checkpoint import CheckpointError  # noqa: E402
from minitrain.config import get_config  # noqa: E402
from minitrain.data import DataError, build_dataset, stdlib_documents, train_tokenizer  # noqa: E402
from minitrain.model import Baichuan2  # noqa: E402
from minitrain.train import flops_per_token, lr_at, train  # noqa: E402
from minitrain.train_config import TrainConfig  # noqa: E402
from _runs import read_metrics  # noqa: E402

QUICK = dict(device="cpu", seq_len=32, batch_size=4, layers=2, log_every=1, progress=False, tensorboard=False, plot=False,
             sample_tokens=0, export_hf=True, num_threads=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data")
    docs = stdlib_documents(120_000)
    return str(build_dataset(tmp / "data", docs, train_tokenizer(docs, str(tmp / "tok"), 512)))


def _weights(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "hf" / "model.safetensors"))


def _assert_same_run(a, b, from_step):
    la = {r["step"]: r["loss"] for r in read_metrics(a)}
    lb = {r["step"]: r["loss"] for r in read_metrics(b)}
    assert set(la) == set(lb)
    assert all(la[s] == lb[s] for s in la if s > from_step), (la, lb)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    """6 steps uninterrupted, a checkpoint every 2 (kept: 2, 4, 6)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train(TrainConfig(data=data_dir, out=str(out), max_steps=6, save_every=2, keep_checkpoints=3, **QUICK))
    return out


@pytest.mark.slow
def test_default_job_shortened_learns(tmp_path):
    out = tmp_path / "run"
    rc = main(["train", "--corpus-max-bytes", "120000", "--vocab-size", "512", "--max-steps", "30",
               "--seq-len", "32", "--batch-size", "8", "--layers", "2", "--out", str(out), "--save-every", "0",
               "--sample-tokens", "8", "--log-every", "5", "--no-progress", "--num-threads", "1", "--device", "cpu"])
    assert rc == 0
    recs = read_metrics(out)
    assert recs[0]["step"] == 1 and recs[-1]["step"] == 30
    assert {"step", "loss", "ce", "z", "lr", "tokens_per_s", "grad_norm", "mfu", "peak_mem_gb"} <= set(recs[0])
    # At init the final RMSNorm gives ‖h‖ ≈ √D and NormHead rows are unit vectors, so the logits have
    # about unit variance: the expected first CE is ≈ ln V + 1/2.
    assert abs(recs[0]["loss"] - (math.log(512) + 0.5)) < 0.5
    assert recs[-1]["loss"] < recs[0]["loss"] - 1.0 and recs[-1]["val_loss"] < recs[0]["loss"] - 1.0
    assert (out / "loss.png").stat().st_size > 1000 and (out / "sample.txt").read_text().startswith("def ")
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000030"
    from minitrain.hf import load_model

    model = load_model(out / "hf")
    assert model.config.num_layers == 2 and model.config.vocab_size == 512
    assert (out / "hf" / "tokenizer.model").is_file()


@pytest.mark.slow
def test_resume_equals_uninterrupted(reference_run, data_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    ck = out / "checkpoints"
    shutil.rmtree(ck / "step_000006")
    (ck / "latest").write_text("step_000004\n")
    shutil.rmtree(out / "hf")
    train(TrainConfig(data=data_dir, out=str(out), max_steps=6, save_every=2, keep_checkpoints=3, resume=True, **QUICK))
    _assert_same_run(reference_run, out, from_step=4)


def _data_of(run):
    return json.loads((Path(run) / "checkpoints" / "step_000002" / "trainer.json").read_text())["train_config"]["data"]


def test_bad_configs_fail_clearly_and_overwrite_nothing(reference_run, data_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        TrainConfig(preset="huge")
    with pytest.raises(ValueError, match=r"batch_size \(6\) must be divisible by grad_accum \(4\)"):
        TrainConfig(batch_size=6, grad_accum=4)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        TrainConfig(data=str(tmp_path / "nowhere"))
    assert main(["train", "--preset", "huge", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()

    snapshot = {p: p.read_bytes() for p in Path(reference_run).rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(TrainConfig(data=data_dir, out=str(reference_run), max_steps=6, **QUICK))
    assert {p: p.read_bytes() for p in Path(reference_run).rglob("*") if p.is_file()} == snapshot

    broken = tmp_path / "data"  # a corrupted shard
    shutil.copytree(data_dir, broken)
    raw = bytearray((broken / "train_000.bin").read_bytes())
    raw[3] ^= 1
    (broken / "train_000.bin").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="corrupted"):
        train(TrainConfig(data=str(broken), out=str(tmp_path / "y"), max_steps=2, **QUICK))

    run = tmp_path / "run"  # a corrupted checkpoint: resume refuses it, nothing is written
    shutil.copytree(reference_run, run)
    f = next((run / "checkpoints" / "step_000006").glob("*.distcp"))
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    f.write_bytes(bytes(raw))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="corrupted: .*distcp fails its sha256"):
        train(TrainConfig(data=data_dir, out=str(run), max_steps=8, resume=True, **QUICK))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_config_file_sets_fields_and_flags_override(tmp_path):
    from minitrain.train_config import add_arguments, config_from_args
    import argparse

    toml = tmp_path / "c.toml"
    toml.write_text('preset = "tiny-alibi"\nmax-steps = 7\nlr = 1e-3\nactivation_checkpointing = "full"\n')
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--config", str(toml), "--max-steps", "9", "--no-document-masking"]))
    assert (cfg.preset, cfg.max_steps, cfg.lr, cfg.activation_checkpointing) == ("tiny-alibi", 9, 1e-3, "full")
    assert cfg.document_masking is False and cfg.batch_size == TrainConfig().batch_size
    toml.write_text("max_stepz = 3\n")
    with pytest.raises(ValueError, match=r"unknown TrainConfig fields \['max_stepz'\]"):
        config_from_args(p.parse_args(["--config", str(toml)]))


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(max_steps=100)  # warm-up scaled: min(2000, 100 // 10) = 10
    assert cfg.warmup == 10 and TrainConfig(max_steps=100_000).warmup == 2000
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] >= cfg.min_lr_ratio
    assert TrainConfig(preset="7b").peak_lr == 2e-4 and TrainConfig(preset="13b").peak_lr == 1.5e-4


def test_flops_formula_counts_matmul_parameters():
    for name in ("7b", "13b", "tiny-alibi"):
        cfg = get_config(name)
        with torch.device("meta"):
            m = Baichuan2(cfg)
        n_matmul = sum(p.numel() for n, p in m.named_parameters() if p.ndim == 2 and "embed_tokens" not in n)
        L, D = cfg.num_layers, cfg.hidden_size
        assert flops_per_token(cfg, 4096) == 6 * n_matmul + 12 * L * D * 4096


def test_bench_model_on_cpu(capsys):
    assert main(["bench-model", "--preset", "7b", "--seq", "16", "--layers", "1", "--steps", "1", "--device", "cpu"]) == 0
    assert "tokens/s" in capsys.readouterr().out


def test_activation_checkpointing_does_not_change_training(data_dir, tmp_path):
    cfg = dict(data=data_dir, max_steps=2, save_every=0, **{**QUICK, "export_hf": False})
    train(TrainConfig(out=str(tmp_path / "a"), **cfg))
    train(TrainConfig(out=str(tmp_path / "b"), activation_checkpointing="full", **cfg))
    assert [r["loss"] for r in read_metrics(tmp_path / "a")] == [r["loss"] for r in read_metrics(tmp_path / "b")]


def test_bf16_autocast_tracks_fp32(data_dir, tmp_path):
    cfg = dict(data=data_dir, max_steps=2, save_every=0, **{**QUICK, "export_hf": False})
    train(TrainConfig(out=str(tmp_path / "a"), **cfg))
    train(TrainConfig(out=str(tmp_path / "b"), dtype="bf16", **cfg))
    for x, y in zip(read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")):
        assert abs(x["loss"] - y["loss"]) < 0.05 and x["loss"] != y["loss"]


@pytest.mark.cuda
def test_train_and_bench_on_cuda(data_dir, tmp_path, capsys):
    """GPU path: bf16 autocast over fp32 master weights, fused AdamW, document masking, MFU reported."""
    cfg = {**QUICK, "device": "cuda", "export_hf": False, "log_every": 1}
    train(TrainConfig(data=data_dir, out=str(tmp_path / "run"), max_steps=8, save_every=4, **cfg))
    recs = read_metrics(tmp_path / "run")
    assert all(math.isfinite(r["loss"]) for r in recs) and recs[-1]["loss"] < recs[0]["loss"]
    assert recs[-1]["peak_mem_gb"] > 0
    assert main(["bench-model", "--preset", "7b", "--layers", "1", "--seq", "512", "--steps", "2", "--device", "cuda"]) == 0
    assert "MFU" in capsys.readouterr().out


def test_a_given_tokenizer_is_used_as_is(data_dir, tmp_path):
    from minitrain.data import read_manifest, sha256_file
    from minitrain.train import prepare_data

    tok = str(Path(data_dir) / "tokenizer.model")
    cfg = TrainConfig(tokenizer=tok, corpus_max_bytes=50_000, out=str(tmp_path / "run"))
    built = prepare_data(cfg, tmp_path / "run")
    assert read_manifest(built)["tokenizer_sha256"] == sha256_file(tok)
    assert not (tmp_path / "run" / "tokenizer.model").exists()  # nothing trained
    assert prepare_data(cfg, tmp_path / "run") == built  # cached: same corpus settings

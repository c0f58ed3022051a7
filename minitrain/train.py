"""The training loop: ``python -m minitrain train`` (settings: :class:`~minitrain.train_config.TrainConfig`).

One optimizer step = ``batch_size`` sequences of ``seq_len`` tokens, split over ``grad_accum``
micro-steps and the ranks. The loss is the mean over every trained target of the global batch
(each micro-batch's mean is weighted by its share of the targets), so 1 rank × 4 micro-steps,
2 ranks × 2 and 4 ranks × 1 train the same model. Per step::

    for each micro-batch:  loss(ids, labels=ids, attention_mask=segment ids).backward()
    clip the global grad norm to 0.5;  AdamW step;  lr ← warm-up / cosine schedule

Outputs under ``OUT``: ``metrics.jsonl`` (one object per logged step: step, loss (that step's),
loss_avg (mean since the previous record), ce, z, lr, grad_norm, tokens_per_s, mfu, peak_mem_gb,
tokens, and val_loss where evaluated), ``checkpoints/`` (see checkpoint.py),
``hf/`` (consolidated safetensors + tokenizer.model), ``loss.png``, ``sample.txt``, ``tb/``. Every
record also has ``skipped_steps``; a step skipped by the bad-step policy (guard.py) is always logged,
with ``"skipped": true``.

Fault tolerance: checkpoints are atomic and checksummed (checkpoint.py); ``--resume`` continues from
the newest complete one bit-exactly (parameters, optimizer, RNG, data position, the bad-step window
and the metrics accumulators are all in it) and refuses a corrupted one, naming the file and the
newest complete checkpoint to fall back to. Test hooks: faults.py (tests/test_faults.py).

MFU = tokens/s × (6·N_matmul + 12·L·D·T) / peak, with N_matmul the parameters of every matmul (all
Linear weights and the head; not the input embedding, not the norms), L layers, D hidden size, T
the sequence length (the attention term counts full causal rows even when documents are masked). The
peak is the device's dense bf16 tensor-core peak (table below; ``MINITRAIN_PEAK_TFLOPS`` overrides);
on a CPU there is none unless that variable is set, and MFU is reported as null.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import checkpoint as ckpt
from .config import Baichuan2Config, config_to_dict, get_config
from .data import TokenData, Sampler, build_dataset, corpus_key, make_batch, read_manifest, stdlib_documents, \
    text_documents, train_tokenizer
from .distributed import all_reduce, apply_activation_checkpointing, apply_compile, apply_fsdp, barrier, \
    cast_embedding_output, init_distributed, world
from .faults import Faults
from .guard import BadStepError, StepGuard
from .model import Baichuan2
from .outputs import Progress, plot_losses, sample_text, tensorboard_writer
from .train_config import TrainConfig

__all__ = ["train", "prepare_data", "flops_per_token", "peak_flops", "lr_at", "build_model", "BadStepError"]

# dense bf16 tensor-core peaks (TFLOP/s) by device name
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                "A10": 125.0, "4090": 165.0}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def flops_per_token(cfg: Baichuan2Config, seq_len: int) -> int:
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    n_matmul = L * (4 * D * D + 3 * D * F) + V * D  # W_pack (3D²) + o_proj (D²) + 3 SwiGLU mats; head
    return 6 * n_matmul + 12 * L * D * seq_len


def peak_flops(device: torch.device) -> Optional[float]:
    if os.environ.get("MINITRAIN_PEAK_TFLOPS"):
        return float(os.environ["MINITRAIN_PEAK_TFLOPS"]) * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in _PEAK_TFLOPS.items():
            if key in name:
                return tf * 1e12
    return None


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based): linear warm-up, cosine decay."""
    warm = cfg.warmup
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, cfg.max_steps - warm))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def log(*a) -> None:
    if world()[0] == 0:
        print(*a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ data
def prepare_data(cfg: TrainConfig, out: Path) -> Path:
    """``--data DIR`` as is; else ``--corpus`` (stdlib, or a text file / directory of text files) is
    tokenized once into OUT/data (rebuilt when the corpus settings change)."""
    if cfg.data is not None:
        read_manifest(cfg.data)
        return Path(cfg.data)
    data_dir = out / "data"
    key = corpus_key(cfg.corpus, cfg.corpus_max_bytes, cfg.vocab_size, cfg.tokenizer)
    if world()[0] == 0:
        try:
            fresh = read_manifest(data_dir).get("source") == key
        except ValueError:
            fresh = False
        if not fresh:
            t0 = time.time()
            docs = (stdlib_documents(cfg.corpus_max_bytes) if cfg.corpus == "stdlib"
                    else text_documents(cfg.corpus, cfg.corpus_max_bytes))
            log(f"corpus {cfg.corpus}: {len(docs)} files, {sum(map(len, docs)) / 1e6:.1f} MB")
            tok = cfg.tokenizer
            if tok is None:
                out.mkdir(parents=True, exist_ok=True)
                tok = train_tokenizer(docs, str(out / "tokenizer"), cfg.vocab_size)
            build_dataset(data_dir, docs, tok, shard_tokens=cfg.shard_tokens, source=key)
            for f in ("tokenizer.model", "tokenizer.vocab"):
                if cfg.tokenizer is None and (out / f).exists():
                    (out / f).unlink()
            log(f"data: {data_dir} ({time.time() - t0:.1f} s)")
    barrier()
    return data_dir


# ----------------------------------------------------------------------------------------- model
def model_config(cfg: TrainConfig, vocab_size: int) -> Baichuan2Config:
    """The preset with the run's settings; the vocabulary is the tokenizer's for the tiny presets (and
    grows to it for the others, e.g. a custom tokenizer larger than 125,696 pieces)."""
    base = get_config(cfg.preset)
    T = cfg.seq_len or base.seq_len
    return dataclasses.replace(base, z_loss_weight=cfg.z_loss_weight, backend=cfg.backend, seq_len=T,
                               num_layers=cfg.layers or base.num_layers,
                               max_position_embeddings=max(base.max_position_embeddings, T),
                               vocab_size=vocab_size if cfg.preset.startswith("tiny") else max(vocab_size, base.vocab_size))


def build_model(mcfg: Baichuan2Config, device: torch.device, seed: int) -> Baichuan2:
    """fp32 master weights, initialised on ``device`` one part at a time from ``seed`` (same on every rank).
    Every RNG a checkpoint saves (torch, numpy, random) starts from ``seed``: a run is reproducible."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    with torch.device("meta"):
        model = Baichuan2(mcfg)
    return model.materialize(device, torch.float32)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.ndim < 2 or (not cfg.decay_embeddings and "embed_tokens" in name)
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = decay[0].device.type == "cuda" or None  # one kernel per step on GPU; the CPU default elsewhere
    return torch.optim.AdamW(groups, lr=cfg.peak_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


# ------------------------------------------------------------------------------------------ loop
def _check_out(cfg: TrainConfig, out: Path) -> None:
    """Refuse to write over an existing run unless --resume or --overwrite (checked before any write)."""
    has_run = (out / "checkpoints" / "latest").exists() or (out / "metrics.jsonl").exists()
    if has_run and not (cfg.resume or cfg.overwrite):
        raise FileExistsError(f"{out} already holds a run: pass --resume to continue it, --overwrite to start "
                              "afresh there, or another --out")


_SAME_RUN = ("preset", "seq_len", "layers", "batch_size", "document_masking", "seed", "z_loss_weight")


def _check_same_run(state: dict, cfg: TrainConfig, mcfg: Baichuan2Config, path: Path) -> None:
    saved = state["train_config"]
    diff = [f"{k}: {saved.get(k)!r} → {getattr(cfg, k)!r}" for k in _SAME_RUN if saved.get(k) != getattr(cfg, k)]
    arch = lambda d: {k: v for k, v in d.items() if not k.startswith("backend")}  # noqa: E731
    if arch(state["model_config"]) != arch(config_to_dict(mcfg)):
        diff.append("the model configuration")
    if diff:
        raise ckpt.CheckpointError(f"--resume: {path} was written with other settings ({'; '.join(diff)})")


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError):  # a line cut short by a crash
        return math.inf


def _n_targets(ids: torch.Tensor, seg: Optional[torch.Tensor]) -> int:
    if seg is None:
        return ids.shape[0] * (ids.shape[1] - 1)
    return int((seg[:, 1:] == seg[:, :-1]).sum())


def _batch_losses(model, ids, seg, n_total: int, ctx):
    """(loss, ce, z) of a micro-batch, each weighted by its share of the ``n_total`` targets."""
    with ctx:
        out = model(ids, labels=ids, attention_mask=seg)
    w = _n_targets(ids, seg) / n_total
    return out.loss * w, out.ce.detach() * w, out.z.detach() * w


@torch.no_grad()
def evaluate(model, val: TokenData, cfg: TrainConfig, T: int, device, ctx) -> float:
    """Mean validation CE over the first ``eval_batches × batch_size`` windows (the same set for any
    number of ranks and micro-steps: rank r takes every n-th window, in micro-batches)."""
    rank, n = world()
    windows = val.windows(T)
    mine = [i % len(windows) for i in range(cfg.eval_batches * cfg.batch_size)][rank::n]
    b = cfg.batch_size // (cfg.grad_accum * n)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for k in range(0, len(mine), b):
        ids, seg = make_batch(val, windows, mine[k:k + b], T, cfg.document_masking)
        with ctx:
            out = model(ids.to(device), labels=ids.to(device), attention_mask=None if seg is None else seg.to(device))
        m = _n_targets(ids, seg)
        total += torch.tensor([out.ce.double().item() * m, m], dtype=torch.float64, device=device)
    all_reduce(total)
    return float(total[0] / total[1])


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training job; returns a summary dict (rank 0: final losses, paths)."""
    out = Path(cfg.out)
    _check_out(cfg, out)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    dev_name = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    rank, n_ranks, device = init_distributed(dev_name)
    if cfg.batch_size % (cfg.grad_accum * n_ranks):
        raise ValueError(f"batch_size ({cfg.batch_size}) must be divisible by grad_accum × world size "
                         f"({cfg.grad_accum} × {n_ranks})")
    if rank == 0 and cfg.overwrite and not cfg.resume:
        for name in ("checkpoints", "metrics.jsonl", "hf", "tb", "loss.png", "sample.txt"):
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    barrier()
    data_dir = prepare_data(cfg, out)
    train_data, val_data = TokenData(data_dir, "train"), TokenData(data_dir, "val")
    mcfg = model_config(cfg, train_data.vocab_size)
    T = mcfg.seq_len
    amp = _DTYPES[cfg.dtype] if cfg.dtype != "auto" else torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(mcfg, device, cfg.seed)
    n_params = model.num_parameters()
    apply_activation_checkpointing(model, cfg.activation_checkpointing, cfg.ac_every)
    if cfg.compile:
        apply_compile(model)
    if n_ranks > 1:
        apply_fsdp(model, device, param_dtype=None if amp == torch.float32 else amp)
        ctx = nullcontext()  # FSDP's MixedPrecisionPolicy casts the parameters
    else:
        ctx = nullcontext()
        if amp != torch.float32:
            ctx = torch.autocast(device.type, dtype=amp)
            cast_embedding_output(model, amp)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg))
    windows = train_data.windows(T)
    sampler = Sampler(len(windows), cfg.seed)
    step, ckpt_root, metrics_path = 0, out / "checkpoints", out / "metrics.jsonl"
    guard = StepGuard(cfg.on_nonfinite, cfg.loss_spike_factor, cfg.loss_spike_window)
    faults = Faults.from_env()
    loss_sum, n_since = 0.0, 0  # accepted steps' losses since the last metrics record
    latest, state = ckpt.load_latest(ckpt_root, model, optimizer) if cfg.resume else (None, None)
    if latest is not None:
        _check_same_run(state, cfg, mcfg, latest)
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        if "guard" in state:
            guard.load_state_dict(state["guard"])
            loss_sum, n_since = state["log_since"]
        step = state["step"]
        log(f"resumed from {latest} (step {step})")
    elif cfg.resume:
        log(f"--resume: no checkpoint under {ckpt_root} yet, starting from step 0")
    if cfg.resume and rank == 0 and metrics_path.exists():  # drop records of steps after the checkpoint
        keep = [line for line in metrics_path.read_text().splitlines() if _step_of(line) <= step]
        ckpt._write_atomic(metrics_path, "".join(line + "\n" for line in keep))
    out.mkdir(parents=True, exist_ok=True)

    fpt, peak = flops_per_token(mcfg, T), peak_flops(device)
    log(f"model {cfg.preset}: {n_params / 1e6:.2f} M parameters, vocab {mcfg.vocab_size}, seq {T}; "
        f"{n_ranks} rank(s) on {device.type}; {cfg.max_steps} steps × {cfg.batch_size} sequences, "
        f"peak lr {cfg.peak_lr:g}, warm-up {cfg.warmup}")
    tb = tensorboard_writer(out / "tb") if cfg.tensorboard and rank == 0 else None
    bar = Progress(cfg, step) if rank == 0 else None
    b = cfg.batch_size // (cfg.grad_accum * n_ranks)
    metrics_file = open(metrics_path, "a") if rank == 0 else None
    last = {}
    t_log, tokens_since = time.perf_counter(), 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    while step < cfg.max_steps:
        idx = sampler.take(cfg.batch_size)  # global batch, same on every rank
        ids_all, seg_all = make_batch(train_data, windows, idx, T, cfg.document_masking)
        n_total = _n_targets(ids_all, seg_all)
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        for m in range(cfg.grad_accum):
            rows = slice((m * n_ranks + rank) * b, (m * n_ranks + rank + 1) * b)
            ids = ids_all[rows].to(device)
            seg = None if seg_all is None else seg_all[rows].to(device)
            loss, ce, z = _batch_losses(model, ids, seg, n_total, ctx)
            if m == 0:
                loss = faults.poison_loss(step + 1, loss)
            (loss * n_ranks).backward()  # FSDP averages gradients over ranks: undo it, the weights sum to 1
            sums += torch.stack([loss.detach(), ce, z]).double()
        faults.poison_grads(step + 1, model)
        faults.point(f"step:{step + 1}:backward")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        all_reduce(sums)
        loss_v, ce_v, z_v = (float(x) for x in sums)
        bad = guard.check(loss_v, float(grad_norm))  # before the update: a bad step changes nothing
        if bad is not None and guard.policy == "stop":
            if metrics_file is not None:
                metrics_file.close()
            last_ck = ckpt.latest_checkpoint(ckpt_root)
            raise BadStepError(f"step {step + 1}: {bad}; stopping (--on-nonfinite stop): nothing of this step was "
                               "applied or saved; " + (f"the last checkpoint is {last_ck}" if last_ck else "no checkpoint yet"))
        lr = optimizer.param_groups[0]["lr"]
        if bad is None:
            optimizer.step()
            guard.accept(loss_v)
            loss_sum, n_since = loss_sum + loss_v, n_since + 1
        else:
            guard.skipped += 1
            log(f"step {step + 1}: {bad}; skipped (--on-nonfinite skip), {guard.skipped} skipped so far")
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_since += cfg.batch_size * T
        faults.point(f"step:{step}:optimizer")
        if bar is not None:
            bar.update(step, loss_v, lr, tokens_since / max(1e-9, time.perf_counter() - t_log))
        do_eval = step == cfg.max_steps or (cfg.eval_every and step % cfg.eval_every == 0)
        if step % cfg.log_every == 0 or do_eval or step == 1 or bad is not None:
            dt = time.perf_counter() - t_log
            tps = tokens_since / dt
            rec = {"step": step, "loss": loss_v, "loss_avg": loss_sum / n_since if n_since else None, "ce": ce_v, "z": z_v,
                   "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tps, "mfu": tps * fpt / peak if peak else None,
                   "tokens": sampler.position * T, "skipped_steps": guard.skipped,
                   "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
            if bad is not None:
                rec["skipped"] = True
            if do_eval:
                model.eval()
                rec["val_loss"] = evaluate(model, val_data, cfg, T, device, ctx)
                model.train()
            last = rec
            if rank == 0:
                metrics_file.write(json.dumps(rec) + "\n")
                metrics_file.flush()
                if tb is not None:
                    for k, v in rec.items():
                        if k != "step" and v is not None:
                            tb.add_scalar(f"train/{k}", v, step)
            if "val_loss" in rec and bar is not None:
                bar.write(f"step {step}: val loss {rec['val_loss']:.4f}")
            t_log, tokens_since, loss_sum, n_since = time.perf_counter(), 0, 0.0, 0
            faults.point(f"step:{step}:logged")
        if step == cfg.max_steps or (cfg.save_every and step % cfg.save_every == 0):
            state = {"scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(), "guard": guard.state_dict(),
                     "log_since": [loss_sum, n_since], "train_config": cfg.to_dict(), "model_config": config_to_dict(mcfg)}
            ckpt.save(ckpt_root, step, model, optimizer, state, keep=cfg.keep_checkpoints, hook=faults.point)
    if bar is not None:
        bar.close()
    if metrics_file is not None:
        metrics_file.close()
    if tb is not None:
        tb.close()
    return _finish(cfg, out, model, mcfg, data_dir, last)


def _finish(cfg: TrainConfig, out: Path, model, mcfg, data_dir: Path, last: dict) -> dict:
    """Consolidated export, loss curve and a sample generation (rank 0)."""
    summary = {"out": str(out), **{k: last.get(k) for k in ("step", "loss", "loss_avg", "val_loss")}}
    need = cfg.export_hf or cfg.sample_tokens
    plain = ckpt.gather_full_model(model, mcfg) if need else None
    if world()[0] != 0:
        return summary
    tok = Path(data_dir) / "tokenizer.model"
    if cfg.export_hf:
        ckpt.save_consolidated(plain, out / "hf", tok if tok.is_file() else None)
        summary["hf"] = str(out / "hf")
    if cfg.plot:
        summary["plot"] = plot_losses(out / "metrics.jsonl", out / "loss.png", math.log(mcfg.vocab_size))
    if cfg.sample_tokens and tok.is_file():
        summary["sample"] = sample_text(plain, tok, cfg, out / "sample.txt")
    if last:
        avg = "none accepted" if last["loss_avg"] is None else f"{last['loss_avg']:.4f}"
        log(f"done: step {last['step']}, train loss {avg} (mean of the last {cfg.log_every} steps)"
            + (f", val loss {last['val_loss']:.4f}" if last.get("val_loss") is not None else "") + f"; {out}")
    return summary

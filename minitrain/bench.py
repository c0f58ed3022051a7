"""``python -m minitrain bench-model``: time full training steps (forward, backward, clip, AdamW) of a preset.

On a GPU: fp32 master weights and AdamW state, bf16 autocast, random tokens ``[batch, seq]`` (dense
causal rows). The full 7B/13B does not fit one GPU with fp32 Adam state (16 bytes per parameter:
7.5 B → 120 GB), so by default as many decoder layers are kept as fit ~85% of the GPU memory (the
embedding and head always stay); ``--layers N`` states it. On a CPU the 7b/13b presets are replaced
by tiny-rope/tiny-alibi. ``--compile`` compiles every decoder layer with ``fullgraph=True``; ``--ac``
picks activation checkpointing (none | full | selective = every 2nd layer | op = save matmul and
attention outputs, recompute the rest; see minitrain/distributed.py).

Reported: tokens/s, achieved TFLOP/s and MFU with the standard formula (PaLM appendix B, torchtitan)

    FLOPs per token = 6·N + 12·L·D·T      (train.flops_per_token; forward + backward)

N = the parameters that take part in a matmul: every decoder-layer matrix (W_pack, o_proj, gate,
up, down) and the head (V·D) — all parameters except the input embedding (a lookup) and the RMSNorm
weights; L layers of width D at sequence length T (attention scores and values, causal not halved).
The reduced model's own L and N are used. MFU divides by the dense bf16 tensor-core peak of the
device (H100/H200: 989 TFLOP/s; ``MINITRAIN_PEAK_TFLOPS`` overrides); beside it the same run measures
the device's real bf16 matmul throughput (an 8192³ GEMM; a 512³ fp32 one on a CPU) and reports the
step's share of that too.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Callable

import torch

from .config import get_config
from .distributed import apply_activation_checkpointing, apply_compile, cast_embedding_output
from .train import build_model, flops_per_token, make_optimizer, peak_flops
from .train_config import TrainConfig

__all__ = ["bench_model", "build_step", "layers_that_fit", "matmul_tflops", "TrainStep"]

MFU_FORMULA = "6*N + 12*L*D*T per token; N = matmul parameters (all but the input embedding and the norms)"


def layers_that_fit(cfg, seq: int, batch: int, free_bytes: int, ac: bool) -> int:
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    per_layer = 16 * (4 * D * D + 3 * D * F)  # fp32 weight + grad + 2 Adam moments
    act = batch * seq * D * (4 if ac else 36)  # bytes of saved activations per layer (rough, bf16)
    fixed = 16 * 2 * V * D + batch * seq * D * 16 + (2 << 30)  # embedding + head, loss chunks, workspace
    return max(1, min(cfg.num_layers, int((0.85 * free_bytes - fixed) // (per_layer + act))))


def matmul_tflops(device: torch.device, n: int = 0, reps: int = 10) -> float:
    """Measured dense matmul throughput (TFLOP/s) on ``device``: bf16 n³ (default 8192) on a GPU,
    CUDA events around ``reps`` calls after 3 warm-ups, median; fp32 n³ (default 512) on a CPU."""
    gpu = device.type == "cuda"
    n = n or (8192 if gpu else 512)
    dtype = torch.bfloat16 if gpu else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        if gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12


@dataclasses.dataclass
class TrainStep:
    """One training step of a bench-model setup, in phases (benchmarks/profile_step.py times them apart)."""

    forward: Callable[[], torch.Tensor]  # the loss (under autocast on a GPU)
    backward: Callable[[torch.Tensor], None]
    optimizer: Callable[[], None]  # clip 0.5, AdamW, zero_grad
    sync: Callable[[], None]
    model: torch.nn.Module
    cfg: object  # the reduced Baichuan2Config
    info: dict  # preset, model, layers, of_layers, seq, batch, ac, compile, device

    def __call__(self) -> torch.Tensor:
        loss = self.forward()
        self.backward(loss)
        self.optimizer()
        return loss


def build_step(args) -> TrainStep:
    """The model, optimizer and input batch of ``bench-model`` (``args``: its CLI namespace)."""
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    preset, seq = args.preset, args.seq
    if device.type == "cpu" and preset in ("7b", "13b"):
        preset, seq = ("tiny-rope" if preset == "7b" else "tiny-alibi"), min(seq, 256)
        print(f"CPU: benchmarking {preset} at seq {seq} instead of {args.preset}", file=sys.stderr)
    base = get_config(preset)
    if args.layers is not None:
        layers = args.layers
    elif device.type == "cuda":
        layers = layers_that_fit(base, seq, args.batch, torch.cuda.mem_get_info(device)[0], args.ac != "none")
    else:
        layers = base.num_layers
    cfg = dataclasses.replace(base, num_layers=layers, seq_len=seq, z_loss_weight=2e-4,
                              max_position_embeddings=max(base.max_position_embeddings, seq))
    model = build_model(cfg, device, 0)
    apply_activation_checkpointing(model, args.ac)
    if args.compile:
        apply_compile(model, fullgraph=True)  # dense batches: every op of a layer traces
    opt = make_optimizer(model, TrainConfig(preset=preset, max_steps=args.steps + 2))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    if device.type == "cuda":
        cast_embedding_output(model, torch.bfloat16)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (args.batch, seq), generator=g).to(device)

    def forward():
        with amp:
            return model(ids, labels=ids).loss

    def optimizer():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)

    info = {"preset": args.preset, "model": preset, "layers": layers, "of_layers": base.num_layers, "seq": seq,
            "batch": args.batch, "ac": args.ac, "compile": args.compile,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    return TrainStep(forward, lambda loss: loss.backward(), optimizer, sync, model, cfg, info)


def bench_model(args) -> dict:
    step = build_step(args)
    cfg, info, model = step.cfg, step.info, step.model
    device = next(model.parameters()).device
    seq = info["seq"]
    for _ in range(2):
        step()
    step.sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        step.sync()
        times.append(time.perf_counter() - t0)
    t = sorted(times)[len(times) // 2]
    tps = args.batch * seq / t
    peak = peak_flops(device)
    fpt = flops_per_token(cfg, seq)
    tflops = tps * fpt / 1e12
    try:
        mm = matmul_tflops(device)
    except torch.OutOfMemoryError:  # the benchmarked model left no room for three 8192² matrices
        mm = None
    res = {**info, "parameters": model.num_parameters(), "step_s": t, "tokens_per_s": tps, "flops_per_token": fpt,
           "mfu_formula": MFU_FORMULA, "tflops": tflops, "peak_tflops": peak / 1e12 if peak else None,
           "mfu": tps * fpt / peak if peak else None, "matmul_tflops": mm, "of_matmul": tflops / mm if mm else None,
           "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
           "loss": float(loss.detach())}
    mfu = (f"{100 * res['mfu']:.1f}% MFU (of {res['peak_tflops']:.0f})" if res["mfu"] is not None
           else "MFU n/a (no peak for this device)")
    print(f"bench-model {args.preset} [{info['model']}, {info['layers']}/{info['of_layers']} layers, "
          f"{res['parameters'] / 1e9:.2f} B params, ac {info['ac']}{', compiled' if info['compile'] else ''}] "
          f"seq {seq} × batch {args.batch} on {res['device']}: {t * 1e3:.1f} ms/step, {tps:,.0f} tokens/s, "
          f"{tflops:.3g} TFLOP/s, {mfu}"
          + (f"; measured matmul {mm:.3g} TFLOP/s ({100 * res['of_matmul']:.1f}% of it)" if mm else "")
          + (f", peak {res['peak_mem_gb']:.1f} GiB" if res["peak_mem_gb"] else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return res

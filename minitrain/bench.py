"""``python -m minitrain bench-model``: time full training steps (forward, backward, clip, AdamW) of a preset.

On a GPU: fp32 master weights and AdamW state, bf16 autocast, random tokens ``[batch, seq]`` (dense
causal rows). The full 7B/13B does not fit one GPU with fp32 Adam state (16 bytes per parameter:
7.5 B → 120 GB), so by default as many decoder layers are kept as fit ~85% of the GPU memory (the
embedding and head always stay); ``--layers N`` states it. MFU uses the reduced model's own FLOPs
(train.flops_per_token). On a CPU the 7b/13b presets are replaced by tiny-rope/tiny-alibi.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import torch

from .config import get_config
from .distributed import apply_activation_checkpointing, apply_compile, cast_embedding_output
from .train import build_model, flops_per_token, make_optimizer, peak_flops
from .train_config import TrainConfig

__all__ = ["bench_model", "layers_that_fit"]


def layers_that_fit(cfg, seq: int, batch: int, free_bytes: int, ac: bool) -> int:
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    per_layer = 16 * (4 * D * D + 3 * D * F)  # fp32 weight + grad + 2 Adam moments
    act = batch * seq * D * (4 if ac else 36)  # bytes of saved activations per layer (rough, bf16)
    fixed = 16 * 2 * V * D + batch * seq * D * 16 + (2 << 30)  # embedding + head, loss chunks, workspace
    return max(1, min(cfg.num_layers, int((0.85 * free_bytes - fixed) // (per_layer + act))))


def bench_model(args) -> dict:
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
        apply_compile(model)
    opt = make_optimizer(model, TrainConfig(preset=preset, max_steps=args.steps + 2))
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    if device.type == "cuda":
        cast_embedding_output(model, torch.bfloat16)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (args.batch, seq), generator=g).to(device)

    def step():
        with amp:
            loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    t = sorted(times)[len(times) // 2]
    tps = args.batch * seq / t
    peak = peak_flops(device)
    res = {"preset": args.preset, "model": preset, "layers": layers, "of_layers": base.num_layers, "seq": seq,
           "batch": args.batch, "ac": args.ac, "compile": args.compile, "device": torch.cuda.get_device_name(device)
           if device.type == "cuda" else "cpu", "parameters": model.num_parameters(), "step_s": t,
           "tokens_per_s": tps, "flops_per_token": flops_per_token(cfg, seq),
           "tflops": tps * flops_per_token(cfg, seq) / 1e12, "mfu": tps * flops_per_token(cfg, seq) / peak if peak else None,
           "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
           "loss": float(loss.detach())}
    mfu = f"{100 * res['mfu']:.1f}% MFU" if res["mfu"] is not None else "MFU n/a (no peak for this device)"
    print(f"bench-model {args.preset} [{preset}, {layers}/{base.num_layers} layers, {res['parameters'] / 1e9:.2f} B params] "
          f"seq {seq} × batch {args.batch} on {res['device']}: {t * 1e3:.1f} ms/step, {tps:,.0f} tokens/s, "
          f"{res['tflops']:.1f} TFLOP/s, {mfu}" + (f", peak {res['peak_mem_gb']:.1f} GiB" if res["peak_mem_gb"] else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return res

"""``python -m minitrain bench-decode``: end-to-end decode speed (tokens/s) of a preset, bf16 or with
weight-only quantized projections (``--bits 4|8|nf4``), at several batch sizes.

A model of the preset's shapes with ``--layers`` decoder layers (default 4: the full 7B/13B are not
needed to rank the projections' kernels; the embedding, head and every layer's kernels are the real
ones) and random weights; per batch size: prefill ``--prompt`` random tokens per row, then time
``--steps`` decode steps (``model.decode_step``: one token per row, greedy argmax on the device, no
host round trip inside the timed loop). tokens/s = batch · steps / time. On a CPU the 7b/13b presets
are replaced by tiny-rope/tiny-alibi (``--preset`` names any preset).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Sequence

import torch

from .config import get_config
from .model import Baichuan2

__all__ = ["bench_decode"]


def _model(cfg, device: torch.device, dtype: torch.dtype, bits) -> Baichuan2:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Baichuan2(cfg)
    model.materialize(device, dtype)
    if bits is not None:
        from .quantized import quantize

        quantize(model, bits, 64 if bits == "nf4" else 128)
    return model.eval()


@torch.no_grad()
def _time_decode(model: Baichuan2, batch: int, prompt: int, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` decode steps of ``batch`` rows after a ``prompt``-token prefill (median of 3)."""
    g = torch.Generator(device="cpu").manual_seed(batch)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(3):
        prompts = [torch.randint(3, model.config.vocab_size, (prompt,), generator=g).to(device) for _ in range(batch)]
        cache = model.new_kv_cache(batch, prompt + steps + 1)
        tokens = model.prefill(prompts, cache).argmax(-1)  # [B]
        tokens = model.decode_step(tokens, cache).argmax(-1)  # one warm-up step
        sync()
        t0 = time.perf_counter()
        for _ in range(steps - 1):
            tokens = model.decode_step(tokens, cache).argmax(-1)
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[1] / max(1, steps - 1) * steps


def bench_decode(args) -> dict:
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    preset = args.preset
    if device.type == "cpu" and preset in ("7b", "13b"):
        preset = "tiny-rope" if preset == "7b" else "tiny-alibi"
        print(f"CPU: benchmarking {preset} instead of {args.preset}", file=sys.stderr)
    base = get_config(preset)
    layers = min(args.layers, base.num_layers)
    cfg = dataclasses.replace(base, num_layers=layers, max_position_embeddings=max(base.max_position_embeddings,
                                                                                   args.prompt + args.steps + 1))
    dtype = torch.bfloat16 if device.type == "cuda" or args.dtype == "bf16" else torch.float32
    batches: Sequence[int] = args.batch
    results = []
    for bits in args.bits:
        model = _model(cfg, device, dtype, None if bits == "bf16" else bits)
        for batch in batches:
            t = _time_decode(model, batch, args.prompt, args.steps, device)
            tps = batch * args.steps / t
            row = {"bits": bits, "batch": batch, "tokens_per_s": tps, "ms_per_step": 1e3 * t / args.steps}
            results.append(row)
            print(f"bench-decode {args.preset} [{preset}, {layers}/{base.num_layers} layers] {bits} on "
                  f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}: batch {batch}, "
                  f"prompt {args.prompt}: {row['ms_per_step']:.2f} ms/step, {tps:,.1f} tokens/s", flush=True)
        del model
    res = {"preset": args.preset, "model": preset, "layers": layers, "of_layers": base.num_layers,
           "dtype": str(dtype).replace("torch.", ""), "prompt": args.prompt, "steps": args.steps, "results": results}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return res

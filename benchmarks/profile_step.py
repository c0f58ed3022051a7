"""Profile one ``bench-model`` training step with torch.profiler: top kernels and a time breakdown.

    python -m benchmarks.profile_step --preset 7b --layers 8 --seq 4096 --out OUT_DIR [--compile] [--ac op]

Builds exactly the step of ``python -m minitrain bench-model`` (minitrain/bench.py ``build_step``),
runs two warm-up steps, then profiles one step whose phases are separated by device synchronisations
(forward, the loss inside it, backward, optimizer — so each kernel falls in the window of its phase).
Writes ``OUT_DIR/profile_step.md`` (``--json``: also ``.json``) and prints it:

* the top kernels by device time (GPU: CUDA kernels; CPU dry run: self CPU time of the ops),
* a breakdown into attention, GEMM, norms/activations (RMSNorm, RoPE, SwiGLU), loss (the fused
  linear cross-entropy: its GEMMs included), optimizer (clip + AdamW, everything in that phase),
  recompute (forward kernels of attention / norms / activations run again in backward under
  activation checkpointing; recomputed GEMMs cannot be told from backward GEMMs by name and stay in
  GEMM), other (copies, casts, elementwise), and idle (the step's wall time not covered by any
  kernel: launch gaps, host overhead, the phase synchronisations).

On a CPU (a tiny preset) the same code runs over the CPU ops, so the script is proven to run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

PHASES = ("forward", "loss", "backward", "optimizer")
CATEGORIES = ("attention", "GEMM", "norms/activations", "loss", "optimizer", "recompute", "other", "idle")
# Kernel / op name patterns, lower case, tried in order (the phase decides loss and optimizer first).
PATTERNS = (
    ("attention", r"attention|attn|flash|fmha|sdpa|softmax"),
    ("GEMM", r"gemm|nvjet|xmma|cutlass|cublas|wgmma|aten::(mm|addmm|bmm|matmul|linear)\b|sm\d+_.*_tn|ampere_|hopper_"),
    ("norms/activations", r"rms_norm|rope|rotary|split_qkv|swiglu|silu"),
)
FORWARD_NAME = re.compile(r"fwd|forward")
BACKWARD_NAME = re.compile(r"bwd|backward")


def categorize(name: str, phase: str, ac: str) -> str:
    low = name.lower()
    if phase == "optimizer":
        return "optimizer"
    if phase == "loss":
        return "loss"
    for cat, pat in PATTERNS:
        if re.search(pat, low):
            if (cat != "GEMM" and phase == "backward" and ac != "none" and FORWARD_NAME.search(low)
                    and not BACKWARD_NAME.search(low)):
                return "recompute"
            return cat
    return "other"


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by ``(start, end)`` intervals (overlapping kernels counted once)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


@contextmanager
def _phase(name: str, sync):
    sync()
    with record_function(f"phase/{name}"):
        yield
        sync()


def _profiled_step(step):
    """Run one step under the profiler, with phase windows; returns (prof, wall seconds)."""
    import baichuan_kernels as bk
    import minitrain.model as model_mod

    original = bk.linear_cross_entropy

    def loss_in_window(*a, **k):  # the loss call gets a window of its own inside the forward
        with _phase("loss", step.sync):
            return original(*a, **k)

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    model_mod.bk.linear_cross_entropy = loss_in_window
    try:
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            with _phase("forward", step.sync):
                loss = step.forward()
            with _phase("backward", step.sync):
                step.backward(loss)
            with _phase("optimizer", step.sync):
                step.optimizer()
            wall = time.perf_counter() - t0
    finally:
        model_mod.bk.linear_cross_entropy = original
    return prof, wall


def analyse(prof, wall_s: float, ac: str, gpu: bool, top: int = 20) -> dict:
    events = list(prof.events())
    windows = {}  # phase -> (start, end) in profiler microseconds
    for e in events:
        if e.name.startswith("phase/"):
            windows[e.name[len("phase/"):]] = (e.time_range.start, e.time_range.end)

    def phase_of(t: float) -> str:
        if "loss" in windows and windows["loss"][0] <= t <= windows["loss"][1]:
            return "loss"
        for p in ("forward", "backward", "optimizer"):
            if p in windows and windows[p][0] <= t <= windows[p][1]:
                return p
        return "outside"

    if gpu:  # device kernels: their own durations
        items = [(e.name, e.time_range.start, e.time_range.end, e.time_range.end - e.time_range.start)
                 for e in events if e.device_type == DeviceType.CUDA]
    else:  # CPU ops: exclusive time, so nested ops are not counted twice
        items = [(e.name, e.time_range.start, e.time_range.end, e.self_cpu_time_total)
                 for e in events if e.device_type == DeviceType.CPU and not e.name.startswith("phase/")]
    per_name = defaultdict(lambda: [0.0, 0])  # (name, category) -> [time, calls]
    per_cat = defaultdict(float)
    for name, start, end, dur in items:
        phase = phase_of(start)
        if phase == "outside":
            continue
        cat = categorize(name, phase, ac)
        rec = per_name[(name, cat)]
        rec[0] += dur
        rec[1] += 1
        per_cat[cat] += dur
    start = min((w[0] for w in windows.values()), default=0.0)
    end = max((w[1] for w in windows.values()), default=0.0)
    window_us = end - start
    busy = union_length([(s, e) for _, s, e, _ in items if start <= s <= end]) if gpu else sum(per_cat.values())
    per_cat["idle"] = max(0.0, window_us - busy)
    rows = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "wall_ms": wall_s * 1e3, "window_ms": window_us / 1e3, "busy_ms": busy / 1e3,
        "timer": "CUDA kernels" if gpu else "CPU ops, self time; idle = host time outside any op",
        "breakdown_ms": {c: per_cat.get(c, 0.0) / 1e3 for c in CATEGORIES},
        "phases_ms": {p: (w[1] - w[0]) / 1e3 for p, w in windows.items()},
        "top": [{"name": n, "ms": r[0] / 1e3, "calls": r[1], "category": c} for (n, c), r in rows],
    }


def to_markdown(res: dict, info: dict) -> str:
    w = res["window_ms"] or 1.0
    lines = [f"# One training step: {info['preset']} [{info['model']}, {info['layers']}/{info['of_layers']} layers] "
             f"seq {info['seq']} × batch {info['batch']}, ac {info['ac']}, compile {info['compile']}, on {info['device']}",
             "", f"Profiled step: {res['wall_ms']:.1f} ms wall (phases synchronised), {res['window_ms']:.1f} ms in the "
             f"phase windows, {res['busy_ms']:.1f} ms busy ({res['timer']}).", "",
             "| category | ms | share |", "|---|---|---|"]
    lines += [f"| {c} | {ms:.2f} | {100 * ms / w:.1f}% |" for c, ms in res["breakdown_ms"].items()]
    lines += ["", "| phase | ms |", "|---|---|"] + [f"| {p} | {ms:.2f} |" for p, ms in res["phases_ms"].items()]
    lines += ["", f"Top {len(res['top'])} by time:", "", "| # | kernel | category | calls | ms | share |",
              "|---|---|---|---|---|---|"]
    for i, r in enumerate(res["top"], 1):
        name = r["name"].replace("|", "\\|")
        name = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"| {i} | `{name}` | {r['category']} | {r['calls']} | {r['ms']:.2f} | {100 * r['ms'] / w:.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="7b")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--ac", default="none", choices=("none", "full", "selective", "op"))
    p.add_argument("--compile", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--out", default=".", help="directory for profile_step.md")
    p.add_argument("--json", action="store_true", help="also write profile_step.json (every number)")
    args = p.parse_args(argv)
    args.steps = 1  # build_step sizes the LR schedule from it

    from minitrain.bench import build_step

    step = build_step(args)
    for _ in range(2):
        step()
    step.sync()
    prof, wall = _profiled_step(step)
    gpu = next(step.model.parameters()).device.type == "cuda"
    res = analyse(prof, wall, args.ac, gpu, args.top)
    res["info"] = step.info
    md = to_markdown(res, step.info)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_step.md").write_text(md)
    if args.json:
        (out / "profile_step.json").write_text(json.dumps(res, indent=1))
    print(md)
    print(f"wrote {out / 'profile_step.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""NormHead + LM head + cross-entropy + max-z loss: our chunked backends against eager PyTorch
(normalize + matmul + CE + max-z with materialised logits), the same under torch.compile, and
Liger-Kernel's fused linear cross-entropy when importable (Liger has neither NormHead nor the max-z
loss: it runs plain ``CE(h @ Wᵀ)``, so it does less work than the others).

Compute-bound: the figure of merit is TFLOP/s of the GEMMs (forward 2·N·D·V, backward 2·2·N·D·V).
Peak memory matters as much as time (the point of chunking), so every case is followed by a memory
line per provider: on the GPU ``torch.cuda.max_memory_allocated`` above the inputs, for one call.

CPU memory (peak RSS, one subprocess per provider, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``)
and time of one fwd+bwd at the acceptance shape N = 2048, D = 4096, V = 125,696 (fp32)::

    python -m benchmarks.bench_linear_ce --cpu-memory [--n 2048 --d 4096 --v 125696]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .common import Context, Provider, run_cases, backend_reason

OP = "linear_cross_entropy"
V_BAICHUAN = 125_696
Z_LOSS = 2e-4
OUR_BACKENDS = ("cuda", "triton", "cpu")


@dataclass(frozen=True)
class Case:
    n: int  # rows (tokens)
    d: int  # model dim: 4096 (7B), 5120 (13B)
    v: int  # vocabulary
    dtype: torch.dtype
    pass_: str  # "fwd" | "fwd+bwd"

    @property
    def label(self) -> str:
        return f"N={self.n} D={self.d} V={self.v}"


@dataclass(frozen=True)
class Inputs:
    h: torch.Tensor  # [N, D]
    w: torch.Tensor  # [V, D] (un-normalised head)
    y: torch.Tensor  # [N] labels, ~5% ignored


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    if device.type == "cuda":
        # 7B at 4k tokens and the acceptance shape, 13B at 16k tokens (N = 4k-16k, D = 4096 / 5120).
        shapes = [(16384, 5120)] if quick else [(4096, 4096), (16384, 5120)]
        return [Case(n, d, V_BAICHUAN, torch.bfloat16, p) for n, d in shapes for p in ("fwd", "fwd+bwd")]
    # CPU timings of a full Baichuan head take ~a minute per call: a reduced shape here; the
    # acceptance shape (N=2048, D=4096) is measured by --cpu-memory, once per provider.
    return [Case(256, 1024, 32000, torch.float32, p) for p in (("fwd+bwd",) if quick else ("fwd", "fwd+bwd"))]


def traffic(case: Case) -> tuple[int, int]:
    b = torch.empty((), dtype=case.dtype).element_size()
    nbytes = (case.n * case.d + case.v * case.d) * b + case.n * 8
    flops = 2 * case.n * case.d * case.v * (1 if case.pass_ == "fwd" else 3)
    return nbytes, flops


def make_inputs(case: Case, n_sets: int, device: torch.device) -> list[Inputs]:
    # The weight is the big tensor (V·D): one set only, hidden rotates (the GEMMs are compute-bound).
    gen = torch.Generator(device=device).manual_seed(4321 + case.n + case.d)
    grad = case.pass_ == "fwd+bwd"
    # Filled in place, in the final dtype: no fp32 temporary raises the RSS high-water mark.
    w = torch.empty(case.v, case.d, device=device, dtype=case.dtype).normal_(0.0, 0.02, generator=gen)
    w.requires_grad_(grad)
    sets = []
    for _ in range(min(n_sets, 2)):
        h = torch.empty(case.n, case.d, device=device, dtype=case.dtype).normal_(generator=gen).requires_grad_(grad)
        y = torch.randint(0, case.v, (case.n,), generator=gen, device=device)
        y[::20] = -100
        sets.append(Inputs(h, w, y))
    return sets


def step(f: Callable, case: Case) -> Callable[[Inputs], object]:
    """``f(h, w, y)`` returns the scalar loss; fwd+bwd returns (loss, dh, dw)."""
    if case.pass_ == "fwd":
        return lambda inp: f(inp.h, inp.w, inp.y)

    def fwd_bwd(inp: Inputs):
        loss = f(inp.h, inp.w, inp.y)
        return (loss.detach(), *torch.autograd.grad(loss, (inp.h, inp.w)))

    return fwd_bwd


# ------------------------------------------------------------------------------------ providers
def _import_bk():
    try:
        import baichuan_kernels as bk
        return bk, None
    except Exception as exc:
        return None, f"baichuan_kernels is not importable ({type(exc).__name__}: {exc})"


def eager(h, w, y):
    """The naive head: Ŵ = normalize(W), logits = h @ Ŵᵀ materialised, CE + max-z over kept rows."""
    w_hat = torch.nn.functional.normalize(w.float(), dim=1).to(w.dtype)
    logits = (h @ w_hat.t()).float()  # [N, V]
    keep = y != -100
    ce = torch.nn.functional.cross_entropy(logits, y, ignore_index=-100, reduction="sum")
    z = torch.where(keep, logits.amax(dim=-1).square(), 0.0).sum()
    kept = keep.sum().clamp_min(1)
    return (ce + Z_LOSS * z) / kept


def _ours(backend: str, device: torch.device) -> Provider:
    bk, err = _import_bk()
    reason = err
    reason = reason or backend_reason(OP, backend, device)

    def f(h, w, y):
        return bk.linear_cross_entropy(h, w, y, z_loss_weight=Z_LOSS, backend=backend)[0]

    return Provider(backend, "ours", lambda case: step(f, case), reason)


@functools.lru_cache(maxsize=None)
def _compiled_eager() -> Callable:
    import torch._dynamo
    cfg = torch._dynamo.config
    cfg.automatic_dynamic_shapes = False
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))
    compiled = torch.compile(eager, fullgraph=True)

    def f(h, w, y):  # N dynamic, D and V static: one graph per (D, pass)
        torch._dynamo.maybe_mark_dynamic(h, 0)
        torch._dynamo.maybe_mark_dynamic(y, 0)
        return compiled(h, w, y)

    return f


def _liger(device: torch.device) -> Provider:
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception as exc:
        return Provider("liger", "peer", None, f"liger_kernel is not importable ({type(exc).__name__}: {exc})")
    if device.type != "cuda":
        return Provider("liger", "peer", None, "Liger-Kernel's kernels are Triton, GPU only")
    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")

    def f(h, w, y):  # no NormHead, no max-z: plain CE(h @ Wᵀ)
        return loss_fn(w, h, y)

    return Provider("liger", "peer", lambda case: step(f, case))


def providers(device: torch.device) -> list[Provider]:
    _, err = _import_bk()
    return [
        *(_ours(b, device) for b in OUR_BACKENDS),
        Provider("eager", "baseline", lambda case: step(eager, case)),
        Provider("compile", "baseline", lambda case: step(_compiled_eager(), case)),
        _liger(device),
    ]


def gpu_peak_memory(case: Case, provs: list[Provider], device: torch.device, log: Callable[[str], None]) -> None:
    """One call per provider: peak allocated bytes above the inputs (torch.cuda.max_memory_allocated)."""
    inp = make_inputs(case, 1, device)[0]
    peaks = {}
    for p in provs:
        if p.skip_reason:
            continue
        try:
            fn = p.build(case)
            fn(inp)  # warm-up (compilation, autotuning)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = fn(inp)
            torch.cuda.synchronize()
            peaks[p.name] = torch.cuda.max_memory_allocated() - base
            del out
        except Exception as exc:  # noqa: BLE001 - reported, never fatal
            log(f"  ! memory {p.name} {case.label}: {type(exc).__name__}: {str(exc)[:200]}")
    ref = peaks.get("eager")
    for name, b in peaks.items():
        rel = f" ({b / ref:.3f}× eager)" if ref else ""
        log(f"  memory {case.label} {case.pass_:<8} {name:<8} {b / 2**30:8.2f} GiB above inputs{rel}")


def run(ctx: Context, log: Callable[[str], None] = print):
    cs = cases(ctx.device, ctx.quick)
    provs = providers(ctx.device)
    results, skips = run_cases(ctx, OP, cs, provs, functools.partial(make_inputs, device=ctx.device), traffic, log=log)
    if ctx.device.type == "cuda":
        for case in cs:
            gpu_peak_memory(case, provs, ctx.device, log)
            torch.cuda.empty_cache()
    return results, skips


# ----------------------------------------------------------------------------- CPU peak RSS
def _child(provider: str, n: int, d: int, v: int) -> None:
    """Runs in a fresh process: inputs, then one fwd+bwd; prints JSON with RSS high-water marks."""
    import resource

    def rss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB

    torch.set_num_threads(os.cpu_count() or 1)
    case = Case(n, d, v, torch.float32, "fwd+bwd")
    inp = make_inputs(case, 1, torch.device("cpu"))[0]
    if provider == "eager":
        fn = step(eager, case)
    else:
        fn = _ours(provider, torch.device("cpu")).build(case)
    base = rss()
    t0 = time.perf_counter()
    out = fn(inp)
    dt = time.perf_counter() - t0
    print(json.dumps({"provider": provider, "seconds": dt, "base_rss": base, "peak_rss": rss(),
                      "loss": float(out[0])}))


def cpu_memory(n: int, d: int, v: int, provs=("eager", "cpu")) -> list[dict]:
    rows = []
    for p in provs:
        cmd = [sys.executable, "-m", "benchmarks.bench_linear_ce", "--child", p, "--n", str(n), "--d", str(d),
               "--v", str(v)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            print(f"{p}: failed (exit {res.returncode}): {res.stderr[-500:]}")
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    eager_row = next((r for r in rows if r["provider"] == "eager"), None)
    print(f"CPU fwd+bwd, N={n} D={d} V={v} fp32, z_loss_weight={Z_LOSS}, {torch.get_num_threads()} threads")
    print(f"{'provider':<8} {'time s':>8} {'peak RSS GiB':>13} {'above inputs GiB':>17} {'peak vs eager':>14} "
          f"{'above-inputs vs eager':>22} {'loss':>10}")
    for r in rows:
        extra = r["peak_rss"] - r["base_rss"]
        rel = rel_x = ""
        if eager_row:
            rel = f"{r['peak_rss'] / eager_row['peak_rss']:.3f}"
            rel_x = f"{extra / max(1, eager_row['peak_rss'] - eager_row['base_rss']):.3f}"
        print(f"{r['provider']:<8} {r['seconds']:8.2f} {r['peak_rss'] / 2**30:13.2f} {extra / 2**30:17.2f} "
              f"{rel:>14} {rel_x:>22} {r['loss']:10.5f}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-memory", action="store_true", help="peak RSS + time per provider, one process each")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--v", type=int, default=V_BAICHUAN)
    ap.add_argument("--json", help="also write the rows of --cpu-memory to this file")
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child, args.n, args.d, args.v)
        return 0
    if args.cpu_memory:
        rows = cpu_memory(args.n, args.d, args.v)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    ap.error("use `python -m benchmarks linear_ce` for timings, or --cpu-memory")
    return 2


if __name__ == "__main__":
    sys.exit(main())

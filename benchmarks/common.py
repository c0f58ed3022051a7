"""Benchmark machinery shared by every ``bench_<op>.py`` (DESIGN.md §4).

Timing
  CUDA  CUDA events around every call (the method of ``triton.testing.do_bench``), median and
        p20/p80 after a warm-up. Successive calls read successive input sets whose total exceeds
        the L2 cache, so every call reads HBM and no cache flush is needed. A short GPU sleep is
        queued before each timed call so the host runs ahead of the device: the events then time
        the device work, not Python launch gaps.
  CPU   ``time.perf_counter`` around every call after a warm-up; median and p20/p80 over repeats,
        bounded by a time budget (and rotating input sets larger than the last-level cache).

Peaks measured in the same run: copy bandwidth (``dst.copy_(src)`` on a large tensor, bytes read +
bytes written) on every device, and a large bf16 matmul in TFLOP/s on GPU. Results quote GB/s (or
TFLOP/s) as a percentage of these.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import torch

PASSES = ("fwd", "fwd+bwd")
REFERENCE_PROVIDER = "eager"  # every provider's output is compared with this one's
SLEEP_CYCLES = 200_000  # ≈100 µs at ~2 GHz: the host enqueues the timed call meanwhile


class Unsupported(Exception):
    """Raised by ``Provider.build(case)`` when the provider cannot run that case; str() = why."""


@dataclass(frozen=True)
class Provider:
    """One implementation under test. ``build(case)`` returns ``fn(inputs) -> outputs`` (or raises
    :class:`Unsupported`); ``skip_reason`` set means it cannot run on this machine at all."""

    name: str  # "cuda" | "triton" | "cpu" (our backends), "eager", "compile", peers ("liger", "torch")
    kind: str  # "ours" | "baseline" | "peer"
    build: Callable[[Any], Callable[[Any], Any]]
    skip_reason: Optional[str] = None


@dataclass(frozen=True)
class Peaks:
    copy_gbps: float  # device-to-device (or RAM) copy, bytes read + written per second / 1e9
    matmul_tflops: Optional[float] = None  # bf16 matmul, GPU only


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


@dataclass(frozen=True)
class Result:
    op: str
    provider: str
    kind: str
    config: str  # shape/config label, e.g. "N=4096 D=4096 +res"
    dtype: str  # "bf16" | "fp32" | ...
    pass_: str  # "fwd" | "fwd+bwd"  (JSON key: "pass")
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    bytes: Optional[int]  # minimal traffic: each input read once, each output written once
    flops: Optional[int]
    gbps: Optional[float]
    pct_copy_bw: Optional[float]
    tflops: Optional[float]
    pct_peak_tflops: Optional[float]
    rel_err: Optional[float]  # max over outputs of ‖out − eager‖ / ‖eager‖ (first input set)

    def to_json(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        return d


@dataclass(frozen=True)
class Skip:
    op: str
    provider: str
    reason: str
    case: str = "all"


@dataclass(frozen=True)
class Context:
    device: torch.device
    quick: bool
    peaks: Peaks
    cache_bytes: int  # L2 (GPU) or last-level cache (CPU) that rotating input sets must exceed
    cpu_budget_s: float = 1.0  # time budget of one CPU measurement (warm-up excluded)
    providers: tuple[str, ...] = ()  # only these (and the eager reference); () = all


# ----------------------------------------------------------------------------------------- timing
def _quantiles(times_ms: Sequence[float]) -> tuple[float, float, float]:
    q = torch.quantile(torch.tensor(times_ms, dtype=torch.float64), torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def time_cuda(fn: Callable[[int], Any], n_sets: int, *, warmup_ms: float = 25, rep_ms: float = 100,
              min_reps: int = 10, max_reps: int = 500) -> Timing:
    """Median/p20/p80 of ``fn(i % n_sets)`` in device milliseconds, timed with CUDA events."""
    fn(0)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(5):
        fn(i % n_sets)
    end.record()
    torch.cuda.synchronize()
    est_ms = max(start.elapsed_time(end) / 5, 1e-3)
    n_warm = max(1, int(warmup_ms / est_ms))
    n_rep = min(max_reps, max(min_reps, int(rep_ms / est_ms)))
    for i in range(n_warm):
        fn(i % n_sets)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    sleep = getattr(torch.cuda, "_sleep", None)
    for i in range(n_rep):
        if sleep is not None:
            sleep(SLEEP_CYCLES)
        starts[i].record()
        fn((n_warm + i) % n_sets)
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return Timing(*_quantiles(times), reps=n_rep)


def time_cpu(fn: Callable[[int], Any], n_sets: int, *, budget_s: float = 1.0, warmup: int = 2,
             min_reps: int = 5, max_reps: int = 200) -> Timing:
    """Median/p20/p80 of ``fn(i % n_sets)`` in wall milliseconds; stops after ``budget_s``."""
    for i in range(warmup):  # the first call of a torch.compile provider compiles here
        fn(i % n_sets)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn((warmup + len(times)) % n_sets)
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(*_quantiles(times), reps=len(times))


def time_fn(ctx: Context, fn: Callable[[int], Any], n_sets: int) -> Timing:
    if ctx.device.type == "cuda":
        return time_cuda(fn, n_sets, rep_ms=40 if ctx.quick else 100)
    return time_cpu(fn, n_sets, budget_s=ctx.cpu_budget_s)


def n_input_sets(bytes_per_call: int, cache_bytes: int, max_sets: int = 16) -> int:
    """How many input sets to rotate over so that, between two uses of one set, the other sets
    touch at least twice the cache: data then always comes from DRAM/HBM."""
    return int(min(max_sets, max(2, 1 + math.ceil(2 * cache_bytes / max(bytes_per_call, 1)))))


# ------------------------------------------------------------------------------------------ peaks
def cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20)
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            size = f.read().strip()  # e.g. "32768K"
        return int(size[:-1]) * {"K": 2**10, "M": 2**20}[size[-1]]
    except (OSError, ValueError, KeyError, IndexError):
        return 32 * 2**20


def measure_peaks(device: torch.device, quick: bool = False) -> Peaks:
    """Copy bandwidth (bytes read + written) and, on GPU, bf16 matmul TFLOP/s, measured now."""
    if device.type == "cuda":
        src = torch.randn(2**28 if quick else 2**29, device=device, dtype=torch.bfloat16)  # 0.5/1 GiB
        dst = torch.empty_like(src)
        t = time_cuda(lambda i: dst.copy_(src), 1)
        copy = 2 * src.numel() * src.element_size() / (t.median_ms * 1e-3) / 1e9
        del src, dst
        n = 8192
        a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
        c = torch.empty_like(a)
        t = time_cuda(lambda i: torch.matmul(a, b, out=c), 1)
        del a, b, c
        torch.cuda.empty_cache()
        return Peaks(copy_gbps=copy, matmul_tflops=2 * n**3 / (t.median_ms * 1e-3) / 1e12)
    src = torch.full((2**25 if quick else 2**26,), 1.25)  # fp32: 128/256 MiB, well over the LLC
    dst = torch.zeros_like(src)
    t = time_cpu(lambda i: dst.copy_(src), 1, budget_s=0.5 if quick else 1.0)
    return Peaks(copy_gbps=2 * src.numel() * 4 / (t.median_ms * 1e-3) / 1e9)


# ----------------------------------------------------------------------------------- case runner
def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def rel_err(out: Any, ref: Any) -> Optional[float]:
    a, b = _tensors(out), _tensors(ref)
    if not a or len(a) != len(b):
        return None
    errs = [float((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-30)) for x, y in zip(a, b)]
    return max(errs)


def run_cases(ctx: Context, op: str, cases: Sequence[Any], providers: Sequence[Provider],
              make_inputs: Callable[[Any, int], list], traffic: Callable[[Any], tuple[Optional[int], Optional[int]]],
              log: Callable[[str], None] = print) -> tuple[list[Result], list[Skip]]:
    """Time every available provider on every case. A case has ``label``, ``dtype`` (torch dtype)
    and ``pass_``; ``make_inputs(case, n)`` returns n input sets; ``traffic(case)`` returns the
    minimal (bytes, flops) of one call. A provider that fails is recorded as a Skip, never fatal."""
    results: list[Result] = []
    if ctx.providers:  # --providers: the others are left out (the eager reference always runs)
        providers = [p for p in providers if p.name in ctx.providers or p.name == REFERENCE_PROVIDER]
    skips = [Skip(op, p.name, p.skip_reason) for p in providers if p.skip_reason]
    live = [p for p in providers if not p.skip_reason]
    live.sort(key=lambda p: p.name != REFERENCE_PROVIDER)  # the reference runs first: rel_err
    for case in cases:
        nbytes, nflops = traffic(case)
        n_sets = n_input_sets(nbytes or 0, ctx.cache_bytes)
        sets = make_inputs(case, n_sets)
        ref_out, rows = None, []
        for p in live:
            try:
                fn = p.build(case)
                out = fn(sets[0])
                if p.name == REFERENCE_PROVIDER:
                    ref_out = out
                err = rel_err(out, ref_out) if ref_out is not None else None
                del out
                t = time_fn(ctx, lambda i: fn(sets[i]), n_sets)
            except Unsupported as exc:
                skips.append(Skip(op, p.name, str(exc), case.label))
                continue
            except Exception as exc:  # a broken provider must not stop the others
                skips.append(Skip(op, p.name, f"failed: {type(exc).__name__}: {str(exc)[:300]}", case.label))
                log(f"  ! {p.name} {case.label} {dtype_name(case.dtype)} {case.pass_}: {type(exc).__name__}: {exc}")
                continue
            gbps = nbytes / (t.median_ms * 1e-3) / 1e9 if nbytes else None
            tflops = nflops / (t.median_ms * 1e-3) / 1e12 if nflops else None
            rows.append(Result(
                op=op, provider=p.name, kind=p.kind, config=case.label, dtype=dtype_name(case.dtype),
                pass_=case.pass_, median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.reps,
                bytes=nbytes, flops=nflops, gbps=gbps,
                pct_copy_bw=100 * gbps / ctx.peaks.copy_gbps if gbps else None,
                tflops=tflops,
                pct_peak_tflops=100 * tflops / ctx.peaks.matmul_tflops if tflops and ctx.peaks.matmul_tflops else None,
                rel_err=err))
        order = {p.name: i for i, p in enumerate(providers)}
        results += sorted(rows, key=lambda r: order[r.provider])
        for r in sorted(rows, key=lambda r: order[r.provider]):
            log(f"  {r.config:<22} {r.dtype:<5} {r.pass_:<8} {r.provider:<8} {r.median_ms:9.3f} ms"
                + (f" {r.gbps:8.1f} GB/s" if r.gbps else ""))
        del sets, ref_out
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return results, skips


# ---------------------------------------------------------------------------------- metadata
def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}.get(dtype, str(dtype))


def _run(cmd: list[str]) -> Optional[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_meta(device: torch.device, command: str) -> dict:
    """Everything needed to reproduce or compare a run (DESIGN.md §4)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        # BENCH_GIT_SHA names the commit of a copied working tree (the GPU machine), whose .git, if any,
        # may be stale: it wins over git, and cleanliness is then the caller's word (None = not checked)
        "git_sha": os.environ.get("BENCH_GIT_SHA") or _run(["git", "-C", root, "rev-parse", "HEAD"]),
        "git_dirty": (None if os.environ.get("BENCH_GIT_SHA") or _run(["git", "-C", root, "rev-parse", "HEAD"]) is None
                      else bool(_run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"]))),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cpu_model": cpu_model(),
        "cpu_threads": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device_type": device.type,
        # other processes on the machine distort CPU timings (a 2-thread region waits for a busy core)
        "loadavg_1min_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    try:
        import triton
        meta["triton"] = triton.__version__
    except Exception:
        meta["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["device"] = props.name
        meta["sm_count"] = props.multi_processor_count
        meta["l2_bytes"] = cache_bytes(device)
        meta["capability"] = f"{props.major}.{props.minor}"
        meta["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if shutil.which("nvidia-smi") else None
    else:
        meta["device"] = f"{meta['cpu_model']} ({meta['torch_threads']} threads)"
        meta["driver"] = None
    try:
        import baichuan_kernels as bk
        meta["baichuan_kernels"] = {"version": bk.__version__, "build_info": bk.build_info()}
    except Exception as exc:
        meta["baichuan_kernels"] = {"error": f"{type(exc).__name__}: {exc}"}
    return meta


def run_name(meta: dict) -> str:
    """``<device>-<yyyymmdd>``, the committed-results naming (benchmarks/results/README.md)."""
    if meta["device_type"] == "cuda":
        dev = re.sub(r"^nvidia[\s-]*", "", meta["device"].lower())
    else:
        dev = f"cpu-{meta['cpu_model'].lower()}-{meta['torch_threads']}t"
    dev = re.sub(r"[^a-z0-9]+", "-", dev).strip("-")
    return f"{dev}-{meta['date'][:10].replace('-', '')}"


# ------------------------------------------------------------------------------------- writers
def _fmt(v: Optional[float], spec: str) -> str:
    return "—" if v is None else format(v, spec)


def table(results: Sequence[Result]) -> tuple[list[str], list[list[str]]]:
    """Header and rows, one row per result with the speed-up over the eager reference of the same
    case; GB/s columns when some result has bytes, TFLOP/s columns when some result has flops."""
    eager = {(r.op, r.config, r.dtype, r.pass_): r.median_ms for r in results if r.provider == REFERENCE_PROVIDER}
    has_bw, has_fl = any(r.gbps for r in results), any(r.tflops for r in results)
    header = (["config", "dtype", "pass", "provider", "median ms", "p20 ms", "p80 ms"]
              + ["GB/s", "% copy"] * has_bw + ["TFLOP/s", "% mm peak"] * has_fl + ["x eager", "rel err"])
    rows = []
    for r in results:
        base = eager.get((r.op, r.config, r.dtype, r.pass_))
        rows.append([r.config, r.dtype, r.pass_, r.provider, _fmt(r.median_ms, ".3f"), _fmt(r.p20_ms, ".3f"),
                     _fmt(r.p80_ms, ".3f")]
                    + [_fmt(r.gbps, ".1f"), _fmt(r.pct_copy_bw, ".1f")] * has_bw
                    + [_fmt(r.tflops, ".1f"), _fmt(r.pct_peak_tflops, ".1f")] * has_fl
                    + [_fmt(base / r.median_ms if base else None, ".2f"), _fmt(r.rel_err, ".1e")])
    return header, rows


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i > 3 else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


def write_json(path: str, meta: dict, peaks: Peaks, results: Sequence[Result], skips: Sequence[Skip]) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "peaks": asdict(peaks), "results": [r.to_json() for r in results],
                   "skipped": [asdict(s) for s in skips]}, f, indent=1)


def write_markdown(path: str, meta: dict, peaks: Peaks, results: Sequence[Result], skips: Sequence[Skip]) -> None:
    lines = [f"# Benchmarks: {meta['device']}", "",
             f"`{meta['command']}` — {meta['date']}, git {(meta['git_sha'] or '?')[:10]}"
             + (" (dirty)" if meta.get("git_dirty") else ""), "",
             f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda_runtime']}, driver {meta['driver']}; "
             f"CPU {meta['cpu_model']} ({meta['cpu_threads']} threads, torch uses {meta['torch_threads']})", "",
             *([f"1-min load average at start: {meta.get('loadavg_1min_at_start')} (CPU timings assume an idle machine)", ""]
               if meta["device_type"] == "cpu" else []),
             f"Measured peaks: copy {peaks.copy_gbps:.0f} GB/s (read + write)"
             + (f", bf16 matmul {peaks.matmul_tflops:.0f} TFLOP/s" if peaks.matmul_tflops else ""), "",
             "GB/s counts the minimal traffic (each input read once, each output written once), TFLOP/s the "
             "op's useful FLOPs; `x eager` is the speed-up over the eager PyTorch reference.", ""]
    for op in dict.fromkeys(r.op for r in results):
        lines += [f"## {op}", "", md_table(*table([r for r in results if r.op == op])), ""]
    if skips:
        lines += ["## Skipped", ""] + [f"- {s.op} / {s.provider} ({s.case}): {s.reason}" for s in skips] + [""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def plot(path: str, results: Sequence[Result], peaks: Peaks, title: str) -> None:
    """Bars per provider per case, one panel per op: GB/s against the measured copy bandwidth
    (dashed), or TFLOP/s against the measured matmul peak for ops counted in FLOPs only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r.op for r in results if r.gbps or r.tflops))
    if not ops:
        return
    fig, axes = plt.subplots(len(ops), 1, figsize=(14, 4.5 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        bw = any(r.gbps for r in results if r.op == op)
        metric = (lambda r: r.gbps) if bw else (lambda r: r.tflops)
        rs = [r for r in results if r.op == op and metric(r)]
        cases = list(dict.fromkeys(f"{r.config}\n{r.dtype} {r.pass_}" for r in rs))
        provs = list(dict.fromkeys(r.provider for r in rs))
        width = 0.8 / len(provs)
        for j, p in enumerate(provs):
            val = {f"{r.config}\n{r.dtype} {r.pass_}": metric(r) for r in rs if r.provider == p}
            ax.bar([i + j * width for i in range(len(cases))], [val.get(c, 0) for c in cases], width, label=p)
        peak, unit = (peaks.copy_gbps, "GB/s") if bw else (peaks.matmul_tflops, "TFLOP/s")
        if peak:
            ax.axhline(peak, ls="--", c="k", lw=1, label=f"{'copy' if bw else 'bf16 matmul'} {peak:.0f} {unit}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], cases, fontsize=7)
        ax.set_ylabel(unit)
        ax.set_title(f"{op} — {title}")
        ax.legend(fontsize=7, ncol=min(len(provs) + 1, 8))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def backend_reason(op: str, backend: str, device: torch.device) -> Optional[str]:
    """Why our ``backend`` of ``op`` is not benchmarked on ``device`` (None when it is)."""
    if backend == "triton" and device.type != "cuda":
        return "Triton only on GPU (the Triton interpreter is not a benchmark target)"
    if backend == "cpu" and device.type != "cpu":
        return "the cpu backend runs CPU tensors (run with --device cpu)"
    import baichuan_kernels as bk
    from baichuan_kernels.registry import Backend, machine_reason

    if backend not in bk.available_backends(op):
        return machine_reason(Backend(backend)) or f"not in available_backends({op!r})"
    return None

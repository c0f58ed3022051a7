"""``python -m benchmarks [op ...] [--device cpu|cuda] [--out DIR] [--quick]``

Runs ``bench_<op>.py`` for the named ops (all of them when none is named), prints a table per op,
and writes ``<name>.json`` (results + metadata + peaks + skipped providers with reasons),
``<name>.md`` and one PNG plot per op (``--one-plot``: a single ``<name>.png``) to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import shlex
import sys
import traceback

import torch

from . import common


def discover() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([here]) if m.name.startswith("bench_"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ops = discover()
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ops", nargs="*", metavar="op", help=f"ops to run (default: all of {ops})")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="bench_out", help="output folder (default: bench_out/)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    ap.add_argument("--name", default="results",
                    help="file stem of the outputs; 'auto' = <device>-<yyyymmdd>, the committed-results naming")
    ap.add_argument("--one-plot", action="store_true", help="one PNG with a panel per op instead of one per op")
    ap.add_argument("--providers", default="",
                    help="comma-separated providers to time (e.g. cuda,triton); the eager reference always runs")
    ap.add_argument("--list", action="store_true", help="list the benchmarked ops and exit")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(ops))
        return 0
    unknown = [o for o in args.ops if o not in ops]
    if unknown:
        ap.error(f"unknown op(s) {unknown}; known: {ops}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA GPU is visible")
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("warning: TRITON_INTERPRET=1 is set; Triton providers are not benchmarked on CPU anyway", file=sys.stderr)

    device = torch.device(args.device)
    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in argv)
    meta = common.collect_meta(device, command)
    print(f"device: {meta['device']}  torch {meta['torch']}  triton {meta['triton']}  git {str(meta['git_sha'])[:10]}")
    load = meta.get("loadavg_1min_at_start")
    if device.type == "cpu" and load is not None and load > 0.5:
        print(f"warning: 1-min load average is {load} before the run: other processes will distort CPU timings",
              file=sys.stderr)
    peaks = common.measure_peaks(device, quick=args.quick)
    print(f"peaks: copy {peaks.copy_gbps:.1f} GB/s" + (f", bf16 matmul {peaks.matmul_tflops:.0f} TFLOP/s" if peaks.matmul_tflops else ""))
    ctx = common.Context(device=device, quick=args.quick, peaks=peaks, cache_bytes=common.cache_bytes(device),
                         cpu_budget_s=0.4 if args.quick else 1.0,
                         providers=tuple(p for p in args.providers.split(",") if p))

    os.makedirs(args.out, exist_ok=True)
    name = common.run_name(meta) if args.name == "auto" else args.name
    stem = os.path.join(args.out, name)
    results, skips, plots, broken = [], [], [], []
    for op in args.ops or ops:
        print(f"\n== {op}")
        try:
            res, sk = importlib.import_module(f"{__package__}.bench_{op}").run(ctx)
        except Exception as exc:  # one broken benchmark must not lose the others
            traceback.print_exc()
            res, sk = [], [common.Skip(op, "*", f"benchmark failed: {type(exc).__name__}: {exc}")]
            broken.append(op)
        results += res
        skips += sk
        print()
        if res:
            print(common.text_table(*common.table(res)))
        for s in sk:
            print(f"skipped {s.provider} ({s.case}): {s.reason}")
        # written after every op: a run stopped by a time limit keeps what it measured
        common.write_json(stem + ".json", meta, peaks, results, skips)
        common.write_markdown(stem + ".md", meta, peaks, results, skips)
        if args.one_plot:
            common.plot(stem + ".png", results, peaks, meta["device"])
            plots = [stem + ".png"]
        elif res:
            plots.append(os.path.join(args.out, f"{op}.png" if name == "results" else f"{name}-{op}.png"))
            common.plot(plots[-1], res, peaks, meta["device"])
    written = [stem + ".json", stem + ".md"] + plots
    print("\nwrote " + ", ".join(p for p in written if os.path.exists(p)))
    if broken:
        print(f"benchmarks that failed: {broken}", file=sys.stderr)
    return 0 if results and not broken else 1

if __name__ == "__main__":
    sys.exit(main())

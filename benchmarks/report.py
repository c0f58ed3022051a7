"""Tables from benchmark JSON files.

    python -m benchmarks.report                       # README performance table from benchmarks/results/*.json
    python -m benchmarks.report --write README.md     # ... replacing the text between the markers
                                                      #     <!-- perf-table:begin --> and <!-- perf-table:end -->
    python -m benchmarks.report --summary RUN.json    # per-row summary of one run (gpu_check.sh prints it last)
    python -m benchmarks.report --merge OUT.json A.json B.json [--git-sha SHA ...]
                                                      # one result file from several runs on one device kind
                                                      # (e.g. a peers run and a --providers cuda run); rows of
                                                      # a later file replace the same rows of an earlier one

The README table has one row per (device, op, shape, dtype, pass): our fastest backend, its GB/s (or
TFLOP/s) and share of the peak measured in the same run, and its speed-up over the eager reference, the
reference under torch.compile and the fastest peer (Liger-Kernel, torch's fused op, ...). Only the
newest file of each device is used. GPU results come first, then CPU results.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Optional

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BEGIN, END = "<!-- perf-table:begin -->", "<!-- perf-table:end -->"


def load(paths: list[str]) -> list[dict]:
    docs = []
    for path in sorted(paths):
        with open(path) as f:
            doc = json.load(f)
        doc["_file"] = os.path.basename(path)
        docs.append(doc)
    newest: dict[str, dict] = {}  # the newest run of each device
    for doc in docs:
        key = doc["meta"]["device"]
        if key not in newest or doc["meta"]["date"] > newest[key]["meta"]["date"]:
            newest[key] = doc
    return list(newest.values())


def _groups(doc: dict) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in doc["results"]:
        groups.setdefault((r["op"], r["config"], r["dtype"], r["pass"]), []).append(r)
    return groups


def _fastest(rows: list[dict], kind: str) -> Optional[dict]:
    rows = [r for r in rows if r["kind"] == kind]
    return min(rows, key=lambda r: r["median_ms"]) if rows else None


def _speedup(ours: dict, other: Optional[dict], label: bool = False) -> str:
    if other is None:
        return "—"
    text = f"{other['median_ms'] / ours['median_ms']:.2f}×"
    return f"{text} ({other['provider']})" if label else text


# FLOP per byte above which an op is reported in TFLOP/s (attention, linear CE) rather than GB/s.
COMPUTE_BOUND_INTENSITY = 16


def _rate(r: dict) -> tuple[str, str]:
    """Throughput and its share of the peak measured in the same run: GB/s of the copy bandwidth
    for memory-bound ops, TFLOP/s of the bf16 matmul for the others."""
    num = lambda v: f"{v:.0f}" if v >= 100 else f"{v:.2g}" if v < 1 else f"{v:.1f}"
    compute_bound = r.get("tflops") and r.get("bytes") and r.get("flops", 0) / r["bytes"] >= COMPUTE_BOUND_INTENSITY
    if r.get("gbps") and not compute_bound:
        return f"{num(r['gbps'])} GB/s", f"{r['pct_copy_bw']:.0f}% copy"
    if r.get("tflops"):
        pct = r.get("pct_peak_tflops")
        return f"{num(r['tflops'])} TFLOP/s", (f"{pct:.0f}% matmul" if pct is not None else "—")
    return "—", "—"


def _device_label(doc: dict) -> str:
    m = doc["meta"]
    return f"{m['device']} ({m['date'][:10]})"


def readme_table(docs: list[dict]) -> str:
    header = ["device", "op", "shape", "dtype", "pass", "ours", "throughput", "of peak", "vs eager", "vs compile", "vs best peer"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    blank = ["—"] * (len(header) - 3)
    for device_type, name in (("cuda", "GPU"), ("cpu", "CPU")):
        picked = [d for d in docs if d["meta"].get("device_type") == device_type]
        if not picked:
            lines.append("| " + " | ".join([name, "—", f"no {name} results committed yet"] + blank) + " |")
            continue
        for doc in picked:
            for (op, config, dtype, pass_), rows in _groups(doc).items():
                ours = _fastest(rows, "ours")
                if ours is None:
                    continue
                by_name = {r["provider"]: r for r in rows}
                rate, pct = _rate(ours)
                cells = [_device_label(doc), op, config, dtype, pass_, ours["provider"], rate, pct,
                         _speedup(ours, by_name.get("eager")), _speedup(ours, by_name.get("compile")),
                         _speedup(ours, _fastest(rows, "peer"), label=True)]
                lines.append("| " + " | ".join(cells) + " |")
    notes = [f"`{d['_file']}`: `{d['meta']['command']}`, torch {d['meta']['torch']}, triton {d['meta']['triton']}, "
             f"git {str(d['meta'].get('git_sha'))[:10]}; copy {d['peaks']['copy_gbps']:.0f} GB/s"
             + (f", bf16 matmul {d['peaks']['matmul_tflops']:.0f} TFLOP/s" if d["peaks"].get("matmul_tflops") else "")
             for d in docs]
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else []))


def summary(doc: dict) -> str:
    """Our providers, one row per case and one table per op, with the speed-up over every baseline
    and peer of that op."""
    from .common import text_table

    peaks = doc["peaks"]
    out = [f"{doc['meta']['device']}: copy {peaks['copy_gbps']:.0f} GB/s"
           + (f", bf16 matmul {peaks['matmul_tflops']:.0f} TFLOP/s" if peaks.get("matmul_tflops") else "")]
    for op in dict.fromkeys(r["op"] for r in doc["results"]):
        results = [r for r in doc["results"] if r["op"] == op]
        others = list(dict.fromkeys(r["provider"] for r in results if r["kind"] != "ours"))
        header = ["op", "provider", "shape", "dtype", "pass", "ms", "throughput", "of peak"] + [f"x {o}" for o in others]
        rows = []
        for (_, config, dtype, pass_), group in _groups({"results": results}).items():
            by_name = {r["provider"]: r for r in group}
            for r in group:
                if r["kind"] == "ours":
                    rows.append([op, r["provider"], config, dtype, pass_, f"{r['median_ms']:.3f}", *_rate(r)]
                                + [_speedup(r, by_name.get(o)).rstrip("×") for o in others])
        out.append(text_table(header, rows) if rows else f"{op}: no results of our backends")
    return "\n\n".join(out)


def merge(paths: list[str], shas: Optional[list[str]] = None) -> dict:
    """Several runs of one device kind → one document. Each run's metadata (date, sha, command, peaks,
    driver) is kept under meta["runs"]; the last run's metadata and peaks head the document. ``shas``
    corrects a run's git sha (a copied tree's stale .git) in the same order as ``paths``."""
    docs = []
    for i, path in enumerate(paths):
        with open(path) as f:
            doc = json.load(f)
        if shas and i < len(shas) and shas[i]:
            doc["meta"]["git_sha"], doc["meta"]["git_dirty"] = shas[i], False
        docs.append(doc)
    devices = {d["meta"]["device"] for d in docs}
    if len(devices) != 1:
        raise SystemExit(f"--merge: runs of different devices {sorted(devices)}")
    rows: dict[tuple, dict] = {}
    for doc in docs:
        for r in doc["results"]:
            rows[(r["op"], r["provider"], r["config"], r["dtype"], r["pass"])] = r
    timed = {(r["op"], r["provider"]) for r in rows.values()}
    skipped = {(s["op"], s["provider"], s["case"]): s for d in docs for s in d["skipped"]
               if (s["op"], s["provider"]) not in timed}
    meta = dict(docs[-1]["meta"])
    meta["runs"] = [{k: d["meta"].get(k) for k in ("date", "git_sha", "git_dirty", "command", "driver", "torch",
                                                   "triton")} | {"peaks": d["peaks"]} for d in docs]
    meta["command"] = " + ".join(d["meta"]["command"] for d in docs)
    meta["git_sha"] = docs[-1]["meta"]["git_sha"]
    return {"meta": meta, "peaks": docs[-1]["peaks"], "results": list(rows.values()), "skipped": list(skipped.values())}


def write_merged(doc: dict, out_json: str) -> None:
    from . import common  # torch: only for writing

    with open(out_json, "w") as f:
        json.dump(doc, f, indent=1)
    results = [common.Result(**{("pass_" if k == "pass" else k): v for k, v in r.items()}) for r in doc["results"]]
    skips = [common.Skip(**s) for s in doc["skipped"]]
    common.write_markdown(out_json[:-len(".json")] + ".md", doc["meta"], common.Peaks(**doc["peaks"]), results, skips)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=RESULTS_DIR, help="folder of committed <device>-<yyyymmdd>.json files")
    ap.add_argument("--write", metavar="README", help="replace the table between the perf-table markers in this file")
    ap.add_argument("--summary", metavar="JSON", help="print the summary of one run instead")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="OUT.json IN.json [IN.json ...]: merge runs")
    ap.add_argument("--git-sha", nargs="*", default=None, help="with --merge: the true sha of each input, in order")
    args = ap.parse_args(argv)
    if args.merge:
        if len(args.merge) < 3:
            ap.error("--merge OUT.json IN.json IN.json ...")
        write_merged(merge(args.merge[1:], args.git_sha), args.merge[0])
        return 0
    if args.summary:
        with open(args.summary) as f:
            print(summary(json.load(f)))
        return 0
    table = readme_table(load(glob.glob(os.path.join(args.results, "*.json"))))
    if not args.write:
        print(table)
        return 0
    with open(args.write) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        print(f"{args.write} has no {BEGIN} ... {END} markers", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(args.write, "w") as f:
        f.write(f"{head}{BEGIN}\n{table}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

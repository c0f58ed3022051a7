"""Every CUDA kernel of baichuan_kernels under compute-sanitizer (memcheck, racecheck), at small odd shapes.

    python -m benchmarks.sanitize [--tools memcheck,racecheck] [--log FILE] [--timeout S]
        for each tool: ``compute-sanitizer --tool T --kernel-name kns=baichuan ... python -m
        benchmarks.sanitize --workload``; prints one line per tool (clean / UNCLEAN / error) and exits
        non-zero unless every tool ran clean. The full sanitizer output goes to FILE.
    python -m benchmarks.sanitize --workload [--backends cuda,triton]
        the workload alone: every op through its CUDA kernels (forward, and backward where the op has a
        CUDA backward), each result compared with the reference backend; exits non-zero on a mismatch.

The workload runs with PYTORCH_NO_CUDA_MEMORY_CACHING=1, so each tensor is its own cudaMalloc and an
access past a tensor's end is an access outside any allocation, which memcheck reports (with the caching
allocator it would usually land in a neighbouring block of the same segment and go unseen). Only kernels
whose names contain ``baichuan`` (namespace ``baichuan::``, every kernel of csrc/cuda) are instrumented;
``--backends cuda,triton`` also runs the Triton kernels and then instruments every kernel.
Run on a GPU machine; benchmarks/gpu_check.sh calls it after the GPU tests.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import time


# ---------------------------------------------------------------------------------------------------
# The workload (runs inside compute-sanitizer)
# ---------------------------------------------------------------------------------------------------

def _cases(torch, bk, dev):
    """(name, fn(backend) -> tensor or tuple of tensors). Shapes are small and odd on purpose: partial
    tiles, tails shorter than a vector, rows shorter than a block."""
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, dtype=torch.bfloat16, scale=1.0, grad=False):
        t = (torch.randn(*shape, device=dev, generator=g) * scale).to(dtype)
        return t.requires_grad_(grad)

    def fwd_bwd(fn, *inputs):
        """Forward, then backward of a fixed random cotangent: (output, grad of every input)."""
        def run(backend):
            xs = [x.detach().clone().requires_grad_(True) for x in inputs]
            out = fn(*xs, backend=backend)
            outs = out if isinstance(out, tuple) else (out,)
            cot = [torch.randn(o.shape, device=dev, generator=torch.Generator(device=dev).manual_seed(1))
                   .to(o.dtype) for o in outs]
            torch.autograd.backward(outs, cot)
            return (*outs, *[x.grad for x in xs])
        return run

    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tag = str(dtype).replace("torch.", "")
        x, w, r = rnd(37, 1000, dtype=dtype), rnd(1000, dtype=dtype), rnd(37, 1000, dtype=dtype)
        cases.append((f"rms_norm {tag} [37, 1000]", fwd_bwd(lambda x, w, backend: bk.rms_norm(x, w, backend=backend), x, w)))
        cases.append((f"rms_norm+residual {tag}", fwd_bwd(
            lambda x, w, r, backend: bk.rms_norm(x, w, residual=r, backend=backend), x, w, r)))
        gate, up = rnd(37, 1001, dtype=dtype), rnd(37, 1001, dtype=dtype)
        cases.append((f"swiglu {tag} [37, 1001]", fwd_bwd(lambda a, b, backend: bk.swiglu(a, b, backend=backend), gate, up)))
        h = rnd(37, 2 * 1001, dtype=dtype)
        cases.append((f"swiglu packed {tag} [37, 2002]", fwd_bwd(lambda h, backend: bk.swiglu(h, backend=backend), h)))
        cos, sin = bk.rope_cos_sin(40, 128, device=dev)
        q, k = rnd(2, 17, 3, 128, dtype=dtype), rnd(2, 17, 3, 128, dtype=dtype)
        pos = torch.randint(0, 40, (2, 17), device=dev, generator=g)
        cases.append((f"apply_rope {tag} [2, 17, 3, 128] position_ids", fwd_bwd(
            lambda q, k, backend: bk.apply_rope(q, k, cos, sin, position_ids=pos, backend=backend), q, k)))
        cases.append((f"apply_rope_ (in place) {tag}", lambda backend, q=q, k=k: bk.apply_rope_(
            q.clone(), k.clone(), cos[:17], sin[:17], backend=backend)))
        qkv = rnd(2, 17, 3 * 4 * 128, dtype=dtype)
        cases.append((f"split_qkv_rope {tag} [2, 17, 1536]", fwd_bwd(
            lambda qkv, backend: bk.split_qkv_rope(qkv, cos[:17], sin[:17], num_heads=4, backend=backend), qkv)))
        wv = rnd(1001, 256, dtype=dtype)
        cases.append((f"norm_head_weight {tag} [1001, 256]", fwd_bwd(lambda w, backend: bk.norm_head_weight(w, backend=backend), wv)))
        hid = rnd(37, 256, dtype=dtype)
        labels = torch.randint(0, 1001, (37,), device=dev, generator=g)
        labels[::5] = -100
        cases.append((f"linear_cross_entropy {tag} N=37 V=1001 D=256 z=1e-4", fwd_bwd(
            lambda h, w, backend: bk.linear_cross_entropy(h, w, labels, z_loss_weight=1e-4, backend=backend)[0], hid, wv)))

    for dtype in (torch.bfloat16, torch.float16):
        tag = str(dtype).replace("torch.", "")
        for dh in (64, 128):
            q, k, v = (rnd(2, 77, 4, dh, dtype=dtype) for _ in range(3))
            slopes = bk.alibi_slopes(4).to(dev)
            for causal, alibi in ((True, None), (True, slopes), (False, slopes)):
                name = f"attention {tag} [2, 77, 4, {dh}] causal={causal} alibi={alibi is not None}"
                cases.append((name, lambda backend, q=q, k=k, v=v, c=causal, a=alibi: bk.attention(
                    q, k, v, causal=c, alibi_slopes=a, backend=backend)))
            cu = torch.tensor([0, 5, 77, 130], device=dev, dtype=torch.int32)
            qp, kp, vp = (rnd(130, 4, dh, dtype=dtype) for _ in range(3))
            cases.append((f"attention packed {tag} cu_seqlens [0, 5, 77, 130] Dh={dh}", lambda backend, q=qp, k=kp, v=vp, cu=cu: bk.attention(
                q, k, v, causal=True, alibi_slopes=slopes, cu_seqlens=cu, max_seqlen=72, backend=backend)))
            qd = rnd(3, 1, 4, dh, dtype=dtype)
            kc, vc = rnd(3, 300, 4, dh, dtype=dtype), rnd(3, 300, 4, dh, dtype=dtype)
            lens = torch.tensor([1, 150, 300], device=dev, dtype=torch.int32)
            for alibi in (None, slopes):
                cases.append((f"decode_attention {tag} cache [3, 300, 4, {dh}] lens [1, 150, 300] alibi={alibi is not None}",
                              lambda backend, q=qd, kc=kc, vc=vc, a=alibi: bk.decode_attention(
                                  q, kc, vc, lens, alibi_slopes=a, backend=backend)))
        for bits, group in ((8, 128), (4, 128), (4, 64)):
            qw = bk.quantize_weight(rnd(1000, 512, dtype=torch.float32), bits=bits, group_size=group)
            for m in (1, 3, 16):
                xq = rnd(m, 512, dtype=dtype)
                cases.append((f"quant_matmul W{bits} g{group} {tag} M={m} N=1000 K=512",
                              lambda backend, x=xq, qw=qw: bk.quant_matmul(x, qw, backend=backend)))
    return cases


def _rel_err(torch, out, ref) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def workload(backends, device) -> int:
    import torch

    import baichuan_kernels as bk

    if device == "cuda" and not torch.cuda.is_available():
        print("sanitize --workload: no CUDA device", file=sys.stderr)
        return 2
    failures = 0
    ran = 0
    for name, fn in _cases(torch, bk, device):
        ref = fn("reference")
        ref = ref if isinstance(ref, tuple) else (ref,)
        for backend in backends:
            t0 = time.perf_counter()
            try:
                out = fn(backend)
                if device == "cuda":
                    torch.cuda.synchronize()
            except (ValueError, TypeError, RuntimeError) as exc:
                msg = str(exc).splitlines()[0][:140]
                if "cannot run these inputs" in msg:  # the registry: this backend's declared limits
                    print(f"  skip  {backend:6s} {name}: {msg}")
                    continue
                print(f"  FAIL  {backend:6s} {name}: {type(exc).__name__}: {msg}")
                failures += 1
                continue
            out = out if isinstance(out, tuple) else (out,)
            tol = 1e-4 if "float32" in name else 3e-2
            errs = [_rel_err(torch, o, r) for o, r in zip(out, ref)]
            ok = len(out) == len(ref) and max(errs) <= tol
            failures += not ok
            ran += 1
            print(f"  {'ok  ' if ok else 'FAIL'}  {backend:6s} {name}: max rel err {max(errs):.2e} "
                  f"({time.perf_counter() - t0:.2f}s)")
    print(f"workload: {ran} runs, {failures} failures")
    return 1 if failures or not ran else 0


# ---------------------------------------------------------------------------------------------------
# The driver (runs compute-sanitizer once per tool)
# ---------------------------------------------------------------------------------------------------

def _sanitizer() -> str:
    """compute-sanitizer on PATH, else under $CUDA_HOME or /usr/local/cuda ("" when none)."""
    roots = [r for r in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if r]
    candidates = [shutil.which("compute-sanitizer") or ""]
    candidates += [os.path.join(r, sub, "compute-sanitizer") for r in roots for sub in ("compute-sanitizer", "bin")]
    return next((c for c in candidates if c and os.path.exists(c)), "")


def _run_tool(exe, tool, backends, timeout, log, use_filter):
    cmd = [exe, "--tool", tool, "--error-exitcode", "99", "--print-limit", "30", "--target-processes", "all"]
    if use_filter:
        cmd += ["--kernel-name", "kns=baichuan"]
    cmd += [sys.executable, "-m", "benchmarks.sanitize", "--workload", "--backends", ",".join(backends)]
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1", PYTHONUNBUFFERED="1")
    log.write(f"\n===== {tool}: {' '.join(cmd)}\n")
    log.flush()
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout, env=env)
        out, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, rc = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), None
    log.write(out)
    log.flush()
    return out, rc, time.time() - t0


# memcheck: "ERROR SUMMARY: 0 errors"; racecheck: "RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)"
_SUMMARY = re.compile(r"SUMMARY: (?:\d+ hazards? displayed \()?(\d+) errors?")


def drive(tools, backends, timeout, log_path) -> int:
    exe = _sanitizer()
    if not exe:
        print("compute-sanitizer: not found (PATH, $CUDA_HOME, /usr/local/cuda)")
        return 2
    use_filter = "triton" not in backends
    rows, bad = [], 0
    deadline = time.time() + timeout
    with open(log_path, "w") as log:
        for tool in tools:
            left = deadline - time.time()
            if left < 10:
                rows.append((tool, "not run (time)", "", ""))
                bad += 1
                continue
            out, rc, dt = _run_tool(exe, tool, backends, left, log, use_filter)
            summary = _SUMMARY.search(out)
            if summary is None and use_filter and rc not in (None, 0) and "workload:" not in out:
                # an older/newer compute-sanitizer that rejects the kernel filter: instrument everything
                out, rc, dt2 = _run_tool(exe, tool, backends, deadline - time.time(), log, False)
                summary, dt = _SUMMARY.search(out), dt + dt2
            work = re.search(r"workload: (\d+) runs, (\d+) failures", out)
            errors = int(summary.group(1)) if summary else None
            if rc is None:
                verdict = "TIMED OUT"
            elif not work or work.group(1) == "0":
                verdict = "error (no kernel ran)"
            elif errors:
                verdict = f"UNCLEAN ({errors} errors)"
            elif work.group(2) != "0":
                verdict = f"WRONG ({work.group(2)} results)"
            elif errors == 0 and rc == 0:
                verdict = "clean"
            else:
                verdict = f"error (exit {rc})"
            bad += verdict != "clean"
            rows.append((tool, verdict, work.group(0) if work else "workload did not finish", f"{dt:.0f}s"))
    table = [f"compute-sanitizer ({exe}), backends {','.join(backends)}, kernels "
             f"{'named *baichuan*' if use_filter else 'all'}; full output: {log_path}"]
    table += [f"  {tool:10s} {verdict:22s} {work:34s} {dt}" for tool, verdict, work, dt in rows]
    print("\n".join(table))
    with open(log_path, "a") as log:
        log.write("\n===== verdict\n" + "\n".join(table) + "\n")
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", action="store_true", help="run the kernels only (what the sanitizer runs)")
    p.add_argument("--backends", default="cuda", help="comma-separated: cuda, triton")
    p.add_argument("--device", default="cuda", help="cpu: a dry run of the workload (--backends cpu)")
    p.add_argument("--tools", default="memcheck,racecheck")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for all tools together")
    p.add_argument("--log", default="sanitize.log")
    args = p.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    if args.workload:
        return workload(backends, args.device)
    return drive([t for t in args.tools.split(",") if t], backends, args.timeout, args.log)


if __name__ == "__main__":
    sys.exit(main())

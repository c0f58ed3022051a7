#!/usr/bin/env bash
# CI, CUDA-build stage (CPU machine, no GPU): build the full CUDA extension against the CUDA build of
# torch and check that every CUDA implementation is registered. Compile + link + import; nothing runs
# on a GPU.
#
#   1. a second venv ($BK_CUDA_VENV, default /tmp/bk-cuda-venv) with torch==2.14.1 (CUDA 13 build,
#      ~5.4 GB from local disk); reused when it already holds that torch
#   2. a copy of the repository's sources (tracked + untracked, not ignored: no .venv, build/, *.so)
#      in a temporary folder, so the build touches nothing in the work tree
#   3. `pip install --no-build-isolation --no-deps .` there with CUDA_HOME, TORCH_CUDA_ARCH_LIST="8.0;9.0a",
#      MAX_JOBS=2
#   4. from a folder outside the sources: build_info() says CUDA with 9.0a; every baichuan:: op that
#      a csrc/cuda/*.cu registers (m.impl("name", ...) under TORCH_LIBRARY_IMPL(baichuan, CUDA, m)) has
#      a CUDA kernel, and rms_norm_fwd / rms_norm_bwd have CPU and CUDA kernels.
# Exits non-zero on any failure; prints the time of each step.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${BK_CUDA_VENV:-/tmp/bk-cuda-venv}"
TORCH_SPEC="torch==2.14.1"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}"
export MAX_JOBS="${MAX_JOBS:-2}"

t_start=$(date +%s)
t_step=$t_start
step() {  # step NAME: print the time of the previous step and announce the next
  local now; now=$(date +%s)
  echo "[cuda-stage] ${1} (previous step $((now - t_step)) s, total $((now - t_start)) s)"
  t_step=$now
}

if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "[cuda-stage] FAIL: no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)" >&2
  exit 1
fi

step "venv $VENV with $TORCH_SPEC"
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.14.1')" 2>/dev/null; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" "numpy<2.4" ninja pybind11 setuptools wheel
fi
"$VENV/bin/python" -c "import torch; print('[cuda-stage] torch', torch.__version__, 'CUDA', torch.version.cuda)"

step "copy the sources"
SRC="$(mktemp -d /tmp/bk-cuda-src.XXXXXX)"
CHECK_DIR="$(mktemp -d /tmp/bk-cuda-check.XXXXXX)"
trap 'rm -rf "$SRC" "$CHECK_DIR"' EXIT
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # tracked + untracked files that .gitignore does not exclude, minus any that were deleted
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
     | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
     | tar --null -T - -cf -) | tar -xf - -C "$SRC"
else
  tar -C "$REPO" --exclude=.venv --exclude=build --exclude='*.so' --exclude='*.egg-info' --exclude=.git \
    -cf - . | tar -xf - -C "$SRC"
fi
echo "[cuda-stage] $(find "$SRC" -type f | wc -l) files in $SRC"

step "build (CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS)"
"$VENV/bin/python" -m pip uninstall -q -y baichuan-kernels >/dev/null 2>&1 || true  # a reused venv
if (cd "$SRC" && "$VENV/bin/python" -m pip install -v --no-build-isolation --no-deps . >"$SRC/build.log" 2>&1); then
  grep -E "^\[baichuan_kernels\]" "$SRC/build.log" || true
  echo "[cuda-stage] $(grep -ci warning "$SRC/build.log" || true) warning lines in the build log; ours (csrc/):"
  grep -i warning "$SRC/build.log" | grep "csrc/" | head -n 20 || true
  tail -n 2 "$SRC/build.log"
else
  tail -n 200 "$SRC/build.log"
  echo "[cuda-stage] FAIL: build" >&2
  exit 1
fi

step "check the registrations (from $CHECK_DIR)"
cd "$CHECK_DIR"
BK_CUDA_SOURCES="$REPO/csrc/cuda" "$VENV/bin/python" - <<'PY'
import glob
import os
import re
import sys

import torch

import baichuan_kernels as bk

failures = []
info = bk.build_info()
print(f"[cuda-stage] build_info: {info}")
print(f"[cuda-stage] imported from {os.path.dirname(bk.__file__)}")
if not (info.get("cuda") and "9.0a" in str(info.get("cuda_archs"))):
    failures.append(f"build_info() should report CUDA with arch 9.0a, got {info}")

# Ops a csrc/cuda/*.cu implements: m.impl("name", ...) inside TORCH_LIBRARY_IMPL(baichuan, CUDA, m).
def impl_blocks(text):
    """Bodies of the TORCH_LIBRARY_IMPL(baichuan, CUDA, m) { ... } blocks (braces matched)."""
    for m in re.finditer(r"TORCH_LIBRARY_IMPL\(\s*baichuan\s*,\s*CUDA\s*,\s*\w+\s*\)\s*\{", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        yield text[m.end():i]


cuda_ops = set()
for path in sorted(glob.glob(os.path.join(os.environ["BK_CUDA_SOURCES"], "*.cu"))):
    for block in impl_blocks(open(path).read()):
        cuda_ops.update(re.findall(r'\.impl\(\s*"([\w.]+)"', block))

all_ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("baichuan::"))
has = torch._C._dispatch_has_kernel_for_dispatch_key
print(f"[cuda-stage] {len(all_ops)} baichuan ops registered; {len(cuda_ops)} implemented in csrc/cuda")
print(f"  {'op':40s} CPU   CUDA  (csrc/cuda)")
for name in all_ops:
    short = name.split("::", 1)[1].split(".")[0]
    cpu, cuda = has(name, "CPU"), has(name, "CUDA")
    print(f"  {name:40s} {str(cpu):5s} {str(cuda):5s} {'yes' if short in cuda_ops else ''}")
    if short in cuda_ops and not cuda:
        failures.append(f"{name}: csrc/cuda implements it but no CUDA kernel is registered")
for short in sorted(cuda_ops):
    if f"baichuan::{short}" not in all_ops:
        failures.append(f"baichuan::{short}: csrc/cuda implements it but the op has no schema")
for name in ("baichuan::rms_norm_fwd", "baichuan::rms_norm_bwd"):
    for key in ("CPU", "CUDA"):
        if name not in all_ops or not has(name, key):
            failures.append(f"{name} has no {key} kernel")

if failures:
    print("[cuda-stage] FAIL:\n  " + "\n  ".join(failures), file=sys.stderr)
    sys.exit(1)
print("[cuda-stage] all CUDA implementations are registered")
PY

step "done"

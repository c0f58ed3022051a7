#!/usr/bin/env bash
# The one script for a GPU machine (H100/H200, no internet): build the extension for sm_90a, run the
# GPU tests, run every benchmark, print a summary table LAST. Each step is time-boxed (≤ 8 minutes in
# all on an H100) and a failed step does not stop the next; the exit code is non-zero if any failed.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          OUT_DIR: $1, else $OUT, else ./gpu_out
#
# Writes few files (the device tool returns at most 8, at most 2 folders deep):
#   OUT_DIR/gpu_check.log                        everything printed below
#   OUT_DIR/build.log, OUT_DIR/tests.log         the build and pytest logs
#   OUT_DIR/sanitize.log                         compute-sanitizer memcheck + racecheck of every CUDA kernel
#   OUT_DIR/backtrace.log                        a raw CUDA op's bad-input error run under cuda-gdb
#   OUT_DIR/profile_step.md                      one profiled 7B training step (also in gpu_check.log)
#   OUT_DIR/bench/<device>-<yyyymmdd>.json|.md|.png   results (committable: benchmarks/results/README.md)
#
# Python wheels the image lacks (liger-kernel, ...) travel in .whl/*.whl and are installed with
# --no-index --no-deps into /tmp/site (PYTHONPATH). Limits in seconds are overridable: BUILD_TIMEOUT (150),
# TEST_TIMEOUT (120; TEST_K="not triton" selects tests with -k), SANITIZE_TIMEOUT (90), BENCH_TIMEOUT (150), MODEL_TIMEOUT (60),
# PROFILE_TIMEOUT (60), MODEL_COMPILE_TIMEOUT (150), and TOTAL_BUDGET (565)
# caps them all together: a step gets at most what is left of it (steps run in order of priority).
# PYTHON picks the interpreter (python3).
# Where the tree was copied without .git, name the commit for the metadata: BENCH_GIT_SHA=<sha>.
# Measured on an H200 (2026-11-26, benchmarks/results/h200-20261126-run*.log): build 61 s; GPU tests
# without Triton (TEST_K="not triton") 58 s on 8 xdist workers; sanitize 24 s; benchmarks with every
# provider > 150 s (reached linear_ce of 7 ops), --providers cuda 78 s; bench-model 20 s. A start
# costs 1-2 device-minutes: with 15 minutes, plan one full call, or two that split the benchmarks
# (BENCH_OPS / BENCH_ARGS="--providers ...") and merge them (python -m benchmarks.report --merge).
# Dry run of the non-GPU parts on a CPU machine:
#   SKIP="build tests sanitize" BENCH_ARGS="--device cpu --quick" PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh /tmp/g
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-./gpu_out}}
mkdir -p "$OUT_DIR/bench"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

STATUS=()
NFAILED=0
T_START=$SECONDS
TOTAL_BUDGET=${TOTAL_BUDGET:-565}

# run_step NAME LIMIT_S LOGFILE|- CMD...: time-boxed; a log file gets the output and its tail is shown
run_step() {
    local name=$1 limit=$2 log=$3 rc t0=$SECONDS
    local left=$((TOTAL_BUDGET - (SECONDS - T_START) - 10))
    shift 3
    echo
    if [[ " ${SKIP:-} " == *" ${name%% *} "* ]]; then
        echo "=== $name: skipped (SKIP=$SKIP) ==="
        STATUS+=("skipped $name")
        return 0
    fi
    if [ "$left" -lt 20 ]; then
        echo "=== $name: not run (TOTAL_BUDGET=${TOTAL_BUDGET}s spent) ==="
        STATUS+=("FAILED  $name (not run: total budget spent)")
        NFAILED=$((NFAILED + 1))
        return 1
    fi
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    echo "=== $name (limit ${limit}s) ==="
    if [ "$log" = "-" ]; then
        timeout -s INT -k 15 "$limit" "$@"
        rc=$?
    else
        timeout -s INT -k 15 "$limit" "$@" >"$log" 2>&1
        rc=$?
        tail -n 30 "$log"
    fi
    local dt=$((SECONDS - t0)) why="exit $rc"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then why="timed out after ${limit}s"; fi
    if [ "$rc" -eq 0 ]; then
        STATUS+=("ok      $name (${dt}s)")
    else
        STATUS+=("FAILED  $name (${dt}s, $why)")
        NFAILED=$((NFAILED + 1))
    fi
    return "$rc"
}

main() {
    echo "=== machine ==="
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi || echo "nvidia-smi: not available"
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
    echo "host compilers: CC=${CC:-unset} CXX=${CXX:-unset}; $(command -v g++): $(g++ --version 2>/dev/null | head -n 1)"
    git log -1 --format='git %H %s' 2>/dev/null || echo "git: no repository here; BENCH_GIT_SHA=${BENCH_GIT_SHA:-unset}"

    if compgen -G ".whl/*.whl" >/dev/null; then
        run_step "wheels from .whl/" 60 - \
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    "$PY" - <<'EOF'
import sys, torch, triton
print(f"python {sys.version.split()[0]}  torch {torch.__version__} (CUDA {torch.version.cuda})  triton {triton.__version__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB, "
          f"L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
try:
    import liger_kernel.ops.rms_norm  # noqa: F401
    from importlib.metadata import version
    print("liger-kernel", version("liger-kernel"))
except Exception as exc:
    print(f"liger-kernel: not importable ({type(exc).__name__})")
try:  # attention peer (bench_attention.py) and GPU cross-check, when its wheel travels in .whl/
    import xformers
    print("xformers", xformers.__version__)
except Exception as exc:
    print(f"xformers: not importable ({type(exc).__name__})")
EOF

    # The build: editable install, else an in-place build; then the CUDA kernels must be there.
    run_step "build the extension (sm_90a)" "${BUILD_TIMEOUT:-150}" "$OUT_DIR/build.log" bash -c '
        export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
        "$0" setup.py build_ext --inplace || exit 1  # (the image has no index: pip -e would need build deps)
        "$0" -c "import baichuan_kernels as bk; i = bk.build_info(); print(i); \
print(\"rms_norm backends:\", bk.available_backends(\"rms_norm\")); assert i[\"cuda\"], \"built without CUDA\""
    ' "$PY"

    # GPU tests only (the CPU ones ran in CI); Triton JIT-compiles in parallel over xdist workers.
    local xdist=()
    "$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8)
    "$PY" -c "import pytest_timeout" 2>/dev/null && xdist+=(--timeout 90)
    run_step "tests on the GPU" "${TEST_TIMEOUT:-120}" "$OUT_DIR/tests.log" \
        "$PY" -m pytest tests -q -m "(cuda or gpu_check) and not slow" -p no:cacheprovider --maxfail=30 -rfE --tb=short "${xdist[@]}" ${TEST_K:+-k "$TEST_K"}

    # The H200 run of 687c618 segfaulted where a raw CUDA op should raise (head dim 32 given to
    # torch.ops.baichuan.attention_fwd). The host-side backtrace of that call, when cuda-gdb is there.
    run_step "raw-op error under cuda-gdb" 45 "$OUT_DIR/backtrace.log" bash -c '
        command -v cuda-gdb >/dev/null || { echo "cuda-gdb: not on PATH"; exit 0; }
        cuda-gdb -q -batch -ex "set pagination off" -ex run -ex "bt 40" --args "$0" -c "
import torch, baichuan_kernels
q = torch.randn(5, 2, 32, device=\"cuda\", dtype=torch.float16)
cu = torch.tensor([0, 5], device=\"cuda\", dtype=torch.int32)
try:
    torch.ops.baichuan.attention_fwd(q, q, q, cu, None, 0.1, True, 5)
    print(\"PROBE: no error raised\")
except RuntimeError as e:
    print(\"PROBE: raised:\", str(e).splitlines()[0])
"' "$PY"

    # Every CUDA kernel under compute-sanitizer memcheck + racecheck at small shapes (clean / UNCLEAN).
    local st=${SANITIZE_TIMEOUT:-90}
    run_step "sanitize (compute-sanitizer memcheck, racecheck)" "$st" - \
        "$PY" -m benchmarks.sanitize --tools memcheck,racecheck --timeout $((st - 5)) --log "$OUT_DIR/sanitize.log"

    # shellcheck disable=SC2086  # BENCH_ARGS is a list of words (e.g. "--providers cuda,triton --quick")
    # Ops in order of priority: a time-out keeps the results of the ops already measured.
    run_step "benchmarks" "${BENCH_TIMEOUT:-150}" - \
        "$PY" -m benchmarks --device cuda ${BENCH_ARGS:-} ${BENCH_OPS:-rms_norm swiglu rope attention decode_attention linear_ce quant_matmul} \
        --out "$OUT_DIR/bench" --name auto --one-plot

    # A 7B training step (fp32 master weights + AdamW, bf16 autocast) at seq 4096; 8 of 32 layers fit
    # one GPU with the optimizer state (the full model needs ~120 GB of it). Prints tokens/s and MFU.
    run_step "bench-model 7b (8 layers, seq 4096)" "${MODEL_TIMEOUT:-60}" - \
        "$PY" -m minitrain bench-model --preset 7b --layers 8 --seq 4096 --batch 1 --steps 2

    # One profiled step of the same model: top-20 kernels and the breakdown into attention, GEMM,
    # norms/activations, loss, optimizer, recompute, idle (printed here and in OUT_DIR/profile_step.md).
    run_step "profile 7b step (8 layers, seq 4096)" "${PROFILE_TIMEOUT:-60}" - \
        "$PY" -m benchmarks.profile_step --preset 7b --layers 8 --seq 4096 --batch 1 --out "$OUT_DIR"

    # The step with every decoder layer under torch.compile(fullgraph=True) over the custom ops.
    run_step "bench-model 7b compiled (8 layers, seq 4096)" "${MODEL_COMPILE_TIMEOUT:-150}" - \
        "$PY" -m minitrain bench-model --preset 7b --layers 8 --seq 4096 --batch 1 --steps 2 --compile

    # Decode tokens/s of the 7B shapes (4 layers + embedding + head), bf16 and W4/W8/NF4, batch 1 and 16.
    run_step "bench-decode 7b (4 layers)" "${DECODE_TIMEOUT:-60}" - \
        "$PY" -m minitrain bench-decode --preset 7b --layers 4 --batch 1 16 --steps 32

    echo
    echo "=== steps (total $((SECONDS - T_START))s) ==="
    printf '%s\n' "${STATUS[@]}"
    local json
    json=$(ls -t "$OUT_DIR"/bench/*.json 2>/dev/null | head -n 1)
    echo
    echo "=== GPU tests ==="
    grep -E "^(FAILED|ERROR) " "$OUT_DIR/tests.log" 2>/dev/null | cut -c1-200 | head -n 25
    tail -n 1 "$OUT_DIR/tests.log" 2>/dev/null
    echo
    echo "=== raw-op error probe ==="
    grep -E "^PROBE|SIGSEGV|^#[0-9]+ " "$OUT_DIR/backtrace.log" 2>/dev/null | cut -c1-200 | head -n 25
    echo
    echo "=== sanitizer ==="
    sed -n '/^===== verdict/,$p' "$OUT_DIR/sanitize.log" 2>/dev/null | tail -n +2
    echo
    echo "=== summary ==="
    if [ -n "$json" ]; then
        "$PY" -m benchmarks.report --summary "$json" || NFAILED=$((NFAILED + 1))
    else
        echo "no benchmark results"
    fi
    return $((NFAILED > 0))
}

main "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"

#!/usr/bin/env bash
# CI, install stage: the README's Install section, literally, on a fresh machine's Python.
#
#   1. the ```bash block of the README's "## Install" section, run as written in the repository root:
#      a fresh .venv made by the system python3 with ITS OWN pip (no upgrade: pip 23.2.1 here), torch,
#      the build requirements, the editable build of baichuan_kernels._C with the `train` extra
#   2. from a folder outside the sources: .ci/smoke.py (every op once on the CPU, `_C` loaded, imported
#      from this clone) and the `minitrain` console script: `minitrain train --max-steps 3`
#   3. the wheel (`pip wheel --no-build-isolation --no-deps`, the README's "Other ways"; reuses the
#      objects of step 1) installed into a second fresh venv whose pip is upgraded to the newest, with
#      its own torch; the smoke test again, imported from that venv's site-packages
#   4. `make deps`: the test dependencies into .venv, and the Makefile's stamp, so that the test stage
#      (`make test`) runs in the venv the README made instead of building _C a second time
# Exits non-zero on any failure; prints the time of each step.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
export MAX_JOBS="${MAX_JOBS:-2}"
WHEEL_VENV="${BK_WHEEL_VENV:-/tmp/bk-wheel-venv}"
OUTSIDE="$(mktemp -d)"
trap 'rm -rf "$OUTSIDE"' EXIT

t_start=$(date +%s)
t_step=$t_start
step() {
  local now; now=$(date +%s)
  echo "[install-stage] ${1} (previous step $((now - t_step)) s, total $((now - t_start)) s)"
  t_step=$now
}

step "1. README Install block, literally ($(python3 --version), $(python3 -m pip --version | cut -d' ' -f1-2))"
rm -rf .venv
awk '/^## Install/{s=1; next} s && /^## /{exit} s && /^```bash/{b=1; next} b && /^```/{exit} b' README.md \
  > "$OUTSIDE/install.sh"
test -s "$OUTSIDE/install.sh" || { echo "[install-stage] FAIL: no bash block under '## Install' in README.md" >&2; exit 1; }
sed 's/^/    /' "$OUTSIDE/install.sh"
bash -euo pipefail "$OUTSIDE/install.sh"
.venv/bin/python -m pip --version

step "2. smoke test + minitrain train --max-steps 3 (from $OUTSIDE)"
(cd "$OUTSIDE" && "$REPO/.venv/bin/python" "$REPO/.ci/smoke.py" --expect-path "$REPO")
(cd "$OUTSIDE" && "$REPO/.venv/bin/minitrain" train --max-steps 3 --corpus-max-bytes 60000 --vocab-size 512 \
  --seq-len 32 --batch-size 4 --layers 2 --save-every 0 --sample-tokens 4 --log-every 1 --no-progress \
  --num-threads 2 --device cpu --out "$OUTSIDE/run")
test -s "$OUTSIDE/run/metrics.jsonl"

step "3. wheel -> a second fresh venv (newest pip)"
rm -rf dist "$WHEEL_VENV"
.venv/bin/pip wheel -q --no-build-isolation --no-deps -w dist .
ls -l dist/*.whl
python3 -m venv "$WHEEL_VENV"
"$WHEEL_VENV/bin/python" -m pip install -q --upgrade pip
"$WHEEL_VENV/bin/python" -m pip --version
"$WHEEL_VENV/bin/python" -m pip install -q torch==2.13.0
"$WHEEL_VENV/bin/python" -m pip install -q dist/baichuan_kernels-*.whl
SITE="$("$WHEEL_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
(cd "$OUTSIDE" && "$WHEEL_VENV/bin/python" "$REPO/.ci/smoke.py" --expect-path "$SITE")
test -x "$WHEEL_VENV/bin/minitrain"
rm -rf "$WHEEL_VENV"

step "4. test dependencies into .venv (the test stage reuses it)"
make deps VENV=.venv
touch .venv/.baichuan-installed
step "done"

# One-command set-up on a fresh CPU machine: `make train` (the main job), `make test`, `make bench`.
# Creates $(VENV), installs the pinned CPU torch + triton, builds baichuan_kernels._C, then runs.
# On a machine that already has a (CUDA) torch: VENV_FLAGS=--system-site-packages TORCH_SPEC= make test
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.baichuan-installed
SOURCES := setup.py $(shell find csrc -type f 2>/dev/null)
PYTEST_ARGS ?= -q

DEPS := "triton==3.6.0" "numpy<2.4" pytest pytest-benchmark ninja pybind11 setuptools wheel matplotlib \
	safetensors sentencepiece tqdm hypothesis

.PHONY: setup deps train test bench clean

setup: $(STAMP)

# The test/bench dependencies into an existing $(VENV) (CI's install stage: a venv made by the README).
deps:
	$(BIN)/python -m pip install -q $(DEPS)

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC) $(DEPS)
	MAX_JOBS=$${MAX_JOBS:-2} $(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	$(BIN)/python -c "import baichuan_kernels as bk; print(bk.build_info()['cuda'], bk.available_backends('rms_norm'))"
	touch $(STAMP)

# pytest exits 5 when it collects nothing (e.g. a filtered run): not a failure of the code.
test: setup
	$(BIN)/python -m pytest tests $(PYTEST_ARGS) || [ $$? -eq 5 ]

# The embedded default job: stdlib corpus -> SentencePiece BPE -> tiny-rope on the CPU (a few minutes)
# -> runs/minitrain/{metrics.jsonl, loss.png, sample.txt, checkpoints, hf/}.
train: setup
	$(BIN)/python -m minitrain train $(TRAIN_ARGS)

bench: setup
	$(BIN)/python -m benchmarks --device cpu --out bench_out

clean:
	rm -rf build *.egg-info baichuan_kernels/_C*.so bench_out runs

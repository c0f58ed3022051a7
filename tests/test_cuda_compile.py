"""nvcc compile-only check of every csrc/cuda/*.cu, for sm_80 and sm_90a, on machines without a GPU.

The flags mirror what setup.py's CUDAExtension passes to nvcc (torch's COMMON_NVCC_FLAGS, -fPIC,
-O3, -std=c++17, -lineinfo, the project defines), plus csrc/shim for the one generated
header the CPU torch wheel lacks. Warnings are errors for our own code (`-Werror all-warnings` would also fire on
torch's headers, so we inspect nvcc's output instead: any warning that names a csrc/ file fails).
One file at a time (~1.5 GB of RAM per nvcc, `--threads 2` for the two archs).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted((CSRC / "cuda").glob("*.cu"))
ARCHS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a"]


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.path.exists(c)), None)


NVCC = find_nvcc()


def setup_std() -> str:
    """C++17: the standard torch < 2.13 compiles extensions with (the GPU image's torch 2.11 does; a
    std::bit_cast once broke the build there), and the stricter of the two. The CI CUDA-build stage
    (.ci/cuda_stage.sh) compiles with the current torch's own default (C++20)."""
    return "-std=c++17"


def nvcc_command(source: Path, out: Path) -> list[str]:
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    includes = [f"-I{p}" for p in include_paths()] + [f"-I{CSRC}", f"-I{CSRC / 'shim'}"]
    defines = ['-DBAICHUAN_VERSION="compile-check"', "-DBAICHUAN_WITH_CUDA", '-DBAICHUAN_CUDA_ARCHS="8.0;9.0a"']
    return (
        [NVCC, "-c", str(source), "-o", str(out)]
        + includes
        + list(COMMON_NVCC_FLAGS)
        + ["--compiler-options", "-fPIC", "-O3", setup_std(), "--expt-relaxed-constexpr", "-lineinfo"]
        + defines
        + ARCHS
        + ["--threads", "2"]
    )


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA_HOME, PATH, /usr/local/cuda)")
@pytest.mark.skipif(not CU_FILES, reason="no csrc/cuda/*.cu files")
@pytest.mark.parametrize("source", CU_FILES, ids=[p.name for p in CU_FILES])
def test_nvcc_compiles(source: Path, tmp_path: Path) -> None:
    out = tmp_path / (source.stem + ".o")
    start = time.perf_counter()
    proc = subprocess.run(nvcc_command(source, out), capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    others = sum("warning" in line.lower() for line in log.splitlines())
    print(f"{source.name}: nvcc sm_80 + sm_90a in {elapsed:.1f} s ({others} warning lines in all)")
    assert proc.returncode == 0, f"nvcc failed on {source.name}:\n{log[-20000:]}"
    assert out.exists() and out.stat().st_size > 0
    ours = [line for line in log.splitlines()
            if "warning" in line.lower() and (str(CSRC) in line or line.startswith("csrc/"))]
    assert not ours, f"nvcc warnings in our code ({source.name}):\n" + "\n".join(ours)


CPP_FILES = sorted((CSRC / "cpu").glob("*.cpp")) + [CSRC / "registration.cpp"]


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_cpu_sources_compile_as_cxx17(tmp_path: Path) -> None:
    """The C++ sources are C++17 too (torch 2.13 builds them as C++20 here; older torch as C++17)."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    flags = ["-std=c++17", "-fsyntax-only", "-fopenmp", f"-I{CSRC}", f"-I{sysconfig.get_paths()['include']}"]
    flags += [f"-I{p}" for p in include_paths()]
    def check(f: Path) -> str:
        proc = subprocess.run(["g++", *flags, str(f)], capture_output=True, text=True)
        errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "error" in ln]
        return "" if proc.returncode == 0 else f"{f.name}:\n" + "\n".join(errors)[:3000]

    with ThreadPoolExecutor(max_workers=2) as pool:  # 2 cores, ~1 GB of RAM per g++
        failures = [msg for msg in pool.map(check, CPP_FILES) if msg]
    assert not failures, "\n".join(failures)

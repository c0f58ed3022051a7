"""Build baichuan_kernels._C: the C++ CPU kernels always, the CUDA kernels when possible.

Only the extension is built here; the package metadata (name, version, dependencies, extras, the
`minitrain` command) lives in pyproject.toml.

CUDA sources are compiled whenever the installed torch is a CUDA build and nvcc is found — also on a
build machine without a GPU. Environment honoured:

  MAX_JOBS               parallel compile jobs (ninja)
  TORCH_CUDA_ARCH_LIST   CUDA archs; default "8.0;9.0a" when it is unset and no GPU can be queried
  CUDA_HOME              CUDA toolkit; default: found from `nvcc` on PATH or /usr/local/cuda
  BAICHUAN_NO_CUDA=1     build the CPU kernels only
  BAICHUAN_NO_NATIVE=1   don't add -mavx2 -mfma -mf16c for the CPU kernels even if the build CPU has them

torch (>= 2.6) must be installed first and the build must see it: install with
`pip install --no-build-isolation -e .` (README, "Install").
"""

from __future__ import annotations

import glob
import os
import platform
import re
import shutil
import site
import sys
import sysconfig

MIN_TORCH = (2, 6)
INSTALL_HINT = """\
  1. install torch first (>= {min_torch}), the build of your platform: pip install torch==2.13.0
     (CPU and CUDA builds both work; see https://pytorch.org/get-started/locally/ and the README)
  2. pip install "setuptools>=64" wheel ninja pybind11
  3. pip install --no-build-isolation -e .    (or without -e; `pip wheel --no-build-isolation --no-deps .`)
  --no-build-isolation is needed: without it pip builds in a fresh, isolated environment that has no torch."""


def torch_or_exit():
    """The installed torch, or exit with what to do (not a traceback from inside setuptools)."""
    min_torch = ".".join(map(str, MIN_TORCH))
    try:
        import torch
        from torch.utils import cpp_extension  # noqa: F401
    except ImportError as exc:
        isolated = any("pip-build-env-" in p for p in sys.path)
        where = ("pip is building in an isolated environment, which has no torch: add --no-build-isolation"
                 if isolated else f"{sys.executable} cannot import it ({exc})")
        sys.exit(f"error: baichuan-kernels: install torch first: the build needs torch >= {min_torch}, and "
                 f"{where}.\n{INSTALL_HINT.format(min_torch=min_torch)}")
    version = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    if version < MIN_TORCH:
        sys.exit(f"error: baichuan-kernels needs torch >= {min_torch}, found torch {torch.__version__} "
                 f"({os.path.dirname(torch.__file__)}).\n{INSTALL_HINT.format(min_torch=min_torch)}")
    return torch


torch = torch_or_exit()

from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    with open(os.path.join(ROOT, "baichuan_kernels", "__init__.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.path.exists(c)), None)


def cuda_wheel_includes() -> list[str]:
    """Headers shipped in the nvidia-* wheels of a pip CUDA torch (cuBLAS, cuSPARSE, ... under
    nvidia/<cuXX>/include or nvidia/<lib>/include); ATen's CUDA headers include some of them."""
    dirs = []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += glob.glob(os.path.join(base, "nvidia", "*", "include"))
    return sorted(set(dirs))


def cpu_supports_avx2_fma() -> bool:
    if platform.machine() not in ("x86_64", "AMD64") or os.environ.get("BAICHUAN_NO_NATIVE") == "1":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags and " f16c" in flags


def extension_modules():
    nvcc = find_nvcc()
    with_cuda = torch.version.cuda is not None and nvcc is not None and os.environ.get("BAICHUAN_NO_CUDA") != "1"

    sources = ["csrc/registration.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    defines = [f'-DBAICHUAN_VERSION="{read_version()}"']
    cxx = ["-O3", "-fopenmp", "-Wno-unused-function"] + defines
    if cpu_supports_avx2_fma():
        cxx += ["-mavx2", "-mfma", "-mf16c"]
    include_dirs = [os.path.join(ROOT, "csrc")]

    if not with_cuda:
        why = "torch is a CPU build" if torch.version.cuda is None else "nvcc not found"
        print(f"[baichuan_kernels] building CPU kernels only ({why})", file=sys.stderr)
        return [CppExtension("baichuan_kernels._C", sources, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]

    os.environ.setdefault("CUDA_HOME", os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # With no GPU to query, torch cannot pick archs itself: default to Ampere + Hopper.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0a" if not torch.cuda.is_available() else ""
        if not os.environ["TORCH_CUDA_ARCH_LIST"]:
            major, minor = torch.cuda.get_device_capability()
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}{'a' if major >= 9 else ''}"
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    print(f"[baichuan_kernels] building CPU + CUDA kernels for {archs} (CUDA_HOME={os.environ['CUDA_HOME']})",
          file=sys.stderr)
    cuda_defines = defines + ["-DBAICHUAN_WITH_CUDA", f'-DBAICHUAN_CUDA_ARCHS="{archs}"']
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"] + cuda_defines
    return [CUDAExtension(
        "baichuan_kernels._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=include_dirs + cuda_wheel_includes(),
        extra_compile_args={"cxx": cxx + ["-DBAICHUAN_WITH_CUDA", f'-DBAICHUAN_CUDA_ARCHS="{archs}"'],
                            "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )]


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's ninja build_ext with the object files always under build/ of the source tree.

    An editable install (PEP 660) would otherwise compile in a throw-away temporary folder: every
    `pip install -e .` and the `pip wheel` after it recompiled everything. Here ninja rebuilds only what
    changed, whichever way pip builds."""

    def finalize_options(self):
        super().finalize_options()
        tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
        self.build_temp = os.path.join(ROOT, "build", f"temp.{tag}")


def main() -> None:
    setup(
        ext_modules=extension_modules(),
        cmdclass={"build_ext": BuildExt},
    )


if __name__ == "__main__":
    main()

"""Build baichuan_kernels._C: the C++ CPU kernels always, the CUDA kernels when possible.

CUDA sources are compiled whenever the installed torch is a CUDA build and nvcc is found — also on a
build machine without a GPU. Environment honoured:

  MAX_JOBS               parallel compile jobs (ninja)
  TORCH_CUDA_ARCH_LIST   CUDA archs; default "8.0;9.0a" when it is unset and no GPU can be queried
  CUDA_HOME              CUDA toolkit; default: found from `nvcc` on PATH or /usr/local/cuda
  BAICHUAN_NO_CUDA=1     build the CPU kernels only
  BAICHUAN_NO_NATIVE=1   don't add -mavx2 -mfma -mf16c for the CPU kernels even if the build CPU has them

Install with `pip install --no-build-isolation -e .` so the build uses the torch already installed.
"""

from __future__ import annotations

import glob
import os
import platform
import re
import shutil
import site
import sys

from setuptools import find_packages, setup

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
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

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


def main() -> None:
    from torch.utils.cpp_extension import BuildExtension

    setup(
        name="baichuan-kernels",
        version=read_version(),
        description="Fused GPU/CPU kernels and a compact trainer for the Baichuan 2 LLMs",
        packages=find_packages(include=["baichuan_kernels*", "minitrain*"]),
        python_requires=">=3.10",
        install_requires=["numpy"],  # torch (>= 2.6) is a prerequisite, installed first: see README
        extras_require={"triton": ["triton>=3.2"], "test": ["pytest", "pytest-benchmark"]},
        ext_modules=extension_modules(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        zip_safe=False,
    )


if __name__ == "__main__":
    main()

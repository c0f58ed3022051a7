"""Loading of the compiled extension ``baichuan_kernels._C`` (CPU C++ and, when built, CUDA kernels).

The package works without it (reference and Triton backends); :func:`build_info` then says how to
build it. Importing ``_C`` registers the ``torch.ops.baichuan.*`` ops as a side effect.
"""

from __future__ import annotations

from typing import Optional

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

BUILD_HINT = "build it with `pip install --no-build-isolation -e .` from the repository root"

try:
    from . import _C  # noqa: F401  (registers torch.ops.baichuan.*)

    _ERROR: Optional[str] = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _ERROR = f"baichuan_kernels._C is not available ({exc}); {BUILD_HINT}"


def extension_error() -> Optional[str]:
    """None when the extension is loaded, else why not and how to build it."""
    return _ERROR


def build_info() -> dict:
    """What was compiled: version, CUDA or not, CUDA archs, OpenMP threads."""
    if _C is None:
        return {"extension": False, "cuda": False, "cuda_archs": [], "error": _ERROR}
    info = dict(_C.build_info())
    info["extension"] = True
    return info


_CUDA_COMPILED = _C is not None and bool(_C.build_info()["cuda"])


def cuda_compiled() -> bool:
    return _CUDA_COMPILED

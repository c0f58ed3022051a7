"""baichuan-kernels: fused kernels for the Baichuan 2 LLMs.

The public API (DESIGN.md §2). Every op takes ``backend="auto" | "cuda" | "triton" | "cpu" |
"reference"`` as a keyword; see :func:`available_backends`.
"""

from ._extension import build_info
from .registry import available_backends
from .ops.rms_norm import rms_norm
from . import nn, testing  # noqa: E402  (modules: bk.nn.RMSNorm, ...; test helpers)
# --- reference-backed ops (issue 2); kernels land in later issues ---

__version__ = "0.1.0"

__all__ = [
    "build_info",
    "available_backends",
    "rms_norm",
]

"""baichuan-kernels: fused kernels for the Baichuan 2 LLMs.

The public API (DESIGN.md §2). Every op takes ``backend="auto" | "cuda" | "triton" | "cpu" |
"reference"`` as a keyword; see :func:`available_backends`.
"""

from ._extension import build_info
from .registry import available_backends
from .ops.rms_norm import rms_norm
from . import nn, testing  # noqa: E402  (modules: bk.nn.RMSNorm, ...; test helpers)
# --- reference-backed ops (issue 2); kernels land in later issues ---
from .ops.swiglu import swiglu
from .ops.rope import rope_cos_sin, apply_rope, apply_rope_
from .ops.split_qkv_rope import split_qkv_rope
from .ops.alibi import alibi_slopes
from .ops.attention import attention
from .ops.decode_attention import decode_attention
from .ops.norm_head import norm_head_weight
from .ops.linear_cross_entropy import linear_cross_entropy
from .ops.quant_matmul import QuantizedWeight, quantize_weight, dequantize_weight, quant_matmul

__version__ = "0.1.0"

__all__ = [
    "build_info",
    "available_backends",
    "rms_norm",
    "swiglu",
    "rope_cos_sin",
    "apply_rope",
    "apply_rope_",
    "split_qkv_rope",
    "alibi_slopes",
    "attention",
    "decode_attention",
    "norm_head_weight",
    "linear_cross_entropy",
    "QuantizedWeight",
    "quantize_weight",
    "dequantize_weight",
    "quant_matmul",
]

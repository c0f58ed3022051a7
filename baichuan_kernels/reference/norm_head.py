"""NormHead reference: L2-normalised rows of the output embedding (BAICHUAN2_SPEC.md §8)."""

from __future__ import annotations

import torch

from .rms_norm import OVERFLOW_SCALE


def norm_head_weight_ref(weight: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``weight: [V, D]`` → ``Ŵ[v, :] = W[v, :] / max(‖W[v, :]‖₂, eps)``.

    The semantics of ``torch.nn.functional.normalize(weight, p=2, dim=1, eps=eps)``, with the math in
    fp32 (float64 for float64 weights) and the result rounded once to ``weight``'s dtype.
    A row whose fp32 norm overflows (‖W[v]‖ beyond ~1.8e19: bf16 weights reach 3.4e38) is normalised
    after scaling it by 2^-96 (exact; the result does not depend on the scale) instead of giving 0.
    Differentiable by autograd.
    """
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.to(acc)  # [V, D]
    overflow = torch.isinf(torch.linalg.vector_norm(w.detach(), dim=1, keepdim=True))  # [V, 1]
    f = torch.where(overflow, OVERFLOW_SCALE, 1.0).to(acc)  # 1 for every finite norm
    ws = w * f  # [V, D]
    norm = torch.maximum(torch.linalg.vector_norm(ws, dim=1, keepdim=True), eps * f)  # [V, 1]
    return (ws / norm).to(weight.dtype)

"""NormHead reference: L2-normalised rows of the output embedding (BAICHUAN2_SPEC.md §8)."""

from __future__ import annotations

import torch


def norm_head_weight_ref(weight: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``weight: [V, D]`` → ``Ŵ[v, :] = W[v, :] / max(‖W[v, :]‖₂, eps)``.

    The semantics of ``torch.nn.functional.normalize(weight, p=2, dim=1, eps=eps)``, with the math in
    fp32 (float64 for float64 weights) and the result rounded once to ``weight``'s dtype.
    Differentiable by autograd.
    """
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.to(acc)  # [V, D]
    norm = torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min(eps)  # [V, 1]
    return (w / norm).to(weight.dtype)

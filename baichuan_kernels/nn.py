"""torch.nn modules over the baichuan_kernels ops. The backend is a constructor argument."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .ops.rms_norm import rms_norm

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """RMSNorm with an optional fused residual add (Baichuan 2's pre-norm blocks).

    ``forward(x)`` returns ``y``; ``forward(x, residual=r)`` returns ``(y, x + r)``. The weight is
    cast to the activation dtype on the way in (fp32 master weights under bf16 compute).
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return rms_norm(x, weight, self.eps, residual=residual, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, backend={self.backend!r}"

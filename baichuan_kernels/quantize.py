"""Weight-only quantization of a model: :func:`quantize_model` swaps Baichuan 2's projection layers for
:class:`~baichuan_kernels.nn.QuantLinear`, as the released 4-/8-bit checkpoints do (BAICHUAN2_SPEC.md
§12): the attention's fused ``W_pack`` and ``o_proj`` and the MLP's ``gate_proj``, ``up_proj`` and
``down_proj``. Embeddings, norms and the (Norm)head keep their dtype.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .nn import QuantLinear

__all__ = ["QUANTIZED_MODULE_NAMES", "quantize_model"]

QUANTIZED_MODULE_NAMES = ("W_pack", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_model(model: nn.Module, bits, group_size: int = 128, *, backend: str = "auto",
                   names: Iterable[str] = QUANTIZED_MODULE_NAMES) -> nn.Module:
    """Replace, in place, every bias-free ``nn.Linear`` child whose attribute name is in ``names`` by a
    :class:`QuantLinear` (``bits`` 8: int8 per channel; 4: int4 groups of ``group_size`` along K;
    ``"nf4"``: NF4 absmax blocks of ``group_size`` along K), on
    the module's device. Returns ``model``. Raises ``ValueError`` naming the module when a target has
    a bias or ``group_size`` does not divide its ``in_features``; nothing is replaced then.
    """
    if bits not in (4, 8, "nf4"):
        raise ValueError(f"bits must be 4, 8 or 'nf4', got {bits!r}")
    if bits != 8 and group_size not in (32, 64, 128):
        raise ValueError(f"group_size must be 32, 64 or 128 for bits={bits!r}, got {group_size}")
    names = set(names)
    targets = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if child_name in names and isinstance(child, nn.Linear):
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                if child.bias is not None:
                    raise ValueError(f"{full} has a bias: QuantLinear is bias-free (Baichuan 2's projections have none)")
                if bits != 8 and child.in_features % group_size:
                    raise ValueError(f"group_size {group_size} must divide {full}.in_features = {child.in_features}")
                targets.append((parent, child_name, child))
    with torch.no_grad():
        for parent, child_name, child in targets:
            setattr(parent, child_name, QuantLinear.from_linear(child, bits=bits, group_size=group_size,
                                                                backend=backend))
    return model

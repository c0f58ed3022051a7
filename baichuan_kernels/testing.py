"""Test helpers: seeded inputs, poisoned outputs and the project's tolerance rule.

The rule (DESIGN.md §3): a kernel's error against a float64 run of the reference may be at most
``factor`` (2) times the error of the reference run in the kernel's own dtype, plus a tiny atol
scaled to the magnitude of the result. The same-dtype reference error is measured, not assumed,
so the bound tightens automatically where the reference is exact.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch

__all__ = ["make_tensor", "poisoned_outputs", "max_error", "assert_within_reference_error", "DTYPES"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Relative floor of the atol: a few ulps of fp32, scaled to the result's magnitude.
_ATOL_REL = 4e-7


def make_tensor(
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    seed: int,
    scale: float = 1.0,
    offset: float = 0.0,
    requires_grad: bool = False,
) -> torch.Tensor:
    """Seeded N(offset, scale²) values, generated in float64 on CPU then cast: the same numbers on
    every device and every dtype (so a bf16 input is the rounding of the float64 one)."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * scale + offset
    t = t.to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Within the block every freshly allocated tensor (``torch.empty``/``at::empty``, the way our
    launchers allocate outputs) is filled with NaN (integers: their max), so an element a kernel
    forgets to write shows up as NaN instead of passing by luck."""
    import torch.utils.deterministic as det

    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    try:
        yield
    finally:
        det.fill_uninitialized_memory = was_fill
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn)


def max_error(actual: torch.Tensor, expected64: torch.Tensor) -> float:
    """Max absolute difference in float64; NaN/inf mismatches count as infinite error."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected64.detach().to(torch.float64).cpu()
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: got {tuple(a.shape)}, expected {tuple(e.shape)}")
    if a.numel() == 0:
        return 0.0
    same_nonfinite = (a == e) | (a.isnan() & e.isnan())
    diff = (a - e).abs()
    diff = torch.where(same_nonfinite, torch.zeros_like(diff), diff)
    diff = torch.nan_to_num(diff, nan=float("inf"))
    return float(diff.max())


def assert_within_reference_error(
    actual: torch.Tensor,
    reference_same_dtype: torch.Tensor,
    reference64: torch.Tensor,
    *,
    name: str = "output",
    factor: float = 2.0,
    atol: Optional[float] = None,
) -> None:
    """``|actual - ref64| ≤ factor · |ref_same_dtype - ref64| + atol`` (max norms).

    ``atol`` defaults to a few fp32 ulps of the result's magnitude: tiny, never a loose tolerance.
    """
    if actual.dtype != reference_same_dtype.dtype:
        raise AssertionError(f"{name}: dtype {actual.dtype} differs from the reference's {reference_same_dtype.dtype}")
    scale = float(reference64.detach().abs().max()) if reference64.numel() else 0.0
    if atol is None:
        atol = _ATOL_REL * (1.0 + scale)
    err = max_error(actual, reference64)
    ref_err = max_error(reference_same_dtype, reference64)
    bound = factor * ref_err + atol
    if not err <= bound:
        raise AssertionError(
            f"{name}: max error {err:.3e} vs float64 exceeds {factor}× the same-dtype reference error "
            f"{ref_err:.3e} + atol {atol:.1e} (bound {bound:.3e}; |ref| max {scale:.3e})"
        )

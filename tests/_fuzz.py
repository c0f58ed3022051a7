"""Shared harness of the property-based (hypothesis) tests, tests/test_fuzz_*.py.

The property every public op must have, on every backend usable here, for any input a strategy draws:

* a *valid* input (as the op's documentation defines it) gives the float64 reference's result within
  the project rule (baichuan_kernels.testing.assert_within_reference_error), forward and every
  gradient, with no NaN/inf where the float64 reference has none, and no unwritten (poisoned) output;
* an *invalid* input raises ValueError/TypeError whose message names the offending argument;
* nothing else: any other exception (RuntimeError from a kernel, IndexError, ...) fails.

Inputs (and upstream gradients) come in several memory layouts (:data:`LAYOUTS`); every gap of a
non-dense layout holds NaN, so a kernel that ignores strides reads NaN and fails loudly instead of
passing by luck. Sizes 0 and 1 are drawn on purpose (:func:`dim`).

Tolerances are the project rule, with two documented additions: a 16-bit result's atol is at least
one ulp of its magnitude in its own dtype, and where a kernel's documented algorithm has a rounding
the reference lacks (flash attention's Δ, the int4 kernels' zero·Σx factorization, the cancellation
of NormHead's gradient at D = 1), the test file derives a bound from that rounding
(``check_op(atol_for=...)``); for the first two a strict-xfail test witnesses that the plain rule
fails there.

Everything is deterministic: :func:`fuzz_settings` derandomizes hypothesis and keeps no database.
"""

from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from baichuan_kernels.testing import _ATOL_REL, DTYPES, assert_within_reference_error, make_tensor, poisoned_outputs
from _backends import DEVICES, kernel_backends

LAYOUTS = ("contiguous", "slice", "transposed", "strided", "expanded")
# Layouts a tensor that an op writes in place, or whose elements must be distinct, may not take.
DENSE_LAYOUTS = ("contiguous", "slice", "transposed", "strided")


def fuzz_settings(max_examples: int):
    """Deterministic hypothesis settings: the same examples on every run, no deadline, no database."""
    return settings(
        max_examples=max_examples,
        derandomize=True,
        deadline=None,
        database=None,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def fuzz_backends(op: str) -> list:
    """pytest params (device, backend): the kernel backends of ``op`` usable here (tests/_backends.py),
    then ``"reference"`` and ``"auto"`` (the registry's choice, falling back to the reference for what
    the kernels refuse) on every device."""
    params = list(kernel_backends(op))
    for device in DEVICES:
        marks = [pytest.mark.cuda] if device == "cuda" else []
        for backend in ("reference", "auto"):
            params.append(pytest.param(device, backend, id=f"{device}-{backend}", marks=marks))
    return params


def explicit_kernel(backend: str) -> bool:
    """An explicitly named kernel backend: inputs outside its documented limits (float64, head dims,
    strides...) must raise ValueError naming ``backend``; "reference" and "auto" take them."""
    return backend not in ("reference", "auto")


def examples_for(backend: str, *, kernel: int, triton: int, reference: int) -> int:
    """Example budget per backend (the Triton interpreter costs ~1 ms per program instance)."""
    return {"triton": triton, "reference": reference}.get(backend, kernel)


# ---------------------------------------------------------------------------------------------------
# strategies


def dim(max_value: int, *, min_value: int = 0, zero: float = 0.06, one: float = 0.15) -> st.SearchStrategy[int]:
    """A size: 0 with probability ``zero`` and 1 with probability ``one`` (when allowed), otherwise
    uniform up to ``max_value``. Zeros stay rare enough that tensors of 3-4 such dims are mostly
    non-empty (the interesting, valid cases), yet every test meets empty ones."""
    low = max(min_value, 2)

    def pick(r: int) -> st.SearchStrategy[int]:
        if r < 100 * zero and min_value <= 0:
            return st.just(0)
        if r < 100 * (zero + one) and min_value <= 1 <= max_value:
            return st.just(1)
        return st.integers(low, max_value) if low <= max_value else st.just(max_value)

    return st.integers(0, 99).flatmap(pick)


float_dtypes = st.sampled_from(DTYPES)
layouts = st.sampled_from(LAYOUTS)
dense_layouts = st.sampled_from(DENSE_LAYOUTS)


def _poison(dtype: torch.dtype):
    if dtype.is_floating_point:
        return float("nan")
    if dtype == torch.bool:
        return True
    return torch.iinfo(dtype).max


def lay_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values in another memory layout, as a fresh leaf (gaps filled with NaN / int max).

    * ``contiguous`` — a dense copy;
    * ``slice`` — rows of a wider buffer (``buf[..., 2:2+n]``): non-contiguous rows;
    * ``transposed`` — the dims stored in reverse order (``buf.permute``): the last dim has a large stride;
    * ``strided`` — ``as_strided`` with a step of 7 along the last dim and large padded strides elsewhere;
    * ``expanded`` — the first dim of size > 1 becomes stride 0 (its values repeat the first slice:
      the values change, not only the layout; read-only inputs only).
    """
    shape = tuple(t.shape)
    poison = _poison(t.dtype)
    if layout == "contiguous" or t.dim() == 0:
        out = t.detach().clone().contiguous()
    elif layout == "slice":
        buf = torch.full((*shape[:-1], shape[-1] + 3), poison, dtype=t.dtype, device=t.device)
        out = buf[..., 2 : 2 + shape[-1]]
        out.copy_(t)
    elif layout == "transposed":
        order = tuple(reversed(range(t.dim())))
        buf = torch.full(tuple(shape[i] for i in order), poison, dtype=t.dtype, device=t.device)
        out = buf.permute(order)  # permuting back is its own inverse
        out.copy_(t)
    elif layout == "strided":
        strides = [0] * t.dim()
        step = 7
        for i in reversed(range(t.dim())):
            strides[i] = step
            step = step * max(shape[i], 1) + 1013  # a gap between consecutive slices of dim i
        span = 1 + sum((s - 1) * st_ for s, st_ in zip(shape, strides) if s > 0)
        buf = torch.full((span + 5,), poison, dtype=t.dtype, device=t.device)
        out = buf.as_strided(shape, strides, 3)
        if t.numel():
            out.copy_(t)
    elif layout == "expanded":
        d = next((i for i, s in enumerate(shape) if s > 1), None)
        out = t.detach().clone() if d is None else t.detach().narrow(d, 0, 1).clone().expand(shape)
    else:
        raise AssertionError(f"unknown layout {layout!r}")
    return out.detach()


def whole_storage(t: torch.Tensor) -> torch.Tensor:
    """Every element of ``t``'s storage as a 1-D tensor of t's dtype (a view): the gaps of a layout
    included, so that writes outside ``t`` can be seen."""
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage())


def tensor(shape, dtype, device, *, seed: int, layout: str = "contiguous", requires_grad: bool = False,
           scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    """Seeded N(offset, scale²) values (baichuan_kernels.testing.make_tensor) in ``layout``."""
    t = make_tensor(shape, dtype, device, seed=seed, scale=scale, offset=offset)
    t = lay_out(t, layout)
    return t.requires_grad_(requires_grad) if dtype.is_floating_point else t


# ---------------------------------------------------------------------------------------------------
# the check


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _to64(v):
    if isinstance(v, torch.Tensor) and v.dtype.is_floating_point:
        return v.detach().to(torch.float64).requires_grad_(v.requires_grad)
    return v


def _names_argument(message: str, arg: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(arg)}(?![A-Za-z0-9_])", message) is not None


def expect_rejection(call: Callable[[], object], arg: str, *, what: str = "") -> None:
    """``call()`` must raise ValueError/TypeError whose message names ``arg`` (never anything else)."""
    try:
        call()
    except (ValueError, TypeError) as exc:
        assert _names_argument(str(exc), arg), f"{what}: the error does not name {arg!r}: {type(exc).__name__}: {exc}"
        return
    except Exception as exc:  # noqa: BLE001 — any other exception is the bug we look for
        raise AssertionError(
            f"{what}: expected ValueError/TypeError naming {arg!r}, got {type(exc).__name__}: {exc}"
        ) from exc
    raise AssertionError(f"{what}: accepted an input that must be rejected (naming {arg!r})")


# Backends whose input limits these tests do not encode (not provable on the CPU machines the tests were
# written on): there a refusal "backend 'cuda' cannot run these inputs: <reason>" (ValueError) is taken
# as a documented limit and the example is skipped. Every limit of the cpu and triton backends is
# encoded by the tests, so a refusal there fails.
UNENCODED_LIMITS = ("cuda",)


class _Refused(Exception):
    pass


def refused(exc: BaseException, backend: Optional[str]) -> bool:
    """Is ``exc`` the registry's refusal of an explicit backend whose limits are not encoded here?"""
    return backend in UNENCODED_LIMITS and isinstance(exc, ValueError) and "cannot run these inputs" in str(exc)


def _call_valid(call: Callable[[], object], what: str, backend: Optional[str] = None):
    try:
        return call()
    except Exception as exc:  # noqa: BLE001
        if refused(exc, backend):
            raise _Refused() from exc
        raise AssertionError(f"{what}: a valid input raised {type(exc).__name__}: {exc}") from exc


def _assert_close(name: str, got: torch.Tensor, same: torch.Tensor, exact: torch.Tensor,
                  atol: Optional[float] = None) -> None:
    assert got.shape == exact.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(exact.shape)}"
    assert got.dtype == same.dtype, f"{name}: dtype {got.dtype}, expected {same.dtype}"
    if got.numel():
        g = got.detach().cpu()
        new_nonfinite = ~torch.isfinite(g) & torch.isfinite(exact.detach().cpu()) & torch.isfinite(same.detach().cpu())
        assert not bool(new_nonfinite.any()), (
            f"{name}: {int(new_nonfinite.sum())} NaN/inf where the references are finite"
        )
    if got.dtype in (torch.bfloat16, torch.float16) and got.numel():
        # The rule's default atol is a few fp32 ulps of the result's magnitude; a 16-bit result cannot
        # be finer than its own ulp, and where terms cancel (e.g. rms_norm's dx = norm path + residual
        # path) the same-dtype reference's extra roundings can land it closer by luck: one ulp of the
        # result's magnitude in its own dtype is the floor of the atol.
        one_ulp = torch.finfo(got.dtype).eps * _finite_max(exact)
        atol = max(atol if atol is not None else _ATOL_REL * (1.0 + _finite_max(exact)), one_ulp)
    assert_within_reference_error(got, same, exact, name=name, atol=atol)


def _finite_max(t: torch.Tensor) -> float:
    t = t.detach().abs().double().cpu()
    t = t[torch.isfinite(t)]
    return float(t.max()) if t.numel() else 0.0


def check_op(
    op: Callable[..., object],
    reference: Callable[..., object],
    inputs: dict,
    *,
    grad: Sequence[str] = (),
    what: str = "",
    seed: int = 0,
    outputs: Optional[Sequence[str]] = None,
    atol_for: Optional[Callable[[list], dict]] = None,
    backend: Optional[str] = None,
) -> None:
    """``op(**inputs)`` (the public op under test) against ``reference(**inputs)``.

    The reference runs twice: on the same inputs (same dtype: the rounding the rule allows) and on
    float64 copies (the truth). With ``grad`` (names of inputs that require grad), the gradients of
    every differentiable output under seeded random upstream gradients (in a layout of
    :data:`LAYOUTS` picked by the seed) are compared too. The op runs
    inside :func:`~baichuan_kernels.testing.poisoned_outputs`.

    ``atol_for(upstream) -> {name: atol}`` (output names, or input names for their gradients) replaces
    the default tiny atol, for a rounding the kernels' documented algorithm has and the reference has
    not (the caller derives the bound from that rounding and the upstream gradients it receives).
    ``backend``: the backend under test, for :data:`UNENCODED_LIMITS`.
    """

    def run(fn, args, upstream):
        outs = _as_tuple(fn(**args))
        leaves = [args[n] for n in grad]
        if not leaves:
            return [o.detach() for o in outs], []
        pairs = [(o, u) for o, u in zip(outs, upstream) if u is not None and o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in pairs], leaves, [u for _, u in pairs], allow_unused=True)
        grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]
        return [o.detach() for o in outs], list(grads)

    same_outs = _as_tuple(reference(**inputs))
    # Upstream gradients in every layout too (chosen by the seed): backward kernels meet sliced,
    # transposed, strided and stride-0 expanded gradients (e.g. from y.sum().backward()).
    upstream = [
        lay_out(make_tensor(o.shape, o.dtype, o.device, seed=seed + 1000 + i), LAYOUTS[(seed + i) % len(LAYOUTS)])
        if grad and o.dtype.is_floating_point and o.requires_grad else None
        for i, o in enumerate(same_outs)
    ]

    try:
        with poisoned_outputs():
            got, got_g = _call_valid(lambda: run(op, inputs, upstream), what, backend)
    except _Refused:
        return
    same, same_g = run(reference, inputs, upstream)
    up64 = [None if u is None else u.double() for u in upstream]
    exact, exact_g = run(reference, {k: _to64(v) for k, v in inputs.items()}, up64)

    assert len(got) == len(same), f"{what}: {len(got)} outputs, expected {len(same)}"
    atols = atol_for(upstream) if atol_for is not None else {}
    names = list(outputs) if outputs else [f"out{i}" for i in range(len(got))]
    for name, g, s, e in zip(names, got, same, exact):
        if not g.dtype.is_floating_point:
            assert torch.equal(g.cpu(), s.cpu()), f"{what} {name}: integer output differs"
            continue
        _assert_close(f"{what} {name}", g, s, e, atols.get(name))
    for name, g, s, e in zip(grad, got_g, same_g, exact_g):
        assert g.shape == inputs[name].shape, f"{what} d{name}: shape {tuple(g.shape)}"
        _assert_close(f"{what} d{name}", g, s, e, atols.get(name))


def describe(**parts) -> str:
    """A short label of one example for assertion messages."""
    out = []
    for k, v in parts.items():
        if isinstance(v, torch.Tensor):
            v = f"{str(v.dtype).replace('torch.', '')}{tuple(v.shape)}/{tuple(v.stride())}"
        out.append(f"{k}={v}")
    return " ".join(out)


def meta_like(t: torch.Tensor) -> torch.Tensor:
    """A tensor like ``t`` on the meta device: the stand-in for 'another device' without a GPU."""
    return torch.empty(t.shape, dtype=t.dtype, device="meta")

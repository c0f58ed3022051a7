"""The one place that decides which backend runs an op.

Every public op registers an :class:`Op` with one :class:`Impl` per backend it has. A caller asks
for ``backend="auto"`` (the fastest backend that supports the inputs, else the reference) or names
one backend explicitly; an explicit backend that cannot run raises ``ValueError`` listing every
reason, never a silent fallback.

Two kinds of reasons exist:

* machine reasons (the compiled extension is missing, it was built without CUDA, no GPU is visible,
  Triton is not importable) — they make a backend unavailable for every op, and
* input reasons (tensors on the wrong device, an op-specific shape or dtype limit of that kernel).

Environment is read once, at import (``TRITON_INTERPRET=1`` lets the Triton backend run CPU tensors
through the interpreter, which is how it is proven on CPU-only machines); nothing here reads the
environment in a hot path.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

from . import _extension

__all__ = [
    "Backend",
    "Impl",
    "Op",
    "register",
    "get_op",
    "resolve",
    "available_backends",
    "machine_reason",
    "TRITON_INTERPRET",
]


class Backend(str, enum.Enum):
    """Kernel backends, declared fastest first."""

    CUDA = "cuda"
    TRITON = "triton"
    CPU = "cpu"
    REFERENCE = "reference"


FASTEST_FIRST: tuple[Backend, ...] = (Backend.CUDA, Backend.TRITON, Backend.CPU, Backend.REFERENCE)
BACKEND_NAMES = ("auto",) + tuple(b.value for b in FASTEST_FIRST)

# Read once: Triton decides at `@triton.jit` time whether it interprets, so this must be set
# before baichuan_kernels is imported (tests/conftest.py does it on machines without CUDA).
TRITON_INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


TRITON_IMPORT_ERROR = _triton_import_error()

# A predicate over the op's arguments: returns None when the impl can run them, else the reason.
Supports = Callable[..., Optional[str]]


def _always(*args, **kwargs) -> Optional[str]:
    return None


@dataclass(frozen=True)
class Impl:
    """One backend of one op. ``supports`` states the kernel's own limits (shape, dtype)."""

    backend: Backend
    supports: Supports = _always


@dataclass
class Op:
    name: str
    impls: dict[Backend, Impl] = field(default_factory=dict)


_OPS: dict[str, Op] = {}


def register(name: str, *impls: Impl, fastest_first: Optional[tuple[Backend, ...]] = None) -> Op:
    """Register an op's backends. The reference backend is always present (and always last).

    ``fastest_first`` overrides :data:`FASTEST_FIRST` for this op only (the order ``"auto"`` tries),
    for an op whose measured speeds differ from the default order; it must list every backend given.
    """
    backends = {impl.backend: impl for impl in impls}
    backends.setdefault(Backend.REFERENCE, Impl(Backend.REFERENCE))
    order = FASTEST_FIRST
    if fastest_first is not None:
        order = tuple(Backend(b) for b in fastest_first if Backend(b) is not Backend.REFERENCE) + (Backend.REFERENCE,)
        missing = set(backends) - set(order)
        if missing or len(set(order)) != len(order):
            raise ValueError(f"{name}: fastest_first {fastest_first} must list each backend once, "
                             f"missing {sorted(b.value for b in missing)}")
    op = Op(name, {b: backends[b] for b in order if b in backends})
    _OPS[name] = op
    return op


def get_op(name: str) -> Op:
    try:
        return _OPS[name]
    except KeyError:
        raise ValueError(f"unknown op {name!r}; known ops: {sorted(_OPS)}") from None


def _machine_reason(backend: Backend) -> Optional[str]:
    if backend is Backend.REFERENCE:
        return None
    if backend is Backend.TRITON:
        if TRITON_IMPORT_ERROR:
            return TRITON_IMPORT_ERROR
        if not torch.cuda.is_available() and not TRITON_INTERPRET:
            return "no CUDA GPU is visible (set TRITON_INTERPRET=1 before import to run Triton on CPU)"
        return None
    ext_error = _extension.extension_error()
    if ext_error:
        return ext_error
    if backend is Backend.CUDA:
        if not _extension.cuda_compiled():
            return "baichuan_kernels._C was built without CUDA (needs a CUDA build of torch and nvcc)"
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible"
    return None


# The machine does not change while the process runs: decided once, at import (this also keeps
# resolve() free of calls torch.compile cannot trace).
_MACHINE_REASONS: dict[Backend, Optional[str]] = {b: _machine_reason(b) for b in FASTEST_FIRST}


def machine_reason(backend: Backend) -> Optional[str]:
    """Why ``backend`` cannot run anything on this machine, or None."""
    return _MACHINE_REASONS[Backend(backend)]


def _device_reason(backend: Backend, tensors: Iterable[torch.Tensor]) -> Optional[str]:
    devices = {t.device.type for t in tensors}
    if backend is Backend.CUDA and devices - {"cuda"}:
        return f"needs CUDA tensors, got {sorted(devices)}"
    if backend is Backend.CPU and devices - {"cpu"}:
        return f"needs CPU tensors, got {sorted(devices)}"
    if backend is Backend.TRITON:
        allowed = {"cuda", "cpu"} if TRITON_INTERPRET else {"cuda"}
        if devices - allowed:
            hint = "" if TRITON_INTERPRET else " (CPU tensors only under TRITON_INTERPRET=1)"
            return f"needs CUDA tensors{hint}, got {sorted(devices)}"
    return None


def _reasons(op: Op, backend: Backend, tensors: list[torch.Tensor], args, kwargs) -> list[str]:
    impl = op.impls.get(backend)
    if impl is None:
        return [f"{op.name} has no {backend.value} implementation"]
    reasons = [r for r in (machine_reason(backend), _device_reason(backend, tensors)) if r]
    if not reasons:
        limit = impl.supports(*args, **kwargs)
        if limit:
            reasons.append(limit)
    return reasons


def resolve(name: str, backend: str, tensors: Iterable[Optional[torch.Tensor]], *args, **kwargs) -> Backend:
    """Pick the backend that runs op ``name`` on these inputs.

    ``tensors`` are the op's tensor arguments (None entries ignored) used for the device checks;
    ``args``/``kwargs`` go to each impl's ``supports`` predicate. ``"auto"`` never picks the Triton
    interpreter (it is a proof vehicle, not a fast path) and falls back to the reference.
    """
    op = get_op(name)
    tensors = [t for t in tensors if t is not None]
    if isinstance(backend, Backend):
        backend = backend.value
    if backend not in BACKEND_NAMES:
        raise ValueError(f"{name}: backend must be one of {BACKEND_NAMES}, got {backend!r}")
    if backend == "auto":
        on_cuda = any(t.is_cuda for t in tensors)
        for candidate in op.impls:
            if candidate is Backend.TRITON and not on_cuda:
                continue  # the interpreter is correct but slow: only on request
            if not _reasons(op, candidate, tensors, args, kwargs):
                return candidate
        return Backend.REFERENCE
    chosen = Backend(backend)
    reasons = _reasons(op, chosen, tensors, args, kwargs)
    if reasons:
        usable = [b.value for b in op.impls if not _reasons(op, b, tensors, args, kwargs)]
        raise ValueError(
            f"{name}: backend {backend!r} cannot run these inputs: " + "; ".join(reasons)
            + f". Backends that can: {usable}"
        )
    return chosen


def available_backends(name: str) -> list[str]:
    """Backends of op ``name`` usable on this machine, fastest first."""
    op = get_op(name)
    return [b.value for b in op.impls if machine_reason(b) is None]

"""SwiGLU ``silu(gate) * up``: our backends against the eager reference, the reference under
torch.compile and Liger-Kernel's ``LigerSiLUMulFunction`` (GPU peer).

Memory-bound, so the figure of merit is GB/s of the minimal traffic (b = bytes per element):

    fwd      reads gate, up [N, F];      writes y [N, F]              3·N·F·b
    bwd      reads dy, gate, up;         writes dgate, dup            5·N·F·b
    fwd+bwd  = 8·N·F·b

"fused" cases take gate and up as the two halves of one [N, 2F] matmul output h (row stride 2F), the
layout of a fused gate/up projection; gradients then flow into h. Our backends run ``swiglu(h)``
(the packed ops: dh written directly), the others get the two halves as views.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .common import Context, Provider, Unsupported, run_cases, backend_reason

OP = "swiglu"
OUR_BACKENDS = ("cuda", "triton", "cpu")


@dataclass(frozen=True)
class Case:
    n: int  # rows, N = B·T tokens
    f: int  # FFN width: 11008 (7B), 13696 (13B)
    dtype: torch.dtype
    fused: bool  # gate/up are halves of one [N, 2F] tensor
    pass_: str  # "fwd" | "fwd+bwd"

    @property
    def label(self) -> str:
        return f"N={self.n} F={self.f}" + (" fused" if self.fused else "")


@dataclass(frozen=True)
class Inputs:
    gate: torch.Tensor  # [N, F] (a view of h when fused)
    up: torch.Tensor  # [N, F]
    leaves: tuple  # tensors the gradients are taken for
    h: Optional[torch.Tensor]  # [N, 2F] (fused cases)
    dy: Optional[torch.Tensor]  # [N, F] (fwd+bwd)


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    if device.type == "cuda":
        shapes = [(16384, 11008)] if quick else [(n, f) for n in (4096, 16384) for f in (11008, 13696)]
        out = [Case(n, f, torch.bfloat16, False, p) for n, f in shapes for p in ("fwd", "fwd+bwd")]
        return out + [Case(16384, 11008, torch.bfloat16, True, p) for p in ("fwd", "fwd+bwd")]
    # CPU: fp32 at 7B/13B widths, modest N (the acceptance shape is N=1024 F=11008)
    acc = [Case(1024, 11008, torch.float32, False, p) for p in ("fwd", "fwd+bwd")]
    if quick:
        return acc
    return acc + [Case(512, 13696, torch.float32, False, p) for p in ("fwd", "fwd+bwd")] + [
        Case(1024, 11008, torch.float32, True, "fwd")]


def traffic(case: Case) -> tuple[int, None]:
    b = torch.empty((), dtype=case.dtype).element_size()
    nf = case.n * case.f * b
    return (3 * nf if case.pass_ == "fwd" else 8 * nf), None


def make_inputs(case: Case, n_sets: int, device: torch.device) -> list[Inputs]:
    gen = torch.Generator(device=device).manual_seed(4321 + case.n + case.f)
    grad = case.pass_ == "fwd+bwd"

    def rand(*shape, scale=1.0):
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * scale
        return t.to(case.dtype).requires_grad_(grad)

    sets = []
    for _ in range(n_sets):
        dy = rand(case.n, case.f).detach() if grad else None
        if case.fused:
            h = rand(case.n, 2 * case.f, scale=2.0)
            g, u = h.chunk(2, dim=-1)
            sets.append(Inputs(g, u, (h,), h, dy))
        else:
            g, u = rand(case.n, case.f, scale=2.0), rand(case.n, case.f)
            sets.append(Inputs(g, u, (g, u), None, dy))
    return sets


def step(f: Callable, case: Case, packed: Optional[Callable] = None) -> Callable[[Inputs], object]:
    """``f(gate, up)``; ``packed(h)``, when given, runs the fused cases instead."""
    def call(inp: Inputs):
        return packed(inp.h) if packed is not None and inp.h is not None else f(inp.gate, inp.up)

    if case.pass_ == "fwd":
        return call
    return lambda inp: torch.autograd.grad(call(inp), inp.leaves, inp.dy)


# ------------------------------------------------------------------------------------ providers
def _import_bk():
    try:
        import baichuan_kernels as bk
        from baichuan_kernels.reference.swiglu import swiglu_ref
        return bk, swiglu_ref, None
    except Exception as exc:
        return None, None, f"baichuan_kernels is not importable ({type(exc).__name__}: {exc})"


def _ours(backend: str, device: torch.device) -> Provider:
    bk, _, err = _import_bk()
    reason = err
    reason = reason or backend_reason(OP, backend, device)

    def build(case: Case):
        x = torch.ones(2, case.f, device=device, dtype=case.dtype)
        try:
            bk.swiglu(x, x, backend=backend)
        except ValueError as exc:
            raise Unsupported(str(exc)) from None
        return step(lambda g, u: bk.swiglu(g, u, backend=backend), case, lambda h: bk.swiglu(h, backend=backend))

    return Provider(backend, "ours", build, reason)


@functools.lru_cache(maxsize=None)
def _compiled_ref() -> Callable:
    """The reference under torch.compile (default mode); N dynamic, F static."""
    import torch._dynamo
    cfg = torch._dynamo.config
    cfg.automatic_dynamic_shapes = False
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))
    _, ref, _ = _import_bk()
    compiled = torch.compile(ref, fullgraph=True)

    def f(g, u):
        torch._dynamo.maybe_mark_dynamic(g, 0)
        torch._dynamo.maybe_mark_dynamic(u, 0)
        return compiled(g, u)

    return f


def _liger(device: torch.device) -> Provider:
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except Exception as exc:
        return Provider("liger", "peer", None, f"liger_kernel is not importable ({type(exc).__name__}: {exc})")
    if device.type != "cuda":
        return Provider("liger", "peer", None, "Liger-Kernel's kernels are Triton, GPU only")
    return Provider("liger", "peer", lambda case: step(LigerSiLUMulFunction.apply, case))


def providers(device: torch.device) -> list[Provider]:
    _, ref, err = _import_bk()
    return [
        *(_ours(b, device) for b in OUR_BACKENDS),
        Provider("eager", "baseline", lambda case: step(ref, case), err),
        Provider("compile", "baseline", lambda case: step(_compiled_ref(), case), err),
        _liger(device),
    ]


def run(ctx: Context, log: Callable[[str], None] = print):
    return run_cases(ctx, OP, cases(ctx.device, ctx.quick), providers(ctx.device),
                     functools.partial(make_inputs, device=ctx.device), traffic, log=log)

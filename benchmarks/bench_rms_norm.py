"""RMSNorm (+ fused residual add): our backends against the eager reference, the reference under
torch.compile, Liger-Kernel and torch's fused ``F.rms_norm`` (GPU peers).

Memory-bound, so the figure of merit is GB/s of the minimal traffic (b = bytes per element):

    fwd        reads x [N, D], w [D];  writes y [N, D]                          2·N·D·b + D·b
    fwd +res   reads x, res, w;        writes y, s = x + res                    4·N·D·b + D·b
    bwd        reads dy, x, w;         writes dx          (dw partials: ~0)     3·N·D·b + D·b
    bwd +res   reads dy, ds, s, w;     writes dx (= dres, one tensor)           4·N·D·b + D·b
    fwd+bwd  = fwd + bwd

Liger-Kernel runs with ``casting_mode="gemma"``: everything in fp32 and one rounding at the end,
which is our semantics (``"llama"`` rounds x·rstd to x's dtype before the weight multiply), and
``in_place=False`` (dx in a fresh tensor, like ours, instead of overwriting dy).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .common import Context, Provider, Unsupported, run_cases, backend_reason

OP = "rms_norm"
EPS = 1e-6
OUR_BACKENDS = ("cuda", "triton", "cpu")


@dataclass(frozen=True)
class Case:
    n: int  # rows, N = B·T tokens
    d: int  # model dim: 4096 (7B), 5120 (13B)
    dtype: torch.dtype
    residual: bool  # the fused `s = x + residual` variant
    pass_: str  # "fwd" | "fwd+bwd"

    @property
    def label(self) -> str:
        return f"N={self.n} D={self.d}" + (" +res" if self.residual else "")


@dataclass(frozen=True)
class Inputs:
    x: torch.Tensor  # [N, D]
    w: torch.Tensor  # [D], around 1
    res: Optional[torch.Tensor]  # [N, D] (residual cases)
    dy: Optional[torch.Tensor]  # [N, D] gradient of y (fwd+bwd)
    ds: Optional[torch.Tensor]  # [N, D] gradient of s (fwd+bwd, residual cases)


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    if device.type == "cuda":
        shapes = [(16384, 4096)] if quick else [(n, d) for n in (4096, 16384) for d in (4096, 5120)]
        return [Case(n, d, torch.bfloat16, res, p) for n, d in shapes for res in (False, True)
                for p in ("fwd", "fwd+bwd")]
    # CPU: N=4096 D=4096 fp32 is the acceptance shape (our CPU backend ≥ 2× eager there)
    acc = [Case(4096, 4096, torch.float32, res, p) for res in (False, True) for p in ("fwd", "fwd+bwd")]
    if quick:
        return [c for c in acc if not c.residual]
    return acc + [Case(2048, 5120, dt, False, p) for dt in (torch.float32, torch.bfloat16) for p in ("fwd", "fwd+bwd")]


def traffic(case: Case) -> tuple[int, None]:
    b = torch.empty((), dtype=case.dtype).element_size()
    nd, wb = case.n * case.d * b, case.d * b
    fwd = (4 if case.residual else 2) * nd + wb
    bwd = (4 if case.residual else 3) * nd + wb
    return (fwd if case.pass_ == "fwd" else fwd + bwd), None


def make_inputs(case: Case, n_sets: int, device: torch.device) -> list[Inputs]:
    gen = torch.Generator(device=device).manual_seed(1234 + case.n + case.d)
    grad = case.pass_ == "fwd+bwd"

    def rand(*shape, scale=1.0, offset=0.0, requires_grad=False):
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * scale + offset
        return t.to(case.dtype).requires_grad_(requires_grad)

    w = rand(case.d, scale=0.1, offset=1.0, requires_grad=grad)
    return [Inputs(x=rand(case.n, case.d, requires_grad=grad), w=w,
                   res=rand(case.n, case.d, requires_grad=grad) if case.residual else None,
                   dy=rand(case.n, case.d) if grad else None,
                   ds=rand(case.n, case.d) if grad and case.residual else None)
            for _ in range(n_sets)]


def step(f: Callable, case: Case) -> Callable[[Inputs], object]:
    """One timed call: ``f(x, w, res)`` returns y, or (y, s) with a residual. fwd+bwd returns the
    input gradients (torch.autograd.grad: no accumulation into .grad, no copies)."""
    if case.pass_ == "fwd":
        return lambda inp: f(inp.x, inp.w, inp.res)

    def fwd_bwd(inp: Inputs):
        out = f(inp.x, inp.w, inp.res)
        if case.residual:
            return torch.autograd.grad(out, (inp.x, inp.res, inp.w), (inp.dy, inp.ds))
        return torch.autograd.grad(out, (inp.x, inp.w), inp.dy)

    return fwd_bwd


# ------------------------------------------------------------------------------------ providers
def _import_bk():
    try:
        import baichuan_kernels as bk
        from baichuan_kernels.reference.rms_norm import rms_norm_ref
        return bk, rms_norm_ref, None
    except Exception as exc:
        return None, None, f"baichuan_kernels is not importable ({type(exc).__name__}: {exc})"


def _ours(backend: str, device: torch.device) -> Provider:
    bk, _, err = _import_bk()
    reason = err
    reason = reason or backend_reason(OP, backend, device)

    def build(case: Case):
        # probe with two rows: an input the backend does not support raises ValueError with reasons
        x = torch.ones(2, case.d, device=device, dtype=case.dtype)
        try:
            bk.rms_norm(x, torch.ones(case.d, device=device, dtype=case.dtype), EPS,
                        residual=x if case.residual else None, backend=backend)
        except ValueError as exc:
            raise Unsupported(str(exc)) from None
        return step(lambda x, w, res: bk.rms_norm(x, w, EPS, residual=res, backend=backend), case)

    return Provider(backend, "ours", build, reason)


@functools.lru_cache(maxsize=None)
def _compiled_ref() -> Callable:
    """The reference under torch.compile (default mode), one graph per (D, dtype, residual, grad):
    the row count N is marked dynamic, every other size static (no automatic dynamic shapes), so
    the Baichuan shapes cost half the compilations with the same static-D kernels."""
    import torch._dynamo
    cfg = torch._dynamo.config
    cfg.automatic_dynamic_shapes = False
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))
    _, ref, _ = _import_bk()
    compiled = torch.compile(ref, fullgraph=True)

    def f(x, w, res):
        torch._dynamo.maybe_mark_dynamic(x, 0)
        if res is not None:
            torch._dynamo.maybe_mark_dynamic(res, 0)
        return compiled(x, w, EPS, residual=res)

    return f


def _liger(device: torch.device) -> Provider:
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except Exception as exc:
        return Provider("liger", "peer", None, f"liger_kernel is not importable ({type(exc).__name__}: {exc})")
    if device.type != "cuda":
        return Provider("liger", "peer", None, "Liger-Kernel's kernels are Triton, GPU only")
    try:
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
    except Exception:
        LigerFusedAddRMSNormFunction = None
    has_in_place = "in_place" in inspect.signature(LigerRMSNormFunction.forward).parameters
    extra = (False,) if has_in_place else ()  # in_place=False: dx in a fresh tensor, like ours

    def f(x, w, res):
        if res is None:
            return LigerRMSNormFunction.apply(x, w, EPS, 0.0, "gemma", *extra)
        return LigerFusedAddRMSNormFunction.apply(x, res, w, EPS, 0.0, "gemma", *extra)

    def build(case: Case):
        if case.residual and LigerFusedAddRMSNormFunction is None:
            raise Unsupported("this liger_kernel has no LigerFusedAddRMSNormFunction")
        return step(f, case)

    return Provider("liger", "peer", build)


def _torch_fused(device: torch.device) -> Provider:
    if device.type != "cuda":
        return Provider("torch", "peer", None, "GPU-only peer (F.rms_norm's fused CUDA kernel)")
    if not hasattr(torch.nn.functional, "rms_norm"):
        return Provider("torch", "peer", None, "this torch has no torch.nn.functional.rms_norm")

    def f(x, w, res):  # unfused add, then torch's fused RMSNorm
        s = x if res is None else x + res
        y = torch.nn.functional.rms_norm(s, (s.shape[-1],), w, EPS)
        return y if res is None else (y, s)

    return Provider("torch", "peer", lambda case: step(f, case))


def providers(device: torch.device) -> list[Provider]:
    _, ref, err = _import_bk()
    return [
        *(_ours(b, device) for b in OUR_BACKENDS),
        Provider("eager", "baseline", lambda case: step(lambda x, w, res: ref(x, w, EPS, residual=res), case), err),
        Provider("compile", "baseline", lambda case: step(_compiled_ref(), case), err),
        _liger(device),
        _torch_fused(device),
    ]


def run(ctx: Context, log: Callable[[str], None] = print):
    return run_cases(ctx, OP, cases(ctx.device, ctx.quick), providers(ctx.device),
                     functools.partial(make_inputs, device=ctx.device), traffic, log=log)

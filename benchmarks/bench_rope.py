"""RoPE: ``apply_rope`` (q, k: [B, T, H, Dh]) and the fused W_pack split ``split_qkv_rope``
(qkv: [B, T, 3·H·Dh] → rotated q, k and v), our backends against the eager reference, the reference
under torch.compile and Liger-Kernel's ``LigerRopeFunction`` (GPU peer, apply_rope only).

Memory-bound, so the figure of merit is GB/s of the minimal traffic (b = bytes per element,
D = H·Dh, N = B·T; the fp32 cos/sin rows are cache-resident and not counted):

    apply_rope      fwd: reads q, k, writes q', k'         4·N·D·b;   bwd: the same   → fwd+bwd 8·N·D·b
    split_qkv_rope  fwd: reads qkv, writes q, k, v         6·N·D·b;   bwd: reads dq, dk, dv, writes dqkv
                    6·N·D·b                                            → fwd+bwd 12·N·D·b
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .common import Context, Provider, Unsupported, run_cases, backend_reason

OP = "rope"
OUR_BACKENDS = ("cuda", "triton", "cpu")
H, DH = 32, 128  # Baichuan 2-7B


@dataclass(frozen=True)
class Case:
    fn: str  # "apply_rope" | "split_qkv_rope"
    b: int
    t: int
    dtype: torch.dtype
    pass_: str  # "fwd" | "fwd+bwd"

    @property
    def label(self) -> str:
        return f"{'apply' if self.fn == 'apply_rope' else 'split'} N={self.b * self.t}"


@dataclass(frozen=True)
class Inputs:
    args: tuple  # (q, k) or (qkv,)
    cos: torch.Tensor  # fp32 [T, Dh]
    sin: torch.Tensor
    grads: Optional[tuple]  # upstream gradients of the outputs (fwd+bwd)


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    if device.type == "cuda":
        shapes = [(4, 4096)] if quick else [(1, 4096), (4, 4096)]  # N = 4k, 16k tokens
        dtype = torch.bfloat16
    else:
        shapes = [(1, 1024)] if quick else [(1, 2048)]  # fp32 7B heads, modest N
        dtype = torch.float32
    return [Case(fn, b, t, dtype, p) for fn in ("apply_rope", "split_qkv_rope") for b, t in shapes
            for p in ("fwd", "fwd+bwd")]


def traffic(case: Case) -> tuple[int, None]:
    b = torch.empty((), dtype=case.dtype).element_size()
    nd = case.b * case.t * H * DH * b
    per = 4 if case.fn == "apply_rope" else 6
    return (per * nd if case.pass_ == "fwd" else 2 * per * nd), None


def make_inputs(case: Case, n_sets: int, device: torch.device) -> list[Inputs]:
    from baichuan_kernels.reference.rope import rope_cos_sin_ref

    gen = torch.Generator(device=device).manual_seed(99 + case.b * case.t)
    grad = case.pass_ == "fwd+bwd"
    cos, sin = rope_cos_sin_ref(case.t, DH, device=device)

    def rand(*shape, requires_grad=grad):
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        return t.to(case.dtype).requires_grad_(requires_grad)

    sets = []
    heads = (case.b, case.t, H, DH)
    for _ in range(n_sets):
        if case.fn == "apply_rope":
            args = (rand(*heads), rand(*heads))
            grads = (rand(*heads, requires_grad=False), rand(*heads, requires_grad=False)) if grad else None
        else:
            args = (rand(case.b, case.t, 3 * H * DH),)
            grads = tuple(rand(*heads, requires_grad=False) for _ in range(3)) if grad else None
        sets.append(Inputs(args, cos, sin, grads))
    return sets


def step(f: Callable, case: Case) -> Callable[[Inputs], object]:
    """``f(*args, cos, sin)`` returns the outputs; fwd+bwd returns the input gradients."""
    if case.pass_ == "fwd":
        return lambda inp: f(*inp.args, inp.cos, inp.sin)
    return lambda inp: torch.autograd.grad(f(*inp.args, inp.cos, inp.sin), inp.args, inp.grads)


# ------------------------------------------------------------------------------------ providers
def _import_bk():
    try:
        import baichuan_kernels as bk
        from baichuan_kernels.reference.rope import apply_rope_ref
        from baichuan_kernels.reference.split_qkv_rope import split_qkv_rope_ref
        return bk, {"apply_rope": apply_rope_ref, "split_qkv_rope": split_qkv_rope_ref}, None
    except Exception as exc:
        return None, None, f"baichuan_kernels is not importable ({type(exc).__name__}: {exc})"


def _call(fns: dict, case: Case, **kw) -> Callable:
    if case.fn == "apply_rope":
        return lambda q, k, cos, sin: fns["apply_rope"](q, k, cos, sin, **kw)
    return lambda qkv, cos, sin: fns["split_qkv_rope"](qkv, cos, sin, num_heads=H, **kw)


def _ours(backend: str, device: torch.device) -> Provider:
    bk, _, err = _import_bk()
    reason = err
    reason = reason or backend_reason("apply_rope", backend, device)

    def build(case: Case):
        fns = {"apply_rope": bk.apply_rope, "split_qkv_rope": bk.split_qkv_rope}
        cos, sin = bk.rope_cos_sin(1, DH, device=device)
        x = torch.ones(1, 1, H, DH, device=device, dtype=case.dtype)
        try:
            bk.apply_rope(x, x, cos, sin, backend=backend)
        except ValueError as exc:
            raise Unsupported(str(exc)) from None
        return step(_call(fns, case, backend=backend), case)

    return Provider(backend, "ours", build, reason)


@functools.lru_cache(maxsize=None)
def _compiled_refs() -> dict:
    """The references under torch.compile (default mode), static shapes."""
    import torch._dynamo
    cfg = torch._dynamo.config
    cfg.automatic_dynamic_shapes = False
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))
    _, refs, _ = _import_bk()
    return {name: torch.compile(fn, fullgraph=True) for name, fn in refs.items()}


def _liger(device: torch.device) -> Provider:
    try:
        from liger_kernel.ops.rope import LigerRopeFunction
    except Exception as exc:
        return Provider("liger", "peer", None, f"liger_kernel is not importable ({type(exc).__name__}: {exc})")
    if device.type != "cuda":
        return Provider("liger", "peer", None, "Liger-Kernel's kernels are Triton, GPU only")

    def f(q, k, cos, sin):
        # Liger takes the HF layout [B, H, T, Dh]; our [B, T, H, Dh] tensors are exactly its physical
        # layout once transposed (no copy), and cos/sin [1, T, Dh].
        qo, ko = LigerRopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2), cos[None], sin[None])
        return qo.transpose(1, 2), ko.transpose(1, 2)

    def build(case: Case):
        if case.fn != "apply_rope":
            raise Unsupported("Liger has no fused W_pack split")
        return step(f, case)

    return Provider("liger", "peer", build)


def providers(device: torch.device) -> list[Provider]:
    _, refs, err = _import_bk()
    return [
        *(_ours(b, device) for b in OUR_BACKENDS),
        Provider("eager", "baseline", lambda case: step(_call(refs, case), case), err),
        Provider("compile", "baseline", lambda case: step(_call(_compiled_refs(), case), case), err),
        _liger(device),
    ]


def run(ctx: Context, log: Callable[[str], None] = print):
    return run_cases(ctx, OP, cases(ctx.device, ctx.quick), providers(ctx.device),
                     functools.partial(make_inputs, device=ctx.device), traffic, log=log)

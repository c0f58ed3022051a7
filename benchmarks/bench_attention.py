"""Flash attention (ALiBi causal for 13B, plain causal for 7B): our backends against the eager
reference, torch SDPA, FlexAttention with an ALiBi score_mod, and xformers when importable.

Compute-bound, so the figure of merit is TFLOP/s (quoted as % of the bf16 matmul peak measured in the
same run):

    fwd        4·B·T²·H·Dh        (QKᵀ and PV, 2 flops per multiply-add), halved when causal
    fwd+bwd    3.5 × fwd          (the backward is 2.5 × fwd: QKᵀ recomputed, dV, dP, dQ, dK)

Peers:
* ``sdpa``  — ``F.scaled_dot_product_attention``: the flash backend for plain causal, the
  memory-efficient backend with a materialised ``[B, H, T, T]`` ALiBi + causal bias for ALiBi (what
  Baichuan 2's own code does; the bias is built once per case, outside the timing: a lower bound).
* ``flex``  — ``torch.nn.attention.flex_attention`` compiled, ALiBi as a ``score_mod`` and a causal
  block mask (GPU only).
* ``xformers`` — ``memory_efficient_attention`` with a materialised ALiBi bias (when importable).
* ``fa4``   — FlashAttention-4 (``flash-attn-4``, ``flash_attn.cute.flash_attn_func``) when importable:
  ``causal=True``, ALiBi as a CuTe ``score_mod`` reading the slopes from ``aux_tensors`` (GPU only; a
  combination its build refuses, e.g. a score_mod backward, is reported as unsupported with its error).
* ``eager`` — the reference (materialises the scores; T ≤ 2048 on GPU for memory).

GPU shapes (issue 14): B·T = 16k tokens at T = 2k / 4k / 8k, Dh 128, bf16: ALiBi with H = 40 (13B) and
plain causal with H = 32 (7B), fwd and fwd+bwd. Our Triton kernels' TMA loads can be switched off for
an A/B with ``BAICHUAN_ATTN_TMA=0`` (read at import).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .common import Context, Provider, Unsupported, run_cases, backend_reason

OP = "attention"
OUR_BACKENDS = ("cuda", "triton", "cpu")
TOKENS = 16384  # B·T on GPU


@dataclass(frozen=True)
class Case:
    b: int
    t: int
    h: int
    dh: int
    alibi: bool  # ALiBi (13B) or plain causal (7B, RoPE applied before)
    dtype: torch.dtype
    pass_: str  # "fwd" | "fwd+bwd"

    @property
    def label(self) -> str:
        return f"B={self.b} T={self.t} H={self.h} " + ("alibi" if self.alibi else "causal")


@dataclass(frozen=True)
class Inputs:
    q: torch.Tensor  # [B, T, H, Dh]
    k: torch.Tensor
    v: torch.Tensor
    slopes: Optional[torch.Tensor]  # fp32 [H]
    do: Optional[torch.Tensor]  # [B, T, H, Dh] (fwd+bwd)


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    passes = ("fwd", "fwd+bwd")
    if device.type == "cuda":
        ts = (4096,) if quick else (2048, 4096, 8192)
        out = [Case(TOKENS // t, t, 40, 128, True, torch.bfloat16, p) for t in ts for p in passes]
        out += [Case(TOKENS // t, t, 32, 128, False, torch.bfloat16, p) for t in ts for p in passes]
        return out
    # CPU: small shapes (our CPU kernel vs the eager reference)
    shapes = [(1, 512, 8, 64)] if quick else [(1, 512, 8, 64), (2, 1024, 8, 128)]
    return [Case(b, t, h, dh, True, dt, p) for b, t, h, dh in shapes
            for dt in ((torch.float32,) if quick else (torch.float32, torch.bfloat16)) for p in passes]


def traffic(case: Case) -> tuple[int, int]:
    b = torch.empty((), dtype=case.dtype).element_size()
    n = case.b * case.t * case.h * case.dh
    fwd_flops = 4 * case.b * case.t * case.t * case.h * case.dh // 2  # causal
    if case.pass_ == "fwd":
        return 4 * n * b, fwd_flops  # q, k, v read, out written
    return 12 * n * b, int(3.5 * fwd_flops)  # + dout, out read; dq, dk, dv written (roughly)


def _slopes(h: int, device) -> torch.Tensor:
    from baichuan_kernels.reference.alibi import alibi_slopes_ref
    return alibi_slopes_ref(h).to(device=device, dtype=torch.float32)


def make_inputs(case: Case, n_sets: int, device: torch.device) -> list[Inputs]:
    gen = torch.Generator(device=device).manual_seed(4321 + case.t + case.h)
    grad = case.pass_ == "fwd+bwd"
    shape = (case.b, case.t, case.h, case.dh)

    def rand(requires_grad=False):
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        return t.to(case.dtype).requires_grad_(requires_grad)

    slopes = _slopes(case.h, device) if case.alibi else None
    return [Inputs(rand(grad), rand(grad), rand(grad), slopes, rand() if grad else None) for _ in range(n_sets)]


def step(f: Callable, case: Case) -> Callable[[Inputs], object]:
    """``f(q, k, v, slopes)`` -> out [B, T, H, Dh]; fwd+bwd returns (dq, dk, dv)."""
    if case.pass_ == "fwd":
        return lambda inp: f(inp.q, inp.k, inp.v, inp.slopes)
    return lambda inp: torch.autograd.grad(f(inp.q, inp.k, inp.v, inp.slopes), (inp.q, inp.k, inp.v), inp.do)


# ------------------------------------------------------------------------------------ providers
def _import_bk():
    try:
        import baichuan_kernels as bk
        return bk, None
    except Exception as exc:
        return None, f"baichuan_kernels is not importable ({type(exc).__name__}: {exc})"


def _ours(backend: str, device: torch.device) -> Provider:
    bk, reason = _import_bk()
    reason = reason or backend_reason(OP, backend, device)

    def build(case: Case):
        probe = torch.ones(1, 16, case.h, case.dh, device=device, dtype=case.dtype,
                           requires_grad=case.pass_ == "fwd+bwd")
        try:
            bk.attention(probe, probe, probe, alibi_slopes=_slopes(case.h, device) if case.alibi else None,
                         backend=backend)
        except ValueError as exc:
            raise Unsupported(str(exc)) from None
        return step(lambda q, k, v, s: bk.attention(q, k, v, causal=True, alibi_slopes=s, backend=backend), case)

    return Provider(backend, "ours", build, reason)


def _eager(device: torch.device) -> Provider:
    from baichuan_kernels.reference.attention import attention_ref

    def build(case: Case):
        if device.type == "cuda" and case.t > 2048:
            raise Unsupported("the eager reference materialises [B, H, T, T] fp32 scores: T ≤ 2048 on GPU")
        return step(lambda q, k, v, s: attention_ref(q, k, v, causal=True, alibi_slopes=s), case)

    return Provider("eager", "baseline", build)


def _alibi_bias(case: Case, slopes: torch.Tensor, device) -> torch.Tensor:
    """[B, H, T, T] ALiBi + causal bias in the input dtype (Baichuan 2's own materialisation)."""
    pos = torch.arange(case.t, device=device)
    rel = (pos[None, :] - pos[:, None]).to(torch.float32)
    bias = (slopes[:, None, None] * rel).masked_fill(rel > 0, float("-inf")).to(case.dtype)  # [H, T, T]
    return bias[None].expand(case.b, -1, -1, -1).contiguous()


def _sdpa(device: torch.device) -> Provider:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    F = torch.nn.functional

    def build(case: Case):
        if not case.alibi:
            backends = [SDPBackend.FLASH_ATTENTION] if device.type == "cuda" else None

            def f(q, k, v, s):
                with sdpa_kernel(backends) if backends else _null():
                    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                       is_causal=True)
                return o.transpose(1, 2)
        else:
            bias = _alibi_bias(case, _slopes(case.h, device), device)
            backends = [SDPBackend.EFFICIENT_ATTENTION] if device.type == "cuda" else None

            def f(q, k, v, s):
                with sdpa_kernel(backends) if backends else _null():
                    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                       attn_mask=bias)
                return o.transpose(1, 2)

        return step(f, case)

    return Provider("sdpa", "peer", build)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@functools.lru_cache(maxsize=None)
def _flex_compiled():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention)


def _flex(device: torch.device) -> Provider:
    if device.type != "cuda":
        return Provider("flex", "peer", None, "FlexAttention is benchmarked on GPU only (CPU compile is slow)")
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except Exception as exc:
        return Provider("flex", "peer", None, f"torch.nn.attention.flex_attention not importable ({exc})")

    def build(case: Case):
        slopes = _slopes(case.h, device)

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        def alibi(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (kv_idx - q_idx)

        mask = create_block_mask(causal, None, None, case.t, case.t, device=device)
        flex = _flex_compiled()
        score_mod = alibi if case.alibi else None

        def f(q, k, v, s):
            o = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod, block_mask=mask)
            return o.transpose(1, 2)

        return step(f, case)

    return Provider("flex", "peer", build)


def _xformers(device: torch.device) -> Provider:
    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:
        return Provider("xformers", "peer", None, f"xformers is not importable ({type(exc).__name__})")
    if device.type != "cuda":
        return Provider("xformers", "peer", None, "xformers has no CPU path")
    from baichuan_kernels.ops.attention import attention_xformers

    return Provider("xformers", "peer", lambda case: step(
        lambda q, k, v, s: attention_xformers(q, k, v, causal=True, alibi_slopes=s), case))


@functools.lru_cache(maxsize=None)
def _fa4_alibi_score_mod():
    """ALiBi for FlashAttention-4: ``score + slopes[h] · (kv - q)``, slopes fp32 [H] in aux_tensors[0]."""
    import cutlass
    import cutlass.cute as cute

    @cute.jit
    def alibi(scores, b_idx, h_idx, q_idx, kv_idx, aux_tensors):
        slopes = aux_tensors[0]
        head = cute.make_fragment(1, cutlass.Int32)
        head.store(h_idx)
        slope = cute.make_fragment(1, cutlass.Float32)
        slope[0] = slopes[head[0]]
        rel = (kv_idx - q_idx).to(cutlass.Float32)
        return scores + slope.load() * rel

    return alibi


def _fa4(device: torch.device) -> Provider:
    if device.type != "cuda":
        return Provider("fa4", "peer", None, "FlashAttention-4 is GPU only")
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as exc:
        return Provider("fa4", "peer", None, f"flash-attn-4 (flash_attn.cute) is not importable ({type(exc).__name__})")

    def build(case: Case):
        try:
            score_mod = _fa4_alibi_score_mod() if case.alibi else None
        except Exception as exc:
            raise Unsupported(f"flash-attn-4 score_mod: {type(exc).__name__}: {exc}") from None

        def f(q, k, v, s):
            extra = dict(score_mod=score_mod, aux_tensors=[s]) if case.alibi else {}
            out = flash_attn_func(q, k, v, causal=True, **extra)  # [B, T, H, Dh] layout, like ours
            return out[0] if isinstance(out, tuple) else out

        run = step(f, case)
        probe = make_inputs(Case(1, 256, case.h, case.dh, case.alibi, case.dtype, case.pass_), 1, device)[0]
        try:  # compile once on a small shape; a refused combination is reported, not a crash
            run(probe)
            torch.cuda.synchronize()
        except Exception as exc:
            raise Unsupported(f"flash-attn-4 refused {case.pass_}: {type(exc).__name__}: {str(exc)[:200]}") from None
        return run

    return Provider("fa4", "peer", build)


def providers(device: torch.device) -> list[Provider]:
    bk, err = _import_bk()
    if err:
        return [Provider(b, "ours", None, err) for b in OUR_BACKENDS]
    return [*(_ours(b, device) for b in OUR_BACKENDS), _eager(device), _sdpa(device), _flex(device),
            _xformers(device), _fa4(device)]


def run(ctx: Context, log: Callable[[str], None] = print):
    return run_cases(ctx, OP, cases(ctx.device, ctx.quick), providers(ctx.device),
                     functools.partial(make_inputs, device=ctx.device), traffic, log=log)

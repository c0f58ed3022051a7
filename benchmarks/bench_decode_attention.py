"""Decode attention (one new token per sequence over a KV cache, ALiBi): our backends against the
eager reference and torch SDPA with a materialised ALiBi bias row.

Bound by reading the cache, so the figure of merit is GB/s over the KV bytes actually needed
(``2 · Σ_b L_b · H · Dh`` elements, every sequence at the full cache length here), quoted as % of
the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from .common import Context, Provider, run_cases, backend_reason

OP = "decode_attention"
OUR_BACKENDS = ("cuda", "triton", "cpu")


@dataclass(frozen=True)
class Case:
    b: int
    s: int  # cache length (every sequence full)
    h: int
    dh: int
    dtype: torch.dtype
    pass_: str = "fwd"

    @property
    def label(self) -> str:
        return f"B={self.b} L={self.s} H={self.h}"


@dataclass(frozen=True)
class Inputs:
    q: torch.Tensor  # [B, 1, H, Dh]
    k: torch.Tensor  # [B, S, H, Dh]
    v: torch.Tensor
    lens: torch.Tensor  # int32 [B]
    slopes: torch.Tensor  # fp32 [H]


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    if device.type == "cuda":
        grid = [(1, 4096), (8, 2048), (32, 1024)] if quick else [(b, s) for b in (1, 8, 32) for s in (512, 1024, 4096)]
        return [Case(b, s, 40, 128, torch.bfloat16) for b, s in grid]
    grid = [(4, 1024)] if quick else [(1, 2048), (4, 1024), (8, 512)]
    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16)
    return [Case(b, s, 40, 128, dt) for b, s in grid for dt in dtypes]


def traffic(case: Case) -> tuple[int, None]:
    b = torch.empty((), dtype=case.dtype).element_size()
    return 2 * case.b * case.s * case.h * case.dh * b + 2 * case.b * case.h * case.dh * b, None


def make_inputs(case: Case, n_sets: int, device: torch.device) -> list[Inputs]:
    from baichuan_kernels.reference.alibi import alibi_slopes_ref
    gen = torch.Generator(device=device).manual_seed(99 + case.b + case.s)
    slopes = alibi_slopes_ref(case.h).to(device=device, dtype=torch.float32)
    lens = torch.full((case.b,), case.s, dtype=torch.int32, device=device)

    def rand(*shape):
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(case.dtype)

    return [Inputs(rand(case.b, 1, case.h, case.dh), rand(case.b, case.s, case.h, case.dh),
                   rand(case.b, case.s, case.h, case.dh), lens, slopes) for _ in range(n_sets)]


def _ours(backend: str, device: torch.device) -> Provider:
    try:
        import baichuan_kernels as bk
        reason = None
    except Exception as exc:
        bk, reason = None, f"baichuan_kernels is not importable ({exc})"
    reason = reason or backend_reason(OP, backend, device)

    def build(case: Case):
        return lambda i: bk.decode_attention(i.q, i.k, i.v, i.lens, alibi_slopes=i.slopes, backend=backend)

    return Provider(backend, "ours", build, reason)


def _eager() -> Provider:
    from baichuan_kernels.reference.decode_attention import decode_attention_ref
    return Provider("eager", "baseline", lambda case: (
        lambda i: decode_attention_ref(i.q, i.k, i.v, i.lens, alibi_slopes=i.slopes)))


def _sdpa(device: torch.device) -> Provider:
    F = torch.nn.functional

    def build(case: Case):
        pos = torch.arange(case.s, device=device, dtype=torch.float32)

        def f(i: Inputs):
            bias = (i.slopes[:, None] * (pos - (case.s - 1)))[None, :, None, :].to(case.dtype)  # [1, H, 1, S]
            o = F.scaled_dot_product_attention(i.q.transpose(1, 2), i.k.transpose(1, 2), i.v.transpose(1, 2),
                                               attn_mask=bias)
            return o.transpose(1, 2)

        return f

    return Provider("sdpa", "peer", build)


def providers(device: torch.device) -> list[Provider]:
    return [*(_ours(b, device) for b in OUR_BACKENDS), _eager(), _sdpa(device)]


def run(ctx: Context, log: Callable[[str], None] = print):
    return run_cases(ctx, OP, cases(ctx.device, ctx.quick), providers(ctx.device),
                     functools.partial(make_inputs, device=ctx.device), traffic, log=log)

"""Decode attention (one new token per sequence over a KV cache): our backends against the eager
reference, torch SDPA and FlashInfer's batch decode (where its wheel imports).

Shapes (GPU): B in {1, 4, 16, 32} x L in {512, 2k, 8k}, Dh 128, bf16, for Baichuan2-7B (H 32, RoPE:
no bias) and 13B (H 40, ALiBi). SDPA gets the ALiBi bias as a float mask ``[B, H, 1, L]`` built
outside the timed call (as a server would build it once per step for all layers); FlashInfer gets
our caches as a paged cache of one page per sequence (page size L, NHD) with
``pos_encoding_mode="ALIBI"`` (its own slopes: the rel err column shows if they differ from ours).

Bound by reading the cache, so the figure of merit is GB/s over the KV bytes actually needed
(``2 · Σ_b L_b · H · Dh`` elements, every sequence at the full cache length here), quoted as % of
the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

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
    alibi: bool = True
    pass_: str = "fwd"

    @property
    def label(self) -> str:
        return f"B={self.b} L={self.s} H={self.h}" + (" alibi" if self.alibi else "")


@dataclass(frozen=True)
class Inputs:
    q: torch.Tensor  # [B, 1, H, Dh]
    k: torch.Tensor  # [B, S, H, Dh]
    v: torch.Tensor
    lens: torch.Tensor  # int32 [B]
    slopes: Optional[torch.Tensor]  # fp32 [H] (ALiBi) or None
    bias: Optional[torch.Tensor]  # [B, H, 1, S] in the case dtype (SDPA's ALiBi mask) or None


# (H, ALiBi): Baichuan2-7B (RoPE, 32 heads) and 13B (ALiBi, 40 heads)
MODELS = ((32, False), (40, True))


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    if device.type == "cuda":
        grid = [(1, 8192), (16, 2048), (32, 512)] if quick else [(b, s) for b in (1, 4, 16, 32)
                                                                  for s in (512, 2048, 8192)]
        return [Case(b, s, h, 128, torch.bfloat16, alibi) for h, alibi in MODELS for b, s in grid]
    grid = [(4, 1024)] if quick else [(1, 2048), (4, 1024), (8, 512)]
    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16)
    return [Case(b, s, h, 128, dt, alibi) for h, alibi in MODELS for b, s in grid for dt in dtypes]


def traffic(case: Case) -> tuple[int, None]:
    b = torch.empty((), dtype=case.dtype).element_size()
    return 2 * case.b * case.s * case.h * case.dh * b + 2 * case.b * case.h * case.dh * b, None


def make_inputs(case: Case, n_sets: int, device: torch.device) -> list[Inputs]:
    from baichuan_kernels.reference.alibi import alibi_slopes_ref
    gen = torch.Generator(device=device).manual_seed(99 + case.b + case.s)
    slopes = alibi_slopes_ref(case.h).to(device=device, dtype=torch.float32) if case.alibi else None
    lens = torch.full((case.b,), case.s, dtype=torch.int32, device=device)
    bias = None
    if case.alibi:  # [B, H, 1, S]: slope_h · (j - (L_b - 1))
        rel = torch.arange(case.s, device=device, dtype=torch.float32)[None, :] - (lens.float()[:, None] - 1)
        bias = (slopes[None, :, None, None] * rel[:, None, None, :]).to(case.dtype)

    def rand(*shape):
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(case.dtype)

    return [Inputs(rand(case.b, 1, case.h, case.dh), rand(case.b, case.s, case.h, case.dh),
                   rand(case.b, case.s, case.h, case.dh), lens, slopes, bias) for _ in range(n_sets)]


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
        def f(i: Inputs):
            o = F.scaled_dot_product_attention(i.q.transpose(1, 2), i.k.transpose(1, 2), i.v.transpose(1, 2),
                                               attn_mask=i.bias)  # bias: [B, H, 1, S] or None
            return o.transpose(1, 2)

        return f

    return Provider("sdpa", "peer", build)


def _flashinfer(device: torch.device) -> Provider:
    reason = None if device.type == "cuda" else "FlashInfer runs on CUDA only"
    try:
        import flashinfer
    except Exception as exc:  # not installed, or its wheel does not match this torch / CUDA
        flashinfer, reason = None, reason or f"flashinfer is not importable ({type(exc).__name__}: {exc})"

    def build(case: Case):
        # One page per sequence: page size S, page b = sequence b, every page full (last_page_len = L).
        workspace = torch.empty(128 * 2**20, dtype=torch.uint8, device=device)
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
        indptr = torch.arange(case.b + 1, dtype=torch.int32, device=device)
        indices = torch.arange(case.b, dtype=torch.int32, device=device)
        last = torch.full((case.b,), case.s, dtype=torch.int32, device=device)
        wrapper.plan(indptr, indices, last, case.h, case.h, case.dh, case.s,
                     pos_encoding_mode="ALIBI" if case.alibi else "NONE",
                     q_data_type=case.dtype, kv_data_type=case.dtype)
        return lambda i: wrapper.run(i.q[:, 0], (i.k, i.v))[:, None]  # [B, H, Dh] -> [B, 1, H, Dh]

    return Provider("flashinfer", "peer", build, reason)


def providers(device: torch.device) -> list[Provider]:
    return [*(_ours(b, device) for b in OUR_BACKENDS), _eager(), _sdpa(device), _flashinfer(device)]


def run(ctx: Context, log: Callable[[str], None] = print):
    return run_cases(ctx, OP, cases(ctx.device, ctx.quick), providers(ctx.device),
                     functools.partial(make_inputs, device=ctx.device), traffic, log=log)

"""Weight-only quantized matmul (W8A16 per-channel, W4A16 group 128, NF4 blocks of 64 as bitsandbytes):
our backends against the bf16 matmul of the unquantized weight ("eager", cuBLAS on a GPU; ``x eager``
is the speed-up over it), the fp32 matmul (CPU), torch's ``_weight_int4pack_mm`` /
``_weight_int8pack_mm``, torchao's int4 weight-only linear and bitsandbytes (NF4) when importable.

Decode is memory bound: the figure of merit is GB/s over the bytes one call must move,

    bytes = packed weight (N·K·bits/8) + scales/zeros (fp32; NF4: one absmax per 64) + x (M·K·2) + y (M·N·2)

— the same count for every provider of a case, so for "eager" (which reads a 16-bit weight) it is an
*effective* rate: how fast the quantized weight would have to stream to match. TFLOP/s = 2·M·N·K / t.
Shapes: Baichuan 2 projections K×N (7B: W_pack 4096×12288, o_proj 4096×4096, gate‖up 4096×22016, down
11008×4096; 13B: W_pack 5120×15360, gate‖up 5120×27392, down 13696×5120) at M = 1, 2, 4, 8, 16 (decode
batches), 64 and 512 (prefill).
Weights rotate over sets larger than the cache, so every call reads them from memory.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .common import Context, Provider, Unsupported, run_cases, backend_reason

OP = "quant_matmul"
OUR_BACKENDS = ("cuda", "triton", "cpu")
GROUP = 128  # int4
NF4_GROUP = 64  # bitsandbytes' default NF4 block (the released Baichuan2-*-4bits models)
BITS = (4, 8, "nf4")
GPU_SHAPES = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096), (5120, 15360), (5120, 27392),
              (13696, 5120)]
GPU_MS = (1, 2, 4, 8, 16, 64, 512)


@dataclass(frozen=True)
class Case:
    k: int  # in features
    n: int  # out features
    m: int  # rows of x (tokens)
    bits: object  # 8 | 4 (group 128) | "nf4" (group 64)
    dtype: torch.dtype = torch.bfloat16
    pass_: str = "fwd"

    @property
    def label(self) -> str:
        return f"{'nf4' if self.bits == 'nf4' else f'w{self.bits}'} M={self.m} K={self.k} N={self.n}"

    @property
    def group(self) -> int:
        return NF4_GROUP if self.bits == "nf4" else GROUP


@dataclass
class Inputs:
    x: torch.Tensor  # [M, K] bf16
    w: torch.Tensor  # [N, K] bf16, the unquantized weight (eager)
    qw: object  # QuantizedWeight (bits of the case)
    extra: dict = field(default_factory=dict)  # peers' formats, converted once per set


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    if device.type == "cuda":
        shapes = [(4096, 12288), (11008, 4096)] if quick else GPU_SHAPES
        ms = (1, 16, 512) if quick else GPU_MS
        return [Case(k, n, m, bits) for bits in BITS for (k, n) in shapes for m in ms]
    # CPU acceptance: W8, W4 (and NF4) GEMV at M = 1..4 at least 2x the bf16 eager matmul at K×N = 4096×11008
    ms = (1,) if quick else (1, 2, 4, 16)
    return [Case(4096, 11008, m, bits) for m in ms for bits in BITS]


def traffic(case: Case) -> tuple[int, int]:
    groups = 1 if case.bits == 8 else case.k // case.group
    meta = case.n * groups * 4 * (2 if case.bits == 4 else 1)  # fp32 scales (+ zeros)
    nbytes = case.n * case.k * (8 if case.bits == 8 else 4) // 8 + meta + 2 * case.m * (case.k + case.n)
    return nbytes, 2 * case.m * case.n * case.k


def make_inputs(case: Case, n_sets: int, device: torch.device) -> list[Inputs]:
    import baichuan_kernels as bk
    gen = torch.Generator(device=device).manual_seed(4321 + case.k + case.n)
    sets = []
    for _ in range(n_sets):
        w = (torch.randn(case.n, case.k, generator=gen, device=device) * 0.02).to(torch.bfloat16)
        x = torch.randn(case.m, case.k, generator=gen, device=device).to(case.dtype)
        qw = bk.quantize_weight(w.float(), bits=case.bits, group_size=case.group)
        sets.append(Inputs(x, w, qw))
    return sets


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
        from baichuan_kernels import registry
        x = torch.ones(case.m, case.k, device=device, dtype=case.dtype)
        try:  # an input this backend does not take raises ValueError with the reasons
            registry.resolve(OP, backend, (x,), x, case.bits)
        except ValueError as exc:
            raise Unsupported(str(exc)) from None
        return lambda inp: bk.quant_matmul(inp.x, inp.qw, backend=backend)

    return Provider(backend, "ours", build, reason)


def _eager_bf16(case: Case) -> Callable:
    return lambda inp: inp.x @ inp.w.T


def _fp32(device: torch.device) -> Provider:
    if device.type != "cpu":
        return Provider("fp32", "baseline", None, "CPU-only baseline")

    def build(case: Case):
        def f(inp):
            if "w32" not in inp.extra:
                inp.extra["w32"] = inp.w.float()
            return inp.x.float() @ inp.extra["w32"].T
        return f

    return Provider("fp32", "baseline", build)


@functools.lru_cache(maxsize=None)
def _cpu_int8pack_bf16_ok() -> Optional[str]:
    """torch._weight_int8pack_mm with bf16 x has crashed the process on CPU (torch 2.13, small K):
    probe the benchmark's shape in a child process first."""
    code = ("import torch; x = torch.randn(1, 4096).bfloat16(); w = torch.randint(-127, 127, (64, 4096), "
            "dtype=torch.int8); torch._weight_int8pack_mm(x, w, torch.rand(64).bfloat16())")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"probe failed: {exc}"
    return None if r.returncode == 0 else f"crashes on CPU with bf16 x (probe exit {r.returncode})"


def _torch_int8pack(device: torch.device) -> Provider:
    if not hasattr(torch, "_weight_int8pack_mm"):
        return Provider("torch-int8", "peer", None, "this torch has no _weight_int8pack_mm")
    reason = _cpu_int8pack_bf16_ok() if device.type == "cpu" else None

    def build(case: Case):
        if case.bits != 8:
            raise Unsupported("int8 peer: w8 cases only")

        def f(inp):
            return torch._weight_int8pack_mm(inp.x, inp.qw.data, inp.qw.scales.to(inp.x.dtype))
        return f

    return Provider("torch-int8", "peer", build, reason)


def _int4pack_weight(qw, device: torch.device):
    """Our int4 weight in torch's tinygemm layout: w = (q - 8)·scale + zero, so zero = ours + 8·scale;
    scales and zeros as [G, N, 2]."""
    from baichuan_kernels.reference.quant_matmul import _unpack_nibbles
    q = _unpack_nibbles(qw.data)  # uint8 [N, K]
    sz = torch.stack([qw.scales.T, (qw.zeros + 8 * qw.scales).T], dim=-1).contiguous()  # [G, N, 2]
    if device.type == "cpu":
        return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2), sz
    packed = ((q[:, 0::2] << 4) | q[:, 1::2]).contiguous()  # [N, K/2], even k in the high nibble
    return torch._convert_weight_to_int4pack(packed, 8), sz


def _torch_int4pack(device: torch.device) -> Provider:
    name = "_weight_int4pack_mm_for_cpu" if device.type == "cpu" else "_weight_int4pack_mm"
    if not hasattr(torch, name):
        return Provider("torch-int4", "peer", None, f"this torch has no {name}")
    mm = getattr(torch, name)

    def build(case: Case):
        if case.bits != 4:
            raise Unsupported("int4 peer: w4 cases only")

        def f(inp):
            if "int4pack" not in inp.extra:
                w, sz = _int4pack_weight(inp.qw, device)
                inp.extra["int4pack"] = (w, sz.to(inp.x.dtype))
            w, sz = inp.extra["int4pack"]
            return mm(inp.x, w, GROUP, sz)
        return f

    return Provider("torch-int4", "peer", build)


def _bitsandbytes(device: torch.device) -> Provider:
    try:
        import bitsandbytes as bnb  # noqa: F401
        import bitsandbytes.functional as bnbf
    except Exception as exc:
        return Provider("bnb", "peer", None, f"bitsandbytes is not importable ({type(exc).__name__})")
    if device.type != "cuda":
        return Provider("bnb", "peer", None, "bitsandbytes kernels: GPU only here")

    def build(case: Case):
        if case.bits not in (4, "nf4"):
            raise Unsupported("bitsandbytes NF4 (4-bit) only")

        def f(inp):
            if "nf4" not in inp.extra:
                inp.extra["nf4"] = bnbf.quantize_4bit(inp.w, blocksize=64, quant_type="nf4")
            w, state = inp.extra["nf4"]
            return bnb.matmul_4bit(inp.x, w.t(), quant_state=state)
        return f

    return Provider("bnb", "peer", build)


def _torchao_int4(device: torch.device) -> Provider:
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
    except Exception as exc:
        return Provider("torchao-int4", "peer", None, f"torchao is not importable ({type(exc).__name__})")
    if device.type != "cuda":
        return Provider("torchao-int4", "peer", None, "torchao int4 weight-only: GPU only here")

    def build(case: Case):
        if case.bits != 4:
            raise Unsupported("torchao int4 peer: w4 cases only")

        def f(inp):
            if "torchao" not in inp.extra:
                lin = torch.nn.Linear(case.k, case.n, bias=False, device=device, dtype=torch.bfloat16)
                with torch.no_grad():
                    lin.weight.copy_(inp.w)
                quantize_(lin, Int4WeightOnlyConfig(group_size=GROUP))
                inp.extra["torchao"] = lin
            return inp.extra["torchao"](inp.x)
        return f

    return Provider("torchao-int4", "peer", build)


def _prepare_peers(providers_: list[Provider], sets: list[Inputs], case: Case) -> None:
    """Convert every set for the peers before timing (the CPU timer's warm-up does not visit all sets)."""
    for p in providers_:
        if p.skip_reason or p.kind == "ours":
            continue
        try:
            fn = p.build(case)
        except Unsupported:
            continue
        for inp in sets:
            try:
                fn(inp)
            except Exception:
                break


def providers(device: torch.device) -> list[Provider]:
    _, err = _import_bk()
    return [
        *(_ours(b, device) for b in OUR_BACKENDS),
        Provider("eager", "baseline", _eager_bf16, err),
        _fp32(device),
        _torch_int4pack(device),
        _torch_int8pack(device),
        _torchao_int4(device),
        _bitsandbytes(device),
    ]


def run(ctx: Context, log: Callable[[str], None] = print):
    provs = providers(ctx.device)

    def inputs(case: Case, n: int) -> list[Inputs]:
        sets = make_inputs(case, n, ctx.device)
        _prepare_peers(provs, sets, case)
        return sets

    return run_cases(ctx, OP, cases(ctx.device, ctx.quick), provs, inputs, traffic, log=log)

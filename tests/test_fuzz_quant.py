"""Property-based tests of quantize_weight / dequantize_weight / quant_matmul (bits 8, 4 and nf4, group_size):
random shapes (0/1-sized dims included), dtypes and layouts on every backend; bad inputs rejected with
errors that name the argument."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import baichuan_kernels as bk
from baichuan_kernels.reference.quant_matmul import quant_matmul_ref, quantize_weight_ref
from _backends import kernel_backends
from _fuzz import (
    explicit_kernel,
    check_op, describe, dim, examples_for, expect_rejection, float_dtypes, fuzz_backends, fuzz_settings, layouts,
    tensor,
)

GROUP_SIZES = (32, 64, 128)


@st.composite
def weight_cases(draw, wide=False):
    """``wide``: weights past the C++ GEMV's 16-row blocks and several groups (cpu backend only)."""
    bits = draw(st.sampled_from([8, 4, "nf4"]))
    if bits != 8:
        group = draw(st.sampled_from(GROUP_SIZES + (16,)))  # 16: not a supported group size
        K = group * draw(st.integers(1, 9 if wide else 3)) if draw(st.integers(0, 9)) else draw(st.integers(1, 100))
    else:
        group, K = 128, draw(dim(600 if wide else 70))
    return dict(N=draw(dim(40 if wide else 9)), K=K, bits=bits, group_size=group,
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64])),
                layout=draw(layouts), constant_row=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def _weight(c, device):
    w = tensor((c["N"], c["K"]), c["dtype"], device, seed=c["seed"], layout=c["layout"], scale=0.05)
    if c["constant_row"] and c["N"] > 1 and c["layout"] != "expanded":
        w[0] = 0.0  # an all-zero row: scale 0 must decode exactly, never NaN
        w[-1] = 0.0123  # a constant row: likewise
    return w


def _weight_error(c):
    """The documented reason a weight case is invalid: (argument, reason) or None."""
    if c["N"] * c["K"] == 0:
        return "weight"
    if c["bits"] != 8 and c["group_size"] not in GROUP_SIZES:
        return "group_size"
    if c["bits"] != 8 and c["K"] % c["group_size"]:
        return "group_size"
    return None


@fuzz_settings(80)
@given(weight_cases())
def test_quantize_dequantize_fuzz(c):
    w = _weight(c, "cpu")
    call = lambda: bk.quantize_weight(w, bits=c["bits"], group_size=c["group_size"])  # noqa: E731
    what = describe(weight=w, bits=c["bits"], group_size=c["group_size"])
    bad = _weight_error(c)
    if bad:
        expect_rejection(call, bad, what=what)
        return
    qw = call()
    want = quantize_weight_ref(w.contiguous(), bits=c["bits"], group_size=c["group_size"])
    assert qw.shape == (c["N"], c["K"]) and qw.bits == c["bits"]
    for name in ("data", "scales", "zeros", "codebook"):
        a, b = getattr(qw, name), getattr(want, name)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), f"{what}: {name} depends on layout"
    deq = bk.dequantize_weight(qw)
    assert deq.dtype == torch.float32 and deq.shape == w.shape and bool(torch.isfinite(deq).all()), what
    # Round trip: each element within half a quantisation step of the weight (plus fp32 rounding).
    w64 = w.double()
    step = qw.scales.double()[:, None] if c["bits"] == 8 else qw.scales.double().repeat_interleave(c["group_size"], 1)
    err = (deq.double() - w64).abs()
    if c["bits"] == "nf4":  # step = absmax; levels at most 0.3039 apart
        step = step * float(qw.codebook.double().diff().max())
    bound = step / 2 + 4 * torch.finfo(torch.float32).eps * (w64.abs() + step * 15)
    assert bool((err <= bound).all()), f"{what}: round-trip error {float((err - bound).max()):.3e} over the bound"


@st.composite
def matmul_cases(draw, wide=False):
    w = draw(weight_cases(wide).filter(lambda c: _weight_error(c) is None))
    lead = tuple(draw(st.lists(dim(20 if wide else 5), min_size=0, max_size=2)))  # M past 4-row tiles and 16
    return dict(w=w, lead=lead, dtype=draw(float_dtypes), layout=draw(layouts), seed=draw(st.integers(0, 2**16)))


def _matmul_case(device, backend, c):
    qw = bk.quantize_weight(_weight(c["w"], device), bits=c["w"]["bits"], group_size=c["w"]["group_size"])
    x = tensor(c["lead"] + (qw.shape[1],), c["dtype"], device, seed=c["seed"], layout=c["layout"],
               requires_grad=True)
    what = describe(backend=backend, x=x, bits=qw.bits, group_size=qw.group_size, N=qw.shape[0])
    call = lambda x: bk.quant_matmul(x, qw, backend=backend)  # noqa: E731
    if x.numel() == 0:
        expect_rejection(lambda: call(x), "x", what=what)
        return
    atol = {} if backend == "reference" or qw.bits != 4 else {"y": _xsum_factorization_atol(x, qw)}
    check_op(call, lambda x: quant_matmul_ref(x, qw), dict(x=x), grad=["x"], what=what, seed=c["seed"],
             backend=backend,
             outputs=["y"], atol_for=lambda _up: atol)


def _xsum_factorization_atol(x, qw):
    """The int4 kernels (cpu GEMV, triton) compute ``y = Σ_g scale_g·Σ_k q_k x_k + zero_g·Σ_k x_k``,
    not ``Σ_k (q_k·scale_g + zero_g)·x_k`` like the reference: when x has a mean, the two group terms
    are much larger than y and cancel, so fp32 y carries a few fp32 ulps of
    ``F = Σ_g scale_g·Σ_k q_k|x_k| + |zero_g|·|Σ_k x_k|`` instead of ulps of ``Σ_k |w_k x_k|`` (measured:
    up to ~27× the reference's error for fp32 x with mean 2 at K = 4096; invisible for bf16/fp16 x,
    whose output rounding dominates). Bound: ε32·n·max F with n = gs/32 + G + 8 the depth of the fp32
    summation (32 partial sums per group, one term per group, a few combines), on top of the rule's
    tiny atol."""
    N, K = qw.shape
    G = K // qw.group_size
    xa = x.detach().double().reshape(-1, G, qw.group_size)  # [M, G, gs]
    codes = (bk.dequantize_weight(qw).double() - qw.zeros.double().repeat_interleave(qw.group_size, 1))
    codes = codes.view(N, G, qw.group_size)  # scale_g · q_k  [N, G, gs]
    F = torch.einsum("mgk,ngk->mn", xa.abs(), codes.abs()) + xa.sum(-1).abs() @ qw.zeros.double().abs().T
    y = quant_matmul_ref(x.detach().double(), qw)
    depth = qw.group_size // 32 + G + 8
    return depth * torch.finfo(torch.float32).eps * float(F.max()) + 4e-7 * (1 + float(y.abs().max()))


@pytest.mark.parametrize("device,backend", fuzz_backends("quant_matmul"))
def test_quant_matmul_fuzz(device, backend):
    @fuzz_settings(examples_for(backend, kernel=80, triton=25, reference=30))
    @given(matmul_cases())
    def run(c):
        _matmul_case(device, backend, c)

    run()


@pytest.mark.parametrize("device,backend", [p for p in fuzz_backends("quant_matmul") if p.values[1] == "cpu"])
def test_quant_matmul_fuzz_wide(device, backend):
    @fuzz_settings(40)
    @given(matmul_cases(wide=True))
    def run(c):
        _matmul_case(device, backend, c)

    run()


@pytest.mark.parametrize("device,backend", fuzz_backends("quant_matmul"))
def test_quant_matmul_bad_inputs(device, backend):
    w = tensor((6, 64), torch.float32, device, seed=0)
    qw = bk.quantize_weight(w, bits=4, group_size=32)
    x = tensor((3, 64), torch.bfloat16, device, seed=1)
    f = lambda *a: (lambda: bk.quant_matmul(*a, backend=backend))  # noqa: E731
    expect_rejection(f(x.int(), qw), "x", what="int x")
    expect_rejection(f(x[:, :32], qw), "x", what="x K")
    expect_rejection(f(x[0, 0], qw), "x", what="0-d x")
    expect_rejection(f(x, w), "qweight", what="a plain tensor as qweight")
    expect_rejection(f(x, qw.to("meta")), "qweight", what="qweight on another device")
    if explicit_kernel(backend):
        expect_rejection(f(x.double(), qw), "backend", what="float64 on a kernel backend")


def test_quantize_bad_inputs():
    w = tensor((6, 64), torch.float32, "cpu", seed=0)
    q = lambda *a, **kw: (lambda: bk.quantize_weight(*a, **kw))  # noqa: E731
    expect_rejection(q(w.int(), bits=8), "weight", what="int weight")
    expect_rejection(q(w[0], bits=8), "weight", what="1-D weight")
    expect_rejection(q(w, bits=3), "bits", what="bits 3")
    expect_rejection(q(w, bits=8.0), "bits", what="float bits")
    expect_rejection(q(w, bits=4, group_size=48), "group_size", what="unsupported group")
    expect_rejection(q(w[:, :48], bits=4, group_size=32), "group_size", what="group not dividing K")
    expect_rejection(q(w, bits=4, group_size=0), "group_size", what="group 0")
    expect_rejection(lambda: bk.dequantize_weight(w), "qweight", what="dequantize a plain tensor")
    # Found by probing hand-built weights: scales on another device than data reached the reference's
    # matmul (RuntimeError) / the registry's device check; now the constructor says which part is where.
    qw = bk.quantize_weight(w, bits=4, group_size=32)
    for part in ("scales", "zeros"):
        parts = dict(data=qw.data, scales=qw.scales, zeros=qw.zeros)
        parts[part] = parts[part].to("meta")
        expect_rejection(lambda: bk.QuantizedWeight(**parts, bits=4, group_size=32, shape=(6, 64)), part,
                         what=f"{part} on another device")


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="known: the int4 kernels' xsum factorization (see _xsum_factorization_atol) puts "
                          "fp32 y ~20x over the plain 2x rule when x has a mean")
@pytest.mark.parametrize("device,backend", [p for p in kernel_backends("quant_matmul") if p.values[0] == "cpu"])
def test_int4_fp32_x_with_mean_meets_the_plain_rule(device, backend):
    qw = bk.quantize_weight(tensor((8, 256), torch.float32, device, seed=1, scale=0.02), bits=4, group_size=128)
    x = tensor((2, 256), torch.float32, device, seed=2, offset=2.0, requires_grad=True)
    check_op(lambda x: bk.quant_matmul(x, qw, backend=backend), lambda x: quant_matmul_ref(x, qw), dict(x=x),
             what=f"{backend} int4 fp32 x", seed=0)

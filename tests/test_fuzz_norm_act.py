"""Property-based tests of rms_norm (+residual), swiglu (separate and packed) and norm_head_weight:
random shapes (0/1-sized dims included), dtypes and layouts on every backend; bad inputs rejected."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import baichuan_kernels as bk
from baichuan_kernels.reference.norm_head import norm_head_weight_ref
from baichuan_kernels.reference.rms_norm import rms_norm_ref
from baichuan_kernels.reference.swiglu import swiglu_ref
from _fuzz import (
    explicit_kernel,
    check_op, describe, dim, examples_for, expect_rejection, float_dtypes, fuzz_backends, fuzz_settings, layouts,
    meta_like, tensor,
)


def _budget(backend):
    return examples_for(backend, kernel=60, triton=15, reference=20)


# ------------------------------------------------------------------------------------------ rms_norm


@st.composite
def rms_norm_cases(draw, wide=False):
    """``wide``: Baichuan widths and odd ones past the vector loops (cpu backend only)."""
    lead = tuple(draw(st.lists(dim(4), min_size=0, max_size=3)))
    narrow = st.one_of(dim(40), st.sampled_from([64, 123, 257]))
    D = draw(st.sampled_from([1000, 4095, 4096, 4097, 5120]) if wide else narrow)
    return dict(
        shape=lead + (D,),
        dtype=draw(float_dtypes),
        layouts=(draw(layouts), draw(layouts), draw(layouts)),
        residual=draw(st.booleans()),
        eps=draw(st.sampled_from([0.0, 1e-6, 1e-2])),
        seed=draw(st.integers(0, 2**16)),
    )


def _rms_norm_case(device, backend, c):
    shape, dtype, seed = c["shape"], c["dtype"], c["seed"]
    lx, lw, lr = c["layouts"]
    x = tensor(shape, dtype, device, seed=seed, layout=lx, scale=2.0, offset=0.3, requires_grad=True)
    w = tensor(shape[-1:], dtype, device, seed=seed + 1, layout=lw, offset=1.0, requires_grad=True)
    r = tensor(shape, dtype, device, seed=seed + 2, layout=lr, requires_grad=True) if c["residual"] else None
    what = describe(backend=backend, x=x, weight=w, residual=r, eps=c["eps"])
    if shape[-1] == 0:  # D = 0: nothing to normalise over (documented error)
        expect_rejection(lambda: bk.rms_norm(x, w, c["eps"], residual=r, backend=backend), "x", what=what)
        return
    inputs = dict(x=x, weight=w, residual=r)
    check_op(
        lambda x, weight, residual: bk.rms_norm(x, weight, c["eps"], residual=residual, backend=backend),
        lambda x, weight, residual: rms_norm_ref(x, weight, c["eps"], residual=residual),
        inputs, grad=["x", "weight"] + (["residual"] if r is not None else []), what=what, seed=seed, backend=backend,
        outputs=["y", "s"],
    )


@pytest.mark.parametrize("device,backend", fuzz_backends("rms_norm"))
def test_rms_norm_fuzz(device, backend):
    @fuzz_settings(_budget(backend))
    @given(rms_norm_cases())
    def run(c):
        _rms_norm_case(device, backend, c)

    run()


@pytest.mark.parametrize("device,backend", [p for p in fuzz_backends("rms_norm") if p.values[1] == "cpu"])
def test_rms_norm_fuzz_wide(device, backend):
    @fuzz_settings(15)
    @given(rms_norm_cases(wide=True))
    def run(c):
        _rms_norm_case(device, backend, c)

    run()


@pytest.mark.parametrize("device,backend", fuzz_backends("rms_norm"))
def test_rms_norm_bad_inputs(device, backend):
    x = tensor((3, 8), torch.float32, device, seed=0)
    w = tensor((8,), torch.float32, device, seed=1)
    f = lambda *a, **k: (lambda: bk.rms_norm(*a, backend=backend, **k))  # noqa: E731
    expect_rejection(f(x.int(), w), "x", what="int x")
    expect_rejection(f(x, w.half()), "weight", what="weight dtype != x dtype")
    expect_rejection(f(x, w[:7]), "weight", what="weight [D-1]")
    expect_rejection(f(x, w[None]), "weight", what="weight 2-D")
    expect_rejection(f(x[0, 0], w), "x", what="0-d x")
    expect_rejection(f(x, w, residual=x[:2]), "residual", what="residual shape")
    expect_rejection(f(x, w, residual=x.half()), "residual", what="residual dtype")
    expect_rejection(f(x, w, -1.0), "eps", what="negative eps")
    expect_rejection(f(x, w, float("nan")), "eps", what="NaN eps")
    expect_rejection(f(x, meta_like(w)), "weight", what="weight on another device")
    if explicit_kernel(backend):
        expect_rejection(f(x.double(), w.double()), "backend", what="float64 on a kernel backend")


# ------------------------------------------------------------------------------------------ swiglu


@st.composite
def swiglu_cases(draw, wide=False):
    shape = tuple(draw(st.lists(dim(6), min_size=0, max_size=3)))
    if draw(st.booleans()) or wide:
        shape = shape + (draw(st.sampled_from([1001, 4096, 11008 // 4 + 3] if wide else [17, 64, 130])),)
    return dict(shape=shape, dtype=draw(float_dtypes), layouts=(draw(layouts), draw(layouts)),
                packed=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def _swiglu_case(device, backend, c):
    shape, dtype, seed = c["shape"], c["dtype"], c["seed"]
    if c["packed"]:  # one [..., 2F] tensor h = [gate | up]
        if not shape:
            shape = (1,)
        full = shape[:-1] + (2 * shape[-1],)
        h = tensor(full, dtype, device, seed=seed, layout=c["layouts"][0], scale=3.0, requires_grad=True)
        F = shape[-1]
        what = describe(backend=backend, packed_h=h)
        check_op(lambda h: bk.swiglu(h, backend=backend),
                 lambda h: swiglu_ref(h[..., :F], h[..., F:]), dict(h=h), grad=["h"], what=what, seed=seed,
                 backend=backend)
        return
    gate = tensor(shape, dtype, device, seed=seed, layout=c["layouts"][0], scale=3.0, requires_grad=True)
    up = tensor(shape, dtype, device, seed=seed + 1, layout=c["layouts"][1], requires_grad=True)
    what = describe(backend=backend, gate=gate, up=up)
    check_op(lambda gate, up: bk.swiglu(gate, up, backend=backend), swiglu_ref, dict(gate=gate, up=up),
             grad=["gate", "up"], what=what, seed=seed, backend=backend)


@pytest.mark.parametrize("device,backend", fuzz_backends("swiglu"))
def test_swiglu_fuzz(device, backend):
    @fuzz_settings(_budget(backend))
    @given(swiglu_cases())
    def run(c):
        _swiglu_case(device, backend, c)

    run()


@pytest.mark.parametrize("device,backend", [p for p in fuzz_backends("swiglu") if p.values[1] == "cpu"])
def test_swiglu_fuzz_wide(device, backend):
    @fuzz_settings(15)
    @given(swiglu_cases(wide=True))
    def run(c):
        _swiglu_case(device, backend, c)

    run()


@pytest.mark.parametrize("device,backend", fuzz_backends("swiglu"))
def test_swiglu_bad_inputs(device, backend):
    g = tensor((3, 8), torch.float32, device, seed=0)
    u = tensor((3, 8), torch.float32, device, seed=1)
    f = lambda *a: (lambda: bk.swiglu(*a, backend=backend))  # noqa: E731
    expect_rejection(f(g.long(), u), "gate", what="int gate")
    expect_rejection(f(g, u.long()), "up", what="int up")
    expect_rejection(f(g, u[:, :7]), "up", what="up shape")
    expect_rejection(f(g, u.bfloat16()), "gate", what="dtype mismatch")
    expect_rejection(f(g, meta_like(u)), "up", what="up on another device")
    expect_rejection(f(g[:, :7]), "gate", what="packed h with an odd last dim")
    expect_rejection(f(g[0, 0]), "gate", what="packed 0-d h")
    if explicit_kernel(backend):
        expect_rejection(f(g.double(), u.double()), "backend", what="float64 on a kernel backend")


# ------------------------------------------------------------------------------------------ norm_head_weight


@st.composite
def norm_head_cases(draw):
    return dict(shape=(draw(dim(9)), draw(st.one_of(dim(40), st.just(257)))), dtype=draw(float_dtypes),
                layout=draw(layouts), eps=draw(st.sampled_from([1e-12, 1e-6, 10.0])),
                zero_row=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def _norm_head_case(device, backend, c):
    shape, seed = c["shape"], c["seed"]
    w = tensor(shape, c["dtype"], device, seed=seed, layout=c["layout"], scale=0.1)
    if c["zero_row"] and shape[0] > 1 and c["layout"] != "expanded":
        w[shape[0] // 2].zero_()  # a zero row: max(‖row‖, eps) keeps it finite
    w.requires_grad_(True)
    what = describe(backend=backend, weight=w, eps=c["eps"])
    if w.numel() == 0:
        expect_rejection(lambda: bk.norm_head_weight(w, c["eps"], backend=backend), "weight", what=what)
        return
    check_op(lambda weight: bk.norm_head_weight(weight, c["eps"], backend=backend),
             lambda weight: norm_head_weight_ref(weight, c["eps"]), dict(weight=w), grad=["weight"], what=what,
             seed=seed, backend=backend, atol_for=lambda up: _single_column_atol(w, c["eps"], up[0]))


def _single_column_atol(w, eps, g):
    """D = 1: every row normalises to ±1, so ``dW = rinv·(g - Ŵ(g·Ŵ))`` is exactly 0 (the reference's
    autograd gets ~0); a kernel gets the residue of that cancellation, a few fp32 ulps of ``rinv·|g|``
    (rinv = 1 / max(|w|, eps))."""
    if w.shape[1] != 1:
        return {}
    rinv = 1.0 / w.detach().double().abs().clamp_min(eps)
    return {"weight": 4 * torch.finfo(torch.float32).eps * float((rinv * g.double().abs()).max()) + 4e-7}


@pytest.mark.parametrize("device,backend", fuzz_backends("norm_head_weight"))
def test_norm_head_weight_fuzz(device, backend):
    @fuzz_settings(_budget(backend))
    @given(norm_head_cases())
    def run(c):
        _norm_head_case(device, backend, c)

    run()


@pytest.mark.parametrize("device,backend", fuzz_backends("norm_head_weight"))
def test_norm_head_weight_bad_inputs(device, backend):
    w = tensor((5, 8), torch.float32, device, seed=0)
    f = lambda *a: (lambda: bk.norm_head_weight(*a, backend=backend))  # noqa: E731
    expect_rejection(f(w.int()), "weight", what="int weight")
    expect_rejection(f(w[0]), "weight", what="1-D weight")
    expect_rejection(f(w[None]), "weight", what="3-D weight")
    expect_rejection(f(w, 0.0), "eps", what="eps = 0")
    expect_rejection(f(w, -1.0), "eps", what="negative eps")
    if explicit_kernel(backend):
        expect_rejection(f(w.double()), "backend", what="float64 on a kernel backend")

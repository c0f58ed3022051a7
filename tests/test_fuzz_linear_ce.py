"""Property-based tests of linear_cross_entropy (norm_head, z_loss_weight, ignore_index, reduction,
chunk_size): random shapes (0/1-sized dims included), dtypes, label dtypes and layouts on every backend,
gradients into hidden and weight; bad inputs rejected with errors that name the argument."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import baichuan_kernels as bk
from baichuan_kernels.reference.linear_cross_entropy import linear_cross_entropy_ref
from _fuzz import (
    explicit_kernel,
    DENSE_LAYOUTS, check_op, describe, dim, examples_for, expect_rejection, float_dtypes, fuzz_backends,
    fuzz_settings, lay_out, layouts, meta_like, tensor,
)


@st.composite
def lce_cases(draw, wide=False):
    """``wide``: more rows, vocabulary and chunks (the fast cpu backend only)."""
    N, D, V = (draw(dim(40)), draw(dim(130)), draw(dim(700))) if wide else (draw(dim(9)), draw(dim(40)), draw(dim(50)))
    return dict(
        N=N, D=D, V=V, dtype=draw(float_dtypes),
        # Equal weight rows (an expanded weight) tie the max logit: the gradient of z then goes to the
        # first index by design (the reference's amax splits it), and z always gets an upstream gradient.
        layouts=(draw(layouts), draw(st.sampled_from(DENSE_LAYOUTS)), draw(layouts)),
        label_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
        ignore_index=draw(st.sampled_from([-100, -100, 0, -1, 7])),
        ignored=draw(st.sampled_from([0.0, 0.3, 1.0])),  # share of ignored rows
        norm_head=draw(st.booleans()), z_loss_weight=draw(st.sampled_from([0.0, 1e-4, 0.5])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        chunk_size=draw(st.one_of(st.none(), st.integers(1, 50 if wide else 12))),
        grad=draw(st.sampled_from([("hidden", "weight"), ("hidden",), ("weight",), ()])),
        seed=draw(st.integers(0, 2**16)),
    )


def _labels(c, device):
    g = torch.Generator().manual_seed(c["seed"] + 7)
    N, V = c["N"], c["V"]
    labels = torch.randint(0, max(V, 1), (N,), generator=g)
    drop = torch.rand(N, generator=g) < c["ignored"]
    labels = torch.where(drop, torch.full_like(labels, c["ignore_index"]), labels)
    return lay_out(labels.to(device=device, dtype=c["label_dtype"]), c["layouts"][2])


def _lce_case(device, backend, c):
    N, D, V, dtype, seed = c["N"], c["D"], c["V"], c["dtype"], c["seed"]
    hidden = tensor((N, D), dtype, device, seed=seed, layout=c["layouts"][0], requires_grad="hidden" in c["grad"])
    weight = tensor((V, D), dtype, device, seed=seed + 1, layout=c["layouts"][1], scale=0.5,
                    requires_grad="weight" in c["grad"])
    labels = _labels(c, device)
    kw = {k: c[k] for k in ("norm_head", "z_loss_weight", "ignore_index", "reduction", "chunk_size")}
    what = describe(backend=backend, hidden=hidden, weight=weight, labels=labels.tolist(), **kw)
    call = lambda hidden, weight: bk.linear_cross_entropy(hidden, weight, labels, backend=backend, **kw)  # noqa: E731
    if hidden.numel() == 0:
        expect_rejection(lambda: call(hidden, weight), "hidden", what=what)
        return
    if weight.numel() == 0:
        expect_rejection(lambda: call(hidden, weight), "weight", what=what)
        return
    bad = (labels != c["ignore_index"]) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):  # (labels are drawn in range: a guard for the strategy itself)
        expect_rejection(lambda: call(hidden, weight), "labels", what=what)
        return
    check_op(call, lambda hidden, weight: linear_cross_entropy_ref(hidden, weight, labels, **kw),
             dict(hidden=hidden, weight=weight), grad=list(c["grad"]), what=what, seed=seed, backend=backend,
             outputs=["loss", "ce", "z"], atol_for=lambda up: _single_column_atol(c, hidden, weight, up))


def _single_column_atol(c, hidden, weight, upstream):
    """NormHead with D = 1: every normalised row is ±1, so the NormHead Jacobian maps any dŴ to exactly
    0 (dW = rinv·(dŴ - Ŵ(dŴ·Ŵ))); kernels get the residue of that cancellation, a few fp32 ulps of
    rinv·|dŴ| with |dŴ| ≤ Σ_n |h_n|·(2 + 2·max|logit|)·Σ|upstream| (CE and max-z terms)."""
    if not (c["norm_head"] and c["D"] == 1 and weight.requires_grad):
        return {}
    h = hidden.detach().double().abs()
    rinv = float(1.0 / weight.detach().double().abs().clamp_min(1e-12).min())
    g = sum(float(u.double().abs().sum()) for u in upstream if u is not None)
    dw_hat = float(h.sum()) * (2 + 2 * float(h.max())) * g
    return {"weight": 4 * torch.finfo(torch.float32).eps * rinv * dw_hat + 4e-7}


@pytest.mark.parametrize("device,backend", fuzz_backends("linear_cross_entropy"))
def test_linear_cross_entropy_fuzz(device, backend):
    @fuzz_settings(examples_for(backend, kernel=80, triton=25, reference=30))
    @given(lce_cases())
    def run(c):
        _lce_case(device, backend, c)

    run()


@pytest.mark.parametrize("device,backend", [p for p in fuzz_backends("linear_cross_entropy") if p.values[1] == "cpu"])
def test_linear_cross_entropy_fuzz_wide(device, backend):
    @fuzz_settings(30)
    @given(lce_cases(wide=True))
    def run(c):
        _lce_case(device, backend, c)

    run()


@pytest.mark.parametrize("device,backend", fuzz_backends("linear_cross_entropy"))
def test_linear_cross_entropy_bad_inputs(device, backend):
    h = tensor((4, 8), torch.float32, device, seed=0)
    w = tensor((11, 8), torch.float32, device, seed=1)
    y = torch.tensor([0, 3, 10, -100], device=device)
    f = lambda *a, **kw: (lambda: bk.linear_cross_entropy(*a, backend=backend, **kw))  # noqa: E731
    expect_rejection(f(h.int(), w, y), "hidden", what="int hidden")
    expect_rejection(f(h[None], w, y), "hidden", what="3-D hidden")
    expect_rejection(f(h, w.half(), y), "weight", what="weight dtype")
    expect_rejection(f(h, w[:, :7], y), "weight", what="weight D")
    expect_rejection(f(h, w[0], y), "weight", what="1-D weight")
    expect_rejection(f(h, w, y.float()), "labels", what="float labels")
    expect_rejection(f(h, w, y.to(torch.int16)), "labels", what="int16 labels")
    expect_rejection(f(h, w, y[:3]), "labels", what="labels length")
    expect_rejection(f(h, w, y[None]), "labels", what="2-D labels")
    expect_rejection(f(h, w, y + 1), "labels", what="label == V")
    expect_rejection(f(h, w, torch.tensor([0, -1, 2, 3], device=device)), "labels", what="negative label")
    expect_rejection(f(h, w, y, ignore_index=-1), "labels", what="-100 with ignore_index=-1")
    expect_rejection(f(h, meta_like(w), y), "weight", what="weight on another device")
    expect_rejection(f(h, w, y, reduction="avg"), "reduction", what="unknown reduction")
    expect_rejection(f(h, w, y, z_loss_weight=-1.0), "z_loss_weight", what="negative z_loss_weight")
    expect_rejection(f(h, w, y, z_loss_weight=math.nan), "z_loss_weight", what="NaN z_loss_weight")
    expect_rejection(f(h, w, y, z_loss_weight=math.inf), "z_loss_weight", what="inf z_loss_weight (NaN rows)")
    expect_rejection(f(h, w, y, norm_head=1), "norm_head", what="int norm_head")
    expect_rejection(f(h, w, y, ignore_index=1.5), "ignore_index", what="float ignore_index")
    expect_rejection(f(h, w, y, chunk_size=0), "chunk_size", what="chunk_size 0")
    # Found by fuzzing the integer arguments: values past int64 reached the kernels' schema (RuntimeError
    # "Expected a value of type 'int'"); ignore_index is now range-checked, chunk_size capped at N.
    expect_rejection(f(h, w, y, ignore_index=2**63), "ignore_index", what="ignore_index past int64")
    for huge in (2**63, 2**80):
        got = bk.linear_cross_entropy(h, w, y, chunk_size=huge, backend=backend)[0]
        assert torch.equal(got, bk.linear_cross_entropy(h, w, y, backend=backend)[0]), "one chunk"
    if explicit_kernel(backend):
        expect_rejection(f(h.double(), w.double(), y), "backend", what="float64 on a kernel backend")

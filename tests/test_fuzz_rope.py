"""Property-based tests of rope_cos_sin, apply_rope (+position_ids) and split_qkv_rope: random shapes
(0/1-sized dims included), dtypes, table dtypes and layouts on every backend; bad inputs rejected."""

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import baichuan_kernels as bk
from baichuan_kernels.reference.rope import apply_rope_ref, rope_cos_sin_ref
from baichuan_kernels.reference.split_qkv_rope import split_qkv_rope_ref
from baichuan_kernels.testing import assert_within_reference_error, poisoned_outputs
from _fuzz import (
    explicit_kernel,
    check_op, describe, dim, examples_for, expect_rejection, float_dtypes, fuzz_backends, fuzz_settings, layouts,
    lay_out, meta_like, refused, tensor, whole_storage,
)


def _budget(backend):
    return examples_for(backend, kernel=80, triton=20, reference=25)


@st.composite
def tables(draw, T, Dh):
    """cos/sin with S >= T rows (or fewer: then position_ids pick rows), any float dtype and layout."""
    S = max(T, 1) + draw(st.integers(0, 3))
    positions = draw(st.sampled_from([None, torch.int32, torch.int64]))
    table_dtype = draw(st.sampled_from([torch.float32] * 3 + [torch.bfloat16, torch.float64]))
    return dict(S=S, offset=draw(st.integers(0, 5000)), table_dtype=table_dtype,
                table_layouts=(draw(layouts), draw(layouts)), positions=positions, pos_layout=draw(layouts))


def _make_tables(device, Dh, B, T, t, seed):
    cos, sin = rope_cos_sin_ref(t["S"], max(Dh, 0), offset=t["offset"]) if Dh > 0 else (torch.zeros(t["S"], 0),) * 2
    cos = lay_out(cos.to(device=device, dtype=t["table_dtype"]), t["table_layouts"][0])
    sin = lay_out(sin.to(device=device, dtype=t["table_dtype"]), t["table_layouts"][1])
    pos = None
    if t["positions"] is not None:
        g = torch.Generator().manual_seed(seed)
        pos = torch.randint(0, t["S"], (B, T), generator=g).to(device=device, dtype=t["positions"])
        pos = lay_out(pos, t["pos_layout"])
    return cos, sin, pos


# ------------------------------------------------------------------------------------------ apply_rope


@st.composite
def apply_rope_cases(draw):
    B, T, H = draw(dim(3)), draw(dim(9)), draw(dim(4))
    Dh = draw(st.sampled_from([2, 4, 8, 16, 34, 128] * 4 + [0, 3]))
    return dict(shape=(B, T, H, Dh), dtype=draw(float_dtypes), layouts=(draw(layouts), draw(layouts)),
                tables=draw(tables(T, Dh)), seed=draw(st.integers(0, 2**16)))


def _apply_rope_case(device, backend, c):
    (B, T, _, Dh), dtype, seed = c["shape"], c["dtype"], c["seed"]
    q = tensor(c["shape"], dtype, device, seed=seed, layout=c["layouts"][0], requires_grad=True)
    k = tensor(c["shape"], dtype, device, seed=seed + 1, layout=c["layouts"][1], scale=3.0, requires_grad=True)
    cos, sin, pos = _make_tables(device, Dh, B, T, c["tables"], seed)
    what = describe(backend=backend, q=q, k=k, cos=cos, sin=sin, position_ids=pos)
    call = lambda q, k: bk.apply_rope(q, k, cos, sin, position_ids=pos, backend=backend)  # noqa: E731
    if q.numel() == 0 or Dh % 2:  # documented errors: empty q, odd head dim
        expect_rejection(lambda: call(q, k), "q", what=what)
        return
    check_op(call, lambda q, k: apply_rope_ref(q, k, cos, sin, position_ids=pos), dict(q=q, k=k),
             grad=["q", "k"], what=what, seed=seed, backend=backend, outputs=["q_rot", "k_rot"])


@pytest.mark.parametrize("device,backend", fuzz_backends("apply_rope"))
def test_apply_rope_fuzz(device, backend):
    @fuzz_settings(_budget(backend))
    @given(apply_rope_cases())
    def run(c):
        _apply_rope_case(device, backend, c)

    run()


@pytest.mark.parametrize("device,backend", fuzz_backends("apply_rope"))
def test_apply_rope_bad_inputs(device, backend):
    q = tensor((2, 5, 3, 8), torch.float32, device, seed=0)
    k = tensor((2, 5, 3, 8), torch.float32, device, seed=1)
    cos, sin = rope_cos_sin_ref(6, 8, device=device)
    pos = torch.zeros(2, 5, dtype=torch.int64, device=device)
    f = lambda *a, **kw: (lambda: bk.apply_rope(*a, backend=backend, **kw))  # noqa: E731
    expect_rejection(f(q.int(), k, cos, sin), "q", what="int q")
    expect_rejection(f(q, k.half(), cos, sin), "q", what="q/k dtype mismatch")
    expect_rejection(f(q, k[:, :4], cos, sin), "k", what="k shape")
    expect_rejection(f(q[0], k[0], cos, sin), "q", what="3-D q")
    expect_rejection(f(q, k, cos[:, :6], sin[:, :6]), "cos", what="table head dim")
    expect_rejection(f(q, k, cos, sin[:5]), "sin", what="sin shape")
    expect_rejection(f(q, k, cos.int(), sin), "cos", what="int cos")
    expect_rejection(f(q, k, cos[:4], sin[:4]), "cos", what="tables shorter than T")
    expect_rejection(f(q, k, cos, sin, position_ids=pos.float()), "position_ids", what="float position_ids")
    expect_rejection(f(q, k, cos, sin, position_ids=pos[:1]), "position_ids", what="position_ids shape")
    expect_rejection(f(q, k, cos, sin, position_ids=pos - 1), "position_ids", what="negative position")
    expect_rejection(f(q, k, cos, sin, position_ids=pos + 6), "position_ids", what="position past the table")
    expect_rejection(f(q, k, meta_like(cos), sin), "cos", what="cos on another device")
    expect_rejection(f(q, k, cos, sin, position_ids=meta_like(pos)), "position_ids", what="position_ids elsewhere")
    if explicit_kernel(backend):
        expect_rejection(f(q.double(), k.double(), cos, sin), "backend", what="float64 on a kernel backend")
        expect_rejection(f(q, k, cos.requires_grad_(), sin), "backend", what="cos requiring grad on a kernel")


# ------------------------------------------------------------------------------------------ apply_rope_


def _apply_rope_inplace_case(device, backend, c):
    (B, T, _, Dh), dtype, seed = c["shape"], c["dtype"], c["seed"]
    lq, lk = c["layouts"]
    q = tensor(c["shape"], dtype, device, seed=seed, layout=lq)
    k = tensor(c["shape"], dtype, device, seed=seed + 1, layout=lk, scale=3.0)
    cos, sin = _make_tables(device, Dh, B, T, c["tables"], seed)[:2]
    pos = _make_tables(device, Dh, B, T, c["tables"], seed)[2]
    what = describe(backend=backend, q=q, k=k, cos=cos, position_ids=pos)
    call = lambda: bk.apply_rope_(q, k, cos, sin, position_ids=pos, backend=backend)  # noqa: E731
    if q.numel() == 0 or Dh % 2:
        expect_rejection(call, "q", what=what)
        return
    shared = [n for n, t in (("q", q), ("k", k)) if any(s > 1 and st_ == 0 for s, st_ in zip(t.shape, t.stride()))]
    if shared:  # an expanded view: elements share memory, nothing can be written in place
        expect_rejection(call, shared[0], what=what)
        return
    if explicit_kernel(backend) and (q.stride(-1) != 1 or k.stride(-1) != 1):  # the kernels' limit
        expect_rejection(call, "q", what=what)
        return
    same = apply_rope_ref(q, k, cos, sin, position_ids=pos)
    exact = apply_rope_ref(q.double(), k.double(), cos.double(), sin.double(), position_ids=pos)
    gaps = [int(whole_storage(t).isnan().sum()) for t in (q, k)]  # NaN outside the view (layout gaps)
    try:
        with poisoned_outputs():
            out = call()
    except ValueError as exc:
        if refused(exc, backend):  # a GPU backend's limit not encoded here
            return
        raise
    assert out[0] is q and out[1] is k, f"{what}: apply_rope_ must return its (rotated) inputs"
    for name, t, s, e, gap in zip("qk", (q, k), same, exact, gaps):
        assert int(whole_storage(t).isnan().sum()) == gap, f"{what}: {name} was written outside its view"
        assert_within_reference_error(t, s, e, name=f"{what} {name}")


@pytest.mark.parametrize("device,backend", fuzz_backends("apply_rope_"))
def test_apply_rope_inplace_fuzz(device, backend):
    @fuzz_settings(_budget(backend))
    @given(apply_rope_cases())
    def run(c):
        _apply_rope_inplace_case(device, backend, c)

    run()


@pytest.mark.parametrize("device,backend", fuzz_backends("apply_rope_"))
def test_apply_rope_inplace_rejects_shared_elements(device, backend):
    # Found by test_apply_rope_inplace_fuzz: an expanded q (stride 0 over heads) was rotated in place by
    # the cpu/triton kernels without error (every head writing the same memory); the reference raised
    # RuntimeError from copy_. Now a ValueError naming the argument, on every backend.
    cos, sin = rope_cos_sin_ref(4, 8, device=device)
    q = tensor((1, 4, 1, 8), torch.float32, device, seed=0).expand(1, 4, 3, 8)
    k = tensor((1, 4, 3, 8), torch.float32, device, seed=1)
    expect_rejection(lambda: bk.apply_rope_(q, k, cos, sin, backend=backend), "q", what="expanded q")
    expect_rejection(lambda: bk.apply_rope_(k, q, cos, sin, backend=backend), "k", what="expanded k")


# ------------------------------------------------------------------------------------------ split_qkv_rope


@st.composite
def split_qkv_rope_cases(draw):
    B, T = draw(dim(3)), draw(dim(7))
    H = draw(st.integers(1, 4))
    Dh = draw(st.sampled_from([2, 4, 8, 16, 40] * 3 + [3]))
    num_heads = H if draw(st.integers(0, 9)) else H + 1  # sometimes not a divisor of 3*D
    return dict(B=B, T=T, H=H, Dh=Dh, num_heads=num_heads, dtype=draw(float_dtypes), layout=draw(layouts),
                tables=draw(tables(T, Dh)), seed=draw(st.integers(0, 2**16)))


def _split_case(device, backend, c):
    B, T, H, Dh, nh, seed = c["B"], c["T"], c["H"], c["Dh"], c["num_heads"], c["seed"]
    qkv = tensor((B, T, 3 * H * Dh), c["dtype"], device, seed=seed, layout=c["layout"], requires_grad=True)
    cos, sin, pos = _make_tables(device, Dh, B, T, c["tables"], seed)
    what = describe(backend=backend, qkv=qkv, num_heads=nh, cos=cos, position_ids=pos)
    call = lambda qkv: bk.split_qkv_rope(qkv, cos, sin, num_heads=nh, position_ids=pos, backend=backend)  # noqa: E731
    if qkv.numel() == 0 or (H * Dh) % nh or ((H * Dh) // nh) % 2:
        expect_rejection(lambda: call(qkv), "qkv", what=what)
        return
    if (H * Dh) // nh != Dh:  # another head count that divides D: cos/sin have the wrong head dim
        expect_rejection(lambda: call(qkv), "cos", what=what)
        return
    check_op(call, lambda qkv: split_qkv_rope_ref(qkv, cos, sin, num_heads=nh, position_ids=pos), dict(qkv=qkv),
             grad=["qkv"], what=what, seed=seed, backend=backend, outputs=["q", "k", "v"])


@pytest.mark.parametrize("device,backend", fuzz_backends("split_qkv_rope"))
def test_split_qkv_rope_fuzz(device, backend):
    @fuzz_settings(_budget(backend))
    @given(split_qkv_rope_cases())
    def run(c):
        _split_case(device, backend, c)

    run()


@pytest.mark.parametrize("device,backend", fuzz_backends("split_qkv_rope"))
def test_split_qkv_rope_bad_inputs(device, backend):
    qkv = tensor((2, 5, 3 * 16), torch.float32, device, seed=0)
    cos, sin = rope_cos_sin_ref(5, 8, device=device)
    f = lambda *a, **kw: (lambda: bk.split_qkv_rope(*a, backend=backend, **kw))  # noqa: E731
    expect_rejection(f(qkv.long(), cos, sin, num_heads=2), "qkv", what="int qkv")
    expect_rejection(f(qkv[0], cos, sin, num_heads=2), "qkv", what="2-D qkv")
    expect_rejection(f(qkv, cos, sin, num_heads=0), "num_heads", what="0 heads")
    expect_rejection(f(qkv, cos, sin, num_heads=2.0), "num_heads", what="float num_heads")
    expect_rejection(f(qkv, cos, sin, num_heads=True), "num_heads", what="bool num_heads")
    expect_rejection(f(qkv, cos, sin, num_heads=5), "qkv", what="num_heads not dividing D")
    expect_rejection(f(qkv[..., :42], cos, sin, num_heads=2), "qkv", what="odd head dim")
    expect_rejection(f(qkv, cos[:4], sin[:4], num_heads=2), "cos", what="tables shorter than T")
    expect_rejection(f(qkv, cos, sin, num_heads=2, position_ids=torch.zeros(2, 5, device=device)), "position_ids",
                     what="float position_ids")
    if explicit_kernel(backend):
        expect_rejection(f(qkv.double(), cos, sin, num_heads=2), "backend", what="float64 on a kernel backend")


# ------------------------------------------------------------------------------------------ rope_cos_sin


@fuzz_settings(60)
@given(T=st.integers(-2, 40), Dh=st.integers(-2, 40),
       base=st.sampled_from([10000.0, 2.0, 1e6, 1.0, 0.5, 1e-300, math.inf, 0.0, -1.0, math.nan]),
       offset=st.one_of(st.integers(-3, 10**6), st.sampled_from([2**24 - 40, 2**24 - 1, 2**31, 2**63, 2**70])))
@example(T=4, Dh=8, base=10000.0, offset=2**63)  # returned an empty [0, 8] table (fp32 arange overflow)
@example(T=4, Dh=8, base=1e-300, offset=0)  # returned NaN tables (base^(-2i/Dh) overflows fp32)
def test_rope_cos_sin_fuzz(T, Dh, base, offset):
    call = lambda: bk.rope_cos_sin(T, Dh, base, offset=offset)  # noqa: E731
    # base: positive, and giving finite fp32 angles (1e-300 overflows base^(-2i/Dh) once Dh >= 4)
    bad_base = not base > 0 or (base < 1e-30 and Dh >= 4)
    checks = (("T", T < 1), ("Dh", Dh < 2 or Dh % 2), ("base", bad_base), ("offset", offset < 0),
              ("offset", offset + T > 2**24))  # positions are fp32: exact only up to 2**24
    for arg, bad in checks:
        if bad:
            expect_rejection(call, arg, what=f"T={T} Dh={Dh} base={base} offset={offset}")
            return
    cos, sin = call()
    assert cos.shape == sin.shape == (T, Dh) and cos.dtype == sin.dtype == torch.float32
    assert bool(torch.isfinite(cos).all() and torch.isfinite(sin).all())
    # Angles are fp32 by the spec; the table is that fp32 angle's cos/sin (to fp32 rounding of cos/sin).
    inv = 1.0 / (base ** (torch.arange(0, Dh, 2, dtype=torch.float32) / Dh))
    angle = torch.outer(torch.arange(offset, offset + T, dtype=torch.float32), inv).double()
    angle = torch.cat((angle, angle), -1)
    assert torch.allclose(cos.double(), angle.cos(), rtol=0, atol=2e-6)
    assert torch.allclose(sin.double(), angle.sin(), rtol=0, atol=2e-6)

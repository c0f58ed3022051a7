"""Numerics under extremes, every public op on every backend: large magnitudes (bf16/fp16 near their
range) and NaN/±inf in inputs. Attention and decode attention (incl. fully masked rows):
tests/test_numerics_attention.py; ALiBi at long context: tests/test_numerics_alibi.py.

The contract is the float64 reference run on the same input values, rounded to the kernel's output
dtype (tests/_numerics.py assert_contract): NaN exactly where it is NaN, ±inf exactly where it is ±inf
(so an fp16 result overflows exactly where the rounded float64 one does), and every other element finite
and within 2x the error of the same-dtype reference (which must obey the same pattern).
"""

import pytest
import torch

import baichuan_kernels as bk
from baichuan_kernels.reference.linear_cross_entropy import linear_cross_entropy_ref
from baichuan_kernels.reference.norm_head import norm_head_weight_ref
from baichuan_kernels.reference.quant_matmul import quant_matmul_ref
from baichuan_kernels.reference.rms_norm import rms_norm_ref
from baichuan_kernels.reference.rope import apply_rope_ref
from baichuan_kernels.reference.split_qkv_rope import split_qkv_rope_ref
from baichuan_kernels.reference.swiglu import swiglu_ref
from baichuan_kernels.testing import DTYPES, make_tensor
from _numerics import assert_contract, assert_grads_contract, backends, leaves, run

NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------------------------------------------
# rms_norm


def _rms_norm_check(device, backend, x, w, grads=True, seed=7):
    xs, ws = leaves(x.to(device), w.to(device))
    y = run(device, bk.rms_norm, xs, ws, backend=backend)
    xr, wr = leaves(x, w)
    yr = rms_norm_ref(xr, wr)
    x6, w6 = leaves(x, w, dtype=torch.float64)
    y6 = rms_norm_ref(x6, w6)
    assert_contract(y, yr, y6, f"{backend} rms_norm y")
    if grads:
        assert_grads_contract((y, yr, y6), ((xs, ws), (xr, wr), (x6, w6)), make_tensor(x.shape, x.dtype, seed=seed),
                              ("dx", "dweight"), f"{backend} rms_norm")


@pytest.mark.parametrize("device,backend", backends("rms_norm"))
@pytest.mark.parametrize("dtype,scale", [(torch.bfloat16, 1e38), (torch.bfloat16, 3e19), (torch.float32, 1e37),
                                         (torch.float16, 2e4)], ids=["bf16-1e38", "bf16-3e19", "fp32-1e37", "fp16-2e4"])
@pytest.mark.parametrize("D", [64, 4097])
def test_rms_norm_large_magnitude(device, backend, dtype, scale, D):
    """|x| near the dtype's range: the fp32 sum of squares overflows beyond ~1.8e19 and is rescaled
    (see rms_norm_ref), so y = w·x/rms exactly as in float64 — never 0 or NaN."""
    x = make_tensor((3, D), dtype, seed=1, scale=scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max)
    w = make_tensor((D,), dtype, seed=2, scale=0.3, offset=1.0)
    _rms_norm_check(device, backend, x, w)


@pytest.mark.parametrize("device,backend", backends("rms_norm"))
def test_rms_norm_large_magnitude_with_residual(device, backend):
    """The fused residual path: s = x + residual (bf16, |s| ~ 1e37) normalised without overflow; y, s
    and every gradient per the contract."""
    x, r = (make_tensor((3, 300), torch.bfloat16, seed=s, scale=1e37) for s in (14, 15))
    w = make_tensor((300,), torch.bfloat16, seed=16, offset=1.0, scale=0.3)
    dy, ds = (make_tensor(x.shape, torch.bfloat16, seed=s) for s in (17, 18))
    outs = {}
    for key, dtype, dev in (("got", None, device), ("same", None, "cpu"), ("exact", torch.float64, "cpu")):
        xs, rs, ws = leaves(*(t.to(dev) for t in (x, r, w)), dtype=dtype)
        fn = rms_norm_ref if key != "got" else bk.rms_norm
        extra = {"backend": backend} if key == "got" else {}
        y, s = run(device, fn, xs, ws, residual=rs, **extra) if key == "got" else fn(xs, ws, residual=rs)
        grads = torch.autograd.grad((y, s), (xs, ws, rs), [t.to(dev, dtype or t.dtype) for t in (dy, ds)])
        outs[key] = (y, s, *grads)
    for n, a, sm, e in zip(("y", "s", "dx", "dweight", "dresidual"), outs["got"], outs["same"], outs["exact"]):
        assert_contract(a, sm, e, f"{backend} rms_norm+residual {n}")


@pytest.mark.parametrize("device,backend", backends("rms_norm"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_nonfinite_poisons_its_row_only(device, backend, dtype):
    x = make_tensor((5, 96), dtype, seed=3)
    x[1, 7], x[2, 0], x[3, 95] = NAN, INF, -INF  # row 1: all NaN; rows 2, 3: NaN at the inf, 0 elsewhere
    w = make_tensor((96,), dtype, seed=4, offset=1.0)
    _rms_norm_check(device, backend, x, w, grads=False)


@pytest.mark.parametrize("device,backend", backends("rms_norm"))
def test_rms_norm_fp16_overflow_where_float64_overflows(device, backend):
    """weight ~3e4: |y| crosses 65504 for |x|/rms > ~2; inf exactly where the rounded float64 y is."""
    x = make_tensor((8, 256), torch.float16, seed=5)
    w = make_tensor((256,), torch.float16, seed=6, scale=500.0, offset=3e4)
    assert rms_norm_ref(x.double(), w.double()).half().isinf().sum() > 10  # the case is exercised
    _rms_norm_check(device, backend, x, w, grads=False)


# ---------------------------------------------------------------------------------------------------
# swiglu


@pytest.mark.parametrize("device,backend", backends("swiglu"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_swiglu_saturation_and_nonfinite(device, backend, dtype):
    """silu saturates (no NaN from exp overflow at gate = ±max), products overflow where float64's
    rounded result does, and NaN/±inf propagate elementwise like the reference, gradients included."""
    big = torch.finfo(dtype).max
    gate = make_tensor((4, 130), dtype, seed=8, scale=big / 8)
    up = make_tensor((4, 130), dtype, seed=9)
    gate[0, :6] = torch.tensor([-big, big, -1e4, 1e4, -100.0, 100.0], dtype=dtype)
    gate[1, :3] = torch.tensor([NAN, INF, -INF], dtype=dtype)
    up[2, :3] = torch.tensor([NAN, INF, -INF], dtype=dtype)
    gate[2, 1:3] = torch.tensor([0.0, -1e-3], dtype=dtype)
    g, u = leaves(gate.to(device), up.to(device))
    y = run(device, bk.swiglu, g, u, backend=backend)
    gr, ur = leaves(gate, up)
    yr = swiglu_ref(gr, ur)
    g6, u6 = leaves(gate, up, dtype=torch.float64)
    y6 = swiglu_ref(g6, u6)
    assert_contract(y, yr, y6, f"{backend} swiglu")
    assert_grads_contract((y, yr, y6), ((g, u), (gr, ur), (g6, u6)), make_tensor(gate.shape, dtype, seed=10),
                          ("dgate", "dup"), f"{backend} swiglu")


# ---------------------------------------------------------------------------------------------------
# apply_rope / split_qkv_rope


@pytest.mark.parametrize("device,backend", backends("apply_rope"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_rope_extremes(device, backend, dtype):
    """|q| near the range (the fp32 rotation may overflow where float64's rounded result does) and a
    NaN/inf in one (b, t, h) row: only the rotated pairs of that row are hit."""
    B, T, H, Dh = 2, 9, 3, 32
    big = torch.finfo(dtype).max
    q = make_tensor((B, T, H, Dh), dtype, seed=11, scale=big / 3).clamp(-big, big)
    k = make_tensor((B, T, H, Dh), dtype, seed=12)
    k[1, 4, 2, 5], k[0, 8, 0, 20], k[1, 0, 1, 0] = NAN, INF, -INF
    cos, sin = bk.rope_cos_sin(T, Dh, device="cpu")
    got = run(device, bk.apply_rope, q.to(device), k.to(device), cos.to(device), sin.to(device), backend=backend)
    same = apply_rope_ref(q, k, cos, sin)
    exact = apply_rope_ref(q.double(), k.double(), cos, sin)
    for n, a, s, e in zip("qk", got, same, exact):
        assert_contract(a, s, e, f"{backend} apply_rope {n}")


@pytest.mark.parametrize("device,backend", backends("split_qkv_rope"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_split_qkv_rope_extremes(device, backend, dtype):
    B, T, H, Dh = 1, 7, 2, 32
    big = torch.finfo(dtype).max
    qkv = make_tensor((B, T, 3 * H * Dh), dtype, seed=13, scale=big / 3).clamp(-big, big)
    qkv[0, 2, 3], qkv[0, 5, H * Dh + 40], qkv[0, 6, 2 * H * Dh + 1] = NAN, INF, -INF  # in q, k, v
    cos, sin = bk.rope_cos_sin(T, Dh, device="cpu")
    got = run(device, bk.split_qkv_rope, qkv.to(device), cos.to(device), sin.to(device), num_heads=H,
              backend=backend)
    same = split_qkv_rope_ref(qkv, cos, sin, num_heads=H)
    exact = split_qkv_rope_ref(qkv.double(), cos, sin, num_heads=H)
    for n, a, s, e in zip("qkv", got, same, exact):
        assert_contract(a, s, e, f"{backend} split_qkv_rope {n}")


# ---------------------------------------------------------------------------------------------------
# norm_head_weight, linear_cross_entropy, quant_matmul


@pytest.mark.parametrize("device,backend", backends("norm_head_weight"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norm_head_weight_extremes(device, backend, dtype):
    """Rows near the dtype's range are normalised (the fp32 norm is rescaled when it overflows), a
    NaN/inf poisons its own row only, a zero row stays 0 (eps)."""
    big = torch.finfo(dtype).max
    w = make_tensor((7, 200), dtype, seed=80, scale=big / 4).clamp(-big, big)
    w[1] = make_tensor((200,), dtype, seed=81)
    w[2, 3], w[3, 5], w[4] = NAN, -INF, 0.0
    got = run(device, bk.norm_head_weight, w.to(device), backend=backend)
    assert_contract(got, norm_head_weight_ref(w), norm_head_weight_ref(w.double()), f"{backend} norm_head_weight")
    # gradients of the finite rows (huge and ordinary ones; the poisoned rows dropped)
    w = w[[0, 1, 5, 6]]
    g = make_tensor(w.shape, dtype, seed=82)
    ws, wr, w6 = leaves(w.to(device)) + leaves(w) + leaves(w, dtype=torch.float64)
    got = torch.autograd.grad(run(device, bk.norm_head_weight, ws, backend=backend), ws, g.to(device))[0]
    same = torch.autograd.grad(norm_head_weight_ref(wr), wr, g)[0]
    exact = torch.autograd.grad(norm_head_weight_ref(w6), w6, g.double())[0]
    assert_contract(got, same, exact, f"{backend} norm_head_weight dweight")


def _lce_check(device, backend, h, w, labels, reduction, grads, **kw):
    hs, ws = leaves(h.to(device), w.to(device))
    got = run(device, bk.linear_cross_entropy, hs, ws, labels.to(device), reduction=reduction, backend=backend,
              **kw)
    hr, wr = leaves(h, w)
    same = linear_cross_entropy_ref(hr, wr, labels, reduction=reduction, **kw)
    h6, w6 = leaves(h, w, dtype=torch.float64)
    exact = linear_cross_entropy_ref(h6, w6, labels, reduction=reduction, **kw)
    for n, a, s, e in zip(("loss", "ce", "z"), got, same, exact):
        assert_contract(a, s, e, f"{backend} linear_cross_entropy {n}")
    if grads:
        ga = torch.autograd.grad(got[0], (hs, ws))
        gs = torch.autograd.grad(same[0], (hr, wr))
        ge = torch.autograd.grad(exact[0], (h6, w6))
        for n, a, s, e in zip(("dhidden", "dweight"), ga, gs, ge):
            assert_contract(a, s, e, f"{backend} linear_cross_entropy {n}")
    return got


@pytest.mark.parametrize("device,backend", backends("linear_cross_entropy"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_head", [True, False], ids=["normhead", "plain"])
def test_linear_cross_entropy_huge_hidden(device, backend, dtype, norm_head):
    """Logits up to ~1e4 (fp16: ~1e3): logsumexp is stable, forward and gradients."""
    N, D, V = 12, 64, 300
    h = make_tensor((N, D), dtype, seed=90, scale=200.0 if dtype == torch.float16 else 2000.0)
    w = make_tensor((V, D), dtype, seed=91, scale=0.5 if norm_head else 0.2)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(92))
    labels[3] = -100
    _lce_check(device, backend, h, w, labels, "mean", True, norm_head=norm_head, z_loss_weight=1e-4)
    _lce_check(device, backend, h, w, labels, "none", False, norm_head=norm_head, z_loss_weight=1e-4)


@pytest.mark.parametrize("device,backend", backends("linear_cross_entropy"))
def test_linear_cross_entropy_norm_head_huge_weight(device, backend):
    """bf16 head rows near 1e30 (their fp32 norms overflow): NormHead still normalises them (the
    kernels' 1/‖W‖ is rescaled like norm_head_weight), forward and gradients."""
    N, D, V = 6, 64, 50
    h = make_tensor((N, D), torch.bfloat16, seed=98, scale=3.0)
    w = make_tensor((V, D), torch.bfloat16, seed=99, scale=1e30)
    w[:5] = make_tensor((5, D), torch.bfloat16, seed=100)  # ordinary rows beside them
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(101))
    _lce_check(device, backend, h, w, labels, "mean", True, norm_head=True, z_loss_weight=1e-3)


@pytest.mark.parametrize("device,backend", backends("linear_cross_entropy"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_cross_entropy_nonfinite_rows(device, backend, dtype):
    """A NaN/inf hidden row poisons its own per-row terms (an infinite logit gives ce = +inf, as
    torch.logsumexp does) and the mean; a NaN in an *ignored* row reaches nothing."""
    N, D, V = 8, 64, 100
    h = make_tensor((N, D), dtype, seed=93)
    w = make_tensor((V, D), dtype, seed=94)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(95))
    h[2, 4] = NAN
    h[5, 1] = INF
    w[labels[5], 1] = -1.0  # its target logit is -inf, some others +inf: ce = +inf - (-inf) = +inf
    ce_rows = _lce_check(device, backend, h, w, labels, "none", False)[1]
    assert ce_rows[[0, 1, 3, 4, 6, 7]].isfinite().all() and ce_rows[2].isnan() and ce_rows[5].isinf()
    labels[[2, 5]] = -100  # the poisoned rows are ignored
    got = _lce_check(device, backend, h, w, labels, "mean", False)
    assert all(t.isfinite() for t in got)


@pytest.mark.parametrize("device,backend", backends("quant_matmul"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bits", [8, 4])
def test_quant_matmul_large_scales_and_nonfinite(device, backend, dtype, bits):
    """Weights ~1e30 (bf16) / ~3e3 (fp16, outputs past 65504 overflow where float64's rounded result
    does): fp32 accumulation of huge products; a NaN/inf in x poisons its own output row.

    bits=4 kernels factor the zero offset out, ``Σ x·(q·s + z) = s·Σ x·q + z·Σ x``: an inf in x can
    give inf - inf = NaN where the reference gives ±inf; only the non-finite positions must match."""
    N, K = 48, 256
    wscale = 1e30 if dtype == torch.bfloat16 else 3e3
    qw = bk.quantize_weight(make_tensor((N, K), torch.float32, seed=96, scale=wscale), bits=bits, group_size=128)
    x = make_tensor((5, K), dtype, seed=97)
    x[1, 10], x[3, 200] = NAN, INF
    got = run(device, bk.quant_matmul, x.to(device), qw.to(device), backend=backend)
    exact = quant_matmul_ref(x.double(), qw)
    factored = bits == 4 and backend != "reference"
    assert_contract(got, quant_matmul_ref(x, qw), exact, f"{backend} quant_matmul", inf_may_be_nan=factored)
    assert got[1].isnan().all() and not got[[0, 2, 4]].isnan().any()
    if dtype == torch.float16:
        assert exact.half().isinf().sum() > 10  # the overflow case is exercised

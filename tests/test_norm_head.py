"""norm_head_weight: every backend vs a float64 run of the reference, forward and gradient."""

import pytest
import torch

import baichuan_kernels as bk
from baichuan_kernels.reference.norm_head import norm_head_weight_ref
from baichuan_kernels.testing import DTYPES, assert_within_reference_error, make_tensor, poisoned_outputs
from _backends import kernel_backends

BACKENDS = kernel_backends("norm_head_weight")

# (V, D): odd sizes and Baichuan 2 widths (7B 4096, 13B 5120; the vocabulary only at a few rows).
SHAPES = [(1, 1), (17, 123), (5, 4097), (3, 4096), (2, 5120), (70, 64)]


def _run(fn, w, g):
    out = fn(w)
    (dw,) = torch.autograd.grad(out, (w,), g)
    return out.detach(), dw


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V,D", SHAPES, ids=[f"{v}x{d}" for v, d in SHAPES])
def test_matches_float64_reference(device, backend, dtype, V, D):
    w = make_tensor((V, D), dtype, device, seed=V + D, scale=0.3, offset=0.01, requires_grad=True)
    g = make_tensor((V, D), dtype, device, seed=V + D + 1)
    with poisoned_outputs():
        got = _run(lambda t: bk.norm_head_weight(t, backend=backend), w, g)
    same = _run(norm_head_weight_ref, w, g)
    exact = _run(norm_head_weight_ref, w.detach().double().requires_grad_(), g.double())
    for name, a, s, e in zip(("w_hat", "dweight"), got, same, exact):
        assert a.dtype == s.dtype, name
        assert_within_reference_error(a, s, e, name=f"{backend} {dtype} {name}")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_zero_and_tiny_rows(device, backend):
    # ‖W‖ < eps: divided by eps (no NaN), gradient g / eps.
    w = make_tensor((4, 8), torch.float32, device, seed=1)
    with torch.no_grad():
        w[1] = 0.0
        w[2] = 1e-14
    w.requires_grad_()
    g = make_tensor((4, 8), torch.float32, device, seed=2)
    got = _run(lambda t: bk.norm_head_weight(t, backend=backend), w, g)
    exp = _run(norm_head_weight_ref, w.detach().double().requires_grad_(), g.double())
    for a, e in zip(got, exp):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_custom_eps_and_sum_backward(device, backend):
    w = make_tensor((6, 10), torch.float32, device, seed=3, scale=0.01, requires_grad=True)
    out = bk.norm_head_weight(w, 0.05, backend=backend)
    (dw,) = torch.autograd.grad(out.sum(), (w,))  # expanded stride-0 upstream gradient
    ref = norm_head_weight_ref(w, 0.05)
    (dw_ref,) = torch.autograd.grad(ref.sum(), (w,))
    torch.testing.assert_close(out, ref.detach())
    torch.testing.assert_close(dw, dw_ref)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_non_contiguous_input(device, backend):
    w = make_tensor((12, 9), torch.float32, device, seed=4).t()
    torch.testing.assert_close(bk.norm_head_weight(w, backend=backend), norm_head_weight_ref(w))


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: torch.ones(3, 4, dtype=torch.int32), TypeError, "weight"),
        (lambda: torch.ones(4), ValueError, "weight"),
        (lambda: torch.ones(0, 4), ValueError, "weight must not be empty"),
    ],
)
def test_bad_inputs(make, exc, match):
    with pytest.raises(exc, match=match):
        bk.norm_head_weight(make())


def test_bad_eps():
    with pytest.raises(ValueError, match="eps"):
        bk.norm_head_weight(torch.ones(2, 3), 0.0)


@pytest.mark.skipif("cpu" not in bk.available_backends("norm_head_weight"), reason="extension not built")
def test_cpp_op_checks_arguments_itself():
    op = torch.ops.baichuan.norm_head_weight_fwd
    with pytest.raises(RuntimeError, match="weight must be 2-D"):
        op(torch.ones(4), 1e-12)
    with pytest.raises(RuntimeError, match="weight must be contiguous"):
        op(torch.ones(4, 3).t(), 1e-12)
    with pytest.raises(RuntimeError, match="rinv must be float32"):
        torch.ops.baichuan.norm_head_weight_bwd(torch.ones(2, 3), torch.ones(2, 3), torch.ones(3), 1e-12)


def _namespaces():
    out = []
    if "cpu" in bk.available_backends("norm_head_weight"):
        out.append(pytest.param(torch.ops.baichuan, id="cpu"))
    if "triton" in bk.available_backends("norm_head_weight"):
        out.append(pytest.param(torch.ops.baichuan_triton, id="triton"))
    return out


@pytest.mark.parametrize("namespace", _namespaces())
def test_opcheck(namespace):
    w = make_tensor((5, 24), torch.float32, seed=5, requires_grad=True)
    torch.library.opcheck(namespace.norm_head_weight_fwd.default, (w, 1e-12))
    _, rinv = namespace.norm_head_weight_fwd(w.detach(), 1e-12)
    g = make_tensor((5, 24), torch.float32, seed=6)
    torch.library.opcheck(namespace.norm_head_weight_bwd.default, (g, w.detach(), rinv, 1e-12))


@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in bk.available_backends("norm_head_weight")])
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()

    def f(w):
        return (bk.norm_head_weight(w, backend=backend) * 3).square().sum()

    w = make_tensor((7, 20), torch.float32, seed=7, requires_grad=True)
    eager = f(w)
    (g_eager,) = torch.autograd.grad(eager, (w,))
    got = torch.compile(f, fullgraph=True)(w)
    (g_got,) = torch.autograd.grad(got, (w,))
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(g_got, g_eager)

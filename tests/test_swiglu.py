"""swiglu: every backend vs a float64 run of the reference, forward and both gradients."""

import pytest
import torch

import baichuan_kernels as bk
from baichuan_kernels.reference.swiglu import swiglu_ref
from baichuan_kernels.testing import DTYPES, assert_within_reference_error, make_tensor, poisoned_outputs
from _backends import kernel_backends

BACKENDS = kernel_backends("swiglu")
# The Triton interpreter evaluates exp(-gate) in numpy, which warns on overflow (sigmoid -> 0, correct).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

# Odd sizes, a 3-D input and Baichuan 2 widths (F = 11008 for 7B, 13696 for 13B).
SHAPES = [(1,), (3, 17), (17, 123), (2, 3, 64), (2, 4097), (2, 11008), (1, 13696)]


def _grad_check(backend, make, dtype, seed=0):
    """make(dtype, requires_grad) -> (gate, up) leaves or views; checks y, dgate, dup."""
    g, u, leaves = make(dtype)
    dy = make_tensor(g.shape, dtype, g.device, seed=seed + 9)
    with poisoned_outputs():
        y = bk.swiglu(g, u, backend=backend)
        got = [y.detach(), *torch.autograd.grad(y, leaves, dy)]
    y = swiglu_ref(g, u)
    same = [y.detach(), *torch.autograd.grad(y, leaves, dy)]
    g64, u64, leaves64 = make(torch.float64)
    y = swiglu_ref(g64, u64)
    exact = [y.detach(), *torch.autograd.grad(y, leaves64, dy.double())]
    for name, a, s, e in zip(["y", "d0", "d1"], got, same, exact):
        assert a.shape == e.shape and a.dtype == s.dtype, name
        assert_within_reference_error(a, s, e, name=f"{backend} {dtype} {name}")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_matches_float64_reference(device, backend, dtype, shape):
    if backend == "triton" and shape[-1] > 4097:
        pytest.skip("interpreter: small shapes only")

    def make(dt):
        g = make_tensor(shape, dt, device, seed=1, scale=3.0, requires_grad=True)
        u = make_tensor(shape, dt, device, seed=2, requires_grad=True)
        return g, u, (g, u)

    _grad_check(backend, make, dtype)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_layout_halves_of_one_projection(device, backend, dtype):
    # gate, up = the two halves of one [B, T, 2F] matmul output: read in place (row stride 2F).
    def make(dt):
        h = make_tensor((2, 5, 2 * 96), dt, device, seed=3, scale=3.0, requires_grad=True)
        g, u = h.chunk(2, dim=-1)
        return g, u, (h,)

    _grad_check(backend, make, dtype)


@pytest.mark.parametrize("device,backend", BACKENDS + [pytest.param("cpu", "reference", id="cpu-reference")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 2), (3, 5, 2 * 96), (2, 2 * 4097)], ids=["1x2", "3x5x192", "2x8194"])
def test_packed_fused_layout(device, backend, dtype, shape):
    # swiglu(h) with h = [gate | up]: the packed ops read h in place and write dh in one pass.
    F = shape[-1] // 2
    h = make_tensor(shape, dtype, device, seed=3, scale=3.0, requires_grad=True)
    h64 = h.detach().double().requires_grad_()
    dy = make_tensor((*shape[:-1], F), dtype, device, seed=9)
    with poisoned_outputs():
        y = bk.swiglu(h, backend=backend)
        got = [y.detach(), *torch.autograd.grad(y, h, dy)]
    y = swiglu_ref(h[..., :F], h[..., F:])
    same = [y.detach(), *torch.autograd.grad(y, h, dy)]
    y = swiglu_ref(h64[..., :F], h64[..., F:])
    exact = [y.detach(), *torch.autograd.grad(y, h64, dy.double())]
    for name, a, s_, e in zip(["y", "dh"], got, same, exact):
        assert a.shape == e.shape and a.dtype == s_.dtype, name
        assert_within_reference_error(a, s_, e, name=f"packed {backend} {dtype} {name}")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_fused_layout_needs_no_copy(device, backend):
    from baichuan_kernels.ops.swiglu import _as_rows

    h = make_tensor((3, 4, 2 * 40), torch.float32, device, seed=4)
    g, u = h.chunk(2, dim=-1)
    g2, u2 = _as_rows(g, 12, 40), _as_rows(u, 12, 40)
    assert g2.data_ptr() == h.data_ptr() and u2.data_ptr() == h.data_ptr() + 40 * 4
    assert g2.stride() == (80, 1) and u2.stride() == (80, 1)
    torch.testing.assert_close(bk.swiglu(g, u, backend=backend), swiglu_ref(g, u), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_extreme_values(device, backend):
    g = torch.tensor([[-200.0, -90.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 90.0, 200.0]], device=device)
    u = torch.full_like(g, 1.5)
    torch.testing.assert_close(bk.swiglu(g, u, backend=backend), swiglu_ref(g, u), rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_sum_backward_with_expanded_grad(device, backend):
    g = make_tensor((7, 33), torch.float32, device, seed=5, requires_grad=True)
    u = make_tensor((7, 33), torch.float32, device, seed=6, requires_grad=True)
    bk.swiglu(g, u, backend=backend).sum().backward()
    g64, u64 = (t.detach().double().requires_grad_() for t in (g, u))
    swiglu_ref(g64, u64).sum().backward()
    torch.testing.assert_close(g.grad.double(), g64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(u.grad.double(), u64.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_non_contiguous_inputs(device, backend):
    base = make_tensor((40, 12), torch.float32, device, seed=7)
    g, u = base.t(), make_tensor((12, 40), torch.float32, device, seed=8)[:, :]  # transposed gate
    torch.testing.assert_close(bk.swiglu(g, u, backend=backend), swiglu_ref(g, u), rtol=2e-6, atol=1e-6)
    g, u = base[:, ::2], base[:, 1::2]  # stride 2 along F
    torch.testing.assert_close(bk.swiglu(g, u, backend=backend), swiglu_ref(g, u), rtol=2e-6, atol=1e-6)
    g = make_tensor((5,), torch.float32, device, seed=9).expand(3, 5)  # stride-0 rows
    u = make_tensor((3, 5), torch.float32, device, seed=10)
    torch.testing.assert_close(bk.swiglu(g, u, backend=backend), swiglu_ref(g, u), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 16), (4, 0), ()], ids=["no-rows", "no-cols", "scalar"])
def test_empty_and_scalar(device, backend, shape):
    g = make_tensor(shape, torch.float32, device, seed=1, requires_grad=True)
    u = make_tensor(shape, torch.float32, device, seed=2, requires_grad=True)
    y = bk.swiglu(g, u, backend=backend)
    assert y.shape == shape
    torch.testing.assert_close(y, swiglu_ref(g, u))
    y.sum().backward()
    assert g.grad.shape == shape and u.grad.shape == shape


def test_float64_reference_only():
    g, u = make_tensor((3, 8), torch.float64, seed=1), make_tensor((3, 8), torch.float64, seed=2)
    torch.testing.assert_close(bk.swiglu(g, u), swiglu_ref(g, u))
    if "cpu" in bk.available_backends("swiglu"):
        with pytest.raises(ValueError, match="float64"):
            bk.swiglu(g, u, backend="cpu")


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: (torch.ones(2, 4, dtype=torch.int32), torch.ones(2, 4)), TypeError, "gate must have dtype"),
        (lambda: (torch.ones(2, 4), torch.ones(2, 5)), ValueError, "up must have shape"),
        (lambda: (torch.ones(2, 4), torch.ones(2, 4, dtype=torch.float16)), TypeError, "same dtype"),
        (lambda: ([1.0], torch.ones(1)), TypeError, "gate must be a torch.Tensor"),
    ],
)
def test_bad_inputs(make, exc, match):
    g, u = make()
    with pytest.raises(exc, match=match):
        bk.swiglu(g, u)


def test_bad_packed_input():
    with pytest.raises(ValueError, match="even last dim"):
        bk.swiglu(torch.randn(2, 5))
    with pytest.raises(TypeError, match="gate must have dtype"):
        bk.swiglu(torch.ones(2, 4, dtype=torch.int64))


@pytest.mark.skipif("cpu" not in bk.available_backends("swiglu"), reason="extension not built")
def test_cpp_op_checks_arguments_itself():
    op = torch.ops.baichuan.swiglu_fwd
    with pytest.raises(RuntimeError, match="up must have the shape of gate"):
        op(torch.randn(2, 4), torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="gate must have unit stride"):
        op(torch.randn(4, 2).t(), torch.randn(2, 4))
    with pytest.raises(RuntimeError, match="gate must be 2-D"):
        op(torch.randn(4), torch.randn(4))
    with pytest.raises(RuntimeError, match="gate must be float32, float16 or bfloat16"):
        op(torch.ones(2, 4, dtype=torch.int32), torch.ones(2, 4, dtype=torch.int32))


def _opcheck_ops():
    ops = []
    if "cpu" in bk.available_backends("swiglu"):
        ops.append(("cpu", torch.ops.baichuan))
    if "triton" in bk.available_backends("swiglu"):
        ops.append(("triton", torch.ops.baichuan_triton))
    return [pytest.param(ns, id=name) for name, ns in ops]


@pytest.mark.parametrize("namespace", _opcheck_ops())
def test_opcheck(namespace):
    h = make_tensor((5, 2 * 24), torch.float32, seed=1, requires_grad=True)
    g, u = h[:, :24], h[:, 24:]
    torch.library.opcheck(namespace.swiglu_fwd.default, (g, u))
    dy = make_tensor((5, 24), torch.float32, seed=4)
    torch.library.opcheck(namespace.swiglu_bwd.default, (dy, g.detach(), u.detach()))
    if hasattr(namespace, "swiglu_packed_fwd"):
        torch.library.opcheck(namespace.swiglu_packed_fwd.default, (h,))
        torch.library.opcheck(namespace.swiglu_packed_bwd.default, (dy, h.detach()))


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in bk.available_backends("swiglu")])
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()

    def mlp(h):
        g, u = h.chunk(2, dim=-1)
        return (bk.swiglu(g, u, backend=backend) * 2).square().sum() + bk.swiglu(h, backend=backend).sum()

    h = make_tensor((3, 5, 2 * 48), torch.float32, seed=6, requires_grad=True)
    eager = mlp(h)
    (eager_grad,) = torch.autograd.grad(eager, h)
    got = torch.compile(mlp, fullgraph=True)(h)
    (got_grad,) = torch.autograd.grad(got, h)
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(got_grad, eager_grad)

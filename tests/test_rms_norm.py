"""rms_norm: every backend vs a float64 run of the reference, forward and every gradient."""

import pytest
import torch

import baichuan_kernels as bk
from baichuan_kernels.reference.rms_norm import rms_norm_ref
from baichuan_kernels.testing import DTYPES, assert_within_reference_error, make_tensor, poisoned_outputs
from _backends import kernel_backends

BACKENDS = kernel_backends("rms_norm")

# (leading shape, D): odd sizes, a 3-D input, and Baichuan 2 widths (7B 4096, 13B 5120).
SHAPES = [((1,), 1), ((3,), 17), ((17,), 123), ((2, 3), 64), ((5,), 4097), ((6,), 4096), ((4,), 5120)]


def _inputs(lead, D, dtype, device, residual, seed):
    x = make_tensor((*lead, D), dtype, device, seed=seed, scale=2.0, offset=0.3, requires_grad=True)
    w = make_tensor((D,), dtype, device, seed=seed + 1, scale=0.5, offset=1.0, requires_grad=True)
    r = make_tensor((*lead, D), dtype, device, seed=seed + 2, requires_grad=True) if residual else None
    return x, w, r


def _run(fn, x, w, r, dy, ds):
    """Forward + backward with given upstream grads; returns outputs then grads (x, w, residual)."""
    out = fn(x, w, r)
    outs = out if isinstance(out, tuple) else (out,)
    grads_out = (dy, ds)[: len(outs)]
    leaves = [t for t in (x, w, r) if t is not None]
    grads = torch.autograd.grad(outs, leaves, grads_out)
    return [o.detach() for o in outs] + list(grads)


def _check_against_reference(device, backend, lead, D, dtype, residual, seed=0, eps=1e-6):
    x, w, r = _inputs(lead, D, dtype, device, residual, seed)
    dy = make_tensor(x.shape, dtype, device, seed=seed + 3)
    ds = make_tensor(x.shape, dtype, device, seed=seed + 4) if residual else None

    def ours(a, b, c):
        return bk.rms_norm(a, b, eps, residual=c, backend=backend)

    def ref(a, b, c):
        return rms_norm_ref(a, b, eps, residual=c)

    with poisoned_outputs():
        got = _run(ours, x, w, r, dy, ds)
    same = _run(ref, x, w, r, dy, ds)
    as64 = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, r)]
    exact = _run(ref, *as64, dy.double(), ds.double() if ds is not None else None)
    names = ["y", "s"][: 1 + residual] + ["dx", "dweight"] + (["dresidual"] if residual else [])
    for name, g, s, e in zip(names, got, same, exact):
        assert g.shape == e.shape and g.dtype == s.dtype, name
        assert_within_reference_error(g, s, e, name=f"{backend} {dtype} {name}")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,D", SHAPES, ids=[f"{'x'.join(map(str, s))}x{d}" for s, d in SHAPES])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_matches_float64_reference(device, backend, dtype, lead, D, residual):
    _check_against_reference(device, backend, lead, D, dtype, residual)


# Many rows per persistent program of the backward (the dweight partials: each program walks many
# rows, a row count that is not a multiple of the programs). On the GPU the grid is ~2-4 blocks per
# SM, so the CUDA shapes reach ~16+ rows per block (the software-pipelined row loop, the in-registers
# and both row-loop kernels: D = 4096, 64, odd 4097, 8200 > the register limit); the Triton
# interpreter runs 8 programs, the C++ kernel its OpenMP row chunks.
MANY_ROWS = {"cuda": [(4099, 4096), (20011, 64), (3001, 4097), (2501, 8200)], "cpu": [(37, 64), (45, 300)]}
MANY_ROWS_PARAMS = [pytest.param(*p.values, N, D, id=f"{p.id}-{N}x{D}", marks=p.marks)
                    for p in BACKENDS for N, D in MANY_ROWS[p.values[0]]]


@pytest.mark.parametrize("device,backend,N,D", MANY_ROWS_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_many_rows_per_program(device, backend, N, D, dtype, residual):
    _check_against_reference(device, backend, (N,), D, dtype, residual, seed=N)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_magnitude_and_eps(device, backend, dtype):
    # Large activations (residual streams grow) and a big eps both stay within the rule.
    x = make_tensor((9, 257), dtype, device, seed=5, scale=60.0)
    w = make_tensor((257,), dtype, device, seed=6)
    for eps in (1e-6, 1e-2):
        got = bk.rms_norm(x, w, eps, backend=backend)
        assert_within_reference_error(got, rms_norm_ref(x, w, eps), rms_norm_ref(x.double(), w.double(), eps))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_sum_backward_with_expanded_grad(device, backend):
    # y.sum().backward() hands the backward a stride-0 expanded gradient.
    x, w, r = _inputs((7,), 33, torch.float32, device, True, seed=11)
    y, s = bk.rms_norm(x, w, residual=r, backend=backend)
    (y.sum() + s.sum()).backward()
    x64, w64, r64 = (t.detach().double().requires_grad_() for t in (x, w, r))
    y64, s64 = rms_norm_ref(x64, w64, residual=r64)
    (y64.sum() + s64.sum()).backward()
    for got, want in ((x.grad, x64.grad), (w.grad, w64.grad), (r.grad, r64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_non_contiguous_input(device, backend):
    base = make_tensor((64, 10), torch.float32, device, seed=3)
    x = base.t()  # [10, 64], strided rows
    w = make_tensor((64,), torch.float32, device, seed=4)
    torch.testing.assert_close(bk.rms_norm(x, w, backend=backend), rms_norm_ref(x, w), rtol=1e-6, atol=1e-6)
    x = base[:, ::2]  # every other column: stride 2 along D
    w = w[:5]
    torch.testing.assert_close(bk.rms_norm(x, w, backend=backend), rms_norm_ref(x, w), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_empty_rows(device, backend):
    x = torch.empty(0, 16, device=device, requires_grad=True)
    w = make_tensor((16,), torch.float32, device, seed=1, requires_grad=True)
    y = bk.rms_norm(x, w, backend=backend)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 16)
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_dweight_is_deterministic(device, backend):
    x, w, _ = _inputs((300,), 96, torch.float32, device, False, seed=8)
    dy = make_tensor(x.shape, torch.float32, device, seed=9)
    grads = []
    for threads in (1, 2):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            grads.append(torch.autograd.grad(bk.rms_norm(x, w, backend=backend), w, dy)[0])
        finally:
            torch.set_num_threads(prev)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("device,backend,N,D", MANY_ROWS_PARAMS)
def test_dweight_is_reproducible_with_many_rows_per_program(device, backend, N, D):
    # The partial-sum layout (programs x rows each) is fixed by the shape: bitwise equal run to run.
    x, w, r = _inputs((N,), D, torch.bfloat16, device, True, seed=N)
    dy = make_tensor(x.shape, torch.bfloat16, device, seed=N + 1)
    ds = make_tensor(x.shape, torch.bfloat16, device, seed=N + 2)
    runs = [torch.autograd.grad(bk.rms_norm(x, w, residual=r, backend=backend), (x, w), (dy, ds)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_float64_reference_only():
    x = make_tensor((3, 8), torch.float64, seed=1)
    w = make_tensor((8,), torch.float64, seed=2)
    torch.testing.assert_close(bk.rms_norm(x, w), rms_norm_ref(x, w))  # auto -> reference
    if "cpu" in bk.available_backends("rms_norm"):
        with pytest.raises(ValueError, match="float64"):
            bk.rms_norm(x, w, backend="cpu")


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: (torch.ones(2, 4, dtype=torch.int32), torch.ones(4)), TypeError, "x must have dtype"),
        (lambda: (torch.randn(2, 4), torch.ones(4, dtype=torch.int64)), TypeError, "weight must have dtype"),
        (lambda: (torch.randn(2, 4), torch.ones(5)), ValueError, r"weight must have shape \(4,\)"),
        (lambda: (torch.randn(2, 4), torch.ones(1, 4)), ValueError, "weight must have 1 dimensions"),
        (lambda: (torch.randn(2, 4), torch.ones(4, dtype=torch.bfloat16)), TypeError, "same dtype"),
        (lambda: (torch.randn(2, 0), torch.ones(0)), ValueError, "non-empty last dimension"),
        (lambda: ([1.0, 2.0], torch.ones(2)), TypeError, "x must be a torch.Tensor"),
        (lambda: (torch.randn(()), torch.ones(1)), ValueError, "at least 1 dimension"),
    ],
)
def test_bad_inputs(make, exc, match):
    x, w = make()
    with pytest.raises(exc, match=match):
        bk.rms_norm(x, w)


def test_bad_residual_and_eps():
    x, w = torch.randn(2, 4), torch.ones(4)
    with pytest.raises(ValueError, match="residual must have shape"):
        bk.rms_norm(x, w, residual=torch.randn(2, 5))
    with pytest.raises(TypeError, match="same dtype"):
        bk.rms_norm(x, w, residual=torch.randn(2, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="eps must be non-negative"):
        bk.rms_norm(x, w, -1.0)


def test_cpu_tensor_with_cuda_backend_is_refused():
    with pytest.raises(ValueError, match="backend 'cuda' cannot run"):
        bk.rms_norm(torch.randn(2, 4), torch.ones(4), backend="cuda")


@pytest.mark.skipif("cpu" not in bk.available_backends("rms_norm"), reason="extension not built")
def test_cpp_op_checks_arguments_itself():
    # Users calling torch.ops.baichuan.* directly get argument-naming errors, not crashes.
    op = torch.ops.baichuan.rms_norm_fwd
    with pytest.raises(RuntimeError, match="weight must have shape"):
        op(torch.randn(2, 4), None, torch.ones(3), 1e-6)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        op(torch.randn(4, 2).t(), None, torch.ones(4), 1e-6)
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        op(torch.ones(2, 4, dtype=torch.int32), None, torch.ones(4, dtype=torch.int32), 1e-6)
    with pytest.raises(RuntimeError, match="residual must have the shape"):
        op(torch.randn(2, 4), torch.randn(2, 3), torch.ones(4), 1e-6)


def _opcheck_ops():
    ops = []
    if "cpu" in bk.available_backends("rms_norm"):
        ops.append(("cpu", torch.ops.baichuan))
    if "triton" in bk.available_backends("rms_norm"):
        ops.append(("triton", torch.ops.baichuan_triton))
    return [pytest.param(ns, id=name) for name, ns in ops]


@pytest.mark.parametrize("namespace", _opcheck_ops())
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_opcheck(namespace, residual):
    x = make_tensor((5, 24), torch.float32, seed=1, requires_grad=True)
    w = make_tensor((24,), torch.float32, seed=2, requires_grad=True)
    r = make_tensor((5, 24), torch.float32, seed=3, requires_grad=True) if residual else None
    torch.library.opcheck(namespace.rms_norm_fwd.default, (x, r, w, 1e-6))
    y, s, rstd = namespace.rms_norm_fwd(x.detach(), r.detach() if residual else None, w.detach(), 1e-6)
    dy = make_tensor((5, 24), torch.float32, seed=4)
    torch.library.opcheck(
        namespace.rms_norm_bwd.default, (dy, dy if residual else None, s if residual else x.detach(), w.detach(), rstd)
    )


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in bk.available_backends("rms_norm")])
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    norm = bk.nn.RMSNorm(48, backend=backend)
    with torch.no_grad():
        norm.weight.copy_(make_tensor((48,), torch.float32, seed=5, offset=1.0))

    def block(x, residual):
        y, s = norm(x, residual=residual)
        return (y * 2).sum() + s.square().sum()

    x = make_tensor((3, 5, 48), torch.float32, seed=6, requires_grad=True)
    r = make_tensor((3, 5, 48), torch.float32, seed=7, requires_grad=True)
    eager = block(x, r)
    eager_grads = torch.autograd.grad(eager, (x, r, norm.weight))
    compiled = torch.compile(block, fullgraph=True)
    got = compiled(x, r)
    got_grads = torch.autograd.grad(got, (x, r, norm.weight))
    torch.testing.assert_close(got, eager)
    for a, b in zip(got_grads, eager_grads):
        torch.testing.assert_close(a, b)

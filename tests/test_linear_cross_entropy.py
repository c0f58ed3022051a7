"""linear_cross_entropy: every backend vs a float64 run of the reference (materialised logits),
forward (loss, ce, z) and the gradients into hidden and weight."""

import pytest
import torch

import baichuan_kernels as bk
from baichuan_kernels.reference.linear_cross_entropy import linear_cross_entropy_ref
from baichuan_kernels.testing import assert_within_reference_error, make_tensor, poisoned_outputs
from _backends import kernel_backends

BACKENDS = kernel_backends("linear_cross_entropy")
DTYPES = (torch.float32, torch.bfloat16)
BAICHUAN_V = 125_696
IGNORE = -100


def _inputs(N, D, V, dtype, device, seed, ignore_every=5):
    # Rows of W with different norms (NormHead matters), hidden scaled so that logits spread.
    h = make_tensor((N, D), dtype, device, seed=seed, scale=2.0, requires_grad=True)
    w = make_tensor((V, D), dtype, device, seed=seed + 1, scale=0.7, offset=0.05, requires_grad=True)
    gen = torch.Generator().manual_seed(seed + 2)
    y = torch.randint(0, V, (N,), generator=gen)
    if ignore_every:
        y[::ignore_every] = IGNORE
    return h, w, y.to(device)


def _upstream(shape, seed, device):
    g1 = make_tensor(shape, torch.float32, device, seed=seed, offset=1.0)
    g2 = make_tensor(shape, torch.float32, device, seed=seed + 1, scale=0.5)
    g3 = make_tensor(shape, torch.float32, device, seed=seed + 2, scale=0.5)
    return g1, g2, g3


def _run(fn, h, w, y, grads, **kw):
    """Forward + backward through (loss, ce, z) with upstream grads; returns outputs then (dh, dw)."""
    loss, ce, z = fn(h, w, y, **kw)
    dh, dw = torch.autograd.grad((loss, ce, z), (h, w), tuple(g.to(loss.dtype) for g in grads))
    return [loss.detach(), ce.detach(), z.detach(), dh, dw]


def _check(device, backend, N, D, V, dtype, *, seed=0, chunk_size=None, grads_from=("loss", "ce", "z"), **kw):
    h, w, y = _inputs(N, D, V, dtype, device, seed)
    shape = (N,) if kw.get("reduction") == "none" else ()
    grads = _upstream(shape, seed + 10, device)
    grads = tuple(g if name in grads_from else torch.zeros_like(g) for g, name in zip(grads, ("loss", "ce", "z")))

    def ours(a, b, c, **k):
        return bk.linear_cross_entropy(a, b, c, backend=backend, chunk_size=chunk_size, **k)

    with poisoned_outputs():
        got = _run(ours, h, w, y, grads, **kw)
    same = _run(linear_cross_entropy_ref, h, w, y, grads, **kw)
    h64, w64 = (t.detach().double().requires_grad_() for t in (h, w))
    exact = _run(linear_cross_entropy_ref, h64, w64, y, tuple(g.double() for g in grads), **kw)
    for name, g, s, e in zip(("loss", "ce", "z", "dhidden", "dweight"), got, same, exact):
        assert g.shape == e.shape and g.dtype == s.dtype, name
        # On the GPU the gradient GEMMs of 16-bit inputs read the grad-logits rounded to the input
        # dtype (tensor cores); the reference keeps them in fp32. A documented, looser bound there.
        loose = device == "cuda" and dtype != torch.float32 and name in ("dhidden", "dweight")
        assert_within_reference_error(g, s, e, name=f"{backend} {dtype} {name} {kw}", factor=8.0 if loose else 2.0)


# (reduction, norm_head, z_loss_weight): each value of each option at least twice.
COMBOS = [("mean", True, 2e-4), ("mean", False, 0.0), ("sum", True, 0.5), ("sum", False, 2e-4),
          ("none", True, 0.0), ("none", False, 0.5)]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction,norm_head,z_loss_weight", COMBOS, ids=[f"{r}-nh{int(n)}-z{z}" for r, n, z in COMBOS])
def test_matches_float64_reference(device, backend, dtype, reduction, norm_head, z_loss_weight):
    # V = 203 is not a multiple of any block; chunks of 8 rows leave a ragged last chunk.
    _check(device, backend, 37, 48, 203, dtype, chunk_size=8, reduction=reduction, norm_head=norm_head,
           z_loss_weight=z_loss_weight)


@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[1] != "triton" or p.values[0] == "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_baichuan_vocab(device, backend, dtype, reduction):
    # The real vocabulary (V = 125,696) at a small N; the Triton interpreter is too slow for it.
    # Two chunks of 4 rows: MKL's sgemm takes a sequential-dot path for fewer than 4 rows, ~10x less
    # accurate over K = 125,696 (so would the reference be, run on such a chunk alone).
    _check(device, backend, 8, 64, BAICHUAN_V, dtype, chunk_size=4, reduction=reduction, z_loss_weight=2e-4)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("grads_from", [("loss",), ("ce",), ("z",)], ids=lambda g: g[0])
def test_each_output_alone(device, backend, grads_from):
    # Upstream gradient through only one of (loss, ce, z): the CE and max-z terms separately.
    _check(device, backend, 19, 32, 77, torch.float32, chunk_size=5, z_loss_weight=0.5, grads_from=grads_from)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_chunk_size_does_not_matter(device, backend, chunk_size):
    _check(device, backend, 23, 40, 129, torch.float32, chunk_size=chunk_size, z_loss_weight=0.1)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(device, backend, reduction):
    h, w, _ = _inputs(9, 16, 50, torch.float32, device, seed=3)
    y = torch.full((9,), IGNORE, device=device)
    loss, ce, z = bk.linear_cross_entropy(h, w, y, z_loss_weight=0.3, reduction=reduction, backend=backend)
    for t in (loss, ce, z):
        assert torch.equal(t, torch.zeros_like(t))
    dh, dw = torch.autograd.grad(loss.sum(), (h, w))
    assert torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_int32_labels_and_custom_ignore_index(device, backend):
    h, w, y = _inputs(11, 24, 60, torch.float32, device, seed=4, ignore_every=0)
    y[::3] = 7  # a valid class used as the ignore index
    y32 = y.to(torch.int32)
    got = bk.linear_cross_entropy(h, w, y32, ignore_index=7, z_loss_weight=0.1, backend=backend)
    ref = linear_cross_entropy_ref(h.double(), w.double(), y, ignore_index=7, z_loss_weight=0.1)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_zero_weight_row(device, backend):
    # A zero row of W: NormHead divides by eps (no NaN), its gradient is rinv · g.
    h, w, y = _inputs(8, 16, 30, torch.float32, device, seed=5)
    with torch.no_grad():
        w[3] = 0.0
    got = _run(lambda *a, **k: bk.linear_cross_entropy(*a, backend=backend, **k), h, w, y,
               (torch.tensor(1.0, device=device),) * 3)
    h64, w64 = (t.detach().double().requires_grad_() for t in (h, w))
    exp = _run(linear_cross_entropy_ref, h64, w64, y, (torch.tensor(1.0, dtype=torch.float64),) * 3)
    for a, b in zip(got, exp):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_no_grad_and_frozen_weight(device, backend):
    h, w, y = _inputs(10, 16, 40, torch.float32, device, seed=6)
    ref = linear_cross_entropy_ref(h, w, y, z_loss_weight=0.2)
    with torch.no_grad():
        got = bk.linear_cross_entropy(h, w, y, z_loss_weight=0.2, backend=backend)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b.detach())
    # Only hidden requires grad (a frozen head): dweight is never computed.
    loss, _, _ = bk.linear_cross_entropy(h, w.detach(), y, z_loss_weight=0.2, backend=backend)
    (dh,) = torch.autograd.grad(loss, (h,))
    (dh_ref,) = torch.autograd.grad(ref[0], (h,))
    torch.testing.assert_close(dh, dh_ref)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_deterministic(device, backend):
    h, w, y = _inputs(21, 32, 90, torch.float32, device, seed=7)
    runs = []
    for _ in range(2):
        loss, _, _ = bk.linear_cross_entropy(h, w, y, z_loss_weight=0.1, chunk_size=6, backend=backend)
        runs.append((loss.detach(), *torch.autograd.grad(loss, (h, w))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_second_backward_through_the_same_graph_is_refused(device, backend):
    # The gradient computed in the forward pass is scaled in place by the first backward.
    h, w, y = _inputs(6, 8, 20, torch.float32, device, seed=8)
    loss, _, _ = bk.linear_cross_entropy(h, w, y, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


def test_float64_reference_only():
    h, w, y = _inputs(4, 8, 10, torch.float64, "cpu", seed=9)
    got = bk.linear_cross_entropy(h, w, y)  # auto: the reference
    assert got[0].dtype == torch.float64
    for backend in [b for b in ("cpu", "triton") if b in bk.available_backends("linear_cross_entropy")]:
        with pytest.raises(ValueError, match="float64"):
            bk.linear_cross_entropy(h, w, y, backend=backend)


def _good():
    return torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, -100, 9])


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda h, w, y: (h, w, torch.tensor([1, 2, 10, 0])), ValueError, "labels must be in"),
        (lambda h, w, y: (h, w, torch.tensor([1, -1, 3, 0])), ValueError, "labels must be in"),
        (lambda h, w, y: (h, torch.randn(10, 7), y), ValueError, "weight must have shape"),
        (lambda h, w, y: (h, w, y[:3]), ValueError, "labels must have shape"),
        (lambda h, w, y: (h.to(torch.int32), w, y), TypeError, "hidden"),
        (lambda h, w, y: (h, w, y.float()), TypeError, "labels"),
        (lambda h, w, y: (h.half(), w, y), TypeError, "same dtype"),
        (lambda h, w, y: (h[None], w, y), ValueError, "hidden"),
    ],
)
def test_bad_inputs(change, exc, match):
    with pytest.raises(exc, match=match):
        bk.linear_cross_entropy(*change(*_good()))


def test_bad_options():
    h, w, y = _good()
    with pytest.raises(ValueError, match="reduction"):
        bk.linear_cross_entropy(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match="chunk_size"):
        bk.linear_cross_entropy(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match="z_loss_weight"):
        bk.linear_cross_entropy(h, w, y, z_loss_weight=-1.0)
    with pytest.raises(TypeError, match="norm_head"):
        bk.linear_cross_entropy(h, w, y, norm_head=1)


@pytest.mark.skipif("cpu" not in bk.available_backends("linear_cross_entropy"), reason="extension not built")
def test_cpp_op_checks_arguments_itself():
    op = torch.ops.baichuan.linear_cross_entropy_fwd
    h, w, y = _good()
    args = (True, 0.0, -100, "mean", 4, False, False)
    with pytest.raises(RuntimeError, match="labels must be in"):
        op(h, w, torch.tensor([1, 2, 10, 0]), *args)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        op(h, torch.randn(10, 7), y, *args)
    with pytest.raises(RuntimeError, match="hidden must be float32"):
        op(h.to(torch.int32), w.to(torch.int32), y, *args)
    with pytest.raises(RuntimeError, match="reduction must be"):
        op(h, w, y, True, 0.0, -100, "avg", 4, False, False)


def _namespaces():
    out = []
    if "cpu" in bk.available_backends("linear_cross_entropy"):
        out.append(pytest.param(torch.ops.baichuan, id="cpu"))
    if "triton" in bk.available_backends("linear_cross_entropy"):
        out.append(pytest.param(torch.ops.baichuan_triton, id="triton"))
    return out


@pytest.mark.parametrize("namespace", _namespaces())
@pytest.mark.parametrize("reduction,grads", [("mean", True), ("mean", False), ("none", False)])
def test_opcheck(namespace, reduction, grads):
    h, w, y = _inputs(6, 16, 20, torch.float32, "cpu", seed=11)
    # With the gradient computed in the forward pass, the eager backward scales the op's dhidden /
    # dweight outputs in place (they are internal: the public function never returns them), so the
    # eager-vs-AOT comparison of those outputs after a backward does not apply.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") if grads else None
    kwargs = {"test_utils": utils} if utils else {}
    torch.library.opcheck(namespace.linear_cross_entropy_fwd.default,
                          (h, w, y, True, 0.1, IGNORE, reduction, 4, grads, grads), **kwargs)
    rows = make_tensor((6,), torch.float32, seed=12)
    torch.library.opcheck(namespace.linear_cross_entropy_bwd.default,
                          (h.detach(), w.detach(), y, rows, True, IGNORE, 4, True, True))


@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in bk.available_backends("linear_cross_entropy")])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph_matches_eager(backend, reduction):
    torch._dynamo.reset()

    def block(h, w, y):
        loss, ce, z = bk.linear_cross_entropy(h, w, y, z_loss_weight=0.1, reduction=reduction, chunk_size=4,
                                              backend=backend)
        return loss.sum() + 0.5 * ce.sum()

    h, w, y = _inputs(9, 16, 33, torch.float32, "cpu", seed=13)
    eager = block(h, w, y)
    eager_grads = torch.autograd.grad(eager, (h, w))
    got = torch.compile(block, fullgraph=True)(h, w, y)
    got_grads = torch.autograd.grad(got, (h, w))
    torch.testing.assert_close(got, eager)
    for a, b in zip(got_grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_peak_memory_is_one_chunk(backend):
    # Extra memory beyond inputs, fp32 gradient accumulators and gradients: about one chunk of logits.
    if backend not in bk.available_backends("linear_cross_entropy"):
        pytest.skip(f"{backend} backend not available")
    N, D, V, chunk = 4096, 1024, 32000, 512
    h, w, y = _inputs(N, D, V, torch.bfloat16, "cuda", seed=14)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, _, _ = bk.linear_cross_entropy(h, w, y, z_loss_weight=2e-4, chunk_size=chunk, backend=backend)
    dh, dw = torch.autograd.grad(loss, (h, w))
    peak = torch.cuda.max_memory_allocated() - base
    accum = 4 * (N * D + V * D) + 2 * (N * D + V * D)  # fp32 accumulators + bf16 gradients
    one_chunk = 6 * chunk * V  # fp32 logits + their bf16 copy
    assert peak <= accum + 2 * one_chunk + (64 << 20), (peak, accum, one_chunk)

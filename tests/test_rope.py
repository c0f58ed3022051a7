"""apply_rope, apply_rope_ (in place) and split_qkv_rope: every backend vs a float64 run of the
reference, forward and every gradient; position ids (left padding); Baichuan 2-7B sizes."""

import pytest
import torch

import baichuan_kernels as bk
from baichuan_kernels.reference.rope import apply_rope_ref, rope_cos_sin_ref
from baichuan_kernels.reference.split_qkv_rope import split_qkv_rope_ref
from baichuan_kernels._validation import shares_elements
from baichuan_kernels.testing import DTYPES, assert_within_reference_error, make_tensor, poisoned_outputs
from _backends import kernel_backends

BACKENDS = kernel_backends("apply_rope")
SPLIT_BACKENDS = kernel_backends("split_qkv_rope")
INPLACE_BACKENDS = kernel_backends("apply_rope_")

# (B, T, H, Dh): tiny, odd, and a Baichuan head dim (Dh = 128).
SHAPES = [(1, 1, 1, 2), (2, 5, 3, 8), (1, 17, 2, 62), (2, 9, 4, 128)]
IDS = ["x".join(map(str, s)) for s in SHAPES]


def _tables(S, Dh, device, random):
    """Random fp32 tables (halves differ: proves the exact transpose in the backward) or the real ones."""
    if random:
        return (make_tensor((S, Dh), torch.float32, device, seed=21),
                make_tensor((S, Dh), torch.float32, device, seed=22))
    return rope_cos_sin_ref(S, Dh, device=device)


def _positions(B, T, S, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, S, (B, T), generator=gen).to(device)


def _compare(names, got, same, exact, tag):
    for name, g, s, e in zip(names, got, same, exact):
        assert g.shape == e.shape and g.dtype == s.dtype, name
        assert_within_reference_error(g, s, e, name=f"{tag} {name}")


def _run_apply(fn, q, k, grads):
    out = fn(q, k)
    return [o.detach() for o in out] + list(torch.autograd.grad(out, (q, k), grads))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("with_pos", [False, True], ids=["arange", "position_ids"])
def test_apply_rope_matches_float64_reference(device, backend, dtype, shape, with_pos):
    B, T, H, Dh = shape
    S = T + 3
    cos, sin = _tables(S, Dh, device, random=True)
    pos = _positions(B, T, S, device) if with_pos else None
    q = make_tensor(shape, dtype, device, seed=1, scale=2.0, requires_grad=True)
    k = make_tensor(shape, dtype, device, seed=2, requires_grad=True)
    grads = (make_tensor(shape, dtype, device, seed=3), make_tensor(shape, dtype, device, seed=4))
    with poisoned_outputs():
        got = _run_apply(lambda a, b: bk.apply_rope(a, b, cos, sin, position_ids=pos, backend=backend), q, k, grads)
    same = _run_apply(lambda a, b: apply_rope_ref(a, b, cos, sin, position_ids=pos), q, k, grads)
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    exact = _run_apply(lambda a, b: apply_rope_ref(a, b, cos.double(), sin.double(), position_ids=pos), q64, k64,
                       tuple(g.double() for g in grads))
    _compare(["q", "k", "dq", "dk"], got, same, exact, f"{backend} {dtype}")


def _run_split(fn, qkv, grads):
    out = fn(qkv)
    return [o.detach() for o in out] + list(torch.autograd.grad(out, qkv, grads))


def _check_split(device, backend, dtype, shape, pos, cos, sin):
    B, T, H, Dh = shape
    qkv = make_tensor((B, T, 3 * H * Dh), dtype, device, seed=5, scale=2.0, requires_grad=True)
    grads = tuple(make_tensor(shape, dtype, device, seed=6 + i) for i in range(3))
    with poisoned_outputs():
        got = _run_split(lambda x: bk.split_qkv_rope(x, cos, sin, num_heads=H, position_ids=pos, backend=backend),
                         qkv, grads)
    same = _run_split(lambda x: split_qkv_rope_ref(x, cos, sin, num_heads=H, position_ids=pos), qkv, grads)
    qkv64 = qkv.detach().double().requires_grad_()
    exact = _run_split(lambda x: split_qkv_rope_ref(x, cos.double(), sin.double(), num_heads=H, position_ids=pos),
                       qkv64, tuple(g.double() for g in grads))
    _compare(["q", "k", "v", "dqkv"], got, same, exact, f"{backend} {dtype}")
    assert all(t.is_contiguous() for t in got[:3])


@pytest.mark.parametrize("device,backend", SPLIT_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("with_pos", [False, True], ids=["arange", "position_ids"])
def test_split_qkv_rope_matches_float64_reference(device, backend, dtype, shape, with_pos):
    B, T, H, Dh = shape
    S = T + 3
    cos, sin = _tables(S, Dh, device, random=True)
    _check_split(device, backend, dtype, shape, _positions(B, T, S, device) if with_pos else None, cos, sin)


# Shapes that walk the CUDA kernel's thread layout (TPP threads per head half, HPB (plane, head)
# pairs at once, <= 256 threads): 13B heads (H = 40: 80 / 120 pairs > HPB = 32, several per thread),
# 7B heads, and Dh / 2 = 300 with VW = 1 (more packs than threads: the pack loop runs twice).
GPU_SHAPES = [(1, 7, 40, 128), (2, 5, 32, 128), (1, 3, 2, 600)]
GPU_PARAMS = lambda params: [pytest.param(*p.values, s, id=f"{p.id}-{'x'.join(map(str, s))}", marks=p.marks)
                             for p in params if p.values[0] == "cuda" for s in GPU_SHAPES]


@pytest.mark.parametrize("device,backend,shape", GPU_PARAMS(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_apply_rope_gpu_shapes(device, backend, shape, dtype):
    test_apply_rope_matches_float64_reference(device, backend, dtype, shape, with_pos=True)


@pytest.mark.parametrize("device,backend,shape", GPU_PARAMS(SPLIT_BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_split_qkv_rope_gpu_shapes(device, backend, shape, dtype):
    test_split_qkv_rope_matches_float64_reference(device, backend, dtype, shape, with_pos=True)


def test_baichuan_7b_size():
    # T = 4096 tokens, H = 32, Dh = 128 with the real 4096-row tables, fp32, on the reference backend
    # and the CPU kernels (float64 copies of these sizes would cost more than the test: the kernels
    # are compared with the fp32 reference, whose rounding they match to a few ulps).
    B, T, H, Dh = 1, 4096, 32, 128
    cos, sin = rope_cos_sin_ref(T, Dh)
    pos = torch.arange(T).flip(0)[None]  # every row of the table, in reverse
    qkv = make_tensor((B, T, 3 * H * Dh), torch.float32, seed=10, requires_grad=True)
    grads = tuple(make_tensor((B, T, H, Dh), torch.float32, seed=11 + i) for i in range(3))
    backends = ["reference"] + [b for b in ("cpu",) if b in bk.available_backends("split_qkv_rope")]
    split, rope = {}, {}
    for backend in backends:
        split[backend] = _run_split(
            lambda x: bk.split_qkv_rope(x, cos, sin, num_heads=H, position_ids=pos, backend=backend), qkv, grads)
        q, k = split[backend][:2]
        rope[backend] = bk.apply_rope(q, k, cos, sin, backend=backend)
    for backend in backends[1:]:
        for g, w in zip(split[backend] + list(rope[backend]), split["reference"] + list(rope["reference"])):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def _left_padded_mask(lengths, T, device):
    """Left padding: sequence b has its lengths[b] tokens at the end."""
    return torch.stack([torch.arange(T) >= T - n for n in lengths]).to(device=device, dtype=torch.int64)


@pytest.mark.parametrize("device,backend", [("cpu", "reference")] + SPLIT_BACKENDS)
def test_left_padded_batch(device, backend):
    B, T, H, Dh = 3, 7, 2, 16
    mask = _left_padded_mask([7, 4, 1], T, device)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # the spec's generation rule
    cos, sin = rope_cos_sin_ref(T, Dh, device=device)
    qkv = make_tensor((B, T, 3 * H * Dh), torch.float32, device, seed=13)
    q, k, v = bk.split_qkv_rope(qkv, cos, sin, num_heads=H, position_ids=pos, backend=backend)
    rq, rk, rv = split_qkv_rope_ref(qkv, cos, sin, num_heads=H, position_ids=pos)
    for a, b in ((q, rq), (k, rk), (v, rv)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # the real tokens of a left-padded row are rotated exactly as the same tokens without padding
    for b, n in enumerate([7, 4, 1]):
        uq, uk, _ = bk.split_qkv_rope(qkv[b:b + 1, T - n:], cos, sin, num_heads=H, backend=backend)
        torch.testing.assert_close(q[b, T - n:], uq[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(k[b, T - n:], uk[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", [("cpu", "reference")] + INPLACE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_rope_inplace_on_wpack_views(device, backend, dtype):
    B, T, H, Dh = 2, 6, 3, 16
    cos, sin = _tables(T + 2, Dh, device, random=True)
    pos = _positions(B, T, T + 2, device, seed=3)
    qkv = make_tensor((B, T, 3 * H * Dh), dtype, device, seed=14)
    q, k, v = qkv.view(B, T, 3, H, Dh).unbind(2)  # strided views into qkv
    want = apply_rope_ref(q, k, cos, sin, position_ids=pos)
    exact = apply_rope_ref(q.double(), k.double(), cos.double(), sin.double(), position_ids=pos)
    v_before = v.clone()
    out = bk.apply_rope_(q, k, cos, sin, position_ids=pos, backend=backend)
    assert out[0] is q and out[1] is k
    for name, g, s, e in zip("qk", (q, k), want, exact):
        assert_within_reference_error(g, s, e, name=f"in-place {backend} {dtype} {name}")
    assert torch.equal(v, v_before)
    torch.testing.assert_close(qkv.view(B, T, 3, H, Dh)[:, :, 0], q, rtol=0, atol=0)


def _element_offsets(t):
    return set((t.storage_offset() + sum(i * s for i, s in zip(idx, t.stride())) for idx in
                __import__("itertools").product(*map(range, t.shape))))


def test_shares_elements_matches_enumeration():
    # every answer it gives is exact; views of one dense layout (nested strides, gaps allowed) are
    # always decided, irregular strides may be "unknown" (None)
    rng = __import__("random").Random(7)
    base, decided = torch.empty(6000), 0
    for _ in range(3000):
        shape = [rng.randint(1, 4) for _ in range(rng.randint(1, 4))]
        if rng.random() < 0.5:
            strides, acc = [0] * len(shape), 1
            for d in rng.sample(range(len(shape)), len(shape)):
                strides[d], acc = acc, acc * shape[d] * rng.choice((1, 1, 2))
            nested, b_shape, b_strides = True, shape, strides
        else:
            strides = [rng.randint(1, 9) for _ in shape]
            same = rng.random() < 0.5
            nested, b_shape = False, shape
            b_strides = strides if same else [rng.randint(1, 9) for _ in shape]
        a = base.as_strided(shape, strides, rng.randint(0, 150))
        b = base.as_strided(b_shape, b_strides, rng.randint(0, 150))
        got = shares_elements(a, b)
        assert got is not None or not nested, (shape, strides)
        if got is not None:
            decided += 1
            assert got == bool(_element_offsets(a) & _element_offsets(b)), (shape, strides, b_strides)
    assert decided > 2000
    assert shares_elements(torch.empty(3), torch.empty(3)) is False  # different storages


@pytest.mark.parametrize("device,backend", [("cpu", "reference")] + INPLACE_BACKENDS)
def test_apply_rope_inplace_rejects_overlapping_q_k(device, backend):
    B, T, H, Dh = 2, 5, 2, 8
    cos, sin = rope_cos_sin_ref(T, Dh, device=device)
    buf = make_tensor((B, T, 3 * H * Dh), torch.float32, device, seed=31)
    before = buf.clone()
    q = buf[..., : H * Dh].unflatten(-1, (H, Dh))
    k = buf[..., Dh: Dh + H * Dh].unflatten(-1, (H, Dh))  # k's first head is q's second
    with pytest.raises(ValueError, match="q and k share memory"):
        bk.apply_rope_(q, k, cos, sin, backend=backend)
    with pytest.raises(ValueError, match="q and k share memory"):  # a layout too irregular to decide
        bk.apply_rope_(q, buf[..., : H * Dh].unflatten(-1, (Dh, H)).transpose(-1, -2), cos, sin, backend=backend)
    assert torch.equal(buf, before)  # nothing written
    # one tensor given as both (another view object): rotated once, by the reference
    want, _ = apply_rope_ref(q, q, cos, sin)
    if backend == "reference":
        bk.apply_rope_(q, q.view_as(q), cos, sin, backend=backend)
        torch.testing.assert_close(q, want, rtol=0, atol=0)
    else:
        with pytest.raises(ValueError, match="must be different tensors"):
            bk.apply_rope_(q, q.view_as(q), cos, sin, backend=backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_non_contiguous_q_k_and_expanded_grads(device, backend):
    B, T, H, Dh = 2, 5, 3, 8
    cos, sin = rope_cos_sin_ref(T, Dh, device=device)
    qkv = make_tensor((B, T, 3 * H * Dh), torch.float32, device, seed=15, requires_grad=True)
    q, k, _ = qkv.view(B, T, 3, H, Dh).unbind(2)  # [B, T, H, Dh] views, row stride 3 * H * Dh
    kt = make_tensor((B, H, T, Dh), torch.float32, device, seed=16).transpose(1, 2)  # [B, T, H, Dh], transposed
    qr, kr = bk.apply_rope(q, kt, cos, sin, backend=backend)
    (qr.sum() + kr.sum()).backward()  # stride-0 expanded grads
    qkv64 = qkv.detach().double().requires_grad_()
    q64, _, _ = qkv64.view(B, T, 3, H, Dh).unbind(2)
    wq, wk = apply_rope_ref(q64, kt.double(), cos, sin)
    (wq.sum() + wk.sum()).backward()
    torch.testing.assert_close(qr.double(), wq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kr.double(), wk, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(qkv.grad.double(), qkv64.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", SPLIT_BACKENDS)
def test_split_sum_backward_with_expanded_grads(device, backend):
    B, T, H, Dh = 2, 4, 2, 8
    cos, sin = rope_cos_sin_ref(T, Dh, device=device)
    qkv = make_tensor((B, T, 3 * H * Dh), torch.float32, device, seed=17, requires_grad=True)
    q, k, v = bk.split_qkv_rope(qkv, cos, sin, num_heads=H, backend=backend)
    (q.sum() + 2 * k.sum() + v.sum()).backward()
    qkv64 = qkv.detach().double().requires_grad_()
    wq, wk, wv = split_qkv_rope_ref(qkv64, cos, sin, num_heads=H)
    (wq.sum() + 2 * wk.sum() + wv.sum()).backward()
    torch.testing.assert_close(qkv.grad.double(), qkv64.grad, rtol=1e-6, atol=1e-6)


def test_rope_cos_sin_offset_for_decoding():
    cos, sin = bk.rope_cos_sin(64, 128)
    c, s = bk.rope_cos_sin(5, 128, offset=40)
    assert c.dtype == torch.float32 and c.shape == (5, 128)
    torch.testing.assert_close(c, cos[40:45], rtol=0, atol=0)
    torch.testing.assert_close(s, sin[40:45], rtol=0, atol=0)
    # the decode step at position 40 with the offset table equals row 40 of the full one
    q, k = make_tensor((1, 1, 2, 128), seed=1), make_tensor((1, 1, 2, 128), seed=2)
    a = bk.apply_rope(q, k, c[:1], s[:1])
    b = bk.apply_rope(q, k, cos, sin, position_ids=torch.tensor([[40]]))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_float64_and_table_grads_run_on_reference():
    q, k = make_tensor((1, 2, 1, 4), torch.float64, seed=1), make_tensor((1, 2, 1, 4), torch.float64, seed=2)
    cos, sin = rope_cos_sin_ref(2, 4)
    torch.testing.assert_close(bk.apply_rope(q, k, cos, sin), apply_rope_ref(q, k, cos, sin))
    if "cpu" in bk.available_backends("apply_rope"):
        with pytest.raises(ValueError, match="float64"):
            bk.apply_rope(q, k, cos, sin, backend="cpu")
        with pytest.raises(ValueError, match="cos/sin"):
            bk.apply_rope(q.float(), k.float(), cos.requires_grad_(), sin, backend="cpu")


def _qk(shape=(1, 3, 2, 8)):
    return torch.randn(shape), torch.randn(shape)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: bk.apply_rope(*_qk((1, 3, 2, 7)), *rope_cos_sin_ref(3, 8)), ValueError, "must be even"),
        (lambda: bk.apply_rope(*_qk(), *rope_cos_sin_ref(2, 8)), ValueError, "cos/sin have 2 rows"),
        (lambda: bk.apply_rope(*_qk(), *rope_cos_sin_ref(4, 8), position_ids=torch.tensor([[0, 1, 4]])),
         ValueError, "position_ids has position 4"),
        (lambda: bk.apply_rope(torch.randn(1, 3, 2, 8), torch.randn(1, 3, 1, 8), *rope_cos_sin_ref(3, 8)),
         ValueError, "k must have shape"),
        (lambda: bk.apply_rope(*_qk(), *rope_cos_sin_ref(3, 6)), ValueError, "cos must have shape"),
        (lambda: bk.apply_rope(*_qk(), *rope_cos_sin_ref(3, 8), position_ids=torch.zeros(1, 3)),
         TypeError, "position_ids must have dtype"),
        (lambda: bk.apply_rope_(*_qk((1, 3, 2, 7)), *rope_cos_sin_ref(3, 8)), ValueError, "must be even"),
        (lambda: bk.split_qkv_rope(torch.randn(1, 3, 50), *rope_cos_sin_ref(3, 8), num_heads=2), ValueError,
         "divisible by 3 \\* num_heads"),
        (lambda: bk.split_qkv_rope(torch.randn(1, 3, 42), *rope_cos_sin_ref(3, 8), num_heads=2), ValueError,
         "must be even"),
        (lambda: bk.split_qkv_rope(torch.randn(1, 3, 48), *rope_cos_sin_ref(3, 8), num_heads=2,
                                   position_ids=torch.tensor([[0, 9, 1]])), ValueError, "position_ids has position 9"),
        (lambda: bk.split_qkv_rope(torch.randn(1, 3, 48), *rope_cos_sin_ref(3, 8), num_heads=0), ValueError,
         "num_heads must be >= 1"),
    ],
)
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.skipif("cpu" not in bk.available_backends("apply_rope"), reason="extension not built")
def test_cpp_ops_check_arguments_themselves():
    ops = torch.ops.baichuan
    cos, sin = rope_cos_sin_ref(4, 8)
    with pytest.raises(RuntimeError, match="must be even"):
        ops.apply_rope_fwd(torch.randn(1, 2, 1, 7), torch.randn(1, 2, 1, 7), cos, sin, None)
    with pytest.raises(RuntimeError, match="k must have the shape of q"):
        ops.apply_rope_fwd(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 2, 8), cos, sin, None)
    with pytest.raises(RuntimeError, match="cos/sin have 4 rows"):
        ops.apply_rope_fwd(torch.randn(1, 5, 1, 8), torch.randn(1, 5, 1, 8), cos, sin, None)
    with pytest.raises(RuntimeError, match="position_ids has position 7"):
        ops.apply_rope_fwd(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), cos, sin, torch.tensor([[0, 7]]))
    with pytest.raises(RuntimeError, match="cos must be float32"):
        ops.apply_rope_fwd(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), cos.double(), sin, None)
    with pytest.raises(RuntimeError, match="divisible by 3 \\* num_heads"):
        ops.split_qkv_rope_fwd(torch.randn(1, 2, 50), cos, sin, None, 2)


def _opcheck_namespaces():
    ops = []
    if "cpu" in bk.available_backends("apply_rope"):
        ops.append(("cpu", torch.ops.baichuan))
    if "triton" in bk.available_backends("apply_rope"):
        ops.append(("triton", torch.ops.baichuan_triton))
    return [pytest.param(ns, id=name) for name, ns in ops]


@pytest.mark.parametrize("namespace", _opcheck_namespaces())
@pytest.mark.parametrize("with_pos", [False, True], ids=["arange", "position_ids"])
def test_opcheck(namespace, with_pos):
    B, T, H, Dh = 2, 3, 2, 8
    cos, sin = rope_cos_sin_ref(5, Dh)
    pos = _positions(B, T, 5, "cpu") if with_pos else None
    q = make_tensor((B, T, H, Dh), seed=1, requires_grad=True)
    k = make_tensor((B, T, H, Dh), seed=2, requires_grad=True)
    torch.library.opcheck(namespace.apply_rope_fwd.default, (q, k, cos, sin, pos))
    torch.library.opcheck(namespace.apply_rope_bwd.default, (q.detach(), k.detach(), cos, sin, pos))
    torch.library.opcheck(namespace.apply_rope_inplace.default, (q.detach().clone(), k.detach().clone(), cos, sin, pos))
    qkv = make_tensor((B, T, 3 * H * Dh), seed=3, requires_grad=True)
    torch.library.opcheck(namespace.split_qkv_rope_fwd.default, (qkv, cos, sin, pos, H))
    torch.library.opcheck(namespace.split_qkv_rope_bwd.default, (q.detach(), k.detach(), q.detach(), cos, sin, pos))


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in bk.available_backends("split_qkv_rope")])
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    B, T, H, Dh = 2, 4, 2, 8
    cos, sin = rope_cos_sin_ref(T, Dh)
    pos = _positions(B, T, T, "cpu")

    def block(qkv):
        q, k, v = bk.split_qkv_rope(qkv, cos, sin, num_heads=H, position_ids=pos, backend=backend)
        q2, k2 = bk.apply_rope(q, k, cos, sin, backend=backend)
        return (q2 * k2).sum() + (v * q).sum()

    qkv = make_tensor((B, T, 3 * H * Dh), seed=6, requires_grad=True)
    eager = block(qkv)
    (eager_grad,) = torch.autograd.grad(eager, qkv)
    got = torch.compile(block, fullgraph=True)(qkv)
    (got_grad,) = torch.autograd.grad(got, qkv)
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(got_grad, eager_grad)

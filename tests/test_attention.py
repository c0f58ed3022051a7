"""attention: every kernel backend vs a float64 run of the reference with an explicit materialised bias,
forward and every gradient (dq, dk, dv); causal / not, ALiBi / not, dense and packed (ragged) inputs."""

import pytest
import torch

import baichuan_kernels as bk
from baichuan_kernels.ops import attention as attention_ops
from baichuan_kernels.reference.alibi import alibi_slopes_ref
from baichuan_kernels.testing import assert_within_reference_error, make_tensor, poisoned_outputs
from _backends import kernel_backends

# The CUDA kernel (forward-only, fp16/bf16, Dh 64/128) has its own tests: tests/test_attention_cuda.py.
BACKENDS = kernel_backends("attention", exclude=("cuda",))


def _explicit_ref(q, k, v, causal, slopes, scale, cu_seqlens=None):
    """Plain attention with a materialised [H, T, T] bias and mask (independent of attention_ref):
    scores, bias and softmax in fp32 (float64 for float64), P rounded to v's dtype before P·V."""
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        outs = [_explicit_ref(q[None, a:b], k[None, a:b], v[None, a:b], causal, slopes, scale)[0]
                for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        return torch.cat(outs, 0)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    T, H = q.shape[1], q.shape[2]
    s = torch.einsum("bihd,bjhd->bhij", q.to(acc), k.to(acc)) * scale  # [B, H, T, T]
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    bias = torch.zeros(H, T, T, dtype=acc)
    if slopes is not None:
        bias = bias + slopes.to(acc)[:, None, None] * (j - i).to(acc)
    if causal:
        bias = bias.masked_fill(j > i, float("-inf"))
    p = torch.softmax(s + bias, dim=-1)
    o = torch.einsum("bhij,bjhd->bihd", p.to(v.dtype).to(acc), v.to(acc))
    return o.to(q.dtype)


# name -> (dense shape (B, T, H, Dh) or packed lengths with (H, Dh)) per backend
CASES = {
    "dense-2x37x3x32": ((2, 37, 3, 32), None),
    "dense-H40": ((1, 9, 40, 16), None),
    "dense-Dh128": ((1, 20, 2, 128), None),
    "packed-ragged": (None, ((1, 17, 300), (2, 64))),
}
MODES = {  # (causal, alibi)
    "causal-alibi": (True, True),
    "causal": (True, False),
    "alibi": (False, True),
    "plain": (False, False),
}
_ALL = [(torch.float32, m) for m in MODES] + [(torch.bfloat16, m) for m in MODES] + [(torch.float16, "causal-alibi")]
_SOME = [(torch.float32, "causal-alibi"), (torch.bfloat16, "causal-alibi"), (torch.float16, "causal")]
# Every dtype x mode on the odd dense shape; a cross-section on the others (runtime on 2 cores).
COMBOS = [(case, d, m) for case in CASES for d, m in (_ALL if case == "dense-2x37x3x32" else _SOME)]
COMBOS += [("packed-ragged", torch.float32, "plain"), ("packed-ragged", torch.bfloat16, "alibi")]


def _make(case, backend, dtype, device, seed=0):
    dense, packed = CASES[case]
    if dense is not None:
        shape, cu = dense, None
        H = dense[2]
    else:
        lengths, (H, Dh) = packed
        if backend == "triton" and device == "cpu":
            lengths = tuple(min(n, 45) for n in lengths)  # the interpreter: small grids
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        cu = torch.tensor(bounds, dtype=torch.int32, device=device)
        shape = (bounds[-1], H, Dh)
    q, k, v = (make_tensor(shape, dtype, device, seed=seed + i, requires_grad=True) for i in range(3))
    do = make_tensor(shape, dtype, device, seed=seed + 3)
    # a slice of a larger head set's slopes (tensor parallelism): any [H] values
    slopes = alibi_slopes_ref(2 * H)[H // 2: H // 2 + H].to(device)
    return q, k, v, do, cu, slopes


def _grads(out, q, k, v, do):
    return [out.detach()] + list(torch.autograd.grad(out, (q, k, v), do))


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("case,dtype,mode", COMBOS, ids=[f"{c}-{str(d)[6:]}-{m}" for c, d, m in COMBOS])
def test_matches_float64_reference(device, backend, dtype, mode, case):
    causal, alibi = MODES[mode]
    q, k, v, do, cu, slopes = _make(case, backend, dtype, device)
    slopes = slopes if alibi else None
    scale = q.shape[-1] ** -0.5
    with poisoned_outputs():
        out = bk.attention(q, k, v, causal=causal, alibi_slopes=slopes, cu_seqlens=cu, backend=backend)
        got = _grads(out, q, k, v, do)
    same = _grads(_explicit_ref(q, k, v, causal, slopes, scale, cu), q, k, v, do)
    as64 = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    cu64 = cu.cpu() if cu is not None else None
    s64 = slopes.cpu().double() if slopes is not None else None
    exact = _grads(_explicit_ref(*as64, causal, s64, scale, cu64), *as64, do.cpu().double())
    for name, g, s, e in zip(("out", "dq", "dk", "dv"), got, same, exact):
        assert g.shape == e.shape and g.dtype == dtype, name
        assert_within_reference_error(g, s, e, name=f"{backend} {dtype} {case} {mode} {name}")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_dense_equals_packed_and_reference_path(device, backend):
    B, T, H, Dh = 3, 21, 2, 32
    q, k, v = (make_tensor((B, T, H, Dh), torch.float32, device, seed=10 + i) for i in range(3))
    slopes = alibi_slopes_ref(H).to(device)
    dense = bk.attention(q, k, v, alibi_slopes=slopes, backend=backend)
    cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=device)
    packed = bk.attention(*(t.reshape(B * T, H, Dh) for t in (q, k, v)), alibi_slopes=slopes, cu_seqlens=cu,
                          max_seqlen=T + 5, backend=backend)
    torch.testing.assert_close(packed.view(B, T, H, Dh), dense, rtol=0, atol=0)
    ref = bk.attention(q, k, v, alibi_slopes=slopes, backend="reference")
    torch.testing.assert_close(dense, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_sum_backward_and_non_contiguous(device, backend):
    B, T, H, Dh = 2, 19, 2, 16
    base = make_tensor((B, H, T, Dh), torch.float32, device, seed=20)
    q = base.transpose(1, 2).detach().requires_grad_()  # non-contiguous [B, T, H, Dh]
    k = make_tensor((B, T, H, Dh), torch.float32, device, seed=21, requires_grad=True)
    v = make_tensor((B, T, H, Dh), torch.float32, device, seed=22, requires_grad=True)
    slopes = alibi_slopes_ref(H).to(device)
    got = torch.autograd.grad(bk.attention(q, k, v, alibi_slopes=slopes, backend=backend).sum(), (q, k, v))
    want = torch.autograd.grad(bk.attention(q, k, v, alibi_slopes=slopes, backend="reference").sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_backward_is_deterministic(device, backend):
    q, k, v, do, cu, slopes = _make("dense-2x37x3x32", backend, torch.bfloat16, device, seed=30)
    runs = [_grads(bk.attention(q, k, v, alibi_slopes=slopes, backend=backend), q, k, v, do) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_float64_and_odd_head_dim_use_the_reference():
    q = make_tensor((1, 5, 2, 24), torch.float64, seed=1)
    torch.testing.assert_close(bk.attention(q, q, q), bk.attention(q, q, q, backend="reference"))
    q32 = q.float()
    torch.testing.assert_close(bk.attention(q32, q32, q32), bk.attention(q32, q32, q32, backend="reference"))
    if "cpu" in bk.available_backends("attention"):
        with pytest.raises(ValueError, match="float64"):
            bk.attention(q, q, q, backend="cpu")
        with pytest.raises(ValueError, match="head dims"):
            bk.attention(q32, q32, q32, backend="cpu")


def test_cuda_backend_refuses_without_its_kernels(monkeypatch):
    q = torch.randn(1, 4, 2, 64, dtype=torch.bfloat16, requires_grad=True)
    monkeypatch.setattr(attention_ops, "_CUDA_FWD", True)
    monkeypatch.setattr(attention_ops, "_CUDA_BWD", False)
    assert "attention_bwd" in attention_ops._cuda_limits(q, q, q)
    with torch.no_grad():
        assert attention_ops._cuda_limits(q, q, q) is None
        assert "fp16/bf16" in attention_ops._cuda_limits(q.float(), q.float(), q.float())
        q32 = q[..., :32]
        assert "Dh" in attention_ops._cuda_limits(q32, q32, q32)
    monkeypatch.setattr(attention_ops, "_CUDA_FWD", False)
    assert "attention_fwd" in attention_ops._cuda_limits(q.detach(), q.detach(), q.detach())


def _cu(*bounds):
    return torch.tensor(bounds, dtype=torch.int32)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(q=torch.randn(1, 4, 2, 8), k=torch.randn(1, 4, 3, 8)), ValueError, "k must have shape"),
        (dict(v=torch.randn(1, 5, 2, 8)), ValueError, "v must have shape"),
        (dict(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes must have shape"),
        (dict(alibi_slopes=torch.ones(2, dtype=torch.int32)), TypeError, "alibi_slopes must have dtype"),
        (dict(packed=True, cu_seqlens=_cu(0, 3, 2, 4)), ValueError, "cu_seqlens must be non-decreasing"),
        (dict(packed=True, cu_seqlens=_cu(0, 3)), ValueError, "cu_seqlens must end at total_T"),
        (dict(packed=True, cu_seqlens=_cu(1, 4)), ValueError, "cu_seqlens must start at 0"),
        (dict(packed=True, cu_seqlens=_cu(0, 4).long()), TypeError, "cu_seqlens must have dtype"),
        (dict(packed=True, cu_seqlens=_cu(0, 4), max_seqlen=2), ValueError, "max_seqlen"),
        (dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
        (dict(q=torch.randn(1, 4, 2, 8).half()), TypeError, "same dtype"),
    ],
)
def test_bad_inputs(kwargs, exc, match):
    kwargs = dict(kwargs)
    packed = kwargs.pop("packed", False)
    shape = (4, 2, 8) if packed else (1, 4, 2, 8)
    q = kwargs.pop("q", torch.randn(shape))
    k = kwargs.pop("k", torch.randn(q.shape if q.dtype == torch.float32 else shape))
    v = kwargs.pop("v", torch.randn(shape))
    with pytest.raises(exc, match=match):
        bk.attention(q, k, v, **kwargs)


@pytest.mark.skipif("cpu" not in bk.available_backends("attention"), reason="extension not built")
def test_unsupported_head_dim_and_cpp_checks():
    q = torch.randn(1, 4, 2, 24)
    with pytest.raises(ValueError, match="head dims"):
        bk.attention(q, q, q, backend="cpu")
    op = torch.ops.baichuan.attention_fwd
    x = torch.randn(4, 2, 24)
    with pytest.raises(RuntimeError, match="head dim Dh"):
        op(x, x, x, _cu(0, 4), None, 0.2, True, 4)
    x = torch.randn(4, 2, 16)
    with pytest.raises(RuntimeError, match="alibi_slopes must have shape"):
        op(x, x, x, _cu(0, 4), torch.ones(3), 0.2, True, 4)
    with pytest.raises(RuntimeError, match="cu_seqlens must end at total_T"):
        op(x, x, x, _cu(0, 3), None, 0.2, True, 4)
    with pytest.raises(RuntimeError, match="cu_seqlens must be non-decreasing"):
        op(x, x, x, _cu(0, 3, 2, 4), None, 0.2, True, 4)
    with pytest.raises(RuntimeError, match="k must have the shape of q"):
        op(x, torch.randn(4, 1, 16), x, _cu(0, 4), None, 0.2, True, 4)


def _opcheck_ops():
    ops = []
    if "cpu" in bk.available_backends("attention"):
        ops.append(("cpu", torch.ops.baichuan))
    if "triton" in bk.available_backends("attention"):
        ops.append(("triton", torch.ops.baichuan_triton))
    return [pytest.param(ns, id=name) for name, ns in ops]


@pytest.mark.parametrize("namespace", _opcheck_ops())
def test_opcheck(namespace):
    q, k, v = (make_tensor((11, 2, 16), torch.float32, seed=40 + i, requires_grad=True) for i in range(3))
    cu = _cu(0, 4, 11)
    slopes = alibi_slopes_ref(2)
    args = (q, k, v, cu, slopes, 0.25, True, 7)
    torch.library.opcheck(namespace.attention_fwd.default, args)
    out, lse = namespace.attention_fwd(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    do = make_tensor((11, 2, 16), torch.float32, seed=44)
    torch.library.opcheck(namespace.attention_bwd.default,
                          (do, q.detach(), k.detach(), v.detach(), out, lse, cu, slopes, 0.25, True, 7, True))


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in bk.available_backends("attention")])
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    slopes = alibi_slopes_ref(2)

    def block(q, k, v):
        return (bk.attention(q, k, v, alibi_slopes=slopes, backend=backend) * 2).sum()

    q, k, v = (make_tensor((1, 12, 2, 16), torch.float32, seed=50 + i, requires_grad=True) for i in range(3))
    eager = block(q, k, v)
    eager_grads = torch.autograd.grad(eager, (q, k, v))
    compiled = torch.compile(block, fullgraph=True)
    got = compiled(q, k, v)
    got_grads = torch.autograd.grad(got, (q, k, v))
    torch.testing.assert_close(got, eager)
    for a, b in zip(got_grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
def test_matches_xformers_with_materialised_alibi_bias():
    pytest.importorskip("xformers.ops")
    B, T, H, Dh = 2, 300, 8, 128
    q, k, v = (make_tensor((B, T, H, Dh), torch.bfloat16, "cuda", seed=80 + i) for i in range(3))
    slopes = alibi_slopes_ref(H).cuda()
    ours = bk.attention(q, k, v, alibi_slopes=slopes)
    theirs = attention_ops.attention_xformers(q, k, v, alibi_slopes=slopes)
    exact = bk.attention(q.double(), k.double(), v.double(), alibi_slopes=slopes.double())
    assert_within_reference_error(ours, theirs, exact, name="ours vs xformers (bf16)")


def test_slopes_needing_grad_use_the_reference():
    q = make_tensor((1, 6, 2, 16), torch.float32, seed=90, requires_grad=True)
    slopes = alibi_slopes_ref(2).requires_grad_()
    out = bk.attention(q, q, q, alibi_slopes=slopes)  # auto: the reference (slopes get a gradient)
    out.sum().backward()
    assert slopes.grad is not None
    if "cpu" in bk.available_backends("attention"):
        with pytest.raises(ValueError, match="alibi_slopes"):
            bk.attention(q, q, q, alibi_slopes=slopes, backend="cpu")

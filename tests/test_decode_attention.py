"""decode_attention: every kernel backend vs a float64 run of the reference; vs full causal attention
over the same prefix; ragged and empty caches; garbage past the valid rows is never read."""

import pytest
import torch

import baichuan_kernels as bk
from baichuan_kernels.reference.alibi import alibi_slopes_ref
from baichuan_kernels.reference.decode_attention import decode_attention_ref
from baichuan_kernels.testing import DTYPES, assert_within_reference_error, make_tensor, poisoned_outputs
from _backends import kernel_backends

# The CUDA kernel (Dh 64/128) has its own tests: tests/test_attention_cuda.py.
BACKENDS = kernel_backends("decode_attention", exclude=("cuda",))

# (B, S_max, H, Dh, lengths)
SHAPES = {
    "ragged": (4, 70, 3, 64, (0, 1, 33, 70)),
    "H40": (2, 12, 40, 16, (12, 5)),
    "Dh128": (2, 40, 2, 128, (40, 17)),
}


def _inputs(B, S, H, Dh, lengths, dtype, device, seed=0):
    q = make_tensor((B, 1, H, Dh), dtype, device, seed=seed)
    kc = make_tensor((B, S, H, Dh), dtype, device, seed=seed + 1)
    vc = make_tensor((B, S, H, Dh), dtype, device, seed=seed + 2)
    lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    # rows past each length hold garbage the kernels must never read
    pos = torch.arange(S, device=device)[None, :, None, None]
    beyond = pos >= lens.long()[:, None, None, None]
    kc = kc.masked_fill(beyond, float("nan"))
    vc = vc.masked_fill(beyond, float("nan"))
    return q, kc, vc, lens


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alibi", [True, False], ids=["alibi", "plain"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_float64_reference(device, backend, dtype, alibi, shape):
    B, S, H, Dh, lengths = SHAPES[shape]
    q, kc, vc, lens = _inputs(B, S, H, Dh, lengths, dtype, device)
    slopes = alibi_slopes_ref(H).to(device) if alibi else None
    with poisoned_outputs():
        got = bk.decode_attention(q, kc, vc, lens, alibi_slopes=slopes, backend=backend)
    same = decode_attention_ref(q, kc, vc, lens, alibi_slopes=slopes)
    exact = decode_attention_ref(q.double(), kc.double(), vc.double(), lens,
                                 alibi_slopes=slopes.double() if alibi else None)
    assert got.shape == (B, 1, H, Dh) and got.dtype == dtype
    assert_within_reference_error(got, same, exact, name=f"{backend} {dtype} {shape}")
    if 0 in lengths:
        assert torch.all(got[lengths.index(0)] == 0)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_equals_last_row_of_full_attention(device, backend):
    H, Dh, T = 2, 32, 23
    slopes = alibi_slopes_ref(8)[3:5].to(device)  # a slice of the slopes (tensor parallelism)
    q, k, v = (make_tensor((1, T, H, Dh), torch.float32, device, seed=60 + i) for i in range(3))
    full = bk.attention(q, k, v, causal=True, alibi_slopes=slopes, backend="reference")  # [1, T, H, Dh]
    S_max = 32
    kc = torch.zeros(1, S_max, H, Dh, device=device)
    vc = torch.zeros(1, S_max, H, Dh, device=device)
    kc[:, :T], vc[:, :T] = k, v
    for L in (1, 9, T):
        lens = torch.tensor([L], dtype=torch.int32, device=device)
        got = bk.decode_attention(q[:, L - 1: L], kc, vc, lens, alibi_slopes=slopes, backend=backend)
        torch.testing.assert_close(got, full[:, L - 1: L], rtol=1e-5, atol=1e-5)


def test_requires_grad_uses_the_reference():
    q = make_tensor((1, 1, 2, 16), torch.float32, seed=1, requires_grad=True)
    kc = make_tensor((1, 4, 2, 16), torch.float32, seed=2)
    lens = torch.tensor([3], dtype=torch.int32)
    out = bk.decode_attention(q, kc, kc, lens)
    out.sum().backward()
    assert q.grad is not None
    if "cpu" in bk.available_backends("decode_attention"):
        with pytest.raises(ValueError, match="no backward"):
            bk.decode_attention(q, kc, kc, lens, backend="cpu")


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(q=torch.randn(2, 2, 2, 16)), ValueError, "one new token"),
        (dict(k_cache=torch.randn(2, 8, 3, 16)), ValueError, "k_cache must have shape"),
        (dict(v_cache=torch.randn(2, 7, 2, 16)), ValueError, "v_cache must have shape"),
        (dict(cache_seqlens=torch.tensor([1, 9], dtype=torch.int32)), ValueError, "cache_seqlens must lie in"),
        (dict(cache_seqlens=torch.tensor([1, 2])), TypeError, "cache_seqlens must have dtype"),
        (dict(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes must have shape"),
    ],
)
def test_bad_inputs(change, exc, match):
    args = dict(q=torch.randn(2, 1, 2, 16), k_cache=torch.randn(2, 8, 2, 16), v_cache=torch.randn(2, 8, 2, 16),
                cache_seqlens=torch.tensor([1, 8], dtype=torch.int32), alibi_slopes=None)
    args.update(change)
    with pytest.raises(exc, match=match):
        bk.decode_attention(args["q"], args["k_cache"], args["v_cache"], args["cache_seqlens"],
                            alibi_slopes=args["alibi_slopes"])


@pytest.mark.skipif("cpu" not in bk.available_backends("decode_attention"), reason="extension not built")
def test_unsupported_head_dim_and_cpp_checks():
    q = torch.randn(1, 1, 2, 24)
    kc = torch.randn(1, 4, 2, 24)
    lens = torch.tensor([4], dtype=torch.int32)
    with pytest.raises(ValueError, match="head dims"):
        bk.decode_attention(q, kc, kc, lens, backend="cpu")
    op = torch.ops.baichuan.decode_attention_fwd
    with pytest.raises(RuntimeError, match="head dim Dh"):
        op(q[:, 0], kc, kc, lens, None, 0.2)
    q, kc = torch.randn(1, 2, 16), torch.randn(1, 4, 2, 16)
    with pytest.raises(RuntimeError, match="cache_seqlens must lie in"):
        op(q, kc, kc, torch.tensor([5], dtype=torch.int32), None, 0.2)
    with pytest.raises(RuntimeError, match="alibi_slopes must have shape"):
        op(q, kc, kc, lens, torch.ones(3), 0.2)


def _opcheck_ops():
    ops = []
    if "cpu" in bk.available_backends("decode_attention"):
        ops.append(("cpu", torch.ops.baichuan))
    if "triton" in bk.available_backends("decode_attention"):
        ops.append(("triton", torch.ops.baichuan_triton))
    return [pytest.param(ns, id=name) for name, ns in ops]


@pytest.mark.parametrize("namespace", _opcheck_ops())
def test_opcheck(namespace):
    q = make_tensor((2, 2, 16), torch.float32, seed=70)
    kc = make_tensor((2, 20, 2, 16), torch.float32, seed=71)
    vc = make_tensor((2, 20, 2, 16), torch.float32, seed=72)
    lens = torch.tensor([20, 3], dtype=torch.int32)
    torch.library.opcheck(namespace.decode_attention_fwd.default, (q, kc, vc, lens, alibi_slopes_ref(2), 0.25))

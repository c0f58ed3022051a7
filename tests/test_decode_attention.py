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


# ------------------------------------------------------------------------------------ split-K paths
from baichuan_kernels.ops.decode_attention import SPLIT_ALIGN, decode_split_plan  # noqa: E402

# Dh 64: every backend, CUDA included. (B, S_max, H, Dh, lengths): long enough that the CPU kernel
# (>= 128 keys a split) and the Triton interpreter (16-key blocks) both cut the cache into several
# splits, with splits past a short length (0, 1) and one ending inside a split (257, 300).
SPLIT_SHAPES = {
    "B1": (1, 600, 2, 64, (600,)),
    "ragged": (4, 600, 2, 64, (0, 1, 257, 600)),
}


@pytest.mark.parametrize("device,backend", kernel_backends("decode_attention"))
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alibi", [True, False], ids=["alibi", "plain"])
@pytest.mark.parametrize("shape", list(SPLIT_SHAPES))
def test_split_k_matches_float64_reference(device, backend, threads, dtype, alibi, shape):
    B, S, H, Dh, lengths = SPLIT_SHAPES[shape]
    q, kc, vc, lens = _inputs(B, S, H, Dh, lengths, dtype, device, seed=5)
    slopes = alibi_slopes_ref(H).to(device) if alibi else None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the CPU kernel's split count follows the thread count
    try:
        with poisoned_outputs():
            got = bk.decode_attention(q, kc, vc, lens, alibi_slopes=slopes, backend=backend)
    finally:
        torch.set_num_threads(before)
    same = decode_attention_ref(q, kc, vc, lens, alibi_slopes=slopes)
    exact = decode_attention_ref(q.double(), kc.double(), vc.double(), lens,
                                 alibi_slopes=slopes.double() if alibi else None)
    assert_within_reference_error(got, same, exact, name=f"{backend} {dtype} {shape} threads={threads}")
    if 0 in lengths:
        assert torch.all(got[lengths.index(0)] == 0)


@pytest.mark.parametrize("B", [1, 2, 4, 16, 32, 64])
@pytest.mark.parametrize("H", [32, 40])
@pytest.mark.parametrize("S_max", [1, 63, 64, 65, 512, 2048, 8192, 100_000])
@pytest.mark.parametrize("sms", [1, 108, 132])
def test_split_plan(B, H, S_max, sms):
    splits, split_len = decode_split_plan(B, H, S_max, sms)
    assert split_len % SPLIT_ALIGN == 0 and 1 <= splits <= 128
    assert (splits - 1) * split_len < S_max <= splits * split_len  # covers the cache, no empty tail split
    # at least half the wanted programs (split_len rounds up to SPLIT_ALIGN), fewer only for short caches
    assert 2 * splits >= min(-(-4 * sms // (B * H)), -(-S_max // SPLIT_ALIGN), 128)
    if B * H >= 4 * sms:
        assert splits == 1


def test_split_plan_fills_the_gpu_at_batch_1():
    splits, split_len = decode_split_plan(1, 40, 8192, 132)
    assert 3 * 132 <= 40 * splits <= 8 * 132 and split_len >= 128


def test_out_of_range_lengths_give_nan_rows_in_reference():
    """GPU lengths are not checked on the host (no sync): every backend gives a NaN row instead."""
    q, kc, vc, _ = _inputs(3, 8, 2, 16, (8, 8, 8), torch.float32, "cpu")
    lens = torch.tensor([-1, 5, 9], dtype=torch.int32)
    out = decode_attention_ref(q, kc, vc, lens)
    assert out[0].isnan().all() and out[2].isnan().all() and out[1].isfinite().all()
    with pytest.raises(ValueError, match="cache_seqlens must lie in"):  # CPU tensors: checked
        bk.decode_attention(q, kc, vc, lens)


@pytest.mark.skipif("triton" not in bk.available_backends("decode_attention"), reason="triton not usable")
def test_out_of_range_lengths_give_nan_rows_in_triton_op():
    q, kc, vc, _ = _inputs(3, 40, 2, 16, (40, 40, 40), torch.float32, "cpu", seed=9)
    lens = torch.tensor([-1, 17, 41], dtype=torch.int32)
    out = torch.ops.baichuan_triton.decode_attention_fwd(q[:, 0], kc, vc, lens, None, 0.25)
    assert out[0].isnan().all() and out[2].isnan().all()
    ref = decode_attention_ref(q, kc, vc, lens, softmax_scale=0.25)[:, 0]
    torch.testing.assert_close(out[1], ref[1], rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", [b for b in ("cuda", "triton") if b in bk.available_backends("decode_attention")])
def test_gpu_out_of_range_lengths_give_nan_rows_without_sync(backend):
    q, kc, vc, _ = _inputs(3, 300, 2, 64, (300, 300, 300), torch.bfloat16, "cuda", seed=11)
    lens = torch.tensor([-1, 200, 301], dtype=torch.int32, device="cuda")
    out = bk.decode_attention(q, kc, vc, lens, backend=backend)
    assert out[0].isnan().all() and out[2].isnan().all() and out[1].isfinite().all()

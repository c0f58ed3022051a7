"""ALiBi at long context (T = 8192, 16384) with Baichuan2-13B's 40 slopes and Dh = 128.

The bias must be the fp32 relative form ``slope_h · (j - i)``: an absolute form (``slope_h · j`` minus
a row constant, in fp32) loses ~ulp(0.84 · 16384) ≈ 1e-3 per score at these lengths, ~1000x the fp32
reference's error, so fp32 inputs make the 2x rule sharp here; bf16 is checked too.

CPU cost: the C++ kernels only (the Triton interpreter is far too slow at these sizes), batch 1;
decode_attention gives the last query row of a 16384-long sequence cheaply, dense attention is
checked on its last rows against the reference evaluated row by row (decode_attention_ref of row i
over keys 0..i is row i of causal attention_ref, without the [H, T, T] score matrix).
"""

import pytest
import torch

import baichuan_kernels as bk
from baichuan_kernels.reference.decode_attention import decode_attention_ref
from baichuan_kernels.testing import assert_within_reference_error, make_tensor
from _backends import kernel_backends
from _numerics import run

H, DH = 40, 128


def _long_context_backends(op):
    return [p for p in kernel_backends(op) if p.values != ("cpu", "triton")]


def _decode_ref(q, k, v, lens, slopes, dtype, heads_per_call=8):
    """decode_attention_ref in ``dtype``, a few heads at a time (float64 copies of a 16384-long
    cache for all 40 heads would take ~2.7 GB)."""
    outs = []
    for h0 in range(0, q.shape[2], heads_per_call):
        hs = slice(h0, h0 + heads_per_call)
        outs.append(decode_attention_ref(q[:, :, hs].to(dtype), k[:, :, hs].to(dtype), v[:, :, hs].to(dtype), lens,
                                         alibi_slopes=slopes[hs]))
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("device,backend", _long_context_backends("decode_attention"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("L", [8192, 16384])
def test_decode_attention_alibi_long_context(device, backend, dtype, L):
    slopes = bk.alibi_slopes(H)
    q = make_tensor((1, 1, H, DH), dtype, seed=1)
    k = make_tensor((1, L, H, DH), dtype, seed=2)
    v = make_tensor((1, L, H, DH), dtype, seed=3)
    lens = torch.tensor([L], dtype=torch.int32)
    got = run(device, bk.decode_attention, q.to(device), k.to(device), v.to(device), lens.to(device),
              alibi_slopes=slopes.to(device), backend=backend)
    same = _decode_ref(q, k, v, lens, slopes, dtype)
    exact = _decode_ref(q, k, v, lens, slopes, torch.float64)
    assert_within_reference_error(got.cpu(), same, exact, name=f"{backend} decode_attention L={L} {dtype}")


def _dense_check(device, backend, T, slopes, dtype, rows):
    """Causal ALiBi attention over T tokens; rows ``rows`` checked against the row-wise reference."""
    nh = slopes.numel()
    q, k, v = (make_tensor((1, T, nh, DH), dtype, seed=10 + i) for i in range(3))
    got = run(device, bk.attention, q.to(device), k.to(device), v.to(device), alibi_slopes=slopes.to(device),
              backend=backend).cpu()
    assert got.isfinite().all()
    for i in rows:
        lens = torch.tensor([i + 1], dtype=torch.int32)
        qi, ki, vi = q[:, i:i + 1], k[:, : i + 1], v[:, : i + 1]
        same = _decode_ref(qi, ki, vi, lens, slopes, dtype)
        exact = _decode_ref(qi, ki, vi, lens, slopes, torch.float64)
        assert_within_reference_error(got[:, i:i + 1], same, exact, name=f"{backend} attention T={T} row {i}")


# Rows checked: the last ones (the longest reach) and a few earlier.
def _rows(T):
    return [0, 1, T // 2 + 3] + list(range(T - 12, T))


# 8 of the 40 13B slopes, the largest (head 32) and smallest (head 39) included: heads are
# independent in every kernel, so a slope subset checks the same arithmetic at 1/5 of the cost.
HEAD_SUBSET = [0, 7, 15, 31, 32, 35, 38, 39]


@pytest.mark.parametrize("device,backend", _long_context_backends("attention"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_alibi_8192(device, backend, dtype):
    slopes = bk.alibi_slopes(H)[HEAD_SUBSET]
    _dense_check(device, backend, 8192, slopes, dtype, _rows(8192))


@pytest.mark.slow
@pytest.mark.parametrize("device,backend", _long_context_backends("attention"))
def test_attention_alibi_16384_all_heads(device, backend):
    _dense_check(device, backend, 16384, bk.alibi_slopes(H), torch.float32, _rows(16384))


def test_absolute_form_bias_would_fail_the_bound():
    """The checks above can fail: the absolute form ``slope·j - slope·(L-1)`` in fp32 at L = 16384 is
    ~1000x further from float64 than the reference's relative form (the bound allows 2x)."""
    L, heads = 16384, HEAD_SUBSET[:4] + [32]
    slopes = bk.alibi_slopes(H)[heads]
    q = make_tensor((1, 1, len(heads), DH), seed=20)
    k = make_tensor((1, L, len(heads), DH), seed=21)
    v = make_tensor((1, L, len(heads), DH), seed=22)
    lens = torch.tensor([L], dtype=torch.int32)
    exact = decode_attention_ref(q.double(), k.double(), v.double(), lens, alibi_slopes=slopes)
    same = decode_attention_ref(q, k, v, lens, alibi_slopes=slopes)
    s = torch.einsum("hd,jhd->hj", q[0, 0], k[0]) * DH ** -0.5  # fp32 [h, L]
    s = s + slopes[:, None] * torch.arange(L, dtype=torch.float32) - slopes[:, None] * float(L - 1)
    absolute = torch.einsum("hj,jhd->hd", torch.softmax(s, -1), v[0])[None, None]
    with pytest.raises(AssertionError, match="exceeds"):
        assert_within_reference_error(absolute, same, exact, factor=100.0)

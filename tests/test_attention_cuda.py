"""CUDA attention kernels (csrc/cuda/attention.cu, decode_attention.cu) called directly through
torch.ops.baichuan.*, vs a float64 run of the reference (2x rule of baichuan_kernels.testing).

GPU only (every test is marked ``cuda``); on CPU machines the kernels are only compiled
(tests/test_cuda_compile.py). The op wiring (backend selection, autograd) is tested in test_attention.py.
"""

import pytest
import torch

from baichuan_kernels.reference.alibi import alibi_slopes_ref
from baichuan_kernels.reference.attention import attention_ref
from baichuan_kernels.reference.decode_attention import decode_attention_ref
from baichuan_kernels.testing import assert_within_reference_error, make_tensor, poisoned_outputs

pytestmark = pytest.mark.cuda

DEV = "cuda"
HALF_DTYPES = (torch.bfloat16, torch.float16)
LENGTHS = (1, 17, 300, 1000)  # ragged packed sequences: 1318 rows in all


def _slopes(H):
    return alibi_slopes_ref(H).to(device=DEV, dtype=torch.float32)  # fp32 [H]


def _cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=DEV)


def _packed(lengths, H, Dh, dtype, seed):
    total = sum(lengths)
    q = make_tensor((total, H, Dh), dtype, DEV, seed=seed, scale=1.5)
    k = make_tensor((total, H, Dh), dtype, DEV, seed=seed + 1)
    v = make_tensor((total, H, Dh), dtype, DEV, seed=seed + 2)
    return q, k, v


def _lse64(q, k, cu, causal, slopes, scale):
    """float64 logsumexp of the scaled + biased (+ masked) scores: [H, total_T]."""
    out = []
    b = cu.tolist()
    for s, e in zip(b[:-1], b[1:]):
        if e == s:
            continue
        qs, ks = q[s:e].double().transpose(0, 1), k[s:e].double().transpose(0, 1)  # [H, T, Dh]
        sc = qs @ ks.transpose(-1, -2) * scale  # [H, T, T]
        pos = torch.arange(e - s, device=q.device)
        rel = (pos[None, :] - pos[:, None]).double()
        if slopes is not None:
            sc = sc + slopes.double()[:, None, None] * rel
        if causal:
            sc = sc.masked_fill(rel > 0, float("-inf"))
        out.append(torch.logsumexp(sc, dim=-1))
    return torch.cat(out, dim=1)


def _check_fwd(lengths, H, Dh, dtype, causal, alibi, seed=0, scale=None):
    q, k, v = _packed(lengths, H, Dh, dtype, seed)
    cu = _cu(lengths)
    slopes = _slopes(H) if alibi else None
    scale = Dh**-0.5 if scale is None else scale
    with poisoned_outputs():
        out, lse = torch.ops.baichuan.attention_fwd(q, k, v, cu, slopes, scale, causal, max(lengths))
    kw = dict(causal=causal, alibi_slopes=slopes, softmax_scale=scale, cu_seqlens=cu)
    same = attention_ref(q, k, v, **kw)
    exact = attention_ref(q.double(), k.double(), v.double(), **kw)
    assert out.shape == q.shape and out.dtype == dtype
    assert_within_reference_error(out, same, exact, name=f"attention_fwd {dtype} out")
    assert lse.shape == (H, q.shape[0]) and lse.dtype == torch.float32
    lse64 = _lse64(q, k, cu, causal, slopes, scale)
    err = ((lse.double() - lse64).abs() / (1 + lse64.abs())).max().item()
    assert err <= 2e-5, f"lse relative error {err:.2e}"


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("H,Dh", [(32, 64), (32, 128), (40, 64), (40, 128)])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("alibi", [True, False], ids=["alibi", "noalibi"])
def test_fwd_varlen_matches_float64_reference(dtype, H, Dh, causal, alibi):
    _check_fwd(LENGTHS, H, Dh, dtype, causal, alibi)


@pytest.mark.parametrize("lengths", [(1,), (128,), (129, 0, 64), (0, 255, 3), (513, 511)], ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_fwd_block_edges_and_empty_sequences(lengths, causal):
    # Lengths at and around the 128-row / 64-key block edges, and zero-length sequences in cu_seqlens.
    _check_fwd(lengths, 4, 128, torch.bfloat16, causal, alibi=True, seed=3)


def test_fwd_custom_scale_and_large_scores():
    _check_fwd((77, 300), 8, 64, torch.float16, True, True, seed=5, scale=0.3)


def test_fwd_is_deterministic():
    q, k, v = _packed((300, 45), 8, 128, torch.bfloat16, seed=7)
    cu = _cu((300, 45))
    slopes = _slopes(8)
    a = torch.ops.baichuan.attention_fwd(q, k, v, cu, slopes, 0.1, True, 300)
    b = torch.ops.baichuan.attention_fwd(q, k, v, cu, slopes, 0.1, True, 300)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_fwd_bad_inputs():
    q, k, v = _packed((5,), 2, 32, torch.bfloat16, seed=1)
    with pytest.raises(RuntimeError, match="head dim"):
        torch.ops.baichuan.attention_fwd(q, k, v, _cu((5,)), None, 0.1, True, 5)
    q, k, v = _packed((5,), 2, 64, torch.float32, seed=1)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        torch.ops.baichuan.attention_fwd(q, k, v, _cu((5,)), None, 0.1, True, 5)
    q, k, v = _packed((5,), 2, 64, torch.bfloat16, seed=1)
    with pytest.raises(RuntimeError, match="alibi_slopes"):
        torch.ops.baichuan.attention_fwd(q, k, v, _cu((5,)), _slopes(3), 0.1, True, 5)


# ------------------------------------------------------------------------------------------------
# Decode.


def _check_decode(seqlens, S_max, H, Dh, dtype, alibi, seed=0, scale=None):
    B = len(seqlens)
    q = make_tensor((B, H, Dh), dtype, DEV, seed=seed, scale=1.5)
    kc = make_tensor((B, S_max, H, Dh), dtype, DEV, seed=seed + 1)
    vc = make_tensor((B, S_max, H, Dh), dtype, DEV, seed=seed + 2)
    for b, L in enumerate(seqlens):  # rows past the valid prefix must never be read
        kc[b, L:] = float("nan")
        vc[b, L:] = float("nan")
    L = torch.tensor(seqlens, dtype=torch.int32, device=DEV)
    slopes = _slopes(H) if alibi else None
    scale = Dh**-0.5 if scale is None else scale
    with poisoned_outputs():
        out = torch.ops.baichuan.decode_attention_fwd(q, kc, vc, L, slopes, scale)
    assert out.shape == q.shape and out.dtype == dtype
    kw = dict(alibi_slopes=slopes, softmax_scale=scale)
    same = decode_attention_ref(q[:, None], kc, vc, L, **kw)[:, 0]
    exact = decode_attention_ref(q[:, None].double(), kc.double(), vc.double(), L, **kw)[:, 0]
    assert_within_reference_error(out, same, exact, name=f"decode_attention_fwd {dtype}")
    for b, n in enumerate(seqlens):
        if n == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))


@pytest.mark.parametrize("dtype", (torch.float32,) + HALF_DTYPES, ids=str)
@pytest.mark.parametrize("H,Dh", [(32, 64), (32, 128), (40, 64), (40, 128)])
@pytest.mark.parametrize("alibi", [True, False], ids=["alibi", "noalibi"])
def test_decode_split_k_matches_float64_reference(dtype, H, Dh, alibi):
    # Few (b, h) pairs -> several splits per sequence, then the combine kernel.
    _check_decode((1, 300, 1000, 0, 17), 1000, H, Dh, dtype, alibi)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_decode_one_split_per_sequence(dtype):
    # Many (b, h) pairs -> one split each, written directly (no combine kernel).
    _check_decode((1, 513, 0, 64, 200, 7, 511, 512, 3, 100, 2, 400, 65, 63, 9, 128), 513, 40, 128, dtype, True, seed=4)


def test_decode_matches_last_row_of_causal_attention():
    # The newest token against its own prefix = the last row of causal attention over the prefix.
    T, H, Dh = 333, 8, 128
    q, k, v = _packed((T,), H, Dh, torch.bfloat16, seed=9)
    slopes = _slopes(H)
    full, _ = torch.ops.baichuan.attention_fwd(q, k, v, _cu((T,)), slopes, Dh**-0.5, True, T)
    dec = torch.ops.baichuan.decode_attention_fwd(
        q[-1:].contiguous(), k[None].contiguous(), v[None].contiguous(),
        torch.tensor([T], dtype=torch.int32, device=DEV), slopes, Dh**-0.5)
    torch.testing.assert_close(dec[0].float(), full[-1].float(), atol=2e-2, rtol=2e-2)


def test_decode_bad_inputs():
    q = make_tensor((2, 4, 96), torch.bfloat16, DEV, seed=1)
    kc = make_tensor((2, 8, 4, 96), torch.bfloat16, DEV, seed=2)
    L = torch.tensor([3, 8], dtype=torch.int32, device=DEV)
    with pytest.raises(RuntimeError, match="head dim"):
        torch.ops.baichuan.decode_attention_fwd(q, kc, kc, L, None, 0.1)
    q = make_tensor((2, 4, 64), torch.bfloat16, DEV, seed=1)
    kc = make_tensor((2, 8, 4, 64), torch.bfloat16, DEV, seed=2)
    with pytest.raises(RuntimeError, match="cache_seqlens"):
        torch.ops.baichuan.decode_attention_fwd(q, kc, kc, L.long(), None, 0.1)

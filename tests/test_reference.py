"""The pure-PyTorch references (the spec) against independent formulas written out here, plus the
public functions' reference backend and their input checks.

Each expected value is computed a different way than the reference computes it (complex numbers
for RoPE, materialised bias + ``torch.softmax`` for attention, ``F.cross_entropy`` for the loss,
``torch._weight_int8pack_mm`` for int8 matmul, ...), in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import baichuan_kernels as bk
from baichuan_kernels.reference.alibi import alibi_slopes_ref
from baichuan_kernels.reference.attention import attention_ref
from baichuan_kernels.reference.decode_attention import decode_attention_ref
from baichuan_kernels.reference.linear_cross_entropy import linear_cross_entropy_ref
from baichuan_kernels.reference.norm_head import norm_head_weight_ref
from baichuan_kernels.reference.quant_matmul import (
    QuantizedWeight,
    _pack_nibbles,
    _unpack_nibbles,
    dequantize_weight_ref,
    quant_matmul_ref,
    quantize_weight_ref,
)
from baichuan_kernels.reference.rope import apply_rope_ref, rope_cos_sin_ref
from baichuan_kernels.reference.split_qkv_rope import split_qkv_rope_ref
from baichuan_kernels.reference.swiglu import swiglu_ref
from baichuan_kernels.testing import make_tensor

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# SwiGLU
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(17,), (3, 5, 123), (2, 11008)])
def test_swiglu_matches_formula(shape, dtype):
    gate = make_tensor(shape, dtype, seed=1, scale=3.0)
    up = make_tensor(shape, dtype, seed=2)
    g, u = gate.double(), up.double()
    expected = g / (1.0 + torch.exp(-g)) * u
    out = swiglu_ref(gate, up)
    assert out.dtype == dtype and out.shape == gate.shape
    # computed in fp32 and rounded once: within half an ulp of the output dtype (+ fp32 noise)
    rel = {F64: 1e-15, torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=rel, atol=1e-6 if dtype != F64 else 1e-15)
    torch.testing.assert_close(bk.swiglu(gate, up, backend="reference"), out, rtol=0, atol=0)


def test_swiglu_gradcheck():
    gate = make_tensor((3, 7), F64, seed=3, requires_grad=True)
    up = make_tensor((3, 7), F64, seed=4, requires_grad=True)
    assert torch.autograd.gradcheck(lambda g, u: bk.swiglu(g, u, backend="reference"), (gate, up))


# ----------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------


def _angles64(positions: torch.Tensor, Dh: int, base: float = 10000.0) -> torch.Tensor:
    """theta[..., i] = p · base^(-2i/Dh), i < Dh/2, in float64."""
    i = torch.arange(Dh // 2, dtype=F64)
    return positions.to(F64)[..., None] * base ** (-2.0 * i / Dh)


def _rope_complex(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE as complex multiplication: dims (i, i + Dh/2) form x_i + j·x_{i+Dh/2}.

    x: [B, T, H, Dh] float64, positions: [B, T]."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half], x[..., half:])  # [B, T, H, Dh/2]
    theta = _angles64(positions, x.shape[-1])[:, :, None, :]  # [B, T, 1, Dh/2]
    rot = torch.exp(1j * theta.to(torch.complex128))
    w = z * rot
    return torch.cat((w.real, w.imag), dim=-1)


def _tables64(S: int, Dh: int) -> tuple[torch.Tensor, torch.Tensor]:
    theta = _angles64(torch.arange(S), Dh)  # [S, Dh/2]
    return torch.cat((theta.cos(), theta.cos()), -1), torch.cat((theta.sin(), theta.sin()), -1)


def test_rope_cos_sin_tables():
    T, Dh = 300, 128
    cos, sin = rope_cos_sin_ref(T, Dh)
    assert cos.dtype == torch.float32 and cos.shape == (T, Dh) and sin.shape == (T, Dh)
    # rotate-half layout: dims i and i + Dh/2 share a frequency
    assert torch.equal(cos[:, :64], cos[:, 64:]) and torch.equal(sin[:, :64], sin[:, 64:])
    ecos, esin = _tables64(T, Dh)
    # fp32 angles: error ≲ position · 2^-24 · a few
    torch.testing.assert_close(cos.double(), ecos, rtol=0, atol=1e-4)
    torch.testing.assert_close(sin.double(), esin, rtol=0, atol=1e-4)
    # small positions are accurate to fp32
    torch.testing.assert_close(cos[:8].double(), ecos[:8], rtol=0, atol=2e-6)
    # offset: exactly the later rows of a longer table
    c2, s2 = rope_cos_sin_ref(20, Dh, offset=280)
    assert torch.equal(c2, cos[280:]) and torch.equal(s2, sin[280:])
    pc, ps = bk.rope_cos_sin(20, Dh, offset=280, device="cpu", backend="reference")
    assert torch.equal(pc, c2) and torch.equal(ps, s2)
    # another base / head dim
    c3, _ = bk.rope_cos_sin(5, 6, base=500.0)
    th = _angles64(torch.arange(5), 6, base=500.0)
    torch.testing.assert_close(c3.double(), torch.cat((th.cos(), th.cos()), -1), rtol=0, atol=2e-6)


def _left_padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """HF generation: cumsum(mask) - 1, pads filled with 1."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


@pytest.mark.parametrize("shape", [(2, 9, 3, 128), (1, 17, 1, 6), (3, 5, 2, 2)])
@pytest.mark.parametrize("use_positions", [False, True])
def test_apply_rope_matches_complex_rotation(shape, use_positions):
    B, T, H, Dh = shape
    q = make_tensor(shape, F64, seed=10)
    k = make_tensor(shape, F64, seed=11)
    cos, sin = _tables64(64, Dh)
    if use_positions:
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, : T // 2] = 0  # left padding on the first row
        pos = _left_padded_positions(mask)
        if B > 1:
            pos[-1] = torch.arange(T) + 40  # a decode-like offset
    else:
        pos = None
    qo, ko = apply_rope_ref(q, k, cos, sin, position_ids=pos)
    positions = pos if pos is not None else torch.arange(T).expand(B, T)
    torch.testing.assert_close(qo, _rope_complex(q, positions), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(ko, _rope_complex(k, positions), rtol=1e-13, atol=1e-13)
    qp, kp = bk.apply_rope(q, k, cos, sin, position_ids=pos, backend="reference")
    assert torch.equal(qp, qo) and torch.equal(kp, ko)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_apply_rope_low_precision(dtype):
    B, T, H, Dh = 2, 33, 4, 128
    q = make_tensor((B, T, H, Dh), dtype, seed=12)
    k = make_tensor((B, T, H, Dh), dtype, seed=13)
    cos, sin = rope_cos_sin_ref(T, Dh)
    qo, ko = apply_rope_ref(q, k, cos, sin)
    assert qo.dtype == dtype and ko.dtype == dtype
    expected = _rope_complex(q.double(), torch.arange(T).expand(B, T))
    eps = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(qo.double(), expected, rtol=eps, atol=eps)


def test_apply_rope_gradcheck():
    q = make_tensor((1, 3, 2, 4), F64, seed=14, requires_grad=True)
    k = make_tensor((1, 3, 2, 4), F64, seed=15, requires_grad=True)
    cos, sin = _tables64(5, 4)
    pos = torch.tensor([[4, 0, 2]])
    fn = lambda a, b: bk.apply_rope(a, b, cos, sin, position_ids=pos, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k))


@pytest.mark.parametrize("dtype", [F64, torch.bfloat16])
def test_split_qkv_rope_is_view_then_rope(dtype):
    B, T, H, Dh = 2, 7, 3, 8
    qkv = make_tensor((B, T, 3 * H * Dh), dtype, seed=20)
    cos, sin = rope_cos_sin_ref(16, Dh)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    pos = _left_padded_positions(mask)
    q, k, v = split_qkv_rope_ref(qkv, cos, sin, num_heads=H, position_ids=pos)
    q_in = qkv[..., : H * Dh].reshape(B, T, H, Dh)
    k_in = qkv[..., H * Dh : 2 * H * Dh].reshape(B, T, H, Dh)
    v_in = qkv[..., 2 * H * Dh :].reshape(B, T, H, Dh)
    eq, ek = apply_rope_ref(q_in, k_in, cos, sin, position_ids=pos)
    assert torch.equal(q, eq) and torch.equal(k, ek) and torch.equal(v, v_in)
    assert q.is_contiguous() and v.is_contiguous() and v.data_ptr() != qkv.data_ptr()
    if dtype == F64:
        torch.testing.assert_close(q, _rope_complex(q_in, pos), rtol=1e-6, atol=1e-6)  # fp32 tables
    outs = bk.split_qkv_rope(qkv, cos, sin, num_heads=H, position_ids=pos, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(outs, (q, k, v)))


def test_split_qkv_rope_gradcheck():
    qkv = make_tensor((1, 3, 3 * 2 * 4), F64, seed=21, requires_grad=True)
    cos, sin = _tables64(3, 4)
    fn = lambda x: bk.split_qkv_rope(x, cos, sin, num_heads=2, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (qkv,))


# ----------------------------------------------------------------------------------------------
# ALiBi slopes
# ----------------------------------------------------------------------------------------------


def test_alibi_slopes_power_of_two():
    assert alibi_slopes_ref(8).tolist() == [2.0 ** -(k + 1) for k in range(8)]
    s32 = bk.alibi_slopes(32, backend="reference")
    assert s32.dtype == torch.float32 and s32.shape == (32,)
    torch.testing.assert_close(s32, torch.tensor([2.0 ** (-k / 4) for k in range(1, 33)]), rtol=0, atol=0)
    assert alibi_slopes_ref(1).tolist() == [2.0**-8]


def test_alibi_slopes_40_heads_match_spec():
    s = alibi_slopes_ref(40)
    expected = [2.0 ** (-k / 4) for k in range(1, 33)] + [2.0 ** (-(2 * m + 1) / 8) for m in range(8)]
    torch.testing.assert_close(s, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=0)
    # the decimals printed in BAICHUAN2_SPEC.md §5.1
    printed = {0: 0.840896, 1: 0.707107, 2: 0.594604, 3: 0.5, 4: 0.420448, 5: 0.353553, 6: 0.297302,
               7: 0.25, 27: 0.0078125, 31: 0.00390625, 32: 0.917004, 33: 0.771105, 34: 0.648420,
               35: 0.545254, 36: 0.458502, 37: 0.385553, 38: 0.324210, 39: 0.272627}
    for h, value in printed.items():
        assert abs(s[h].item() - value) < 1e-6, (h, s[h].item(), value)
    assert int(s.argmax()) == 32  # head 32 has the largest slope: the order is not monotone


def test_alibi_slopes_other_non_power_of_two():
    # 12 heads: the 8 slopes of 8 heads, then slopes 0, 2, 4, 6 of 16 heads
    expected = [2.0 ** -(k + 1) for k in range(8)] + [2.0 ** -(0.5 * (k + 1)) for k in (0, 2, 4, 6)]
    torch.testing.assert_close(alibi_slopes_ref(12), torch.tensor(expected, dtype=torch.float32), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


def _attention64(q, k, v, *, causal=True, slopes=None, scale=None):
    """Explicit softmax over materialised scores + ALiBi bias [H, T, T] + causal mask, float64.

    q, k, v: [B, T, H, Dh]."""
    q, k, v = q.double(), k.double(), v.double()
    B, T, H, Dh = q.shape
    scale = Dh ** -0.5 if scale is None else scale
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale  # [B, H, T, T]
    if slopes is not None:
        bias = torch.empty(H, T, T, dtype=F64)
        for h in range(H):
            for i in range(T):
                bias[h, i] = slopes[h].item() * (torch.arange(T, dtype=F64) - i)
        scores = scores + bias
    if causal:
        allowed = torch.tril(torch.ones(T, T, dtype=torch.bool))
        scores = torch.where(allowed, scores, torch.tensor(-math.inf, dtype=F64))
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("bhij,bjhd->bihd", p, v)


ATTN_SHAPES = [(1, 1, 1, 1), (2, 17, 3, 5), (3, 9, 5, 7), (1, 64, 4, 128), (2, 33, 2, 128)]


@pytest.mark.parametrize("shape", ATTN_SHAPES)
@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_explicit_softmax(shape, alibi, causal):
    B, T, H, Dh = shape
    q, k, v = (make_tensor(shape, F64, seed=30 + i) for i in range(3))
    slopes = alibi_slopes_ref(H) if alibi else None
    out = attention_ref(q, k, v, causal=causal, alibi_slopes=slopes)
    expected = _attention64(q, k, v, causal=causal, slopes=slopes)
    assert out.dtype == F64 and out.shape == q.shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    public = bk.attention(q, k, v, causal=causal, alibi_slopes=slopes, backend="reference")
    assert torch.equal(public, out)


def test_attention_softmax_scale_and_13b_heads():
    B, T, H, Dh = 1, 20, 40, 16
    q, k, v = (make_tensor((B, T, H, Dh), F64, seed=40 + i) for i in range(3))
    slopes = alibi_slopes_ref(H)
    out = attention_ref(q, k, v, alibi_slopes=slopes, softmax_scale=0.3)
    torch.testing.assert_close(out, _attention64(q, k, v, slopes=slopes, scale=0.3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_low_precision_dtypes(dtype):
    shape = (2, 31, 4, 128)
    q, k, v = (make_tensor(shape, dtype, seed=50 + i) for i in range(3))
    slopes = alibi_slopes_ref(4)
    out = attention_ref(q, k, v, alibi_slopes=slopes)
    assert out.dtype == dtype
    expected = _attention64(q, k, v, slopes=slopes)
    eps = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=eps, atol=eps)


@pytest.mark.parametrize("alibi", [False, True])
def test_attention_varlen_matches_per_sequence(alibi):
    lengths, H, Dh = (1, 17, 64), 3, 32
    total = sum(lengths)
    q, k, v = (make_tensor((total, H, Dh), F64, seed=60 + i) for i in range(3))
    cu = torch.tensor([0, 1, 18, 82], dtype=torch.int32)
    slopes = alibi_slopes_ref(H) if alibi else None
    out = attention_ref(q, k, v, alibi_slopes=slopes, cu_seqlens=cu, max_seqlen=64)
    assert out.shape == q.shape
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        expected = _attention64(q[None, a:b], k[None, a:b], v[None, a:b], slopes=slopes)[0]
        torch.testing.assert_close(out[a:b], expected, rtol=1e-12, atol=1e-12)
    public = bk.attention(q, k, v, alibi_slopes=slopes, cu_seqlens=cu, max_seqlen=64, backend="reference")
    assert torch.equal(public, out)
    # an empty sequence in the middle changes nothing
    cu_empty = torch.tensor([0, 1, 1, 18, 82], dtype=torch.int32)
    assert torch.equal(attention_ref(q, k, v, alibi_slopes=slopes, cu_seqlens=cu_empty), out)


def test_attention_gradcheck():
    q, k, v = (make_tensor((1, 4, 2, 3), F64, seed=70 + i, requires_grad=True) for i in range(3))
    slopes = alibi_slopes_ref(2)
    fn = lambda a, b, c: bk.attention(a, b, c, alibi_slopes=slopes, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))
    # packed: gradients flow through the per-sequence loop
    qp, kp, vp = (make_tensor((5, 2, 3), F64, seed=73 + i, requires_grad=True) for i in range(3))
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    fn = lambda a, b, c: bk.attention(a, b, c, alibi_slopes=slopes, cu_seqlens=cu, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (qp, kp, vp))


def test_attention_rows_without_keys_are_zero():
    from baichuan_kernels.reference.attention import _softmax_rows

    scores = torch.tensor([[0.5, -math.inf], [-math.inf, -math.inf]], dtype=F64, requires_grad=True)
    p = _softmax_rows(scores)
    assert torch.equal(p.detach(), torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64))
    p.sum().backward()
    assert torch.isfinite(scores.grad).all()


# ----------------------------------------------------------------------------------------------
# Decode attention
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_decode_attention_is_last_row_of_full_attention(alibi, dtype):
    B, S_max, H, Dh = 3, 20, 4, 128
    lengths = [1, 7, 20]
    q_seq = make_tensor((B, S_max, H, Dh), F64, seed=80)
    k_cache = make_tensor((B, S_max, H, Dh), F64, seed=81)
    v_cache = make_tensor((B, S_max, H, Dh), F64, seed=82)
    for b, L in enumerate(lengths):  # garbage beyond the valid prefix must never be read
        k_cache[b, L:] = float("nan")
        v_cache[b, L:] = float("nan")
    q = torch.stack([q_seq[b, L - 1] for b, L in enumerate(lengths)])[:, None]  # [B, 1, H, Dh]
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    slopes = alibi_slopes_ref(H) if alibi else None
    out = decode_attention_ref(q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), seqlens, alibi_slopes=slopes)
    assert out.shape == (B, 1, H, Dh) and out.dtype == dtype
    tol = 1e-12 if dtype == F64 else 1e-5
    for b, L in enumerate(lengths):
        full = _attention64(q_seq[b : b + 1, :L], k_cache[b : b + 1, :L], v_cache[b : b + 1, :L], slopes=slopes)
        torch.testing.assert_close(out[b, 0].double(), full[0, L - 1], rtol=tol, atol=tol)
    public = bk.decode_attention(
        q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), seqlens, alibi_slopes=slopes, backend="reference"
    )
    assert torch.equal(public, out)


def test_decode_attention_garbage_cache_rows_do_not_reach_gradients():
    q = make_tensor((1, 1, 2, 4), F64, seed=93, requires_grad=True)
    kc = make_tensor((1, 6, 2, 4), F64, seed=94)
    vc = make_tensor((1, 6, 2, 4), F64, seed=95)
    kc[:, 3:] = float("nan")
    vc[:, 3:] = float("nan")
    out = decode_attention_ref(q, kc, vc, torch.tensor([3], dtype=torch.int32), alibi_slopes=alibi_slopes_ref(2))
    (g,) = torch.autograd.grad(out.sum(), (q,))
    assert torch.isfinite(out).all() and torch.isfinite(g).all()


def test_decode_attention_empty_cache_gives_zeros():
    q = make_tensor((2, 1, 2, 4), F64, seed=90)
    kc = make_tensor((2, 3, 2, 4), F64, seed=91)
    vc = make_tensor((2, 3, 2, 4), F64, seed=92)
    out = bk.decode_attention(q, kc, vc, torch.tensor([0, 3], dtype=torch.int32), backend="reference")
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------
# NormHead
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16])
def test_norm_head_matches_F_normalize(dtype):
    w = make_tensor((37, 64), dtype, seed=100, scale=0.02)
    w[5] = 0  # a zero row stays zero (the eps clamp), never NaN
    out = norm_head_weight_ref(w)
    assert out.dtype == dtype
    expected = F.normalize(w.double(), p=2, dim=1, eps=1e-12)
    rel = {F64: 1e-15, torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=rel, atol=1e-7 if dtype != F64 else 1e-15)
    assert torch.equal(out[5], torch.zeros_like(out[5]))
    assert torch.equal(bk.norm_head_weight(w, backend="reference"), out)
    if dtype == torch.float32:
        assert torch.equal(out, F.normalize(w, dim=1))


def test_norm_head_gradcheck():
    w = make_tensor((4, 5), F64, seed=101, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: bk.norm_head_weight(x, backend="reference"), (w,))


# ----------------------------------------------------------------------------------------------
# Linear cross-entropy + max-z
# ----------------------------------------------------------------------------------------------


def _lce64(hidden, weight, labels, *, norm_head, z_w, ignore_index, reduction):
    """Materialised logits + F.cross_entropy + the max-z term written out, in float64."""
    h, w = hidden.double(), weight.double()
    if norm_head:
        w = F.normalize(w, dim=1)
    logits = h @ w.T  # [N, V]
    ce_rows = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")  # 0 at ignored
    kept = labels != ignore_index
    z_rows = torch.where(kept, logits.max(dim=-1).values ** 2, torch.zeros((), dtype=F64))
    if reduction == "none":
        return ce_rows + z_w * z_rows, ce_rows, z_rows
    n = int(kept.sum())
    if reduction == "mean":
        ce = F.cross_entropy(logits, labels, ignore_index=ignore_index) if n else ce_rows.sum()
        z = z_rows.sum() / max(n, 1)
    else:
        ce, z = ce_rows.sum(), z_rows.sum()
    return ce + z_w * z, ce, z


def _lce_inputs(N=13, D=16, V=37, seed=110, dtype=F64, ignore=(1, 4, 5)):
    hidden = make_tensor((N, D), dtype, seed=seed, scale=2.0)
    weight = make_tensor((V, D), dtype, seed=seed + 1, scale=0.5)
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(seed + 2))
    labels[list(ignore)] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("norm_head", [True, False])
@pytest.mark.parametrize("z_w", [0.0, 2e-4])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_linear_cross_entropy_matches_materialised(reduction, norm_head, z_w, chunk_size):
    hidden, weight, labels = _lce_inputs()
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    kw = dict(norm_head=norm_head, z_loss_weight=z_w, ignore_index=-100, reduction=reduction)
    out = linear_cross_entropy_ref(hidden, weight, labels, chunk_size=chunk_size, **kw)
    h2, w2 = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    exp = _lce64(h2, w2, labels, norm_head=norm_head, z_w=z_w, ignore_index=-100, reduction=reduction)
    for name, a, e in zip(("loss", "ce", "z"), out, exp):
        assert a.dtype == F64 and a.shape == e.shape, name
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=name)
    # gradients of a weighted combination of all three outputs, vs float64 autograd of the formula
    combine = lambda t: (t[0] * 1.3 + t[1] * 0.7 - t[2] * 0.2).sum()  # noqa: E731
    gh, gw = torch.autograd.grad(combine(out), (hidden, weight))
    eh, ew = torch.autograd.grad(combine(exp), (h2, w2))
    torch.testing.assert_close(gh, eh, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(gw, ew, rtol=1e-11, atol=1e-12)
    if z_w:  # the term actually contributes
        assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_gradcheck(reduction):
    hidden, weight, labels = _lce_inputs(N=5, D=4, V=7, seed=120, ignore=(2,))
    hidden.requires_grad_(True)
    weight.requires_grad_(True)

    def fn(h, w):
        return linear_cross_entropy_ref(h, w, labels, z_loss_weight=0.1, reduction=reduction, chunk_size=2)

    assert torch.autograd.gradcheck(fn, (hidden, weight))
    assert torch.autograd.gradcheck(
        lambda h, w: bk.linear_cross_entropy(h, w, labels, norm_head=False, z_loss_weight=0.3,
                                             reduction=reduction, backend="reference"),
        (hidden, weight),
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_all_rows_ignored(reduction):
    hidden, weight, labels = _lce_inputs(N=4, ignore=(0, 1, 2, 3))
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    loss, ce, z = bk.linear_cross_entropy(hidden, weight, labels, z_loss_weight=2e-4, reduction=reduction,
                                          backend="reference")
    for t in (loss, ce, z):
        assert torch.equal(t, torch.zeros_like(t))
    gh, gw = torch.autograd.grad((loss + ce + z).sum(), (hidden, weight))
    assert torch.equal(gh, torch.zeros_like(gh)) and torch.equal(gw, torch.zeros_like(gw))


def test_linear_cross_entropy_other_ignore_index_and_int32_labels():
    hidden, weight, labels = _lce_inputs(ignore=())
    labels[3] = 7
    out = bk.linear_cross_entropy(hidden, weight, labels.int(), ignore_index=7, backend="reference")
    exp = _lce64(hidden, weight, labels, norm_head=True, z_w=0.0, ignore_index=7, reduction="mean")
    torch.testing.assert_close(out[1], exp[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_low_precision_inputs_full_vocab(dtype):
    """V = 125,696 (Baichuan 2), chunked; results in fp32, close to float64 of the same inputs."""
    hidden, weight, labels = _lce_inputs(N=6, D=16, V=125_696, seed=130, dtype=dtype, ignore=(2,))
    weight.requires_grad_(True)
    loss, ce, z = linear_cross_entropy_ref(hidden, weight, labels, z_loss_weight=2e-4, chunk_size=4)
    assert loss.dtype == torch.float32
    exp = _lce64(hidden, weight, labels, norm_head=True, z_w=2e-4, ignore_index=-100, reduction="mean")
    torch.testing.assert_close(loss.double(), exp[0].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z.double(), exp[2].detach(), rtol=1e-5, atol=1e-6)
    (gw,) = torch.autograd.grad(loss, (weight,))
    assert gw.dtype == dtype and torch.isfinite(gw.float()).all()
    public = bk.linear_cross_entropy(hidden, weight.detach(), labels, z_loss_weight=2e-4, backend="reference")
    torch.testing.assert_close(public[0], loss.detach(), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 64), (1, 5), (16, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
def test_int8_round_trip(shape, dtype):
    w = make_tensor(shape, dtype, seed=140, scale=0.05)
    w[0, :] = 0  # an all-zero row
    qw = quantize_weight_ref(w, bits=8)
    N, K = shape
    assert qw.data.dtype == torch.int8 and qw.data.shape == (N, K) and qw.zeros is None
    assert qw.scales.dtype == torch.float32 and qw.scales.shape == (N,)
    assert qw.bits == 8 and qw.group_size == K and qw.shape == (N, K)
    torch.testing.assert_close(qw.scales.double(), w.double().abs().amax(1) / 127, rtol=1e-6, atol=0)
    assert int(qw.data.abs().max()) <= 127
    deq = dequantize_weight_ref(qw)
    assert deq.dtype == torch.float32 and deq.shape == (N, K)
    err = (deq.double() - w.double()).abs()
    bound = qw.scales.double()[:, None] / 2 * (1 + 1e-5) + 1e-12
    assert (err <= bound).all()
    assert torch.equal(deq[0], torch.zeros(K))


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("N", [1, 7])
def test_int4_round_trip_error_within_half_scale(group_size, N):
    K = 256
    w = make_tensor((N, K), torch.float32, seed=150, scale=0.02, offset=0.01)
    w[0, :group_size] = 0.25  # a constant group: exact
    w[-1, -group_size:] = w[-1, -group_size:].abs() + 1.0  # a group that does not straddle 0
    qw = quantize_weight_ref(w, bits=4, group_size=group_size)
    G = K // group_size
    assert qw.data.dtype == torch.uint8 and qw.data.shape == (N, K // 2)
    assert qw.scales.shape == (N, G) and qw.zeros.shape == (N, G) and qw.zeros.dtype == torch.float32
    wg = w.double().view(N, G, group_size)
    torch.testing.assert_close(qw.zeros.double(), wg.amin(-1), rtol=0, atol=0)
    torch.testing.assert_close(qw.scales.double(), (wg.amax(-1) - wg.amin(-1)) / 15, rtol=1e-6, atol=0)
    deq = dequantize_weight_ref(qw).double().view(N, G, group_size)
    err = (deq - wg).abs()
    bound = qw.scales.double()[..., None] / 2 + 1e-6 * wg.abs().amax(-1, keepdim=True)
    assert (err <= bound).all(), float((err - bound).max())
    assert torch.equal(deq[0, 0], torch.full((group_size,), 0.25, dtype=F64))


def test_int4_packing_layout():
    """data[n, k // 2]: low nibble = code of even k, high nibble = code of odd k; decode by hand."""
    N, K, gs = 3, 64, 32
    w = make_tensor((N, K), torch.float32, seed=160)
    qw = quantize_weight_ref(w, bits=4, group_size=gs)
    data = qw.data.tolist()
    deq = dequantize_weight_ref(qw)
    for n in range(N):
        for k in range(K):
            byte = data[n][k // 2]
            code = byte & 0x0F if k % 2 == 0 else byte >> 4
            g = k // gs
            value = code * qw.scales[n, g].item() + qw.zeros[n, g].item()
            assert abs(deq[n, k].item() - value) <= 1e-6 * (1 + abs(value))
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(161))
    packed = _pack_nibbles(codes)
    assert packed.shape == (5, 32) and torch.equal(_unpack_nibbles(packed), codes)
    assert packed[0, 0].item() == codes[0, 0].item() + 16 * codes[0, 1].item()


@pytest.mark.parametrize("bits,group_size", [(8, 128), (4, 32), (4, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, F64])
def test_quant_matmul_matches_dequantized_matmul(bits, group_size, dtype):
    N, K = 9, 256
    qw = quantize_weight_ref(make_tensor((N, K), torch.float32, seed=170, scale=0.05), bits=bits, group_size=group_size)
    x = make_tensor((2, 3, K), dtype, seed=171)
    out = quant_matmul_ref(x, qw)
    assert out.dtype == dtype and out.shape == (2, 3, N)
    expected = x.double() @ dequantize_weight_ref(qw).double().T
    eps = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-11, F64: 1e-13}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=eps, atol=eps)
    assert torch.equal(bk.quant_matmul(x, qw, backend="reference"), out)


def test_int8_matches_torch_weight_int8pack_mm():
    """Cross-check of the int8 format against PyTorch's own weight-only int8 CPU kernel."""
    if not hasattr(torch, "_weight_int8pack_mm"):
        pytest.skip("torch._weight_int8pack_mm is not available in this torch")
    N, K = 11, 128
    qw = quantize_weight_ref(make_tensor((N, K), torch.float32, seed=180, scale=0.05), bits=8)
    x = make_tensor((5, K), torch.float32, seed=181)
    peer = torch._weight_int8pack_mm(x, qw.data, qw.scales)  # [5, N]: x @ (int8 · scale)ᵀ
    torch.testing.assert_close(quant_matmul_ref(x, qw), peer, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_weight_state_dict_round_trip(bits, tmp_path):
    qw = bk.quantize_weight(make_tensor((5, 64), torch.float32, seed=190), bits=bits, group_size=32,
                            backend="reference")
    sd = qw.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    back = QuantizedWeight.from_state_dict(sd)
    assert (back.bits, back.group_size, back.shape) == (qw.bits, qw.group_size, qw.shape)
    assert torch.equal(bk.dequantize_weight(back, backend="reference"), dequantize_weight_ref(qw))
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "qw.safetensors"
    safetensors_torch.save_file(sd, str(path))
    loaded = QuantizedWeight.from_state_dict(safetensors_torch.load_file(str(path)))
    assert torch.equal(dequantize_weight_ref(loaded), dequantize_weight_ref(qw))


def test_quantized_weight_rejects_inconsistent_fields():
    qw = quantize_weight_ref(make_tensor((4, 64), torch.float32, seed=195), bits=4, group_size=32)
    with pytest.raises(ValueError, match="scales"):
        QuantizedWeight(qw.data, qw.scales[:, :1], qw.zeros, 4, 32, (4, 64))
    with pytest.raises(ValueError, match="group_size"):
        QuantizedWeight(qw.data, qw.scales, qw.zeros, 4, 48, (4, 64))
    with pytest.raises(ValueError, match="bits"):
        QuantizedWeight(qw.data, qw.scales, qw.zeros, 3, 32, (4, 64))
    with pytest.raises(ValueError, match="zeros"):
        QuantizedWeight(qw.data.view(torch.int8), qw.scales[:, 0], qw.zeros, 8, 64, (4, 32))


# ----------------------------------------------------------------------------------------------
# Every public function: float64 with backend="reference", backend resolution, bad inputs
# ----------------------------------------------------------------------------------------------


def _f64_calls():
    t = lambda shape, seed: make_tensor(shape, F64, seed=seed)  # noqa: E731
    cos, sin = _tables64(8, 4)
    qw = bk.quantize_weight(t((3, 64), 1), bits=4, group_size=32, backend="reference")
    return {
        "swiglu": lambda: bk.swiglu(t((3, 4), 1), t((3, 4), 2), backend="reference"),
        "apply_rope": lambda: bk.apply_rope(t((1, 5, 2, 4), 1), t((1, 5, 2, 4), 2), cos, sin, backend="reference")[0],
        "split_qkv_rope": lambda: bk.split_qkv_rope(t((1, 5, 24), 1), cos, sin, num_heads=2, backend="reference")[0],
        "attention": lambda: bk.attention(t((1, 5, 2, 4), 1), t((1, 5, 2, 4), 2), t((1, 5, 2, 4), 3),
                                          alibi_slopes=bk.alibi_slopes(2).double(), backend="reference"),
        "decode_attention": lambda: bk.decode_attention(
            t((1, 1, 2, 4), 1), t((1, 5, 2, 4), 2), t((1, 5, 2, 4), 3), torch.tensor([4], dtype=torch.int32),
            backend="reference"),
        "norm_head_weight": lambda: bk.norm_head_weight(t((5, 4), 1), backend="reference"),
        "linear_cross_entropy": lambda: bk.linear_cross_entropy(t((3, 4), 1), t((5, 4), 2), torch.tensor([0, 4, -100]),
                                                                backend="reference")[0],
        "quant_matmul": lambda: bk.quant_matmul(t((2, 64), 3), qw, backend="reference"),
    }


@pytest.mark.parametrize("name", list(_f64_calls()))
def test_public_functions_run_in_float64(name):
    out = _f64_calls()[name]()
    assert out.dtype == F64 and torch.isfinite(out).all()


def test_public_functions_without_tensor_outputs_of_input_dtype():
    assert bk.rope_cos_sin(4, 8, backend="reference")[0].dtype == torch.float32
    assert bk.alibi_slopes(40, backend="reference").dtype == torch.float32
    qw = bk.quantize_weight(make_tensor((3, 64), F64, seed=1), bits=8, backend="reference")
    assert bk.dequantize_weight(qw, backend="reference").dtype == torch.float32


OPS = ["swiglu", "rope_cos_sin", "apply_rope", "split_qkv_rope", "alibi_slopes", "attention", "decode_attention",
       "norm_head_weight", "linear_cross_entropy", "quantize_weight", "dequantize_weight", "quant_matmul"]


@pytest.mark.parametrize("name", OPS)
def test_ops_are_registered_with_a_reference(name):
    assert "reference" in bk.available_backends(name)


def test_explicit_backend_that_cannot_run_raises():
    x = make_tensor((2, 3), torch.float32, seed=1)
    with pytest.raises(ValueError, match="swiglu"):
        bk.swiglu(x, x, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        bk.norm_head_weight(x, backend="fastest")


def _bad_calls():
    f32 = lambda shape, seed=0: make_tensor(shape, torch.float32, seed=seed)  # noqa: E731
    q4 = f32((1, 5, 2, 4))
    cos, sin = rope_cos_sin_ref(8, 4)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    kc = f32((1, 6, 2, 4))
    qw = quantize_weight_ref(f32((3, 64)), bits=4, group_size=32)
    hid, wt = f32((3, 4)), f32((5, 4))
    lab = torch.tensor([0, 1, 2])
    return [
        # swiglu
        (lambda: bk.swiglu([1.0], f32((1,))), TypeError, "gate"),
        (lambda: bk.swiglu(f32((2, 3)), f32((3, 2))), ValueError, "up"),
        (lambda: bk.swiglu(f32((2,)), f32((2,)).double()), TypeError, "dtype"),
        (lambda: bk.swiglu(torch.ones(2, dtype=torch.int64), torch.ones(2, dtype=torch.int64)), TypeError, "gate"),
        # rope_cos_sin
        (lambda: bk.rope_cos_sin(4, 7), ValueError, "Dh"),
        (lambda: bk.rope_cos_sin(0, 8), ValueError, "T"),
        (lambda: bk.rope_cos_sin(4.0, 8), TypeError, "T"),
        (lambda: bk.rope_cos_sin(4, 8, base=-1.0), ValueError, "base"),
        (lambda: bk.rope_cos_sin(4, 8, offset=-1), ValueError, "offset"),
        # apply_rope
        (lambda: bk.apply_rope(f32((1, 5, 2, 5)), f32((1, 5, 2, 5)), cos, sin), ValueError, "Dh"),
        (lambda: bk.apply_rope(q4, f32((1, 5, 3, 4)), cos, sin), ValueError, "k"),
        (lambda: bk.apply_rope(q4[0], q4[0], cos, sin), ValueError, "q"),
        (lambda: bk.apply_rope(q4, q4, cos[:3], sin[:3]), ValueError, "cos/sin"),
        (lambda: bk.apply_rope(q4, q4, cos, sin, position_ids=torch.full((1, 5), 8)), ValueError, "position_ids"),
        (lambda: bk.apply_rope(q4, q4, cos, sin, position_ids=torch.full((1, 5), -1)), ValueError, "position_ids"),
        (lambda: bk.apply_rope(q4, q4, cos, sin, position_ids=torch.zeros(2, 5, dtype=torch.long)), ValueError,
         "position_ids"),
        (lambda: bk.apply_rope(q4, q4, cos, sin, position_ids=torch.zeros(1, 5)), TypeError, "position_ids"),
        (lambda: bk.apply_rope(q4, q4, cos[:, :2], sin[:, :2]), ValueError, "cos"),
        (lambda: bk.apply_rope(q4, q4, cos, sin[:4]), ValueError, "sin"),
        # split_qkv_rope
        (lambda: bk.split_qkv_rope(f32((1, 5, 25)), cos, sin, num_heads=2), ValueError, "num_heads"),
        (lambda: bk.split_qkv_rope(f32((1, 5, 18)), cos, sin, num_heads=2), ValueError, "Dh"),
        (lambda: bk.split_qkv_rope(f32((1, 5, 24)), cos, sin, num_heads=0), ValueError, "num_heads"),
        (lambda: bk.split_qkv_rope(f32((5, 24)), cos, sin, num_heads=2), ValueError, "qkv"),
        (lambda: bk.split_qkv_rope(f32((1, 9, 24)), cos, sin, num_heads=2), ValueError, "cos/sin"),
        # alibi_slopes
        (lambda: bk.alibi_slopes(0), ValueError, "num_heads"),
        (lambda: bk.alibi_slopes(4.5), TypeError, "num_heads"),
        # attention
        (lambda: bk.attention(q4, q4, f32((1, 5, 2, 3))), ValueError, "v"),
        (lambda: bk.attention(q4, q4.half(), q4), TypeError, "dtype"),
        (lambda: bk.attention(q4, q4, q4, alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes"),
        (lambda: bk.attention(q4, q4, q4, alibi_slopes=torch.ones(2, dtype=torch.float16)), TypeError, "alibi_slopes"),
        (lambda: bk.attention(q4, q4, q4, softmax_scale=-1.0), ValueError, "softmax_scale"),
        (lambda: bk.attention(q4, q4, q4, cu_seqlens=cu), ValueError, "q"),
        (lambda: bk.attention(q4[0], q4[0], q4[0], cu_seqlens=cu.long()), TypeError, "cu_seqlens"),
        (lambda: bk.attention(q4[0], q4[0], q4[0], cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32)),
         ValueError, "cu_seqlens"),
        (lambda: bk.attention(q4[0], q4[0], q4[0], cu_seqlens=torch.tensor([0, 3, 2, 5], dtype=torch.int32)),
         ValueError, "cu_seqlens"),
        (lambda: bk.attention(q4[0], q4[0], q4[0], cu_seqlens=cu, max_seqlen=2), ValueError, "max_seqlen"),
        (lambda: bk.attention(q4, q4, q4, max_seqlen=5), ValueError, "max_seqlen"),
        (lambda: bk.attention(q4, q4, q4, causal=1), TypeError, "causal"),
        (lambda: bk.attention(f32((1, 0, 2, 4)), f32((1, 0, 2, 4)), f32((1, 0, 2, 4))), ValueError, "empty"),
        # decode_attention
        (lambda: bk.decode_attention(q4, kc, kc, torch.tensor([3], dtype=torch.int32)), ValueError, "q"),
        (lambda: bk.decode_attention(q4[:, :1], f32((1, 6, 2, 6)), kc, torch.tensor([3], dtype=torch.int32)),
         ValueError, "k_cache"),
        (lambda: bk.decode_attention(q4[:, :1], kc, f32((1, 5, 2, 4)), torch.tensor([3], dtype=torch.int32)),
         ValueError, "v_cache"),
        (lambda: bk.decode_attention(q4[:, :1], kc, kc, torch.tensor([3])), TypeError, "cache_seqlens"),
        (lambda: bk.decode_attention(q4[:, :1], kc, kc, torch.tensor([7], dtype=torch.int32)), ValueError,
         "cache_seqlens"),
        (lambda: bk.decode_attention(q4[:, :1], kc, kc, torch.tensor([3, 3], dtype=torch.int32)), ValueError,
         "cache_seqlens"),
        (lambda: bk.decode_attention(q4[:, :1], kc, kc, torch.tensor([3], dtype=torch.int32),
                                     alibi_slopes=torch.ones(4)), ValueError, "alibi_slopes"),
        # norm_head_weight
        (lambda: bk.norm_head_weight(f32((5,))), ValueError, "weight"),
        (lambda: bk.norm_head_weight(torch.ones(2, 2, dtype=torch.int32)), TypeError, "weight"),
        (lambda: bk.norm_head_weight(f32((2, 2)), eps=0.0), ValueError, "eps"),
        # linear_cross_entropy
        (lambda: bk.linear_cross_entropy(hid.long(), wt, lab), TypeError, "hidden"),
        (lambda: bk.linear_cross_entropy(hid, f32((5, 3)), lab), ValueError, "weight"),
        (lambda: bk.linear_cross_entropy(hid, wt, lab[:2]), ValueError, "labels"),
        (lambda: bk.linear_cross_entropy(hid, wt, lab.float()), TypeError, "labels"),
        (lambda: bk.linear_cross_entropy(hid, wt, torch.tensor([0, 5, 1])), ValueError, "labels"),
        (lambda: bk.linear_cross_entropy(hid, wt, torch.tensor([0, -1, 1])), ValueError, "labels"),
        (lambda: bk.linear_cross_entropy(hid, wt.double(), lab), TypeError, "dtype"),
        (lambda: bk.linear_cross_entropy(hid, wt, lab, reduction="avg"), ValueError, "reduction"),
        (lambda: bk.linear_cross_entropy(hid, wt, lab, z_loss_weight=-1.0), ValueError, "z_loss_weight"),
        (lambda: bk.linear_cross_entropy(hid, wt, lab, norm_head=None), TypeError, "norm_head"),
        # quantize_weight / dequantize_weight / quant_matmul
        (lambda: bk.quantize_weight(f32((3, 96)), bits=4, group_size=64), ValueError, "group_size"),
        (lambda: bk.quantize_weight(f32((3, 96)), bits=4, group_size=48), ValueError, "group_size"),
        (lambda: bk.quantize_weight(f32((3, 64)), bits=3), ValueError, "bits"),
        (lambda: bk.quantize_weight(f32((64,)), bits=8), ValueError, "weight"),
        (lambda: bk.quantize_weight(torch.ones(3, 64, dtype=torch.int8), bits=8), TypeError, "weight"),
        (lambda: bk.dequantize_weight(f32((3, 64))), TypeError, "qweight"),
        (lambda: bk.quant_matmul(f32((2, 63)), qw), ValueError, "x"),
        (lambda: bk.quant_matmul(f32((2, 64)), "w"), TypeError, "qweight"),
        (lambda: bk.quant_matmul(f32((2, 64)).long(), qw), TypeError, "x"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_inputs_raise_naming_the_argument(i):
    fn, exc, match = _bad_calls()[i]
    with pytest.raises(exc, match=match):
        fn()

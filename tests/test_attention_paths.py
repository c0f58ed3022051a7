"""attention (Triton): every code path of the Hopper-oriented kernels, forward and every gradient vs float64.

Paths: TMA tensor-descriptor loads (``USE_TMA``, sm_90) and masked pointer loads (sm_80); three tile
shapes per kernel (BLOCK_M = BLOCK_N, BLOCK_M > BLOCK_N, BLOCK_M < BLOCK_N) so causal programs run
full (unmasked) blocks, several diagonal blocks and a sequence tail; packed sequences of uneven
lengths (empty and length-1 included); causal / ALiBi / both. Plus the saved lse, the tuning policy
(one config when interpreting, shared-memory pruning, the autotune key) and ``auto``'s per-op order.
"""

import pytest
import torch
import triton

import baichuan_kernels as bk
from baichuan_kernels import registry
from baichuan_kernels.ops import attention as attention_ops
from baichuan_kernels.reference.alibi import alibi_slopes_ref
from baichuan_kernels.registry import Backend
from baichuan_kernels.testing import assert_within_reference_error, make_tensor, poisoned_outputs
from test_attention import _explicit_ref, _grads

HAS_TRITON = "triton" in bk.available_backends("attention")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton backend unavailable (no GPU, no interpreter)")

if HAS_TRITON:
    from baichuan_kernels.triton import attention as tri

TILES = {  # kernel -> (BLOCK_M, BLOCK_N)
    "square": {"fwd": (16, 16), "dq": (16, 16), "dkdv": (16, 16)},
    "tall": {"fwd": (32, 16), "dq": (32, 16), "dkdv": (32, 16)},
    "wide": {"fwd": (16, 32), "dq": (16, 32), "dkdv": (16, 32)},
}
MODES = {"causal-alibi": (True, True), "causal": (True, False), "alibi": (False, True)}
SHAPES = {
    "dense-T77": ((1, 77, 2, 32), None),  # 3-5 blocks and a tail
    "packed-uneven": ((2, 16), (1, 40, 0, 67, 16)),  # (H, Dh), lengths
}


@pytest.fixture
def tiles(monkeypatch):
    """Run the kernels with given tiles and load path (one config each: no autotuning)."""

    def use(name: str, tma: bool):
        for kind, kernel in (("fwd", tri._attn_fwd), ("dq", tri._attn_bwd_dq), ("dkdv", tri._attn_bwd_dkdv)):
            bm, bn = TILES[name][kind]
            monkeypatch.setattr(kernel, "configs", [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4,
                                                                  num_stages=2)])
        monkeypatch.setattr(tri, "TMA_MODE", "1" if tma else "0")

    return use


def _inputs(shape, dtype, seed, slope_heads=None):
    dense, lengths = SHAPES[shape]
    if lengths is None:
        full, cu, H = dense, None, dense[2]
    else:
        H, Dh = dense
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        cu = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
        full = (bounds[-1], H, Dh)
    q, k, v = (make_tensor(full, dtype, DEVICE, seed=seed + i, requires_grad=True) for i in range(3))
    do = make_tensor(full, dtype, DEVICE, seed=seed + 3)
    slopes = alibi_slopes_ref(slope_heads or 2 * H)[:H].to(DEVICE)  # the steepest slopes
    return q, k, v, do, cu, slopes


def _check_all(q, k, v, do, cu, slopes, causal, label):
    scale = q.shape[-1] ** -0.5
    with poisoned_outputs():
        out = bk.attention(q, k, v, causal=causal, alibi_slopes=slopes, cu_seqlens=cu, backend="triton")
        got = _grads(out, q, k, v, do)
    same = _grads(_explicit_ref(q, k, v, causal, slopes, scale, cu), q, k, v, do)
    as64 = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    cu64 = cu.cpu() if cu is not None else None
    s64 = slopes.cpu().double() if slopes is not None else None
    exact = _grads(_explicit_ref(*as64, causal, s64, scale, cu64), *as64, do.cpu().double())
    for name, g, s, e in zip(("out", "dq", "dk", "dv"), got, same, exact):
        assert g.shape == e.shape and g.dtype == q.dtype, name
        assert_within_reference_error(g, s, e, name=f"{label} {name}")


PATHS = [(t, tma, m, s, torch.float32) for t in TILES for tma in (True, False) for m in MODES for s in SHAPES]
PATHS += [(t, tma, "causal-alibi", s, torch.bfloat16) for t in TILES for tma in (True, False) for s in SHAPES]
PATHS += [("tall", True, "causal", "packed-uneven", torch.float16), ("wide", False, "alibi", "dense-T77", torch.float16)]


@needs_triton
@pytest.mark.parametrize("tile,tma,mode,shape,dtype", PATHS,
                         ids=[f"{t}-{'tma' if a else 'ptr'}-{m}-{s}-{str(d)[6:]}" for t, a, m, s, d in PATHS])
def test_paths_match_float64(tiles, tile, tma, mode, shape, dtype):
    tiles(tile, tma)
    causal, alibi = MODES[mode]
    q, k, v, do, cu, slopes = _inputs(shape, dtype, seed=100)
    _check_all(q, k, v, do, cu, slopes if alibi else None, causal, f"{tile} tma={tma} {mode} {shape} {dtype}")


LONG = [(torch.float32, True), (torch.float32, False), (torch.bfloat16, True), (torch.bfloat16, False),
        (torch.float16, True)]


@needs_triton
@pytest.mark.parametrize("dtype,tma", LONG, ids=[f"{str(d)[6:]}-tma={t}" for d, t in LONG])
def test_long_causal_alibi(tiles, dtype, tma):
    """Causal ALiBi over 260 positions with slope 1/2 (biases down to -130): the exact fp32 form and
    the split 16-bit form (one FMA per score, the row term in the lse) both within the 2x rule."""
    tiles("tall", tma)
    dense = (1, 260, 1, 16)
    q, k, v = (make_tensor(dense, dtype, DEVICE, seed=200 + i, requires_grad=True) for i in range(3))
    do = make_tensor(dense, dtype, DEVICE, seed=203)
    slopes = alibi_slopes_ref(8)[:1].to(DEVICE)  # 0.5
    _check_all(q, k, v, do, None, slopes, True, f"long alibi {dtype} tma={tma}")


@needs_triton
@pytest.mark.parametrize("tma", [True, False])
def test_saved_lse_is_the_true_logsumexp(tiles, tma):
    """The forward drops ALiBi's per-row term from the scores: the lse it saves must put it back."""
    tiles("tall", tma)
    q, k, v, do, cu, slopes = _inputs("packed-uneven", torch.float32, seed=300)
    scale = q.shape[-1] ** -0.5
    _, lse = torch.ops.baichuan_triton.attention_fwd(q.detach(), k.detach(), v.detach(), cu, slopes, scale, True, 67)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b == a:
            continue
        qs, ks = q[a:b].detach().double().cpu(), k[a:b].detach().double().cpu()
        s = torch.einsum("ihd,jhd->hij", qs, ks) * scale
        i, j = torch.arange(b - a)[:, None], torch.arange(b - a)[None, :]
        s = s + slopes.double().cpu()[:, None, None] * (j - i) - torch.where(j > i, float("inf"), 0.0)
        torch.testing.assert_close(lse[:, a:b].cpu().double(), torch.logsumexp(s, -1), rtol=0, atol=2e-5)


@needs_triton
def test_interpreter_gets_one_config_and_gpu_lists_are_keyed():
    if registry.TRITON_INTERPRET:
        for kernel in (tri._attn_fwd, tri._attn_bwd_dq, tri._attn_bwd_dkdv):
            assert len(kernel.configs) == 1
    assert tri._AUTOTUNE_KEY == ["MAX_SEQLEN_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_ALIBI", "USE_TMA"]
    assert [tri._bucket(n) for n in (1, 200, 4096, 5000, 10 ** 6)] == [128, 256, 4096, 8192, 16384]
    for arch in (8, 9):
        for kind, configs in tri._GPU_CONFIGS[arch].items():
            assert configs, (arch, kind)


@needs_triton
def test_pruner_drops_configs_past_shared_memory(monkeypatch):
    q = torch.empty(1, 1, 128, dtype=torch.bfloat16)
    configs = tri._GPU_CONFIGS[9]["fwd"]
    monkeypatch.setattr(tri, "_max_smem", lambda: 228 * 1024)
    assert tri._pruner("fwd")(configs, {"Q": q}, HEAD_DIM=128) == configs  # all fit an H100
    monkeypatch.setattr(tri, "_max_smem", lambda: 150 * 1024)
    kept = tri._pruner("fwd")(configs, {"Q": q}, HEAD_DIM=128)
    assert kept and all(tri._smem_bytes("fwd", c, 128, 2) <= 150 * 1024 for c in kept)
    assert len(kept) < len(configs)
    monkeypatch.setattr(tri, "_max_smem", lambda: 1024)  # nothing fits: the smallest one stays
    assert len(tri._pruner("dkdv")(tri._GPU_CONFIGS[9]["dkdv"], {"Q": q}, HEAD_DIM=128)) == 1


def test_auto_prefers_triton_over_cuda_for_attention_only():
    order = list(registry.get_op("attention").impls)
    assert order == [Backend.TRITON, Backend.CUDA, Backend.CPU, Backend.REFERENCE]
    other = list(registry.get_op("rms_norm").impls)  # the default order is untouched elsewhere
    assert other == sorted(other, key=registry.FASTEST_FIRST.index)
    assert attention_ops.AUTO_ORDER[0] is Backend.TRITON


def test_register_fastest_first_validates():
    from baichuan_kernels.registry import Impl
    try:
        op = registry.register("toy_order", Impl(Backend.CUDA), Impl(Backend.CPU),
                               fastest_first=(Backend.CPU, Backend.CUDA))
        assert list(op.impls) == [Backend.CPU, Backend.CUDA, Backend.REFERENCE]
        with pytest.raises(ValueError, match="must list each backend once"):
            registry.register("toy_order", Impl(Backend.CUDA), Impl(Backend.CPU), fastest_first=(Backend.CPU,))
    finally:
        registry._OPS.pop("toy_order", None)

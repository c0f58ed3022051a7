"""quant_matmul: every backend vs x @ dequantize(w)ᵀ in float64 (the tolerance rule of DESIGN.md §3),
QuantLinear and quantize_model. The packed formats: baichuan_kernels/reference/quant_matmul.py."""

import pytest
import torch
from torch import nn

import baichuan_kernels as bk
from baichuan_kernels.quantize import quantize_model
from baichuan_kernels.reference.quant_matmul import QuantizedWeight, dequantize_weight_ref, quant_matmul_ref
from baichuan_kernels.testing import DTYPES, assert_within_reference_error, make_tensor, poisoned_outputs
from _backends import kernel_backends

BACKENDS = kernel_backends("quant_matmul")
HAS_CPU = "cpu" in bk.available_backends("quant_matmul")
HAS_TRITON = "triton" in bk.available_backends("quant_matmul")

# (bits, group_size, K): odd K for int8, each group size for int4 (K a multiple of it, not a power of 2)
# NF4: each block size (K a multiple of it, not a power of 2)
FORMATS = [(8, None, 123), (4, 32, 96), (4, 64, 192), (4, 128, 384), ("nf4", 32, 96), ("nf4", 64, 192),
           ("nf4", 128, 384)]
SMALL = [0, 1, 5]  # int8, int4, NF4: the formats of the smaller tests
FORMAT_IDS = [f"w{b}" + (f"g{g}" if g else "") + f"-K{k}" for b, g, k in FORMATS]
MS = [1, 3, 16, 17, 64]
N_ODD = 45


def _qweight(N, K, bits, group_size, device="cpu", seed=100):
    w = make_tensor((N, K), torch.float32, seed=seed, scale=0.05, offset=0.01)
    return bk.quantize_weight(w, bits=bits, group_size=group_size or 128).to(device)


def _skip_unsupported(backend, x):
    if backend == "cuda" and (x.dtype == torch.float32 or x.numel() // x.shape[-1] > 16):
        pytest.skip("the CUDA GEMV serves bf16/fp16 x with M ≤ 16 (auto picks Triton otherwise)")


def _check(x, qw, backend):
    with poisoned_outputs():
        got = bk.quant_matmul(x, qw, backend=backend)
    same = quant_matmul_ref(x, qw)  # fp32 accumulation, rounded to x's dtype
    exact = x.double() @ dequantize_weight_ref(qw).double().T
    assert got.shape == exact.shape and got.dtype == x.dtype
    assert_within_reference_error(got, same, exact, name=f"{backend} w{qw.bits} {x.dtype} M={x.shape[0]}")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits,group_size,K", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("M", MS)
def test_matches_float64_reference(device, backend, dtype, bits, group_size, K, M):
    qw = _qweight(N_ODD, K, bits, group_size, device)
    x = make_tensor((M, K), dtype, device, seed=M + K, scale=1.5)
    _skip_unsupported(backend, x)
    _check(x, qw, backend)


@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[1] != "triton" or p.values[0] == "cuda"])
@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 128), ("nf4", 64)], ids=["w8", "w4g128", "nf4g64"])
@pytest.mark.parametrize("M", [1, 16, 17])
def test_baichuan_width(device, backend, bits, group_size, M):
    # K = 4096 (7B hidden size): the real K loop, several groups and vector tails.
    qw = _qweight(256, 4096, bits, group_size, device, seed=7)
    x = make_tensor((M, 4096), torch.bfloat16, device, seed=8)
    _skip_unsupported(backend, x)
    _check(x, qw, backend)


@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[1] != "triton" or p.values[0] == "cuda"])
@pytest.mark.parametrize("bits,group_size,K", [(8, None, 1000), (4, 32, 1056), (4, 128, 640), ("nf4", 64, 1088)])
@pytest.mark.parametrize("M", [2, 5, 16])
def test_k_chunks_and_tails(device, backend, bits, group_size, K, M):
    # The CPU GEMV walks K in chunks (8192 / M floats, multiples of 128): partial last chunks, int8 tails.
    qw = _qweight(33, K, bits, group_size, device, seed=9)
    x = make_tensor((M, K), torch.float16, device, seed=10 + M)
    _skip_unsupported(backend, x)
    _check(x, qw, backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("bits,group_size,K", [FORMATS[i] for i in SMALL], ids=[FORMAT_IDS[i] for i in SMALL])
def test_batched_and_non_contiguous_x(device, backend, bits, group_size, K):
    qw = _qweight(N_ODD, K, bits, group_size, device)
    x = make_tensor((2, 3, K), torch.float16, device, seed=3)  # [B, T, K]
    _skip_unsupported(backend, x)
    got = bk.quant_matmul(x, qw, backend=backend)
    assert got.shape == (2, 3, N_ODD)
    torch.testing.assert_close(got, quant_matmul_ref(x, qw), rtol=2e-3, atol=2e-3)
    xt = make_tensor((K, 4), torch.float16, device, seed=4).t()  # [4, K], strided
    torch.testing.assert_close(bk.quant_matmul(xt, qw, backend=backend), quant_matmul_ref(xt, qw), rtol=2e-3,
                               atol=2e-3)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("bits,group_size,K", [FORMATS[i] for i in SMALL], ids=[FORMAT_IDS[i] for i in SMALL])
def test_grad_x(device, backend, bits, group_size, K):
    qw = _qweight(N_ODD, K, bits, group_size, device)
    x = make_tensor((5, K), torch.float32, device, seed=5, requires_grad=True)
    dy = make_tensor((5, N_ODD), torch.float32, device, seed=6)
    if backend == "cuda":
        x = x.detach().half().requires_grad_()
        dy = dy.half()
    (gx,) = torch.autograd.grad(bk.quant_matmul(x, qw, backend=backend), x, dy)
    x64 = x.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad(quant_matmul_ref(x64, qw), x64, dy.double())
    xs = x.detach().requires_grad_()
    (gsame,) = torch.autograd.grad(quant_matmul_ref(xs, qw), xs, dy)
    assert_within_reference_error(gx, gsame, g64, name="dx")
    # .sum() backward hands a stride-0 expanded gradient to the backward
    bk.quant_matmul(x, qw, backend=backend).sum().backward()
    torch.testing.assert_close(x.grad.double(), dequantize_weight_ref(qw).double().sum(0).expand(5, K).cpu()
                               .to(x.grad.device), rtol=1e-2 if backend == "cuda" else 1e-5, atol=1e-3)


@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[1] == "cpu"])
def test_cpu_is_deterministic_across_threads(device, backend):
    for bits, gs, K in [FORMATS[i] for i in SMALL]:
        qw = _qweight(N_ODD, K, bits, gs)
        for M in (3, 40):
            x = make_tensor((M, K), torch.float32, seed=11)
            outs = []
            for threads in (1, 2):
                prev = torch.get_num_threads()
                torch.set_num_threads(threads)
                try:
                    outs.append(bk.quant_matmul(x, qw, backend=backend))
                finally:
                    torch.set_num_threads(prev)
            assert torch.equal(outs[0], outs[1])


@pytest.mark.skipif(not HAS_CPU, reason="extension not built")
def test_cpu_cross_check_with_torch_int8pack_mm():
    # An independent implementation of the int8 format: torch._weight_int8pack_mm(x, int8 [N, K], scales [N]).
    # fp32 x only: bf16 x with a small K has crashed that kernel on CPU.
    qw = _qweight(40, 128, 8, None)
    x = make_tensor((7, 128), torch.float32, seed=12)
    peer = torch._weight_int8pack_mm(x, qw.data, qw.scales)
    torch.testing.assert_close(bk.quant_matmul(x, qw, backend="cpu"), peer, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_split_k():
    # N small and K large: the GEMV splits K and sums the slices in a second kernel.
    for bits, gs in ((4, 128), (8, None), ("nf4", 64)):
        qw = _qweight(40, 8192, bits, gs, "cuda", seed=13)
        for M in (1, 5, 16):
            x = make_tensor((M, 8192), torch.bfloat16, "cuda", seed=14 + M)
            _check(x, qw, "cuda")


def test_auto_picks_by_device_and_shape():
    from baichuan_kernels import registry
    x = torch.randn(2, 96)
    qw = _qweight(8, 96, 4, 32)
    want = "cpu" if HAS_CPU else "reference"
    assert registry.resolve("quant_matmul", "auto", (x, qw.data), x, 4).value == want
    x64 = x.double()
    assert registry.resolve("quant_matmul", "auto", (x64, qw.data), x64, 4).value == "reference"
    if HAS_CPU:
        with pytest.raises(ValueError, match="float64"):
            bk.quant_matmul(x64, qw, backend="cpu")
    with pytest.raises(ValueError, match="backend 'cuda' cannot run"):
        bk.quant_matmul(x, qw, backend="cuda")


def test_float64_reference_only():
    qw = _qweight(5, 64, 4, 32)
    x = make_tensor((3, 64), torch.float64, seed=1)
    torch.testing.assert_close(bk.quant_matmul(x, qw), x @ dequantize_weight_ref(qw).double().T)


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda qw: (torch.randn(2, 95), qw), ValueError, r"x must have shape \[\.\.\., K=96\]"),
        (lambda qw: (torch.ones(2, 96, dtype=torch.int32), qw), TypeError, "x must have dtype"),
        (lambda qw: (torch.randn(0, 96), qw), ValueError, "x must not be empty"),
        (lambda qw: (torch.randn(2, 96), qw.data), TypeError, "qweight must be a QuantizedWeight"),
        (lambda qw: ([1.0], qw), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_inputs(make, exc, match):
    x, qw = make(_qweight(4, 96, 4, 32))
    with pytest.raises(exc, match=match):
        bk.quant_matmul(x, qw)


def test_group_size_must_divide_k():
    w = make_tensor((4, 96), torch.float32, seed=2)
    with pytest.raises(ValueError, match="group_size 64 must divide K"):
        bk.quantize_weight(w, bits=4, group_size=64)
    with pytest.raises(ValueError, match="group_size must be one of"):
        bk.quantize_weight(w, bits=4, group_size=48)
    with pytest.raises(ValueError, match="divide in_features=96"):
        bk.nn.QuantLinear(96, 8, bits=4, group_size=64)


@pytest.mark.skipif(not HAS_CPU, reason="extension not built")
def test_cpp_op_checks_arguments_itself():
    op = torch.ops.baichuan.quant_matmul_fwd
    qw = _qweight(4, 96, 4, 32)
    with pytest.raises(RuntimeError, match="group_size 64 must divide K"):
        op(torch.randn(2, 96), qw.data, qw.scales, qw.zeros, 4, 64)
    with pytest.raises(RuntimeError, match="qdata must have shape"):
        op(torch.randn(2, 64), qw.data, qw.scales, qw.zeros, 4, 32)
    with pytest.raises(RuntimeError, match="zeros must be given"):
        op(torch.randn(2, 96), qw.data, qw.scales, None, 4, 32)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        op(torch.randn(96, 2).t(), qw.data, qw.scales, qw.zeros, 4, 32)
    q8 = _qweight(4, 96, 8, None)
    with pytest.raises(RuntimeError, match="qdata must be int8"):
        op(torch.randn(2, 96), q8.data.view(torch.uint8), q8.scales, None, 8, 96)
    with pytest.raises(RuntimeError, match="codebook must be None for bits=8"):
        op(torch.randn(2, 96), q8.data, q8.scales, None, 8, 96, torch.zeros(16))
    qn = _qweight(4, 96, "nf4", 32)
    with pytest.raises(RuntimeError, match="zeros must be None when a codebook is given"):
        op(torch.randn(2, 96), qn.data, qn.scales, qn.scales, 4, 32, qn.codebook)
    with pytest.raises(RuntimeError, match=r"codebook must be float32 \[16\]"):
        op(torch.randn(2, 96), qn.data, qn.scales, None, 4, 32, qn.codebook[:8])
    with pytest.raises(RuntimeError, match="codebook must be float32"):
        op(torch.randn(2, 96), qn.data, qn.scales, None, 4, 32, qn.codebook.double())


def _opcheck_ops():
    ops = []
    if HAS_CPU:
        ops.append(("cpu", torch.ops.baichuan))
    if HAS_TRITON:
        ops.append(("triton", torch.ops.baichuan_triton))
    return [pytest.param(ns, id=name) for name, ns in ops]


@pytest.mark.parametrize("namespace", _opcheck_ops())
@pytest.mark.parametrize("bits", [8, 4, "nf4"])
def test_opcheck(namespace, bits):
    qw = _qweight(6, 64, bits, 32)
    x = make_tensor((3, 64), torch.float32, seed=1, requires_grad=True)
    args = (x, qw.data, qw.scales, qw.zeros, 4 if bits == "nf4" else bits, qw.group_size)
    torch.library.opcheck(namespace.quant_matmul_fwd.default, args + ((qw.codebook,) if bits == "nf4" else ()))


def test_nf4_format():
    # The NF4 reference semantics: absmax per block, nearest codebook level, exact zero at code 7.
    from baichuan_kernels.reference.quant_matmul import NF4_CODEBOOK
    w = make_tensor((6, 128), torch.float32, seed=21)
    w[0, :64] = 0.0  # an all-zero block decodes to exact zeros
    qw = bk.quantize_weight(w, bits="nf4", group_size=64)
    assert qw.zeros is None and qw.codebook.tolist() == list(NF4_CODEBOOK) and qw.scales.shape == (6, 2)
    torch.testing.assert_close(qw.scales, w.abs().view(6, 2, 64).amax(-1))
    back = dequantize_weight_ref(qw)
    assert torch.equal(back[0, :64], torch.zeros(64))
    gaps = torch.tensor(NF4_CODEBOOK).diff().max() / 2
    assert ((back - w).abs().view(6, 2, 64) <= gaps * qw.scales[..., None] + 1e-6).all()
    # the nearest level: no other level is closer than the chosen one
    lv = torch.tensor(NF4_CODEBOOK)
    from baichuan_kernels.reference.quant_matmul import _unpack_nibbles
    norm = (w.view(6, 2, 64) / torch.where(qw.scales > 0, qw.scales, 1)[..., None]).reshape(-1, 1)  # [E, 1]
    chosen = (norm[:, 0] - lv[_unpack_nibbles(qw.data).reshape(-1).long()]).abs()
    assert (chosen <= (norm - lv).abs().min(1).values + 1e-7).all()
    sd = qw.state_dict()
    again = QuantizedWeight.from_state_dict(sd)
    assert again.bits == "nf4" and torch.equal(dequantize_weight_ref(again), back)
    with pytest.raises(ValueError, match="zeros must be None for bits='nf4'"):
        QuantizedWeight(qw.data, qw.scales, qw.scales, "nf4", 64, (6, 128), qw.codebook)
    with pytest.raises(ValueError, match="codebook must be None for bits=4"):
        QuantizedWeight(qw.data, qw.scales, qw.scales, 4, 64, (6, 128), qw.codebook)
    with pytest.raises(ValueError, match="bits must be 4, 8 or 'nf4'"):
        bk.quantize_weight(w, bits="fp4")
    with pytest.raises(ValueError, match="group_size 128 must divide K"):
        bk.quantize_weight(w[:, :96], bits="nf4", group_size=128)


# ------------------------------------------------------------------------ QuantLinear / quantize_model
class _Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.W_pack = nn.Linear(d, 3 * d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)


class _MLP(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)


class _Tiny(nn.Module):
    def __init__(self, d=64, f=96, vocab=50):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([nn.ModuleDict({"self_attn": _Attn(d), "mlp": _MLP(d, f),
                                                    "input_layernorm": bk.nn.RMSNorm(d)}) for _ in range(2)])
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        for layer in self.layers:
            a = layer["self_attn"]
            x = layer["input_layernorm"](h)
            h = h + a.o_proj(a.W_pack(x)[..., : x.shape[-1]])
            m = layer["mlp"]
            h = h + m.down_proj(torch.nn.functional.silu(m.gate_proj(h)) * m.up_proj(h))
        return self.lm_head(h)


@pytest.mark.parametrize("bits,group_size", [(8, 128), (4, 32)], ids=["w8", "w4g32"])
def test_quantize_model(bits, group_size, tmp_path):
    torch.manual_seed(0)
    model = _Tiny()
    ref = _Tiny()
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(0, 50, (2, 5))
    assert quantize_model(model, bits, group_size) is model
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    for name in ("W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"):
        hits = [k for k in kinds if k.endswith(name)]
        assert len(hits) == 2 and all(kinds[k] == "QuantLinear" for k in hits)
    assert kinds["lm_head"] == "Linear" and kinds["embed_tokens"] == "Embedding"
    assert kinds["layers.0.input_layernorm"] == "RMSNorm"
    # every QuantLinear computes x @ dequantize(its weight)ᵀ of the original weight's quantization
    for name, mod in ref.named_modules():
        if isinstance(mod, nn.Linear) and name != "lm_head":
            q = model.get_submodule(name)
            assert torch.equal(bk.dequantize_weight(q.qweight),
                               dequantize_weight_ref(bk.quantize_weight(mod.weight, bits=bits, group_size=group_size)))
            with torch.no_grad():
                mod.weight.copy_(bk.dequantize_weight(q.qweight))
    torch.testing.assert_close(model(ids), ref(ids), rtol=1e-5, atol=1e-5)
    # the state dict round-trips (safetensors) into a freshly quantized model
    from safetensors.torch import load_file, save_file
    path = tmp_path / "q.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    other = quantize_model(_Tiny(), bits, group_size)
    other.load_state_dict(load_file(str(path)))
    torch.testing.assert_close(other(ids), model(ids))
    # a dtype cast keeps the scales in fp32 (only activations and unquantized layers change dtype)
    model.to(torch.bfloat16)
    q = model.layers[0]["self_attn"].W_pack
    assert q.scales.dtype == torch.float32 and model.lm_head.weight.dtype == torch.bfloat16
    assert model(ids).dtype == torch.bfloat16


def test_quantize_model_errors():
    m = nn.ModuleDict({"o_proj": nn.Linear(96, 8, bias=True)})
    with pytest.raises(ValueError, match="o_proj has a bias"):
        quantize_model(m, 8)
    m = nn.ModuleDict({"o_proj": nn.Linear(96, 8, bias=False)})
    with pytest.raises(ValueError, match="group_size 64 must divide o_proj.in_features"):
        quantize_model(m, 4, 64)
    with pytest.raises(ValueError, match="bits must be 4, 8 or 'nf4'"):
        quantize_model(m, 3)
    with pytest.raises(ValueError, match="group_size 64 must divide o_proj.in_features"):
        quantize_model(m, "nf4", 64)
    assert isinstance(m["o_proj"], nn.Linear)  # nothing replaced


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_quant_linear_backend(device, backend):
    lin = nn.Linear(64, 24, bias=False).to(device)
    q = bk.nn.QuantLinear.from_linear(lin, bits=4, group_size=32, backend=backend)
    x = make_tensor((2, 3, 64), torch.bfloat16, device, seed=3)
    _skip_unsupported(backend, x)
    torch.testing.assert_close(q(x), quant_matmul_ref(x, q.qweight))


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in bk.available_backends("quant_matmul")])
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    q = bk.nn.QuantLinear.from_linear(nn.Linear(64, 40, bias=False), bits=4, group_size=32, backend=backend)

    def f(x):
        return (q(x) * 2).square().sum()

    x = make_tensor((3, 64), torch.float32, seed=6, requires_grad=True)
    eager = f(x)
    (g_eager,) = torch.autograd.grad(eager, x)
    got = torch.compile(f, fullgraph=True)(x)
    (g_got,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(g_got, g_eager)


@pytest.mark.skipif(not HAS_CPU, reason="extension not built")
def test_cpu_avx2_kernels_too():
    # On an AVX-512 machine the CPU GEMV takes the 16-lane kernels; BAICHUAN_NO_AVX512=1 keeps the AVX2
    # ones (a separate process: the choice is made once). Both must meet the same rule.
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "BAICHUAN_NO_AVX512": "1", "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(Path(__file__)),
                        "-k", "cpu and (matches_float64 or baichuan_width or k_chunks or deterministic)"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout

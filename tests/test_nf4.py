"""The bitsandbytes NF4 format (minitrain/nf4.py): our writer → our reader round trip (with and without
double quantisation) against an independent float64 decode written from the format's spec, the
legacy pickled quant_state, whole checkpoints, bad files; bitsandbytes' own dequantize where it is
importable."""

import json
import math

import pytest
import torch

import baichuan_kernels as bk
from baichuan_kernels.reference.quant_matmul import NF4_CODEBOOK, dequantize_weight_ref
from baichuan_kernels.testing import make_tensor
from minitrain.nf4 import QS_KEY, dynamic_map, from_bnb_legacy_state, from_bnb_nf4, to_bnb_nf4


def decode_spec(t: dict, prefix: str = "") -> torch.Tensor:
    """float64 [N, K] straight from the serialized tensors (flat blocks, high nibble first)."""
    key = f"{prefix}weight"
    meta = json.loads(bytes(t[f"{key}.{QS_KEY}"].tolist()).decode())
    N, K = meta["shape"]
    packed = t[key].reshape(-1).long()
    codes = torch.stack((packed >> 4, packed & 15), dim=1).reshape(-1)[: N * K]  # element 2j = high nibble
    absmax = t[f"{key}.absmax"]
    if f"{key}.nested_absmax" in t:
        bs2 = meta["nested_blocksize"]
        idx = torch.arange(absmax.numel()) // bs2
        absmax = (t[f"{key}.nested_quant_map"].double()[absmax.long()] * t[f"{key}.nested_absmax"].double()[idx]
                  + meta["nested_offset"])
    flat = t[f"{key}.quant_map"].double()[codes] * absmax.double()[torch.arange(N * K) // meta["blocksize"]]
    return flat.view(N, K)


def weight(N=24, K=256, seed=3):
    return make_tensor((N, K), torch.float32, seed=seed, scale=0.05, offset=0.002)


def test_dynamic_map_shape():
    m = dynamic_map()
    assert m.shape == (256,) and m.dtype == torch.float32
    assert -1.0 < m.min() < -0.99 and m.max() == 1.0 and (m.diff() > 0).all()
    assert (m == 0).sum() == 1 and len(set(m.tolist())) == 256


@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "plain-absmax"])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
def test_writer_reader_roundtrip(double_quant, blocksize):
    w = weight()
    t = to_bnb_nf4(w.to(torch.bfloat16), blocksize=blocksize, double_quant=double_quant)
    assert t["weight"].dtype == torch.uint8 and t["weight"].shape == (w.numel() // 2, 1)
    assert t["weight.quant_map"].tolist() == list(NF4_CODEBOOK)
    nblocks = w.numel() // blocksize
    if double_quant:
        assert t["weight.absmax"].dtype == torch.uint8 and t["weight.absmax"].shape == (nblocks,)
        assert t["weight.nested_absmax"].shape == (math.ceil(nblocks / 256),)
        assert t["weight.nested_quant_map"].shape == (256,)
    else:
        assert t["weight.absmax"].dtype == torch.float32 and "weight.nested_absmax" not in t
    meta = json.loads(bytes(t[f"weight.{QS_KEY}"].tolist()).decode())
    assert meta["dtype"] == "bfloat16" and meta["shape"] == list(w.shape) and meta["quant_type"] == "nf4"
    qw = from_bnb_nf4(t)
    assert qw.bits == "nf4" and qw.group_size == min(blocksize, 128) and qw.shape == tuple(w.shape)
    spec = decode_spec(t)
    got = dequantize_weight_ref(qw).double()
    torch.testing.assert_close(got, spec, rtol=1e-6, atol=1e-9)  # fp32 vs float64 decode of one format
    # and the format encodes the weight: NF4 error ≤ half the widest level gap · absmax (+ the nested error)
    wb = w.to(torch.bfloat16).double()
    bound = (torch.tensor(NF4_CODEBOOK).diff().max().item() / 2) * wb.abs().max().item() * 1.05
    assert (got - wb).abs().max() <= bound


def test_prefixed_state_and_matmul_backends():
    w = weight(40, 192)
    t = {f"model.layers.0.mlp.up_proj.{k}": v for k, v in to_bnb_nf4(w).items()}
    qw = from_bnb_nf4(t, "model.layers.0.mlp.up_proj.")
    x = make_tensor((3, 192), torch.float32, seed=4)
    exact = x.double() @ decode_spec(t, "model.layers.0.mlp.up_proj.").T
    for backend in bk.available_backends("quant_matmul"):
        if backend == "cuda":
            continue
        torch.testing.assert_close(bk.quant_matmul(x, qw, backend=backend).double(), exact, rtol=1e-5, atol=1e-5)


def test_legacy_list_state():
    w = weight(8, 128)
    t = to_bnb_nf4(w, blocksize=64, double_quant=True)
    meta = json.loads(bytes(t[f"weight.{QS_KEY}"].tolist()).decode())
    state2 = [t["weight.nested_absmax"], t["weight.nested_quant_map"], meta["nested_blocksize"], False,
              torch.float32, None, None]
    state = [t["weight.absmax"], torch.Size(meta["shape"]), torch.float32, 64,
             [torch.tensor(meta["nested_offset"]), state2], "nf4"]
    qw = from_bnb_legacy_state(t["weight"], state)
    torch.testing.assert_close(dequantize_weight_ref(qw).double(), decode_spec(t), rtol=1e-6, atol=1e-9)


def test_bad_states():
    w = weight(8, 96)
    with pytest.raises(ValueError, match="blocksize 64 must divide K = 96"):
        from_bnb_nf4(to_bnb_nf4(w, blocksize=64))  # blocks would straddle rows
    t = to_bnb_nf4(weight(8, 128))
    with pytest.raises(ValueError, match="missing 'weight.absmax'"):
        from_bnb_nf4({k: v for k, v in t.items() if k != "weight.absmax"})
    bad = dict(t)
    meta = json.loads(bytes(t[f"weight.{QS_KEY}"].tolist()).decode())
    bad[f"weight.{QS_KEY}"] = torch.tensor(list(json.dumps({**meta, "quant_type": "fp4"}).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="only quant_type 'nf4'"):
        from_bnb_nf4(bad)
    with pytest.raises(ValueError, match="nested statistics are missing"):
        from_bnb_nf4({k: v for k, v in t.items() if "nested" not in k})
    with pytest.raises(ValueError, match="absmax has"):
        from_bnb_nf4({**t, "weight.absmax": t["weight.absmax"][:-1]})
    with pytest.raises(ValueError, match="blocksize 96 must be 32, 64, 128 or a multiple of 128"):
        from_bnb_nf4(to_bnb_nf4(weight(8, 192), blocksize=96))


def test_checkpoint_loads_into_our_model(tmp_path):
    from dataclasses import replace

    from minitrain.generate import GREEDY, generate
    from minitrain.hf import save_hf_checkpoint
    from minitrain.nf4 import load_bnb_nf4_checkpoint
    from test_quantize_cli import PROJ, PROMPTS, build

    model = build()
    save_hf_checkpoint(model, tmp_path)
    from safetensors.torch import load_file, save_file

    file = next(tmp_path.glob("*.safetensors"))
    sd = load_file(str(file))
    for key in [k for k in sd if k.rsplit(".", 2)[-2] in PROJ]:
        prefix = key[: -len("weight")]
        sd.update({prefix + k: v for k, v in to_bnb_nf4(sd.pop(key)).items()})
    save_file(sd, str(file))
    loaded = load_bnb_nf4_checkpoint(tmp_path)
    # the same model with every projection replaced by its decoded NF4 weight
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.rsplit(".", 1)[-1] in PROJ:
                mod.weight.copy_(decode_spec({k[len(name) + 1:]: v for k, v in sd.items()
                                              if k.startswith(name + ".")}).float())
    ids = torch.tensor([PROMPTS[0]])
    assert {type(loaded.get_submodule(n)).__name__ for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in PROJ} \
        == {"QuantLinear"}
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    cfg = replace(GREEDY, max_new_tokens=6)
    assert generate(loaded, PROMPTS, cfg) == generate(model, PROMPTS, cfg)


@pytest.mark.cuda
def test_against_bitsandbytes_dequantize():
    bnb = pytest.importorskip("bitsandbytes")
    if not torch.cuda.is_available():
        pytest.skip("bitsandbytes' NF4 kernels need a GPU")
    import bitsandbytes.functional as bf

    w = weight(64, 256).cuda().half()
    packed, state = bf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    tensors = {"weight": packed.cpu(), **{f"weight.{k}": v.cpu() for k, v in state.as_dict(packed=True).items()}}
    ours = dequantize_weight_ref(from_bnb_nf4(tensors))
    theirs = bf.dequantize_4bit(packed, state).float().cpu()
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3)  # theirs is rounded to fp16
    assert bnb is not None

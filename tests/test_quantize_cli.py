"""Quantized models (minitrain/quantized.py): ``python -m minitrain quantize``, the quantized model file,
and ``python -m minitrain generate`` on a quantized file or with ``--bits`` (quantize on load)."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from baichuan_kernels.nn import QuantLinear
from minitrain.__main__ import main
from minitrain.config import PRESETS
from minitrain.generate import GREEDY, generate
from minitrain.hf import save_checkpoint, save_hf_checkpoint
from minitrain.model import Baichuan2
from minitrain.quantized import is_quantized_file, load_quantized_model, quantize, save_quantized_model

ROOT = Path(__file__).resolve().parents[1]
# every quantized in_features (64, 128) is a multiple of the int4 group sizes used here
TINY = dataclasses.replace(PRESETS["tiny-rope"], hidden_size=64, num_heads=2, intermediate_size=128, num_layers=2,
                           vocab_size=256, max_position_embeddings=32, seq_len=32)
PROMPTS = [[1, 17, 33, 250, 9], [1, 5]]
PROJ = ("W_pack", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(dtype=torch.float32):
    torch.manual_seed(0)
    model = Baichuan2(TINY).to(dtype)
    with torch.no_grad():  # a sharper head than the init's, so greedy paths are not flat
        model.model.norm.weight.fill_(4.0)
    return model.eval()


def quant_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("bits, group_size", [(4, 32), (4, 64), (8, 128), ("nf4", 64)])
def test_save_load_roundtrip(bits, group_size, tmp_path):
    model = quantize(build(), bits, group_size)
    qm = quant_modules(model)
    assert len(qm) == 5 * TINY.num_layers and {n.rsplit(".", 1)[1] for n in qm} == set(PROJ)
    assert type(model.lm_head).__name__ == "NormHead" and isinstance(model.model.embed_tokens, torch.nn.Embedding)
    file = tmp_path / "q.safetensors"
    save_quantized_model(model, file)
    assert is_quantized_file(file)
    loaded = load_quantized_model(file)
    assert loaded.config == model.config
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd[k].dtype == sd2[k].dtype and torch.equal(sd[k], sd2[k]), k
    lq = quant_modules(loaded)
    assert lq.keys() == qm.keys()
    for n, m in qm.items():
        assert (lq[n].bits, lq[n].group_size, lq[n].backend) == (m.bits, m.group_size, m.backend)
        assert lq[n].scales.dtype == torch.float32
    ids = torch.tensor([[1, 17, 33, 250, 9, 4, 71]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    # the unquantized dtype may change on load; the quantized buffers stay as saved
    as_bf16 = load_quantized_model(file, dtype=torch.bfloat16)
    assert as_bf16.lm_head.weight.dtype == torch.bfloat16
    for n, m in quant_modules(as_bf16).items():
        assert torch.equal(m.qdata, qm[n].qdata) and torch.equal(m.scales, qm[n].scales)


def test_not_quantized_files(tmp_path):
    model = build()
    save_checkpoint(model, tmp_path / "m.pt")
    assert not is_quantized_file(tmp_path / "m.pt") and not is_quantized_file(tmp_path)
    with pytest.raises(ValueError, match="not a minitrain quantized model file"):
        load_quantized_model(tmp_path / "m.pt")
    with pytest.raises(ValueError, match="no QuantLinear"):
        save_quantized_model(model, tmp_path / "x.safetensors")


@pytest.mark.parametrize("bits, group_size", [(4, 32), (8, 128), ("nf4", 32)])
def test_greedy_quantized_equals_recompute(bits, group_size):
    model = quantize(build(torch.float64), bits, group_size)
    n = 5
    out = generate(model, PROMPTS, dataclasses.replace(GREEDY, max_new_tokens=n, eos_token_id=None))
    for prompt, got in zip(PROMPTS, out):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(n):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        assert got == seq[len(prompt):]


def _tokens(text):
    return [int(t) for t in text.split()]


def test_cli_end_to_end(tmp_path, capsys):
    model = build()
    save_hf_checkpoint(model, tmp_path / "hf")
    out = tmp_path / "q4.safetensors"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "minitrain", "quantize", str(tmp_path / "hf"), str(out),
                        "--bits", "4", "--group-size", "32"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "4-bit" in r.stdout and is_quantized_file(out)
    expected_model = quantize(build(), 4, 32)
    loaded = load_quantized_model(out)
    for k, v in expected_model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k

    prompt, n = PROMPTS[0], 4
    want = generate(expected_model, [prompt], dataclasses.replace(GREEDY, max_new_tokens=n, eos_token_id=None))[0]
    common = ["--prompt-ids", " ".join(map(str, prompt)), "--greedy", "--max-new-tokens", str(n), "--no-eos-stop"]
    assert main(["generate", str(out), *common]) == 0  # the quantized file, detected
    assert _tokens(capsys.readouterr().out) == want
    # an fp model quantized on load (minitrain .pt source) gives the same tokens
    save_checkpoint(model, tmp_path / "m.pt")
    assert main(["generate", str(tmp_path / "m.pt"), "--bits", "4", "--group-size", "32", *common]) == 0
    assert _tokens(capsys.readouterr().out) == want
    # and the quantize subcommand also reads minitrain files (8 bits)
    assert main(["quantize", str(tmp_path / "m.pt"), str(tmp_path / "q8.safetensors"), "--bits", "8"]) == 0
    q8 = load_quantized_model(tmp_path / "q8.safetensors")
    assert {(m.bits, m.group_size) for m in quant_modules(q8).values()} == {(8, TINY.intermediate_size),
                                                                          (8, TINY.hidden_size)}


def test_cli_errors(tmp_path, capsys):
    save_checkpoint(build(), tmp_path / "m.pt")
    src, dst = str(tmp_path / "m.pt"), str(tmp_path / "q.safetensors")
    for argv in (["quantize", src, dst, "--bits", "3"],
                 ["generate", src, "--prompt-ids", "1", "--bits", "16"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "--bits" in err and "invalid choice" in err
    with pytest.raises(SystemExit):
        main(["quantize", src, dst])  # --bits is required
    assert "--bits" in capsys.readouterr().err
    assert main(["quantize", src, dst, "--bits", "4", "--group-size", "48"]) == 2
    assert "group_size" in capsys.readouterr().err and not os.path.exists(dst)
    assert main(["quantize", src, dst, "--bits", "4", "--group-size", "32"]) == 0
    capsys.readouterr()
    assert main(["generate", dst, "--prompt-ids", "1", "--bits", "8"]) == 2
    assert "already quantized" in capsys.readouterr().err


def test_cli_nf4_and_tokens_per_s(tmp_path, capsys):
    # --bits nf4 on load and through `quantize`; a bitsandbytes NF4 directory (quantization_config) is
    # detected and read; every generate run reports its decode tokens/s on stderr.
    import json

    from safetensors.torch import load_file, save_file

    from minitrain.nf4 import is_bnb_nf4_checkpoint, to_bnb_nf4

    model = build()
    save_checkpoint(model, tmp_path / "m.pt")
    prompt, n = PROMPTS[0], 5
    common = ["--prompt-ids", " ".join(map(str, prompt)), "--greedy", "--max-new-tokens", str(n), "--no-eos-stop"]
    want = generate(quantize(build(), "nf4", 64), [prompt],
                    dataclasses.replace(GREEDY, max_new_tokens=n, eos_token_id=None))[0]
    assert main(["generate", str(tmp_path / "m.pt"), "--bits", "nf4", "--group-size", "64", *common]) == 0
    cap = capsys.readouterr()
    assert _tokens(cap.out) == want
    assert f"generated {n} tokens" in cap.err and "decode" in cap.err and "tokens/s" in cap.err
    assert main(["quantize", str(tmp_path / "m.pt"), str(tmp_path / "nf4.safetensors"), "--bits", "nf4",
                 "--group-size", "64"]) == 0
    assert "NF4" in capsys.readouterr().out
    assert main(["generate", str(tmp_path / "nf4.safetensors"), *common]) == 0
    assert _tokens(capsys.readouterr().out) == want

    hf = tmp_path / "hf4"
    save_hf_checkpoint(model, hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["quantization_config"] = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                                  "bnb_4bit_compute_dtype": "bfloat16"}
    (hf / "config.json").write_text(json.dumps(cfg))
    file = next(hf.glob("*.safetensors"))
    sd = load_file(str(file))
    for key in [k for k in sd if k.rsplit(".", 2)[-2] in PROJ]:
        sd.update({key[: -len("weight")] + k: v for k, v in to_bnb_nf4(sd.pop(key)).items()})
    save_file(sd, str(file))
    assert is_bnb_nf4_checkpoint(hf) and not is_bnb_nf4_checkpoint(tmp_path / "m.pt")
    assert main(["generate", str(hf), *common]) == 0
    cap = capsys.readouterr()
    assert len(_tokens(cap.out)) == n and "tokens/s" in cap.err
    assert main(["generate", str(hf), "--bits", "4", *common]) == 2
    assert "already NF4-quantized" in capsys.readouterr().err

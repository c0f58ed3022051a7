"""KV-cache generation (minitrain/generate.py) and the ``python -m minitrain`` CLI."""

import dataclasses

import pytest
import torch

import baichuan_kernels as bk
from minitrain.__main__ import main
from minitrain.config import PRESETS
from minitrain.generate import CHAT_DEFAULTS, GREEDY, GenerationConfig, generate, generate_stream, process_logits
from minitrain.hf import save_hf_checkpoint
from minitrain.model import Baichuan2

TINY = {pe: dataclasses.replace(PRESETS[f"tiny-{pe}"], hidden_size=64, num_heads=2, intermediate_size=176,
                                num_layers=2, vocab_size=256, max_position_embeddings=16)
        for pe in ("rope", "alibi")}
PROMPTS = [[1, 17, 33, 250, 9, 4, 71], [1, 5], [1, 200, 3, 3]]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(cfg, dtype=torch.float64):
    torch.manual_seed(0)
    model = Baichuan2(cfg).to(dtype)
    with torch.no_grad():  # a sharper head than the init's, so greedy paths are not flat
        model.model.norm.weight.fill_(4.0)
    return model.eval()


def greedy_by_recompute(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


def _decode_cases():
    cases = [pytest.param("auto", (), id="auto")]
    for b in bk.available_backends("decode_attention"):
        if b != "reference":
            cases.append(pytest.param("auto", (("decode_attention", b),), id=f"decode_attention={b}"))
    cases.append(pytest.param("reference", (), id="reference"))
    return cases


@pytest.mark.parametrize("pos_emb", ["rope", "alibi"])
@pytest.mark.parametrize("backend, overrides", _decode_cases())
def test_greedy_with_cache_equals_full_recompute(pos_emb, backend, overrides):
    # 7 + 12 tokens run past the 16-row RoPE table: it is extended on the way
    cfg = dataclasses.replace(TINY[pos_emb], backend=backend, backend_overrides=overrides)
    model = build(cfg, torch.float32 if overrides else torch.float64)
    cfg_gen = dataclasses.replace(GREEDY, max_new_tokens=12, eos_token_id=None)
    try:
        out = generate(model, PROMPTS, cfg_gen)
    except ValueError as exc:
        if "cannot run these inputs" in str(exc):
            pytest.skip(str(exc))
        raise
    for prompt, got in zip(PROMPTS, out):
        assert got == greedy_by_recompute(model, prompt, 12)


@pytest.mark.parametrize("pos_emb", ["rope", "alibi"])
def test_cached_logits_equal_forward_logits(pos_emb):
    model = build(TINY[pos_emb])
    prompts = [torch.tensor(p) for p in PROMPTS]
    cache = model.new_kv_cache(len(prompts), 12)
    logits = model.prefill(prompts, cache)
    for b, p in enumerate(prompts):
        torch.testing.assert_close(logits[b], model(p[None]).logits[0, -1])
    nxt = torch.tensor([3, 4, 5])
    logits = model.decode_step(nxt, cache)
    assert cache.seqlens.tolist() == [len(p) + 1 for p in prompts]
    for b, p in enumerate(prompts):
        full = torch.cat([p, nxt[b:b + 1]])
        torch.testing.assert_close(logits[b], model(full[None]).logits[0, -1])


def test_stops_at_eos_and_streams():
    model = build(TINY["alibi"])
    free = generate(model, [PROMPTS[0]], dataclasses.replace(GREEDY, max_new_tokens=6, eos_token_id=None))[0]
    eos = free[2]
    assert eos not in free[:2]
    seen = []
    out = generate(model, PROMPTS[:2], dataclasses.replace(GREEDY, max_new_tokens=6, eos_token_id=eos),
                   on_token=lambda row, tok: seen.append((row, tok)))
    assert out[0] == free[:3]  # eos included, then row 0 stops
    assert [t for r, t in seen if r == 0] == out[0] and [t for r, t in seen if r == 1] == out[1]
    steps = list(generate_stream(model, [PROMPTS[1]], dataclasses.replace(GREEDY, max_new_tokens=4)))
    assert len(steps) <= 4 and all(tokens.shape == (1,) for tokens, _ in steps)


def test_sampling_is_seeded_and_respects_top_k():
    model = build(TINY["rope"])
    cfg = dataclasses.replace(CHAT_DEFAULTS, max_new_tokens=8, eos_token_id=None, temperature=5.0, top_p=1.0)
    a = generate(model, PROMPTS, cfg, generator=torch.Generator().manual_seed(1))
    b = generate(model, PROMPTS, cfg, generator=torch.Generator().manual_seed(1))
    assert a == b
    assert (CHAT_DEFAULTS.temperature, CHAT_DEFAULTS.top_k, CHAT_DEFAULTS.top_p,
            CHAT_DEFAULTS.repetition_penalty, CHAT_DEFAULTS.do_sample) == (0.3, 5, 0.85, 1.05, True)


def test_process_logits():
    logits = torch.tensor([[4.0, 2.0, -1.0, 0.5, -3.0]])
    seen = torch.tensor([[True, False, True, False, False]])
    cfg = GenerationConfig(do_sample=False, repetition_penalty=2.0)
    torch.testing.assert_close(process_logits(logits, seen, cfg), torch.tensor([[2.0, 2.0, -2.0, 0.5, -3.0]]))
    no_seen = torch.zeros_like(seen)
    top_k = process_logits(logits, no_seen, GenerationConfig(temperature=1.0, top_k=2, top_p=1.0, repetition_penalty=1.0))
    assert torch.isfinite(top_k).tolist() == [[True, True, False, False, False]]
    probs = logits.softmax(-1)[0]  # 0.86, 0.12, ...: top_p 0.9 keeps the two best
    assert probs[0] < 0.9 < probs[0] + probs[1]
    top_p = process_logits(logits, no_seen, GenerationConfig(temperature=1.0, top_k=0, top_p=0.9, repetition_penalty=1.0))
    assert torch.isfinite(top_p).tolist() == [[True, True, False, False, False]]
    tiny_p = process_logits(logits, no_seen, GenerationConfig(temperature=1.0, top_k=0, top_p=0.01, repetition_penalty=1.0))
    assert torch.isfinite(tiny_p).sum() == 1  # always keeps at least the best token
    scaled = process_logits(logits, no_seen, GenerationConfig(temperature=0.5, top_k=0, top_p=1.0, repetition_penalty=1.0))
    torch.testing.assert_close(scaled, logits * 2)


def test_bad_generation_inputs():
    model = build(TINY["rope"])
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], GREEDY)
    with pytest.raises(ValueError, match="token ids"):
        generate(model, [[1, 999]], GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0.0)


def test_cli_generate_and_convert(tmp_path, capsys):
    model = build(TINY["rope"], torch.float32)
    save_hf_checkpoint(model, tmp_path / "hf")
    want = greedy_by_recompute(model, [1, 5, 6], 5)
    assert main(["generate", str(tmp_path / "hf"), "--prompt-ids", "1 5 6", "--greedy",
                 "--max-new-tokens", "5", "--no-eos-stop"]) == 0
    assert [int(t) for t in capsys.readouterr().out.split()] == want
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.pt")]) == 0
    assert main(["convert", str(tmp_path / "m.pt"), str(tmp_path / "hf2"), "--bin", "--dtype", "bf16"]) == 0
    assert (tmp_path / "hf2" / "pytorch_model.bin").is_file()
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "m.pt"), "--prompt-ids", "1,5,6", "--greedy",
                 "--max-new-tokens", "5", "--no-eos-stop", "--backend", "reference"]) == 0
    assert [int(t) for t in capsys.readouterr().out.split()] == want


def test_bench_decode_cpu(tmp_path, capsys):
    # `python -m minitrain bench-decode` on the CPU: a tiny preset, bf16 and NF4 projections, two batches.
    import json

    from minitrain.__main__ import main

    out = tmp_path / "decode.json"
    assert main(["bench-decode", "--preset", "tiny-rope", "--layers", "1", "--bits", "bf16", "nf4", "--batch", "1", "2",
                 "--prompt", "4", "--steps", "3", "--dtype", "fp32", "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("tokens/s") == 4 and "nf4" in printed
    res = json.loads(out.read_text())
    assert [(r["bits"], r["batch"]) for r in res["results"]] == [("bf16", 1), ("bf16", 2), ("nf4", 1), ("nf4", 2)]
    assert all(r["tokens_per_s"] > 0 for r in res["results"])

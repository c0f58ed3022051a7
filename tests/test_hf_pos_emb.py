"""RoPE vs ALiBi on HF import (minitrain/hf_pos_emb.py, issue 17): decided from evidence, never guessed.

Each evidence source alone, each pair in conflict, no evidence, the released 7B/13B config.json layouts
(BAICHUAN2_SPEC.md §1), the override, the log line, rotary buffers in the state dict, the CLI flag, and
export → import round trips for both encodings."""

import dataclasses
import itertools
import logging

import pytest
import torch

from minitrain.__main__ import main
from minitrain.config import PRESETS
from minitrain.hf import (
    CheckpointMismatchError,
    PositionEncodingError,
    config_from_hf,
    load_hf_checkpoint,
    load_model,
    save_checkpoint,
    save_hf_checkpoint,
)
from minitrain.hf_pos_emb import decide_pos_emb, modeling_file_evidence
from minitrain.model import Baichuan2
from tests.test_hf import MODELING, TINY, hf_config_json, official_keys, write_official_checkpoint

OVERRIDE_HINTS = ("--pos-emb rope|alibi", "pos_emb=")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def released_config_json(size):
    """config.json of the released Baichuan2-7B / -13B, field for field from BAICHUAN2_SPEC.md §1."""
    big = size == "13b"
    d = {"architectures": ["BaichuanForCausalLM"],
         "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                      "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
         "tokenizer_class": "BaichuanTokenizer", "model_type": "baichuan", "vocab_size": 125696,
         "hidden_size": 5120 if big else 4096, "intermediate_size": 13696 if big else 11008,
         "num_hidden_layers": 40 if big else 32, "num_attention_heads": 40 if big else 32, "hidden_act": "silu",
         "model_max_length": 4096, "rms_norm_eps": 1e-06, "initializer_range": 0.02, "pad_token_id": 0,
         "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
         "use_cache": True, "transformers_version": "4.29.2"}
    if not big:
        d["max_position_embeddings"] = 4096  # the RoPE table; the 13B file has no such field
    return d


# Evidence sources, each writable alone into (config dict, directory, state-dict keys) for a tiny model
# whose shapes are not released ones: "field" (config.json pos_emb), "file" (modeling_baichuan.py),
# "key" (a rotary_emb.inv_freq key; RoPE only).
def setup(tmp_path, field=None, file=None, key=None, base="rope"):
    d = hf_config_json(TINY[base])
    d["max_position_embeddings"] = 256  # present in every case: it must decide nothing
    if field is not None:
        d["pos_emb"] = field
    if file is not None:
        (tmp_path / "modeling_baichuan.py").write_text(MODELING[file])
    keys = official_keys(2) + (["model.layers.0.self_attn.rotary_emb.inv_freq"] if key else [])
    return d, keys


def decide(d, tmp_path, keys, **kw):
    return config_from_hf(d, directory=tmp_path, state_dict_keys=keys, **kw).pos_emb


@pytest.mark.parametrize("source,value", [("field", "rope"), ("field", "alibi"), ("file", "rope"),
                                          ("file", "alibi"), ("key", "rope")])
def test_each_source_alone_decides(tmp_path, caplog, source, value):
    d, keys = setup(tmp_path, **{source: value if source != "key" else True})
    caplog.set_level(logging.INFO, logger="minitrain.hf")
    assert decide(d, tmp_path, keys) == value
    want = {"field": "config.json's pos_emb field", "file": "modeling_baichuan.py",
            "key": "rotary buffer model.layers.0.self_attn.rotary_emb.inv_freq"}[source]
    lines = [r.getMessage() for r in caplog.records if r.name == "minitrain.hf"]
    assert len(lines) == 1 and lines[0].startswith(f"position encoding: {value} (from ") and want in lines[0]


@pytest.mark.parametrize("size,pos_emb", [("7b", "rope"), ("13b", "alibi")])
def test_released_layouts(tmp_path, caplog, size, pos_emb):
    """The released config.json alone (shapes), with its modeling file, and the 13B with a
    max_position_embeddings field added by a tool: the right encoding every time."""
    d = released_config_json(size)
    caplog.set_level(logging.INFO, logger="minitrain.hf")
    cfg = config_from_hf(d)
    assert cfg == dataclasses.replace(PRESETS[size], backend=cfg.backend)
    assert "released Baichuan2-" + size.upper() in caplog.records[-1].getMessage()
    (tmp_path / "modeling_baichuan.py").write_text(MODELING[pos_emb])
    assert decide(d, tmp_path, official_keys(PRESETS[size].num_layers)) == pos_emb
    assert "modeling_baichuan.py" in caplog.records[-1].getMessage()
    assert "agrees with the released" in caplog.records[-1].getMessage()
    if size == "13b":
        assert config_from_hf({**d, "max_position_embeddings": 4096}).pos_emb == "alibi"
    else:  # the 7B without its RoPE-table field is still the 7B
        assert config_from_hf({k: v for k, v in d.items() if k != "max_position_embeddings"}).pos_emb == "rope"


SOURCES = {  # name -> (how to write it for "rope"/"alibi", the phrase naming it in the error)
    "field": "config.json's pos_emb field",
    "file": "modeling_baichuan.py",
    "key": "rotary buffer",
    "shapes": "released Baichuan2-",
}


def _conflict_setup(tmp_path, a, b):
    """Source a says rope, source b says alibi (or the reverse when a can only say alibi)."""
    says = {a: "rope", b: "alibi"} if a != "shapes" else {a: "alibi", b: "rope"}
    if "key" in says and says["key"] == "alibi":  # a rotary key can only say rope
        says = {k: ("rope" if v == "alibi" else "alibi") for k, v in says.items()}
    d = (released_config_json("7b" if says.get("shapes") == "rope" else "13b") if "shapes" in says
         else hf_config_json(TINY["rope"]))
    d.pop("max_position_embeddings", None)
    if "field" in says:
        d["pos_emb"] = says["field"]
    if "file" in says:
        (tmp_path / "modeling_baichuan.py").write_text(MODELING[says["file"]])
    keys = official_keys(2) + (["model.layers.0.self_attn.rotary_emb.inv_freq"] if "key" in says else [])
    return d, keys, says


@pytest.mark.parametrize("a,b", list(itertools.combinations(SOURCES, 2)))
def test_each_conflict_raises_naming_both_and_the_override(tmp_path, caplog, a, b):
    d, keys, says = _conflict_setup(tmp_path, a, b)
    assert len(set(says.values())) == 2
    with pytest.raises(PositionEncodingError) as info:
        decide(d, tmp_path, keys)
    msg = str(info.value)
    assert "conflicting evidence" in msg and SOURCES[a] in msg and SOURCES[b] in msg
    assert all(h in msg for h in OVERRIDE_HINTS), msg
    # the override wins, with a warning naming the evidence it overrides
    caplog.set_level(logging.INFO, logger="minitrain.hf")
    for pos_emb in ("rope", "alibi"):
        caplog.clear()
        assert decide(d, tmp_path, keys, pos_emb=pos_emb) == pos_emb
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "overrides" in warnings[0]
        assert caplog.records[-1].getMessage().startswith(f"position encoding: {pos_emb} (from the pos_emb= override")


def test_no_evidence_raises_instead_of_guessing(tmp_path):
    for base in ("rope", "alibi"):  # max_position_embeddings present and absent: neither decides
        for d in (hf_config_json(TINY[base]), {**hf_config_json(TINY[base]), "max_position_embeddings": 256}):
            for kwargs in ({}, {"directory": tmp_path, "state_dict_keys": official_keys(2)}):
                with pytest.raises(PositionEncodingError) as info:
                    config_from_hf(d, **kwargs)
                msg = str(info.value)
                assert "no evidence" in msg and "max_position_embeddings alone does not decide" in msg
                assert all(h in msg for h in OVERRIDE_HINTS), msg


def test_modeling_file_detection_is_robust(tmp_path):
    f = tmp_path / "modeling_baichuan.py"
    cases = {
        MODELING["rope"]: "rope",
        MODELING["alibi"]: "alibi",
        MODELING["rope"] + MODELING["alibi"]: None,  # builds both: no evidence
        "# the alibi mask and the rotary_emb are built elsewhere\nx = 'alibi rotary'\n": None,  # comment/str only
        "import torch\n\nclass Attention:\n    pass\n": None,  # neither
        "def broken(:\n    _gen_alibi_mask\n": None,  # does not parse
        "class property_holder:\n    rope_theta = 1\n": None,  # 'rope'/'property' are not rotary evidence
    }
    for text, want in cases.items():
        f.write_text(text)
        got, why = modeling_file_evidence(f)
        assert got == want, (text, why)
        assert "modeling_baichuan.py" in why
    f.write_text(MODELING["rope"] + MODELING["alibi"])
    d = hf_config_json(TINY["alibi"])
    with pytest.raises(PositionEncodingError, match="builds both an ALiBi mask"):  # reason kept in the error
        config_from_hf(d, directory=tmp_path)
    # the module config.json's auto_map names is read too
    f.unlink()
    (tmp_path / "my_modeling.py").write_text(MODELING["alibi"])
    d["auto_map"] = {"AutoModelForCausalLM": "someone/repo--my_modeling.BaichuanForCausalLM"}
    assert config_from_hf(d, directory=tmp_path).pos_emb == "alibi"
    d["auto_map"] = {"AutoModelForCausalLM": "../../etc/passwd.X"}  # not a module name: ignored
    with pytest.raises(PositionEncodingError, match="no evidence"):
        config_from_hf(d, directory=tmp_path)


def test_bad_values_are_value_errors(tmp_path):
    d = hf_config_json(TINY["rope"])
    with pytest.raises(ValueError, match="pos_emb must be 'rope' or 'alibi'"):
        config_from_hf(d, pos_emb="learned")
    with pytest.raises(ValueError, match="config.json's pos_emb must be 'rope' or 'alibi'"):
        config_from_hf({**d, "pos_emb": "none"})
    with pytest.raises(ValueError, match="config.json's pos_emb"):  # even when overridden
        decide_pos_emb({**d, "pos_emb": "none"}, override="rope")
    with pytest.raises(PositionEncodingError, match="no evidence"):  # JSON null: absent, not a value
        config_from_hf({**d, "pos_emb": None})


def test_issue_case_13b_config_with_max_position_embeddings(tmp_path):
    """The issue: a small 13B-layout checkpoint (5 heads, 2 layers) shipped with its ALiBi modeling file,
    whose config.json carries max_position_embeddings, loaded as RoPE. Now: ALiBi; without the modeling
    file: an error, never RoPE."""
    cfg = dataclasses.replace(TINY["alibi"], hidden_size=80, num_heads=5, intermediate_size=256)
    tensors = write_official_checkpoint(tmp_path, cfg, fmt="bin", shards=1,
                                        config_extra={"max_position_embeddings": 4096})
    model = load_hf_checkpoint(tmp_path, dtype=torch.float32, backend="reference")
    assert model.config.pos_emb == "alibi" and model.alibi is not None and model.rotary is None
    ref = Baichuan2(dataclasses.replace(model.config))
    ref.load_state_dict({k: t.float() for k, t in tensors.items()})
    ids = torch.randint(1, cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    (tmp_path / "modeling_baichuan.py").unlink()
    with pytest.raises(PositionEncodingError, match="no evidence"):
        load_hf_checkpoint(tmp_path)
    assert load_hf_checkpoint(tmp_path, pos_emb="alibi").config.pos_emb == "alibi"


@pytest.mark.parametrize("pos_emb", ["rope", "alibi"])
@pytest.mark.parametrize("safetensors", [True, False])
def test_export_import_round_trip(tmp_path, caplog, pos_emb, safetensors):
    torch.manual_seed(0)
    model = Baichuan2(TINY[pos_emb])
    save_hf_checkpoint(model, tmp_path / "hf", safetensors=safetensors, max_shard_size=40_000)
    caplog.set_level(logging.INFO, logger="minitrain.hf")
    back = load_hf_checkpoint(tmp_path / "hf")
    assert back.config == model.config
    assert f"position encoding: {pos_emb} (from config.json's pos_emb field)" in caplog.records[-1].getMessage()
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    # the minitrain file format keeps its explicit config; a contradicting override is refused
    save_checkpoint(model, tmp_path / "m.pt")
    assert load_model(tmp_path / "m.pt", pos_emb=pos_emb).config == model.config
    with pytest.raises(PositionEncodingError, match="minitrain file"):
        load_model(tmp_path / "m.pt", pos_emb="alibi" if pos_emb == "rope" else "rope")


def test_rotary_buffers_in_the_state_dict(tmp_path):
    """A key ending rotary_emb.inv_freq is RoPE evidence; it is checked against our frequencies and not loaded."""
    cfg = TINY["rope"]
    tensors = write_official_checkpoint(tmp_path, cfg, fmt="safetensors", shards=1, modeling=None)
    from safetensors.torch import save_file

    dh = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dh, 2).float() / dh))
    extra = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq.clone() for i in range(cfg.num_layers)}
    save_file({**tensors, **extra}, str(tmp_path / "model.safetensors"))
    model = load_hf_checkpoint(tmp_path)
    assert model.config.pos_emb == "rope" and model.lm_head.weight.dtype == torch.bfloat16
    assert sorted(model.state_dict()) == sorted(tensors)
    save_file({**tensors, **{k: v * 1.01 for k, v in extra.items()}}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="not the RoPE frequency table"):
        load_hf_checkpoint(tmp_path)
    save_file({**tensors, **extra}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="unexpected keys"):  # an ALiBi model has no use for them
        load_hf_checkpoint(tmp_path, pos_emb="alibi")


def test_explicit_config_is_the_override(tmp_path, caplog):
    write_official_checkpoint(tmp_path, TINY["rope"], fmt="safetensors", shards=1)  # modeling file: rope
    caplog.set_level(logging.INFO, logger="minitrain.hf")
    assert load_hf_checkpoint(tmp_path, config=TINY["rope"]).config == TINY["rope"]
    assert "from the config= argument" in caplog.records[-1].getMessage()
    caplog.clear()
    load_hf_checkpoint(tmp_path, config=TINY["alibi"])
    assert any(r.levelno == logging.WARNING and "overrides modeling_baichuan.py" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(PositionEncodingError, match="contradicts the given config"):
        load_hf_checkpoint(tmp_path, config=TINY["rope"], pos_emb="alibi")


def test_cli_pos_emb_flag(tmp_path, capsys):
    write_official_checkpoint(tmp_path / "hf", TINY["alibi"], fmt="safetensors", shards=1, modeling=None)
    for argv in (["convert", str(tmp_path / "hf"), str(tmp_path / "m.pt")],
                 ["quantize", str(tmp_path / "hf"), str(tmp_path / "q.safetensors"), "--bits", "8"],
                 ["generate", str(tmp_path / "hf"), "--prompt-ids", "1 2", "--max-new-tokens", "1"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: cannot tell whether") and "--pos-emb rope|alibi" in err, err
        assert not (tmp_path / "m.pt").exists() and not (tmp_path / "q.safetensors").exists()
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.pt"), "--pos-emb", "alibi"]) == 0
    err = capsys.readouterr().err
    assert "minitrain.hf: position encoding: alibi (from the pos_emb= override)" in err, err
    assert load_model(tmp_path / "m.pt").config.pos_emb == "alibi"
    assert main(["quantize", str(tmp_path / "m.pt"), str(tmp_path / "q.safetensors"), "--bits", "8"]) == 0
    capsys.readouterr()
    for src in ("m.pt", "q.safetensors"):  # files with their own config refuse a contradicting flag
        assert main(["generate", str(tmp_path / src), "--prompt-ids", "1 2", "--max-new-tokens", "1",
                     "--pos-emb", "rope"]) == 2
        assert "minitrain file whose config says pos_emb='alibi'" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "hf"), "--prompt-ids", "1 2", "--max-new-tokens", "2", "--greedy",
                 "--pos-emb", "alibi"]) == 0
    out = capsys.readouterr()
    assert len(out.out.split()) == 2 and "position encoding: alibi" in out.err

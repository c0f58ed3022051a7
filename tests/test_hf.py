"""HF Baichuan 2 checkpoints (minitrain/hf.py): the official key names and config fields, written by
the tests themselves (tiny configs), both file formats, single and sharded, round-tripped exactly."""

import dataclasses
import json

import pytest
import torch

from minitrain.config import PRESETS
from minitrain.hf import (
    CheckpointMismatchError,
    config_from_hf,
    config_to_hf,
    load_hf_checkpoint,
    load_model,
    read_hf_state_dict,
    save_checkpoint,
    save_hf_checkpoint,
)
from minitrain.model import Baichuan2

TINY = {pe: dataclasses.replace(PRESETS[f"tiny-{pe}"], hidden_size=64, num_heads=2, intermediate_size=176,
                                num_layers=2, vocab_size=256)
        for pe in ("rope", "alibi")}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def official_keys(num_layers):
    keys = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(num_layers):
        keys += [f"model.layers.{i}.{k}.weight" for k in (
            "input_layernorm", "self_attn.W_pack", "self_attn.o_proj", "post_attention_layernorm",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    return keys


def hf_config_json(cfg):
    """config.json as the released files spell it (7B: max_position_embeddings; 13B: only model_max_length)."""
    d = {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "vocab_size": cfg.vocab_size,
         "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
         "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads, "hidden_act": "silu",
         "model_max_length": cfg.seq_len, "rms_norm_eps": 1e-06, "initializer_range": 0.02, "pad_token_id": 0,
         "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
         "use_cache": True, "transformers_version": "4.29.2"}
    if cfg.pos_emb == "rope":
        d["max_position_embeddings"] = cfg.max_position_embeddings
    return d


# Stand-ins for the released modeling_baichuan.py files (our own few lines, not the official code): the
# identifiers the position-encoding detection reads (minitrain/hf_pos_emb.py), nothing else.
MODELING = {
    "rope": (
        "import torch\n\n\n"
        "class RotaryEmbedding(torch.nn.Module):\n"
        "    pass\n\n\n"
        "class Attention(torch.nn.Module):\n"
        "    def __init__(self, config):\n"
        "        super().__init__()\n"
        "        self.rotary_emb = RotaryEmbedding()\n"),
    "alibi": (
        "def _get_interleave(n):\n"
        "    return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]\n\n\n"
        "def _gen_alibi_mask(tensor, n_head, max_pos):\n"
        "    return None\n\n\n"
        "class BaichuanModel:\n"
        "    def __init__(self, config):\n"
        "        self.alibi_mask = None\n"),
}


def write_official_checkpoint(path, cfg, *, fmt, shards, seed=0, modeling="auto", config_extra=None):
    """A checkpoint laid out as released: raw random tensors under the official keys (no minitrain code),
    config.json as released (+ ``config_extra``) and a modeling_baichuan.py stand-in (``modeling``: "auto" =
    the one of cfg.pos_emb, as the released directories ship theirs; "rope" | "alibi" | None)."""
    g = torch.Generator().manual_seed(seed)
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                       p + "self_attn.W_pack.weight": (3 * D, D), p + "self_attn.o_proj.weight": (D, D),
                       p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                       p + "mlp.down_proj.weight": (D, F)})
    tensors = {k: (torch.randn(s, generator=g) * 0.5).to(torch.bfloat16) for k, s in shapes.items()}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**hf_config_json(cfg), **(config_extra or {})}))
    modeling = cfg.pos_emb if modeling == "auto" else modeling
    if modeling is not None:
        (path / "modeling_baichuan.py").write_text(MODELING[modeling])
    keys = list(tensors)
    groups = [keys[i::shards] for i in range(shards)]
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    names = [f"{stem}.{ext}"] if shards == 1 else [f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}" for i in range(shards)]
    for name, group in zip(names, groups):
        part = {k: tensors[k] for k in group}
        if fmt == "safetensors":
            from safetensors.torch import save_file
            save_file(part, str(path / name), metadata={"format": "pt"})
        else:
            torch.save(part, path / name)
    if shards > 1:
        index = {"metadata": {"total_size": sum(t.numel() * 2 for t in tensors.values())},
                 "weight_map": {k: name for name, g_ in zip(names, groups) for k in g_}}
        (path / f"{stem}.{ext}.index.json").write_text(json.dumps(index))
    return tensors


@pytest.mark.parametrize("pos_emb", ["rope", "alibi"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("shards", [1, 3])
def test_load_official_layout_and_round_trip(tmp_path, pos_emb, fmt, shards):
    cfg = TINY[pos_emb]
    tensors = write_official_checkpoint(tmp_path / "official", cfg, fmt=fmt, shards=shards)
    model = load_hf_checkpoint(tmp_path / "official")
    assert model.config.pos_emb == pos_emb and model.config.norm_head
    assert model.config.hidden_size == cfg.hidden_size and model.config.num_layers == cfg.num_layers
    sd = model.state_dict()
    assert sorted(sd) == sorted(official_keys(cfg.num_layers))
    for k, t in tensors.items():
        assert sd[k].dtype == torch.bfloat16 and torch.equal(sd[k], t), k

    out = tmp_path / "ours"
    save_hf_checkpoint(model, out, safetensors=(fmt == "safetensors"),
                       max_shard_size=None if shards == 1 else 40_000)
    index = list(out.glob("*.index.json"))
    assert len(index) == (0 if shards == 1 else 1)
    if index:
        weight_map = json.loads(index[0].read_text())["weight_map"]
        assert sorted(weight_map) == sorted(tensors) and len(set(weight_map.values())) > 1
    back = read_hf_state_dict(out)
    assert sorted(back) == sorted(tensors)
    for k, t in tensors.items():  # lm_head rows stay raw (un-normalised), bit for bit
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    written = json.loads((out / "config.json").read_text())
    assert ("max_position_embeddings" in written) == (pos_emb == "rope")
    reloaded = load_hf_checkpoint(out)
    assert reloaded.config == model.config


def test_loaded_model_runs_and_dtype_choice(tmp_path):
    cfg = TINY["rope"]
    write_official_checkpoint(tmp_path, cfg, fmt="safetensors", shards=1)
    model = load_hf_checkpoint(tmp_path, dtype=torch.float32, backend="reference")
    assert model.lm_head.weight.dtype == torch.float32 and model.config.backend == "reference"
    ids = torch.randint(0, cfg.vocab_size, (1, 6))
    assert model(ids).logits.shape == (1, 6, cfg.vocab_size)


def test_config_detection_and_round_trip():
    for name in ("7b", "13b"):  # released layout, no pos_emb field: the released shapes decide
        cfg = PRESETS[name]
        assert config_from_hf(hf_config_json(cfg)) == cfg, name
    for name in ("7b", "13b", "tiny-rope", "tiny-alibi"):
        cfg = PRESETS[name]
        assert config_from_hf(config_to_hf(cfg)) == cfg, name  # ours, explicit pos_emb
        assert config_from_hf(hf_config_json(cfg), pos_emb=cfg.pos_emb) == cfg, name  # the override
    cfg = dataclasses.replace(PRESETS["tiny-alibi"], norm_head=False, z_loss_weight=2e-4)
    assert config_from_hf(config_to_hf(cfg)) == cfg
    with pytest.raises(ValueError, match="num_hidden_layers"):
        config_from_hf({"vocab_size": 10, "hidden_size": 8})
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        config_from_hf({**hf_config_json(PRESETS["7b"]), "tie_word_embeddings": True})


def test_mismatched_checkpoint_is_one_error_listing_everything(tmp_path):
    cfg = TINY["alibi"]
    write_official_checkpoint(tmp_path, cfg, fmt="bin", shards=1)
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(16)
    sd["model.norm.weight"] = torch.zeros(cfg.hidden_size + 1)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointMismatchError) as info:  # the rotary key is RoPE evidence: override it
        load_hf_checkpoint(tmp_path, pos_emb="alibi")
    msg = str(info.value)
    assert "missing keys (1)" in msg and "model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected keys (1)" in msg and "rotary_emb.inv_freq" in msg
    assert "mis-shaped keys (1)" in msg and "model.norm.weight: checkpoint (65,) vs model (64,)" in msg


def test_missing_files_and_wrong_config(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_hf_checkpoint(tmp_path, config=TINY["rope"])
    write_official_checkpoint(tmp_path, TINY["rope"], fmt="safetensors", shards=1)
    with pytest.raises(CheckpointMismatchError, match="mis-shaped"):
        load_hf_checkpoint(tmp_path, config=dataclasses.replace(TINY["rope"], intermediate_size=160))


def test_minitrain_model_file_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Baichuan2(TINY["alibi"])
    save_checkpoint(model, tmp_path / "m.pt")
    back = load_model(tmp_path / "m.pt")
    assert back.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)

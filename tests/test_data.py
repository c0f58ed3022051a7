"""minitrain.data: embedded corpus, tokenizer rules, token shards + manifest checks, packing, sampling."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("sentencepiece")

from minitrain.data import (DataError, Sampler, TokenData, _dtype_for, build_dataset, load_tokenizer,  # noqa: E402
                            make_batch, segment_ids, stdlib_documents, train_tokenizer)


@pytest.fixture(scope="module")
def docs():
    return stdlib_documents(150_000)


@pytest.fixture(scope="module")
def tokenizer(docs, tmp_path_factory):
    return train_tokenizer(docs, str(tmp_path_factory.mktemp("tok") / "tok"), 512)


@pytest.fixture()
def data_dir(docs, tokenizer, tmp_path):
    return build_dataset(tmp_path / "data", docs, tokenizer, shard_tokens=8_000, val_every=5)


def test_stdlib_corpus_is_capped_and_has_no_tests(docs):
    assert 50_000 < sum(map(len, docs)) <= 150_000
    assert all(not d.lstrip().startswith("import unittest") for d in docs)


def test_tokenizer_follows_the_baichuan2_rules(tokenizer):
    sp = load_tokenizer(tokenizer)
    assert sp.get_piece_size() == 512 and (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    text = "def f(x):\n    return x + 12345  # 漢\n\n\tpass  \n"
    ids = sp.encode(text)
    assert sp.decode(ids) == text  # identity normalisation, whitespace and newlines kept, no dummy prefix
    pieces = [sp.id_to_piece(i) for i in ids]
    assert pieces[0] == "def"  # no dummy prefix
    assert all(p in pieces for p in ("1", "2", "3", "4", "5"))  # digits split
    assert "<0xE6>" in pieces  # byte fallback for an unseen character
    assert "\n" in pieces


def test_shards_manifest_and_reading(data_dir, docs, tokenizer):
    m = json.loads((data_dir / "manifest.json").read_text())
    assert m["dtype"] == "uint16" and m["vocab_size"] == 512 and m["eos_id"] == 2
    train = m["splits"]["train"]
    assert len(train) > 1 and all({"file", "tokens", "documents", "sha256"} <= set(e) for e in train)
    assert sum(e["documents"] for s in m["splits"].values() for e in s) == len(docs)
    td = TokenData(data_dir, "train")
    assert td.tokens == sum(e["tokens"] for e in train)
    sp = load_tokenizer(tokenizer)
    first = np.asarray(td.shards[0][: len(sp.encode(docs[0])) + 1])
    assert first.tolist() == sp.encode(docs[0]) + [2]  # document then EOS
    assert _dtype_for(125_696) == np.uint32 and _dtype_for(65_536) == np.uint16


def test_corrupted_or_missing_shards_are_reported(data_dir):
    shard = data_dir / "train_000.bin"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="train_000.bin is corrupted: its sha256"):
        TokenData(data_dir, "train")
    shard.write_bytes(bytes(raw[:-2]))
    with pytest.raises(DataError, match="corrupted: .* bytes"):
        TokenData(data_dir, "train")
    shard.unlink()
    with pytest.raises(DataError, match="missing"):
        TokenData(data_dir, "train")
    (data_dir / "manifest.json").unlink()
    with pytest.raises(DataError, match="no manifest.json"):
        TokenData(data_dir, "val")


def test_corrupted_manifest_or_tokenizer_is_reported(data_dir):
    path = data_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    assert len(manifest["manifest_sha256"]) == 64
    TokenData(data_dir, "train")  # intact
    edited = dict(manifest, eos_id=manifest["eos_id"] + 1)  # valid JSON, wrong content
    path.write_text(json.dumps(edited))
    with pytest.raises(DataError, match="manifest.json is corrupted: .*checksum mismatch"):
        TokenData(data_dir, "train")
    path.write_text(json.dumps(manifest)[:-7])  # truncated
    with pytest.raises(DataError, match="manifest.json: corrupted manifest"):
        TokenData(data_dir, "train")
    legacy = {k: v for k, v in manifest.items() if k != "manifest_sha256"}  # written before the digest
    path.write_text(json.dumps(legacy))
    TokenData(data_dir, "train")
    path.write_text(json.dumps(manifest))
    tok = data_dir / "tokenizer.model"
    raw = bytearray(tok.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    tok.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="tokenizer .*tokenizer.model is corrupted or replaced"):
        TokenData(data_dir, "val")


def test_segment_ids_end_documents_with_their_eos():
    tokens = torch.tensor([[5, 6, 2, 7, 2, 2, 8]])
    assert segment_ids(tokens, 2).tolist() == [[1, 1, 1, 2, 2, 3, 4]]


def test_batches_pack_documents_with_segment_ids(data_dir):
    td = TokenData(data_dir, "train")
    windows = td.windows(64)
    ids, seg = make_batch(td, windows, [0, 3], 64, masking=True)
    assert ids.shape == seg.shape == (2, 64) and ids.dtype == torch.int64
    eos_rows, eos_cols = (ids == td.eos_id).nonzero(as_tuple=True)
    for r, c in zip(eos_rows.tolist(), eos_cols.tolist()):
        if c + 1 < 64:
            assert seg[r, c + 1] == seg[r, c] + 1  # a new document starts after each EOS
    assert make_batch(td, windows, [0], 64, masking=False)[1] is None


def test_sampler_is_deterministic_and_resumable():
    a = Sampler(10, seed=3)
    first = a.take(25)
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))  # epochs
    assert first[:10] != first[10:20]
    b = Sampler(10, seed=3)
    b.take(7)
    c = Sampler(10, seed=3)
    c.load_state_dict(b.state_dict())
    assert c.take(18) == first[7:25]
    assert Sampler(10, seed=4).take(10) != first[:10]
    with pytest.raises(DataError, match="does not match"):
        Sampler(11, seed=3).load_state_dict(b.state_dict())


def test_user_text_corpus(tmp_path):
    from minitrain.data import text_documents

    (tmp_path / "a.txt").write_text("first document\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("second " * 10)
    (tmp_path / "skip.bin").write_bytes(b"\0\1")
    assert text_documents(tmp_path, 10_000) == ["first document\n", "second " * 10]
    assert text_documents(tmp_path, 20) == ["first document\n", "secon"]  # capped
    assert text_documents(tmp_path / "a.txt", 100) == ["first document\n"]
    with pytest.raises(DataError, match="does not exist"):
        text_documents(tmp_path / "nope", 100)

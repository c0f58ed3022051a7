"""Data: the embedded corpus, the tokenizer, memmap token shards and packed, deterministic batches.

Layout of a data directory (``build_dataset`` writes it atomically: a temporary directory renamed)::

    DIR/manifest.json     {"format": "minitrain.tokens", "dtype": "uint16"|"uint32", "vocab_size", "eos_id",
                           "tokenizer": "tokenizer.model", "tokenizer_sha256",
                           "splits": {"train": [{"file", "tokens", "documents", "sha256"}, ...], "val": [...]},
                           "manifest_sha256": sha256 of the canonical JSON of everything else}
    DIR/train_000.bin     raw little-endian token ids, documents each followed by EOS
    DIR/tokenizer.model   the SentencePiece model the shards were encoded with

Every shard's size and sha256, the manifest's own digest and the tokenizer's sha256 are verified when a
split is opened (a clear error naming the file on corruption).

Packing: the token stream is cut into non-overlapping windows of ``seq_len`` tokens; documents run
across windows. Segment ids (1 + the number of EOS tokens before a position) go to the model as its
``attention_mask``: attention and targets never cross a document boundary (cu_seqlens inside).

Sampling: :class:`Sampler` maps a global sample index to a window through a per-epoch permutation
seeded by ``(seed, epoch)``; its state is just ``(seed, position)``, saved in every checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

__all__ = ["stdlib_documents", "text_documents", "train_tokenizer", "load_tokenizer", "build_dataset", "TokenData",
           "Sampler", "segment_ids", "DataError"]

MANIFEST = "manifest.json"
_TEST_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "test_support"}


class DataError(ValueError):
    """A data directory that is missing, inconsistent or corrupted."""


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ corpus
def stdlib_documents(max_bytes: int, root: Optional[str] = None) -> list[str]:
    """The running Python's ``Lib/**/*.py`` (no test suites), sorted by path, capped at ``max_bytes``."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in _TEST_DIRS or p.startswith("test_") for p in rel):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        if total + len(text) > max_bytes:
            if total == 0:  # a cap below the first file still gives some text
                docs.append(text[:max_bytes])
            break
        docs.append(text)
        total += len(text)
    if not docs:
        raise DataError(f"no standard-library source found under {root}")
    return docs


def text_documents(path, max_bytes: int) -> list[str]:
    """A user's corpus: one text file (one document), or every *.txt/*.md/*.py/*.jsonl... file under a
    directory (one document per file, sorted by path), capped at ``max_bytes``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"corpus {path} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _TEXT)
    docs, total = [], 0
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        if text.strip() and total < max_bytes:
            docs.append(text[: max_bytes - total])
            total += len(docs[-1])
    if not docs:
        raise DataError(f"corpus {path}: no text files ({', '.join(sorted(_TEXT))})")
    return docs


_TEXT = {".txt", ".md", ".py", ".rst", ".c", ".h", ".json", ".jsonl", ".csv", ".html", ".tex"}


# --------------------------------------------------------------------------------- tokenizer
def train_tokenizer(docs: Iterable[str], model_prefix: str, vocab_size: int) -> str:
    """SentencePiece BPE with the Baichuan 2 rules (spec §10): byte fallback, digits split, identity
    normalisation, no dummy prefix, whitespace kept (whitespace-only pieces allowed, for code).
    Ids 0 <unk> (also pad), 1 <s>, 2 </s>. Trained on lines; "\\n" is a user-defined piece."""
    import sentencepiece as spm

    lines = [line for d in docs for line in d.split("\n") if line]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=model_prefix, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_by_whitespace=True,
        character_coverage=0.9999, max_sentencepiece_length=32, user_defined_symbols=["\n"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, input_sentence_size=400_000, shuffle_input_sentence=True,
        num_threads=max(1, os.cpu_count() or 1), minloglevel=2, seed_sentencepiece_size=1_000_000,
        hard_vocab_limit=False)
    return model_prefix + ".model"


def load_tokenizer(path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


# ----------------------------------------------------------------------------------- shards
def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _write_split(dir_: Path, name: str, token_lists: list[list[int]], eos: int, dtype, shard_tokens: int) -> list[dict]:
    entries, buf, n_docs, idx = [], [], 0, 0

    def flush():
        nonlocal buf, n_docs, idx
        arr = np.asarray(buf, dtype=dtype).astype(dtype.newbyteorder("<"), copy=False)
        file = f"{name}_{idx:03d}.bin"
        with open(dir_ / file, "wb") as fh:
            fh.write(arr.tobytes())
            fh.flush()
            os.fsync(fh.fileno())
        entries.append({"file": file, "tokens": int(arr.size), "documents": n_docs, "sha256": sha256_file(dir_ / file)})
        buf, n_docs, idx = [], 0, idx + 1

    for ids in token_lists:
        buf.extend(ids)
        buf.append(eos)
        n_docs += 1
        if len(buf) >= shard_tokens:
            flush()
    if buf:
        flush()
    return entries


def build_dataset(out_dir, docs: list[str], tokenizer_model: str, *, shard_tokens: int = 1 << 24,
                  val_every: int = 40, source: Optional[dict] = None) -> Path:
    """Encode ``docs`` (every ``val_every``-th document goes to "val") into shards under ``out_dir``."""
    out_dir = Path(out_dir)
    sp = load_tokenizer(tokenizer_model)
    vocab, eos = sp.get_piece_size(), sp.eos_id()
    if eos < 0:
        raise DataError(f"{tokenizer_model}: the tokenizer has no EOS piece")
    dtype = _dtype_for(vocab)
    encoded = sp.encode(docs)
    splits = {"train": [ids for i, ids in enumerate(encoded) if (i + 1) % val_every],
              "val": [ids for i, ids in enumerate(encoded) if (i + 1) % val_every == 0]}
    if not splits["val"]:
        splits["val"], splits["train"] = splits["train"][-1:], splits["train"][:-1]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        shutil.copyfile(tokenizer_model, tmp / "tokenizer.model")
        manifest = {"format": "minitrain.tokens", "version": 1, "dtype": dtype.name, "vocab_size": vocab,
                    "eos_id": eos, "source": source or {}, "tokenizer": "tokenizer.model",
                    "tokenizer_sha256": sha256_file(tmp / "tokenizer.model"),
                    "splits": {k: _write_split(tmp, k, v, eos, dtype, shard_tokens) for k, v in splits.items()}}
        manifest["manifest_sha256"] = _manifest_digest(manifest)
        with open(tmp / MANIFEST, "w") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own digest."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(data_dir) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{data_dir}: no {MANIFEST} (not a minitrain data directory)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: corrupted manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "minitrain.tokens":
        raise DataError(f"{path}: not a minitrain.tokens manifest")
    # (manifests written before the digest existed have none: their shards are still checked one by one)
    if "manifest_sha256" in manifest and manifest["manifest_sha256"] != _manifest_digest(manifest):
        raise DataError(f"{path} is corrupted: its content does not match its manifest_sha256 (checksum mismatch)")
    return manifest


class TokenData:
    """One split of a data directory as memmapped shards, checked against the manifest."""

    def __init__(self, data_dir, split: str = "train", *, verify: bool = True):
        self.dir = Path(data_dir)
        m = read_manifest(self.dir)
        if split not in m["splits"] or not m["splits"][split]:
            raise DataError(f"{self.dir}: no {split!r} shards in the manifest")
        self.vocab_size, self.eos_id, dtype = int(m["vocab_size"]), int(m["eos_id"]), np.dtype(m["dtype"])
        self.shards = []
        for e in m["splits"][split]:
            path = self.dir / e["file"]
            if not path.is_file():
                raise DataError(f"shard {path} listed in the manifest is missing")
            size = path.stat().st_size
            if size != e["tokens"] * dtype.itemsize:
                raise DataError(f"shard {path} is corrupted: {size} bytes, the manifest says "
                                f"{e['tokens']} {dtype.name} tokens ({e['tokens'] * dtype.itemsize} bytes) "
                                "(size mismatch: truncated or overwritten)")
            if verify and sha256_file(path) != e["sha256"]:
                raise DataError(f"shard {path} is corrupted: its sha256 does not match the manifest (checksum mismatch)")
            self.shards.append(np.memmap(path, dtype=dtype.newbyteorder("<"), mode="r"))
        self.tokens = int(sum(s.size for s in self.shards))
        tok = self.dir / m.get("tokenizer", "tokenizer.model")
        if verify and tok.is_file() and m.get("tokenizer_sha256") and sha256_file(tok) != m["tokenizer_sha256"]:
            raise DataError(f"tokenizer {tok} is corrupted or replaced: its sha256 does not match the manifest "
                            "(checksum mismatch; the shards were encoded with another tokenizer)")
        self.tokenizer_path = tok if tok.is_file() else None

    def windows(self, seq_len: int) -> list[tuple[int, int]]:
        """(shard, offset) of every non-overlapping window of ``seq_len`` tokens."""
        out = [(i, o) for i, s in enumerate(self.shards) for o in range(0, s.size - seq_len + 1, seq_len)]
        if not out:
            raise DataError(f"{self.dir}: {self.tokens} tokens hold no window of seq_len={seq_len}")
        return out

    def window(self, shard: int, offset: int, seq_len: int) -> np.ndarray:
        return np.asarray(self.shards[shard][offset:offset + seq_len], dtype=np.int64)


def segment_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """``[B, T]`` tokens → segment ids ≥ 1: a document ends with (and includes) its EOS."""
    is_eos = (tokens == eos_id).long()
    return 1 + torch.cumsum(is_eos, dim=1) - is_eos


@dataclass
class Sampler:
    """Deterministic window order: epoch e is ``randperm(n_windows, seed=seed*1_000_003 + e)``."""

    n_windows: int
    seed: int = 0
    position: int = 0  # samples handed out so far (global, over ranks)
    _epoch: int = -1
    _perm: Optional[torch.Tensor] = None

    def index(self, i: int) -> int:
        epoch, k = divmod(i, self.n_windows)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n_windows, generator=g), epoch
        return int(self._perm[k])

    def take(self, n: int) -> list[int]:
        """The next ``n`` global sample indices (window numbers); advances the position."""
        out = [self.index(self.position + j) for j in range(n)]
        self.position += n
        return out

    def state_dict(self) -> dict:
        return {"n_windows": self.n_windows, "seed": self.seed, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if state["n_windows"] != self.n_windows or state["seed"] != self.seed:
            raise DataError(f"the checkpoint's data sampler ({state}) does not match this data "
                            f"(n_windows={self.n_windows}, seed={self.seed})")
        self.position = int(state["position"])


def make_batch(data: TokenData, windows: list[tuple[int, int]], idx: list[int], seq_len: int,
               masking: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    ids = torch.from_numpy(np.stack([data.window(*windows[i], seq_len) for i in idx]))  # [B, T]
    return ids, (segment_ids(ids, data.eos_id) if masking else None)


def corpus_key(corpus: str, max_bytes: int, vocab_size: int, tokenizer: Optional[str]) -> dict:
    """What identifies a built corpus (a cached data directory is reused when it matches)."""
    return {"corpus": corpus if corpus == "stdlib" else str(Path(corpus).resolve()),
            "python": sys.version.split()[0], "max_bytes": max_bytes,
            "vocab_size": vocab_size, "tokenizer_sha256": sha256_file(tokenizer) if tokenizer else None}

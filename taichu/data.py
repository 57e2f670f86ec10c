"""Token blocks for language-model training, packed once and cached as a memory map.

Every document becomes [bos] + ids + [eos]; all are concatenated into one flat array
and cut into blocks of seq_len + 1 tokens (input = block[:-1], target = block[1:]),
consecutive blocks sharing one token so that no target is lost at the seams.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import operator
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from taichu.corpus import load_corpus
from taichu.fileio import atomic_write_bytes as atomic_write

CACHE_FORMAT = 1
SPLITS = ("train", "validation")


def default_cache_dir() -> Path:
    root = os.environ.get("TAICHU_CACHE")
    return Path(root).expanduser() / "data" if root else Path.home() / ".cache" / "taichu" / "data"


@dataclass
class PackedTokens:
    tokens: np.ndarray  # read-only np.memmap, uint16 or uint32
    path: Path
    meta: dict
    from_cache: bool

    def __len__(self) -> int:
        return len(self.tokens)


def _open_cache(bin_path: Path, meta_path: Path, key: dict) -> PackedTokens | None:
    """The cached array if present and whole; None (with a warning if damaged) otherwise."""
    if not bin_path.exists() or not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        expected = int(meta["length"]) * dtype.itemsize
        ok = meta["key"] == key and bin_path.stat().st_size == expected and expected > 0
    except (ValueError, KeyError, TypeError) as err:
        ok, expected = False, f"unreadable metadata ({err})"
    if not ok:
        warnings.warn(f"token cache {bin_path} is corrupt (size {bin_path.stat().st_size} bytes, "
                      f"expected {expected}); rebuilding it", stacklevel=3)
        return None
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(meta["length"],))
    return PackedTokens(tokens, bin_path, meta, from_cache=True)


def pack_corpus(texts: Sequence[str], tokenizer, cache_dir: str | Path, key_parts: dict) -> PackedTokens:
    """Tokenize ``texts`` into one flat array cached under ``cache_dir``.

    The cache key holds the tokenizer file's sha256, a sha256 of the texts themselves and
    ``key_parts`` (corpus name, fingerprint, split: kept in the .json for people to read).
    """
    if not texts:
        raise ValueError(f"nothing to pack: no documents ({key_parts})")
    texts_hash = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        texts_hash.update(len(data).to_bytes(8, "little") + data)
    key = {"format": CACHE_FORMAT, "tokenizer_sha256": tokenizer.sha256,
           "texts_sha256": texts_hash.hexdigest(), **key_parts}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    cache_dir = Path(cache_dir).expanduser()
    bin_path, meta_path = cache_dir / f"{digest}.bin", cache_dir / f"{digest}.json"
    cached = _open_cache(bin_path, meta_path, key)
    if cached is not None:
        return cached

    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    docs = tokenizer.encode_batch(texts, add_bos=True, add_eos=True)
    length = sum(map(len, docs))
    tokens = np.fromiter(itertools.chain.from_iterable(docs), dtype=dtype, count=length)
    meta = {"key": key, "length": length, "dtype": dtype.name, "documents": len(docs),
            "tokenizer": str(tokenizer.path)}
    cache_dir.mkdir(parents=True, exist_ok=True)
    # .bin before .json: a .json is only ever next to a complete .bin.
    atomic_write(bin_path, tokens.tobytes())
    atomic_write(meta_path, json.dumps(meta, indent=1, ensure_ascii=False).encode("utf-8"))
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(length,))
    return PackedTokens(tokens, bin_path, meta, from_cache=False)


class BlockDataset:
    """Blocks of seq_len + 1 tokens; block i starts at token i * seq_len."""

    def __init__(self, packed: PackedTokens | np.ndarray, seq_len: int):
        # A plain array works too (tests, or tokens from elsewhere).
        self.tokens = packed.tokens if isinstance(packed, PackedTokens) else np.asarray(packed)
        self.packed = packed if isinstance(packed, PackedTokens) else None
        self.seq_len = int(seq_len)
        if self.seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if len(self.tokens) < self.seq_len + 1:
            raise ValueError(f"only {len(self.tokens)} tokens, fewer than one block of seq_len + 1 = "
                             f"{self.seq_len + 1}: give more text or lower data.seq_len")

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, index: int) -> np.ndarray:
        i = operator.index(index)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"block {index} out of range for {n} blocks")
        start = (i % n) * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)

    def batch(self, indices) -> np.ndarray:
        """int64 array [len(indices), seq_len + 1]."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"block indices {idx[(idx < -n) | (idx >= n)][:5].tolist()} out of "
                             f"range for {n} blocks")
        starts = (idx % n) * self.seq_len
        return self.tokens[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int64)


def load_blocks(config, tokenizer, split: str, corpus=None) -> BlockDataset:
    """The ``split`` ("train" | "validation") of the config's corpus as blocks of data.seq_len
    (``corpus``: the already loaded Corpus, to read and split it only once per run)."""
    return BlockDataset(load_packed(config, tokenizer, split, corpus), config.data.seq_len)


def load_packed(config, tokenizer, split: str, corpus=None) -> PackedTokens:
    """The ``split`` of the config's corpus packed into one token stream (cached)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    vocab_size = config.model.vocab_size
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(f"{tokenizer.path}: tokenizer vocab_size {tokenizer.vocab_size} != "
                         f"model.vocab_size {vocab_size}")
    corpus = load_corpus(config.data) if corpus is None else corpus
    cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else default_cache_dir()
    return pack_corpus(getattr(corpus, split), tokenizer, cache_dir,
                       {"corpus": corpus.name, "fingerprint": corpus.fingerprint, "split": split})


class StreamSegments:
    """Consecutive segments of ``rows`` token streams, for a model with memory (GPT-XL).

    The packed tokens are cut into ``rows`` contiguous streams (Transformer-XL's batchify);
    sample ``n`` is segment ``n // rows`` of stream ``n % rows``: seq_len + 1 tokens (input
    and targets, consecutive segments sharing one token) with the document id of each input
    token. So batch row r of every step continues where row r of the step before stopped,
    and the memory it carries is real. A stream that runs out starts again from its own
    beginning (a new document id, so ``reset_memory: document`` hides the seam too).

    Document ids: with ``reset_memory == "document"`` the count of documents begun before a
    token (a document starts at each bos token: pack_corpus writes [bos] + ids + [eos]);
    with "never", 0 for every token of a stream and 1 after it wraps.
    """

    def __init__(self, packed: PackedTokens | np.ndarray, rows: int, seq_len: int, bos_id: int,
                 reset_memory: str):
        tokens = packed.tokens if isinstance(packed, PackedTokens) else np.asarray(packed)
        self.rows, self.seq_len = int(rows), int(seq_len)
        self.stream_tokens = len(tokens) // self.rows
        self.segments = (self.stream_tokens - 1) // self.seq_len   # per stream and pass
        if self.segments < 1:
            raise ValueError(f"{len(tokens)} tokens make {self.rows} streams of {self.stream_tokens} "
                             f"tokens, less than one segment of data.seq_len + 1 = {self.seq_len + 1}: "
                             f"give more text, or lower train.batch_size or data.seq_len")
        self.tokens = tokens
        if reset_memory == "document":
            self.documents = np.cumsum(np.asarray(tokens) == bos_id, dtype=np.int64)
        elif reset_memory == "never":
            self.documents = None
        else:
            raise ValueError(f"reset_memory must be 'never' or 'document', got {reset_memory!r}")

    def __len__(self) -> int:
        return self.rows * self.segments

    def batch(self, indices) -> dict[str, np.ndarray]:
        """{"input_ids" [n, seq_len + 1] int64, "document_ids" [n, seq_len] int64}."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        row, segment = idx % self.rows, idx // self.rows
        passes, segment = np.divmod(segment, self.segments)
        starts = row * self.stream_tokens + segment * self.seq_len
        positions = starts[:, None] + np.arange(self.seq_len + 1)
        ids = np.asarray(self.tokens[positions], dtype=np.int64)
        if self.documents is None:
            documents = np.broadcast_to(passes[:, None], (len(idx), self.seq_len))
        else:
            # Ids grow along the stream; each pass over it adds the stream's document count,
            # so a wrapped stream never repeats an id its memory still holds.
            stream_start = row * self.stream_tokens
            per_pass = self.documents[stream_start + self.stream_tokens - 1] - self.documents[stream_start] + 1
            documents = self.documents[positions[:, :-1]] + (passes * per_pass)[:, None]
        return {"input_ids": ids, "document_ids": np.ascontiguousarray(documents, dtype=np.int64)}

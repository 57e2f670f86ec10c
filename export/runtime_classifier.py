"""Running a text classifier's export (gpt_classifier): its ``classifier`` graph
(export/signature_classifier.py) with ONNX Runtime, and texts -> label probabilities through
taichu.classify.TextClassifier, the same rule (tokens, truncation, padding, softmax) as the
torch and MindSpore models, so the three give the same labels and probabilities.

numpy, onnxruntime and sentencepiece only (no torch, no mindspore, no model code, no yaml
or pydantic): labels, lengths and special ids come from export_info.json's ``classifier``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from export.runtime import TOKENIZER_FILE, ExportTokenizer, _in_range, _integers, open_graphs
from export.signature import CLASSIFICATION
from export.signature_classifier import CLASSIFIER
from taichu.classify import TextClassifier
from taichu.retrieval import check_export_directory

CLASSIFIER_FAMILY = "gpt_classifier"


class ClassifierNetwork(ExportTokenizer):
    """The ``classifier`` graph of a gpt_classifier ONNX export (``taichu export MODEL
    --format onnx``).

    ``logits(input_ids, attention_mask)`` -> float32 [batch, num_labels] (checked first as
    the model checks its inputs); ``classifier(batch_size)``: the taichu.classify.TextClassifier
    over it; ``classify(texts)``: texts in, taichu.classify.Classified (probabilities,
    labels, how many texts were cut) out.

    >>> network = classifier_network("exported/")
    >>> network.classify(["这个手机很好用"]).top(1)
    [[('positive', 0.93...)]]
    """

    def __init__(self, export_dir: str | Path, threads: int | None = None):
        path = Path(export_dir)
        self.directory = path.parent if path.is_file() else path
        self.info, graphs = open_graphs(export_dir, "onnx", CLASSIFICATION, CLASSIFIER_FAMILY, "a text classifier",
                                        "a gpt_classifier", (CLASSIFIER,), threads)
        self.graph = graphs[CLASSIFIER][1]
        spec = self.info["classifier"]
        self.labels = tuple(spec["labels"])
        self.seq_len, self.truncation = spec["seq_len"], spec["truncation"]
        self.pad_to_multiple_of, self.special_ids = spec["pad_to_multiple_of"], spec["special_ids"]
        self.vocab_size, self.max_positions = spec["vocab_size"], spec["max_position_embeddings"]
        self.tokenizer_path = self.directory / TOKENIZER_FILE

    def check(self, input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
        """The inputs as the graph takes them (int64), after the model's checks (shape, ids in
        the vocabulary, the window) and the mask's (0 / 1, the ids' shape, a real token in
        every row); raises ValueError."""
        input_ids = _integers(input_ids, "input_ids", "[batch, sequence]")
        if input_ids.ndim != 2 or 0 in input_ids.shape:
            raise ValueError(f"input_ids must be [batch >= 1, sequence >= 1], got shape {input_ids.shape}")
        _in_range(input_ids, self.vocab_size, "token id", "vocab_size")
        if input_ids.shape[1] > self.max_positions:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                             f"{self.max_positions}")
        attention_mask = _integers(attention_mask, "attention_mask", "[batch, sequence]")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {input_ids.shape}, got "
                             f"{attention_mask.shape}")
        if not np.isin(attention_mask, (0, 1)).all():
            raise ValueError("attention_mask must hold 0 (padding) and 1 (real tokens) only")
        empty = np.flatnonzero(attention_mask.sum(axis=1) == 0)
        if empty.size:
            raise ValueError(f"row {int(empty[0])} of attention_mask has no real token: nothing to classify")
        return input_ids.astype(np.int64), attention_mask.astype(np.int64)

    def logits(self, input_ids, attention_mask) -> np.ndarray:
        input_ids, attention_mask = self.check(input_ids, attention_mask)
        return self.graph.run({"input_ids": input_ids, "attention_mask": attention_mask})["logits"]

    __call__ = logits

    def classifier(self, batch_size: int = 32) -> TextClassifier:
        """Texts -> probabilities with the export's tokenizer, labels, seq_len, truncation and
        padding (export_info.json's ``classifier``)."""
        tokenizer = self.tokenizer
        if self.special_ids is not None:
            found = {"pad": tokenizer.pad_id, "bos": tokenizer.bos_id, "eos": tokenizer.eos_id}
            if found != self.special_ids:
                raise ValueError(f"{self.tokenizer_path}: special ids {found} differ from export_info.json's "
                                 f"{self.special_ids}: not the tokenizer the model was exported with")
        return TextClassifier(self.logits, tokenizer, self.labels, self.seq_len, self.truncation, batch_size,
                              self.pad_to_multiple_of)

    def classify(self, texts, batch_size: int = 32):
        return self.classifier(batch_size).classify(texts)


def classifier_network(export_dir: str | Path, backend: str = "onnx", threads: int | None = None) -> ClassifierNetwork:
    """The classifier of a gpt_classifier ONNX export; refuses an export of another family or
    format (a gpt_classifier has no MINDIR export: MindSpore classifies from the model
    directory)."""
    if backend != "onnx":
        raise ValueError(f"a gpt_classifier export runs in ONNX Runtime only (backend onnx), not {backend!r}: "
                         f"there is no MINDIR export of a gpt_classifier; MindSpore classifies from the model "
                         f"directory (taichu classify MODEL_DIR --backend mindspore)")
    check_export_directory(export_dir, backend)
    return ClassifierNetwork(export_dir, threads)

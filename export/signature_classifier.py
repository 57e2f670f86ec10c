"""Signature of the text classifier's export and its random validation inputs; the shared
names and types are export/signature.py's:

- ``classification`` (gpt_classifier: the GPT's decoder and a sequence-classification head,
  Hugging Face's GPT2ForSequenceClassification, taichu/families/gpt_classifier.py). One
  graph, ``classifier``, the torch model's own forward: ``input_ids`` int64 [batch,
  sequence] and ``attention_mask`` int64 [batch, sequence] (1 for real tokens, 0 for
  padding, right or left) -> ``logits`` float32 [batch, num_labels], pooled at each row's
  last position whose mask is 1. Batch and sequence are dynamic (sequence up to
  max_position_embeddings; texts are data.seq_len tokens at most, bos and eos included).

  export_info.json's ``classifier`` holds what a runtime needs to turn text into those
  inputs without the config: the labels in logit order, seq_len, truncation,
  pad_to_multiple_of and the special ids (export/runtime_classifier.py; taichu.classify's
  TextClassifier is the rule). No MINDIR: MindSpore classifies from the model directory.

A dimension given as a string is a dynamic axis of that name.

numpy only: the ONNX runtime side must work without torch or mindspore.
"""
from __future__ import annotations

import numpy as np

from export.signature import BATCH, CLASSIFICATION, FIRST_ORDINARY_ID, SEQUENCE, GraphSignature, TensorInfo

CLASSIFIER = "classifier"
# Validation (batch, sequence, padding): one text alone (batch 1: the trace is at batch 3),
# three right-padded rows of 12, 7 and 3 tokens (inference's padding), two rows of 9, the
# first left-padded by 2 (a mask the model serves too).
CLASSIFIER_VALIDATION_SHAPES = ((1, 5, None), (3, 12, "right"), (2, 9, "left"))


def classifier_graph(model_config) -> GraphSignature:
    """The ``classifier`` graph (module docstring)."""
    return GraphSignature(
        CLASSIFIER,
        (TensorInfo("input_ids", "int64", (BATCH, SEQUENCE)), TensorInfo("attention_mask", "int64", (BATCH, SEQUENCE))),
        (TensorInfo("logits", "float32", (BATCH, model_config.num_labels)),),
        CLASSIFICATION)


def classifier_inputs(model_config, batch: int, length: int, padding: str | None, seed: int) -> dict[str, np.ndarray]:
    """Random ordinary token ids [batch, length] and a mask: no padding; ``right``: row i
    holds ``length - 5 i`` real tokens (at least 1) then padding (id 0); ``left``: row 0
    starts with two pads."""
    m = model_config
    rng = np.random.default_rng(seed)
    ids = rng.integers(FIRST_ORDINARY_ID, m.vocab_size, (batch, length)).astype(np.int64)
    mask = np.ones((batch, length), np.int64)
    if padding == "right":
        for row in range(batch):
            mask[row, max(1, length - 5 * row):] = 0
    elif padding == "left":
        mask[0, :min(2, length - 1)] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def classifier_validation_cases(model_config, graph: GraphSignature | None = None) -> list[tuple[dict, dict]]:
    """(shape description, random inputs) at CLASSIFIER_VALIDATION_SHAPES (lengths capped at
    max_position_embeddings)."""
    m = model_config
    cases = []
    for seed, (batch, length, padding) in enumerate(CLASSIFIER_VALIDATION_SHAPES):
        length = min(length, m.max_position_embeddings)
        cases.append(({"batch": batch, "sequence": length, "padding": padding or "none"},
                      classifier_inputs(m, batch, length, padding, seed)))
    return cases


def trace_sizes(model_config) -> tuple[int, int]:
    """(batch, sequence) of the traced example: distinct, >= 2, and neither equal to
    num_labels (a dynamic axis the same size as a fixed one could be taken for it)."""
    sizes = [s for s in (3, 4, 5, 7, 8, 9) if s != model_config.num_labels]
    return sizes[0], sizes[4]

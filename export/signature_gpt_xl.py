"""Signature of the GPT-XL export and its random validation inputs; the shared names and
types are export/signature.py's:

- ``recurrent_language_model`` (GPT-XL: the GPT with Transformer-XL's segment memory and
  relative positions, taichu/families/gpt_xl.py). One graph, ``decoder``, from
  torch_impl.gpt_xl.DecoderForExport: ``input_ids`` int64 [batch, sequence] (a segment of
  the prompt, or one new token), ``document_ids`` int64 [batch, sequence] (a key is seen by
  the queries of its document not before it; -1 for padding), ``memory_document_ids`` int64
  [batch, memory] (-1: an empty slot) and ``memory.{i}`` float32 [batch, memory, hidden]
  (layer i's input hidden states at the previous positions, oldest first) -> ``logits``
  float32 [batch, vocab] (the last position's: the next token's), ``new_memory_document_ids``
  int64 [batch, memory] and ``new_memory.{i}`` float32 [batch, memory, hidden] (the last
  ``memory`` positions of memory and segment: the memory keeps its length). Batch, sequence
  and memory are dynamic, and the memory may be of any length >= 1, not only the config's
  mem_len (generation uses mem_len + seq_len - 1 by default, taichu.generate.
  generation_memory). A memory of length 0 is refused by the runtime: the graph is traced
  and validated with memories of one slot or more (torch.export may specialise the model's
  "no memory" branch away), and a new token would see only itself.

  Generation (export/runtime_gpt_xl.py, taichu.generate.RecurrentStep) runs the prompt as
  segments of data.seq_len (the ``segment_length`` of export_info.json's ``generation``),
  then one token per call, so a compiled runtime sees two shapes per batch size and each
  token costs the same however long the text. No MINDIR: a GPT-XL generates in MindSpore
  from its model directory (mindspore.jit over mindspore_impl.gpt_xl.DecoderForExport).

A dimension given as a string is a dynamic axis of that name.

numpy only: the ONNX runtime side must work without torch or mindspore.
"""
from __future__ import annotations

import numpy as np

from export.signature import (BATCH, FIRST_ORDINARY_ID, RECURRENT_LANGUAGE_MODEL, SEQUENCE, GraphSignature,
                              TensorInfo)

GPT_XL_DECODER = "decoder"
MEMORY = "memory"
NO_DOCUMENT = -1
# Validation (batch, sequence, memory - mem_len): a left-padded prompt segment of 7 after a
# memory longer than training's (generation's is mem_len + seq_len - 1), one new token after
# the same memory, and a memory of 3 (shorter than any config's default) at batch 1 (the
# memory's length is taken absolute there: (1, 5, None) means 3 slots).
GPT_XL_VALIDATION_SHAPES = ((2, 7, 6), (3, 1, 6), (1, 5, None))
SHORT_MEMORY = 3


def gpt_xl_memory_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(memory inputs, memory outputs): the document ids of the slots, then each layer's."""
    return (["memory_document_ids"] + [f"memory.{i}" for i in range(num_layers)],
            ["new_memory_document_ids"] + [f"new_memory.{i}" for i in range(num_layers)])


def gpt_xl_graph(model_config) -> GraphSignature:
    """The ``decoder`` graph (module docstring)."""
    m = model_config
    inputs, outputs = gpt_xl_memory_names(m.num_layers)
    states = (BATCH, MEMORY, m.hidden_size)
    return GraphSignature(
        GPT_XL_DECODER,
        (TensorInfo("input_ids", "int64", (BATCH, SEQUENCE)), TensorInfo("document_ids", "int64", (BATCH, SEQUENCE)),
         TensorInfo(inputs[0], "int64", (BATCH, MEMORY)))
        + tuple(TensorInfo(name, "float32", states) for name in inputs[1:]),
        (TensorInfo("logits", "float32", (BATCH, m.vocab_size)), TensorInfo(outputs[0], "int64", (BATCH, MEMORY)))
        + tuple(TensorInfo(name, "float32", states) for name in outputs[1:]),
        RECURRENT_LANGUAGE_MODEL)


def gpt_xl_inputs(model_config, batch: int, length: int, memory: int, seed: int) -> dict[str, np.ndarray]:
    """Random decoder inputs: ordinary token ids, row 0's first two positions padding
    (document -1) when the segment has three or more, its first memory slots empty (-1) and,
    with two rows or more, row 1's first slots of another document (1, invisible to its
    queries of document 0); random hidden states in every slot."""
    m = model_config
    rng = np.random.default_rng(seed)
    documents = np.zeros((batch, length), np.int64)
    if length >= 3:
        documents[0, :2] = NO_DOCUMENT
    memory_documents = np.zeros((batch, memory), np.int64)
    memory_documents[0, :memory // 3] = NO_DOCUMENT
    if batch > 1:
        memory_documents[1, :memory // 2] = 1
    feeds = {"input_ids": rng.integers(FIRST_ORDINARY_ID, m.vocab_size, (batch, length)).astype(np.int64),
             "document_ids": documents, "memory_document_ids": memory_documents}
    for name in gpt_xl_memory_names(m.num_layers)[0][1:]:
        feeds[name] = rng.standard_normal((batch, memory, m.hidden_size)).astype(np.float32)
    return feeds


def gpt_xl_validation_cases(model_config, graph: GraphSignature | None = None) -> list[tuple[dict, dict]]:
    """(shape description, random inputs) at GPT_XL_VALIDATION_SHAPES."""
    m = model_config
    cases = []
    for seed, (batch, length, extra) in enumerate(GPT_XL_VALIDATION_SHAPES):
        memory = SHORT_MEMORY if extra is None else m.mem_len + extra
        cases.append(({"batch": batch, "sequence": length, "memory": memory},
                      gpt_xl_inputs(m, batch, length, memory, seed)))
    return cases

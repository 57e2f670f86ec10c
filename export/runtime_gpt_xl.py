"""Running a GPT-XL export: its ``decoder`` graph (export/signature_gpt_xl.py) with ONNX
Runtime, and text generation without a window through taichu.generate's RecurrentStep and
sampler, so the same seed gives the same tokens here as with the PyTorch and MindSpore models.

numpy, onnxruntime and sentencepiece only (no torch, no mindspore, no model code, no yaml
or pydantic): the sizes come from export_info.json.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from export.runtime import TOKENIZER_FILE, ExportTokenizer, _in_range, _integers, open_graphs
from export.signature import RECURRENT_LANGUAGE_MODEL
from export.signature_gpt_xl import GPT_XL_DECODER, NO_DOCUMENT, gpt_xl_memory_names
from taichu.generate import RecurrentStep, SamplingConfig, generate_ids, generation_memory
from taichu.retrieval import check_export_directory

GPT_XL_FAMILY = "gpt_xl"


class GPTXLNetwork(ExportTokenizer):
    """The ``decoder`` graph of a GPT-XL ONNX export (``taichu export MODEL --format onnx``).

    ``forward(input_ids, document_ids, memory_document_ids, memories)`` -> (last-position
    logits float32 [batch, vocab], new memory_document_ids, new memories), the arrays of
    torch_impl.gpt_xl.DecoderForExport, checked first as the model checks its inputs;
    ``initial_memories(batch, length)``: an empty memory; ``step(memory)``: the
    taichu.generate.RecurrentStep generation drives; ``generate(prompts, memory=None,
    **sampling)``: text in, text out.

    >>> network = gpt_xl_network("exported/")
    >>> network.generate(["中国人民"], max_new_tokens=2000, temperature=0)
    """

    def __init__(self, export_dir: str | Path, threads: int | None = None):
        path = Path(export_dir)
        self.directory = path.parent if path.is_file() else path
        self.info, graphs = open_graphs(export_dir, "onnx", RECURRENT_LANGUAGE_MODEL, GPT_XL_FAMILY, "a GPT-XL",
                                        "a gpt_xl", (GPT_XL_DECODER,), threads)
        self.graph = graphs[GPT_XL_DECODER][1]
        config = self.info["config"]
        m = config["model"]
        self.vocab_size, self.hidden_size, self.num_layers = m["vocab_size"], m["hidden_size"], m["num_layers"]
        self.mem_len, self.segment_length = m["mem_len"], config["data"]["seq_len"]
        self.memory_length = generation_memory(self.mem_len, self.segment_length)
        self.memory_inputs, self.memory_outputs = gpt_xl_memory_names(self.num_layers)
        self.tokenizer_path = self.directory / TOKENIZER_FILE


    def initial_memories(self, batch: int, length: int | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """(memory_document_ids int64 [batch, length] of -1, zeros [batch, length, hidden] per
        layer): ``length`` empty slots (default: generation's, mem_len + seq_len - 1)."""
        length = self.memory_length if length is None else length
        return (np.full((batch, length), NO_DOCUMENT, np.int64),
                [np.zeros((batch, length, self.hidden_size), np.float32) for _ in range(self.num_layers)])

    def check(self, input_ids, document_ids, memory_document_ids, memories):
        """The inputs as the graph takes them, after the checks taichu.families.gpt_xl.check_inputs
        makes (and a memory of at least one slot); raises ValueError."""
        input_ids = _integers(input_ids, "input_ids", "[batch, sequence]")
        if input_ids.ndim != 2 or 0 in input_ids.shape:
            raise ValueError(f"input_ids must be [batch >= 1, sequence >= 1], got shape {input_ids.shape}")
        _in_range(input_ids, self.vocab_size, "token id", "vocab_size")
        batch = input_ids.shape[0]
        document_ids = _integers(document_ids, "document_ids", "[batch, sequence]")
        if document_ids.shape != input_ids.shape:
            raise ValueError(f"document_ids must have input_ids' shape {input_ids.shape}, got {document_ids.shape}")
        memories = list(memories)
        if len(memories) != self.num_layers:
            raise ValueError(f"memories: {len(memories)} arrays for {self.num_layers} layers")
        first = None
        for i, memory in enumerate(memories):
            if not isinstance(memory, np.ndarray) or memory.dtype != np.float32:
                kind = memory.dtype if isinstance(memory, np.ndarray) else type(memory).__name__
                raise ValueError(f"memory {i} must be a float32 numpy array [batch, memory, {self.hidden_size}], "
                                 f"got {kind}")
            if memory.ndim != 3 or memory.shape[2] != self.hidden_size:
                raise ValueError(f"memory {i} must be [batch, memory, {self.hidden_size}], got {memory.shape}")
            if memory.shape[0] != batch:
                raise ValueError(f"memory {i} holds {memory.shape[0]} rows, but input_ids has {batch}: a memory "
                                 f"belongs to the batch it was made by (start a new one with initial_memories)")
            if first is not None and memory.shape != first:
                raise ValueError(f"memories differ in shape: layer 0 {first}, layer {i} {memory.shape}")
            first = memory.shape
        if first[1] == 0:
            raise ValueError("a memory of length 0: give at least one slot (the decoder is exported for a "
                             "memory of one slot or more; with none a new token would see only itself)")
        memory_document_ids = _integers(memory_document_ids, "memory_document_ids", "[batch, memory]")
        if memory_document_ids.shape != first[:2]:
            raise ValueError(f"memory_document_ids must be [batch, memory] = {first[:2]}, got "
                             f"{memory_document_ids.shape}")
        for name, ids in (("document id", document_ids), ("memory document id", memory_document_ids)):
            if ids.min() < NO_DOCUMENT:
                raise ValueError(f"{name} {int(ids.min())} is out of range (documents are >= 0, "
                                 f"{NO_DOCUMENT} for padding and empty slots)")
        return (input_ids.astype(np.int64), document_ids.astype(np.int64), memory_document_ids.astype(np.int64),
                [np.ascontiguousarray(m) for m in memories])

    def forward(self, input_ids, document_ids, memory_document_ids, memories):
        input_ids, document_ids, memory_document_ids, memories = self.check(
            input_ids, document_ids, memory_document_ids, memories)
        feeds = {"input_ids": input_ids, "document_ids": document_ids,
                 self.memory_inputs[0]: memory_document_ids}
        feeds.update(zip(self.memory_inputs[1:], memories))
        out = self.graph.run(feeds)
        return (out["logits"], out[self.memory_outputs[0]], [out[name] for name in self.memory_outputs[1:]])

    __call__ = forward

    def step(self, memory: int | None = None) -> RecurrentStep:
        """What taichu.generate.generate_ids drives (max_positions None): the prompt in segments
        of seq_len, then one token per call, over a memory of ``memory`` positions (default
        mem_len + seq_len - 1)."""
        return RecurrentStep(self.forward, self.initial_memories, self.segment_length,
                             self.memory_length if memory is None else memory, self.vocab_size)

    def generate_ids(self, prompts: list[list[int]], sampling: SamplingConfig,
                     memory: int | None = None) -> list[list[int]]:
        tokenizer = self.tokenizer
        return generate_ids(self.step(memory), prompts, sampling, tokenizer.eos_id, tokenizer.pad_id, None)

    def generate(self, prompts: list[str], memory: int | None = None, **sampling) -> list[str]:
        """Continuations of ``prompts``; keyword arguments are taichu.generate.SamplingConfig's."""
        encoded = [self.tokenizer.encode(p, add_bos=True) for p in prompts]
        ids = self.generate_ids(encoded, SamplingConfig(**sampling), memory)
        return [self.tokenizer.decode(row) for row in ids]


def gpt_xl_network(export_dir: str | Path, backend: str = "onnx", threads: int | None = None) -> GPTXLNetwork:
    """The decoder of a GPT-XL ONNX export; refuses an export of another family or format
    (a GPT-XL has no MINDIR export: MindSpore generates from the model directory)."""
    if backend != "onnx":
        raise ValueError(f"a GPT-XL export runs in ONNX Runtime only (backend onnx), not {backend!r}: there is "
                         f"no MINDIR export of a gpt_xl; MindSpore generates from the model directory "
                         f"(taichu generate MODEL_DIR --backend mindspore)")
    check_export_directory(export_dir, backend)
    return GPTXLNetwork(export_dir, threads)

"""Signatures of the exported graphs, shared by exporters, validators and runtimes.

Every family exports one or more graphs, chosen by its task (``FAMILY.task``):

- ``language_model`` (GPT): one decoder graph ``model``. Inputs: ``input_ids`` [batch,
  sequence], ``attention_mask`` [batch, past + sequence] (1 for real tokens, 0 for padding),
  ``position_ids`` [batch, sequence], and for each layer i ``past_key_values.{i}.key`` /
  ``.value`` [batch, heads, past, head_dim]. Outputs: ``logits`` [batch, sequence, vocab] and
  ``present.{i}.key`` / ``.value`` [batch, heads, past + sequence, head_dim]. The names are
  those of Hugging Face optimum's decoder exports, so tools that know them can feed this
  graph. A past of length 0 serves the prompt (prefill); the same graph then decodes one
  token at a time.
- ``image_text`` (CLIP, BriVL), ``speech`` (wav2vec2), ``vision`` (the vision family's ViT)
  and ``trimodal``: encoders, one forward pass each (export/signature_encoders.py);
- ``text_to_image`` (DALL-E) and ``image_tokenizer`` (vqvae): generation of image codes
  over a KV cache, and codes <-> images (export/signature_dalle.py);
- ``m6`` (M6): generation over a KV cache from image patches, text and image codes
  (export/signature_m6.py);
- ``recurrent_language_model`` (GPT-XL): one decoder graph over a segment memory of any
  length (export/signature_gpt_xl.py);
- ``classification`` (gpt_classifier): one ``classifier`` graph, token ids and mask ->
  one logit per label (export/signature_classifier.py).

This module holds what they share: the names of tasks, graphs and axes, ``TensorInfo`` and
``GraphSignature``, an export's graphs (``graphs``) and validation inputs
(``validation_cases``) by task, and the pieces of random inputs several families use. The
family modules import it, never the reverse (``graphs`` and ``validation_cases`` import
them when called).

A dimension given as a string is a dynamic axis of that name.

numpy only: the ONNX runtime side must work without torch or mindspore.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BATCH, SEQUENCE, PAST, TOTAL = "batch", "sequence", "past_sequence", "total_sequence"
LANGUAGE_MODEL, IMAGE_TEXT, SPEECH, VISION = "language_model", "image_text", "speech", "vision"
TEXT_TO_IMAGE, IMAGE_TOKENIZER, TRIMODAL, M6 = "text_to_image", "image_tokenizer", "trimodal", "m6"
RECURRENT_LANGUAGE_MODEL = "recurrent_language_model"  # GPT-XL
CLASSIFICATION = "classification"                      # gpt_classifier
DECODER, IMAGE_ENCODER, TEXT_ENCODER = "model", "image_encoder", "text_encoder"
SPEECH_TOWER = "speech_encoder"                        # trimodal
SPEECH_ENCODER, VISION_MODEL = "encoder", "model"
PREFILL, DECODE = "prefill", "decode"                  # text_to_image
CODE_DECODER, CODE_ENCODER = "decoder", "encoder"      # image_tokenizer
SAMPLES, FRAMES = "samples", "frames"
CACHE = "cache_sequence"                               # static-cache decoders (MINDIR)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple    # ints, and axis names (str) for dynamic axes

    def describe(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSignature:
    """One exported graph: its name (the file stem), its inputs and outputs, in order, and
    the task of the export it belongs to (names repeat across tasks: the GPT decoder and a
    vision backbone are both ``model``; None where the graph was rebuilt from export_info.json
    only to be run)."""

    name: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    task: str | None = None

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """{tensor: {axis: name}} for every named (dynamic) dimension of every tensor; the
        ONNX exporter turns the names into ``torch.export.Dim``s (export/onnx_export.py)."""
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
                for t in self.inputs + self.outputs if any(isinstance(d, str) for d in t.shape)}

    def describe(self) -> dict:
        """Names, dtypes and shapes (symbolic axes as strings) for export_info.json."""
        return {"inputs": [t.describe() for t in self.inputs],
                "outputs": [t.describe() for t in self.outputs]}


def is_static_decode(graph: GraphSignature) -> bool:
    return "write_position" in graph.input_names


def task_of(config) -> str:
    from taichu.families import get_family

    return get_family(config.family).task


def graphs(config, fmt: str = "onnx") -> tuple[GraphSignature, ...]:
    """The graphs an export of ``config`` (a full config) in ``fmt`` consists of, by its
    family's task (the format matters only for text_to_image and m6, whose MINDIR decodes
    over a static cache)."""
    from export.signature_classifier import classifier_graph
    from export.signature_dalle import dalle_graphs, image_tokenizer_graphs
    from export.signature_encoders import image_text_graphs, speech_graph, trimodal_graphs, vision_graph
    from export.signature_gpt_xl import gpt_xl_graph
    from export.signature_m6 import m6_graphs

    task = task_of(config)
    if task == M6:
        return m6_graphs(config.model, static=fmt == "mindir")
    if task == RECURRENT_LANGUAGE_MODEL:
        return (gpt_xl_graph(config.model),)
    if task == CLASSIFICATION:
        return (classifier_graph(config.model),)
    if task == TEXT_TO_IMAGE:
        return dalle_graphs(config.model, static=fmt == "mindir")
    if task == IMAGE_TOKENIZER:
        return image_tokenizer_graphs(config.model)
    if task == LANGUAGE_MODEL:
        return (decoder_graph(config.model),)
    if task == IMAGE_TEXT:
        return image_text_graphs(config.model)
    if task == TRIMODAL:
        return trimodal_graphs(config.model)
    if task == SPEECH:
        return (speech_graph(config.model),)
    if task == VISION:
        return (vision_graph(config.model),)
    raise ValueError(f"family {config.family} (task {task}) has no export signature")


def validation_cases(model_config, graph: GraphSignature) -> list[tuple[dict, dict[str, np.ndarray]]]:
    """(shape description, random inputs) at the two shapes an export is validated at."""
    from export.signature_classifier import classifier_validation_cases
    from export.signature_dalle import (IMAGE_TOKENIZER_VALIDATION_BATCHES, dalle_validation_cases,
                                        image_tokenizer_inputs)
    from export.signature_encoders import (TEXT_VALIDATION_SHAPES, VISION_VALIDATION_BATCHES, image_inputs,
                                           speech_validation_cases, text_inputs, vision_inputs)
    from export.signature_gpt_xl import gpt_xl_validation_cases
    from export.signature_m6 import m6_validation_cases

    m = model_config
    if graph.task == M6:
        return m6_validation_cases(m, graph)
    if graph.task == RECURRENT_LANGUAGE_MODEL:
        return gpt_xl_validation_cases(m, graph)
    if graph.task == CLASSIFICATION:
        return classifier_validation_cases(m, graph)
    if graph.task == TEXT_TO_IMAGE:
        return dalle_validation_cases(m, graph)
    if graph.task == IMAGE_TOKENIZER:
        return [({"batch": b}, image_tokenizer_inputs(m, graph, b, seed))
                for seed, b in enumerate(IMAGE_TOKENIZER_VALIDATION_BATCHES)]
    if graph.task == VISION:
        return [({"batch": b}, vision_inputs(m, b, seed)) for seed, b in enumerate(VISION_VALIDATION_BATCHES)]
    if graph.name == DECODER:
        return [({"batch": b, "sequence": n, "past": p}, sample_inputs(m, b, n, p, seed))
                for seed, (b, n, p) in enumerate(DECODER_VALIDATION_SHAPES)]
    if graph.name == IMAGE_ENCODER:
        return [({"batch": b}, image_inputs(m, b, seed)) for seed, b in enumerate(IMAGE_VALIDATION_BATCHES)]
    if graph.name == SPEECH_TOWER:
        return speech_validation_cases(m.speech)
    if graph.name == SPEECH_ENCODER:
        return speech_validation_cases(m)
    context = m.text.max_position_embeddings
    cases = []
    for seed, (b, n) in enumerate(TEXT_VALIDATION_SHAPES):
        n = context if n is None else min(n, context)
        cases.append(({"batch": b, "sequence": n}, text_inputs(m, b, n, seed)))
    return cases


# ----------------------------------------------------------------------- random inputs

# Batch 1 and a batch of 5: the validation batches of the image-text image tower, and of
# every graph of images (the vision backbone, the image tokenizer, M6's image encoder).
IMAGE_VALIDATION_BATCHES = (1, 5)
# Token ids below this are the special tokens (pad, unk, bos, eos): random text avoids them.
FIRST_ORDINARY_ID = 4


def _pixels(batch: int, channels: int, size: int, seed: int) -> dict[str, np.ndarray]:
    shape = (batch, channels, size, size)
    return {"pixel_values": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


# ----------------------------------------------------------------------- GPT decoder

# (batch, sequence, past): prefill of a padded batch, then a continuation with a cache.
DECODER_VALIDATION_SHAPES = ((2, 7, 0), (3, 2, 5))


def input_names(num_layers: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def output_names(num_layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def decoder_graph(model_config) -> GraphSignature:
    m = model_config
    cache = (BATCH, m.num_heads, PAST, m.head_dim)
    present = (BATCH, m.num_heads, TOTAL, m.head_dim)
    inputs = (TensorInfo("input_ids", "int64", (BATCH, SEQUENCE)),
              TensorInfo("attention_mask", "int64", (BATCH, TOTAL)),
              TensorInfo("position_ids", "int64", (BATCH, SEQUENCE)))
    inputs += tuple(TensorInfo(n, "float32", cache) for n in input_names(m.num_layers)[3:])
    outputs = (TensorInfo("logits", "float32", (BATCH, SEQUENCE, m.vocab_size)),)
    outputs += tuple(TensorInfo(n, "float32", present) for n in output_names(m.num_layers)[1:])
    return GraphSignature(DECODER, inputs, outputs, LANGUAGE_MODEL)


def describe(model_config) -> dict:
    """The decoder's names, dtypes and shapes (symbolic axes as strings) for export_info.json."""
    return decoder_graph(model_config).describe()


def position_ids(attention_mask: np.ndarray, length: int) -> np.ndarray:
    """Positions of the last ``length`` columns: the count of real tokens before each one.

    The same rule as the models' default position ids, so a left-padded prompt gets the
    positions (and logits) it would get alone.
    """
    positions = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)
    return positions[:, attention_mask.shape[1] - length:].astype(np.int64)


def sample_inputs(model_config, batch: int, length: int, past: int, seed: int) -> dict[str, np.ndarray]:
    """Random decoder inputs with left padding in row 0 and a random cache of length ``past``."""
    m = model_config
    rng = np.random.default_rng(seed)
    total = past + length
    attention_mask = np.ones((batch, total), np.int64)
    attention_mask[0, :min(2, total - 1)] = 0
    feeds = {"input_ids": rng.integers(4, m.vocab_size, (batch, length)).astype(np.int64),
             "attention_mask": attention_mask,
             "position_ids": position_ids(attention_mask, length)}
    for name in input_names(m.num_layers)[3:]:
        feeds[name] = rng.standard_normal((batch, m.num_heads, past, m.head_dim)).astype(np.float32)
    return feeds

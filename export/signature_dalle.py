"""Signatures of the text-to-image exports, DALL-E's generation and its image tokenizer's
codes <-> images, and their random validation inputs; the shared names and types are
export/signature.py's:

- ``text_to_image`` (DALL-E): generation over a KV cache as two graphs, as optimum splits a
  decoder into ``decoder_model`` and ``decoder_with_past_model``, with its names for the
  cache. ``prefill``: ``input_ids`` int64 [batch, text_length] (the whole caption as
  training made it: [bos] + tokens + [eos], right-padded with the pad id; the text length is
  fixed by the model) -> ``logits`` float32 [batch, codebook_size] (the first image code's,
  i.e. the model's image logits at the last text position) and ``present.{i}.key`` /
  ``.value`` [batch, heads, text_length, head_dim]. ``decode`` (ONNX): ``image_codes`` int64
  [batch, sequence] (the next codes, row-major over the grid) and
  ``past_key_values.{i}.key`` / ``.value`` [batch, heads, past_sequence, head_dim] (the
  text's and the codes' so far) -> ``logits`` float32 [batch, sequence, codebook_size]
  (position k predicts the code after image_codes[:, k]) and ``present.{i}.*`` [batch,
  heads, total_sequence, head_dim]. The codes' grid positions come from the past's length
  inside the graph (code j = past_sequence - text_length + k), never from a constant:
  past_sequence >= text_length and past_sequence + sequence <= text_length + grid^2 (the
  model's own bound, taichu.families.dalle.check_inputs; generation never feeds the last code,
  which is only ever a target). The text logits are not exported (generation does
  not read them). MINDIR's ``decode`` runs over a static cache instead
  (export/mindir_export.py, ``dalle_static_graphs``).
- ``image_tokenizer`` (vqvae): ``decoder``: ``codes`` int64 [batch, grid, grid] (grid =
  image_size / 2^downsamplings, fixed) -> ``pixel_values`` float32 [batch, 3, size, size],
  normalised as the model's decode gives them (times ``model.pixel_std`` plus
  ``model.pixel_mean`` then x 255 makes 0-255 pixels: taichu.images.denormalise, what
  export.runtime_dalle's image decoder applies). ``encoder``: ``pixel_values`` float32 [batch, 3,
  size, size] (normalised with the model's pixel_mean / pixel_std, taichu.images.normalise)
  -> ``codes`` int64 [batch, grid, grid] (int32 in MINDIR: MindSpore's Argmin). Only batch
  is dynamic.

A dimension given as a string is a dynamic axis of that name.

numpy only: the ONNX runtime side must work without torch or mindspore.
"""
from __future__ import annotations

import numpy as np

from export.signature import (BATCH, CACHE, CODE_DECODER, CODE_ENCODER, DECODE, FIRST_ORDINARY_ID,
                              IMAGE_TOKENIZER, IMAGE_VALIDATION_BATCHES, PAST, PREFILL, SEQUENCE,
                              TEXT_TO_IMAGE, TOTAL, GraphSignature, TensorInfo, _pixels, input_names,
                              is_static_decode, output_names)


# ----------------------------------------------------------------------- DALL-E generation

# Validation: prefill at batch 1 and 3; decode (batch, codes, codes already in the past):
# the first code right after the prefill, then 4 codes after 5. The static-cache decode
# (MINDIR) at (batch, cache slots, write position): the first code's slot of a cache as long
# as generation uses (text_length + grid^2 - 1), and a later slot of a shorter cache.
DALLE_PREFILL_VALIDATION_BATCHES = (1, 3)
DALLE_DECODE_VALIDATION_SHAPES = ((1, 1, 0), (3, 4, 5))


def dalle_cache_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(past inputs, present outputs): optimum's names, as the GPT decoder's."""
    return input_names(num_layers)[3:], output_names(num_layers)[1:]


def dalle_graphs(model_config, static: bool = False) -> tuple[GraphSignature, GraphSignature]:
    """``prefill`` and ``decode`` of a DALL-E (module docstring). ``static``: MINDIR's decode
    over a cache of fixed length (export/mindir_export.py): ``image_codes`` [batch, 1],
    ``write_position`` int32 scalar (the slot of this code = text_length + its index in the
    grid), ``past_key_values.{i}.*`` [batch, heads, cache_sequence, head_dim] -> ``logits``
    [batch, codebook_size] and the cache with that slot written."""
    m = model_config
    past, present = dalle_cache_names(m.num_layers)

    def cache(names, length):
        return tuple(TensorInfo(n, "float32", (BATCH, m.num_heads, length, m.head_dim)) for n in names)
    prefill = GraphSignature(PREFILL, (TensorInfo("input_ids", "int64", (BATCH, m.text_length)),),
                             (TensorInfo("logits", "float32", (BATCH, m.codebook_size)),)
                             + cache(present, m.text_length), TEXT_TO_IMAGE)
    if static:
        decode = GraphSignature(DECODE, (TensorInfo("image_codes", "int64", (BATCH, 1)),
                                         TensorInfo("write_position", "int32", ())) + cache(past, CACHE),
                                (TensorInfo("logits", "float32", (BATCH, m.codebook_size)),) + cache(present, CACHE),
                                TEXT_TO_IMAGE)
    else:
        decode = GraphSignature(DECODE, (TensorInfo("image_codes", "int64", (BATCH, SEQUENCE)),) + cache(past, PAST),
                                (TensorInfo("logits", "float32", (BATCH, SEQUENCE, m.codebook_size)),)
                                + cache(present, TOTAL), TEXT_TO_IMAGE)
    return prefill, decode


def dalle_text_ids(model_config, batch: int, rng) -> np.ndarray:
    """Random captions as caption_ids makes them: bos (2), tokens, eos (3), pads (0) after;
    rows of different lengths."""
    m = model_config
    ids = np.zeros((batch, m.text_length), np.int64)
    for row, n in enumerate(np.linspace(m.text_length - 2, 1, batch).round().astype(int)):
        ids[row, 0] = 2
        ids[row, 1:n + 1] = rng.integers(FIRST_ORDINARY_ID, m.vocab_size, n)
        ids[row, n + 1] = 3
    return ids


def dalle_inputs(model_config, graph: GraphSignature, batch: int, codes: int, done: int,
                 seed: int, cache: int | None = None) -> dict[str, np.ndarray]:
    """Random inputs of a DALL-E graph: prefill (captions); decode (``codes`` new codes after
    a random past of the text and ``done`` codes); static decode (one code written at slot
    text_length + ``done`` of a random cache of ``cache`` slots)."""
    m = model_config
    rng = np.random.default_rng(seed)
    if graph.name == PREFILL:
        return {"input_ids": dalle_text_ids(m, batch, rng)}
    length = m.text_length + done
    feeds = {"image_codes": rng.integers(0, m.codebook_size, (batch, codes)).astype(np.int64)}
    if is_static_decode(graph):
        feeds["write_position"] = np.array(length, np.int32)
        length = cache
    for name in dalle_cache_names(m.num_layers)[0]:
        feeds[name] = rng.standard_normal((batch, m.num_heads, length, m.head_dim)).astype(np.float32)
    return feeds


def dalle_validation_cases(model_config, graph: GraphSignature) -> list[tuple[dict, dict[str, np.ndarray]]]:
    m = model_config
    if graph.name == PREFILL:
        return [({"batch": b}, dalle_inputs(m, graph, b, 0, 0, seed))
                for seed, b in enumerate(DALLE_PREFILL_VALIDATION_BATCHES)]
    cases = []
    for seed, (batch, codes, done) in enumerate(DALLE_DECODE_VALIDATION_SHAPES):
        done = min(done, m.image_tokens - 1 - codes)
        if is_static_decode(graph):
            # One code per step: the first shape's cache as long as generation's, the
            # second's a few slots past the write position.
            cache = m.max_length if seed == 0 else min(m.max_length, m.text_length + done + 3)
            cases.append(({"batch": batch, "cache": cache, "write_position": m.text_length + done},
                          dalle_inputs(m, graph, batch, 1, done, seed, cache)))
        else:
            cases.append(({"batch": batch, "sequence": codes, "past": m.text_length + done},
                          dalle_inputs(m, graph, batch, codes, done, seed)))
    return cases


# ----------------------------------------------------------------------- image tokenizer

# Batch 1 and a batch of 5, as the image tower's.
IMAGE_TOKENIZER_VALIDATION_BATCHES = IMAGE_VALIDATION_BATCHES


def image_tokenizer_graphs(model_config) -> tuple[GraphSignature, GraphSignature]:
    """``decoder`` (codes -> normalised pixels) and ``encoder`` (pixels -> codes) of a vqvae."""
    m = model_config
    pixels = TensorInfo("pixel_values", "float32", (BATCH, m.num_channels, m.image_size, m.image_size))
    codes = TensorInfo("codes", "int64", (BATCH, m.grid, m.grid))
    return (GraphSignature(CODE_DECODER, (codes,), (pixels,), IMAGE_TOKENIZER),
            GraphSignature(CODE_ENCODER, (pixels,), (codes,), IMAGE_TOKENIZER))


def image_tokenizer_inputs(model_config, graph: GraphSignature, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Random codes (decoder) or standard normal pixels (encoder)."""
    m = model_config
    if graph.name == CODE_DECODER:
        rng = np.random.default_rng(seed)
        return {"codes": rng.integers(0, m.codebook.size, (batch, m.grid, m.grid)).astype(np.int64)}
    return _pixels(batch, m.num_channels, m.image_size, seed)

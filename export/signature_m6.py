"""Signatures of the M6 exports and their random validation inputs; the shared names and
types are export/signature.py's:

- ``m6`` (M6: one Transformer over image patches, text and image codes, the task set by
  the segments, taichu/families/m6.py). Generation is a prefill (the image's patches, then
  the prompt, then for text to image the start code) and one new position per step, the
  segments of the whole history telling the graph what every cached position is. ONNX has
  two graphs, the fewest that serve captioning and VQA (an image and a prompt), text alone
  and text to image without holding any weight twice:

  ``image_encoder``: ``pixel_values`` float32 [batch, channels, size, size] (normalised as
  in training) -> ``patch_embeds`` float32 [batch, patches, hidden]: the patch ResNet's
  features plus the patch positions, the image's term of the model's embeddings before the
  segments are added. Only batch is dynamic (the size fixes the patches).

  ``decoder``: ``patch_embeds`` float32 [batch, patches, hidden] (the image encoder's;
  [batch, 0, hidden] without an image and at every step), ``input_ids`` int64 [batch,
  sequence] (the prompt, left-padded; one token per text step; [batch, 0] for none),
  ``image_codes`` int64 [batch, codes] (the start code, id ``codebook_size``, after a
  caption; one code per code step; [batch, 0] for none), ``segment_ids`` int64 [batch,
  total_sequence] (PAD 0 / IMAGE 1 / PREFIX 2 / TARGET 3 / CODE 4 of every cached position,
  then of the new ones: patches, text, codes in that order; total_sequence = past_sequence +
  patches + sequence + codes) and ``past_key_values.{i}.key`` / ``.value`` [batch, heads,
  past_sequence, head_dim] (past_sequence 0 for the prefill) -> ``logits`` float32 [batch,
  vocab] (the tied LM head at the call's last text position: the next token's; zeros when
  the call has no text), ``code_logits`` float32 [batch, codebook] (the code head at the
  call's last code slot: the next code's; zeros when it has none) and ``present.{i}.key`` /
  ``.value`` [batch, heads, total_sequence, head_dim]. Every axis but the widths is
  dynamic, and patches, sequence, codes and past_sequence may each be 0. A model without a
  codebook has neither ``image_codes`` nor ``code_logits``. The text and code positions
  come from the segments (the count of PREFIX + TARGET, or of CODE, slots before each), so a
  left-padded prompt gets the positions it would get alone. One graph serves the prefill and
  the steps (an empty past, as the GPT's decoder) rather than DALL-E's pair, which holds the
  Transformer twice; the price of one graph for both kinds of position is that every call
  runs both heads at one position (a code step also pays the LM head's row: about a tenth of
  a step at m6-base). Validation feeds the decoder pixels through the exported image encoder
  (the model's forward starts from pixels).

  MINDIR decodes over a static cache (mindspore_impl/m6.py's StaticCachePrefill and
  StaticCacheDecoder, export/mindir_export.py), ids int32, every axis fixed but batch and
  the cache length (what Ascend compiles best; and M6.construct branches on its inputs'
  lengths, which MindSpore cannot compile over a dynamic prompt axis). ``prefill``:
  ``pixel_values`` [batch, channels, size, size] (zeros, with PAD patches, for no image:
  the cache always starts with the patches' slots), ``input_ids`` [batch, text_length] (the
  prompt left-padded to the text length with PAD segments: padding is never attended to and
  positions count only PREFIX and TARGET slots, so the logits are the unpadded prompt's),
  ``segment_ids`` [batch, patches + text_length] -> ``logits`` [batch, vocab] of the last
  position and ``present.{i}.*`` [batch, heads, patches + text_length, head_dim], which the
  runtime copies into a cache of ``m6_cache_capacity`` = patches + 2 text_length +
  image_grid^2 slots (the prefill's, then every text and code slot the model has).
  ``decode`` (a text token) and, with a codebook, ``decode_codes`` (an image code):
  ``input_ids`` / ``image_codes`` [batch, 1], ``segment_ids`` [batch, cache_sequence] (PAD
  for the slots not written yet), ``write_position`` int32 scalar (this position's slot),
  ``past_key_values.{i}.*`` [batch, heads, cache_sequence, head_dim] -> ``logits`` [batch,
  vocab] / ``code_logits`` [batch, codebook] and the cache with that slot written. The start
  code of text to image is the first ``decode_codes`` step after the caption's prefill
  (prefix positions never attend to a target, so the caption's keys and values are the same
  either way; a prefill with the start code would be a fourth graph holding every weight
  again). No image encoder of its own: the prefill runs the patches, and generation needs
  nothing else.

A dimension given as a string is a dynamic axis of that name.

numpy only: the ONNX runtime side must work without torch or mindspore.
"""
from __future__ import annotations

import numpy as np

from export.signature import (BATCH, CACHE, DECODE, FIRST_ORDINARY_ID, IMAGE_ENCODER, IMAGE_VALIDATION_BATCHES,
                              M6, PAST, PREFILL, SEQUENCE, TOTAL, GraphSignature, TensorInfo, _pixels,
                              input_names, output_names)


# ----------------------------------------------------------------------- M6

M6_DECODER, DECODE_CODES = "decoder", "decode_codes"
PATCHES, CODES = "patches", "codes"
PAD_SEGMENT, IMAGE_SEGMENT, PREFIX_SEGMENT, TARGET_SEGMENT, CODE_SEGMENT = 0, 1, 2, 3, 4
# Validation. image_encoder: batch 1 and 5. decoder (ONNX), per kind of call (a prefill, a
# one-position step) once with text last and once with a code last: (batch, image, text,
# codes, past_image, past_text, past_codes). A prefill with an image (its last row without
# one: PAD patches) and a left-padded prompt; a text-to-image prefill (a caption, the start
# code); a TARGET token after an image and 9 text slots; the 4th code after 10 text slots and
# 3 codes (clipped to the grid).
M6_IMAGE_VALIDATION_BATCHES = IMAGE_VALIDATION_BATCHES
M6_DECODER_VALIDATION_CASES = ((3, True, 7, 0, False, 0, 0), (2, False, 9, 1, False, 0, 0),
                               (3, False, 1, 0, True, 9, 0), (2, False, 0, 1, False, 10, 3))
# MINDIR (static cache). prefill: (batch, image, prompt): with an image (its last row
# without one) and a prompt of 7 left-padded to the text length, and a prompt filling it
# without an image. decode / decode_codes: (batch, image, prompt, generated, cache): the
# first token or code after a prefill with an image and a prompt of 7, in a cache as long as
# generation's (None: m6_cache_capacity), and the 4th after 3 (codes: clipped to the grid)
# after a prompt of 9 without an image, in a cache 4 slots longer than the history.
M6_PREFILL_VALIDATION_SHAPES = ((2, True, 7), (3, False, None))
M6_DECODE_VALIDATION_SHAPES = ((2, True, 7, 0, None), (3, False, 9, 3, 4))


def m6_cache_capacity(model_config) -> int:
    """Slots of the static cache MINDIR generation runs over: the prefill's (patches +
    text_length, the prompt left-padded), then every text and code slot the model has
    (text_length + image_grid^2): all that a generation can write."""
    m = model_config
    return m.num_patches + 2 * m.text_length + m.num_codes


def m6_cache_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(past inputs, present outputs): optimum's names, as the GPT decoder's."""
    return input_names(num_layers)[3:], output_names(num_layers)[1:]


def m6_graphs(model_config, static: bool = False) -> tuple[GraphSignature, ...]:
    """The graphs of an M6 export (module docstring): ONNX ``image_encoder`` and ``decoder``;
    MINDIR (``static``) ``prefill``, ``decode`` and, with a codebook, ``decode_codes``."""
    m = model_config
    codebook = m.codebook_size
    past, present = m6_cache_names(m.num_layers)

    def cache(names, length):
        return tuple(TensorInfo(n, "float32", (BATCH, m.num_heads, length, m.head_dim)) for n in names)
    pixels = TensorInfo("pixel_values", "float32", (BATCH, m.num_channels, m.image_size, m.image_size))
    logits = TensorInfo("logits", "float32", (BATCH, m.vocab_size))
    code_logits = TensorInfo("code_logits", "float32", (BATCH, codebook)) if codebook else None
    if not static:
        image = GraphSignature(IMAGE_ENCODER, (pixels,),
                               (TensorInfo("patch_embeds", "float32", (BATCH, m.num_patches, m.hidden_size)),), M6)
        inputs = (TensorInfo("patch_embeds", "float32", (BATCH, PATCHES, m.hidden_size)),
                  TensorInfo("input_ids", "int64", (BATCH, SEQUENCE)))
        if codebook:
            inputs += (TensorInfo("image_codes", "int64", (BATCH, CODES)),)
        inputs += (TensorInfo("segment_ids", "int64", (BATCH, TOTAL)),) + cache(past, PAST)
        outputs = (logits,) + ((code_logits,) if codebook else ()) + cache(present, TOTAL)
        return image, GraphSignature(M6_DECODER, inputs, outputs, M6)
    prompt = m.num_patches + m.text_length
    prefill = GraphSignature(PREFILL, (pixels, TensorInfo("input_ids", "int64", (BATCH, m.text_length)),
                                       TensorInfo("segment_ids", "int64", (BATCH, prompt))),
                             (logits,) + cache(present, prompt), M6)
    graphs = (prefill,)
    for name, new, out in ((DECODE, "input_ids", logits), (DECODE_CODES, "image_codes", code_logits)):
        if out is None:
            continue
        graphs += (GraphSignature(name, (TensorInfo(new, "int64", (BATCH, 1)),
                                         TensorInfo("segment_ids", "int64", (BATCH, CACHE)),
                                         TensorInfo("write_position", "int32", ())) + cache(past, CACHE),
                                  (out,) + cache(present, CACHE), M6),)
    return graphs


def m6_segments(model_config, batch: int, image: bool, text: int, codes: int, padded_rows=(0,),
                imageless_rows=()) -> np.ndarray:
    """int64 [batch, (patches if image) + text + codes]: IMAGE patches (PAD in
    ``imageless_rows``), text slots PREFIX (the first two PAD in ``padded_rows`` when the
    text has four slots or more: left padding), CODE slots."""
    m = model_config
    parts = []
    if image:
        patches = np.full((batch, m.num_patches), IMAGE_SEGMENT, np.int64)
        patches[list(imageless_rows)] = PAD_SEGMENT
        parts.append(patches)
    words = np.full((batch, text), PREFIX_SEGMENT, np.int64)
    if text >= 4:
        words[list(padded_rows), :2] = PAD_SEGMENT
    parts += [words, np.full((batch, codes), CODE_SEGMENT, np.int64)]
    return np.concatenate(parts, axis=1)


def m6_inputs(model_config, batch: int, seed: int, image: bool = False, text: int = 0, codes: int = 0,
              past_image: bool = False, past_text: int = 0, past_codes: int = 0) -> dict[str, np.ndarray]:
    """Random M6 inputs of one call. Without a past: ``pixel_values`` (when ``image``; zeros
    in the last row of a batch of several, whose patches are PAD), ``input_ids`` [batch,
    text] (left padding in row 0, pad id 0), ``image_codes`` [batch, codes] (the start
    code first, then codes; with a codebook), ``segment_ids``. With a past (its layout:
    patches, ``past_text`` text slots, the second half TARGET when there are no codes,
    ``past_codes`` codes): one new text token (``text`` 1, TARGET) or code (``codes`` 1,
    CODE), random keys and values and the whole history's ``segment_ids``."""
    m = model_config
    rng = np.random.default_rng(seed)
    past = (m.num_patches if past_image else 0) + past_text + past_codes
    feeds: dict[str, np.ndarray] = {}
    if past == 0:
        imageless = (batch - 1,) if batch > 1 else ()
        if image:
            pixels = rng.standard_normal((batch, m.num_channels, m.image_size, m.image_size)).astype(np.float32)
            pixels[list(imageless)] = 0.0
            feeds["pixel_values"] = pixels
        segments = m6_segments(m, batch, image, text, codes, imageless_rows=imageless)
        ids = rng.integers(FIRST_ORDINARY_ID, m.vocab_size, (batch, text)).astype(np.int64)
        ids[segments[:, segments.shape[1] - codes - text:segments.shape[1] - codes] == PAD_SEGMENT] = 0
        feeds["input_ids"] = ids
        if m.codebook_size:
            slots = rng.integers(0, m.codebook_size, (batch, codes)).astype(np.int64)
            slots[:, :1] = m.codebook_size                # the start code
            feeds["image_codes"] = slots
        feeds["segment_ids"] = segments
        return feeds
    history = m6_segments(m, batch, past_image, past_text, past_codes, imageless_rows=())
    if not past_codes:                                    # a text generation: TARGETs after the prompt
        targets = history[:, history.shape[1] - past_text // 2:]
        targets[targets == PREFIX_SEGMENT] = TARGET_SEGMENT
    new = CODE_SEGMENT if codes else TARGET_SEGMENT
    segments = np.concatenate([history, np.full((batch, 1), new, np.int64)], axis=1)
    if codes:
        feeds["image_codes"] = rng.integers(0, m.codebook_size, (batch, 1)).astype(np.int64)
    else:
        feeds["input_ids"] = rng.integers(FIRST_ORDINARY_ID, m.vocab_size, (batch, 1)).astype(np.int64)
    feeds["segment_ids"] = segments
    for name in m6_cache_names(m.num_layers)[0]:
        feeds[name] = rng.standard_normal((batch, m.num_heads, past, m.head_dim)).astype(np.float32)
    return feeds


def m6_validation_cases(model_config, graph: GraphSignature) -> list[tuple[dict, dict[str, np.ndarray]]]:
    """(shape description, random inputs) of an M6 graph: image_encoder at batch 1 and 5;
    the ONNX decoder's four calls (M6_DECODER_VALIDATION_CASES; an image goes in as
    ``pixel_values``, through the image encoder: the model's forward starts from pixels);
    MINDIR prefill and decode(_codes) at two shapes each."""
    m = model_config
    if graph.name == IMAGE_ENCODER:
        return [({"batch": b}, _pixels(b, m.num_channels, m.image_size, seed))
                for seed, b in enumerate(M6_IMAGE_VALIDATION_BATCHES)]
    cases = []
    if graph.name == M6_DECODER:
        for seed, (batch, image, text, codes, past_image, past_text, past_codes) in enumerate(
                M6_DECODER_VALIDATION_CASES):
            if codes and not m.codebook_size:
                continue
            past_codes = min(past_codes, max(m.num_codes - 1, 0))
            feeds = m6_inputs(m, batch, seed, image, text, codes, past_image, past_text, past_codes)
            past = (m.num_patches if past_image else 0) + past_text + past_codes
            cases.append(({"batch": batch, "patches": m.num_patches if image else 0, "sequence": text,
                           "codes": codes, "past": past}, feeds))
        return cases
    if graph.name == PREFILL:
        for seed, (batch, image, prompt) in enumerate(M6_PREFILL_VALIDATION_SHAPES):
            prompt = m.text_length if prompt is None else min(prompt, m.text_length)
            feeds = m6_inputs(m, batch, seed, True, m.text_length)
            pad = m.text_length - prompt                  # left padding up to the text length
            feeds["input_ids"][:, :pad] = 0
            feeds["segment_ids"][:, m.num_patches:m.num_patches + pad] = PAD_SEGMENT
            if not image:                                 # no image: zeros, PAD patches
                feeds["pixel_values"][:] = 0.0
                feeds["segment_ids"][:, :m.num_patches] = PAD_SEGMENT
            feeds.pop("image_codes", None)
            cases.append(({"batch": batch, "image": image, "prompt": prompt}, feeds))
        return cases
    codes = graph.name == DECODE_CODES
    for seed, (batch, image, prompt, generated, cache) in enumerate(M6_DECODE_VALIDATION_SHAPES):
        rng = np.random.default_rng(seed)
        prompt = min(prompt, m.text_length - 1)
        generated = min(generated, m.num_codes - 1 if codes else m.text_length - 1 - prompt)
        # The static cache's layout: the patches' slots, the prompt left-padded to the text
        # length, what was generated, the new slot (at write_position), PAD to the end.
        history = [np.full((batch, m.num_patches), IMAGE_SEGMENT if image else PAD_SEGMENT),
                   np.full((batch, m.text_length - prompt), PAD_SEGMENT), np.full((batch, prompt), PREFIX_SEGMENT),
                   np.full((batch, generated + 1), CODE_SEGMENT if codes else TARGET_SEGMENT)]
        segments = np.concatenate(history, axis=1).astype(np.int64)
        position = segments.shape[1] - 1
        cache = m6_cache_capacity(m) if cache is None else position + 1 + cache
        feeds = {"image_codes" if codes else "input_ids":
                 rng.integers(0, m.codebook_size, (batch, 1)) if codes else
                 rng.integers(FIRST_ORDINARY_ID, m.vocab_size, (batch, 1)),
                 "segment_ids": np.pad(segments, ((0, 0), (0, cache - segments.shape[1]))),
                 "write_position": np.array(position, np.int32)}
        feeds[graph.input_names[0]] = feeds[graph.input_names[0]].astype(np.int64)
        for name in m6_cache_names(m.num_layers)[0]:
            feeds[name] = rng.standard_normal((batch, m.num_heads, cache, m.head_dim)).astype(np.float32)
        cases.append(({"batch": batch, "cache": cache, "write_position": position}, feeds))
    return cases

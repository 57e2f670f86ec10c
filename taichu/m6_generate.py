"""Generation with an M6 (issue 20): captioning, visual question answering, text continuation
(with or without an image) and text to image, over a KV cache, with the shared numpy sampler
(taichu.generate: greedy, temperature, top-k, top-p, repetition penalty; the same seed gives
the same tokens on every runtime).

The runtime-neutral step. A runtime supplies

    step(pixel_values | None, input_ids | None, image_codes | None, segment_ids, past)
        -> (logits of the last new position, float32 numpy [B, vocab], or [B, codebook] when
            that position is a CODE slot; past)

- prefill (``past`` None): pixel_values float32 [B, 3, S, S] or None (S = model.image_size:
  another size is refused, the caller resizes), input_ids int64 [B, L] ([bos] + prompt,
  left-padded), image_codes [B, 1] (the start code, id codebook_size) or None, and
  segment_ids [B, (patches) + L (+ 1)]: IMAGE (PAD for a row without an image) for the
  patches, PAD for the left padding, PREFIX for the prompt, CODE for the start code
  (taichu.families.m6 SEGMENTS).
- each later call: one new position, input_ids [B, 1] (a TARGET text token) or image_codes
  [B, 1] (a CODE slot), and segment_ids [B, past + 1], the segments of the whole history and
  the new one's (PAD for a row that has finished: it is never attended to).
- ``past`` is opaque: whatever the previous call returned.

Inputs are checked (taichu.families.m6.check_inputs, one wording in every runtime) before
anything runs. Steps: ``model_step`` for a taichu M6 (PyTorch eager over the model's growing
cache; MindSpore compiled with mindspore.jit over a static cache, ``static_cache_step``, or
PyNative over the growing cache), export.runtime's ``m6_network(DIR, "onnx" | "mindir").step``
for an export.

Tasks (the segments the model was trained with, taichu.families.m6):

  caption        IMAGE + PREFIX [bos]            -> TARGET caption [eos]
  ask            IMAGE + PREFIX [bos] question   -> TARGET answer [eos]
  continue_text  (IMAGE +) PREFIX [bos] text     -> TARGET the rest [eos]
  imagine_codes  PREFIX [bos] caption [eos] (right-padded to text_length, as training) +
                 CODE start code                 -> each code one CODE step

Prompts come from taichu.m6_data.prompt_inputs (left-padded, the same as training's prefix).
Text generation stops at eos, at ``max_new_tokens``, or when the text slots are full: a batch
generates at most text_length - L tokens (L: its longest [bos] + prompt), since the model has
text_length text positions. A prompt that leaves no slot to generate is refused, as are an
empty prompt or question, a question without an image, and pixel_values of another size.
Greedy outputs do not depend on the batch (left padding is invisible) unless that limit cuts
a row short.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from taichu.families.m6 import CODE, PAD, PREFIX, TARGET, check_inputs
from taichu.generate import SamplingConfig, bucket, generate_ids

# Prompts are left-padded to a multiple-of-two bucket of text slots (at most text_length) and
# caches hold a power of two of at least MIN_CACHE positions: a compiled graph per (batch,
# bucket) and per (batch, cache), a few in all.
PROMPT_BUCKET = 8
MIN_CACHE = 64


def _span(x):
    return None if x is None or not np.size(x) else (int(np.min(x)), int(np.max(x)))


def _shape(x):
    return None if x is None else tuple(np.shape(x))


def check_step_inputs(config, pixel_values, input_ids, image_codes, segment_ids, past_length: int) -> None:
    """taichu.families.m6.check_inputs on numpy inputs (what a compiled graph cannot do)."""
    check_inputs(config, _shape(pixel_values), _shape(input_ids), _span(input_ids), _shape(segment_ids),
                 _span(segment_ids), _shape(image_codes), _span(image_codes), past_length)


# ----------------------------------------------------------------------------- steps

def model_step(model, static_cache: bool | None = None):
    """``step`` (module docstring) for a taichu M6 of either backend.

    static_cache: a preallocated cache and compiled graphs (StaticCacheStep over ``*_impl.m6``
    StaticCachePrefill / StaticCacheDecoder) instead of the cache that grows by one column a
    step. Default: static for MindSpore (graph mode compiles one shape; PyNative would run
    each small op from Python), growing for PyTorch (eager; the static one is there for
    parity tests)."""
    from taichu.api import backend_of

    backend = backend_of(model)
    static = backend == "mindspore" if static_cache is None else static_cache
    if static:
        return static_cache_step(model)
    if backend == "torch":
        import torch

        def torch_tensor(x):
            return None if x is None else torch.from_numpy(np.ascontiguousarray(x))

        def step(pixel_values, input_ids, image_codes, segment_ids, past):
            with torch.no_grad():     # the model checks its inputs itself
                text, code, past = model(torch_tensor(pixel_values), torch_tensor(input_ids),
                                         torch_tensor(segment_ids), torch_tensor(image_codes), past, True)
            logits = text if image_codes is None else code
            return logits[:, -1].float().numpy(), past
        return step

    import mindspore as ms

    def ms_tensor(x, dtype):
        return None if x is None else ms.Tensor(np.ascontiguousarray(x).astype(dtype))

    model.set_train(False)

    def step(pixel_values, input_ids, image_codes, segment_ids, past):
        text, code, past = model(ms_tensor(pixel_values, np.float32), ms_tensor(input_ids, np.int32),
                                 ms_tensor(segment_ids, np.int32), ms_tensor(image_codes, np.int32), past, True)
        logits = text if image_codes is None else code
        return logits[:, -1].asnumpy().astype(np.float32), past
    return step


@dataclass
class StaticCache:
    """What StaticCacheStep passes from step to step as ``past``."""

    tensors: list          # key and value of each layer [B, heads, capacity, head_dim]
    segments: np.ndarray   # int64 [B, written]: the segment of each written slot
    length: int            # positions the caller has given (its segment_ids' width)
    capacity: int          # slots of the cache


class StaticCacheStep:
    """``step`` over a cache of fixed length, from runtime callables on numpy inputs:

    - ``prefill(pixel_values | None, input_ids, segment_ids, image_codes | None)`` -> (logits
      of the last position [B, vocab] (with image_codes [B, codebook]) numpy, key and value
      of each layer [B, heads, positions, head_dim]): the StaticCachePrefill graph, codes=True
      when image_codes is given;
    - ``decode(new_ids [B, 1], segment_ids [B, capacity], write_position, cache, codes)`` ->
      (logits numpy, the cache with slot write_position written): the StaticCacheDecoder
      graph (codes: image_codes, not text);
    - ``extend(cache, capacity)`` -> the cache zero-padded to ``capacity`` slots.

    The prompt is left-padded further to its bucket (PROMPT_BUCKET, at most text_length;
    the padding is PAD, invisible, and positions count real tokens), its keys and values
    start a cache of ``bucket(prompt + what the text or code slots can still take,
    MIN_CACHE)`` slots, and each new position is written at the next slot with the segment
    the caller gives (slots not written yet are PAD); a full cache grows to the next
    bucket. Inputs are checked here (the graphs cannot raise). Arrays given to the callables
    are numpy (int64 ids and segments, float32 pixels); each runtime converts.
    """

    def __init__(self, config, prefill, decode, extend):
        self.config, self.prefill, self.decode, self.extend = config, prefill, decode, extend

    def __call__(self, pixel_values, input_ids, image_codes, segment_ids, past: StaticCache | None):
        segment_ids = np.asarray(segment_ids, np.int64)
        check_step_inputs(self.config, pixel_values, input_ids, image_codes, segment_ids,
                          0 if past is None else past.length)
        if past is None:
            return self._prefill(pixel_values, input_ids, image_codes, segment_ids)
        write = past.segments.shape[1]
        tensors, capacity = past.tensors, past.capacity
        if write >= capacity:
            capacity = bucket(write + 1, MIN_CACHE)
            tensors = self.extend(tensors, capacity)
        segments = np.concatenate([past.segments, segment_ids[:, -1:]], axis=1)
        slots = np.full((segments.shape[0], capacity), PAD, np.int64)
        slots[:, :write + 1] = segments
        codes = image_codes is not None
        new = np.asarray(image_codes if codes else input_ids, np.int64)
        logits, tensors = self.decode(new, slots, write, tensors, codes)
        return logits, StaticCache(tensors, segments, past.length + 1, capacity)

    def _prefill(self, pixel_values, input_ids, image_codes, segment_ids):
        m = self.config.model
        batch = segment_ids.shape[0]
        patches = 0 if pixel_values is None else m.num_patches
        codes = 0 if image_codes is None else image_codes.shape[1]
        if input_ids is None:   # patches alone (or codes): a zero-length text keeps one path
            input_ids = np.zeros((batch, 0), np.int64)
        length = input_ids.shape[1]
        width = max(length, min(bucket(max(length, 1), PROMPT_BUCKET), m.text_length))
        extra = width - length
        ids = np.zeros((batch, width), np.int64)     # id 0 under PAD: never attended to
        ids[:, extra:] = input_ids
        segments = np.concatenate([segment_ids[:, :patches], np.full((batch, extra), PAD, np.int64),
                                   segment_ids[:, patches:]], axis=1)
        logits, tensors = self.prefill(pixel_values, ids, segments,
                                       None if image_codes is None else np.asarray(image_codes, np.int64))
        text = segment_ids[:, patches:patches + length]
        real_text = int(((text == PREFIX) | (text == TARGET)).sum(axis=1).max()) if length else 0
        room = (m.num_codes - codes) if codes else (m.text_length - real_text)
        capacity = bucket(segments.shape[1] + max(room, 1), MIN_CACHE)
        return logits, StaticCache(self.extend(tensors, capacity), segments, segment_ids.shape[1], capacity)


def static_cache_step(model) -> StaticCacheStep:
    """StaticCacheStep over a taichu M6's StaticCachePrefill and StaticCacheDecoder cells (a
    text and a code pair): in MindSpore compiled with mindspore.jit (whatever the context
    mode), in PyTorch eager."""
    from taichu.api import backend_of

    if backend_of(model) == "mindspore":
        import mindspore as ms

        from mindspore_impl.m6 import StaticCacheDecoder, StaticCachePrefill

        model.set_train(False)
        cells = {(kind, codes): ms.jit(cell(model, codes)) for kind, cell in
                 (("prefill", StaticCachePrefill), ("decode", StaticCacheDecoder)) for codes in (False, True)}
        return mindspore_graph_step(model.config, cells)
    import torch
    import torch.nn.functional as F

    from torch_impl.m6 import StaticCacheDecoder, StaticCachePrefill

    cells = {(kind, codes): cell(model, codes).eval() for kind, cell in
             (("prefill", StaticCachePrefill), ("decode", StaticCacheDecoder)) for codes in (False, True)}

    def tensor(x):
        return None if x is None else torch.from_numpy(np.ascontiguousarray(x))

    def prefill(pixel_values, input_ids, segment_ids, image_codes):
        with torch.no_grad():
            out = cells["prefill", image_codes is not None](tensor(pixel_values), tensor(input_ids),
                                                            tensor(segment_ids), tensor(image_codes))
        return out[0].float().numpy(), list(out[1:])

    def decode(new_ids, segment_ids, write_position, cache, codes):
        with torch.no_grad():
            out = cells["decode", codes](tensor(new_ids), tensor(segment_ids), write_position, *cache)
        return out[0].float().numpy(), list(out[1:])

    def extend(cache, capacity):
        return [F.pad(t, (0, 0, 0, capacity - t.shape[2])) for t in cache]
    return StaticCacheStep(model.config, prefill, decode, extend)


def mindspore_graph_step(config, cells: dict) -> StaticCacheStep:
    """StaticCacheStep over MindSpore callables with the signatures of mindspore_impl.m6's
    StaticCachePrefill and StaticCacheDecoder: ``cells[("prefill" | "decode", codes)]`` for
    codes False (text) and True (image codes), the jit-compiled cells. (An M6's MINDIR export
    runs through export.runtime_m6 instead: its prefill graph takes the prompt padded to
    text_length, since MindSpore cannot export M6.construct over a dynamic prompt length.)
    Ids, segments and the write position go in as int32, pixels as float32; the cache stays
    in MindSpore tensors from step to step."""
    import mindspore as ms

    def tensor(x, dtype=np.int32):
        return None if x is None else ms.Tensor(np.ascontiguousarray(x).astype(dtype))

    def prefill(pixel_values, input_ids, segment_ids, image_codes):
        codes = image_codes is not None
        args = (tensor(pixel_values, np.float32), tensor(input_ids), tensor(segment_ids))
        out = cells["prefill", codes](*args, tensor(image_codes)) if codes else cells["prefill", False](*args)
        return out[0].asnumpy().astype(np.float32), list(out[1:])

    def decode(new_ids, segment_ids, write_position, cache, codes):
        # The position is a tensor, not a Python int: a constant would compile a graph per step.
        out = cells["decode", codes](tensor(new_ids), tensor(segment_ids), ms.Tensor(write_position, ms.int32),
                                     *cache)
        return out[0].asnumpy().astype(np.float32), list(out[1:])

    def extend(cache, capacity):
        # Once per generation (and per growth): through numpy, no graph to compile per shape.
        return [ms.Tensor(np.pad(t.asnumpy(), ((0, 0), (0, 0), (0, capacity - t.shape[2]), (0, 0))))
                for t in cache]
    return StaticCacheStep(config, prefill, decode, extend)


# ----------------------------------------------------------------------------- text

def _check_texts(texts, what: str, example: str) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError(f"no {what}s given")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{what} {i} is empty: {example}")
    return texts


def _pixel_rows(images) -> bool:
    """Whether ``images`` is pixel_values (a float array [B, C, H, W]) rather than images."""
    return isinstance(images, np.ndarray) and images.dtype != np.uint8


def _image_list(images, count: int | None, what: str) -> list:
    """images as a list, one per row (None for a row without an image); pixel_values
    [B, C, H, W] and uint8 [B, H, W, 3] as their rows."""
    if images is None:
        return [None] * (count or 0)
    if isinstance(images, np.ndarray):
        if _pixel_rows(images) and images.ndim != 4:
            raise ValueError(f"pixel_values must be [batch, 3, size, size], got shape {images.shape}")
        images = list(images) if images.ndim == 4 else [images]
    elif not isinstance(images, (list, tuple)):
        images = [images]
    images = list(images)
    if count is not None and len(images) != count:
        raise ValueError(f"{len(images)} images for {count} {what}s: give one image per {what}")
    return images


def prompt_batch(tokenizer, config, images, prompts: Sequence[str], task: str):
    """(pixel_values, input_ids, segment_ids) of left-padded [bos] + prompts with their images,
    by taichu.m6_data.prompt_inputs (which reads and resizes images as training does, and
    checks the rows against ``task`` and model.text_length). ``images``: one per prompt
    (anything taichu.images.load_image reads, or None for a row without one), or None, or
    pixel_values float32 [B, 3, S, S] taken as they are: the step refuses another size."""
    from taichu.m6_data import prompt_inputs

    prompts = list(prompts)
    pixels = None
    if _pixel_rows(images):
        pixels = np.asarray(images, np.float32)
        side = config.model.image_size
        # Placeholders for prompt_inputs' segments; the given pixels replace its pixels.
        images = [np.full((side, side, 3), 255, np.uint8)] * len(prompts)
    rows = _image_list(images, len(prompts), "prompt")
    # Continuation: image_text with an image, text_continuation without.
    tasks = [task if image is not None or task != "image_text" else "text_continuation" for image in rows]
    pixel_values, input_ids, segment_ids = prompt_inputs(
        tokenizer, config, None if all(image is None for image in rows) else rows, prompts, tasks)
    return (pixel_values if pixels is None else pixels), input_ids, segment_ids


def generate_from(step, tokenizer, config, pixel_values, input_ids, segment_ids,
                  sampling: SamplingConfig) -> list[list[int]]:
    """New token ids of each row (without the prompt, stopping at eos, ``max_new_tokens`` or
    the last text slot) for a prefill of left-padded input_ids [B, L] and segment_ids [B,
    patches + L], through taichu.generate.generate_ids (which left-pads the rows' real tokens
    to the same width and feeds each new token as a TARGET, a finished row's as PAD)."""
    input_ids = np.asarray(input_ids, np.int64)
    segment_ids = np.asarray(segment_ids, np.int64)
    batch, length = input_ids.shape
    patches = segment_ids.shape[1] - length
    text_segments = segment_ids[:, patches:]
    rows = [input_ids[r][text_segments[r] != PAD].tolist() for r in range(batch)]
    room = config.model.text_length - length
    if room < 1:
        raise ValueError(f"the prompt fills all {config.model.text_length} text slots: nothing left to generate")
    limited = replace(sampling, max_new_tokens=min(sampling.max_new_tokens, room))

    def text_step(ids, mask, past):
        if past is None:
            if ids.shape != input_ids.shape:
                raise ValueError(f"prompt rows of width {ids.shape[1]}, prompt_inputs gave {length}")
            logits, cache = step(pixel_values, ids, None, segment_ids, None)
            return logits, (cache, segment_ids)
        cache, segments = past
        segments = np.concatenate([segments, np.where(mask[:, -1:] == 1, TARGET, PAD)], axis=1)
        logits, cache = step(None, ids, None, segments, cache)
        return logits, (cache, segments)
    return generate_ids(text_step, rows, limited, tokenizer.eos_id, tokenizer.pad_id, config.model.text_length)


def _generate_text(step, tokenizer, config, images, prompts, task, sampling) -> list[str]:
    pixel_values, input_ids, segment_ids = prompt_batch(tokenizer, config, images, prompts, task)
    ids = generate_from(step, tokenizer, config, pixel_values, input_ids, segment_ids, sampling)
    return [tokenizer.decode(row) for row in ids]


GREEDY = SamplingConfig(temperature=0.0)


def caption(step, tokenizer, config, images, sampling: SamplingConfig = GREEDY) -> list[str]:
    """A caption of each image (anything taichu.images.load_image reads, resized to the
    model's size as training does; or pixel_values float32 [B, 3, S, S]): IMAGE + [bos] ->
    the caption."""
    images = _image_list(images, None, "image")
    if not images or any(image is None for image in images):
        raise ValueError("caption needs an image for every row")
    if _pixel_rows(images[0]):
        images = np.stack(images)
    return _generate_text(step, tokenizer, config, images, [""] * len(images), "caption", sampling)


def ask(step, tokenizer, config, images, questions, sampling: SamplingConfig = GREEDY) -> list[str]:
    """The answer to each question about its image (one image per question; images as for
    ``caption``): IMAGE + [bos] question -> the answer."""
    questions = _check_texts(questions, "question", "ask something about the image, e.g. 左边是什么颜色？")
    rows = _image_list(images, len(questions), "question")
    missing = [i for i, image in enumerate(rows) if image is None]
    if missing:
        raise ValueError(f"question {missing[0]} has no image: a question is asked about an image (give one "
                         f"image per question)")
    return _generate_text(step, tokenizer, config, images if _pixel_rows(images) else rows, questions, "vqa",
                          sampling)


def continue_text(step, tokenizer, config, prompts, images=None, sampling: SamplingConfig = GREEDY) -> list[str]:
    """The continuation of each prompt, conditioned on its image where one is given (None: no
    image for any row; else one per prompt, None for a row without): (IMAGE +) [bos] prompt ->
    the rest (the image_text task with an image, text_continuation without)."""
    prompts = _check_texts(prompts, "prompt", "give the start of a text to continue")
    rows = _image_list(images, len(prompts), "prompt")
    return _generate_text(step, tokenizer, config, images if _pixel_rows(images) else rows, prompts, "image_text",
                          sampling)


# ----------------------------------------------------------------------------- text to image

def text_to_image_step(step, config, pad_id: int):
    """The M6 ``step`` as taichu.imagine's ``step(text_ids, codes, past)``: the prefill is the
    caption ids [B, text_length] (right-padded as taichu.imagine.prompt_ids makes them: PREFIX
    where the id is not pad_id, PAD after) and the start code as a CODE slot; each code after
    is one CODE step. So taichu.imagine's sample_codes and imagine run an M6 unchanged."""
    start = config.model.codebook_size
    if not start:
        raise ValueError("this M6 has no image codes (model.codebook_size is null): it cannot draw images")

    def adapted(text_ids, codes, past):
        if text_ids is not None:
            batch = text_ids.shape[0]
            segments = np.concatenate([np.where(text_ids != pad_id, PREFIX, PAD), np.full((batch, 1), CODE)],
                                      axis=1).astype(np.int64)
            logits, cache = step(None, text_ids.astype(np.int64), np.full((batch, 1), start, np.int64), segments,
                                 None)
            return logits, (cache, segments)
        cache, segments = past
        for k in range(codes.shape[1]):
            segments = np.concatenate([segments, np.full((codes.shape[0], 1), CODE, np.int64)], axis=1)
            logits, cache = step(None, None, codes[:, k:k + 1].astype(np.int64), segments, cache)
        return logits, (cache, segments)
    return adapted


def imagine_codes(step, tokenizer, config, prompts, sampling: SamplingConfig = SamplingConfig()) -> np.ndarray:
    """int64 [B, image_grid, image_grid]: image codes for each caption, sampled one by one
    (taichu.imagine.sample_codes over text_to_image_step); decode them with the image
    tokenizer (taichu.image_tokens.decode_codes on config.data.image_tokenizer). A caption
    longer than text_length - 2 tokens is cut at its end, as taichu imagine does."""
    from taichu.imagine import prompt_ids, sample_codes

    prompts = _check_texts(prompts, "prompt", "say what the image should show, e.g. 左边一个红色的正方形")
    adapted = text_to_image_step(step, config, tokenizer.pad_id)
    ids = np.concatenate([prompt_ids(tokenizer, p, config.model.text_length)[0] for p in prompts])
    return sample_codes(adapted, ids, config.model.image_grid, sampling)

"""Running a text-to-image export, with ONNX Runtime or from MINDIR with MindSpore: a
DALL-E's generation step (``dalle_network``, what taichu.imagine drives) and an image
tokenizer's decoder (vqvae: codes -> uint8 images, ``image_decoder_network``; an M6's text
to image decodes its codes with it too).

numpy and the runtime only, as every export runtime (export.runtime's docstring); the
shared machinery (export directories, graphs by name, checks of integer inputs) is
export.runtime's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from export.runtime import (CODE_DECODER, CODE_ENCODER, DALLE_FAMILY, DECODE, IMAGE_TOKENIZER, PREFILL,
                            TEXT_TO_IMAGE, VQVAE_FAMILY, _in_range, _integers, open_graphs)
from taichu.retrieval import EXPORT_BACKENDS, check_export_directory

# Images per run of an image tokenizer's graph (taichu.image_tokens.BATCH's).
CODE_BATCH = 64


# ----------------------------------------------------------------------- text to image


class DalleCache:
    """What ``DalleNetwork.step`` carries between steps: the per-layer keys and values
    (``tensors``: numpy arrays of exactly ``length`` positions for ONNX; MindSpore tensors of
    a fixed number of slots for MINDIR, the first ``length`` written) and ``length``, the
    positions so far (the text's and the codes')."""

    def __init__(self, tensors: list, length: int, batch: int, owner):
        self.tensors, self.length, self.batch, self.owner = tensors, length, batch, owner


class DalleNetwork:
    """A DALL-E export (``taichu export DALLE_DIR --format onnx|mindir``) as the step of
    generation that taichu.imagine drives (``sample_codes``, ``imagine``), with the contract of
    taichu.imagine.dalle_step for the torch and MindSpore models, so the same seed gives the same
    codes on every runtime:

        step(text_ids, None, None) -> (logits float32 [B, codebook], cache)     prefill
        step(None, codes, cache)   -> (logits float32 [B, codebook], cache)     decode

    ``text_ids``: integer [B, text_length] (taichu.imagetext.caption_ids: [bos] + tokens +
    [eos], right-padded); ``codes``: integer [B, m], the next m codes (row-major) after the
    ``cache`` a previous step returned; logits are the last position's (the next code's).

    ONNX runs ``prefill.onnx`` once and ``decode.onnx`` for all m codes at once (the cache grows
    by concatenation, the positions come from its length). MINDIR runs ``prefill.mindir``, puts
    the text's keys and values in a cache of text_length + grid^2 slots (every position the
    model can take) and runs ``decode.mindir`` once per code with its slot as
    ``write_position``; the cache stays in MindSpore tensors between steps.

    Inputs are checked before any graph runs (the graphs cannot: an id out of range would read
    past an embedding table): shapes, ids and codes in range, the grid not overrun, a cache of
    this network and batch. Sizes come from export_info.json: numpy and the runtime only
    (onnxruntime, or mindspore without any model code for "mindir").
    """

    def __init__(self, export_dir: str | Path, backend: str = "onnx", threads: int | None = None):
        self.info, graphs = open_graphs(export_dir, backend, TEXT_TO_IMAGE, DALLE_FAMILY, "a text-to-image (DALL-E)",
                                        "a DALL-E", (PREFILL, DECODE), threads)
        self.backend = backend
        (_, self.prefill_graph), (decode_entry, self.decode_graph) = graphs[PREFILL], graphs[DECODE]
        m = self.info["config"]["model"]
        self.text_length, self.vocab_size = m["text_length"], m["vocab_size"]
        self.codebook_size, self.image_grid = m["codebook_size"], m["image_grid"]
        self.image_tokens = self.image_grid ** 2
        self.num_layers, self.num_heads = m["num_layers"], m["num_heads"]
        self.head_dim = m["hidden_size"] // m["num_heads"]
        # Every position the model can take (its own bound: the text and all grid^2 codes).
        self.capacity = self.text_length + self.image_tokens
        self.past_names = [t["name"] for t in decode_entry["inputs"] if t["name"].startswith("past_key_values.")]
        if backend == "mindir":   # the static-cache loop the MindSpore model compiles too
            from taichu.imagine import static_cache_step

            self._mindir_step = static_cache_step(self.prefill_graph.cell, self.decode_graph.cell, self.capacity)

    def check_text(self, text_ids) -> np.ndarray:
        shape_text = f"[batch, text_length = {self.text_length}]"
        text_ids = _integers(text_ids, "text_ids", shape_text)
        if text_ids.ndim != 2 or text_ids.shape[1] != self.text_length or text_ids.shape[0] == 0:
            raise ValueError(f"text_ids must be {shape_text} with batch >= 1 (captions padded to the text length, "
                             f"taichu.imagetext.caption_ids), got shape {text_ids.shape}")
        _in_range(text_ids, self.vocab_size, "token id", "vocab_size")
        return text_ids.astype(np.int64)

    def check_codes(self, codes, cache) -> np.ndarray:
        if not isinstance(cache, DalleCache) or cache.owner is not self:
            raise ValueError("past must be the cache a previous step of this network returned (prefill first: "
                             "step(text_ids, None, None))")
        codes = _integers(codes, "codes", "[batch, codes]")
        if codes.ndim != 2 or codes.shape[1] == 0:
            raise ValueError(f"codes must be [batch, codes] with at least one code, got shape {codes.shape}")
        if codes.shape[0] != cache.batch:
            raise ValueError(f"codes has batch {codes.shape[0]}, the cache {cache.batch}")
        start = cache.length - self.text_length
        if start + codes.shape[1] > self.image_tokens:
            raise ValueError(f"image codes {start}..{start + codes.shape[1] - 1} exceed the {self.image_grid}x"
                             f"{self.image_grid} grid ({self.image_tokens} codes)")
        _in_range(codes, self.codebook_size, "image code", "codebook_size")
        return codes.astype(np.int64)

    def step(self, text_ids, codes, past):
        """Prefill (``text_ids``, no codes, no past) or decode (``codes`` after ``past``);
        returns the last position's logits float32 [B, codebook] and the cache."""
        if text_ids is not None:
            if codes is not None or past is not None:
                raise ValueError("prefill takes text_ids alone (codes and past None); later steps take codes "
                                 "and the cache, without text_ids")
            return self._prefill(self.check_text(text_ids))
        if codes is None:
            raise ValueError("give text_ids (prefill) or codes and the cache of a previous step")
        return self._decode(self.check_codes(codes, past), past)

    __call__ = step

    def _prefill(self, text_ids: np.ndarray):
        batch = text_ids.shape[0]
        if self.backend == "onnx":
            out = self.prefill_graph.session.run(None, {"input_ids": text_ids})
            return out[0], DalleCache(list(out[1:]), self.text_length, batch, self)
        logits, (cache, length) = self._mindir_step(text_ids, None, None)
        return logits, DalleCache(cache, length, batch, self)

    def _decode(self, codes: np.ndarray, cache: DalleCache):
        if self.backend == "onnx":
            feeds = {"image_codes": codes, **dict(zip(self.past_names, cache.tensors))}
            out = self.decode_graph.session.run(None, feeds)
            logits = np.ascontiguousarray(out[0][:, -1])
            return logits, DalleCache(list(out[1:]), cache.length + codes.shape[1], cache.batch, self)
        logits, (tensors, length) = self._mindir_step(None, codes, (cache.tensors, cache.length))
        return logits, DalleCache(tensors, length, cache.batch, self)


def dalle_network(export_dir: str | Path, backend: str = "onnx") -> DalleNetwork:
    """The generation step of a DALL-E export for taichu.imagine: ONNX Runtime ("onnx", ORT's
    default threads) or mindspore.nn.GraphCell ("mindir", mindspore alone, no model code);
    ``network.step(text_ids or None, codes or None, past) -> (logits [B, K], past)``.
    Refuses an export of another family or format."""
    if backend not in EXPORT_BACKENDS:
        raise ValueError(f"unknown export backend {backend!r} (choose from {', '.join(EXPORT_BACKENDS)})")
    check_export_directory(export_dir, backend)
    return DalleNetwork(export_dir, backend)


class ImageDecoderNetwork:
    """An image tokenizer export (``taichu export VQVAE_DIR --format onnx|mindir``):
    ``decode(codes int [B, h, w]) -> uint8 [B, S, S, 3]``, what taichu.image_tokens.decode_codes
    gives for the model: the ``decoder`` graph's normalised pixels turned into images by
    taichu.images.denormalise with the model's pixel_mean / pixel_std (from export_info.json),
    the same float64 arithmetic, rounding (half to even) and clipping. ``encode(pixel_values
    float32 [B, 3, S, S] normalised) -> int64 codes [B, h, w]`` runs the ``encoder`` graph.

    Checks before a graph runs: integer codes [B, grid, grid] in [0, codebook size); float32
    pixels at the exported size. numpy and the runtime only (onnxruntime, or mindspore without
    any model code for "mindir").
    """

    def __init__(self, export_dir: str | Path, backend: str = "onnx", threads: int | None = None):
        self.info, graphs = open_graphs(export_dir, backend, IMAGE_TOKENIZER, VQVAE_FAMILY, "an image tokenizer (vqvae)",
                                        "a vqvae", (CODE_DECODER,), threads)
        self.backend, self.export_dir, self.threads = backend, export_dir, threads
        self.graph = graphs[CODE_DECODER][1]
        m = self.info["config"]["model"]
        self.codebook_size = m["codebook"]["size"]
        self.image_size = m["image_size"]
        self.grid = m["image_size"] // 2 ** (len(m["channels"]) - 1)
        self.pixel_mean, self.pixel_std = tuple(m["pixel_mean"]), tuple(m["pixel_std"])
        self._encoder = None

    def check(self, codes) -> np.ndarray:
        shape_text = f"[batch, {self.grid}, {self.grid}]"
        codes = _integers(codes, "codes", shape_text)
        if codes.ndim != 3 or codes.shape[1:] != (self.grid, self.grid):
            raise ValueError(f"codes must be {shape_text} (the export's grid is fixed), got shape {codes.shape}")
        _in_range(codes, self.codebook_size, "code", "the codebook size")
        return codes.astype(np.int64)

    def pixel_values(self, codes) -> np.ndarray:
        """float32 [B, 3, S, S]: the decoder graph's normalised pixels, CODE_BATCH codes at a time."""
        codes = self.check(codes)
        parts = [self.graph.run({"codes": codes[i:i + CODE_BATCH]})["pixel_values"]
                 for i in range(0, len(codes), CODE_BATCH)]
        return np.concatenate(parts) if parts else np.zeros((0, 3, self.image_size, self.image_size), np.float32)

    def decode(self, codes) -> np.ndarray:
        """uint8 [B, S, S, 3] images of ``codes`` [B, grid, grid]."""
        from taichu.images import denormalise

        return denormalise(self.pixel_values(codes), self.pixel_mean, self.pixel_std)

    __call__ = decode

    def encode(self, pixel_values) -> np.ndarray:
        """int64 codes [B, grid, grid] of normalised pixels float32 [B, 3, S, S]
        (taichu.images.normalise with the model's mean and std)."""
        expected = (3, self.image_size, self.image_size)
        if not isinstance(pixel_values, np.ndarray) or pixel_values.dtype != np.float32 \
                or pixel_values.ndim != 4 or pixel_values.shape[1:] != expected:
            got = pixel_values.shape if isinstance(pixel_values, np.ndarray) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be float32 [batch, {', '.join(map(str, expected))}] (normalised "
                             f"with the model's pixel_mean / pixel_std), got {got}")
        if self._encoder is None:
            _, graphs = open_graphs(self.export_dir, self.backend, IMAGE_TOKENIZER, VQVAE_FAMILY,
                                    "an image tokenizer (vqvae)", "a vqvae", (CODE_ENCODER,), self.threads)
            self._encoder = graphs[CODE_ENCODER][1]
        parts = [self._encoder.run({"pixel_values": np.ascontiguousarray(pixel_values[i:i + CODE_BATCH])})["codes"]
                 for i in range(0, len(pixel_values), CODE_BATCH)]
        return (np.concatenate(parts).astype(np.int64) if parts
                else np.zeros((0, self.grid, self.grid), np.int64))


def image_decoder_network(export_dir: str | Path, backend: str = "onnx") -> ImageDecoderNetwork:
    """The decoder of an image tokenizer export for taichu.imagine: ONNX Runtime ("onnx") or
    mindspore.nn.GraphCell ("mindir", mindspore alone, no model code); ``network.decode(codes
    [B, h, w]) -> uint8 [B, S, S, 3]``. Refuses an export of another family or format."""
    if backend not in EXPORT_BACKENDS:
        raise ValueError(f"unknown export backend {backend!r} (choose from {', '.join(EXPORT_BACKENDS)})")
    check_export_directory(export_dir, backend)
    return ImageDecoderNetwork(export_dir, backend)

"""Running an M6 export, with ONNX Runtime or from MINDIR with MindSpore: its generation
step (``m6_network``, what taichu.m6_generate drives for captions, answers, text and image
codes).

numpy and the runtime only, as every export runtime (export.runtime's docstring); the
shared machinery (export directories, graphs by name, checks of integer inputs) is
export.runtime's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from export.runtime import (DECODE, ExportTokenizer, IMAGE_ENCODER, M6_FAMILY, M6_TASK, PREFILL, TOKENIZER_FILE, _in_range, _integers,
                            open_graphs, read_export_info)
from taichu.retrieval import EXPORT_BACKENDS, check_export_directory


# ----------------------------------------------------------------------- M6

M6_DECODER, DECODE_CODES = "decoder", "decode_codes"
# taichu.families.m6's segments (PAD 0, IMAGE 1, PREFIX 2, TARGET 3, CODE 4).
PAD_SEGMENT, SEGMENT_NAMES = 0, ("pad", "image", "prefix", "target", "code")


class M6Cache:
    """What ``M6Network.step`` carries between steps: the per-layer keys and values
    (``tensors``: numpy arrays of exactly ``length`` positions for ONNX; MindSpore tensors of
    a static cache for MINDIR), ``length`` (the positions given so far: the width of the
    next step's segment_ids minus one), the patches (0 or the model's), text slots and code
    slots among them, and for MINDIR ``slots``, the cache slot of every position given (the
    prompt sits left-padded to the text length after the patches' slots) and ``next_slot``."""

    def __init__(self, tensors: list, length: int, batch: int, owner, patches: int, text: int, codes: int,
                 slots: np.ndarray | None = None, next_slot: int = 0):
        self.tensors, self.length, self.batch, self.owner = tensors, length, batch, owner
        self.patches, self.text, self.codes = patches, text, codes
        self.slots, self.next_slot = slots, next_slot


class M6Network(ExportTokenizer):
    """An M6 export (``taichu export M6_DIR --format onnx|mindir``) as the runtime-neutral step
    of M6 generation (taichu.m6_generate drives it; the same contract as its ``model_step``
    for the torch and MindSpore models, so the same seed gives the same tokens on every
    runtime):

        step(pixel_values | None, input_ids | None, image_codes | None, segment_ids, past)
            -> (logits float32 [B, vocab], or [B, codebook] when the last new position is an
                image code slot; past)

    - prefill (``past`` None): pixel_values float32 [B, C, S, S] or None, input_ids integer
      [B, L] (the prompt, left-padded) or None, image_codes integer [B, n] (the start code,
      id codebook_size, then codes) or None, segment_ids [B, (patches) + L + n] (PAD 0 /
      IMAGE 1 / PREFIX 2 / TARGET 3 / CODE 4, taichu.families.m6);
    - each later call: one new position, input_ids [B, 1] (a text token) or image_codes [B, 1]
      (a code), and segment_ids [B, past + 1] (the whole history's and the new one's);
      ``past`` is what the previous call returned.

    ONNX runs ``image_encoder.onnx`` on the pixels and ``decoder.onnx`` for the prefill and
    every step (the cache grows by concatenation). MINDIR runs ``prefill.mindir`` on the
    pixels (zeros and PAD patches for no image) and the prompt left-padded to text_length,
    puts its keys and values in a static cache of patches + 2 text_length + grid^2 slots
    (export/signature_m6.py, m6_cache_capacity), then ``decode.mindir`` or
    ``decode_codes.mindir`` once per new position (a start code given to the prefill
    included) with its slot as ``write_position`` and the segments of every slot; the cache
    stays in MindSpore tensors between steps.

    Inputs are checked before any graph runs, as the models check theirs
    (taichu.families.m6.check_inputs): shapes, ids, codes and segments in range, one new
    position per step, the model's text slots (text_length) and code slots (grid^2) not
    overrun, a cache of this network and batch. Sizes come from export_info.json (``info``;
    ``config`` is the model directory's config as JSON): numpy and the runtime only
    (onnxruntime, or mindspore without any model code for "mindir"); ``tokenizer`` loads the
    export's tokenizer.model (sentencepiece) when first used.
    """

    def __init__(self, export_dir: str | Path, backend: str = "onnx", threads: int | None = None):
        path = Path(export_dir)
        self.directory = path.parent if path.is_file() else path
        info = read_export_info(self.directory)
        codebook = (info.get("config") or {}).get("model", {}).get("codebook_size")
        names = ((IMAGE_ENCODER, M6_DECODER) if backend == "onnx" else
                 (PREFILL, DECODE) + ((DECODE_CODES,) if codebook else ()))
        self.info, graphs = open_graphs(export_dir, backend, M6_TASK, M6_FAMILY, "an M6", "an M6", names, threads)
        self.backend = backend
        self.config = self.info["config"]
        m = self.config["model"]
        self.vocab_size, self.text_length = m["vocab_size"], m["text_length"]
        self.image_size, self.num_channels = m["image_size"], m.get("num_channels", 3)
        self.num_patches = (m["image_size"] // m["patch_size"]) ** 2
        self.codebook_size = m.get("codebook_size") or 0
        self.image_grid = m.get("image_grid") or 0
        self.num_codes = self.image_grid ** 2 if self.codebook_size else 0
        self.hidden_size, self.num_layers, self.num_heads = m["hidden_size"], m["num_layers"], m["num_heads"]
        self.head_dim = self.hidden_size // self.num_heads
        # The static cache (MINDIR): the prefill's slots (patches + the prompt left-padded to
        # text_length), then every text and code slot the model has.
        self.capacity = self.num_patches + 2 * self.text_length + self.num_codes
        self.graphs = {name: graph for name, (_, graph) in graphs.items()}
        decoder_entry = graphs[M6_DECODER if backend == "onnx" else DECODE][0]
        self.past_names = [t["name"] for t in decoder_entry["inputs"] if t["name"].startswith("past_key_values.")]
        self.tokenizer_path = self.directory / TOKENIZER_FILE


    # ------------------------------------------------------------------ checks

    def check(self, pixel_values, input_ids, image_codes, segment_ids, past):
        """(pixel_values float32 or None, input_ids int64 [B, L], image_codes int64 [B, n],
        segment_ids int64) after the checks of the class docstring; raises ValueError."""
        if past is not None and (not isinstance(past, M6Cache) or past.owner is not self):
            raise ValueError("past must be the cache a previous step of this network returned (or None for the "
                             "prefill)")
        if input_ids is None and image_codes is None and (pixel_values is None or past is not None):
            raise ValueError("give input_ids and/or image_codes (the prefill may add pixel_values; each later "
                             "step one new token or code)")
        if input_ids is None and image_codes is None:
            raise ValueError("a prefill of pixel_values alone has no position to predict from: give the prompt's "
                             "input_ids ([bos] at least) and/or the start code as image_codes")
        batch = None
        arrays = {}
        if pixel_values is not None:
            expected = (self.num_channels, self.image_size, self.image_size)
            if not isinstance(pixel_values, np.ndarray) or pixel_values.dtype != np.float32:
                kind = pixel_values.dtype if isinstance(pixel_values, np.ndarray) else type(pixel_values).__name__
                raise ValueError(f"pixel_values must be a float32 numpy array [batch, {', '.join(map(str, expected))}]"
                                 f" (images resized to model.image_size), got {kind}")
            if past is not None:
                raise ValueError("pixel_values with a past: the image goes in with the prompt (prefill)")
            if pixel_values.ndim != 4 or pixel_values.shape[1:] != expected:
                raise ValueError(f"pixel_values must be [batch, {', '.join(map(str, expected))}] (images resized to "
                                 f"model.image_size), got shape {tuple(pixel_values.shape)}")
            arrays["pixel_values"] = pixel_values
        for name, value, shape_text in (("input_ids", input_ids, "[batch, length]"),
                                        ("image_codes", image_codes, "[batch, codes]")):
            if value is None:
                continue
            value = _integers(value, name, shape_text)
            if value.ndim != 2:
                raise ValueError(f"{name} must be {shape_text}, got shape {value.shape}")
            arrays[name] = value
        for name, value in arrays.items():
            if batch is not None and value.shape[0] != batch:
                raise ValueError(f"{name} has batch {value.shape[0]}, the other inputs {batch}")
            batch = value.shape[0]
        if batch == 0:
            raise ValueError("an empty batch: give at least one row")
        if past is not None and batch != past.batch:
            raise ValueError(f"the inputs have batch {batch}, the cache {past.batch}")
        length = self.num_patches if pixel_values is not None else 0
        ids = arrays.get("input_ids", np.zeros((batch, 0), np.int64))
        codes = arrays.get("image_codes", np.zeros((batch, 0), np.int64))
        if ids.shape[1] > self.text_length:
            raise ValueError(f"input_ids must be [batch, length <= text_length = {self.text_length}], got shape "
                             f"{ids.shape}")
        _in_range(ids, self.vocab_size, "token id", "vocab_size")
        if codes.shape[1]:
            if not self.codebook_size:
                raise ValueError("image_codes given to a model without a codebook (model.codebook_size is null)")
            if codes.shape[1] > self.num_codes:
                raise ValueError(f"image_codes must be [batch, n <= {self.num_codes}], got shape {codes.shape}")
            low, high = int(codes.min()), int(codes.max())
            if low < 0 or high > self.codebook_size:
                raise ValueError(f"image code {low if low < 0 else high} is out of range (valid: 0.."
                                 f"{self.codebook_size - 1}, and {self.codebook_size} the start code)")
        length += ids.shape[1] + codes.shape[1]
        past_length = 0 if past is None else past.length
        if past is not None and length != 1:
            raise ValueError(f"with a past, one new position per step (input_ids [B, 1] or image_codes [B, 1]), "
                             f"got {length}")
        segment_ids = _integers(segment_ids, "segment_ids", "[batch, past + positions]")
        if segment_ids.shape != (batch, past_length + length):
            raise ValueError(f"segment_ids must be [batch, past + positions] = [{batch}, {past_length + length}], "
                             f"got {tuple(segment_ids.shape)}")
        if segment_ids.size and (segment_ids.min() < 0 or segment_ids.max() >= len(SEGMENT_NAMES)):
            bad = int(segment_ids.min() if segment_ids.min() < 0 else segment_ids.max())
            raise ValueError(f"segment id {bad} is out of range (0..{len(SEGMENT_NAMES) - 1}: "
                             f"{', '.join(SEGMENT_NAMES)})")
        text = (0 if past is None else past.text) + ids.shape[1]
        if text > self.text_length:
            raise ValueError(f"text slot {text - 1} exceeds the model's text_length {self.text_length} (the prompt "
                             f"and what was generated share them)")
        count = (0 if past is None else past.codes) + codes.shape[1]
        if count > self.num_codes:
            raise ValueError(f"image code slot {count - 1} exceeds the {self.image_grid}x{self.image_grid} grid "
                             f"({self.num_codes} codes)")
        return (arrays.get("pixel_values"), ids.astype(np.int64), codes.astype(np.int64),
                segment_ids.astype(np.int64))

    # ------------------------------------------------------------------ steps

    def step(self, pixel_values, input_ids, image_codes, segment_ids, past):
        """Prefill (``past`` None) or one new position after ``past``; returns the last new
        position's logits float32 [B, vocab] (a text token's next) or [B, codebook] (an
        image code slot's: the next code) and the cache."""
        pixel_values, ids, codes, segments = self.check(pixel_values, input_ids, image_codes, segment_ids, past)
        if self.backend == "onnx":
            return self._onnx_step(pixel_values, ids, codes, segments, past)
        if past is None:
            return self._mindir_prefill(pixel_values, ids, codes, segments)
        return self._mindir_decode(ids, codes, segments, past)

    __call__ = step

    def _onnx_step(self, pixel_values, ids, codes, segments, past):
        batch = segments.shape[0]
        if pixel_values is None:
            patches = np.zeros((batch, 0, self.hidden_size), np.float32)
        else:
            feeds = {"pixel_values": np.ascontiguousarray(pixel_values)}
            patches = self.graphs[IMAGE_ENCODER].run(feeds)["patch_embeds"]
        feeds = {"patch_embeds": patches, "input_ids": ids, "segment_ids": segments}
        if self.codebook_size:
            feeds["image_codes"] = codes
        if past is None:
            empty = np.zeros((batch, self.num_heads, 0, self.head_dim), np.float32)
            feeds.update((name, empty) for name in self.past_names)
        else:
            feeds.update(zip(self.past_names, past.tensors))
        out = self.graphs[M6_DECODER].run(feeds)
        logits = out["code_logits"] if codes.shape[1] else out["logits"]
        presents = [out[name.replace("past_key_values.", "present.")] for name in self.past_names]
        previous = past or M6Cache([], 0, batch, self, 0, 0, 0)
        return logits, M6Cache(presents, segments.shape[1], batch, self,
                               previous.patches + patches.shape[1], previous.text + ids.shape[1],
                               previous.codes + codes.shape[1])

    def _mindir_segments(self, segments: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """int64 [B, capacity]: each given position's segment at its slot, PAD elsewhere."""
        full = np.full((segments.shape[0], self.capacity), PAD_SEGMENT, np.int64)
        full[:, slots] = segments
        return full

    def _mindir_prefill(self, pixel_values, ids, codes, segments):
        import mindspore as ms

        batch, patches, length = segments.shape[0], 0 if pixel_values is None else self.num_patches, ids.shape[1]
        pad = self.text_length - length
        # The prompt's slots: after the patches', left-padded to the text length (PAD: never
        # attended to, and positions count PREFIX and TARGET slots only).
        prompt_end = self.num_patches + self.text_length
        slots = np.concatenate([np.arange(patches), np.arange(prompt_end - length, prompt_end)])
        prompt = self._mindir_segments(segments[:, :patches + length], slots)[:, :prompt_end]
        pixels = (np.zeros((batch, self.num_channels, self.image_size, self.image_size), np.float32)
                  if pixel_values is None else np.ascontiguousarray(pixel_values))
        text = np.zeros((batch, self.text_length), np.int32)
        text[:, pad:] = ids
        out = self.graphs[PREFILL].cell(ms.Tensor(pixels), ms.Tensor(text), ms.Tensor(prompt.astype(np.int32)))
        logits = out[0].asnumpy().astype(np.float32)
        extra = ((0, 0), (0, 0), (0, self.capacity - prompt_end), (0, 0))
        # Once per generation, through numpy: no graph to compile for it.
        tensors = [ms.Tensor(np.pad(t.asnumpy(), extra)) for t in out[1:]]
        cache = M6Cache(tensors, patches + length, batch, self, patches, length, 0, slots, prompt_end)
        for k in range(codes.shape[1]):          # the start code (and any codes after it): one step each
            logits, cache = self._mindir_decode(ids[:, :0], codes[:, k:k + 1], segments[:, :cache.length + 1], cache)
        return logits, cache

    def _mindir_decode(self, ids, codes, segments, cache: M6Cache):
        import mindspore as ms

        code = codes.shape[1] == 1
        slots = np.append(cache.slots, cache.next_slot)
        full = self._mindir_segments(segments, slots)
        graph = self.graphs[DECODE_CODES if code else DECODE]
        out = graph.cell(ms.Tensor((codes if code else ids).astype(np.int32)), ms.Tensor(full.astype(np.int32)),
                         ms.Tensor(cache.next_slot, ms.int32), *cache.tensors)
        return out[0].asnumpy().astype(np.float32), M6Cache(
            list(out[1:]), cache.length + 1, cache.batch, self, cache.patches, cache.text + ids.shape[1],
            cache.codes + codes.shape[1], slots, cache.next_slot + 1)


def m6_network(export_dir: str | Path, backend: str = "onnx") -> M6Network:
    """The generation step of an M6 export for taichu.m6_generate: ONNX Runtime ("onnx", ORT's
    default threads) or mindspore.nn.GraphCell ("mindir", mindspore alone, no model code);
    ``network.step(pixel_values, input_ids, image_codes, segment_ids, past) -> (logits,
    past)``. Refuses an export of another family or format."""
    if backend not in EXPORT_BACKENDS:
        raise ValueError(f"unknown export backend {backend!r} (choose from {', '.join(EXPORT_BACKENDS)})")
    check_export_directory(export_dir, backend)
    return M6Network(export_dir, backend)

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
- ``image_text`` (CLIP, BriVL): two towers, so that images and texts are embedded apart (a
  retrieval index embeds each side once). ``image_encoder``: ``pixel_values`` float32
  [batch, channels, size, size] (taichu.images.preprocess) -> ``image_embeds`` [batch, dim]
  (``get_image_features``, not normalised). ``text_encoder``: ``input_ids`` and
  ``attention_mask`` int64 [batch, sequence], right-padded (taichu.imagetext.caption_ids) ->
  ``text_embeds`` [batch, dim] (``get_text_features``).
- ``speech`` (wav2vec2): one graph ``encoder``. Inputs: ``input_values`` float32 [batch,
  samples] (16 kHz audio normalised per clip, zero padded: taichu.speech_batches.normalise)
  and ``attention_mask`` int64 [batch, samples] (1 = real sample, right-padded). Outputs:
  ``last_hidden_state`` float32 [batch, frames, hidden] (the Transformer's output; padded
  frames hold values nobody should read) and ``embedding`` float32 [batch, hidden] (its mean
  over each row's real frames, the model's ``embed``); with the CTC head also ``logits``
  float32 [batch, frames, vocab] (the model's ``forward``: lm_head of last_hidden_state).
  ``frames`` is not an input axis: the exporter derives it from ``samples`` through the conv
  stack (floor((L - kernel) / stride) + 1 per conv, taichu.families.wav2vec2.frame_count), and
  the saved graph names it. A row's real frames are frame_count(its real samples).

  One graph rather than an ``encoder`` graph and a separate ``ctc`` graph: the logits are
  one Linear of last_hidden_state, so a separate graph would either hold and run the whole
  encoder a second time (twice the weights on disk, two encoder passes for a caller that
  wants the transcript and the embedding, as taichu.recognition.SpeechRunner does per
  batch) or take hidden states as input, an interface nobody else has. The CTC graph's
  outputs are the encoder's plus ``logits``, so code that reads ``last_hidden_state`` /
  ``embedding`` by name serves both heads, and Hugging Face tools that read ``logits`` by name
  (optimum's CTC model) find it.
- ``vision`` (the vision family's ViT): one graph ``model``, as Hugging Face optimum exports
  a ViTModel for feature extraction. Input ``pixel_values`` float32 [batch, channels, size,
  size] (taichu.images.preprocess; size = ``model.image_size``: only batch is dynamic, since
  the position grid is fixed by the config). Outputs ``last_hidden_state`` float32 [batch,
  1 + patches, hidden] (after the final LayerNorm, CLS first) and ``pooler_output`` float32
  [batch, hidden] (the pooler's tanh(dense(CLS)) where the backbone has one, else the CLS
  token's final state, as the models' ``forward`` pools). The backbone is an MST model's
  teacher (the EMA weights DINO/MST evaluate, what taichu.convert.hf_vit writes and
  taichu.vision_tasks.VisionRunner runs by default), else ``model.backbone`` (``backbone``
  and every objective with a task head: the head is not exported); ``vision_backbone``.
  The graph shares its name with the GPT decoder's: code that picks by graph must look at
  ``GraphSignature.task`` too.
- ``trimodal`` (image, text and speech in one space): three towers, the image-text ones
  (``image_encoder``, ``text_encoder``: the same names, inputs and outputs as CLIP's) and
  ``speech_encoder``: ``input_values`` float32 [batch, samples] and ``attention_mask`` int64
  [batch, samples] (the speech encoder's conventions: audio normalised per clip, zero padded,
  1 = real sample, right-padded) -> ``speech_embeds`` float32 [batch, dim]
  (``get_speech_features``: the projected mean of the last hidden states over each clip's
  real frames, not normalised). Batch is dynamic in all three, sequence in the text tower,
  samples in the speech tower; every row needs at least the speech tower's receptive field.

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
  export.runtime's image decoder applies). ``encoder``: ``pixel_values`` float32 [batch, 3,
  size, size] (normalised with the model's pixel_mean / pixel_std, taichu.images.normalise)
  -> ``codes`` int64 [batch, grid, grid] (int32 in MINDIR: MindSpore's Argmin). Only batch
  is dynamic.

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

from dataclasses import dataclass

import numpy as np

BATCH, SEQUENCE, PAST, TOTAL = "batch", "sequence", "past_sequence", "total_sequence"
LANGUAGE_MODEL, IMAGE_TEXT, SPEECH, VISION = "language_model", "image_text", "speech", "vision"
TEXT_TO_IMAGE, IMAGE_TOKENIZER, TRIMODAL = "text_to_image", "image_tokenizer", "trimodal"
DECODER, IMAGE_ENCODER, TEXT_ENCODER = "model", "image_encoder", "text_encoder"
SPEECH_TOWER = "speech_encoder"                        # trimodal
SPEECH_ENCODER, VISION_MODEL = "encoder", "model"
PREFILL, DECODE = "prefill", "decode"                  # text_to_image
CODE_DECODER, CODE_ENCODER = "decoder", "encoder"      # image_tokenizer
SAMPLES, FRAMES = "samples", "frames"


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


def task_of(config) -> str:
    from taichu.families import get_family

    return get_family(config.family).task


def graphs(config, fmt: str = "onnx") -> tuple[GraphSignature, ...]:
    """The graphs an export of ``config`` (a full config) in ``fmt`` consists of, by its
    family's task (the format matters only for text_to_image and m6, whose MINDIR decodes
    over a static cache)."""
    task = task_of(config)
    if task == M6:
        return m6_graphs(config.model, static=fmt == "mindir")
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
    m = model_config
    if graph.task == M6:
        return m6_validation_cases(m, graph)
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


# ----------------------------------------------------------------------- image-text towers

# Batch 1 and a batch of 5; text once short and unpadded, once at the full context (what
# caption_ids gives) with rows of five different lengths. None: the model's context.
IMAGE_VALIDATION_BATCHES = (1, 5)
TEXT_VALIDATION_SHAPES = ((1, 7), (5, None))
# Token ids below this are the special tokens (pad, unk, bos, eos): random text avoids them.
FIRST_ORDINARY_ID = 4


def image_text_sizes(model_config) -> dict[str, int]:
    """The sizes the tower signatures need, read from an image-text family's model config:
    ``image.image_size``, ``image.num_channels`` (3 if absent), ``text.vocab_size``,
    ``text.max_position_embeddings`` and the width of the shared embedding space, which
    CLIP calls ``projection_dim`` and BriVL ``embed_dim``."""
    m = model_config
    dim = getattr(m, "projection_dim", None) or getattr(m, "embed_dim", None)
    try:
        if dim is None:
            raise AttributeError("neither projection_dim nor embed_dim")
        return {"channels": getattr(m.image, "num_channels", 3), "image_size": m.image.image_size,
                "vocab_size": m.text.vocab_size, "context": m.text.max_position_embeddings, "dim": dim}
    except AttributeError as error:
        raise ValueError(f"an image-text export needs model.image.image_size, model.text.vocab_size, "
                         f"model.text.max_position_embeddings and model.projection_dim or "
                         f"model.embed_dim: {error}") from None


def image_text_graphs(model_config, task: str = IMAGE_TEXT) -> tuple[GraphSignature, GraphSignature]:
    s = image_text_sizes(model_config)
    image = GraphSignature(
        IMAGE_ENCODER,
        (TensorInfo("pixel_values", "float32", (BATCH, s["channels"], s["image_size"], s["image_size"])),),
        (TensorInfo("image_embeds", "float32", (BATCH, s["dim"])),), task)
    text = GraphSignature(
        TEXT_ENCODER,
        (TensorInfo("input_ids", "int64", (BATCH, SEQUENCE)), TensorInfo("attention_mask", "int64", (BATCH, SEQUENCE))),
        (TensorInfo("text_embeds", "float32", (BATCH, s["dim"])),), task)
    return image, text


def trimodal_graphs(model_config) -> tuple[GraphSignature, GraphSignature, GraphSignature]:
    """``image_encoder``, ``text_encoder`` (as an image-text model's) and ``speech_encoder``
    of a tri-modal model (module docstring)."""
    image, text = image_text_graphs(model_config, TRIMODAL)
    speech = GraphSignature(
        SPEECH_TOWER,
        (TensorInfo("input_values", "float32", (BATCH, SAMPLES)), TensorInfo("attention_mask", "int64", (BATCH, SAMPLES))),
        (TensorInfo("speech_embeds", "float32", (BATCH, image_text_sizes(model_config)["dim"])),), TRIMODAL)
    return image, text, speech


def image_inputs(model_config, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Random ``pixel_values``: standard normal, the range of normalised pixels."""
    s = image_text_sizes(model_config)
    return _pixels(batch, s["channels"], s["image_size"], seed)


def _pixels(batch: int, channels: int, size: int, seed: int) -> dict[str, np.ndarray]:
    shape = (batch, channels, size, size)
    return {"pixel_values": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


def text_inputs(model_config, batch: int, length: int, seed: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Random right-padded texts: row 0 fills all ``length`` positions, the others get
    shorter down to 2 real tokens, so every row is pooled at a different position."""
    s = image_text_sizes(model_config)
    rng = np.random.default_rng(seed)
    lengths = np.linspace(length, min(2, length), batch).round().astype(int)
    input_ids = np.full((batch, length), pad_id, np.int64)
    attention_mask = np.zeros((batch, length), np.int64)
    for row, n in enumerate(lengths):
        input_ids[row, :n] = rng.integers(FIRST_ORDINARY_ID, s["vocab_size"], n)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# ----------------------------------------------------------------------- speech encoder

# (batch, samples): one unpadded clip of a second, and three clips in 1.5 s of padding (the
# first fills it, the others end a third and two thirds of the way, each mid-hop, so that
# the frame count's floor rounds and every row pools a different number of frames).
# Raised to the model's receptive field where that is longer (speech_lengths).
SPEECH_VALIDATION_SHAPES = ((1, 16000), (3, 24000))


def speech_sizes(model_config) -> dict:
    """What the speech signature needs from a wav2vec2 model config: head, hidden size, CTC
    vocabulary (None for the pretraining head), receptive field and hop (samples per frame)."""
    from taichu.families.wav2vec2 import receptive_field

    m = model_config
    return {"head": m.head, "hidden": m.hidden_size,
            "vocab": m.ctc.vocab_size if m.head == "ctc" else None,
            "receptive_field": receptive_field(m), "hop": int(np.prod(m.conv_stride))}


def audio_sizes(model_config) -> dict[str, int]:
    """Receptive field and hop (samples per frame) of a wav2vec 2.0 conv stack: of a wav2vec2
    model config or of any backbone section (a tri-modal model's ``model.speech``)."""
    from taichu.speech_inputs import receptive_field_of

    return {"receptive_field": receptive_field_of(model_config.conv_kernel, model_config.conv_stride),
            "hop": int(np.prod(model_config.conv_stride))}


def speech_graph(model_config) -> GraphSignature:
    s = speech_sizes(model_config)
    inputs = (TensorInfo("input_values", "float32", (BATCH, SAMPLES)),
              TensorInfo("attention_mask", "int64", (BATCH, SAMPLES)))
    outputs = (TensorInfo("last_hidden_state", "float32", (BATCH, FRAMES, s["hidden"])),
               TensorInfo("embedding", "float32", (BATCH, s["hidden"])))
    if s["head"] == "ctc":
        outputs += (TensorInfo("logits", "float32", (BATCH, FRAMES, s["vocab"])),)
    return GraphSignature(SPEECH_ENCODER, inputs, outputs, SPEECH)


def speech_lengths(model_config, batch: int, samples: int) -> np.ndarray:
    """Real samples per row for a batch padded to ``samples``: row 0 fills it, the others get
    shorter down to about a third of it, each ending mid-hop (half a frame's stride past a
    frame boundary, plus the row index), and never shorter than the receptive field (the
    shortest clip that makes a frame). ``model_config``: a wav2vec2 model config or a
    backbone section (audio_sizes)."""
    s = audio_sizes(model_config)
    hop, shortest = s["hop"], s["receptive_field"]
    if samples < shortest:
        raise ValueError(f"{samples} samples make no frame: the receptive field is {shortest} samples")
    lengths = np.linspace(samples, samples / 3, batch).round().astype(np.int64)
    for row in range(1, batch):
        n = lengths[row] - lengths[row] % hop + hop // 2 + row
        lengths[row] = min(max(n, shortest), samples)
    return lengths


def speech_inputs(model_config, batch: int, samples: int, seed: int,
                  lengths=None) -> dict[str, np.ndarray]:
    """Random audio (standard normal, what per-clip normalisation gives) zero padded after
    each row's ``lengths`` (default: speech_lengths), and its sample mask."""
    lengths = speech_lengths(model_config, batch, samples) if lengths is None else np.asarray(lengths)
    rng = np.random.default_rng(seed)
    mask = (np.arange(samples)[None, :] < lengths[:, None]).astype(np.int64)
    values = (rng.standard_normal((batch, samples)) * mask).astype(np.float32)
    return {"input_values": values, "attention_mask": mask}


def speech_validation_cases(model_config) -> list[tuple[dict, dict[str, np.ndarray]]]:
    """SPEECH_VALIDATION_SHAPES (samples at least twice the receptive field), described by
    batch, samples and each row's real samples; ``model_config`` as speech_lengths'."""
    shortest = audio_sizes(model_config)["receptive_field"]
    cases = []
    for seed, (batch, samples) in enumerate(SPEECH_VALIDATION_SHAPES):
        samples = max(samples, 2 * shortest)
        feeds = speech_inputs(model_config, batch, samples, seed)
        cases.append(({"batch": batch, "samples": samples,
                       "real_samples": [int(n) for n in feeds["attention_mask"].sum(axis=1)]}, feeds))
    return cases


# ----------------------------------------------------------------------- vision backbone

# Batch 1 and a batch of 5, as the image tower's.
VISION_VALIDATION_BATCHES = IMAGE_VALIDATION_BATCHES


def vision_backbone(model):
    """The ViT a vision export holds, of a model of either backend: an MST model's teacher
    backbone, else ``model.backbone`` (module docstring)."""
    return model.teacher.backbone if model.config.model.objective == "mst" else model.backbone


def vision_graph(model_config) -> GraphSignature:
    m = model_config
    inputs = (TensorInfo("pixel_values", "float32", (BATCH, m.num_channels, m.image_size, m.image_size)),)
    outputs = (TensorInfo("last_hidden_state", "float32", (BATCH, 1 + m.num_patches, m.hidden_size)),
               TensorInfo("pooler_output", "float32", (BATCH, m.hidden_size)))
    return GraphSignature(VISION_MODEL, inputs, outputs, VISION)


def vision_inputs(model_config, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Random ``pixel_values`` at the model's size: standard normal, the range of normalised pixels."""
    return _pixels(batch, model_config.num_channels, model_config.image_size, seed)


# ----------------------------------------------------------------------- DALL-E generation

# Validation: prefill at batch 1 and 3; decode (batch, codes, codes already in the past):
# the first code right after the prefill, then 4 codes after 5. The static-cache decode
# (MINDIR) at (batch, cache slots, write position): the first code's slot of a cache as long
# as generation uses (text_length + grid^2 - 1), and a later slot of a shorter cache.
DALLE_PREFILL_VALIDATION_BATCHES = (1, 3)
DALLE_DECODE_VALIDATION_SHAPES = ((1, 1, 0), (3, 4, 5))
CACHE = "cache_sequence"


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


def is_static_decode(graph: GraphSignature) -> bool:
    return "write_position" in graph.input_names


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


# ----------------------------------------------------------------------- M6

M6 = "m6"
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

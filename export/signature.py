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
    family's task (the format matters only for text_to_image, whose MINDIR decodes over a
    static cache)."""
    task = task_of(config)
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

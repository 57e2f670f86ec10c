"""Signatures of the encoder exports (one forward pass each, no generation), their random
validation inputs and a vision model's exported backbone; the shared names and types are
export/signature.py's:

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

A dimension given as a string is a dynamic axis of that name.

numpy only: the ONNX runtime side must work without torch or mindspore.
"""
from __future__ import annotations

import numpy as np

from export.signature import (BATCH, FIRST_ORDINARY_ID, FRAMES, IMAGE_ENCODER, IMAGE_TEXT,
                              IMAGE_VALIDATION_BATCHES, SAMPLES, SEQUENCE, SPEECH, SPEECH_ENCODER,
                              SPEECH_TOWER, TEXT_ENCODER, TRIMODAL, VISION, VISION_MODEL, GraphSignature,
                              TensorInfo, _pixels)


# ----------------------------------------------------------------------- image-text towers

# Text once short and unpadded, once at the full context (what caption_ids gives) with rows
# of five different lengths. None: the model's context. (Images: IMAGE_VALIDATION_BATCHES.)
TEXT_VALIDATION_SHAPES = ((1, 7), (5, None))


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

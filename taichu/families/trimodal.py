"""The tri-modal space of Zidong Taichu (design.md §2.5): image, text and speech in one space.

Three towers, each projected (no bias) into one L2-normalised space of ``projection_dim``:
CLIP's ViT image tower and causal text tower (``vision_model``, ``text_model``,
``visual_projection``, ``text_projection``: CLIP's names, so a CLIP directory initialises
them name for name) and the wav2vec 2.0 backbone as the speech tower (``wav2vec2``: the
speech family's names), pooled as the mean of its last hidden states over each clip's real
frames, then ``speech_projection``. Each pair of modalities has its own learned temperature
(``logit_scale`` for image-text, CLIP's, and ``text_speech_logit_scale``,
``image_speech_logit_scale``).

The loss is CLIP's symmetric contrastive loss for every pair of modalities a batch holds,
weighted by ``model.pair_weights``: a row takes part in a pair's loss (as query and as
candidate) only when it has both modalities, so a batch may lack a modality for some rows or
all of them (image-text pairs with no speech, speech-text pairs with no image).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, StrictInt, model_validator

from taichu.config import Section, TokenizerConfig, TrainConfig
from taichu.families import Family, TensorSpec, linear_specs, layer_norm_specs
from taichu.families.clip import (CLIPModelConfig, ImageTextDataConfig, encoder_specs, text_embedding_specs,
                                  vision_embedding_specs)
from taichu.families.wav2vec2 import Wav2Vec2BackboneConfig, backbone_specs, receptive_field
from taichu.parallel import ParallelConfig

TOWERS = ("image", "text", "speech")
# The pairs in the loss's order, and the order of the rows of ``present`` in a batch.
PAIRS = (("image", "text"), ("text", "speech"), ("image", "speech"))
# Parameters each tower owns (what --init-tower loads and model.frozen_towers freezes).
TOWER_PREFIXES = {"image": ("vision_model.", "visual_projection."),
                  "text": ("text_model.", "text_projection."),
                  "speech": ("wav2vec2.", "speech_projection.")}
# The speech tower does not mask frames: wav2vec 2.0's mask embedding is kept (a wav2vec2
# directory loads name for name) but never trained.
UNUSED = ("wav2vec2.masked_spec_embed",)
# One learned log temperature per pair, in PAIRS order (clipped at ln 100 as CLIP's).
LOGIT_SCALES = ("logit_scale", "text_speech_logit_scale", "image_speech_logit_scale")


class PairWeights(Section):
    """Weight of each pair's contrastive loss in the total."""

    image_text: float = Field(1.0, ge=0.0)
    text_speech: float = Field(1.0, ge=0.0)
    image_speech: float = Field(1.0, ge=0.0)

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.image_text, self.text_speech, self.image_speech)


class TriModalModelConfig(CLIPModelConfig):
    # image, text, projection_dim, logit_scale_init, activation, layer_norm_eps,
    # attention_dropout, initializer_range: CLIP's (the image and text towers are CLIP's).
    # The wav2vec 2.0 backbone as the speech tower (the speech family's backbone fields).
    speech: Wav2Vec2BackboneConfig
    pair_weights: PairWeights = PairWeights()
    # Towers whose weights do not train (e.g. a trained CLIP kept as it is while speech
    # joins its space).
    frozen_towers: list[Literal["image", "text", "speech"]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _some_pair_trains(self) -> "TriModalModelConfig":
        if not any(self.pair_weights.as_tuple()):
            raise ValueError("model.pair_weights: every weight is 0, nothing would train")
        return self


class SpokenCaptionsConfig(Section):
    """Captions of the image-text pairs spoken by the offline Mandarin synthesiser
    (taichu.speech.synthesize), and People's Daily clauses as speech-text pairs with no
    image."""

    # espeak-ng Mandarin voice variants; the held-out one never speaks a training caption
    # and reads every test caption (taichu eval's held-out-voice split).
    voices: list[str] = Field(default_factory=lambda: ["m1", "m3", "f1", "f2", "f4"])
    held_out_voice: str | None = "f4"
    rates: list[StrictInt] = Field(default_factory=lambda: [150, 175, 200])
    pitches: list[StrictInt] = Field(default_factory=lambda: [35, 50, 65])
    # Share of the training image-text pairs that get a spoken caption (a seeded draw);
    # the rest train image-text only (incomplete, weakly related data).
    fraction: float = Field(1.0, ge=0.0, le=1.0)
    # People's Daily clauses (of up to sentence_characters characters) spoken as speech-text
    # pairs without images, added to the training set (0: none).
    sentences: StrictInt = Field(0, ge=0)
    sentence_characters: StrictInt = Field(12, gt=1)
    # Batches are padded to a multiple of this many seconds (few shapes for a compiled
    # graph). A spoken caption longer than max_seconds is left out (its item keeps its image
    # and text); the user's own longer audio is refused.
    pad_to_seconds: float = Field(0.5, gt=0.0)
    max_seconds: float = Field(6.0, gt=0.0)


class TriModalDataConfig(ImageTextDataConfig):
    """``source``: digits, scenes (their captions spoken), or .jsonl files whose lines hold
    any non-empty subset of "image", "text", "audio" (paths relative to the file)."""

    spoken: SpokenCaptionsConfig = SpokenCaptionsConfig()


class TriModalConfig(Section):
    family: Literal["trimodal"]
    model: TriModalModelConfig
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: TriModalDataConfig = TriModalDataConfig()
    train: TrainConfig = TrainConfig()
    parallel: ParallelConfig = ParallelConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "TriModalConfig":
        self.tokenizer.check_vocab(self.model.text.vocab_size, "model.text.vocab_size")
        return self


def tensor_specs(config: TriModalConfig) -> dict[str, TensorSpec]:
    """Registration order of torch_impl.trimodal.TriModal (its state_dict order)."""
    m = config.model
    image, text = m.image, m.text
    specs: dict[str, TensorSpec] = {}
    specs.update(text_embedding_specs("text_model.embeddings", text))
    specs.update(encoder_specs("text_model.encoder", text))
    specs.update(layer_norm_specs("text_model.final_layer_norm", text.hidden_size))
    specs.update(vision_embedding_specs("vision_model.embeddings", image))
    specs.update(layer_norm_specs("vision_model.pre_layernorm", image.hidden_size))
    specs.update(encoder_specs("vision_model.encoder", image))
    specs.update(layer_norm_specs("vision_model.post_layernorm", image.hidden_size))
    specs.update(backbone_specs("wav2vec2", m.speech))
    specs.update(linear_specs("visual_projection", image.hidden_size, m.projection_dim, bias=False))
    specs.update(linear_specs("text_projection", text.hidden_size, m.projection_dim, bias=False))
    specs.update(linear_specs("speech_projection", m.speech.hidden_size, m.projection_dim, bias=False))
    for name in LOGIT_SCALES:
        specs[name] = TensorSpec((), "parameter")
    return specs


def describe(config: TriModalConfig) -> dict:
    m = config.model
    counts = dict.fromkeys(TOWERS, 0)
    for name, spec in tensor_specs(config).items():
        for tower, prefixes in TOWER_PREFIXES.items():
            if name.startswith(prefixes):
                counts[tower] += int(np.prod(spec.shape, dtype=np.int64))
    s = m.speech
    return {
        "image": (f"{m.image.image_size} px, patch {m.image.patch_size}, {m.image.num_layers} layers, "
                  f"hidden {m.image.hidden_size} ({counts['image']:,} parameters)"),
        "text": (f"vocab {m.text.vocab_size}, context {m.text.max_position_embeddings}, "
                 f"{m.text.num_layers} layers, hidden {m.text.hidden_size} ({counts['text']:,} parameters)"),
        "speech": (f"wav2vec 2.0, {len(s.conv_dim)} convs ({s.num_frames_per_second:g} frames/s), "
                   f"{s.num_layers} layers, hidden {s.hidden_size}, mean over real frames "
                   f"({counts['speech']:,} parameters)"),
        "space": (f"{m.projection_dim}, pair weights image-text {m.pair_weights.image_text:g}, "
                  f"text-speech {m.pair_weights.text_speech:g}, image-speech "
                  f"{m.pair_weights.image_speech:g}; frozen: {', '.join(m.frozen_towers) or 'none'}"),
    }


def init_std(config: TriModalConfig, module: str) -> float:
    """Std of the normal init of the image/text towers' and the projections' weights:
    CLIP's scheme (taichu.families.clip.init_std); speech_projection width^-0.5 as CLIP's
    projections. The speech tower keeps wav2vec 2.0's own initialisation."""
    from taichu.families.clip import init_std as clip_init_std

    if module == "speech_projection":
        return config.model.speech.hidden_size ** -0.5
    return clip_init_std(config, module)


def trained(name: str, config: TriModalConfig) -> bool:
    """Whether the optimizer trains the parameter ``name`` (frozen towers and the unused
    mask embedding do not train)."""
    frozen = tuple(p for tower in config.model.frozen_towers for p in TOWER_PREFIXES[tower])
    return not name.startswith(frozen) and name not in UNUSED


def tower_arrays(config: TriModalConfig, tower: str, source_config, arrays: dict) -> tuple[dict, str]:
    """The tensors of ``tower`` from a trained model directory's arrays, named as this
    family names them, and a line for the log.

    image / text: from a CLIP or a tri-modal model (the tower, and its projection when the
    source projects to the same width). speech: from a wav2vec 2.0 model of either head (the
    backbone; the projection starts fresh) or a tri-modal model (backbone and projection).
    """
    family = tower_source_family(tower, source_config)
    prefixes = TOWER_PREFIXES[tower]
    taken = {n: a for n, a in arrays.items() if n.startswith(prefixes)}
    width = getattr(source_config.model, "projection_dim", None)
    if width is not None and width != config.model.projection_dim:
        taken = {n: a for n, a in taken.items() if not n.startswith(prefixes[1])}
    fresh = [p.rstrip(".") for p in prefixes if not any(n.startswith(p) for n in taken)]
    line = (f"{tower} tower: {len(taken)} tensors from the {family} model"
            + (f"; fresh: {', '.join(fresh)}" if fresh else ""))
    return taken, line


def tower_source_family(tower: str, source_config) -> str:
    allowed = {"image": ("clip", "trimodal"), "text": ("clip", "trimodal"),
               "speech": ("wav2vec2", "trimodal")}[tower]
    if source_config.family not in allowed:
        raise ValueError(f"the {tower} tower initialises from a {' or '.join(allowed)} model, "
                         f"not a {source_config.family} model")
    return source_config.family


def check_tower_config(config: TriModalConfig, tower: str, source_config) -> None:
    """Refuse a tower source whose architecture differs, naming the fields that differ."""
    m = config.model
    if tower == "speech":
        mine = m.speech.model_dump()
        theirs = (source_config.model.speech if source_config.family == "trimodal"
                  else source_config.model).model_dump()
        keys = [k for k in mine if k not in ("hidden_dropout", "attention_dropout", "activation_dropout",
                                               "feat_proj_dropout", "initializer_range")]
        where = "model.speech"
    else:
        mine = getattr(m, tower).model_dump()
        theirs = getattr(source_config.model, tower).model_dump()
        keys = list(mine)
        where = f"model.{tower}"
    differ = {k: (theirs.get(k), mine[k]) for k in keys if theirs.get(k) != mine[k]}
    if tower != "speech":
        for key in ("activation", "layer_norm_eps"):
            if getattr(source_config.model, key) != getattr(m, key):
                differ[key] = (getattr(source_config.model, key), getattr(m, key))
    if differ:
        detail = ", ".join(f"{where}.{k}: {a!r} there, {b!r} here" for k, a, b in
                           ((k, *v) for k, v in differ.items()))
        raise ValueError(f"the {tower} tower's source has another architecture: {detail}")


def init_tower(config: TriModalConfig, tower: str, source_config, arrays: dict) -> tuple[dict, str]:
    """``taichu train --init-tower``: check the source's architecture, then take the tower."""
    if tower not in TOWERS:
        raise ValueError(f"unknown tower {tower!r} (choose from {', '.join(TOWERS)})")
    tower_source_family(tower, source_config)
    check_tower_config(config, tower, source_config)
    return tower_arrays(config, tower, source_config, arrays)


FAMILY = Family(name="trimodal", module="trimodal", class_name="TriModal", config_class=TriModalConfig,
                tensor_specs=tensor_specs, describe=describe, task="trimodal", init_tower=init_tower)


def check_present(present: np.ndarray) -> None:
    """A batch's ``present`` [batch, 3] (image, text, speech) must give every row some
    modality; a row with none has nothing to learn or embed."""
    present = np.asarray(present)
    if present.ndim != 2 or present.shape[1] != 3:
        raise ValueError(f"present must be [batch, 3] (image, text, speech), got {present.shape}")
    empty = np.flatnonzero(~(present != 0).any(axis=1))
    if len(empty):
        raise ValueError(f"row {int(empty[0])} has no modality (no image, text or audio)")


def shortest_audio(config: TriModalConfig) -> int:
    """Samples the speech tower needs for one frame (its receptive field)."""
    return receptive_field(config.model.speech)

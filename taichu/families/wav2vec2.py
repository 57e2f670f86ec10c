"""wav2vec 2.0, the Zidong Taichu speech model (design.md §2.3): config and canonical tensors.

One family, two heads (``model.head``): ``pretraining`` (Gumbel product quantizer,
contrastive + diversity loss over masked latent frames) and ``ctc`` (a linear layer to a
character alphabet with a blank, CTC loss). The backbone is the architecture of Hugging Face
``Wav2Vec2Model`` module for module, and the canonical names are its state_dict names
(``wav2vec2.*``, ``quantizer.*``, ``project_hid``, ``project_q``, ``lm_head``) except the
weight-normalised position convolution, stored as ``weight_g`` / ``weight_v`` where Hugging
Face writes ``parametrizations.weight.original0/1`` (taichu/convert/hf_wav2vec2.py).

Every random choice of training (which frames are masked, which distractors are sampled, the
Gumbel noise) is drawn here in numpy and fed to the model as an input, so both backends see
the same draws and give the same losses (``sample_pretraining_inputs``).
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field, StrictBool, StrictInt, model_validator

from taichu.config import Section, TrainConfig, TransformerSize
from taichu.parallel import ParallelConfig
from taichu.families import Family, TensorSpec, layer_norm_specs, linear_specs
from taichu.speech_inputs import SAMPLE_RATE, check_audio_batch, receptive_field_of

# The CTC alphabet of tone-numbered pinyin (taichu.speech): blank first (id 0, also the
# padding of label rows), the word separator, the letters pypinyin writes (ü as "v"), the
# tone digits (5 = neutral tone).
PINYIN_ALPHABET = ("<blank>", "|", *"abcdefghijklmnopqrstuvwxyz", *"12345")


class QuantizerConfig(Section):
    """The Gumbel-softmax product quantizer and the pretraining loss (wav2vec 2.0 §2-3)."""

    num_codevector_groups: StrictInt = Field(2, gt=0)        # G
    num_codevectors_per_group: StrictInt = Field(320, gt=1)  # V
    # Width of a quantized frame (the G chosen entries concatenated); divisible by G.
    codevector_dim: StrictInt = Field(256, gt=0)
    # Width of the space where context and quantized frames are compared.
    proj_codevector_dim: StrictInt = Field(256, gt=0)
    num_negatives: StrictInt = Field(100, gt=0)              # K distractors per masked frame
    contrastive_logits_temperature: float = Field(0.1, gt=0.0)
    diversity_loss_weight: float = Field(0.1, ge=0.0)
    # fairseq's feature penalty: weight x mean squared conv feature (10 in the paper's base).
    feature_penalty_weight: float = Field(10.0, ge=0.0)
    # Gumbel temperature max(max * decay^update, min), annealed per optimizer update.
    max_gumbel_temperature: float = Field(2.0, gt=0.0)
    min_gumbel_temperature: float = Field(0.5, gt=0.0)
    gumbel_temperature_decay: float = Field(0.999995, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _consistent(self) -> "QuantizerConfig":
        if self.codevector_dim % self.num_codevector_groups:
            raise ValueError(f"codevector_dim {self.codevector_dim} is not divisible by "
                             f"num_codevector_groups {self.num_codevector_groups}")
        if self.min_gumbel_temperature > self.max_gumbel_temperature:
            raise ValueError(f"min_gumbel_temperature {self.min_gumbel_temperature} exceeds "
                             f"max_gumbel_temperature {self.max_gumbel_temperature}")
        return self

    def temperature(self, update: int) -> float:
        return max(self.max_gumbel_temperature * self.gumbel_temperature_decay ** update,
                   self.min_gumbel_temperature)


class CTCConfig(Section):
    """The recognition head: a linear layer to ``alphabet`` (blank first), CTC loss."""

    alphabet: list[str] = Field(default_factory=lambda: list(PINYIN_ALPHABET))
    # CTC loss per utterance divided by its label length, then the batch mean (torch's
    # "mean"); infinite losses (a label longer than the frames allow) become zero.
    zero_infinity: StrictBool = True
    # No gradient reaches the convolutional feature encoder for the first N updates.
    freeze_feature_encoder_steps: StrictInt = Field(0, ge=0)

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    @model_validator(mode="after")
    def _consistent(self) -> "CTCConfig":
        if len(self.alphabet) < 2 or len(set(self.alphabet)) != len(self.alphabet):
            raise ValueError("alphabet must hold the blank and at least one symbol, no repeats")
        return self


class Wav2Vec2BackboneConfig(TransformerSize):
    """The backbone (Hugging Face ``Wav2Vec2Model``): what both heads and the tri-modal
    family's speech tower share."""

    # The convolutional feature encoder: one entry per layer (kernel and stride in samples).
    conv_dim: list[StrictInt] = Field(default_factory=lambda: [512] * 7)
    conv_kernel: list[StrictInt] = Field(default_factory=lambda: [10, 3, 3, 3, 3, 2, 2])
    conv_stride: list[StrictInt] = Field(default_factory=lambda: [5, 2, 2, 2, 2, 2, 2])
    conv_bias: StrictBool = False
    # "group": GroupNorm (one group per channel, over time) after the first conv only, as
    # in base; "layer": LayerNorm over channels after every conv, as in large. A group-norm
    # encoder normalises over the padding too, so its features depend on a batch's padding.
    feat_extract_norm: Literal["group", "layer"] = "group"
    feat_extract_activation: Literal["gelu", "gelu_new", "relu"] = "gelu"
    # Transformer: False = post-LN layers with a LayerNorm before them (base); True = pre-LN
    # layers with a LayerNorm after them ("stable", large).
    do_stable_layer_norm: StrictBool = False
    activation: Literal["gelu", "gelu_new", "relu"] = "gelu"
    # The relative position embedding: a grouped, weight-normalised Conv1d over frames.
    num_conv_pos_embeddings: StrictInt = Field(128, gt=0)
    num_conv_pos_embedding_groups: StrictInt = Field(16, gt=0)
    layer_norm_eps: float = Field(1e-5, gt=0.0)
    hidden_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    attention_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    activation_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    feat_proj_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    initializer_range: float = Field(0.02, gt=0.0)

    @property
    def num_frames_per_second(self) -> float:
        return SAMPLE_RATE / math.prod(self.conv_stride)

    @model_validator(mode="after")
    def _consistent(self) -> "Wav2Vec2BackboneConfig":
        if not (len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride) >= 1):
            raise ValueError(f"conv_dim, conv_kernel and conv_stride must have one entry per "
                             f"layer, got {len(self.conv_dim)}, {len(self.conv_kernel)}, "
                             f"{len(self.conv_stride)}")
        if any(v <= 0 for v in self.conv_dim + self.conv_kernel + self.conv_stride):
            raise ValueError("conv_dim, conv_kernel and conv_stride entries must be positive")
        if self.hidden_size % self.num_conv_pos_embedding_groups:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_conv_pos_embedding_groups {self.num_conv_pos_embedding_groups}")
        return self


class Wav2Vec2ModelConfig(Wav2Vec2BackboneConfig):
    head: Literal["pretraining", "ctc"]
    # Pretraining: on the quantizer's input. CTC: before the output layer.
    final_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    # Span masking of latent frames (pretraining; SpecAugment-style in CTC fine-tuning):
    # each frame starts a span of mask_time_length frames with probability mask_time_prob.
    mask_time_prob: float = Field(0.65, ge=0.0, lt=1.0)
    mask_time_length: StrictInt = Field(10, gt=0)
    mask_time_min_masks: StrictInt = Field(2, ge=0)
    quantizer: QuantizerConfig = QuantizerConfig()
    ctc: CTCConfig = CTCConfig()


class SpeechDataConfig(Section):
    """Where audio comes from (taichu.speech) and how it is batched."""

    # ``synthetic``: People's Daily sentences spoken by libespeak-ng's Mandarin voice in
    # several variants; or .jsonl files of {"audio": path, "text": ...} (text optional for
    # pretraining).
    source: str | list[str] = "synthetic"
    # synthetic only: how many sentences, which voice variants (espeak-ng variant names),
    # which one is held out entirely (never trained on; its own test set), speaking rates
    # (words per minute) and pitches (0-99) drawn per clip.
    sentences: StrictInt = Field(2000, gt=0)
    max_characters: StrictInt = Field(16, gt=0)
    voices: list[str] = Field(default_factory=lambda: ["m1", "m3", "f1", "f2", "f4"])
    held_out_voice: str | None = "f4"
    rates: list[StrictInt] = Field(default_factory=lambda: [150, 175, 200])
    pitches: list[StrictInt] = Field(default_factory=lambda: [35, 50, 65])
    validation_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    split_seed: StrictInt = 0
    # Train on this many of the training clips only (a seeded draw; null = all): the
    # labelled budget of a fine-tuning run, e.g. to compare pretrained and scratch models.
    train_clips: StrictInt | None = Field(None, gt=0)
    # Clips longer than this are cropped at random (pretraining) or refused (CTC).
    max_seconds: float = Field(8.0, gt=0.0)
    # Batches are padded to a multiple of this many seconds (few distinct shapes for a
    # compiled graph); clips of similar length are batched together (bucketing).
    pad_to_seconds: float = Field(0.5, gt=0.0)
    # Where synthesised audio is cached; null means ~/.cache/taichu.
    cache_dir: str | None = None


class Wav2Vec2Config(Section):
    family: Literal["wav2vec2"]
    model: Wav2Vec2ModelConfig
    data: SpeechDataConfig = SpeechDataConfig()
    train: TrainConfig = TrainConfig()
    parallel: ParallelConfig = ParallelConfig()


# ----------------------------------------------------------------------------- tensors

def backbone_specs(prefix: str, m: Wav2Vec2BackboneConfig) -> dict[str, TensorSpec]:
    """The tensors of ``Wav2Vec2Model`` (Hugging Face's names) under ``prefix``: what the
    tri-modal speech tower and both heads share."""
    specs: dict[str, TensorSpec] = {}
    channels = 1
    for i, (dim, kernel) in enumerate(zip(m.conv_dim, m.conv_kernel)):
        p = f"{prefix}.feature_extractor.conv_layers.{i}"
        specs[f"{p}.conv.weight"] = TensorSpec((dim, channels, kernel), "conv1d")
        if m.conv_bias:
            specs[f"{p}.conv.bias"] = TensorSpec((dim,), "conv1d")
        if m.feat_extract_norm == "layer":
            specs.update(layer_norm_specs(f"{p}.layer_norm", dim))
        elif i == 0:
            specs[f"{p}.layer_norm.weight"] = TensorSpec((dim,), "group_norm")
            specs[f"{p}.layer_norm.bias"] = TensorSpec((dim,), "group_norm")
        channels = dim
    hidden = m.hidden_size
    specs.update(layer_norm_specs(f"{prefix}.feature_projection.layer_norm", channels))
    specs.update(linear_specs(f"{prefix}.feature_projection.projection", channels, hidden))
    specs[f"{prefix}.masked_spec_embed"] = TensorSpec((hidden,), "parameter")
    p = f"{prefix}.encoder.pos_conv_embed.conv"
    specs[f"{p}.bias"] = TensorSpec((hidden,), "parameter")
    # Weight norm over every axis but the kernel's (Hugging Face's dim=2): g is [1, 1, K].
    specs[f"{p}.weight_g"] = TensorSpec((1, 1, m.num_conv_pos_embeddings), "parameter")
    specs[f"{p}.weight_v"] = TensorSpec(
        (hidden, hidden // m.num_conv_pos_embedding_groups, m.num_conv_pos_embeddings), "parameter")
    specs.update(layer_norm_specs(f"{prefix}.encoder.layer_norm", hidden))
    for i in range(m.num_layers):
        p = f"{prefix}.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs.update(linear_specs(f"{p}.attention.{proj}", hidden, hidden))
        specs.update(layer_norm_specs(f"{p}.layer_norm", hidden))
        specs.update(linear_specs(f"{p}.feed_forward.intermediate_dense", hidden, m.ffn_size))
        specs.update(linear_specs(f"{p}.feed_forward.output_dense", m.ffn_size, hidden))
        specs.update(layer_norm_specs(f"{p}.final_layer_norm", hidden))
    return specs


def tensor_specs(config: Wav2Vec2Config) -> dict[str, TensorSpec]:
    m = config.model
    specs = backbone_specs("wav2vec2", m)
    if m.head == "pretraining":
        q = m.quantizer
        groups, entries = q.num_codevector_groups, q.num_codevectors_per_group
        specs["quantizer.codevectors"] = TensorSpec(
            (1, groups * entries, q.codevector_dim // groups), "parameter")
        specs.update(linear_specs("quantizer.weight_proj", m.conv_dim[-1], groups * entries))
        specs.update(linear_specs("project_hid", m.hidden_size, q.proj_codevector_dim))
        specs.update(linear_specs("project_q", q.codevector_dim, q.proj_codevector_dim))
    else:
        specs.update(linear_specs("lm_head", m.hidden_size, m.ctc.vocab_size))
    # Optimizer updates so far: anneals the Gumbel temperature and ends the feature
    # encoder's freeze, inside the compiled step; saved with the model so resume is exact.
    specs["num_updates"] = TensorSpec((1,), "parameter")   # int64
    return specs


HEAD_PREFIXES = ("quantizer.", "project_hid.", "project_q.", "lm_head.", "num_updates")


def fresh_on_init(init: Wav2Vec2Config, run: Wav2Vec2Config) -> tuple[str, ...]:
    """``taichu train --init`` from a model with the other head (pretraining -> CTC): the
    backbone loads, the head and the update counter (Gumbel temperature, encoder freeze)
    start new."""
    return HEAD_PREFIXES if init.model.head != run.model.head else ()


def describe(config: Wav2Vec2Config) -> dict:
    m = config.model
    counts = {"backbone": 0, "head": 0}
    for name, spec in tensor_specs(config).items():
        counts["backbone" if name.startswith("wav2vec2.") else "head"] += int(
            np.prod(spec.shape, dtype=np.int64))
    receptive = receptive_field(m)
    info = {
        "head": m.head,
        "feature encoder": (f"{len(m.conv_dim)} convs ({m.feat_extract_norm} norm), stride "
                            f"{math.prod(m.conv_stride)} samples = {m.num_frames_per_second:g} "
                            f"frames/s, receptive field {receptive} samples "
                            f"({1000 * receptive / SAMPLE_RATE:.1f} ms)"),
        "transformer": (f"{m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads, "
                        f"ffn {m.ffn_size}, {'pre' if m.do_stable_layer_norm else 'post'}-LN, "
                        f"position conv {m.num_conv_pos_embeddings} / "
                        f"{m.num_conv_pos_embedding_groups} groups"),
        "parameters": f"backbone {counts['backbone']:,}, head {counts['head']:,}",
    }
    if m.head == "pretraining":
        q = m.quantizer
        info["quantizer"] = (f"{q.num_codevector_groups} x {q.num_codevectors_per_group} entries, "
                             f"{q.num_negatives} distractors, temperature "
                             f"{q.max_gumbel_temperature} -> {q.min_gumbel_temperature}")
    else:
        info["ctc"] = f"{m.ctc.vocab_size} symbols (blank = {m.ctc.alphabet[0]!r})"
    return info


FAMILY = Family(name="wav2vec2", module="wav2vec2", class_name="Wav2Vec2",
                config_class=Wav2Vec2Config, tensor_specs=tensor_specs, describe=describe,
                task="speech", fresh_on_init=fresh_on_init)


# ----------------------------------------------------------------------------- lengths

def frame_count(m: Wav2Vec2BackboneConfig, num_samples):
    """Frames the feature encoder makes of ``num_samples`` samples (int or int array):
    floor((L - kernel) / stride) + 1 per conv, as Hugging Face's
    _get_feat_extract_output_lengths; 0 for a clip shorter than the receptive field."""
    lengths = np.asarray(num_samples, dtype=np.int64)
    for kernel, stride in zip(m.conv_kernel, m.conv_stride):
        lengths = np.where(lengths >= kernel, (lengths - kernel) // stride + 1, 0)
    return int(lengths) if lengths.ndim == 0 else lengths


def receptive_field(m: Wav2Vec2BackboneConfig) -> int:
    """Samples the first frame sees: the shortest clip that gives a frame."""
    return receptive_field_of(m.conv_kernel, m.conv_stride)


# ----------------------------------------------------------------------------- random draws

def compute_span_mask(rng: np.random.Generator, num_frames: np.ndarray, total_frames: int,
                      mask_prob: float, mask_length: int, min_masks: int) -> np.ndarray:
    """Boolean [batch, total_frames] span mask over each row's real frames (wav2vec 2.0 §3.1).

    Per row with n real frames: k = max(min_masks, round-down(mask_prob * n / mask_length +
    u)) span starts (u uniform in [0, 1): probabilistic rounding, as fairseq/Hugging Face),
    drawn without replacement among the n - mask_length + 1 possible starts; each masks
    mask_length frames (spans may overlap). At least one real frame stays visible (a fully
    masked row has no context); rows of 0 or 1 frames are not masked.
    """
    batch = len(num_frames)
    mask = np.zeros((batch, total_frames), dtype=bool)
    if mask_prob <= 0:
        return mask
    for row, n in enumerate(np.asarray(num_frames, dtype=np.int64)):
        n = int(n)
        if n <= 1:
            continue
        span = min(mask_length, n - 1)
        count = int(mask_prob * n / span + rng.random())
        count = max(min_masks, count)
        starts_available = n - span + 1
        count = min(count, starts_available)
        starts = rng.choice(starts_available, size=count, replace=False)
        for start in starts:
            mask[row, start:start + span] = True
        if mask[row, :n].all():
            mask[row, n - 1] = False
    return mask


def sample_negative_indices(rng: np.random.Generator, mask: np.ndarray, num_negatives: int) -> np.ndarray:
    """int32 [batch, frames, K]: for each masked frame, K distractor frames drawn uniformly
    (with replacement) from the other masked frames of the same utterance, as indices into
    the flattened [batch * frames] axis. Unmasked frames get index 0 (their loss is ignored);
    a row with a single masked frame draws that frame (the loss masks such a distractor as
    equal to the target)."""
    batch, frames = mask.shape
    out = np.zeros((batch, frames, num_negatives), dtype=np.int32)
    for row in range(batch):
        positions = np.flatnonzero(mask[row])
        if len(positions) == 0:
            continue
        if len(positions) == 1:
            out[row, positions[0]] = row * frames + positions[0]
            continue
        # Draw among the other len - 1 masked frames: shift draws at or past the frame's own
        # rank by one, which excludes the frame itself without rejection sampling.
        draws = rng.integers(0, len(positions) - 1, size=(len(positions), num_negatives))
        draws += draws >= np.arange(len(positions))[:, None]
        out[row, positions] = row * frames + positions[draws]
    return out


def gumbel_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard Gumbel noise -log(E), E ~ Exp(1), float32 (the Gumbel-softmax's g)."""
    return (-np.log(rng.standard_exponential(shape))).astype(np.float32)


# ----------------------------------------------------------------------------- input checks

def check_inputs(config: Wav2Vec2Config, shape: tuple[int, ...], attention_mask: np.ndarray | None = None,
                 dtype: str | None = None) -> None:
    """The checks both backends run before a forward pass, outside the compiled graph, on the
    shape and a numpy copy of the mask (taichu.speech_inputs.check_audio_batch)."""
    check_audio_batch(shape, attention_mask, receptive_field(config.model), dtype)

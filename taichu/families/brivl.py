"""WenLan / BriVL (design.md §2.6): config and canonical tensors.

Two towers without cross-attention, trained contrastively with MoCo-style momentum
encoders and two queues of negatives (image keys and text keys), so the negatives of a
pair come from both modalities.

- Image tower: a ViT backbone (CLIP's vision tower: patch Conv2d without bias, class
  token, learned positions, LayerNorm, pre-LN layers, a LayerNorm on every token) ->
  a small bidirectional Transformer head (pre-LN layers + LayerNorm) -> mean over all
  tokens (class token included) -> MLP (Linear, ReLU, Linear) -> L2 normalisation.
- Text tower: a bidirectional Transformer over token + position embeddings with a
  padding mask (pre-LN layers + final LayerNorm: CLIP's text tower without the causal
  mask) -> a small Transformer head -> mean over the real tokens -> MLP -> L2 norm.
- A momentum copy of each whole tower (backbone, head and MLP), never trained by the
  optimizer, follows the online tower as p_k = m p_k + (1 - m) p_q; the queues hold the
  last ``queue_size`` momentum keys of each modality; ``queue_ptr`` is the next slot.

The release uses an EfficientNet backbone with region pooling and RoBERTa; this project
uses ViT and a pre-LN Transformer so that both towers are built from the same pieces as
CLIP (design.md §2.4) and run the same in both backends. Not published, chosen here: the
head Transformer works at its tower's width (only depth, heads and MLP width are
configurable), backbones and heads end with a LayerNorm (pre-LN stacks leave the
residual stream unnormalised), the MLP's hidden width (``mlp_hidden_size``), and the
init (every Linear / Conv2d / Embedding weight and the class embedding N(0,
initializer_range), biases zero, LayerNorms one/zero, queue rows random unit vectors).

Canonical names are the state_dict names of ``torch_impl.brivl.BriVL``: online towers
``image_encoder`` / ``text_encoder``, momentum towers ``image_encoder_m`` /
``text_encoder_m`` (ALBEF's suffix), buffers ``image_queue``, ``text_queue`` (float32
[queue_size, embed_dim]), ``queue_ptr`` and ``num_updates`` (int64 [1], in both
backends: the next slot, and the updates counted so far, which ``moco.queue_start_step``
compares with). All of them are in model directories and checkpoints, so training resumes
with the same negatives.
Backbone names equal CLIP's ``vision_model`` / ``text_model`` below ``backbone``, so CLIP
tower weights move over by renaming. The temperature is a fixed config value (MoCo's),
not a learned logit scale as in CLIP.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, StrictInt, model_validator

from taichu.config import DistillConfig, Section, TokenizerConfig, TrainConfig, TransformerSize
from taichu.families import DistillStream, Family, TensorSpec, layer_norm_specs, linear_specs
from taichu.families.clip import (CLIPImageConfig, ImageTextDataConfig, encoder_specs,
                                  text_embedding_specs, vision_embedding_specs)
from taichu.parallel import ParallelConfig

ACTIVATIONS = ("gelu", "gelu_new", "quick_gelu", "relu")


class BriVLTextConfig(TransformerSize):
    """The bidirectional text tower; max_position_embeddings is the longest text."""

    vocab_size: StrictInt = Field(gt=0)
    max_position_embeddings: StrictInt = Field(gt=0)


class HeadConfig(Section):
    """The small Transformer on top of a backbone; its width is the backbone's."""

    num_layers: StrictInt = Field(gt=0)
    num_heads: StrictInt = Field(gt=0)
    # Width of the head's MLPs; null means 4 * the tower's hidden_size.
    intermediate_size: StrictInt | None = Field(None, gt=0)

    def size(self, hidden_size: int) -> TransformerSize:
        """The head as a TransformerSize at its tower's width (checks the heads divide it)."""
        return TransformerSize(hidden_size=hidden_size, num_layers=self.num_layers,
                               num_heads=self.num_heads, intermediate_size=self.intermediate_size)


class MoCoConfig(Section):
    """Momentum encoders and queues (MoCo); BriVL's release: 9600, 0.99, 0.07."""

    # Keys kept per modality as extra negatives; 0 = in-batch negatives only.
    queue_size: StrictInt = Field(9600, ge=0)
    # Momentum of the key towers: p_k = momentum * p_k + (1 - momentum) * p_q, after each
    # optimizer step. 0 makes the key towers copies of the online ones.
    momentum: float = Field(0.99, ge=0.0, lt=1.0)
    # Fixed (not learned) softmax temperature of the contrastive loss and of the logits.
    temperature: float = Field(0.07, gt=0.0)
    # The first optimizer update whose loss uses the queues; earlier updates use the
    # in-batch loss while their keys fill the queues. 0 = from the first update (MoCo, and
    # the release, whose towers start pretrained). Towers trained from scratch move fast at
    # first, so old keys are unlike fresh ones and a queue of them teaches the model to tell
    # key ages apart rather than to match pairs (docs/benchmarks.md, BriVL's MoCo queue).
    queue_start_step: StrictInt = Field(0, ge=0)


class BriVLModelConfig(Section):
    image: CLIPImageConfig
    text: BriVLTextConfig
    image_head: HeadConfig
    text_head: HeadConfig
    # Width of the L2-normalised embedding both towers end in (2048 in the release).
    embed_dim: StrictInt = Field(gt=0)
    # Hidden width of the final MLP (Linear, ReLU, Linear) of both towers; null = embed_dim.
    mlp_hidden_size: StrictInt | None = Field(None, gt=0)
    # Backbones and heads. quick_gelu = x * sigmoid(1.702 x); gelu = exact erf GELU;
    # gelu_new = tanh approximation. Never a framework default (MindSpore's nn.GELU is tanh).
    activation: Literal["gelu", "gelu_new", "quick_gelu", "relu"] = "gelu"
    # Explicit: MindSpore's nn.LayerNorm defaults to 1e-7, torch's to 1e-5.
    layer_norm_eps: float = Field(1e-5, gt=0.0)
    # Dropout on the attention probabilities (the only dropout; 0 keeps the key towers'
    # forward deterministic, as MoCo's keys should be).
    attention_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # Std of every Linear, Conv2d and Embedding weight and of the class embedding.
    initializer_range: float = Field(0.02, gt=0.0)
    moco: MoCoConfig = MoCoConfig()

    @property
    def projection_hidden(self) -> int:
        return self.mlp_hidden_size or self.embed_dim

    @property
    def image_head_size(self) -> TransformerSize:
        return self.image_head.size(self.image.hidden_size)

    @property
    def text_head_size(self) -> TransformerSize:
        return self.text_head.size(self.text.hidden_size)

    @model_validator(mode="after")
    def _heads_fit_towers(self) -> "BriVLModelConfig":
        for name, head, tower in (("image_head", self.image_head, self.image),
                                  ("text_head", self.text_head, self.text)):
            if tower.hidden_size % head.num_heads:
                raise ValueError(f"{name}.num_heads {head.num_heads} does not divide the "
                                 f"{name.split('_')[0]} tower's hidden_size {tower.hidden_size} "
                                 f"(the head works at its tower's width)")
        return self


class BriVLConfig(Section):
    family: Literal["brivl"]
    model: BriVLModelConfig
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: ImageTextDataConfig = ImageTextDataConfig()
    train: TrainConfig = TrainConfig()
    # Data parallel only (msrun / torchrun workers); no tensor or pipeline strategies.
    parallel: ParallelConfig = ParallelConfig()
    # How `taichu distill` trains this model as a student (None: defaults).
    distill: DistillConfig | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "BriVLConfig":
        self.tokenizer.check_vocab(self.model.text.vocab_size, "model.text.vocab_size")
        return self


def tensor_specs(config: BriVLConfig) -> dict[str, TensorSpec]:
    m = config.model
    image, text = m.image, m.text
    specs: dict[str, TensorSpec] = {}

    def linear(prefix: str, n_in: int, n_out: int, bias: bool = True) -> None:
        specs.update(linear_specs(prefix, n_in, n_out, bias))

    def layer_norm(prefix: str, width: int) -> None:
        specs.update(layer_norm_specs(prefix, width))

    def head_and_projection(prefix: str, head: TransformerSize) -> None:
        specs.update(encoder_specs(f"{prefix}.head", head))
        layer_norm(f"{prefix}.head.layer_norm", head.hidden_size)
        linear(f"{prefix}.projection.fc1", head.hidden_size, m.projection_hidden)
        linear(f"{prefix}.projection.fc2", m.projection_hidden, m.embed_dim)

    def image_tower(prefix: str) -> None:
        b = f"{prefix}.backbone"
        specs.update(vision_embedding_specs(f"{b}.embeddings", image))
        layer_norm(f"{b}.pre_layernorm", image.hidden_size)
        specs.update(encoder_specs(f"{b}.encoder", image))
        layer_norm(f"{b}.post_layernorm", image.hidden_size)
        head_and_projection(prefix, m.image_head_size)

    def text_tower(prefix: str) -> None:
        b = f"{prefix}.backbone"
        specs.update(text_embedding_specs(f"{b}.embeddings", text))
        specs.update(encoder_specs(f"{b}.encoder", text))
        layer_norm(f"{b}.final_layer_norm", text.hidden_size)
        head_and_projection(prefix, m.text_head_size)

    # The order of torch_impl.brivl.BriVL's state_dict: a module's own buffers come
    # before its children's tensors.
    specs["image_queue"] = TensorSpec((m.moco.queue_size, m.embed_dim), "parameter")
    specs["text_queue"] = TensorSpec((m.moco.queue_size, m.embed_dim), "parameter")
    specs["queue_ptr"] = TensorSpec((1,), "parameter")     # int64, the next slot of both
    specs["num_updates"] = TensorSpec((1,), "parameter")   # int64, updates so far
    image_tower("image_encoder")
    text_tower("text_encoder")
    image_tower("image_encoder_m")
    text_tower("text_encoder_m")
    return specs


def count_groups(config: BriVLConfig) -> dict[str, int]:
    """Numbers of values in the trained towers, the momentum towers and the queues."""
    counts = {"image_encoder": 0, "text_encoder": 0, "momentum": 0, "queues": 0}
    for name, spec in tensor_specs(config).items():
        top = name.split(".")[0]
        group = (top if top in counts else "momentum" if top.endswith("_m") else "queues")
        counts[group] += int(np.prod(spec.shape, dtype=np.int64))
    return counts


def describe(config: BriVLConfig) -> dict:
    m = config.model
    image, text = m.image, m.text
    counts = count_groups(config)
    trained = counts["image_encoder"] + counts["text_encoder"]
    return {
        "image": (f"{image.image_size}x{image.image_size}x{image.num_channels}, patch "
                  f"{image.patch_size} ({image.num_patches} patches), {_layers(image.num_layers)}, "
                  f"hidden {image.hidden_size}, {image.num_heads} heads, ffn {image.ffn_size}; head "
                  f"{_layers(m.image_head.num_layers)}, {m.image_head.num_heads} heads "
                  f"({counts['image_encoder']:,} parameters)"),
        "text": (f"vocab {text.vocab_size}, context {text.max_position_embeddings}, "
                 f"{_layers(text.num_layers)}, hidden {text.hidden_size}, {text.num_heads} heads, "
                 f"ffn {text.ffn_size}; head {_layers(m.text_head.num_layers)}, "
                 f"{m.text_head.num_heads} heads ({counts['text_encoder']:,} parameters)"),
        "embedding": f"{m.embed_dim} (MLP hidden {m.projection_hidden}), L2-normalised",
        "moco": (f"queue {m.moco.queue_size} per modality, momentum {m.moco.momentum}, "
                 f"temperature {m.moco.temperature}"
                 + (f", queue from update {m.moco.queue_start_step}" if m.moco.queue_start_step else "")),
        "activation": m.activation,
        # `parameters` below counts every tensor of the model directory.
        "trained":  f"{trained:,} parameters (momentum copies {counts['momentum']:,}, "
                    f"queues and counters {counts['queues']:,} values)",
    }


def _layers(count: int) -> str:
    return f"{count} layer" if count == 1 else f"{count} layers"


def distill_streams(config: BriVLConfig) -> tuple[DistillStream, ...]:
    """Text backbone, text head, image backbone, image head (a head's head count may differ
    from its backbone's), as the backends' ``distill_outputs`` give them; none is causal."""
    m = config.model
    return tuple(DistillStream(name, size.hidden_size, size.num_layers, size.num_heads, causal=False)
                 for name, size in (("text", m.text), ("text_head", m.text_head_size),
                                    ("image", m.image), ("image_head", m.image_head_size)))


FAMILY = Family(name="brivl", module="brivl", class_name="BriVL", config_class=BriVLConfig,
                tensor_specs=tensor_specs, describe=describe, task="image_text",
                distill_streams=distill_streams,
                distill_shared_keys=("model.text.vocab_size", "model.text.max_position_embeddings",
                                     "model.image.image_size", "model.image.patch_size",
                                     "model.image.num_channels"))


def check_inputs(config: BriVLConfig, pixel_shape: tuple[int, ...] | None = None,
                 input_ids: np.ndarray | None = None,
                 attention_mask: np.ndarray | None = None) -> None:
    """The checks both backends run before a forward pass, with one wording.

    Done outside the compiled graph, on numpy copies of the ids and mask: an out-of-range
    id would read past the embedding table, a long text past the positions. Positions
    count from the first column, so texts must be right-padded (ones, then zeros), with
    at least one real token per row (the mean over real tokens needs one).
    """
    m = config.model
    if pixel_shape is not None:
        image = m.image
        expected = (image.num_channels, image.image_size, image.image_size)
        if len(pixel_shape) != 4 or tuple(pixel_shape[1:]) != expected:
            raise ValueError(f"pixel_values must be [batch, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}], got shape {tuple(pixel_shape)}")
        if pixel_shape[0] == 0:
            raise ValueError("pixel_values has an empty batch")
    if input_ids is None:
        return
    shape = tuple(input_ids.shape)
    if len(shape) != 2:
        raise ValueError(f"input_ids must be [batch, sequence], got shape {shape}")
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"input_ids has an empty axis, shape {shape}")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= m.text.vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} is out of range for vocab_size {m.text.vocab_size} "
                         f"(valid ids: 0..{m.text.vocab_size - 1})")
    if shape[1] > m.text.max_position_embeddings:
        raise ValueError(f"text length {shape[1]} exceeds max_position_embeddings "
                         f"{m.text.max_position_embeddings}")
    if attention_mask is None:
        return
    if tuple(attention_mask.shape) != shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {shape}, "
                         f"got {tuple(attention_mask.shape)}")
    mask = attention_mask != 0
    if not mask[:, 0].all():
        raise ValueError("attention_mask has a row without real tokens or a left-padded row: "
                         "texts must be right-padded (real tokens first, then padding)")
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("attention_mask is not right-padded: after a 0 (padding) a row has a 1 "
                         "again; texts must be real tokens first, then padding")

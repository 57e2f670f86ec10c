"""CLIP, the light model's image-text scorer (design.md §2.4): config and canonical tensors.

Two towers and two projections, the architecture of Hugging Face ``CLIPModel`` (OpenAI
CLIP): a ViT image tower (patch Conv2d without bias, class embedding, learned positions,
LayerNorm before the encoder, pre-LN layers, LayerNorm on the class token) and a causal
text Transformer pooled at the end-of-text token. Canonical names are the state_dict names
of ``torch_impl.clip.CLIP``; they equal ``CLIPModel``'s except ``pre_layrnorm`` (HF's
spelling), which is ``pre_layernorm`` here, so converting from Hugging Face is a renaming.
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field, StrictInt, model_validator

from taichu.config import DistillConfig, Section, TokenizerConfig, TrainConfig, TransformerSize
from taichu.parallel import ParallelConfig
from taichu.families import DistillStream, Family, TensorSpec, layer_norm_specs, linear_specs

ACTIVATIONS = ("quick_gelu", "gelu")
# OpenAI CLIP clips the learned log temperature at ln(100) after each training step.
MAX_LOGIT_SCALE = math.log(100.0)


class CLIPImageConfig(TransformerSize):
    """The ViT image tower: a square image cut into square patches."""

    image_size: StrictInt = Field(gt=0)
    patch_size: StrictInt = Field(gt=0)
    num_channels: StrictInt = Field(3, gt=0)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + 1   # the class token first

    @model_validator(mode="after")
    def _patches_tile_image(self) -> "CLIPImageConfig":
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by "
                             f"patch_size {self.patch_size}")
        return self


class CLIPTextConfig(TransformerSize):
    """The causal text tower; max_position_embeddings is the context length."""

    vocab_size: StrictInt = Field(gt=0)
    max_position_embeddings: StrictInt = Field(gt=0)


class CLIPModelConfig(Section):
    image: CLIPImageConfig
    text: CLIPTextConfig
    # Width of the shared embedding space both towers project into (no bias).
    projection_dim: StrictInt = Field(gt=0)
    # Initial log of the logit temperature: ln(1 / 0.07), as in OpenAI CLIP.
    logit_scale_init: float = math.log(1 / 0.07)
    # Both towers. quick_gelu = x * sigmoid(1.702 x) (OpenAI CLIP); gelu = exact erf GELU.
    # Never a framework default: MindSpore's nn.GELU is the tanh approximation.
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"
    # Explicit: MindSpore's nn.LayerNorm defaults to 1e-7, torch's to 1e-5.
    layer_norm_eps: float = Field(1e-5, gt=0.0)
    # Dropout on the attention probabilities (the only dropout CLIP has).
    attention_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # Std of the token, position and patch embeddings; the other weights follow OpenAI
    # CLIP's width-based scheme (init_std).
    initializer_range: float = Field(0.02, gt=0.0)


class ImageTextDataConfig(Section):
    """Where image-caption pairs come from (taichu.imagetext.load_image_text) and the text
    the tokenizer is trained on. Shared by every image-text family (CLIP, BriVL).

    Captions become right-padded ids of length model.text.max_position_embeddings,
    [bos] + text + [eos], truncated at the end of the text when too long
    (taichu.imagetext.caption_ids); images go through taichu.images.preprocess.
    """

    # ``digits`` (scikit-learn's handwritten digits, Chinese captions), ``scenes`` (drawn
    # shapes with captions saying what is drawn), a .jsonl of {"image", "text"} lines, or
    # a list of them.
    source: str | list[str] = "digits"
    validation_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    split_seed: StrictInt = 0
    # ``scenes`` only: how many pictures, drawn from which seed.
    scene_count: StrictInt = Field(2000, gt=0)
    scene_seed: StrictInt = 0
    # The tokenizer is trained on this corpus (a DataConfig.corpus value: peoples_daily or
    # text files) plus the training captions, so caption words have their own pieces.
    tokenizer_corpus: str | list[str] = "peoples_daily"
    # Where trained tokenizers are cached; null means ~/.cache/taichu.
    cache_dir: str | None = None


class CLIPConfig(Section):
    family: Literal["clip"]
    model: CLIPModelConfig
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: ImageTextDataConfig = ImageTextDataConfig()
    train: TrainConfig = TrainConfig()
    # Data parallel only (msrun / torchrun workers); no tensor or pipeline strategies.
    parallel: ParallelConfig = ParallelConfig()
    # How `taichu distill` trains this model as a student (None: defaults).
    distill: DistillConfig | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "CLIPConfig":
        self.tokenizer.check_vocab(self.model.text.vocab_size, "model.text.vocab_size")
        return self


def encoder_specs(prefix: str, size: TransformerSize) -> dict[str, TensorSpec]:
    """The pre-LN layers of torch_impl.clip.Encoder (``prefix.layers.i...``); BriVL's
    backbones and heads are made of the same layers."""
    specs: dict[str, TensorSpec] = {}
    hidden = size.hidden_size
    for i in range(size.num_layers):
        p = f"{prefix}.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs.update(linear_specs(f"{p}.self_attn.{proj}", hidden, hidden))
        specs.update(layer_norm_specs(f"{p}.layer_norm1", hidden))
        specs.update(linear_specs(f"{p}.mlp.fc1", hidden, size.ffn_size))
        specs.update(linear_specs(f"{p}.mlp.fc2", size.ffn_size, hidden))
        specs.update(layer_norm_specs(f"{p}.layer_norm2", hidden))
    return specs


def text_embedding_specs(prefix: str, text: CLIPTextConfig) -> dict[str, TensorSpec]:
    return {f"{prefix}.token_embedding.weight": TensorSpec((text.vocab_size, text.hidden_size), "embedding"),
            f"{prefix}.position_embedding.weight": TensorSpec(
                (text.max_position_embeddings, text.hidden_size), "embedding")}


def vision_embedding_specs(prefix: str, image: CLIPImageConfig) -> dict[str, TensorSpec]:
    return {f"{prefix}.class_embedding": TensorSpec((image.hidden_size,), "parameter"),
            f"{prefix}.patch_embedding.weight": TensorSpec(
                (image.hidden_size, image.num_channels, image.patch_size, image.patch_size), "conv2d"),
            f"{prefix}.position_embedding.weight": TensorSpec(
                (image.num_positions, image.hidden_size), "embedding")}


def tensor_specs(config: CLIPConfig) -> dict[str, TensorSpec]:
    m = config.model
    image, text = m.image, m.text
    specs: dict[str, TensorSpec] = {}

    def linear(prefix: str, n_in: int, n_out: int, bias: bool = True) -> None:
        specs.update(linear_specs(prefix, n_in, n_out, bias))

    def layer_norm(prefix: str, width: int) -> None:
        specs.update(layer_norm_specs(prefix, width))

    # Registration order of torch_impl.clip.CLIP (its state_dict order).
    specs.update(text_embedding_specs("text_model.embeddings", text))
    specs.update(encoder_specs("text_model.encoder", text))
    layer_norm("text_model.final_layer_norm", text.hidden_size)
    specs.update(vision_embedding_specs("vision_model.embeddings", image))
    layer_norm("vision_model.pre_layernorm", image.hidden_size)
    specs.update(encoder_specs("vision_model.encoder", image))
    layer_norm("vision_model.post_layernorm", image.hidden_size)
    linear("visual_projection", image.hidden_size, m.projection_dim, bias=False)
    linear("text_projection", text.hidden_size, m.projection_dim, bias=False)
    specs["logit_scale"] = TensorSpec((), "parameter")
    return specs


def init_std(config: CLIPConfig, module: str) -> float:
    """Std of the normal init of a Linear/Embedding/Conv2d weight, by module path.

    OpenAI CLIP's scheme (Hugging Face's _init_weights follows it, but swaps the q/k/v
    and out_proj stds): attention inputs width^-0.5, residual outputs (out_proj, fc2)
    width^-0.5 * (2 * layers)^-0.5, fc1 (2 * width)^-0.5, projections tower width^-0.5;
    embeddings initializer_range. Biases are zero, LayerNorms one/zero, the class
    embedding width^-0.5, logit_scale logit_scale_init.
    """
    m = config.model
    tower = m.image if module.startswith("vision_model") else m.text
    width = tower.hidden_size ** -0.5
    residual = width * (2 * tower.num_layers) ** -0.5
    leaf = module.rpartition(".")[2]
    if leaf in ("token_embedding", "position_embedding", "patch_embedding"):
        return m.initializer_range
    if leaf in ("q_proj", "k_proj", "v_proj"):
        return width
    if leaf in ("out_proj", "fc2"):
        return residual
    if leaf == "fc1":
        return (2 * tower.hidden_size) ** -0.5
    if leaf == "visual_projection":
        return m.image.hidden_size ** -0.5
    if leaf == "text_projection":
        return m.text.hidden_size ** -0.5
    raise KeyError(f"no init rule for module {module!r}")


def describe(config: CLIPConfig) -> dict:
    m = config.model
    image, text = m.image, m.text
    counts = {"vision_model": 0, "text_model": 0, "": 0}
    for name, spec in tensor_specs(config).items():
        tower = name.split(".")[0]
        counts[tower if tower in counts else ""] += int(np.prod(spec.shape, dtype=np.int64))
    return {
        "image": (f"{image.image_size}x{image.image_size}x{image.num_channels}, patch "
                  f"{image.patch_size} ({image.num_patches} patches), {image.num_layers} layers, "
                  f"hidden {image.hidden_size}, {image.num_heads} heads, ffn {image.ffn_size} "
                  f"({counts['vision_model']:,} parameters)"),
        "text": (f"vocab {text.vocab_size}, context {text.max_position_embeddings}, "
                 f"{text.num_layers} layers, hidden {text.hidden_size}, {text.num_heads} heads, "
                 f"ffn {text.ffn_size} ({counts['text_model']:,} parameters)"),
        "projection": f"{m.projection_dim} ({counts['']:,} parameters with logit_scale)",
        "activation": m.activation,
    }


def distill_streams(config: CLIPConfig) -> tuple[DistillStream, ...]:
    """The text tower's stack (causal), then the image tower's, as the backends'
    ``distill_outputs`` give them."""
    image, text = config.model.image, config.model.text
    return (DistillStream("text", text.hidden_size, text.num_layers, text.num_heads, causal=True),
            DistillStream("image", image.hidden_size, image.num_layers, image.num_heads, causal=False))


FAMILY = Family(name="clip", module="clip", class_name="CLIP", config_class=CLIPConfig,
                tensor_specs=tensor_specs, describe=describe, task="image_text",
                distill_streams=distill_streams,
                distill_shared_keys=("model.text.vocab_size", "model.text.max_position_embeddings",
                                     "model.image.image_size", "model.image.patch_size",
                                     "model.image.num_channels"))


def check_inputs(config: CLIPConfig, pixel_shape: tuple[int, ...] | None = None,
                 input_ids: np.ndarray | None = None,
                 attention_mask: np.ndarray | None = None) -> None:
    """The checks both backends run before a forward pass, with one wording.

    Done outside the compiled graph, on numpy copies of the ids and mask: an out-of-range
    id would read past the embedding table, a long text past the positions. The text is
    pooled at its last real token (the eos), so the mask must be right-padded: ones, then
    zeros, at least one real token per row.
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
        raise ValueError(f"text length {shape[1]} exceeds the context "
                         f"max_position_embeddings {m.text.max_position_embeddings}")
    if attention_mask is None:
        return
    if tuple(attention_mask.shape) != shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {shape}, "
                         f"got {tuple(attention_mask.shape)}")
    mask = attention_mask != 0
    if not mask[:, 0].all():
        raise ValueError("attention_mask has a row without real tokens or a left-padded row: "
                         "texts must be right-padded (real tokens first, each ending with eos)")
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("attention_mask is not right-padded: after a 0 (padding) a row has a 1 "
                         "again; texts must be real tokens first, then padding")

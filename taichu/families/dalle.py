"""The light text-to-image model's DALL-E (design.md §2.4; issue 17 part 2): config schema,
canonical tensors, the loss weighting and the input checks both backends share.

One decoder-only Transformer over ``[text tokens ; image tokens]``:

  text      ``text_length`` tokens of the project's SentencePiece tokenizer: ``[bos] +
            caption + [eos]``, right-padded with the pad token (taichu.imagetext.caption_ids)
            -> ``embed_text`` (vocab_size) + ``embed_text_positions`` (learned, one per slot)
  image     ``image_grid`` x ``image_grid`` codes of the image tokenizer (a ``vqvae`` model),
            row by row -> ``embed_image`` (codebook_size) + ``embed_image_rows[r]`` +
            ``embed_image_cols[c]`` (DALL-E's row and column embeddings)
  layers    the GPT's pre-LN blocks (torch_impl/gpt.py ``Block``, imported, not copied) under
            dense causal attention over the whole sequence, then ``ln_f``
  heads     ``text_head`` [vocab_size, hidden] on the positions whose next token is text
            (0 .. text_length - 2) and ``image_head`` [codebook_size, hidden] on those whose
            next token is an image code (text_length - 1 and after). Two bias-free Linear
            layers: the same numbers as DALL-E's one projection over the joint vocabulary
            with the other modality's logits masked out (lucidrains' logits_mask); not tied
            to the embeddings.

Loss: the weighted mean (text_loss_weight * L_text + image_loss_weight * L_image) /
(text_loss_weight + image_loss_weight) of the two next-token cross-entropies, each the mean
over its own targets; text targets equal to the pad id are ignored (never predicted), the
eos is predicted. DALL-E weighted them 1/8 and 7/8. The pads are ordinary inputs (every
position attends to them): the text always fills ``text_length`` slots, so a batch of
prompts of any lengths shares one cache length and the image always starts at the same
position (DALL-E learned a pad per slot; here the one pad token plus the slot's position).

The KV cache is the GPT's (past_key_values, per layer (key, value) [B, heads, past, head
dim]): a prefill of the text gives the first image code's logits and the cache, then each
decoded image code is one step (``forward(None, codes, past_key_values)``).

Canonical names (torch state_dict order): ``embed_text``, ``embed_text_positions``,
``embed_image``, ``embed_image_rows``, ``embed_image_cols``, ``layers.i.*`` (the GPT's),
``ln_f``, ``text_head``, ``image_head``.

``model.attention``: ``dense`` only. The released DALL-E's sparse patterns (``row``,
``column``, ``convolutional``) are named so a config asking for them is refused clearly
rather than trained densely by mistake.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, StrictBool, StrictInt, model_validator

from taichu.config import DistillConfig, Section, TokenizerConfig, TrainConfig, TransformerSize
from taichu.families import DistillStream, Family, TensorSpec, layer_norm_specs, linear_specs
from taichu.families.clip import ImageTextDataConfig
from taichu.families.gpt import block_specs
from taichu.parallel import ParallelConfig

class DalleModelConfig(TransformerSize):
    """The fields the GPT's blocks read (hidden_size, num_heads, activation, layer_norm_eps,
    dropout, attention_dropout, bias) carry the GPT's names and meanings."""

    vocab_size: StrictInt = Field(gt=0)          # the text vocabulary (the tokenizer's)
    text_length: StrictInt = Field(ge=3)         # bos, at least one token, eos
    codebook_size: StrictInt = Field(gt=1)       # the image vocabulary (the vqvae's codebook)
    image_grid: StrictInt = Field(gt=0)          # codes per side: image_grid ** 2 image tokens
    activation: Literal["gelu", "gelu_new", "relu"]
    layer_norm_eps: float = Field(gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    attention_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: StrictBool = True
    initializer_range: float = Field(0.02, gt=0.0)
    attention: Literal["dense", "row", "column", "convolutional"] = "dense"
    text_loss_weight: float = Field(0.125, ge=0.0)
    image_loss_weight: float = Field(0.875, ge=0.0)

    @property
    def image_tokens(self) -> int:
        return self.image_grid ** 2

    @property
    def max_length(self) -> int:
        """The longest sequence the model runs: the text and every image code but the last
        (which is only ever a target)."""
        return self.text_length + self.image_tokens - 1

    @model_validator(mode="after")
    def _consistent(self) -> "DalleModelConfig":
        if self.attention != "dense":
            raise ValueError(f"attention {self.attention!r}: DALL-E's sparse attention patterns are not "
                             "implemented; use 'dense' (the default)")
        if self.text_loss_weight + self.image_loss_weight <= 0.0:
            raise ValueError("text_loss_weight and image_loss_weight are both 0: nothing would be trained")
        return self


class DalleDataConfig(ImageTextDataConfig):
    """Image-caption pairs as the image-text families read them (taichu.imagetext), the
    images encoded to codes once by the image tokenizer and cached (taichu.dalle_data)."""

    source: str | list[str] = "scenes"
    # A ``vqvae`` model directory: its codebook size and grid must equal the model's.
    image_tokenizer: str | None = None
    # The backend that encodes the images (null: the training run's). The codes are cached
    # by the tokenizer's files and the pairs, not by backend: the first run's codes serve both.
    image_tokenizer_backend: Literal["mindspore", "torch"] | None = None


class DalleConfig(Section):
    family: Literal["dalle"]
    model: DalleModelConfig
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DalleDataConfig = DalleDataConfig()
    train: TrainConfig = TrainConfig()
    # Data parallel only (msrun / torchrun workers).
    parallel: ParallelConfig = ParallelConfig()
    # How `taichu distill` trains this model as a student (None: defaults).
    distill: DistillConfig | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "DalleConfig":
        self.tokenizer.check_vocab(self.model.vocab_size, "model.vocab_size")
        return self


# ----------------------------------------------------------------------------- tensors

def tensor_specs(config: DalleConfig) -> dict[str, TensorSpec]:
    m = config.model
    hidden = m.hidden_size
    specs = {
        "embed_text.weight": TensorSpec((m.vocab_size, hidden), "embedding"),
        "embed_text_positions.weight": TensorSpec((m.text_length, hidden), "embedding"),
        "embed_image.weight": TensorSpec((m.codebook_size, hidden), "embedding"),
        "embed_image_rows.weight": TensorSpec((m.image_grid, hidden), "embedding"),
        "embed_image_cols.weight": TensorSpec((m.image_grid, hidden), "embedding"),
    }
    specs.update(block_specs(m))   # the GPT's blocks
    specs.update(layer_norm_specs("ln_f", hidden))
    specs.update(linear_specs("text_head", hidden, m.vocab_size, bias=False))
    specs.update(linear_specs("image_head", hidden, m.codebook_size, bias=False))
    return specs


def describe(config: DalleConfig) -> dict:
    m = config.model
    counts: dict[str, int] = {}
    for name, spec in tensor_specs(config).items():
        part = ("text" if name.startswith(("embed_text", "text_head")) else
                "image" if name.startswith(("embed_image", "image_head")) else "transformer")
        counts[part] = counts.get(part, 0) + int(np.prod(spec.shape, dtype=np.int64))
    weights = loss_weights(config)
    return {
        "transformer": (f"{m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads, ffn "
                        f"{m.ffn_size}, {m.activation}, {m.attention} causal attention "
                        f"({counts['transformer']:,} parameters)"),
        "text": (f"{m.text_length} tokens, vocabulary {m.vocab_size} (embedding, positions, head: "
                 f"{counts['text']:,} parameters)"),
        "image": (f"{m.image_grid}x{m.image_grid} = {m.image_tokens} codes, codebook {m.codebook_size} "
                  f"(embedding, rows, columns, head: {counts['image']:,} parameters)"),
        "sequence": m.text_length + m.image_tokens,
        "loss": f"{weights[0]:.4g} text + {weights[1]:.4g} image",
        "image_tokenizer": config.data.image_tokenizer or "none (data.image_tokenizer)",
    }


def distill_streams(config: DalleConfig) -> tuple[DistillStream, ...]:
    """The decoder's stack over [text ; image codes], as the backends' ``distill_outputs``
    give it."""
    m = config.model
    return (DistillStream("decoder", m.hidden_size, m.num_layers, m.num_heads, causal=True),)


FAMILY = Family(name="dalle", module="dalle", class_name="DALLE", config_class=DalleConfig,
                tensor_specs=tensor_specs, describe=describe, task="text_to_image",
                distill_streams=distill_streams,
                distill_shared_keys=("model.vocab_size", "model.text_length", "model.codebook_size",
                                     "model.image_grid"))


# ----------------------------------------------------------------------------- shared

def loss_weights(config: DalleConfig) -> tuple[float, float]:
    """(text, image) weights of the loss, normalised to sum to 1 (a weighted mean)."""
    m = config.model
    total = m.text_loss_weight + m.image_loss_weight
    return m.text_loss_weight / total, m.image_loss_weight / total


def check_inputs(config: DalleConfig, text_shape: tuple[int, ...] | None, text_range: tuple[int, int] | None,
                 image_shape: tuple[int, ...] | None, image_range: tuple[int, int] | None,
                 past_length: int = 0) -> None:
    """The checks both backends run before a forward pass, with one wording (outside the
    compiled graph: an id out of range would read past an embedding table).

    Without a past: the whole text [B, text_length] and optionally the first n image codes
    [B, n]. With a past (the cache of the text and of j image codes): image codes only,
    the next ones [B, m], j + m <= image_grid ** 2."""
    m = config.model
    if text_shape is None and image_shape is None:
        raise ValueError("give input_ids (the text) and/or image_codes")
    if past_length == 0 and text_shape is None:
        raise ValueError("input_ids (the text) is needed without a past: the image follows the text")
    if past_length and text_shape is not None:
        raise ValueError(f"input_ids with a past of {past_length}: the text goes in whole in the first "
                         "pass (prefill); later passes take image codes only")
    if past_length and past_length < m.text_length:
        raise ValueError(f"a past of {past_length} is shorter than the text ({m.text_length} tokens)")
    batch = None
    if text_shape is not None:
        if len(text_shape) != 2 or text_shape[1] != m.text_length:
            raise ValueError(f"input_ids must be [batch, text_length = {m.text_length}] (captions padded "
                             f"to the text length), got shape {tuple(text_shape)}")
        batch = text_shape[0]
        low, high = text_range
        if low < 0 or high >= m.vocab_size:
            raise ValueError(f"token id {low if low < 0 else high} is out of range for vocab_size "
                             f"{m.vocab_size} (valid ids: 0..{m.vocab_size - 1})")
    if image_shape is not None:
        if len(image_shape) != 2:
            raise ValueError(f"image_codes must be [batch, codes] (row-major), got shape {tuple(image_shape)}")
        if batch is not None and image_shape[0] != batch:
            raise ValueError(f"image_codes has batch {image_shape[0]}, input_ids {batch}")
        start = past_length - m.text_length if past_length else 0
        if start + image_shape[1] > m.image_tokens:
            raise ValueError(f"image codes {start}..{start + image_shape[1] - 1} exceed the "
                             f"{m.image_grid}x{m.image_grid} grid ({m.image_tokens} codes)")
        if image_shape[1]:
            low, high = image_range
            if low < 0 or high >= m.codebook_size:
                raise ValueError(f"image code {low if low < 0 else high} is out of range for codebook_size "
                                 f"{m.codebook_size} (valid codes: 0..{m.codebook_size - 1})")

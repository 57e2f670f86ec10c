"""M6 / WenHui (design.md §2.7; issue 20): one Transformer over image patch features and
text, whose task is chosen by the attention mask. Config schema, canonical tensors, the
segments and the checks both backends share.

The sequence of one example, in this order:

  patches   ``num_patches`` = (image_size / patch_size)^2 image patches, each through a
            small ResNet (the image tokenizer's residual blocks and 2x2 downsampling,
            torch_impl/vqvae.py, imported: M6 runs a ResNet-50 on each patch), mean-pooled,
            a Linear to the width -> + ``embed_patch_positions`` (learned, one per patch)
  text      ``text_length`` slots of the project's SentencePiece tokenizer: ``[bos] + prompt +
            target + [eos]``, right-padded; -> ``embed_text`` (tied to the LM head) +
            ``embed_text_positions`` indexed by the count of real text tokens before each
            one (a left-padded prompt gets the same positions as an unpadded one)
  codes     (only with ``codebook_size``) ``image_grid``^2 slots of image codes from the
            image tokenizer (a ``vqvae`` model): slot j holds code j - 1 (slot 0 the start
            code, id ``codebook_size``) and predicts code j -> ``embed_codes`` (codebook_size
            + 1 rows) + ``embed_code_positions`` (one per slot)

and every position adds ``embed_segments[segment]``. The segment of each position says what
it is and so what it may see (``segment_ids``, [B, sequence]):

  PAD 0     nothing: never attended to (an absent image's patches, text padding, the codes
            of a row that has none)
  IMAGE 1   an image patch (prefix)
  PREFIX 2  a text token of the prompt (prefix)
  TARGET 3  a text token to generate
  CODE 4    an image code slot to generate

Prefix-LM rule (M6): query q may attend key k iff k is not PAD and (k is a prefix position
(IMAGE, PREFIX), or q is a target (TARGET, CODE) and k is a target at or before q). Every
prefix position sees the whole prefix, both ways; a target sees the whole prefix and the
targets before it. Which task a row trains is only which segments it has:

  captioning                    IMAGE + PREFIX [bos] + TARGET caption [eos]
  image-conditioned generation  IMAGE + PREFIX [bos] caption start + TARGET the rest [eos]
  visual question answering     IMAGE + PREFIX [bos] question + TARGET answer [eos]
  text continuation / denoising PREFIX [bos] text (start / with a gap) + TARGET [eos] ...
  text to image                 PREFIX [bos] caption [eos] + CODE slots

Heads: the LM head (``embed_text`` transposed, no tensor of its own) at text positions, the
logits at slot t predicting the token of slot t + 1 where that one is a TARGET; the code head
``code_head`` [codebook_size, hidden] at code slots. Loss = text_loss_weight * (mean
cross-entropy over the batch's TARGET tokens) + code_loss_weight * (mean over its CODE
slots); a term with no targets in the batch is 0.

Decoding with a KV cache: a prefill of the patches and the prompt (segments IMAGE, PREFIX and
PAD for left padding) gives the cache and the first token's logits; each new token is one
step as a TARGET (it sees every cached key that is not padding, and the cache never holds a
later target). Text to image: the prefill is the caption and the start code, each code one
step as a CODE.

Canonical names (torch state_dict order): ``patch_encoder.*`` (conv_in, blocks.L.j.{conv1,
conv2}, downsamples.L.proj, proj), ``embed_patch_positions``, ``embed_text``,
``embed_text_positions``, [``embed_codes``, ``embed_code_positions``], ``embed_segments``,
``layers.i.*`` (the GPT's pre-LN blocks, torch_impl/gpt.py ``Block``), ``ln_f``,
[``code_head``].
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, StrictBool, StrictInt, model_validator

from taichu.config import Section, TokenizerConfig, TrainConfig, TransformerSize
from taichu.families import Family, TensorSpec, layer_norm_specs, linear_specs
from taichu.families.gpt import block_specs
from taichu.families.vqvae import _conv_specs
from taichu.parallel import ParallelConfig

PAD, IMAGE, PREFIX, TARGET, CODE = 0, 1, 2, 3, 4
SEGMENTS = ("pad", "image", "prefix", "target", "code")
TASKS = ("caption", "image_text", "vqa", "text_continuation", "text_denoising", "text_to_image")
IMAGE_TASKS = ("caption", "image_text", "vqa")
TEXT_TASKS = ("text_continuation", "text_denoising")


class M6ModelConfig(TransformerSize):
    """The fields the GPT's blocks read (hidden_size, num_heads, activation, layer_norm_eps,
    dropout, attention_dropout, bias) carry the GPT's names and meanings."""

    vocab_size: StrictInt = Field(gt=0)
    text_length: StrictInt = Field(ge=3)        # text slots: bos, prompt, target, eos, padding
    image_size: StrictInt = Field(gt=0)
    num_channels: StrictInt = Field(3, gt=0)
    patch_size: StrictInt = Field(gt=0)
    # Widths of the patch ResNet's levels, a 2x2 stride-2 downsampling between two levels.
    patch_channels: list[StrictInt] = Field(min_length=1)
    num_res_blocks: StrictInt = Field(1, ge=0)
    conv_activation: Literal["relu", "gelu"] = "relu"
    # The image tokenizer's codebook and grid (text to image); null: no code slots or head.
    codebook_size: StrictInt | None = Field(None, gt=1)
    image_grid: StrictInt | None = Field(None, gt=0)
    activation: Literal["gelu", "gelu_new", "relu"]
    layer_norm_eps: float = Field(gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    attention_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: StrictBool = True
    initializer_range: float = Field(0.02, gt=0.0)
    text_loss_weight: float = Field(1.0, ge=0.0)
    code_loss_weight: float = Field(1.0, ge=0.0)

    @property
    def patch_grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patch_grid ** 2

    @property
    def num_codes(self) -> int:
        return self.image_grid ** 2 if self.codebook_size else 0

    @property
    def sequence_length(self) -> int:
        return self.num_patches + self.text_length + self.num_codes

    @model_validator(mode="after")
    def _consistent(self) -> "M6ModelConfig":
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        levels = len(self.patch_channels)
        if self.patch_size % (2 ** (levels - 1)):
            raise ValueError(f"patch_size {self.patch_size} cannot be halved {levels - 1} times "
                             f"(one 2x2 downsampling between each of the {levels} patch_channels)")
        if (self.codebook_size is None) != (self.image_grid is None):
            raise ValueError("codebook_size and image_grid go together (text to image), or neither")
        return self


class M6DataConfig(Section):
    """The task mix (taichu.m6_data): each training example is drawn from a task with
    probability proportional to its weight; a weight of 0 leaves the task out."""

    # Task -> weight. Keys from taichu.families.m6.TASKS.
    tasks: dict[str, float] = {"caption": 1.0, "vqa": 1.0, "image_text": 0.5, "text_continuation": 0.5}
    # Images with captions: ``scenes``, ``digits`` or a jsonl of {"image", "text"}.
    source: str | list[str] = "scenes"
    scene_count: StrictInt = Field(2000, gt=0)
    scene_seed: StrictInt = 0
    # A jsonl of {"image", "prompt", "target"} (the user's own examples; task "vqa").
    examples: str | None = None
    validation_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    split_seed: StrictInt = 0
    # Question templates that training never sees (taichu.m6_data.QUESTION_TEMPLATES ids).
    held_out_templates: list[str] = ["colour_of_position_2", "count_2"]
    # Text continuation / denoising: People's Daily sentences of at least this many characters.
    corpus: str | list[str] = "peoples_daily"
    min_text_chars: StrictInt = Field(12, gt=1)
    text_examples: StrictInt = Field(20000, gt=0)
    # Examples drawn per epoch of the mix.
    examples_per_epoch: StrictInt = Field(20000, gt=0)
    tokenizer_corpus: str | list[str] = "peoples_daily"
    # A ``vqvae`` model directory for text_to_image (codebook and grid as the model's).
    image_tokenizer: str | None = None
    image_tokenizer_backend: Literal["mindspore", "torch"] | None = None
    cache_dir: str | None = None

    @model_validator(mode="after")
    def _known_tasks(self) -> "M6DataConfig":
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise ValueError(f"data.tasks: unknown task(s) {unknown} (known: {', '.join(TASKS)})")
        if any(w < 0 for w in self.tasks.values()) or not any(w > 0 for w in self.tasks.values()):
            raise ValueError(f"data.tasks: weights must be >= 0 and at least one > 0, got {self.tasks}")
        return self


class M6Config(Section):
    family: Literal["m6"]
    model: M6ModelConfig
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: M6DataConfig = M6DataConfig()
    train: TrainConfig = TrainConfig()
    # Data parallel only (msrun / torchrun workers).
    parallel: ParallelConfig = ParallelConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "M6Config":
        self.tokenizer.check_vocab(self.model.vocab_size, "model.vocab_size")
        if self.data.tasks.get("text_to_image", 0) > 0:
            if not self.model.codebook_size:
                raise ValueError("data.tasks.text_to_image needs model.codebook_size and model.image_grid "
                                 "(the image tokenizer's)")
            if not self.data.image_tokenizer:
                raise ValueError("data.tasks.text_to_image needs data.image_tokenizer (a vqvae model directory)")
        return self


# ----------------------------------------------------------------------------- tensors

def tensor_specs(config: M6Config) -> dict[str, TensorSpec]:
    m = config.model
    hidden, widths = m.hidden_size, m.patch_channels
    specs = _conv_specs("patch_encoder.conv_in", m.num_channels, widths[0], 3)
    for level, width in enumerate(widths):
        for j in range(m.num_res_blocks):
            specs.update(_conv_specs(f"patch_encoder.blocks.{level}.{j}.conv1", width, width, 3))
            specs.update(_conv_specs(f"patch_encoder.blocks.{level}.{j}.conv2", width, width, 1))
    for i in range(len(widths) - 1):
        specs.update(linear_specs(f"patch_encoder.downsamples.{i}.proj", 4 * widths[i], widths[i + 1]))
    specs.update(linear_specs("patch_encoder.proj", widths[-1], hidden))
    specs["embed_patch_positions.weight"] = TensorSpec((m.num_patches, hidden), "embedding")
    specs["embed_text.weight"] = TensorSpec((m.vocab_size, hidden), "embedding")
    specs["embed_text_positions.weight"] = TensorSpec((m.text_length, hidden), "embedding")
    if m.codebook_size:
        specs["embed_codes.weight"] = TensorSpec((m.codebook_size + 1, hidden), "embedding")
        specs["embed_code_positions.weight"] = TensorSpec((m.num_codes, hidden), "embedding")
    specs["embed_segments.weight"] = TensorSpec((len(SEGMENTS), hidden), "embedding")
    specs.update(block_specs(m))   # the GPT's blocks
    specs.update(layer_norm_specs("ln_f", hidden))
    if m.codebook_size:
        specs.update(linear_specs("code_head", hidden, m.codebook_size, bias=False))
    return specs


def describe(config: M6Config) -> dict:
    m = config.model
    counts: dict[str, int] = {}
    for name, spec in tensor_specs(config).items():
        part = ("image" if name.startswith(("patch_encoder", "embed_patch")) else
                "codes" if name.startswith(("embed_code", "code_head")) else
                "text" if name.startswith("embed_text") else "transformer")
        counts[part] = counts.get(part, 0) + int(np.prod(spec.shape, dtype=np.int64))
    out = {
        "transformer": (f"{m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads, ffn "
                        f"{m.ffn_size}, {m.activation}, prefix-LM attention ({counts['transformer']:,} parameters)"),
        "image": (f"{m.image_size} px -> {m.patch_grid}x{m.patch_grid} patches of {m.patch_size} px, ResNet "
                  f"widths {m.patch_channels} ({counts['image']:,} parameters)"),
        "text": f"{m.text_length} slots, vocabulary {m.vocab_size}, LM head tied ({counts['text']:,} parameters)",
        "sequence": m.sequence_length,
        "tasks": ", ".join(f"{t} {w:g}" for t, w in config.data.tasks.items() if w > 0),
    }
    if m.codebook_size:
        out["codes"] = (f"{m.image_grid}x{m.image_grid} codes of {m.codebook_size} "
                        f"({counts['codes']:,} parameters); image tokenizer "
                        f"{config.data.image_tokenizer or 'none (data.image_tokenizer)'}")
    return out


FAMILY = Family(name="m6", module="m6", class_name="M6", config_class=M6Config,
                tensor_specs=tensor_specs, describe=describe, task="m6")


# ----------------------------------------------------------------------------- shared

def loss_weights(config: M6Config) -> tuple[float, float]:
    """(text, code) weights of the loss as configured (a term without targets adds 0)."""
    return config.model.text_loss_weight, config.model.code_loss_weight


def check_inputs(config: M6Config, pixel_shape, input_shape, input_range, segment_shape, segment_range,
                 code_shape=None, code_range=None, past_length: int = 0) -> None:
    """The checks both backends run before a forward pass, with one wording (outside the
    compiled graph: an id out of range would read past an embedding table).

    Without a past: pixel_values [B, C, S, S] or None, input_ids [B, L] (L <= text_length)
    or None, image_codes [B, n] (n <= image_grid^2) or None, and segment_ids [B, patches +
    L + n] covering exactly those positions in that order. With a past of P positions:
    input_ids [B, 1] or image_codes [B, 1] and segment_ids [B, P + 1] (the cache's segments
    and the new one's)."""
    m = config.model
    if input_shape is None and code_shape is None and pixel_shape is None:
        raise ValueError("give pixel_values, input_ids and/or image_codes")
    batch = None
    for name, shape in (("pixel_values", pixel_shape), ("input_ids", input_shape), ("image_codes", code_shape)):
        if shape is None:
            continue
        if batch is not None and shape[0] != batch:
            raise ValueError(f"{name} has batch {shape[0]}, the other inputs {batch}")
        batch = shape[0]
    length = 0
    if pixel_shape is not None:
        expected = (m.num_channels, m.image_size, m.image_size)
        if len(pixel_shape) != 4 or tuple(pixel_shape[1:]) != expected:
            raise ValueError(f"pixel_values must be [batch, {m.num_channels}, {m.image_size}, {m.image_size}] "
                             f"(images resized to model.image_size), got shape {tuple(pixel_shape)}")
        if past_length:
            raise ValueError("pixel_values with a past: the image goes in with the prompt (prefill)")
        length += m.num_patches
    if input_shape is not None:
        if len(input_shape) != 2 or input_shape[1] > m.text_length:
            raise ValueError(f"input_ids must be [batch, length <= text_length = {m.text_length}], got shape "
                             f"{tuple(input_shape)}")
        low, high = input_range or (0, 0)   # no range: no ids ([B, 0])
        if low < 0 or high >= m.vocab_size:
            raise ValueError(f"token id {low if low < 0 else high} is out of range for vocab_size "
                             f"{m.vocab_size} (valid ids: 0..{m.vocab_size - 1})")
        length += input_shape[1]
    if code_shape is not None:
        if not m.codebook_size:
            raise ValueError("image_codes given to a model without a codebook (model.codebook_size is null)")
        if len(code_shape) != 2 or code_shape[1] > m.num_codes:
            raise ValueError(f"image_codes must be [batch, n <= {m.num_codes}], got shape {tuple(code_shape)}")
        if code_shape[1]:
            low, high = code_range
            if low < 0 or high > m.codebook_size:
                raise ValueError(f"image code {low if low < 0 else high} is out of range (valid: 0.."
                                 f"{m.codebook_size - 1}, and {m.codebook_size} the start code)")
        length += code_shape[1]
    if past_length and length != 1:
        raise ValueError(f"with a past, one new position per step (input_ids [B, 1] or image_codes [B, 1]), "
                         f"got {length}")
    if segment_shape is None or tuple(segment_shape) != (batch, past_length + length):
        raise ValueError(f"segment_ids must be [batch, past + positions] = [{batch}, {past_length + length}], "
                         f"got {None if segment_shape is None else tuple(segment_shape)}")
    low, high = segment_range
    if low < 0 or high >= len(SEGMENTS):
        raise ValueError(f"segment id {low if low < 0 else high} is out of range (0..{len(SEGMENTS) - 1}: "
                         f"{', '.join(SEGMENTS)})")

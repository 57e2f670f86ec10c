"""The Chinese GPT (design.md §2.1): config schema and canonical tensor names/shapes.

Canonical names are the state_dict names of ``torch_impl.gpt.GPT``; the output
projection is tied to ``embed_tokens.weight`` and has no tensor of its own.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictBool, StrictInt, model_validator

from taichu.config import DataConfig, DistillConfig, Section, TokenizerConfig, TrainConfig, TransformerSize
from taichu.parallel import ParallelConfig
from taichu.families import DistillStream, Family, TensorSpec, layer_norm_specs, linear_specs

ACTIVATIONS = ("gelu", "gelu_new", "relu")


class GPTModelConfig(TransformerSize):
    vocab_size: StrictInt = Field(gt=0)
    max_position_embeddings: StrictInt = Field(gt=0)
    # Explicit on purpose: frameworks disagree on defaults (MindSpore's GELU is tanh,
    # its LayerNorm eps is 1e-7). gelu = exact erf GELU, gelu_new = tanh approximation.
    activation: Literal["gelu", "gelu_new", "relu"]
    layer_norm_eps: float = Field(gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    attention_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: StrictBool = True
    initializer_range: float = Field(0.02, gt=0.0)


class GPTConfig(Section):
    family: Literal["gpt"]
    model: GPTModelConfig
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    parallel: ParallelConfig = ParallelConfig()
    # How `taichu distill` trains this model as a student (None: defaults).
    distill: DistillConfig | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "GPTConfig":
        self.tokenizer.check_vocab(self.model.vocab_size, "model.vocab_size")
        if self.data.seq_len > self.model.max_position_embeddings:
            raise ValueError(f"data.seq_len {self.data.seq_len} exceeds "
                             f"model.max_position_embeddings {self.model.max_position_embeddings}")
        return self


def tensor_specs(config: GPTConfig) -> dict[str, TensorSpec]:
    m = config.model
    hidden = m.hidden_size
    specs = {
        "embed_tokens.weight": TensorSpec((m.vocab_size, hidden), "embedding"),
        "embed_positions.weight": TensorSpec((m.max_position_embeddings, hidden), "embedding"),
    }
    specs.update(block_specs(m))
    specs.update(layer_norm_specs("ln_f", hidden))
    return specs


def block_specs(m) -> dict[str, TensorSpec]:
    """The tensors of ``m.num_layers`` GPT blocks (torch_impl/gpt.py ``Block``) under
    ``layers.i``, for a model section with the GPT's fields (hidden_size, ffn_size, bias):
    also the decoders built of them (dalle, m6)."""
    hidden, ffn = m.hidden_size, m.ffn_size
    specs: dict[str, TensorSpec] = {}
    for i in range(m.num_layers):
        p = f"layers.{i}"
        specs.update(layer_norm_specs(f"{p}.ln_1", hidden))
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs.update(linear_specs(f"{p}.attn.{proj}", hidden, hidden, m.bias))
        specs.update(layer_norm_specs(f"{p}.ln_2", hidden))
        specs.update(linear_specs(f"{p}.mlp.fc_in", hidden, ffn, m.bias))
        specs.update(linear_specs(f"{p}.mlp.fc_out", ffn, hidden, m.bias))
    return specs


def describe(config: GPTConfig) -> dict:
    m = config.model
    return {
        "layers": m.num_layers, "hidden": m.hidden_size, "heads": m.num_heads,
        "head_dim": m.head_dim, "ffn": m.ffn_size, "vocab": m.vocab_size,
        "context": m.max_position_embeddings, "activation": m.activation,
    }


def distill_streams(config: GPTConfig) -> tuple[DistillStream, ...]:
    """The decoder's stack, as the backends' ``distill_outputs`` give it."""
    m = config.model
    return (DistillStream("decoder", m.hidden_size, m.num_layers, m.num_heads, causal=True),)


FAMILY = Family(name="gpt", module="gpt", class_name="GPT", config_class=GPTConfig,
                tensor_specs=tensor_specs, describe=describe, distill_streams=distill_streams,
                distill_shared_keys=("model.vocab_size",))


def check_inputs(config: GPTConfig, shape: tuple[int, ...], min_id: int, max_id: int,
                 past_length: int = 0, mask_shape: tuple[int, ...] | None = None) -> None:
    """The checks both backends run before a forward pass, with one wording.

    Done outside the compiled graph: an out-of-range id would otherwise read past the
    embedding table (silently on some devices) and a long sequence past the positions.
    """
    m = config.model
    check_token_ids(m.vocab_size, shape, min_id, max_id)
    total = past_length + shape[1]
    if total > m.max_position_embeddings:
        raise ValueError(f"sequence length {total} (past {past_length} + new {shape[1]}) exceeds "
                         f"max_position_embeddings {m.max_position_embeddings}")
    if mask_shape is not None and tuple(mask_shape) != (shape[0], total):
        raise ValueError(f"attention_mask must be [batch, past + sequence] = {(shape[0], total)}, "
                         f"got {tuple(mask_shape)}")


def check_token_ids(vocab_size: int, shape: tuple[int, ...], min_id: int, max_id: int) -> None:
    """input_ids is [batch, sequence > 0] of ids in 0..vocab_size - 1 (GPT, GPT-XL)."""
    if len(shape) != 2:
        raise ValueError(f"input_ids must be [batch, sequence], got shape {tuple(shape)}")
    if shape[1] == 0:
        raise ValueError("input_ids has an empty sequence axis")
    if min_id < 0 or max_id >= vocab_size:
        bad = min_id if min_id < 0 else max_id
        raise ValueError(f"token id {bad} is out of range for vocab_size {vocab_size} "
                         f"(valid ids: 0..{vocab_size - 1})")

"""GPT-XL, WenHui's text model (design.md §2.1): the Chinese GPT with Transformer-XL's
segment-level recurrence and relative positional attention (Dai et al. 2019, §3.2-3.3).

Config schema, canonical tensor names and the input checks both backends run.

- Each layer attends over its input hidden states of the previous segments (the
  *memory*, ``model.mem_len`` positions, no gradient through it) and the current segment.
- Positions are relative: the score of query i and key j is
  (q_i + u)^T k_j + (q_i + v)^T W_r R_{i-j}, with R the sinusoid of the distance i - j
  and u, v learned per layer and head (untied across layers, as Hugging Face's TransfoXL
  defaults). No position table: the model has no window of its own.
- Which keys a query sees is said by *document ids*: a key is visible if it is not after
  the query and has the query's document id. Padding and empty memory slots are -1, so
  they are never seen; data with ``data.reset_memory: document`` gives each document its
  own id, so the memory of one document is invisible to the next.
- The blocks are the GPT's pre-LN blocks with this attention; the MLP, the LayerNorms, the
  tied output projection and the tokenizer are the GPT's.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictBool, StrictInt, model_validator

from taichu.config import DataConfig, Section, TokenizerConfig, TrainConfig, TransformerSize
from taichu.families import Family, TensorSpec, layer_norm_specs, linear_specs
from taichu.families.gpt import check_token_ids
from taichu.parallel import ParallelConfig

# The document id of padding and of memory slots not written yet: seen by no query.
NO_DOCUMENT = -1


class GPTXLModelConfig(TransformerSize):
    vocab_size: StrictInt = Field(gt=0)
    # Hidden states of the previous segments each layer attends over; 0: segments are
    # independent (a GPT with relative positions).
    mem_len: StrictInt = Field(ge=0)
    activation: Literal["gelu", "gelu_new", "relu"]   # as the GPT's (taichu.families.gpt)
    layer_norm_eps: float = Field(gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    attention_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: StrictBool = True
    initializer_range: float = Field(0.02, gt=0.0)


class GPTXLDataConfig(DataConfig):
    # seq_len is the segment length. "never": each batch row reads the corpus as one stream
    # (Transformer-XL's own training); "document": the memory of one document is invisible
    # to the next (a document is a corpus item: a People's Daily paragraph, a line of a .txt,
    # a record of a .jsonl).
    reset_memory: Literal["never", "document"] = "never"


class GPTXLConfig(Section):
    family: Literal["gpt_xl"]
    model: GPTXLModelConfig
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: GPTXLDataConfig = GPTXLDataConfig()
    train: TrainConfig = TrainConfig()
    parallel: ParallelConfig = ParallelConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "GPTXLConfig":
        self.tokenizer.check_vocab(self.model.vocab_size, "model.vocab_size")
        if self.model.hidden_size % 2:
            raise ValueError(f"model.hidden_size {self.model.hidden_size} must be even: the relative "
                             "encodings are hidden_size / 2 sines and as many cosines")
        return self


def tensor_specs(config: GPTXLConfig) -> dict[str, TensorSpec]:
    m = config.model
    hidden = m.hidden_size
    specs = {"embed_tokens.weight": TensorSpec((m.vocab_size, hidden), "embedding")}
    for i in range(m.num_layers):
        p = f"layers.{i}"
        specs.update(layer_norm_specs(f"{p}.ln_1", hidden))
        # In torch's state_dict order: the attention's own tensors before its layers'.
        specs[f"{p}.attn.content_bias"] = TensorSpec((m.num_heads, m.head_dim), "parameter")   # u
        specs[f"{p}.attn.position_bias"] = TensorSpec((m.num_heads, m.head_dim), "parameter")  # v
        for proj in ("q_proj", "k_proj", "v_proj"):
            specs.update(linear_specs(f"{p}.attn.{proj}", hidden, hidden, m.bias))
        # W_{k,R} of the paper: the relative encodings' keys, no bias.
        specs.update(linear_specs(f"{p}.attn.r_proj", hidden, hidden, bias=False))
        specs.update(linear_specs(f"{p}.attn.out_proj", hidden, hidden, m.bias))
        specs.update(layer_norm_specs(f"{p}.ln_2", hidden))
        specs.update(linear_specs(f"{p}.mlp.fc_in", hidden, m.ffn_size, m.bias))
        specs.update(linear_specs(f"{p}.mlp.fc_out", m.ffn_size, hidden, m.bias))
    specs.update(layer_norm_specs("ln_f", hidden))
    return specs


def describe(config: GPTXLConfig) -> dict:
    m = config.model
    return {"layers": m.num_layers, "hidden": m.hidden_size, "heads": m.num_heads,
            "head_dim": m.head_dim, "ffn": m.ffn_size, "vocab": m.vocab_size,
            "segment": config.data.seq_len, "memory": m.mem_len, "activation": m.activation}


FAMILY = Family(name="gpt_xl", module="gpt_xl", class_name="GPTXL", config_class=GPTXLConfig,
                tensor_specs=tensor_specs, describe=describe, task="recurrent_language_model")


def memory_names(config: GPTXLConfig) -> tuple[str, ...]:
    """The memory's arrays, in the order ``training_loss`` takes and returns them after the
    loss: the document ids of the slots, then each layer's hidden states; none at mem_len 0."""
    if config.model.mem_len == 0:
        return ()
    return ("memory_document_ids",) + tuple(f"memory.{i}" for i in range(config.model.num_layers))


def initial_memory_arrays(config: GPTXLConfig, rows: int) -> dict:
    """The memory before a stream's first segment, as numpy under ``memory_names``: every
    slot empty (zeros, document NO_DOCUMENT); {} at mem_len 0."""
    import numpy as np

    m = config.model
    names = memory_names(config)
    if not names:
        return {}
    arrays = {names[0]: np.full((rows, m.mem_len), NO_DOCUMENT, np.int64)}
    arrays.update({name: np.zeros((rows, m.mem_len, m.hidden_size), np.float32) for name in names[1:]})
    return arrays


def check_inputs(config: GPTXLConfig, shape: tuple[int, ...], min_id: int, max_id: int,
                 document_shape: tuple[int, ...] | None, memory_shapes: list[tuple[int, ...]],
                 memory_document_shape: tuple[int, ...] | None) -> None:
    """The checks both backends run before a forward pass, with one wording (outside the
    compiled graph, as the GPT's: an out-of-range id would read past the embedding table)."""
    m = config.model
    check_token_ids(m.vocab_size, shape, min_id, max_id)
    if document_shape is not None and tuple(document_shape) != tuple(shape):
        raise ValueError(f"document_ids must have input_ids' shape {tuple(shape)}, "
                         f"got {tuple(document_shape)}")
    if not memory_shapes:
        if memory_document_shape is not None:
            raise ValueError("memory_document_ids given without memories")
        return
    if len(memory_shapes) != m.num_layers:
        raise ValueError(f"memories: {len(memory_shapes)} tensors for {m.num_layers} layers")
    batch = shape[0]
    first = tuple(memory_shapes[0])
    for i, mem in enumerate(memory_shapes):
        mem = tuple(mem)
        if len(mem) != 3 or mem[2] != m.hidden_size:
            raise ValueError(f"memory {i} must be [batch, memory length, {m.hidden_size}], got {mem}")
        if mem[0] != batch:
            raise ValueError(f"memory {i} holds {mem[0]} rows, but input_ids has {batch}: memory "
                             f"belongs to the batch it was made by (start a new one with "
                             f"initial_memories)")
        if mem != first:
            raise ValueError(f"memories differ in shape: layer 0 {first}, layer {i} {mem}")
    if memory_document_shape is None or tuple(memory_document_shape) != first[:2]:
        raise ValueError(f"memory_document_ids must be [batch, memory length] = {first[:2]}, "
                         f"got {None if memory_document_shape is None else tuple(memory_document_shape)}")

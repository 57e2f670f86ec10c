"""The exported GPT decoder's signature, shared by exporters, validators and runtimes.

Inputs: ``input_ids`` [batch, sequence], ``attention_mask`` [batch, past + sequence] (1 for
real tokens, 0 for padding), ``position_ids`` [batch, sequence], and for each layer i
``past_key_values.{i}.key`` / ``.value`` [batch, heads, past, head_dim].
Outputs: ``logits`` [batch, sequence, vocab] and ``present.{i}.key`` / ``.value``
[batch, heads, past + sequence, head_dim]. The names are those of Hugging Face optimum's
decoder exports, so tools that know them can feed this graph. A past of length 0 serves the
prompt (prefill); the same graph then decodes one token at a time.

numpy only: the ONNX runtime side must work without torch or mindspore.
"""
from __future__ import annotations

import numpy as np

BATCH, SEQUENCE, PAST, TOTAL = "batch", "sequence", "past_sequence", "total_sequence"


def input_names(num_layers: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def output_names(num_layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def dynamic_axes(num_layers: int) -> dict[str, dict[int, str]]:
    axes = {"input_ids": {0: BATCH, 1: SEQUENCE}, "attention_mask": {0: BATCH, 1: TOTAL},
            "position_ids": {0: BATCH, 1: SEQUENCE}, "logits": {0: BATCH, 1: SEQUENCE}}
    for name in input_names(num_layers)[3:]:
        axes[name] = {0: BATCH, 2: PAST}
    for name in output_names(num_layers)[1:]:
        axes[name] = {0: BATCH, 2: TOTAL}
    return axes


def describe(model_config) -> dict:
    """Names, dtypes and shapes (symbolic axes as strings) for export_info.json."""
    m = model_config
    cache = [BATCH, m.num_heads, PAST, m.head_dim]
    present = [BATCH, m.num_heads, TOTAL, m.head_dim]
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": [BATCH, SEQUENCE]},
              {"name": "attention_mask", "dtype": "int64", "shape": [BATCH, TOTAL]},
              {"name": "position_ids", "dtype": "int64", "shape": [BATCH, SEQUENCE]}]
    inputs += [{"name": n, "dtype": "float32", "shape": cache} for n in input_names(m.num_layers)[3:]]
    outputs = [{"name": "logits", "dtype": "float32", "shape": [BATCH, SEQUENCE, m.vocab_size]}]
    outputs += [{"name": n, "dtype": "float32", "shape": present} for n in output_names(m.num_layers)[1:]]
    return {"inputs": inputs, "outputs": outputs}


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

"""Text generation shared by every runtime: numpy logits processing and a KV-cache loop.

A runtime only supplies ``step(input_ids, attention_mask, past) -> (last logits, past)``;
choosing the next token (temperature, top-k, top-p, repetition penalty, greedy) happens
here, in numpy, so the same seed gives the same tokens on every runtime.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 50
    temperature: float = 1.0          # 0 means greedy decoding
    top_k: int = 0                    # 0 keeps every token
    top_p: float = 1.0                # nucleus: smallest set with this much probability
    repetition_penalty: float = 1.0   # >1 discourages tokens already in the sequence (CTRL)
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError(f"need top_k >= 0, 0 < top_p <= 1, repetition_penalty > 0; got "
                             f"{self.top_k}, {self.top_p}, {self.repetition_penalty}")


def process_logits(logits: np.ndarray, sequences: list[list[int]], config: SamplingConfig) -> np.ndarray:
    """Log-probabilities [batch, vocab] after penalty, temperature, top-k and top-p."""
    logits = logits.astype(np.float64)
    if config.repetition_penalty != 1.0:
        for row, seen in enumerate(sequences):
            ids = np.unique(np.asarray(seen, np.int64))
            values = logits[row, ids]
            logits[row, ids] = np.where(values > 0, values / config.repetition_penalty,
                                        values * config.repetition_penalty)
    if config.temperature > 0:
        logits = logits / config.temperature
    if config.top_k > 0 and config.top_k < logits.shape[-1]:
        kth = np.partition(logits, -config.top_k, axis=-1)[:, -config.top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    logits = logits - logits.max(axis=-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    if config.top_p < 1.0:
        order = np.argsort(-log_probs, axis=-1, kind="stable")
        sorted_probs = np.exp(np.take_along_axis(log_probs, order, axis=-1))
        # Keep a token if the probability mass before it is still below top_p.
        keep_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs < config.top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        log_probs = np.where(keep, log_probs, -np.inf)
    return log_probs


def choose_tokens(log_probs: np.ndarray, config: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    if config.temperature == 0:
        return log_probs.argmax(axis=-1)
    probs = np.exp(log_probs - log_probs.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs])


def generate_ids(step, prompts: list[list[int]], config: SamplingConfig, eos_id: int, pad_id: int,
                 max_positions: int) -> list[list[int]]:
    """New token ids for each prompt (without the prompt), stopping at eos or the limit.

    Prompts are left-padded into one batch; the attention mask and default position ids
    make the padding invisible, so a prompt's continuation does not depend on its batch.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    if longest + config.max_new_tokens > max_positions:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens {config.max_new_tokens} exceeds "
                         f"the model's window of {max_positions} positions; shorten the prompt or "
                         f"lower --max-new-tokens")
    batch = len(prompts)
    input_ids = np.full((batch, longest), pad_id, np.int64)
    mask = np.zeros((batch, longest), np.int64)
    for row, ids in enumerate(prompts):
        input_ids[row, longest - len(ids):] = ids
        mask[row, longest - len(ids):] = 1
    rng = np.random.default_rng(config.seed)
    sequences = [list(p) for p in prompts]
    new = [[] for _ in prompts]
    finished = np.zeros(batch, bool)
    logits, past = step(input_ids, mask, None)
    for produced in range(1, config.max_new_tokens + 1):
        tokens = choose_tokens(process_logits(logits, sequences, config), config, rng)
        tokens = np.where(finished, pad_id, tokens)
        for row in np.flatnonzero(~finished):
            if tokens[row] == eos_id:
                finished[row] = True
            else:
                new[row].append(int(tokens[row]))
                sequences[row].append(int(tokens[row]))
        if finished.all() or produced == config.max_new_tokens:
            break  # no model step for logits that would never be used
        mask = np.concatenate([mask, (~finished).astype(np.int64)[:, None]], axis=1)
        logits, past = step(tokens[:, None].astype(np.int64), mask, past)
    return new


def model_step(model):
    """``step`` for a taichu GPT of either backend: last-position logits as numpy + cache."""
    from taichu.api import backend_of

    if backend_of(model) == "torch":
        import torch

        def step(input_ids, attention_mask, past):
            with torch.no_grad():
                logits, past = model(torch.from_numpy(input_ids), torch.from_numpy(attention_mask),
                                     past_key_values=past, use_cache=True)
            return logits[:, -1].float().numpy(), past
        return step

    import mindspore as ms

    def step(input_ids, attention_mask, past):
        logits, past = model(ms.Tensor(input_ids.astype(np.int32)),
                             ms.Tensor(attention_mask.astype(np.int32)), None, past, True)
        return logits[:, -1].asnumpy().astype(np.float32), past
    return step


def generate_text(model, tokenizer, prompts: list[str], config: SamplingConfig) -> list[str]:
    """Continuations of ``prompts`` (text in, text out) with a taichu model of either backend."""
    encoded = [tokenizer.encode(p, add_bos=True) for p in prompts]
    ids = generate_ids(model_step(model), encoded, config, tokenizer.eos_id, tokenizer.pad_id,
                       model.config.model.max_position_embeddings)
    return [tokenizer.decode(row) for row in ids]

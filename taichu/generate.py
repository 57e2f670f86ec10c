"""Text generation shared by every runtime: numpy logits processing and a KV-cache loop.

A runtime only supplies ``step(input_ids, attention_mask, past) -> (last logits, past)``;
choosing the next token (temperature, top-k, top-p, repetition penalty, greedy) happens
here, in numpy, so the same seed gives the same tokens on every runtime.

Two kinds of step: a cache that grows by one column per token (torch_impl, ONNX Runtime),
and ``StaticCacheStep``, a preallocated cache of fixed length written slot by slot, so that
compiled graphs (MindSpore graph mode, MINDIR) keep one shape from step to step.
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


def model_step(model, static_cache: bool | None = None):
    """``step`` for a taichu GPT of either backend: last-position logits as numpy + cache.

    static_cache: a preallocated fixed-length cache and compiled graphs (StaticCacheStep,
    the prefill and decoder graphs of ``*_impl.gpt``) instead of a cache that grows by
    concatenation. Default: static for MindSpore, whose graph mode needs fixed shapes to
    compile once (PyNative runs each small op from Python); the growing cache for PyTorch,
    whose eager mode compiles nothing (the static one is there for parity tests).
    """
    from taichu.api import backend_of

    backend = backend_of(model)
    static = backend == "mindspore" if static_cache is None else static_cache
    if static:
        return static_cache_step(model)
    # logits_to_keep=1: the prompt pass projects only its last position onto the vocabulary.
    if backend == "torch":
        import torch

        def step(input_ids, attention_mask, past):
            with torch.no_grad():
                logits, past = model(torch.from_numpy(input_ids), torch.from_numpy(attention_mask),
                                     past_key_values=past, use_cache=True, logits_to_keep=1)
            return logits[:, -1].float().numpy(), past
        return step

    import mindspore as ms

    def step(input_ids, attention_mask, past):
        logits, past = model(ms.Tensor(input_ids.astype(np.int32)),
                             ms.Tensor(attention_mask.astype(np.int32)), None, past, True, 1)
        return logits[:, -1].asnumpy().astype(np.float32), past
    return step


# ----------------------------------------------------------------------- static cache

# Prompts are left-padded to a power of two of at least PROMPT_BUCKET tokens, caches hold a
# power of two of at least MIN_CACHE positions: a graph compiles per (batch, bucket), and
# a few buckets cover every length.
PROMPT_BUCKET = 16
MIN_CACHE = 64


def bucket(length: int, smallest: int) -> int:
    """The smallest power-of-two multiple of ``smallest`` that holds ``length``."""
    size = smallest
    while size < length:
        size *= 2
    return size


@dataclass
class StaticCache:
    """What StaticCacheStep passes from step to step as ``past``."""

    tensors: list        # key and value of each layer [batch, heads, capacity, head_dim]
    offset: int          # padding columns added in front of generate_ids' attention mask
    capacity: int        # cache slots; slot offset + i holds the mask's column i


class StaticCacheStep:
    """``step`` for generate_ids over a cache of fixed length, from three runtime callables:

    - ``prefill(input_ids, attention_mask)`` -> (last-position logits [batch, vocab] numpy,
      key/value tensors of each layer [batch, heads, prompt, head_dim]);
    - ``decode(input_ids [batch, 1], attention_mask [batch, capacity], write_position,
      cache)`` -> (logits [batch, vocab] numpy, the cache with slot write_position written);
    - ``extend(cache, capacity)`` -> the cache zero-padded to ``capacity`` slots.

    The prompt is left-padded further to its bucket (the mask hides the padding, positions
    count real tokens only, so nothing changes but the shape), its keys and values start the
    cache, and each new token is written at the next slot; a full cache grows to the next
    bucket. Arrays given to the callables are int64 numpy; each runtime converts.
    """

    def __init__(self, prefill, decode, extend, vocab_size: int):
        self.prefill, self.decode, self.extend = prefill, decode, extend
        self.vocab_size = vocab_size

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: StaticCache | None):
        # Checked here: the compiled graphs cannot raise, and an out-of-range id would read
        # past the embedding table.
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.vocab_size:
            raise ValueError(f"token id {low if low < 0 else high} is out of range for vocab_size "
                             f"{self.vocab_size}")
        batch, length = input_ids.shape
        if past is None:
            width = bucket(length, PROMPT_BUCKET)
            # Id 0 under mask 0: any valid id would do, the padding is never attended to.
            ids = np.zeros((batch, width), np.int64)
            mask = np.zeros((batch, width), np.int64)
            ids[:, width - length:], mask[:, width - length:] = input_ids, attention_mask
            logits, cache = self.prefill(ids, mask)
            capacity = bucket(width + 1, MIN_CACHE)
            return logits, StaticCache(self.extend(cache, capacity), width - length, capacity)
        write = past.offset + attention_mask.shape[1] - 1
        cache, capacity = past.tensors, past.capacity
        if write >= capacity:
            capacity = bucket(write + 1, MIN_CACHE)
            cache = self.extend(cache, capacity)
        mask = np.zeros((batch, capacity), np.int64)
        mask[:, past.offset:write + 1] = attention_mask
        logits, cache = self.decode(input_ids.astype(np.int64), mask, write, cache)
        return logits, StaticCache(cache, past.offset, capacity)


def static_cache_step(model) -> StaticCacheStep:
    """StaticCacheStep over a taichu GPT's StaticCachePrefill and StaticCacheDecoder: in
    MindSpore compiled with mindspore.jit (whatever the context mode), in PyTorch eager."""
    from taichu.api import backend_of

    vocab_size = model.config.model.vocab_size
    if backend_of(model) == "mindspore":
        import mindspore as ms

        from mindspore_impl.gpt import StaticCacheDecoder, StaticCachePrefill

        model.set_train(False)
        return mindspore_graph_step(ms.jit(StaticCachePrefill(model)), ms.jit(StaticCacheDecoder(model)),
                                    vocab_size)
    import torch
    import torch.nn.functional as F

    from torch_impl.gpt import StaticCacheDecoder, StaticCachePrefill

    prefill, decode = StaticCachePrefill(model).eval(), StaticCacheDecoder(model).eval()

    def run_prefill(input_ids, attention_mask):
        with torch.no_grad():
            out = prefill(torch.from_numpy(input_ids), torch.from_numpy(attention_mask))
        return out[0].float().numpy(), list(out[1:])

    def run_decode(input_ids, attention_mask, write_position, cache):
        with torch.no_grad():
            out = decode(torch.from_numpy(input_ids), torch.from_numpy(attention_mask), write_position, *cache)
        return out[0].float().numpy(), list(out[1:])

    def extend(cache, capacity):
        return [F.pad(t, (0, 0, 0, capacity - t.shape[2])) for t in cache]
    return StaticCacheStep(run_prefill, run_decode, extend, vocab_size)


def mindspore_graph_step(prefill, decode, vocab_size: int) -> StaticCacheStep:
    """StaticCacheStep over two MindSpore callables with the signatures of
    mindspore_impl.gpt's StaticCachePrefill and StaticCacheDecoder: the jit-compiled cells,
    or the same graphs loaded from MINDIR (nn.GraphCell), which needs mindspore only.
    Ids, masks and the write position go in as int32; the cache stays in MindSpore tensors
    from step to step."""
    import mindspore as ms

    def run_prefill(input_ids, attention_mask):
        out = prefill(ms.Tensor(input_ids.astype(np.int32)), ms.Tensor(attention_mask.astype(np.int32)))
        return out[0].asnumpy().astype(np.float32), list(out[1:])

    def run_decode(input_ids, attention_mask, write_position, cache):
        # The position is a tensor, not a Python int: a constant would compile a graph per step.
        out = decode(ms.Tensor(input_ids.astype(np.int32)), ms.Tensor(attention_mask.astype(np.int32)),
                     ms.Tensor(write_position, ms.int32), *cache)
        return out[0].asnumpy().astype(np.float32), list(out[1:])

    def extend(cache, capacity):
        # Once per generation (and per growth): through numpy, no graph to compile per shape.
        return [ms.Tensor(np.pad(t.asnumpy(), ((0, 0), (0, 0), (0, capacity - t.shape[2]), (0, 0))))
                for t in cache]
    return StaticCacheStep(run_prefill, run_decode, extend, vocab_size)


def generate_text(model, tokenizer, prompts: list[str], config: SamplingConfig) -> list[str]:
    """Continuations of ``prompts`` (text in, text out) with a taichu model of either backend
    (MindSpore: the static-cache graphs, model_step's default)."""
    encoded = [tokenizer.encode(p, add_bos=True) for p in prompts]
    ids = generate_ids(model_step(model), encoded, config, tokenizer.eos_id, tokenizer.pad_id,
                       model.config.model.max_position_embeddings)
    return [tokenizer.decode(row) for row in ids]

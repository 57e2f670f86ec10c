"""Text generation shared by every runtime: numpy logits processing and a KV-cache loop.

A runtime only supplies ``step(input_ids, attention_mask, past) -> (last logits, past)``;
choosing the next token (temperature, top-k, top-p, repetition penalty, greedy) happens
here, in numpy, so the same seed gives the same tokens on every runtime.

Two kinds of step: a cache that grows by one column per token (torch_impl, ONNX Runtime),
and ``StaticCacheStep``, a preallocated cache of fixed length written slot by slot, so that
compiled graphs (MindSpore graph mode, MINDIR) keep one shape from step to step.

A GPT-XL (taichu/families/gpt_xl.py) has no window: ``RecurrentStep`` drives its recurrent
forward (segment memory of fixed length) through the same loop, so a text may be as long as
wanted at a constant cost per token (``generate_ids(..., max_positions=None)``).
"""
from __future__ import annotations

import weakref
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
    min_new_tokens: int = 0           # eos cannot be chosen before this many new tokens (as HF's)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in 0..max_new_tokens ({self.max_new_tokens}), got "
                             f"{self.min_new_tokens}")
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
                 max_positions: int | None) -> list[list[int]]:
    """New token ids for each prompt (without the prompt), stopping at eos or the limit.

    Prompts are left-padded into one batch; the attention mask and default position ids
    make the padding invisible, so a prompt's continuation does not depend on its batch.
    ``max_positions`` None: the model has no window (a GPT-XL's RecurrentStep).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    if max_positions is not None and longest + config.max_new_tokens > max_positions:
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
        log_probs = process_logits(logits, sequences, config)
        if produced <= config.min_new_tokens:
            log_probs[:, eos_id] = -np.inf
        tokens = choose_tokens(log_probs, config, rng)
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


def generate_text(model, tokenizer, prompts: list[str], config: SamplingConfig,
                  memory: int | None = None) -> list[str]:
    """Continuations of ``prompts`` (text in, text out) with a taichu model of either backend
    (MindSpore: the static-cache graphs, model_step's default). A GPT-XL generates without a
    window through ``recurrent_model_step`` with a memory of ``memory`` positions (default
    ``generation_memory``); ``memory`` is for GPT-XL models only."""
    encoded = [tokenizer.encode(p, add_bos=True) for p in prompts]
    if model.config.family == GPT_XL:
        step, window = recurrent_model_step(model, memory), None
    else:
        if memory is not None:
            raise ValueError(f"a memory length (--memory) applies to gpt_xl models, not to "
                             f"{model.config.family}, whose window is its position table")
        step, window = model_step(model), model.config.model.max_position_embeddings
    ids = generate_ids(step, encoded, config, tokenizer.eos_id, tokenizer.pad_id, window)
    return [tokenizer.decode(row) for row in ids]


# ----------------------------------------------------------------------- recurrent (GPT-XL)

GPT_XL = "gpt_xl"
# taichu.families.gpt_xl.NO_DOCUMENT (not imported: this module is numpy only, the ONNX
# runtime's side too): the document id of padding and of empty memory slots, seen by no query.
NO_DOCUMENT = -1


def generation_memory(mem_len: int, segment_length: int) -> int:
    """The memory a GPT-XL generates with by default: mem_len + seq_len - 1 positions, so that
    every generated token sees mem_len + seq_len keys with itself, the longest context
    training showed any position (the last of a segment: the memory and the whole segment)."""
    return mem_len + segment_length - 1


@dataclass
class RecurrentMemory:
    """What RecurrentStep passes from step to step as ``past``: the runtime's arrays."""

    memory_document_ids: object    # [batch, memory]
    memories: list                 # each layer's [batch, memory, hidden]
    batch: int
    owner: object                  # the RecurrentStep that made it


class RecurrentStep:
    """``step`` for generate_ids over a GPT-XL's recurrent forward, from two runtime callables:

    - ``forward(input_ids [B, L], document_ids [B, L], memory_document_ids [B, M], memories)``
      -> (last-position logits [B, vocab] numpy, new memory_document_ids, new memories), the
      memory keeping its length M (torch_impl / mindspore_impl ``DecoderForExport``, the
      exported ``decoder`` graph);
    - ``initial_memories(batch, M)`` -> (memory_document_ids, memories): empty slots (zeros,
      document NO_DOCUMENT).

    The prompt (left-padded by generate_ids) is left-padded further to a multiple of the
    segment length (data.seq_len) and runs as consecutive segments of that length, aligned
    to its end; then each new token is one call of length 1. Padding has document id
    NO_DOCUMENT and real tokens 0 (one document), so no real token sees padding: as the
    segments end where the prompt ends, a row's tokens meet the same segments and memory
    whatever the padding, and a continuation does not depend on its batch. The memory has a
    fixed length, so every call has one of two shapes per batch (a compiled runtime
    compiles two graphs) and each token costs the same however long the text.

    The memory rule, which a recomputation without memory tensors reproduces with a mask: a
    position of a call starting at position a sees the keys from a - M up to itself (M the
    memory length) of its own document; the hidden states a later call reads from memory
    are the ones computed when their position ran. Arrays given to the callables are int64
    numpy (ids, document ids) or what the callables returned (the memory); each runtime
    converts.
    """

    def __init__(self, forward, initial_memories, segment_length: int, memory_length: int,
                 vocab_size: int):
        if segment_length < 1:
            raise ValueError(f"the segment length must be >= 1, got {segment_length}")
        if memory_length < 1:
            # With no memory a generated token would see itself only; and the exported decoder
            # (export/signature_gpt_xl.py) is made for a memory of at least one slot.
            raise ValueError(f"the memory must hold at least 1 position, got {memory_length} (each "
                             f"generated token sees the memory and itself; the default, mem_len + "
                             f"seq_len - 1, is the longest context training showed)")
        self.forward, self.initial_memories = forward, initial_memories
        self.segment_length, self.memory_length = segment_length, memory_length
        self.vocab_size = vocab_size

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: RecurrentMemory | None):
        input_ids, attention_mask = np.asarray(input_ids), np.asarray(attention_mask)
        if input_ids.ndim != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch >= 1, length >= 1], got shape {input_ids.shape}")
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.vocab_size:
            raise ValueError(f"token id {low if low < 0 else high} is out of range for vocab_size "
                             f"{self.vocab_size}")
        batch, length = input_ids.shape
        if attention_mask.ndim != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < length:
            raise ValueError(f"attention_mask must be [batch, >= length] = [{batch}, >= {length}], got "
                             f"{attention_mask.shape}")
        documents = np.where(attention_mask[:, attention_mask.shape[1] - length:] > 0, 0,
                             NO_DOCUMENT).astype(np.int64)
        input_ids = input_ids.astype(np.int64)
        if past is None:
            segment = self.segment_length
            width = -(-length // segment) * segment
            # Id 0 under document NO_DOCUMENT: any valid id would do, no real token sees it.
            ids = np.zeros((batch, width), np.int64)
            docs = np.full((batch, width), NO_DOCUMENT, np.int64)
            ids[:, width - length:], docs[:, width - length:] = input_ids, documents
            memory_document_ids, memories = self.initial_memories(batch, self.memory_length)
            for start in range(0, width, segment):
                logits, memory_document_ids, memories = self.forward(
                    ids[:, start:start + segment], docs[:, start:start + segment], memory_document_ids,
                    memories)
            return logits, RecurrentMemory(memory_document_ids, list(memories), batch, self)
        if not isinstance(past, RecurrentMemory) or past.owner is not self:
            raise ValueError("past must be the memory a previous call of this step returned (None for "
                             "the prompt)")
        if past.batch != batch:
            raise ValueError(f"a memory of batch {past.batch} given with input_ids of batch {batch}: a "
                             f"memory belongs to the batch it was made by (start again with past None)")
        if length != 1:
            raise ValueError(f"after the prompt, one new token per call (input_ids [batch, 1]), got "
                             f"{length}")
        logits, memory_document_ids, memories = self.forward(input_ids, documents, past.memory_document_ids,
                                                             past.memories)
        return logits, RecurrentMemory(memory_document_ids, list(memories), batch, self)


_COMPILED_DECODERS = weakref.WeakKeyDictionary()


def recurrent_model_step(model, memory: int | None = None) -> RecurrentStep:
    """RecurrentStep over a taichu GPT-XL of either backend, through its DecoderForExport
    (the exported decoder's signature): PyTorch eager; MindSpore compiled with mindspore.jit
    (whatever the context mode: a graph for the prompt's segments and one for the steps, per
    batch size), ids int32, the memory kept in MindSpore tensors from call to call.
    ``memory``: positions of memory (default ``generation_memory``)."""
    from taichu.api import backend_of

    config = model.config
    if config.family != GPT_XL:
        raise ValueError(f"recurrent generation needs a gpt_xl model, not {config.family}")
    m = config.model
    memory = generation_memory(m.mem_len, config.data.seq_len) if memory is None else memory
    if backend_of(model) == "torch":
        import torch

        from torch_impl.gpt_xl import DecoderForExport

        decoder = DecoderForExport(model).eval()

        def forward(input_ids, document_ids, memory_document_ids, memories):
            with torch.no_grad():
                out = decoder(torch.from_numpy(input_ids), torch.from_numpy(document_ids), memory_document_ids,
                              *memories)
            return out[0].float().numpy(), out[1], list(out[2:])

        def initial(batch, length):
            memories, documents = model.initial_memories(batch, length)
            return documents, list(memories)
        return RecurrentStep(forward, initial, config.data.seq_len, memory, m.vocab_size)

    import mindspore as ms

    from mindspore_impl.gpt_xl import DecoderForExport

    model.set_train(False)
    # One compiled cell per model: its graphs (per shape) serve every later generation.
    decoder = _COMPILED_DECODERS.get(model)
    if decoder is None:
        decoder = _COMPILED_DECODERS[model] = ms.jit(DecoderForExport(model))

    def ms_forward(input_ids, document_ids, memory_document_ids, memories):
        out = decoder(ms.Tensor(input_ids.astype(np.int32)), ms.Tensor(document_ids.astype(np.int32)),
                      memory_document_ids, *memories)
        return out[0].asnumpy().astype(np.float32), out[1], list(out[2:])

    def ms_initial(batch, length):
        memories, documents = model.initial_memories(batch, length)     # int32 document ids
        return documents, list(memories)
    return RecurrentStep(ms_forward, ms_initial, config.data.seq_len, memory, m.vocab_size)

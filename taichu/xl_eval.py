"""Perplexity on long held-out documents, with and without memory, at several context lengths.

What `taichu eval` reports for a GPT-XL (family gpt_xl) and, on the same documents, for a
plain GPT (family gpt):

- Documents. The held-out text of the model's own config (``data``: corpus,
  validation_fraction, split_seed; or other .txt / .jsonl files) packed with the model's
  tokenizer into one stream, each corpus item as [bos] + ids + [eos] (taichu.data.pack_corpus,
  the training cache), and cut into documents of ``document_tokens`` predicted tokens:
  document i is stream[i * D : i * D + D + 1], its first token context only, consecutive
  documents sharing one token (as taichu.data's blocks); the stream's tail that does not
  fill a document is left out. A document is consecutive held-out text, not an article:
  People's Daily comes as paragraphs with no article markers, so a document of 2048 tokens
  runs over several paragraphs (kept in corpus order, and taichu.corpus splits by chunks of
  16 consecutive paragraphs, so mostly of one article or a few) and may start and end
  inside one.
- Scoring. Every document is a row of one batch; each is read from empty memory, segment
  after segment of the evaluation context length L, each segment's last memory positions
  (length M) carried to the next. Perplexity = exp(mean next-token NLL over every predicted
  token of every document): the same tokens whatever L and M, so the table's entries compare.
  At M = 0 a segment sees only itself: a token at offset k of a segment is predicted from k
  + 1 tokens. A segment shorter than L (when L does not divide D) is padded to L (document id
  -1, seen by no real token, its targets not counted), so every call has one shape.
- Document ids inside a document follow the model's ``data.reset_memory``: "never", one id
  (the memory carries over paragraph boundaries); "document", a new id at each bos (a
  paragraph's memory is invisible to the next, as the model was trained).
- A plain GPT (family gpt, ``gpt_forward``) reads the same documents in non-overlapping
  segments of L <= max_position_embeddings tokens, positions from 0 in each: the M = 0 row.
  A longer context is refused: the GPT has no positions for it.
- Each entry's seconds are its wall time, MindSpore's compilation of its graph included.

The scoring loop is numpy and drives a per-backend ``forward(input_ids, targets,
document_ids, state) -> (nll [batch, L] numpy, state)``: ``xl_forward`` and ``gpt_forward``
build it for a model of either backend (MindSpore: a jit-compiled cell, one graph per
(batch, L, M)). No framework is imported with this module.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_DOCUMENT_TOKENS = 2048
SPLITS = {"test": "validation", "validation": "validation", "train": "train", "all": "all"}


@dataclass
class Documents:
    """Long documents cut from one packed token stream."""

    tokens: np.ndarray          # [documents, D + 1] int64: D inputs, D targets (shifted by one)
    document_ids: np.ndarray    # [documents, D] int64: the id of each input token
    source: str                 # what text, for people
    stream_tokens: int          # tokens of the packed stream they were cut from

    @property
    def count(self) -> int:
        return self.tokens.shape[0]

    @property
    def length(self) -> int:
        """Predicted tokens per document (--document-tokens)."""
        return self.tokens.shape[1] - 1

    @property
    def predicted(self) -> int:
        return self.count * self.length


def held_out_texts(data_config, split: str = "test", data=None) -> tuple[list[str], str]:
    """(items in corpus order, a description): the ``split`` ("test"/"validation", "train" or
    "all") of the config's corpus, or of ``data`` (.txt / .jsonl paths) in its place, split
    with the config's validation_fraction and split_seed."""
    from taichu.corpus import (PEOPLES_DAILY, SPLIT_CHUNK, load_corpus, peoples_daily_paragraphs,
                               read_text_files)

    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    if data:
        paths = [data] if isinstance(data, (str, Path)) else data
        data_config = data_config.model_copy(update={"corpus": [str(p) for p in paths]})
    source = data_config.corpus
    name = source if source == PEOPLES_DAILY else "+".join(
        Path(p).name for p in ([source] if isinstance(source, str) else source))
    if SPLITS[split] == "all":
        texts = peoples_daily_paragraphs() if source == PEOPLES_DAILY else read_text_files(source)
        what = f"all of {name}"
    else:
        texts = getattr(load_corpus(data_config), SPLITS[split])
        what = (f"the {SPLITS[split]} split of {name} (validation_fraction "
                f"{data_config.validation_fraction}, split_seed {data_config.split_seed})")
    if not texts:
        raise ValueError(f"no held-out text: {what} is empty (the split takes whole chunks of "
                         f"{SPLIT_CHUNK} consecutive items, so a small corpus may have none held out): give "
                         f"more text, or --split all to score all of it")
    return texts, what


def make_documents(stream, document_tokens: int, bos_id: int, reset_memory: str = "never",
                   source: str = "tokens", limit: int | None = None) -> Documents:
    """Documents of ``document_tokens`` predicted tokens from a token stream (see the module
    docstring); ``limit``: at most that many (the first)."""
    stream = np.asarray(stream)
    document_tokens = int(document_tokens)
    if document_tokens < 1:
        raise ValueError(f"document tokens must be positive, got {document_tokens}")
    count = (len(stream) - 1) // document_tokens
    if count < 1:
        raise ValueError(f"{source}: {len(stream):,} tokens, less than one document of "
                         f"{document_tokens} + 1 tokens: lower --document-tokens or give more text")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"documents must be positive, got {limit}")
        count = min(count, limit)
    starts = np.arange(count, dtype=np.int64) * document_tokens
    tokens = np.asarray(stream[starts[:, None] + np.arange(document_tokens + 1)], dtype=np.int64)
    if reset_memory == "document":
        # As taichu.data.StreamSegments: a new id at each bos (pack_corpus starts every item
        # with one); the part before the first bos (an item begun before the document) is 0.
        document_ids = np.cumsum(tokens[:, :-1] == bos_id, axis=1, dtype=np.int64)
    elif reset_memory == "never":
        document_ids = np.zeros((count, document_tokens), np.int64)
    else:
        raise ValueError(f"reset_memory must be 'never' or 'document', got {reset_memory!r}")
    return Documents(tokens, document_ids, source, len(stream))


def held_out_documents(config, tokenizer, document_tokens: int = DEFAULT_DOCUMENT_TOKENS,
                       data=None, split: str = "test", limit: int | None = None,
                       cache_dir=None) -> Documents:
    """The documents a model of ``config`` is scored on: its held-out text (or ``data``),
    packed with ``tokenizer`` (cached as taichu.data caches training text, under
    ``cache_dir``, default data.cache_dir or ~/.cache/taichu/data)."""
    from taichu.data import default_cache_dir, pack_corpus

    if tokenizer.vocab_size != config.model.vocab_size:
        raise ValueError(f"{tokenizer.path}: tokenizer vocab_size {tokenizer.vocab_size} != "
                         f"model.vocab_size {config.model.vocab_size}")
    texts, what = held_out_texts(config.data, split, data)
    if cache_dir is None:
        cache_dir = config.data.cache_dir or default_cache_dir()
    packed = pack_corpus(texts, tokenizer, cache_dir, {"corpus": what, "split": split})
    reset_memory = getattr(config.data, "reset_memory", "never")
    return make_documents(packed.tokens, document_tokens, tokenizer.bos_id, reset_memory,
                          f"{what}, {len(texts):,} items", limit)


# --------------------------------------------------------------------------- scoring

def token_nll(forward, documents: Documents, context: int) -> np.ndarray:
    """Next-token NLL (nats, float64) of every predicted token of ``documents``, [documents,
    D]: each document a row, read in segments of ``context`` tokens with the state
    ``forward`` carries from one to the next. Perplexity is exp of its mean."""
    context = int(context)
    if context < 1:
        raise ValueError(f"context must be positive, got {context}")
    if context > documents.length:
        raise ValueError(f"context {context} is longer than the documents ({documents.length} "
                         f"predicted tokens): raise --document-tokens to at least {context}")
    tokens, ids = documents.tokens, documents.document_ids
    rows, length = ids.shape
    out = np.empty((rows, length), np.float64)
    state = None
    for start in range(0, length, context):
        n = min(context, length - start)
        # The last segment padded to the context: one shape for every call.
        input_ids = np.zeros((rows, context), np.int64)
        targets = np.zeros((rows, context), np.int64)
        document_ids = np.full((rows, context), -1, np.int64)
        input_ids[:, :n] = tokens[:, start:start + n]
        targets[:, :n] = tokens[:, start + 1:start + n + 1]
        document_ids[:, :n] = ids[:, start:start + n]
        nll, state = forward(input_ids, targets, document_ids, state)
        out[:, start:start + n] = np.asarray(nll, np.float64)[:, :n]
    return out


def xl_forward(model, memory: int):
    """``forward`` for token_nll over a GPT-XL of either backend with a memory of
    ``memory`` positions (0: none), empty at each document's start (state None)."""
    from taichu.api import backend_of

    memory = int(memory)
    if memory < 0:
        raise ValueError(f"memory must be >= 0, got {memory}")
    if backend_of(model) == "torch":
        import torch
        from torch.nn import functional as F

        def forward(input_ids, targets, document_ids, state):
            rows = input_ids.shape[0]
            with torch.no_grad():
                ids, docs = torch.from_numpy(input_ids), torch.from_numpy(document_ids)
                if memory:
                    memories, memory_documents = state if state is not None else model.initial_memories(rows, memory)
                    logits, memories, memory_documents = model(ids, docs, memories, memory_documents)
                    state = (memories, memory_documents)
                else:
                    logits = model(ids, docs)[0]
                nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                      torch.from_numpy(targets).reshape(-1), reduction="none")
            return nll.reshape(input_ids.shape).numpy(), state
        return forward

    import mindspore as ms

    cell = _mindspore_cells()[0](model)
    model.set_train(False)
    cell.set_train(False)
    compiled = ms.jit(cell)

    def forward(input_ids, targets, document_ids, state):
        rows = input_ids.shape[0]
        carried = ()
        if memory:
            memories, memory_documents = state if state is not None else model.initial_memories(rows, memory)
            carried = (memory_documents,) + tuple(memories)
        out = compiled(ms.Tensor(input_ids.astype(np.int32)), ms.Tensor(targets.astype(np.int32)),
                       ms.Tensor(document_ids.astype(np.int32)), *carried)
        if memory:
            state = (tuple(out[2:]), out[1])
        return out[0].asnumpy(), state
    return forward


def gpt_forward(model):
    """``forward`` for token_nll over a plain GPT of either backend: each segment alone,
    positions from 0, padding (document id -1) masked out; no state."""
    from taichu.api import backend_of

    if backend_of(model) == "torch":
        import torch
        from torch.nn import functional as F

        def forward(input_ids, targets, document_ids, state):
            with torch.no_grad():
                mask = torch.from_numpy((document_ids >= 0).astype(np.int64))
                logits = model(torch.from_numpy(input_ids), mask)
                nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                      torch.from_numpy(targets).reshape(-1), reduction="none")
            return nll.reshape(input_ids.shape).numpy(), None
        return forward

    import mindspore as ms

    cell = _mindspore_cells()[1](model)
    model.set_train(False)
    cell.set_train(False)
    compiled = ms.jit(cell)

    def forward(input_ids, targets, document_ids, state):
        nll = compiled(ms.Tensor(input_ids.astype(np.int32)), ms.Tensor(targets.astype(np.int32)),
                       ms.Tensor((document_ids >= 0).astype(np.int32)))
        return nll.asnumpy(), None
    return forward


_CELLS = []


def _mindspore_cells():
    """(XLScorer, GPTScorer): MindSpore cells of one forward and its per-token NLL, defined
    on first use so that this module imports no framework."""
    if _CELLS:
        return _CELLS
    import mindspore as ms
    from mindspore import nn, ops

    def per_token_nll(logits, targets):
        # LogSoftmax + NLLLoss in float32, per token (mindspore_impl.gpt.cross_entropy's
        # kernels, not reduced).
        vocab = logits.shape[-1]
        log_probs = ops.log_softmax(logits.reshape(-1, vocab).astype(ms.float32), -1)
        weight = ops.ones(vocab, ms.float32)
        losses = ops.NLLLoss(reduction="none")(log_probs, targets.reshape(-1), weight)[0]
        return losses.reshape(targets.shape)

    class XLScorer(nn.Cell):
        """(input_ids, targets, document_ids, [memory_document_ids, memory of each layer]) ->
        (per-token NLL [batch, length], [new memory_document_ids, new memories])."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def construct(self, input_ids, targets, document_ids, *memory):
            if len(memory) > 0:
                logits, memories, documents = self.model(input_ids, document_ids, memory[1:], memory[0])
                return (per_token_nll(logits, targets), documents) + tuple(memories)
            # [0]: the logits only (unpacking the ((), None) of no memory leaves graph
            # nodes MindSpore warns about).
            return (per_token_nll(self.model(input_ids, document_ids)[0], targets),)

    class GPTScorer(nn.Cell):
        """(input_ids, targets, attention_mask) -> per-token NLL [batch, length]."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def construct(self, input_ids, targets, attention_mask):
            return per_token_nll(self.model(input_ids, attention_mask), targets)

    _CELLS.extend((XLScorer, GPTScorer))
    return _CELLS


# --------------------------------------------------------------------------- the table

@dataclass
class PerplexityTable:
    """Perplexity per (context, memory), with what was scored."""

    model: str
    family: str
    backend: str
    documents: int
    document_tokens: int
    predicted_tokens: int
    source: str
    document_ids: str
    rows: list[dict] = field(default_factory=list)   # {context, memory, nll, perplexity, seconds}
    # {(context, memory): the NLL of each predicted token [documents, D]}, not in the JSON.
    token_nll: dict = field(default_factory=dict, repr=False)

    def perplexity(self, context: int, memory: int) -> float:
        for row in self.rows:
            if row["context"] == context and row["memory"] == memory:
                return row["perplexity"]
        raise KeyError(f"no entry for context {context}, memory {memory}")

    def lines(self) -> list[str]:
        contexts = sorted({r["context"] for r in self.rows})
        memories = sorted({r["memory"] for r in self.rows})
        out = [f"{self.model} ({self.family}, {self.backend}): perplexity of {self.documents} "
               f"held-out documents of {self.document_tokens} tokens ({self.predicted_tokens:,} "
               f"predicted tokens; {self.source}; {self.document_ids})",
               ("rows: memory length M, columns: evaluation context length L (segments of L, "
                "memory carried from each to the next)" if self.family == "gpt_xl" else
                "columns: evaluation context length L (segments of L, each alone: a gpt has no "
                "memory, M = 0)"),
               "M \\ L".rjust(8) + "".join(f"{c:>12}" for c in contexts)]
        for memory in memories:
            cells = []
            for context in contexts:
                try:
                    cells.append(f"{self.perplexity(context, memory):>12,.2f}")
                except KeyError:
                    cells.append(f"{'-':>12}")
            out.append(f"{memory:>8}" + "".join(cells))
        return out

    def to_json(self) -> dict:
        return {"model": self.model, "family": self.family, "backend": self.backend,
                "documents": self.documents, "document_tokens": self.document_tokens,
                "predicted_tokens": self.predicted_tokens, "source": self.source,
                "document_ids": self.document_ids, "table": self.rows}


def default_contexts(config) -> list[int]:
    """seq_len / 2, seq_len and 2 seq_len of the model's data section."""
    seq_len = config.data.seq_len
    return sorted({max(1, seq_len // 2), seq_len, 2 * seq_len})


def default_memories(config) -> list[int]:
    """0, mem_len and 2 mem_len for a GPT-XL; 0 for a GPT."""
    mem_len = getattr(config.model, "mem_len", 0)
    return sorted({0, mem_len, 2 * mem_len})


def check_gpt_context(config, contexts) -> None:
    """A plain GPT has positions for max_position_embeddings tokens: refuse longer contexts."""
    window = config.model.max_position_embeddings
    longer = [c for c in contexts if c > window]
    if longer:
        raise ValueError(f"context {longer[0]} is longer than the GPT's window "
                         f"(model.max_position_embeddings {window}): a plain GPT has no position "
                         f"beyond it; use contexts <= {window}")


def perplexity_table(model, documents: Documents, contexts=None, memories=None, name: str = "",
                     log=None) -> PerplexityTable:
    """The table of a GPT-XL (every context x memory) or of a GPT (memory 0 only) of either
    backend on ``documents``; ``log(line)``, if given, hears each entry as it is done."""
    from taichu.api import backend_of

    config = model.config
    family = config.family
    if family not in ("gpt", "gpt_xl"):
        raise ValueError(f"perplexity over long documents is for gpt and gpt_xl models, not {family}")
    contexts = sorted(set(contexts or default_contexts(config)))
    memories = sorted(set(default_memories(config) if memories is None else memories))
    for value, what in [(c, "context") for c in contexts] + [(m, "memory") for m in memories]:
        if value < (1 if what == "context" else 0):
            raise ValueError(f"{what} must be {'positive' if what == 'context' else '>= 0'}, got {value}")
    if family == "gpt":
        if memories != [0]:
            raise ValueError(f"a plain GPT has no memory: only memory 0 (got {memories})")
        check_gpt_context(config, contexts)
    if documents.tokens.min() < 0 or documents.tokens.max() >= config.model.vocab_size:
        # Checked here: MindSpore's compiled graph cannot, and would read past the table.
        raise ValueError(f"the documents hold token ids outside 0..{config.model.vocab_size - 1}: "
                         f"they were made with another tokenizer than this model's")
    too_long = [c for c in contexts if c > documents.length]
    if too_long:
        raise ValueError(f"context {too_long[0]} is longer than the documents ({documents.length} "
                         f"predicted tokens): raise --document-tokens to at least {too_long[0]}")
    reset = getattr(config.data, "reset_memory", "never")
    table = PerplexityTable(
        model=name or getattr(model, "taichu_source_dir", family), family=family,
        backend=backend_of(model), documents=documents.count, document_tokens=documents.length,
        predicted_tokens=documents.predicted, source=documents.source,
        document_ids=("a new document id at each paragraph (data.reset_memory: document)"
                      if reset == "document" and family == "gpt_xl" else "one document id per document"))
    for memory in memories:
        forward = xl_forward(model, memory) if family == "gpt_xl" else gpt_forward(model)
        for context in contexts:
            started = time.perf_counter()
            losses = token_nll(forward, documents, context)
            table.token_nll[context, memory] = losses
            nll = float(losses.mean())
            row = {"context": context, "memory": memory, "nll": nll, "perplexity": math.exp(nll),
                   "seconds": round(time.perf_counter() - started, 3)}
            table.rows.append(row)
            if log:
                log(f"  L {context:>5}, M {memory:>5}: perplexity {row['perplexity']:,.2f} "
                    f"({row['seconds']:.1f} s)")
    return table


def evaluate_model(model_dir, backend: str = "torch", contexts=None, memories=None,
                   document_tokens: int = DEFAULT_DOCUMENT_TOKENS, data=None, split: str = "test",
                   limit: int | None = None, log=None) -> PerplexityTable:
    """The table of the gpt_xl or gpt model directory ``model_dir`` on its held-out documents."""
    from taichu.api import load_model
    from taichu.config import ConfigError, load_config
    from taichu.tokenizer import Tokenizer

    path = Path(model_dir)
    config = load_config(path)
    if config.family not in ("gpt", "gpt_xl"):
        raise ValueError(f"{path}: perplexity over long documents is for gpt and gpt_xl models, "
                         f"not {config.family}")
    if backend not in ("torch", "mindspore"):
        raise ValueError(f"perplexity runs on --backend torch or mindspore, not {backend}")
    if not (path / "tokenizer.model").is_file():
        raise ConfigError(f"{path}: perplexity needs the model's tokenizer.model in the model directory")
    if config.family == "gpt" and memories not in (None, [0], (0,)):
        raise ValueError(f"{path} is a plain GPT: it has no memory, give no --memory (or --memory 0)")
    given = bool(contexts)
    contexts = sorted(set(contexts)) if given else default_contexts(config)
    if config.family == "gpt":
        window = config.model.max_position_embeddings
        if not given and contexts[-1] > window:
            # The default 2 seq_len may pass the window: left out (a context given is refused).
            if log:
                log(f"(default context {contexts[-1]} left out: longer than the GPT's window {window})")
            contexts = [c for c in contexts if c <= window]
        check_gpt_context(config, contexts)
        memories = [0]
    if max(contexts) > document_tokens:
        raise ValueError(f"context {max(contexts)} is longer than a document of --document-tokens "
                         f"{document_tokens}: raise --document-tokens to at least {max(contexts)}")
    documents = held_out_documents(config, Tokenizer(path / "tokenizer.model"), document_tokens,
                                   data=data, split=split, limit=limit)
    model = load_model(path, backend=backend)
    return perplexity_table(model, documents, contexts, memories, name=str(path), log=log)


def write_json(table: PerplexityTable, out) -> None:
    from taichu.fileio import atomic_write_bytes

    text = json.dumps(table.to_json(), ensure_ascii=False, indent=2) + "\n"
    atomic_write_bytes(out, text.encode("utf-8"))

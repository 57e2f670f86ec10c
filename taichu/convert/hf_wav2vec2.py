"""Our wav2vec2 <-> Hugging Face ``Wav2Vec2ForPreTraining`` / ``Wav2Vec2ForCTC``: the tensor
table, config.json both ways, and the CTC alphabet as the vocab.json of
``Wav2Vec2CTCTokenizer``.

Tensors: our names are Hugging Face's, except
- the weight-normalised position convolution: ours ``...pos_conv_embed.conv.weight_g`` /
  ``weight_v``, HF's ``...conv.parametrizations.weight.original0`` / ``original1`` (files
  written before torch's parametrizations use ``weight_g`` / ``weight_v`` too: read as well);
- ``num_updates`` (ours only, the optimizer-update counter): zero when read from HF, left out
  when written;
- ``wav2vec2.masked_spec_embed``: HF has it only when some masking is configured
  (mask_time_prob or mask_feature_prob > 0); with our mask_time_prob 0 it is left out when
  written, and read as HF's (or zeros where HF has none).

config.json: what our model cannot be is refused naming the key (adapters, another blank
id, an unknown activation...); what only changes HF's training and not what the weights
compute is read as ours with a note (LayerDrop as 0, channel masking, the CTC reduction).
HF's pretraining loss has no feature penalty: read, the config's feature_penalty_weight is
0 (so our loss is HF's loss per masked frame); written, ours rides along in taichu_config.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from taichu.config import ConfigError, validate_config
from taichu.convert.codec import HF_CONFIG, HFFamily, Step, StepCodec, refuse, rename
from taichu.convert.safetensors_io import Tensors, np_dtype
from taichu.families.wav2vec2 import PINYIN_ALPHABET

POS_CONV = "wav2vec2.encoder.pos_conv_embed.conv."
WEIGHT_NORM_NAMES = {"weight_g": "parametrizations.weight.original0",
                     "weight_v": "parametrizations.weight.original1"}
MASKED_SPEC_EMBED = "wav2vec2.masked_spec_embed"
COUNTER = "num_updates"
ARCHITECTURES = {"pretraining": "Wav2Vec2ForPreTraining", "ctc": "Wav2Vec2ForCTC"}
VOCAB_FILE = "vocab.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Wav2Vec2CTCTokenizer's conventions: the blank is its pad token (id 0 = config.json's
# pad_token_id, which Wav2Vec2ForCTC uses as the blank); "|" separates words.
HF_BLANK = "<pad>"
WORD_DELIMITER = "|"
OUR_BLANK = PINYIN_ALPHABET[0]
# The key under which read_files puts vocab.json's content into the config.json dict.
VOCAB_KEY = "vocab.json"

# transformers' Wav2Vec2Config defaults: save_pretrained writes only what differs from
# them, so a key a config.json lacks has this value.
WAV2VEC2_HF_DEFAULTS = {
    "vocab_size": 32, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout": 0.1, "activation_dropout": 0.1,
    "attention_dropout": 0.1, "feat_proj_dropout": 0.0, "feat_quantizer_dropout": 0.0, "final_dropout": 0.1,
    "layerdrop": 0.1, "initializer_range": 0.02, "layer_norm_eps": 1e-5, "feat_extract_norm": "group",
    "feat_extract_activation": "gelu", "conv_dim": [512] * 7, "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2], "conv_bias": False, "num_conv_pos_embeddings": 128,
    "num_conv_pos_embedding_groups": 16, "do_stable_layer_norm": False, "apply_spec_augment": True,
    "mask_time_prob": 0.05, "mask_time_length": 10, "mask_time_min_masks": 2, "mask_feature_prob": 0.0,
    "num_codevectors_per_group": 320, "num_codevector_groups": 2, "contrastive_logits_temperature": 0.1,
    "num_negatives": 100, "codevector_dim": 256, "proj_codevector_dim": 256, "diversity_loss_weight": 0.1,
    "ctc_loss_reduction": "sum", "ctc_zero_infinity": False, "pad_token_id": 0, "add_adapter": False,
    "adapter_attn_dim": None,
}
# HF activation name -> ours ("gelu" is the exact erf GELU in both).
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "relu": "relu"}


def _hf_name(name: str) -> str:
    if name.startswith(POS_CONV):
        leaf = name[len(POS_CONV):]
        return POS_CONV + WEIGHT_NORM_NAMES.get(leaf, leaf)
    return name


def _has_masked_spec_embed(config) -> bool:
    """Whether Hugging Face's model of our config has masked_spec_embed (it builds it only
    when some masking is configured; ours writes mask_feature_prob 0)."""
    return config.model.mask_time_prob > 0


class HFWav2Vec2Codec(StepCodec):
    def build_steps(self) -> list[Step]:
        skip = {COUNTER} | (set() if _has_masked_spec_embed(self.config) else {MASKED_SPEC_EMBED})
        return [rename(name, _hf_name(name)) for name in self.specs if name not in skip]

    def adapt(self, tensors: Tensors) -> Tensors:
        """Files saved before torch's parametrizations: ``conv.weight_g`` / ``conv.weight_v``."""
        legacy = {POS_CONV + old: POS_CONV + new for old, new in WEIGHT_NORM_NAMES.items()}
        if not any(name in tensors.shapes for name in legacy):
            return tensors
        rename_to = {n: legacy.get(n, n) for n in tensors.shapes}
        back = {v: k for k, v in rename_to.items()}
        return Tensors({rename_to[k]: v for k, v in tensors.shapes.items()},
                       {rename_to[k]: v for k, v in tensors.dtypes.items()}, lambda n: tensors.read(back[n]))

    def harmless(self) -> set[str]:
        # HF has masked_spec_embed whenever it masks anything (mask_feature_prob > 0, or
        # apply_spec_augment false with mask_time_prob > 0): kept if present, else zeros.
        return set() if _has_masked_spec_embed(self.config) else {MASKED_SPEC_EMBED}

    def to_canonical(self, tensors: Tensors) -> Tensors:
        shapes = {k: s.shape for k, s in self.specs.items()}
        like = tensors.dtypes[_hf_name("wav2vec2.feature_projection.projection.weight")]
        hidden = (self.config.model.hidden_size,)
        found_embed = tuple(tensors.shapes.get(MASKED_SPEC_EMBED, ())) == hidden

        def dtype(name: str) -> str:
            if name in self.by_ours:
                return tensors.dtypes[self.by_ours[name][0].theirs]
            if name == COUNTER:
                return "int64"
            return tensors.dtypes[MASKED_SPEC_EMBED] if found_embed else like

        def read(name: str) -> np.ndarray:
            if name in self.by_ours:
                step, index = self.by_ours[name]
                return step.backward(tensors.read(step.theirs), index)
            if name == COUNTER:
                return np.zeros(1, dtype=np.int64)
            if found_embed:
                return tensors.read(MASKED_SPEC_EMBED)
            return np.zeros(hidden, dtype=np_dtype(like))
        return Tensors(shapes, {k: dtype(k) for k in shapes}, read)


# ----------------------------------------------------------------------------- config.json

def _wav2vec2_from_hf(hf: dict, source: str) -> dict:
    """Our raw config from a Wav2Vec2ForPreTraining / Wav2Vec2ForCTC config.json (with
    vocab.json's content under VOCAB_KEY when read_files found one)."""
    c = {**WAV2VEC2_HF_DEFAULTS, **hf}
    architectures = c.get("architectures") or []
    heads = [head for head, name in ARCHITECTURES.items() if name in architectures]
    if len(heads) != 1:
        raise refuse(source, f"architectures {architectures!r}: supported are exactly one of "
                             f"{ARCHITECTURES['pretraining']} (head pretraining) and {ARCHITECTURES['ctc']} "
                             "(head ctc)")
    head = heads[0]
    if c["add_adapter"]:
        raise refuse(source, "add_adapter: true is not supported (our wav2vec2 has no adapter layers)")
    if c["adapter_attn_dim"] is not None:
        raise refuse(source, f"adapter_attn_dim {c['adapter_attn_dim']!r} is not supported (our wav2vec2 has "
                             "no attention adapters)")
    for key in ("hidden_act", "feat_extract_activation"):
        if c[key] not in ACTIVATIONS:
            raise refuse(source, f"{key} {c[key]!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    if c["feat_extract_norm"] not in ("group", "layer"):
        raise refuse(source, f"feat_extract_norm {c['feat_extract_norm']!r} is not supported (group or layer)")
    convs = [c[k] for k in ("conv_dim", "conv_kernel", "conv_stride")]
    if not all(isinstance(v, list) for v in convs) or len({len(v) for v in convs}) != 1:
        raise refuse(source, f"conv_dim, conv_kernel and conv_stride must be lists of one length, got {convs}")
    if c.get("num_feat_extract_layers", len(convs[0])) != len(convs[0]):
        raise refuse(source, f"num_feat_extract_layers {c['num_feat_extract_layers']} differs from the "
                             f"{len(convs[0])} entries of conv_dim")
    if head == "ctc" and c["pad_token_id"] != 0:
        raise refuse(source, f"pad_token_id {c['pad_token_id']!r} is not supported: Wav2Vec2ForCTC uses it "
                             "as the CTC blank, and ours is id 0")
    if head == "pretraining" and not c["apply_spec_augment"]:
        raise refuse(source, "apply_spec_augment: false is not supported for Wav2Vec2ForPreTraining (it "
                             "would leave the frames the loss predicts unmasked)")
    for key in ("layerdrop", "mask_feature_prob"):
        if not isinstance(c[key], (int, float)) or isinstance(c[key], bool) or not 0 <= c[key] < 1:
            raise refuse(source, f"{key} {c[key]!r} is not a probability")
    quantizer = {k: c[k] for k in ("num_codevector_groups", "num_codevectors_per_group", "codevector_dim",
                                   "proj_codevector_dim", "num_negatives", "contrastive_logits_temperature",
                                   "diversity_loss_weight")}
    # HF's pretraining loss has none (its Gumbel temperature schedule lives in the training
    # script, whose defaults 2.0 -> 0.5, decay 0.999995 are ours).
    quantizer["feature_penalty_weight"] = 0.0
    vocab = c["vocab_size"]
    ctc = {"zero_infinity": c["ctc_zero_infinity"]}
    if head == "ctc":
        ctc["alphabet"] = _alphabet(hf.get(VOCAB_KEY), vocab, source)
    model = {
        "head": head,
        "hidden_size": c["hidden_size"], "num_layers": c["num_hidden_layers"],
        "num_heads": c["num_attention_heads"], "intermediate_size": c["intermediate_size"],
        "conv_dim": convs[0], "conv_kernel": convs[1], "conv_stride": convs[2], "conv_bias": c["conv_bias"],
        "feat_extract_norm": c["feat_extract_norm"],
        "feat_extract_activation": ACTIVATIONS[c["feat_extract_activation"]],
        "do_stable_layer_norm": c["do_stable_layer_norm"], "activation": ACTIVATIONS[c["hidden_act"]],
        "num_conv_pos_embeddings": c["num_conv_pos_embeddings"],
        "num_conv_pos_embedding_groups": c["num_conv_pos_embedding_groups"],
        "layer_norm_eps": c["layer_norm_eps"], "hidden_dropout": c["hidden_dropout"],
        "attention_dropout": c["attention_dropout"], "activation_dropout": c["activation_dropout"],
        "feat_proj_dropout": c["feat_proj_dropout"],
        # Ours is one dropout on the head's input: the quantizer's (HF feat_quantizer_dropout,
        # fairseq dropout_features) or the CTC layer's (HF final_dropout).
        "final_dropout": c["feat_quantizer_dropout"] if head == "pretraining" else c["final_dropout"],
        # apply_spec_augment false: HF's CTC fine-tuning masks nothing, which ours does with 0.
        "mask_time_prob": c["mask_time_prob"] if c["apply_spec_augment"] else 0.0,
        "mask_time_length": c["mask_time_length"], "mask_time_min_masks": c["mask_time_min_masks"],
        "quantizer": quantizer, "ctc": ctc, "initializer_range": c["initializer_range"],
    }
    raw = {"family": "wav2vec2", "model": model}
    stored = hf.get("taichu_config")
    if isinstance(stored, dict) and stored.get("family") == "wav2vec2":
        # Written by us: keep its data and train sections (and what HF has no key for: the
        # feature penalty, the Gumbel schedule, the encoder freeze) when it describes the
        # model this config.json (and vocab.json) describe: either may have been edited since.
        try:
            ours, theirs = (validate_config(json.loads(json.dumps(r)), source) for r in (stored, raw))
            # Without a vocab.json, the stored alphabet is the only one there is.
            same = _wav2vec2_to_hf(ours) == _wav2vec2_to_hf(theirs) and (
                head != "ctc" or hf.get(VOCAB_KEY) is None or _hf_vocab(ours) == _hf_vocab(theirs))
        except ConfigError:
            same = False
        if same:
            raw = stored
    return raw


def _alphabet(vocab, size, source: str) -> list[str]:
    """Our CTC alphabet from vocab.json's {token: id} (id 0, HF's "<pad>", is the blank);
    placeholders when the directory has no vocab.json."""
    if vocab is None:
        return [OUR_BLANK] + [f"<unnamed {i}>" for i in range(1, size)]
    where = str(Path(source).with_name(VOCAB_FILE)) if source.endswith(HF_CONFIG) else f"{source} ({VOCAB_FILE})"
    if not isinstance(vocab, dict) or not all(isinstance(v, int) and not isinstance(v, bool)
                                              for v in vocab.values()):
        raise ConfigError(f"{where}: not a flat {{token: id}} object (a multilingual vocab.json, one "
                          "vocabulary per target_lang, is not supported)")
    if sorted(vocab.values()) != list(range(size)):
        raise ConfigError(f"{where}: the ids must be 0..{size - 1} once each (vocab_size {size}), got "
                          f"{len(vocab)} tokens with ids {min(vocab.values(), default=None)}.."
                          f"{max(vocab.values(), default=None)}")
    tokens = sorted(vocab, key=vocab.__getitem__)
    return [OUR_BLANK if tokens[0] == HF_BLANK else tokens[0], *tokens[1:]]


def _hf_vocab(config) -> dict[str, int]:
    """vocab.json of our alphabet: the blank written as HF's pad token."""
    alphabet = config.model.ctc.alphabet
    if HF_BLANK in alphabet[1:]:
        raise ConfigError(f"model.ctc.alphabet has {HF_BLANK!r} at id {alphabet.index(HF_BLANK, 1)}; "
                          f"Wav2Vec2CTCTokenizer's blank (id 0) is spelt {HF_BLANK!r}, so no other symbol may be")
    return {HF_BLANK: 0, **{symbol: i for i, symbol in enumerate(alphabet) if i > 0}}


def _wav2vec2_to_hf(config) -> dict:
    m = config.model
    q = m.quantizer
    return {
        "architectures": [ARCHITECTURES[m.head]], "model_type": "wav2vec2",
        "hidden_size": m.hidden_size, "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
        "intermediate_size": m.ffn_size, "hidden_act": m.activation,
        "conv_dim": list(m.conv_dim), "conv_kernel": list(m.conv_kernel), "conv_stride": list(m.conv_stride),
        "num_feat_extract_layers": len(m.conv_dim), "conv_bias": m.conv_bias,
        "feat_extract_norm": m.feat_extract_norm, "feat_extract_activation": m.feat_extract_activation,
        "do_stable_layer_norm": m.do_stable_layer_norm, "num_conv_pos_embeddings": m.num_conv_pos_embeddings,
        "num_conv_pos_embedding_groups": m.num_conv_pos_embedding_groups, "layer_norm_eps": m.layer_norm_eps,
        "initializer_range": m.initializer_range, "hidden_dropout": m.hidden_dropout,
        "attention_dropout": m.attention_dropout, "activation_dropout": m.activation_dropout,
        "feat_proj_dropout": m.feat_proj_dropout, "final_dropout": m.final_dropout,
        "feat_quantizer_dropout": m.final_dropout if m.head == "pretraining" else 0.0,
        "layerdrop": 0.0, "apply_spec_augment": True, "mask_time_prob": m.mask_time_prob,
        "mask_time_length": m.mask_time_length, "mask_time_min_masks": m.mask_time_min_masks,
        "mask_feature_prob": 0.0,
        "num_codevector_groups": q.num_codevector_groups, "num_codevectors_per_group": q.num_codevectors_per_group,
        "codevector_dim": q.codevector_dim, "proj_codevector_dim": q.proj_codevector_dim,
        "num_negatives": q.num_negatives, "contrastive_logits_temperature": q.contrastive_logits_temperature,
        "diversity_loss_weight": q.diversity_loss_weight,
        "vocab_size": m.ctc.vocab_size, "pad_token_id": 0, "ctc_loss_reduction": "mean",
        "ctc_zero_infinity": m.ctc.zero_infinity,
    }


def _wav2vec2_notes(hf: dict) -> list[str]:
    """What of a config.json our model does not carry over (config.json was checked already)."""
    c = {**WAV2VEC2_HF_DEFAULTS, **hf}
    ctc = ARCHITECTURES["ctc"] in (c.get("architectures") or [])
    notes = []
    if c["layerdrop"] > 0:
        notes.append(f"layerdrop {c['layerdrop']} read as 0: taichu has no LayerDrop (it only skips layers in "
                     "training; inference is the same)")
    if c["mask_feature_prob"] > 0:
        notes.append(f"mask_feature_prob {c['mask_feature_prob']} is not carried: taichu masks frames, not "
                     "channels (training only)")
    if ctc and not c["apply_spec_augment"]:
        notes.append("apply_spec_augment false read as mask_time_prob 0 (no masking in fine-tuning)")
    if ctc and c["ctc_loss_reduction"] != "mean":
        notes.append(f"ctc_loss_reduction {c['ctc_loss_reduction']!r}: taichu's CTC loss is the batch mean of "
                     "each utterance's loss per label (\"mean\")")
    if ctc and VOCAB_KEY in hf and hf[VOCAB_KEY] is None and "taichu_config" not in hf:
        notes.append(f"no {VOCAB_FILE} beside config.json: the CTC alphabet's symbols are placeholders "
                     "(<unnamed i>); decoding needs the real ones")
    if c["mask_time_prob"] == 0 and c["mask_feature_prob"] == 0:
        notes.append("masked_spec_embed: Hugging Face has none in a model that masks nothing (mask_time_prob "
                     "and mask_feature_prob 0); read, taichu's is zeros; written, it is left out")
    return notes


# ----------------------------------------------------------------------------- files beside config.json

def _read_files(hf: dict, directory: Path) -> dict:
    """config.json's dict with vocab.json's content under VOCAB_KEY (None: the directory has none)."""
    path = directory / VOCAB_FILE
    if not path.is_file():
        return {**hf, VOCAB_KEY: None}
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None
    return {**hf, VOCAB_KEY: vocab}


def _write_files(config) -> dict[str, bytes]:
    """vocab.json and tokenizer_config.json of a CTC model's alphabet, as
    Wav2Vec2CTCTokenizer.from_pretrained reads them (no unk/bos/eos: the alphabet has none)."""
    if config.model.head != "ctc":
        return {}
    vocab = _hf_vocab(config)
    tokenizer = {"tokenizer_class": "Wav2Vec2CTCTokenizer", "pad_token": HF_BLANK,
                 "word_delimiter_token": WORD_DELIMITER if WORD_DELIMITER in vocab else None,
                 "unk_token": None, "bos_token": None, "eos_token": None, "do_lower_case": False}
    return {VOCAB_FILE: json.dumps(vocab, ensure_ascii=False, indent=2).encode(),
            TOKENIZER_CONFIG_FILE: json.dumps(tokenizer, indent=2).encode()}


@dataclass(frozen=True)
class HFFamilyWithFiles(HFFamily):
    """A Hugging Face family part of whose config lives in files beside config.json:
    ``read_files(hf, directory)`` adds them to the config.json dict before ``from_hf``;
    ``write_files(config)`` gives {file name: bytes} to write beside config.json. Such a
    family carries its own vocabulary (no SentencePiece tokenizer travels)."""
    read_files: Callable[[dict, Path], dict] = lambda hf, directory: hf
    write_files: Callable[[object], dict[str, bytes]] = lambda config: {}


WAV2VEC2 = HFFamilyWithFiles("wav2vec2", "Wav2Vec2ForPreTraining", HFWav2Vec2Codec, _wav2vec2_from_hf,
                             _wav2vec2_to_hf, _wav2vec2_notes, _read_files, _write_files)

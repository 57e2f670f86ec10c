"""Our GPT <-> Hugging Face ``GPT2LMHeadModel``, and our gpt_classifier <->
``GPT2ForSequenceClassification``: the tensor table and config.json both ways.

The classifier is the GPT's table plus ``score.weight`` (the same name on both sides, no
bias, no tied head) and config.json's ``id2label`` / ``label2id`` / ``num_labels`` <->
``model.labels`` and ``pad_token_id`` <-> ``tokenizer.special_tokens.pad_id`` (HF pools each row
at its last token that is not the pad id; ours at its last ``attention_mask`` 1).
"""
from __future__ import annotations

from taichu.convert.codec import HFFamily, Step, StepCodec, conv1d, refuse, rename
from taichu.convert.safetensors_io import Tensors
from taichu.weights import CheckpointError

# Our GPT <-> Hugging Face GPT2LMHeadModel. The output projection is tied on both sides:
# HF files usually omit lm_head.weight; when present it must equal the token embedding.
GPT2_STEPS = (
    rename("embed_tokens.weight", "transformer.wte.weight"),
    rename("embed_positions.weight", "transformer.wpe.weight"),
    rename("ln_f.weight", "transformer.ln_f.weight"),
    rename("ln_f.bias", "transformer.ln_f.bias"),
)
GPT2_LAYER_STEPS = (
    rename("layers.{i}.ln_1.weight", "transformer.h.{i}.ln_1.weight"),
    rename("layers.{i}.ln_1.bias", "transformer.h.{i}.ln_1.bias"),
    Step(("layers.{i}.attn.q_proj.weight", "layers.{i}.attn.k_proj.weight", "layers.{i}.attn.v_proj.weight"),
         "transformer.h.{i}.attn.c_attn.weight", transpose=True, axis=1),
    Step(("layers.{i}.attn.q_proj.bias", "layers.{i}.attn.k_proj.bias", "layers.{i}.attn.v_proj.bias"),
         "transformer.h.{i}.attn.c_attn.bias", axis=0),
    conv1d("layers.{i}.attn.out_proj.weight", "transformer.h.{i}.attn.c_proj.weight"),
    rename("layers.{i}.attn.out_proj.bias", "transformer.h.{i}.attn.c_proj.bias"),
    rename("layers.{i}.ln_2.weight", "transformer.h.{i}.ln_2.weight"),
    rename("layers.{i}.ln_2.bias", "transformer.h.{i}.ln_2.bias"),
    conv1d("layers.{i}.mlp.fc_in.weight", "transformer.h.{i}.mlp.c_fc.weight"),
    rename("layers.{i}.mlp.fc_in.bias", "transformer.h.{i}.mlp.c_fc.bias"),
    conv1d("layers.{i}.mlp.fc_out.weight", "transformer.h.{i}.mlp.c_proj.weight"),
    rename("layers.{i}.mlp.fc_out.bias", "transformer.h.{i}.mlp.c_proj.bias"),
)
GPT2_TIED = {"lm_head.weight": "transformer.wte.weight"}
# Causal-mask buffers that older transformers versions saved with the weights.
GPT2_BUFFERS = ("transformer.h.{i}.attn.bias", "transformer.h.{i}.attn.masked_bias")
# GPT2ForSequenceClassification's head: the same name on both sides, [num_labels, n_embd].
SCORE = "score.weight"
CLASSIFIER_ARCHITECTURE = "GPT2ForSequenceClassification"
# Heads that sit outside ``transformer.`` in every GPT-2 model (kept unprefixed by adapt).
HEAD_NAMES = ("lm_head.weight", SCORE)


class HFGPT2Codec(StepCodec):
    """GPT2LMHeadModel: the decoder's table; ``lm_head.weight`` tied (optional)."""
    ARCHITECTURE = "GPT2LMHeadModel"
    HEAD_STEPS: tuple[Step, ...] = ()   # tensors beyond the decoder (names in HEAD_NAMES)
    TIED = GPT2_TIED

    def build_steps(self) -> list[Step]:
        if not self.config.model.bias:
            raise CheckpointError(f"{self.ARCHITECTURE} always has biases; model.bias: false cannot be "
                                  "converted to Hugging Face")
        layers = self.config.model.num_layers
        return (list(GPT2_STEPS) + [s.layer(i) for i in range(layers) for s in GPT2_LAYER_STEPS]
                + list(self.HEAD_STEPS))

    def adapt(self, tensors: Tensors) -> Tensors:
        """Files saved from GPT2Model (the hub's gpt2) lack the ``transformer.`` prefix."""
        if "wte.weight" not in tensors.shapes:
            return tensors
        rename = {n: n if n in HEAD_NAMES else f"transformer.{n}" for n in tensors.shapes}
        back = {v: k for k, v in rename.items()}
        return Tensors({rename[k]: v for k, v in tensors.shapes.items()},
                       {rename[k]: v for k, v in tensors.dtypes.items()}, lambda n: tensors.read(back[n]))

    def harmless(self) -> set[str]:
        buffers = {b.format(i=i) for i in range(self.config.model.num_layers) for b in GPT2_BUFFERS}
        return buffers | set(self.TIED)

    def check(self, tensors: Tensors, source: str) -> None:
        self.check_head(tensors, source)
        super().check(tensors, source)
        for tied, origin in self.TIED.items():
            if tied in tensors.shapes:
                a, b = tensors.read(tied), tensors.read(origin)
                if a.shape != b.shape or a.dtype != b.dtype or a.tobytes() != b.tobytes():
                    raise CheckpointError(f"{source}: {tied} differs from {origin}; our GPT ties "
                                          "them, so an untied model cannot be converted")

    def check_head(self, tensors: Tensors, source: str) -> None:
        """A classification head where a GPT2LMHeadModel is expected: say which model it is."""
        if SCORE in tensors.shapes:
            raise CheckpointError(
                f"{source}: has {SCORE} {tuple(tensors.shapes[SCORE])}, the head of a "
                f"{CLASSIFIER_ARCHITECTURE}, but is being read as a {self.ARCHITECTURE} (our gpt family): "
                f"convert it as a gpt_classifier (config.json's architectures "
                f"[\"{CLASSIFIER_ARCHITECTURE}\"], or --config a gpt_classifier config)")


class HFGPT2ClassifierCodec(HFGPT2Codec):
    """GPT2ForSequenceClassification: the decoder's table plus ``score.weight``; no lm_head."""
    ARCHITECTURE = "GPT2ForSequenceClassification"
    HEAD_STEPS = (rename(SCORE, SCORE),)
    TIED = {}

    def check_head(self, tensors: Tensors, source: str) -> None:
        labels = list(self.config.model.labels)
        if SCORE not in tensors.shapes:
            lm = " (it has lm_head.weight: a GPT2LMHeadModel)" if "lm_head.weight" in tensors.shapes else ""
            raise CheckpointError(
                f"{source}: no {SCORE}{lm}, so not a {self.ARCHITECTURE}: a GPT-2 language model has no "
                f"classification head to convert. Convert it as a gpt (our GPT family) and start a "
                f"classifier from it with `taichu train CONFIG --init DIR` (the head starts fresh)")
        shape = tuple(tensors.shapes[SCORE])
        if len(shape) == 2 and shape[0] != len(labels):   # other mis-shapes: the generic check
            raise CheckpointError(
                f"{source}: {SCORE} {shape} scores {shape[0]} labels, but the config names "
                f"{len(labels)} (model.labels, config.json's id2label: {labels}): the config's labels "
                f"must be the weights' classes, in logit order")


_HF_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


def _decoder_from_hf(hf: dict, source: str) -> dict:
    """Our ``model`` section (the decoder) from a GPT-2 config.json; HF features we lack are
    refused."""
    for key, needed in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("reorder_and_upcast_attn", False), ("add_cross_attention", False),
                        ("tie_word_embeddings", True)):
        if hf.get(key, needed) != needed:
            raise refuse(source, f"{key}: {hf[key]} is not supported (our GPT needs {needed})")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _HF_ACTIVATIONS:
        raise refuse(source, f"activation_function {activation!r} is not supported "
                             f"(supported: {', '.join(_HF_ACTIVATIONS)})")
    try:
        return {"vocab_size": int(hf["vocab_size"]), "hidden_size": int(hf["n_embd"]),
                "num_layers": int(hf["n_layer"]), "num_heads": int(hf["n_head"]),
                "intermediate_size": hf.get("n_inner"),
                "max_position_embeddings": int(hf.get("n_positions", hf.get("n_ctx", 1024))),
                "activation": _HF_ACTIVATIONS[activation],
                "layer_norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
                # One dropout rate for embeddings and residuals; inference ignores both.
                "dropout": float(hf.get("resid_pdrop", 0.1)),
                "attention_dropout": float(hf.get("attn_pdrop", 0.1)),
                "bias": True, "initializer_range": float(hf.get("initializer_range", 0.02))}
    except (KeyError, TypeError, ValueError) as err:
        raise refuse(source, f"not a usable GPT-2 config.json: {err!r}") from None


def _raw_config(family: str, model: dict, hf: dict, tokenizer: dict | None = None) -> dict:
    """Our raw config of ``family`` around ``model``; config.json's taichu_config instead
    when it was written by us for this model."""
    stored = hf.get("taichu_config")
    if isinstance(stored, dict) and stored.get("family", "gpt") == family and stored.get("model") == model:
        return stored  # written by us: keeps the tokenizer, data and train sections
    raw = {"family": family, "model": model, "data": {"seq_len": min(128, model["max_position_embeddings"])}}
    tokenizer = dict(tokenizer or {})
    if model["vocab_size"] < 260:  # too small for 256 byte pieces; the tokenizer is not carried anyway
        tokenizer["byte_fallback"] = False
    if tokenizer:
        raw["tokenizer"] = tokenizer
    return raw


def _gpt2_from_hf(hf: dict, source: str) -> dict:
    """Our raw config from a GPT2LMHeadModel config.json; HF features we lack are refused."""
    return _raw_config("gpt", _decoder_from_hf(hf, source), hf)


def _labels_from_hf(hf: dict, source: str) -> list[str]:
    """``model.labels`` from id2label (keys 0..n-1), checked against num_labels; without
    id2label, transformers' LABEL_0.. for num_labels (2 when absent, its default)."""
    id2label = hf.get("id2label")
    counts = {k: hf[k] for k in ("num_labels", "_num_labels") if hf.get(k) is not None}
    if id2label is None:
        n = next(iter(counts.values()), 2)
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise refuse(source, f"num_labels {n!r}: a classifier needs 2 or more labels")
        return [f"LABEL_{i}" for i in range(n)]
    if not isinstance(id2label, dict) or sorted(map(str, id2label)) != sorted(str(i) for i in range(len(id2label))):
        raise refuse(source, f"id2label {id2label!r} must map the ids 0..n-1 to label names")
    labels = [id2label.get(str(i), id2label.get(i)) for i in range(len(id2label))]
    for key, n in counts.items():
        if n != len(labels):
            raise refuse(source, f"{key} {n!r} disagrees with id2label's {len(labels)} labels {labels}")
    if not all(isinstance(label, str) for label in labels):
        raise refuse(source, f"id2label {id2label!r}: label names must be strings")
    return labels


def _pad_from_hf(hf: dict, vocab: int) -> dict:
    """tokenizer.special_tokens with config.json's pad_token_id as pad_id (HF pools each row
    at its last token that is not it), the other ids at our defaults (one moved to the smallest
    free id when pad takes it); empty when config.json has no usable pad_token_id."""
    pad = hf.get("pad_token_id")
    if isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < vocab:
        return {}
    defaults = {"unk_id": 1, "bos_id": 2, "eos_id": 3}
    taken = {pad, *defaults.values()}
    special = {"pad_id": pad}
    for name, index in defaults.items():
        if index == pad:
            index = next(i for i in range(vocab) if i not in taken)
            taken.add(index)
        special[name] = index
    return {"special_tokens": special}


def _classifier_from_hf(hf: dict, source: str) -> dict:
    """Our raw gpt_classifier config from a GPT2ForSequenceClassification config.json."""
    model = {**_decoder_from_hf(hf, source), "labels": _labels_from_hf(hf, source)}
    return _raw_config("gpt_classifier", model, hf, _pad_from_hf(hf, model["vocab_size"]))


def _gpt2_to_hf(config) -> dict:
    m, special = config.model, config.tokenizer.special_tokens
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": m.vocab_size, "n_embd": m.hidden_size, "n_layer": m.num_layers,
        "n_head": m.num_heads, "n_inner": m.intermediate_size, "n_positions": m.max_position_embeddings,
        "activation_function": m.activation, "layer_norm_epsilon": m.layer_norm_eps,
        "resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": m.attention_dropout,
        "initializer_range": m.initializer_range, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "bos_token_id": special.bos_id, "eos_token_id": special.eos_id,
        "pad_token_id": special.pad_id,
    }


def _classifier_to_hf(config) -> dict:
    """GPT2LMHeadModel's config.json as GPT2ForSequenceClassification, with the labels; its
    pad_token_id (our pad id) is how HF finds each row's last real token."""
    labels = list(config.model.labels)
    return {**_gpt2_to_hf(config), "architectures": [CLASSIFIER_ARCHITECTURE], "num_labels": len(labels),
            "id2label": {str(i): label for i, label in enumerate(labels)},
            "label2id": {label: i for i, label in enumerate(labels)}}


def _classifier_notes(hf: dict) -> list[str]:
    pad = hf.get("pad_token_id")
    notes = []
    if pad is None:
        notes.append("config.json has no pad_token_id: GPT2ForSequenceClassification then classifies one "
                     "row at a time (at its last token); ours pools at each row's last attention_mask 1")
    else:
        notes.append(f"GPT2ForSequenceClassification pools each row at its last token that is not "
                     f"pad_token_id {pad}, ours at its last attention_mask 1: the same when the padding is "
                     f"id {pad} and the text holds no id {pad} (taichu.classify's [bos] text [eos] rows)")
    id2label, label2id = hf.get("id2label"), hf.get("label2id")
    if isinstance(id2label, dict) and isinstance(label2id, dict) \
            and {v: int(k) for k, v in id2label.items()} != label2id:
        notes.append(f"label2id {label2id} disagrees with id2label; model.labels follows id2label")
    return notes


GPT2 = HFFamily("gpt2", "GPT2LMHeadModel", HFGPT2Codec, _gpt2_from_hf, _gpt2_to_hf)
GPT2_CLASSIFIER = HFFamily("gpt2", CLASSIFIER_ARCHITECTURE, HFGPT2ClassifierCodec, _classifier_from_hf,
                           _classifier_to_hf, _classifier_notes)

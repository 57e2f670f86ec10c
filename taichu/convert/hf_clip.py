"""Our CLIP <-> Hugging Face ``CLIPModel``: the tensor table, config.json both ways, and
where the two pool the text."""
from __future__ import annotations

import json

from taichu.config import ConfigError, validate_config
from taichu.convert.codec import HF_CONFIG, HFFamily, Step, StepCodec, refuse, rename

# Our CLIP <-> Hugging Face CLIPModel. Our modules mirror CLIPModel's, so the table is the
# identity except for CLIPVisionTransformer's misspelt pre-encoder LayerNorm.
CLIP_RENAMES = {"vision_model.pre_layernorm.": "vision_model.pre_layrnorm."}
# arange buffers that transformers saved with the weights before it made them
# non-persistent; CLIPModel rebuilds them, so they carry nothing.
CLIP_BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def _clip_hf_name(name: str) -> str:
    for ours, theirs in CLIP_RENAMES.items():
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


class HFCLIPCodec(StepCodec):
    def build_steps(self) -> list[Step]:
        return [rename(name, _clip_hf_name(name)) for name in self.specs]

    def harmless(self) -> set[str]:
        return set(CLIP_BUFFERS)


# transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults: save_pretrained
# writes only what differs from them, so a key a config.json lacks has this value.
CLIP_HF_DEFAULTS = {
    "text_config": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
                    "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
                    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
                    "initializer_range": 0.02, "pad_token_id": 1, "bos_token_id": 49406,
                    "eos_token_id": 49407},
    "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
                      "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
                      "initializer_range": 0.02},
    "projection_dim": 512, "logit_scale_init_value": 2.6592,
}
CLIP_ACTIVATIONS = ("quick_gelu", "gelu")   # HF's "gelu" is the exact erf GELU, as ours
# Held once in our config for both towers: the towers of a config.json must agree.
CLIP_SHARED = {"hidden_act": "activation", "layer_norm_eps": "layer_norm_eps",
               "attention_dropout": "attention_dropout", "initializer_range": "initializer_range"}
# eos_token_id 2 is the value of CLIP configs written before transformers PR #24773;
# CLIPTextTransformer then pools at each row's largest id instead of at the eos.
CLIP_LEGACY_EOS = 2


def _clip_towers(hf: dict, source: str) -> tuple[dict, dict]:
    towers = []
    for key in ("text_config", "vision_config"):
        # Old config.json files also carry ``text_config_dict``; transformers lets its
        # values win, and so do we.
        parts = [hf.get(key), hf.get(f"{key}_dict")]
        for part, name in zip(parts, (key, f"{key}_dict")):
            if part is not None and not isinstance(part, dict):
                raise refuse(source, f"{name} must be an object, got {part!r}")
        towers.append({**CLIP_HF_DEFAULTS[key], **(parts[0] or {}), **(parts[1] or {})})
    return towers[0], towers[1]


def _clip_from_hf(hf: dict, source: str) -> dict:
    """Our raw config from a CLIPModel config.json; what our CLIP cannot be is refused."""
    text, vision = _clip_towers(hf, source)

    def integer(tower: dict, key: str, where: str) -> int:
        value = tower[key]
        if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
            value = value[0]   # [n, n]: a square image or patch, which is all we have
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            square = "; images and patches are square here" if key in ("image_size", "patch_size") else ""
            raise refuse(source, f"{where}{key}: {value!r} is not supported (a positive integer{square})")
        return value

    def number(value, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise refuse(source, f"{where}: {value!r} is not a number")
        return float(value)

    shared = {}
    for key, ours in CLIP_SHARED.items():
        if text[key] != vision[key]:
            raise refuse(source, f"text_config.{key} {text[key]!r} and vision_config.{key} "
                                 f"{vision[key]!r} differ; our CLIP has one model.{ours} for both towers")
        shared[ours] = text[key]
    if shared["activation"] not in CLIP_ACTIVATIONS:
        raise refuse(source, f"hidden_act {shared['activation']!r} is not supported "
                             f"(supported: {', '.join(CLIP_ACTIVATIONS)})")
    for key, ours in CLIP_SHARED.items():
        if ours != "activation":
            shared[ours] = number(shared[ours], f"text_config.{key}")

    def tower(c: dict, where: str) -> dict:  # where: "text_config." or "vision_config."
        return {"hidden_size": integer(c, "hidden_size", where),
                "num_layers": integer(c, "num_hidden_layers", where),
                "num_heads": integer(c, "num_attention_heads", where),
                "intermediate_size": integer(c, "intermediate_size", where)}

    vocab = integer(text, "vocab_size", "text_config.")
    top = {**CLIP_HF_DEFAULTS, **hf}
    model = {
        "image": {**tower(vision, "vision_config."), "image_size": integer(vision, "image_size", "vision_config."),
                  "patch_size": integer(vision, "patch_size", "vision_config."),
                  "num_channels": integer(vision, "num_channels", "vision_config.")},
        "text": {**tower(text, "text_config."), "vocab_size": vocab,
                 "max_position_embeddings": integer(text, "max_position_embeddings", "text_config.")},
        "projection_dim": integer(top, "projection_dim", ""),
        "logit_scale_init": number(top["logit_scale_init_value"], "logit_scale_init_value"),
        **shared}
    raw = {"family": "clip", "model": model,
           "tokenizer": {"special_tokens": _clip_special_tokens(text, vocab, source)}}
    if vocab < 260:  # too small for 256 byte pieces; the tokenizer is not carried anyway
        raw["tokenizer"]["byte_fallback"] = False
    stored = hf.get("taichu_config")
    if isinstance(stored, dict) and stored.get("family") == "clip":
        # Written by us: keep its tokenizer, data and train sections when it describes
        # the model this config.json describes (it may have been edited since).
        try:
            same = _clip_to_hf(validate_config(json.loads(json.dumps(stored)), source)) == \
                _clip_to_hf(validate_config(json.loads(json.dumps(raw)), source))
        except ConfigError:
            same = False
        if same:
            raw = stored
    return raw


def _clip_special_tokens(text: dict, vocab: int, source: str) -> dict:
    """Our special token ids from text_config's: eos must survive (CLIPModel pools the text
    at it, so HF -> ours -> HF keeps the pooling); bos and pad when they fit."""
    eos = text["eos_token_id"]
    if isinstance(eos, bool) or not isinstance(eos, int) or not 0 <= eos < vocab:
        raise refuse(source, f"text_config.eos_token_id {eos!r} is not supported: CLIPModel pools "
                             f"each text at its first eos_token_id, so it must be one id in "
                             f"0..{vocab - 1} (vocab_size {vocab})")
    special = {"eos_id": eos}
    for ours, key in (("bos_id", "bos_token_id"), ("pad_id", "pad_token_id")):
        value = text.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab \
                and value not in special.values():
            special[ours] = value
    # unk (CLIP configs name none) and whatever did not fit: the smallest free ids. Our
    # ids must be distinct; none of these three affects what the model computes.
    free = (i for i in range(vocab) if i not in special.values())
    for ours in ("pad_id", "unk_id", "bos_id"):
        special.setdefault(ours, next(free))
    return special


def _clip_to_hf(config) -> dict:
    m, special = config.model, config.tokenizer.special_tokens
    shared = {"hidden_act": m.activation, "layer_norm_eps": m.layer_norm_eps,
              "attention_dropout": m.attention_dropout, "initializer_range": m.initializer_range,
              # HF scales its init stds by this; ours follow OpenAI CLIP's scheme unscaled.
              "initializer_factor": 1.0, "projection_dim": m.projection_dim}

    def tower(t) -> dict:
        return {"hidden_size": t.hidden_size, "intermediate_size": t.ffn_size,
                "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads, **shared}
    return {
        "architectures": ["CLIPModel"], "model_type": "clip",
        "projection_dim": m.projection_dim, "logit_scale_init_value": m.logit_scale_init,
        "initializer_factor": 1.0,
        "text_config": {"model_type": "clip_text_model", **tower(m.text), "vocab_size": m.text.vocab_size,
                        "max_position_embeddings": m.text.max_position_embeddings,
                        "bos_token_id": special.bos_id, "eos_token_id": special.eos_id,
                        "pad_token_id": special.pad_id},
        "vision_config": {"model_type": "clip_vision_model", **tower(m.image),
                          "image_size": m.image.image_size, "patch_size": m.image.patch_size,
                          "num_channels": m.image.num_channels},
    }


def _clip_notes(hf: dict) -> list[str]:
    """Where CLIPModel pools the text, against ours (the last real token of the
    right-padded attention_mask, or the last position without a mask)."""
    eos = _clip_towers(hf, HF_CONFIG)[0]["eos_token_id"]   # config.json was checked already
    if eos == CLIP_LEGACY_EOS:
        return [f"text pooling: CLIPModel with eos_token_id {eos} (its legacy rule) pools each text at "
                "the first occurrence of the row's largest id, taichu at the last real token of the "
                "right-padded attention_mask; they agree when that token's id is larger than every "
                "id before it and not smaller than any padding id after it"]
    return [f"text pooling: CLIPModel pools each text at its first token {eos} (eos_token_id), taichu at "
            "the last real token of the right-padded attention_mask; they agree when every text ends "
            f"with its first {eos}"]


CLIP = HFFamily("clip", "CLIPModel", HFCLIPCodec, _clip_from_hf, _clip_to_hf, _clip_notes)

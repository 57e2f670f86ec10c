"""Our vision backbone <-> Hugging Face ``ViTModel``: the tensor table and config.json both ways.

``ViTModel`` is a backbone (embeddings, pre-LN layers, final LayerNorm, optional pooler
tanh(dense(CLS)), optional mask token), so:
- reading a ViTModel gives a vision config of objective ``backbone``: the ViT alone under
  ``backbone.*``, with the pooler (ViTModel's default add_pooling_layer=True; a file saved
  without one needs the override ``model.pooler=false``) and no mask token (ViTModel's
  default use_mask_token=False; a file's ``embeddings.mask_token`` is read when the config
  has model.mask_token, ignored otherwise);
- writing a ``backbone`` model writes its ``backbone.*``; writing an ``mst`` model writes the
  teacher's backbone (``teacher.backbone.*``): the EMA weights, which DINO and MST evaluate
  and report. The student, the heads, the decoder and the centre are not carried; MST has no
  pooler (load with ``ViTModel.from_pretrained(dir, add_pooling_layer=False,
  use_mask_token=True)``); our full config rides along in config.json, and reading it back
  gives the backbone with that config's sizes.
HF's names are those of its files (``encoder.layer.{i}.attention.attention.query...``, what
save_pretrained writes and from_pretrained reads; transformers 5 renames them in memory).
Our names -> HF's is a renaming table (our layers are CLIP's: q_proj -> attention.attention.
query, layer_norm1 -> layernorm_before, mlp.fc1 -> intermediate.dense, ...).
"""
from __future__ import annotations

import json

import numpy as np

from taichu.config import ConfigError, config_to_dict, validate_config
from taichu.convert.codec import HFFamily, Step, StepCodec, refuse, rename
from taichu.convert.safetensors_io import Tensors
from taichu.weights import CheckpointError

# Ours (after the backbone prefix) -> ViTModel's, by prefix; {i} is the layer.
VIT_LAYER_RENAMES = {
    "self_attn.q_proj.": "attention.attention.query.",
    "self_attn.k_proj.": "attention.attention.key.",
    "self_attn.v_proj.": "attention.attention.value.",
    "self_attn.out_proj.": "attention.output.dense.",
    "layer_norm1.": "layernorm_before.",
    "layer_norm2.": "layernorm_after.",
    "mlp.fc1.": "intermediate.dense.",
    "mlp.fc2.": "output.dense.",
}
VIT_RENAMES = {
    "embeddings.cls_token": "embeddings.cls_token",
    "embeddings.mask_token": "embeddings.mask_token",
    "embeddings.position_embeddings": "embeddings.position_embeddings",
    "embeddings.patch_embedding.": "embeddings.patch_embeddings.projection.",
    "layer_norm.": "layernorm.",
    "pooler.dense.": "pooler.dense.",
}
MASK_TOKEN = "embeddings.mask_token"
# transformers' ViTConfig defaults: save_pretrained writes only what differs from them.
VIT_HF_DEFAULTS = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
    "initializer_range": 0.02, "layer_norm_eps": 1e-12, "image_size": 224, "patch_size": 16,
    "num_channels": 3, "qkv_bias": True, "encoder_stride": 16, "pooler_output_size": None, "pooler_act": "tanh",
}
# HF activation name -> ours ("gelu" is the exact erf GELU in both).
VIT_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new",
                   "quick_gelu": "quick_gelu", "relu": "relu"}


def backbone_prefix(config) -> str:
    """Which of our backbones is the ViTModel: the teacher's in an MST model."""
    return "teacher.backbone." if config.model.objective == "mst" else "backbone."


def vit_hf_name(name: str) -> str:
    """A backbone tensor's name (without our prefix) as ViTModel's."""
    if name.startswith("encoder.layers."):
        index, _, rest = name[len("encoder.layers."):].partition(".")
        for ours, theirs in VIT_LAYER_RENAMES.items():
            if rest.startswith(ours):
                return f"encoder.layer.{index}.{theirs}{rest[len(ours):]}"
    for ours, theirs in VIT_RENAMES.items():
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise KeyError(f"no Hugging Face ViTModel name for {name!r}")


class HFViTCodec(StepCodec):
    def build_steps(self) -> list[Step]:
        prefix = backbone_prefix(self.config)
        return [rename(name, vit_hf_name(name[len(prefix):])) for name in self.specs if name.startswith(prefix)]

    def harmless(self) -> set[str]:
        # ViTModel(use_mask_token=True) files carry a mask token; a config without one
        # ignores it.
        return set() if self.config.model.mask_token else {MASK_TOKEN}

    def to_canonical(self, tensors: Tensors) -> Tensors:
        if self.config.model.objective != "backbone":
            raise CheckpointError("a Hugging Face ViTModel holds a backbone only: read it as a vision config "
                                  "of objective backbone (what its config.json gives), not mst")
        return super().to_canonical(tensors)


def _vit_from_hf(hf: dict, source: str) -> dict:
    """Our raw config (objective backbone) from a ViTModel config.json; what our backbone
    cannot be is refused naming the key."""
    c = {**VIT_HF_DEFAULTS, **hf}

    def integer(key: str) -> int:
        value = c[key]
        if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
            value = value[0]   # [n, n]: a square image or patch, which is all we have
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            square = "; images and patches are square here" if key in ("image_size", "patch_size") else ""
            raise refuse(source, f"{key}: {value!r} is not supported (a positive integer{square})")
        return value

    def number(key: str) -> float:
        value = c[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise refuse(source, f"{key}: {value!r} is not a number")
        return float(value)

    act = c["hidden_act"]
    if act not in VIT_ACTIVATIONS:
        raise refuse(source, f"hidden_act {act!r} is not supported (supported: {', '.join(VIT_ACTIVATIONS)})")
    hidden = integer("hidden_size")
    if c["pooler_output_size"] not in (None, hidden):
        raise refuse(source, f"pooler_output_size {c['pooler_output_size']!r}: our pooler keeps the width "
                             f"(hidden_size {hidden})")
    if c["pooler_act"] != "tanh":
        raise refuse(source, f"pooler_act {c['pooler_act']!r}: our pooler is tanh")
    if not isinstance(c["qkv_bias"], bool):
        raise refuse(source, f"qkv_bias {c['qkv_bias']!r} is not a boolean")
    if number("hidden_dropout_prob") != 0.0:
        raise refuse(source, f"hidden_dropout_prob {c['hidden_dropout_prob']}: our backbone has no hidden "
                             "dropout (set it to 0; it changes training only)")
    model = {"objective": "backbone", "image_size": integer("image_size"), "patch_size": integer("patch_size"),
             "num_channels": integer("num_channels"), "hidden_size": hidden,
             "num_layers": integer("num_hidden_layers"), "num_heads": integer("num_attention_heads"),
             "intermediate_size": integer("intermediate_size"), "activation": VIT_ACTIVATIONS[act],
             "layer_norm_eps": number("layer_norm_eps"), "qkv_bias": c["qkv_bias"],
             "attention_dropout": number("attention_probs_dropout_prob"), "pooler": True, "mask_token": False,
             "initializer_range": number("initializer_range")}
    raw = {"family": "vision", "model": model}
    stored = hf.get("taichu_config")
    if isinstance(stored, dict) and stored.get("family") == "vision":
        # Written by us. From an MST model: its backbone (no pooler, a mask token); from a
        # backbone model: its own config. Kept when it describes this config.json's model.
        try:
            kept = validate_config(json.loads(json.dumps(stored)), source)
            if kept.model.objective == "mst":
                backbone = {**config_to_dict(kept)["model"], "objective": "backbone", "pooler": False}
                kept = validate_config({**config_to_dict(kept), "model": backbone}, source)
            same = _vit_to_hf(kept) == _vit_to_hf(validate_config(json.loads(json.dumps(raw)), source))
        except ConfigError:
            same = False
        if same:
            raw = config_to_dict(kept)
    return raw


def _vit_to_hf(config) -> dict:
    m = config.model
    return {"architectures": ["ViTModel"], "model_type": "vit", "hidden_size": m.hidden_size,
            "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
            "intermediate_size": m.ffn_size, "hidden_act": m.activation, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": m.attention_dropout, "initializer_range": m.initializer_range,
            "layer_norm_eps": m.layer_norm_eps, "image_size": m.image_size, "patch_size": m.patch_size,
            "num_channels": m.num_channels, "qkv_bias": m.qkv_bias, "pooler_output_size": m.hidden_size,
            "pooler_act": "tanh"}


def _vit_notes(hf: dict) -> list[str]:
    return ["ViTModel is the backbone alone: from an MST model the teacher's backbone is written (the EMA "
            "weights DINO/MST evaluate), without pooler (ViTModel.from_pretrained(..., add_pooling_layer=False, "
            "use_mask_token=True)); student, heads, decoder and centre are not carried; a ViTModel reads "
            "as objective backbone"]


VIT = HFFamily("vit", "ViTModel", HFViTCodec, _vit_from_hf, _vit_to_hf, _vit_notes)


def hf_state_dict(config, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our canonical arrays -> a ViTModel state_dict (numpy), in memory."""
    tensors = HFViTCodec(config).from_canonical(Tensors.from_arrays(arrays))
    return {name: tensors.read(name) for name in tensors.shapes}

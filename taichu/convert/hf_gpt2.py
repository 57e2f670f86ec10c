"""Our GPT <-> Hugging Face ``GPT2LMHeadModel``: the tensor table and config.json both ways."""
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


class HFGPT2Codec(StepCodec):
    def build_steps(self) -> list[Step]:
        if not self.config.model.bias:
            raise CheckpointError("GPT2LMHeadModel always has biases; model.bias: false cannot be "
                                  "converted to Hugging Face")
        layers = self.config.model.num_layers
        return list(GPT2_STEPS) + [s.layer(i) for i in range(layers) for s in GPT2_LAYER_STEPS]

    def adapt(self, tensors: Tensors) -> Tensors:
        """Files saved from GPT2Model (the hub's gpt2) lack the ``transformer.`` prefix."""
        if "wte.weight" not in tensors.shapes:
            return tensors
        rename = {n: n if n in GPT2_TIED else f"transformer.{n}" for n in tensors.shapes}
        back = {v: k for k, v in rename.items()}
        return Tensors({rename[k]: v for k, v in tensors.shapes.items()},
                       {rename[k]: v for k, v in tensors.dtypes.items()}, lambda n: tensors.read(back[n]))

    def harmless(self) -> set[str]:
        buffers = {b.format(i=i) for i in range(self.config.model.num_layers) for b in GPT2_BUFFERS}
        return buffers | set(GPT2_TIED)

    def check(self, tensors: Tensors, source: str) -> None:
        super().check(tensors, source)
        for tied, origin in GPT2_TIED.items():
            if tied in tensors.shapes:
                a, b = tensors.read(tied), tensors.read(origin)
                if a.shape != b.shape or a.dtype != b.dtype or a.tobytes() != b.tobytes():
                    raise CheckpointError(f"{source}: {tied} differs from {origin}; our GPT ties "
                                          "them, so an untied model cannot be converted")


_HF_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


def _gpt2_from_hf(hf: dict, source: str) -> dict:
    """Our raw config from a GPT2LMHeadModel config.json; HF features we lack are refused."""
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
        n_positions = int(hf.get("n_positions", hf.get("n_ctx", 1024)))
        vocab = int(hf["vocab_size"])
        model = {"vocab_size": vocab, "hidden_size": int(hf["n_embd"]), "num_layers": int(hf["n_layer"]),
                 "num_heads": int(hf["n_head"]), "intermediate_size": hf.get("n_inner"),
                 "max_position_embeddings": n_positions,
                 "activation": _HF_ACTIVATIONS[activation],
                 "layer_norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
                 # One dropout rate for embeddings and residuals; inference ignores both.
                 "dropout": float(hf.get("resid_pdrop", 0.1)),
                 "attention_dropout": float(hf.get("attn_pdrop", 0.1)),
                 "bias": True, "initializer_range": float(hf.get("initializer_range", 0.02))}
    except (KeyError, TypeError, ValueError) as err:
        raise refuse(source, f"not a usable GPT-2 config.json: {err!r}") from None
    raw = {"family": "gpt", "model": model, "data": {"seq_len": min(128, n_positions)}}
    if vocab < 260:  # too small for 256 byte pieces; the tokenizer is not carried anyway
        raw["tokenizer"] = {"byte_fallback": False}
    stored = hf.get("taichu_config")
    if isinstance(stored, dict) and stored.get("model") == model:
        raw = stored  # written by us: keeps the tokenizer, data and train sections
    return raw


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


GPT2 = HFFamily("gpt2", "GPT2LMHeadModel", HFGPT2Codec, _gpt2_from_hf, _gpt2_to_hf)

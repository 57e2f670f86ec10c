"""Weight conversion: our model directories <-> MindSpore <-> PyTorch <-> Hugging Face.

One module per foreign format, imported one way (no cycles):

  safetensors_io   Tensors (lazy, streamed), dtypes, safetensors read/write
  codec            Codec / Step / StepCodec, HFFamily
  mindspore_ckpt   MindSpore .ckpt read/write, MindSporeCodec
  hf_gpt2          GPT2LMHeadModel: tensor table, config.json both ways
  hf_clip          CLIPModel: tensor table, config.json both ways, text pooling notes
  hf_vit           ViTModel: the vision family's backbone, tensor table, config.json both ways
  hf_tokenizer     our SentencePiece model <-> a Hugging Face tokenizer.json
  core             format detection, open_source / load / write / convert, the CLI

This package re-exports the public API, so ``from taichu import convert; convert.load(...)``
works as it did when conversion was one module.
"""
from taichu.convert.codec import HF_CONFIG, Codec, HFFamily, Step, StepCodec
from taichu.convert.core import (DTYPES, FORMATS, HF_FAMILIES, TOKENIZER_FILE, Source, cli_convert, config_to_hf,
                                 convert, detect_format, hf_codec, hf_to_config, load, load_model, open_source,
                                 save, to_canonical, write)
from taichu.convert.hf_clip import CLIP_HF_DEFAULTS, CLIP_RENAMES, HFCLIPCodec
from taichu.convert.hf_gpt2 import GPT2_LAYER_STEPS, GPT2_STEPS, HFGPT2Codec
from taichu.convert.hf_vit import HFViTCodec
from taichu.convert.mindspore_ckpt import MindSporeCodec, read_ckpt, write_ckpt
from taichu.convert.safetensors_io import FLOAT_DTYPES, Tensors, read_safetensors, write_safetensors

__all__ = ["FORMATS", "DTYPES", "FLOAT_DTYPES", "TOKENIZER_FILE", "HF_CONFIG", "Tensors", "Source", "detect_format",
           "open_source", "load", "save", "write", "convert", "load_model", "cli_convert", "read_safetensors",
           "write_safetensors", "read_ckpt", "write_ckpt", "hf_to_config", "config_to_hf", "hf_codec",
           "to_canonical", "Codec", "StepCodec", "Step", "MindSporeCodec", "HFFamily", "HF_FAMILIES",
           "HFGPT2Codec", "HFCLIPCodec", "GPT2_STEPS", "GPT2_LAYER_STEPS", "CLIP_RENAMES", "CLIP_HF_DEFAULTS", "HFViTCodec"]

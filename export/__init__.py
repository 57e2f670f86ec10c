"""Deployment: ONNX (from PyTorch) and MINDIR (from MindSpore) export, validated against the
source model, ONNX Runtime generation (GPT), embedding (image-text towers), speech
recognition (wav2vec2: ``export.speech_network``), image features (vision:
``export.vision_network``), text-to-image generation steps (DALL-E: ``export.dalle_network``),
codes -> images (vqvae: ``export.image_decoder_network``), M6 generation steps (captions,
answers, text, image codes: ``export.m6_network``), GPT-XL generation without a window
(``export.gpt_xl_network``) and text classification (gpt_classifier:
``export.classifier_network``).

``export.OnnxGenerator`` needs only numpy, onnxruntime and sentencepiece,
``export.OnnxImageTextEncoder`` those and pillow; ``export.MindirGenerator`` and
``export.MindirImageTextEncoder`` mindspore but no model code; the exporters import their
framework when called. Names load on first use.
"""
import importlib

_LAZY = {"OnnxGenerator": "export.runtime", "OnnxDecoder": "export.runtime",
         "OnnxImageTextEncoder": "export.runtime_encoders", "OnnxGraph": "export.runtime",
         "export_model": "export.exporter", "ExportValidationError": "export.validate",
         "MindirDecoder": "export.mindir_export", "MindirGraph": "export.mindir_export",
         "MindirGenerator": "export.runtime", "MindirImageTextEncoder": "export.runtime_encoders",
         "ImageTextEncoder": "export.runtime_encoders", "export_embedder": "export.runtime_encoders", "ExportGenerator": "export.runtime",
         "SpeechNetwork": "export.runtime_encoders", "speech_network": "export.runtime_encoders",
         "VisionNetwork": "export.runtime_encoders", "vision_network": "export.runtime_encoders",
         "DalleNetwork": "export.runtime_dalle", "dalle_network": "export.runtime_dalle",
         "ImageDecoderNetwork": "export.runtime_dalle", "image_decoder_network": "export.runtime_dalle",
         "M6Network": "export.runtime_m6", "m6_network": "export.runtime_m6",
         "GPTXLNetwork": "export.runtime_gpt_xl", "gpt_xl_network": "export.runtime_gpt_xl",
         "ClassifierNetwork": "export.runtime_classifier", "classifier_network": "export.runtime_classifier"}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")

"""The two towers of a PyTorch image-text model as modules of their own, for torch.onnx.

torch.onnx.export (dynamo) exports a module's ``forward``; an image-text model's ``forward`` takes
both modalities and returns logits, while a retrieval index embeds images and texts apart.
These wrappers trace ``get_image_features`` and ``get_text_features`` instead, the methods
every image-text family has (torch_impl/clip.py; BriVL likewise). The models skip their
numpy input checks while exported (torch.onnx.is_in_onnx_export), so the graphs hold no host round
trip; export.runtime checks its inputs before running a graph.
"""
from __future__ import annotations

from torch import nn


class ImageEncoder(nn.Module):
    """pixel_values [batch, channels, size, size] -> image_embeds [batch, dim]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.get_image_features(pixel_values)


class TextEncoder(nn.Module):
    """input_ids, attention_mask [batch, sequence] (right-padded) -> text_embeds [batch, dim]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.get_text_features(input_ids, attention_mask)

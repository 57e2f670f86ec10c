"""The two towers of a PyTorch image-text model, a speech model's encoder and a vision model's
backbone, as modules of their own, for torch.onnx.

torch.onnx.export (dynamo) exports a module's ``forward``; an image-text model's ``forward`` takes
both modalities and returns logits, while a retrieval index embeds images and texts apart.
These wrappers trace ``get_image_features`` and ``get_text_features`` instead, the methods
every image-text family has (torch_impl/clip.py; BriVL likewise). The models skip their
numpy input checks while exported (torch.onnx.is_in_onnx_export), so the graphs hold no host round
trip; export.runtime checks its inputs before running a graph.

A tri-modal model's speech tower is traced the same way, through ``get_speech_features``
(``SpeechTower``), whose host-side checks are skipped while exported too.

A wav2vec2 model's ``forward`` gives the CTC logits (or, without a CTC head, the hidden states)
and ``embed`` the utterance embedding, each running the encoder. ``SpeechEncoder`` runs it
once (``encode``, which has no host-side checks: nothing in the graph copies to numpy) and
returns what both give (export/signature.py, ``speech_graph``).

A vision model's ``forward`` runs the student's backbone after a host-side shape check
(skipped while exported); DINO/MST evaluate the teacher's. ``VisionEncoder`` calls the exported
backbone (signature.vision_backbone) itself, which has no host-side check, and pools as
``forward`` does.

A DALL-E generates over its KV cache: ``DallePrefill`` runs the caption (``forward(input_ids,
None, None, True)``) and returns the first code's logits and the cache; ``DalleDecoder`` runs
codes after a past (``forward(None, image_codes, past, True)``), the codes' grid positions
taken from the past's length, symbolic in the exported graph. The model's numpy input checks
are skipped while exported (torch.onnx.is_in_onnx_export); export.runtime.dalle_network checks.

An image tokenizer (vqvae) exports ``VQVAE.decode`` (``CodeDecoder``) and ``VQVAE.encode``
(``CodeEncoder``); neither has host-side checks.
"""
from __future__ import annotations

from torch import nn

from export.signature import vision_backbone
from torch_impl.wav2vec2 import mean_over_frames


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


class SpeechTower(nn.Module):
    """input_values float32, attention_mask int64 [batch, samples] (right-padded) ->
    speech_embeds [batch, dim]: a tri-modal model's ``get_speech_features``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_values, attention_mask):
        return self.model.get_speech_features(input_values, attention_mask)


class SpeechEncoder(nn.Module):
    """input_values float32, attention_mask int64 [batch, samples] (right-padded) ->
    last_hidden_state [batch, frames, hidden], embedding [batch, hidden] and, with the CTC
    head, logits [batch, frames, vocab]: ``Wav2Vec2.encode`` once, then what ``embed`` (the
    mean over each row's real frames) and ``forward`` (lm_head) compute from it."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.ctc = model.head == "ctc"

    def forward(self, input_values, attention_mask):
        hidden, _, frame_mask, _ = self.model.encode(input_values, attention_mask)
        embedding = mean_over_frames(hidden, frame_mask)
        if self.ctc:
            return hidden, embedding, self.model.lm_head(self.model.dropout(hidden))
        return hidden, embedding


class VisionEncoder(nn.Module):
    """pixel_values float32 [batch, channels, size, size] -> last_hidden_state [batch,
    1 + patches, hidden], pooler_output [batch, hidden] (the pooler's, else the CLS state)."""

    def __init__(self, model):
        super().__init__()
        self.backbone = vision_backbone(model)

    def forward(self, pixel_values):
        hidden = self.backbone(pixel_values)[0]
        pooler = self.backbone.pooler
        return hidden, (pooler(hidden) if pooler is not None else hidden[:, 0])


def _flat(presents) -> tuple:
    """(key 0, value 0, key 1, ...) of per-layer (key, value) pairs."""
    return tuple(t for key_value in presents for t in key_value)


class DallePrefill(nn.Module):
    """input_ids [batch, text_length] -> logits [batch, codebook] (the first image code's),
    present key and value of each layer [batch, heads, text_length, head_dim]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        _, logits, presents = self.model(input_ids, None, None, True)
        return (logits[:, -1],) + _flat(presents)


class DalleDecoder(nn.Module):
    """image_codes [batch, sequence], past key and value of each layer [batch, heads, past,
    head_dim] -> logits [batch, sequence, codebook], present key and value of each layer
    [batch, heads, past + sequence, head_dim]."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.num_layers = model.config.model.num_layers

    def forward(self, image_codes, *past):
        past_key_values = tuple((past[2 * i], past[2 * i + 1]) for i in range(self.num_layers))
        _, logits, presents = self.model(None, image_codes, past_key_values, True)
        return (logits,) + _flat(presents)


class CodeDecoder(nn.Module):
    """codes [batch, grid, grid] -> pixel_values [batch, 3, size, size] (normalised)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, codes):
        return self.model.decode(codes)


class CodeEncoder(nn.Module):
    """pixel_values [batch, 3, size, size] (normalised) -> codes [batch, grid, grid] int64."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.encode(pixel_values)

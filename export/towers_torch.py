"""The two towers of a PyTorch image-text model, a speech model's encoder and a vision model's
backbone, as modules of their own, for torch.onnx.

torch.onnx.export (dynamo) exports a module's ``forward``; an image-text model's ``forward`` takes
both modalities and returns logits, while a retrieval index embeds images and texts apart.
These wrappers trace ``get_image_features`` and ``get_text_features`` instead, the methods
every image-text family has (torch_impl/clip.py; BriVL likewise). The models skip their
numpy input checks while exported (torch.onnx.is_in_onnx_export), so the graphs hold no host round
trip; export.runtime checks its inputs before running a graph.

A wav2vec2 model's ``forward`` gives the CTC logits (or, without a CTC head, the hidden states)
and ``embed`` the utterance embedding, each running the encoder. ``SpeechEncoder`` runs it
once (``encode``, which has no host-side checks: nothing in the graph copies to numpy) and
returns what both give (export/signature.py, ``speech_graph``).

A vision model's ``forward`` runs the student's backbone after a host-side shape check
(skipped while exported); DINO/MST evaluate the teacher's. ``VisionEncoder`` calls the exported
backbone (signature.vision_backbone) itself, which has no host-side check, and pools as
``forward`` does.
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

"""The two towers of a PyTorch image-text model, a speech model's encoder and a vision model's
backbone, as modules of their own, for torch.onnx.

torch.onnx.export (dynamo) exports a module's ``forward``; an image-text model's ``forward`` takes
both modalities and returns logits, while a retrieval index embeds images and texts apart.
These wrappers trace ``get_image_features`` and ``get_text_features`` instead, the methods
every image-text family has (torch_impl/clip.py; BriVL likewise). The models skip their
numpy input checks while exported (torch.onnx.is_in_onnx_export), so the graphs hold no host round
trip; export.runtime_encoders checks its inputs before running a graph.

A tri-modal model's speech tower is traced the same way, through ``get_speech_features``
(``SpeechTower``), whose host-side checks are skipped while exported too.

A wav2vec2 model's ``forward`` gives the CTC logits (or, without a CTC head, the hidden states)
and ``embed`` the utterance embedding, each running the encoder. ``SpeechEncoder`` runs it
once (``encode``, which has no host-side checks: nothing in the graph copies to numpy) and
returns what both give (export/signature_encoders.py, ``speech_graph``).

A vision model's ``forward`` runs the student's backbone after a host-side shape check
(skipped while exported); DINO/MST evaluate the teacher's. ``VisionEncoder`` calls the exported
backbone (signature_encoders.vision_backbone) itself, which has no host-side check, and pools as
``forward`` does.

A DALL-E generates over its KV cache: ``DallePrefill`` runs the caption (``forward(input_ids,
None, None, True)``) and returns the first code's logits and the cache; ``DalleDecoder`` runs
codes after a past (``forward(None, image_codes, past, True)``), the codes' grid positions
taken from the past's length, symbolic in the exported graph. The model's numpy input checks
are skipped while exported (torch.onnx.is_in_onnx_export); export.runtime_dalle.dalle_network checks.

An image tokenizer (vqvae) exports ``VQVAE.decode`` (``CodeDecoder``) and ``VQVAE.encode``
(``CodeEncoder``); neither has host-side checks.

An M6 exports its patch embeddings (``M6ImageEncoder``: the patch ResNet plus the patch
positions, the image's term of ``M6.embeddings``) and one decoder over a KV cache
(``M6Decoder``, ``M6TextDecoder`` for a model without a codebook): ``M6.embeddings`` of the
text and the code slots, the patch embeddings in front with their segments', the blocks under
``prefix_lm_bias`` with the past, ``ln_f``, and each head at the last position of its kind in
the call (zeros where the call has none: a one-hot row sum, so the graph holds no branch on
a size), export/signature_m6.py's ``decoder``. The layer loop is ``M6.forward``'s without its
host-side checks (export.runtime_m6.m6_network checks).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from export.signature_encoders import vision_backbone
from torch_impl.m6 import prefix_lm_bias
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


class M6ImageEncoder(nn.Module):
    """pixel_values [batch, channels, size, size] -> patch_embeds [batch, patches, hidden]:
    the patch ResNet's features plus the patch positions (M6.embeddings' image term)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.patch_encoder(pixel_values) + self.model.embed_patch_positions.weight


class M6TextDecoder(nn.Module):
    """patch_embeds [batch, patches, hidden], input_ids [batch, sequence], segment_ids
    [batch, past + patches + sequence], past key and value of each layer [batch, heads,
    past, head_dim] -> logits [batch, vocab] (at the last text position; zeros without
    text), present key and value of each layer [batch, heads, total, head_dim]. Any of
    patches, sequence and past may be 0."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.num_layers = model.config.model.num_layers

    def forward(self, patch_embeds, input_ids, segment_ids, *past):
        return self.run(patch_embeds, input_ids, None, segment_ids, past)

    def run(self, patch_embeds, input_ids, image_codes, segment_ids, past):
        model = self.model
        # The text and the code slots as M6.embeddings makes them, the patches in front.
        rest = model.embeddings(None, input_ids, image_codes, segment_ids)
        total, patches = segment_ids.shape[1], patch_embeds.shape[1]
        start = total - patches - rest.shape[1]
        x = torch.cat((patch_embeds + model.embed_segments(segment_ids[:, start:start + patches]), rest), dim=1)
        x = model.dropout(x)
        length = x.shape[1]
        attention_bias = prefix_lm_bias(segment_ids, length, x.dtype)
        presents = ()
        for i, layer in enumerate(model.layers):
            x, key_value = layer(x, attention_bias, (past[2 * i], past[2 * i + 1]))
            presents = presents + key_value
        hidden = model.ln_f(x)
        # The last position of each kind among the new ones (patches, text, codes in this
        # order): a one-hot row, all zeros where the call has none of that kind.
        slots = torch.arange(length, device=x.device)
        text_end = length - (0 if image_codes is None else image_codes.shape[1])
        last_text = ((slots == text_end - 1) & (slots >= patches)).to(hidden.dtype)
        outputs = (F.linear((hidden * last_text[None, :, None]).sum(dim=1), model.embed_text.weight),)
        if image_codes is not None:
            last_code = ((slots == length - 1) & (slots >= text_end)).to(hidden.dtype)
            outputs = outputs + (model.code_head((hidden * last_code[None, :, None]).sum(dim=1)),)
        return outputs + presents


class M6Decoder(M6TextDecoder):
    """M6TextDecoder with image_codes [batch, codes] after input_ids and code_logits [batch,
    codebook] (at the last code slot; zeros without codes) after logits: a model with a
    codebook."""

    def forward(self, patch_embeds, input_ids, image_codes, segment_ids, *past):
        return self.run(patch_embeds, input_ids, image_codes, segment_ids, past)

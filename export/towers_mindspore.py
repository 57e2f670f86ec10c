"""The two towers of a MindSpore image-text model, a speech model's encoder and a vision
model's backbone, as cells of their own, for ms.export.

``ms.export`` compiles a cell's ``construct``; an image-text model's ``construct`` takes
both modalities and returns logits, while a retrieval index embeds images and texts apart.
These cells compile ``get_image_features`` and ``get_text_features`` instead, the methods
every image-text family has (mindspore_impl/clip.py; BriVL likewise).

Those methods first run the model's host-side input checks (``_check``: numpy copies of
the ids, Python exceptions). Compiled into a graph they become a ``raise`` primitive
whose shape MindSpore cannot infer when the MINDIR is loaded ("Get infer shape function
failed, primitive name:raise"), so ``input_checks_off`` hides them while the graph is
compiled; the MINDIR's caller checks its inputs (as export.runtime_encoders does for ONNX).

A tri-modal model's ``get_*_features`` run their host-side checks as module functions
(taichu.families.clip.check_inputs, taichu.families.wav2vec2.check_inputs on the model's
pydantic config), which no per-instance switch can hide and a graph cannot compile. Its
towers (``TriModalImageTower``, ``TriModalTextTower``, ``TriModalSpeechTower``) therefore
compile what those methods compute after their checks, from the model's own sub-cells
(tower, then projection; the speech tower's mean over real frames), and export validation
holds each graph to the model's ``get_*_features`` (export.validate.tower_runner).

A wav2vec2 model checks its inputs in ``__call__`` and ``embed`` (not in ``construct`` or
``encode``). ``SpeechEncoder`` compiles ``encode`` once and what ``embed`` and ``construct``
compute from its hidden states, so no check is compiled in and none needs hiding; export.runtime_encoders
checks a speech graph's inputs (SpeechNetwork.check).

A vision model's backbone (``ViT.construct``) has no checks either; ``VisionEncoder`` compiles
the exported one (signature_encoders.vision_backbone: an MST model's teacher) and pools as the model's
``construct`` does; export.runtime_encoders checks the pixels (VisionNetwork.check).

A DALL-E's MINDIR generates over a static cache, as the GPT's does: the model's own
``StaticCachePrefill`` / ``StaticCacheDecoder`` (mindspore_impl/dalle.py, also what
``taichu imagine --backend mindspore`` compiles). The caller (export.runtime_dalle.dalle_network)
checks codes and positions.

An image tokenizer (vqvae) compiles ``decode`` (``CodeDecoder``) and ``encode`` (``CodeEncoder``),
neither of which has host-side checks.
"""
from __future__ import annotations

import contextlib

from mindspore import nn

from export.signature_encoders import vision_backbone
from mindspore_impl.wav2vec2 import mean_over_frames


class ImageEncoder(nn.Cell):
    """pixel_values [batch, channels, size, size] -> image_embeds [batch, dim]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, pixel_values):
        return self.model.get_image_features(pixel_values)


class TextEncoder(nn.Cell):
    """input_ids, attention_mask [batch, sequence] int32, right-padded -> text_embeds."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, input_ids, attention_mask):
        return self.model.get_text_features(input_ids, attention_mask)


class TriModalImageTower(nn.Cell):
    """pixel_values [batch, channels, size, size] -> image_embeds [batch, dim]: a tri-modal
    model's ``get_image_features`` without its host-side check."""

    def __init__(self, model):
        super().__init__()
        self.vision_model, self.visual_projection = model.vision_model, model.visual_projection

    def construct(self, pixel_values):
        return self.visual_projection(self.vision_model(pixel_values))


class TriModalTextTower(nn.Cell):
    """input_ids, attention_mask int32 [batch, sequence], right-padded -> text_embeds
    [batch, dim]: a tri-modal model's ``get_text_features`` without its host-side check."""

    def __init__(self, model):
        super().__init__()
        self.text_model, self.text_projection = model.text_model, model.text_projection

    def construct(self, input_ids, attention_mask):
        return self.text_projection(self.text_model(input_ids, attention_mask))


class TriModalSpeechTower(nn.Cell):
    """input_values float32, attention_mask int32 [batch, samples] (right-padded) ->
    speech_embeds [batch, dim]: a tri-modal model's ``get_speech_features`` without its
    host-side check (the projected mean of the last hidden states over real frames)."""

    def __init__(self, model):
        super().__init__()
        self.wav2vec2, self.speech_projection = model.wav2vec2, model.speech_projection

    def construct(self, input_values, attention_mask):
        # Indexed, not unpacked: outputs nobody reads would be "side effect nodes" to graph
        # mode (mindspore_impl/wav2vec2.py).
        encoded = self.wav2vec2(input_values, attention_mask)
        return self.speech_projection(mean_over_frames(encoded[0], encoded[3]))


class SpeechEncoder(nn.Cell):
    """input_values float32, attention_mask int32 [batch, samples] (right-padded) ->
    last_hidden_state [batch, frames, hidden], embedding [batch, hidden] and, with the CTC
    head, logits [batch, frames, vocab] (export/signature_encoders.py, ``speech_graph``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.ctc = model.head == "ctc"

    def construct(self, input_values, attention_mask):
        hidden, _, frame_mask, _ = self.model.encode(input_values, attention_mask)
        embedding = mean_over_frames(hidden, frame_mask)
        if self.ctc:
            return hidden, embedding, self.model.lm_head(self.model.dropout(hidden))
        return hidden, embedding


class VisionEncoder(nn.Cell):
    """pixel_values float32 [batch, channels, size, size] -> last_hidden_state [batch,
    1 + patches, hidden], pooler_output [batch, hidden] (the pooler's, else the CLS state)."""

    def __init__(self, model):
        # No auto prefix: holding the backbone would otherwise rename its parameters
        # ("backbone." + path), and an MST teacher's would take its student's names.
        super().__init__(auto_prefix=False)
        self.backbone = vision_backbone(model)

    def construct(self, pixel_values):
        hidden = self.backbone(pixel_values)[0]
        if self.backbone.pooler is not None:
            return hidden, self.backbone.pooler(hidden)
        return hidden, hidden[:, 0]


def _no_input_checks(pixel_values=None, input_ids=None, attention_mask=None):
    return None


@contextlib.contextmanager
def input_checks_off(model):
    """While compiling: the model's ``_check`` is a no-op on this instance only, restored
    after (the class and other instances keep theirs). A model without ``_check`` is left
    as it is."""
    if not hasattr(model, "_check"):
        yield
        return
    model._check = _no_input_checks
    try:
        yield
    finally:
        del model._check


class CodeDecoder(nn.Cell):
    """codes int32 [batch, grid, grid] -> pixel_values [batch, 3, size, size] (normalised)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, codes):
        return self.model.decode(codes)


class CodeEncoder(nn.Cell):
    """pixel_values [batch, 3, size, size] (normalised) -> codes int32 [batch, grid, grid]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, pixel_values):
        return self.model.encode(pixel_values)

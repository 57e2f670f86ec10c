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
compiled; the MINDIR's caller checks its inputs (as export.runtime does for ONNX).

A wav2vec2 model checks its inputs in ``__call__`` and ``embed`` (not in ``construct`` or
``encode``). ``SpeechEncoder`` compiles ``encode`` once and what ``embed`` and ``construct``
compute from its hidden states, so no check is compiled in and none needs hiding; export.runtime
checks a speech graph's inputs (SpeechNetwork.check).

A vision model's backbone (``ViT.construct``) has no checks either; ``VisionEncoder`` compiles
the exported one (signature.vision_backbone: an MST model's teacher) and pools as the model's
``construct`` does; export.runtime checks the pixels (VisionNetwork.check).

A DALL-E's MINDIR generates over a static cache, as the GPT's does (mindspore_impl.gpt's
StaticCachePrefill / StaticCacheDecoder): ``DallePrefill`` compiles ``construct(input_ids,
None, None, True)`` (the model's ``__call__``, which holds its numpy checks, is not what graph
mode compiles for a sub-cell) and returns the first code's logits and the text's keys and
values; ``DalleStaticDecoder`` writes one code's key and value at slot ``write_position`` of a
cache of fixed length (the GPT blocks' ``cache_slot``) and attends to the slots up to it, the
code's grid position being write_position - text_length: a tensor, so one compiled graph serves
every step. The caller (export.runtime.dalle_network) checks codes and positions.

An image tokenizer (vqvae) compiles ``decode`` (``CodeDecoder``) and ``encode`` (``CodeEncoder``),
neither of which has host-side checks.
"""
from __future__ import annotations

import contextlib

import mindspore as ms
from mindspore import nn, ops

from export.signature import vision_backbone
from mindspore_impl.gpt import causal_attention_bias
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


class SpeechEncoder(nn.Cell):
    """input_values float32, attention_mask int32 [batch, samples] (right-padded) ->
    last_hidden_state [batch, frames, hidden], embedding [batch, hidden] and, with the CTC
    head, logits [batch, frames, vocab] (export/signature.py, ``speech_graph``)."""

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


class DallePrefill(nn.Cell):
    """input_ids int32 [batch, text_length] -> logits [batch, codebook] (the first image
    code's), key and value of each layer [batch, heads, text_length, head_dim]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, input_ids):
        # Indexed rather than unpacked: an unused unpacked output (the text logits) makes
        # graph mode warn that it eliminated a node.
        returned = self.model(input_ids, None, None, True)
        outputs = (returned[1][:, -1],)
        for key_value in returned[2]:
            outputs = outputs + key_value
        return outputs


class DalleStaticDecoder(nn.Cell):
    """One code over a cache of fixed length: (image_codes int32 [batch, 1], write_position
    int32 scalar, key and value of each layer [batch, heads, cache, head_dim]) -> (logits
    [batch, codebook], the keys and values with this code's written at slot write_position).
    Slots 0..write_position are attended to (the text, the codes so far, this one); the code's
    grid index is write_position - text_length (row-major)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.num_layers = model.config.model.num_layers
        self.text_length, self.grid = model.text_length, model.image_grid

    def construct(self, image_codes, write_position, *cache):
        model = self.model
        batch, length = image_codes.shape
        total = cache[0].shape[2]
        index = (write_position - self.text_length).reshape((1,))
        row = index // self.grid
        col = index - row * self.grid
        x = model.embed_image(image_codes) + model.embed_image_rows(row) + model.embed_image_cols(col)
        slots = ops.arange(0, total, dtype=ms.int32)
        # As the GPT's StaticCacheDecoder: the query after every slot, a mask of the slots
        # written so far (this one included).
        mask = ops.broadcast_to((slots <= write_position).astype(ms.int32).view(1, total), (batch, total))
        attention_bias = causal_attention_bias(mask, batch, length, total - length, x.dtype)
        cache_slot = (slots == write_position).view(1, 1, total, 1)
        outputs = ()
        for i in range(self.num_layers):
            x, key_value = model.layers[i](x, attention_bias, (cache[2 * i], cache[2 * i + 1]), cache_slot)
            outputs = outputs + key_value
        return (model.image_head(model.ln_f(x))[:, -1],) + outputs


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

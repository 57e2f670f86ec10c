"""M6 in MindSpore (design.md §2.7, taichu/families/m6.py), mirrored by torch_impl/m6.py.

One Transformer over [image patches ; text ; image codes] made of the GPT's blocks
(mindspore_impl/gpt.py ``Block`` and its per-layer (key, value) cache); the patch ResNet is the
image tokenizer's residual blocks and downsampling (mindspore_impl/vqvae.py); the attention
mask is built per example from its segments (``prefix_lm_bias``). Attribute paths equal the
PyTorch module's; canonical names differ only in the leaves (embedding_table, gamma/beta),
mapped in taichu/weights.py.

MindSpore idioms (each also named where it is used): value checks in ``__call__``, outside
``construct``; int32 ids and positions; the project's Dense (mindspore_impl/gpt.py); the tied
LM head as a 2-D MatMul with transpose_b; logical_and / logical_or on masks; masked_fill as
arithmetic on int32 ids; the cross-entropy as LogSoftmax + the NLLLoss primitive; generation
over a static cache (StaticCachePrefill, StaticCacheDecoder) that compiles once.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from mindspore.common.initializer import Uniform, initializer

from taichu.families.m6 import CODE, IMAGE, PAD, PREFIX, TARGET, M6Config, check_inputs, loss_weights
from taichu.families.vqvae import init_bound
# IGNORE_INDEX: targets left out of a cross-entropy's mean (the GPT's, = F.cross_entropy's
# default); _NLL_LOSS the cross-entropy's per-row NLLLoss primitive (mindspore_impl.gpt).
from mindspore_impl.gpt import (_NLL_LOSS, IGNORE_INDEX, LOG_SOFTMAX, Block, Dense, _dtype_min, init_gpt_weights,
                                tied_logits)
from mindspore_impl.vqvae import Downsample, ResBlock, _activation, _conv


class PatchEncoder(nn.Cell):
    """pixels [B, C, S, S] -> patch features [B, patches, hidden], row-major: each patch
    through conv_in, per level residual blocks then a 2x2 downsampling, the activation,
    a mean over the patch's cells and a Linear (M6's ResNet on patches, small)."""

    def __init__(self, config: M6Config):
        super().__init__()
        m = config.model
        widths = m.patch_channels
        self.patch_size, self.grid = m.patch_size, m.patch_grid
        # MindSpore idiom: padding needs pad_mode "pad" (mindspore_impl.vqvae._conv).
        self.conv_in = _conv(m.num_channels, widths[0], 3)
        self.blocks = nn.CellList([nn.CellList([ResBlock(w, m.conv_activation) for _ in range(m.num_res_blocks)])
                                   for w in widths])
        self.downsamples = nn.CellList([Downsample(widths[i], widths[i + 1]) for i in range(len(widths) - 1)])
        self.act = _activation(m.conv_activation)
        self.proj = Dense(widths[-1], m.hidden_size)
        # A plain number for the loop below (graph mode).
        self.num_downsamples = len(widths) - 1

    def construct(self, pixel_values):
        b, c = pixel_values.shape[:2]
        p, g = self.patch_size, self.grid
        # [B, C, g p, g p] -> [B g g, C, p, p]: every patch is an image of its own (no
        # convolution crosses a patch border).
        x = pixel_values.reshape(b, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(b * g * g, c, p, p)
        x = self.conv_in(x)
        # MindSpore idiom: a level counter instead of enumerate over a CellList (as the
        # vqvae's Encoder).
        level = 0
        for blocks in self.blocks:
            for block in blocks:
                x = block(x)
            if level < self.num_downsamples:
                x = self.downsamples[level](x)
            level = level + 1
        x = self.act(x).mean(axis=(2, 3))
        return self.proj(x).reshape(b, g * g, -1)


class M6(nn.Cell):
    def __init__(self, config: M6Config):
        super().__init__()
        m = config.model
        self.config = config
        self.num_patches, self.num_codes = m.num_patches, m.num_codes
        self.codebook_size = m.codebook_size or 0
        # What training_loss reads (plain numbers: MindSpore's graph mode compiles it).
        self.text_weight, self.code_weight = loss_weights(config)
        self.patch_encoder = PatchEncoder(config)
        self.embed_patch_positions = nn.Embedding(m.num_patches, m.hidden_size)
        self.embed_text = nn.Embedding(m.vocab_size, m.hidden_size)
        self.embed_text_positions = nn.Embedding(m.text_length, m.hidden_size)
        if m.codebook_size:
            self.embed_codes = nn.Embedding(m.codebook_size + 1, m.hidden_size)   # + the start code
            self.embed_code_positions = nn.Embedding(m.num_codes, m.hidden_size)
        self.embed_segments = nn.Embedding(5, m.hidden_size)
        self.dropout = nn.Dropout(p=m.dropout)
        self.layers = nn.CellList([Block(config) for _ in range(m.num_layers)])
        self.ln_f = nn.LayerNorm((m.hidden_size,), epsilon=m.layer_norm_eps)
        if m.codebook_size:
            # MindSpore idiom: the project's Dense (bias by Add, 2-D MatMul), as in the GPT.
            self.code_head = Dense(m.hidden_size, m.codebook_size, has_bias=False)
        self._init_weights()

    def _init_weights(self):
        """The GPT's initialisation over the Dense and Embedding layers (N(0,
        initializer_range), residual projections scaled by 1/sqrt(2 layers), zero biases);
        torch's default for the convolutions, written out (uniform +-1/sqrt(fan_in))."""
        init_gpt_weights(self, self.config.model)
        for _, cell in self.patch_encoder.cells_and_names():
            if isinstance(cell, nn.Conv2d):
                bound = init_bound(int(np.prod(cell.weight.shape[1:])))
                for param in (cell.weight, cell.bias):
                    param.set_data(initializer(Uniform(bound), param.shape, param.dtype))

    def embeddings(self, pixel_values, input_ids, image_codes, segment_ids):
        """[B, length, hidden] of the new positions (the last ``length`` of segment_ids):
        patches, then text, then code slots, each with its position, plus the segments'."""
        # MindSpore idiom: a tuple prepended to (graph mode differentiates a list's insert
        # into a graph that fails to compile: LayerNormGrad "device address does not exist").
        parts = ()
        # MindSpore idiom: logical_or on the masks; int32 counts (Embedding's ids).
        text_positions = _count_before(segment_ids, ops.logical_or(segment_ids == PREFIX, segment_ids == TARGET))
        code_positions = _count_before(segment_ids, segment_ids == CODE)
        start = segment_ids.shape[1]
        if image_codes is not None:
            n = image_codes.shape[1]
            positions = ops.minimum(code_positions[:, start - n:], self.num_codes - 1)
            parts = (self.embed_codes(image_codes) + self.embed_code_positions(positions),) + parts
            start -= n
        if input_ids is not None:
            n = input_ids.shape[1]
            positions = ops.minimum(text_positions[:, start - n:start], self.embed_text_positions.vocab_size - 1)
            parts = (self.embed_text(input_ids) + self.embed_text_positions(positions),) + parts
            start -= n
        if pixel_values is not None:
            parts = (self.patch_encoder(pixel_values) + self.embed_patch_positions.embedding_table,) + parts
        x = ops.cat(parts, axis=1) if len(parts) > 1 else parts[0]
        return x + self.embed_segments(segment_ids[:, segment_ids.shape[1] - x.shape[1]:])

    def __call__(self, pixel_values=None, input_ids=None, segment_ids=None, image_codes=None,
                 past_key_values=None, use_cache=False):
        # Value checks run here, outside construct: graph mode cannot raise on tensor values.
        past_length = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        check_inputs(self.config, _shape(pixel_values), _shape(input_ids), _range(input_ids),
                     _shape(segment_ids), _range(segment_ids), _shape(image_codes), _range(image_codes),
                     past_length)
        return super().__call__(pixel_values, input_ids, segment_ids, image_codes, past_key_values, use_cache)

    def construct(self, pixel_values=None, input_ids=None, segment_ids=None, image_codes=None,
                  past_key_values=None, use_cache=False):
        """(text logits [B, L, vocab] at the text positions or None, code logits [B, n,
        codebook] at the code slots or None); with use_cache also the per-layer (key, value).

        pixel_values [B, C, S, S], input_ids [B, L], image_codes [B, n] (slot contents: the
        start code, then codes), any of them None; segment_ids [B, past + positions], the
        segment of every cached position and of each new one (taichu.families.m6), from
        which the mask and the text and code positions follow. Ids int32.
        """
        x = self.dropout(self.embeddings(pixel_values, input_ids, image_codes, segment_ids))
        attention_bias = prefix_lm_bias(segment_ids, x.shape[1], x.dtype)
        # MindSpore idiom: the CellList indexed and the presents a tuple (graph mode), as the GPT.
        presents = ()
        for i in range(len(self.layers)):
            past = None if past_key_values is None else past_key_values[i]
            x, present = self.layers[i](x, attention_bias, past)
            presents = presents + (present,)
        hidden = self.ln_f(x)
        n_codes = 0 if image_codes is None else image_codes.shape[1]
        n_text = 0 if input_ids is None else input_ids.shape[1]
        end = hidden.shape[1] - n_codes
        text_logits = self.text_logits(hidden[:, end - n_text:end]) if n_text else None
        code_logits = self.code_head(hidden[:, end:]) if n_codes else None
        outputs = (text_logits, code_logits)
        if use_cache:
            outputs = outputs + (presents,)
        return outputs

    def text_logits(self, hidden):
        """The tied LM head: hidden [B, L, width] -> [B, L, vocab] (torch's F.linear with
        embed_text.weight).

        MindSpore idiom: the GPT's tied_logits, a 2-D MatMul with transpose_b that reads the
        table as stored."""
        return tied_logits(hidden, self.embed_text.embedding_table)


def training_loss(model, pixel_values, input_ids, segment_ids, image_codes=None):
    """text_weight * mean cross-entropy of the TARGET text tokens + code_weight * mean
    cross-entropy of the codes of rows with CODE slots (fp32; a term without targets is 0);
    returns (loss,).

    pixel_values [B, C, S, S] (zeros where a row has no image: its patches are PAD),
    input_ids [B, text_length], segment_ids [B, sequence] (patches, text, code slots),
    image_codes [B, image_grid^2] the codes themselves (targets; the slots hold the start code
    and the codes before), only for a model with a codebook."""
    slots = None
    if model.codebook_size:
        start = ops.full_like(image_codes[:, :1], model.codebook_size)
        slots = ops.cat((start, image_codes[:, :-1]), axis=1)
    text_logits, code_logits = model(pixel_values, input_ids, segment_ids, slots)
    return _losses(model, text_logits, code_logits, input_ids, segment_ids, image_codes)


def _losses(model, text_logits, code_logits, input_ids, segment_ids, image_codes):
    text_segments = segment_ids[:, model.num_patches:model.num_patches + input_ids.shape[1]]
    # Slot t predicts the token of slot t + 1 when that one is a TARGET and slot t is not PAD
    # (a PAD query attends to every key, later targets too: it would learn from the answer).
    # MindSpore idiom: masked_fill written as arithmetic on the int32 ids (as
    # mindspore_impl/dalle.py).
    ignored = ops.logical_or(text_segments[:, 1:] != TARGET, text_segments[:, :-1] == PAD)
    targets = _fill_ignored(input_ids[:, 1:], ignored)
    rows = text_logits[:, :-1].astype(ms.float32).reshape(-1, text_logits.shape[-1])
    text_loss = _mean_cross_entropy(rows, targets.reshape(-1))
    loss = model.text_weight * text_loss
    if model.codebook_size:
        code_targets = _fill_ignored(image_codes, segment_ids[:, -model.num_codes:] != CODE)
        code_rows = code_logits.astype(ms.float32).reshape(-1, code_logits.shape[-1])
        loss = loss + model.code_weight * _mean_cross_entropy(code_rows, code_targets.reshape(-1))
    return (loss,)


def _fill_ignored(ids, ignored):
    """ids with IGNORE_INDEX where ``ignored`` (torch's masked_fill), as int32 arithmetic."""
    ids = ids.astype(ms.int32)
    return ids - (ids - IGNORE_INDEX) * ignored.astype(ms.int32)


def _mean_cross_entropy(rows, targets):
    """The mean cross-entropy over the targets that are not IGNORE_INDEX; 0 when none is
    (F.cross_entropy's mean would be 0 / 0).

    MindSpore idiom: mindspore_impl.gpt.cross_entropy's LOG_SOFTMAX + NLLLoss (ignored rows
    given label 0 and their loss multiplied by 0: the CPU kernel leaves ignored rows
    unwritten) and its ReduceMean / share of rows kept; the share is at least one row, so no
    target gives 0 / (1 / rows) = 0 with finite gradients (cross_entropy's 0 / 0 is NaN)."""
    labels = targets.astype(ms.int32)
    weight = ops.ones(rows.shape[-1], rows.dtype)
    keep = labels != IGNORE_INDEX
    losses = _NLL_LOSS(LOG_SOFTMAX(rows), labels * keep.astype(ms.int32), weight)[0]
    keep = keep.astype(losses.dtype)
    return (losses * keep).mean() / ops.maximum(keep.mean(), 1.0 / keep.shape[0])


def _count_before(segment_ids, selected):
    """[B, total] int32: how many selected positions come before each position (its index
    among them, for a selected one)."""
    selected = selected.astype(ms.int32)
    return ops.cumsum(selected, axis=1) - selected


def prefix_lm_bias(segment_ids, length: int, dtype):
    """[B, 1, length, total]: 0 where a query may attend, dtype-min elsewhere, for the last
    ``length`` positions of segment_ids [B, total] as queries (taichu.families.m6: keys that
    are not PAD; prefix keys for every query; target keys at or before a target query). The
    most negative finite value rather than -inf keeps a PAD query's row finite."""
    total = segment_ids.shape[1]
    key_prefix = ops.logical_or(segment_ids == IMAGE, segment_ids == PREFIX)
    key_target = ops.logical_or(segment_ids == TARGET, segment_ids == CODE)
    query_target = key_target[:, total - length:]
    query_pos = ops.arange(total - length, total, dtype=ms.int32).view(1, length, 1)
    key_pos = ops.arange(0, total, dtype=ms.int32).view(1, 1, total)
    target_pair = ops.logical_and(query_target.expand_dims(2), key_target.expand_dims(1))
    allowed = ops.logical_or(key_prefix.expand_dims(1), ops.logical_and(target_pair, key_pos <= query_pos))
    zero = ops.zeros((), dtype)
    return ops.where(allowed.expand_dims(1), zero, ops.full((), _dtype_min(dtype), dtype=dtype))


def _shape(x):
    return None if x is None else tuple(x.shape)


def _range(x):
    if x is None or x.size == 0:
        return None
    values = x.asnumpy()
    return int(values.min()), int(values.max())


# ----------------------------------------------------------------------------- static cache

class StaticCachePrefill(nn.Cell):
    """The prompt pass of generation over a static cache, one compiled graph per shape.

    (pixel_values [B, C, S, S] (zeros, with PAD segments, for a row without an image),
    input_ids [B, L] (the prompt, left-padded with PAD segments), segment_ids [B, patches +
    L (+ 1)], with codes=True also image_codes [B, 1] (the start code, a CODE slot)) ->
    (logits of the last position: text [B, vocab], with codes=True code [B, codebook]; key
    and value of each layer [B, heads, patches + L (+ 1), head_dim]). The caller pads the
    keys and values to the cache length StaticCacheDecoder runs at.

    MindSpore idiom (with StaticCacheDecoder): generation over a cache of fixed length, so
    that one compiled graph serves every step. Compiles ``construct`` (the model's
    ``__call__``, which holds its numpy checks, is not what graph mode compiles for a
    sub-cell): the caller checks ids.
    """

    def __init__(self, model: M6, codes: bool = False):
        super().__init__()
        self.model = model
        self.codes = codes

    def construct(self, pixel_values, input_ids, segment_ids, image_codes=None):
        # Indexed rather than unpacked: an unused unpacked output makes graph mode warn that
        # it eliminated a node.
        returned = self.model(pixel_values, input_ids, segment_ids, image_codes if self.codes else None,
                              None, True)
        outputs = (returned[1 if self.codes else 0][:, -1],)
        for key_value in returned[2]:
            outputs = outputs + key_value
        return outputs


class StaticCacheDecoder(nn.Cell):
    """One new position over a preallocated cache of fixed length: the same shapes at every
    step, so graph mode compiles it once per (batch, cache length) and reuses it.

    (new_ids int32 [B, 1] (a text token, with codes=True an image code), segment_ids [B,
    cache] (the segment of every slot: PAD for padding and for the slots not written yet, the
    new one's at write_position), write_position int32 scalar, key and value of each layer
    [B, heads, cache, head_dim]) -> (logits [B, vocab] (with codes=True [B, codebook]), the
    keys and values with the new position's written at slot write_position). The new
    position's text or code position is the count of PREFIX + TARGET or CODE slots before
    it, as in M6.embeddings; it attends as prefix_lm_bias's row for slot write_position
    (decoder_bias).
    """

    def __init__(self, model: M6, codes: bool = False):
        super().__init__()
        self.model = model
        self.codes = codes
        self.num_layers = len(model.layers)

    def construct(self, new_ids, segment_ids, write_position, *cache):
        model = self.model
        total = segment_ids.shape[1]
        here = ops.arange(0, total, dtype=ms.int32) == write_position
        if self.codes:
            selected, table, positions = segment_ids == CODE, model.embed_codes, model.embed_code_positions
        else:
            selected = ops.logical_or(segment_ids == PREFIX, segment_ids == TARGET)
            table, positions = model.embed_text, model.embed_text_positions
        # The new slot's position (its count of selected slots before it) and segment.
        # MindSpore idiom: the bool mask as int32 before the product (torch promotes bool).
        here_ids = here.astype(ms.int32).view(1, total)
        position = (_count_before(segment_ids, selected) * here_ids).sum(axis=1, keepdims=True)
        position = ops.minimum(position, positions.vocab_size - 1)
        segment = (segment_ids.astype(ms.int32) * here_ids).sum(axis=1, keepdims=True)
        x = table(new_ids) + positions(position) + model.embed_segments(segment)
        attention_bias = decoder_bias(segment_ids, write_position, x.dtype)
        cache_slot = here.view(1, 1, total, 1)
        outputs = ()
        for i in range(self.num_layers):
            x, key_value = model.layers[i](x, attention_bias, (cache[2 * i], cache[2 * i + 1]), cache_slot)
            outputs = outputs + key_value
        hidden = model.ln_f(x)
        logits = model.code_head(hidden) if self.codes else model.text_logits(hidden)
        return (logits[:, -1],) + outputs


def decoder_bias(segment_ids, write_position, dtype):
    """[B, 1, 1, total]: prefix_lm_bias's row of a target query at slot write_position of
    segment_ids [B, total]: the prefix keys, and the target keys at or before it (slots
    after it are not written yet: PAD, so every slot that is not PAD)."""
    total = segment_ids.shape[1]
    key_prefix = ops.logical_or(segment_ids == IMAGE, segment_ids == PREFIX)
    key_target = ops.logical_or(segment_ids == TARGET, segment_ids == CODE)
    key_pos = ops.arange(0, total, dtype=ms.int32).view(1, total)
    allowed = ops.logical_or(key_prefix, ops.logical_and(key_target, key_pos <= write_position))
    zero = ops.zeros((), dtype)
    return ops.where(allowed.view(-1, 1, 1, total), zero, ops.full((), _dtype_min(dtype), dtype=dtype))

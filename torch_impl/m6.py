"""M6 in PyTorch (design.md §2.7, taichu/families/m6.py), mirrored by mindspore_impl/m6.py.

One Transformer over [image patches ; text ; image codes] made of the GPT's blocks
(torch_impl/gpt.py ``Block`` and its per-layer (key, value) cache); the patch ResNet is the
image tokenizer's residual blocks and downsampling (torch_impl/vqvae.py); the attention mask
is built per example from its segments (``prefix_lm_bias``). State_dict names are the
canonical weight names.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from taichu.families.m6 import CODE, IMAGE, PAD, PREFIX, TARGET, M6Config, check_inputs, loss_weights
from taichu.families.vqvae import init_bound
from torch_impl.gpt import Block, init_gpt_weights
from torch_impl.vqvae import Downsample, ResBlock, _activation

# Targets equal to this are left out of a cross-entropy's mean (F.cross_entropy's default).
IGNORE_INDEX = -100


class PatchEncoder(nn.Module):
    """pixels [B, C, S, S] -> patch features [B, patches, hidden], row-major: each patch
    through conv_in, per level residual blocks then a 2x2 downsampling, the activation,
    a mean over the patch's cells and a Linear (M6's ResNet on patches, small)."""

    def __init__(self, config: M6Config):
        super().__init__()
        m = config.model
        widths = m.patch_channels
        self.patch_size, self.grid = m.patch_size, m.patch_grid
        self.conv_in = nn.Conv2d(m.num_channels, widths[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList([nn.ModuleList([ResBlock(w, m.conv_activation) for _ in range(m.num_res_blocks)])
                                     for w in widths])
        self.downsamples = nn.ModuleList([Downsample(widths[i], widths[i + 1]) for i in range(len(widths) - 1)])
        self.act = _activation(m.conv_activation)
        self.proj = nn.Linear(widths[-1], m.hidden_size)

    def forward(self, pixel_values):
        b, c = pixel_values.shape[:2]
        p, g = self.patch_size, self.grid
        # [B, C, g p, g p] -> [B g g, C, p, p]: every patch is an image of its own (no
        # convolution crosses a patch border).
        x = pixel_values.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b * g * g, c, p, p)
        x = self.conv_in(x)
        for level, blocks in enumerate(self.blocks):
            for block in blocks:
                x = block(x)
            if level < len(self.downsamples):
                x = self.downsamples[level](x)
        x = self.act(x).mean(dim=(2, 3))
        return self.proj(x).reshape(b, g * g, -1)


class M6(nn.Module):
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
        self.dropout = nn.Dropout(m.dropout)
        self.layers = nn.ModuleList([Block(config) for _ in range(m.num_layers)])
        self.ln_f = nn.LayerNorm(m.hidden_size, eps=m.layer_norm_eps)
        if m.codebook_size:
            self.code_head = nn.Linear(m.hidden_size, m.codebook_size, bias=False)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        """The GPT's initialisation over the Linear and Embedding layers (N(0,
        initializer_range), residual projections scaled by 1/sqrt(2 layers), zero biases);
        torch's default for the convolutions, written out (uniform +-1/sqrt(fan_in))."""
        init_gpt_weights(self, self.config.model)
        for module in self.patch_encoder.modules():
            if isinstance(module, nn.Conv2d):
                bound = init_bound(module.weight[0].numel())
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.uniform_(module.bias, -bound, bound)

    def embeddings(self, pixel_values, input_ids, image_codes, segment_ids):
        """[B, length, hidden] of the new positions (the last ``length`` of segment_ids):
        patches, then text, then code slots, each with its position, plus the segments'."""
        parts = []
        text_positions = _count_before(segment_ids, (segment_ids == PREFIX) | (segment_ids == TARGET))
        code_positions = _count_before(segment_ids, segment_ids == CODE)
        start = segment_ids.shape[1]
        if image_codes is not None:
            n = image_codes.shape[1]
            positions = code_positions[:, start - n:].clamp(max=self.num_codes - 1)
            parts.insert(0, self.embed_codes(image_codes) + self.embed_code_positions(positions))
            start -= n
        if input_ids is not None:
            n = input_ids.shape[1]
            positions = text_positions[:, start - n:start].clamp(max=self.embed_text_positions.num_embeddings - 1)
            parts.insert(0, self.embed_text(input_ids) + self.embed_text_positions(positions))
            start -= n
        if pixel_values is not None:
            parts.insert(0, self.patch_encoder(pixel_values) + self.embed_patch_positions.weight)
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return x + self.embed_segments(segment_ids[:, segment_ids.shape[1] - x.shape[1]:])

    def forward(self, pixel_values=None, input_ids=None, segment_ids=None, image_codes=None,
                past_key_values=None, use_cache=False):
        """(text logits [B, L, vocab] at the text positions or None, code logits [B, n,
        codebook] at the code slots or None); with use_cache also the per-layer (key, value).

        pixel_values [B, C, S, S], input_ids [B, L], image_codes [B, n] (slot contents: the
        start code, then codes), any of them None; segment_ids [B, past + positions], the
        segment of every cached position and of each new one (taichu.families.m6), from
        which the mask and the text and code positions follow.
        """
        past_length = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            check_inputs(self.config, _shape(pixel_values), _shape(input_ids), _range(input_ids),
                         _shape(segment_ids), _range(segment_ids), _shape(image_codes), _range(image_codes),
                         past_length)
        x = self.dropout(self.embeddings(pixel_values, input_ids, image_codes, segment_ids))
        attention_bias = prefix_lm_bias(segment_ids, x.shape[1], x.dtype)
        presents = []
        for i, layer in enumerate(self.layers):
            x, present = layer(x, attention_bias, None if past_key_values is None else past_key_values[i])
            presents.append(present)
        hidden = self.ln_f(x)
        n_codes = 0 if image_codes is None else image_codes.shape[1]
        n_text = 0 if input_ids is None else input_ids.shape[1]
        end = hidden.shape[1] - n_codes
        text_logits = F.linear(hidden[:, end - n_text:end], self.embed_text.weight) if n_text else None
        code_logits = self.code_head(hidden[:, end:]) if n_codes else None
        outputs = (text_logits, code_logits)
        if use_cache:
            outputs = outputs + (tuple(presents),)
        return outputs


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
        start = torch.full_like(image_codes[:, :1], model.codebook_size)
        slots = torch.cat((start, image_codes[:, :-1]), dim=1)
    text_logits, code_logits = model(pixel_values, input_ids, segment_ids, slots)
    return _losses(model, text_logits, code_logits, input_ids, segment_ids, image_codes)


def _losses(model, text_logits, code_logits, input_ids, segment_ids, image_codes):
    text_segments = segment_ids[:, model.num_patches:model.num_patches + input_ids.shape[1]]
    # Slot t predicts the token of slot t + 1 when that one is a TARGET and slot t is not PAD
    # (a PAD query attends to every key, later targets too: it would learn from the answer).
    ignored = (text_segments[:, 1:] != TARGET) | (text_segments[:, :-1] == PAD)
    targets = input_ids[:, 1:].masked_fill(ignored, IGNORE_INDEX)
    rows = text_logits[:, :-1].float().reshape(-1, text_logits.shape[-1])
    text_loss = _mean_cross_entropy(rows, targets.reshape(-1))
    loss = model.text_weight * text_loss
    if model.codebook_size:
        code_targets = image_codes.masked_fill(segment_ids[:, -model.num_codes:] != CODE, IGNORE_INDEX)
        code_rows = code_logits.float().reshape(-1, code_logits.shape[-1])
        loss = loss + model.code_weight * _mean_cross_entropy(code_rows, code_targets.reshape(-1))
    return (loss,)


def _mean_cross_entropy(rows, targets):
    """The mean cross-entropy over the targets that are not IGNORE_INDEX; 0 when none is
    (F.cross_entropy's mean would be 0 / 0)."""
    total = F.cross_entropy(rows, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


def _count_before(segment_ids, selected):
    """[B, total] int64: how many selected positions come before each position (its index
    among them, for a selected one)."""
    selected = selected.long()
    return (torch.cumsum(selected, dim=1) - selected)


def prefix_lm_bias(segment_ids, length: int, dtype):
    """[B, 1, length, total]: 0 where a query may attend, dtype-min elsewhere, for the last
    ``length`` positions of segment_ids [B, total] as queries (taichu.families.m6: keys that
    are not PAD; prefix keys for every query; target keys at or before a target query). The
    most negative finite value rather than -inf keeps a PAD query's row finite."""
    total = segment_ids.shape[1]
    key_prefix = (segment_ids == IMAGE) | (segment_ids == PREFIX)
    key_target = (segment_ids == TARGET) | (segment_ids == CODE)
    query_target = key_target[:, total - length:]
    query_pos = torch.arange(total - length, total, device=segment_ids.device).view(1, length, 1)
    key_pos = torch.arange(total, device=segment_ids.device).view(1, 1, total)
    allowed = key_prefix[:, None, :] | (query_target[:, :, None] & key_target[:, None, :] & (key_pos <= query_pos))
    zero = torch.zeros((), dtype=dtype, device=segment_ids.device)
    return torch.where(allowed[:, None], zero, torch.finfo(dtype).min)


def _shape(x):
    return None if x is None else tuple(x.shape)


def _range(x):
    return None if x is None or x.numel() == 0 else (int(x.min()), int(x.max()))


# ----------------------------------------------------------------------------- static cache

class StaticCachePrefill(nn.Module):
    """The prompt pass of generation over a static cache (mindspore_impl's graph; here for
    parity and as a reference).

    (pixel_values [B, C, S, S] (zeros, with PAD segments, for a row without an image),
    input_ids [B, L] (the prompt, left-padded with PAD segments), segment_ids [B, patches +
    L (+ 1)], with codes=True also image_codes [B, 1] (the start code, a CODE slot)) ->
    (logits of the last position: text [B, vocab], with codes=True code [B, codebook]; key
    and value of each layer [B, heads, patches + L (+ 1), head_dim]). The caller pads the
    keys and values to the cache length StaticCacheDecoder runs at.
    """

    def __init__(self, model: M6, codes: bool = False):
        super().__init__()
        self.model = model
        self.codes = codes

    def forward(self, pixel_values, input_ids, segment_ids, image_codes=None):
        returned = self.model(pixel_values, input_ids, segment_ids, image_codes if self.codes else None,
                              None, True)
        outputs = (returned[1 if self.codes else 0][:, -1],)
        for key_value in returned[2]:
            outputs = outputs + key_value
        return outputs


class StaticCacheDecoder(nn.Module):
    """One new position over a preallocated cache of fixed length: the same shapes at every
    step (what lets MindSpore's graph mode compile it once per batch and cache length).

    (new_ids [B, 1] (a text token, with codes=True an image code), segment_ids [B, cache]
    (the segment of every slot: PAD for padding and for the slots not written yet, the new
    one's at write_position), write_position int scalar, key and value of each layer [B,
    heads, cache, head_dim]) -> (logits [B, vocab] (with codes=True [B, codebook]), the keys
    and values with the new position's written at slot write_position). The new position's
    text or code position is the count of PREFIX + TARGET or CODE slots before it, as in
    M6.embeddings; it attends as prefix_lm_bias's row for slot write_position
    (decoder_bias).
    """

    def __init__(self, model: M6, codes: bool = False):
        super().__init__()
        self.model = model
        self.codes = codes
        self.num_layers = len(model.layers)

    def forward(self, new_ids, segment_ids, write_position, *cache):
        model = self.model
        total = segment_ids.shape[1]
        here = torch.arange(total, device=segment_ids.device) == write_position
        if self.codes:
            selected, table, positions = segment_ids == CODE, model.embed_codes, model.embed_code_positions
        else:
            selected = (segment_ids == PREFIX) | (segment_ids == TARGET)
            table, positions = model.embed_text, model.embed_text_positions
        # The new slot's position (its count of selected slots before it) and segment.
        position = (_count_before(segment_ids, selected) * here).sum(dim=1, keepdim=True)
        position = position.clamp(max=positions.num_embeddings - 1)
        segment = (segment_ids * here).sum(dim=1, keepdim=True)
        x = table(new_ids) + positions(position) + model.embed_segments(segment)
        attention_bias = decoder_bias(segment_ids, write_position, x.dtype)
        cache_slot = here.view(1, 1, total, 1)
        outputs = ()
        for i in range(self.num_layers):
            x, key_value = model.layers[i](x, attention_bias, (cache[2 * i], cache[2 * i + 1]), cache_slot)
            outputs = outputs + key_value
        hidden = model.ln_f(x)
        logits = model.code_head(hidden) if self.codes else F.linear(hidden, model.embed_text.weight)
        return (logits[:, -1],) + outputs


def decoder_bias(segment_ids, write_position, dtype):
    """[B, 1, 1, total]: prefix_lm_bias's row of a target query at slot write_position of
    segment_ids [B, total]: the prefix keys, and the target keys at or before it (slots
    after it are not written yet: PAD, so every slot that is not PAD)."""
    total = segment_ids.shape[1]
    key_prefix = (segment_ids == IMAGE) | (segment_ids == PREFIX)
    key_target = (segment_ids == TARGET) | (segment_ids == CODE)
    key_pos = torch.arange(total, device=segment_ids.device).view(1, total)
    allowed = key_prefix | (key_target & (key_pos <= write_position))
    zero = torch.zeros((), dtype=dtype, device=segment_ids.device)
    return torch.where(allowed.view(-1, 1, 1, total), zero, torch.finfo(dtype).min)

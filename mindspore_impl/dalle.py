"""DALL-E in MindSpore (design.md §2.4, taichu/families/dalle.py), mirrored by
torch_impl/dalle.py.

A decoder over [text ; image codes] made of the GPT's blocks (mindspore_impl/gpt.py: Block,
causal_attention_bias and the per-layer (key, value) cache), with its own embeddings (text
tokens + text positions; image codes + row + column) and two heads (text vocabulary, image
codebook). Attribute paths equal the PyTorch module's; canonical names differ only in the
leaves (embedding_table, gamma/beta), mapped in taichu/weights.py.

MindSpore only: StaticCachePrefill and StaticCacheDecoder, generation over a cache of fixed
length that compiles once (taichu.imagine.dalle_step, the MINDIR export), as the GPT's.
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops

from taichu.families.dalle import DalleConfig, check_inputs, loss_weights
from mindspore_impl.gpt import IGNORE_INDEX, Block, Dense, causal_attention_bias, cross_entropy, init_gpt_weights


class DALLE(nn.Cell):
    def __init__(self, config: DalleConfig):
        super().__init__()
        m = config.model
        self.config = config
        self.text_length = m.text_length
        self.image_grid = m.image_grid
        # What training_loss reads (plain numbers: MindSpore's graph mode compiles it).
        self.pad_id = config.tokenizer.special_tokens.pad_id
        self.text_weight, self.image_weight = loss_weights(config)
        self.embed_text = nn.Embedding(m.vocab_size, m.hidden_size)
        self.embed_text_positions = nn.Embedding(m.text_length, m.hidden_size)
        self.embed_image = nn.Embedding(m.codebook_size, m.hidden_size)
        self.embed_image_rows = nn.Embedding(m.image_grid, m.hidden_size)
        self.embed_image_cols = nn.Embedding(m.image_grid, m.hidden_size)
        self.dropout = nn.Dropout(p=m.dropout)
        self.layers = nn.CellList([Block(config) for _ in range(m.num_layers)])
        self.ln_f = nn.LayerNorm((m.hidden_size,), epsilon=m.layer_norm_eps)
        # MindSpore idiom: the project's Dense (bias by Add, 2-D MatMul), as in the GPT.
        self.text_head = Dense(m.hidden_size, m.vocab_size, has_bias=False)
        self.image_head = Dense(m.hidden_size, m.codebook_size, has_bias=False)
        init_gpt_weights(self, m)

    def text_embeddings(self, input_ids):
        """[B, text_length, hidden]: token + position embeddings of the whole text."""
        positions = ops.arange(0, input_ids.shape[1], dtype=ms.int32)
        return self.embed_text(input_ids) + self.embed_text_positions(positions)

    def image_embeddings(self, image_codes, start=0):
        """[B, m, hidden]: code + row + column embeddings of image tokens start .. start + m - 1
        (row-major over the grid)."""
        index = ops.arange(start, start + image_codes.shape[1], dtype=ms.int32)
        rows = index // self.image_grid
        cols = index - rows * self.image_grid
        return self.embed_image(image_codes) + self.embed_image_rows(rows) + self.embed_image_cols(cols)

    def __call__(self, input_ids=None, image_codes=None, past_key_values=None, use_cache=False,
                 output_intermediates=False):
        # Value checks run here, outside construct: graph mode cannot raise on tensor values.
        past_length = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        check_inputs(self.config, _shape(input_ids), _range(input_ids), _shape(image_codes),
                     _range(image_codes), past_length)
        return super().__call__(input_ids, image_codes, past_key_values, use_cache, output_intermediates)

    def construct(self, input_ids=None, image_codes=None, past_key_values=None, use_cache=False,
                  output_intermediates=False):
        """(text_logits, image_logits), with use_cache also the per-layer (key, value).

        Without a past: input_ids [B, text_length] (the whole text) and image_codes [B, n]
        (the first n codes, n >= 0; None for n = 0) -> text_logits [B, text_length - 1,
        vocab_size] (position i predicts text token i + 1) and image_logits [B, n + 1,
        codebook_size] (the last text position and each code predict the next code).
        With a past covering the text and j codes: input_ids None, image_codes [B, m] (codes
        j .. j + m - 1) -> (None, image_logits [B, m, codebook_size]).

        output_intermediates: also (after the cache, if any) hidden_states, num_layers + 1
        tensors [B, length, hidden] (the first layer's input after the embedding dropout,
        then each layer's output, without ln_f), and attention_scores, per layer the raw
        scores [B, heads, length, past + length] before the causal bias and softmax. A
        Python bool: graph mode compiles one graph per value.
        """
        past_length = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if input_ids is None:
            x = self.image_embeddings(image_codes, past_length - self.text_length)
        elif image_codes is None:
            x = self.text_embeddings(input_ids)
        else:
            x = ops.cat((self.text_embeddings(input_ids), self.image_embeddings(image_codes)), axis=1)
        x = self.dropout(x)
        batch, length = x.shape[:2]
        attention_bias = causal_attention_bias(None, batch, length, past_length, x.dtype)
        presents = ()
        hidden_states, attention_scores = (x,), ()
        for i in range(len(self.layers)):
            past = None if past_key_values is None else past_key_values[i]
            if output_intermediates:
                x, present, scores = self.layers[i](x, attention_bias, past, None, True)
                hidden_states = hidden_states + (x,)
                attention_scores = attention_scores + (scores,)
            else:
                x, present = self.layers[i](x, attention_bias, past)
            presents = presents + (present,)
        hidden = self.ln_f(x)
        if input_ids is not None:
            split = self.text_length - 1
            logits = (self.text_head(hidden[:, :split]), self.image_head(hidden[:, split:]))
        else:
            logits = (None, self.image_head(hidden))
        outputs = logits
        if use_cache:
            outputs = outputs + (presents,)
        if output_intermediates:
            outputs = outputs + (hidden_states, attention_scores)
        return outputs


class StaticCachePrefill(nn.Cell):
    """input_ids int32 [batch, text_length] -> logits [batch, codebook] (the first image
    code's), key and value of each layer [batch, heads, text_length, head_dim].

    MindSpore idiom (with StaticCacheDecoder): generation over a cache of fixed length, so
    that one compiled graph serves every step (PyNative runs a step op by op from Python:
    137 ms a code at dalle-small against 3.6 ms compiled, docs/text_to_image.md); the
    PyTorch model generates eagerly over its growing cache and needs neither. Compiles
    ``construct`` (the model's ``__call__``, which holds its numpy checks, is not what graph
    mode compiles for a sub-cell): the caller checks ids (taichu.imagine.dalle_step,
    export.dalle_network)."""

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


class StaticCacheDecoder(nn.Cell):
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


def training_loss(model, input_ids, image_codes):
    """The weighted mean of the text and image next-token cross-entropies (fp32) of
    captions input_ids [B, text_length] (pads ignored as targets) and their codes
    image_codes [B, image_grid ** 2]; returns (loss,)."""
    text_logits, image_logits = model(input_ids, image_codes[:, :-1])
    return _losses(model, _logit_rows(text_logits), _logit_rows(image_logits), input_ids, image_codes)


def distill_outputs(model, input_ids, image_codes):
    """One forward pass of training_loss's inputs for distillation: (training_loss's
    outputs, predictions, streams).

    predictions: (text logits [B * (text_length - 1), vocab] fp32, row weights text_weight
    / (non-pad targets) on the rows whose target is not a pad, 0 on the others) and (image
    logits [B * image_tokens, codebook] fp32, image_weight / rows): the loss is their
    weighted sum of row cross-entropies. streams: ((hidden_states, attention_scores,
    token_mask [B, length] fp32 ones, causal True),), the order of
    taichu.families.dalle.distill_streams.
    """
    text_logits, image_logits, hidden_states, attention_scores = model(
        input_ids, image_codes[:, :-1], None, False, True)
    text_rows, image_rows = _logit_rows(text_logits), _logit_rows(image_logits)
    nonpad = (input_ids[:, 1:] != model.pad_id).reshape(-1).astype(ms.float32)
    images = image_rows.shape[0]
    predictions = ((text_rows, model.text_weight * nonpad / nonpad.sum()),
                   (image_rows, ops.full((images,), model.image_weight / images, dtype=ms.float32)))
    token_mask = ops.ones(hidden_states[0].shape[:2], ms.float32)
    return (_losses(model, text_rows, image_rows, input_ids, image_codes), predictions,
            ((hidden_states, attention_scores, token_mask, True),))


def _logit_rows(logits):
    """[B, positions, classes] -> [B * positions, classes] in fp32."""
    return logits.reshape(-1, logits.shape[-1]).astype(ms.float32)


def _losses(model, text_rows, image_rows, input_ids, image_codes):
    """training_loss's outputs from the text and image logit rows."""
    targets = input_ids[:, 1:]
    # MindSpore idiom: masked_fill written as arithmetic on the int32 ids (one fused
    # element-wise kernel on CPU); the same ids as torch's masked_fill.
    targets = targets - (targets - IGNORE_INDEX) * (targets == model.pad_id).astype(targets.dtype)
    text_loss = cross_entropy(text_rows, targets.reshape(-1))
    image_loss = cross_entropy(image_rows, image_codes.reshape(-1))
    return (model.text_weight * text_loss + model.image_weight * image_loss,)


def _shape(x):
    return None if x is None else tuple(x.shape)


def _range(x):
    if x is None or x.size == 0:
        return None
    values = x.asnumpy()
    return int(values.min()), int(values.max())

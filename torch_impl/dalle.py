"""DALL-E in PyTorch (design.md §2.4, taichu/families/dalle.py), mirrored by
mindspore_impl/dalle.py.

A decoder over [text ; image codes] made of the GPT's blocks (torch_impl/gpt.py: Block,
causal_attention_bias and the per-layer (key, value) cache), with its own embeddings (text
tokens + text positions; image codes + row + column) and two heads (text vocabulary, image
codebook). State_dict names are the canonical weight names.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from taichu.families.dalle import DalleConfig, check_inputs, loss_weights
from torch_impl.gpt import Block, causal_attention_bias, init_gpt_weights

# Targets equal to this are left out of a cross-entropy's mean (F.cross_entropy's default).
IGNORE_INDEX = -100


class DALLE(nn.Module):
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
        self.dropout = nn.Dropout(m.dropout)
        self.layers = nn.ModuleList([Block(config) for _ in range(m.num_layers)])
        self.ln_f = nn.LayerNorm(m.hidden_size, eps=m.layer_norm_eps)
        self.text_head = nn.Linear(m.hidden_size, m.vocab_size, bias=False)
        self.image_head = nn.Linear(m.hidden_size, m.codebook_size, bias=False)
        init_gpt_weights(self, m)

    def text_embeddings(self, input_ids):
        """[B, text_length, hidden]: token + position embeddings of the whole text."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.embed_text(input_ids) + self.embed_text_positions(positions)

    def image_embeddings(self, image_codes, start: int = 0):
        """[B, m, hidden]: code + row + column embeddings of image tokens start .. start + m - 1
        (row-major over the grid)."""
        index = torch.arange(start, start + image_codes.shape[1], device=image_codes.device)
        rows = torch.div(index, self.image_grid, rounding_mode="floor")
        cols = index - rows * self.image_grid
        return self.embed_image(image_codes) + self.embed_image_rows(rows) + self.embed_image_cols(cols)

    def forward(self, input_ids=None, image_codes=None, past_key_values=None, use_cache=False,
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
        scores [B, heads, length, past + length] before the causal bias and softmax.
        """
        past_length = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            check_inputs(self.config, _shape(input_ids), _range(input_ids), _shape(image_codes),
                         _range(image_codes), past_length)
        if input_ids is None:
            x = self.image_embeddings(image_codes, past_length - self.text_length)
        elif image_codes is None:
            x = self.text_embeddings(input_ids)
        else:
            x = torch.cat((self.text_embeddings(input_ids), self.image_embeddings(image_codes)), dim=1)
        x = self.dropout(x)
        batch, length = x.shape[:2]
        attention_bias = causal_attention_bias(None, batch, length, past_length, x.dtype, x.device)
        presents = []
        hidden_states, attention_scores = (x,), ()
        for i, layer in enumerate(self.layers):
            past = None if past_key_values is None else past_key_values[i]
            if output_intermediates:
                x, present, scores = layer(x, attention_bias, past, None, True)
                hidden_states = hidden_states + (x,)
                attention_scores = attention_scores + (scores,)
            else:
                x, present = layer(x, attention_bias, past)
            presents.append(present)
        hidden = self.ln_f(x)
        if input_ids is not None:
            split = self.text_length - 1
            logits = (self.text_head(hidden[:, :split]), self.image_head(hidden[:, split:]))
        else:
            logits = (None, self.image_head(hidden))
        outputs = logits
        if use_cache:
            outputs = outputs + (tuple(presents),)
        if output_intermediates:
            outputs = outputs + (hidden_states, attention_scores)
        return outputs


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
    nonpad = (input_ids[:, 1:] != model.pad_id).reshape(-1).float()
    images = image_rows.shape[0]
    predictions = ((text_rows, model.text_weight * nonpad / nonpad.sum()),
                   (image_rows, torch.full((images,), model.image_weight / images, dtype=torch.float32,
                                           device=image_rows.device)))
    token_mask = torch.ones(hidden_states[0].shape[:2], dtype=torch.float32, device=image_rows.device)
    return (_losses(model, text_rows, image_rows, input_ids, image_codes), predictions,
            ((hidden_states, attention_scores, token_mask, True),))


def _logit_rows(logits):
    """[B, positions, classes] -> [B * positions, classes] in fp32."""
    return logits.float().reshape(-1, logits.shape[-1])


def _losses(model, text_rows, image_rows, input_ids, image_codes):
    """training_loss's outputs from the text and image logit rows."""
    targets = input_ids[:, 1:]
    targets = targets.masked_fill(targets == model.pad_id, IGNORE_INDEX)
    text_loss = F.cross_entropy(text_rows, targets.reshape(-1), ignore_index=IGNORE_INDEX)
    image_loss = F.cross_entropy(image_rows, image_codes.reshape(-1))
    return (model.text_weight * text_loss + model.image_weight * image_loss,)


def _shape(x):
    return None if x is None else tuple(x.shape)


def _range(x):
    return None if x is None or x.numel() == 0 else (int(x.min()), int(x.max()))

"""The Chinese GPT in PyTorch (design.md §2.1), mirrored by mindspore_impl/gpt.py.

Pre-LN decoder, learned absolute positions, GELU MLP, output projection tied to the
token embedding. With activation gelu_new and eps 1e-5 this is GPT-2's architecture.
State_dict names here are the project's canonical weight names.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from taichu.families.gpt import GPTConfig, check_inputs

ACTIVATIONS = {"gelu": lambda: nn.GELU(approximate="none"),
               "gelu_new": lambda: nn.GELU(approximate="tanh"),
               "relu": nn.ReLU}


class Attention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        m = config.model
        self.num_heads = m.num_heads
        self.head_dim = m.head_dim
        self.scale = 1.0 / math.sqrt(m.head_dim)
        self.q_proj = nn.Linear(m.hidden_size, m.hidden_size, bias=m.bias)
        self.k_proj = nn.Linear(m.hidden_size, m.hidden_size, bias=m.bias)
        self.v_proj = nn.Linear(m.hidden_size, m.hidden_size, bias=m.bias)
        self.out_proj = nn.Linear(m.hidden_size, m.hidden_size, bias=m.bias)
        self.attn_dropout = nn.Dropout(m.attention_dropout)
        self.resid_dropout = nn.Dropout(m.dropout)

    def forward(self, x, attention_bias, past_key_value=None, cache_slot=None, output_scores=False):
        """(output, (key, value)); with output_scores also the raw attention scores
        q k^T * scale [batch, heads, length, past + length], before the bias and softmax."""
        batch, length, hidden = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        if cache_slot is not None:
            # Static cache (StaticCacheDecoder): the one new key/value goes into its slot of
            # the fixed-length past, so every decoding step has the same shapes.
            k = torch.where(cache_slot, k, past_key_value[0])
            v = torch.where(cache_slot, v, past_key_value[1])
        elif past_key_value is not None:
            k = torch.cat((past_key_value[0], k), dim=2)
            v = torch.cat((past_key_value[1], v), dim=2)
        if output_scores:
            # Written out, as mindspore_impl always does, to return the scores (distillation).
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
            probs = torch.softmax(scores + attention_bias, dim=-1)
            out = torch.matmul(self.attn_dropout(probs), v)
        else:
            # softmax(q k^T * scale + bias) v, fused: same math as mindspore_impl's explicit
            # matmul/softmax/matmul, but the [length, total] scores and probabilities are never
            # stored for backward (bench/train_gpt.py: faster training step on CPU).
            dropout = self.attn_dropout.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias, dropout_p=dropout,
                                                 scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, length, hidden)
        if output_scores:
            return self.resid_dropout(self.out_proj(out)), (k, v), scores
        return self.resid_dropout(self.out_proj(out)), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        m = config.model
        self.fc_in = nn.Linear(m.hidden_size, m.ffn_size, bias=m.bias)
        self.act = ACTIVATIONS[m.activation]()
        self.fc_out = nn.Linear(m.ffn_size, m.hidden_size, bias=m.bias)
        self.dropout = nn.Dropout(m.dropout)

    def forward(self, x):
        return self.dropout(self.fc_out(self.act(self.fc_in(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        m = config.model
        self.ln_1 = nn.LayerNorm(m.hidden_size, eps=m.layer_norm_eps)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(m.hidden_size, eps=m.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, attention_bias, past_key_value=None, cache_slot=None, output_scores=False):
        """(output, (key, value)); with output_scores also the attention's raw scores."""
        attn = self.attn(self.ln_1(x), attention_bias, past_key_value, cache_slot, output_scores)
        x = x + attn[0]
        x = x + self.mlp(self.ln_2(x))
        return (x,) + attn[1:]


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        m = config.model
        self.config = config
        self.embed_tokens = nn.Embedding(m.vocab_size, m.hidden_size)
        self.embed_positions = nn.Embedding(m.max_position_embeddings, m.hidden_size)
        self.dropout = nn.Dropout(m.dropout)
        self.layers = nn.ModuleList([Block(config) for _ in range(m.num_layers)])
        self.ln_f = nn.LayerNorm(m.hidden_size, eps=m.layer_norm_eps)
        init_gpt_weights(self, m)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, logits_to_keep=0, output_intermediates=False):
        """Logits [batch, length, vocab]; with use_cache also the per-layer (key, value).

        logits_to_keep > 0: logits of the last that many positions only (generation needs
        the last one; the output projection over every prompt position is wasted work).

        output_intermediates: also (after the cache, if any) hidden_states, num_layers + 1
        tensors [batch, length, hidden] (the first layer's input, then each layer's output,
        without ln_f), and attention_scores, per layer the raw scores [batch, heads, length,
        past + length] before the mask and softmax (what distillation compares).

        attention_mask: [batch, past + length], 1 for real tokens, 0 for padding.
        position_ids default to the count of real tokens before each one, so a left-padded
        row gets the same positions (and logits) as the unpadded sequence.
        """
        x, presents, hidden_states, attention_scores = self.decode(
            input_ids, attention_mask, position_ids, past_key_values, output_intermediates)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.output_logits(x)
        if not (use_cache or output_intermediates):
            return logits
        outputs = (logits,)
        if use_cache:
            outputs = outputs + (tuple(presents),)
        if output_intermediates:
            outputs = outputs + (hidden_states, attention_scores)
        return outputs

    def output_logits(self, x):
        """Final LayerNorm and the tied output projection: [batch, length, vocab]."""
        return F.linear(self.ln_f(x), self.embed_tokens.weight)

    def decode(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
               output_intermediates=False):
        """The decoder's last hidden states [batch, length, hidden] (before ln_f), the
        per-layer (key, value), and with output_intermediates the hidden states and raw
        attention scores forward describes (else empty tuples)."""
        past_length = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            check_inputs(self.config, tuple(input_ids.shape), int(input_ids.min()),
                         int(input_ids.max()), past_length,
                         None if attention_mask is None else tuple(attention_mask.shape))
        batch, length = input_ids.shape
        if position_ids is None:
            position_ids = _default_position_ids(attention_mask, batch, length, past_length,
                                                 input_ids.device)
        x = self.dropout(self.embed_tokens(input_ids) + self.embed_positions(position_ids))
        attention_bias = causal_attention_bias(attention_mask, batch, length, past_length, x.dtype,
                                         x.device)
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
        return x, presents, hidden_states, attention_scores



class DecoderForExport(nn.Module):
    """The GPT with flat inputs and outputs, the signature of the exported decoder.

    (input_ids, attention_mask, position_ids, past key and value of each layer) ->
    (logits, present key and value of each layer). A past of length 0 serves the prompt,
    so one graph does both prefill and decoding. Names and axes: export/signature.py.
    """

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model
        self.num_layers = model.config.model.num_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        past_key_values = tuple((past[2 * i], past[2 * i + 1]) for i in range(self.num_layers))
        logits, presents = self.model(input_ids, attention_mask, position_ids, past_key_values,
                                      use_cache=True)
        outputs = (logits,)
        for key_value in presents:
            outputs = outputs + key_value
        return outputs


class StaticCachePrefill(nn.Module):
    """The prompt pass of generation over a static cache (mindspore_impl's graph; here for
    parity and as a reference).

    (input_ids, attention_mask [batch, prompt], left-padded) -> (logits of the last
    position [batch, vocab], key and value of each layer [batch, heads, prompt, head_dim]).
    The caller pads the keys and values to the cache length StaticCacheDecoder runs at.
    """

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        logits, presents = self.model(input_ids, attention_mask, None, None, True, 1)
        outputs = (logits[:, -1],)
        for key_value in presents:
            outputs = outputs + key_value
        return outputs


class StaticCacheDecoder(nn.Module):
    """One decoding step over a preallocated cache of fixed length: the same shapes at every
    step (what lets MindSpore's graph mode compile it once per batch and cache length).

    (input_ids [batch, 1], attention_mask [batch, cache], write_position int scalar, key
    and value of each layer [batch, heads, cache, head_dim]) -> (logits [batch, vocab], the
    keys and values with this token's written at slot write_position). attention_mask is 1
    for the real tokens in slots 0..write_position (this one included), 0 for padding and
    for the slots not written yet; positions are the count of real tokens before the token.
    """

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model
        self.num_layers = model.config.model.num_layers

    def forward(self, input_ids, attention_mask, write_position, *cache):
        batch, length = input_ids.shape
        total = attention_mask.shape[1]
        mask = attention_mask.long()
        position_ids = (mask.sum(dim=1, keepdim=True) - 1).clamp(min=0)
        x = self.model.embed_tokens(input_ids) + self.model.embed_positions(position_ids)
        # As if the query came after every slot: the causal rule allows all of them, and the
        # mask (0 beyond write_position) leaves the ones written so far.
        attention_bias = causal_attention_bias(mask, batch, length, total - length, x.dtype, x.device)
        cache_slot = (torch.arange(total, device=x.device) == write_position).view(1, 1, total, 1)
        outputs = ()
        for i in range(self.num_layers):
            x, key_value = self.model.layers[i](x, attention_bias, (cache[2 * i], cache[2 * i + 1]),
                                                cache_slot)
            outputs = outputs + key_value
        return (self.model.output_logits(x)[:, -1],) + outputs


def init_gpt_weights(model: nn.Module, m) -> None:
    """GPT-2 init of every Linear and Embedding of ``model``: N(0, m.initializer_range),
    residual output projections (out_proj, fc_out) scaled by 1/sqrt(2 * layers) so the
    residual stream's variance does not grow with depth; biases zero. Also GPT-XL's."""
    residual_std = m.initializer_range / math.sqrt(2 * m.num_layers)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = residual_std if name.endswith(("out_proj", "fc_out")) else m.initializer_range
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


def training_loss(model, input_ids):
    """Next-token cross-entropy of token blocks [batch, seq_len + 1] (inputs [:, :-1],
    targets [:, 1:]), in fp32 whatever the compute precision; returns (loss,)."""
    return _losses(_logit_rows(model(input_ids[:, :-1])), input_ids)


def distill_outputs(model, input_ids):
    """One forward pass of training_loss's inputs for distillation: (training_loss's
    outputs, predictions, streams).

    predictions: ((logits [batch * seq_len, vocab] fp32, row weights [batch * seq_len]),),
    the weights 1 / rows (the loss's mean). streams: ((hidden_states, attention_scores,
    token_mask [batch, seq_len] fp32 ones, causal True),), the decoder's stack as
    taichu.families.gpt.distill_streams describes it.
    """
    logits, hidden_states, attention_scores = model(input_ids[:, :-1], output_intermediates=True)
    rows = _logit_rows(logits)
    weights = torch.full((rows.shape[0],), 1.0 / rows.shape[0], dtype=torch.float32, device=rows.device)
    token_mask = torch.ones(logits.shape[:2], dtype=torch.float32, device=rows.device)
    return (_losses(rows, input_ids), ((rows, weights),),
            ((hidden_states, attention_scores, token_mask, True),))


def _logit_rows(logits):
    """[batch, length, vocab] -> [batch * length, vocab] in fp32."""
    return logits.float().reshape(-1, logits.shape[-1])


def _losses(rows, input_ids):
    """training_loss's outputs from the logit rows of input_ids[:, :-1]."""
    return (F.cross_entropy(rows, input_ids[:, 1:].reshape(-1)),)


def _default_position_ids(attention_mask, batch, length, past_length, device):
    if attention_mask is None:
        positions = torch.arange(past_length, past_length + length, device=device)
        return positions.unsqueeze(0).expand(batch, length)
    positions = torch.cumsum(attention_mask.long(), dim=1) - 1
    return positions.clamp(min=0)[:, past_length:]


def causal_attention_bias(attention_mask, batch, length, past_length, dtype, device):
    """[batch, 1, length, past + length]: 0 where a query may attend, dtype-min elsewhere.

    The most negative finite value rather than -inf keeps fully masked rows (padding
    queries) finite instead of NaN.
    """
    total = past_length + length
    query_pos = torch.arange(past_length, total, device=device).unsqueeze(1)
    key_pos = torch.arange(total, device=device).unsqueeze(0)
    allowed = (key_pos <= query_pos).view(1, 1, length, total)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool().view(batch, 1, 1, total)
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)

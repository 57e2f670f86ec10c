"""The Chinese GPT in MindSpore (design.md §2.1), mirrored by torch_impl/gpt.py.

Pre-LN decoder, learned absolute positions, GELU MLP, output projection tied to the
token embedding. Attribute paths equal the PyTorch module's, so canonical weight names
differ only in leaves (gamma/beta, embedding_table), mapped in taichu/weights.py.
Uses mindspore.nn/ops rather than mint: mint has no CPU kernels for these layers.
"""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import nn, ops
from mindspore.common.initializer import Normal, initializer

from taichu.families.gpt import GPTConfig, check_inputs

# hidden [n, width] x table [vocab, width] -> [n, vocab], the table read as stored.
_MATMUL_TRANSPOSE_B = ops.MatMul(transpose_b=True)
# MindSpore idiom: attention's q k^T as BatchMatMul(transpose_b) reads k as it is; the
# swapaxes + matmul it replaces materialises a transposed copy of k forward and backward.
BATCH_MATMUL_TRANSPOSE_B = ops.BatchMatMul(transpose_b=True)
BATCH_MATMUL = ops.BatchMatMul()
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class Dense(nn.Dense):
    """nn.Dense (same parameters and names) with its bias added by Add instead of BiasAdd.

    MindSpore idiom: BiasAdd's gradient kernel on CPU (BiasAddGrad) runs on one thread, 5-10x
    slower than the ReduceSum that Add's broadcast gradient becomes: 0.5 s of gpt-small's
    4.5 s training step (docs/benchmarks.md). Every family's linear layers are this one.
    """

    def construct(self, x):
        shape = x.shape
        x = self.matmul(x.reshape(-1, shape[-1]), self.weight)
        if self.has_bias:
            x = x + self.bias
        return x.reshape(shape[:-1] + (x.shape[-1],))


def _normal_cdf(x):
    return 0.5 + 0.5 * ops.erf(x * _INV_SQRT_2)


class GELU(nn.Cell):
    """The exact GELU x * Phi(x) (torch's nn.GELU()), with its derivative written out.

    MindSpore idiom: ops.gelu(approximate="none") is composite (Div, Erf, Add, Mul) and
    autodiff differentiates each piece (Pow, Exp, Neg, Div, ...); bprop below is
    Phi(x) + x phi(x) in a few element-wise kernels, the Erf shared with the forward:
    69 -> 39 ms forward + backward at [8, 256, 2048] on 2 cores. (ops.GeLU, the
    primitive, is the tanh approximation on CPU.)
    """

    def construct(self, x):
        return x * _normal_cdf(x)

    def bprop(self, x, out, dout):
        pdf = ops.exp(x * x * -0.5) * _INV_SQRT_2PI
        return (dout * (_normal_cdf(x) + x * pdf),)


def _row_sums(x):
    """x summed over its last axis, keeping it ([..., 1]), as a MatMul against a column of
    ones: MindSpore's CPU ReduceSum over the last axis runs far below memory speed."""
    width = x.shape[-1]
    return ops.matmul(x.reshape(-1, width), ops.ones((width, 1), x.dtype)).reshape(x.shape[:-1] + (1,))


class Softmax(nn.Cell):
    """ops.softmax over the last axis (attention's), with its derivative written out.

    MindSpore idiom: softmax's gradient out * (dout - sum(dout * out)) expands into a
    ReduceSum over the last axis, which the CPU kernel runs at a fraction of memory speed
    (18 ms for [8, 8, 256, 256] on 2 cores); the same row sums as a MatMul against a column
    of ones take a few: 75 -> 53 ms forward + backward at that shape.
    """

    def construct(self, x):
        return ops.softmax(x, axis=-1)

    def bprop(self, x, out, dout):
        weighted = dout * out
        return (weighted - out * _row_sums(weighted),)


SOFTMAX = Softmax()


class LogSoftmax(nn.Cell):
    """ops.log_softmax over the last axis (the losses'), with its derivative written out.

    MindSpore idiom: the LogSoftmaxGrad CPU kernel takes 4x torch's time at gpt-small's
    [2048, 16000] logits; dout - exp(out) * sum(dout), the row sums as a MatMul against a
    column of ones as in Softmax, takes 0.74 -> 0.44 s for the whole cross-entropy forward +
    backward at that shape on 2 busy cores.
    """

    def construct(self, x):
        return ops.log_softmax(x, -1)

    def bprop(self, x, out, dout):
        return (dout - ops.exp(out) * _row_sums(dout),)


LOG_SOFTMAX = LogSoftmax()


ACTIVATIONS = {"gelu": GELU,
               "gelu_new": lambda: nn.GELU(approximate=True),
               "relu": nn.ReLU}


class Attention(nn.Cell):
    def __init__(self, config: GPTConfig):
        super().__init__()
        m = config.model
        self.num_heads = m.num_heads
        self.head_dim = m.head_dim
        self.scale = 1.0 / math.sqrt(m.head_dim)
        self.q_proj = Dense(m.hidden_size, m.hidden_size, has_bias=m.bias)
        self.k_proj = Dense(m.hidden_size, m.hidden_size, has_bias=m.bias)
        self.v_proj = Dense(m.hidden_size, m.hidden_size, has_bias=m.bias)
        self.out_proj = Dense(m.hidden_size, m.hidden_size, has_bias=m.bias)
        self.attn_dropout = nn.Dropout(p=m.attention_dropout)
        self.resid_dropout = nn.Dropout(p=m.dropout)

    def construct(self, x, attention_bias, past_key_value=None, cache_slot=None, output_scores=False):
        """(output, (key, value)); with output_scores also the raw attention scores
        q k^T * scale [batch, heads, length, past + length], before the bias and softmax."""
        batch, length, hidden = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        if cache_slot is not None:
            # Static cache (StaticCacheDecoder): the one new key/value goes into its slot of
            # the fixed-length past, so every decoding step has the same shapes.
            k = ops.where(cache_slot, k, past_key_value[0])
            v = ops.where(cache_slot, v, past_key_value[1])
        elif past_key_value is not None:
            k = ops.cat((past_key_value[0], k), axis=2)
            v = ops.cat((past_key_value[1], v), axis=2)
        scores = BATCH_MATMUL_TRANSPOSE_B(q, k) * self.scale
        probs = self.attn_dropout(SOFTMAX(scores + attention_bias))
        out = BATCH_MATMUL(probs, v).transpose(0, 2, 1, 3).reshape(batch, length, hidden)
        if output_scores:
            return self.resid_dropout(self.out_proj(out)), (k, v), scores
        return self.resid_dropout(self.out_proj(out)), (k, v)


class MLP(nn.Cell):
    def __init__(self, config: GPTConfig):
        super().__init__()
        m = config.model
        self.fc_in = Dense(m.hidden_size, m.ffn_size, has_bias=m.bias)
        self.act = ACTIVATIONS[m.activation]()
        self.fc_out = Dense(m.ffn_size, m.hidden_size, has_bias=m.bias)
        self.dropout = nn.Dropout(p=m.dropout)

    def construct(self, x):
        return self.dropout(self.fc_out(self.act(self.fc_in(x))))


class Block(nn.Cell):
    def __init__(self, config: GPTConfig):
        super().__init__()
        m = config.model
        self.ln_1 = nn.LayerNorm((m.hidden_size,), epsilon=m.layer_norm_eps)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm((m.hidden_size,), epsilon=m.layer_norm_eps)
        self.mlp = MLP(config)

    def construct(self, x, attention_bias, past_key_value=None, cache_slot=None, output_scores=False):
        """(output, (key, value)); with output_scores also the attention's raw scores."""
        attn = self.attn(self.ln_1(x), attention_bias, past_key_value, cache_slot, output_scores)
        x = x + attn[0]
        x = x + self.mlp(self.ln_2(x))
        return (x,) + attn[1:]


class GPT(nn.Cell):
    def __init__(self, config: GPTConfig):
        super().__init__()
        m = config.model
        self.config = config
        self.embed_tokens = nn.Embedding(m.vocab_size, m.hidden_size)
        self.embed_positions = nn.Embedding(m.max_position_embeddings, m.hidden_size)
        self.dropout = nn.Dropout(p=m.dropout)
        self.layers = nn.CellList([Block(config) for _ in range(m.num_layers)])
        self.ln_f = nn.LayerNorm((m.hidden_size,), epsilon=m.layer_norm_eps)
        init_gpt_weights(self, m)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                 use_cache=False, logits_to_keep=0, output_intermediates=False):
        # Value checks run here, outside construct: graph mode cannot raise on tensor values.
        ids = input_ids.asnumpy()
        past_length = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        check_inputs(self.config, tuple(ids.shape), int(ids.min()), int(ids.max()), past_length,
                     None if attention_mask is None else tuple(attention_mask.shape))
        return super().__call__(input_ids, attention_mask, position_ids, past_key_values, use_cache,
                                logits_to_keep, output_intermediates)

    def construct(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                  use_cache=False, logits_to_keep=0, output_intermediates=False):
        """Logits [batch, length, vocab]; with use_cache also the per-layer (key, value).

        logits_to_keep > 0: logits of the last that many positions only (generation needs
        the last one; the output projection over every prompt position is wasted work).

        output_intermediates: also (after the cache, if any) hidden_states, num_layers + 1
        tensors [batch, length, hidden] (the first layer's input, then each layer's output,
        without ln_f), and attention_scores, per layer the raw scores [batch, heads, length,
        past + length] before the mask and softmax (what distillation compares). A Python
        bool: graph mode compiles one graph per value.

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
            outputs = outputs + (presents,)
        if output_intermediates:
            outputs = outputs + (hidden_states, attention_scores)
        return outputs

    def output_logits(self, x):
        """Final LayerNorm and the tied output projection: [batch, length, vocab]."""
        return tied_logits(self.ln_f(x), self.embed_tokens.embedding_table)

    def decode(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
               output_intermediates=False):
        """The decoder's last hidden states [batch, length, hidden] (before ln_f), the
        per-layer (key, value), and with output_intermediates the hidden states and raw
        attention scores construct describes (else empty tuples)."""
        past_length = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        batch, length = input_ids.shape
        if position_ids is None:
            position_ids = _default_position_ids(attention_mask, batch, length, past_length)
        x = self.dropout(self.embed_tokens(input_ids) + self.embed_positions(position_ids))
        attention_bias = causal_attention_bias(attention_mask, batch, length, past_length, x.dtype)
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
        return x, presents, hidden_states, attention_scores



class DecoderForExport(nn.Cell):
    """The GPT with flat inputs and outputs, the signature of the exported decoder.

    (input_ids, attention_mask, position_ids, past key and value of each layer) ->
    (logits, present key and value of each layer). A past of length 0 serves the prompt,
    so one graph does both prefill and decoding. Names and axes: export/signature.py.
    """

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model
        self.num_layers = model.config.model.num_layers

    def construct(self, input_ids, attention_mask, position_ids, *past):
        past_key_values = ()
        for i in range(self.num_layers):
            past_key_values = past_key_values + ((past[2 * i], past[2 * i + 1]),)
        logits, presents = self.model(input_ids, attention_mask, position_ids, past_key_values,
                                      True)
        outputs = (logits,)
        for key_value in presents:
            outputs = outputs + key_value
        return outputs


class StaticCachePrefill(nn.Cell):
    """The prompt pass of generation over a static cache, one compiled graph per shape.

    (input_ids, attention_mask [batch, prompt], left-padded) -> (logits of the last
    position [batch, vocab], key and value of each layer [batch, heads, prompt, head_dim]).
    The caller pads the keys and values to the cache length StaticCacheDecoder runs at.
    """

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def construct(self, input_ids, attention_mask):
        logits, presents = self.model(input_ids, attention_mask, None, None, True, 1)
        outputs = (logits[:, -1],)
        for key_value in presents:
            outputs = outputs + key_value
        return outputs


class StaticCacheDecoder(nn.Cell):
    """One decoding step over a preallocated cache of fixed length: the same shapes at every
    step, so graph mode compiles it once per (batch, cache length) and reuses it.

    (input_ids [batch, 1], attention_mask [batch, cache], write_position int32 scalar, key
    and value of each layer [batch, heads, cache, head_dim]) -> (logits [batch, vocab], the
    keys and values with this token's written at slot write_position). attention_mask is 1
    for the real tokens in slots 0..write_position (this one included), 0 for padding and
    for the slots not written yet; positions are the count of real tokens before the token.
    """

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model
        self.num_layers = model.config.model.num_layers

    def construct(self, input_ids, attention_mask, write_position, *cache):
        batch, length = input_ids.shape
        total = attention_mask.shape[1]
        mask = attention_mask.astype(ms.int32)
        position_ids = ops.maximum(mask.sum(axis=1, keepdims=True) - 1, 0)
        x = self.model.embed_tokens(input_ids) + self.model.embed_positions(position_ids)
        # As if the query came after every slot: the causal rule allows all of them, and the
        # mask (0 beyond write_position) leaves the ones written so far.
        attention_bias = causal_attention_bias(mask, batch, length, total - length, x.dtype)
        cache_slot = (ops.arange(0, total, dtype=ms.int32) == write_position).view(1, 1, total, 1)
        outputs = ()
        for i in range(self.num_layers):
            x, key_value = self.model.layers[i](x, attention_bias, (cache[2 * i], cache[2 * i + 1]),
                                                cache_slot)
            outputs = outputs + key_value
        return (self.model.output_logits(x)[:, -1],) + outputs


def init_gpt_weights(model: nn.Cell, m) -> None:
    """GPT-2 init of every Dense and Embedding of ``model``: N(0, m.initializer_range),
    residual output projections (out_proj, fc_out) scaled by 1/sqrt(2 * layers) so the
    residual stream's variance does not grow with depth; biases zero. Also GPT-XL's."""
    residual_std = m.initializer_range / math.sqrt(2 * m.num_layers)
    for name, cell in model.cells_and_names():
        if isinstance(cell, (nn.Dense, nn.Embedding)):
            std = residual_std if name.endswith(("out_proj", "fc_out")) else m.initializer_range
            weight = cell.weight if isinstance(cell, nn.Dense) else cell.embedding_table
            weight.set_data(initializer(Normal(sigma=std), weight.shape, weight.dtype))
        if isinstance(cell, nn.Dense) and cell.bias is not None:
            cell.bias.set_data(initializer("zeros", cell.bias.shape, cell.bias.dtype))


def tied_logits(hidden, table):
    """hidden [batch, length, width] x the token table [vocab, width] -> logits [batch,
    length, vocab]: the output projection tied to the embedding (GPT, GPT-XL)."""
    batch, length, width = hidden.shape
    if table.dtype != hidden.dtype:
        # Mixed precision keeps LayerNorm in fp32 while the table may be fp16/bf16. Only
        # then: an astype to the same dtype still copies the whole table in graph mode.
        table = table.astype(hidden.dtype)
    # MindSpore idiom: a 2-D MatMul with transpose_b reads the table as stored; a 3-D x
    # 2-D ops.matmul broadcasts the table once per batch row (BroadcastTo + BatchMatMul)
    # and .T copies it, 32 MB each at gpt-small, on every decoding step.
    logits = _MATMUL_TRANSPOSE_B(hidden.reshape(batch * length, width), table)
    return logits.reshape(batch, length, -1)


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
    weights = ops.full((rows.shape[0],), 1.0 / rows.shape[0], dtype=ms.float32)
    token_mask = ops.ones(logits.shape[:2], ms.float32)
    return (_losses(rows, input_ids), ((rows, weights),),
            ((hidden_states, attention_scores, token_mask, True),))


def _logit_rows(logits):
    """[batch, length, vocab] -> [batch * length, vocab] in fp32."""
    return logits.reshape(-1, logits.shape[-1]).astype(ms.float32)


def _losses(rows, input_ids):
    """training_loss's outputs from the logit rows of input_ids[:, :-1]."""
    return (cross_entropy(rows, input_ids[:, 1:].reshape(-1)),)


# Targets equal to this are left out of the mean: torch's F.cross_entropy default.
IGNORE_INDEX = -100
_NLL_LOSS = ops.NLLLoss(reduction="none", ignore_index=IGNORE_INDEX)


def cross_entropy(logits, labels):
    """torch's F.cross_entropy(logits [n, classes], labels [n]): the mean over the rows whose
    label is not IGNORE_INDEX of -log softmax(logits)[label].

    MindSpore idiom: LogSoftmax (its gradient written out: LogSoftmax above) + the NLLLoss
    primitive (the ignore index built in), as torch computes it. ops.cross_entropy is composite
    (ReduceMax, Exp, Log, ... with their gradients): 0.94 s against 0.2 s forward +
    backward at [2048, 16000] on 2 CPU cores (docs/benchmarks.md). The mean is ReduceMean's
    over the rows' losses (ignored rows 0) divided by the share of rows kept: NLLLoss's own
    mean, like ReduceSum, adds the rows one by one in float32 on CPU, 7e-4 relative off
    for 73,728 near-equal losses (a segmentation batch) where ReduceMean is 1e-6 off.
    """
    labels = labels.astype(ms.int32)
    weight = ops.ones(logits.shape[-1], logits.dtype)
    # Ignored rows are given label 0 and their loss multiplied by 0, not left to NLLLoss's
    # ignore_index: the CPU kernel does not write the ignored rows' losses, which then hold
    # whatever the reused buffer held (1.0 in PyNative, -inf in a compiled DALL-E loss).
    keep = labels != IGNORE_INDEX
    losses = _NLL_LOSS(LOG_SOFTMAX(logits), labels * keep.astype(ms.int32), weight)[0]
    keep = keep.astype(losses.dtype)
    return (losses * keep).mean() / keep.mean()


def _default_position_ids(attention_mask, batch, length, past_length):
    if attention_mask is None:
        positions = ops.arange(past_length, past_length + length, dtype=ms.int32)
        return ops.broadcast_to(positions.expand_dims(0), (batch, length))
    positions = ops.cumsum(attention_mask.astype(ms.int32), axis=1) - 1
    return ops.maximum(positions, 0)[:, past_length:]


def causal_attention_bias(attention_mask, batch, length, past_length, dtype):
    """[batch, 1, length, past + length]: 0 where a query may attend, dtype-min elsewhere.

    The most negative finite value rather than -inf keeps fully masked rows (padding
    queries) finite instead of NaN.
    """
    total = past_length + length
    query_pos = ops.arange(past_length, total, dtype=ms.int32).expand_dims(1)
    key_pos = ops.arange(0, total, dtype=ms.int32).expand_dims(0)
    allowed = (key_pos <= query_pos).view(1, 1, length, total)
    if attention_mask is not None:
        allowed = ops.logical_and(allowed, attention_mask.astype(ms.bool_).view(batch, 1, 1, total))
    zero = ops.zeros((), dtype)
    return ops.where(allowed, zero, ops.full((), _dtype_min(dtype), dtype=dtype))


def _dtype_min(dtype):
    if dtype == ms.float16:
        return -65504.0
    if dtype == ms.bfloat16:
        return -3.3895313892515355e38
    return -3.4028234663852886e38

"""wav2vec 2.0 in MindSpore (design.md §2.3), mirrored by torch_impl/wav2vec2.py.

The architecture of Hugging Face ``Wav2Vec2ForPreTraining`` / ``Wav2Vec2ForCTC`` module for
module, so its weights convert by renaming alone (taichu/convert/hf_wav2vec2.py):

  raw audio [batch, samples]
  -> FeatureEncoder: strided Conv1d stack (GroupNorm on the first conv, or LayerNorm after
     every conv), GELU                                        -> conv features [batch, frames, C]
  -> FeatureProjection: LayerNorm (the "extract features" the quantizer reads), Linear
  -> masked frames replaced by masked_spec_embed
  -> Encoder: padded frames zeroed, + PositionalConvEmbedding (a grouped, weight-normalised
     Conv1d over frames), Transformer layers (post-LN, or pre-LN "stable layer norm")
  -> head "pretraining": project_hid of the context, Quantizer (Gumbel-softmax product
     codebook) + project_q of the extract features, contrastive + diversity loss;
     head "ctc": dropout, lm_head, CTC loss.

Every random draw of training (masked frames, distractors, Gumbel noise) is an input,
drawn in numpy by taichu/families/wav2vec2.py, so both backends compute the same loss.
Everything inside is plain tensor math with static shapes and selects instead of branches
on tensor values, so graph mode (mindspore.jit) compiles a whole training step as one graph.
Attribute paths equal the PyTorch module's, so canonical weight names differ only in leaves
(gamma/beta of LayerNorm and GroupNorm, 4-D Conv1d weights), mapped in taichu/weights.py;
the position convolution holds plain Parameters (bias, weight_g, weight_v) of the canonical
shapes. Uses mindspore.nn/ops rather than mint: mint has no CPU kernels for these layers.

MindSpore idioms (each named where it is used): the feature encoder runs channels-last with
its convolutions as one matmul over cut-out frames (FrameConv1d, its input cut by the Slice
primitive) and its LayerNorms' gradient written out (FrameLayerNorm), the position convolution
as one BatchMatMul per tap (WeightNormConv1d), since MindSpore's CPU Conv2D is 10-30x
slower than torch's conv here; linear layers are mindspore_impl.gpt's Dense (bias by Add),
exact GELU its GELU cell (written bprop); attention is mindspore_impl.clip's (BatchMatMul
with transpose_b); the CTC loss works around two CTCLossV2 kernel limits; the training
loss reads plain numbers copied from the config (graph mode cannot read the pydantic
config); int32 lengths and ids (MindSpore's CPU kernels).

Training interface, called by the shared trainer:
- ``training_loss(model, *inputs) -> (loss,)``: head "pretraining": (input_values,
  attention_mask, mask_time_indices, sampled_negative_indices, gumbel_noise); head "ctc":
  (input_values, attention_mask, mask_time_indices, labels);
- ``after_step(model)`` after each optimizer update: counts it in ``num_updates`` (in place,
  ops.assign, so compiled steps read the new count), which anneals the Gumbel temperature
  and ends the feature encoder's freeze.
"""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import nn, ops
from mindspore.common.initializer import HeNormal, Normal, Uniform, initializer

from taichu.families.wav2vec2 import Wav2Vec2Config, check_inputs
from mindspore_impl import clip
from mindspore_impl.gpt import BATCH_MATMUL, GELU, Dense, _dtype_min, _row_sums

ACTIVATIONS = {"gelu": GELU,
               "gelu_new": lambda: nn.GELU(approximate=True),
               "relu": nn.ReLU}
# Hugging Face builds the feature encoder's norms with torch's default eps (its config's
# layer_norm_eps reaches only the projection and the Transformer): written out here, as
# MindSpore's defaults differ (nn.LayerNorm 1e-7).
FEATURE_NORM_EPS = 1e-5
# A distractor equal to its target gets this logit: Hugging Face writes -inf; any value
# whose exp underflows to 0 in float32 gives the same loss and gradients, and a finite one
# keeps MindSpore's softmax free of inf - inf (design.md §4).
MASKED_LOGIT = -1e9
# torch.cosine_similarity's eps: each vector's norm is clamped to at least this.
COSINE_EPS = 1e-8
# MindSpore idiom: hidden [n, width] x weight [out, width] -> [n, out], the weight read as stored.
_MATMUL_TRANSPOSE_B = ops.MatMul(transpose_b=True)
_SLICE = ops.Slice()


def _to_float32(x):
    # An astype to the same dtype still copies the tensor in graph mode.
    return x if x.dtype == ms.float32 else x.astype(ms.float32)


# ----------------------------------------------------------------------------- backbone

class FrameConv1d(nn.Conv1d):
    """nn.Conv1d (same parameters: weight [out, in, 1, kernel], bias [out]; no padding)
    computed channels-last as one matmul over cut-out frames: [batch, length, in] ->
    [batch, frames, out].

    MindSpore idiom (speed): the CPU Conv2D kernel behind nn.Conv1d is pathologically slow
    here. Forward + backward at [8, 64000], graph mode, 2 cores: the first conv (1 channel,
    kernel 10, stride 5) 0.80 s as nn.Conv1d, 0.13 s this way (torch 0.10 s); wav2vec2-small's
    seven convs with their LayerNorms and GELUs 5.3 s as nn.Conv1d, 0.44 s this way (torch_impl
    0.43 s).

    How: with m = ceil(kernel / stride), frame t covers the stride-wide rows t .. t + m - 1
    of the signal cut into rows of stride samples (a reshape, no copy). The batch is
    flattened into one [batch x rows, stride x in] matrix, so every shift is a slice of
    whole rows (contiguous, cheap; MindSpore's CPU StridedSlice is slow on inner axes and
    its StridedSliceGrad fails on a step > 1), the m shifted slices are concatenated into
    [batch x rows, m x stride x in] patches, one MatMul with the weight laid out as [out,
    tap, in] (taps past the kernel zero when the kernel is not a multiple of the stride)
    gives every row's output, and the m - 1 last rows of each utterance (frames that would
    reach into the next one) are dropped. The bias is added by Add, not BiasAdd
    (mindspore_impl.gpt.Dense's reason: BiasAddGrad is single-threaded on CPU).
    """

    def construct(self, x):
        batch, length, channels_in = x.shape
        kernel, stride = self.kernel_size[1], self.stride[1]
        frames = (length - kernel) // stride + 1
        shifts = -(-kernel // stride)                     # m = ceil(kernel / stride)
        rows = frames + shifts - 1                        # per utterance
        needed = rows * stride
        # Whole rows for the reshape. needed - length never exceeds this fixed pad, so pad by
        # it, then cut: no branch on the length, which a MINDIR with a dynamic length would
        # compile into control flow that fails to load. The zeros meet zero taps or dropped
        # frames only.
        pad = shifts * stride - kernel
        if pad > 0:
            x = ops.cat((x, ops.zeros((batch, pad, channels_in), x.dtype)), axis=1)
        # MindSpore idiom (speed): the Slice primitive, not x[:, :needed]: the CPU
        # StridedSlice copies element by element when a slice covers the whole tensor, as
        # this one does at every length that is a multiple of the first conv's stride (44 ms
        # for a [16, 48000] batch against under 1 ms). Not ops.narrow: it checks its bounds
        # in Python, which a MINDIR with a dynamic length cannot compile.
        x = _SLICE(x, (0, 0, 0), (batch, needed, channels_in))
        width = stride * channels_in
        flat = x.reshape(batch * rows, width)
        count = batch * rows
        if shifts > 1:
            # m - 1 zero rows, so that the last utterance's last rows have their shifts too.
            flat = ops.cat((flat, ops.zeros((shifts - 1, width), flat.dtype)), axis=0)
            patches = ops.cat([flat[j:j + count] for j in range(shifts)], axis=-1)
        else:
            patches = flat
        weight = self.weight.reshape(self.out_channels, channels_in, kernel).transpose(0, 2, 1)
        if shifts * stride > kernel:
            weight = ops.cat((weight, ops.zeros((self.out_channels, shifts * stride - kernel, channels_in),
                                                weight.dtype)), axis=1)
        y = _MATMUL_TRANSPOSE_B(patches, weight.reshape(self.out_channels, shifts * width))
        if self.has_bias:
            y = y + self.bias
        y = y.reshape(batch, rows, self.out_channels)
        return y if shifts == 1 else y[:, :frames]


class _FrameLayerNormFunction(nn.Cell):
    """LayerNorm over the last axis as a function of (x, gamma, beta) with its derivative
    written out: the gradient flows to gamma and beta as inputs, so FrameLayerNorm keeps
    nn.LayerNorm's parameters."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps
        self.norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)

    def construct(self, x, gamma, beta):
        return self.norm(x, gamma, beta)   # (normalised, mean, variance): the last two for bprop

    def bprop(self, x, gamma, beta, out, dout):
        _, mean, variance = out
        dy = dout[0]
        width = x.shape[-1]
        rstd = ops.rsqrt(variance + self.eps)
        normed = (x - mean) * rstd
        scaled = dy * gamma
        dx = (scaled - _row_sums(scaled) / width - normed * (_row_sums(scaled * normed) / width)) * rstd
        return (dx, (dy * normed).reshape(-1, width).sum(0), dy.reshape(-1, width).sum(0))


class FrameLayerNorm(nn.LayerNorm):
    """nn.LayerNorm over each frame's channels (same gamma and beta), its gradient written out.

    MindSpore idiom (speed): the CPU LayerNormGrad kernel is slow on many short rows, the
    feature encoder's (a frame's 32-64 channels, ~10^5 frames a batch): forward + backward
    at [16, 9600, 32], graph mode, 2 cores, 221 ms with it, 80 ms this way (the gradient of
    the saved mean and variance in element-wise kernels, row sums as a MatMul against a
    column of ones); no gain at the Transformer's [16, 150, 128], which keeps nn.LayerNorm.
    """

    def __init__(self, width: int, eps: float):
        super().__init__((width,), epsilon=eps)
        self.function = _FrameLayerNormFunction(eps)

    def construct(self, x):
        return self.function(x, self.gamma, self.beta)[0]


class ConvLayer(nn.Cell):
    """One Conv1d of the feature encoder, its norm (if any) and the activation."""

    def __init__(self, config: Wav2Vec2Config, index: int):
        super().__init__()
        m = config.model
        channels_in = m.conv_dim[index - 1] if index > 0 else 1
        channels = m.conv_dim[index]
        self.conv = FrameConv1d(channels_in, channels, kernel_size=m.conv_kernel[index],
                                stride=m.conv_stride[index], pad_mode="valid", has_bias=m.conv_bias)
        if m.feat_extract_norm == "layer":
            # Over the channels of each frame: the channels-last layout as it comes.
            self.norm = "layer"
            self.layer_norm = FrameLayerNorm(channels, FEATURE_NORM_EPS)
        elif index == 0:
            # One group per channel: each channel normalised over time, over the padding
            # too (so group-norm features depend on how much a batch is padded, as in HF).
            self.norm = "group"
            self.layer_norm = nn.GroupNorm(channels, channels, eps=FEATURE_NORM_EPS, affine=True)
        else:
            self.norm = "none"
        self.activation = ACTIVATIONS[m.feat_extract_activation]()

    def construct(self, x):
        """[batch, length, channels_in] -> [batch, frames, channels] (channels-last: FrameConv1d)."""
        x = self.conv(x)
        if self.norm == "layer":
            x = self.layer_norm(x)
        elif self.norm == "group":
            # nn.GroupNorm wants [batch, channels, time].
            x = self.layer_norm(x.transpose(0, 2, 1)).transpose(0, 2, 1)
        return self.activation(x)


class FeatureEncoder(nn.Cell):
    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        self.conv_layers = nn.CellList([ConvLayer(config, i) for i in range(len(config.model.conv_dim))])

    def construct(self, input_values):
        """[batch, samples] -> conv features [batch, frames, conv_dim[-1]]."""
        x = input_values.expand_dims(-1)   # channels-last throughout (FrameConv1d)
        for layer in self.conv_layers:
            x = layer(x)
        return x


class FeatureProjection(nn.Cell):
    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        m = config.model
        self.layer_norm = FrameLayerNorm(m.conv_dim[-1], m.layer_norm_eps)
        self.projection = Dense(m.conv_dim[-1], m.hidden_size)
        self.dropout = nn.Dropout(p=m.feat_proj_dropout)

    def construct(self, features):
        """(projected [batch, frames, hidden], normalised features [batch, frames, C]): the
        quantizer reads the normalised features, before the projection."""
        normed = self.layer_norm(features)
        return self.dropout(self.projection(normed)), normed


class WeightNormConv1d(nn.Cell):
    """A Conv1d whose weight is g * v / ||v||, the norm taken over every axis but the
    kernel's (torch's weight_norm with dim=2, which Hugging Face applies): one length g per
    kernel position. Parameters bias [H], weight_g [1, 1, K], weight_v [H, H / groups, K]:
    plain Parameters of the canonical shapes (no leaf rename, a 3-D weight_v).

    MindSpore idiom (speed): channels-last in and out ([batch, frames, H]), the grouped
    convolution as K BatchMatMuls over groups, one per kernel tap, summed. MindSpore's CPU
    Conv2D (what ops.conv1d runs, grouped) took 1.7-2.0 s forward + backward at
    wav2vec2-small's [8, 128, 199] with K 32, 8 groups (torch 0.04-0.12 s), over a minute at
    base size; this way 0.06 s at small, 2.8 s at base ([8, 768, 400], K 128, 16 groups;
    torch 0.75 s). The
    utterances are laid end to end, each padded by K // 2 zeros on both sides, so every tap
    is a slice of whole rows; outputs that would straddle two utterances are dropped.
    """

    def __init__(self, hidden: int, kernel: int, groups: int):
        super().__init__()
        self.padding = kernel // 2
        self.groups = groups
        self.bias = ms.Parameter(ms.Tensor(np.zeros(hidden, np.float32)), name="bias")
        self.weight_g = ms.Parameter(ms.Tensor(np.ones((1, 1, kernel), np.float32)), name="weight_g")
        self.weight_v = ms.Parameter(ms.Tensor(np.zeros((hidden, hidden // groups, kernel), np.float32)),
                                     name="weight_v")

    def weight(self):
        norm = ops.sqrt(ops.pow(self.weight_v, 2).sum(axis=(0, 1), keepdims=True))
        return self.weight_g * (self.weight_v / norm)

    def construct(self, x):
        """[batch, frames, H] -> [batch, frames + 2 padding - K + 1, H]."""
        batch, frames, hidden = x.shape
        groups, kernel = self.groups, self.weight_v.shape[2]
        width = hidden // groups
        span = frames + 2 * self.padding                  # one padded utterance
        count = batch * span
        zeros = ops.zeros((batch, self.padding, hidden), x.dtype)
        x = ops.cat((zeros, x, zeros), axis=1).reshape(count, groups, width).transpose(1, 0, 2)
        x = ops.cat((x, ops.zeros((groups, kernel - 1, width), x.dtype)), axis=1)   # [G, count + K - 1, in]
        weight = self.weight().reshape(groups, width, width, kernel).transpose(0, 3, 2, 1)   # [G, K, in, out]
        y = BATCH_MATMUL(x[:, 0:count], weight[:, 0])
        for tap in range(1, kernel):
            y = y + BATCH_MATMUL(x[:, tap:tap + count], weight[:, tap])
        y = y.reshape(groups, batch, span, width)[:, :, :span - kernel + 1]
        # Bias by Add (not a conv's BiasAdd: single-threaded BiasAddGrad on CPU).
        return y.transpose(1, 2, 0, 3).reshape(batch, span - kernel + 1, hidden) + self.bias


class PositionalConvEmbedding(nn.Cell):
    """The relative position embedding: a grouped convolution over frames, "same" length
    (an even kernel makes one frame too many; the last is dropped, HF's SamePad), GELU."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        m = config.model
        kernel = m.num_conv_pos_embeddings
        self.conv = WeightNormConv1d(m.hidden_size, kernel, m.num_conv_pos_embedding_groups)
        self.remove_last = kernel % 2 == 0
        self.activation = ACTIVATIONS[m.feat_extract_activation]()

    def construct(self, x):
        """[batch, frames, hidden] -> [batch, frames, hidden] (the convolution channels-last:
        no transposes)."""
        frames = x.shape[1]
        y = self.conv(x)
        if self.remove_last:
            y = y[:, :frames]
        return self.activation(y)


class Attention(clip.Attention):
    """softmax(q k^T * scale + bias) v: CLIP's attention cell, imported (the same q_proj,
    k_proj, v_proj, out_proj, attn_dropout). MindSpore idiom: written out with
    BatchMatMul(transpose_b) where torch calls its fused scaled_dot_product_attention."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__(config.model, config)


class FeedForward(nn.Cell):
    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        m = config.model
        self.intermediate_dense = Dense(m.hidden_size, m.ffn_size)
        self.activation = ACTIVATIONS[m.activation]()
        self.intermediate_dropout = nn.Dropout(p=m.activation_dropout)
        self.output_dense = Dense(m.ffn_size, m.hidden_size)
        self.output_dropout = nn.Dropout(p=m.hidden_dropout)

    def construct(self, x):
        x = self.intermediate_dropout(self.activation(self.intermediate_dense(x)))
        return self.output_dropout(self.output_dense(x))


class EncoderLayer(nn.Cell):
    """Post-LN (base: x = LN(x + attn(x)); x = LN(x + ffn(x))) or, with ``stable``, pre-LN
    (large: x = x + attn(LN(x)); x = x + ffn(LN(x))). Same tensors either way."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        m = config.model
        self.stable = m.do_stable_layer_norm
        self.attention = Attention(config)
        self.dropout = nn.Dropout(p=m.hidden_dropout)
        self.layer_norm = nn.LayerNorm((m.hidden_size,), epsilon=m.layer_norm_eps)
        self.feed_forward = FeedForward(config)
        self.final_layer_norm = nn.LayerNorm((m.hidden_size,), epsilon=m.layer_norm_eps)

    def construct(self, x, attention_bias=None):
        if self.stable:
            x = x + self.dropout(self.attention(self.layer_norm(x), attention_bias))
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x + self.dropout(self.attention(x, attention_bias)))
        return self.final_layer_norm(x + self.feed_forward(x))


class Encoder(nn.Cell):
    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        m = config.model
        self.stable = m.do_stable_layer_norm
        self.pos_conv_embed = PositionalConvEmbedding(config)
        self.layer_norm = nn.LayerNorm((m.hidden_size,), epsilon=m.layer_norm_eps)
        self.dropout = nn.Dropout(p=m.hidden_dropout)
        self.layers = nn.CellList([EncoderLayer(config) for _ in range(m.num_layers)])

    def construct(self, x, frame_mask=None):
        """[batch, frames, hidden]; frame_mask [batch, frames] bool (True = real) or None.

        Padded frames are zeroed first, so the position convolution sees zeros past the
        end of every row; attention ignores padded keys (padded queries still get values,
        which nobody reads). The final LayerNorm comes before the layers (post-LN) or
        after them (pre-LN)."""
        attention_bias = None
        if frame_mask is not None:
            x = ops.where(frame_mask.expand_dims(-1), x, ops.zeros((), x.dtype))
            attention_bias = padding_attention_bias(frame_mask, x.dtype)
        x = x + self.pos_conv_embed(x)
        if not self.stable:
            x = self.layer_norm(x)
        x = self.dropout(x)
        for layer in self.layers:
            x = layer(x, attention_bias)
        if self.stable:
            x = self.layer_norm(x)
        return x


class Wav2Vec2Model(nn.Cell):
    """The backbone (HF ``Wav2Vec2Model``): what both heads and the tri-modal tower share."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        m = config.model
        self.conv_kernel = tuple(m.conv_kernel)
        self.conv_stride = tuple(m.conv_stride)
        self.feature_extractor = FeatureEncoder(config)
        self.feature_projection = FeatureProjection(config)
        self.masked_spec_embed = ms.Parameter(ms.Tensor(np.zeros(m.hidden_size, np.float32)),
                                              name="masked_spec_embed")
        self.encoder = Encoder(config)

    def frame_counts(self, attention_mask, batch: int, samples: int):
        """[batch] int32 (int64 in torch; MindSpore's CPU kernels take int32): frames of each
        row's real samples (HF's _get_feat_extract_output_lengths;
        taichu.families.wav2vec2.frame_count)."""
        if attention_mask is None:
            lengths = ops.full((batch,), samples, dtype=ms.int32)
        else:
            lengths = (attention_mask != 0).astype(ms.int32).sum(axis=-1)
        for kernel, stride in zip(self.conv_kernel, self.conv_stride):
            lengths = ops.where(lengths >= kernel, (lengths - kernel) // stride + 1, ops.zeros_like(lengths))
        return lengths

    def construct(self, input_values, attention_mask=None, mask_time_indices=None, frozen=None):
        """(hidden [batch, frames, hidden], extract_features [batch, frames, C] = the
        layer-normed conv features, conv_features [batch, frames, C], frame_mask [batch,
        frames] bool).

        Frames of ``mask_time_indices`` (bool [batch, frames]) enter the Transformer as
        masked_spec_embed. ``frozen`` (a bool scalar tensor, or None): while true no gradient
        reaches the feature encoder; a select, not a Python branch, so one compiled graph
        serves both phases."""
        conv_features = self.feature_extractor(input_values)
        if frozen is not None:
            conv_features = ops.where(frozen, ops.stop_gradient(conv_features), conv_features)
        batch, frames, _ = conv_features.shape
        counts = self.frame_counts(attention_mask, batch, input_values.shape[1])
        frame_mask = ops.arange(0, frames, dtype=ms.int32).expand_dims(0) < counts.expand_dims(1)
        hidden, extract_features = self.feature_projection(conv_features)
        if mask_time_indices is not None:
            embed = self.masked_spec_embed.astype(hidden.dtype).view(1, 1, -1)
            hidden = ops.where(mask_time_indices.astype(ms.bool_).expand_dims(-1), embed, hidden)
        # Without a sample mask HF neither zeroes padding nor masks keys: nor do we.
        hidden = self.encoder(hidden, None if attention_mask is None else frame_mask)
        return hidden, extract_features, conv_features, frame_mask


def init_backbone(backbone: Wav2Vec2Model, m) -> None:
    """Hugging Face's initialisation of the backbone (fairseq's where HF's does not take
    effect), drawn from MindSpore's seed; ``m`` its config (Wav2Vec2BackboneConfig). The
    tri-modal speech tower uses it."""
    std = m.initializer_range
    for _, cell in backbone.cells_and_names():
        if isinstance(cell, nn.Dense):
            _init(cell.weight, Normal(sigma=std))
            _init(cell.bias, "zeros")
        elif isinstance(cell, (nn.LayerNorm, nn.GroupNorm)):
            _init(cell.gamma, "ones")
            _init(cell.beta, "zeros")
        elif isinstance(cell, nn.Conv1d):
            # torch's kaiming_normal_ defaults (fan_in = in x kernel of the 4-D weight).
            _init(cell.weight, HeNormal(negative_slope=0, mode="fan_in", nonlinearity="leaky_relu"))
            if cell.has_bias:
                _init(cell.bias, Uniform(scale=math.sqrt(cell.group / (cell.in_channels * cell.kernel_size[1]))))
    projection = backbone.feature_projection.projection
    bound = math.sqrt(1.0 / projection.in_channels)
    _init(projection.weight, Uniform(scale=bound))
    _init(projection.bias, Uniform(scale=bound))
    # fairseq: v ~ N(0, sqrt(4 / (K * H))), then weight norm, so g = ||v|| and the
    # effective weight is v. (HF means the same but its normal_ lands on the computed
    # weight, not on g / v, which keep torch's default Conv1d init.)
    conv = backbone.encoder.pos_conv_embed.conv
    kernel, hidden = conv.weight_v.shape[2], conv.weight_v.shape[0]
    _init(conv.weight_v, Normal(sigma=math.sqrt(4.0 / (kernel * hidden))))
    v = conv.weight_v.asnumpy()
    conv.weight_g.set_data(ms.Tensor(np.sqrt((v ** 2).sum(axis=(0, 1), keepdims=True)), ms.float32))
    _init(conv.bias, "zeros")
    _init_unit_uniform(backbone.masked_spec_embed)


# ----------------------------------------------------------------------------- pretraining head

class Quantizer(nn.Cell):
    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        m = config.model
        q = m.quantizer
        self.num_groups = q.num_codevector_groups
        self.num_vars = q.num_codevectors_per_group
        self.codevectors = ms.Parameter(ms.Tensor(np.zeros(
            (1, self.num_groups * self.num_vars, q.codevector_dim // self.num_groups), np.float32)),
            name="codevectors")
        self.weight_proj = Dense(m.conv_dim[-1], self.num_groups * self.num_vars)

    def construct(self, features, mask_time_indices, gumbel_noise=None, temperature=None):
        """(quantized [batch, frames, codevector_dim], perplexity scalar).

        Training: the one-hot of argmax softmax((logits + g) / tau) per group, with the
        gradient of the soft probabilities (straight-through, F.gumbel_softmax(hard=True)'s
        arithmetic); the perplexity is that of the noise-free softmax averaged over the
        masked frames. Evaluation: the one-hot of argmax logits (no noise) and the
        perplexity of those one-hots over the masked frames. Perplexity = sum over groups
        of exp(entropy of the group's average distribution).

        ``self.training`` is a compile-time constant: a compiled graph holds the branch of
        the mode it was compiled in. A Cell's own call compiles once per mode; a
        mindspore.jit function does not (MindSpore 2.10 keys its graph on the arguments, not
        on the cells' training flag), so evaluation needs a jit function of its own, as
        mindspore_impl.train's eval graph is."""
        batch, frames, _ = features.shape
        groups, entries = self.num_groups, self.num_vars
        logits = _to_float32(self.weight_proj(features).view(batch * frames, groups, entries))
        if self.training:
            noisy = (logits + _to_float32(gumbel_noise.reshape(batch * frames, groups, entries))) / temperature
            y_soft = ops.softmax(noisy, axis=-1)
            y_hard = _one_hot(ops.argmax(y_soft, dim=-1), entries, y_soft.dtype)
            probs = y_hard - ops.stop_gradient(y_soft) + y_soft
            perplexity = _perplexity(ops.softmax(logits, axis=-1), mask_time_indices)
        else:
            probs = _one_hot(ops.argmax(logits, dim=-1), entries, logits.dtype)
            perplexity = _perplexity(probs, mask_time_indices)
        # Each group's probabilities [G, batch * frames, V] times its codebook [G, V, D].
        codebook = self.codevectors.view(groups, entries, -1)
        if probs.dtype != codebook.dtype:
            probs = probs.astype(codebook.dtype)
        chosen = BATCH_MATMUL(probs.transpose(1, 0, 2), codebook)                          # [G, BT, D]
        return chosen.transpose(1, 0, 2).reshape(batch, frames, -1), perplexity


def _one_hot(indices, depth: int, dtype):
    """F.one_hot(indices, depth).to(dtype): MindSpore's one_hot takes the on/off values."""
    return ops.one_hot(indices, depth, ops.ones((), dtype), ops.zeros((), dtype))


def _perplexity(probs, mask_time_indices):
    """probs [batch * frames, G, V]: sum over groups of exp(-sum p log p) of the group's
    distribution averaged over the masked frames (all frames without a mask)."""
    if mask_time_indices is None:
        marginal = probs.mean(axis=0)
    else:
        mask = mask_time_indices.reshape(-1, 1, 1).astype(ms.bool_)
        # At least 1: a batch without masked frames gets perplexity G, not HF's NaN.
        count = ops.clamp(mask_time_indices.astype(ms.bool_).astype(probs.dtype).sum(), min=1.0)
        marginal = ops.where(mask, probs, ops.zeros((), probs.dtype)).sum(axis=0) / count
    # p log p with 0 log 0 = 0 (torch.xlogy), written with a select.
    safe = ops.where(marginal > 0, marginal, ops.ones_like(marginal))
    return ops.exp(-(marginal * ops.log(safe)).sum(axis=-1)).sum()


# ----------------------------------------------------------------------------- the model

class Wav2Vec2(nn.Cell):
    """The backbone ``wav2vec2`` and one head: ``quantizer``, ``project_hid``, ``project_q``
    (pretraining) or ``dropout``, ``lm_head`` (ctc); plus the ``num_updates`` counter."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        m = config.model
        self.config = config
        self.head = m.head
        self.freeze_steps = int(m.ctc.freeze_feature_encoder_steps) if m.head == "ctc" else 0
        self.wav2vec2 = Wav2Vec2Model(config)
        if m.head == "pretraining":
            q = m.quantizer
            # fairseq's dropout_features (HF's feat_quantizer_dropout): on the quantizer's input.
            self.dropout_features = nn.Dropout(p=m.final_dropout)
            self.quantizer = Quantizer(config)
            self.project_hid = Dense(m.hidden_size, q.proj_codevector_dim)
            self.project_q = Dense(q.codevector_dim, q.proj_codevector_dim)
            self.contrastive_temperature = float(q.contrastive_logits_temperature)
            self.max_gumbel_temperature = float(q.max_gumbel_temperature)
            self.min_gumbel_temperature = float(q.min_gumbel_temperature)
            # decay ** n as exp(n * log(decay)), log taken in float64 here: decay itself
            # rounded to float32 (0.999995 -> 0.99999499) would be 0.07% off after 1e5 updates.
            self.log_gumbel_decay = math.log(q.gumbel_temperature_decay)
            # Plain numbers, so graph mode reads constants instead of the pydantic config
            # (torch's training_loss reads config.model.quantizer).
            self.diversity_loss_weight = float(q.diversity_loss_weight)
            self.feature_penalty_weight = float(q.feature_penalty_weight)
        else:
            self.dropout = nn.Dropout(p=m.final_dropout)
            self.lm_head = Dense(m.hidden_size, m.ctc.vocab_size)
            # A plain bool for graph mode (torch's ctc_loss reads config.model.ctc).
            self.zero_infinity = bool(m.ctc.zero_infinity)
        # Optimizer updates so far (after_step counts them): anneals the Gumbel temperature
        # and ends the feature encoder's freeze inside the step; saved with the model. A
        # non-trainable int64 Parameter (torch: a buffer), written in place by ops.assign.
        self.num_updates = ms.Parameter(ms.Tensor(np.zeros(1, np.int64)), name="num_updates",
                                        requires_grad=False)
        self._init_weights()

    def _init_weights(self):
        """Hugging Face's Wav2Vec2 initialisation (fairseq's where HF's does not take effect),
        drawn from MindSpore's seed."""
        init_backbone(self.wav2vec2, self.config.model)
        if self.head == "pretraining":
            _init(self.quantizer.weight_proj.weight, Normal(sigma=1.0))
            _init(self.quantizer.weight_proj.bias, "zeros")
            _init_unit_uniform(self.quantizer.codevectors)
            # torch's nn.Linear.reset_parameters: U(+-1 / sqrt(in)) for weight and bias.
            for dense in (self.project_hid, self.project_q):
                _init(dense.weight, Uniform(scale=1.0 / math.sqrt(dense.in_channels)))
                _init(dense.bias, Uniform(scale=1.0 / math.sqrt(dense.in_channels)))
        else:
            _init(self.lm_head.weight, Normal(sigma=self.config.model.initializer_range))
            _init(self.lm_head.bias, "zeros")

    def _check(self, input_values, attention_mask=None):
        # Value checks run here, outside construct: graph mode cannot raise on tensor values.
        # MindSpore names dtypes "Float32": lower-cased for check_inputs' "float" test.
        check_inputs(self.config, tuple(input_values.shape),
                     None if attention_mask is None else attention_mask.asnumpy(),
                     str(input_values.dtype).lower())

    def gumbel_temperature(self):
        """max(max_t * decay ** num_updates, min_t), a float32 scalar tensor. (MindSpore's
        float32 CPU Exp is not correctly rounded: up to ~2e-6 relative from torch's value.)"""
        decayed = self.max_gumbel_temperature * ops.exp(self.num_updates[0].astype(ms.float32)
                                                        * self.log_gumbel_decay)
        return ops.clamp(decayed, min=self.min_gumbel_temperature)

    def encode(self, input_values, attention_mask=None, mask_time_indices=None):
        """(hidden [batch, frames, hidden], extract_features [batch, frames, C], frame_mask
        [batch, frames] bool, feature_penalty scalar).

        input_values: [batch, samples] float, normalised per utterance; attention_mask:
        [batch, samples] (1 = real sample, right-padded) or None; mask_time_indices: [batch,
        frames] bool or None. feature_penalty is fairseq's features_pen: the mean square of
        the conv features (before the projection's LayerNorm) over the real frames.
        No input checks here (training runs this in a compiled graph): see __call__."""
        # No gradient reaches the feature encoder for the first freeze_steps updates (CTC).
        frozen = self.num_updates[0] < self.freeze_steps if self.freeze_steps > 0 else None
        hidden, extract_features, conv_features, frame_mask = self.wav2vec2(
            input_values, attention_mask, mask_time_indices, frozen)
        real = frame_mask.expand_dims(-1).astype(ms.float32)
        squares = ops.pow(_to_float32(conv_features), 2) * real
        feature_penalty = squares.sum() / ops.clamp(real.sum() * conv_features.shape[2], min=1.0)
        return hidden, extract_features, frame_mask, feature_penalty

    def __call__(self, input_values, attention_mask=None):
        self._check(input_values, attention_mask)
        return super().__call__(input_values, attention_mask)

    def construct(self, input_values, attention_mask=None):
        """Head "ctc": logits [batch, frames, vocab]; head "pretraining": the last hidden
        states [batch, frames, hidden]."""
        hidden = self.encode(input_values, attention_mask)[0]
        if self.head == "ctc":
            return self.lm_head(self.dropout(hidden))
        return hidden

    def embed(self, input_values, attention_mask=None):
        """One vector per utterance [batch, hidden]: the mean of the last hidden states over
        its real frames."""
        self._check(input_values, attention_mask)
        hidden, _, frame_mask, _ = self.encode(input_values, attention_mask)
        return mean_over_frames(hidden, frame_mask)


def mean_over_frames(hidden, frame_mask):
    """[batch, frames, hidden] averaged over each row's real frames -> [batch, hidden] (the
    utterance embedding of ``embed``, of the export and of taichu.recognition)."""
    weights = frame_mask.astype(hidden.dtype).expand_dims(-1)
    return (hidden * weights).sum(axis=1) / weights.sum(axis=1)


def _init(param, init):
    param.set_data(initializer(init, param.shape, param.dtype))


def _init_unit_uniform(param):
    """torch's nn.init.uniform_ default, U(0, 1): MindSpore's Uniform(0.5) is U(-0.5, 0.5)."""
    values = initializer(Uniform(scale=0.5), param.shape, param.dtype).init_data().asnumpy() + 0.5
    param.set_data(ms.Tensor(values, param.dtype))


# ----------------------------------------------------------------------------- losses

def pretraining_terms(model: Wav2Vec2, input_values, attention_mask, mask_time_indices,
                      sampled_negative_indices, gumbel_noise=None) -> dict:
    """The terms of Hugging Face's Wav2Vec2ForPreTraining loss, and fairseq's feature penalty.

    mask_time_indices: [batch, frames] bool (masked frames, the targets);
    sampled_negative_indices: [batch, frames, K] int, K distractors per frame as indices into
    the flattened [batch * frames] axis; gumbel_noise: [batch, frames, G * V] float32
    standard Gumbel noise (read in training mode only; None in evaluation).
    Returns contrastive_sum (cross-entropy summed over masked frames), diversity ((G V -
    perplexity) / (G V)), perplexity, num_masked (int32), feature_penalty, temperature (the
    Gumbel temperature used).
    """
    mask = mask_time_indices.astype(ms.bool_)
    # Indexed, not unpacked into _: graph mode warns of "side effect nodes eliminated by
    # mistake" for an unpacked output nobody reads (harmless, but noise in every log).
    encoded = model.encode(input_values, attention_mask, mask)
    hidden, extract_features, feature_penalty = encoded[0], encoded[1], encoded[3]
    # 1. the context of every frame, projected to the comparison space
    predicted = model.project_hid(hidden)
    # 2. every frame's quantized (unmasked) features, projected there too
    temperature = model.gumbel_temperature()
    quantized, perplexity = model.quantizer(model.dropout_features(extract_features), mask, gumbel_noise,
                                            temperature)
    if quantized.dtype != model.project_q.weight.dtype:
        quantized = quantized.astype(model.project_q.weight.dtype)
    quantized = model.project_q(quantized)
    batch, frames, dim = quantized.shape
    # 3. K distractors per frame, gathered from the flattened quantized frames
    indices = sampled_negative_indices.reshape(-1).astype(ms.int32)
    negatives = ops.gather(quantized.reshape(batch * frames, dim), indices, 0)
    negatives = negatives.view(batch, frames, -1, dim)                                  # [B, T, K, D]
    candidates = ops.cat((quantized.expand_dims(2), negatives), axis=2)                 # [B, T, 1 + K, D]
    # 4. cosine similarity / temperature, in float32
    logits = _cosine(_to_float32(predicted).expand_dims(2), _to_float32(candidates)) / model.contrastive_temperature
    # 5. a distractor equal to the target (a low-usage codebook) is no distractor
    same = ops.all(negatives == quantized.expand_dims(2), axis=-1)                      # [B, T, K]
    same = ops.cat((ops.zeros_like(same[:, :, :1]), same), axis=2)
    logits = ops.where(same, ops.full((), MASKED_LOGIT, dtype=logits.dtype), logits)
    # 6. cross-entropy with the target first, summed over the masked frames
    nll = -ops.log_softmax(logits, -1)[:, :, 0]
    contrastive_sum = ops.where(mask, nll, ops.zeros((), nll.dtype)).sum()
    # 7. diversity: how far the codebook usage is from uniform
    num_codevectors = model.quantizer.num_groups * model.quantizer.num_vars
    diversity = (num_codevectors - perplexity) / num_codevectors
    return {"contrastive_sum": contrastive_sum, "diversity": diversity, "perplexity": perplexity,
            "num_masked": mask.astype(ms.int32).sum(), "feature_penalty": feature_penalty,
            "temperature": temperature}


def _cosine(a, b):
    """torch.cosine_similarity over the last axis: each vector divided by its norm (at
    least COSINE_EPS), then the dot product."""
    a = a / ops.clamp(ops.sqrt(ops.pow(a, 2).sum(axis=-1, keepdims=True)), min=COSINE_EPS)
    b = b / ops.clamp(ops.sqrt(ops.pow(b, 2).sum(axis=-1, keepdims=True)), min=COSINE_EPS)
    return (a * b).sum(axis=-1)


# The CTCLossV2 primitive that ops.ctc_loss calls, one per zero_infinity: blank 0, per-row
# losses (its second output, log_alpha, is not read: indexed, see pretraining_terms).
_CTC_LOSS = {flag: ops.CTCLossV2(blank=0, reduction="none", zero_infinity=flag) for flag in (False, True)}


def ctc_loss(model: Wav2Vec2, input_values, attention_mask, mask_time_indices, labels):
    """CTC of lm_head(dropout(hidden)) against ``labels`` [batch, S] (padded with -100; the
    blank, id 0, never appears): each utterance's loss divided by its label length, then
    the batch mean (torch's "mean", HF's ctc_loss_reduction="mean"); input lengths are the
    frames of each row's real samples.

    MindSpore workarounds (2.10 CPU): its CTCLossV2 kernel refuses (raises) a row whose label
    is longer than its frames, where torch returns an infinite loss: such a row gets label
    length 0 (a finite loss, discarded) and torch's loss, inf, by a select. And its
    zero_infinity zeroes the gradient of an infinite loss but returns the loss itself as inf
    (a row infeasible through repeats that need blanks): with zero_infinity every infinite
    loss becomes 0 by a select, as torch's does, gradients staying zero. The "mean" is
    written out over the per-row losses (MindSpore's own "mean" is the same arithmetic)."""
    encoded = model.encode(input_values, attention_mask, mask_time_indices)   # indexed: pretraining_terms
    hidden, frame_mask = encoded[0], encoded[2]
    logits = model.lm_head(model.dropout(hidden))
    log_probs = ops.log_softmax(_to_float32(logits), -1).transpose(1, 0, 2)              # [T, B, V]
    labels = labels.astype(ms.int32)
    real = labels >= 0
    targets = ops.where(real, labels, ops.zeros_like(labels))
    input_lengths = frame_mask.astype(ms.int32).sum(axis=-1)
    target_lengths = real.astype(ms.int32).sum(axis=-1)
    fits = target_lengths <= input_lengths
    losses = _CTC_LOSS[model.zero_infinity](log_probs, targets, input_lengths,
                                            ops.where(fits, target_lengths, ops.zeros_like(target_lengths)))[0]
    losses = ops.where(fits, losses, ops.full((), float("inf"), dtype=losses.dtype))
    if model.zero_infinity:
        losses = ops.where(ops.isinf(losses), ops.zeros((), losses.dtype), losses)
    return (losses / ops.clamp(target_lengths.astype(losses.dtype), min=1.0)).mean()


def training_loss(model: Wav2Vec2, *inputs):
    """(loss,). Head "pretraining": inputs (input_values, attention_mask, mask_time_indices,
    sampled_negative_indices, gumbel_noise); loss per masked frame = contrastive_sum /
    num_masked + diversity_loss_weight * diversity + feature_penalty_weight *
    feature_penalty (HF's loss / num_masked when the penalty weight is 0). Head "ctc":
    inputs (input_values, attention_mask, mask_time_indices, labels); mask_time_indices
    (SpecAugment) may be None. No input checks: this runs inside a compiled graph, and the
    trainer's batches are checked where they are made."""
    if model.head == "ctc":
        return (ctc_loss(model, *inputs),)
    terms = pretraining_terms(model, *inputs)
    num_masked = ops.clamp(terms["num_masked"].astype(terms["contrastive_sum"].dtype), min=1.0)
    loss = (terms["contrastive_sum"] / num_masked + model.diversity_loss_weight * terms["diversity"]
            + model.feature_penalty_weight * terms["feature_penalty"])
    return (loss,)


def after_step(model: Wav2Vec2, *outputs) -> None:
    """After an optimizer update: count it (Gumbel temperature, feature-encoder freeze).
    In place (ops.assign): set_data would give the counter a new buffer that graphs
    compiled earlier never read (design.md §4)."""
    ops.assign(model.num_updates, model.num_updates + 1)


def padding_attention_bias(frame_mask, dtype):
    """[batch, 1, 1, frames]: 0 for real frames, dtype-min for padding (keys only)."""
    batch, frames = frame_mask.shape
    zero = ops.zeros((), dtype)
    return ops.where(frame_mask.view(batch, 1, 1, frames), zero, ops.full((), _dtype_min(dtype), dtype=dtype))

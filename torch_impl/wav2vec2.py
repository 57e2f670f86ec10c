"""wav2vec 2.0 in PyTorch (design.md §2.3), to be mirrored by mindspore_impl/wav2vec2.py.

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
Everything inside is plain tensor math with static shapes (no boolean indexing, no
in-place writes in the forward pass), so the MindSpore mirror can compile it as one graph.
State_dict names here are the project's canonical weight names.

Training interface, called by the shared trainer:
- ``training_loss(model, *inputs) -> (loss,)``: head "pretraining": (input_values,
  attention_mask, mask_time_indices, sampled_negative_indices, gumbel_noise); head "ctc":
  (input_values, attention_mask, mask_time_indices, labels);
- ``after_step(model)`` after each optimizer update: counts it in ``num_updates``, which
  anneals the Gumbel temperature and ends the feature encoder's freeze.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from taichu.families.wav2vec2 import Wav2Vec2Config, check_inputs
from torch_impl import clip

ACTIVATIONS = {"gelu": lambda: nn.GELU(approximate="none"),
               "gelu_new": lambda: nn.GELU(approximate="tanh"),
               "relu": nn.ReLU}
# Hugging Face builds the feature encoder's norms with torch's default eps (its config's
# layer_norm_eps reaches only the projection and the Transformer): written out here, so the
# MindSpore mirror (whose defaults differ) uses the same number.
FEATURE_NORM_EPS = 1e-5
# A distractor equal to its target gets this logit: Hugging Face writes -inf; any value
# whose exp underflows to 0 in float32 gives the same loss and gradients, and a finite one
# keeps MindSpore's softmax free of inf - inf (design.md §4).
MASKED_LOGIT = -1e9
# torch.cosine_similarity's eps: each vector's norm is clamped to at least this.
COSINE_EPS = 1e-8


# ----------------------------------------------------------------------------- backbone

class ConvLayer(nn.Module):
    """One Conv1d of the feature encoder, its norm (if any) and the activation."""

    def __init__(self, config: Wav2Vec2Config, index: int):
        super().__init__()
        m = config.model
        channels_in = m.conv_dim[index - 1] if index > 0 else 1
        channels = m.conv_dim[index]
        self.conv = nn.Conv1d(channels_in, channels, kernel_size=m.conv_kernel[index],
                              stride=m.conv_stride[index], bias=m.conv_bias)
        if m.feat_extract_norm == "layer":
            # Over the channels of each frame (so it needs [batch, time, channels]).
            self.norm = "layer"
            self.layer_norm = nn.LayerNorm(channels, eps=FEATURE_NORM_EPS)
        elif index == 0:
            # One group per channel: each channel normalised over time, over the padding
            # too (so group-norm features depend on how much a batch is padded, as in HF).
            self.norm = "group"
            self.layer_norm = nn.GroupNorm(channels, channels, eps=FEATURE_NORM_EPS, affine=True)
        else:
            self.norm = "none"
        self.activation = ACTIVATIONS[m.feat_extract_activation]()

    def forward(self, x):
        """[batch, channels_in, length] -> [batch, channels, frames]."""
        x = self.conv(x)
        if self.norm == "layer":
            x = self.layer_norm(x.transpose(1, 2)).transpose(1, 2)
        elif self.norm == "group":
            x = self.layer_norm(x)
        return self.activation(x)


class FeatureEncoder(nn.Module):
    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        self.conv_layers = nn.ModuleList([ConvLayer(config, i) for i in range(len(config.model.conv_dim))])

    def forward(self, input_values):
        """[batch, samples] -> conv features [batch, frames, conv_dim[-1]]."""
        x = input_values.unsqueeze(1)
        for layer in self.conv_layers:
            x = layer(x)
        return x.transpose(1, 2)


class FeatureProjection(nn.Module):
    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        m = config.model
        self.layer_norm = nn.LayerNorm(m.conv_dim[-1], eps=m.layer_norm_eps)
        self.projection = nn.Linear(m.conv_dim[-1], m.hidden_size)
        self.dropout = nn.Dropout(m.feat_proj_dropout)

    def forward(self, features):
        """(projected [batch, frames, hidden], normalised features [batch, frames, C]): the
        quantizer reads the normalised features, before the projection."""
        normed = self.layer_norm(features)
        return self.dropout(self.projection(normed)), normed


class WeightNormConv1d(nn.Module):
    """A Conv1d whose weight is g * v / ||v||, the norm taken over every axis but the
    kernel's (torch's weight_norm with dim=2, which Hugging Face applies): one length g per
    kernel position. Parameters bias [H], weight_g [1, 1, K], weight_v [H, H / groups, K]."""

    def __init__(self, hidden: int, kernel: int, groups: int):
        super().__init__()
        self.padding = kernel // 2
        self.groups = groups
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.zeros(hidden, hidden // groups, kernel))

    def weight(self):
        norm = self.weight_v.pow(2).sum(dim=(0, 1), keepdim=True).sqrt()
        return self.weight_g * (self.weight_v / norm)

    def forward(self, x):
        return F.conv1d(x, self.weight(), self.bias, padding=self.padding, groups=self.groups)


class PositionalConvEmbedding(nn.Module):
    """The relative position embedding: a grouped convolution over frames, "same" length
    (an even kernel makes one frame too many; the last is dropped, HF's SamePad), GELU."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        m = config.model
        kernel = m.num_conv_pos_embeddings
        self.conv = WeightNormConv1d(m.hidden_size, kernel, m.num_conv_pos_embedding_groups)
        self.remove_last = kernel % 2 == 0
        self.activation = ACTIVATIONS[m.feat_extract_activation]()

    def forward(self, x):
        """[batch, frames, hidden] -> [batch, frames, hidden]."""
        frames = x.shape[1]
        y = self.conv(x.transpose(1, 2))
        if self.remove_last:
            y = y[:, :, :frames]
        return self.activation(y).transpose(1, 2)


class Attention(clip.Attention):
    """softmax(q k^T * scale + bias) v: CLIP's attention module, imported (the same q_proj,
    k_proj, v_proj, out_proj, attn_dropout; torch's fused scaled_dot_product_attention)."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__(config.model, config)


class FeedForward(nn.Module):
    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        m = config.model
        self.intermediate_dense = nn.Linear(m.hidden_size, m.ffn_size)
        self.activation = ACTIVATIONS[m.activation]()
        self.intermediate_dropout = nn.Dropout(m.activation_dropout)
        self.output_dense = nn.Linear(m.ffn_size, m.hidden_size)
        self.output_dropout = nn.Dropout(m.hidden_dropout)

    def forward(self, x):
        x = self.intermediate_dropout(self.activation(self.intermediate_dense(x)))
        return self.output_dropout(self.output_dense(x))


class EncoderLayer(nn.Module):
    """Post-LN (base: x = LN(x + attn(x)); x = LN(x + ffn(x))) or, with ``stable``, pre-LN
    (large: x = x + attn(LN(x)); x = x + ffn(LN(x))). Same tensors either way."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        m = config.model
        self.stable = m.do_stable_layer_norm
        self.attention = Attention(config)
        self.dropout = nn.Dropout(m.hidden_dropout)
        self.layer_norm = nn.LayerNorm(m.hidden_size, eps=m.layer_norm_eps)
        self.feed_forward = FeedForward(config)
        self.final_layer_norm = nn.LayerNorm(m.hidden_size, eps=m.layer_norm_eps)

    def forward(self, x, attention_bias=None):
        if self.stable:
            x = x + self.dropout(self.attention(self.layer_norm(x), attention_bias))
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.layer_norm(x + self.dropout(self.attention(x, attention_bias)))
        return self.final_layer_norm(x + self.feed_forward(x))


class Encoder(nn.Module):
    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        m = config.model
        self.stable = m.do_stable_layer_norm
        self.pos_conv_embed = PositionalConvEmbedding(config)
        self.layer_norm = nn.LayerNorm(m.hidden_size, eps=m.layer_norm_eps)
        self.dropout = nn.Dropout(m.hidden_dropout)
        self.layers = nn.ModuleList([EncoderLayer(config) for _ in range(m.num_layers)])

    def forward(self, x, frame_mask=None):
        """[batch, frames, hidden]; frame_mask [batch, frames] bool (True = real) or None.

        Padded frames are zeroed first, so the position convolution sees zeros past the
        end of every row; attention ignores padded keys (padded queries still get values,
        which nobody reads). The final LayerNorm comes before the layers (post-LN) or
        after them (pre-LN)."""
        attention_bias = None
        if frame_mask is not None:
            x = torch.where(frame_mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
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


class Wav2Vec2Model(nn.Module):
    """The backbone (HF ``Wav2Vec2Model``): what both heads and the tri-modal tower share."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        m = config.model
        self.conv_kernel = tuple(m.conv_kernel)
        self.conv_stride = tuple(m.conv_stride)
        self.feature_extractor = FeatureEncoder(config)
        self.feature_projection = FeatureProjection(config)
        self.masked_spec_embed = nn.Parameter(torch.zeros(m.hidden_size))
        self.encoder = Encoder(config)

    def frame_counts(self, attention_mask, batch: int, samples: int, device):
        """[batch] int64: frames of each row's real samples (HF's
        _get_feat_extract_output_lengths; taichu.families.wav2vec2.frame_count)."""
        if attention_mask is None:
            lengths = torch.full((batch,), samples, dtype=torch.int64, device=device)
        else:
            lengths = (attention_mask != 0).to(torch.int64).sum(dim=-1)
        for kernel, stride in zip(self.conv_kernel, self.conv_stride):
            lengths = torch.where(lengths >= kernel, torch.div(lengths - kernel, stride, rounding_mode="floor") + 1,
                                  torch.zeros_like(lengths))
        return lengths

    def forward(self, input_values, attention_mask=None, mask_time_indices=None, frozen=None):
        """(hidden [batch, frames, hidden], extract_features [batch, frames, C] = the
        layer-normed conv features, conv_features [batch, frames, C], frame_mask [batch,
        frames] bool).

        Frames of ``mask_time_indices`` (bool [batch, frames]) enter the Transformer as
        masked_spec_embed. ``frozen`` (a bool scalar tensor, or None): while true no gradient
        reaches the feature encoder; a select, not a Python branch, so one compiled graph
        serves both phases."""
        conv_features = self.feature_extractor(input_values)
        if frozen is not None:
            conv_features = torch.where(frozen, conv_features.detach(), conv_features)
        batch, frames, _ = conv_features.shape
        counts = self.frame_counts(attention_mask, batch, input_values.shape[1], input_values.device)
        frame_mask = torch.arange(frames, device=input_values.device).unsqueeze(0) < counts.unsqueeze(1)
        hidden, extract_features = self.feature_projection(conv_features)
        if mask_time_indices is not None:
            embed = self.masked_spec_embed.to(hidden.dtype).view(1, 1, -1)
            hidden = torch.where(mask_time_indices.bool().unsqueeze(-1), embed, hidden)
        # Without a sample mask HF neither zeroes padding nor masks keys: nor do we.
        hidden = self.encoder(hidden, None if attention_mask is None else frame_mask)
        return hidden, extract_features, conv_features, frame_mask


@torch.no_grad()
def init_backbone(backbone: Wav2Vec2Model, m) -> None:
    """Hugging Face's initialisation of the backbone (fairseq's where HF's does not take
    effect); ``m`` its config (Wav2Vec2BackboneConfig). The tri-modal speech tower uses it."""
    std = m.initializer_range
    for module in backbone.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d):
            nn.init.kaiming_normal_(module.weight)
            if module.bias is not None:
                bound = math.sqrt(module.groups / (module.in_channels * module.kernel_size[0]))
                nn.init.uniform_(module.bias, -bound, bound)
    projection = backbone.feature_projection.projection
    bound = math.sqrt(1.0 / projection.in_features)
    nn.init.uniform_(projection.weight, -bound, bound)
    nn.init.uniform_(projection.bias, -bound, bound)
    # fairseq: v ~ N(0, sqrt(4 / (K * H))), then weight norm, so g = ||v|| and the
    # effective weight is v. (HF means the same but its normal_ lands on the computed
    # weight, not on g / v, which keep torch's default Conv1d init.)
    conv = backbone.encoder.pos_conv_embed.conv
    kernel, hidden = conv.weight_v.shape[2], conv.weight_v.shape[0]
    nn.init.normal_(conv.weight_v, mean=0.0, std=math.sqrt(4.0 / (kernel * hidden)))
    conv.weight_g.copy_(conv.weight_v.pow(2).sum(dim=(0, 1), keepdim=True).sqrt())
    nn.init.zeros_(conv.bias)
    nn.init.uniform_(backbone.masked_spec_embed)


# ----------------------------------------------------------------------------- pretraining head

class Quantizer(nn.Module):
    """Gumbel-softmax product quantizer (HF ``Wav2Vec2GumbelVectorQuantizer``): G groups of
    V codevectors; each frame picks one entry per group, the G entries are concatenated."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        m = config.model
        q = m.quantizer
        self.num_groups = q.num_codevector_groups
        self.num_vars = q.num_codevectors_per_group
        self.codevectors = nn.Parameter(torch.zeros(1, self.num_groups * self.num_vars,
                                                    q.codevector_dim // self.num_groups))
        self.weight_proj = nn.Linear(m.conv_dim[-1], self.num_groups * self.num_vars)

    def forward(self, features, mask_time_indices, gumbel_noise=None, temperature=None):
        """(quantized [batch, frames, codevector_dim], perplexity scalar).

        Training: the one-hot of argmax softmax((logits + g) / tau) per group, with the
        gradient of the soft probabilities (straight-through, F.gumbel_softmax(hard=True)'s
        arithmetic); the perplexity is that of the noise-free softmax averaged over the
        masked frames. Evaluation: the one-hot of argmax logits (no noise) and the
        perplexity of those one-hots over the masked frames. Perplexity = sum over groups
        of exp(entropy of the group's average distribution)."""
        batch, frames, _ = features.shape
        groups, entries = self.num_groups, self.num_vars
        logits = self.weight_proj(features).view(batch * frames, groups, entries).float()
        if self.training:
            noisy = (logits + gumbel_noise.reshape(batch * frames, groups, entries).float()) / temperature
            y_soft = noisy.softmax(dim=-1)
            y_hard = F.one_hot(y_soft.argmax(dim=-1), entries).to(y_soft.dtype)
            probs = y_hard - y_soft.detach() + y_soft
            perplexity = _perplexity(logits.softmax(dim=-1), mask_time_indices)
        else:
            probs = F.one_hot(logits.argmax(dim=-1), entries).to(logits.dtype)
            perplexity = _perplexity(probs, mask_time_indices)
        # Each group's probabilities [G, batch * frames, V] times its codebook [G, V, D].
        codebook = self.codevectors.view(groups, entries, -1)
        chosen = torch.matmul(probs.to(codebook.dtype).transpose(0, 1), codebook)   # [G, BT, D]
        return chosen.transpose(0, 1).reshape(batch, frames, -1), perplexity


def _perplexity(probs, mask_time_indices):
    """probs [batch * frames, G, V]: sum over groups of exp(-sum p log p) of the group's
    distribution averaged over the masked frames (all frames without a mask)."""
    if mask_time_indices is None:
        marginal = probs.mean(dim=0)
    else:
        mask = mask_time_indices.reshape(-1, 1, 1).bool()
        # At least 1: a batch without masked frames gets perplexity G, not HF's NaN.
        count = mask_time_indices.bool().sum().to(probs.dtype).clamp(min=1.0)
        marginal = torch.where(mask, probs, torch.zeros((), dtype=probs.dtype, device=probs.device)
                               ).sum(dim=0) / count
    # p log p with 0 log 0 = 0 (torch.xlogy), written with a select for the MindSpore mirror.
    safe = torch.where(marginal > 0, marginal, torch.ones_like(marginal))
    return torch.exp(-(marginal * torch.log(safe)).sum(dim=-1)).sum()


# ----------------------------------------------------------------------------- the model

class Wav2Vec2(nn.Module):
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
            self.dropout_features = nn.Dropout(m.final_dropout)
            self.quantizer = Quantizer(config)
            self.project_hid = nn.Linear(m.hidden_size, q.proj_codevector_dim)
            self.project_q = nn.Linear(q.codevector_dim, q.proj_codevector_dim)
            self.contrastive_temperature = float(q.contrastive_logits_temperature)
            self.max_gumbel_temperature = float(q.max_gumbel_temperature)
            self.min_gumbel_temperature = float(q.min_gumbel_temperature)
            # decay ** n as exp(n * log(decay)), log taken in float64 here: decay itself
            # rounded to float32 (0.999995 -> 0.99999499) would be 0.07% off after 1e5 updates.
            self.log_gumbel_decay = math.log(q.gumbel_temperature_decay)
        else:
            self.dropout = nn.Dropout(m.final_dropout)
            self.lm_head = nn.Linear(m.hidden_size, m.ctc.vocab_size)
        # Optimizer updates so far (after_step counts them): anneals the Gumbel temperature
        # and ends the feature encoder's freeze inside the step; saved with the model.
        self.register_buffer("num_updates", torch.zeros(1, dtype=torch.int64))
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        """Hugging Face's Wav2Vec2 initialisation (fairseq's where HF's does not take effect)."""
        init_backbone(self.wav2vec2, self.config.model)
        if self.head == "pretraining":
            nn.init.normal_(self.quantizer.weight_proj.weight, mean=0.0, std=1.0)
            nn.init.zeros_(self.quantizer.weight_proj.bias)
            nn.init.uniform_(self.quantizer.codevectors)
            self.project_hid.reset_parameters()
            self.project_q.reset_parameters()
        else:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=self.config.model.initializer_range)
            nn.init.zeros_(self.lm_head.bias)

    def _check(self, input_values, attention_mask=None):
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return
        check_inputs(self.config, tuple(input_values.shape),
                     None if attention_mask is None else attention_mask.detach().cpu().numpy(),
                     str(input_values.dtype))

    def gumbel_temperature(self):
        """max(max_t * decay ** num_updates, min_t), a float32 scalar tensor."""
        decayed = self.max_gumbel_temperature * torch.exp(self.num_updates[0].float() * self.log_gumbel_decay)
        return torch.clamp(decayed, min=self.min_gumbel_temperature)

    def encode(self, input_values, attention_mask=None, mask_time_indices=None):
        """(hidden [batch, frames, hidden], extract_features [batch, frames, C], frame_mask
        [batch, frames] bool, feature_penalty scalar).

        input_values: [batch, samples] float, normalised per utterance; attention_mask:
        [batch, samples] (1 = real sample, right-padded) or None; mask_time_indices: [batch,
        frames] bool or None. feature_penalty is fairseq's features_pen: the mean square of
        the conv features (before the projection's LayerNorm) over the real frames.
        No input checks here (training runs this in a compiled graph): see forward."""
        # No gradient reaches the feature encoder for the first freeze_steps updates (CTC).
        frozen = self.num_updates[0] < self.freeze_steps if self.freeze_steps > 0 else None
        hidden, extract_features, conv_features, frame_mask = self.wav2vec2(
            input_values, attention_mask, mask_time_indices, frozen)
        real = frame_mask.unsqueeze(-1).to(torch.float32)
        squares = conv_features.float().pow(2) * real
        feature_penalty = squares.sum() / (real.sum() * conv_features.shape[2]).clamp(min=1.0)
        return hidden, extract_features, frame_mask, feature_penalty

    def forward(self, input_values, attention_mask=None):
        """Head "ctc": logits [batch, frames, vocab]; head "pretraining": the last hidden
        states [batch, frames, hidden]."""
        self._check(input_values, attention_mask)
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
    weights = frame_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1)


# ----------------------------------------------------------------------------- losses

def pretraining_terms(model: Wav2Vec2, input_values, attention_mask, mask_time_indices,
                      sampled_negative_indices, gumbel_noise=None) -> dict:
    """The terms of Hugging Face's Wav2Vec2ForPreTraining loss, and fairseq's feature penalty.

    mask_time_indices: [batch, frames] bool (masked frames, the targets);
    sampled_negative_indices: [batch, frames, K] int, K distractors per frame as indices into
    the flattened [batch * frames] axis; gumbel_noise: [batch, frames, G * V] float32
    standard Gumbel noise (read in training mode only; None in evaluation).
    Returns contrastive_sum (cross-entropy summed over masked frames), diversity ((G V -
    perplexity) / (G V)), perplexity, num_masked, feature_penalty, temperature (the
    Gumbel temperature used).
    """
    mask = mask_time_indices.bool()
    hidden, extract_features, _, feature_penalty = model.encode(input_values, attention_mask, mask)
    # 1. the context of every frame, projected to the comparison space
    predicted = model.project_hid(hidden)
    # 2. every frame's quantized (unmasked) features, projected there too
    temperature = model.gumbel_temperature()
    quantized, perplexity = model.quantizer(model.dropout_features(extract_features), mask, gumbel_noise,
                                            temperature)
    quantized = model.project_q(quantized.to(model.project_q.weight.dtype))
    batch, frames, dim = quantized.shape
    # 3. K distractors per frame, gathered from the flattened quantized frames
    indices = sampled_negative_indices.reshape(-1).long()
    negatives = torch.index_select(quantized.reshape(batch * frames, dim), 0, indices)
    negatives = negatives.view(batch, frames, -1, dim)                                  # [B, T, K, D]
    candidates = torch.cat((quantized.unsqueeze(2), negatives), dim=2)                  # [B, T, 1 + K, D]
    # 4. cosine similarity / temperature, in float32
    logits = _cosine(predicted.float().unsqueeze(2), candidates.float()) / model.contrastive_temperature
    # 5. a distractor equal to the target (a low-usage codebook) is no distractor
    same = (negatives == quantized.unsqueeze(2)).all(dim=-1)                            # [B, T, K]
    same = torch.cat((torch.zeros_like(same[:, :, :1]), same), dim=2)
    logits = torch.where(same, torch.full((), MASKED_LOGIT, dtype=logits.dtype, device=logits.device), logits)
    # 6. cross-entropy with the target first, summed over the masked frames
    nll = -torch.log_softmax(logits, dim=-1)[:, :, 0]
    contrastive_sum = torch.where(mask, nll, torch.zeros((), dtype=nll.dtype, device=nll.device)).sum()
    # 7. diversity: how far the codebook usage is from uniform
    num_codevectors = model.quantizer.num_groups * model.quantizer.num_vars
    diversity = (num_codevectors - perplexity) / num_codevectors
    return {"contrastive_sum": contrastive_sum, "diversity": diversity, "perplexity": perplexity,
            "num_masked": mask.sum(), "feature_penalty": feature_penalty, "temperature": temperature}


def _cosine(a, b):
    """torch.cosine_similarity over the last axis: each vector divided by its norm (at
    least COSINE_EPS), then the dot product."""
    a = a / a.pow(2).sum(dim=-1, keepdim=True).sqrt().clamp(min=COSINE_EPS)
    b = b / b.pow(2).sum(dim=-1, keepdim=True).sqrt().clamp(min=COSINE_EPS)
    return (a * b).sum(dim=-1)


def ctc_loss(model: Wav2Vec2, input_values, attention_mask, mask_time_indices, labels):
    """CTC of lm_head(dropout(hidden)) against ``labels`` [batch, S] (padded with -100; the
    blank, id 0, never appears): each utterance's loss divided by its label length, then
    the batch mean (torch's "mean", HF's ctc_loss_reduction="mean"); input lengths are the
    frames of each row's real samples."""
    hidden, _, frame_mask, _ = model.encode(input_values, attention_mask, mask_time_indices)
    logits = model.lm_head(model.dropout(hidden))
    log_probs = torch.log_softmax(logits.float(), dim=-1).transpose(0, 1)               # [T, B, V]
    labels = labels.long()
    real = labels >= 0
    targets = torch.where(real, labels, torch.zeros_like(labels))
    return F.ctc_loss(log_probs, targets, frame_mask.sum(dim=-1), real.sum(dim=-1), blank=0,
                      reduction="mean", zero_infinity=model.config.model.ctc.zero_infinity)


def training_loss(model: Wav2Vec2, *inputs):
    """(loss,). Head "pretraining": inputs (input_values, attention_mask, mask_time_indices,
    sampled_negative_indices, gumbel_noise); loss per masked frame = contrastive_sum /
    num_masked + diversity_loss_weight * diversity + feature_penalty_weight *
    feature_penalty (HF's loss / num_masked when the penalty weight is 0). Head "ctc":
    inputs (input_values, attention_mask, mask_time_indices, labels); mask_time_indices
    (SpecAugment) may be None. No input checks: the MindSpore mirror runs inside a
    compiled graph, and the trainer's batches are checked where they are made."""
    if model.head == "ctc":
        return (ctc_loss(model, *inputs),)
    q = model.config.model.quantizer
    terms = pretraining_terms(model, *inputs)
    num_masked = terms["num_masked"].to(terms["contrastive_sum"].dtype).clamp(min=1.0)
    loss = (terms["contrastive_sum"] / num_masked + q.diversity_loss_weight * terms["diversity"]
            + q.feature_penalty_weight * terms["feature_penalty"])
    return (loss,)


@torch.no_grad()
def after_step(model: Wav2Vec2, *outputs) -> None:
    """After an optimizer update: count it (Gumbel temperature, feature-encoder freeze)."""
    model.num_updates.add_(1)


def padding_attention_bias(frame_mask, dtype):
    """[batch, 1, 1, frames]: 0 for real frames, dtype-min for padding (keys only)."""
    batch, frames = frame_mask.shape
    zero = torch.zeros((), dtype=dtype, device=frame_mask.device)
    return torch.where(frame_mask.view(batch, 1, 1, frames), zero, torch.finfo(dtype).min)

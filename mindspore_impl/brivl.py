"""WenLan / BriVL in MindSpore (design.md §2.6), mirrored by torch_impl/brivl.py.

Two towers, each backbone -> small Transformer head -> mean pooling -> MLP -> L2 norm
(taichu/families/brivl.py has the architecture and the choices), a momentum copy of
each tower and a queue of keys per modality (MoCo). The backbones and heads are built
from CLIP's embeddings and pre-LN encoder layers (mindspore_impl/clip.py, whose
activation table covers BriVL's four activations).

Training interface, called by the shared trainer:
- ``training_loss(model, pixel_values, input_ids, attention_mask)`` -> (loss,
  image_keys, text_keys): the MoCo loss of the online queries against the momentum keys
  of the batch and the queues; compiles in graph mode (mindspore.jit around
  value_and_grad(..., has_aux=True) over the trainable parameters);
- ``after_step(model, image_keys, text_keys)`` after each optimizer update: enqueue the
  keys of the global batch (PyNative), count the update, then move the momentum towers
  towards the online ones (one compiled graph).
Attribute paths equal the PyTorch module's, so canonical weight names differ only in
leaves (gamma/beta, embedding_table), mapped in taichu/weights.py. The momentum towers,
queues and pointer are Parameters with requires_grad=False: outside trainable_params(),
inside the canonical state dict. Uses mindspore.nn/ops rather than mint: mint has no CPU
kernels for these layers.
"""
from __future__ import annotations

import weakref

import numpy as np
import mindspore as ms
from mindspore import nn, ops
from mindspore.common.initializer import Normal, initializer

from taichu.families.brivl import BriVLConfig, check_inputs
from mindspore_impl.clip import (Encoder, EncoderLayer, TextEmbeddings, VisionEmbeddings,
                                 contrastive_loss)
from mindspore_impl.gpt import Dense, _dtype_min


class Head(nn.Cell):
    """The small Transformer on a backbone's tokens: pre-LN layers, then a LayerNorm."""

    def __init__(self, size, config: BriVLConfig):
        super().__init__()
        self.layers = nn.CellList([EncoderLayer(size, config) for _ in range(size.num_layers)])
        self.layer_norm = nn.LayerNorm((size.hidden_size,), epsilon=config.model.layer_norm_eps)

    def construct(self, x, attention_bias=None, output_intermediates=False):
        """The last layer's output, normalised; with output_intermediates (output,
        hidden_states: the input and each layer's output before the LayerNorm,
        attention_scores: each layer's raw scores)."""
        hidden_states, attention_scores = (x,), ()
        for layer in self.layers:
            if output_intermediates:
                x, scores = layer(x, attention_bias, True)
                hidden_states = hidden_states + (x,)
                attention_scores = attention_scores + (scores,)
            else:
                x = layer(x, attention_bias)
        if output_intermediates:
            return self.layer_norm(x), hidden_states, attention_scores
        return self.layer_norm(x)


class Projection(nn.Cell):
    """Linear, ReLU, Linear into the embedding space."""

    def __init__(self, hidden_size: int, config: BriVLConfig):
        super().__init__()
        m = config.model
        self.fc1 = Dense(hidden_size, m.projection_hidden)
        self.act = nn.ReLU()
        self.fc2 = Dense(m.projection_hidden, m.embed_dim)

    def construct(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionBackbone(nn.Cell):
    """CLIP's vision tower without its class-token pooling: every token, normalised."""

    def __init__(self, config: BriVLConfig):
        super().__init__()
        image, eps = config.model.image, config.model.layer_norm_eps
        self.embeddings = VisionEmbeddings(config)
        self.pre_layernorm = nn.LayerNorm((image.hidden_size,), epsilon=eps)
        self.encoder = Encoder(image, config)
        self.post_layernorm = nn.LayerNorm((image.hidden_size,), epsilon=eps)

    def construct(self, pixel_values, output_intermediates=False):
        """[batch, 1 + patches, hidden]; with output_intermediates (output, hidden_states:
        pre_layernorm's output and each layer's, attention_scores: each layer's raw scores)."""
        encoded = self.encoder(self.pre_layernorm(self.embeddings(pixel_values)), None,
                               output_intermediates)
        if output_intermediates:
            return (self.post_layernorm(encoded[0]),) + encoded[1:]
        return self.post_layernorm(encoded)


class TextBackbone(nn.Cell):
    """CLIP's text tower without the causal mask: every token sees every real token."""

    def __init__(self, config: BriVLConfig):
        super().__init__()
        text = config.model.text
        self.embeddings = TextEmbeddings(config)
        self.encoder = Encoder(text, config)
        self.final_layer_norm = nn.LayerNorm((text.hidden_size,), epsilon=config.model.layer_norm_eps)

    def construct(self, input_ids, attention_mask=None, output_intermediates=False):
        """[batch, length, hidden]; padding positions hold values nobody reads. With
        output_intermediates (output, hidden_states: the embeddings and each layer's output,
        attention_scores: each layer's raw scores)."""
        x = self.embeddings(input_ids)
        encoded = self.encoder(x, padding_attention_bias(attention_mask, x.dtype), output_intermediates)
        if output_intermediates:
            return (self.final_layer_norm(encoded[0]),) + encoded[1:]
        return self.final_layer_norm(encoded)


class ImageEncoder(nn.Cell):
    def __init__(self, config: BriVLConfig):
        super().__init__()
        m = config.model
        self.backbone = VisionBackbone(config)
        self.head = Head(m.image_head_size, config)
        self.projection = Projection(m.image.hidden_size, config)

    def construct(self, pixel_values, output_intermediates=False):
        """L2-normalised embeddings [batch, embed_dim]; the mean runs over all tokens.

        output_intermediates: (embeddings, backbone hidden_states, backbone attention_scores,
        head hidden_states, head attention_scores); the head's first hidden state is the
        backbone's normalised output. A Python bool: graph mode compiles one graph per value.
        """
        backbone = self.backbone(pixel_values, output_intermediates)
        head = self.head(backbone[0] if output_intermediates else backbone, None, output_intermediates)
        x = head[0] if output_intermediates else head
        embeds = l2_normalize(self.projection(x.mean(axis=1)))
        if output_intermediates:
            return (embeds,) + backbone[1:] + head[1:]
        return embeds


class TextEncoder(nn.Cell):
    def __init__(self, config: BriVLConfig):
        super().__init__()
        m = config.model
        self.backbone = TextBackbone(config)
        self.head = Head(m.text_head_size, config)
        self.projection = Projection(m.text.hidden_size, config)

    def construct(self, input_ids, attention_mask=None, output_intermediates=False):
        """L2-normalised embeddings [batch, embed_dim]; the mean runs over real tokens.

        output_intermediates: (embeddings, backbone hidden_states, backbone attention_scores,
        head hidden_states, head attention_scores), as ImageEncoder's.
        """
        backbone = self.backbone(input_ids, attention_mask, output_intermediates)
        x = backbone[0] if output_intermediates else backbone
        head = self.head(x, padding_attention_bias(attention_mask, x.dtype), output_intermediates)
        x = head[0] if output_intermediates else head
        if attention_mask is None:
            pooled = x.mean(axis=1)
        else:
            weights = attention_mask.astype(x.dtype).expand_dims(-1)         # [batch, length, 1]
            pooled = (x * weights).sum(axis=1) / weights.sum(axis=1)
        embeds = l2_normalize(self.projection(pooled))
        if output_intermediates:
            return (embeds,) + backbone[1:] + head[1:]
        return embeds


class BriVL(nn.Cell):
    def __init__(self, config: BriVLConfig):
        super().__init__()
        m = config.model
        self.config = config
        # Plain numbers, so graph mode reads constants instead of the pydantic config.
        self.temperature = float(m.moco.temperature)
        self.queue_start_step = int(m.moco.queue_start_step)
        # MoCo's queues start as random unit vectors (negatives until real keys replace
        # them); non-trainable Parameters, so model directories and checkpoints keep them.
        self.image_queue = ms.Parameter(_random_unit_rows(m.moco.queue_size, m.embed_dim),
                                        name="image_queue", requires_grad=False)
        self.text_queue = ms.Parameter(_random_unit_rows(m.moco.queue_size, m.embed_dim),
                                       name="text_queue", requires_grad=False)
        # The next slot of both queues (they fill together), int64 in both backends.
        self.queue_ptr = ms.Parameter(ms.Tensor(np.zeros(1, np.int64)), name="queue_ptr",
                                      requires_grad=False)
        # Optimizer updates so far (after_step counts them): moco.queue_start_step compares
        # with it, and a resumed run goes on from where it was.
        self.num_updates = ms.Parameter(ms.Tensor(np.zeros(1, np.int64)), name="num_updates",
                                        requires_grad=False)
        self.image_encoder = ImageEncoder(config)
        self.text_encoder = TextEncoder(config)
        # The key towers: updated by after_step, never by the optimizer.
        self.image_encoder_m = ImageEncoder(config)
        self.text_encoder_m = TextEncoder(config)
        self._init_weights()
        for online, momentum in self.momentum_pairs():
            momentum.set_data(ms.Tensor(online.asnumpy()))
            momentum.requires_grad = False

    def _init_weights(self):
        std = self.config.model.initializer_range
        for _, cell in (*self.image_encoder.cells_and_names(), *self.text_encoder.cells_and_names()):
            if isinstance(cell, (nn.Dense, nn.Embedding, nn.Conv2d)):
                weight = cell.embedding_table if isinstance(cell, nn.Embedding) else cell.weight
                weight.set_data(initializer(Normal(sigma=std), weight.shape, weight.dtype))
            if isinstance(cell, nn.Dense) and cell.bias is not None:
                cell.bias.set_data(initializer("zeros", cell.bias.shape, cell.bias.dtype))
        class_embedding = self.image_encoder.backbone.embeddings.class_embedding
        class_embedding.set_data(initializer(Normal(sigma=std), class_embedding.shape,
                                             class_embedding.dtype))

    def momentum_pairs(self):
        """(online parameter, its momentum copy) for every parameter of both towers."""
        return [*zip(self.image_encoder.get_parameters(), self.image_encoder_m.get_parameters()),
                *zip(self.text_encoder.get_parameters(), self.text_encoder_m.get_parameters())]

    def _check(self, pixel_values=None, input_ids=None, attention_mask=None):
        # Value checks run here, outside construct: graph mode cannot raise on tensor values.
        check_inputs(self.config, None if pixel_values is None else tuple(pixel_values.shape),
                     None if input_ids is None else input_ids.asnumpy(),
                     None if attention_mask is None else attention_mask.asnumpy())

    def get_image_features(self, pixel_values):
        """L2-normalised image embeddings [batch, embed_dim] (the online tower)."""
        self._check(pixel_values=pixel_values)
        return self.image_encoder(pixel_values)

    def get_text_features(self, input_ids, attention_mask=None):
        """L2-normalised text embeddings [batch, embed_dim] (the online tower).

        attention_mask: [batch, length], 1 for real tokens, 0 for padding; right-padded.
        """
        self._check(input_ids=input_ids, attention_mask=attention_mask)
        return self.text_encoder(input_ids, attention_mask)

    def __call__(self, pixel_values, input_ids, attention_mask=None):
        self._check(pixel_values, input_ids, attention_mask)
        return super().__call__(pixel_values, input_ids, attention_mask)

    def construct(self, pixel_values, input_ids, attention_mask=None):
        """(logits_per_image [images, texts], logits_per_text [texts, images]): cosine
        similarities of the online embeddings divided by the temperature."""
        image_embeds = self.image_encoder(pixel_values)
        text_embeds = self.text_encoder(input_ids, attention_mask)
        logits_per_image = ops.matmul(image_embeds, text_embeds.T) / self.temperature
        return logits_per_image, logits_per_image.T


def training_loss(model: BriVL, pixel_values, input_ids, attention_mask):
    """(loss, image_keys, text_keys) of one batch of pairs, pair i = (image i, text i).

    Image queries (online) are classified among [the batch's text keys ; text_queue],
    text queries among [the batch's image keys ; image_queue], the positive being the
    pair's own key; loss = mean of the two cross-entropies of logits / temperature.
    Keys come from the momentum towers and carry no gradient. With queue_size 0, and
    before update moco.queue_start_step (the candidates stop at the batch), this is the
    in-batch loss. No input checks: this runs inside a compiled graph, and the trainer's
    batches are checked where they are made.
    """
    image_queries = model.image_encoder(pixel_values)
    text_queries = model.text_encoder(input_ids, attention_mask)
    return _losses(model, image_queries, text_queries, pixel_values, input_ids, attention_mask)[0]


def distill_outputs(model: BriVL, pixel_values, input_ids, attention_mask):
    """One forward pass of training_loss's inputs for distillation: (training_loss's
    outputs, predictions, streams).

    predictions: the batch's columns of the loss's logits (online queries against the
    momentum keys, / temperature), (image_logits [n, n] fp32, row weights 0.5 / n) and
    (text_logits [n, n], 0.5 / n): the in-batch loss is their weighted sum of row
    cross-entropies. The queue columns are left out: a teacher's queue holds its own past
    keys, not the student's, so the columns would not correspond. streams (the online
    towers, all bidirectional): the text backbone's and text head's (hidden_states,
    attention_scores, attention_mask as fp32, causal False), then the image backbone's and
    image head's (..., ones [n, patches + 1], False). A head's first hidden state is its
    backbone's normalised output.
    """
    image = model.image_encoder(pixel_values, True)
    text = model.text_encoder(input_ids, attention_mask, True)
    loss_outputs, image_logits, text_logits = _losses(model, image[0], text[0], pixel_values, input_ids,
                                                      attention_mask)
    batch = image_logits.shape[0]
    weights = ops.full((batch,), 0.5 / batch, dtype=ms.float32)
    predictions = ((image_logits[:, :batch].astype(ms.float32), weights),
                   (text_logits[:, :batch].astype(ms.float32), weights))
    text_mask = attention_mask.astype(ms.float32)
    image_mask = ops.ones(image[1][0].shape[:2], ms.float32)
    streams = ((text[1], text[2], text_mask, False), (text[3], text[4], text_mask, False),
               (image[1], image[2], image_mask, False), (image[3], image[4], image_mask, False))
    return loss_outputs, predictions, streams


def _losses(model: BriVL, image_queries, text_queries, pixel_values, input_ids, attention_mask):
    """(training_loss's outputs, image_logits, text_logits) from the online queries; the
    momentum keys are computed here."""
    temperature = model.temperature
    image_keys = ops.stop_gradient(model.image_encoder_m(pixel_values))
    text_keys = ops.stop_gradient(model.text_encoder_m(input_ids, attention_mask))
    # Casts keep mixed precision working: the queues stay fp32.
    text_candidates = ops.cat((text_keys, model.text_queue.astype(text_keys.dtype)), axis=0)
    image_candidates = ops.cat((image_keys, model.image_queue.astype(image_keys.dtype)), axis=0)
    image_logits = ops.matmul(image_queries, text_candidates.T) / temperature
    text_logits = ops.matmul(text_queries, image_candidates.T) / temperature
    loss = contrastive_loss(image_logits, text_logits)
    if model.queue_start_step > 0:
        # Both losses, one picked by the counter: a branch on a tensor's value would split
        # this compiled graph.
        batch = image_logits.shape[0]
        in_batch = contrastive_loss(image_logits[:, :batch], text_logits[:, :batch])
        loss = ops.where(model.num_updates[0] >= model.queue_start_step, loss, in_batch)
    return (loss, image_keys, text_keys), image_logits, text_logits


def after_step(model: BriVL, image_keys, text_keys) -> None:
    """After an optimizer update: enqueue the global batch's keys, count the update, then
    the momentum update.

    Keys are written one after another at queue_ptr, wrapping around, as if enqueued one
    at a time: with more keys than slots only the last queue_size survive. The momentum
    update after step t is MoCo's update before the key forward of step t + 1.
    """
    moco = model.config.model.moco
    size, count = moco.queue_size, image_keys.shape[0]
    if size > 0:
        kept = min(count, size)
        # Slots of keys count - kept .. count - 1: distinct, so the write order is moot.
        offsets = ops.arange(count - kept, count, dtype=ms.int64)
        slots = ((model.queue_ptr + offsets) % size).expand_dims(-1)
        ops.assign(model.image_queue, ops.tensor_scatter_update(
            model.image_queue, slots, image_keys[count - kept:].astype(model.image_queue.dtype)))
        ops.assign(model.text_queue, ops.tensor_scatter_update(
            model.text_queue, slots, text_keys[count - kept:].astype(model.text_queue.dtype)))
        ops.assign(model.queue_ptr, (model.queue_ptr + count) % size)
    ops.assign(model.num_updates, model.num_updates + 1)
    if model not in _MOMENTUM_UPDATES:
        _MOMENTUM_UPDATES[model] = ms.jit(MomentumUpdate(model.momentum_pairs(), moco.momentum))
    _MOMENTUM_UPDATES[model]()


class MomentumUpdate(nn.Cell):
    """p_k = m p_k + (1 - m) p_q for every (online, momentum) parameter pair, compiled once.

    Measured in `taichu train` at brivl-small (183 parameter pairs, 2 CPU cores): op by op
    (PyNative) 0.12 s per step, about 15 % of the step; compiled 0.03 s, after a one-time
    compile of ~4 s. Kept outside the model's cells, so that the model's parameter names
    stay the canonical ones.
    """

    def __init__(self, pairs, momentum: float):
        super().__init__()
        self.online = ms.ParameterTuple([online for online, _ in pairs])
        self.moving = ms.ParameterTuple([moving for _, moving in pairs])
        self.momentum = float(momentum)

    def construct(self):
        m = self.momentum
        for online, moving in zip(self.online, self.moving):
            ops.assign(moving, m * moving + (1.0 - m) * online)
        return m


# One compiled update per model, created by its first after_step and dropped with it.
_MOMENTUM_UPDATES: "weakref.WeakKeyDictionary[BriVL, MomentumUpdate]" = weakref.WeakKeyDictionary()


def l2_normalize(x):
    return x / ops.sqrt(ops.pow(x, 2).sum(axis=-1, keepdims=True))


def padding_attention_bias(attention_mask, dtype):
    """[batch, 1, 1, length]: 0 for real keys, dtype-min for padding; None without a mask.

    Bidirectional: every query sees every real token. Padding queries see the real
    tokens too, stay finite and are left out of the mean.
    """
    if attention_mask is None:
        return None
    batch, length = attention_mask.shape
    allowed = attention_mask.astype(ms.bool_).view(batch, 1, 1, length)
    zero = ops.zeros((), dtype)
    return ops.where(allowed, zero, ops.full((), _dtype_min(dtype), dtype=dtype))


def _random_unit_rows(rows: int, cols: int) -> ms.Tensor:
    """[rows, cols] random unit vectors from MindSpore's seed (initializer refuses 0 rows)."""
    if rows == 0:
        return ms.Tensor(np.zeros((0, cols), np.float32))
    values = initializer(Normal(sigma=1.0), (rows, cols), ms.float32).init_data().asnumpy()
    return ms.Tensor(values / np.sqrt((values ** 2).sum(axis=1, keepdims=True)))

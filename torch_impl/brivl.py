"""WenLan / BriVL in PyTorch (design.md §2.6), mirrored by mindspore_impl/brivl.py.

Two towers, each backbone -> small Transformer head -> mean pooling -> MLP -> L2 norm
(taichu/families/brivl.py has the architecture and the choices), a momentum copy of
each tower and a queue of keys per modality (MoCo). The backbones and heads are built
from CLIP's embeddings and pre-LN encoder layers (torch_impl/clip.py, whose activation
table covers BriVL's four activations).

Training interface, called by the shared trainer:
- ``training_loss(model, pixel_values, input_ids, attention_mask)`` -> (loss,
  image_keys, text_keys): the MoCo loss of the online queries against the momentum keys
  of the batch and the queues;
- ``after_step(model, image_keys, text_keys)`` after each optimizer update: enqueue the
  keys of the global batch, then move the momentum towers towards the online ones.
State_dict names here are the project's canonical weight names.
"""
from __future__ import annotations

import torch
from torch import nn

from taichu.families.brivl import BriVLConfig, check_inputs
from torch_impl.clip import (Encoder, EncoderLayer, TextEmbeddings, VisionEmbeddings,
                             contrastive_loss)


class Head(nn.Module):
    """The small Transformer on a backbone's tokens: pre-LN layers, then a LayerNorm."""

    def __init__(self, size, config: BriVLConfig):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(size, config) for _ in range(size.num_layers)])
        self.layer_norm = nn.LayerNorm(size.hidden_size, eps=config.model.layer_norm_eps)

    def forward(self, x, attention_bias=None, output_intermediates=False):
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


class Projection(nn.Module):
    """Linear, ReLU, Linear into the embedding space."""

    def __init__(self, hidden_size: int, config: BriVLConfig):
        super().__init__()
        m = config.model
        self.fc1 = nn.Linear(hidden_size, m.projection_hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(m.projection_hidden, m.embed_dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionBackbone(nn.Module):
    """CLIP's vision tower without its class-token pooling: every token, normalised."""

    def __init__(self, config: BriVLConfig):
        super().__init__()
        image, eps = config.model.image, config.model.layer_norm_eps
        self.embeddings = VisionEmbeddings(config)
        self.pre_layernorm = nn.LayerNorm(image.hidden_size, eps=eps)
        self.encoder = Encoder(image, config)
        self.post_layernorm = nn.LayerNorm(image.hidden_size, eps=eps)

    def forward(self, pixel_values, output_intermediates=False):
        """[batch, 1 + patches, hidden]; with output_intermediates (output, hidden_states:
        pre_layernorm's output and each layer's, attention_scores: each layer's raw scores)."""
        encoded = self.encoder(self.pre_layernorm(self.embeddings(pixel_values)), None,
                               output_intermediates)
        if output_intermediates:
            return (self.post_layernorm(encoded[0]),) + encoded[1:]
        return self.post_layernorm(encoded)


class TextBackbone(nn.Module):
    """CLIP's text tower without the causal mask: every token sees every real token."""

    def __init__(self, config: BriVLConfig):
        super().__init__()
        text = config.model.text
        self.embeddings = TextEmbeddings(config)
        self.encoder = Encoder(text, config)
        self.final_layer_norm = nn.LayerNorm(text.hidden_size, eps=config.model.layer_norm_eps)

    def forward(self, input_ids, attention_mask=None, output_intermediates=False):
        """[batch, length, hidden]; padding positions hold values nobody reads. With
        output_intermediates (output, hidden_states: the embeddings and each layer's output,
        attention_scores: each layer's raw scores)."""
        x = self.embeddings(input_ids)
        encoded = self.encoder(x, padding_attention_bias(attention_mask, x.dtype), output_intermediates)
        if output_intermediates:
            return (self.final_layer_norm(encoded[0]),) + encoded[1:]
        return self.final_layer_norm(encoded)


class ImageEncoder(nn.Module):
    def __init__(self, config: BriVLConfig):
        super().__init__()
        m = config.model
        self.backbone = VisionBackbone(config)
        self.head = Head(m.image_head_size, config)
        self.projection = Projection(m.image.hidden_size, config)

    def forward(self, pixel_values, output_intermediates=False):
        """L2-normalised embeddings [batch, embed_dim]; the mean runs over all tokens.

        output_intermediates: (embeddings, backbone hidden_states, backbone attention_scores,
        head hidden_states, head attention_scores); the head's first hidden state is the
        backbone's normalised output.
        """
        backbone = self.backbone(pixel_values, output_intermediates)
        head = self.head(backbone[0] if output_intermediates else backbone, None, output_intermediates)
        x = head[0] if output_intermediates else head
        embeds = l2_normalize(self.projection(x.mean(dim=1)))
        if output_intermediates:
            return (embeds,) + backbone[1:] + head[1:]
        return embeds


class TextEncoder(nn.Module):
    def __init__(self, config: BriVLConfig):
        super().__init__()
        m = config.model
        self.backbone = TextBackbone(config)
        self.head = Head(m.text_head_size, config)
        self.projection = Projection(m.text.hidden_size, config)

    def forward(self, input_ids, attention_mask=None, output_intermediates=False):
        """L2-normalised embeddings [batch, embed_dim]; the mean runs over real tokens.

        output_intermediates: (embeddings, backbone hidden_states, backbone attention_scores,
        head hidden_states, head attention_scores), as ImageEncoder's.
        """
        backbone = self.backbone(input_ids, attention_mask, output_intermediates)
        x = backbone[0] if output_intermediates else backbone
        head = self.head(x, padding_attention_bias(attention_mask, x.dtype), output_intermediates)
        x = head[0] if output_intermediates else head
        if attention_mask is None:
            pooled = x.mean(dim=1)
        else:
            weights = attention_mask.to(x.dtype).unsqueeze(-1)            # [batch, length, 1]
            pooled = (x * weights).sum(dim=1) / weights.sum(dim=1)
        embeds = l2_normalize(self.projection(pooled))
        if output_intermediates:
            return (embeds,) + backbone[1:] + head[1:]
        return embeds


class BriVL(nn.Module):
    def __init__(self, config: BriVLConfig):
        super().__init__()
        m = config.model
        self.config = config
        # Plain numbers, as in the MindSpore mirror (where graph mode needs constants).
        self.temperature = float(m.moco.temperature)
        self.queue_start_step = int(m.moco.queue_start_step)
        # MoCo's queues start as random unit vectors (negatives until real keys replace
        # them); persistent buffers, so model directories and checkpoints keep them.
        self.register_buffer("image_queue", l2_normalize(torch.randn(m.moco.queue_size, m.embed_dim)))
        self.register_buffer("text_queue", l2_normalize(torch.randn(m.moco.queue_size, m.embed_dim)))
        # The next slot of both queues (they fill together), int64 in both backends.
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.int64))
        # Optimizer updates so far (after_step counts them): moco.queue_start_step compares
        # with it, and a resumed run goes on from where it was.
        self.register_buffer("num_updates", torch.zeros(1, dtype=torch.int64))
        self.image_encoder = ImageEncoder(config)
        self.text_encoder = TextEncoder(config)
        # The key towers: updated by after_step, never by the optimizer.
        self.image_encoder_m = ImageEncoder(config)
        self.text_encoder_m = TextEncoder(config)
        self._init_weights()
        with torch.no_grad():
            for online, momentum in self.momentum_pairs():
                momentum.copy_(online)
                momentum.requires_grad = False

    def _init_weights(self):
        std = self.config.model.initializer_range
        for module in (*self.image_encoder.modules(), *self.text_encoder.modules()):
            if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.image_encoder.backbone.embeddings.class_embedding, mean=0.0, std=std)

    def momentum_pairs(self):
        """(online parameter, its momentum copy) for every parameter of both towers."""
        return [*zip(self.image_encoder.parameters(), self.image_encoder_m.parameters()),
                *zip(self.text_encoder.parameters(), self.text_encoder_m.parameters())]

    def _check(self, pixel_values=None, input_ids=None, attention_mask=None):
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return
        check_inputs(self.config, None if pixel_values is None else tuple(pixel_values.shape),
                     None if input_ids is None else input_ids.detach().cpu().numpy(),
                     None if attention_mask is None else attention_mask.detach().cpu().numpy())

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

    def forward(self, pixel_values, input_ids, attention_mask=None):
        """(logits_per_image [images, texts], logits_per_text [texts, images]): cosine
        similarities of the online embeddings divided by the temperature."""
        self._check(pixel_values, input_ids, attention_mask)
        image_embeds = self.image_encoder(pixel_values)
        text_embeds = self.text_encoder(input_ids, attention_mask)
        logits_per_image = torch.matmul(image_embeds, text_embeds.T) / self.temperature
        return logits_per_image, logits_per_image.T


def training_loss(model: BriVL, pixel_values, input_ids, attention_mask):
    """(loss, image_keys, text_keys) of one batch of pairs, pair i = (image i, text i).

    Image queries (online) are classified among [the batch's text keys ; text_queue],
    text queries among [the batch's image keys ; image_queue], the positive being the
    pair's own key; loss = mean of the two cross-entropies of logits / temperature.
    Keys come from the momentum towers and carry no gradient. With queue_size 0, and
    before update moco.queue_start_step (the candidates stop at the batch), this is the
    in-batch loss. No input checks: the MindSpore mirror runs inside a compiled graph,
    and the trainer's batches are checked where they are made.
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
    weights = torch.full((batch,), 0.5 / batch, dtype=torch.float32, device=image_logits.device)
    predictions = ((image_logits[:, :batch].float(), weights), (text_logits[:, :batch].float(), weights))
    text_mask = attention_mask.float()
    image_mask = torch.ones(image[1][0].shape[:2], dtype=torch.float32, device=image_logits.device)
    streams = ((text[1], text[2], text_mask, False), (text[3], text[4], text_mask, False),
               (image[1], image[2], image_mask, False), (image[3], image[4], image_mask, False))
    return loss_outputs, predictions, streams


def _losses(model: BriVL, image_queries, text_queries, pixel_values, input_ids, attention_mask):
    """(training_loss's outputs, image_logits, text_logits) from the online queries; the
    momentum keys are computed here."""
    temperature = model.temperature
    with torch.no_grad():
        image_keys = model.image_encoder_m(pixel_values)
        text_keys = model.text_encoder_m(input_ids, attention_mask)
    # Casts keep mixed precision working: the queues stay fp32.
    text_candidates = torch.cat((text_keys, model.text_queue.to(text_keys.dtype)), dim=0)
    image_candidates = torch.cat((image_keys, model.image_queue.to(image_keys.dtype)), dim=0)
    image_logits = torch.matmul(image_queries, text_candidates.T) / temperature
    text_logits = torch.matmul(text_queries, image_candidates.T) / temperature
    loss = contrastive_loss(image_logits, text_logits)
    if model.queue_start_step > 0:
        # Both losses, one picked by the counter: the MindSpore mirror is one compiled
        # graph, where a branch on a tensor's value would split it.
        batch = image_logits.shape[0]
        in_batch = contrastive_loss(image_logits[:, :batch], text_logits[:, :batch])
        loss = torch.where(model.num_updates[0] >= model.queue_start_step, loss, in_batch)
    return (loss, image_keys, text_keys), image_logits, text_logits


@torch.no_grad()
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
        offsets = torch.arange(count - kept, count, device=model.queue_ptr.device)
        slots = (model.queue_ptr + offsets) % size
        model.image_queue[slots] = image_keys[count - kept:].to(model.image_queue.dtype)
        model.text_queue[slots] = text_keys[count - kept:].to(model.text_queue.dtype)
        model.queue_ptr.copy_((model.queue_ptr + count) % size)
    model.num_updates.add_(1)
    m = moco.momentum
    for online, momentum in model.momentum_pairs():
        momentum.copy_(m * momentum + (1.0 - m) * online)


def l2_normalize(x):
    return x / x.pow(2).sum(dim=-1, keepdim=True).sqrt()


def padding_attention_bias(attention_mask, dtype):
    """[batch, 1, 1, length]: 0 for real keys, dtype-min for padding; None without a mask.

    Bidirectional: every query sees every real token. Padding queries see the real
    tokens too, stay finite and are left out of the mean.
    """
    if attention_mask is None:
        return None
    batch, length = attention_mask.shape
    allowed = attention_mask.bool().view(batch, 1, 1, length)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)

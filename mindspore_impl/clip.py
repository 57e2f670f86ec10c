"""CLIP in MindSpore (design.md §2.4), mirrored by torch_impl/clip.py.

The architecture of Hugging Face ``CLIPModel`` module for module, so its weights convert
by renaming alone (``pre_layrnorm`` -> ``pre_layernorm``). Image: patch Conv2d without
bias, class token, learned positions, LayerNorm, pre-LN encoder, LayerNorm on the class
token, projection. Text: token + position embeddings, pre-LN encoder with a causal and a
padding mask, final LayerNorm, pooled at the last real token, projection.

Texts are right-padded and every caption ends with eos, so the last real token of a row
(the last 1 of its attention mask) is its eos. Hugging Face finds the same position from
the ids (the first eos_token_id, or the largest id for old configs); both agree on such
inputs. Attribute paths equal the PyTorch module's, so canonical weight names differ only
in leaves (gamma/beta, embedding_table), mapped in taichu/weights.py.
Uses mindspore.nn/ops rather than mint: mint has no CPU kernels for these layers.
"""
from __future__ import annotations

import math

import numpy as np
import mindspore as ms
from mindspore import nn, ops
from mindspore.common.initializer import Normal, initializer

from taichu.families.clip import MAX_LOGIT_SCALE, CLIPConfig, check_inputs, init_std
from mindspore_impl.gpt import (BATCH_MATMUL, BATCH_MATMUL_TRANSPOSE_B, GELU, SOFTMAX, Dense,
                                causal_attention_bias, cross_entropy)


class QuickGELU(nn.Cell):
    """x * sigmoid(1.702 x), OpenAI CLIP's activation."""

    def construct(self, x):
        return x * ops.sigmoid(1.702 * x)


# CLIP's config allows quick_gelu and gelu; BriVL, whose layers are these, all four.
ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": GELU,
               "gelu_new": lambda: nn.GELU(approximate=True), "relu": nn.ReLU}


class Attention(nn.Cell):
    def __init__(self, tower, config: CLIPConfig):
        super().__init__()
        self.num_heads = tower.num_heads
        self.head_dim = tower.head_dim
        self.scale = 1.0 / math.sqrt(tower.head_dim)
        # q/k/v biases unless the tower says otherwise (the vision family's qkv_bias).
        bias = getattr(tower, "qkv_bias", True)
        self.q_proj = Dense(tower.hidden_size, tower.hidden_size, has_bias=bias)
        self.k_proj = Dense(tower.hidden_size, tower.hidden_size, has_bias=bias)
        self.v_proj = Dense(tower.hidden_size, tower.hidden_size, has_bias=bias)
        self.out_proj = Dense(tower.hidden_size, tower.hidden_size)
        self.attn_dropout = nn.Dropout(p=config.model.attention_dropout)

    def construct(self, x, attention_bias=None, output_scores=False):
        """The output [batch, length, hidden]; with output_scores (output, scores), the raw
        attention scores q k^T * scale [batch, heads, length, length] before the bias and
        softmax."""
        batch, length, hidden = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        scores = BATCH_MATMUL_TRANSPOSE_B(q, k) * self.scale
        biased = scores
        if attention_bias is not None:
            biased = scores + attention_bias
        probs = self.attn_dropout(SOFTMAX(biased))
        out = self.out_proj(BATCH_MATMUL(probs, v).transpose(0, 2, 1, 3).reshape(batch, length, hidden))
        if output_scores:
            return out, scores
        return out


class MLP(nn.Cell):
    def __init__(self, tower, config: CLIPConfig):
        super().__init__()
        self.fc1 = Dense(tower.hidden_size, tower.ffn_size)
        self.act = ACTIVATIONS[config.model.activation]()
        self.fc2 = Dense(tower.ffn_size, tower.hidden_size)

    def construct(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Cell):
    def __init__(self, tower, config: CLIPConfig):
        super().__init__()
        eps = config.model.layer_norm_eps
        self.self_attn = Attention(tower, config)
        self.layer_norm1 = nn.LayerNorm((tower.hidden_size,), epsilon=eps)
        self.mlp = MLP(tower, config)
        self.layer_norm2 = nn.LayerNorm((tower.hidden_size,), epsilon=eps)

    def construct(self, x, attention_bias=None, output_scores=False):
        """The output; with output_scores (output, the attention's raw scores)."""
        attn = self.self_attn(self.layer_norm1(x), attention_bias, output_scores)
        x = x + (attn[0] if output_scores else attn)
        x = x + self.mlp(self.layer_norm2(x))
        if output_scores:
            return x, attn[1]
        return x


class Encoder(nn.Cell):
    def __init__(self, tower, config: CLIPConfig):
        super().__init__()
        self.layers = nn.CellList([EncoderLayer(tower, config) for _ in range(tower.num_layers)])

    def construct(self, x, attention_bias=None, output_intermediates=False):
        """The last layer's output; with output_intermediates (output, hidden_states: the
        input and each layer's output, attention_scores: each layer's raw scores)."""
        hidden_states, attention_scores = (x,), ()
        for layer in self.layers:
            if output_intermediates:
                x, scores = layer(x, attention_bias, True)
                hidden_states = hidden_states + (x,)
                attention_scores = attention_scores + (scores,)
            else:
                x = layer(x, attention_bias)
        if output_intermediates:
            return x, hidden_states, attention_scores
        return x


class TextEmbeddings(nn.Cell):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        text = config.model.text
        self.token_embedding = nn.Embedding(text.vocab_size, text.hidden_size)
        self.position_embedding = nn.Embedding(text.max_position_embeddings, text.hidden_size)

    def construct(self, input_ids):
        length = input_ids.shape[1]
        position_ids = ops.arange(0, length, dtype=ms.int32).expand_dims(0)
        return self.token_embedding(input_ids) + self.position_embedding(position_ids)


class TextTransformer(nn.Cell):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        text = config.model.text
        self.embeddings = TextEmbeddings(config)
        self.encoder = Encoder(text, config)
        self.final_layer_norm = nn.LayerNorm((text.hidden_size,), epsilon=config.model.layer_norm_eps)

    def construct(self, input_ids, attention_mask=None, output_intermediates=False):
        """The final hidden state of each row's last real token (its eos): [batch, hidden].

        output_intermediates: (pooled, hidden_states, attention_scores): the embeddings and
        each layer's output [batch, length, hidden] (no final LayerNorm), each layer's raw
        scores [batch, heads, length, length] before the causal/padding bias (Hugging Face's
        hidden_states; its attentions are softmax(scores + bias)). A Python bool: graph mode
        compiles one graph per value.
        """
        batch, length = input_ids.shape
        x = self.embeddings(input_ids)
        bias = causal_attention_bias(attention_mask, batch, length, 0, x.dtype)
        encoded = self.encoder(x, bias, output_intermediates)
        x = self.final_layer_norm(encoded[0] if output_intermediates else encoded)
        eos = _last_token_index(attention_mask, batch, length)
        index = ops.broadcast_to(eos.view(batch, 1, 1), (batch, 1, x.shape[2]))
        pooled = ops.gather_elements(x, 1, index).squeeze(1)
        if output_intermediates:
            return (pooled,) + encoded[1:]
        return pooled


class PatchEmbedding(nn.Conv2d):
    """The patch Conv2d (kernel = stride, no bias, no padding) computed as one matmul over
    the cut-out patches, returning [batch, patches, hidden] directly.

    Same weight, same numbers: MindSpore's CPU Conv2d kernel takes ~80x longer than this
    matmul for 16x16 stride-16 patches (bench/clip.py findings); torch_impl keeps its Conv2d.
    """

    def construct(self, x):
        channels, height, width = x.shape[1], x.shape[2], x.shape[3]
        p = self.kernel_size[0]
        rows, cols = height // p, width // p
        # [b, c, rows, p, cols, p] -> [b, rows, cols, c, p, p]: each patch flattened in the
        # weight's (in_channels, kh, kw) order, patches in row-major order like Conv2d's output.
        x = x.reshape(-1, channels, rows, p, cols, p).transpose(0, 2, 4, 1, 3, 5)
        x = x.reshape(-1, rows * cols, channels * p * p)
        return ops.matmul(x, self.weight.reshape(self.out_channels, -1).T)


class VisionEmbeddings(nn.Cell):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        image = config.model.image
        self.class_embedding = ms.Parameter(ms.Tensor(np.zeros(image.hidden_size, np.float32)),
                                            name="class_embedding")
        self.patch_embedding = PatchEmbedding(image.num_channels, image.hidden_size,
                                              kernel_size=image.patch_size, stride=image.patch_size,
                                              pad_mode="valid", has_bias=False)
        self.position_embedding = nn.Embedding(image.num_positions, image.hidden_size)

    def construct(self, pixel_values):
        batch = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values)  # [b, patches, hidden]
        cls = ops.broadcast_to(self.class_embedding.view(1, 1, -1), (batch, 1, patches.shape[2]))
        x = ops.cat((cls, patches), axis=1)
        return x + self.position_embedding.embedding_table.expand_dims(0)


class VisionTransformer(nn.Cell):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        image, eps = config.model.image, config.model.layer_norm_eps
        self.embeddings = VisionEmbeddings(config)
        self.pre_layernorm = nn.LayerNorm((image.hidden_size,), epsilon=eps)
        self.encoder = Encoder(image, config)
        self.post_layernorm = nn.LayerNorm((image.hidden_size,), epsilon=eps)

    def construct(self, pixel_values, output_intermediates=False):
        """The class token's final state, normalised: [batch, hidden].

        output_intermediates: (pooled, hidden_states, attention_scores): pre_layernorm's
        output and each layer's output [batch, patches + 1, hidden], each layer's raw scores
        [batch, heads, patches + 1, patches + 1] (Hugging Face's hidden_states convention).
        """
        encoded = self.encoder(self.pre_layernorm(self.embeddings(pixel_values)), None,
                               output_intermediates)
        x = encoded[0] if output_intermediates else encoded
        pooled = self.post_layernorm(x[:, 0, :])
        if output_intermediates:
            return (pooled,) + encoded[1:]
        return pooled


def init_towers(model, config, std_of, skip: tuple[str, ...] = ()) -> None:
    """OpenAI CLIP's initialisation of the image and text towers and the projections of
    ``model`` (std_of(config, cell name), taichu.families.clip.init_std); cells under the
    ``skip`` prefixes keep theirs (the tri-modal model's speech tower)."""
    for name, cell in model.cells_and_names():
        if skip and name.startswith(skip):
            continue
        if isinstance(cell, (nn.Dense, nn.Embedding, nn.Conv2d)):
            weight = cell.embedding_table if isinstance(cell, nn.Embedding) else cell.weight
            weight.set_data(initializer(Normal(sigma=std_of(config, name)), weight.shape, weight.dtype))
        if isinstance(cell, nn.Dense) and cell.bias is not None:
            cell.bias.set_data(initializer("zeros", cell.bias.shape, cell.bias.dtype))
    class_embedding = model.vision_model.embeddings.class_embedding
    class_embedding.set_data(initializer(Normal(sigma=config.model.image.hidden_size ** -0.5),
                                         class_embedding.shape, class_embedding.dtype))


class CLIP(nn.Cell):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        m = config.model
        self.config = config
        self.text_model = TextTransformer(config)
        self.vision_model = VisionTransformer(config)
        self.visual_projection = Dense(m.image.hidden_size, m.projection_dim, has_bias=False)
        self.text_projection = Dense(m.text.hidden_size, m.projection_dim, has_bias=False)
        self.logit_scale = ms.Parameter(ms.Tensor(m.logit_scale_init, ms.float32), name="logit_scale")
        self._init_weights()

    def _init_weights(self):
        init_towers(self, self.config, init_std)

    def _check(self, pixel_values=None, input_ids=None, attention_mask=None):
        # Value checks run here, outside construct: graph mode cannot raise on tensor values.
        check_inputs(self.config, None if pixel_values is None else tuple(pixel_values.shape),
                     None if input_ids is None else input_ids.asnumpy(),
                     None if attention_mask is None else attention_mask.asnumpy())

    def get_image_features(self, pixel_values):
        """Projected image embeddings [batch, projection_dim], not normalised (as HF)."""
        self._check(pixel_values=pixel_values)
        return self.visual_projection(self.vision_model(pixel_values))

    def get_text_features(self, input_ids, attention_mask=None):
        """Projected text embeddings [batch, projection_dim], not normalised (as HF).

        attention_mask: [batch, length], 1 for real tokens, 0 for padding; right-padded.
        """
        self._check(input_ids=input_ids, attention_mask=attention_mask)
        return self.text_projection(self.text_model(input_ids, attention_mask))

    def __call__(self, pixel_values, input_ids, attention_mask=None, output_intermediates=False):
        self._check(pixel_values, input_ids, attention_mask)
        return super().__call__(pixel_values, input_ids, attention_mask, output_intermediates)

    def construct(self, pixel_values, input_ids, attention_mask=None, output_intermediates=False):
        """(logits_per_image [images, texts], logits_per_text [texts, images]):
        exp(logit_scale) * cosine similarity of the projected embeddings.

        output_intermediates: also the towers' (hidden_states, attention_scores), text first:
        (logits_per_image, logits_per_text, text_hidden_states, text_attention_scores,
        image_hidden_states, image_attention_scores) (TextTransformer, VisionTransformer).
        """
        image = self.vision_model(pixel_values, output_intermediates)
        text = self.text_model(input_ids, attention_mask, output_intermediates)
        image_embeds = self.visual_projection(image[0] if output_intermediates else image)
        text_embeds = self.text_projection(text[0] if output_intermediates else text)
        image_embeds = image_embeds / ops.sqrt(ops.pow(image_embeds, 2).sum(axis=-1, keepdims=True))
        text_embeds = text_embeds / ops.sqrt(ops.pow(text_embeds, 2).sum(axis=-1, keepdims=True))
        logits_per_image = ops.matmul(image_embeds, text_embeds.T) * ops.exp(self.logit_scale)
        if output_intermediates:
            return (logits_per_image, logits_per_image.T) + text[1:] + image[1:]
        return logits_per_image, logits_per_image.T


def contrastive_loss(logits_per_image, logits_per_text=None):
    """Symmetric cross-entropy of n pairs: the mean of the image->text and text->image
    classification losses, row i's right answer being column i. CLIP's square [n, n]
    logits give the text side as their transpose (the default); BriVL's rows also score
    queue columns after the batch's n."""
    if logits_per_text is None:
        logits_per_text = logits_per_image.T
    labels = ops.arange(0, logits_per_image.shape[0], dtype=ms.int32)
    # The fused cross-entropy (LogSoftmax + NLLLoss), not the composite ops.cross_entropy.
    image_loss = cross_entropy(logits_per_image, labels)
    text_loss = cross_entropy(logits_per_text, labels)
    return (image_loss + text_loss) / 2


def training_loss(model, pixel_values, input_ids, attention_mask):
    """The contrastive loss of a batch of pairs (image i goes with caption i), with the
    batch's other captions and images as negatives; returns (loss,)."""
    logits_per_image, _ = model(pixel_values, input_ids, attention_mask)
    return (contrastive_loss(logits_per_image.astype(ms.float32)),)


def distill_outputs(model, pixel_values, input_ids, attention_mask):
    """One forward pass of training_loss's inputs for distillation: (training_loss's
    outputs, predictions, streams).

    predictions: (logits_per_image [n, n] fp32, row weights 0.5 / n) and (logits_per_text,
    0.5 / n): the contrastive loss is their weighted sum of row cross-entropies. streams:
    the text tower's (hidden_states, attention_scores, attention_mask as fp32, causal True)
    and the image tower's (..., ones [n, patches + 1], causal False), the order of
    taichu.families.clip.distill_streams.
    """
    outputs = model(pixel_values, input_ids, attention_mask, True)
    logits_per_image, logits_per_text = outputs[0].astype(ms.float32), outputs[1].astype(ms.float32)
    text_hidden, text_scores, image_hidden, image_scores = outputs[2:]
    n_images, n_texts = logits_per_image.shape
    predictions = ((logits_per_image, ops.full((n_images,), 0.5 / n_images, dtype=ms.float32)),
                   (logits_per_text, ops.full((n_texts,), 0.5 / n_texts, dtype=ms.float32)))
    image_mask = ops.ones(image_hidden[0].shape[:2], ms.float32)
    streams = ((text_hidden, text_scores, attention_mask.astype(ms.float32), True),
               (image_hidden, image_scores, image_mask, False))
    return (contrastive_loss(logits_per_image),), predictions, streams


def after_step(model):
    """OpenAI CLIP clips the temperature so logits are never scaled by more than 100."""
    ops.assign(model.logit_scale, ops.clamp(model.logit_scale, 0.0, MAX_LOGIT_SCALE))


def _last_token_index(attention_mask, batch, length):
    """[batch]: the position of each row's last real token (the last 1 of the mask)."""
    if attention_mask is None:
        return ops.full((batch,), length - 1, dtype=ms.int32)
    positions = ops.arange(0, length, dtype=ms.int32).expand_dims(0)
    return (attention_mask.astype(ms.int32) * positions).max(axis=1)

"""CLIP in PyTorch (design.md §2.4), mirrored by mindspore_impl/clip.py.

The architecture of Hugging Face ``CLIPModel`` module for module, so its weights convert
by renaming alone (``pre_layrnorm`` -> ``pre_layernorm``). Image: patch Conv2d without
bias, class token, learned positions, LayerNorm, pre-LN encoder, LayerNorm on the class
token, projection. Text: token + position embeddings, pre-LN encoder with a causal and a
padding mask, final LayerNorm, pooled at the last real token, projection.

Texts are right-padded and every caption ends with eos, so the last real token of a row
(the last 1 of its attention mask) is its eos. Hugging Face finds the same position from
the ids (the first eos_token_id, or the largest id for old configs); both agree on such
inputs. State_dict names here are the project's canonical weight names.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from taichu.families.clip import MAX_LOGIT_SCALE, CLIPConfig, check_inputs, init_std
from torch_impl.gpt import causal_attention_bias


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), OpenAI CLIP's activation."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


# CLIP's config allows quick_gelu and gelu; BriVL, whose layers are these, all four.
ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": lambda: nn.GELU(approximate="none"),
               "gelu_new": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU}


class Attention(nn.Module):
    def __init__(self, tower, config: CLIPConfig):
        super().__init__()
        self.num_heads = tower.num_heads
        self.head_dim = tower.head_dim
        self.scale = 1.0 / math.sqrt(tower.head_dim)
        # q/k/v biases unless the tower says otherwise (the vision family's qkv_bias).
        bias = getattr(tower, "qkv_bias", True)
        self.q_proj = nn.Linear(tower.hidden_size, tower.hidden_size, bias=bias)
        self.k_proj = nn.Linear(tower.hidden_size, tower.hidden_size, bias=bias)
        self.v_proj = nn.Linear(tower.hidden_size, tower.hidden_size, bias=bias)
        self.out_proj = nn.Linear(tower.hidden_size, tower.hidden_size)
        self.attn_dropout = nn.Dropout(config.model.attention_dropout)

    def forward(self, x, attention_bias=None, output_scores=False):
        """The output [batch, length, hidden]; with output_scores (output, scores), the raw
        attention scores q k^T * scale [batch, heads, length, length] before the bias and
        softmax."""
        batch, length, hidden = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        if output_scores:
            # Written out, as mindspore_impl always does, to return the scores (distillation).
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
            biased = scores
            if attention_bias is not None:
                biased = scores + attention_bias
            probs = torch.softmax(biased, dim=-1)
            out = torch.matmul(self.attn_dropout(probs), v)
        else:
            # softmax(q k^T * scale + bias) v, fused; mindspore_impl writes it out.
            dropout = self.attn_dropout.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias, dropout_p=dropout,
                                                 scale=self.scale)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, hidden))
        if output_scores:
            return out, scores
        return out


class MLP(nn.Module):
    def __init__(self, tower, config: CLIPConfig):
        super().__init__()
        self.fc1 = nn.Linear(tower.hidden_size, tower.ffn_size)
        self.act = ACTIVATIONS[config.model.activation]()
        self.fc2 = nn.Linear(tower.ffn_size, tower.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, tower, config: CLIPConfig):
        super().__init__()
        eps = config.model.layer_norm_eps
        self.self_attn = Attention(tower, config)
        self.layer_norm1 = nn.LayerNorm(tower.hidden_size, eps=eps)
        self.mlp = MLP(tower, config)
        self.layer_norm2 = nn.LayerNorm(tower.hidden_size, eps=eps)

    def forward(self, x, attention_bias=None, output_scores=False):
        """The output; with output_scores (output, the attention's raw scores)."""
        attn = self.self_attn(self.layer_norm1(x), attention_bias, output_scores)
        x = x + (attn[0] if output_scores else attn)
        x = x + self.mlp(self.layer_norm2(x))
        if output_scores:
            return x, attn[1]
        return x


class Encoder(nn.Module):
    def __init__(self, tower, config: CLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(tower, config) for _ in range(tower.num_layers)])

    def forward(self, x, attention_bias=None, output_intermediates=False):
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


class TextEmbeddings(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        text = config.model.text
        self.token_embedding = nn.Embedding(text.vocab_size, text.hidden_size)
        self.position_embedding = nn.Embedding(text.max_position_embeddings, text.hidden_size)

    def forward(self, input_ids):
        length = input_ids.shape[1]
        position_ids = torch.arange(length, device=input_ids.device).unsqueeze(0)
        return self.token_embedding(input_ids) + self.position_embedding(position_ids)


class TextTransformer(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        text = config.model.text
        self.embeddings = TextEmbeddings(config)
        self.encoder = Encoder(text, config)
        self.final_layer_norm = nn.LayerNorm(text.hidden_size, eps=config.model.layer_norm_eps)

    def forward(self, input_ids, attention_mask=None, output_intermediates=False):
        """The final hidden state of each row's last real token (its eos): [batch, hidden].

        output_intermediates: (pooled, hidden_states, attention_scores): the embeddings and
        each layer's output [batch, length, hidden] (no final LayerNorm), each layer's raw
        scores [batch, heads, length, length] before the causal/padding bias (Hugging Face's
        hidden_states; its attentions are softmax(scores + bias)).
        """
        batch, length = input_ids.shape
        x = self.embeddings(input_ids)
        bias = causal_attention_bias(attention_mask, batch, length, 0, x.dtype, x.device)
        encoded = self.encoder(x, bias, output_intermediates)
        x = self.final_layer_norm(encoded[0] if output_intermediates else encoded)
        eos = _last_token_index(attention_mask, batch, length, x.device)
        pooled = torch.gather(x, 1, eos.view(batch, 1, 1).expand(batch, 1, x.shape[2])).squeeze(1)
        if output_intermediates:
            return (pooled,) + encoded[1:]
        return pooled


class VisionEmbeddings(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        image = config.model.image
        self.class_embedding = nn.Parameter(torch.zeros(image.hidden_size))
        self.patch_embedding = nn.Conv2d(image.num_channels, image.hidden_size,
                                         kernel_size=image.patch_size, stride=image.patch_size,
                                         bias=False)
        self.position_embedding = nn.Embedding(image.num_positions, image.hidden_size)

    def forward(self, pixel_values):
        batch = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [b, patches, hidden]
        cls = self.class_embedding.view(1, 1, -1).expand(batch, 1, -1)
        x = torch.cat((cls, patches), dim=1)
        return x + self.position_embedding.weight.unsqueeze(0)


class VisionTransformer(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        image, eps = config.model.image, config.model.layer_norm_eps
        self.embeddings = VisionEmbeddings(config)
        self.pre_layernorm = nn.LayerNorm(image.hidden_size, eps=eps)
        self.encoder = Encoder(image, config)
        self.post_layernorm = nn.LayerNorm(image.hidden_size, eps=eps)

    def forward(self, pixel_values, output_intermediates=False):
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


@torch.no_grad()
def init_towers(model, config, std_of, skip: tuple[str, ...] = ()) -> None:
    """OpenAI CLIP's initialisation of the image and text towers and the projections of
    ``model`` (std_of(config, module name), taichu.families.clip.init_std); modules under the
    ``skip`` prefixes keep theirs (the tri-modal model's speech tower)."""
    for name, module in model.named_modules():
        if skip and name.startswith(skip):
            continue
        if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
            nn.init.normal_(module.weight, mean=0.0, std=std_of(config, name))
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    nn.init.normal_(model.vision_model.embeddings.class_embedding, mean=0.0,
                    std=config.model.image.hidden_size ** -0.5)


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        m = config.model
        self.config = config
        self.text_model = TextTransformer(config)
        self.vision_model = VisionTransformer(config)
        self.visual_projection = nn.Linear(m.image.hidden_size, m.projection_dim, bias=False)
        self.text_projection = nn.Linear(m.text.hidden_size, m.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(m.logit_scale_init))
        self._init_weights()

    def _init_weights(self):
        init_towers(self, self.config, init_std)

    def _check(self, pixel_values=None, input_ids=None, attention_mask=None):
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return
        check_inputs(self.config, None if pixel_values is None else tuple(pixel_values.shape),
                     None if input_ids is None else input_ids.detach().cpu().numpy(),
                     None if attention_mask is None else attention_mask.detach().cpu().numpy())

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

    def forward(self, pixel_values, input_ids, attention_mask=None, output_intermediates=False):
        """(logits_per_image [images, texts], logits_per_text [texts, images]):
        exp(logit_scale) * cosine similarity of the projected embeddings.

        output_intermediates: also the towers' (hidden_states, attention_scores), text first:
        (logits_per_image, logits_per_text, text_hidden_states, text_attention_scores,
        image_hidden_states, image_attention_scores) (TextTransformer, VisionTransformer).
        """
        self._check(pixel_values, input_ids, attention_mask)
        image = self.vision_model(pixel_values, output_intermediates)
        text = self.text_model(input_ids, attention_mask, output_intermediates)
        image_embeds = self.visual_projection(image[0] if output_intermediates else image)
        text_embeds = self.text_projection(text[0] if output_intermediates else text)
        image_embeds = image_embeds / image_embeds.pow(2).sum(dim=-1, keepdim=True).sqrt()
        text_embeds = text_embeds / text_embeds.pow(2).sum(dim=-1, keepdim=True).sqrt()
        logits_per_image = torch.matmul(image_embeds, text_embeds.T) * self.logit_scale.exp()
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
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    image_loss = F.cross_entropy(logits_per_image, labels)
    text_loss = F.cross_entropy(logits_per_text, labels)
    return (image_loss + text_loss) / 2


def training_loss(model, pixel_values, input_ids, attention_mask):
    """The contrastive loss of a batch of pairs (image i goes with caption i), with the
    batch's other captions and images as negatives; returns (loss,)."""
    logits_per_image, _ = model(pixel_values, input_ids, attention_mask)
    return (contrastive_loss(logits_per_image.float()),)


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
    logits_per_image, logits_per_text = outputs[0].float(), outputs[1].float()
    text_hidden, text_scores, image_hidden, image_scores = outputs[2:]
    device = logits_per_image.device
    n_images, n_texts = logits_per_image.shape
    predictions = ((logits_per_image, torch.full((n_images,), 0.5 / n_images, dtype=torch.float32,
                                                 device=device)),
                   (logits_per_text, torch.full((n_texts,), 0.5 / n_texts, dtype=torch.float32,
                                                device=device)))
    image_mask = torch.ones(image_hidden[0].shape[:2], dtype=torch.float32, device=device)
    streams = ((text_hidden, text_scores, attention_mask.float(), True),
               (image_hidden, image_scores, image_mask, False))
    return (contrastive_loss(logits_per_image),), predictions, streams


@torch.no_grad()
def after_step(model):
    """OpenAI CLIP clips the temperature so logits are never scaled by more than 100."""
    model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)


def _last_token_index(attention_mask, batch, length, device):
    """[batch]: the position of each row's last real token (the last 1 of the mask)."""
    if attention_mask is None:
        return torch.full((batch,), length - 1, dtype=torch.long, device=device)
    positions = torch.arange(length, device=device).unsqueeze(0)
    return (attention_mask.long() * positions).amax(dim=1)

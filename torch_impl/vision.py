"""The Zidong Taichu vision model (MST) in PyTorch (design.md §2.2), mirrored by
mindspore_impl/vision.py. taichu/families/vision.py has the config and the choices.

  ViT            Hugging Face ViTModel's architecture from CLIP's pre-LN encoder layers:
                 patch Conv2d (with bias) -> masked patches := mask_token -> [CLS ; patches]
                 + learned positions (bicubically resized for another grid) -> layers ->
                 LayerNorm (-> pooler tanh(dense(CLS)) if configured); optionally the last
                 layer's CLS attention probabilities and every layer's output
  DINOHead       MLP (GELU) -> L2-normalised bottleneck -> weight-normalised Linear to K
  guided_mask    the attention-guided mask of the student's global views
  GlobalDecoder  feature pyramid from the student's patch tokens back to pixels (or to
                 per-pixel class scores, objective segmentation)
  MST            student (backbone, head, decoder), teacher (EMA backbone + head), center;
                 or backbone alone; or backbone + decoder (segmentation)

Training interface, called by the shared trainer (inputs example-major, as
taichu.vision_data.ViewBatches makes them):
- ``training_loss(model, global_views [B, 2, C, G, G], local_views [B, n, C, L, L],
  mask_noise [B, 2, N])`` -> (loss, new_center [1, K]) for mst;
  ``training_loss(model, pixel_values [B, C, G, G], labels [B, G, G])`` -> (loss,) for
  segmentation (taichu.vision_data.SegmentBatches);
- ``after_step(model, new_centers)`` after each optimizer update (mst): the centre becomes the
  mean of the micro-batches' (and ranks') new centres, the teacher moves towards the student
  with the cosine momentum of this update, and the update is counted.
State_dict names here are the project's canonical weight names.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from taichu.families.vision import (NORMALIZE_EPS, VisionConfig, bicubic_matrix, check_views,
                                    decoder_outputs, lateral_layers, teacher_momentum)
from torch_impl.clip import Encoder


# ----------------------------------------------------------------------------- backbone

class ViTEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        m = config.model
        self.grid = m.grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, m.hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, m.hidden_size)) if m.mask_token else None
        self.position_embeddings = nn.Parameter(torch.zeros(1, m.num_patches + 1, m.hidden_size))
        self.patch_embedding = nn.Conv2d(m.num_channels, m.hidden_size, kernel_size=m.patch_size,
                                         stride=m.patch_size)

    def positions(self, rows: int, cols: int):
        """[1, 1 + rows * cols, hidden]: the learned positions, the patch grid's resized
        bicubically when the image's grid is not the trained one (taichu's bicubic_matrix,
        a constant of the grid sizes, so the same numbers in both backends)."""
        if rows == self.grid and cols == self.grid:
            return self.position_embeddings
        pos = self.position_embeddings
        matrix = torch.tensor(bicubic_matrix(self.grid, rows, cols), dtype=pos.dtype, device=pos.device)
        patches = torch.matmul(matrix, pos[0, 1:]).unsqueeze(0)
        return torch.cat((pos[:, :1], patches), dim=1)

    def forward(self, pixel_values, bool_masked_pos=None):
        batch = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values)                    # [b, hidden, rows, cols]
        rows, cols = patches.shape[2], patches.shape[3]
        patches = patches.flatten(2).transpose(1, 2)                    # [b, patches, hidden]
        if bool_masked_pos is not None:
            patches = torch.where(bool_masked_pos.unsqueeze(-1), self.mask_token.to(patches.dtype), patches)
        cls = self.cls_token.expand(batch, 1, -1)
        return torch.cat((cls, patches), dim=1) + self.positions(rows, cols)


class Pooler(nn.Module):
    """Hugging Face ViTPooler: tanh(dense(CLS))."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.dense = nn.Linear(config.model.hidden_size, config.model.hidden_size)

    def forward(self, hidden):
        return torch.tanh(self.dense(hidden[:, 0]))


def cls_attention(attention, x):
    """[batch, heads, length]: the CLS query's attention probabilities over every token
    (itself first) in ``attention`` (a clip.Attention) applied to ``x`` (its normalised
    input), softmax(q_cls k^T / sqrt(d)) without dropout. Recomputed from the layer's own
    q/k projections (one extra query row and key projection): torch's fused attention does
    not return its probabilities."""
    batch, length, _ = x.shape
    heads, dim = attention.num_heads, attention.head_dim
    q = attention.q_proj(x[:, :1]).view(batch, 1, heads, dim).transpose(1, 2)      # [b, h, 1, d]
    k = attention.k_proj(x).view(batch, length, heads, dim).transpose(1, 2)        # [b, h, L, d]
    scores = torch.matmul(q, k.transpose(2, 3)) * attention.scale
    return torch.softmax(scores.float(), dim=-1)[:, :, 0]


class ViT(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        m = config.model
        self.embeddings = ViTEmbeddings(config)
        self.encoder = Encoder(m, config)
        self.layer_norm = nn.LayerNorm(m.hidden_size, eps=m.layer_norm_eps)
        self.pooler = Pooler(config) if m.pooler else None

    def forward(self, pixel_values, bool_masked_pos=None, with_attention: bool = False,
                with_layers: bool = False):
        """(hidden [batch, 1 + patches, hidden] after the final LayerNorm, CLS attention
        [batch, heads, 1 + patches] of the last layer or None, the raw output of every layer
        (a tuple, empty unless with_layers)).

        bool_masked_pos: [batch, patches] bool, True = the patch enters as mask_token."""
        x = self.embeddings(pixel_values, bool_masked_pos)
        layers = self.encoder.layers
        attention, outputs = None, []
        for i, layer in enumerate(layers):
            if with_attention and i == len(layers) - 1:
                attention = cls_attention(layer.self_attn, layer.layer_norm1(x))
            x = layer(x)
            if with_layers:
                outputs.append(x)
        return self.layer_norm(x), attention, tuple(outputs)


def patch_attention(attention):
    """[batch, patches]: the CLS attention over the patches averaged over the heads
    (Attn = 1/H sum_h softmax(q_cls K^T / sqrt(d)), the CLS key's own share left out,
    not renormalised)."""
    return attention[:, :, 1:].mean(dim=1)


# ----------------------------------------------------------------------------- head

class WeightNormLinear(nn.Module):
    """Linear without bias whose weight is g * v / ||v||, one length per output row
    (torch's weight_norm with dim=0): weight_g [out, 1], weight_v [out, in]."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(n_out, 1))
        self.weight_v = nn.Parameter(torch.zeros(n_out, n_in))

    def forward(self, x):
        weight = self.weight_g * (self.weight_v / self.weight_v.pow(2).sum(dim=1, keepdim=True).sqrt())
        return F.linear(x, weight)


class DINOHead(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        m = config.model
        h = m.head
        sizes = [m.hidden_size] + [h.hidden_size] * (h.num_layers - 1) + [h.bottleneck_size]
        self.layers = nn.ModuleList([nn.Linear(sizes[i], sizes[i + 1]) for i in range(h.num_layers)])
        self.act = nn.GELU(approximate="none")
        self.last_layer = WeightNormLinear(h.bottleneck_size, h.num_prototypes)

    def forward(self, x):
        """[n, hidden] -> [n, K] logits."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.act(x)
        x = x / x.pow(2).sum(dim=-1, keepdim=True).sqrt().clamp(min=NORMALIZE_EPS)
        return self.last_layer(x)


# ----------------------------------------------------------------------------- masking

def guided_mask(attention, noise, mask: str, p: float, tau: float, kind: str):
    """[batch, patches] bool, True = masked for the student.

    attention: [batch, patches] (patch_attention of the teacher), noise: [batch, patches]
    uniform [0, 1). ``guided``: noise < p and attention < tau, tau the value itself or the
    tau-quantile of the row's attentions (linear interpolation between the sorted values,
    numpy's default); ``random``: noise < p; ``none``: nothing."""
    if mask == "none":
        return torch.zeros_like(noise, dtype=torch.bool)
    chosen = noise < p
    if mask == "random":
        return chosen
    if kind == "quantile":
        ordered = torch.sort(attention, dim=-1).values
        position = tau * (attention.shape[-1] - 1)
        low = int(math.floor(position))
        high = min(low + 1, attention.shape[-1] - 1)
        frac = position - low
        threshold = ordered[:, low:low + 1] + (ordered[:, high:high + 1] - ordered[:, low:low + 1]) * frac
    else:
        threshold = tau
    return chosen & (attention < threshold)


# ----------------------------------------------------------------------------- decoder

def _upsample_nearest(x, factor: int):
    """[b, h, w, c] -> [b, h * factor, w * factor, c], each cell repeated."""
    if factor == 1:
        return x
    b, h, w, c = x.shape
    x = x.view(b, h, 1, w, 1, c).expand(b, h, factor, w, factor, c)
    return x.reshape(b, h * factor, w * factor, c)


class Upsample(nn.Module):
    """A 2x2, stride-2 transposed convolution as a Linear to 4 * out channels, ordered
    (dy, dx, channel), then depth-to-space: [b, h, w, in] -> [b, 2h, 2w, out]."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.n_out = n_out
        self.proj = nn.Linear(n_in, 4 * n_out)

    def forward(self, x):
        b, h, w, _ = x.shape
        x = self.proj(x).view(b, h, w, 2, 2, self.n_out).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, 2 * h, 2 * w, self.n_out)


class Lateral(nn.Module):
    """LayerNorm + Linear of one encoder layer's patch tokens, as a feature map."""

    def __init__(self, hidden: int, channels: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.proj = nn.Linear(hidden, channels)

    def forward(self, tokens, rows: int, cols: int):
        x = self.proj(self.norm(tokens[:, 1:]))
        return x.view(x.shape[0], rows, cols, x.shape[-1])


class GlobalDecoder(nn.Module):
    """Feature-pyramid decoder: every patch token (masked and visible) back to pixels.

    Levels s = 0..S-1 (S = log2 patch_size) at 2^s times the patch grid's resolution, then
    the pixels at level S. Top-down path: level 0 is lateral 0; level s = smooth_s(GELU(
    upsample(level s-1) + lateral s)); pixels = out(GELU(upsample(level S-1))). The lateral
    connections connect the encoder's depth to the pyramid's resolution, as FPN's connect a
    CNN's stages: lateral s takes the patch tokens of encoder layer lateral_layers(L, S)[s]
    (level 0 the last layer, finer levels shallower layers), LayerNorm + Linear, repeated
    to level s's resolution. Upsampling is a learned 2x2 stride-2 transposed convolution
    (Upsample), smoothing and output 3x3 convolutions. Feature maps are [b, h, w, c] between
    the convolutions."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        m = config.model
        channels = m.decoder.channels
        stages = len(channels)
        self.sources = lateral_layers(m.num_layers, stages)
        self.laterals = nn.ModuleList([Lateral(m.hidden_size, c, m.layer_norm_eps) for c in channels])
        self.upsamples = nn.ModuleList([Upsample(channels[s], channels[min(s + 1, stages - 1)])
                                        for s in range(stages)])
        self.smooth = nn.ModuleList([nn.Conv2d(c, c, kernel_size=3, padding=1) for c in channels[1:]])
        self.out = nn.Conv2d(channels[-1], decoder_outputs(m), kernel_size=3, padding=1)
        self.act = nn.GELU(approximate="none")

    def forward(self, layer_outputs, rows: int, cols: int):
        """layer_outputs: every encoder layer's raw output [b, 1 + rows * cols, hidden];
        -> pixels [b, channels, rows * 2^S, cols * 2^S] (class scores for segmentation)."""
        x = self.laterals[0](layer_outputs[self.sources[0]], rows, cols)
        for s in range(1, len(self.laterals)):
            lateral = _upsample_nearest(self.laterals[s](layer_outputs[self.sources[s]], rows, cols), 2 ** s)
            x = self.act(self.upsamples[s - 1](x) + lateral)
            x = self.smooth[s - 1](x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = self.act(self.upsamples[-1](x))
        return self.out(x.permute(0, 3, 1, 2))


# ----------------------------------------------------------------------------- the model

class Teacher(nn.Module):
    """The momentum copy: backbone and head, updated by after_step, never by the optimizer."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.backbone = ViT(config)
        self.head = DINOHead(config)


class MST(nn.Module):
    """Objective ``mst``: the student's ``backbone``, ``head``, ``decoder``; the ``teacher``;
    the ``center`` and ``num_updates`` buffers. Objective ``backbone``: ``backbone`` only.
    Objective ``segmentation``: ``backbone`` and ``decoder`` (to class scores)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        m = config.model
        self.config = config
        self.objective = m.objective
        self.patch_size = m.patch_size
        self.backbone = ViT(config)
        if m.objective == "mst":
            k, d = m.masking, m.distillation
            # Plain numbers, as in the MindSpore mirror (where graph mode needs constants).
            self.mask, self.mask_prob = k.mask, float(k.mask_prob)
            self.mask_threshold, self.mask_threshold_kind = float(k.mask_threshold), k.mask_threshold_kind
            self.teacher_temp, self.student_temp = float(d.teacher_temp), float(d.student_temp)
            self.center_momentum = float(d.center_momentum)
            self.restore_weight = float(m.decoder.restore_weight)
            self.head = DINOHead(config)
            self.decoder = GlobalDecoder(config)
            self.teacher = Teacher(config)
            # The EMA of the teacher's outputs (after_step writes it); saved with the model.
            self.register_buffer("center", torch.zeros(1, m.head.num_prototypes))
            # Optimizer updates so far: the teacher momentum schedule's step, saved so a
            # resumed run goes on from where it was.
            self.register_buffer("num_updates", torch.zeros(1, dtype=torch.int64))
        elif m.objective == "segmentation":
            self.decoder = GlobalDecoder(config)
            # The decoder reads the layers' raw outputs (each lateral has its LayerNorm), so
            # the backbone's final LayerNorm gets no gradient: kept as loaded, not trained
            # (an unused trainable tensor breaks data-parallel training).
            self.backbone.layer_norm.requires_grad_(False)
        self._init_weights()
        if m.objective == "mst":
            with torch.no_grad():
                for student, teacher in self.momentum_pairs():
                    teacher.copy_(student)
                    teacher.requires_grad = False
                if m.head.norm_last_layer:
                    self.head.last_layer.weight_g.requires_grad = False

    @torch.no_grad()
    def _init_weights(self):
        """DINO's: truncated normal (std initializer_range) for Linear and Conv2d weights,
        the CLS token and the positions; zero biases; LayerNorms one/zero; mask token zero;
        the head's weight-norm lengths one."""
        std = self.config.model.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, WeightNormLinear):
                nn.init.trunc_normal_(module.weight_v, std=std, a=-2 * std, b=2 * std)
                nn.init.ones_(module.weight_g)
        embeddings = self.backbone.embeddings
        nn.init.trunc_normal_(embeddings.cls_token, std=std, a=-2 * std, b=2 * std)
        nn.init.trunc_normal_(embeddings.position_embeddings, std=std, a=-2 * std, b=2 * std)

    def momentum_pairs(self):
        """(student parameter, its teacher copy) for backbone and head."""
        return [*zip(self.backbone.parameters(), self.teacher.backbone.parameters()),
                *zip(self.head.parameters(), self.teacher.head.parameters())]

    def forward(self, pixel_values):
        """(last_hidden_state [batch, 1 + patches, hidden], pooled [batch, hidden]): the
        student backbone's features; pooled = the pooler's output, or the CLS token's state
        without a pooler."""
        if not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            m = self.config.model
            if pixel_values.dim() != 4 or pixel_values.shape[1] != m.num_channels \
                    or pixel_values.shape[2] % m.patch_size or pixel_values.shape[3] % m.patch_size:
                raise ValueError(f"pixel_values must be [batch, {m.num_channels}, height, width] with sides "
                                 f"divisible by patch_size {m.patch_size}, got {tuple(pixel_values.shape)}")
        hidden = self.backbone(pixel_values)[0]
        pooler = self.backbone.pooler
        return hidden, (pooler(hidden) if pooler is not None else hidden[:, 0])

    def segment(self, pixel_values):
        """[batch, classes, height, width]: per-pixel class scores (objective segmentation)
        from every patch token of every layer through the decoder."""
        _, _, layers = self.backbone(pixel_values, with_layers=True)
        return self.decoder(layers, pixel_values.shape[2] // self.patch_size, pixel_values.shape[3] // self.patch_size)


# ----------------------------------------------------------------------------- losses

def distillation_loss(teacher_logits, student_logits, center, teacher_temp: float, student_temp: float,
                      num_global: int = 2):
    """DINO's loss. teacher_logits [num_global * B, K] and student_logits [num_views * B, K]
    view-major (the first num_global student views are the teacher's views). Cross-entropy
    between softmax((t - center) / teacher_temp) of teacher view i and log_softmax(s /
    student_temp) of student view v, for every pair with v != i, each averaged over the
    batch; the mean over the pairs. In float32."""
    batch = teacher_logits.shape[0] // num_global
    targets = torch.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1).detach()
    log_probs = torch.log_softmax(student_logits.float() / student_temp, dim=-1)
    num_views = student_logits.shape[0] // batch
    total, pairs = 0.0, 0
    for i in range(num_global):
        target = targets[i * batch:(i + 1) * batch]
        for v in range(num_views):
            if v == i:
                continue
            total = total + (-(target * log_probs[v * batch:(v + 1) * batch]).sum(dim=-1)).mean()
            pairs += 1
    return total / pairs


def loss_terms(model: MST, global_views, local_views, mask_noise) -> dict:
    """Every term of the MST loss (see training_loss), and the masks and attention used."""
    batch = global_views.shape[0]
    size = global_views.shape[2:]
    # Example-major [B, 2, ...] -> view-major [2B, ...] (DINO's chunks).
    views = global_views.transpose(0, 1).reshape(2 * batch, *size)
    noise = mask_noise.transpose(0, 1).reshape(2 * batch, -1)
    # 1. the teacher on the unmasked global views: targets and the CLS attention
    with torch.no_grad():
        t_hidden, t_attention, _ = model.teacher.backbone(views, with_attention=True)
        teacher_logits = model.teacher.head(t_hidden[:, 0])
    attention = patch_attention(t_attention)
    # 2. which patches the student loses
    mask = guided_mask(attention, noise, model.mask, model.mask_prob, model.mask_threshold,
                       model.mask_threshold_kind)
    # 3. the student on the masked global views (every layer kept for the decoder) ...
    # The mask goes in even when empty (masking none): the mask token then takes part
    # with a zero gradient, as data-parallel training wants of every trainable tensor.
    masked = mask if model.backbone.embeddings.mask_token is not None else None
    s_hidden, _, layers = model.backbone(views, masked, with_layers=True)
    features = [s_hidden[:, 0]]
    # ... and on the unmasked local views
    if local_views is not None and local_views.shape[1] > 0:
        local = local_views.transpose(0, 1).reshape(-1, *local_views.shape[2:])
        features.append(model.backbone(local)[0][:, 0])
    student_logits = model.head(torch.cat(features, dim=0))
    distillation = distillation_loss(teacher_logits, student_logits, model.center, model.teacher_temp,
                                     model.student_temp)
    # 4. restoring: the whole global views from the student's patch tokens
    pixels = model.decoder(layers, views.shape[2] // model.patch_size, views.shape[3] // model.patch_size)
    restoring = (pixels.float() - views.float()).abs().mean()
    new_center = (model.center * model.center_momentum
                  + teacher_logits.float().mean(dim=0, keepdim=True) * (1.0 - model.center_momentum))
    return {"distillation": distillation, "restoring": restoring, "new_center": new_center,
            "mask": mask, "attention": attention, "teacher_logits": teacher_logits,
            "student_logits": student_logits, "pixels": pixels}


def segmentation_loss(model: MST, pixel_values, labels):
    """(loss,): the mean over all pixels of the cross-entropy of the decoder's class scores
    against ``labels`` [B, H, W] (class ids), in float32."""
    logits = model.segment(pixel_values)
    scores = logits.float().permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
    return (F.cross_entropy(scores, labels.reshape(-1).long()),)


def training_loss(model: MST, *inputs):
    """The objective's loss: mst_loss (global_views, local_views, mask_noise) or
    segmentation_loss (pixel_values, labels)."""
    if model.objective == "segmentation":
        return segmentation_loss(model, *inputs)
    if model.objective != "mst":
        raise ValueError(f"a model of objective {model.objective} has no training loss")
    return mst_loss(model, *inputs)


def mst_loss(model: MST, global_views, local_views, mask_noise):
    """(loss, new_center [1, K]). loss = DINO distillation (teacher: the unmasked global
    views; student: the masked global views and the local views) + restore_weight * the
    mean L1 distance of the decoder's pixels to the global views. new_center = m * center +
    (1 - m) * the batch mean of the teacher's logits (after_step applies it).
    Inputs example-major: global_views [B, 2, C, G, G], local_views [B, n, C, L, L] (n may
    be 0, or None), mask_noise [B, 2, patches] uniform [0, 1). No input checks here (the
    MindSpore mirror runs inside a compiled graph): check_views, where batches are made."""
    terms = loss_terms(model, global_views, local_views, mask_noise)
    loss = terms["distillation"] + model.restore_weight * terms["restoring"]
    return loss, terms["new_center"].detach()


@torch.no_grad()
def update_teacher(model: MST, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, backbone and head."""
    for student, teacher in model.momentum_pairs():
        teacher.mul_(momentum).add_(student.detach(), alpha=1.0 - momentum)


@torch.no_grad()
def after_step(model: MST, new_centers=None) -> None:
    """After an optimizer update: the centre (the mean of the micro-batches' and ranks'
    new centres = the EMA with the global batch's mean, equal-sized micro-batches), the
    teacher's EMA with the momentum of this update's step (cosine over train.max_steps),
    then count the update. Nothing for the other objectives."""
    if model.objective != "mst":
        return
    d = model.config.model.distillation
    model.center.copy_(new_centers.float().mean(dim=0, keepdim=True))
    momentum = teacher_momentum(int(model.num_updates[0]), model.config.train.max_steps,
                                d.teacher_momentum, d.teacher_momentum_end)
    update_teacher(model, momentum)
    model.num_updates.add_(1)


def check_batch(model: MST, global_views, local_views=None, mask_noise=None) -> None:
    """check_views on tensors (callers outside the trainer)."""
    check_views(model.config, tuple(global_views.shape), None if local_views is None else tuple(local_views.shape),
                None if mask_noise is None else tuple(mask_noise.shape))

"""The Zidong Taichu vision model (MST) in MindSpore (design.md §2.2), mirrored by
torch_impl/vision.py. taichu/families/vision.py has the config and the choices.

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
  segmentation (taichu.vision_data.SegmentBatches); plain tensor math with static shapes,
  so it compiles in graph mode;
- ``after_step(model, new_centers)`` after each optimizer update (mst): the centre becomes the
  mean of the micro-batches' (and ranks') new centres, the teacher moves towards the student
  with the cosine momentum of this update (one compiled graph, the momentum an input), and
  the update is counted.
Attribute paths equal the PyTorch module's, so canonical weight names differ only in
leaves (gamma/beta), mapped in taichu/weights.py. The teacher, the centre and the counter
are Parameters with requires_grad=False: outside trainable_params(), inside the canonical
state dict. Uses mindspore.nn/ops rather than mint: mint has no CPU kernels for these layers.
"""
from __future__ import annotations

import math
import weakref

import numpy as np
import mindspore as ms
from mindspore import nn, ops
from mindspore.common.initializer import TruncatedNormal, initializer

from taichu.families.vision import (NORMALIZE_EPS, VisionConfig, bicubic_matrix, check_views,
                                    decoder_outputs, lateral_layers, teacher_momentum)
from mindspore_impl.clip import Encoder, PatchEmbedding
from mindspore_impl.gpt import BATCH_MATMUL_TRANSPOSE_B, GELU, Dense, cross_entropy


# ----------------------------------------------------------------------------- backbone

class ViTEmbeddings(nn.Cell):
    def __init__(self, config: VisionConfig):
        super().__init__()
        m = config.model
        self.grid = m.grid
        self.local_grid = m.crops.local_crop_size // m.patch_size
        self.cls_token = ms.Parameter(ms.Tensor(np.zeros((1, 1, m.hidden_size), np.float32)), name="cls_token")
        self.mask_token = (ms.Parameter(ms.Tensor(np.zeros((1, 1, m.hidden_size), np.float32)), name="mask_token")
                           if m.mask_token else None)
        self.position_embeddings = ms.Parameter(
            ms.Tensor(np.zeros((1, m.num_patches + 1, m.hidden_size), np.float32)), name="position_embeddings")
        # CLIP's patch Conv2d as one matmul over the cut-out patches (MindSpore's CPU Conv2d
        # is ~80x slower for stride = kernel); it leaves the bias to us.
        self.patch_embedding = PatchEmbedding(m.num_channels, m.hidden_size, kernel_size=m.patch_size,
                                              stride=m.patch_size, pad_mode="valid", has_bias=True)
        # The local crops' resize matrix, made once: a constant of the compiled graph.
        self.local_matrix = ms.Tensor(bicubic_matrix(self.grid, self.local_grid, self.local_grid)) \
            if self.local_grid > 0 else None

    def positions(self, rows: int, cols: int):
        """[1, 1 + rows * cols, hidden]: the learned positions, the patch grid's resized
        bicubically when the image's grid is not the trained one (taichu's bicubic_matrix,
        a constant of the grid sizes, so the same numbers in both backends)."""
        if rows == self.grid and cols == self.grid:
            return self.position_embeddings
        if rows == self.local_grid and cols == self.local_grid:
            matrix = self.local_matrix
        else:
            matrix = ms.Tensor(bicubic_matrix(self.grid, rows, cols))
        pos = self.position_embeddings
        patches = ops.matmul(matrix.astype(pos.dtype), pos[0, 1:]).expand_dims(0)
        return ops.cat((pos[:, :1], patches), axis=1)

    def construct(self, pixel_values, bool_masked_pos=None):
        batch = pixel_values.shape[0]
        p = self.patch_embedding.kernel_size[0]
        rows, cols = pixel_values.shape[2] // p, pixel_values.shape[3] // p
        patches = self.patch_embedding(pixel_values) + self.patch_embedding.bias   # [b, patches, hidden]
        if bool_masked_pos is not None:
            patches = ops.where(bool_masked_pos.expand_dims(-1), self.mask_token.astype(patches.dtype), patches)
        cls = ops.broadcast_to(self.cls_token, (batch, 1, patches.shape[2]))
        return ops.cat((cls, patches), axis=1) + self.positions(rows, cols)


class Pooler(nn.Cell):
    """Hugging Face ViTPooler: tanh(dense(CLS))."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.dense = Dense(config.model.hidden_size, config.model.hidden_size)

    def construct(self, hidden):
        return ops.tanh(self.dense(hidden[:, 0]))


def cls_attention(attention, x):
    """[batch, heads, length]: the CLS query's attention probabilities over every token
    (itself first) in ``attention`` (a clip.Attention) applied to ``x`` (its normalised
    input), softmax(q_cls k^T / sqrt(d)) without dropout. Recomputed from the layer's own
    q/k projections (one extra query row and key projection), as the PyTorch mirror must."""
    batch, length, _ = x.shape
    heads, dim = attention.num_heads, attention.head_dim
    q = attention.q_proj(x[:, :1]).view(batch, 1, heads, dim).transpose(0, 2, 1, 3)       # [b, h, 1, d]
    k = attention.k_proj(x).view(batch, length, heads, dim).transpose(0, 2, 1, 3)         # [b, h, L, d]
    scores = BATCH_MATMUL_TRANSPOSE_B(q, k) * attention.scale
    return ops.softmax(scores.astype(ms.float32), axis=-1)[:, :, 0]


class ViT(nn.Cell):
    def __init__(self, config: VisionConfig):
        super().__init__()
        m = config.model
        self.embeddings = ViTEmbeddings(config)
        self.encoder = Encoder(m, config)
        self.layer_norm = nn.LayerNorm((m.hidden_size,), epsilon=m.layer_norm_eps)
        self.pooler = Pooler(config) if m.pooler else None
        self.num_layers = m.num_layers

    def construct(self, pixel_values, bool_masked_pos=None, with_attention=False, with_layers=False):
        """(hidden [batch, 1 + patches, hidden] after the final LayerNorm, CLS attention
        [batch, heads, 1 + patches] of the last layer or None, the raw output of every layer
        (a tuple, empty unless with_layers)).

        bool_masked_pos: [batch, patches] bool, True = the patch enters as mask_token."""
        x = self.embeddings(pixel_values, bool_masked_pos)
        attention = None
        outputs = ()
        i = 0
        for layer in self.encoder.layers:
            if with_attention and i == self.num_layers - 1:
                attention = cls_attention(layer.self_attn, layer.layer_norm1(x))
            x = layer(x)
            if with_layers:
                outputs = outputs + (x,)
            i = i + 1
        return self.layer_norm(x), attention, outputs


def patch_attention(attention):
    """[batch, patches]: the CLS attention over the patches averaged over the heads
    (Attn = 1/H sum_h softmax(q_cls K^T / sqrt(d)), the CLS key's own share left out,
    not renormalised)."""
    return attention[:, :, 1:].mean(axis=1)


# ----------------------------------------------------------------------------- head

class WeightNormLinear(nn.Cell):
    """Linear without bias whose weight is g * v / ||v||, one length per output row
    (torch's weight_norm with dim=0): weight_g [out, 1], weight_v [out, in]."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight_g = ms.Parameter(ms.Tensor(np.ones((n_out, 1), np.float32)), name="weight_g")
        self.weight_v = ms.Parameter(ms.Tensor(np.zeros((n_out, n_in), np.float32)), name="weight_v")

    def construct(self, x):
        weight = self.weight_g * (self.weight_v / ops.sqrt(ops.pow(self.weight_v, 2).sum(axis=1, keepdims=True)))
        return ops.matmul(x, weight.T)


class DINOHead(nn.Cell):
    def __init__(self, config: VisionConfig):
        super().__init__()
        m = config.model
        h = m.head
        sizes = [m.hidden_size] + [h.hidden_size] * (h.num_layers - 1) + [h.bottleneck_size]
        self.layers = nn.CellList([Dense(sizes[i], sizes[i + 1]) for i in range(h.num_layers)])
        self.act = GELU()
        self.last_layer = WeightNormLinear(h.bottleneck_size, h.num_prototypes)
        self.num_layers = h.num_layers

    def construct(self, x):
        """[n, hidden] -> [n, K] logits."""
        i = 0
        for layer in self.layers:
            x = layer(x)
            if i < self.num_layers - 1:
                x = self.act(x)
            i = i + 1
        x = x / ops.clamp(ops.sqrt(ops.pow(x, 2).sum(axis=-1, keepdims=True)), min=NORMALIZE_EPS)
        return self.last_layer(x)


# ----------------------------------------------------------------------------- masking

def guided_mask(attention, noise, mask: str, p: float, tau: float, kind: str):
    """[batch, patches] bool, True = masked for the student.

    attention: [batch, patches] (patch_attention of the teacher), noise: [batch, patches]
    uniform [0, 1). ``guided``: noise < p and attention < tau, tau the value itself or the
    tau-quantile of the row's attentions (linear interpolation between the sorted values,
    numpy's default); ``random``: noise < p; ``none``: nothing."""
    if mask == "none":
        return ops.zeros(noise.shape, ms.bool_)
    chosen = noise < p
    if mask == "random":
        return chosen
    if kind == "quantile":
        ordered = ops.sort(attention, axis=-1)[0]
        count = attention.shape[-1]
        position = tau * (count - 1)
        low = int(math.floor(position))
        high = min(low + 1, count - 1)
        frac = position - low
        threshold = ordered[:, low:low + 1] + (ordered[:, high:high + 1] - ordered[:, low:low + 1]) * frac
    else:
        threshold = tau
    return ops.logical_and(chosen, attention < threshold)


# ----------------------------------------------------------------------------- decoder

def _upsample_nearest(x, factor: int):
    """[b, h, w, c] -> [b, h * factor, w * factor, c], each cell repeated."""
    if factor == 1:
        return x
    b, h, w, c = x.shape
    x = ops.broadcast_to(x.view(b, h, 1, w, 1, c), (b, h, factor, w, factor, c))
    return x.reshape(b, h * factor, w * factor, c)


class Upsample(nn.Cell):
    """A 2x2, stride-2 transposed convolution as a Linear to 4 * out channels, ordered
    (dy, dx, channel), then depth-to-space: [b, h, w, in] -> [b, 2h, 2w, out]."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.n_out = n_out
        self.proj = Dense(n_in, 4 * n_out)

    def construct(self, x):
        b, h, w, _ = x.shape
        x = self.proj(x).view(b, h, w, 2, 2, self.n_out).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, 2 * h, 2 * w, self.n_out)


class Lateral(nn.Cell):
    """LayerNorm + Linear of one encoder layer's patch tokens, as a feature map."""

    def __init__(self, hidden: int, channels: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm((hidden,), epsilon=eps)
        self.proj = Dense(hidden, channels)

    def construct(self, tokens, rows: int, cols: int):
        x = self.proj(self.norm(tokens[:, 1:]))
        return x.view(x.shape[0], rows, cols, x.shape[-1])


def _conv3x3(n_in: int, n_out: int) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, kernel_size=3, pad_mode="pad", padding=1, has_bias=True)


class GlobalDecoder(nn.Cell):
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
        self.num_stages = stages
        self.laterals = nn.CellList([Lateral(m.hidden_size, c, m.layer_norm_eps) for c in channels])
        self.upsamples = nn.CellList([Upsample(channels[s], channels[min(s + 1, stages - 1)])
                                      for s in range(stages)])
        self.smooth = nn.CellList([_conv3x3(c, c) for c in channels[1:]])
        self.out = _conv3x3(channels[-1], decoder_outputs(m))
        self.act = GELU()

    def construct(self, layer_outputs, rows: int, cols: int):
        """layer_outputs: every encoder layer's raw output [b, 1 + rows * cols, hidden];
        -> pixels [b, channels, rows * 2^S, cols * 2^S] (class scores for segmentation)."""
        x = self.laterals[0](layer_outputs[self.sources[0]], rows, cols)
        for s in range(1, self.num_stages):
            lateral = _upsample_nearest(self.laterals[s](layer_outputs[self.sources[s]], rows, cols), 2 ** s)
            x = self.act(self.upsamples[s - 1](x) + lateral)
            x = self.smooth[s - 1](x.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
        x = self.act(self.upsamples[self.num_stages - 1](x))
        return self.out(x.transpose(0, 3, 1, 2))


# ----------------------------------------------------------------------------- the model

class Teacher(nn.Cell):
    """The momentum copy: backbone and head, updated by after_step, never by the optimizer."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.backbone = ViT(config)
        self.head = DINOHead(config)


class MST(nn.Cell):
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
            # Plain numbers, so graph mode reads constants instead of the pydantic config.
            self.mask, self.mask_prob = k.mask, float(k.mask_prob)
            self.mask_threshold, self.mask_threshold_kind = float(k.mask_threshold), k.mask_threshold_kind
            self.teacher_temp, self.student_temp = float(d.teacher_temp), float(d.student_temp)
            self.center_momentum = float(d.center_momentum)
            self.restore_weight = float(m.decoder.restore_weight)
            self.head = DINOHead(config)
            self.decoder = GlobalDecoder(config)
            self.teacher = Teacher(config)
            # The EMA of the teacher's outputs (after_step writes it); saved with the model.
            self.center = ms.Parameter(ms.Tensor(np.zeros((1, m.head.num_prototypes), np.float32)),
                                       name="center", requires_grad=False)
            # Optimizer updates so far: the teacher momentum schedule's step, saved so a
            # resumed run goes on from where it was.
            self.num_updates = ms.Parameter(ms.Tensor(np.zeros(1, np.int64)), name="num_updates",
                                            requires_grad=False)
        elif m.objective == "segmentation":
            self.decoder = GlobalDecoder(config)
            # The decoder reads the layers' raw outputs (each lateral has its LayerNorm), so
            # the backbone's final LayerNorm gets no gradient: kept as loaded, not trained
            # (an unused trainable tensor breaks data-parallel training).
            for param in self.backbone.layer_norm.get_parameters():
                param.requires_grad = False
        self._init_weights()
        if m.objective == "mst":
            for student, teacher in self.momentum_pairs():
                teacher.set_data(ms.Tensor(student.asnumpy()))
                teacher.requires_grad = False
            if m.head.norm_last_layer:
                self.head.last_layer.weight_g.requires_grad = False

    def _init_weights(self):
        """DINO's: truncated normal (std initializer_range) for Linear and Conv2d weights,
        the CLS token and the positions; zero biases; LayerNorms one/zero; mask token zero;
        the head's weight-norm lengths one."""
        std = self.config.model.initializer_range

        def normal(param):
            param.set_data(initializer(TruncatedNormal(sigma=std, a=-2 * std, b=2 * std), param.shape,
                                       param.dtype))
        for _, cell in self.cells_and_names():
            if isinstance(cell, (nn.Dense, nn.Conv2d)):
                normal(cell.weight)
                if cell.bias is not None:
                    cell.bias.set_data(initializer("zeros", cell.bias.shape, cell.bias.dtype))
            elif isinstance(cell, WeightNormLinear):
                normal(cell.weight_v)
                cell.weight_g.set_data(initializer("ones", cell.weight_g.shape, cell.weight_g.dtype))
        embeddings = self.backbone.embeddings
        normal(embeddings.cls_token)
        normal(embeddings.position_embeddings)

    def momentum_pairs(self):
        """(student parameter, its teacher copy) for backbone and head."""
        return [*zip(self.backbone.get_parameters(), self.teacher.backbone.get_parameters()),
                *zip(self.head.get_parameters(), self.teacher.head.get_parameters())]

    def __call__(self, pixel_values):
        m = self.config.model
        shape = tuple(pixel_values.shape)
        if len(shape) != 4 or shape[1] != m.num_channels or shape[2] % m.patch_size or shape[3] % m.patch_size:
            raise ValueError(f"pixel_values must be [batch, {m.num_channels}, height, width] with sides "
                             f"divisible by patch_size {m.patch_size}, got {shape}")
        return super().__call__(pixel_values)

    def construct(self, pixel_values):
        """(last_hidden_state [batch, 1 + patches, hidden], pooled [batch, hidden]): the
        student backbone's features; pooled = the pooler's output, or the CLS token's state
        without a pooler."""
        hidden = self.backbone(pixel_values)[0]
        if self.backbone.pooler is not None:
            return hidden, self.backbone.pooler(hidden)
        return hidden, hidden[:, 0]

    def segment(self, pixel_values):
        """[batch, classes, height, width]: per-pixel class scores (objective segmentation)
        from every patch token of every layer through the decoder."""
        _, _, layers = self.backbone(pixel_values, None, False, True)
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
    targets = ops.stop_gradient(ops.softmax((teacher_logits.astype(ms.float32) - center) / teacher_temp, axis=-1))
    log_probs = ops.log_softmax(student_logits.astype(ms.float32) / student_temp, axis=-1)
    num_views = student_logits.shape[0] // batch
    total = 0.0
    pairs = 0
    for i in range(num_global):
        target = targets[i * batch:(i + 1) * batch]
        for v in range(num_views):
            if v != i:
                total = total + (-(target * log_probs[v * batch:(v + 1) * batch]).sum(axis=-1)).mean()
                pairs = pairs + 1
    return total / pairs


def loss_terms(model: MST, global_views, local_views, mask_noise) -> dict:
    """Every term of the MST loss (see training_loss), and the masks and attention used."""
    batch = global_views.shape[0]
    size = global_views.shape[2:]
    # Example-major [B, 2, ...] -> view-major [2B, ...] (DINO's chunks).
    views = global_views.transpose(1, 0, 2, 3, 4).reshape((2 * batch,) + size)
    noise = mask_noise.transpose(1, 0, 2).reshape(2 * batch, -1)
    # 1. the teacher on the unmasked global views: targets and the CLS attention
    t_hidden, t_attention, _ = model.teacher.backbone(views, None, True, False)
    teacher_logits = ops.stop_gradient(model.teacher.head(t_hidden[:, 0]))
    attention = ops.stop_gradient(patch_attention(t_attention))
    # 2. which patches the student loses
    mask = guided_mask(attention, noise, model.mask, model.mask_prob, model.mask_threshold,
                       model.mask_threshold_kind)
    # 3. the student on the masked global views (every layer kept for the decoder) ...
    # The mask goes in even when empty (masking none): the mask token then takes part
    # with a zero gradient, as data-parallel training wants of every trainable tensor.
    masked = mask if model.backbone.embeddings.mask_token is not None else None
    s_hidden, _, layers = model.backbone(views, masked, False, True)
    features = s_hidden[:, 0]
    # ... and on the unmasked local views
    if local_views is not None and local_views.shape[1] > 0:
        local = local_views.transpose(1, 0, 2, 3, 4).reshape((-1,) + local_views.shape[2:])
        features = ops.cat((features, model.backbone(local)[0][:, 0]), axis=0)
    student_logits = model.head(features)
    distillation = distillation_loss(teacher_logits, student_logits, model.center, model.teacher_temp,
                                     model.student_temp)
    # 4. restoring: the whole global views from the student's patch tokens
    pixels = model.decoder(layers, views.shape[2] // model.patch_size, views.shape[3] // model.patch_size)
    restoring = ops.abs(pixels.astype(ms.float32) - views.astype(ms.float32)).mean()
    new_center = (model.center * model.center_momentum
                  + teacher_logits.astype(ms.float32).mean(axis=0, keep_dims=True) * (1.0 - model.center_momentum))
    return {"distillation": distillation, "restoring": restoring, "new_center": new_center,
            "mask": mask, "attention": attention, "teacher_logits": teacher_logits,
            "student_logits": student_logits, "pixels": pixels}


def segmentation_loss(model: MST, pixel_values, labels):
    """(loss,): the mean over all pixels of the cross-entropy of the decoder's class scores
    against ``labels`` [B, H, W] (class ids), in float32."""
    logits = model.segment(pixel_values)
    scores = logits.astype(ms.float32).transpose(0, 2, 3, 1).reshape(-1, logits.shape[1])
    return (cross_entropy(scores, labels.reshape(-1)),)


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
    be 0, or None), mask_noise [B, 2, patches] uniform [0, 1). No input checks here (this
    runs inside a compiled graph): check_views, where batches are made."""
    terms = loss_terms(model, global_views, local_views, mask_noise)
    loss = terms["distillation"] + model.restore_weight * terms["restoring"]
    return loss, ops.stop_gradient(terms["new_center"])


class MomentumUpdate(nn.Cell):
    """teacher <- m * teacher + (1 - m) * student for every pair, compiled once; the
    momentum is an input (it changes every step), so the graph is not rebuilt. Kept
    outside the model's cells, so that the model's parameter names stay the canonical ones."""

    def __init__(self, pairs):
        super().__init__()
        self.student = ms.ParameterTuple([student for student, _ in pairs])
        self.teacher = ms.ParameterTuple([teacher for _, teacher in pairs])

    def construct(self, momentum):
        for student, teacher in zip(self.student, self.teacher):
            ops.assign(teacher, momentum * teacher + (1.0 - momentum) * student)
        return momentum


# One compiled update per model, created by its first use and dropped with it.
_MOMENTUM_UPDATES: "weakref.WeakKeyDictionary[MST, MomentumUpdate]" = weakref.WeakKeyDictionary()


def update_teacher(model: MST, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, backbone and head."""
    if model not in _MOMENTUM_UPDATES:
        _MOMENTUM_UPDATES[model] = ms.jit(MomentumUpdate(model.momentum_pairs()))
    _MOMENTUM_UPDATES[model](ms.Tensor(momentum, ms.float32))


def after_step(model: MST, new_centers=None) -> None:
    """After an optimizer update: the centre (the mean of the micro-batches' and ranks'
    new centres = the EMA with the global batch's mean, equal-sized micro-batches), the
    teacher's EMA with the momentum of this update's step (cosine over train.max_steps),
    then count the update. Nothing for the other objectives."""
    if model.objective != "mst":
        return
    d = model.config.model.distillation
    ops.assign(model.center, new_centers.astype(ms.float32).mean(axis=0, keep_dims=True))
    momentum = teacher_momentum(int(model.num_updates.asnumpy()[0]), model.config.train.max_steps,
                                d.teacher_momentum, d.teacher_momentum_end)
    update_teacher(model, momentum)
    ops.assign(model.num_updates, model.num_updates + 1)


def check_batch(model: MST, global_views, local_views=None, mask_noise=None) -> None:
    """check_views on tensors (callers outside the trainer)."""
    check_views(model.config, tuple(global_views.shape), None if local_views is None else tuple(local_views.shape),
                None if mask_noise is None else tuple(mask_noise.shape))

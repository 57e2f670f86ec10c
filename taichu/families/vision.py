"""The Zidong Taichu vision model (design.md §2.2): MST-style self-supervised ViT pretraining.

DINO-style self-distillation (a student and its exponential-moving-average teacher, each a
ViT + projection head, cross-entropy between the teacher's centred, sharpened distribution
and the student's over 2 global + N local crops) plus what makes it MST: the student's
global views lose patches chosen by the teacher's last-layer CLS attention (only
low-attention, background patches may be masked; they become a learned mask token), and a
global image decoder with a feature-pyramid structure restores the whole image from all
patch tokens (L1 loss).

``model.objective``:
- ``mst``: the pretraining model. Canonical names: the student's ``backbone.*``, ``head.*``
  (DINO head) and ``decoder.*`` (what the optimizer trains), the teacher's
  ``teacher.backbone.*`` and ``teacher.head.*`` (an EMA of the student, never trained),
  ``center`` [1, K] (the EMA of the teacher's outputs, kept in the checkpoint) and
  ``num_updates`` (optimizer updates so far: the teacher momentum schedule's step).
- ``backbone``: the ViT alone (``backbone.*``, with an optional pooler): what Hugging Face
  ``ViTModel`` is (taichu/convert/hf_vit.py) and what downstream tasks start from.
- ``segmentation``: the ViT and the global decoder (``backbone.*``, ``decoder.*``) with the
  decoder's output convolution predicting ``len(segmentation.classes)`` class scores per
  pixel instead of the pixels (per-pixel cross-entropy): MST's dense downstream task,
  fine-tuned from a pretrained model by ``taichu segment`` (the teacher's backbone and the
  student's decoder, ``init_arrays``) or trained from scratch.

The backbone is the architecture of Hugging Face ``ViTModel`` (patch Conv2d with bias, CLS
token, learned positions, pre-LN layers, final LayerNorm, optional pooler = tanh(dense(CLS)))
built from CLIP's encoder layers (torch_impl/clip.py), so converting is a renaming table.

Every random choice is drawn in numpy and fed to the model as an input, so both backends
see the same draws: the crops and the mask noise u come from the data pipeline
(taichu.vision_data.ViewBatches, from default_rng([seed, step, image index])). Also here,
shared by both backends: the bicubic position-embedding interpolation
matrix (``bicubic_matrix``), the decoder's lateral layer choice (``lateral_layers``) and the
teacher momentum schedule (``teacher_momentum``).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import numpy as np
from pydantic import Field, StrictBool, StrictInt, model_validator

from taichu.config import Section, TrainConfig, TransformerSize
from taichu.parallel import ParallelConfig
from taichu.families import Family, TensorSpec, layer_norm_specs, linear_specs
from taichu.families.clip import encoder_specs

ACTIVATIONS = ("gelu", "gelu_new", "quick_gelu", "relu")
# F.normalize's eps: the DINO head's bottleneck vector is divided by max(||x||, eps).
NORMALIZE_EPS = 1e-12


class DINOHeadConfig(Section):
    """The projection head (DINO §3): an MLP (GELU between its Linear layers) to an
    L2-normalised bottleneck, then a weight-normalised Linear (no bias) to K prototypes."""

    hidden_size: StrictInt = Field(2048, gt=0)
    bottleneck_size: StrictInt = Field(256, gt=0)
    num_prototypes: StrictInt = Field(65536, gt=0)     # K
    num_layers: StrictInt = Field(3, ge=1)             # Linear layers before the bottleneck norm
    # DINO's norm_last_layer: the weight norm's length g fixed to 1 (not trained), so only
    # the prototypes' directions learn; the teacher follows by EMA either way.
    norm_last_layer: StrictBool = True


class MaskingConfig(Section):
    """Which patches of the student's global views become the mask token.

    With noise u_i ~ U[0, 1) drawn in numpy (``mask_noise``) and Attn_i the teacher's
    last-layer CLS attention over the patches averaged over heads: ``guided`` masks patch i
    when u_i < mask_prob and Attn_i < tau; ``random`` when u_i < mask_prob; ``none`` never.
    tau is ``mask_threshold`` itself (kind ``value``) or the mask_threshold-quantile of the
    image's own patch attentions (kind ``quantile``, numpy's linear interpolation).
    Defaults are our choice: the lower half of the patches by attention may be masked, each
    with probability 0.5 (a quarter of the image on average).
    """

    mask: Literal["guided", "random", "none"] = "guided"
    mask_prob: float = Field(0.5, ge=0.0, le=1.0)
    mask_threshold: float = Field(0.5, ge=0.0)
    mask_threshold_kind: Literal["value", "quantile"] = "quantile"

    @model_validator(mode="after")
    def _quantile_range(self) -> "MaskingConfig":
        if self.mask_threshold_kind == "quantile" and self.mask_threshold > 1.0:
            raise ValueError(f"mask_threshold {self.mask_threshold} is a quantile here: it must "
                             "be in [0, 1]")
        return self


class DistillationConfig(Section):
    """DINO's self-distillation: temperatures, the centre's EMA, the teacher's momentum."""

    teacher_temp: float = Field(0.04, gt=0.0)
    student_temp: float = Field(0.1, gt=0.0)
    # center <- m * center + (1 - m) * mean of the teacher's outputs over the global batch.
    center_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    # Teacher EMA momentum, from start to end along a cosine over train.max_steps.
    teacher_momentum: float = Field(0.996, ge=0.0, le=1.0)
    teacher_momentum_end: float = Field(1.0, ge=0.0, le=1.0)


class DecoderConfig(Section):
    """The global image decoder (feature pyramid, see torch_impl/vision.py GlobalDecoder).

    ``channels[s]``: width of pyramid level s (level 0 = the patch grid, level s = 2^s times
    finer); one level per factor 2 of the patch size, so len(channels) = log2(patch_size).
    """

    channels: list[StrictInt] = Field(default_factory=lambda: [256, 128, 64, 32])
    # The restoring loss (L1 over the pixels of the student's masked global views, as the
    # model receives them, i.e. normalised by the data pipeline) enters with this weight.
    restore_weight: float = Field(1.0, ge=0.0)


class CropsConfig(Section):
    """Multi-crop (DINO §3): 2 global crops at model.image_size (the position grid) and
    num_local_crops local crops at local_crop_size (positions interpolated bicubically)."""

    num_local_crops: StrictInt = Field(8, ge=0)
    local_crop_size: StrictInt = Field(96, gt=0)


class SegmentationConfig(Section):
    """Objective ``segmentation``: the per-pixel classes, in the order of the labels' ids.
    The drawn scenes' (taichu.vision_data.SEGMENT_CLASSES) by default."""

    classes: list[str] = Field(default_factory=lambda: ["background", "圆形", "正方形", "三角形"], min_length=2)


class VisionDataConfig(Section):
    """Where the images come from (taichu.vision_data.load_images) and how they are cropped
    (taichu.vision_data.MultiCrop: the sizes and the number of views are the model's)."""

    # ``digits``, ``scenes``, a .jsonl of {"image": path, ...} lines, an image folder, or a
    # list of them; split by image into train and validation.
    source: str | list[str] = Field(default_factory=lambda: ["digits", "scenes"])
    validation_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    split_seed: StrictInt = 0
    scene_count: StrictInt = Field(2000, gt=0)
    scene_seed: StrictInt = 0
    # Area fractions of the image a global / local crop covers (DINO's defaults).
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.4)


class VisionModelConfig(TransformerSize):
    objective: Literal["mst", "backbone", "segmentation"] = "mst"
    # The ViT backbone (Hugging Face ViTModel's architecture).
    image_size: StrictInt = Field(gt=0)
    patch_size: StrictInt = Field(gt=0)
    num_channels: StrictInt = Field(3, gt=0)
    activation: Literal["gelu", "gelu_new", "quick_gelu", "relu"] = "gelu"
    # Explicit: MindSpore's nn.LayerNorm defaults to 1e-7 (DINO uses 1e-6, HF ViT 1e-12).
    layer_norm_eps: float = Field(1e-6, gt=0.0)
    qkv_bias: StrictBool = True
    attention_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # HF's pooler (tanh(dense(CLS))); backbone objective only: MST does not train one, and
    # an unused trainable layer breaks DistributedDataParallel.
    pooler: StrictBool = False
    # A learned vector that replaces masked patch embeddings (HF's use_mask_token).
    mask_token: StrictBool = True
    initializer_range: float = Field(0.02, gt=0.0)
    head: DINOHeadConfig = DINOHeadConfig()
    masking: MaskingConfig = MaskingConfig()
    distillation: DistillationConfig = DistillationConfig()
    decoder: DecoderConfig = DecoderConfig()
    crops: CropsConfig = CropsConfig()
    segmentation: SegmentationConfig = SegmentationConfig()

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def local_grid(self) -> int:
        return self.crops.local_crop_size // self.patch_size

    @property
    def num_stages(self) -> int:
        return int(round(math.log2(self.patch_size)))

    @model_validator(mode="after")
    def _consistent(self) -> "VisionModelConfig":
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.objective == "mst" and self.crops.local_crop_size % self.patch_size:
            raise ValueError(f"crops.local_crop_size {self.crops.local_crop_size} is not divisible "
                             f"by patch_size {self.patch_size}")
        if self.objective != "backbone":   # the models with the decoder
            if self.patch_size < 2 or self.patch_size & (self.patch_size - 1):
                raise ValueError(f"patch_size {self.patch_size}: the decoder doubles the resolution per "
                                 "pyramid level, so the patch size must be a power of 2 (>= 2)")
            if len(self.decoder.channels) != self.num_stages:
                raise ValueError(f"decoder.channels has {len(self.decoder.channels)} entries; patch_size "
                                 f"{self.patch_size} needs log2 = {self.num_stages} pyramid levels")
            if any(c <= 0 for c in self.decoder.channels):
                raise ValueError("decoder.channels entries must be positive")
            # An unused trainable layer breaks data-parallel training.
            if self.pooler:
                raise ValueError(f"pooler: objective {self.objective} trains no pooler (an unused trainable "
                                 "layer breaks data-parallel training); use it with objective backbone")
        if self.objective == "mst" and self.masking.mask != "none" and not self.mask_token:
            raise ValueError(f"masking.mask {self.masking.mask} needs mask_token: true")
        if self.objective == "segmentation" and self.mask_token:
            raise ValueError("mask_token: segmentation masks no patch (an unused trainable tensor breaks "
                             "data-parallel training); set model.mask_token: false")
        return self


class VisionConfig(Section):
    family: Literal["vision"]
    model: VisionModelConfig
    data: VisionDataConfig = VisionDataConfig()
    train: TrainConfig = TrainConfig()
    # Data parallel only (msrun / torchrun workers).
    parallel: ParallelConfig = ParallelConfig()


# ----------------------------------------------------------------------------- tensors

def backbone_specs(prefix: str, m: VisionModelConfig) -> dict[str, TensorSpec]:
    """The ViT's tensors under ``prefix`` (state_dict order of torch_impl.vision.ViT)."""
    hidden = m.hidden_size
    p = f"{prefix}.embeddings"
    specs = {f"{p}.cls_token": TensorSpec((1, 1, hidden), "parameter")}
    if m.mask_token:
        specs[f"{p}.mask_token"] = TensorSpec((1, 1, hidden), "parameter")
    specs[f"{p}.position_embeddings"] = TensorSpec((1, m.num_patches + 1, hidden), "parameter")
    specs[f"{p}.patch_embedding.weight"] = TensorSpec((hidden, m.num_channels, m.patch_size, m.patch_size),
                                                      "conv2d")
    specs[f"{p}.patch_embedding.bias"] = TensorSpec((hidden,), "conv2d")
    for name, spec in encoder_specs(f"{prefix}.encoder", m).items():
        if m.qkv_bias or not name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            specs[name] = spec
    specs.update(layer_norm_specs(f"{prefix}.layer_norm", hidden))
    if m.pooler:
        specs.update(linear_specs(f"{prefix}.pooler.dense", hidden, hidden))
    return specs


def head_specs(prefix: str, m: VisionModelConfig) -> dict[str, TensorSpec]:
    h = m.head
    specs: dict[str, TensorSpec] = {}
    for i in range(h.num_layers):
        n_in = m.hidden_size if i == 0 else h.hidden_size
        n_out = h.bottleneck_size if i == h.num_layers - 1 else h.hidden_size
        specs.update(linear_specs(f"{prefix}.layers.{i}", n_in, n_out))
    # Weight norm over the input axis (torch's weight_norm, dim=0): one length per prototype.
    specs[f"{prefix}.last_layer.weight_g"] = TensorSpec((h.num_prototypes, 1), "parameter")
    specs[f"{prefix}.last_layer.weight_v"] = TensorSpec((h.num_prototypes, h.bottleneck_size), "parameter")
    return specs


def decoder_specs(prefix: str, m: VisionModelConfig) -> dict[str, TensorSpec]:
    channels = m.decoder.channels
    stages = len(channels)
    specs: dict[str, TensorSpec] = {}
    for s in range(stages):
        specs.update(layer_norm_specs(f"{prefix}.laterals.{s}.norm", m.hidden_size))
        specs.update(linear_specs(f"{prefix}.laterals.{s}.proj", m.hidden_size, channels[s]))
    for s in range(stages):
        out = channels[s + 1] if s + 1 < stages else channels[-1]
        # A 2x2, stride-2 transposed convolution written as a Linear to 4 * out channels.
        specs.update(linear_specs(f"{prefix}.upsamples.{s}.proj", channels[s], 4 * out))
    for s in range(1, stages):
        specs[f"{prefix}.smooth.{s - 1}.weight"] = TensorSpec((channels[s], channels[s], 3, 3), "conv2d")
        specs[f"{prefix}.smooth.{s - 1}.bias"] = TensorSpec((channels[s],), "conv2d")
    outputs = decoder_outputs(m)
    specs[f"{prefix}.out.weight"] = TensorSpec((outputs, channels[-1], 3, 3), "conv2d")
    specs[f"{prefix}.out.bias"] = TensorSpec((outputs,), "conv2d")
    return specs


def decoder_outputs(m: VisionModelConfig) -> int:
    """Channels of the decoder's output: the pixels' (mst) or the class scores (segmentation)."""
    return len(m.segmentation.classes) if m.objective == "segmentation" else m.num_channels


def tensor_specs(config: VisionConfig) -> dict[str, TensorSpec]:
    m = config.model
    if m.objective == "backbone":
        return backbone_specs("backbone", m)
    if m.objective == "segmentation":
        return {**backbone_specs("backbone", m), **decoder_specs("decoder", m)}
    # State_dict order of torch_impl.vision.MST: its buffers first, then its modules.
    specs = {"center": TensorSpec((1, m.head.num_prototypes), "parameter"),
             "num_updates": TensorSpec((1,), "parameter")}   # int64
    specs.update(backbone_specs("backbone", m))
    specs.update(head_specs("head", m))
    specs.update(decoder_specs("decoder", m))
    specs.update(backbone_specs("teacher.backbone", m))
    specs.update(head_specs("teacher.head", m))
    return specs


def init_arrays(init: VisionConfig, run: VisionConfig, arrays: dict) -> tuple[dict, str]:
    """``taichu train --init`` from a pretraining (mst) model into a backbone or segmentation
    model: the teacher's backbone becomes the backbone (the encoder DINO and MST evaluate
    and fine-tune, and what the Hugging Face conversion writes), a segmentation model also
    takes the student's decoder; the student's backbone, both heads, the centre and the
    counter are not used."""
    if init.model.objective != "mst" or run.model.objective == "mst":
        return arrays, ""
    taken = {name[len("teacher."):]: array for name, array in arrays.items() if name.startswith("teacher.backbone.")}
    if run.model.objective == "segmentation":
        taken.update({name: array for name, array in arrays.items() if name.startswith("decoder.")})
    unused = sorted({name.split(".")[0] for name in arrays if name not in taken and not name.startswith("teacher.")}
                    - {"backbone"}) + ["the student's backbone", "teacher.head"]
    decoder = " and the student's decoder.*" if run.model.objective == "segmentation" else ""
    return taken, (f"the pretraining model's teacher.backbone.* as backbone.*{decoder}; not used: "
                   f"{', '.join(unused)}")


def fresh_on_init(init: VisionConfig, run: VisionConfig) -> tuple[str, ...]:
    """``taichu train --init`` from a model of another objective: what only the run has
    starts new (a pooler the pretraining model lacks, the class-score output of a
    segmentation decoder that was a pixel decoder), and the init's mask token is dropped
    where the run has none."""
    fresh = []
    if run.model.pooler and not init.model.pooler:
        fresh.append("backbone.pooler.")
    if init.model.mask_token and not run.model.mask_token:
        fresh.append("backbone.embeddings.mask_token")
    if run.model.objective == "segmentation" and init.model.objective != "segmentation":
        fresh.append("decoder.out.")
    return tuple(fresh)


def describe(config: VisionConfig) -> dict:
    m = config.model
    counts: dict[str, int] = {}
    for name, spec in tensor_specs(config).items():
        part = name.split(".")[0]
        counts[part] = counts.get(part, 0) + int(np.prod(spec.shape, dtype=np.int64))
    info = {
        "objective": m.objective,
        "backbone": (f"ViT {m.image_size}x{m.image_size}x{m.num_channels}, patch {m.patch_size} "
                     f"({m.num_patches} patches), {m.num_layers} layers, hidden {m.hidden_size}, "
                     f"{m.num_heads} heads, ffn {m.ffn_size}, {m.activation}"
                     f"{', pooler' if m.pooler else ''} ({counts['backbone']:,} parameters)"),
    }
    if m.objective == "mst":
        h, k = m.head, m.masking
        info["head"] = (f"DINO head {h.num_layers} layers, hidden {h.hidden_size}, bottleneck "
                        f"{h.bottleneck_size}, {h.num_prototypes} prototypes ({counts['head']:,} parameters)")
        info["decoder"] = (f"feature pyramid {m.decoder.channels}, restore weight "
                           f"{m.decoder.restore_weight} ({counts['decoder']:,} parameters)")
        info["teacher"] = f"EMA copy of backbone + head ({counts['teacher']:,} parameters)"
        info["masking"] = (f"{k.mask}, p {k.mask_prob}, tau {k.mask_threshold} ({k.mask_threshold_kind})"
                           if k.mask != "none" else "none")
        info["crops"] = (f"2 global {m.image_size}px + {m.crops.num_local_crops} local "
                         f"{m.crops.local_crop_size}px")
    if m.objective == "segmentation":
        info["decoder"] = (f"feature pyramid {m.decoder.channels} to {len(m.segmentation.classes)} classes "
                           f"({', '.join(m.segmentation.classes)}) per pixel ({counts['decoder']:,} parameters)")
    return info


FAMILY = Family(name="vision", module="vision", class_name="MST", config_class=VisionConfig,
                tensor_specs=tensor_specs, describe=describe, task="vision",
                fresh_on_init=fresh_on_init, init_arrays=init_arrays)


# ----------------------------------------------------------------------------- shared math

def teacher_momentum(step: int, total: int, start: float, end: float) -> float:
    """DINO's cosine schedule: start at step 0, end at step ``total`` (and after)."""
    progress = min(max(step, 0), total) / max(total, 1)
    return end - (end - start) * (math.cos(math.pi * progress) + 1.0) / 2.0


def _cubic_weights(t: float, a: float = -0.75) -> np.ndarray:
    """The 4 cubic-convolution weights (Keys, a = -0.75 as torch) at offset t in [0, 1)."""
    def near(x):   # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):    # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.array([far(t + 1), near(t), near(1 - t), far(2 - t)])


def _bicubic_1d(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in]: torch's bicubic resize along one axis (align_corners False,
    no antialias): source x = (i + 0.5) * in / out - 0.5, taps clamped to the border."""
    matrix = np.zeros((size_out, size_in), np.float64)
    scale = size_in / size_out
    for i in range(size_out):
        x = (i + 0.5) * scale - 0.5
        x0 = math.floor(x)
        for tap, weight in zip(range(x0 - 1, x0 + 3), _cubic_weights(x - x0)):
            matrix[i, min(max(tap, 0), size_in - 1)] += weight
    return matrix


@lru_cache(maxsize=32)
def bicubic_matrix(grid: int, rows: int, cols: int) -> np.ndarray:
    """float32 [rows * cols, grid * grid]: the learned positions of a grid x grid patch grid
    resized bicubically to rows x cols (row-major), as one matrix product. Equals Hugging
    Face's / DINO's F.interpolate(mode="bicubic", align_corners=False, size=(rows, cols)),
    and is the same matrix in both backends (and in an ONNX graph)."""
    out = np.kron(_bicubic_1d(grid, rows), _bicubic_1d(grid, cols)).astype(np.float32)
    out.setflags(write=False)
    return out


def lateral_layers(num_layers: int, num_stages: int) -> tuple[int, ...]:
    """The encoder layer whose output feeds each pyramid level's lateral connection:
    level 0 (the patch grid) the last layer, finer levels shallower layers, evenly spaced
    (12 layers, 4 levels: 11, 8, 5, 2)."""
    return tuple(num_layers - 1 - (s * num_layers) // num_stages for s in range(num_stages))


# ----------------------------------------------------------------------------- inputs

def check_views(config: VisionConfig, global_shape: tuple[int, ...], local_shape: tuple[int, ...] | None = None,
                noise_shape: tuple[int, ...] | None = None) -> None:
    """The shape checks of training_loss's inputs, example-major as the data pipeline makes
    them (taichu.vision_data.ViewBatches): global_views [B, 2, C, G, G], local_views
    [B, n_local, C, L, L], mask_noise [B, 2, num_patches]. Run outside a compiled graph."""
    m = config.model
    size, local = m.image_size, m.crops.local_crop_size
    if len(global_shape) != 5 or tuple(global_shape[1:]) != (2, m.num_channels, size, size) or not global_shape[0]:
        raise ValueError(f"global_views must be [batch, 2, {m.num_channels}, {size}, {size}], "
                         f"got {tuple(global_shape)}")
    batch = global_shape[0]
    if local_shape is not None and (len(local_shape) != 5 or local_shape[0] != batch
                                    or tuple(local_shape[2:]) != (m.num_channels, local, local)):
        raise ValueError(f"local_views must be [{batch}, n_local, {m.num_channels}, {local}, {local}], "
                         f"got {tuple(local_shape)}")
    if noise_shape is not None and tuple(noise_shape) != (batch, 2, m.num_patches):
        raise ValueError(f"mask_noise must be [{batch}, 2, {m.num_patches}], got {tuple(noise_shape)}")

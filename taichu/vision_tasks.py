"""What the vision family's commands compute: ``VisionRunner`` (features, CLS attention and
the mask it draws, from a model directory in either backend; the framework is imported when
a runner is made), and, framework-free, the picture of ``taichu attention``, mean
intersection over union, and the masking claim's score (how much of a mask lands on the
shapes of a drawn scene)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image


class VisionRunner:
    """A vision model directory run on images in ``backend`` (torch or mindspore, PyNative).

    Images (anything ``taichu.images.load_image`` reads: any size and mode) go through
    ``taichu.images.preprocess``: shorter side resized (bicubic) to the model's image_size,
    centre crop, CLIP mean/std, as the training views are normalised. The encoder is the
    teacher's backbone for an MST model (DINO evaluates the teacher) and the backbone for a
    ``backbone`` model; ``encoder="student"`` picks the student's of an MST model."""

    def __init__(self, model_dir, backend: str = "torch", batch_size: int = 64, encoder: str = "teacher"):
        from taichu.api import load_model

        if backend not in ("torch", "mindspore"):
            raise ValueError(f"backend {backend!r}: a vision model runs in torch or mindspore")
        self.model_dir, self.backend, self.batch_size = Path(model_dir), backend, batch_size
        self.model = load_model(self.model_dir, backend=backend)
        self.config = self.model.config
        if self.config.family != "vision":
            raise ValueError(f"{self.model_dir}: a {self.config.family} model, not a vision model")
        m = self.config.model
        if encoder not in ("teacher", "student"):
            raise ValueError(f"encoder {encoder!r}: teacher or student")
        use_teacher = encoder == "teacher" and m.objective == "mst"
        self.encoder_name = "teacher" if use_teacher else "backbone"
        self.backbone = self.model.teacher.backbone if use_teacher else self.model.backbone
        if backend == "mindspore":
            self.model.set_train(False)

    def _run(self, pixels: np.ndarray):
        """(hidden [n, 1 + patches, hidden], CLS attention [n, heads, 1 + patches]) as numpy."""
        if self.backend == "torch":
            import torch

            with torch.no_grad():
                hidden, attention, _ = self.backbone(torch.from_numpy(pixels), None, True)
            return hidden.numpy(), attention.numpy()
        import mindspore as ms

        hidden, attention, _ = self.backbone(ms.Tensor(pixels), None, True)
        return hidden.asnumpy(), attention.asnumpy()

    def run(self, images: Sequence) -> tuple[np.ndarray, np.ndarray]:
        """(CLS features [n, hidden] after the final LayerNorm, patch attention [n, patches]:
        the last layer's CLS attention over the patches averaged over heads, the masking's Attn)."""
        from taichu.images import preprocess

        size = self.config.model.image_size
        features, attention = [], []
        for start in range(0, len(images), self.batch_size):
            hidden, cls = self._run(preprocess(list(images[start:start + self.batch_size]), size))
            features.append(hidden[:, 0])
            attention.append(cls[:, :, 1:].mean(axis=1))
        return np.concatenate(features), np.concatenate(attention)

    def masks(self, attention: np.ndarray, seed: int = 0, mask: str | None = None,
              mask_prob: float | None = None) -> np.ndarray:
        """[n, patches] bool: the mask the model's masking rule draws from ``attention`` with
        noise from ``default_rng(seed)`` (``mask`` and ``mask_prob`` override the config's)."""
        k = self.config.model.masking
        noise = np.random.default_rng(seed).random(attention.shape, dtype=np.float32)
        rule = (mask or k.mask, k.mask_prob if mask_prob is None else mask_prob, k.mask_threshold,
                k.mask_threshold_kind)
        attention = np.ascontiguousarray(attention, np.float32)
        if self.backend == "torch":   # the backend's own guided_mask, as training draws it
            import torch

            from torch_impl.vision import guided_mask
            return guided_mask(torch.from_numpy(attention), torch.from_numpy(noise), *rule).numpy()
        import mindspore as ms

        from mindspore_impl.vision import guided_mask
        return guided_mask(ms.Tensor(attention), ms.Tensor(noise), *rule).asnumpy()


def _grid(values, name: str) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim == 1:
        side = int(round(np.sqrt(values.size)))
        if side * side != values.size:
            raise ValueError(f"{name}: {values.size} patches are not a square grid")
        values = values.reshape(side, side)
    if values.ndim != 2:
        raise ValueError(f"{name}: expected a [patches] or [rows, cols] array, got shape {values.shape}")
    return values


def attention_picture(image: Image.Image, attention, mask=None, size: int = 224) -> Image.Image:
    """Side by side: the image, its patch attention as a heat map over it (red = most
    attended; scaled to the image's own range), and, if ``mask`` is given, the image with the
    masked patches greyed out. ``attention`` and ``mask`` are per patch, ``[patches]`` (row-
    major) or ``[rows, cols]``."""
    base = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    pixels = np.asarray(base, np.float32)
    attention = _grid(attention, "attention").astype(np.float64)
    span = attention.max() - attention.min()
    scaled = (attention - attention.min()) / span if span > 0 else np.zeros_like(attention)
    heat = np.asarray(Image.fromarray(np.uint8(np.round(255 * scaled))).resize((size, size), Image.Resampling.NEAREST),
                      np.float32)[..., None] / 255.0
    red = np.array([255.0, 0.0, 0.0], np.float32)
    overlay = (1 - 0.6 * heat) * pixels + 0.6 * heat * red
    panels = [pixels, overlay]
    if mask is not None:
        mask = _grid(mask, "mask").astype(bool)
        if mask.shape != attention.shape:
            raise ValueError(f"mask grid {mask.shape} differs from the attention grid {attention.shape}")
        covered = np.asarray(Image.fromarray(np.uint8(mask) * 255).resize((size, size), Image.Resampling.NEAREST)) > 0
        greyed = pixels.copy()
        greyed[covered] = 0.25 * greyed[covered] + 0.75 * 128.0
        panels.append(greyed)
    gap = np.full((size, 4, 3), 255.0, np.float32)
    row = np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)
    return Image.fromarray(np.uint8(np.clip(np.round(row), 0, 255)))


def mean_iou(predicted, target, num_classes: int) -> dict:
    """Per-class intersection over union over all pixels of all images, and their mean over
    the classes present in the target or the prediction (a class absent from both does not
    count)."""
    predicted, target = np.asarray(predicted).astype(np.int64), np.asarray(target).astype(np.int64)
    if predicted.shape != target.shape:
        raise ValueError(f"prediction shape {predicted.shape} differs from the target's {target.shape}")
    if predicted.size and (predicted.min() < 0 or max(predicted.max(), target.max()) >= num_classes or target.min() < 0):
        raise ValueError(f"class ids must lie in 0..{num_classes - 1}")
    counts = np.bincount(num_classes * target.ravel() + predicted.ravel(), minlength=num_classes**2)
    confusion = counts.reshape(num_classes, num_classes)  # [target, predicted]
    intersection = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    iou = np.where(present, intersection / np.maximum(union, 1), np.nan)
    return {"per_class": iou.tolist(), "mean": float(np.nanmean(iou)) if present.any() else float("nan")}


def patch_coverage(class_map, patch_size: int) -> np.ndarray:
    """Per patch (row-major), the share of its pixels that belong to a shape (class > 0)."""
    class_map = np.asarray(class_map)
    rows, cols = class_map.shape[0] // patch_size, class_map.shape[1] // patch_size
    if rows * patch_size != class_map.shape[0] or cols * patch_size != class_map.shape[1]:
        raise ValueError(f"a {class_map.shape} map is not a whole number of {patch_size}-pixel patches")
    blocks = (class_map > 0).reshape(rows, patch_size, cols, patch_size)
    return blocks.mean(axis=(1, 3)).reshape(-1)


def masked_on_shapes(masks, class_maps, patch_size: int, threshold: float = 0.0) -> float:
    """Of all masked patches of these images, the share that lies on a shape (more than
    ``threshold`` of its pixels; by default any shape pixel): the attention-guided mask
    claims this is low (it masks background), a random mask gives the share of shape
    patches itself."""
    on_shape = masked = 0
    for mask, class_map in zip(masks, class_maps):
        mask = np.asarray(mask, bool).reshape(-1)
        covered = patch_coverage(class_map, patch_size) > threshold
        if covered.shape != mask.shape:
            raise ValueError(f"mask of {mask.size} patches for a map of {covered.size} patches")
        on_shape += int((mask & covered).sum())
        masked += int(mask.sum())
    return on_shape / masked if masked else float("nan")

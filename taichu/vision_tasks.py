"""What the vision family's commands compute: ``VisionRunner`` (features, CLS attention and
the mask it draws, from a model directory in either backend, or features from an export's
graph handed in by the caller; the framework is imported when a runner is made), and,
framework-free, the picture of ``taichu attention``, mean intersection over union, and the
masking claim's score (how much of a mask lands on the shapes of a drawn scene)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image


EXPORT_BACKENDS = ("onnx", "mindir")


class VisionRunner:
    """A vision model directory run on images in ``backend`` (torch or mindspore, PyNative),
    or an export directory (``taichu export MODEL --format onnx|mindir``) in its format.

    Images (anything ``taichu.images.load_image`` reads: any size and mode) go through
    ``taichu.images.preprocess``: shorter side resized (bicubic) to the model's image_size,
    centre crop, CLIP mean/std, as the training views are normalised. The encoder is the
    teacher's backbone for an MST model (DINO evaluates the teacher) and the backbone for a
    ``backbone`` model; ``encoder="student"`` picks the student's of an MST model.

    An export's graph comes as ``network`` (``network(pixel_values) -> {"last_hidden_state",
    ...}``, numpy): ``export.vision_network(DIR, backend)`` builds it, since taichu/
    does not import export/ (as taichu.recognition.SpeechRunner). The export holds the
    encoder's final hidden states only (the teacher's, for MST): ``run`` gives the same CLS
    features and no attention, and ``masks`` (which needs attention) is refused."""

    def __init__(self, model_dir, backend: str = "torch", batch_size: int = 64, encoder: str = "teacher",
                 network=None):
        from taichu.config import load_config

        if backend not in ("torch", "mindspore", *EXPORT_BACKENDS):
            raise ValueError(f"backend {backend!r}: a vision model runs in torch or mindspore, its export in "
                             f"onnx or mindir")
        if encoder not in ("teacher", "student"):
            raise ValueError(f"encoder {encoder!r}: teacher or student")
        self.model_dir, self.backend, self.batch_size = Path(model_dir), backend, batch_size
        self.network = self.model = self.backbone = None
        exported = (self.model_dir / "export_info.json").is_file()
        if backend in EXPORT_BACKENDS:
            if network is None:
                raise ValueError(f"backend {backend} runs an export directory's graph; build it with "
                                 f"export.vision_network(DIR, {backend!r}) (the taichu CLI does)")
            self.network, self.config = network, load_config(self.model_dir)
        elif exported:
            raise ValueError(f"{self.model_dir} is an export directory: use backend onnx or mindir (its format)")
        else:
            from taichu.api import load_model

            self.model = load_model(self.model_dir, backend=backend)
            self.config = self.model.config
        if self.config.family != "vision":
            raise ValueError(f"{self.model_dir}: a {self.config.family} model, not a vision model")
        m = self.config.model
        use_teacher = encoder == "teacher" and m.objective == "mst"
        self.encoder_name = "teacher" if use_teacher else "backbone"
        if self.network is not None:
            if encoder == "student" and m.objective == "mst":
                raise ValueError(f"{self.model_dir}: an export holds the teacher's backbone only; run the model "
                                 f"directory for the student's")
            return
        self.backbone = self.model.teacher.backbone if use_teacher else self.model.backbone
        if backend == "mindspore":
            self.model.set_train(False)

    def _run(self, pixels: np.ndarray):
        """(hidden [n, 1 + patches, hidden], CLS attention [n, heads, 1 + patches] or, from an
        export, None) as numpy."""
        if self.network is not None:
            return self.network(pixels)["last_hidden_state"], None
        if self.backend == "torch":
            import torch

            with torch.no_grad():
                hidden, attention, _ = self.backbone(torch.from_numpy(pixels), None, True)
            return hidden.numpy(), attention.numpy()
        import mindspore as ms

        hidden, attention, _ = self.backbone(ms.Tensor(pixels), None, True)
        return hidden.asnumpy(), attention.asnumpy()

    def run(self, images: Sequence) -> tuple[np.ndarray, np.ndarray | None]:
        """(CLS features [n, hidden] after the final LayerNorm, patch attention [n, patches]:
        the last layer's CLS attention over the patches averaged over heads, the masking's Attn;
        None from an export, whose graph returns no attention)."""
        from taichu.images import preprocess

        size = self.config.model.image_size
        features, attention = [], []
        for start in range(0, len(images), self.batch_size):
            hidden, cls = self._run(preprocess(list(images[start:start + self.batch_size]), size))
            features.append(hidden[:, 0])
            if cls is not None:
                attention.append(cls[:, :, 1:].mean(axis=1))
        return np.concatenate(features), np.concatenate(attention) if attention else None

    def masks(self, attention: np.ndarray, seed: int = 0, mask: str | None = None,
              mask_prob: float | None = None) -> np.ndarray:
        """[n, patches] bool: the mask the model's masking rule draws from ``attention`` with
        noise from ``default_rng(seed)`` (``mask`` and ``mask_prob`` override the config's)."""
        if self.network is not None:
            raise ValueError(f"backend {self.backend}: an export's graph gives features, not the CLS attention "
                             f"masks are drawn from; run the model directory in torch or mindspore")
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


# ----------------------------------------------------------------------------- segmentation

# ``taichu segment``'s recipe, laid over the pretrained model's config (its model sizes stay;
# any key may be changed with --set). Scenes with another seed than the pretraining's (0),
# so that neither split was seen in pretraining. Learning rate: at 5e-4 vision-small found
# the shapes but called every one a circle after 1,000 steps (mIoU 35 %, pretrained or not);
# at 2e-3 it tells them apart (88-96 %, docs/benchmarks.md). 1,000 steps: ~1 min in torch on
# 2 cores.
SEGMENT_RECIPE = {
    "data": {"source": "scenes", "scene_count": 1000, "scene_seed": 1, "validation_fraction": 0.2,
             "split_seed": 0},
    "train": {"batch_size": 16, "max_steps": 1000, "learning_rate": 2.0e-3, "min_learning_rate": 1.0e-5,
              "weight_decay": 0.05, "beta2": 0.999, "max_grad_norm": 3.0,
              "eval_interval": 100, "eval_batches": 4, "log_interval": 10, "checkpoint_interval": 500},
}
# The classes' colours in segmentation_picture: background grey, then one per shape.
SEGMENT_PALETTE = np.array([[200, 200, 200], [230, 60, 60], [60, 170, 60], [60, 90, 230], [230, 180, 40],
                            [150, 60, 200]], np.uint8)


def segmentation_config(base, overrides: Sequence[str] = (), source: str = "taichu segment"):
    """The segmentation config of a pretrained vision model's ``base`` config: its model
    (sizes, decoder channels) with objective segmentation, no mask token and no pooler
    (nothing would train them); SEGMENT_RECIPE's data and train sections; its parallel
    section; then ``overrides`` (``key=value``, as --set). train.warmup_steps is a tenth of
    train.max_steps unless set."""
    from taichu.config import apply_overrides, config_to_dict, validate_config

    raw = config_to_dict(base)
    if raw.get("family") != "vision":
        raise ValueError(f"{source}: a {raw.get('family')} model, not a vision model")
    raw["model"].update(objective="segmentation", mask_token=False, pooler=False)
    raw["data"] = dict(SEGMENT_RECIPE["data"])
    raw["train"] = dict(SEGMENT_RECIPE["train"])
    applied = apply_overrides(raw, overrides)
    steps = raw["train"].get("max_steps")
    if "train.warmup_steps" not in applied and isinstance(steps, int) and steps > 0:
        raw["train"]["warmup_steps"] = max(1, steps // 10)
    return validate_config(raw, source, applied)


def predict_segmentation(model, backend: str, pixel_values: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """uint8 [n, H, W]: the class of highest score per pixel of a segmentation ``model``
    (either backend, already in evaluation mode) on normalised ``pixel_values``."""
    predictions = []
    for start in range(0, len(pixel_values), batch_size):
        chunk = np.ascontiguousarray(pixel_values[start:start + batch_size])
        if backend == "torch":
            import torch

            with torch.no_grad():
                scores = model.segment(torch.from_numpy(chunk)).numpy()
        else:
            import mindspore as ms

            scores = model.segment(ms.Tensor(chunk)).asnumpy()
        predictions.append(scores.argmax(axis=1).astype(np.uint8))
    return np.concatenate(predictions)


def evaluate_segmentation(model_dir, backend: str = "torch", batch_size: int = 32, count: int | None = None) -> dict:
    """A segmentation model on its config's held-out scenes (the first ``count``, default
    all): per-class IoU and their mean (``mean_iou``), pixel accuracy, and the same for the
    trivial answer "background everywhere" beside them; ``examples`` holds the first 8
    scenes' (pixels uint8 [S, S, 3], truth, prediction) for segmentation_picture."""
    from taichu.api import load_model
    from taichu.vision_data import SegmentBatches, load_images

    model = load_model(model_dir, backend=backend)
    config = model.config
    m, data = config.model, config.data
    if config.family != "vision" or m.objective != "segmentation":
        raise ValueError(f"{model_dir}: not a segmentation model (family {config.family}, objective "
                         f"{getattr(m, 'objective', None)}); fine-tune one with `taichu segment PRETRAINED --out DIR`")
    images = load_images(data.source, data.validation_fraction, data.split_seed, scene_count=data.scene_count,
                         scene_seed=data.scene_seed)
    scenes = SegmentBatches(images.test, m.image_size)
    indices = np.arange(len(scenes) if count is None else min(count, len(scenes)))
    batch = scenes.batch(indices)
    predicted = predict_segmentation(model, backend, batch["pixel_values"], batch_size)
    labels = batch["labels"]
    classes = list(m.segmentation.classes)
    result = {"model": str(model_dir), "backend": backend, "scenes": len(indices), "classes": classes,
              "iou": mean_iou(predicted, labels, len(classes)),
              "pixel_accuracy": float((predicted == labels).mean()),
              "background_everywhere": {"iou": mean_iou(np.zeros_like(labels), labels, len(classes)),
                                        "pixel_accuracy": float((labels == 0).mean())}}
    result["examples"] = [(scenes.item(i)[0], labels[k], predicted[k]) for k, i in enumerate(indices[:8])]
    return result


def segmentation_picture(examples, scale: int = 3) -> Image.Image:
    """One row per example: the scene, its true classes and the predicted classes
    (SEGMENT_PALETTE colours), each ``scale`` times enlarged (nearest)."""
    rows = []
    for pixels, truth, predicted in examples:
        panels = [np.asarray(pixels, np.uint8), SEGMENT_PALETTE[np.asarray(truth) % len(SEGMENT_PALETTE)],
                  SEGMENT_PALETTE[np.asarray(predicted) % len(SEGMENT_PALETTE)]]
        gap = np.full((panels[0].shape[0], 2, 3), 255, np.uint8)
        rows.append(np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1))
        rows.append(np.full((2, rows[-1].shape[1], 3), 255, np.uint8))
    picture = Image.fromarray(np.concatenate(rows[:-1], axis=0))
    return picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)

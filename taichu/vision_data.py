"""Images for the vision family's self-supervised pretraining (design.md §2.2): the image
sources the project already has, and DINO's multi-crop views drawn from (seed, step, image).

Sources (``load_images``): ``digits`` and ``scenes`` (taichu.imagetext's generated sets; the
scenes keep their ``Scene``, so ``scene_class_map`` gives their exact per-pixel shape
classes for evaluation), a ``.jsonl`` of ``{"image": path, ...}`` lines (the image-text
reader; ``text`` may be any string), or a folder of image files. A folder is searched
recursively in sorted order; a file that does not decode as an image is skipped with a
warning naming it (a folder of pictures often holds a stray ``.txt`` or ``.DS_Store``), and a
folder with no image at all is refused. Every image is converted to RGB (grey-scale,
palette and 16-bit images included: ``taichu.images.load_image``) and may have any size.

Views (``MultiCrop``, ``ViewBatches``): per image, 2 global crops covering ``global_scale``
of its area resized to ``global_size`` and ``num_local`` local crops covering ``local_scale``
resized to ``local_size`` (random-resized crops as torchvision's ``RandomResizedCrop``:
area fraction uniform in the scale range, log aspect ratio uniform in [3/4, 4/3], 10 tries
then the largest centred crop), each flipped horizontally with probability 1/2, bicubic
resampling, normalised like the image towers (CLIP mean/std). Colour augmentation is left
out on purpose: in the drawn scenes colour is what the captions and classes are about.
The draws of an image come from ``numpy.random.default_rng([seed, step, index])``: the
same crops whichever images share its batch, in both backends and after a resume.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from taichu.images import CLIP_MEAN, CLIP_STD, _normalise, load_image
from taichu.imagetext import (SHAPES, ImageTextSet, Pair, _source_pairs, draw_scene, load_image_text,
                              scene_class_map)

SEGMENT_CLASSES = ("background", *SHAPES)   # scene_class_map's values, in order
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# ----------------------------------------------------------------------------- sources

def image_folder(path: str | Path) -> list[Pair]:
    """Every decodable image under ``path`` (recursively, sorted), keyed by its path
    relative to ``path``; other files are skipped with one warning that names them."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    pairs, skipped = [], []
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            load_image(file)
        except ValueError:
            skipped.append(file.relative_to(root).as_posix())
            continue
        pairs.append(Pair(image=file, text="", key=file.relative_to(root).as_posix()))
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        warnings.warn(f"{root}: skipped {len(skipped)} file(s) that are not images: {shown}", stacklevel=2)
    if not pairs:
        raise ValueError(f"{root}: no image files (looked for any file that decodes as an image, "
                         f"e.g. {', '.join(IMAGE_SUFFIXES[:4])})")
    return pairs


def load_images(source: str | Path | Sequence[str | Path], test_fraction: float = 0.2, seed: int = 0,
                image_size: int | None = None, scene_count: int = 2000, scene_seed: int = 0) -> ImageTextSet:
    """``digits``, ``scenes``, a ``.jsonl`` path, an image folder, or a list of them, split
    into train and test by image (``taichu.imagetext.load_image_text``)."""
    return load_image_text(source, test_fraction, seed, image_size, scene_count, scene_seed,
                           read_source=_read_source)


def _read_source(source, image_size, scene_count, scene_seed) -> tuple[list[Pair], str]:
    if Path(str(source)).expanduser().is_dir():
        return image_folder(source), Path(str(source)).name
    return _source_pairs(source, image_size, scene_count, scene_seed)


def segmentation_target(pair: Pair, image_size: int) -> np.ndarray:
    """uint8 ``[image_size, image_size]`` shape classes (``SEGMENT_CLASSES``) of a drawn
    scene at ``image_size``: drawn again at that size, so exact (no resized labels)."""
    if pair.scene is None:
        raise ValueError(f"{pair.key}: per-pixel classes exist for drawn scenes only")
    return scene_class_map(pair.scene, image_size)


# ----------------------------------------------------------------------------- views

def random_resized_box(width: int, height: int, scale: tuple[float, float], rng: np.random.Generator,
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height) as torchvision's ``RandomResizedCrop`` draws
    it: 10 tries of an area fraction uniform in ``scale`` and a log-uniform aspect ratio,
    then the centred crop of the largest allowed ratio."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


@dataclass(frozen=True)
class MultiCrop:
    """DINO's multi-crop: 2 global views and ``num_local`` local views of one image."""

    global_size: int
    local_size: int
    num_local: int
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self):
        for name in ("global_scale", "local_scale"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high <= 1.0:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {(low, high)}")
        if self.num_local < 0 or self.global_size <= 0 or self.local_size <= 0:
            raise ValueError("global_size and local_size must be positive and num_local >= 0")

    def view(self, image: Image.Image, size: int, scale, rng: np.random.Generator) -> np.ndarray:
        left, top, w, h = random_resized_box(*image.size, scale, rng)
        crop = image.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)
        pixels = np.asarray(crop, dtype=np.uint8)
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        return _normalise(pixels, np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32))

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> tuple[list, list]:
        """(2 global views, ``num_local`` local views), each float32 ``[3, size, size]``."""
        image = image.convert("RGB")
        globals_ = [self.view(image, self.global_size, self.global_scale, rng) for _ in range(2)]
        locals_ = [self.view(image, self.local_size, self.local_scale, rng) for _ in range(self.num_local)]
        return globals_, locals_


class ViewBatches:
    """Batches of multi-crop views of ``pairs``, batch first. ``batch(indices, step)`` draws
    image i's views, then the masking noise of its two global views (uniform [0, 1) per
    patch, ``num_patches`` of them; the model masks where it is below p, and for the guided
    mask the teacher's attention is low), from ``default_rng([seed, step, i])``;
    ``step=None``: evaluation, the same draws every time."""

    stochastic = True   # batch(indices, step): the draws depend on the step
    EVAL_STEP = 2**31 - 1   # the draw stream of evaluation batches, never a training step

    def __init__(self, pairs: Sequence[Pair], crop: MultiCrop, num_patches: int = 0, seed: int = 0):
        self.pairs, self.crop, self.num_patches, self.seed = list(pairs), crop, int(num_patches), int(seed)

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, indices, step: int | None = None) -> dict[str, np.ndarray]:
        """``global_views`` float32 [B, 2, 3, G, G], ``local_views`` [B, num_local, 3, L, L],
        ``mask_noise`` float32 [B, 2, num_patches]."""
        step = self.EVAL_STEP if step is None else int(step)
        c = self.crop
        global_views = np.empty((len(indices), 2, 3, c.global_size, c.global_size), np.float32)
        local_views = np.empty((len(indices), c.num_local, 3, c.local_size, c.local_size), np.float32)
        mask_noise = np.empty((len(indices), 2, self.num_patches), np.float32)
        for row, i in enumerate(indices):
            rng = np.random.default_rng([self.seed, step, int(i)])
            globals_, locals_ = c(self.pairs[int(i)].load(), rng)
            global_views[row] = globals_
            if c.num_local:
                local_views[row] = locals_
            mask_noise[row] = rng.random((2, self.num_patches), dtype=np.float32)
        return {"global_views": global_views, "local_views": local_views, "mask_noise": mask_noise}


class SegmentBatches:
    """Batches of drawn scenes and their exact per-pixel classes (objective segmentation):
    ``pixel_values`` float32 [B, 3, S, S] (the scene drawn at the model's image_size S,
    normalised like the image towers) and ``labels`` int64 [B, S, S] (``SEGMENT_CLASSES``
    ids, drawn at the same size: exact, no resized labels). A training batch
    (``batch(indices, step)``) flips each scene and its labels horizontally with
    probability 1/2 from ``default_rng([seed, step, index])``; evaluation (step None) does
    not flip. Refuses pairs that are not drawn scenes (no per-pixel classes)."""

    stochastic = True

    def __init__(self, pairs: Sequence[Pair], image_size: int, seed: int = 0,
                 mean: tuple = CLIP_MEAN, std: tuple = CLIP_STD):
        pairs = list(pairs)
        others = [p.key for p in pairs if p.scene is None]
        if others:
            raise ValueError(f"segmentation needs drawn scenes (data.source: scenes): {len(others)} image(s) "
                             f"have no per-pixel classes, e.g. {others[0]}")
        self.pairs, self.image_size, self.seed = pairs, int(image_size), int(seed)
        self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def __len__(self) -> int:
        return len(self.pairs)

    def item(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 [S, S, 3] pixels, uint8 [S, S] classes) of one scene, unflipped."""
        scene = self.pairs[int(index)].scene
        image = draw_scene(scene, self.image_size).convert("RGB")
        return np.asarray(image, np.uint8), scene_class_map(scene, self.image_size)

    def batch(self, indices, step: int | None = None) -> dict[str, np.ndarray]:
        size = self.image_size
        pixel_values = np.empty((len(indices), 3, size, size), np.float32)
        labels = np.empty((len(indices), size, size), np.int64)
        for row, i in enumerate(indices):
            pixels, classes = self.item(i)
            if step is not None and np.random.default_rng([self.seed, int(step), int(i)]).random() < 0.5:
                pixels, classes = pixels[:, ::-1], classes[:, ::-1]
            pixel_values[row] = _normalise(pixels, self.mean, self.std)
            labels[row] = classes
        return {"pixel_values": pixel_values, "labels": labels}

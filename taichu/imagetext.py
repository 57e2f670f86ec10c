"""Image-text pairs for contrastive models (CLIP, BriVL), offline and deterministic.

Three sources, one ``Pair`` type, one split:

- ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits (16 grey levels), drawn
  black on white and upscaled, each with a Chinese caption from ``DIGIT_TEMPLATES``
  ("手写的数字七", "一张数字7的图片", ...) and its label, for zero-shot evaluation
  with ``digit_prompts``.
- ``scenes``: simple pictures drawn with pillow (1-3 circles / squares / triangles in
  plain colours at named positions, or counted) whose Chinese caption says exactly
  what is drawn ("白色背景上有两个红色的圆形", "左边一个蓝色的正方形，右边一个黄色的三角形");
  the structured ``Scene`` is kept so retrieval tests can count what differs.
- a user's ``.jsonl`` of ``{"image": path, "text": ...}`` lines (``read_jsonl``).

``split_pairs`` puts every pair on the train or test side by a hash of its image key, so
all captions of one image land on the same side and the split never depends on order
or on the machine. ``caption_ids`` turns captions into fixed-length token ids.
"""
from __future__ import annotations

import hashlib
import random
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

from taichu.corpus import _unit_hash
from taichu.images import load_image

DIGITS = "digits"
SCENES = "scenes"
SOURCES = (DIGITS, SCENES)  # or a path to a .jsonl file

# ---------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class SceneObject:
    shape: str               # one of SHAPES
    colour: str              # one of COLOURS
    position: str | None     # one of POSITIONS; None where the caption only counts


@dataclass(frozen=True)
class Scene:
    """What a generated picture shows. Equality compares ``layout`` and ``objects``."""

    layout: str                          # "count" | "single" | "pair" | "row"
    objects: tuple[SceneObject, ...]     # in the order the caption names them
    # Which wording of the caption (see scene_caption); not part of what is drawn.
    phrasing: int = field(default=0, compare=False)
    # (centre x, centre y, half size) of each object as fractions of the image side.
    geometry: tuple[tuple[float, float, float], ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class Pair:
    """One image and one caption.

    ``image`` is an RGB PIL image (digits, scenes) or a file path (jsonl), decoded with
    ``taichu.images.load_image`` by ``load()``. ``key`` names the image: ``split_pairs``
    decides the side by it, so two captions of one image are never split apart.
    """

    image: Union[Image.Image, Path]
    text: str
    key: str
    label: int | None = None    # digits: 0..9; jsonl: the optional "label"
    scene: Scene | None = None  # scenes: what is drawn

    def load(self) -> Image.Image:
        return load_image(self.image)


@dataclass(frozen=True)
class ImageTextSet:
    train: list[Pair]
    test: list[Pair]
    name: str
    fingerprint: str  # sha256 of the pairs (keys, texts, labels, images) and the split


# ---------------------------------------------------------------------------- digits

CHINESE_DIGITS = "零一二三四五六七八九"
# {cn}: the Chinese numeral, {ar}: the Arabic digit. Each image gets one template,
# chosen by a hash of its index (so the template says nothing about the label).
DIGIT_TEMPLATES = (
    "手写的数字{cn}",
    "一张数字{ar}的图片",
    "黑白手写数字：{cn}",
    "这是数字{cn}",
    "一个手写的{ar}",
    "白底黑字的数字{ar}",
)
# The zero-shot classification prompt: one caption per label, the model picks the closest.
DIGIT_PROMPT = "手写的数字{cn}"
DIGITS_IMAGE_SIZE = 32
# load_digits' pixels are ink amounts 0..16 (16 levels + 0).
_DIGIT_LEVELS = 16


def digit_caption(label: int, template: str = DIGIT_PROMPT) -> str:
    if not 0 <= int(label) <= 9:
        raise ValueError(f"digit label must be 0..9, got {label}")
    return template.format(cn=CHINESE_DIGITS[label], ar=str(label))


def digit_prompts(template: str = DIGIT_PROMPT) -> list[str]:
    """Ten captions, index = label, for zero-shot classification ("手写的数字零", ...)."""
    return [digit_caption(label, template) for label in range(10)]


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "the 'digits' image-text data is read from scikit-learn, which is not installed: "
            "pip install scikit-learn (or install taichu with the 'data' extra)") from None
    digits = load_digits()  # bundled with scikit-learn: no download
    return digits.images, digits.target


def digit_image(pixels: np.ndarray, image_size: int = DIGITS_IMAGE_SIZE) -> Image.Image:
    """One load_digits 8x8 array (0..16 ink) as black ink on white, upscaled, RGB.

    Grey value = ``round(255 * (16 - ink) / 16)``; upscaling is nearest-neighbour, so
    the 16 grey levels stay exact (each 8x8 cell becomes a block).
    """
    ink = np.asarray(pixels, dtype=np.float64)
    grey = np.rint(255.0 * (_DIGIT_LEVELS - ink) / _DIGIT_LEVELS).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(grey, mode="L")
    if image_size != grey.shape[0]:
        image = image.resize((image_size, image_size), resample=Image.Resampling.NEAREST)
    return image.convert("RGB")


def digits_pairs(image_size: int = DIGITS_IMAGE_SIZE) -> list[Pair]:
    """All 1,797 scikit-learn digits as pairs: key ``digits:<index>``, ``label`` the digit."""
    _check_size(image_size, 8)
    images, labels = _load_digits()
    pairs = []
    for index, (pixels, label) in enumerate(zip(images, labels)):
        label = int(label)
        template = DIGIT_TEMPLATES[int(_unit_hash("digit-template", index) * len(DIGIT_TEMPLATES))]
        pairs.append(Pair(image=digit_image(pixels, image_size), text=digit_caption(label, template),
                          key=f"{DIGITS}:{index}", label=label))
    return pairs


def digit_texts() -> list[str]:
    """Every digit caption any template can produce (60), for training a tokenizer."""
    return [digit_caption(label, template) for template in DIGIT_TEMPLATES for label in range(10)]


# ---------------------------------------------------------------------------- scenes

SHAPES = ("圆形", "正方形", "三角形")
# Plain, far-apart colours; drawing is not antialiased, so every pixel of a shape is
# exactly its colour and every other pixel is exactly white.
COLOURS = {
    "红色": (220, 30, 30),
    "绿色": (30, 160, 50),
    "蓝色": (30, 70, 220),
    "黄色": (240, 200, 0),
    "紫色": (140, 50, 170),
    "橙色": (250, 130, 0),
    "黑色": (0, 0, 0),
}
WHITE = (255, 255, 255)
POSITIONS = ("左边", "右边", "上面", "下面", "中间")
NUMBERS = {1: "一", 2: "两", 3: "三"}
SCENES_IMAGE_SIZE = 64
MIN_SCENE_SIZE = 32
# Object centres (fractions of the side) for each named position.
_CENTRES = {"左边": (0.25, 0.5), "右边": (0.75, 0.5), "上面": (0.5, 0.25), "下面": (0.5, 0.75),
            "中间": (0.5, 0.5)}
_ROW = ("左边", "中间", "右边")
_ROW_X = (1 / 6, 1 / 2, 5 / 6)
# Layouts and their shares of the generated scenes.
_LAYOUTS = (("count", 0.3), ("single", 0.2), ("pair", 0.3), ("row", 0.2))
_COUNT_PHRASES = ("白色背景上有{n}个{c}的{s}", "图中有{n}个{c}的{s}", "{n}个{c}的{s}")
_SINGLE_PHRASES = ("{p}有一个{c}的{s}", "白色背景的{p}有一个{c}的{s}")


def scene_caption(scene: Scene) -> str:
    """The caption of ``scene`` in its ``phrasing``: a pure function of the scene."""
    objects = scene.objects
    if scene.layout == "count":
        first = objects[0]
        phrase = _COUNT_PHRASES[scene.phrasing % len(_COUNT_PHRASES)]
        return phrase.format(n=NUMBERS[len(objects)], c=first.colour, s=first.shape)
    if scene.layout == "single":
        (only,) = objects
        phrase = _SINGLE_PHRASES[scene.phrasing % len(_SINGLE_PHRASES)]
        return phrase.format(p=only.position, c=only.colour, s=only.shape)
    if scene.layout in ("pair", "row"):
        return "，".join(f"{o.position}一个{o.colour}的{o.shape}" for o in objects)
    raise ValueError(f"unknown scene layout {scene.layout!r}")


def scene_difference(a: Scene, b: Scene) -> int:
    """How many objects (shape, colour, position) one scene has that the other lacks."""
    ca = Counter((o.shape, o.colour, o.position) for o in a.objects)
    cb = Counter((o.shape, o.colour, o.position) for o in b.objects)
    return sum(((ca - cb) + (cb - ca)).values())


def make_scene(seed: int, index: int) -> Scene:
    """Scene ``index`` of the stream for ``seed``: the same on every machine and Python.

    Uses ``random.Random`` seeded by a string (sha512-based, stable across Python
    versions), one generator per scene, so the first n scenes of a seed never depend
    on how many are asked for.
    """
    rng = random.Random(f"taichu-scene:{seed}:{index}")
    layout = rng.choices([name for name, _ in _LAYOUTS], weights=[w for _, w in _LAYOUTS])[0]
    colours = list(COLOURS)

    def distinct_objects(n: int) -> list[tuple[str, str]]:
        combos = [(s, c) for s in SHAPES for c in colours]
        return rng.sample(combos, n)

    if layout == "count":
        n = rng.randint(1, 3)
        shape, colour = rng.choice(SHAPES), rng.choice(colours)
        objects = tuple(SceneObject(shape, colour, None) for _ in range(n))
        cells = rng.sample(range(9), n)
        geometry = []
        for cell in sorted(cells):
            r = rng.uniform(0.09, 0.12)
            slack = 1 / 6 - r - 0.015  # the shape stays inside its third of the image, gaps >= 0.03
            cx = (cell % 3 + 0.5) / 3 + rng.uniform(-slack, slack)
            cy = (cell // 3 + 0.5) / 3 + rng.uniform(-slack, slack)
            geometry.append((cx, cy, r))
        phrasing = rng.randrange(len(_COUNT_PHRASES))
    elif layout in ("single", "pair"):
        if layout == "single":
            positions = [rng.choice(POSITIONS)]
        else:
            positions = list(rng.choice([("左边", "右边"), ("上面", "下面")]))
            rng.shuffle(positions)  # the caption may name either side first
        chosen = distinct_objects(len(positions))
        objects = tuple(SceneObject(s, c, p) for (s, c), p in zip(chosen, positions))
        geometry = []
        for p in positions:
            r, (x, y) = rng.uniform(0.12, 0.18), _CENTRES[p]
            # |jitter| + r <= 0.22 < 0.25: an object named "左边" lies in the left half.
            geometry.append((x + rng.uniform(-0.04, 0.04), y + rng.uniform(-0.04, 0.04), r))
        phrasing = rng.randrange(len(_SINGLE_PHRASES)) if layout == "single" else 0
    else:  # row: left, middle, right, three different objects
        objects = tuple(SceneObject(s, c, p) for (s, c), p in zip(distinct_objects(3), _ROW))
        geometry = []
        for x in _ROW_X:
            r = rng.uniform(0.09, 0.13)
            # |jitter| + r <= 0.15 < 1/6: each object stays in its third.
            geometry.append((x + rng.uniform(-0.02, 0.02), 0.5 + rng.uniform(-0.1, 0.1), r))
        phrasing = 0
    return Scene(layout=layout, objects=objects, phrasing=phrasing, geometry=tuple(geometry))


def draw_scene(scene: Scene, image_size: int = SCENES_IMAGE_SIZE) -> Image.Image:
    """The scene on a white RGB square, without antialiasing (exact colours).

    A shape of centre (x, y) and half size r (fractions) is drawn in pixels with
    ``cx, cy, h = round(x * S), round(y * S), max(2, round(r * S))``: a circle of radius
    h, a square of half side ``round(0.85 * h)``, an upward triangle with apex
    ``(cx, cy - h)`` and base corners ``(cx -/+ h, cy + round(0.75 * h))``.
    """
    _check_size(image_size, MIN_SCENE_SIZE)
    image = Image.new("RGB", (image_size, image_size), WHITE)
    _draw_shapes(image, scene, [COLOURS[obj.colour] for obj in scene.objects])
    return image


def scene_class_map(scene: Scene, image_size: int = SCENES_IMAGE_SIZE) -> np.ndarray:
    """uint8 ``[image_size, image_size]``: the shape drawn at each pixel of ``draw_scene``'s
    image, 0 for the background and ``1 + SHAPES.index(shape)`` for a shape: the same
    drawing calls without antialiasing, so it is exact, pixel for pixel."""
    _check_size(image_size, MIN_SCENE_SIZE)
    image = Image.new("L", (image_size, image_size), 0)
    _draw_shapes(image, scene, [1 + SHAPES.index(obj.shape) for obj in scene.objects])
    return np.asarray(image, dtype=np.uint8)


def _draw_shapes(image: Image.Image, scene: Scene, fills) -> None:
    image_size = image.size[0]
    draw = ImageDraw.Draw(image)
    for obj, (x, y, r), fill in zip(scene.objects, scene.geometry, fills):
        cx, cy, h = round(x * image_size), round(y * image_size), max(2, round(r * image_size))
        if obj.shape == "圆形":
            draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif obj.shape == "正方形":
            half = round(0.85 * h)
            draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
        elif obj.shape == "三角形":
            base = cy + round(0.75 * h)
            draw.polygon([(cx, cy - h), (cx - h, base), (cx + h, base)], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}")


def scene_pairs(count: int, seed: int = 0, image_size: int = SCENES_IMAGE_SIZE) -> list[Pair]:
    """``count`` generated scenes (key ``scenes:<seed>:<index>``) with exact captions."""
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        raise ValueError(f"scene count must be a positive integer, got {count!r}")
    _check_size(image_size, MIN_SCENE_SIZE)
    pairs = []
    for index in range(count):
        scene = make_scene(seed, index)
        pairs.append(Pair(image=draw_scene(scene, image_size), text=scene_caption(scene),
                          key=f"{SCENES}:{seed}:{index}", scene=scene))
    return pairs


def scene_texts(count: int, seed: int = 0) -> list[str]:
    """The captions of ``scene_pairs(count, seed)`` without drawing anything."""
    return [scene_caption(make_scene(seed, index)) for index in range(count)]


def _check_size(image_size, minimum: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < minimum:
        raise ValueError(f"image_size must be an integer >= {minimum}, got {image_size!r}")


# ---------------------------------------------------------------------------- jsonl


def read_jsonl(path: str | Path, verify: bool = False) -> list[Pair]:
    """Pairs from a ``.jsonl`` file, one ``{"image": path, "text": caption}`` per line.

    Image paths are relative to the folder of the ``.jsonl`` file (absolute paths and
    ``~`` work too) and must exist; ``text`` must be a non-empty string; an optional
    integer ``label`` is kept; other keys are ignored; blank lines are skipped. The
    pair's key is the ``image`` string as written, so the split does not depend on
    where the data set lies. Images are decoded later (``Pair.load``) unless
    ``verify`` is true, which decodes each one now.

    Every problem raises ValueError (FileNotFoundError for a missing file) naming the
    file and the line: bad JSON, not an object, a missing or non-string key, an empty
    caption, an image file that is missing or (with ``verify``) not an image.
    """
    from taichu.fileio import jsonl_objects

    path = Path(path).expanduser()
    pairs = []
    for where, record in jsonl_objects(path, "image-text file", "with 'image' and 'text' keys"):
        for key in ("image", "text"):
            if key not in record:
                raise ValueError(f"{where}: missing key '{key}' (each line needs 'image' and 'text')")
            if not isinstance(record[key], str):
                raise ValueError(f"{where}: '{key}' must be a string, got {type(record[key]).__name__}")
        text, image_name = record["text"], record["image"]
        if not text.strip():
            raise ValueError(f"{where}: empty text for image {image_name!r}")
        if not image_name.strip():
            raise ValueError(f"{where}: empty image path")
        label = record.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
            raise ValueError(f"{where}: 'label' must be an integer, got {label!r}")
        image_path = Path(image_name).expanduser()
        if not image_path.is_absolute():
            image_path = path.parent / image_path
        if not image_path.is_file():
            raise ValueError(f"{where}: image file {image_path} not found")
        if verify:
            try:
                load_image(image_path)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
        pairs.append(Pair(image=image_path, text=text, key=Path(image_name).as_posix(), label=label))
    if not pairs:
        raise ValueError(f"{path}: no image-text pairs")
    return pairs


# ---------------------------------------------------------------------------- split


def split_pairs(pairs: Sequence[Pair], test_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Deterministic (train, test) split by image key, order kept.

    A pair goes to test when ``sha256("image-split:<seed>:<key>")`` read as a number in
    [0, 1) is below ``test_fraction``; pairs sharing a key share a side. With two or
    more keys neither side is empty: the lowest-scoring key is moved to test, or the
    highest to train, if needed.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    scores = {key: _unit_hash("image-split", seed, key) for key in dict.fromkeys(p.key for p in pairs)}
    in_test = {key: score < test_fraction for key, score in scores.items()}
    if len(scores) >= 2:
        if not any(in_test.values()):
            in_test[min(scores, key=scores.get)] = True
        if all(in_test.values()):
            in_test[max(scores, key=scores.get)] = False
    train = [p for p in pairs if not in_test[p.key]]
    test = [p for p in pairs if in_test[p.key]]
    return train, test


def _hash_image(h, image) -> None:
    if isinstance(image, Image.Image):
        data = image.tobytes()
        h.update(f"pil:{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    else:  # a file: its path, size and modification time, not its bytes (data sets are big)
        stat = Path(image).stat()
        data = f"file:{Path(image).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def pairs_fingerprint(pairs: Sequence[Pair], test_fraction: float, seed: int) -> str:
    """sha256 of every pair's key, text, label and image, and of the split parameters.

    In-memory images are hashed by their pixels; image files by resolved path, size and
    modification time (so a replaced file changes it, a moved data set too).
    """
    h = hashlib.sha256(f"taichu-imagetext-v1:{test_fraction!r}:{seed}".encode())
    for pair in pairs:
        for part in (pair.key, pair.text, repr(pair.label)):
            data = part.encode("utf-8")
            h.update(struct.pack("<Q", len(data)))  # length prefix: ["ab", "c"] != ["a", "bc"]
            h.update(data)
        _hash_image(h, pair.image)
    return h.hexdigest()


def _source_pairs(source: str | Path, image_size: int | None, scene_count: int,
                  scene_seed: int) -> tuple[list[Pair], str]:
    source_text = str(source)
    if source_text == DIGITS:
        return digits_pairs(image_size or DIGITS_IMAGE_SIZE), DIGITS
    if source_text == SCENES:
        return (scene_pairs(scene_count, scene_seed, image_size or SCENES_IMAGE_SIZE),
                f"{SCENES}-{scene_seed}-{scene_count}")
    if source_text.endswith(".jsonl"):
        return read_jsonl(source), Path(source).name
    raise ValueError(f"image-text source {source_text!r}: expected '{DIGITS}', '{SCENES}' or a "
                     "path to a .jsonl file of {\"image\": path, \"text\": caption} lines")


def load_image_text(source: str | Path | Sequence[str | Path], test_fraction: float = 0.2,
                    seed: int = 0, image_size: int | None = None, scene_count: int = 2000,
                    scene_seed: int = 0, read_source=None) -> ImageTextSet:
    """``digits``, ``scenes``, a ``.jsonl`` path, or a list of them, split into train and test.

    ``seed`` and ``test_fraction`` drive the split (``split_pairs``, after concatenating
    the sources in order); ``scene_seed`` and ``scene_count`` what scenes are drawn;
    ``image_size`` is the stored image size for digits (default 32) and scenes (default
    64); jsonl images are kept as files and ``image_size`` does not apply
    (``taichu.images.preprocess`` sizes every image for the model). ``read_source``
    replaces how one source becomes (pairs, name) (the vision family also reads folders).
    """
    sources = [source] if isinstance(source, (str, Path)) else list(source)
    if not sources:
        raise ValueError("no image source given")
    pairs, names = [], []
    for item in sources:
        more, name = (read_source or _source_pairs)(item, image_size, scene_count, scene_seed)
        pairs += more
        names.append(name)
    train, test = split_pairs(pairs, test_fraction, seed)
    return ImageTextSet(train=train, test=test, name="+".join(names),
                        fingerprint=pairs_fingerprint(pairs, test_fraction, seed))


# ---------------------------------------------------------------------------- text


def caption_texts(*sources: Iterable[Union[Pair, str]]) -> Iterator[str]:
    """Caption strings for training a tokenizer: the text of every pair (or string).

    E.g. ``train_tokenizer(caption_texts(train_pairs, digit_texts()), ...)``; empty
    captions are skipped.
    """
    for source in sources:
        for item in source:
            text = item.text if isinstance(item, Pair) else item
            if not isinstance(text, str):
                raise TypeError(f"captions must be str or Pair, got {type(item).__name__}")
            if text.strip():
                yield text


def caption_ids(tokenizer, texts: Sequence[str], context_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, both ``int64 [len(texts), context_length]``.

    Each row is ``[bos] + encode(text) + [eos]`` right-padded with ``tokenizer.pad_id``
    (mask 1 on real tokens, 0 on padding), so the eos of row i sits at
    ``mask[i].sum() - 1``. A caption longer than ``context_length - 2`` tokens is
    truncated: ``[bos] + encode(text)[:context_length - 2] + [eos]``: the row still starts
    with bos and ends with eos, the end of the text is dropped. An empty or whitespace-only
    caption raises ValueError naming its position (there is nothing to match an image
    against); ``context_length`` must be at least 3.
    """
    if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)) \
            or context_length < 3:
        raise ValueError(f"context_length must be an integer >= 3 (bos, a token, eos), "
                         f"got {context_length!r}")
    if isinstance(texts, str):
        raise TypeError("caption_ids takes a sequence of captions, not one str")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"caption {i} is {type(text).__name__}, not str")
        if not text.strip():
            raise ValueError(f"caption {i} is empty: every image needs a caption with some text")
    for name in ("pad_id", "bos_id", "eos_id"):
        if getattr(tokenizer, name) < 0:
            raise ValueError(f"{tokenizer!r} has no {name[:-3]} token, which captions need")
    context_length = int(context_length)
    ids = np.full((len(texts), context_length), tokenizer.pad_id, dtype=np.int64)
    mask = np.zeros((len(texts), context_length), dtype=np.int64)
    for row, tokens in enumerate(tokenizer.encode_batch(texts)):
        tokens = [tokenizer.bos_id] + tokens[:context_length - 2] + [tokenizer.eos_id]
        ids[row, :len(tokens)] = tokens
        mask[row, :len(tokens)] = 1
    return ids, mask


# ---------------------------------------------------------------------------- training


def load_data_config(data_config) -> ImageTextSet:
    """The pairs named by a config's ``data:`` section (ImageTextDataConfig), split the way
    ``taichu train`` and ``taichu eval`` both split them."""
    return load_image_text(data_config.source, test_fraction=data_config.validation_fraction,
                           seed=data_config.split_seed, scene_count=data_config.scene_count,
                           scene_seed=data_config.scene_seed)


class PairBatches:
    """Training batches of image-caption pairs, by index: the inputs of an image-text
    family's ``training_loss`` (pixel_values, input_ids, attention_mask), in that order.

    Captions are tokenized once up front; images are preprocessed on first use and kept
    while the kept pixels fit in ``cache_bytes`` (digits and scenes at demo sizes fit;
    a large jsonl set is decoded again each epoch instead of filling memory).
    """

    def __init__(self, pairs: Sequence[Pair], tokenizer, image_size: int, context_length: int,
                 cache_bytes: int = 1 << 30):
        if not pairs:
            raise ValueError("no image-text pairs in this split")
        from taichu.images import preprocess

        self._preprocess = preprocess
        self.pairs = list(pairs)
        self.image_size = image_size
        self.input_ids, self.attention_mask = caption_ids(
            tokenizer, [pair.text for pair in self.pairs], context_length)
        per_image = 3 * image_size * image_size * 4
        self._cache: dict[int, np.ndarray] | None = (
            {} if per_image * len(self.pairs) <= cache_bytes else None)

    def __len__(self) -> int:
        return len(self.pairs)

    def _pixels(self, index: int) -> np.ndarray:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        pixels = self._preprocess(self.pairs[index].load(), self.image_size)[0]
        if self._cache is not None:
            self._cache[index] = pixels
        return pixels

    def batch(self, indices) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64)
        return {"pixel_values": np.stack([self._pixels(int(i)) for i in indices]),
                "input_ids": self.input_ids[indices], "attention_mask": self.attention_mask[indices]}

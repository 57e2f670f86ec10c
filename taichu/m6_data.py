"""Data of the ``m6`` family (taichu/families/m6.py): one pool of examples per task, a
deterministic mix of them, and the batches ``training_loss`` reads.

numpy + pillow; no framework is imported here (the image tokenizer of ``text_to_image`` runs
in one, through taichu.dalle_data, only when its codes are not cached yet).

Tasks (``data.tasks``: task -> weight; a task of weight 0 is not built at all):

- ``caption``: an image (drawn scenes, scikit-learn digits or a jsonl of {"image", "text"},
  ``data.source``, split by image as the image-text families split it), prompt "", target
  the caption.
- ``image_text``: the same images; prompt the caption's first part, target the rest, cut at
  a point of the caption's middle third picked by a hash of the image key (``cut_point``).
- ``vqa``: questions about each drawn scene from ``QUESTION_TEMPLATES`` (several wordings of
  each kind of question; every answer follows from ``Scene.layout`` and its objects, a
  question whose answer would not is never asked: ``scene_questions``), plus the user's
  jsonl ``data.examples`` of {"image", "prompt", "target"} split by image.
  ``data.held_out_templates`` never reach the training set; held-out scenes are asked with
  every template (``M6Data.test_questions``, ``M6Data.questions("seen" | "held_out")``).
- ``text_continuation`` / ``text_denoising``: sentences of ``data.corpus`` (split by
  document as taichu.corpus splits it; a held-out sentence that also occurs on the training
  side is dropped) of ``data.min_text_chars`` characters or more and short enough for
  ``model.text_length`` at a character a token (``text_chars_limit``). Continuation: prompt
  the first part (cut as above), target the rest; denoising: prompt the sentence with one
  span of 2-4 characters replaced by ``GAP``, target the whole sentence.
- ``text_to_image``: prompt the caption, no text target, the image's codes by the image
  tokenizer ``data.image_tokenizer`` (taichu.dalle_data.load_caption_codes: encoded once,
  cached; the pairs split as here).

The training set is ``data.examples_per_epoch`` examples: for each a task drawn with
probability proportional to its weight, then the task's next example in a seeded
permutation of its pool (a fresh permutation once the pool is used up), all from
``data.split_seed``. The validation set is drawn the same way from the held-out pools
(held-out images with every template, held-out sentences): ``validation_count`` examples.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from taichu.families.m6 import CODE, IMAGE, IMAGE_TASKS, PAD, PREFIX, TARGET, TASKS

# Replaces the span a text_denoising prompt leaves out (absent from People's Daily).
GAP = "□"
GAP_SPAN = (2, 4)           # characters left out: 2, 3 or 4
# A sentence ends at one of these, with any closing quotes or brackets after it.
_SENTENCE = re.compile(r"[^。！？]*[。！？][”’」』）》]*")
FORMAT = "taichu-m6-data-v1"


@dataclass(frozen=True, eq=False)  # eq=False: codes are an array
class Example:
    """One example of one task. ``image``: a PIL image or an image file path (loaded by
    taichu.images.load_image), None for the text tasks and text_to_image. ``key``: which
    image (the image-text split's key) or sentence (``corpus:<document>:<sentence>``) it
    is about: the split goes by it. ``template``: a QUESTION_TEMPLATES id (generated
    questions only). ``codes``: int [image_grid, image_grid] (text_to_image only)."""

    task: str
    prompt: str
    target: str
    image: object | None
    key: str
    scene: object | None = None          # taichu.imagetext.Scene of a drawn scene
    template: str | None = None
    codes: np.ndarray | None = None


# ---------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class QuestionTemplate:
    id: str          # <kind>_<n>
    kind: str        # what is asked (QUESTION_KINDS): the answer follows from the kind
    wording: str     # {p} position, {c} colour, {s} shape


# kind -> wordings; template id = f"{kind}_{i + 1}". Slots: {p} a position that holds an
# object, {c} a colour, {s} a shape.
QUESTION_KINDS = {
    # "{c}的{s}" of the object at {p} (layouts with named positions only)
    "object_of_position": ("{p}是什么颜色的形状？", "{p}画的是什么？"),
    "colour_of_position": ("{p}是什么颜色？", "{p}的形状是什么颜色的？"),
    "shape_of_position": ("{p}是什么形状？", "{p}画的是哪种形状？"),
    # how many objects of shape {s} ({s} drawn at least once): "两个"
    "count": ("图中有几个{s}？", "一共画了多少个{s}？"),
    "count_all": ("图中一共有几个形状？", "画面上有多少个形状？"),
    # the colour when every object has the same one
    "colour_of_all": ("图中的形状是什么颜色？", "这些形状都是什么颜色的？"),
    # the shape of the {c} objects, when they all have one shape
    "shape_of_colour": ("{c}的是什么形状？", "图中{c}的形状是哪一种？"),
    # the colour of the {s} objects, when they all have one colour
    "colour_of_shape": ("{s}是什么颜色的？", "图中的{s}是什么颜色？"),
    # where the {c}{s} is (layouts with named positions only)
    "position_of_object": ("{c}的{s}在哪里？", "{c}的{s}在什么位置？"),
}
QUESTION_TEMPLATES = {f"{kind}_{i + 1}": QuestionTemplate(f"{kind}_{i + 1}", kind, wording)
                      for kind, wordings in QUESTION_KINDS.items() for i, wording in enumerate(wordings)}


def _count_words(n: int) -> str:
    from taichu.imagetext import NUMBERS

    return f"{NUMBERS[n]}个"


def _kind_slots(scene, kind: str) -> list[tuple[dict, str]]:
    """[(slot values, answer)] of one kind of question about ``scene``: only those whose
    answer the scene determines (nothing about positions in a count layout, no colour of a
    shape drawn in two colours, ...)."""
    objects = scene.objects
    placed = [o for o in objects if o.position is not None]
    if kind in ("object_of_position", "colour_of_position", "shape_of_position"):
        at = {}
        for o in placed:
            at.setdefault(o.position, []).append(o)
        answer = {"object_of_position": lambda o: f"{o.colour}的{o.shape}",
                  "colour_of_position": lambda o: o.colour, "shape_of_position": lambda o: o.shape}[kind]
        return [({"p": p}, answer(os[0])) for p, os in at.items() if len(os) == 1]
    if kind == "count":
        shapes = list(dict.fromkeys(o.shape for o in objects))
        return [({"s": s}, _count_words(sum(o.shape == s for o in objects))) for s in shapes]
    if kind == "count_all":
        return [({}, _count_words(len(objects)))] if objects else []
    if kind == "colour_of_all":
        colours = {o.colour for o in objects}
        return [({}, colours.pop())] if len(colours) == 1 else []
    if kind == "shape_of_colour":
        out = []
        for c in dict.fromkeys(o.colour for o in objects):
            shapes = {o.shape for o in objects if o.colour == c}
            if len(shapes) == 1:
                out.append(({"c": c}, shapes.pop()))
        return out
    if kind == "colour_of_shape":
        out = []
        for s in dict.fromkeys(o.shape for o in objects):
            colours = {o.colour for o in objects if o.shape == s}
            if len(colours) == 1:
                out.append(({"s": s}, colours.pop()))
        return out
    if kind == "position_of_object":
        out = []
        for o in placed:
            same = [x for x in objects if (x.colour, x.shape) == (o.colour, o.shape)]
            if len(same) == 1:
                out.append(({"c": o.colour, "s": o.shape}, o.position))
        return out
    raise ValueError(f"unknown question kind {kind!r}")


def scene_questions(scene, templates: Sequence[str] | None = None) -> list[tuple[str, str, str]]:
    """[(template id, question, answer)] about ``scene`` (a taichu.imagetext.Scene), for
    every template (or those named) and every slot value whose answer the scene determines,
    in QUESTION_TEMPLATES order."""
    ids = list(QUESTION_TEMPLATES) if templates is None else list(templates)
    out, slots = [], {}
    for template_id in ids:
        template = QUESTION_TEMPLATES[template_id]
        if template.kind not in slots:
            slots[template.kind] = _kind_slots(scene, template.kind)
        for values, answer in slots[template.kind]:
            out.append((template_id, template.wording.format(**values), answer))
    return out


def check_templates(held_out: Sequence[str]) -> None:
    unknown = [t for t in held_out if t not in QUESTION_TEMPLATES]
    if unknown:
        raise ValueError(f"data.held_out_templates: unknown template(s) {unknown} (known: "
                         f"{', '.join(QUESTION_TEMPLATES)})")


# ---------------------------------------------------------------------------- cutting


def _unit(*parts) -> float:
    from taichu.corpus import _unit_hash

    return _unit_hash("m6", *parts)


def cut_point(text: str, key: str) -> int:
    """Where a prompt ends and its target starts: a point of the text's middle third
    (``ceil(n / 3)`` .. ``floor(2 n / 3)`` characters, at least 1 and at most n - 1), picked
    by a hash of ``key``; a text of n >= 2 characters."""
    n = len(text)
    low = max(1, -(-n // 3))
    high = max(low, min(n - 1, (2 * n) // 3))
    return low + int(_unit("cut", key) * (high - low + 1))


def gap_prompt(sentence: str, key: str, text_length: int | None = None) -> str:
    """The sentence with one span of 2-4 characters replaced by GAP: its length and place
    picked by a hash of ``key``; with ``text_length`` the span is long enough for
    ``[bos] + prompt + sentence + [eos]`` to fit at a character a token, if 4 can."""
    n = len(sentence)
    low = GAP_SPAN[0] if text_length is None else min(GAP_SPAN[1], max(GAP_SPAN[0], 2 * n + 3 - text_length))
    span = min(n - 1, low + int(_unit("gap-span", key) * (GAP_SPAN[1] - low + 1)))
    start = int(_unit("gap-start", key) * (n - span + 1))
    return sentence[:start] + GAP + sentence[start + span:]


def text_chars_limit(task: str, text_length: int) -> int:
    """The longest sentence a text task takes, at a character a token: continuation
    ``[bos] + sentence + [eos]``; denoising ``[bos] + sentence less a span of up to 4,
    plus GAP, + sentence + [eos]``."""
    if task == "text_continuation":
        return text_length - 2
    return (text_length - 3 + GAP_SPAN[1]) // 2


def sentences(document: str) -> list[str]:
    """The sentences of a document: up to and including 。！？ and any closing quote after;
    whitespace stripped, a tail without an end mark dropped."""
    return [s.strip() for s in _SENTENCE.findall(document) if s.strip()]


# ---------------------------------------------------------------------------- the data


@dataclass
class M6Data:
    """The examples ``config.data`` describes. ``pools`` / ``held_out_pools``: task ->
    training / held-out examples (tasks of weight 0 absent); ``train`` / ``validation``:
    the mixes drawn from them; ``test_questions``: held-out scenes x every template (the
    held-out user examples are in held_out_pools["vqa"], template None)."""

    train: list[Example]
    validation: list[Example]
    pools: dict[str, list[Example]]
    held_out_pools: dict[str, list[Example]]
    test_questions: list[Example]
    held_out_templates: tuple[str, ...]
    name: str
    fingerprint: str     # of the training texts (training_texts(): what the tokenizer learns)
    counts: dict = field(default_factory=dict)

    def questions(self, templates: str) -> list[Example]:
        """Held-out scenes asked with the templates training saw (``"seen"``) or with the
        held-out ones (``"held_out"``)."""
        if templates not in ("seen", "held_out"):
            raise ValueError(f"templates must be 'seen' or 'held_out', got {templates!r}")
        held = set(self.held_out_templates)
        return [e for e in self.test_questions if (e.template in held) == (templates == "held_out")]

    def training_texts(self) -> list[str]:
        """Every distinct prompt and target of the training pools (what the tokenizer may
        learn; never a held-out one)."""
        texts = dict.fromkeys(t for pool in self.pools.values() for e in pool for t in (e.prompt, e.target))
        return [t for t in texts if t.strip()]

    def describe(self) -> str:
        parts = [f"{task} {self.counts['train'].get(task, 0)}/{len(self.pools[task])}" for task in self.pools]
        return (f"m6 data {self.name}: {len(self.train)} training examples ({', '.join(parts)}: drawn / pool), "
                f"{len(self.validation)} validation, {len(self.test_questions)} test questions")


def read_examples(path) -> list[Example]:
    """The user's vqa examples: a ``.jsonl`` of {"image": path, "prompt": question,
    "target": answer} (image paths relative to the file; the key is the image as written,
    so all questions about one image share a side of the split). Every problem raises
    ValueError naming the file and line."""
    from taichu.fileio import jsonl_objects

    path = Path(path).expanduser()
    out = []
    for where, record in jsonl_objects(path, "data.examples file", "with 'image', 'prompt' and 'target' keys"):
        for key in ("image", "prompt", "target"):
            if key not in record:
                raise ValueError(f"{where}: missing key '{key}' (each line needs 'image', 'prompt' and 'target')")
            if not isinstance(record[key], str) or not record[key].strip():
                raise ValueError(f"{where}: '{key}' must be a non-empty string, got {record[key]!r}")
        image = Path(record["image"]).expanduser()
        if not image.is_absolute():
            image = path.parent / image
        if not image.is_file():
            raise ValueError(f"{where}: image file {image} not found")
        out.append(Example("vqa", record["prompt"], record["target"], image, Path(record["image"]).as_posix()))
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def _image_examples(pairs, tasks: dict, held_out: set, train_side: bool) -> dict[str, list[Example]]:
    pools = {task: [] for task in ("caption", "image_text", "vqa") if tasks.get(task, 0) > 0}
    for pair in pairs:
        if "caption" in pools:
            pools["caption"].append(Example("caption", "", pair.text, pair.image, pair.key, pair.scene))
        if "image_text" in pools and len(pair.text) >= 2:
            cut = cut_point(pair.text, pair.key)
            pools["image_text"].append(Example("image_text", pair.text[:cut], pair.text[cut:], pair.image,
                                               pair.key, pair.scene))
        if "vqa" in pools and pair.scene is not None:
            for template, question, answer in scene_questions(pair.scene):
                if train_side and template in held_out:
                    continue
                pools["vqa"].append(Example("vqa", question, answer, pair.image, pair.key, pair.scene, template))
    return pools


def _text_examples(task: str, units: list[tuple[str, str]], data, text_length: int, salt: str) -> list[Example]:
    """Up to data.text_examples (key, sentence) units that fit the task, in a seeded order."""
    limit = text_chars_limit(task, text_length)
    fitting = [(k, s) for k, s in units if data.min_text_chars <= len(s) <= limit]
    order = np.random.default_rng([data.split_seed, _salt(task), _salt(salt)]).permutation(len(fitting))
    out = []
    for i in order[:data.text_examples]:
        key, sentence = fitting[int(i)]
        if task == "text_continuation":
            cut = cut_point(sentence, key)
            out.append(Example(task, sentence[:cut], sentence[cut:], None, key))
        else:
            out.append(Example(task, gap_prompt(sentence, key, text_length), sentence, None, key))
    return out


def _salt(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")


def _sentence_units(corpus) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(key, sentence) of the corpus's training and held-out documents; a held-out sentence
    that also occurs on the training side is dropped (boilerplate repeats)."""
    train = [(f"corpus:t{d}:{i}", s) for d, doc in enumerate(corpus.train) for i, s in enumerate(sentences(doc))]
    seen = {s for _, s in train}
    held = [(f"corpus:v{d}:{i}", s) for d, doc in enumerate(corpus.validation)
            for i, s in enumerate(sentences(doc)) if s not in seen]
    return train, held


def mix(pools: dict[str, list[Example]], weights: dict[str, float], count: int, seed: int,
        salt: str) -> list[Example]:
    """``count`` examples: each a task drawn with probability proportional to its weight
    (among the tasks with a non-empty pool), then that task's next example in a seeded
    permutation of its pool (a fresh permutation each pass)."""
    names = [t for t in TASKS if weights.get(t, 0) > 0 and pools.get(t)]
    if not names:
        raise ValueError(f"no {salt} examples: every task with a weight has an empty pool")
    p = np.array([weights[t] for t in names], np.float64)
    choice = np.random.default_rng([seed, _salt(salt)]).choice(len(names), size=count, p=p / p.sum())
    out, used, order = [], dict.fromkeys(names, 0), {}
    for c in choice:
        task = names[int(c)]
        pool, k = pools[task], used[task]
        passes, offset = divmod(k, len(pool))
        if offset == 0:
            order[task] = np.random.default_rng([seed, _salt(salt), _salt(task), passes]).permutation(len(pool))
        out.append(pool[int(order[task][offset])])
        used[task] = k + 1
    return out


def validation_count(config) -> int:
    """Examples in the validation mix: validation_fraction of examples_per_epoch, at least
    one batch."""
    data = config.data
    return max(config.train.batch_size, round(data.examples_per_epoch * data.validation_fraction))


def load_m6(config, rank: int = 0, corpus=None) -> M6Data:
    """The pools, mixes and test questions of ``config`` (an M6Config). ``corpus``: the
    taichu.corpus.Corpus of data.corpus when the caller has loaded it already."""
    from taichu.imagetext import load_image_text, split_pairs

    data, m = config.data, config.model
    weights = {t: w for t, w in data.tasks.items() if w > 0}
    held_out = set(data.held_out_templates)
    check_templates(data.held_out_templates)
    pools: dict[str, list[Example]] = {t: [] for t in TASKS if t in weights}
    held_pools: dict[str, list[Example]] = {t: [] for t in TASKS if t in weights}
    names, test_questions = [], []
    if any(t in weights for t in IMAGE_TASKS):
        size = m.image_size if m.image_size >= 32 else None   # smaller: drawn at the default, resized
        pairs = load_image_text(data.source, test_fraction=data.validation_fraction, seed=data.split_seed,
                                image_size=size, scene_count=data.scene_count, scene_seed=data.scene_seed)
        names.append(pairs.name)
        for side, chosen, target in ((True, pairs.train, pools), (False, pairs.test, held_pools)):
            for task, examples in _image_examples(chosen, weights, held_out, side).items():
                target[task] += examples
        test_questions = [e for e in held_pools.get("vqa", []) if e.template is not None]
        if "vqa" in weights and data.examples:
            train, test = split_pairs(read_examples(data.examples), data.validation_fraction, data.split_seed)
            pools["vqa"] += train
            held_pools["vqa"] += test
            names.append(Path(data.examples).name)
    if any(t in weights for t in ("text_continuation", "text_denoising")):
        from taichu.corpus import load_corpus

        corpus = corpus or load_corpus(data)
        train_units, held_units = _sentence_units(corpus)
        for task in ("text_continuation", "text_denoising"):
            if task in weights:
                pools[task] = _text_examples(task, train_units, data, m.text_length, "train")
                held_pools[task] = _text_examples(task, held_units, data, m.text_length, "held-out")
        names.append(corpus.name)
    if "text_to_image" in weights:
        from taichu.dalle_data import load_caption_codes

        codes = load_caption_codes(config, rank)
        for pairs, grids, target in ((codes.train, codes.train_codes, pools),
                                     (codes.test, codes.test_codes, held_pools)):
            target["text_to_image"] = [Example("text_to_image", p.text, "", None, p.key, p.scene,
                                               codes=np.asarray(g, np.int64)) for p, g in zip(pairs, grids)]
        if codes.name not in names:
            names.append(codes.name)
    for task in weights:
        if not pools[task]:
            raise ValueError(f"data.tasks.{task}: no training examples for this task ({_why_empty(task, data)})")
    train = mix(pools, weights, data.examples_per_epoch, data.split_seed, "train")
    validation = mix(held_pools, weights, validation_count(config), data.split_seed, "validation")
    counts = {"train": _task_counts(train), "validation": _task_counts(validation)}
    out = M6Data(train, validation, pools, held_pools, test_questions, tuple(data.held_out_templates),
                 "+".join(names), "", counts)
    h = hashlib.sha256(FORMAT.encode())
    for text in out.training_texts():
        h.update(text.encode() + b"\0")
    out.fingerprint = h.hexdigest()
    return out


def _task_counts(examples) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in examples:
        out[e.task] = out.get(e.task, 0) + 1
    return out


def _why_empty(task: str, data) -> str:
    if task == "vqa":
        return "questions come from drawn scenes (data.source 'scenes') and data.examples"
    if task in ("text_continuation", "text_denoising"):
        return (f"no sentence of data.corpus has data.min_text_chars {data.min_text_chars} characters and fits "
                "model.text_length")
    return f"data.source {data.source!r} gave no images"


# ---------------------------------------------------------------------------- batches


class _Pixels:
    """Preprocessed images by identity (a PIL image object, or a file's resolved path),
    kept while they fit in ``cache_bytes``."""

    def __init__(self, image_size: int, cache_bytes: int = 1 << 30):
        self.image_size = image_size
        self.limit = max(1, cache_bytes // (3 * image_size * image_size * 4))
        self.cache: dict = {}

    def __call__(self, image) -> np.ndarray:
        from taichu.images import load_image, preprocess

        key = ("file", str(Path(image).resolve())) if isinstance(image, (str, Path)) else ("object", id(image))
        pixels = self.cache.get(key)
        if pixels is None:
            pixels = preprocess(load_image(image), self.image_size)[0]
            if len(self.cache) < self.limit:
                self.cache[key] = pixels
        return pixels


class M6Batches:
    """Batches by index: the inputs of the m6 ``training_loss`` by name, in its order:
    ``pixel_values`` float32 [B, 3, S, S] (zeros for a row without image), ``input_ids``
    int64 [B, text_length] (``[bos] + prompt + target + [eos]`` right-padded with the pad
    id), ``segment_ids`` int64 [B, patches + text_length + codes] (IMAGE / PAD patches,
    PREFIX for bos + prompt, TARGET for target + eos, PAD padding, CODE for the code slots
    of a text_to_image row, whose eos is PREFIX), and ``image_codes`` int64
    [B, image_grid^2] (zeros for rows without) only for a model with a codebook.

    Text is tokenized once, up front. An example longer than text_length keeps its prompt
    and eos and loses the end of its target (``truncated`` counts them); a prompt that
    alone leaves no room is cut too (``prompt_truncated``, also in ``truncated``)."""

    def __init__(self, examples: Sequence[Example], tokenizer, config, cache_bytes: int = 1 << 30):
        if not examples:
            raise ValueError("no m6 examples in this split")
        m = config.model
        self.examples = list(examples)
        self.num_patches, self.num_codes = m.num_patches, m.num_codes
        self.codebook = bool(m.codebook_size)
        self._pixels = _Pixels(m.image_size, cache_bytes)
        self.image_size = m.image_size
        length = m.text_length
        texts = list(dict.fromkeys(t for e in self.examples for t in (e.prompt, e.target)))
        encoded = dict(zip(texts, tokenizer.encode_batch(texts)))
        n = len(self.examples)
        self.input_ids = np.full((n, length), tokenizer.pad_id, np.int64)
        self.text_segments = np.full((n, length), PAD, np.int64)
        self.has_image = np.array([e.image is not None for e in self.examples])
        self.image_codes = np.zeros((n, self.num_codes), np.int64) if self.codebook else None
        self.truncated = self.prompt_truncated = 0
        bos, eos = tokenizer.bos_id, tokenizer.eos_id
        for row, e in enumerate(self.examples):
            prompt, target = encoded[e.prompt], encoded[e.target]
            if e.task == "text_to_image":
                if e.codes is None or not self.codebook:
                    raise ValueError(f"text_to_image example {e.key!r}: needs codes and a model with a codebook")
                ids = [bos] + prompt[:length - 2] + [eos]
                segments = [PREFIX] * len(ids)
                self.truncated += len(prompt) > length - 2
                self.prompt_truncated += len(prompt) > length - 2
                codes = np.asarray(e.codes).reshape(-1)
                if len(codes) != self.num_codes:
                    raise ValueError(f"text_to_image example {e.key!r}: {len(codes)} codes, the model takes "
                                     f"{self.num_codes} (model.image_grid^2)")
                self.image_codes[row] = codes
            else:
                if len(prompt) > length - 2:       # no room left for a target token: cut the prompt too
                    prompt = prompt[:length - 2]
                    self.prompt_truncated += 1
                room = length - 2 - len(prompt)
                self.truncated += len(target) > room
                target = target[:room]
                ids = [bos] + prompt + target + [eos]
                segments = [PREFIX] * (1 + len(prompt)) + [TARGET] * (len(target) + 1)
            self.input_ids[row, :len(ids)] = ids
            self.text_segments[row, :len(ids)] = segments
        self.code_segments = np.array([[CODE if e.task == "text_to_image" else PAD] * self.num_codes
                                       for e in self.examples], np.int64).reshape(n, self.num_codes)

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, indices) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64)
        pixels = np.zeros((len(indices), 3, self.image_size, self.image_size), np.float32)
        for row, i in enumerate(indices):
            image = self.examples[int(i)].image
            if image is not None:
                pixels[row] = self._pixels(image)
        patches = np.where(self.has_image[indices, None], IMAGE, PAD) * np.ones((1, self.num_patches), np.int64)
        segments = np.concatenate([patches.astype(np.int64), self.text_segments[indices],
                                   self.code_segments[indices]], axis=1)
        out = {"pixel_values": pixels, "input_ids": self.input_ids[indices], "segment_ids": segments}
        if self.codebook:
            out["image_codes"] = self.image_codes[indices]
        return out


# ---------------------------------------------------------------------------- generation


def prompt_inputs(tokenizer, config, images, prompts, tasks=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model inputs of generation prompts, left-padded: ``pixel_values`` float32
    [B, 3, S, S] (zeros where ``images[i]`` is None), ``input_ids`` int64 [B, L] (``[bos] +
    prompt``, and ``+ [eos]`` for a text_to_image row, left-padded with the pad id to the
    longest row), ``segment_ids`` int64 [B, patches + L] (IMAGE patches or PAD for an absent
    image, PAD for the left padding, PREFIX for the text). A text_to_image prefill adds the
    start code slot itself.

    ``images``: one per prompt (anything taichu.images.load_image reads, or None), or None
    for no images at all. ``tasks`` (optional, one per prompt, from TASKS) checks each row:
    an image for caption / image_text / vqa and none for the others, a non-empty prompt for
    every task but caption. Without it, an empty prompt is taken only with an image
    (captioning). A prompt must leave room within model.text_length for a token to generate."""
    from taichu.images import load_image, preprocess

    m = config.model
    if isinstance(prompts, str):
        raise TypeError("prompt_inputs takes a sequence of prompts, not one str")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    images = [None] * len(prompts) if images is None else list(images)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts (use None for a prompt without image)")
    if tasks is not None:
        tasks = list(tasks)
        if len(tasks) != len(prompts):
            raise ValueError(f"{len(tasks)} tasks for {len(prompts)} prompts")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {i} is {type(prompt).__name__}, not str")
        has_image, task = images[i] is not None, None if tasks is None else tasks[i]
        if task is None:
            if not has_image and not prompt.strip():
                raise ValueError(f"prompt {i} is empty and has no image: nothing to generate from (only "
                                 "captioning takes an empty prompt, with an image)")
            continue
        if task not in TASKS:
            raise ValueError(f"task {i} {task!r} is not an m6 task (known: {', '.join(TASKS)})")
        if task in IMAGE_TASKS and not has_image:
            raise ValueError(f"prompt {i}: task {task} needs an image")
        if task not in IMAGE_TASKS and has_image:
            raise ValueError(f"prompt {i}: task {task} takes no image")
        if task != "caption" and not prompt.strip():
            what = {"vqa": "the question", "image_text": "the start of the caption",
                    "text_to_image": "the caption", "text_continuation": "the start of the text",
                    "text_denoising": f"the text with {GAP} at the gap"}[task]
            raise ValueError(f"prompt {i}: task {task} needs a prompt ({what}), got an empty one")
    rows = []
    for i, ids in enumerate(tokenizer.encode_batch(prompts)):
        closed = tasks is not None and tasks[i] == "text_to_image"
        row = [tokenizer.bos_id] + ids + [tokenizer.eos_id] * closed
        room = m.text_length - (0 if closed else 1)
        if len(row) > room:
            raise ValueError(f"prompt {i} has {len(ids)} tokens: with bos{' and eos' if closed else ''} it must "
                             f"fit in {room} of model.text_length {m.text_length}"
                             f"{'' if closed else ' (one slot left to generate)'}")
        rows.append(row)
    width = max(len(r) for r in rows)
    batch = len(rows)
    input_ids = np.full((batch, width), tokenizer.pad_id, np.int64)
    segment_ids = np.full((batch, m.num_patches + width), PAD, np.int64)
    pixel_values = np.zeros((batch, 3, m.image_size, m.image_size), np.float32)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = row
        segment_ids[i, m.num_patches + width - len(row):] = PREFIX
        if images[i] is not None:
            pixel_values[i] = preprocess(load_image(images[i]), m.image_size)[0]
            segment_ids[i, :m.num_patches] = IMAGE
    return pixel_values, input_ids, segment_ids

"""``taichu train``: the loop both backends share.

Schedule, data order, evaluation, logging, checkpoints and resume live here, in numpy;
a backend contributes only a ``Trainer`` (``torch_impl/train.py``,
``mindspore_impl/train.py``) that runs one optimizer step on numpy batches and exposes
its optimizer state under canonical names. Because the data order and the schedule are
computed here, the two backends see the same batches and learning rates step for step.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from taichu.config import dump_config
from taichu.fileio import sha256_file
from taichu.weights import contiguous

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the run stopped without writing a checkpoint."""


def learning_rate(step: int, train) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_learning_rate``."""
    if step < train.warmup_steps:
        return train.learning_rate * (step + 1) / train.warmup_steps
    span = max(1, train.max_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return train.min_learning_rate + (train.learning_rate - train.min_learning_rate) * cosine


def decay_names(config) -> set[str]:
    """Canonical names that get weight decay: linear and convolution weights; not biases,
    norms, embeddings or free parameters (CLIP's class embedding and logit scale), as in
    GPT-2 and OpenAI CLIP. Tensors the optimizer does not train (BriVL's momentum towers)
    may be listed; the trainers skip them."""
    from taichu.families import get_family

    specs = get_family(config.family).tensor_specs(config)
    return {name for name, spec in specs.items()
            if spec.kind in ("linear", "conv1d", "conv2d") and name.endswith(".weight")}


class SampleOrder:
    """Which blocks make up global step ``s``: a fresh permutation per epoch, from the seed.

    A pure function of (seed, step), so resuming needs only the step, and every
    data-parallel rank computes the same global batch and takes its own slice.
    """

    def __init__(self, num_blocks: int, seed: int):
        self.num_blocks, self.seed = num_blocks, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_blocks)
        return self._perm

    def global_batch(self, step: int, batch_size: int) -> np.ndarray:
        positions = step * batch_size + np.arange(batch_size)
        out = np.empty(batch_size, np.int64)
        for i, position in enumerate(positions):
            epoch, offset = divmod(int(position), self.num_blocks)
            out[i] = self._permutation(epoch)[offset]
        return out


class BucketOrder:
    """Global batches of samples of similar length (speech: less padding), from the seed.

    Per epoch: a seeded permutation is cut into pools of ``pool_batches`` batches, each pool
    sorted by length and cut into batches, and the batches of the epoch shuffled. Like
    SampleOrder a pure function of (seed, step): resume needs only the step, every rank
    computes the same global batch. Each epoch holds len // batch_size full batches (the
    remainder, different each epoch, waits for the next).
    """

    def __init__(self, lengths: np.ndarray, seed: int, pool_batches: int = 32):
        self.lengths = np.asarray(lengths)
        self.seed, self.pool_batches = seed, pool_batches
        self._key, self._batches = None, None

    def _epoch_batches(self, epoch: int, batch_size: int) -> np.ndarray:
        if self._key != (epoch, batch_size):
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(len(self.lengths))
            usable = len(perm) // batch_size * batch_size
            if usable == 0:
                raise ValueError(f"batch_size {batch_size} exceeds the {len(perm)} training samples")
            pool = batch_size * self.pool_batches
            rows = []
            for start in range(0, usable, pool):
                part = perm[start:min(start + pool, usable)]
                part = part[np.argsort(self.lengths[part], kind="stable")]
                rows.extend(part.reshape(-1, batch_size))
            batches = np.stack(rows)
            self._key, self._batches = (epoch, batch_size), batches[rng.permutation(len(batches))]
        return self._batches

    def global_batch(self, step: int, batch_size: int) -> np.ndarray:
        per_epoch = len(self.lengths) // batch_size
        if per_epoch == 0:
            raise ValueError(f"batch_size {batch_size} exceeds the {len(self.lengths)} training samples")
        epoch, offset = divmod(step, per_epoch)
        return self._epoch_batches(epoch, batch_size)[offset]


def micro_batches(indices: np.ndarray, rank: int, world: int, accum: int) -> list[np.ndarray]:
    """This rank's share of a global batch, cut into ``accum`` equal micro-batches."""
    share = np.array_split(indices, world)[rank]
    return np.array_split(share, accum)


# ----------------------------------------------------------------------------- checkpoints

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(out_dir: Path, step: int, config, model_arrays: dict, optimizer_arrays: dict,
                     state: dict, tokenizer_path, keep: int, extra_files: dict | None = None) -> Path:
    """A model directory plus optimizer and trainer state (and ``extra_files``, file name
    -> arrays: what a recipe trains beside the model), published by one rename.

    Files go to a hidden temp directory; the manifest (size and sha256 of every file) is
    written last, then the directory is renamed into place. A crash at any point leaves
    the previous checkpoints untouched and at worst a temp directory that is ignored.
    """
    from taichu.api import save_arrays

    root = out_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_arrays(config, model_arrays, tmp, tokenizer=tokenizer_path)
    _save_arrays(optimizer_arrays, tmp / OPTIMIZER_FILE)
    for name, arrays in (extra_files or {}).items():
        _save_arrays(arrays, tmp / name)
    (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))
    files = sorted(p for p in tmp.iterdir() if p.is_file())
    manifest = {"step": step, "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                                        for p in files}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for p in tmp.iterdir():
        with open(p, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def _save_arrays(arrays: dict, path: Path) -> None:
    from safetensors.numpy import save

    from taichu.fileio import atomic_write_bytes

    atomic_write_bytes(path, save({k: contiguous(v) for k, v in arrays.items()}))


def verify_checkpoint(path: Path) -> str | None:
    """None if every file matches the manifest, else what is wrong."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (the checkpoint was not finished)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable manifest ({err})"
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {entry['bytes']}"
        if sha256_file(file) != entry["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


def latest_good_checkpoint(out_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; damaged newer ones are skipped with a warning."""
    for path in sorted((out_dir / CHECKPOINTS).glob("step-*"), reverse=True):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warnings.warn(f"checkpoint {path} is damaged ({problem}); falling back to an older one",
                      stacklevel=2)
    return None


# ----------------------------------------------------------------------------- metrics

class MetricsLog:
    """``metrics.jsonl``: one JSON record per logged step, appended and flushed at once."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is None:
            path.unlink(missing_ok=True)
        elif path.exists():
            # Records after the checkpoint belong to the interrupted attempt: drop them so
            # the log reads as one run.
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- the loop

@dataclass
class TrainResult:
    final_dir: Path
    steps: int
    last_loss: float
    val_loss: float | None
    start_val_loss: float | None = None  # at step 0 of a fresh run
    tokens: int = 0                      # tokens (or pairs) trained in this invocation
    seconds: float = 0.0
    unit: str = "tokens"                 # what ``tokens`` counts: "tokens", "pairs", "clips", "images", "items"


def text_vocab_size(config) -> int:
    """The vocabulary the tokenizer must fill: the GPT's, or an image-text text tower's."""
    model = config.model
    return model.vocab_size if hasattr(model, "vocab_size") else model.text.vocab_size


def _tokenizer_for(config, texts, fingerprint: str, name: str, init_dir: Path | None, rank: int):
    """The init model's tokenizer, else the config's, trained once on ``texts`` and cached
    by content (``fingerprint`` names the texts)."""
    from taichu.data import default_cache_dir
    from taichu.tokenizer import TRAINING_VERSION, Tokenizer, check_tokenizer, train_tokenizer

    vocab_size = text_vocab_size(config)
    if init_dir is not None and (init_dir / "tokenizer.model").is_file():
        tokenizer = Tokenizer(init_dir / "tokenizer.model")
        check_tokenizer(tokenizer, config.tokenizer, vocab_size)
        return tokenizer
    key = hashlib.sha256(json.dumps([fingerprint, config.tokenizer.model_dump(mode="json"),
                                     vocab_size, TRAINING_VERSION]).encode()).hexdigest()[:16]
    cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else default_cache_dir()
    path = cache_dir.parent / "tokenizers" / f"{name}-{vocab_size}-{key}.model"
    if rank != 0:
        # Rank 0 trains it; the file appears whole (atomic rename) when it is done.
        deadline = time.time() + 3600
        while not path.exists() and time.time() < deadline:
            time.sleep(1)
    if path.exists():
        tokenizer = Tokenizer(path)
        check_tokenizer(tokenizer, config.tokenizer, vocab_size)
        return tokenizer
    return train_tokenizer(texts, config.tokenizer, vocab_size, path)


@dataclass
class TrainingData:
    """What the loop needs from a task: the tokenizer, and train/validation sets whose
    ``batch(indices)`` gives the numpy inputs of the family's ``training_loss`` by name."""
    tokenizer: object
    train: object
    validation: object
    unit: str               # what throughput counts: "tokens", "pairs", "clips", "images" or "items"
    units_per_sample: int
    # Which samples make up each step (SampleOrder(len(train), seed) when None). A set
    # whose batches draw randomness per step (speech masks) has ``stochastic = True`` and
    # takes ``batch(indices, step)``.
    order: object = None


class _TokenBlocks:
    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def batch(self, indices) -> dict[str, np.ndarray]:
        return {"input_ids": self.blocks.batch(indices)}


def _language_model_data(config, init_dir, rank) -> TrainingData:
    from taichu.corpus import load_corpus
    from taichu.data import load_blocks

    corpus = load_corpus(config.data)  # read and split once, for the tokenizer and both splits
    tokenizer = _tokenizer_for(config, corpus.train, corpus.fingerprint, corpus.name, init_dir, rank)
    return TrainingData(tokenizer, _TokenBlocks(load_blocks(config, tokenizer, "train", corpus)),
                        _TokenBlocks(load_blocks(config, tokenizer, "validation", corpus)),
                        "tokens", config.data.seq_len)


def _image_text_data(config, init_dir, rank) -> TrainingData:
    """Pairs from config.data, split as taichu eval splits them; the tokenizer learns the
    tokenizer corpus plus the training captions (never the held-out ones)."""
    from taichu.config import DataConfig
    from taichu.corpus import load_corpus
    from taichu.imagetext import PairBatches, caption_texts, load_data_config

    pairs = load_data_config(config.data)
    captions = list(caption_texts(pairs.train))
    corpus = load_corpus(DataConfig(corpus=config.data.tokenizer_corpus))
    fingerprint = hashlib.sha256(f"{corpus.fingerprint}:{pairs.fingerprint}".encode()).hexdigest()
    tokenizer = _tokenizer_for(config, corpus.train + captions, fingerprint,
                               f"{corpus.name}+{pairs.name}", init_dir, rank)
    image_size = config.model.image.image_size
    context = config.model.text.max_position_embeddings
    return TrainingData(tokenizer, PairBatches(pairs.train, tokenizer, image_size, context),
                        PairBatches(pairs.test, tokenizer, image_size, context), "pairs", 1)


def _speech_data(config, init_dir, rank) -> TrainingData:
    """Clips from config.data (taichu.speech), split by sentence; no tokenizer (the CTC
    alphabet is in the config). Batches of similar length (BucketOrder)."""
    from taichu.speech import load_speech_data
    from taichu.speech_batches import SpeechBatches

    clips = load_speech_data(config.data, rank)
    train_clips = clips.train
    if config.data.train_clips is not None:
        if config.data.train_clips > len(train_clips):
            raise ValueError(f"data.train_clips {config.data.train_clips} exceeds the "
                             f"{len(train_clips)} training clips")
        keep = np.random.default_rng(config.data.split_seed).permutation(len(train_clips))
        train_clips = [train_clips[i] for i in sorted(keep[:config.data.train_clips])]
    train = SpeechBatches(train_clips, config, config.train.seed)
    return TrainingData(None, train, SpeechBatches(clips.validation, config, config.train.seed),
                        "clips", 1, BucketOrder(train.lengths, config.train.seed))


def _vision_data(config, init_dir, rank) -> TrainingData:
    """Images from config.data (taichu.vision_data), split by image; multi-crop views and
    masking noise drawn per (seed, step, image) for pretraining, drawn scenes and their
    per-pixel classes for segmentation; no tokenizer."""
    from taichu.vision_data import SEGMENT_CLASSES, MultiCrop, SegmentBatches, ViewBatches, load_images

    data, m = config.data, config.model
    images = load_images(data.source, data.validation_fraction, data.split_seed,
                         scene_count=data.scene_count, scene_seed=data.scene_seed)
    if m.objective == "segmentation":
        if tuple(m.segmentation.classes) != SEGMENT_CLASSES:
            raise ValueError(f"model.segmentation.classes {m.segmentation.classes}: the drawn scenes' "
                             f"classes are {list(SEGMENT_CLASSES)}")
        return TrainingData(None, SegmentBatches(images.train, m.image_size, config.train.seed),
                            SegmentBatches(images.test, m.image_size, config.train.seed), "images", 1)
    crop = MultiCrop(m.image_size, m.crops.local_crop_size, m.crops.num_local_crops,
                     tuple(data.global_crop_scale), tuple(data.local_crop_scale))
    return TrainingData(None, ViewBatches(images.train, crop, m.num_patches, config.train.seed),
                        ViewBatches(images.test, crop, m.num_patches, config.train.seed), "images", 1)


def _image_tokenizer_data(config, init_dir, rank) -> TrainingData:
    """Images from config.data drawn or resized to the model's size, split by image; flips
    and dead-code restart draws per (seed, step, image) (taichu.image_tokens); no tokenizer."""
    from taichu.image_tokens import ImageBatches, load_split

    data, seed = config.data, config.train.seed
    images = load_split(config)
    return TrainingData(None, ImageBatches(images.train, config, seed, data.flip),
                        ImageBatches(images.test, config, seed, False), "images", 1)


def _text_to_image_data(config, init_dir, rank) -> TrainingData:
    """Captions and their images' codes (taichu.dalle_data: encoded once by the image
    tokenizer in data.image_tokenizer, cached), split as the image-text families split the
    pairs; the tokenizer learns the tokenizer corpus plus the training captions."""
    from taichu.config import DataConfig
    from taichu.corpus import load_corpus
    from taichu.dalle_data import CaptionCodeBatches, load_caption_codes
    from taichu.imagetext import caption_texts

    data = load_caption_codes(config, rank)
    corpus = load_corpus(DataConfig(corpus=config.data.tokenizer_corpus))
    fingerprint = hashlib.sha256(f"{corpus.fingerprint}:{data.fingerprint}".encode()).hexdigest()
    tokenizer = _tokenizer_for(config, corpus.train + list(caption_texts(data.train)), fingerprint,
                               f"{corpus.name}+{data.name}", init_dir, rank)
    length = config.model.text_length
    return TrainingData(tokenizer, CaptionCodeBatches(data.train, data.train_codes, tokenizer, length),
                        CaptionCodeBatches(data.test, data.test_codes, tokenizer, length), "pairs", 1)


def _trimodal_data(config, init_dir, rank) -> TrainingData:
    """Items with any subset of image, text and audio (taichu.trimodal_data: captions spoken
    by the synthesiser, cached), split as the image-text families split their pairs; the
    tokenizer learns the tokenizer corpus plus the training texts. Batches of similar audio
    length (BucketOrder): padding to a batch's longest clip cost 4x on digits + scenes
    (clips of 1-10 s), and items without audio make batches whose speech tower runs on a
    placeholder alone."""
    from taichu.config import DataConfig
    from taichu.corpus import load_corpus
    from taichu.trimodal_data import TriModalBatches, load_trimodal

    data = load_trimodal(config, rank)
    corpus = load_corpus(DataConfig(corpus=config.data.tokenizer_corpus))
    texts = [item.text for item in data.train if item.text is not None]
    fingerprint = hashlib.sha256(f"{corpus.fingerprint}:{data.fingerprint}".encode()).hexdigest()
    tokenizer = _tokenizer_for(config, corpus.train + texts, fingerprint, f"{corpus.name}+{data.name}",
                               init_dir, rank)
    train = TriModalBatches(data.train, tokenizer, config)
    return TrainingData(tokenizer, train, TriModalBatches(data.validation, tokenizer, config), "items", 1,
                        BucketOrder(train.lengths, config.train.seed))


def _m6_data(config, init_dir, rank) -> TrainingData:
    """The m6 task mix (taichu.m6_data): images split by key, sentences by document, held-out
    question templates kept out of training; the tokenizer learns the tokenizer corpus
    (split as data.corpus is, so no held-out sentence reaches it) plus the training prompts
    and targets."""
    from taichu.config import DataConfig
    from taichu.corpus import load_corpus
    from taichu.m6_data import M6Batches, load_m6

    data = config.data
    corpus = load_corpus(DataConfig(corpus=data.tokenizer_corpus, validation_fraction=data.validation_fraction,
                                    split_seed=data.split_seed))
    examples = load_m6(config, rank, corpus if data.tokenizer_corpus == data.corpus else None)
    fingerprint = hashlib.sha256(f"{corpus.fingerprint}:{examples.fingerprint}".encode()).hexdigest()
    tokenizer = _tokenizer_for(config, corpus.train + examples.training_texts(), fingerprint,
                               f"{corpus.name}+{examples.name}", init_dir, rank)
    train = M6Batches(examples.train, tokenizer, config)
    validation = M6Batches(examples.validation, tokenizer, config)
    if rank == 0:
        print(examples.describe(), flush=True)
        for name, batches in (("training", train), ("validation", validation)):
            if batches.truncated:
                print(f"m6 data: {batches.truncated} of {len(batches)} {name} examples are longer than "
                      f"model.text_length {config.model.text_length} tokens: target cut, eos kept "
                      f"({batches.prompt_truncated} with the prompt cut too)", flush=True)
    return TrainingData(tokenizer, train, validation, "items", 1)


TASK_DATA = {"language_model": _language_model_data, "image_text": _image_text_data,
             "speech": _speech_data, "vision": _vision_data, "image_tokenizer": _image_tokenizer_data,
             "text_to_image": _text_to_image_data, "trimodal": _trimodal_data, "m6": _m6_data}


class ModelRecipe:
    """What ``run_training`` trains and writes. This one, ``taichu train``'s: the config's
    model, its family's loss, the model's arrays as the checkpoint. taichu.distill's recipe
    wraps the model with a teacher and writes what it learns beside the model."""

    def tokenizer_dir(self, init_dir: Path | None) -> Path | None:
        """Whose tokenizer the run uses when it has one (else the config's, trained)."""
        return init_dir

    def wrap_data(self, data: "TrainingData") -> "TrainingData":
        return data

    def start(self, out_dir: Path, resuming: bool, is_main: bool) -> None:
        """Called once the model is built and initialised or resumed, before ``wrap``."""

    def wrap(self, model, resume_from: Path | None):
        """The model the trainer steps, around ``model`` (initialised or resumed already)."""
        return model

    def objective(self):
        """The backend module whose ``training_loss`` the trainer runs; None: the family's."""
        return None

    def decay_names(self, names: set[str]) -> set[str]:
        return names

    def split(self, arrays: dict) -> tuple[dict, dict]:
        """The trainer's canonical arrays -> (the model directory's, {extra file: arrays})."""
        return arrays, {}


def _evaluate(trainer, dataset, train) -> float:
    """Mean loss over the first eval_batches * batch_size validation samples (fewer if the
    split is small), in micro-batches of the training micro-batch size."""
    count = min(len(dataset), train.eval_batches * train.batch_size)
    size = max(1, train.batch_size // train.grad_accum_steps)
    total, samples = 0.0, 0
    for start in range(0, count, size):
        indices = np.arange(start, min(count, start + size))
        batch = dataset.batch(indices)  # fixed draws
        rows = len(indices)
        total += trainer.eval_loss(batch) * rows
        samples += rows
    return total / samples


def run_training(config, backend: str, out_dir, init_dir=None, resume: bool = False,
                 progress: bool = True, recipe: ModelRecipe | None = None,
                 init_towers: dict | None = None) -> TrainResult:
    """Train ``config`` in ``backend``; returns where the final model directory is.

    ``recipe``: what is trained around the config's model (taichu.distill); by default
    the model alone. ``init_towers``: {tower: model directory} for a family with towers
    (tri-modal), loaded after ``init_dir``; the text tower's directory gives the tokenizer."""
    from taichu.api import build_model, load_state_dict, save_arrays
    from taichu.config import load_config
    from taichu.families import get_family
    from taichu.weights import load_safetensors

    out_dir = Path(out_dir)
    init_dir = Path(init_dir) if init_dir else None
    train = config.train
    recipe = recipe or ModelRecipe()
    trainer_module = __import__(f"{backend}_impl.train", fromlist=["Trainer"])
    rank, world = trainer_module.distributed_init(config)
    is_main = rank == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    init_towers = {tower: Path(d) for tower, d in (init_towers or {}).items()}
    if init_towers and get_family(config.family).init_tower is None:
        raise ValueError(f"--init-tower: a {config.family} model has no towers")
    tokenizer_dir = recipe.tokenizer_dir(init_dir)
    if tokenizer_dir is None and "text" in init_towers:
        tokenizer_dir = init_towers["text"]
    data = recipe.wrap_data(TASK_DATA[get_family(config.family).task](config, tokenizer_dir, rank))
    tokenizer, train_set, val_set = data.tokenizer, data.train, data.validation
    tokenizer_path = tokenizer.path if tokenizer is not None else None

    trainer_module.seed_everything(train.seed)
    model = build_model(config, backend)
    if init_dir is not None:
        # The run's config decides the model (dropout may differ from the init's); the
        # weights must fit it exactly, name for name and shape for shape, except a head the
        # family starts fresh when the init has another (a pretrained speech model
        # fine-tuned with CTC).
        init_config = load_config(init_dir)
        _load_init(model, config, init_config, init_dir, is_main)
        changed = _changed_fields(init_config.model.model_dump(), config.model.model_dump())
        if changed and is_main:
            print(f"--init {init_dir}: model fields differ from its config.yaml "
                  f"(init -> this run): {changed}")
    start_step, resume_from = 0, None
    if resume:
        resume_from = latest_good_checkpoint(out_dir)
        if resume_from is None:
            if is_main:
                print(f"--resume: no checkpoint in {out_dir / CHECKPOINTS}; starting from step 0")
        else:
            # Weights go in before the trainer wraps (and under FSDP shards) the model.
            load_state_dict(model, load_safetensors(resume_from), str(resume_from))
    if init_towers and resume_from is None:
        # Also when --resume finds no checkpoint: the run starts fresh, from the towers.
        _load_towers(model, config, init_towers, is_main)
    recipe.start(out_dir, resume_from is not None, is_main)
    model = recipe.wrap(model, resume_from)
    trainer = trainer_module.Trainer(model, config, recipe.decay_names(decay_names(config)), rank, world,
                                     recipe.objective())
    if resume_from is not None:
        state = json.loads((resume_from / TRAINER_STATE).read_text())
        trainer.load_optimizer_state(load_safetensors(resume_from / OPTIMIZER_FILE))
        trainer.load_extra_state(state["trainer"])
        start_step = state["step"]
        if is_main:
            print(f"resuming from {resume_from} at step {start_step}")

    metrics = MetricsLog(out_dir / "metrics.jsonl", start_step if resume_from else None) if is_main else None
    if is_main and not resume_from:
        dump_config(config, out_dir / "config.yaml")
    run_start, start_val_loss = time.perf_counter(), None
    if start_step == 0:
        # The starting point of the validation curve, before any update. Every rank
        # evaluates (under FSDP a forward pass is collective); rank 0 records.
        val_loss = start_val_loss = _evaluate(trainer, val_set, train)
        if is_main:
            metrics.write(_eval_record({"step": 0}, val_loss, data.unit))
    order = data.order or SampleOrder(len(train_set), train.seed)
    stochastic = getattr(train_set, "stochastic", False)
    units_per_step = train.batch_size * data.units_per_sample
    bar = _progress_bar(start_step, train.max_steps, progress and is_main)
    last_good, gathered_final = resume_from, False
    loss, val_loss = float("nan"), None
    window_start, window_units = time.perf_counter(), 0
    for step in range(start_step, train.max_steps):
        lr = learning_rate(step, train)
        indices = order.global_batch(step, train.batch_size)
        parts = micro_batches(indices, rank, world, train.grad_accum_steps)
        batches = [train_set.batch(part, step) if stochastic else train_set.batch(part)
                   for part in parts]
        loss, grad_norm = trainer.train_step(batches, lr)
        done = step + 1
        if not math.isfinite(loss):
            bar.close()
            raise TrainingDiverged(
                f"loss is {loss} at step {done}: training stopped. The last good checkpoint is "
                f"{last_good or 'none (no checkpoint was written yet)'}; lower "
                f"train.learning_rate or check the data, then --resume")
        window_units += units_per_step
        record = None
        if done % train.log_interval == 0 or done == train.max_steps:
            elapsed = time.perf_counter() - window_start
            record = {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      f"{data.unit}_per_s": window_units / max(elapsed, 1e-9)}
            window_start, window_units = time.perf_counter(), 0
        if done % train.eval_interval == 0 or done == train.max_steps:
            val_loss = _evaluate(trainer, val_set, train)
            record = record or {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm}
            record = _eval_record(record, val_loss, data.unit)
        if record is not None and is_main:
            metrics.write(record)
            bar.set_postfix_str(_postfix(record), refresh=False)
        bar.update(1)
        if done % train.checkpoint_interval == 0 or done == train.max_steps:
            model_arrays, optimizer_arrays = trainer.full_state()  # collective under FSDP
            gathered_final = done == train.max_steps
            if is_main:
                state = {"step": done, "trainer": trainer.extra_state(), "backend": backend,
                         "world_size": world}
                saved, extra_files = recipe.split(model_arrays)
                last_good = write_checkpoint(out_dir, done, config, saved, optimizer_arrays, state,
                                             tokenizer_path, train.keep_checkpoints, extra_files)
    bar.close()
    final_dir = out_dir / "final"
    if not gathered_final:  # the same on every rank, so FSDP's collective stays matched
        model_arrays, _ = trainer.full_state()
    if is_main:
        save_arrays(config, recipe.split(model_arrays)[0], final_dir, tokenizer=tokenizer_path)
    trainer_module.distributed_barrier(world)
    return TrainResult(final_dir, train.max_steps, loss, val_loss, start_val_loss,
                       (train.max_steps - start_step) * units_per_step, time.perf_counter() - run_start,
                       data.unit)


def _changed_fields(before: dict, after: dict, prefix: str = "") -> dict:
    """``{dotted.field: (before, after)}`` for the leaves that differ: a config section
    (a speech model's quantizer) shows as the fields that changed, not both whole sections."""
    changed = {}
    for key, value in before.items():
        other = after.get(key)
        if isinstance(value, dict) and isinstance(other, dict):
            changed.update(_changed_fields(value, other, f"{prefix}{key}."))
        elif other != value:
            changed[f"{prefix}{key}"] = (value, other)
    return changed


def _load_init(model, config, init_config, init_dir: Path, verbose: bool) -> None:
    """Load ``--init`` weights into ``model``: every tensor must match (after the family's
    ``init_arrays`` renaming, if it has one), except those under the prefixes the family's
    ``fresh_on_init`` names for this pair of configs, which keep their fresh initialisation
    (and are dropped from the init), said in the log."""
    from taichu.api import load_state_dict, state_dict
    from taichu.families import get_family
    from taichu.weights import load_safetensors

    arrays = load_safetensors(init_dir)
    family = get_family(config.family)
    if family.init_arrays is not None:
        arrays, taken = family.init_arrays(init_config, config, arrays)
        if taken and verbose:
            print(f"--init {init_dir}: {taken}")
    fresh = family.fresh_on_init(init_config, config) if family.fresh_on_init else ()
    if fresh:
        specs = family.tensor_specs(config)
        dropped = sorted(n for n in arrays if n.startswith(fresh))
        arrays = {n: a for n, a in arrays.items() if n not in dropped}
        current = state_dict(model)
        started = sorted(n for n in specs if n.startswith(fresh))
        arrays.update({n: current[n] for n in started})
        if verbose:
            print(f"--init {init_dir}: {len(arrays) - len(started)} tensors loaded; "
                  f"initialised fresh: {', '.join(started) or 'none'}; "
                  f"not used from the init: {', '.join(dropped) or 'none'}")
    load_state_dict(model, arrays, str(init_dir))


def _load_towers(model, config, init_towers: dict[str, Path], verbose: bool) -> None:
    """--init-tower: each named tower's tensors from its model directory (the family's
    ``init_tower`` names them), the rest of the model as it is; a source of another
    architecture is refused naming the fields, a tensor of another shape by the loader."""
    from taichu.api import load_state_dict, state_dict
    from taichu.config import load_config
    from taichu.families import get_family
    from taichu.weights import load_safetensors

    init_tower = get_family(config.family).init_tower
    arrays = state_dict(model)
    for tower, directory in init_towers.items():
        taken, line = init_tower(config, tower, load_config(directory), load_safetensors(directory))
        unknown = sorted(set(taken) - set(arrays))
        if unknown:
            raise ValueError(f"--init-tower {tower}={directory}: tensors this model does not have: "
                             f"{', '.join(unknown[:5])}")
        arrays.update(taken)
        if verbose:
            print(f"--init-tower {tower}={directory}: {line}")
    load_state_dict(model, arrays, ", ".join(f"{t}={d}" for t, d in init_towers.items()))


def _eval_record(record: dict, val_loss: float, unit: str) -> dict:
    # Perplexity means something for next-token losses only, not for contrastive ones.
    record = dict(record, val_loss=val_loss)
    if unit == "tokens":
        record["val_ppl"] = math.exp(min(val_loss, 50.0))
    return record


def _postfix(record: dict) -> str:
    text = f"loss {record['loss']:.4f} lr {record['lr']:.2e}"
    if "tokens_per_s" in record:
        text += f" {record['tokens_per_s']:,.0f} tok/s"
    if "pairs_per_s" in record:
        text += f" {record['pairs_per_s']:,.1f} pairs/s"
    if "clips_per_s" in record:
        text += f" {record['clips_per_s']:,.1f} clips/s"
    if "images_per_s" in record:
        text += f" {record['images_per_s']:,.1f} images/s"
    if "val_loss" in record:
        text += f" val {record['val_loss']:.4f}"
    if "val_ppl" in record:
        text += f" ppl {record['val_ppl']:.1f}"
    return text


def _progress_bar(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True,
                desc="train")


# ----------------------------------------------------------------------------- plot

def plot_runs(run_dirs, out_path) -> Path:
    """Training and validation loss of one or more runs against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for run in run_dirs:
        records = read_metrics(run)
        label = Path(run).name
        steps = [r for r in records if "loss" in r]
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], label=f"{label} train")
        evals = [r for r in records if "val_loss" in r]
        if evals:
            ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o--",
                    label=f"{label} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path

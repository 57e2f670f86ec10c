"""What ``taichu train`` feeds each family's task: the data (tokenizer, training and
validation sets, state carried from step to step) and the order of samples per step.

``TASK_DATA`` maps a family's ``task`` (taichu.families.Family.task) to the function that
builds its TrainingData; taichu/train.py's loop does the rest. Numpy and the data modules
only: no framework.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


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


class StreamOrder:
    """Global step s is sample s * batch_size + r for row r: with StreamSegments, segment s
    of every stream, so row r reads stream r from step to step (and resume needs only s)."""

    def global_batch(self, step: int, batch_size: int) -> np.ndarray:
        return step * batch_size + np.arange(batch_size)


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
    unit: str               # what throughput counts: "tokens", "pairs", "clips", "images", "items", "texts"
    units_per_sample: int
    # Which samples make up each step (SampleOrder(len(train), seed) when None). A set
    # whose batches draw randomness per step (speech masks) has ``stochastic = True`` and
    # takes ``batch(indices, step)``.
    order: object = None
    # State a model carries from step to step (GPT-XL's memory): rows -> {name: array} of
    # the state before the first step. Each micro-batch's state goes into its batch after
    # the data's inputs, and the loss returns the next state, in the same order, after the
    # loss; it is saved with each checkpoint. None: the model carries nothing.
    carry: object = None
    # (batch, the loss's other outputs) -> {metric: sum over the batch's rows}: validation
    # reports each as val_<metric>, its mean over the samples (a classifier's accuracy).
    # None: validation reports the loss alone.
    eval_metrics: object = None


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


def _recurrent_language_model_data(config, init_dir, rank) -> TrainingData:
    """The corpus as ``train.batch_size`` contiguous token streams read segment after
    segment (taichu.data.StreamSegments), the memory carried from step to step; validation
    as streams of one micro-batch, scored in order with the memory carried too."""
    from taichu.corpus import load_corpus
    from taichu.data import StreamSegments, load_packed
    from taichu.families.gpt_xl import initial_memory_arrays

    corpus = load_corpus(config.data)
    tokenizer = _tokenizer_for(config, corpus.train, corpus.fingerprint, corpus.name, init_dir, rank)
    data, train = config.data, config.train
    streams = {split: StreamSegments(load_packed(config, tokenizer, split, corpus), rows, data.seq_len,
                                     tokenizer.bos_id, data.reset_memory)
               for split, rows in (("train", train.batch_size),
                                   ("validation", max(1, train.batch_size // train.grad_accum_steps)))}
    carry = (lambda rows: initial_memory_arrays(config, rows)) if config.model.mem_len else None
    return TrainingData(tokenizer, streams["train"], streams["validation"], "tokens", data.seq_len,
                        StreamOrder(), carry)


def _classification_data(config, init_dir, rank) -> TrainingData:
    """Labelled texts from config.data (taichu.classify), split per text; the init model's
    tokenizer (a pretrained GPT's), else one trained on the tokenizer corpus plus the
    training texts. Batches of similar length (BucketOrder): less padding."""
    from taichu.classify import ClassificationBatches, correct_predictions, load_labelled
    from taichu.config import DataConfig
    from taichu.corpus import load_corpus

    data = config.data
    texts = load_labelled(data, config.model.labels)
    if init_dir is not None and (init_dir / "tokenizer.model").is_file():
        corpus_texts, fingerprint, name = [], texts.fingerprint, texts.name
    else:
        corpus = load_corpus(DataConfig(corpus=data.tokenizer_corpus))
        corpus_texts = corpus.train
        fingerprint = hashlib.sha256(f"{corpus.fingerprint}:{texts.fingerprint}".encode()).hexdigest()
        name = f"{corpus.name}+{texts.name}"
    tokenizer = _tokenizer_for(config, corpus_texts + texts.train_texts, fingerprint, name, init_dir, rank)
    train = ClassificationBatches(texts.train_texts, texts.train_labels, tokenizer, data)
    validation = ClassificationBatches(texts.test_texts, texts.test_labels, tokenizer, data)
    if rank == 0:
        print(texts.describe(), flush=True)
        for split, batches in (("training", train), ("held-out", validation)):
            if batches.truncated:
                print(f"classification data: {batches.truncated} of {len(batches)} {split} texts are "
                      f"longer than data.seq_len {data.seq_len} tokens: cut on the "
                      f"{data.truncation} (data.truncation)", flush=True)
    return TrainingData(tokenizer, train, validation, "texts", 1, BucketOrder(train.lengths, config.train.seed),
                        eval_metrics=correct_predictions)


TASK_DATA = {"language_model": _language_model_data, "recurrent_language_model": _recurrent_language_model_data, "image_text": _image_text_data,
             "speech": _speech_data, "vision": _vision_data, "image_tokenizer": _image_tokenizer_data,
             "text_to_image": _text_to_image_data, "trimodal": _trimodal_data, "m6": _m6_data,
             "classification": _classification_data}

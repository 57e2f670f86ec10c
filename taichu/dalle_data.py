"""The ``text_to_image`` task's data (the ``dalle`` family, taichu/families/dalle.py):
image-caption pairs whose images are encoded to codes by an image tokenizer (a ``vqvae``
model directory, ``data.image_tokenizer``), once, and cached.

numpy only; a framework is imported when the image tokenizer is loaded
(taichu.image_tokens.tokenize_images, in the backend ``data.image_tokenizer_backend`` names).

Cache: ``(data.cache_dir or $TAICHU_CACHE or ~/.cache/taichu) / image_codes / KEY[:16]``
holding ``codes.npy`` (the training pairs' codes, then the held-out pairs', [n, h, w]) and
``index.json``, written whole or not at all (a temp folder, then a rename), as
taichu/speech.py caches its clips. KEY is a sha256 of the tokenizer directory's files
(config and weights, by content) and of the pairs and their split
(taichu.imagetext.pairs_fingerprint): retraining the tokenizer in the same directory or
changing the data gives a new entry. The backend that encoded is recorded, not keyed: the
first run's codes serve every later run, whichever backend trains, so both backends train
on the same codes.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from taichu.fileio import write_cache_folder

CODES_FORMAT = "taichu-image-codes-v1"
# rank != 0 waits this long for rank 0's cache before encoding itself.
CACHE_WAIT_SECONDS = 3600


@dataclass
class CaptionCodes:
    """Pairs of a split with their image codes, [len(pairs), h, w]."""
    train: list
    train_codes: np.ndarray
    test: list
    test_codes: np.ndarray
    name: str
    fingerprint: str      # of the pairs and their split (taichu.imagetext.pairs_fingerprint)
    key: str              # the code cache's: the image tokenizer's files + the pairs


class CaptionCodeBatches:
    """Training batches by index: ``input_ids`` int64 [B, text_length] (``[bos] + caption +
    [eos]`` right-padded with the pad id, truncated as taichu.imagetext.caption_ids says)
    and ``image_codes`` int64 [B, h * w] (row-major): the inputs of the family's
    ``training_loss``, in that order. Captions are tokenized once, up front."""

    def __init__(self, pairs, codes: np.ndarray, tokenizer, text_length: int):
        from taichu.imagetext import caption_ids

        if not len(pairs):
            raise ValueError("no image-text pairs in this split")
        codes = np.asarray(codes)
        if len(codes) != len(pairs):
            raise ValueError(f"{len(codes)} code grids for {len(pairs)} pairs")
        self.input_ids, _ = caption_ids(tokenizer, [pair.text for pair in pairs], text_length)
        self.image_codes = codes.reshape(len(codes), -1).astype(np.int64)

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, indices) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64)
        return {"input_ids": self.input_ids[indices], "image_codes": self.image_codes[indices]}


# ----------------------------------------------------------------------------- the tokenizer

def encode_images(model_dir, images, backend: str) -> np.ndarray:
    """Codes [n, h, w] of ``images`` by the image tokenizer in ``model_dir`` (tests replace
    this function to give codes without a trained tokenizer)."""
    from taichu.image_tokens import tokenize_images

    return tokenize_images(model_dir, images, backend)


def check_image_tokenizer(config, model_dir) -> None:
    """Raise ValueError unless ``model_dir`` is a vqvae model whose codebook and grid are
    the DALL-E's (model.codebook_size, model.image_grid)."""
    from taichu.config import load_config

    model_dir = Path(model_dir)
    if not (model_dir / "config.yaml").is_file():
        raise ValueError(f"data.image_tokenizer {model_dir}: not a model directory (no config.yaml); "
                         "train one with `taichu train configs/vqvae/...`")
    tokenizer = load_config(model_dir)
    if tokenizer.family != "vqvae":
        raise ValueError(f"data.image_tokenizer {model_dir}: a {tokenizer.family} model, not an image "
                         "tokenizer (vqvae)")
    m, t = config.model, tokenizer.model
    if t.codebook.size != m.codebook_size:
        raise ValueError(f"data.image_tokenizer {model_dir}: its codebook has {t.codebook.size} codes, "
                         f"model.codebook_size is {m.codebook_size}")
    if t.grid != m.image_grid:
        raise ValueError(f"data.image_tokenizer {model_dir}: it writes {t.grid}x{t.grid} codes per image, "
                         f"model.image_grid is {m.image_grid}")


def directory_fingerprint(model_dir) -> str:
    """sha256 of every file of a model directory (names and contents)."""
    h = hashlib.sha256(b"taichu-model-dir-v1")
    for path in sorted(p for p in Path(model_dir).iterdir() if p.is_file()):
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def default_backend() -> str:
    """MindSpore if installed (the project's first backend), else PyTorch."""
    for backend in ("mindspore", "torch"):
        if importlib.util.find_spec(backend) is not None:
            return backend
    raise RuntimeError("neither mindspore nor torch is installed: the image tokenizer needs one")


# ----------------------------------------------------------------------------- cache

def cache_root(data) -> Path:
    """(data.cache_dir or $TAICHU_CACHE or ~/.cache/taichu) / image_codes."""
    if data.cache_dir:
        return Path(data.cache_dir).expanduser() / "image_codes"
    root = os.environ.get("TAICHU_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "taichu") / "image_codes"


def _read_cache(path: Path, key: str, counts: tuple[int, int]) -> np.ndarray:
    index = json.loads((path / "index.json").read_text(encoding="utf-8"))
    codes = np.load(path / "codes.npy", allow_pickle=False)
    if index.get("format") != CODES_FORMAT or index.get("key") != key:
        raise ValueError(f"image code cache {path} belongs to other data (key {index.get('key')}); "
                         "delete the folder")
    if codes.ndim != 3 or len(codes) != sum(counts) or (index["train"], index["test"]) != counts:
        raise ValueError(f"image code cache {path} is damaged ({codes.dtype} {codes.shape}, index says "
                         f"{index['train']} + {index['test']} images); delete the folder")
    return codes


def load_caption_codes(config, rank: int = 0) -> CaptionCodes:
    """The pairs ``config.data`` names (split as the image-text families split them) with
    their images' codes, from the cache or encoded now (rank 0; other ranks wait for it)."""
    from taichu.imagetext import load_data_config

    data = config.data
    if data.image_tokenizer is None:
        raise ValueError("data.image_tokenizer: the dalle family trains on image codes; name a vqvae "
                         "model directory (e.g. the final/ of `taichu train configs/vqvae/vqvae-small.yaml`)")
    check_image_tokenizer(config, data.image_tokenizer)
    pairs = load_data_config(data)
    tokenizer_fingerprint = directory_fingerprint(data.image_tokenizer)
    key = hashlib.sha256(json.dumps([CODES_FORMAT, tokenizer_fingerprint, pairs.fingerprint]).encode()).hexdigest()
    counts = (len(pairs.train), len(pairs.test))
    path = cache_root(data) / key[:16]
    if rank != 0:
        deadline = time.time() + CACHE_WAIT_SECONDS
        while not (path / "index.json").is_file() and time.time() < deadline:
            time.sleep(1)
    if (path / "index.json").is_file():
        codes = _read_cache(path, key, counts)
    else:
        backend = data.image_tokenizer_backend or default_backend()
        start = time.time()
        codes = np.asarray(encode_images(data.image_tokenizer, [pair.load() for pair in pairs.train + pairs.test],
                                         backend))
        index = {"format": CODES_FORMAT, "key": key, "image_tokenizer": str(Path(data.image_tokenizer).resolve()),
                 "image_tokenizer_fingerprint": tokenizer_fingerprint, "pairs": pairs.name,
                 "pairs_fingerprint": pairs.fingerprint, "train": counts[0], "test": counts[1],
                 "backend": backend, "shape": list(codes.shape), "dtype": str(codes.dtype)}
        write_cache_folder(path, {"codes": codes}, index)
        print(f"image codes of {pairs.name}: {counts[0]} train + {counts[1]} held-out images encoded by "
              f"{data.image_tokenizer} in {backend} ({time.time() - start:.0f} s), cached in {path}", flush=True)
    m = config.model
    if codes.shape[1:] != (m.image_grid, m.image_grid) or codes.min() < 0 or codes.max() >= m.codebook_size:
        raise ValueError(f"image codes {codes.shape[1:]} in [{codes.min()}, {codes.max()}] do not fit "
                         f"model.image_grid {m.image_grid} and codebook_size {m.codebook_size}")
    return CaptionCodes(pairs.train, codes[:counts[0]], pairs.test, codes[counts[0]:], pairs.name,
                        pairs.fingerprint, key)

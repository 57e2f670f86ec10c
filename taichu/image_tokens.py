"""The image tokenizer (``vqvae`` family) at work: training batches, images -> codes,
codes -> images, and how well it reconstructs (issue 17 part 1).

numpy + pillow here; a framework is imported only when a model is loaded
(``taichu.api.load_model``), in the backend asked for.

- ``ImageBatches``: the ``image_tokenizer`` task's data (taichu/train.py): pixels normalised
  with the model's mean/std, each training image flipped horizontally with probability 1/2,
  and the dead-code restart draws (a score and a grid position per image and code), all from
  ``numpy.random.default_rng([seed, step, index])``.
- ``tokenize_images(model_dir, images, backend)``: codes ``[n, h, w]``.
- ``decode_codes(model_dir, codes, backend)``: uint8 images ``[n, S, S, 3]``.
- ``reconstruction_report(model_dir, source, backend)``: PSNR on the held-out split and
  codebook usage.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from taichu.families.vqvae import code_usage, psnr
# normalise / denormalise live in taichu.images (numpy only: export.runtime's image decoder
# shares denormalise without importing pydantic); imported here under their old home.
from taichu.images import _is_single, crop_and_resize, denormalise, load_image, normalise

BATCH = 64   # images per forward pass in inference


class ImageBatches:
    """``batch(indices, step)``: ``pixel_values`` float32 [B, 3, S, S], ``restart_score``
    float32 [B, K] uniform [0, 1), ``restart_position`` int64 [B, K] uniform in [0, h w);
    ``step=None``: evaluation, the same draws every time and no flips."""

    stochastic = True
    EVAL_STEP = 2**31 - 1   # the draw stream of evaluation batches, never a training step

    def __init__(self, pairs, config, seed: int = 0, flip: bool = True):
        m = config.model
        self.pairs, self.seed, self.flip = list(pairs), int(seed), bool(flip)
        if not self.pairs:
            raise ValueError("no images in this split")
        self.size, self.codes, self.positions = m.image_size, m.codebook.size, m.grid ** 2
        self.mean = np.asarray(m.pixel_mean, np.float32)
        self.std = np.asarray(m.pixel_std, np.float32)
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def pixels(self, index: int) -> np.ndarray:
        """uint8 [S, S, 3]: the image resized and centre-cropped (taichu.images), kept."""
        if index not in self._cache:
            self._cache[index] = crop_and_resize(self.pairs[index].load(), self.size)
        return self._cache[index]

    def batch(self, indices, step: int | None = None) -> dict[str, np.ndarray]:
        training = step is not None
        step = self.EVAL_STEP if step is None else int(step)
        n = len(indices)
        pixels = np.empty((n, self.size, self.size, 3), np.uint8)
        score = np.empty((n, self.codes), np.float32)
        position = np.empty((n, self.codes), np.int64)
        for row, i in enumerate(indices):
            rng = np.random.default_rng([self.seed, step, int(i)])
            image = self.pixels(int(i))
            flip = rng.random() < 0.5
            pixels[row] = image[:, ::-1] if (training and self.flip and flip) else image
            score[row] = rng.random(self.codes, dtype=np.float32)
            position[row] = rng.integers(0, self.positions, self.codes)
        return {"pixel_values": normalise(pixels, self.mean, self.std), "restart_score": score,
                "restart_position": position}


def load_split(config, source=None):
    """``source`` (None: config.data.source) split into train and test as config.data says
    (taichu.vision_data.load_images); digits and scenes drawn at the model's size (scenes
    of under 32 px, the smallest drawn, are drawn at 32 and resized)."""
    from taichu.imagetext import MIN_SCENE_SIZE
    from taichu.vision_data import load_images

    data, size = config.data, config.model.image_size
    return load_images(source if source is not None else data.source, data.validation_fraction,
                       data.split_seed, image_size=max(size, MIN_SCENE_SIZE), scene_count=data.scene_count,
                       scene_seed=data.scene_seed)


# ----------------------------------------------------------------------------- a loaded model

class _Tokenizer:
    """A vqvae model directory loaded in ``backend``, with numpy in and out."""

    def __init__(self, model_dir, backend: str):
        from taichu.api import load_model

        self.model = load_model(model_dir, backend=backend)
        self.config = self.model.config
        if self.config.family != "vqvae":
            raise ValueError(f"{model_dir}: a {self.config.family} model, not an image tokenizer (vqvae)")
        self.backend = backend
        m = self.config.model
        self.mean, self.std = m.pixel_mean, m.pixel_std

    def _run(self, method: str, array: np.ndarray) -> np.ndarray:
        if self.backend == "torch":
            import torch

            with torch.no_grad():
                return getattr(self.model, method)(torch.from_numpy(np.ascontiguousarray(array))).numpy()
        import mindspore as ms

        return getattr(self.model, method)(ms.Tensor(np.ascontiguousarray(array))).asnumpy()

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """normalised float32 [n, 3, S, S] -> codes int64 [n, h, w]."""
        parts = [self._run("encode", pixels[i:i + BATCH]) for i in range(0, len(pixels), BATCH)]
        grid = self.config.model.grid
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros((0, grid, grid), np.int64)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes [n, h, w] -> uint8 [n, 2^k h, 2^k w, 3]."""
        k = self.config.model.codebook.size
        codes = np.asarray(codes)
        if codes.ndim != 3 or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes must be integers [n, height, width], got {codes.dtype} {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= k):
            raise ValueError(f"codes must be in [0, {k}) (the codebook size), got [{codes.min()}, {codes.max()}]")
        ids = codes.astype(np.int32 if self.backend == "mindspore" else np.int64)
        parts = [denormalise(self._run("decode", ids[i:i + BATCH]), self.mean, self.std)
                 for i in range(0, len(ids), BATCH)]
        side = 2 ** self.config.model.num_downsamples
        return (np.concatenate(parts) if parts
                else np.zeros((0, codes.shape[1] * side, codes.shape[2] * side, 3), np.uint8))

    def images(self, images: Sequence) -> np.ndarray:
        """uint8 [n, S, S, 3]: each image loaded, resized and centre-cropped (taichu.images)."""
        size = self.config.model.image_size
        out = np.empty((len(images), size, size, 3), np.uint8)
        for i, image in enumerate(images):
            out[i] = crop_and_resize(load_image(image), size)
        return out


def code_dtype(codebook_size: int):
    """uint16 codes when the codebook fits (<= 65536 entries), else int32."""
    return np.uint16 if codebook_size <= 2**16 else np.int32


def tokenize_images(model_dir, images: Sequence, backend: str = "torch") -> np.ndarray:
    """Codes [n, h, w] (uint16, or int32 for a codebook over 65536) of ``images`` (paths,
    bytes, PIL images or uint8 arrays, each resized and centre-cropped to the model's size
    as taichu.images.preprocess does)."""
    tokenizer = _Tokenizer(model_dir, backend)
    items = [images] if _is_single(images) else list(images)
    pixels = normalise(tokenizer.images(items), tokenizer.mean, tokenizer.std)
    return tokenizer.encode(pixels).astype(code_dtype(tokenizer.config.model.codebook.size))


def decode_codes(model_dir, codes: np.ndarray, backend: str = "torch") -> np.ndarray:
    """uint8 images [n, 2^k h, 2^k w, 3] of codes [n, h, w] (the model's pixels
    denormalised with its pixel_mean / pixel_std, rounded and clipped to 0-255)."""
    return _Tokenizer(model_dir, backend).decode(codes)


def reconstruction_report(model_dir, source=None, backend: str = "torch", limit: int | None = None) -> dict:
    """How well the tokenizer reconstructs held-out images: ``source`` (``digits``,
    ``scenes``, a .jsonl, a folder or a list; None: the model's training source) split as
    its config's data section splits it, the held-out part (the first ``limit`` images).

    Returns psnr (mean over images of 10 log10(255^2 / MSE), on 0-255 pixels after the
    round trip through codes), psnr_mean_colour (the baseline that paints each image its
    own mean colour), usage (distinct codes / codebook size) and perplexity (of the codes'
    histogram), images and codebook_size."""
    tokenizer = _Tokenizer(model_dir, backend)
    m = tokenizer.config.model
    images = load_split(tokenizer.config, source)
    pairs = images.test[:limit] if limit else images.test
    original = tokenizer.images([pair.load() for pair in pairs])
    codes = tokenizer.encode(normalise(original, tokenizer.mean, tokenizer.std))
    restored = tokenizer.decode(codes)
    mean_colour = np.broadcast_to(np.rint(original.reshape(len(original), -1, 3).mean(axis=1))
                                  [:, None, None, :], original.shape).astype(np.uint8)
    usage, perplexity = code_usage(codes, m.codebook.size)
    return {"psnr": float(np.mean(psnr(original, restored))),
            "psnr_mean_colour": float(np.mean(psnr(original, mean_colour))),
            "usage": usage, "perplexity": perplexity, "images": len(pairs),
            "codebook_size": m.codebook.size, "source": images.name}

"""Image loading and preprocessing, defined once for both backends and ONNX inference.

numpy + pillow only. ``preprocess`` is the single definition of how a picture becomes
model input; training (MindSpore or PyTorch), evaluation and ONNX Runtime inference
all call it, so the same file gives bit-identical arrays in every process.

The pipeline is CLIP's (and Hugging Face ``CLIPImageProcessor``'s pillow path):

1. ``load_image``: decode with pillow, apply the EXIF orientation, convert to 8-bit RGB
   (see ``to_rgb`` for grey-scale, palette, alpha, CMYK and 16-bit images).
2. Resize so that the shorter side is ``image_size``: a ``W x H`` image with ``W <= H``
   becomes ``image_size x int(image_size * H / W)`` (the long side is truncated, not
   rounded; likewise with the roles swapped), with
   ``PIL.Image.resize(..., resample=Image.Resampling.BICUBIC)`` (pillow's bicubic,
   a = -0.5, antialiased when shrinking, no ``reducing_gap``). An image whose shorter
   side already equals ``image_size`` is resized too (a no-op in pillow).
3. Center crop ``image_size x image_size``: ``top = (H' - image_size) // 2``,
   ``left = (W' - image_size) // 2`` (floor: an odd surplus leaves the extra row or
   column at the bottom / right).
4. ``x = pixels.astype(float32) / float32(255)``, then
   ``x = (x - float32(mean[c])) / float32(std[c])`` per channel, all in float32.
5. Channels first: ``float32 [batch, 3, image_size, image_size]``, C-contiguous.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

# OpenAI CLIP's statistics (also Hugging Face's OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Transparent pixels are composited onto this colour.
BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}

ImageSource = Union[str, Path, bytes, bytearray, memoryview, Image.Image, np.ndarray]


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of ``image``; never refuses a colour mode pillow can convert.

    - RGB: returned as is (a copy only when needed).
    - Anything with transparency (RGBA, LA, PA, RGBa, La, or P / L / RGB with a
      ``transparency`` entry): converted to RGBA and alpha-composited onto white
      (255, 255, 255): a fully transparent pixel becomes white, a half transparent
      red one pink. Hugging Face's ``convert_to_rgb`` does the same.
    - 16-bit and 32-bit integer grey (I;16*, I): values are taken as 0..65535 and
      mapped to 0..255 by ``round(v / 257)`` (clipped), not clipped at 255 as pillow's
      own conversion would.
    - L, 1, P, CMYK, YCbCr, F and other modes: pillow's ``convert("RGB")`` (grey
      copied to the three channels; CMYK by pillow's formula, no ICC colour management).
    """
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "La":  # premultiplied; pillow converts it to RGBA only through LA
        image = image.convert("LA")
    if "A" in image.getbands() or "a" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _describe(source) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return f"<{type(source).__name__} of {len(source)} bytes>"


def load_image(source: ImageSource) -> Image.Image:
    """Decode a path, encoded bytes, a PIL image or a uint8 array into an RGB PIL image.

    Files and bytes are fully decoded here (not lazily), their EXIF orientation is
    applied (``ImageOps.exif_transpose``), and only the first frame of an animation or
    multi-page file is kept. Colour modes are converted by ``to_rgb``. Arrays must be
    uint8, ``[H, W]`` (grey), ``[H, W, 1]``, ``[H, W, 3]`` (RGB) or ``[H, W, 4]`` (RGBA).

    Raises FileNotFoundError for a missing path and ValueError naming the file for
    anything pillow cannot decode: a non-image, an unknown format, a truncated file.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        return to_rgb(_from_array(source))
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"image file {path} not found")
        opener, name = path, str(path)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        opener, name = io.BytesIO(bytes(source)), _describe(source)
    else:
        raise TypeError(f"cannot load an image from {type(source).__name__} (expected a path, "
                        "bytes, a PIL image or a uint8 array)")
    try:
        with Image.open(opener) as image:
            image.load()  # decode everything now: a truncated file fails here, not later
            image = ImageOps.exif_transpose(image)
            return to_rgb(image).copy()
    except Image.DecompressionBombError as err:
        raise ValueError(f"{name}: refused by pillow's decompression bomb check ({err})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        # UnidentifiedImageError (not an image) is an OSError; truncated data raises
        # OSError ("image file is truncated"), SyntaxError or EOFError depending on format.
        raise ValueError(f"{name}: not a readable image ({type(err).__name__}: {err})") from None


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 (0..255), got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(array), mode="L")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(array), mode="RGB" if array.shape[2] == 3 else "RGBA")
    raise ValueError(f"image arrays must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got shape "
                     f"{list(array.shape)}")


def resized_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to ``image_size`` (long side truncated)."""
    if width <= height:
        return image_size, int(image_size * height / width)
    return int(image_size * width / height), image_size


def _check_stats(name: str, values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32).reshape(-1)
    if array.shape != (3,) or not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be three finite numbers (R, G, B), got {values!r}")
    return array


def _is_single(images) -> bool:
    return isinstance(images, (str, Path, bytes, bytearray, memoryview, Image.Image)) or (
        isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim in (2, 3))


def preprocess(images: ImageSource | Iterable[ImageSource], image_size: int,
               mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """Model input ``float32 [batch, 3, image_size, image_size]`` (see the module docstring).

    ``images`` is one image or an iterable of them; each is anything ``load_image``
    accepts (a path, encoded bytes, a PIL image in any mode, a uint8 array). A single
    image (including a 2-D or 3-D uint8 array) gives a batch of one; a 4-D uint8 array
    ``[batch, H, W, C]`` is a batch. Pixels are resized (bicubic, shorter side to
    ``image_size``), center cropped, scaled to [0, 1] and normalised by ``mean``/``std``.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size <= 0:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    image_size = int(image_size)
    mean32, std32 = _check_stats("mean", mean), _check_stats("std", std)
    if np.any(std32 <= 0):
        raise ValueError(f"std must be positive, got {std!r}")
    items = [images] if _is_single(images) else list(images)
    out = np.empty((len(items), 3, image_size, image_size), dtype=np.float32)
    for i, item in enumerate(items):
        out[i] = _normalise(crop_and_resize(load_image(item), image_size), mean32, std32)
    return out


def normalise(pixels: np.ndarray, mean, std) -> np.ndarray:
    """uint8 [n, S, S, 3] -> float32 [n, 3, S, S], as ``preprocess`` does (the image
    tokenizer's training and encoding input, taichu.image_tokens)."""
    x = pixels.astype(np.float32) / np.float32(255)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def denormalise(pixels: np.ndarray, mean, std) -> np.ndarray:
    """float [n, 3, S, S] normalised -> uint8 [n, S, S, 3] (in float64: times std plus mean,
    times 255, rounded half to even by np.rint, clipped to 0-255). The one way decoded pixels
    become images: taichu.image_tokens.decode_codes and export.runtime's image decoder."""
    x = pixels.astype(np.float64).transpose(0, 2, 3, 1) * np.asarray(std, np.float64) + np.asarray(mean, np.float64)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def crop_and_resize(image: Image.Image, image_size: int) -> np.ndarray:
    """uint8 ``[image_size, image_size, 3]``: steps 2 and 3 of the module docstring."""
    width, height = image.size
    new_width, new_height = resized_size(width, height, image_size)
    image = image.resize((new_width, new_height), resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.uint8)
    top, left = (new_height - image_size) // 2, (new_width - image_size) // 2
    return pixels[top:top + image_size, left:left + image_size]


def _normalise(pixels: np.ndarray, mean32: np.ndarray, std32: np.ndarray) -> np.ndarray:
    x = pixels.astype(np.float32) / np.float32(255)
    x = (x - mean32) / std32
    return x.transpose(2, 0, 1)

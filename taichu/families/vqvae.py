"""The discrete image tokenizer (design.md §2.4, §2.7; issue 17 part 1): a VQ-VAE.

An image becomes a grid of codebook indices and back:

  encoder    3x3 conv -> per resolution: residual blocks, then a 2x2 stride-2
             downsampling (k of them for k + 1 entries of ``channels``) -> activation ->
             1x1 conv to ``code_dim``: z_e [B, D, S / 2^k, S / 2^k]
  quantizer  each vector of z_e is replaced by its nearest codebook entry (squared
             Euclidean distance; the first of equal ones); gradients pass straight through
             (z_e + sg(z_q - z_e), van den Oord et al. 2017)
  decoder    3x3 conv -> per resolution, coarsest first: residual blocks, then a 2x2
             stride-2 transposed convolution -> activation -> 3x3 conv to the pixels

A residual block is x + conv1x1(act(conv3x3(act(x)))) (the VQ-VAE paper's, no norm). The
stride-2 (transposed) convolutions are Linear layers over 2x2 cells (space-to-depth /
depth-to-space, ordered (dy, dx, channel)): the same numbers as nn.Conv2d(kernel 2,
stride 2), a matmul in both backends (MindSpore's CPU conv with stride = kernel is ~80x
slower, design.md §4).

Loss = reconstruction (``l1`` or ``l2``, the mean over the normalised pixels) + beta *
commitment ||z_e - sg(e)||^2 (mean over the vector elements) + for ``update: loss`` the
codebook loss ||sg(z_e) - e||^2. The perceptual term the issue mentions as optional is not
implemented.

Codebook update (``codebook.update``):
- ``ema`` (VQ-VAE-2 / Sonnet's VectorQuantizerEMA): after each optimizer update, with n_k
  the number of the global batch's vectors assigned to code k and s_k their sum,
      cluster_size <- decay * cluster_size + (1 - decay) * n
      embed_sum    <- decay * embed_sum + (1 - decay) * s
      N_k = (cluster_size_k + eps) / (sum(cluster_size) + K eps) * sum(cluster_size)
      codebook_k = embed_sum_k / N_k                       (Laplace smoothing)
  The codebook is not trained by the optimizer. Our choice (not Sonnet's zero start with
  debiasing, not rosinality's zero cluster sizes that blow unused codes up to 1/eps):
  cluster_size starts at 1 and embed_sum at the initial codebook, so an unused code keeps
  its vector.
- ``loss``: the codebook is a trained parameter (codebook loss above); cluster_size and
  embed_sum are kept by the same EMA, for usage and restarts (and so that the tensors do
  not depend on the rule).

Dead-code restarts (``codebook.restart``, on by default): after the EMA step, a code whose
cluster_size is below ``restart_threshold`` takes a random encoder output of the current
global batch as its vector, cluster_size = threshold and embed_sum = threshold * vector.
Which output: the data pipeline draws per image and code a score (uniform [0, 1)) and a grid
position; code k takes the vector at its position of the image with the largest score in
the global batch. Drawn in numpy per (seed, step, image), so both backends, any split into
micro-batches and any number of data-parallel ranks restart the same codes with the same
vectors.

Canonical names (torch state_dict order): ``encoder.*``, ``quantizer.codebook`` [K, D],
``quantizer.cluster_size`` [K], ``quantizer.embed_sum`` [K, D], ``decoder.*``. Pixels are
normalised with ``model.pixel_mean`` / ``model.pixel_std`` (CLIP's by default), which
``taichu.image_tokens`` uses to turn decoded pixels back into 0-255 images.
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field, StrictBool, StrictInt, model_validator

from taichu.config import Section, TrainConfig
from taichu.families import Family, TensorSpec, linear_specs
from taichu.images import CLIP_MEAN, CLIP_STD
from taichu.parallel import ParallelConfig


class CodebookConfig(Section):
    """The codebook, its update rule and its dead-code restarts (see the module docstring)."""

    size: StrictInt = Field(512, gt=1)            # K
    dim: StrictInt = Field(64, gt=0)              # D
    beta: float = Field(0.25, ge=0.0)             # commitment weight
    update: Literal["ema", "loss"] = "ema"
    decay: float = Field(0.99, ge=0.0, lt=1.0)
    epsilon: float = Field(1e-5, gt=0.0)
    restart: StrictBool = True
    # In EMA assignments per optimizer update (cluster_size's unit).
    restart_threshold: float = Field(1.0, gt=0.0)


class VQVAEModelConfig(Section):
    image_size: StrictInt = Field(gt=0)
    num_channels: StrictInt = 3
    # Width at each resolution, finest first: len(channels) - 1 downsamplings by 2.
    channels: list[StrictInt] = Field(min_length=2)
    # The decoder's widths, same indexing (finest first); null: the encoder's.
    decoder_channels: list[StrictInt] | None = None
    num_res_blocks: StrictInt = Field(1, ge=0)    # per resolution, encoder and decoder
    activation: Literal["relu", "gelu"] = "relu"
    reconstruction: Literal["l1", "l2"] = "l2"
    codebook: CodebookConfig = CodebookConfig()
    pixel_mean: tuple[float, float, float] = CLIP_MEAN
    pixel_std: tuple[float, float, float] = CLIP_STD

    @property
    def num_downsamples(self) -> int:
        return len(self.channels) - 1

    @property
    def grid(self) -> int:
        return self.image_size // 2 ** self.num_downsamples

    @property
    def decoder_widths(self) -> list[int]:
        return list(self.decoder_channels or self.channels)

    @model_validator(mode="after")
    def _consistent(self) -> "VQVAEModelConfig":
        if self.num_channels != 3:
            raise ValueError(f"num_channels {self.num_channels}: the image pipeline gives RGB (3)")
        if self.image_size % 2 ** self.num_downsamples:
            raise ValueError(f"image_size {self.image_size} is not divisible by 2^{self.num_downsamples} "
                             f"({len(self.channels)} channel entries = {self.num_downsamples} downsamplings)")
        if self.decoder_channels is not None and len(self.decoder_channels) != len(self.channels):
            raise ValueError(f"decoder_channels has {len(self.decoder_channels)} entries, channels "
                             f"{len(self.channels)}: one per resolution in both")
        if any(c <= 0 for c in self.channels + self.decoder_widths):
            raise ValueError("channel widths must be positive")
        if any(s <= 0 for s in self.pixel_std):
            raise ValueError(f"pixel_std must be positive, got {self.pixel_std}")
        return self


class VQVAEDataConfig(Section):
    """Where the images come from (taichu.vision_data.load_images), split by image."""

    source: str | list[str] = "scenes"
    validation_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    split_seed: StrictInt = 0
    scene_count: StrictInt = Field(2000, gt=0)
    scene_seed: StrictInt = 0
    # Training images flipped horizontally with probability 1/2 (drawn per step and image).
    flip: StrictBool = True


class VQVAEConfig(Section):
    family: Literal["vqvae"]
    model: VQVAEModelConfig
    data: VQVAEDataConfig = VQVAEDataConfig()
    train: TrainConfig = TrainConfig()
    # Data parallel only (msrun / torchrun workers).
    parallel: ParallelConfig = ParallelConfig()


# ----------------------------------------------------------------------------- tensors

def _conv_specs(prefix: str, n_in: int, n_out: int, kernel: int) -> dict[str, TensorSpec]:
    return {f"{prefix}.weight": TensorSpec((n_out, n_in, kernel, kernel), "conv2d"),
            f"{prefix}.bias": TensorSpec((n_out,), "conv2d")}


def _blocks_specs(prefix: str, widths: list[int], count: int) -> dict[str, TensorSpec]:
    specs: dict[str, TensorSpec] = {}
    for level, width in enumerate(widths):
        for j in range(count):
            specs.update(_conv_specs(f"{prefix}.{level}.{j}.conv1", width, width, 3))
            specs.update(_conv_specs(f"{prefix}.{level}.{j}.conv2", width, width, 1))
    return specs


def tensor_specs(config: VQVAEConfig) -> dict[str, TensorSpec]:
    """State_dict order of torch_impl.vqvae.VQVAE. Decoder levels are listed coarsest
    first (the order the decoder runs them): decoder.blocks.0 is at the code grid."""
    m = config.model
    enc, dec = m.channels, m.decoder_widths[::-1]
    k, d = m.codebook.size, m.codebook.dim
    specs = _conv_specs("encoder.conv_in", m.num_channels, enc[0], 3)
    specs.update(_blocks_specs("encoder.blocks", enc, m.num_res_blocks))
    for i in range(m.num_downsamples):
        specs.update(linear_specs(f"encoder.downsamples.{i}.proj", 4 * enc[i], enc[i + 1]))
    specs.update(_conv_specs("encoder.conv_out", enc[-1], d, 1))
    specs["quantizer.codebook"] = TensorSpec((k, d), "parameter")
    specs["quantizer.cluster_size"] = TensorSpec((k,), "parameter")
    specs["quantizer.embed_sum"] = TensorSpec((k, d), "parameter")
    specs.update(_conv_specs("decoder.conv_in", d, dec[0], 3))
    specs.update(_blocks_specs("decoder.blocks", dec, m.num_res_blocks))
    for i in range(m.num_downsamples):
        specs.update(linear_specs(f"decoder.upsamples.{i}.proj", dec[i], 4 * dec[i + 1]))
    specs.update(_conv_specs("decoder.conv_out", dec[-1], m.num_channels, 3))
    return specs


def describe(config: VQVAEConfig) -> dict:
    m = config.model
    c = m.codebook
    counts: dict[str, int] = {}
    for name, spec in tensor_specs(config).items():
        part = name.split(".")[0]
        counts[part] = counts.get(part, 0) + int(np.prod(spec.shape, dtype=np.int64))
    update = (f"EMA (decay {c.decay}, eps {c.epsilon})" if c.update == "ema" else "codebook loss")
    restart = f", dead-code restarts below {c.restart_threshold}" if c.restart else ""
    return {
        "tokens": f"{m.image_size}x{m.image_size} image -> {m.grid}x{m.grid} codes of {c.size}",
        "encoder": (f"widths {m.channels}, {m.num_res_blocks} residual block(s) per resolution, "
                    f"{m.activation} ({counts['encoder']:,} parameters)"),
        "codebook": f"{c.size} x {c.dim}, {update}{restart}, beta {c.beta}",
        "decoder": f"widths {m.decoder_widths} ({counts['decoder']:,} parameters)",
        "loss": f"{m.reconstruction} reconstruction + {c.beta} x commitment"
                + (" + codebook loss" if c.update == "loss" else ""),
    }


FAMILY = Family(name="vqvae", module="vqvae", class_name="VQVAE", config_class=VQVAEConfig,
                tensor_specs=tensor_specs, describe=describe, task="image_tokenizer")


# ----------------------------------------------------------------------------- shared

def init_bound(fan_in: int) -> float:
    """torch's default Conv2d / Linear initialisation, written out for both backends:
    weights and biases uniform in +-1 / sqrt(fan_in)."""
    return 1.0 / math.sqrt(fan_in)


def psnr(reference: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Per image PSNR in dB of uint8 ``images`` against ``reference`` (both [n, ...]):
    10 log10(255^2 / MSE) over the image's 0-255 values, in float64; inf where equal."""
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = images.reshape(len(images), -1).astype(np.float64)
    mse = ((a - b) ** 2).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(255.0 ** 2 / mse)


def code_usage(codes: np.ndarray, codebook_size: int) -> tuple[float, float]:
    """(distinct codes used / codebook size, perplexity exp(H) of the codes' histogram)."""
    counts = np.bincount(np.asarray(codes).reshape(-1).astype(np.int64), minlength=codebook_size)
    p = counts[counts > 0] / counts.sum()
    return float((counts > 0).sum() / codebook_size), float(np.exp(-(p * np.log(p)).sum()))

"""The discrete image tokenizer (VQ-VAE) in MindSpore (issue 17 part 1), mirrored by
torch_impl/vqvae.py. taichu/families/vqvae.py has the config and the choices.

  ResBlock         x + conv1x1(act(conv3x3(act(x))))
  Downsample       2x2 stride-2 conv as space-to-depth + Linear
  Upsample         2x2 stride-2 transposed conv as Linear + depth-to-space
  Encoder          pixels -> z_e [B, D, h, w]
  VectorQuantizer  nearest code, straight-through estimator; codebook, cluster_size and
                   embed_sum (EMA state, written by after_step)
  Decoder          quantized vectors -> pixels
  VQVAE            encode(pixels) -> codes [B, h, w]; decode(codes) -> pixels;
                   construct(pixels) -> reconstruction

Training interface, called by the shared trainer (inputs from taichu.image_tokens.ImageBatches):
- ``training_loss(model, pixel_values [B, 3, S, S], restart_score [B, K], restart_position
  [B, K])`` -> (loss, counts [1, K], sums [1, K, D], best_score [1, K], candidates [1, K, D]);
  plain tensor math with static shapes, so it compiles in graph mode;
- ``after_step(model, counts, sums, best_scores, candidates)`` (each concatenated over the
  micro-batches and ranks): the EMA step and the dead-code restarts, written with ops.assign.
Attribute paths equal the PyTorch module's, so the canonical names are the parameter names.
The EMA state (and the codebook for update ``ema``) are Parameters with requires_grad=False:
outside trainable_params(), inside the canonical state dict. Uses mindspore.nn/ops rather
than mint (CPU kernels).
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import nn, ops
from mindspore.common.initializer import Uniform, initializer

from taichu.families.vqvae import VQVAEConfig, init_bound
from mindspore_impl.gpt import GELU, Dense

# Index outputs as int32: what MindSpore's CPU Gather and OneHot take.
_ARGMIN_CODES = ops.Argmin(axis=1, output_type=ms.int32)
_ARGMAX_ROWS = ops.Argmax(axis=0, output_type=ms.int32)


def _activation(name: str) -> nn.Cell:
    return nn.ReLU() if name == "relu" else GELU()


def _conv(n_in: int, n_out: int, kernel: int) -> nn.Conv2d:
    # MindSpore idiom: padding needs pad_mode "pad"; a 1x1 conv pads nothing ("valid").
    if kernel == 1:
        return nn.Conv2d(n_in, n_out, kernel_size=1, pad_mode="valid", has_bias=True)
    return nn.Conv2d(n_in, n_out, kernel_size=kernel, pad_mode="pad", padding=kernel // 2, has_bias=True)


class ResBlock(nn.Cell):
    def __init__(self, width: int, activation: str):
        super().__init__()
        self.conv1 = _conv(width, width, 3)
        self.conv2 = _conv(width, width, 1)
        self.act = _activation(activation)

    def construct(self, x):
        return x + self.conv2(self.act(self.conv1(self.act(x))))


class Downsample(nn.Cell):
    """[b, c, h, w] -> [b, out, h/2, w/2]: each 2x2 cell flattened (dy, dx, channel), then
    a Linear (MindSpore's CPU Conv2d with stride = kernel is ~80x slower than this matmul)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.proj = Dense(4 * n_in, n_out)

    def construct(self, x):
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 3, 5, 1).reshape(b, h // 2, w // 2, 4 * c)
        return self.proj(x).transpose(0, 3, 1, 2)


class Upsample(nn.Cell):
    """[b, c, h, w] -> [b, out, 2h, 2w]: a Linear to 4 * out channels ordered (dy, dx,
    channel), then depth-to-space (a 2x2 stride-2 transposed convolution)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.n_out = n_out
        self.proj = Dense(n_in, 4 * n_out)

    def construct(self, x):
        b, _, h, w = x.shape
        x = self.proj(x.transpose(0, 2, 3, 1)).reshape(b, h, w, 2, 2, self.n_out)
        return x.transpose(0, 5, 1, 3, 2, 4).reshape(b, self.n_out, 2 * h, 2 * w)


class Encoder(nn.Cell):
    def __init__(self, config: VQVAEConfig):
        super().__init__()
        m = config.model
        widths = m.channels
        self.conv_in = _conv(m.num_channels, widths[0], 3)
        self.blocks = nn.CellList([nn.CellList([ResBlock(w, m.activation) for _ in range(m.num_res_blocks)])
                                   for w in widths])
        self.downsamples = nn.CellList([Downsample(widths[i], widths[i + 1]) for i in range(len(widths) - 1)])
        self.conv_out = _conv(widths[-1], m.codebook.dim, 1)
        self.act = _activation(m.activation)
        self.num_downsamples = len(widths) - 1

    def construct(self, pixels):
        x = self.conv_in(pixels)
        level = 0
        for blocks in self.blocks:
            for block in blocks:
                x = block(x)
            if level < self.num_downsamples:
                x = self.downsamples[level](x)
            level = level + 1
        return self.conv_out(self.act(x))


class Decoder(nn.Cell):
    """Levels coarsest first (the decoder's widths reversed)."""

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        m = config.model
        widths = m.decoder_widths[::-1]
        self.conv_in = _conv(m.codebook.dim, widths[0], 3)
        self.blocks = nn.CellList([nn.CellList([ResBlock(w, m.activation) for _ in range(m.num_res_blocks)])
                                   for w in widths])
        self.upsamples = nn.CellList([Upsample(widths[i], widths[i + 1]) for i in range(len(widths) - 1)])
        self.conv_out = _conv(widths[-1], m.num_channels, 3)
        self.act = _activation(m.activation)
        self.num_upsamples = len(widths) - 1

    def construct(self, z):
        x = self.conv_in(z)
        level = 0
        for blocks in self.blocks:
            for block in blocks:
                x = block(x)
            if level < self.num_upsamples:
                x = self.upsamples[level](x)
            level = level + 1
        return self.conv_out(self.act(x))


class VectorQuantizer(nn.Cell):
    """The codebook [K, D] (trained for update ``loss``, not for ``ema``) and the EMA state
    cluster_size [K], embed_sum [K, D] (never trained, written by after_step)."""

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        c = config.model.codebook
        self.size, self.dim = c.size, c.dim
        codebook = initializer(Uniform(1.0 / c.size), (c.size, c.dim), ms.float32).init_data().asnumpy()
        self.codebook = ms.Parameter(ms.Tensor(codebook), name="codebook", requires_grad=c.update == "loss")
        self.cluster_size = ms.Parameter(ms.Tensor(np.ones(c.size, np.float32)), name="cluster_size",
                                         requires_grad=False)
        self.embed_sum = ms.Parameter(ms.Tensor(codebook.copy()), name="embed_sum", requires_grad=False)
        self.on_value, self.off_value = ms.Tensor(1.0, ms.float32), ms.Tensor(0.0, ms.float32)

    def nearest(self, flat):
        """[N] int32: the nearest code of each row of ``flat`` [N, D] by squared distance
        (|e|^2 - 2 z.e; |z|^2 is the same for every code), the first of equal ones."""
        codebook = ops.stop_gradient(self.codebook)
        distances = ops.pow(codebook, 2).sum(axis=1) - 2.0 * ops.matmul(ops.stop_gradient(flat), codebook.T)
        return _ARGMIN_CODES(distances)

    def construct(self, z):
        """z [B, D, h, w] -> (straight-through z_q [B, D, h, w], z_q itself (gradients to the
        codebook), codes [B, h, w], flat z [B h w, D])."""
        b, d, h, w = z.shape
        flat = z.transpose(0, 2, 3, 1).reshape(-1, d)
        codes = self.nearest(flat)
        quantized = ops.gather(self.codebook, codes, 0).reshape(b, h, w, d).transpose(0, 3, 1, 2)
        straight = z + ops.stop_gradient(quantized - z)
        return straight, quantized, codes.reshape(b, h, w), flat


class VQVAE(nn.Cell):
    def __init__(self, config: VQVAEConfig):
        super().__init__()
        m = config.model
        c = m.codebook
        self.config = config
        # Plain numbers, so graph mode reads constants instead of the pydantic config.
        self.beta, self.codebook_update, self.reconstruction = float(c.beta), c.update, m.reconstruction
        self.encoder = Encoder(config)
        self.quantizer = VectorQuantizer(config)
        self.decoder = Decoder(config)
        self._init_weights()

    def _init_weights(self):
        """torch's default, written out (taichu.families.vqvae.init_bound): weights and
        biases uniform in +-1/sqrt(fan_in)."""
        for _, cell in self.cells_and_names():
            if isinstance(cell, (nn.Dense, nn.Conv2d)):
                bound = init_bound(int(np.prod(cell.weight.shape[1:])))
                for param in (cell.weight, cell.bias):
                    param.set_data(initializer(Uniform(bound), param.shape, param.dtype))

    def encode(self, pixels):
        """[B, 3, S, S] normalised pixels -> codes [B, S/2^k, S/2^k] int32."""
        return self.quantizer(self.encoder(pixels))[2]

    def decode(self, codes):
        """codes [B, h, w] -> pixels [B, 3, 2^k h, 2^k w] (normalised)."""
        z = ops.gather(self.quantizer.codebook, codes.astype(ms.int32), 0).transpose(0, 3, 1, 2)
        return self.decoder(z)

    def construct(self, pixels):
        """The reconstruction of ``pixels`` [B, 3, S, S] through the codes."""
        return self.decoder(self.quantizer(self.encoder(pixels))[0])


# ----------------------------------------------------------------------------- losses

def loss_terms(model: VQVAE, pixel_values, restart_score=None, restart_position=None) -> dict:
    """Every term of the loss (see training_loss), the codes and the reconstruction."""
    q = model.quantizer
    z = model.encoder(pixel_values)
    straight, quantized, codes, flat = q(z)
    pixels = model.decoder(straight)
    error = pixels.astype(ms.float32) - pixel_values.astype(ms.float32)
    if model.reconstruction == "l1":
        reconstruction = ops.abs(error).mean()
    else:
        reconstruction = ops.pow(error, 2).mean()
    commitment = ops.pow(z.astype(ms.float32) - ops.stop_gradient(quantized).astype(ms.float32), 2).mean()
    codebook = ops.pow(ops.stop_gradient(z).astype(ms.float32) - quantized.astype(ms.float32), 2).mean()
    # The EMA's statistics of this micro-batch: assignments and sums per code.
    flat = ops.stop_gradient(flat).astype(ms.float32)
    onehot = ops.one_hot(codes.reshape(-1), q.size, q.on_value, q.off_value)      # [N, K]
    terms = {"reconstruction": reconstruction, "commitment": commitment, "codebook": codebook,
             "codes": codes, "pixels": pixels, "counts": onehot.sum(axis=0, keepdims=True),
             "sums": ops.matmul(onehot.T, flat).expand_dims(0)}
    if restart_score is not None:
        # Restart candidates: code k takes the vector at restart_position[b, k] of the image b
        # with the largest restart_score[b, k].
        positions = flat.shape[0] // pixel_values.shape[0]
        best = _ARGMAX_ROWS(restart_score)                                         # [K]
        chosen = ops.gather_elements(restart_position.astype(ms.int32), 0, best.expand_dims(0))[0]
        terms["best_score"] = ops.gather_elements(restart_score, 0, best.expand_dims(0))
        terms["candidates"] = ops.gather(flat, best * positions + chosen, 0).expand_dims(0)
    return terms


def training_loss(model: VQVAE, pixel_values, restart_score, restart_position):
    """(loss, counts [1, K], sums [1, K, D], best_score [1, K], candidates [1, K, D]).
    loss = reconstruction + beta * commitment (+ codebook loss for update ``loss``); the
    rest is after_step's (no gradients). No input checks here (this runs inside a compiled
    graph)."""
    t = loss_terms(model, pixel_values, restart_score, restart_position)
    loss = t["reconstruction"] + model.beta * t["commitment"]
    if model.codebook_update == "loss":
        loss = loss + t["codebook"]
    return (loss, ops.stop_gradient(t["counts"]), ops.stop_gradient(t["sums"]),
            ops.stop_gradient(t["best_score"]), ops.stop_gradient(t["candidates"]))


def after_step(model: VQVAE, counts, sums, best_scores, candidates) -> None:
    """After an optimizer update, with each statistic of the micro-batches (and ranks)
    concatenated: the EMA of the assignments and sums, the Laplace-smoothed codebook
    (update ``ema``), then the dead-code restarts (each dead code takes the candidate of
    the micro-batch with the largest score). PyNative, a few small kernels; written in
    place with ops.assign so compiled graphs see the new values (design.md §4)."""
    c = model.config.model.codebook
    q = model.quantizer
    size = q.cluster_size * c.decay + counts.astype(ms.float32).sum(axis=0) * (1.0 - c.decay)
    embed_sum = q.embed_sum * c.decay + sums.astype(ms.float32).sum(axis=0) * (1.0 - c.decay)
    codebook = q.codebook.value()
    if c.update == "ema":
        total = size.sum()
        smoothed = (size + c.epsilon) / (total + c.size * c.epsilon) * total
        codebook = embed_sum / smoothed.expand_dims(1)
    if c.restart:
        best = _ARGMAX_ROWS(best_scores)                                           # [K]
        index = ops.broadcast_to(best.reshape(1, -1, 1), (1, best.shape[0], candidates.shape[2]))
        chosen = ops.gather_elements(candidates, 0, index)[0]
        dead = (size < c.restart_threshold).expand_dims(1)
        codebook = ops.where(dead, chosen, codebook)
        embed_sum = ops.where(dead, chosen * c.restart_threshold, embed_sum)
        size = ops.where(dead[:, 0], ops.full_like(size, c.restart_threshold), size)
    ops.assign(q.cluster_size, size)
    ops.assign(q.embed_sum, embed_sum)
    ops.assign(q.codebook, codebook)

"""The discrete image tokenizer (VQ-VAE) in PyTorch (issue 17 part 1), mirrored by
mindspore_impl/vqvae.py. taichu/families/vqvae.py has the config and the choices.

  ResBlock         x + conv1x1(act(conv3x3(act(x))))
  Downsample       2x2 stride-2 conv as space-to-depth + Linear
  Upsample         2x2 stride-2 transposed conv as Linear + depth-to-space
  Encoder          pixels -> z_e [B, D, h, w]
  VectorQuantizer  nearest code, straight-through estimator; codebook, cluster_size and
                   embed_sum (EMA state, written by after_step)
  Decoder          quantized vectors -> pixels
  VQVAE            encode(pixels) -> codes [B, h, w]; decode(codes) -> pixels;
                   forward(pixels) -> reconstruction

Training interface, called by the shared trainer (inputs from taichu.image_tokens.ImageBatches):
- ``training_loss(model, pixel_values [B, 3, S, S], restart_score [B, K], restart_position
  [B, K])`` -> (loss, counts [1, K], sums [1, K, D], best_score [1, K], candidates [1, K, D]);
- ``after_step(model, counts, sums, best_scores, candidates)`` (each concatenated over the
  micro-batches and ranks): the EMA step and the dead-code restarts.
State_dict names here are the project's canonical weight names.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from taichu.families.vqvae import VQVAEConfig, init_bound


def _activation(name: str) -> nn.Module:
    return nn.ReLU() if name == "relu" else nn.GELU(approximate="none")


class ResBlock(nn.Module):
    def __init__(self, width: int, activation: str):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(width, width, kernel_size=1)
        self.act = _activation(activation)

    def forward(self, x):
        return x + self.conv2(self.act(self.conv1(self.act(x))))


class Downsample(nn.Module):
    """[b, c, h, w] -> [b, out, h/2, w/2]: each 2x2 cell flattened (dy, dx, channel), then
    a Linear: nn.Conv2d(c, out, kernel 2, stride 2) with weight[o, c, dy, dx] =
    proj.weight[o, (2 dy + dx) c_in + c]."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.proj = nn.Linear(4 * n_in, n_out)

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(b, h // 2, w // 2, 4 * c)
        return self.proj(x).permute(0, 3, 1, 2)


class Upsample(nn.Module):
    """[b, c, h, w] -> [b, out, 2h, 2w]: a Linear to 4 * out channels ordered (dy, dx,
    channel), then depth-to-space (a 2x2 stride-2 transposed convolution)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.n_out = n_out
        self.proj = nn.Linear(n_in, 4 * n_out)

    def forward(self, x):
        b, _, h, w = x.shape
        x = self.proj(x.permute(0, 2, 3, 1)).reshape(b, h, w, 2, 2, self.n_out)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, self.n_out, 2 * h, 2 * w)


class Encoder(nn.Module):
    def __init__(self, config: VQVAEConfig):
        super().__init__()
        m = config.model
        widths = m.channels
        self.conv_in = nn.Conv2d(m.num_channels, widths[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList([nn.ModuleList([ResBlock(w, m.activation) for _ in range(m.num_res_blocks)])
                                     for w in widths])
        self.downsamples = nn.ModuleList([Downsample(widths[i], widths[i + 1]) for i in range(len(widths) - 1)])
        self.conv_out = nn.Conv2d(widths[-1], m.codebook.dim, kernel_size=1)
        self.act = _activation(m.activation)

    def forward(self, pixels):
        x = self.conv_in(pixels)
        for level, blocks in enumerate(self.blocks):
            for block in blocks:
                x = block(x)
            if level < len(self.downsamples):
                x = self.downsamples[level](x)
        return self.conv_out(self.act(x))


class Decoder(nn.Module):
    """Levels coarsest first (the decoder's widths reversed)."""

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        m = config.model
        widths = m.decoder_widths[::-1]
        self.conv_in = nn.Conv2d(m.codebook.dim, widths[0], kernel_size=3, padding=1)
        self.blocks = nn.ModuleList([nn.ModuleList([ResBlock(w, m.activation) for _ in range(m.num_res_blocks)])
                                     for w in widths])
        self.upsamples = nn.ModuleList([Upsample(widths[i], widths[i + 1]) for i in range(len(widths) - 1)])
        self.conv_out = nn.Conv2d(widths[-1], m.num_channels, kernel_size=3, padding=1)
        self.act = _activation(m.activation)

    def forward(self, z):
        x = self.conv_in(z)
        for level, blocks in enumerate(self.blocks):
            for block in blocks:
                x = block(x)
            if level < len(self.upsamples):
                x = self.upsamples[level](x)
        return self.conv_out(self.act(x))


class VectorQuantizer(nn.Module):
    """The codebook [K, D] (a parameter for update ``loss``, a buffer for ``ema``) and the
    EMA state cluster_size [K], embed_sum [K, D] (buffers, written by after_step)."""

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        c = config.model.codebook
        self.size, self.dim = c.size, c.dim
        codebook = torch.empty(c.size, c.dim).uniform_(-1.0 / c.size, 1.0 / c.size)
        if c.update == "loss":
            self.codebook = nn.Parameter(codebook)
        else:
            self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.ones(c.size))
        self.register_buffer("embed_sum", codebook.clone())

    def nearest(self, flat):
        """[N] int64: the nearest code of each row of ``flat`` [N, D] by squared distance
        (|e|^2 - 2 z.e; |z|^2 is the same for every code), the first of equal ones."""
        codebook = self.codebook.detach()
        distances = codebook.pow(2).sum(dim=1) - 2.0 * flat.detach() @ codebook.t()
        return distances.argmin(dim=1)

    def forward(self, z):
        """z [B, D, h, w] -> (straight-through z_q [B, D, h, w], z_q itself (gradients to the
        codebook), codes [B, h, w], flat z [B h w, D])."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        codes = self.nearest(flat)
        quantized = F.embedding(codes, self.codebook).view(b, h, w, d).permute(0, 3, 1, 2)
        straight = z + (quantized - z).detach()
        return straight, quantized, codes.view(b, h, w), flat


class VQVAE(nn.Module):
    def __init__(self, config: VQVAEConfig):
        super().__init__()
        m = config.model
        c = m.codebook
        self.config = config
        # Plain numbers, as in the MindSpore mirror (where graph mode needs constants).
        self.beta, self.codebook_update, self.reconstruction = float(c.beta), c.update, m.reconstruction
        self.encoder = Encoder(config)
        self.quantizer = VectorQuantizer(config)
        self.decoder = Decoder(config)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        """torch's default, written out (taichu.families.vqvae.init_bound): weights and
        biases uniform in +-1/sqrt(fan_in)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                bound = init_bound(module.weight[0].numel())
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.uniform_(module.bias, -bound, bound)

    def encode(self, pixels):
        """[B, 3, S, S] normalised pixels -> codes [B, S/2^k, S/2^k] int64."""
        return self.quantizer(self.encoder(pixels))[2]

    def decode(self, codes):
        """codes [B, h, w] -> pixels [B, 3, 2^k h, 2^k w] (normalised)."""
        z = F.embedding(codes.long(), self.quantizer.codebook).permute(0, 3, 1, 2)
        return self.decoder(z)

    def forward(self, pixels):
        """The reconstruction of ``pixels`` [B, 3, S, S] through the codes."""
        return self.decoder(self.quantizer(self.encoder(pixels))[0])


# ----------------------------------------------------------------------------- losses

def loss_terms(model: VQVAE, pixel_values, restart_score=None, restart_position=None) -> dict:
    """Every term of the loss (see training_loss), the codes and the reconstruction."""
    q = model.quantizer
    z = model.encoder(pixel_values)
    straight, quantized, codes, flat = q(z)
    pixels = model.decoder(straight)
    error = pixels.float() - pixel_values.float()
    reconstruction = error.abs().mean() if model.reconstruction == "l1" else error.pow(2).mean()
    commitment = (z.float() - quantized.detach().float()).pow(2).mean()
    codebook = (z.detach().float() - quantized.float()).pow(2).mean()
    # The EMA's statistics of this micro-batch: assignments and sums per code.
    flat = flat.detach().float()
    onehot = F.one_hot(codes.reshape(-1), q.size).float()                     # [N, K]
    terms = {"reconstruction": reconstruction, "commitment": commitment, "codebook": codebook,
             "codes": codes, "pixels": pixels, "counts": onehot.sum(dim=0, keepdim=True),
             "sums": (onehot.t() @ flat).unsqueeze(0)}
    if restart_score is not None:
        # Restart candidates: code k takes the vector at restart_position[b, k] of the image b
        # with the largest restart_score[b, k].
        positions = flat.shape[0] // pixel_values.shape[0]
        best = restart_score.argmax(dim=0)                                     # [K]
        index = best * positions + restart_position.gather(0, best.unsqueeze(0))[0].long()
        terms["best_score"] = restart_score.gather(0, best.unsqueeze(0))
        terms["candidates"] = flat[index].unsqueeze(0)
    return terms


def training_loss(model: VQVAE, pixel_values, restart_score, restart_position):
    """(loss, counts [1, K], sums [1, K, D], best_score [1, K], candidates [1, K, D]).
    loss = reconstruction + beta * commitment (+ codebook loss for update ``loss``); the
    rest is after_step's (no gradients). No input checks here (the MindSpore mirror runs
    inside a compiled graph)."""
    t = loss_terms(model, pixel_values, restart_score, restart_position)
    loss = t["reconstruction"] + model.beta * t["commitment"]
    if model.codebook_update == "loss":
        loss = loss + t["codebook"]
    return loss, t["counts"], t["sums"], t["best_score"].detach(), t["candidates"]


@torch.no_grad()
def after_step(model: VQVAE, counts, sums, best_scores, candidates) -> None:
    """After an optimizer update, with each statistic of the micro-batches (and ranks)
    concatenated: the EMA of the assignments and sums, the Laplace-smoothed codebook
    (update ``ema``), then the dead-code restarts (each dead code takes the candidate of
    the micro-batch with the largest score)."""
    c = model.config.model.codebook
    q = model.quantizer
    size = q.cluster_size * c.decay + counts.float().sum(dim=0) * (1.0 - c.decay)
    embed_sum = q.embed_sum * c.decay + sums.float().sum(dim=0) * (1.0 - c.decay)
    codebook = q.codebook
    if c.update == "ema":
        total = size.sum()
        smoothed = (size + c.epsilon) / (total + c.size * c.epsilon) * total
        codebook = embed_sum / smoothed.unsqueeze(1)
    if c.restart:
        best = best_scores.argmax(dim=0)                                       # [K]
        chosen = candidates.gather(0, best.view(1, -1, 1).expand(1, -1, candidates.shape[2]))[0]
        dead = (size < c.restart_threshold).unsqueeze(1)
        codebook = torch.where(dead, chosen, codebook)
        embed_sum = torch.where(dead, chosen * c.restart_threshold, embed_sum)
        size = torch.where(dead[:, 0], torch.full_like(size, c.restart_threshold), size)
    q.cluster_size.copy_(size)
    q.embed_sum.copy_(embed_sum)
    q.codebook.copy_(codebook)

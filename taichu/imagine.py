"""Text to image with the light DALL-E (``taichu imagine``, issue 17): the caption's tokens
are the prefix, the image codes are sampled one by one over the KV cache with the shared
numpy sampler (taichu.generate: temperature, top-k, top-p; the same seed gives the same
codes on every runtime), the image tokenizer's decoder turns codes into pixels, and a CLIP
model may rerank the samples by image-text similarity.

A runtime supplies ``step(text_ids, codes, past) -> (image logits of the last position
float32 [B, K], past)``: a prefill when ``text_ids`` [B, text_length] is given (``codes``
and ``past`` None), else one decoding step for ``codes`` [B, m] after ``past``
(``dalle_step`` for a taichu DALL-E in torch or mindspore, the latter compiled over a static
cache, ``static_cache_step``; export.runtime's ``dalle_network`` for an ONNX / MINDIR export), and ``decode(codes [B, h, w]) -> uint8 [B, S, S, 3]``
(taichu.image_tokens.decode_codes, or an export's image decoder).

The prompt: ``[bos] + tokens + [eos]`` right-padded to the model's text_length, as in
training (taichu.imagetext.caption_ids); a prompt longer than text_length - 2 tokens is cut
at its end (the cut is reported); an empty prompt is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from taichu.generate import SamplingConfig, choose_tokens, process_logits


def dalle_step(model):
    """``step`` for a taichu DALL-E of either backend: PyTorch eager over the model's growing
    cache; MindSpore compiled (mindspore.jit) over a static cache (``static_cache_step``),
    as the GPT generates in MindSpore. Inputs are checked here (taichu.families.dalle
    check_inputs): the compiled graphs cannot raise."""
    from taichu.api import backend_of
    from taichu.families.dalle import check_inputs

    def check(text_ids, codes, length):
        def span(x):
            return None if x is None or not x.size else (int(x.min()), int(x.max()))
        check_inputs(model.config, None if text_ids is None else text_ids.shape, span(text_ids),
                     None if codes is None else codes.shape, span(codes), length)

    if backend_of(model) == "torch":
        import torch

        def step(text_ids, codes, past):
            with torch.no_grad():
                if text_ids is not None:
                    _, logits, past = model(torch.from_numpy(text_ids), None, None, True)
                else:
                    _, logits, past = model(None, torch.from_numpy(codes), past, True)
            return logits[:, -1].float().numpy(), past
        return step

    import mindspore as ms

    from mindspore_impl.dalle import StaticCacheDecoder, StaticCachePrefill

    model.set_train(False)
    m = model.config.model
    compiled = static_cache_step(ms.jit(StaticCachePrefill(model)), ms.jit(StaticCacheDecoder(model)),
                                 m.text_length + m.image_grid ** 2)

    def step(text_ids, codes, past):
        check(text_ids, codes, 0 if past is None else past[1])
        return compiled(text_ids, codes, past)
    return step


def static_cache_step(prefill, decode, capacity: int):
    """``step`` over two MindSpore callables with the signatures of mindspore_impl.dalle's
    StaticCachePrefill and StaticCacheDecoder: the jit-compiled cells, or the same graphs
    loaded from MINDIR (nn.GraphCell, export.dalle_network). The prefill's keys and
    values are padded once to ``capacity`` slots (every position the model can take), then
    each code is written at its slot; ``past`` is (the cache tensors, positions so far). No
    input checks here (the callers check)."""
    import mindspore as ms

    def step(text_ids, codes, past):
        if text_ids is not None:
            out = prefill(ms.Tensor(text_ids.astype(np.int32)))
            pad = ((0, 0), (0, 0), (0, capacity - text_ids.shape[1]), (0, 0))
            # Once per generation, through numpy: no graph to compile for it.
            cache = [ms.Tensor(np.pad(t.asnumpy(), pad)) for t in out[1:]]
            return out[0].asnumpy().astype(np.float32), (cache, text_ids.shape[1])
        tensors, length = past
        ids = codes.astype(np.int32)
        for k in range(ids.shape[1]):
            # The slot is a tensor, not a Python int: one compiled graph for every step.
            out = decode(ms.Tensor(ids[:, k:k + 1]), ms.Tensor(length, ms.int32), *tensors)
            tensors, length = list(out[1:]), length + 1
        return out[0].asnumpy().astype(np.float32), (tensors, length)
    return step


def sample_codes(step, text_ids: np.ndarray, grid: int, sampling: SamplingConfig) -> np.ndarray:
    """int64 [B, grid, grid]: the image codes of each row of ``text_ids``, one at a time,
    chosen by the numpy sampler from default_rng(sampling.seed) (no repetition penalty:
    an image repeats codes by nature)."""
    count = grid * grid
    rng = np.random.default_rng(sampling.seed)
    sampler = SamplingConfig(max_new_tokens=count, temperature=sampling.temperature, top_k=sampling.top_k,
                             top_p=sampling.top_p, seed=sampling.seed)
    batch = text_ids.shape[0]
    codes = np.zeros((batch, count), np.int64)
    logits, past = step(text_ids, None, None)
    no_history = [[] for _ in range(batch)]
    for position in range(count):
        codes[:, position] = choose_tokens(process_logits(logits, no_history, sampler), sampler, rng)
        if position + 1 < count:   # no model step for logits nobody would use
            logits, past = step(None, codes[:, position:position + 1], past)
    return codes.reshape(batch, grid, grid)


def prompt_ids(tokenizer, prompt: str, text_length: int) -> tuple[np.ndarray, int]:
    """(int64 [1, text_length] ids as training made them, the number of prompt tokens cut)."""
    from taichu.imagetext import caption_ids

    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: say what the image should show, e.g. 左边一个红色的正方形")
    ids, _ = caption_ids(tokenizer, [prompt], text_length)
    cut = max(0, len(tokenizer.encode(prompt)) - (text_length - 2))
    return ids, cut


def rerank_scores(clip_dir, prompt: str, images: Sequence, backend: str = "torch") -> np.ndarray:
    """float [n]: cosine similarity of each image to the prompt under an image-text model
    (CLIP, BriVL); images are resized to its image size (taichu.images.preprocess)."""
    from taichu.retrieval import Embedder

    embedder = Embedder(clip_dir, backend)
    image_vectors = embedder.embed_images([Image.fromarray(np.asarray(i, np.uint8)) for i in images])
    text_vector = embedder.embed_texts([prompt])[0]
    return image_vectors @ text_vector


@dataclass
class Imagined:
    prompt: str
    images: np.ndarray                 # uint8 [n, S, S, 3], best first when reranked
    codes: np.ndarray                  # int64 [n, h, w], same order
    clip_scores: np.ndarray | None     # float [n], same order
    checks: list = field(default_factory=list)   # taichu.scene_check per image, where the prompt parses
    cut_tokens: int = 0


def imagine(step, decode, tokenizer, prompt: str, num: int, text_length: int, grid: int,
            sampling: SamplingConfig, rerank=None) -> Imagined:
    """``num`` images for ``prompt``: sampled codes (one batch), decoded, then sorted by
    ``rerank(prompt, images) -> scores`` (best first) when given; each image checked against
    the prompt by taichu.scene_check where the prompt is a drawn-scene caption."""
    from taichu.scene_check import check_image, parse_caption

    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"--num must be a positive number of images, got {num!r}")
    ids, cut = prompt_ids(tokenizer, prompt, text_length)
    codes = sample_codes(step, np.repeat(ids, num, axis=0), grid, sampling)
    images = np.asarray(decode(codes), np.uint8)
    scores = None
    if rerank is not None:
        scores = np.asarray(rerank(prompt, images), np.float64)
        order = np.argsort(-scores, kind="stable")
        images, codes, scores = images[order], codes[order], scores[order]
    checks = []
    try:
        parse_caption(prompt)
        checks = [check_image(image, prompt) for image in images]
    except ValueError:
        pass    # not a scene caption: nothing to check against
    return Imagined(prompt, images, codes, scores, checks, cut)


def check_summary(checks: dict) -> str:
    """'colour 2/2 shape 1/2 position 1/2' for one image's taichu.scene_check outcome."""
    return " ".join(f"{kind} {sum(v)}/{len(v)}" for kind, v in checks.items() if v)


def image_grid(images: np.ndarray, labels: Sequence[str] | None = None, columns: int = 4,
               scale: int = 3) -> Image.Image:
    """The images in rows of ``columns``, each ``scale`` times enlarged (nearest), with an
    ASCII label under each, one line per "\n" (PIL's default font has no CJK glyphs: scores
    and indices only)."""
    images = np.asarray(images, np.uint8)
    n, size = images.shape[0], images.shape[1] * scale
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    lines = max((str(label).count("\n") + 1 for label in labels), default=0) if labels else 0
    label_height = 12 * lines
    gap = 4
    grid = Image.new("RGB", (columns * (size + gap) + gap, rows * (size + label_height + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for index, pixels in enumerate(images):
        x = gap + (index % columns) * (size + gap)
        y = gap + (index // columns) * (size + label_height + gap)
        grid.paste(Image.fromarray(pixels).resize((size, size), Image.Resampling.NEAREST), (x, y))
        if labels:
            draw.text((x, y + size), str(labels[index]), fill=(0, 0, 0))
    return grid


def image_tokenizer_dir(config, override: str | Path | None = None) -> Path:
    """The image tokenizer a DALL-E decodes with: ``override`` or the model config's
    data.image_tokenizer (relative to the working directory), checked against the model's
    codebook and grid (taichu.dalle_data.check_image_tokenizer)."""
    from taichu.dalle_data import check_image_tokenizer

    path = Path(override or config.data.image_tokenizer or "")
    try:
        check_image_tokenizer(config, path)
    except ValueError as error:
        raise ValueError(f"{error} (the image tokenizer to decode with: --image-tokenizer DIR)") from None
    return path

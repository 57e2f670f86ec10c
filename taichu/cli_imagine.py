"""The text-to-image commands (registered by taichu.cli): ``taichu tokenize-images`` and
``taichu decode-images`` (the image tokenizer, vqvae) and ``taichu imagine`` (the DALL-E,
with CLIP reranking)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

BACKENDS = ("torch", "mindspore")
EXPORTS = ("onnx", "mindir")


def _model_of(path, family: str):
    from taichu.config import load_config

    config = load_config(path)
    if config.family != family:
        raise ValueError(f"{path}: a {config.family} model, not a {family} model")
    return config


def cmd_tokenize_images(args) -> int:
    """Images (files or folders) -> codes.npy [n, h, w] and the file list beside it."""
    from taichu.fileio import atomic_write_bytes
    from taichu.image_tokens import tokenize_images
    from taichu.images import load_image
    from taichu.retrieval import list_images

    _model_of(args.model, "vqvae")
    out = Path(args.out)
    if out.suffix != ".npy":
        raise ValueError(f"--out {out}: must end in .npy (the file list goes beside it as .json)")
    files = list_images(args.images)
    codes = tokenize_images(args.model, [load_image(f) for f in files], args.backend)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, codes)
    atomic_write_bytes(out.with_suffix(".json"), json.dumps([str(f) for f in files], ensure_ascii=False).encode())
    print(f"{out}: codes {list(codes.shape)} ({codes.dtype}) of {len(files)} images; {len(np.unique(codes))} "
          f"distinct codes")
    return 0


def cmd_decode_images(args) -> int:
    """codes.npy [n, h, w] -> one PNG per row in a folder."""
    from taichu.image_tokens import decode_codes
    from PIL import Image

    _model_of(args.model, "vqvae")
    codes = np.load(args.codes, allow_pickle=False)
    images = decode_codes(args.model, codes, args.backend)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, pixels in enumerate(images):
        Image.fromarray(pixels).save(out / f"{i:05d}.png")
    print(f"{out}: {len(images)} images of {images.shape[1]}x{images.shape[2]} px")
    return 0


def cmd_imagine(args) -> int:
    from taichu.cli_m6 import imagine_config, imagine_step, is_m6
    from taichu.fileio import atomic_write_bytes
    from taichu.generate import SamplingConfig
    from taichu.imagine import check_summary, dalle_step, image_grid, image_tokenizer_dir, imagine, rerank_scores
    from taichu.tokenizer import Tokenizer

    model_dir = Path(args.model)
    m6 = is_m6(model_dir)      # an M6 draws too (taichu.cli_m6.imagine_step)
    config = imagine_config(model_dir) if m6 else _model_of(model_dir, "dalle")
    if args.num < 1:
        raise ValueError(f"--num must be a positive number of images, got {args.num}")
    sampling = SamplingConfig(max_new_tokens=config.model.image_grid ** 2, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    tokenizer = Tokenizer(model_dir / "tokenizer.model")
    if args.backend in EXPORTS:
        # An export of the DALL-E and one of its image tokenizer (no model code runs).
        runtime = args.export_runtime()
        if not args.image_tokenizer:
            raise ValueError(f"--backend {args.backend}: --image-tokenizer names the image tokenizer's "
                             f"{args.backend} export (`taichu export VQVAE_DIR --format {args.backend} --out DIR`)")
        step = (imagine_step(model_dir, args.backend, args.export_runtime) if m6
                else runtime.dalle_network(model_dir, args.backend).step)
        decode = runtime.image_decoder_network(args.image_tokenizer, args.backend).decode
    else:
        from taichu.api import load_model
        from taichu.image_tokens import decode_codes

        step = imagine_step(model_dir, args.backend) if m6 else dalle_step(load_model(model_dir, backend=args.backend))
        tokenizer_dir = image_tokenizer_dir(config, args.image_tokenizer)

        def decode(codes):
            return decode_codes(tokenizer_dir, codes, args.backend)
    rerank = None
    if args.rerank:
        def rerank(prompt, images):
            backend = args.rerank_backend or (args.backend if args.backend in BACKENDS else "torch")
            return rerank_scores(args.rerank, prompt, images, backend)
    result = imagine(step, decode, tokenizer, args.prompt, args.num, config.model.text_length,
                     config.model.image_grid, sampling, rerank)
    if result.cut_tokens:
        print(f"the prompt is {result.cut_tokens} tokens longer than the model's text ({config.model.text_length - 2} "
              f"tokens); its end was cut")
    labels = []
    for i in range(len(result.images)):
        parts = [f"#{i}"]
        if result.clip_scores is not None:
            parts.append(f"clip {result.clip_scores[i]:.3f}")
        if result.checks:
            held = sum(sum(v) for v in result.checks[i].values())
            total = sum(len(v) for v in result.checks[i].values())
            parts.append(f"check {held}/{total}")
        labels.append("\n".join([" ".join(parts[:2]), *parts[2:]]))
        detail = f"  ({check_summary(result.checks[i])})" if result.checks else ""
        print(" ".join(parts) + detail)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(result.images, labels, columns=args.columns, scale=args.scale).save(out)
    if args.codes:
        np.save(args.codes, result.codes)
    summary = {"prompt": args.prompt, "model": str(model_dir), "backend": args.backend, "seed": args.seed,
               "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
               "clip_scores": None if result.clip_scores is None else result.clip_scores.tolist(),
               "checks": result.checks, "cut_tokens": result.cut_tokens}
    atomic_write_bytes(out.with_suffix(".json"), json.dumps(summary, ensure_ascii=False, indent=1).encode())
    print(f"{out}: {len(result.images)} images{' (best CLIP score first)' if rerank else ''}; "
          f"{out.with_suffix('.json')}")
    return 0


def add_commands(commands, export_runtime) -> None:
    """Register the commands; ``export_runtime()`` returns the export package (taichu.cli hands it
    in: the CLI is the one part of taichu/ that imports export/)."""
    tokenize = commands.add_parser("tokenize-images", help="images -> discrete codes with an image tokenizer (vqvae)")
    tokenize.add_argument("model", help="vqvae model directory")
    tokenize.add_argument("--images", nargs="+", required=True, help="image files or folders")
    tokenize.add_argument("--out", required=True, help="codes.npy ([n, h, w]); the file list goes beside it")
    tokenize.add_argument("--backend", choices=BACKENDS, default="torch")
    tokenize.set_defaults(func=cmd_tokenize_images)

    decode = commands.add_parser("decode-images", help="discrete codes -> images with an image tokenizer (vqvae)")
    decode.add_argument("model", help="vqvae model directory")
    decode.add_argument("codes", help="a .npy of int codes [n, h, w]")
    decode.add_argument("--out", required=True, help="folder for the PNGs")
    decode.add_argument("--backend", choices=BACKENDS, default="torch")
    decode.set_defaults(func=cmd_decode_images)

    imagine = commands.add_parser("imagine", help="generate images from a Chinese caption with a DALL-E, "
                                                  "optionally reranked by a CLIP")
    imagine.add_argument("model", help="dalle (or m6) model directory, or its export with --backend onnx / mindir")
    imagine.add_argument("--prompt", required=True)
    imagine.add_argument("--num", type=int, default=8, help="images to sample")
    imagine.add_argument("--out", required=True, help="the grid .png (scores in a .json beside it)")
    imagine.add_argument("--backend", choices=BACKENDS + EXPORTS, default="torch")
    imagine.add_argument("--image-tokenizer", help="vqvae directory to decode with (default: the model "
                                                   "config's data.image_tokenizer); with --backend onnx / "
                                                   "mindir its export")
    imagine.add_argument("--rerank", help="image-text model directory (CLIP, BriVL) that orders the images")
    imagine.add_argument("--rerank-backend", choices=BACKENDS,
                         help="backend of the reranker (default: --backend, torch for an export)")
    imagine.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    imagine.add_argument("--top-k", type=int, default=0)
    imagine.add_argument("--top-p", type=float, default=1.0)
    imagine.add_argument("--seed", type=int, default=0)
    imagine.add_argument("--columns", type=int, default=4)
    imagine.add_argument("--scale", type=int, default=4, help="enlargement of each image in the grid")
    imagine.add_argument("--codes", help="also save the sampled codes as .npy")
    imagine.set_defaults(func=cmd_imagine, export_runtime=export_runtime)

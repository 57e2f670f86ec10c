"""Quality, not speed: does the light DALL-E draw what a held-out caption says? (issue 17)

Measured on the drawn scenes, whose captions state colours, shapes and positions exactly,
with the pixel checker taichu.scene_check (validated: true scenes 100 %, tests/test_scene_check.py):

1. The image tokenizer (vqvae, --vqvae): PSNR of held-out scenes and of digits (never
   trained on) after the round trip through codes, beside painting each image its own mean
   colour; codebook usage.
2. The DALL-E (--dalle, trained on scenes with that tokenizer's codes): for each of
   --captions held-out captions (the DALL-E config's split, distinct, and captioning no
   training scene), --samples
   images sampled (temperature 1, top-k --top-k) per sampling seed; the checker's accuracy
   per kind (colour, shape, position, count) and "all" for: the first sample (no reranking),
   the sample a CLIP (--rerank) scores highest, the true scene at the tokenizer's size,
   its reconstruction through the tokenizer (the ceiling the decoder allows), another
   caption's true scene (a wrong image) and images decoded from uniformly random codes.

    .venv/bin/python bench/imagine_quality.py --vqvae runs/t2i/vqvae-small/final \\
        --dalle runs/t2i/dalle-small/final --rerank runs/demo-clip/final

Nothing here is a test; the numbers are the same on any machine for the same models and
seeds (up to float32 summation order at sampling ties).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

KINDS = ("colour", "shape", "position", "count", "all")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vqvae", required=True)
    parser.add_argument("--dalle", nargs="+", required=True,
                        help="DALL-E model directories trained on the same data (e.g. two budgets)")
    parser.add_argument("--rerank", help="image-text model directory for reranking (CLIP)")
    parser.add_argument("--backend", choices=("torch", "mindspore"), default="torch")
    parser.add_argument("--captions", type=int, default=100)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-doc", action="store_true")
    return parser.parse_args(argv)


def tokenizer_quality(vqvae: str, backend: str) -> dict:
    from taichu.image_tokens import reconstruction_report

    return {source: reconstruction_report(vqvae, source, backend) for source in ("scenes", "digits")}


def held_out(dalles: list[str], count: int):
    """(config, captions, scenes, draw_scene): the first ``count`` distinct held-out captions
    of the first DALL-E's split that no model's training pairs have (scene captions repeat:
    about half of the held-out ones also caption a training scene)."""
    from taichu.config import load_config
    from taichu.imagetext import draw_scene, load_data_config

    config = load_config(dalles[0])
    seen = {pair.text for dalle in dalles for pair in load_data_config(load_config(dalle).data).train}
    chosen = []
    for pair in load_data_config(config.data).test:
        if pair.scene is not None and pair.text not in seen:
            seen.add(pair.text)
            chosen.append(pair)
        if len(chosen) == count:
            break
    return config, [p.text for p in chosen], [p.scene for p in chosen], draw_scene


def score(images, captions) -> dict:
    from taichu.scene_check import score_images

    return {k: v for k, v in score_images(list(images), list(captions)).items() if k in KINDS}


def sample_arms(args, step, ids, captions, grid: int, size: int, seed: int) -> dict:
    """Checker scores of the first sample, CLIP's best and the checker's own best (an
    oracle reranker) of args.samples codes per caption sampled with ``seed``."""
    from taichu.generate import SamplingConfig
    from taichu.image_tokens import decode_codes
    from taichu.imagine import rerank_scores, sample_codes
    from taichu.scene_check import check_image

    sampling = SamplingConfig(max_new_tokens=grid * grid, temperature=1.0, top_k=args.top_k, seed=seed)
    t = time.perf_counter()
    codes = sample_codes(step, np.repeat(ids, args.samples, axis=0), grid, sampling)
    seconds = time.perf_counter() - t
    images = decode_codes(args.vqvae, codes, args.backend).reshape(len(captions), args.samples, size, size, 3)
    row = {"seed": seed, "first sample": score(images[:, 0], captions), "seconds": seconds}
    if args.rerank:
        best = [images[i, int(np.argmax(rerank_scores(args.rerank, c, images[i], args.backend)))]
                for i, c in enumerate(captions)]
        row[f"best of {args.samples} by CLIP"] = score(best, captions)

    def held(image, caption):
        checks = check_image(image, caption)
        return sum(sum(v) for v in checks.values()) / max(1, sum(len(v) for v in checks.values()))
    oracle = [images[i, int(np.argmax([held(im, c) for im in images[i]]))] for i, c in enumerate(captions)]
    row[f"best of {args.samples} by the checker (oracle)"] = score(oracle, captions)
    return row


def run(args) -> dict:
    from taichu.api import load_model
    from taichu.config import load_config
    from taichu.image_tokens import decode_codes, tokenize_images
    from taichu.imagine import dalle_step, prompt_ids
    from taichu.tokenizer import Tokenizer

    started = time.perf_counter()
    results = {"tokenizer": tokenizer_quality(args.vqvae, args.backend)}
    # The held-out captions of the first model's split (every model here trains on the same data).
    config, captions, scenes, draw_scene = held_out(args.dalle, args.captions)

    size = load_config(args.vqvae).model.image_size
    true = np.stack([np.asarray(draw_scene(s, max(32, size)).convert("RGB").resize((size, size))) for s in scenes])
    reconstructed = decode_codes(args.vqvae, tokenize_images(args.vqvae, list(true), args.backend), args.backend)
    rng = np.random.default_rng(0)
    grid = config.model.image_grid
    random_codes = rng.integers(0, config.model.codebook_size, (len(captions), grid, grid))
    results["references"] = {"true scene": score(true, captions),
                             "true scene through the tokenizer": score(reconstructed, captions),
                             "another caption's true scene": score(np.roll(true, 1, axis=0), captions),
                             "random codes": score(decode_codes(args.vqvae, random_codes, args.backend), captions)}
    results["models"] = []
    for dalle in args.dalle:
        step = dalle_step(load_model(dalle, backend=args.backend))
        tokenizer = Tokenizer(Path(dalle) / "tokenizer.model")
        ids = np.concatenate([prompt_ids(tokenizer, c, config.model.text_length)[0] for c in captions])
        rows = []
        for seed in args.seeds:
            rows.append(sample_arms(args, step, ids, captions, grid, size, seed))
            print(json.dumps({"model": dalle, **rows[-1]}), flush=True)
        trained = load_config(dalle)
        results["models"].append({"dalle": dalle, "steps": trained.train.max_steps, "samples": rows,
                                  "scenes": trained.data.scene_count})
    results["minutes"] = (time.perf_counter() - started) / 60
    results["captions"], results["samples_per_caption"] = len(captions), args.samples
    results["rerank"] = args.rerank
    return results


def report(args, results: dict) -> str:
    from benchdoc import machine

    lines = [f"{time.strftime('%Y-%m-%d')}; {machine()}.", "",
             f"Command: `.venv/bin/python bench/imagine_quality.py {' '.join(sys.argv[1:])}` "
             f"({results['minutes']:.0f} min, backend {args.backend}).", "",
             "Image tokenizer (held-out images, PSNR of the round trip through codes, dB):", "",
             "| images | PSNR | mean colour (baseline) | codes used | perplexity |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for source, r in results["tokenizer"].items():
        lines.append(f"| {source} ({r['images']}) | {r['psnr']:.1f} | {r['psnr_mean_colour']:.1f} | "
                     f"{100 * r['usage']:.0f} % of {r['codebook_size']} | {r['perplexity']:.0f} |")
    lines += ["", f"DALL-E: {results['captions']} held-out captions that no training scene has, "
              f"{results['samples_per_caption']} samples each (temperature 1), reranker {results['rerank']}; "
              "checker accuracy in %:", "",
              "| images | " + " | ".join(KINDS) + " |", "| --- |" + " ---: |" * len(KINDS)]

    def fmt(values):
        return " | ".join("-" if values.get(k) != values.get(k) else f"{100 * values[k]:.1f}" for k in KINDS)
    for name, values in results["references"].items():
        lines.append(f"| {name} | {fmt(values)} |")
    summary = []
    for model in results["models"]:
        rows = model["samples"]
        for arm in [k for k in rows[0] if k not in ("seed", "seconds")]:
            for row in rows:
                lines.append(f"| {model['scenes']} scenes, {model['steps']} steps: {arm}, seed {row['seed']} | "
                             f"{fmt(row[arm])} |")
            values = np.array([100 * row[arm]["all"] for row in rows])
            summary.append(f"- {model['scenes']} scenes, {model['steps']} steps, {arm}: every check holds for {values.mean():.1f} ± "
                           f"{values.std():.1f} % of captions ({len(rows)} sampling seeds)")
    return "\n".join(lines + [""] + summary)


def main(argv=None) -> None:
    args = parse_args(argv)
    results = run(args)
    text = report(args, results)
    print(text)
    if not args.no_doc:
        from benchdoc import write_section

        write_section("imagine_quality", "## Text to image: caption faithfulness (bench/imagine_quality.py)", text)


if __name__ == "__main__":
    main()

"""Quality, not speed: does one space for image, text and speech learn, from weakly related and
incomplete data, to retrieve across all six directions; does starting from trained towers help;
does adding speech cost image-text retrieval? (issue 19; design.md §2.5)

Arms, every one on the same data (digits + 1,000 drawn scenes, split as the CLIP family splits
them), steps, batch size and learning rate, seeds 0-2 (train.seed draws the init and the order):
- CLIP alone: configs/clip/clip-tiny.yaml (the image and text towers of trimodal-small) on the
  image-text pairs: the image-text baseline.
- tri-modal, scratch: configs/trimodal/trimodal-small.yaml (half of the training captions
  spoken by four voices, 500 People's Daily clauses as speech-text pairs with no image).
- tri-modal, trained towers: the same, image and text towers (and their projections) from the
  same seed's CLIP-alone run, the speech tower from a wav2vec 2.0 pretrained on People's Daily
  speech (runs/bench-speech-pretraining/pretrain/final, bench/speech_pretraining.py; --speech).
- tri-modal data, image-text loss only: trimodal-small's data and batch order with the speech
  pairs' weights at 0 (speech tower frozen): separates what speech costs from what the data
  and its audio-length batching cost.
Measured as `taichu eval` measures: Recall@1/5 in the six directions on the held-out split, the
speech being the test captions read by the held-out voice (f4, never heard in training), with
chance beside; zero-shot digit accuracy from written and from spoken prompts.

    .venv/bin/python bench/trimodal.py                 # 3 seeds; rewrites its doc block
    .venv/bin/python bench/trimodal.py --quick         # 1 seed, 60 steps, doc untouched

Runs finished in --out are measured again, not retrained.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

CLIP = "configs/clip/clip-tiny.yaml"
TRIMODAL = "configs/trimodal/trimodal-small.yaml"
# What trimodal-small's train and data sections say, for the CLIP baseline (clip-tiny has none).
SHARED = ["data.source=[digits, scenes]", "data.scene_count=1000", "train.batch_size=64",
          "train.max_steps=400", "train.learning_rate=2e-3", "train.min_learning_rate=1e-4",
          "train.warmup_steps=20", "train.weight_decay=0.1", "train.log_interval=25",
          "train.eval_interval=200", "train.eval_batches=4", "train.checkpoint_interval=200"]
ARMS = ("CLIP alone", "tri-modal, scratch", "tri-modal, trained towers", "tri-modal data, image-text loss only")
# The last arm trains trimodal-small on its own batches (the audio-length buckets, the
# sentences) with the speech pairs' weights at 0 and the speech tower frozen: what the
# image-text towers learn from that data and order alone, so "CLIP alone" vs "scratch" can be
# read as the cost of learning speech or of the data and order.
IMAGE_TEXT_ONLY = ["model.pair_weights.text_speech=0", "model.pair_weights.image_speech=0",
                   "model.frozen_towers=[speech]"]
DIRECTIONS = ("text_to_image", "image_to_text", "speech_to_image", "image_to_speech", "speech_to_text",
              "text_to_speech")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-trimodal"))
    parser.add_argument("--speech", default=str(ROOT / "runs" / "bench-speech-pretraining" / "pretrain" / "final"),
                        help="a pretrained wav2vec2-small directory (bench/speech_pretraining.py)")
    parser.add_argument("--backend", choices=("torch", "mindspore"), default="torch")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--quick", action="store_true", help="1 seed, 60 steps, doc untouched")
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.no_doc = args.seeds[:1], True
        args.overrides = args.overrides + ["train.max_steps=60", "train.warmup_steps=5",
                                           "train.eval_interval=60", "train.checkpoint_interval=60"]
    args.out = Path(args.out)
    return args


def measures(model_dir, backend: str) -> dict:
    """{digits, scenes}: Recall@1/5 per direction (with chance) on each source's held-out
    items, zero-shot digits from written and spoken prompts: taichu eval's numbers."""
    from taichu.config import load_config
    from taichu.retrieval import Embedder, evaluate
    from taichu.trimodal_eval import evaluate_trimodal

    embedder = Embedder(model_dir, backend)
    clip = load_config(model_dir).family == "clip"
    out = {}
    for source in ("digits", "scenes"):
        values = (evaluate if clip else evaluate_trimodal)(embedder, source).values
        got = {d: {k: values[d][k] for k in ("R@1", "R@5", "chance")} for d in DIRECTIONS if d in values}
        if "zero_shot" in values:
            z = values["zero_shot"]
            got["zero_shot"] = {"accuracy": z["accuracy"], "spoken_accuracy": z.get("spoken_accuracy"),
                                "chance": z["chance"]}
        out[source] = got
    return out


def run(args) -> dict:
    from distill import train_once
    from taichu.config import load_config
    from taichu.train import read_metrics, run_training

    args.out.mkdir(parents=True, exist_ok=True)
    speech = Path(args.speech)
    if not (speech / "model.safetensors").exists():
        raise SystemExit(f"--speech {speech}: no pretrained wav2vec2-small there; run "
                         "bench/speech_pretraining.py first (it writes runs/bench-speech-pretraining/pretrain)")
    results = {"backend": args.backend, "speech": str(speech), "overrides": args.overrides, "rows": []}
    for seed in args.seeds:
        clip_dir = args.out / f"clip-seed{seed}"
        for arm in ARMS:
            seeded = [f"train.seed={seed}"]
            if arm == "CLIP alone":
                config = load_config(ROOT / CLIP, SHARED + args.overrides + seeded)
                run_dir, towers = clip_dir, None
            elif arm == ARMS[3]:
                config = load_config(ROOT / TRIMODAL, args.overrides + seeded + IMAGE_TEXT_ONLY)
                run_dir, towers = args.out / f"image-text-only-seed{seed}", None
            else:
                config = load_config(ROOT / TRIMODAL, args.overrides + seeded)
                run_dir = args.out / f"{'scratch' if 'scratch' in arm else 'towers'}-seed{seed}"
                towers = (None if "scratch" in arm else
                          {"image": clip_dir / "final", "text": clip_dir / "final", "speech": speech})
            minutes = train_once(run_dir, lambda d: run_training(config, args.backend, d, progress=True,
                                                                 init_towers=towers))
            curve = {r["step"]: r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r}
            row = {"arm": arm, "seed": seed, "minutes": minutes, "val_loss": curve,
                   **measures(run_dir / "final", args.backend)}
            results["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "val_loss"}), flush=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def _cell(rows, source: str, direction: str, k: str) -> str:
    values = [r[source][direction][k] * 100 for r in rows
              if direction in r[source] and r[source][direction].get(k) is not None]
    if not values:
        return "-"
    values = np.asarray(values)
    return f"{values.mean():.1f} ± {values.std():.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def report(args, results: dict) -> str:
    from benchdoc import machine

    rows, seeds = results["rows"], sorted({r["seed"] for r in results["rows"]})
    names = {"text_to_image": "text→image", "image_to_text": "image→text", "speech_to_image": "speech→image",
             "image_to_speech": "image→speech", "speech_to_text": "speech→text", "text_to_speech": "text→speech"}
    lines = [f"Machine: {machine()}. Backend {results['backend']}; seeds {seeds}; the same steps, batch and "
             "learning rate for every arm (configs/trimodal/trimodal-small.yaml's). Command: "
             "`.venv/bin/python bench/trimodal.py`. Held-out split; speech = the held-out captions read by "
             "the held-out voice f4, never heard in training. Recall@1 (Recall@5), percent, mean ± sd over "
             "seeds; captions deduplicated, an item relevant to every item of its caption (taichu eval)."]
    for source in ("digits", "scenes"):
        zero = source == "digits"
        lines += ["", f"**{source}**", "",
                  "| arm | " + " | ".join(names[d] for d in DIRECTIONS)
                  + (" | zero-shot, written prompts | zero-shot, spoken prompts |" if zero else " |"),
                  "| --- | " + " | ".join("---:" for _ in DIRECTIONS) + (" | ---: | ---: |" if zero else " |")]
        for arm in ARMS:
            mine = [r for r in rows if r["arm"] == arm]
            if not mine:
                continue
            cells = [f"{_cell(mine, source, d, 'R@1')} ({_cell(mine, source, d, 'R@5')})"
                     if d in mine[0][source] else "-" for d in DIRECTIONS]
            if zero:
                cells += [_cell(mine, source, "zero_shot", "accuracy"),
                          _cell(mine, source, "zero_shot", "spoken_accuracy")]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        first = next(r for r in rows if r["arm"] != "CLIP alone")[source]
        chance = [f"{first[d]['chance']['R@1'] * 100:.1f} ({first[d]['chance']['R@5'] * 100:.1f})"
                  for d in DIRECTIONS]
        if zero:
            chance += [f"{first['zero_shot']['chance'] * 100:.1f}"] * 2
        lines.append("| chance | " + " | ".join(chance) + " |")
    minutes = {arm: [r["minutes"] for r in rows if r["arm"] == arm and r["minutes"]] for arm in ARMS}
    lines += ["", "Training minutes per run: " + ", ".join(
        f"{arm} {np.mean(m):.1f}" for arm, m in minutes.items() if m) + "."]
    return "\n".join(lines)


def main(argv=None) -> None:
    from benchdoc import write_section

    args = parse_args(argv)
    results = (json.loads((args.out / "results.json").read_text()) if args.report_only else run(args))
    text = report(args, results)
    print(text)
    if not args.no_doc:
        write_section("trimodal", "## Tri-modal space: image, text, speech (bench/trimodal.py)", text)


if __name__ == "__main__":
    main()

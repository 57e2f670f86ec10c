"""Quality, not speed: does one M6 learn captioning, question answering and text to image from
one task mix, and does the mix cost or help each task against a model trained on that task
alone for the same steps? (issue 20; design.md §2.7)

Arms, every one m6-small (configs/m6/m6-small.yaml: 4,000 drawn scenes split 90/10 by image,
People's Daily sentences) with the same steps, batch and learning rate, seeds 0-2 (train.seed
draws the init and the order):
- multi-task: captions 1, questions 1, image-conditioned continuation 0.5, People's Daily
  continuation 0.5, text to image 1 (the codes of --vqvae, a vqvae-small), one model.
- captions only, questions only, text to image only: one task, the same steps (so each sees
  about four times the examples of its task that the mix gives it).
Measured on the held-out scenes (never trained on), greedy:
- captions: corpus BLEU-4 (sacrebleu, zh) and CIDEr-D (pycocoevalcap) against the true
  caption, and the share of the truth's claims the generated caption states (colour, shape,
  position, count; taichu.m6_eval.attribute_accuracy) and captions right in every claim;
- questions: exact match over questions asked with the templates training used and with the
  held-out templates (other wordings of the same kinds of question), held-out scenes only;
- text to image: for --captions distinct held-out captions, one image each (temperature 1,
  top-k 32, seed 0) decoded by the vqvae and judged by the pixel checker taichu.scene_check
  (share of claims held; "all").
Chance rows: a caption of the most common training caption and the most common answer
per question kind are beside them (what a model that ignores the image would score).

    .venv/bin/python bench/m6.py --vqvae runs/vqvae-small/final        # 3 seeds; rewrites its doc block
    .venv/bin/python bench/m6.py --vqvae runs/vqvae-small/final --quick  # 1 seed, 60 steps, doc untouched

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

CONFIG = "configs/m6/m6-small.yaml"
ARMS = {
    "multi-task": "{caption: 1.0, vqa: 1.0, image_text: 0.5, text_continuation: 0.5, text_to_image: 1.0}",
    "captions only": "{caption: 1.0}",
    "questions only": "{vqa: 1.0}",
    "text to image only": "{text_to_image: 1.0}",
}
CODE_ARMS = ("multi-task", "text to image only")
KINDS = ("colour", "shape", "position", "count", "all")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-m6"))
    parser.add_argument("--vqvae", default=str(ROOT / "runs" / "vqvae-small" / "final"),
                        help="a trained vqvae-small directory (taichu train configs/vqvae/vqvae-small.yaml)")
    parser.add_argument("--backend", choices=("torch", "mindspore"), default="torch")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--images", type=int, default=300, help="held-out images captioned")
    parser.add_argument("--questions", type=int, default=300, help="questions per template set")
    parser.add_argument("--captions", type=int, default=60, help="held-out captions drawn")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--quick", action="store_true", help="1 seed, 60 steps, doc untouched")
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.no_doc, args.steps = args.seeds[:1], True, 60
        args.images, args.questions, args.captions = 32, 32, 8
    args.out = Path(args.out)
    return args


def arm_overrides(args, arm: str, seed: int) -> list[str]:
    from taichu.config import load_config

    steps = args.steps
    overrides = [f"data.tasks={ARMS[arm]}", f"train.seed={seed}", f"train.max_steps={steps}",
                 f"train.warmup_steps={min(50, steps // 4)}", f"train.eval_interval={steps // 2}",
                 f"train.checkpoint_interval={steps}"]
    if arm in CODE_ARMS:
        vq = load_config(args.vqvae).model
        overrides += [f"model.codebook_size={vq.codebook.size}", f"model.image_grid={vq.grid}",
                      f"data.image_tokenizer={args.vqvae}"]
    return overrides + args.overrides


def measures(args, model_dir: Path, arm: str) -> dict:
    """Captions, answers and drawn images of the held-out scenes by the model in model_dir."""
    import taichu
    from taichu.m6_eval import evaluate_captions, evaluate_vqa, held_out_data
    from taichu.m6_generate import imagine_codes, model_step
    from taichu.tokenizer import Tokenizer

    model = taichu.load_model(model_dir, args.backend)
    config, tokenizer = model.config, Tokenizer(model_dir / "tokenizer.model")
    step = model_step(model)
    data = held_out_data(config)
    out = {}
    if arm in ("multi-task", "captions only"):
        captions = evaluate_captions(step, tokenizer, config, limit=args.images, data=data)
        out["captions"] = {k: captions[k] for k in ("bleu4", "cider", "attributes", "images")}
        out["caption_examples"] = captions["examples"][:8]
    if arm in ("multi-task", "questions only"):
        vqa = evaluate_vqa(step, tokenizer, config, limit=args.questions, data=data)
        out["vqa"] = {k: v for k, v in vqa.items() if k != "examples"}
        out["vqa_examples"] = vqa["examples"][:4] + vqa["examples"][-4:]
    if arm in CODE_ARMS:
        from taichu.generate import SamplingConfig
        from taichu.image_tokens import decode_codes
        from taichu.scene_check import score_images

        prompts = sorted({e.target for e in data.held_out_pools["caption"]})[:args.captions]
        codes = imagine_codes(step, tokenizer, config, prompts, SamplingConfig(temperature=1.0, top_k=32, seed=0))
        images = decode_codes(args.vqvae, codes, args.backend)
        scores = score_images(list(images), prompts)
        out["text_to_image"] = {k: scores[k] for k in KINDS if k in scores} | {"captions": len(prompts)}
    return out


def baselines(args) -> dict:
    """What a model blind to the image scores (taichu.m6_eval.blind_guesses, as taichu eval
    shows beside its numbers): every held-out image captioned with the most common training
    caption; every question answered with the most common training answer of its kind."""
    from taichu.config import load_config
    from taichu.m6_data import QUESTION_TEMPLATES
    from taichu.m6_eval import (attribute_accuracy, blind_guesses, caption_bleu, caption_cider, held_out_data,
                                vqa_accuracy)

    data = held_out_data(load_config(ROOT / CONFIG, arm_overrides(args, "multi-task", 0)))
    common, answers = blind_guesses(data)
    truths = [e.target for e in data.held_out_pools["caption"][:args.images]]
    guesses = [common] * len(truths)
    questions = data.questions("seen")[:args.questions] + data.questions("held_out")[:args.questions]
    predicted = [answers[QUESTION_TEMPLATES[e.template].kind] for e in questions]
    vqa = vqa_accuracy(predicted, [e.target for e in questions], [e.template for e in questions],
                       data.held_out_templates)
    return {"caption": common, "captions": {"bleu4": caption_bleu(guesses, truths), "cider": caption_cider(guesses, truths),
                                            "attributes": attribute_accuracy(guesses, truths)},
            "vqa": {k: v for k, v in vqa.items() if k != "examples"}}


def run(args) -> dict:
    from distill import train_once
    from taichu.config import load_config
    from taichu.train import read_metrics, run_training

    args.out.mkdir(parents=True, exist_ok=True)
    if not (Path(args.vqvae) / "model.safetensors").exists():
        raise SystemExit(f"--vqvae {args.vqvae}: no trained image tokenizer there; run "
                         "taichu train configs/vqvae/vqvae-small.yaml --out runs/vqvae-small first")
    results = {"backend": args.backend, "steps": args.steps, "vqvae": str(args.vqvae), "rows": [],
               "baseline": baselines(args)}
    for seed in args.seeds:
        for arm in ARMS:
            config = load_config(ROOT / CONFIG, arm_overrides(args, arm, seed))
            run_dir = args.out / f"{arm.replace(' ', '-')}-seed{seed}"
            minutes = train_once(run_dir, lambda d: run_training(config, args.backend, d, progress=True))
            curve = {r["step"]: r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r}
            row = {"arm": arm, "seed": seed, "minutes": minutes, "val_loss": curve,
                   **measures(args, run_dir / "final", arm)}
            results["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("examples")}, ensure_ascii=False),
                  flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
    return results


def _mean(rows, *path) -> str:
    values = []
    for row in rows:
        value = row
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None and not np.isnan(value):   # NaN: no claim of that kind was checked
            values.append(float(value))
    if not values:
        return "-"
    scale = 100.0 if path[-1] not in ("bleu4", "cider") else 1.0
    mean = np.mean(values) * scale
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ± {np.std(values) * scale:.1f}"


def report(args, results: dict) -> str:
    from benchdoc import machine

    rows, base = results["rows"], results["baseline"]
    seeds = sorted({r["seed"] for r in rows})
    by_arm = {arm: [r for r in rows if r["arm"] == arm] for arm in ARMS}
    lines = [f"Machine: {machine()}. Backend {results['backend']}; m6-small, {results['steps']} steps of 32, "
             f"seeds {seeds} (mean ± std over the seeds each arm ran); held-out scenes only; greedy decoding. "
             "Percentages except BLEU-4 (0-100) and CIDEr-D (0-10).", "",
             "| arm | caption BLEU-4 | CIDEr-D | attributes: colour / shape / position / count | caption all right "
             "| VQA seen templates | VQA held-out templates | text to image: checker all | seeds | minutes |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for arm, arm_rows in by_arm.items():
        attributes = " / ".join(_mean(arm_rows, "captions", "attributes", k) for k in KINDS[:4])
        minutes = [r["minutes"] for r in arm_rows if r["minutes"] is not None]
        lines.append(f"| {arm} | {_mean(arm_rows, 'captions', 'bleu4')} | {_mean(arm_rows, 'captions', 'cider')} "
                     f"| {attributes} | {_mean(arm_rows, 'captions', 'attributes', 'all')} "
                     f"| {_mean(arm_rows, 'vqa', 'seen')} | {_mean(arm_rows, 'vqa', 'held_out')} "
                     f"| {_mean(arm_rows, 'text_to_image', 'all')} | {len(arm_rows)} | {np.mean(minutes):.1f} |"
                     if minutes else f"| {arm} | ... |")
    attributes = " / ".join(_mean([base], "captions", "attributes", k) for k in KINDS[:4])
    lines.append(f"| blind (most common caption / answer of its kind) | {_mean([base], 'captions', 'bleu4')} "
                 f"| {_mean([base], 'captions', 'cider')} | {attributes} "
                 f"| {_mean([base], 'captions', 'attributes', 'all')} | {_mean([base], 'vqa', 'seen')} "
                 f"| {_mean([base], 'vqa', 'held_out')} | - | - | - |")
    example = next((r for r in rows if r["arm"] == "multi-task"), None)
    if example:
        lines += ["", f"Held-out examples, multi-task seed {example['seed']}:", ""]
        for e in example.get("caption_examples", [])[:4]:
            lines.append(f"- caption: {e['generated']!r} (truth {e['truth']!r})")
        for e in example.get("vqa_examples", []):
            lines.append(f"- {e['question']} -> {e['predicted']!r} (truth {e['answer']!r}, template {e['template']})")
    return "\n".join(lines)


def main(argv=None) -> None:
    from benchdoc import write_section

    args = parse_args(argv)
    path = args.out / "results.json"
    results = json.loads(path.read_text(encoding="utf-8")) if args.report_only else run(args)
    text = report(args, results)
    print(text)
    if not args.no_doc:
        write_section("m6", "## M6: one model, many tasks (bench/m6.py)", text)


if __name__ == "__main__":
    main()

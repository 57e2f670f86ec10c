"""Quality, not speed: does a student distilled from a trained teacher beat the same student
trained alone? (issue 18; TinyBERT's claim, design.md §2.4)

Same data, steps, seeds and initial weights for every student (train.seed draws the init
and the batch order); the arms differ only in the loss:
- alone: ``taichu train`` of the student config (its own loss);
- distilled: ``taichu distill`` with every term (embeddings, hidden states, attention scores,
  predictions, plus the student's own loss), the config's distill: section;
- prediction only: the same with the intermediate terms' weights at 0 (the ablation).
The teacher is trained once (seed 0) and reported beside them.

CLIP (--family clip): teacher configs/clip/clip-small-teacher.yaml, student
configs/clip/clip-small-student.yaml (digits + 1,000 scenes, 600 steps of 64 pairs). Measured
on the held-out split as `taichu eval` measures it: zero-shot digit accuracy and scene
Recall@1 both ways.
DALL-E (--family dalle): teacher a trained configs/dalle/dalle-small.yaml (--teacher; trained
here if missing), student configs/dalle/dalle-small-student.yaml (8,000 scenes, 2,000 steps
of 32). Measured: the held-out image-token cross-entropy (nats per code, the part of the loss
that draws), and the pixel checker (taichu.scene_check) on the first sample of 100 held-out
captions no training scene has (bench/imagine_quality.py's set and sampler).

    .venv/bin/python bench/distill.py --family clip                 # 3 seeds; rewrites its doc block
    .venv/bin/python bench/distill.py --family dalle --teacher runs/t2i/dalle-small-8000/final
    .venv/bin/python bench/distill.py --family clip --quick         # 1 seed, 60 steps, doc untouched

Runs finished in --out are measured again, not retrained.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

ARMS = {"alone": None, "distilled": [],
        "prediction only": ["distill.embedding_weight=0", "distill.hidden_weight=0",
                            "distill.attention_weight=0"]}
PAIRS = {"clip": ("configs/clip/clip-small-teacher.yaml", "configs/clip/clip-small-student.yaml"),
         "dalle": ("configs/dalle/dalle-small.yaml", "configs/dalle/dalle-small-student.yaml")}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(PAIRS), default="clip")
    parser.add_argument("--teacher", help="a trained teacher directory (default: train one in --out)")
    parser.add_argument("--out", help="runs directory (default runs/bench-distill-FAMILY)")
    parser.add_argument("--backend", choices=("torch", "mindspore"), default="torch")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="override for every student (and a trained-here teacher)")
    parser.add_argument("--captions", type=int, default=100, help="DALL-E: held-out captions checked")
    parser.add_argument("--quick", action="store_true", help="1 seed, 60 steps, doc untouched")
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report of --out's results.json without running anything")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.no_doc = args.seeds[:1], True
        args.overrides = args.overrides + ["train.max_steps=60", "train.warmup_steps=5",
                                           "train.eval_interval=60", "train.checkpoint_interval=60"]
    args.out = Path(args.out or ROOT / "runs" / f"bench-distill-{args.family}")
    return args


# ----------------------------------------------------------------------------- measures

def clip_measures(model_dir, backend: str) -> dict:
    from taichu.retrieval import Embedder, evaluate

    embedder = Embedder(model_dir, backend)
    digits, scenes = evaluate(embedder, "digits").values, evaluate(embedder, "scenes").values
    return {"zero-shot digits": digits["zero_shot"]["accuracy"],
            "scenes text->image R@1": scenes["text_to_image"]["R@1"],
            "scenes image->text R@1": scenes["image_to_text"]["R@1"],
            "chance": {"zero-shot digits": digits["zero_shot"]["chance"],
                       "scenes R@1": scenes["text_to_image"]["chance"]["R@1"]}}


def image_token_loss(model_dir) -> float:
    """Mean cross-entropy (nats) of every held-out image code given the caption and the codes
    before it (torch_impl, fp32)."""
    import torch
    from torch.nn import functional as F

    from taichu.api import load_model
    from taichu.train import TASK_DATA

    model = load_model(model_dir, backend="torch")
    validation = TASK_DATA["text_to_image"](model.config, Path(model_dir), 0).validation
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(validation), 64):
            batch = validation.batch(np.arange(start, min(len(validation), start + 64)))
            ids, codes = (torch.from_numpy(batch[k]) for k in ("input_ids", "image_codes"))
            _, image_logits = model(ids, codes[:, :-1])
            total += float(F.cross_entropy(image_logits.reshape(-1, image_logits.shape[-1]),
                                           codes.reshape(-1), reduction="sum"))
            count += codes.numel()
    return total / count


def dalle_measures(model_dir, backend: str, captions: list[str]) -> dict:
    """Held-out image-token loss; checker scores of the first sample (temperature 1, seed 0)
    of each held-out caption."""
    from imagine_quality import score
    from taichu.api import load_model
    from taichu.config import load_config
    from taichu.generate import SamplingConfig
    from taichu.image_tokens import decode_codes
    from taichu.imagine import dalle_step, prompt_ids, sample_codes
    from taichu.tokenizer import Tokenizer

    config = load_config(model_dir)
    vqvae = config.data.image_tokenizer
    tokenizer = Tokenizer(Path(model_dir) / "tokenizer.model")
    ids = np.concatenate([prompt_ids(tokenizer, c, config.model.text_length)[0] for c in captions])
    grid = config.model.image_grid
    step = dalle_step(load_model(model_dir, backend=backend))
    codes = sample_codes(step, ids, grid, SamplingConfig(max_new_tokens=grid * grid, temperature=1.0, seed=0))
    checks = score(decode_codes(vqvae, codes, backend), captions)
    return {"held-out image-token loss": image_token_loss(model_dir), "checker (first sample)": checks}


# ----------------------------------------------------------------------------- runs

def train_once(run_dir: Path, train) -> float | None:
    """Minutes spent, or None when the run had finished before."""
    if (run_dir / "final" / "model.safetensors").exists():
        return None
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    train(run_dir)
    return (time.perf_counter() - started) / 60


def run(args) -> dict:
    from taichu.config import load_config
    from taichu.distill import run_distillation
    from taichu.train import read_metrics, run_training

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    teacher_config_path, student_config_path = (ROOT / p for p in PAIRS[args.family])
    teacher = Path(args.teacher) if args.teacher else out / "teacher" / "final"
    overrides = list(args.overrides)
    teacher_minutes = None
    if not args.teacher:
        teacher_config = load_config(teacher_config_path, overrides)
        teacher_minutes = train_once(out / "teacher", lambda d: run_training(
            teacher_config, args.backend, d, progress=True))
    if args.family == "dalle":
        # The students read the codes of the image tokenizer the teacher was trained with.
        overrides.append(f"data.image_tokenizer={load_config(teacher).data.image_tokenizer}")
    captions = None
    if args.family == "dalle":
        from imagine_quality import held_out

        _, captions, _, _ = held_out([str(teacher)], args.captions)
    measure = ((lambda d: clip_measures(d, args.backend)) if args.family == "clip"
               else (lambda d: dalle_measures(d, args.backend, captions)))
    results = {"family": args.family, "backend": args.backend, "teacher": str(teacher),
               "teacher_minutes": teacher_minutes, "overrides": args.overrides,
               "teacher_measures": measure(teacher), "rows": []}
    print(json.dumps({"teacher": results["teacher_measures"]}), flush=True)
    for seed in args.seeds:
        for arm, extra in ARMS.items():
            config = load_config(student_config_path, overrides + [f"train.seed={seed}"] + (extra or []))
            run_dir = out / f"{arm.replace(' ', '-')}-seed{seed}"
            if extra is None:
                minutes = train_once(run_dir, lambda d: run_training(config, args.backend, d, progress=True))
            else:
                minutes = train_once(run_dir, lambda d: run_distillation(config, teacher, args.backend, d,
                                                                         progress=True))
            curve = {r["step"]: r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r}
            same_tokenizer = ((run_dir / "final" / "tokenizer.model").read_bytes()
                              == (teacher / "tokenizer.model").read_bytes())
            row = {"arm": arm, "seed": seed, "minutes": minutes, "val_loss": curve,
                   "same_tokenizer_as_teacher": same_tokenizer, **measure(run_dir / "final")}
            results["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "val_loss"}), flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


# ----------------------------------------------------------------------------- report

def _mean_sd(values) -> str:
    values = np.asarray(values, np.float64) * 100
    return f"{values.mean():.1f} ± {values.std():.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def report(args, results: dict) -> str:
    from benchdoc import machine

    rows, seeds = results["rows"], sorted({r["seed"] for r in results["rows"]})
    lines = [f"Machine: {machine()}. Backend {results['backend']}; seeds {seeds} (init and batch "
             f"order; the teacher is one run). Command: `.venv/bin/python bench/distill.py --family "
             f"{results['family']}{' --teacher ' + results['teacher'] if args.teacher else ''}`.", ""]
    if results["family"] == "clip":
        keys = ("zero-shot digits", "scenes text->image R@1", "scenes image->text R@1")
        lines += ["| student (clip-small-student, 0.23 M) | " + " | ".join(keys) + " | held-out contrastive loss |",
                  "| --- | " + " | ".join("---:" for _ in keys) + " | ---: |"]
        for arm in ARMS:
            mine = [r for r in rows if r["arm"] == arm]
            per_seed = lambda k: " / ".join(f"{r[k] * 100:.1f}" for r in mine)
            val = " / ".join(f"{r['val_loss'][max(r['val_loss'])]:.3f}" for r in mine)
            lines.append(f"| {arm} | " + " | ".join(f"{_mean_sd([r[k] for r in mine])} ({per_seed(k)})"
                                                    for k in keys) + f" | {val} |")
        t = results["teacher_measures"]
        lines.append("| teacher (clip-small-teacher, 0.94 M) | " + " | ".join(f"{t[k] * 100:.1f}" for k in keys)
                     + " | |")
        chance = t["chance"]
        lines += ["", f"Chance: zero-shot {chance['zero-shot digits'] * 100:.1f} %, scene R@1 "
                      f"{chance['scenes R@1'] * 100:.1f} %. Percent; mean ± sd over seeds (per seed)."]
    else:
        lines += ["| student (dalle-small-student, 0.66 M) | held-out image-token loss | checker: all | "
                  "colour | shape | position | count |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]

        def checker_cells(items):
            # A kind no held-out caption states (count, when they name no numbers) is NaN: "-".
            return " | ".join("-" if np.isnan([r["checker (first sample)"][k] for r in items]).all()
                              else _mean_sd([r["checker (first sample)"][k] for r in items])
                              for k in ("all", "colour", "shape", "position", "count"))
        for arm in ARMS:
            mine = [r for r in rows if r["arm"] == arm]
            loss = " / ".join(f"{r['held-out image-token loss']:.4f}" for r in mine)
            lines.append(f"| {arm} | {loss} | {checker_cells(mine)} |")
        t = results["teacher_measures"]
        lines.append(f"| teacher (dalle-small, 1.9 M) | {t['held-out image-token loss']:.4f} | "
                     f"{checker_cells([t])} |")
        lines += ["", f"Checker: share of {args.captions} held-out captions whose first sample (temperature 1, "
                      "seed 0) passes every check (all) or the checks of one kind; percent, mean ± sd over "
                      "seeds. Losses per seed."]
    return "\n".join(lines)


def main(argv=None) -> None:
    from benchdoc import write_section

    args = parse_args(argv)
    results = (json.loads((args.out / "results.json").read_text()) if args.report_only else run(args))
    text = report(args, results)
    print(text)
    if not args.no_doc:
        write_section(f"distill-{args.family}", f"## Distillation: {args.family} (bench/distill.py)", text)


if __name__ == "__main__":
    main()

"""Quality, not speed: MST's third claim at CPU scale, on the same budget (several seeds):
features pretrained with the guided mask and the global decoder make a better start for a
dense task than random weights.

For each seed, the models bench/vision_pretraining.py pretrained (vision-small, 600 steps on
digits + scenes; guided, random and no mask) are fine-tuned by ``taichu segment``'s recipe
(taichu.vision_tasks.SEGMENT_RECIPE: the teacher's backbone + the student's decoder, per-pixel
cross-entropy over background and three shapes on 1,000 drawn scenes of another scene seed,
1,000 steps of 16 at learning rate 2e-3), beside the same segmentation model trained from
random weights (``--scratch``) with the same steps, flips and seed. Reported: held-out mIoU
and per-class IoU (214 scenes nobody trained on), the held-out loss along the way (when the
shapes are told apart shows as a drop), and "background everywhere" for scale.

    .venv/bin/python bench/vision_segmentation.py            # 3 seeds; rewrites its doc block
    .venv/bin/python bench/vision_segmentation.py --quick    # 1 seed, 100 steps, doc untouched

Needs the pretrained runs in --pretrained (bench/vision_pretraining.py --seeds 0 1 2
--steps 600). Runs finished in --out are measured again, not retrained.
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

ARMS = ("guided", "random", "none", "scratch")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", default=str(ROOT / "runs" / "bench-vision-pretraining"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-vision-segmentation"))
    parser.add_argument("--backend", choices=("torch", "mindspore"), default="torch")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override")
    parser.add_argument("--quick", action="store_true", help="1 seed, 100 steps, doc untouched")
    parser.add_argument("--no-doc", action="store_true")
    return parser.parse_args(argv)


def run(args) -> dict:
    from taichu.config import load_config
    from taichu.train import read_metrics, run_training
    from taichu.vision_tasks import evaluate_segmentation, segmentation_config

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"rows": [], "overrides": args.overrides}
    started = time.perf_counter()
    for seed in args.seeds:
        for arm in ARMS:
            source = Path(args.pretrained) / f"{'guided' if arm == 'scratch' else arm}-seed{seed}" / "final"
            if not (source / "model.safetensors").exists():
                raise SystemExit(f"{source}: missing; run bench/vision_pretraining.py --seeds {seed} first")
            config = segmentation_config(load_config(source), [*args.overrides, f"train.seed={seed}"])
            run_dir, t, minutes = out / f"{arm}-seed{seed}", time.perf_counter(), None
            if not (run_dir / "final" / "model.safetensors").exists():
                shutil.rmtree(run_dir, ignore_errors=True)
                run_training(config, args.backend, run_dir, init_dir=None if arm == "scratch" else source,
                             progress=True)
                minutes = (time.perf_counter() - t) / 60
            scores = evaluate_segmentation(run_dir / "final", args.backend)
            scores.pop("examples")
            curve = {r["step"]: r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r}
            row = {"arm": arm, "seed": seed, "minutes": minutes, "miou": scores["iou"]["mean"],
                   "per_class": scores["iou"]["per_class"], "pixel_accuracy": scores["pixel_accuracy"],
                   "val_loss": curve, "scenes": scores["scenes"],
                   "background_everywhere": scores["background_everywhere"]["iou"]["mean"]}
            results["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "val_loss"}), flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=1))
    results["minutes"] = (time.perf_counter() - started) / 60
    results["steps"] = config.train.max_steps
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def report(args, results: dict) -> str:
    from benchdoc import machine

    rows = results["rows"]
    steps = sorted(rows[0]["val_loss"], key=int)
    shown = [s for s in steps if int(s) in (0, 300, 500, 700, results["steps"])]
    lines = [f"{time.strftime('%Y-%m-%d')}; {machine()}.", "",
             f"Command: `.venv/bin/python bench/vision_segmentation.py"
             f"{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` ({results['minutes']:.0f} min, backend "
             f"{args.backend}; vision-small, taichu segment's recipe, {results['steps']} steps of 16 scenes, "
             f"{rows[0]['scenes']} held-out scenes).", "",
             "| start | seed | mIoU (%) | background / 圆形 / 正方形 / 三角形 IoU (%) | held-out loss at step "
             + " / ".join(str(s) for s in shown) + " | minutes |",
             "| --- | ---: | ---: | --- | --- | ---: |"]
    for r in rows:
        per_class = " / ".join(f"{100 * v:.1f}" for v in r["per_class"])
        curve = " / ".join(f"{r['val_loss'][s]:.3f}" for s in shown)
        name = {"scratch": "random weights", "none": "pretrained, no mask (DINO)"}.get(r["arm"], f"pretrained, {r['arm']} mask")
        lines.append(f"| {name} | {r['seed']} | {100 * r['miou']:.1f} | {per_class} | {curve} | "
                     f"{'-' if r['minutes'] is None else format(r['minutes'], '.1f')} |")
    lines.append("")
    for arm in ARMS:
        values = np.array([100 * r["miou"] for r in rows if r["arm"] == arm])
        if len(values):
            lines.append(f"- {dict(scratch='random weights', none='no mask (DINO)').get(arm, arm + ' mask')}: mIoU {values.mean():.1f} ± "
                         f"{values.std():.1f} % ({len(values)} seeds: {', '.join(f'{v:.1f}' for v in values)})")
    lines.append(f"- background everywhere: mIoU {100 * rows[0]['background_everywhere']:.1f} %")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.seeds, args.no_doc = args.seeds[:1], True
        args.overrides = [*args.overrides, "train.max_steps=100"]
        args.out = str(Path(args.out).with_name(Path(args.out).name + "-quick"))
    text = report(args, run(args))
    print(text)
    if not args.no_doc:
        from benchdoc import write_section

        write_section("vision_segmentation", "## Vision: segmentation from pretrained features "
                                             "(bench/vision_segmentation.py)", text)


if __name__ == "__main__":
    main()

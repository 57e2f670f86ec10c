"""Quality, not speed: MST's claims at CPU scale, on the same budget (several seeds).

For each seed, one random vision-small model (taichu.build_model, torch seed) is pretrained
three times from the same weights on digits + drawn scenes, with the same crops and steps,
changing only model.masking.mask: ``guided`` (MST: each patch below the image's
mask_threshold-quantile of the teacher's attention is masked with probability mask_prob),
``random`` (every patch with probability mask_prob x that quantile: the same expected share,
chosen without attention) and ``none`` (DINO). Then:

1. Where the mask lands: on held-out drawn scenes (scene seed 7, drawn at the model's image
   size so the per-pixel shape classes align with the patches), the share of masked patches
   that touch a shape (any of their pixels), for the guided rule and the random rule (same
   expected share) applied to the guided model's teacher attention, beside the share of all
   patches that touch a shape.
   MST's claim: guided masks land on background (well below that share), random ones do not.
2. Frozen features: linear-probe and k-NN accuracy on held-out digits (the model config's
   split) of each pretrained teacher and of the untrained model.

Nothing here is a test; the same numbers come out on any machine for a given seed (up to
float32 summation order).

    .venv/bin/python bench/vision_pretraining.py                 # 2 seeds, 300 steps; rewrites its doc block
    .venv/bin/python bench/vision_pretraining.py --quick         # tiny budget, doc untouched

Runs already finished in --out (their final/ exists) are measured again, not retrained, so an
interrupted run continues where it stopped (minutes: "-" for those).
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

CONFIG = ROOT / "configs" / "vision" / "vision-small.yaml"
MASKS = ("guided", "random", "none")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-vision-pretraining"))
    parser.add_argument("--backend", choices=("torch", "mindspore"), default="torch")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--scenes", type=int, default=200, help="held-out scenes for the mask measure")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--quick", action="store_true", help="20 steps, 1 seed, doc untouched")
    parser.add_argument("--no-doc", action="store_true")
    return parser.parse_args(argv)


def probe(model_dir: Path) -> dict:
    from taichu.probe import knn_accuracy, linear_probe
    from taichu.vision_data import load_images
    from taichu.vision_tasks import VisionRunner

    runner = VisionRunner(model_dir, "torch")
    data = runner.config.data
    images = load_images("digits", data.validation_fraction, data.split_seed)
    train = runner.run([p.load() for p in images.train])[0], [p.label for p in images.train]
    test = runner.run([p.load() for p in images.test])[0], [p.label for p in images.test]
    return {"linear_probe": linear_probe(*train, *test), "knn": knn_accuracy(*train, *test)}


def random_prob(config) -> float:
    """The random rule's mask_prob that masks the guided rule's expected share of patches."""
    k = config.model.masking
    if k.mask_threshold_kind != "quantile":
        raise ValueError("the equal-share random arm needs masking.mask_threshold_kind quantile")
    return k.mask_prob * k.mask_threshold


def mask_placement(model_dir: Path, count: int) -> dict:
    """Share of masked patches on shapes, guided vs random, over held-out scenes."""
    from taichu.imagetext import draw_scene, make_scene, scene_class_map
    from taichu.vision_tasks import VisionRunner, masked_on_shapes, patch_coverage

    runner = VisionRunner(model_dir, "torch")
    m = runner.config.model
    scenes = [make_scene(7, i) for i in range(count)]
    maps = [scene_class_map(s, m.image_size) for s in scenes]
    _, attention = runner.run([draw_scene(s, m.image_size) for s in scenes])
    out = {"shape_patches": float(np.mean([patch_coverage(c, m.patch_size) > 0 for c in maps]))}
    for rule in ("guided", "random"):
        masks = runner.masks(attention, seed=0, mask=rule, mask_prob=random_prob(runner.config) if rule == "random" else None)
        out[rule] = masked_on_shapes(masks, maps, m.patch_size)
        out[f"{rule}_masked_share"] = float(masks.mean())
    return out


def run(args) -> dict:
    import torch

    import taichu
    from taichu.train import read_metrics, run_training

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"steps": args.steps, "rows": []}
    started = time.perf_counter()
    for seed in args.seeds:
        config = taichu.load_config(CONFIG, args.overrides + [f"train.seed={seed}"])
        init = out / f"init-seed{seed}"
        if not (init / "model.safetensors").exists():   # --resume-able: a finished piece is kept
            torch.manual_seed(seed)
            taichu.save_model(taichu.build_model(config, "torch"), init)
        row = {"arm": "untrained", "seed": seed, **probe(init)}
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        for mask in MASKS:
            schedule = [f"train.max_steps={args.steps}", f"train.warmup_steps={max(1, args.steps // 10)}",
                        f"train.eval_interval={args.steps}", f"train.checkpoint_interval={args.steps}",
                        f"train.log_interval={max(1, args.steps // 20)}", f"model.masking.mask={mask}"]
            if mask == "random":
                share = random_prob(taichu.load_config(CONFIG, args.overrides))
                schedule.append(f"model.masking.mask_prob={share}")
            config = taichu.load_config(CONFIG, args.overrides + schedule + [f"train.seed={seed}"])
            t, run_dir = time.perf_counter(), out / f"{mask}-seed{seed}"
            final = run_dir / "final"
            minutes = None                 # a run finished by an earlier invocation is measured, not retrained
            if not (final / "model.safetensors").exists():
                shutil.rmtree(run_dir, ignore_errors=True)
                run_training(config, args.backend, run_dir, init_dir=init, progress=True)
                minutes = (time.perf_counter() - t) / 60
            val = [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r]
            row = {"arm": mask, "seed": seed, "minutes": minutes, "val_loss": val[-1], **probe(final)}
            if mask == "guided":
                row["placement"] = mask_placement(final, args.scenes)
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=1))  # partial results survive
    results["minutes"] = (time.perf_counter() - started) / 60
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def report(args, results: dict) -> str:
    from benchdoc import machine

    lines = [f"{time.strftime('%Y-%m-%d')}; {machine()}.", "",
             f"Command: `.venv/bin/python bench/vision_pretraining.py"
             f"{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` ({results['minutes']:.0f} min, "
             f"backend {args.backend}; vision-small, {results['steps']} steps of 32 images, digits + scenes).", "",
             "| arm | seed | linear probe (%) | k-NN (%) | held-out MST loss | minutes |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results["rows"]:
        lines.append(f"| {r['arm']} | {r['seed']} | {100 * r['linear_probe']:.1f} | {100 * r['knn']:.1f} | "
                     f"{r.get('val_loss', float('nan')):.3f} | "
                     f"{'-' if r.get('minutes') is None else format(r['minutes'], '.1f')} |")
    lines.append("")
    arms = {}
    for r in results["rows"]:
        arms.setdefault(r["arm"], []).append(r)
    for arm, rows in arms.items():
        lp = np.array([r["linear_probe"] for r in rows]) * 100
        kn = np.array([r["knn"] for r in rows]) * 100
        lines.append(f"- {arm}: linear probe {lp.mean():.1f} ± {lp.std():.1f} %, k-NN {kn.mean():.1f} ± "
                     f"{kn.std():.1f} % ({len(rows)} seeds; chance 10 %)")
    for r in arms.get("guided", []):
        p = r["placement"]
        lines.append(f"- seed {r['seed']}, where the mask lands on {args.scenes} held-out scenes: "
                     f"{100 * p['guided']:.1f} % of guided-masked patches touch a shape, "
                     f"{100 * p['random']:.1f} % of random-masked ones, against {100 * p['shape_patches']:.1f} % "
                     f"of all patches (guided masks {100 * p['guided_masked_share']:.1f} % of patches, "
                     f"random {100 * p['random_masked_share']:.1f} %)")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.no_doc, args.scenes = 20, args.seeds[:1], True, 40
    text = report(args, run(args))
    print(text)
    if not args.no_doc:
        from benchdoc import write_section

        write_section("vision_pretraining", "## Vision: MST's claims at CPU scale (bench/vision_pretraining.py)", text)


if __name__ == "__main__":
    main()

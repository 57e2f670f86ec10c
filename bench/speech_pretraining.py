"""Quality, not speed: does wav2vec 2.0 pretraining help CTC recognition with little labelled
speech? The paper's central claim (Baevski et al. 2020, §5: pretrained models fine-tuned on
10 min - 100 h of labels beat models trained on the labels alone), measured at CPU scale on
the project's synthetic Mandarin (taichu.speech: People's Daily sentences spoken by
libespeak-ng's Mandarin voice variants; one voice held out entirely).

1. Pretrain configs/wav2vec2/wav2vec2-small.yaml on every training clip (no transcripts)
   and report the held-out pretraining loss before and after, the contrastive loss alone,
   and how much of the codebook the quantizer uses (perplexity of the argmax codes over the
   masked frames, out of G x V).
2. For each seed: fine-tune configs/wav2vec2/wav2vec2-small-ctc.yaml on a small labelled
   budget (data.train_clips) from the pretrained backbone (--init) and, beside it, the
   same model from scratch: same clips, steps, learning rate schedule, batches and seed.
3. Greedy CTC transcripts of held-out sentences (seen voices) and of the held-out voice:
   syllable and character error rates (taichu eval's numbers).

    .venv/bin/python bench/speech_pretraining.py            # ~1 h on 2 cores, rewrites its doc block
    .venv/bin/python bench/speech_pretraining.py --quick    # a few minutes, doc untouched
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

PRETRAIN = ROOT / "configs" / "wav2vec2" / "wav2vec2-small.yaml"
CTC = ROOT / "configs" / "wav2vec2" / "wav2vec2-small-ctc.yaml"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-speech-pretraining"))
    parser.add_argument("--backend", choices=("torch", "mindspore"), default="torch")
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--finetune-steps", type=int, default=500)
    parser.add_argument("--labelled", type=int, default=200, help="labelled clips (data.train_clips)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="override for both configs, e.g. data.sentences=1000")
    parser.add_argument("--pretrained", help="reuse this run's pretraining (a directory written by an "
                                             "earlier run: OUT of that run) instead of pretraining again")
    parser.add_argument("--quick", action="store_true", help="tiny budget; the doc is not touched")
    parser.add_argument("--no-doc", action="store_true")
    return parser.parse_args(argv)


def schedule(steps: int) -> list[str]:
    return [f"train.max_steps={steps}", f"train.warmup_steps={max(1, steps // 10)}",
            f"train.eval_interval={max(1, steps // 4)}", f"train.checkpoint_interval={steps}",
            f"train.log_interval={max(1, steps // 20)}"]


def pretraining_report(model_dir: Path, config) -> dict:
    """Held-out pretraining terms in evaluation mode (argmax codes, no Gumbel noise, fixed
    masks and distractors): contrastive loss per masked frame, code perplexity."""
    import torch

    from taichu.api import load_model
    from taichu.speech import load_speech_data
    from taichu.speech_batches import SpeechBatches
    from torch_impl.wav2vec2 import pretraining_terms

    model = load_model(model_dir, backend="torch")
    clips = load_speech_data(config.data).validation
    batches = SpeechBatches(clips, config, seed=0)
    contrastive, masked, perplexities = 0.0, 0, []
    with torch.no_grad():
        for start in range(0, min(len(clips), 64), 16):
            batch = batches.batch(np.arange(start, min(len(clips), start + 16)))
            inputs = [torch.from_numpy(v) for v in batch.values()]
            terms = pretraining_terms(model, *inputs[:4], None)
            contrastive += float(terms["contrastive_sum"])
            masked += int(terms["num_masked"])
            perplexities.append(float(terms["perplexity"]))
    q = config.model.quantizer
    return {"contrastive_per_masked_frame": contrastive / max(masked, 1),
            "code_perplexity": float(np.mean(perplexities)),
            "codebook": q.num_codevector_groups * q.num_codevectors_per_group,
            "chance_contrastive": float(np.log(1 + q.num_negatives))}


def error_rates(model_dir: Path, config) -> dict:
    from taichu.recognition import SpeechRunner, evaluate_clips
    from taichu.speech import load_speech_data

    data = load_speech_data(config.data)
    runner = SpeechRunner(model_dir, "torch", batch_size=16)
    return {"seen": evaluate_clips(runner, data.test), "held_out_voice": evaluate_clips(runner, data.held_out_voice)}


def run(args) -> dict:
    import taichu
    from taichu.train import read_metrics, run_training

    out = Path(args.out)
    results = {"pretraining": None, "finetune": []}
    started = time.perf_counter()
    pre_config = taichu.load_config(PRETRAIN, [*args.overrides, *schedule(args.pretrain_steps)])
    source = Path(args.pretrained) if args.pretrained else out
    before_dir, pretrained = source / "pretrain-init", source / "pretrain" / "final"
    t = time.perf_counter()
    if args.pretrained:
        previous = source / "results.json"
        if previous.exists():
            previous = json.loads(previous.read_text())["pretraining"]
            args.pretrain_steps, pretrain_minutes = previous["steps"], previous["minutes"]
        else:  # a run stopped during fine-tuning wrote no results: its metrics have the steps
            args.pretrain_steps = max(r["step"] for r in read_metrics(source / "pretrain"))
            pretrain_minutes = None
    else:
        taichu.save_model(taichu.build_model(pre_config, "torch"), before_dir)
        run_training(pre_config, args.backend, out / "pretrain", init_dir=before_dir, progress=True)
        pretrain_minutes = (time.perf_counter() - t) / 60
    evals = [r for r in read_metrics(source / "pretrain") if "val_loss" in r]
    results["pretraining"] = {
        "steps": args.pretrain_steps, "minutes": pretrain_minutes,
        "val_loss": [(r["step"], r["val_loss"]) for r in evals],
        "before": pretraining_report(before_dir, pre_config),
        "after": pretraining_report(pretrained, pre_config)}
    print(json.dumps(results["pretraining"], indent=1))
    for seed in args.seeds:
        for arm, init in (("pretrained", pretrained), ("scratch", None)):
            config = taichu.load_config(CTC, [*args.overrides, *schedule(args.finetune_steps),
                                              f"data.train_clips={args.labelled}", f"train.seed={seed}"])
            t = time.perf_counter()
            run_dir = out / f"ctc-{arm}-seed{seed}"
            final = run_training(config, args.backend, run_dir, init_dir=init, progress=True).final_dir
            minutes = (time.perf_counter() - t) / 60
            rates = error_rates(final, config)
            row = {"arm": arm, "seed": seed, "minutes": minutes,
                   "val_loss": [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r][-1],
                   **{f"{split}_{k}": v[k] for split, v in rates.items()
                      for k in ("syllable_error_rate", "character_error_rate")},
                   "example": rates["seen"]["examples"][0]}
            results["finetune"].append(row)
            print(json.dumps(row, ensure_ascii=False))
    results["minutes"] = (time.perf_counter() - started) / 60
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    return results


def report(args, results: dict) -> str:
    from benchdoc import machine

    p = results["pretraining"]
    lines = [f"{time.strftime('%Y-%m-%d')}; {machine()}.", "",
             f"Command: `.venv/bin/python bench/speech_pretraining.py"
             f"{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` ({results['minutes']:.0f} min, "
             f"backend {args.backend}).", "",
             f"Pretraining (wav2vec2-small, {p['steps']} steps, every training clip, no transcripts, "
             + (f"{p['minutes']:.1f} min" if p["minutes"] is not None else "reused from an earlier run")
             + "): held-out loss "
             + " -> ".join(f"{v:.3f} (step {s})" for s, v in p["val_loss"]) + "; in evaluation mode "
             f"(argmax codes) the contrastive loss per masked frame went "
             f"{p['before']['contrastive_per_masked_frame']:.3f} -> {p['after']['contrastive_per_masked_frame']:.3f} "
             f"(chance, ln(1 + K): {p['before']['chance_contrastive']:.3f}) and the code perplexity "
             f"{p['before']['code_perplexity']:.1f} -> {p['after']['code_perplexity']:.1f} of "
             f"{p['before']['codebook']} entries.", "",
             f"CTC fine-tuning on {args.labelled} labelled clips, {args.finetune_steps} steps, greedy "
             "decoding; error rates in % (syllables = tone-numbered pinyin syllables):", "",
             "| arm | seed | held-out sentences SER | CER | held-out voice SER | CER | val CTC loss | minutes |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results["finetune"]:
        lines.append(f"| {r['arm']} | {r['seed']} | {100 * r['seen_syllable_error_rate']:.1f} | "
                     f"{100 * r['seen_character_error_rate']:.1f} | "
                     f"{100 * r['held_out_voice_syllable_error_rate']:.1f} | "
                     f"{100 * r['held_out_voice_character_error_rate']:.1f} | {r['val_loss']:.3f} | "
                     f"{r['minutes']:.1f} |")
    arms = {}
    for r in results["finetune"]:
        arms.setdefault(r["arm"], []).append(r)
    lines.append("")
    for arm, rows in arms.items():
        ser = np.array([r["seen_syllable_error_rate"] for r in rows]) * 100
        held = np.array([r["held_out_voice_syllable_error_rate"] for r in rows]) * 100
        lines.append(f"- {arm}: SER {ser.mean():.1f} ± {ser.std():.1f} (seen voices), "
                     f"{held.mean():.1f} ± {held.std():.1f} (held-out voice), {len(rows)} seeds")
    if {"pretrained", "scratch"} <= set(arms):
        wins = sum(p_["seen_syllable_error_rate"] < s["seen_syllable_error_rate"]
                   for p_, s in zip(arms["pretrained"], arms["scratch"]))
        lines.append(f"- pretrained beats scratch on held-out sentences in {wins} of "
                     f"{len(arms['scratch'])} seeds")
    example = results["finetune"][0]["example"]
    lines.append(f"- example ({results['finetune'][0]['arm']}, seed {results['finetune'][0]['seed']}): "
                 f"reference `{example['reference']}`, transcript `{example['hypothesis']}`")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.pretrain_steps, args.finetune_steps, args.seeds = 20, 20, args.seeds[:1]
        args.overrides = ["data.sentences=200", *args.overrides]
        args.no_doc = True
        args.labelled = min(args.labelled, 100)
    results = run(args)
    text = report(args, results)
    print(text)
    if not args.no_doc:
        from benchdoc import write_section

        # One block per labelled budget, so runs at several budgets sit side by side.
        name = "speech_pretraining" if args.labelled == 200 else f"speech_pretraining_{args.labelled}"
        write_section(name, f"### {args.labelled} labelled clips", text)


if __name__ == "__main__":
    main()

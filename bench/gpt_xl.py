"""GPT-XL's claim on People's Daily: a memory of the previous segments lowers the held-out
perplexity of long documents, at equal parameters (near) and equal training steps.

Arms, each trained in PyTorch for the same steps of 8 x 128 tokens from the same seed:
- ``gpt``: the GPT with a window of W = 128 (learned absolute positions), trained on random
  128-token blocks, scored on non-overlapping segments of W (it has no memory);
- ``xl-m128``: GPT-XL, segments of W and a memory of W, trained on contiguous streams;
- ``xl-m256``: the same with a memory of 2W;
- ``xl-m0``: GPT-XL with no memory (mem_len 0), trained the same way: what relative
  positions and contiguous streams give without the memory.
All share gpt-xl-small's sizes (4 layers, width 256, 8k vocabulary, dropout 0.1). Each is
scored by taichu.xl_eval on the same held-out documents of 2,048 tokens: the GPT at L = 64
and 128; each GPT-XL at L = 64 and 128 with evaluation memories 0, W and 2W.

Generation: ``--generate`` times 2,000 greedy tokens from the first seed's xl-m128 on
PyTorch, MindSpore (compiled graphs) and ONNX Runtime, tokens/s per 250 tokens.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

ARMS = {"gpt": None, "xl-m0": 0, "xl-m128": 128, "xl-m256": 256}
XL_CONFIG = ROOT / "configs" / "gpt_xl" / "gpt-xl-small.yaml"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-gpt-xl"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--arms", nargs="+", default=["gpt", "xl-m128", "xl-m256", "xl-m0"], choices=list(ARMS))
    parser.add_argument("--document-tokens", type=int, default=2048)
    parser.add_argument("--generate", action="store_true", help="also time 2,000-token generation")
    parser.add_argument("--new-tokens", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="1 seed, 30 steps, doc untouched")
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    return parser.parse_args(argv)


def arm_config(arm: str, seed: int, steps: int, batch_size: int, cache_dir: Path):
    """The arm's config: gpt-xl-small with its memory, or a GPT of the same sizes and W."""
    import yaml

    from taichu.config import load_config

    raw = yaml.safe_load(XL_CONFIG.read_text())
    if ARMS[arm] is None:
        model = {k: v for k, v in raw["model"].items() if k != "mem_len"}
        raw = {**raw, "family": "gpt", "model": {**model, "max_position_embeddings": raw["data"]["seq_len"]},
               "data": {k: v for k, v in raw["data"].items() if k != "reset_memory"}}
    else:
        raw["model"]["mem_len"] = ARMS[arm]
    path = cache_dir / f"{arm}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return load_config(path, [f"train.seed={seed}", f"train.max_steps={steps}", f"train.batch_size={batch_size}", f"data.cache_dir={cache_dir}",
                              f"train.eval_interval={steps}", f"train.checkpoint_interval={steps}",
                              "train.keep_checkpoints=1", f"train.warmup_steps={min(100, steps // 10)}"])


def train_arm(args, arm: str, seed: int) -> Path:
    from taichu.train import run_training

    out = Path(args.out) / f"{arm}-seed{seed}"
    if (out / "final" / "model.safetensors").is_file():
        return out / "final"
    config = arm_config(arm, seed, args.steps, args.batch_size, Path(args.out) / "cache")
    started = time.perf_counter()
    result = run_training(config, "torch", out, progress=True)
    (out / "seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - started}))
    return result.final_dir


def score(args, model_dir: Path, arm: str) -> dict:
    from taichu.xl_eval import evaluate_model

    memories = [0] if ARMS[arm] is None else [0, 128, 256]   # an xl-m0 too: memory it never trained with
    table = evaluate_model(model_dir, "torch", contexts=[64, 128], memories=memories,
                           document_tokens=args.document_tokens, log=print)
    return {"rows": table.rows, "documents": table.documents, "predicted_tokens": table.predicted_tokens,
            "source": table.source}


def generation_speed(args, model_dir: Path) -> dict:
    """tokens/s of each 250-token stretch of one greedy generation, per runtime."""
    from taichu.api import load_model
    from taichu.generate import SamplingConfig, generate_ids, recurrent_model_step
    from taichu.tokenizer import Tokenizer
    from export.exporter import export_model

    tokenizer = Tokenizer(model_dir / "tokenizer.model")
    prompt = [tokenizer.encode("新华社北京一月一日电", add_bos=True)]
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0)
    onnx_dir = Path(args.out) / "onnx"
    if not (onnx_dir / "export_info.json").is_file():
        export_model(model_dir, "onnx", onnx_dir)
    from export.runtime_gpt_xl import gpt_xl_network

    steps = {"torch": lambda: recurrent_model_step(load_model(model_dir, backend="torch")),
             "mindspore": lambda: recurrent_model_step(load_model(model_dir, backend="mindspore")),
             "onnxruntime": lambda: gpt_xl_network(onnx_dir).step()}
    results = {}
    for runtime, make in steps.items():
        step = make()
        stamps = []

        def timed(input_ids, attention_mask, past, _step=step):
            out = _step(input_ids, attention_mask, past)
            stamps.append(time.perf_counter())
            return out

        tokens = generate_ids(timed, prompt, sampling, -1, tokenizer.pad_id, None)[0]
        # stamps[0]: after the prompt; stamps[k]: after k generated tokens were fed back.
        windows = [250 / (stamps[i + 250] - stamps[i]) for i in range(1, len(stamps) - 250, 250)]
        results[runtime] = {"tokens": len(tokens), "ids": tokens[:64], "windows": windows}
        print(runtime, [round(w, 1) for w in windows], flush=True)
    same = all(results[r]["ids"] == results["torch"]["ids"] for r in results)
    return {"runtimes": results, "same_tokens": same}


def collect(out: Path) -> dict:
    """Every scored run under ``out`` (each run's score.json: several bench processes, e.g.
    one per seed, may share ``out``) and the generation timing, if any."""
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    for score_file in sorted(out.glob("*-seed*/score.json")):
        results["runs"][score_file.parent.name] = json.loads(score_file.read_text())
    return results


def run(args) -> dict:
    from taichu.config import load_config
    from taichu.families import num_parameters

    out = Path(args.out)
    for seed in args.seeds:
        for arm in args.arms:
            key = f"{arm}-seed{seed}"
            if key in collect(out)["runs"]:
                continue
            final = train_arm(args, arm, seed)
            entry = score(args, final, arm)
            seconds = out / key / "seconds.json"
            entry["train_seconds"] = json.loads(seconds.read_text())["seconds"] if seconds.is_file() else None
            entry["parameters"] = num_parameters(load_config(final))
            (out / key / "score.json").write_text(json.dumps(entry, indent=1))
    results = collect(out)
    if args.generate:
        results["generation"] = generation_speed(args, out / f"xl-m128-seed{args.seeds[0]}" / "final")
        (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def _ppl(results, arm, context, memory) -> list[float]:
    values = []
    for key, entry in results["runs"].items():
        if key.rsplit("-seed", 1)[0] == arm:
            values += [r["perplexity"] for r in entry["rows"] if r["context"] == context and r["memory"] == memory]
    return values


def _cell(values) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def report(args, results: dict) -> str:
    from benchdoc import machine

    runs = results["runs"]
    seeds = sorted({int(k.rsplit("-seed", 1)[1]) for k in runs})
    any_run = next(iter(runs.values()))
    lines = [f"`bench/gpt_xl.py` on {machine()}: each arm trained in PyTorch for {args.steps} steps of "
             f"{args.batch_size} x 128 tokens (seeds {', '.join(map(str, seeds))}), gpt-xl-small's sizes; held-out "
             f"perplexity on {any_run['documents']} documents of {args.document_tokens} tokens "
             f"({any_run['predicted_tokens']:,} predicted tokens; {any_run['source']}), mean ± sd over seeds.",
             "",
             "| arm (parameters) | trained memory | eval L = 64, M = 0 | L = 128, M = 0 | L = 128, M = 128 | "
             "L = 128, M = 256 | L = 64, M = 128 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for arm in ARMS:
        keys = [k for k in runs if k.rsplit("-seed", 1)[0] == arm]
        if not keys:
            continue
        params = runs[keys[0]]["parameters"]
        cells = [_cell(_ppl(results, arm, c, m)) for c, m in ((64, 0), (128, 0), (128, 128), (128, 256), (64, 128))]
        trained = "- (window 128)" if ARMS[arm] is None else ARMS[arm]
        lines.append(f"| {arm} ({params / 1e6:.2f} M) | {trained} | " + " | ".join(cells) + " |")
    generation = results.get("generation")
    if generation:
        lines += ["", f"Greedy generation of {args.new_tokens} tokens from a window of 128 (xl-m128, seed "
                  f"{seeds[0]}, memory mem_len + seq_len - 1 = 255), tokens/s in each 250-token stretch; "
                  f"the same tokens on every runtime: {generation['same_tokens']}.", "",
                  "| runtime | tokens/s per 250-token stretch | first / last |", "| --- | --- | ---: |"]
        for runtime, entry in generation["runtimes"].items():
            windows = entry["windows"]
            ratio = windows[-1] / windows[0] if windows else math.nan
            lines.append(f"| {runtime} | {', '.join(f'{w:.0f}' for w in windows)} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    from benchdoc import write_section

    args = parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.no_doc = args.seeds[:1], 30, True
        args.out = str(Path(args.out).with_name(Path(args.out).name + "-quick"))
    results = collect(Path(args.out)) if args.report_only else run(args)
    text = report(args, results)
    print(text)
    if not args.no_doc:
        write_section("gpt_xl", "## GPT-XL: memory against a fixed window (bench/gpt_xl.py)", text)


if __name__ == "__main__":
    main()

"""Generation speed: prefill latency and decode tokens/s of every runtime on the same weights.

One random GPT (gpt-small with gelu_new, so it is exactly GPT-2's architecture; fixed seed)
is saved as a model directory in a temp dir, converted to a Hugging Face GPT-2 directory
(`taichu.convert`) and exported to ONNX fp32 + int8 and to MINDIR (`export.exporter.export_model`). Then,
at batch 1 and 8, greedy decoding of --new-tokens tokens after a --prompt-len token prompt
(random ids; eos never stops a row) runs on:

- torch_impl with its KV cache: `taichu.generate.model_step`, what `taichu generate` runs;
- torch_impl without a cache: every step reruns the whole sequence so far (written here);
- Hugging Face `GPT2LMHeadModel.generate` on the converted directory;
- ONNX Runtime fp32 and int8: `export.runtime.OnnxDecoder.step`;
- MindSpore graph mode over a static cache: `model_step` of the MindSpore model (jit-compiled
  StaticCachePrefill and StaticCacheDecoder), what `taichu generate --backend mindspore` runs;
- MINDIR: the exported prefill.mindir and decode.mindir in `nn.GraphCell`
  (`export.runtime.MindirGenerator`), what `taichu generate EXPORT --backend mindir` runs;
- MindSpore PyNative with the growing cache (`model_step(model, static_cache=False)`, what
  `--backend mindspore` ran before): ~0.5 s a step on 2 cores, so it decodes only
  --mindspore-new-tokens (8) tokens, in a worker of its own.

Ours all run through `taichu.generate.generate_ids` with a wrapped `step` that times each
call: prefill = the first call (the prompt pass), decode tokens/s = batch x (new tokens - 1)
/ the time of the calls that produced tokens 2..N. Hugging Face is timed from outside:
prefill = a `generate(max_new_tokens=1)` call, decode = a full call minus that. Each runtime
gets one warm-up generation, then --repeats timed ones (medians reported); the runtimes of a
worker alternate run by run, so load from other processes hits them alike. Each framework
runs in its own worker process (torch: torch_impl and HF; onnxruntime; MindSpore), one after
another, each with as many threads as cores. Nothing here is a test: ratios within one run
are the result.

    .venv/bin/python bench/generate.py            # table to stdout and docs/benchmarks.md
    .venv/bin/python bench/generate.py --quick    # gpt-tiny, a few tokens: a smoke run, doc untouched
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import benchdoc
from benchdoc import CORES, WAIT_IDLE, cpu_ticks, drive, driver_arguments, machine, others_share, settle

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: taichu is the checkout's
NAME = "generate"
SECTION = "## Generation (bench/generate.py)"
BATCHES = (1, 8)
WORKERS = ("torch", "onnx", "mindspore", "pynative")
REFERENCE, HF = "torch_impl (cache)", "Hugging Face generate"


# ---------------------------------------------------------------- shared helpers

def load_config(args):
    import taichu

    # gelu_new: GPT-2's activation, so the Hugging Face model computes the same function.
    return taichu.load_config(args.config, ["model.activation=gelu_new", *args.set,
                                            "model.dropout=0.0", "model.attention_dropout=0.0"])


def prompts(config, args) -> list[list[int]]:
    """max(BATCHES) prompts of --prompt-len random ids (ids 0-3 are special); batch b uses
    the first b. All the same length: no padding, so every runtime sees the same tensors."""
    rng = np.random.default_rng(0)
    ids = rng.integers(4, config.model.vocab_size, (max(BATCHES), args.prompt_len))
    return ids.tolist()










# ---------------------------------------------------------------- how a generation is timed

def step_runner(step, prompt_ids, new_tokens: int, max_positions: int):
    """run(batch) for a taichu ``step``: generate_ids with every step call timed.

    generate_ids calls step once for the prompt and once per token 2..N.
    """
    from taichu.generate import SamplingConfig, generate_ids

    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)

    def run(batch):
        times = []

        def timed(input_ids, attention_mask, past):
            start = time.perf_counter()
            out = step(input_ids, attention_mask, past)
            times.append(time.perf_counter() - start)
            return out

        start = time.perf_counter()
        new = generate_ids(timed, prompt_ids[:batch], sampling, eos_id=-1, pad_id=0,
                           max_positions=max_positions)
        total = time.perf_counter() - start
        return {"prefill": times[0], "decode": sum(times[1:new_tokens]),
                "total": total,
                "sampler": total - sum(times), "tokens": new}
    return run


def no_cache_step(model):
    """A torch_impl step without a KV cache: the "past" is the token sequence so far, and
    every call runs the model on all of it (the attention mask already covers it)."""
    import torch

    def step(input_ids, attention_mask, past):
        sequence = input_ids if past is None else np.concatenate([past, input_ids], axis=1)
        logits = model(torch.from_numpy(sequence), torch.from_numpy(attention_mask))
        return logits[:, -1].float().numpy(), sequence
    return step


def hf_runner(hf, prompt_ids, new_tokens: int, pad_id: int):
    """run(batch) for Hugging Face: prefill = generate(max_new_tokens=1), decode = the rest
    of a full generate(max_new_tokens=min_new_tokens=N); greedy, eos suppressed."""
    import torch

    def generate(input_ids, count):
        return hf.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                           max_new_tokens=count, min_new_tokens=count, do_sample=False,
                           pad_token_id=pad_id)

    def run(batch):
        input_ids = torch.tensor(prompt_ids[:batch])
        start = time.perf_counter()
        generate(input_ids, 1)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = generate(input_ids, new_tokens)
        total = time.perf_counter() - start
        return {"prefill": prefill, "decode": total - prefill, "total": total,
                "tokens": out[:, input_ids.shape[1]:].tolist()}
    return run


# ---------------------------------------------------------------- workers

def torch_worker(args, model_dir: Path):
    """(info, {name: (run, new tokens)}, context manager) for torch_impl and Hugging Face."""
    import torch
    import transformers

    import taichu
    from taichu.generate import model_step

    torch.set_num_threads(CORES)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    config = load_config(args)
    ids = prompts(config, args)
    ours = taichu.load_model(model_dir / "model", backend="torch")
    hf = transformers.GPT2LMHeadModel.from_pretrained(model_dir / "hf").eval()
    positions = config.model.max_position_embeddings
    info = {"torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "hf_attention": hf.config._attn_implementation, "threads": torch.get_num_threads()}
    n = args.new_tokens
    runs = {REFERENCE: (step_runner(model_step(ours), ids, n, positions), n),
            "torch_impl (no cache)": (step_runner(no_cache_step(ours), ids, n, positions), n),
            HF: (hf_runner(hf, ids, n, config.tokenizer.special_tokens.pad_id), n)}
    # inference_mode around every torch run alike (model_step and HF add their own no_grad).
    return info, runs, torch.inference_mode


def onnx_worker(args, model_dir: Path):
    import contextlib

    import onnxruntime

    from export.runtime import INT8_FILE, MODEL_FILE, OnnxDecoder

    config = load_config(args)
    ids = prompts(config, args)
    positions = config.model.max_position_embeddings
    n = args.new_tokens
    runs = {}
    for name, file in (("ONNX Runtime fp32", MODEL_FILE), ("ONNX Runtime int8", INT8_FILE)):
        decoder = OnnxDecoder(model_dir / "onnx" / file, threads=CORES)
        runs[name] = (step_runner(decoder.step, ids, n, positions), n)
    return {"onnxruntime_version": onnxruntime.__version__, "threads": CORES}, runs, \
        contextlib.nullcontext


def mindspore_setup():
    import mindspore as ms

    ms.set_device("CPU")
    # The CPU kernel pool defaults to 25 threads whatever the core count: use the cores.
    ms.device_context.cpu.op_tuning.threads_num(CORES)
    ms.set_context(mode=ms.PYNATIVE_MODE)  # the default context of `taichu generate`
    return ms


def mindspore_worker(args, model_dir: Path):
    """The static-cache graphs: compiled from mindspore_impl (ms.jit) and loaded from MINDIR."""
    import contextlib

    ms = mindspore_setup()
    import taichu
    from export.runtime import mindir_step
    from taichu.generate import model_step

    config = load_config(args)
    ids = prompts(config, args)
    model = taichu.load_model(model_dir / "model", backend="mindspore")
    n, positions = args.new_tokens, config.model.max_position_embeddings
    runs = {"MindSpore graph (static cache)": (step_runner(model_step(model), ids, n, positions), n),
            "MINDIR (static cache)": (step_runner(mindir_step(model_dir / "mindir"), ids, n, positions), n)}
    return {"mindspore_version": ms.__version__, "threads": CORES}, runs, contextlib.nullcontext


def pynative_worker(args, model_dir: Path):
    """mindspore_impl in PyNative with the growing cache, as `--backend mindspore` ran before."""
    import contextlib

    mindspore_setup()
    import taichu
    from taichu.generate import model_step

    config = load_config(args)
    model = taichu.load_model(model_dir / "model", backend="mindspore")
    n = args.mindspore_new_tokens
    run = step_runner(model_step(model, static_cache=False), prompts(config, args), n,
                      config.model.max_position_embeddings)
    return {"threads": CORES}, {"MindSpore PyNative (growing cache)": (run, n)}, contextlib.nullcontext


def serve(args) -> None:
    """Worker side: warm up, time the generations, write one JSON line to stdout."""
    # Libraries print to stdout; keep the real stdout for the result, the rest to stderr.
    result = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    setup = {"torch": torch_worker, "onnx": onnx_worker, "mindspore": mindspore_worker,
             "pynative": pynative_worker}
    info, runners, context = setup[args.worker](args, Path(args.model_dir))
    repeats = args.repeats if args.worker != "pynative" else args.mindspore_repeats
    rows = {f"{name}|{batch}": {"name": name, "batch": batch, "new_tokens": n, "runs": [],
                                "threads": info["threads"]}
            for name, (_, n) in runners.items() for batch in BATCHES}
    with context():
        for i in range(1 + repeats):  # run 0 warms up
            for batch in BATCHES:
                for name, (run, _) in runners.items():
                    row = rows[f"{name}|{batch}"]
                    settle()
                    ticks, start = cpu_ticks(), time.perf_counter()
                    out = run(batch)
                    out["others"] = others_share(ticks, cpu_ticks(), time.perf_counter() - start)
                    if i == 0:
                        row["tokens"] = out.pop("tokens")
                        row["warmup"] = out
                    else:
                        out.pop("tokens")
                        row["runs"].append(out)
                    print(f"  {name:28s} batch {batch} {'warm-up' if i == 0 else f'run {i}':7s} "
                          f"prefill {out['prefill'] * 1e3:7.1f} ms  total {out['total']:6.2f} s  "
                          f"other processes {out['others']:.0%} of the cores", file=sys.stderr,
                          flush=True)
    result.write(json.dumps({**info, "rows": list(rows.values()), "waited": WAIT_IDLE[1]}) + "\n")
    result.close()


# ---------------------------------------------------------------- orchestration

def prepare(args, folder: Path) -> dict:
    """The model directory, its Hugging Face conversion, its ONNX and MINDIR exports, in
    ``folder``."""
    import torch

    import taichu
    from export.exporter import export_model
    from taichu.convert import convert

    config = load_config(args)
    start = time.perf_counter()
    torch.manual_seed(0)
    taichu.save_model(taichu.build_model(config, "torch"), folder / "model")
    convert(folder / "model", folder / "hf", to="hf")
    log = []
    export = export_model(folder / "model", "onnx", folder / "onnx", quantize="int8",
                          log=lambda line: (log.append(line), print(f"  {line}", file=sys.stderr)))
    export_model(folder / "model", "mindir", folder / "mindir",
                 log=lambda line: (log.append(line), print(f"  {line}", file=sys.stderr)))
    return {"params": taichu.num_parameters(config), "seconds": time.perf_counter() - start,
            "int8_validation": export.get("int8_validation")}


def run_worker(kind: str, args, folder: Path) -> dict:
    return benchdoc.run_worker(__file__, kind, folder, args.passthrough)


def run(args) -> tuple[list, dict]:
    folder = Path(tempfile.mkdtemp(prefix="taichu-bench-generate-"))
    try:
        print("[prepare] random model, Hugging Face conversion, ONNX fp32 + int8 and MINDIR export",
              file=sys.stderr, flush=True)
        extras = {"prepare": prepare(args, folder), "waited": 0.0}
        rows = []
        for kind in WORKERS:
            if kind == "pynative" and not args.mindspore_new_tokens:
                continue
            out = run_worker(kind, args, folder)
            rows += out.pop("rows")
            extras["waited"] += out.pop("waited")
            extras.update({k: v for k, v in out.items() if k != "threads"})
        return rows, extras
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------- the report

def summarise(row: dict) -> dict:
    """Medians over the timed runs: prefill ms, decode and end-to-end tokens/s, other load."""
    runs, batch, n = row["runs"], row["batch"], row["new_tokens"]
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    return {"prefill_ms": med("prefill") * 1e3, "decode": batch * (n - 1) / med("decode"),
            "end_to_end": batch * n / med("total"), "others": med("others"),
            "sampler_ms": (med("sampler") / n * 1e3) if "sampler" in runs[0] else None}


def agreement(tokens: list, reference: list) -> tuple[int, int]:
    """(tokens equal at the same position, tokens compared), over the rows' common length."""
    same = total = 0
    for a, b in zip(tokens, reference):
        k = min(len(a), len(b))
        same += sum(x == y for x, y in zip(a[:k], b[:k]))
        total += k
    return same, total


def first_difference(tokens: list, reference: list) -> str:
    for row, (a, b) in enumerate(zip(tokens, reference)):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return f"row {row}, token {i + 1}"
    return "none"


def report(args, rows: list, extras: dict, wall: float) -> str:
    from taichu.generate import MIN_CACHE, PROMPT_BUCKET, bucket

    config = load_config(args)
    m = config.model
    table = {(r["name"], r["batch"]): r for r in rows}
    stats = {key: summarise(r) for key, r in table.items()}
    lines = ["| runtime | batch | new tokens | prefill (ms) | decode tokens/s | vs torch_impl "
             "(cache) | vs HF | end-to-end tokens/s | tokens = torch_impl (cache) | other load |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (name, batch), row in table.items():
        s, ref, hf = stats[name, batch], stats.get((REFERENCE, batch)), stats.get((HF, batch))
        same, total = agreement(row["tokens"], table[REFERENCE, batch]["tokens"])
        lines.append(
            f"| {name} | {batch} | {row['new_tokens']} | {s['prefill_ms']:.1f} | {s['decode']:.1f} "
            f"| {s['decode'] / ref['decode']:.2f}x | {s['decode'] / hf['decode']:.2f}x "
            f"| {s['end_to_end']:.1f} | {same}/{total} | {s['others']:.0%} |")

    def compare(name, against):
        found = [(b, agreement(table[name, b]["tokens"], table[against, b]["tokens"]),
                  first_difference(table[name, b]["tokens"], table[against, b]["tokens"]))
                 for b in BATCHES if (name, b) in table and (against, b) in table]
        return "; ".join(f"batch {b}: {same}/{total} tokens equal (first difference: {first})"
                         for b, (same, total), first in found)

    int8 = extras["prepare"]["int8_validation"]
    sampler = {b: statistics.median(s["sampler_ms"] for (_, batch), s in stats.items()
                                    if batch == b and s["sampler_ms"] is not None) for b in BATCHES}
    versions = (f"torch {extras.get('torch_version', '-')}, transformers "
                f"{extras.get('transformers_version', '-')}, onnxruntime "
                f"{extras.get('onnxruntime_version', '-')}, mindspore "
                f"{extras.get('mindspore_version', '-')}, numpy {np.__version__}, "
                f"Python {platform.python_version()}")
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/generate.py",
                                                *args.passthrough])
    notes = [
        f"- Model: `{args.config}` with activation gelu_new (GPT-2's architecture exactly), "
        f"hidden {m.hidden_size}, {m.num_layers} layers, {m.num_heads} heads, vocab "
        f"{m.vocab_size}: {extras['prepare']['params']:,} parameters, random init (torch seed "
        f"0), fp32. The same weights in every runtime: our model directory, its `taichu "
        f"convert --to hf` copy, its `taichu export --format onnx --quantize int8` graphs and "
        f"its `taichu export --format mindir` graphs.",
        f"- Greedy decoding of {args.new_tokens} new tokens (MindSpore PyNative: "
        f"{args.mindspore_new_tokens}) after a {args.prompt_len}-token prompt of random ids; "
        "eos never stops a row (eos_id -1; Hugging Face: min_new_tokens = max_new_tokens). "
        "Batch 8 = 8 different prompts, batch 1 = the first of them.",
        f"- Timing: 1 warm-up generation, then the median of {args.repeats} "
        f"({args.mindspore_repeats} for MindSpore PyNative). The static-cache rows compile "
        "their graphs in the warm-up (prefill per batch, decode per batch and cache length: the "
        f"{args.prompt_len}-token prompt fills a bucket of "
        f"{bucket(args.prompt_len, PROMPT_BUCKET)}, the cache holds "
        f"{bucket(bucket(args.prompt_len, PROMPT_BUCKET) + 1, MIN_CACHE)} slots). Ours: prefill = the prompt step of "
        "`taichu.generate.generate_ids`, decode tokens/s = batch x (N - 1) / time of the steps "
        "that produced tokens 2..N (step calls only; numpy sampling excluded). Hugging Face: "
        "prefill = `generate(max_new_tokens=1)`, decode = `generate(max_new_tokens=N)` minus "
        "that (its own logits processing included). End-to-end tokens/s = batch x N / the "
        "whole generation (ours: `generate_ids` with its sampling; HF: the N-token `generate`). "
        "vs = decode tokens/s over the row of the same batch.",
        f"- Threads: {CORES} everywhere (`torch.set_num_threads`, onnxruntime "
        "`intra_op_num_threads`, MindSpore `op_tuning.threads_num`). torch_impl and Hugging "
        "Face run in one worker process under `torch.inference_mode()`, alternating run by "
        "run; ONNX Runtime, MindSpore graph + MINDIR (alternating likewise) and MindSpore "
        "PyNative in their own processes after it. torch_impl's prompt pass projects only the "
        "last position onto the vocabulary (`logits_to_keep=1`), as the static-cache graphs do; "
        "the ONNX graph returns every position's logits (optimum's signature). "
        f"Hugging Face attention: `{extras.get('hf_attention')}`.",
        f"- Same greedy tokens, torch_impl (cache) vs ONNX Runtime fp32: "
        f"{compare('ONNX Runtime fp32', REFERENCE)}; vs MindSpore graph (static cache): "
        f"{compare('MindSpore graph (static cache)', REFERENCE)}; vs MINDIR (static cache): "
        f"{compare('MINDIR (static cache)', REFERENCE)}.",
        f"- ONNX Runtime int8 vs fp32 tokens: {compare('ONNX Runtime int8', 'ONNX Runtime fp32')}."
        + (f" The export's own int8 check: top-1 agreement {int8['top1_agreement']:.3f} on "
           f"{int8['tokens']} tokens of {int8['text']}, perplexity {int8['perplexity_fp32']:.1f} "
           f"-> {int8['perplexity_int8']:.1f}." if int8 else "")
        + " Random weights give nearly flat logits (perplexity near the vocabulary size), so "
        "top-1 margins are tiny and int8 flips some of them: agreement on a trained model is "
        "the export's check on real text, not this line.",
        "- Ours also pay, outside the step times: numpy sampling (`process_logits` + argmax; "
        "median over our runtimes) "
        + ", ".join(f"{ms:.2f} ms per step at batch {b}" for b, ms in sampler.items()) + ".",
        "- Other load: median share of the cores used by other processes during the timed "
        "generations (/proc/stat minus the worker's own ticks); rows above ~5% are not "
        "comparable.",
    ]
    waited = extras["waited"]
    header = [f"{datetime.date.today().isoformat()}; {machine()}; {versions}.", "",
              f"Command: `{command}` ({wall - waited:.0f} s, of which "
              f"{extras['prepare']['seconds']:.0f} s building, converting and exporting"
              + (f"; plus {waited:.0f} s waiting for idle cores" if waited else "") + ").", ""]
    return "\n".join(header + lines + [""] + notes)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/gpt/gpt-small.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (repeatable); activation gelu_new unless set, "
                             "dropout always 0")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per runtime "
                        "and batch, after one warm-up")
    parser.add_argument("--mindspore-new-tokens", type=int, default=8,
                        help="new tokens for MindSpore PyNative, ~0.5 s a step (0 skips it)")
    parser.add_argument("--mindspore-repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="gpt-tiny, 16-token prompt, 8 new tokens, 1 repeat, doc untouched")
    driver_arguments(parser, WORKERS, "before each timed generation")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.quick:
        args.config, args.prompt_len, args.new_tokens, args.mindspore_new_tokens = \
            "configs/gpt/gpt-tiny.yaml", 16, 8, 8
        args.repeats, args.mindspore_repeats, args.no_doc = 1, 1, True
    if args.prompt_len < 1 or args.new_tokens < 2 or args.mindspore_new_tokens in (1,) \
            or args.mindspore_new_tokens < 0:
        parser.error("need --prompt-len >= 1 and --new-tokens >= 2 (decode = tokens 2..N); "
                     "--mindspore-new-tokens 0 (skip) or >= 2")
    drive(args, argv, NAME, SECTION, serve, run, report)


if __name__ == "__main__":
    main()

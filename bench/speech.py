"""Speech recognition speed: how fast every runtime turns audio into wav2vec 2.0 CTC logits.

One random wav2vec 2.0 CTC model (configs/wav2vec2/wav2vec2-small-ctc.yaml by default; with
--base the published base shape, configs/wav2vec2/wav2vec2-base.yaml with model.head=ctc;
fixed torch seed: speed does not depend on training) is saved as a model directory in a temp
dir, converted to a Hugging Face directory (`taichu.convert`, format "hf") and exported to
ONNX and to MINDIR (`export.exporter.export_model`, what `taichu export MODEL --format onnx|
mindir` runs, with its validation). Then, at batch 1 and 8, on the same numpy arrays (4-second
clips, 64,000 samples at 16 kHz; batch 8 = rows of 4 s down to 2 s of real audio, zero padded
to 4 s, with the sample mask; batch 1 = the first, unpadded row):

- torch_impl: `taichu.api.load_model(DIR, "torch")`, `model(input_values, attention_mask)`
  (CTC logits, with the model's host-side input checks) under `torch.inference_mode()`;
- Hugging Face `transformers.Wav2Vec2ForCTC.from_pretrained` on the converted directory,
  `.logits`, under `torch.inference_mode()`;
- ONNX Runtime: `export.runtime_encoders.speech_network(EXPORT, "onnx")` (its input checks included);
- MindSpore graph: `load_model(DIR, "mindspore")` called inside a `mindspore.jit` function
  (the model's host-side `_check` runs before each compiled call, as its `__call__` does in
  PyNative; the compile is the first call of each batch shape);
- MINDIR: `speech_network(EXPORT, "mindir")` (`mindspore.load` + `nn.GraphCell`, no model code).

Every call takes numpy in and gives numpy logits out. The real-time factor here is audio
seconds per wall second (higher is faster: the inverse of the usual ASR RTF): the real audio
of the batch (its rows' unpadded lengths) over the median call. Each runtime gets --warmup
calls per batch (the first is the "first call" column: MindSpore graph compiles there), then
--calls timed ones; the runtimes of a worker alternate call by call, so load from other
processes hits them alike. Each framework runs in its own worker process (torch: torch_impl
and Hugging Face; onnxruntime; MindSpore: graph and MINDIR), one after another, each with 2
threads (export.runtime_encoders' speech networks use 2 ONNX Runtime threads). The first call's
logits are compared with torch_impl's over each row's real frames: max abs difference and
the greedy (argmax) agreement. Nothing here is a test: ratios within one run are the result.

    .venv/bin/python bench/speech.py            # small-ctc: table to stdout and docs/benchmarks.md
    .venv/bin/python bench/speech.py --base     # the published base shape (95 M)
    .venv/bin/python bench/speech.py --quick    # tiny-ctc, 3 calls: a smoke run, doc untouched
"""
from __future__ import annotations

import argparse
import contextlib
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
from functools import partial
from pathlib import Path

import numpy as np

import benchdoc
from benchdoc import WAIT_IDLE, cpu_ticks, drive, driver_arguments, machine, others_share, settle

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: taichu is the checkout's
NAME = "speech"
SECTION = "## Speech recognition speed (bench/speech.py)"
BATCHES = (1, 8)
WORKERS = ("torch", "onnx", "mindspore")
THREADS = 2              # everywhere: export.runtime_encoders.SPEECH_THREADS fixes ONNX Runtime's at 2
RATE = 16000
SAMPLES = 4 * RATE       # every batch is padded to 4 s
SHORTEST = 2 * RATE      # batch 8's last row: 2 s of real audio
INPUT_SEED = 0
SMALL = "configs/wav2vec2/wav2vec2-small-ctc.yaml"
BASE = "configs/wav2vec2/wav2vec2-base.yaml"
TINY = "configs/wav2vec2/wav2vec2-tiny-ctc.yaml"
REFERENCE = "torch_impl"
HF = "Hugging Face Wav2Vec2ForCTC"
ONNX = "ONNX Runtime"
GRAPH = "MindSpore graph (ms.jit)"
MINDIR = "MINDIR (nn.GraphCell)"
FILES = {REFERENCE: "torch_impl", HF: "hf", ONNX: "onnx", GRAPH: "ms_graph", MINDIR: "mindir"}


# ---------------------------------------------------------------- shared helpers

def config_args(args) -> tuple[str, list[str]]:
    if args.quick:
        return TINY, []
    if args.base:
        return BASE, ["model.head=ctc"]
    return SMALL, []


def load_config(args):
    import taichu

    path, overrides = config_args(args)
    return taichu.load_config(path, overrides)


def lengths() -> np.ndarray:
    """Real samples of batch 8's rows: 4 s (row 0, unpadded) evenly down to 2 s."""
    return np.linspace(SAMPLES, SHORTEST, max(BATCHES)).round().astype(np.int64)


def make_inputs() -> dict[str, np.ndarray]:
    """Standard normal audio (what per-clip normalisation, taichu.speech_batches.normalise,
    gives), zero past each row's length, and the int64 sample mask."""
    n = lengths()
    rng = np.random.default_rng(INPUT_SEED)
    mask = (np.arange(SAMPLES)[None, :] < n[:, None]).astype(np.int64)
    values = (rng.standard_normal((len(n), SAMPLES)) * mask).astype(np.float32)
    return {"input_values": values, "attention_mask": mask, "lengths": n}


# ---------------------------------------------------------------- workers
# Each returns (info, {runtime: fn(input_values, attention_mask) -> logits}, context, extra)
# where extra(outputs) -> dict runs once after the timed calls.

def torch_worker(args, folder: Path):
    import torch
    import transformers

    import taichu.api

    torch.set_num_threads(THREADS)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    ours = taichu.api.load_model(folder / "model", "torch")
    hf = transformers.Wav2Vec2ForCTC.from_pretrained(folder / "hf").eval()

    def run_ours(values, mask):
        return ours(torch.from_numpy(values), torch.from_numpy(mask)).numpy()

    def run_hf(values, mask):
        return hf(input_values=torch.from_numpy(values),
                  attention_mask=torch.from_numpy(mask)).logits.numpy()

    def padding_check(outputs) -> dict:
        """torch_impl on each padded row of batch 8 alone (unpadded): how far its batch-8
        logits are from the clip's own (real frames). Untimed."""
        from taichu.families.wav2vec2 import frame_count

        inputs = np.load(folder / "inputs.npz")
        n = inputs["lengths"]
        frames = frame_count(ours.config.model, n)
        batched = outputs[REFERENCE, max(BATCHES)]
        worst = 0.0
        with torch.inference_mode():
            for row in range(1, len(n)):
                clip = slice(row, row + 1), slice(0, n[row])
                alone = run_ours(np.ascontiguousarray(inputs["input_values"][clip]),
                                 np.ascontiguousarray(inputs["attention_mask"][clip]))
                worst = max(worst, float(np.abs(alone[0, :frames[row]]
                                                - batched[row, :frames[row]]).max()))
        return {"padded_rows_vs_alone": worst}
    info = {"torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "hf_attention": hf.config._attn_implementation, "threads": torch.get_num_threads()}
    return info, {REFERENCE: run_ours, HF: run_hf}, torch.inference_mode, padding_check


def onnx_worker(args, folder: Path):
    import onnxruntime

    from export.runtime_encoders import SPEECH_THREADS, speech_network

    network = speech_network(folder / "onnx", "onnx")
    return ({"onnxruntime_version": onnxruntime.__version__, "threads": SPEECH_THREADS},
            {ONNX: lambda values, mask: network(values, mask)["logits"]}, contextlib.nullcontext,
            None)


def mindspore_worker(args, folder: Path):
    import mindspore as ms

    ms.set_device("CPU")
    # The CPU kernel pool defaults to 25 threads whatever the core count.
    ms.device_context.cpu.op_tuning.threads_num(THREADS)
    ms.set_context(mode=ms.PYNATIVE_MODE)  # graph mode through ms.jit, as bench/clip.py
    import taichu.api
    from export.runtime_encoders import speech_network

    model = taichu.api.load_model(folder / "model", "mindspore")
    check = type(model)._check  # the host-side check its __call__ runs in PyNative

    @ms.jit
    def logits_graph(input_values, attention_mask):
        return model(input_values, attention_mask)

    def graph(values, mask):
        x, m = ms.Tensor(values), ms.Tensor(mask.astype(np.int32))  # int32: MindSpore's CPU kernels
        check(model, x, m)
        return logits_graph(x, m).asnumpy()

    network = speech_network(folder / "mindir", "mindir")
    return ({"mindspore_version": ms.__version__, "threads": THREADS},
            {GRAPH: graph, MINDIR: lambda values, mask: network(values, mask)["logits"]},
            contextlib.nullcontext, None)


def serve(args) -> None:
    """Worker side: warm up, time the calls, save the first call's logits, one JSON line out."""
    # Libraries print to stdout; keep the real stdout for the result, the rest to stderr.
    result = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    folder = Path(args.model_dir)
    inputs = np.load(folder / "inputs.npz")
    batches = {b: (np.ascontiguousarray(inputs["input_values"][:b]),
                   np.ascontiguousarray(inputs["attention_mask"][:b])) for b in BATCHES}
    setup = {"torch": torch_worker, "onnx": onnx_worker, "mindspore": mindspore_worker}
    info, runtimes, context, extra = setup[args.worker](args, folder)
    rows = {(name, b): {"name": name, "batch": b, "warmup": [], "times": [], "others": []}
            for name in runtimes for b in BATCHES}
    outputs = {}
    with context():
        for i in range(args.warmup + args.calls):
            for b in BATCHES:
                # Not before round 0: its first calls are the "first call" column (compiles).
                settle(0.5, wake=[partial(fn, *batches[b]) for fn in runtimes.values()] if i else ())
                for name, fn in runtimes.items():
                    row = rows[name, b]
                    ticks, start = cpu_ticks(), time.perf_counter()
                    logits = fn(*batches[b])
                    seconds = time.perf_counter() - start
                    share = others_share(ticks, cpu_ticks(), seconds)
                    if i == 0:
                        outputs[name, b] = np.asarray(logits, np.float32)
                        file = folder / f"logits-{FILES[name]}-{b}.npy"
                        np.save(file, outputs[name, b])
                        row.update(first=seconds, first_others=share, logits=file.name)
                    if i < args.warmup:
                        row["warmup"].append(seconds)
                    else:
                        row["times"].append(seconds)
                        row["others"].append(share)
            kind = "warmup" if i < args.warmup else "times"
            print(f"  {args.worker}: call {i + 1}/{args.warmup + args.calls} "
                  f"({'warm-up' if kind == 'warmup' else 'timed'}) "
                  + ", ".join(f"{n} b{b} {rows[n, b][kind][-1] * 1e3:.0f} ms"
                              for n in runtimes for b in BATCHES),
                  file=sys.stderr, flush=True)
        extras = extra(outputs) if extra else {}
    result.write(json.dumps({**info, **extras, "rows": list(rows.values()),
                             "waited": WAIT_IDLE[1]}) + "\n")
    result.close()


# ---------------------------------------------------------------- orchestration

def prepare(args, folder: Path) -> dict:
    """The model directory, its Hugging Face conversion, ONNX and MINDIR exports and the
    inputs, in ``folder``."""
    import torch

    import taichu
    from export.exporter import export_model
    from taichu.convert import convert

    config = load_config(args)
    start = time.perf_counter()
    torch.manual_seed(0)
    taichu.save_model(taichu.build_model(config, "torch"), folder / "model")
    convert(folder / "model", folder / "hf", to="hf")
    log = lambda line: print(f"  {line}", file=sys.stderr, flush=True)  # noqa: E731
    exports, validation = {}, {}
    for fmt in ("onnx", "mindir"):
        t = time.perf_counter()
        info = export_model(folder / "model", fmt, folder / fmt, log=log)
        exports[fmt] = time.perf_counter() - t
        validation[fmt] = info["graphs"][0].get("validation")
        if fmt == "onnx":
            validation["opset"] = info.get("opset")
    np.savez(folder / "inputs.npz", **make_inputs())
    return {"params": taichu.num_parameters(config), "seconds": time.perf_counter() - start,
            "export_seconds": exports, "validation": validation}


def run_worker(kind: str, args, folder: Path) -> dict:
    out = benchdoc.run_worker(__file__, kind, folder, args.passthrough)
    for row in out["rows"]:  # the logits travel as files in the temp dir
        row["output"] = np.load(folder / row.pop("logits"))
    return out


def run(args) -> tuple[list, dict]:
    folder = Path(tempfile.mkdtemp(prefix="taichu-bench-speech-"))
    try:
        print("[prepare] random model, Hugging Face conversion, ONNX and MINDIR export, inputs",
              file=sys.stderr, flush=True)
        extras = {"prepare": prepare(args, folder), "waited": 0.0}
        rows = []
        for kind in WORKERS:
            out = run_worker(kind, args, folder)
            rows += out.pop("rows")
            extras["waited"] += out.pop("waited")
            extras.update({k: v for k, v in out.items() if k != "threads"})
        return rows, extras
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------- the report

def compare(output: np.ndarray, reference: np.ndarray, frames) -> tuple[float, float]:
    """(max abs difference, share of equal argmax) over each row's real frames."""
    diff, same, total = 0.0, 0, 0
    for row, f in enumerate(frames):
        a, r = output[row, :f], reference[row, :f]
        diff = max(diff, float(np.abs(a - r).max()))
        same += int((a.argmax(-1) == r.argmax(-1)).sum())
        total += int(f)
    return diff, same / total


def report(args, rows: list, extras: dict, wall: float) -> str:
    from taichu.families.wav2vec2 import frame_count, receptive_field

    config = load_config(args)
    m = config.model
    n = lengths()
    frames = frame_count(m, n)
    table = {(r["name"], r["batch"]): r for r in rows}
    names = list(dict.fromkeys(r["name"] for r in rows))
    median = {key: statistics.median(r["times"]) for key, r in table.items()}
    lines = ["| batch | runtime | first call (ms) | median call (ms) | RTF (audio s / s) "
             "| vs torch_impl | max abs diff vs torch_impl | same argmax | other load |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    scale, worst, agree = {}, {}, {}
    for b in BATCHES:
        audio = float(n[:b].sum()) / RATE
        reference = table[REFERENCE, b]["output"]
        scale[b] = max(float(np.abs(reference[r, :frames[r]]).max()) for r in range(b))
        for name in names:
            row = table[name, b]
            diff, same = compare(row["output"], reference, frames[:b])
            if name != REFERENCE:
                worst[name] = max(worst.get(name, 0.0), diff)
                agree[name, b] = same
            lines.append(
                f"| {b} | {name} | {row['first'] * 1e3:.0f} | {median[name, b] * 1e3:.1f} "
                f"| {audio / median[name, b]:.1f} "
                f"| {median[REFERENCE, b] / median[name, b]:.2f}x "
                f"| {'reference' if name == REFERENCE else f'{diff:.1e}'} "
                f"| {'reference' if name == REFERENCE else f'{same:.1%}'} "
                f"| {statistics.median(row['others']):.0%} |")
    # Row 0 of batch 8 is the batch-1 clip, unpadded in both.
    row0 = float(np.abs(table[REFERENCE, 8]["output"][0, :frames[0]]
                        - table[REFERENCE, 1]["output"][0, :frames[0]]).max())

    prep = extras["prepare"]
    versions = (f"torch {extras.get('torch_version', '-')}, transformers "
                f"{extras.get('transformers_version', '-')}, onnxruntime "
                f"{extras.get('onnxruntime_version', '-')}, mindspore "
                f"{extras.get('mindspore_version', '-')}, numpy {np.__version__}, "
                f"Python {platform.python_version()}")
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/speech.py",
                                                *args.passthrough])
    path, overrides = config_args(args)

    def validated(fmt):
        v = prep["validation"].get(fmt)
        if not v:
            return f"{fmt} not validated"
        return (f"{fmt} {max(s['max_difference'] for s in v['shapes']):.1e} over "
                f"{len(v['shapes'])} shapes (tolerance {v['tolerance']:g})")
    loaded = [f"{name} batch {b}" for (name, b), row in table.items()
              if statistics.median(row["others"]) > 0.05]
    group = m.feat_extract_norm == "group"
    padded = extras.get("padded_rows_vs_alone")
    norm = ("GroupNorm on the first conv (normalised over the whole padded clip)" if group
            else "LayerNorm after every conv")
    notes = [
        f"- Model: `{path}`{' with ' + ', '.join(overrides) if overrides else ''}: feature "
        f"encoder of {len(m.conv_dim)} convs ({'-'.join(map(str, m.conv_dim))} channels, "
        f"{norm}; {int(np.prod(m.conv_stride))} samples a frame, receptive field "
        f"{receptive_field(m)}), {'pre' if m.do_stable_layer_norm else 'post'}-LN Transformer "
        f"{m.num_layers} x {m.hidden_size} ({m.num_heads} heads, FFN {m.intermediate_size}), "
        f"CTC head of {m.ctc.vocab_size} symbols (tone-numbered pinyin): {prep['params']:,} "
        "parameters, random init (torch seed 0), fp32. The same weights in every runtime: the "
        "model directory, its `taichu convert --to hf` copy and its `taichu export --format "
        f"onnx` (opset {prep['validation'].get('opset')}) and `--format mindir` encoders.",
        f"- Inputs: standard normal audio (what per-clip normalisation gives; speed does not "
        f"depend on it), numpy seed {INPUT_SEED}, [batch, {SAMPLES}] float32 = {SAMPLES / RATE:g} "
        f"s at {RATE} Hz, with an int64 sample mask. Batch 8: rows of "
        + ", ".join(f"{x / RATE:.2f}" for x in n) + f" s of real audio ({frames.min()}-"
        f"{frames.max()} frames), zero padded to {SAMPLES / RATE:g} s; batch 1: the first row "
        f"(unpadded, {frames[0]} frames). RTF = real audio seconds of the batch "
        f"({n[:1].sum() / RATE:g} s at batch 1, {n.sum() / RATE:g} s at batch 8; padding "
        "not counted) / the median call: audio seconds per wall second, higher is faster.",
        f"- Timing: per runtime and batch, {args.warmup} warm-up call(s) (the first is "
        "\"first call\": MindSpore graph compiles there, one graph per batch shape; the MINDIR "
        f"GraphCell too resolves its dynamic shapes there), then the median of {args.calls} "
        "timed calls; vs torch_impl = torch_impl's median / the row's, same batch (with "
        "--wait-idle, each round waits for idle cores, then calls every runtime once untimed: "
        "thread pools that slept through the wait wake slowly, and only the first runtime "
        "timed would pay for it). A call = "
        "numpy in, numpy CTC logits [batch, frames, vocab] out: torch_impl's "
        "`model(input_values, attention_mask)` (with its host-side input checks) and HF's "
        "`Wav2Vec2ForCTC(...).logits` under `torch.inference_mode()`; "
        "`export.speech_network(EXPORT, 'onnx' | 'mindir')` (input checks included; "
        "the exported encoder also returns last_hidden_state and the utterance embedding, one "
        "graph for transcripts and embeddings); MindSpore: the model's `_check`, then "
        "`model(input_values, attention_mask)` compiled by `mindspore.jit` (int32 mask). "
        "ms.jit compiles a static-shape graph per batch shape; the MINDIR encoder is one graph "
        "with dynamic batch and samples axes (`taichu export`'s), run with those shapes "
        "resolved at run time.",
        f"- Threads: {THREADS} everywhere (`torch.set_num_threads`, export.runtime's ONNX "
        "Runtime `intra_op_num_threads`, MindSpore `op_tuning.threads_num`). One worker process "
        "per framework, run one after another: torch_impl and Hugging Face alternate call by "
        "call in theirs, MindSpore graph and MINDIR in theirs. Hugging Face attention: "
        f"`{extras.get('hf_attention')}`.",
        "- Agreement: the first call's logits against torch_impl's over each row's real frames "
        "(padded frames hold values nobody reads); torch_impl's logits reach at most "
        + ", ".join(f"{scale[b]:.2f} (batch {b})" for b in BATCHES)
        + ". Worst max abs difference over both batches: "
        + ", ".join(f"{name} {diff:.1e}" for name, diff in worst.items())
        + ". Same argmax = greedy CTC transcripts frame by frame (random weights give nearly "
        "flat logits, so a tiny difference can flip a near-tie): "
        + "; ".join(f"{name} " + " / ".join(f"{agree[name, b]:.1%}" for b in BATCHES)
                    for name in worst) + " (batch 1 / 8)."
        + f" The exports' own validation (against torch_impl / mindspore_impl, scaled "
        f"difference): {validated('onnx')}; {validated('mindir')}.",
        f"- Padding: row 0 of batch 8 (unpadded) vs the batch-1 call, torch_impl: max abs "
        f"difference {row0:.1e}. Padded rows of batch 8 vs the same clip run alone (unpadded) "
        f"in torch_impl: {padded:.1e}"
        + (" - by design: a GroupNorm feature encoder normalises over the padded length (as in "
           "Hugging Face and fairseq), so a padded row's logits are not the clip's own, which "
           "is why taichu.recognition.SpeechRunner runs such models one clip at a time. Every "
           "runtime here gets the same padded batch, so the comparison above is like for like."
           if group else " (a LayerNorm feature encoder and masked attention: padding does "
           "not change a row's logits).") if padded is not None else "",
        "- Other load: median share of the cores used by other processes during the timed "
        "calls (/proc/stat minus the worker's own ticks); rows above ~5% are not comparable"
        + (f" (here: {'every row' if len(loaded) == len(table) else ', '.join(loaded)}). "
           f"With {THREADS} threads on {THREADS} busy cores, "
           "torch's OpenMP threads suffer most: a thread that loses its core stalls every "
           "parallel region, so its calls can take many times their idle time."
           if loaded else "."),
    ]
    waited = extras["waited"]
    exports = prep["export_seconds"]
    header = [f"{datetime.date.today().isoformat()}; {machine()}; {versions}.", "",
              f"Command: `{command}` ({wall - waited:.0f} s, of which {prep['seconds']:.0f} s "
              f"building, converting and exporting: ONNX {exports['onnx']:.0f} s, MINDIR "
              f"{exports['mindir']:.0f} s with validation"
              + (f"; plus {waited:.0f} s waiting for idle cores" if waited else "") + ").", ""]
    return "\n".join(header + lines + [""] + [note for note in notes if note])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", action="store_true",
                        help=f"the published base shape ({BASE} with model.head=ctc) instead of "
                             f"{SMALL}")
    parser.add_argument("--calls", type=int, default=None,
                        help="timed calls per runtime and batch (default 10; 5 with --base)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="warm-up calls per runtime and batch, the first reported apart")
    parser.add_argument("--quick", action="store_true",
                        help=f"{TINY}, 3 timed calls, doc untouched")
    driver_arguments(parser, WORKERS, "before each batch of a round")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.quick and args.base:
        parser.error("--quick runs the tiny model; leave out --base")
    if args.quick:
        args.no_doc = True
        args.calls = 3 if args.calls is None else args.calls
    if args.calls is None:
        args.calls = 5 if args.base else 10
    if args.calls < 1 or args.warmup < 1:
        parser.error("need --calls >= 1 and --warmup >= 1 (the first call is reported apart)")
    drive(args, argv, NAME, SECTION, serve, run, report)


if __name__ == "__main__":
    main()

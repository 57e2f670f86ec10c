"""CLIP tower throughput: images/s and texts/s of every runtime on the same weights.

One random CLIP (clip-light by default: the released tower sizes; fixed torch seed) is
saved as a model directory in a temp dir, with a SentencePiece tokenizer trained on People's
Daily plus captions (cached under --work-dir, runs/bench-clip), and exported to ONNX
(`export.exporter.export_model`, what `taichu export MODEL --format onnx` runs: two validated
towers, image_encoder.onnx and text_encoder.onnx). Then, at batch 1 and 32, each tower runs on
the same inputs:

- the image tower on preprocessed pixel_values of generated scene pictures
  (`taichu.images.preprocess`, outside the timing);
- the text tower on the scenes' Chinese captions as `taichu.imagetext.caption_ids` makes them
  ([bos] + text + [eos], right-padded to the model's context, with the mask);

in

- PyTorch eager: torch_impl's `get_image_features` / `get_text_features` under
  `torch.inference_mode()` (the reference of every ratio);
- ONNX Runtime: `export.runtime_encoders.OnnxImageTextEncoder.image_features` / `.text_features`
  (with its numpy input checks);
- MindSpore PyNative: mindspore_impl's `get_image_features` / `get_text_features` (with the
  model's host-side `_check`), what `taichu embed --backend mindspore` runs;
- MindSpore graph: the same methods compiled with `mindspore.jit`, on a second copy of the
  model whose `_check` is off while compiling (`export.towers_mindspore.input_checks_off`, as
  the MINDIR export does: a `raise` cannot live in the graph); the host-side `_check` runs
  before each compiled call, so every runtime pays for its input checks.

Every call converts its numpy inputs and returns a numpy array. Each runtime gets one warm-up
call per tower and batch (its time is the "first call" column: MindSpore graph compiles
there), then --repeats timed calls (--mindspore-repeats for MindSpore; 3x as many at batch
1); the best is reported, the median beside it. The runtimes of a worker alternate call by
call, so load from other processes hits them alike; each framework runs in its own worker
process (torch; onnxruntime; MindSpore), one after another, each with as many threads as
cores (--wait-idle N: before each tower and batch of a round, wait up to N s for other
processes to leave the cores idle, then call every runtime once untimed: thread pools that
slept through the wait wake slowly). Outputs of the warm-up call are compared with torch's.
Nothing here is a test: ratios within one run are the result.

    .venv/bin/python bench/clip.py            # table to stdout and docs/benchmarks.md
    .venv/bin/python bench/clip.py --quick    # clip-tiny, 2 repeats: a smoke run, doc untouched
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
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
from benchdoc import CORES, WAIT_IDLE, cpu_ticks, drive, driver_arguments, machine, others_share, settle

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: taichu is the checkout's
NAME = "clip"
SECTION = "## CLIP towers (bench/clip.py)"
BATCHES = (1, 32)
TOWERS = ("image", "text")
WORKERS = ("torch", "onnx", "mindspore")
REFERENCE = "PyTorch eager"
BATCH1_FACTOR = 3        # batch-1 calls are short: 3x as many timed calls
SETTLE_WINDOW = 0.5      # --wait-idle: seconds of quiet looked for before each group of calls
CAPTION_SEED = 1         # benchmark captions: scene stream 1 (the tokenizer saw stream 0)


# ---------------------------------------------------------------- shared helpers

def load_config(args):
    import taichu

    return taichu.load_config(args.config, args.set)


def tokenizer_path(args, config) -> Path:
    """Cached tokenizer for this vocabulary, corpus size and tokenizer config."""
    key = json.dumps([config.model.text.vocab_size, args.paragraphs,
                      config.tokenizer.model_dump(mode="json")], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return Path(args.work_dir) / f"tokenizer-{config.model.text.vocab_size}-{digest}.model"


def ensure_tokenizer(args, config) -> tuple[Path, float | None]:
    """(path, seconds spent training or None when cached): SentencePiece on the first
    --paragraphs People's Daily paragraphs, 200 scene captions and the digit captions."""
    from taichu.corpus import peoples_daily_paragraphs
    from taichu.imagetext import digit_texts, scene_texts
    from taichu.tokenizer import Tokenizer, check_tokenizer, train_tokenizer

    path = tokenizer_path(args, config)
    vocab = config.model.text.vocab_size
    if path.is_file():
        try:
            check_tokenizer(Tokenizer(path), config.tokenizer, vocab)
            return path, None
        except ValueError as error:
            print(f"  retraining: {error}", file=sys.stderr)
    start = time.perf_counter()
    texts = peoples_daily_paragraphs()[:args.paragraphs] + scene_texts(200) + digit_texts()
    train_tokenizer(texts, config.tokenizer, vocab, path)
    return path, time.perf_counter() - start


# ---------------------------------------------------------------- workers
# Each returns (info, {runtime: {"image": fn(pixel_values), "text": fn(ids, mask)}}, context).

def torch_worker(args, folder: Path):
    import torch

    import taichu

    torch.set_num_threads(CORES)
    model = taichu.load_model(folder / "model", backend="torch")

    def image(pixel_values):
        return model.get_image_features(torch.from_numpy(pixel_values)).numpy()

    def text(input_ids, attention_mask):
        return model.get_text_features(torch.from_numpy(input_ids),
                                       torch.from_numpy(attention_mask)).numpy()
    info = {"torch_version": torch.__version__, "threads": torch.get_num_threads()}
    return info, {REFERENCE: {"image": image, "text": text}}, torch.inference_mode


def onnx_worker(args, folder: Path):
    import onnxruntime

    from export.runtime_encoders import OnnxImageTextEncoder

    encoder = OnnxImageTextEncoder(folder / "onnx", threads=CORES)
    return ({"onnxruntime_version": onnxruntime.__version__, "threads": CORES},
            {"ONNX Runtime": {"image": encoder.image_features, "text": encoder.text_features}},
            contextlib.nullcontext)


def mindspore_worker(args, folder: Path):
    import mindspore as ms

    ms.set_device("CPU")
    # The CPU kernel pool defaults to 25 threads whatever the core count: use the cores.
    ms.device_context.cpu.op_tuning.threads_num(CORES)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    import taichu
    from export.towers_mindspore import input_checks_off

    def as_int32(x):
        # Token ids go in as int32, as everywhere in mindspore_impl (taichu.retrieval too).
        return ms.Tensor(x.astype(np.int32))

    model = taichu.load_model(folder / "model", backend="mindspore")
    runtimes = {"MindSpore PyNative": {
        "image": lambda pixel_values: model.get_image_features(ms.Tensor(pixel_values)).asnumpy(),
        "text": lambda ids, mask: model.get_text_features(as_int32(ids), as_int32(mask)).asnumpy()}}
    stack = contextlib.ExitStack()
    if args.mindspore_graph:
        graph_model = taichu.load_model(folder / "model", backend="mindspore")
        checks = type(graph_model)._check  # the class's host-side check, run before each call
        stack.enter_context(input_checks_off(graph_model))  # compiled without it, for the run

        @ms.jit
        def image_graph(pixel_values):
            return graph_model.get_image_features(pixel_values)

        @ms.jit
        def text_graph(input_ids, attention_mask):
            return graph_model.get_text_features(input_ids, attention_mask)

        def image(pixel_values):
            pixel_values = ms.Tensor(pixel_values)
            checks(graph_model, pixel_values=pixel_values)
            return image_graph(pixel_values).asnumpy()

        def text(ids, mask):
            ids, mask = as_int32(ids), as_int32(mask)
            checks(graph_model, input_ids=ids, attention_mask=mask)
            return text_graph(ids, mask).asnumpy()
        runtimes["MindSpore graph (ms.jit)"] = {"image": image, "text": text}
    return ({"mindspore_version": ms.__version__, "threads": CORES}, runtimes,
            lambda: stack)


def serve(args) -> None:
    """Worker side: warm up, time the tower calls, write one JSON line to stdout."""
    # Libraries print to stdout; keep the real stdout for the result, the rest to stderr.
    result = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    folder = Path(args.model_dir)
    inputs = np.load(folder / "inputs.npz")
    batches = {(tower, b): ((np.ascontiguousarray(inputs["pixel_values"][:b]),) if tower == "image"
                            else (np.ascontiguousarray(inputs["input_ids"][:b]),
                                  np.ascontiguousarray(inputs["attention_mask"][:b])))
               for tower in TOWERS for b in BATCHES}
    setup = {"torch": torch_worker, "onnx": onnx_worker, "mindspore": mindspore_worker}
    info, runtimes, context = setup[args.worker](args, folder)
    rows = {(name, tower, b): {"name": name, "tower": tower, "batch": b, "times": [], "others": []}
            for name in runtimes for tower in TOWERS for b in BATCHES}
    repeats = args.mindspore_repeats if args.worker == "mindspore" else args.repeats
    with context():
        for i in range(1 + repeats):  # round 0 warms up
            for tower in TOWERS:
                for b in BATCHES:
                    # Once per tower and batch (calls are short; a wait samples 0.5 s).
                    # Not before round 0: its calls are the "first call" column (compiles).
                    settle(SETTLE_WINDOW, wake=[partial(fns[tower], *batches[tower, b])
                                                for fns in runtimes.values()] if i else ())
                    for _ in range(1 if i == 0 or b != 1 else BATCH1_FACTOR):
                        for name, fns in runtimes.items():
                            row = rows[name, tower, b]
                            ticks, start = cpu_ticks(), time.perf_counter()
                            out = fns[tower](*batches[tower, b])
                            seconds = time.perf_counter() - start
                            share = others_share(ticks, cpu_ticks(), seconds)
                            if i == 0:
                                row.update(first=seconds, first_others=share,
                                           output=np.asarray(out, np.float32).tolist())
                            else:
                                row["times"].append(seconds)
                                row["others"].append(share)
            print(f"  {args.worker}: {'warm-up' if i == 0 else f'round {i}/{repeats}'} done",
                  file=sys.stderr, flush=True)
    result.write(json.dumps({**info, "rows": list(rows.values()), "waited": WAIT_IDLE[1]}) + "\n")
    result.close()


# ---------------------------------------------------------------- orchestration

def prepare(args, folder: Path) -> dict:
    """Tokenizer (cached), the model directory, its ONNX export and the inputs, in ``folder``."""
    import torch

    import taichu
    from export.exporter import export_model
    from taichu.images import preprocess
    from taichu.imagetext import caption_ids, scene_pairs
    from taichu.tokenizer import Tokenizer

    config = load_config(args)
    start = time.perf_counter()
    tokenizer, trained = ensure_tokenizer(args, config)
    torch.manual_seed(0)
    model = taichu.build_model(config, "torch")
    count = lambda *parts: sum(p.numel() for part in parts for p in part.parameters())  # noqa: E731
    params = {"total": taichu.num_parameters(config),
              "image": count(model.vision_model, model.visual_projection),
              "text": count(model.text_model, model.text_projection)}
    taichu.save_model(model, folder / "model", tokenizer=tokenizer)
    export_start = time.perf_counter()
    info = export_model(folder / "model", "onnx", folder / "onnx",
                        log=lambda line: print(f"  {line}", file=sys.stderr))
    export_seconds = time.perf_counter() - export_start
    # Inputs: generated scenes drawn a little larger than the model's input (resized and
    # cropped as in training) and their captions.
    m = config.model
    pairs = scene_pairs(max(BATCHES), seed=CAPTION_SEED, image_size=max(64, m.image.image_size + 32))
    pixel_values = preprocess([p.image for p in pairs], m.image.image_size)
    input_ids, attention_mask = caption_ids(Tokenizer(tokenizer), [p.text for p in pairs],
                                            m.text.max_position_embeddings)
    np.savez(folder / "inputs.npz", pixel_values=pixel_values, input_ids=input_ids,
             attention_mask=attention_mask)
    tokens = attention_mask.sum(axis=1)
    chars = [len(p.text) for p in pairs]
    return {"params": params, "seconds": time.perf_counter() - start, "tokenizer_trained": trained,
            "tokenizer": tokenizer.name, "export_seconds": export_seconds,
            "validation": {g["name"]: g.get("validation") for g in info["graphs"]},
            "opset": info.get("opset"), "example": pairs[1].text,
            "chars": (min(chars), float(np.mean(chars)), max(chars)),
            "tokens": (int(tokens.min()), float(tokens.mean()), int(tokens.max()))}


def run_worker(kind: str, args, folder: Path) -> dict:
    return benchdoc.run_worker(__file__, kind, folder, args.passthrough)


def run(args) -> tuple[list, dict]:
    folder = Path(tempfile.mkdtemp(prefix="taichu-bench-clip-"))
    try:
        print("[prepare] tokenizer, random model, ONNX export, inputs", file=sys.stderr, flush=True)
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

def report(args, rows: list, extras: dict, wall: float) -> str:
    config = load_config(args)
    m = config.model
    table = {(r["name"], r["tower"], r["batch"]): r for r in rows}
    names = list(dict.fromkeys(r["name"] for r in rows))
    best = {key: min(r["times"]) for key, r in table.items()}
    lines = ["| tower | batch | runtime | first call (ms) | best call (ms) | items/s (best) "
             "| vs PyTorch eager | items/s (median) | max abs diff vs PyTorch | other load |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    scale, worst = {}, {}
    for tower in TOWERS:
        for b in BATCHES:
            reference = np.asarray(table[REFERENCE, tower, b]["output"])
            scale[tower, b] = float(np.abs(reference).max())
            for name in names:
                row = table[name, tower, b]
                diff = float(np.abs(np.asarray(row["output"]) - reference).max())
                if name != REFERENCE:
                    worst[name] = max(worst.get(name, 0.0), diff)
                speed = b / best[name, tower, b]
                lines.append(
                    f"| {tower} | {b} | {name} | {row['first'] * 1e3:.1f} "
                    f"| {best[name, tower, b] * 1e3:.1f} | {speed:.1f} "
                    f"| {best[REFERENCE, tower, b] / best[name, tower, b]:.2f}x "
                    f"| {b / statistics.median(row['times']):.1f} "
                    f"| {'reference' if name == REFERENCE else f'{diff:.1e}'} "
                    f"| {statistics.median(row['others']):.0%} |")

    p, prep = extras["prepare"]["params"], extras["prepare"]
    versions = (f"torch {extras.get('torch_version', '-')}, onnxruntime "
                f"{extras.get('onnxruntime_version', '-')}, mindspore "
                f"{extras.get('mindspore_version', '-')}, numpy {np.__version__}, "
                f"Python {platform.python_version()}")
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/clip.py",
                                                *args.passthrough])
    validation = "; ".join(
        f"{name} {max(s['max_difference'] for s in v['shapes']):.1e} over {len(v['shapes'])} "
        f"shapes (tolerance {v['tolerance']:g})" if v else f"{name} not validated"
        for name, v in prep["validation"].items())
    chars, tokens = prep["chars"], prep["tokens"]
    notes = [
        f"- Model: `{args.config}`{' with ' + ', '.join(args.set) if args.set else ''}: image "
        f"tower {m.image.num_layers} x {m.image.hidden_size} ({m.image.num_heads} heads) on "
        f"{m.image.image_size}px in {m.image.patch_size}px patches "
        f"({(m.image.image_size // m.image.patch_size) ** 2 + 1} positions), text tower "
        f"{m.text.num_layers} x {m.text.hidden_size} ({m.text.num_heads} heads), context "
        f"{m.text.max_position_embeddings}, vocab {m.text.vocab_size}, projection "
        f"{m.projection_dim}: {p['total']:,} parameters (image tower + projection "
        f"{p['image']:,}, text tower + projection {p['text']:,}); random init (torch seed 0), "
        "fp32. The same weights in every runtime: the model directory and its "
        f"`taichu export --format onnx` towers (opset {prep['opset']}).",
        f"- Inputs: {max(BATCHES)} generated scenes (`taichu.imagetext.scene_pairs`, seed "
        f"{CAPTION_SEED}) preprocessed to [batch, 3, {m.image.image_size}, {m.image.image_size}] "
        "outside the timing, and their captions (e.g. "
        f"\"{prep['example']}\"; {chars[0]}-{chars[2]} characters, mean {chars[1]:.0f}) as "
        f"`caption_ids` rows: {tokens[0]}-{tokens[2]} real tokens (mean {tokens[1]:.1f}) with "
        f"bos/eos, right-padded to {m.text.max_position_embeddings}, so the text tower always "
        f"runs {m.text.max_position_embeddings} positions. Batch 1 = the first row. Tokenizer: "
        f"SentencePiece {config.tokenizer.model_type}, {m.text.vocab_size} pieces, trained on "
        f"People's Daily (first {args.paragraphs} paragraphs) + 200 scene captions (seed 0) + "
        f"the digit captions, cached in `{Path(args.work_dir).as_posix()}`.",
        f"- Items: images for the image tower, texts for the text tower. Timing: per runtime, "
        "tower and batch, 1 warm-up call (\"first call\"; MindSpore graph "
        f"compiles there, torch and ONNX Runtime warm their kernels), then {args.repeats} timed "
        f"calls ({args.repeats * BATCH1_FACTOR} at batch 1; MindSpore {args.mindspore_repeats} "
        f"and {args.mindspore_repeats * BATCH1_FACTOR}). items/s (best) = batch / the best "
        "call; vs PyTorch eager = the reference's best call time / the row's, same tower and "
        "batch (with --wait-idle, each group of calls after round 0 waits for idle cores, then "
        "calls every runtime once untimed: thread pools that slept through the wait wake "
        "slowly, and only the first runtime timed would pay for it). A call = numpy inputs in, numpy features out, input checks included: torch_impl "
        "`get_*_features` under `torch.inference_mode()`, `OnnxImageTextEncoder.image_features` "
        "/ `.text_features`, mindspore_impl `get_*_features` (PyNative), and for graph mode the "
        "model's host-side `_check` followed by the `ms.jit`-compiled `get_*_features` "
        "(compiled with `export.towers_mindspore.input_checks_off`, as the MINDIR export).",
        f"- Threads: {CORES} everywhere (`torch.set_num_threads`, onnxruntime "
        "`intra_op_num_threads`, MindSpore `op_tuning.threads_num`). One worker process per "
        "framework, run one after another; MindSpore PyNative and graph alternate call by call "
        "in theirs.",
        "- Agreement: max abs difference of the warm-up call's features from PyTorch's, same "
        "inputs; PyTorch's features reach at most "
        + ", ".join(f"{scale[t, b]:.2f} ({t}, batch {b})" for t in TOWERS for b in BATCHES)
        + ". Worst over towers and batches: "
        + ", ".join(f"{name} {diff:.1e}" for name, diff in worst.items())
        + f". The export's own validation (exported vs torch_impl, scaled difference): "
        f"{validation}.",
        "- Other load: median share of the cores used by other processes during the timed calls "
        "(/proc/stat minus the worker's own ticks); rows above ~5% are not comparable. Batch-1 "
        "calls last a few ms, where /proc's 10 ms ticks make this share coarse.",
    ]
    waited = extras["waited"]
    trained = prep["tokenizer_trained"]
    header = [f"{datetime.date.today().isoformat()}; {machine()}; {versions}.", "",
              f"Command: `{command}` ({wall - waited:.0f} s, of which {prep['seconds']:.0f} s "
              "preparing: "
              + (f"tokenizer training {trained:.0f} s, " if trained else "tokenizer cached, ")
              + f"ONNX export with validation {prep['export_seconds']:.0f} s"
              + (f"; plus {waited:.0f} s waiting for idle cores" if waited else "") + ").", ""]
    return "\n".join(header + lines + [""] + notes)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/clip/clip-light.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (repeatable)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per runtime, tower "
                        f"and batch after one warm-up ({BATCH1_FACTOR}x at batch 1)")
    parser.add_argument("--mindspore-repeats", type=int, default=3,
                        help="the same for MindSpore, whose image tower calls take seconds")
    parser.add_argument("--no-mindspore-graph", dest="mindspore_graph", action="store_false",
                        help="skip the ms.jit rows (their compilation)")
    parser.add_argument("--paragraphs", type=int, default=20000,
                        help="People's Daily paragraphs the tokenizer is trained on")
    parser.add_argument("--work-dir", default="runs/bench-clip",
                        help="where the trained tokenizer is cached")
    parser.add_argument("--quick", action="store_true",
                        help="clip-tiny, 2 repeats, 2,000 paragraphs, doc untouched")
    driver_arguments(parser, WORKERS, "before each timed call")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.quick:
        args.config, args.repeats, args.mindspore_repeats, args.paragraphs, args.no_doc = \
            "configs/clip/clip-tiny.yaml", 2, 2, 2000, True
    if min(args.repeats, args.mindspore_repeats, args.paragraphs) < 1:
        parser.error("need --repeats, --mindspore-repeats and --paragraphs >= 1")
    drive(args, argv, NAME, SECTION, serve, run, report)


if __name__ == "__main__":
    main()

"""Text-to-image speed: images per second of DALL-E generation on every runtime.

A generation = the prefill of one caption, image_grid^2 codes sampled one by one over the KV
cache (`taichu.imagine.sample_codes`: temperature 1, top_k 0, seed 0, the shared numpy
sampler) and the image tokenizer's decoder turning the codes into uint8 pixels; at batch 1
and 8 (8 rows of the same caption). Models: random dalle-small and vqvae-small (torch seed 0;
speed does not depend on training; the DALL-E carries gpt-tiny's People's Daily tokenizer,
trained once and cached in runs/bench-imagine), or trained ones with --dalle DIR [--vqvae
DIR]. Both are exported to ONNX and MINDIR (`export.exporter.export_model`, what `taichu
export` runs, validation included) in a temp dir. Runtimes, each with 2 threads:

- torch_impl: `dalle_step(load_model(DALLE, "torch"))` + the vqvae decoder in torch;
- ONNX Runtime: `export.runtime_dalle.DalleNetwork` + `ImageDecoderNetwork` (what `dalle_network` /
  `image_decoder_network` open; prefill.onnx once, decode.onnx per code, growing cache);
- MindSpore: `dalle_step(load_model(DALLE, "mindspore"))` (jit-compiled static-cache prefill and
  decode graphs, mindspore_impl.dalle) + the vqvae in mindspore (PyNative);
- MINDIR: the same networks on the MINDIR exports (nn.GraphCell, static cache, no model code).

The decoders are `taichu.image_tokens.decode_codes` minus its model loading (loaded once, as
the export networks are). Round 0 is the warm-up ("first image": MindSpore compiles there),
then --rounds timed rounds; the runtimes of a worker alternate, one worker process per
framework. Every runtime's codes are compared with torch_impl's (same seed, same batch).

    .venv/bin/python bench/imagine.py            # table to stdout and docs/benchmarks.md
    .venv/bin/python bench/imagine.py --quick    # tiny models, batch 1, 1 round, doc untouched
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
import subprocess
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
NAME = "imagine"
SECTION = "## Text to image (bench/imagine.py)"
THREADS = 2
SEED = 0
PROMPT = "左边一个红色的正方形，右边一个蓝色的圆形"
CONFIGS = {False: ("configs/dalle/dalle-small.yaml", "configs/vqvae/vqvae-small.yaml"),
           True: ("configs/dalle/dalle-tiny.yaml", "configs/vqvae/vqvae-tiny.yaml")}
TOKENIZER_CONFIG = "configs/gpt/gpt-tiny.yaml"   # vocab 4096, the dalle configs' (tests/conftest.py's)
WORK = ROOT / "runs" / "bench-imagine"
REFERENCE, ONNX, MINDSPORE, MINDIR = "torch_impl", "ONNX Runtime", "MindSpore (jit)", "MINDIR (nn.GraphCell)"


def batches(args) -> tuple[int, ...]:
    return (1,) if args.quick else (1, 8)


def sampling():
    from taichu.generate import SamplingConfig

    return SamplingConfig(temperature=1.0, top_k=0, seed=SEED)


# ---------------------------------------------------------------- workers
# Each returns (info, {runtime: (step, decode)}) for the paths prepare() wrote.

def vq_decoder(path, backend: str):
    from taichu.image_tokens import _Tokenizer

    return _Tokenizer(path, backend).decode


def torch_worker(args, paths):
    import torch

    import taichu
    from taichu.imagine import dalle_step

    torch.set_num_threads(THREADS)
    step = dalle_step(taichu.load_model(paths["dalle"], "torch"))
    return {"torch_version": torch.__version__}, {REFERENCE: (step, vq_decoder(paths["vqvae"], "torch"))}


def onnx_worker(args, paths):
    import onnxruntime

    from export.runtime_dalle import DalleNetwork, ImageDecoderNetwork

    dalle = DalleNetwork(paths["exports"]["dalle"]["onnx"], "onnx", threads=THREADS)
    decoder = ImageDecoderNetwork(paths["exports"]["vqvae"]["onnx"], "onnx", threads=THREADS)
    return {"onnxruntime_version": onnxruntime.__version__}, {ONNX: (dalle.step, decoder.decode)}


def mindspore_worker(args, paths):
    import mindspore as ms

    ms.set_device("CPU")
    ms.device_context.cpu.op_tuning.threads_num(THREADS)  # the kernel pool defaults to 25
    ms.set_context(mode=ms.PYNATIVE_MODE)
    import taichu
    from export.runtime_dalle import DalleNetwork, ImageDecoderNetwork
    from taichu.imagine import dalle_step

    runtimes = {MINDSPORE: (dalle_step(taichu.load_model(paths["dalle"], "mindspore")),
                           vq_decoder(paths["vqvae"], "mindspore"))}
    if not args.no_mindir:
        runtimes[MINDIR] = (DalleNetwork(paths["exports"]["dalle"]["mindir"], "mindir").step,
                            ImageDecoderNetwork(paths["exports"]["vqvae"]["mindir"], "mindir").decode)
    return {"mindspore_version": ms.__version__}, runtimes


WORKERS = {"torch": torch_worker, "onnx": onnx_worker, "mindspore": mindspore_worker}


def wake_up(step, decode, ids, grid) -> None:
    """An untimed prefill and decode after --wait-idle's wait (thread pools wake slowly)."""
    step(ids, None, None)
    decode(np.zeros((len(ids), grid, grid), np.int64))


def serve(args) -> None:
    """Worker side: round 0 (warm-up) and --rounds timed generations per runtime and batch."""
    from taichu.imagine import sample_codes

    result = os.fdopen(os.dup(1), "w")  # libraries print to stdout: keep it for the result
    os.dup2(2, 1)
    folder = Path(args.model_dir)
    paths = json.loads((folder / "paths.json").read_text())
    ids, grid = np.load(folder / "text_ids.npy"), paths["grid"]
    info, runtimes = WORKERS[args.worker](args, paths)
    inputs = {b: np.repeat(ids, b, axis=0) for b in batches(args)}
    rows = {(name, b): {"name": name, "batch": b, "sample": [], "decode": [], "others": []}
            for name in runtimes for b in inputs}
    for i in range(1 + args.rounds):
        for b, text_ids in inputs.items():
            settle(2.0, wake=[partial(wake_up, *fns, text_ids, grid) for fns in runtimes.values()] if i else ())
            for name, (step, decode) in runtimes.items():
                row, ticks, start = rows[name, b], cpu_ticks(), time.perf_counter()
                codes = sample_codes(step, text_ids, grid, sampling())
                middle = time.perf_counter()
                images = decode(codes)
                end = time.perf_counter()
                share = others_share(ticks, cpu_ticks(), end - start)
                if i == 0:
                    file = folder / f"out-{args.worker}-{list(runtimes).index(name)}-{b}.npz"
                    np.savez(file, codes=codes, images=np.asarray(images, np.uint8))
                    row.update(first=end - start, first_sample=middle - start, file=file.name)
                else:
                    row["sample"].append(middle - start)
                    row["decode"].append(end - middle)
                    row["others"].append(share)
        print(f"  {args.worker}: {'warm-up' if i == 0 else f'round {i}/{args.rounds}'} " + ", ".join(
            f"{n} b{b} {rows[n, b]['first'] if i == 0 else rows[n, b]['sample'][-1] + rows[n, b]['decode'][-1]:.2f} s"
            for n in runtimes for b in inputs), file=sys.stderr, flush=True)
    result.write(json.dumps({**info, "rows": list(rows.values()), "waited": WAIT_IDLE[1]}) + "\n")
    result.close()


# ---------------------------------------------------------------- orchestration

def tokenizer_file() -> tuple[Path, float | None]:
    """gpt-tiny's tokenizer (vocab 4096), trained by `taichu tokenizer train` once, cached."""
    path = WORK / "tokenizer-gpt-tiny.model"
    if path.is_file():
        return path, None
    start = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "taichu", "tokenizer", "train", TOKENIZER_CONFIG, "--out", str(path)],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return path, time.perf_counter() - start


def prepare(args, folder: Path) -> dict:
    """Model directories (random unless --dalle), exports, caption ids, in ``folder``."""
    import taichu
    from export.exporter import export_model
    from taichu.imagine import image_tokenizer_dir, prompt_ids
    from taichu.tokenizer import Tokenizer

    start, trained = time.perf_counter(), None
    if args.dalle:
        dalle = Path(args.dalle)
        vqvae = Path(args.vqvae) if args.vqvae else image_tokenizer_dir(taichu.load_config(dalle))
    else:
        import torch

        dalle_config, vq_config = CONFIGS[args.quick]
        tokenizer_model, trained = tokenizer_file()
        torch.manual_seed(0)
        vqvae = taichu.save_model(taichu.build_model(taichu.load_config(vq_config), "torch"), folder / "vqvae")
        config = taichu.load_config(dalle_config, [f"data.image_tokenizer={vqvae}"])
        dalle = taichu.save_model(taichu.build_model(config, "torch"), folder / "dalle", tokenizer=tokenizer_model)
    config = taichu.load_config(dalle)
    tokenizer = Tokenizer(dalle / "tokenizer.model")
    ids, cut = prompt_ids(tokenizer, PROMPT, config.model.text_length)
    np.save(folder / "text_ids.npy", ids)
    log = lambda line: print(f"  {line}", file=sys.stderr, flush=True)  # noqa: E731
    exports, seconds, validation = {}, {}, {}
    for name, model_dir in (("dalle", dalle), ("vqvae", vqvae)):
        for fmt in ("onnx",) + (() if args.no_mindir else ("mindir",)):
            t = time.perf_counter()
            info = export_model(model_dir, fmt, folder / f"{name}-{fmt}", log=log)
            exports.setdefault(name, {})[fmt] = str(folder / f"{name}-{fmt}")
            seconds[name, fmt] = time.perf_counter() - t
            validation[name, fmt] = max(s["max_difference"] for g in info["graphs"] if g.get("validation")
                                        for s in g["validation"]["shapes"])
    paths = {"dalle": str(dalle), "vqvae": str(vqvae), "exports": exports, "grid": config.model.image_grid}
    (folder / "paths.json").write_text(json.dumps(paths))
    return {"dalle": str(dalle) if args.dalle else dalle_config, "vqvae": str(vqvae) if args.dalle else vq_config,
            "params": (taichu.num_parameters(config), taichu.num_parameters(taichu.load_config(vqvae))),
            "tokens": len(tokenizer.encode(PROMPT)), "cut": cut, "text_length": config.model.text_length, "tokenizer_seconds": trained,
            "seconds": time.perf_counter() - start, "export_seconds": {f"{n} {f}": s for (n, f), s in seconds.items()},
            "validation": {f"{n} {f}": v for (n, f), v in validation.items()}}


def run(args) -> tuple[list, dict]:
    folder = Path(tempfile.mkdtemp(prefix="taichu-bench-imagine-"))
    try:
        print("[prepare] models, ONNX and MINDIR exports, caption", file=sys.stderr, flush=True)
        extras, rows = {"prepare": prepare(args, folder), "waited": 0.0}, []
        for kind in WORKERS:
            out = benchdoc.run_worker(__file__, kind, folder, args.passthrough)
            for row in out.pop("rows"):
                with np.load(folder / row.pop("file")) as saved:
                    row["codes"], row["images"] = saved["codes"], saved["images"]
                rows.append(row)
            extras["waited"] += out.pop("waited")
            extras.update(out)
        return rows, extras
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------- the report

def report(args, rows: list, extras: dict, wall: float) -> str:
    table = {(r["name"], r["batch"]): r for r in rows}
    names = list(dict.fromkeys(r["name"] for r in rows))
    total = {k: statistics.median(np.add(r["sample"], r["decode"])) for k, r in table.items()}
    prep = extras["prepare"]
    grid = table[REFERENCE, 1]["codes"].shape[1]
    lines = ["| batch | runtime | first image (s) | median generation (s) | images/s | vs torch_impl "
             "| sampling loop (s) | per code (ms) | image decoder (ms) | codes = torch_impl "
             "| max pixel diff (equal rows) | other load |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for b in batches(args):
        ref = table[REFERENCE, b]
        for name in names:
            row = table[name, b]
            sample, decode = statistics.median(row["sample"]), statistics.median(row["decode"])
            same = row["codes"] == ref["codes"]
            rows_equal = same.reshape(b, -1).all(axis=1)
            pixels = (int(np.abs(row["images"][rows_equal].astype(int) - ref["images"][rows_equal]).max())
                      if rows_equal.any() else "-")
            agree = "reference" if name == REFERENCE else (
                "identical" if same.all() else f"{same.mean():.1%} ({rows_equal.sum()}/{b} rows)")
            lines.append(f"| {b} | {name} | {row['first']:.2f} | {total[name, b]:.3f} | {b / total[name, b]:.2f} "
                         f"| {total[REFERENCE, b] / total[name, b]:.2f}x | {sample:.3f} "
                         f"| {sample / grid ** 2 * 1e3:.2f} | {decode * 1e3:.1f} "
                         f"| {agree} | {'reference' if name == REFERENCE else pixels} "
                         f"| {statistics.median(row['others']):.0%} |")
    versions = ", ".join(f"{k.split('_')[0]} {extras[k]}" for k in
                         ("torch_version", "onnxruntime_version", "mindspore_version") if k in extras)
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/imagine.py", *args.passthrough])
    exports = ", ".join(f"{k} {v:.0f} s" for k, v in prep["export_seconds"].items())
    waited = extras["waited"]
    header = [f"{datetime.date.today().isoformat()}; {machine()}; {versions}, numpy {np.__version__}, "
              f"Python {platform.python_version()}.", "",
              f"Command: `{command}` ({wall - waited:.0f} s, of which {prep['seconds']:.0f} s preparing"
              + (f" (tokenizer {prep['tokenizer_seconds']:.0f} s)" if prep["tokenizer_seconds"] else "")
              + f"; exports with validation: {exports}" + (f"; plus {waited:.0f} s waiting for idle cores"
                                                           if waited else "") + ").", ""]
    loaded = [f"{n} b{b}" for (n, b), r in table.items() if statistics.median(r["others"]) > 0.05]
    notes = [
        f"- Models: DALL-E `{prep['dalle']}` ({prep['params'][0]:,} parameters) and image tokenizer "
        f"`{prep['vqvae']}` ({prep['params'][1]:,}), "
        + ("as trained" if args.dalle else "random init (torch seed 0), fp32; the DALL-E with gpt-tiny's "
           "People's Daily tokenizer") + f". Caption `{PROMPT}`: {prep['tokens']} tokens, "
        f"[bos] + tokens + [eos] padded to {prep['text_length']} ({prep['cut']} cut); a {grid} x {grid} "
        f"grid = prefill + {grid ** 2 - 1} decode steps, {grid ** 2} sampler calls. Batch 8 = 8 rows of the caption.",
        f"- Timing: per runtime and batch, round 0 = first image (MindSpore's compilation and "
        f"MINDIR's graph setup land there), then the median of {args.rounds} rounds of a whole generation: "
        "`sample_codes(step, ids, grid, SamplingConfig(temperature=1, top_k=0, seed=0))` (numpy sampler "
        "included) then `decode(codes)` (numpy codes in, uint8 images out). Per code = sampling loop / grid^2. "
        "images/s = batch / median generation; vs torch_impl = its median / the row's, same batch. "
        "With --wait-idle each batch of a round waits for idle cores, then runs every runtime's "
        "prefill and decoder once untimed (thread pools that slept through the wait wake slowly).",
        f"- Threads: {THREADS} everywhere (torch.set_num_threads, ONNX Runtime intra_op_num_threads, "
        "MindSpore op_tuning.threads_num); one worker process per framework, one after another "
        "(torch; onnxruntime; MindSpore and MINDIR alternating).",
        "- Agreement: round 0's codes against torch_impl's for the same seed and batch (the sampler draws "
        "from the logits, so a runtime's float differences change a code only near a cumulative-"
        "probability boundary); pixel difference over rows whose codes all equal torch_impl's. The exports' "
        "own validation (max scaled difference): "
        + ", ".join(f"{k} {v:.1e}" for k, v in prep["validation"].items()) + ".",
        "- Other load: median share of the cores other processes used during the timed generations; "
        f"rows above ~5% are not comparable{' (here: ' + ', '.join(loaded) + ')' if loaded else ''}.",
    ]
    return "\n".join(header + lines + [""] + notes)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dalle", help="a trained DALL-E model directory (with its tokenizer.model) "
                                        "instead of a random dalle-small")
    parser.add_argument("--vqvae", help="its image tokenizer (default: the DALL-E config's data.image_tokenizer)")
    parser.add_argument("--rounds", type=int, default=None, help="timed generations per runtime and batch "
                                                                 "(default 8; 1 with --quick)")
    parser.add_argument("--no-mindir", action="store_true", help="no MINDIR exports or runtime")
    parser.add_argument("--quick", action="store_true", help="tiny configs, batch 1, 1 round, doc untouched")
    driver_arguments(parser, WORKERS, "before each batch of a round")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.vqvae and not args.dalle:
        parser.error("--vqvae goes with --dalle (a random DALL-E is built for the random vqvae)")
    if args.quick:
        args.no_doc = True
    for name in ("dalle", "vqvae"):  # the driver and workers run in the repository root
        if getattr(args, name):
            setattr(args, name, str(Path(getattr(args, name)).resolve()))
    args.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 8)
    if args.rounds < 1:
        parser.error("need --rounds >= 1 (round 0, the warm-up, is reported apart)")
    drive(args, argv, NAME, SECTION, serve, run, report)


if __name__ == "__main__":
    main()

"""Speech training speed: one CTC training step of wav2vec2-small in torch_impl and MindSpore.

The step is the trainer's own (`torch_impl.train.Trainer.train_step` and
`mindspore_impl.train.Trainer.train_step`, MindSpore in graph mode): forward, CTC loss,
backward, gradient clipping and AdamW, with the feature encoder trained (the steps after
`model.ctc.freeze_feature_encoder_steps`, the costlier phase). Both backends start from the
same weights (torch seed 0, saved as a model directory) and read the same batches: real
clips of the synthetic Mandarin data (configs/wav2vec2/wav2vec2-small-ctc.yaml's), `--batch`
clips whose lengths fall in the last 0.5 s below each padded length (1.5 s and 3 s: the
`make demo-speech` batch shapes that hold most batches), drawn by the training batches
(`taichu.speech_batches.SpeechBatches`: normalised audio, sample mask, SpecAugment frames,
labels). Per shape: --warmup steps (the first reported apart: MindSpore compiles there),
then --steps timed ones; the median and the best step, and clips per second from the median.
Each framework runs in its own worker process with 2 threads, one after the other. Nothing
here is a test: the ratio within one run is the result.

    .venv/bin/python bench/speech_train.py             # table to stdout and docs/benchmarks.md
    .venv/bin/python bench/speech_train.py --no-doc    # stdout only
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchdoc import drive, driver_arguments, machine, run_worker, settle

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: taichu is the checkout's
NAME = "speech_train"
SECTION = "## Speech training speed (bench/speech_train.py)"
CONFIG = "configs/wav2vec2/wav2vec2-small-ctc.yaml"
WORKERS = ("torch", "mindspore")
LABELS = {"torch": "torch_impl", "mindspore": "MindSpore graph (ms.jit)"}
THREADS = 2
SHAPES = (1.5, 3.0)      # padded seconds
RATE = 16000


def load_config(args):
    import taichu

    return taichu.load_config(CONFIG, [f"train.batch_size={args.batch}", "data.pad_to_seconds=0.5",
                                       "model.ctc.freeze_feature_encoder_steps=0"])


def batches(config, batch: int) -> dict[float, dict[str, np.ndarray]]:
    """{padded seconds: the trainer's batch of `batch` training clips of that padded length}."""
    from taichu.families import get_family
    from taichu.task_data import TASK_DATA

    train = TASK_DATA[get_family(config.family).task](config, None, 0).train
    out = {}
    for seconds in SHAPES:
        top, bottom = seconds * RATE, (seconds - 0.5) * RATE
        indices = [i for i in range(len(train)) if bottom < train.lengths[i] <= top][:batch]
        if len(indices) < batch:
            raise SystemExit(f"only {len(indices)} training clips of {seconds - 0.5}-{seconds} s")
        out[seconds] = train.batch(indices, 1)
    return out


def serve(args) -> None:
    """Worker side: build the trainer, time its steps, one JSON line to stdout."""
    result = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)   # libraries print to stdout; keep the real one for the result
    import taichu.api

    config = load_config(args)
    trainer_module = __import__(f"{args.worker}_impl.train", fromlist=["Trainer"])
    if args.worker == "torch":
        import torch as framework

        framework.set_num_threads(THREADS)
    else:
        import mindspore as framework

        framework.device_context.cpu.op_tuning.threads_num(THREADS)
    trainer_module.seed_everything(0)
    model = taichu.api.load_model(Path(args.model_dir) / "model", args.worker)
    from taichu.train import decay_names

    trainer = trainer_module.Trainer(model, config, decay_names(config), 0, 1, None)
    rows = {}
    for seconds, batch in batches(config, args.batch).items():
        times, first_loss = [], None
        for _ in range(args.warmup + args.steps):
            settle()
            start = time.perf_counter()
            loss, _ = trainer.train_step([batch], 1e-4)
            times.append(time.perf_counter() - start)
            first_loss = loss if first_loss is None else first_loss
        rows[seconds] = {"first": times[0], "times": times[args.warmup:], "first_loss": first_loss}
    result.write(json.dumps({"version": framework.__version__, "shapes": rows}) + "\n")
    result.flush()


def run(args) -> tuple[dict, dict]:
    import taichu.api

    with tempfile.TemporaryDirectory() as folder:
        import torch

        torch.manual_seed(0)
        config = load_config(args)
        taichu.api.save_model(taichu.api.build_model(config, "torch"), Path(folder) / "model")
        results = {kind: run_worker(__file__, kind, Path(folder), args.passthrough) for kind in WORKERS}
    return results, {}


def report(args, results: dict, extras: dict, wall: float) -> str:
    lines = [f"{datetime.date.today()}; {machine()}; torch {results['torch']['version']}, mindspore "
             f"{results['mindspore']['version']}, numpy {np.__version__}, Python {platform.python_version()}.", "",
             f"Command: `.venv/bin/python bench/speech_train.py{' ' if args.passthrough else ''}"
             f"{' '.join(args.passthrough)}` ({wall:.0f} s).", "",
             "| padded length | runtime | first step (s) | median step (s) | best step (s) | clips/s | vs torch_impl (medians) | first loss |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for seconds in SHAPES:
        reference = statistics.median(results["torch"]["shapes"][str(seconds)]["times"])
        for kind in WORKERS:
            row = results[kind]["shapes"][str(seconds)]
            median = statistics.median(row["times"])
            lines.append(f"| {seconds:g} s | {LABELS[kind]} | {row['first']:.2f} | {median:.3f} | "
                         f"{min(row['times']):.3f} | {args.batch / median:.1f} | {reference / median:.2f}x | "
                         f"{row['first_loss']:.4f} |")
    lines += ["", f"- Model: `{CONFIG}` (4 convs of 32-64 channels with a LayerNorm each, pre-LN "
              "Transformer 4 x 128, CTC over 33 symbols), fp32, random weights (torch seed 0) loaded "
              "into both backends; the feature encoder trained (freeze_feature_encoder_steps=0).",
              f"- Batch: {args.batch} training clips of the synthetic data whose lengths fall within "
              "0.5 s below the padded length (the `make demo-speech` batch shapes); timing: "
              f"{args.warmup} warm-up step(s) per shape (the first is \"first step\": MindSpore "
              f"compiles the step there), then the median and best of {args.steps}; lr 1e-4. "
              "First loss: the first step's at that shape (the 3 s steps follow the 1.5 s ones); "
              "the backends' differ by dropout (each framework draws its own masks).",
              f"- Threads: {THREADS} in each framework (`torch.set_num_threads`, MindSpore "
              "`op_tuning.threads_num`); one worker process per framework, one after the other."]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="clips per step (make demo-speech's: 8)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per shape")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per shape, the first reported apart")
    driver_arguments(parser, WORKERS, "before each step")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        parser.error("need --steps >= 1 and --warmup >= 1 (the first step is reported apart)")
    drive(args, argv, NAME, SECTION, serve, run, report)


if __name__ == "__main__":
    main()

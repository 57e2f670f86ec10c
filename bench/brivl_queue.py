"""Does BriVL's MoCo queue help? In-batch loss (queue 0) against a queue of momentum keys,
same everything else, at small batches on the scenes set.

Default: brivl-tiny, batch 8 and 16, queue 0 / 64 / 256, the queue joining the loss at
update 0 (MoCo) or 500 (`model.moco.queue_start_step`), momentum 0.99, AdamW lr 3e-4,
1,500 steps, seeds 0, 1, 2: 30 arms of about 30 s each on 2 idle cores (~16 min).

Each arm trains BriVL with `taichu.train.run_training` on the torch
backend, on `scenes` (drawn shapes with exact Chinese captions, --scenes pictures, 20% held
out by image key), then `taichu.retrieval.evaluate` (what `taichu eval` runs) measures
Recall@1/5 both ways on the held-out split. Arms differ only in `model.moco.queue_size`
and `model.moco.queue_start_step`:

- the same starting towers per seed: built once with `torch.manual_seed(seed)` and copied
  into every arm's init directory (a config's queue size alone would change them: the queues
  are drawn from the same generator before the towers), momentum towers equal to the online
  ones, the queue starting as random unit vectors (the model's own init);
- the same batches (`train.seed`), learning-rate schedule, steps, momentum, temperature.

Columns: the last logged training loss and the trainer's held-out loss are each arm's own
MoCo loss, whose negatives include its queue (so they are not comparable across queue
sizes: more negatives, higher loss); "in-batch val" is the same held-out loss with the
queues emptied (online queries against momentum keys of the other modality, batches of 64,
the whole held-out split), comparable across arms. Wall time is per arm (training plus
evaluation, on a machine that may be shared): not a speed measurement.

    .venv/bin/python bench/brivl_queue.py           # table to stdout and docs/benchmarks.md
    .venv/bin/python bench/brivl_queue.py --quick   # a smoke run, doc untouched
    .venv/bin/python bench/brivl_queue.py --no-doc --lr 1e-3 --momenta 0.99 0.999 --seeds 1
    .venv/bin/python bench/brivl_queue.py --no-doc --queues 16 --starts 0 250 500 --batches 8
"""
from __future__ import annotations

import argparse
import datetime
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

from benchdoc import cpu_ticks, machine, others_share, publish

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIGS = ROOT / "configs" / "brivl"
EVAL_BATCH = 64


def base_overrides(args, batch: int, queue: int, start: int, momentum: float, seed: int) -> list[str]:
    held_out = math.ceil(args.scenes * 0.2)
    return [f"data.cache_dir={args.work_dir / 'cache'}", "data.source=scenes",
            f"data.scene_count={args.scenes}", f"train.batch_size={batch}",
            f"train.max_steps={args.steps}", f"train.learning_rate={args.lr}",
            f"train.min_learning_rate={args.lr / 20}", f"train.warmup_steps={args.warmup}",
            f"train.seed={seed}", f"train.log_interval={args.steps}",
            f"train.eval_interval={args.steps}", f"train.checkpoint_interval={args.steps}",
            f"train.eval_batches={math.ceil(held_out / batch)}", "train.keep_checkpoints=1",
            f"model.moco.queue_size={queue}", f"model.moco.queue_start_step={start}",
            f"model.moco.momentum={momentum}",
            f"model.moco.temperature={args.temperature}"]


def init_dir(config, towers_config, seed: int, out: Path) -> Path:
    """The arm's starting model: the seed's towers (identical in every arm), the arm's own
    random queue, the run's tokenizer."""
    import torch

    import taichu
    from taichu.train import TASK_DATA

    tokenizer = TASK_DATA["image_text"](config, None, 0).tokenizer
    torch.manual_seed(seed)
    towers = taichu.build_model(towers_config, "torch")
    torch.manual_seed(seed + 1)
    model = taichu.build_model(config, "torch")
    # The model's own tensors (queues and counters) are the ones outside the towers.
    own = {k for k in model.state_dict() if "." not in k}
    shared = {k: v for k, v in towers.state_dict().items() if k not in own}
    missing, unexpected = model.load_state_dict(shared, strict=False)
    assert not unexpected and set(missing) == own, (missing, unexpected)
    return taichu.save_model(model, out, tokenizer=tokenizer.path)


def in_batch_val_loss(model_dir: Path) -> float:
    """The held-out MoCo loss with no queue: batches of EVAL_BATCH over the whole split."""
    import numpy as np
    import torch

    import taichu
    from taichu.train import TASK_DATA
    from torch_impl.brivl import training_loss

    model = taichu.load_model(model_dir, "torch")
    model.eval()
    dim = model.config.model.embed_dim
    model.image_queue = torch.zeros(0, dim)
    model.text_queue = torch.zeros(0, dim)
    config = taichu.load_config(model_dir)
    validation = TASK_DATA["image_text"](config, model_dir, 0).validation
    total, rows = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(validation), EVAL_BATCH):
            batch = validation.batch(np.arange(start, min(len(validation), start + EVAL_BATCH)))
            n = len(batch["input_ids"])
            if n < 2:
                continue
            loss = training_loss(model, *(torch.from_numpy(batch[k]) for k in
                                          ("pixel_values", "input_ids", "attention_mask")))[0]
            total, rows = total + float(loss) * n, rows + n
    return total / rows


def run_arm(args, batch: int, queue: int, start: int, momentum: float, seed: int) -> dict:
    import taichu
    from taichu.retrieval import Embedder, evaluate
    from taichu.train import run_training

    name = f"b{batch}-q{queue}-from{start}-m{momentum}-s{seed}"
    out = args.work_dir / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    config = taichu.load_config(args.config, base_overrides(args, batch, queue, start, momentum, seed))
    towers_config = taichu.load_config(args.config, base_overrides(args, batch, 0, 0, momentum, seed))
    began, ticks = time.perf_counter(), cpu_ticks()
    init = init_dir(config, towers_config, seed, out / "init")
    result = run_training(config, "torch", out / "train", init_dir=init, progress=False)
    metrics = evaluate(Embedder(result.final_dir, "torch"), data="scenes").values
    row = {"batch": batch, "queue": queue, "start": start, "momentum": momentum, "seed": seed,
           "steps": result.steps, "loss": result.last_loss, "val_loss": result.val_loss,
           "in_batch_val": in_batch_val_loss(result.final_dir),
           "t2i": metrics["text_to_image"], "i2t": metrics["image_to_text"],
           "images": metrics["images"], "captions": metrics["unique_captions"],
           "seconds": time.perf_counter() - began}
    row["other_load"] = others_share(ticks, cpu_ticks(), row["seconds"])
    print(f"  {name}: loss {row['loss']:.3f}, val {row['val_loss']:.3f}, in-batch val "
          f"{row['in_batch_val']:.3f}, R@1 t->i {row['t2i']['R@1']:.1%} i->t {row['i2t']['R@1']:.1%}, "
          f"{row['seconds']:.0f} s (other load {row['other_load']:.0%})", file=sys.stderr, flush=True)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def table(rows: list[dict]) -> list[str]:
    lines = ["| batch | queue | from update | momentum | seed | steps | train loss | val loss (own queue) "
             "| in-batch val | R@1 t→i | R@5 t→i | R@1 i→t | R@5 i→t | wall s | other load |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        start = "—" if r["queue"] == 0 else r["start"]
        lines.append(f"| {r['batch']} | {r['queue']} | {start} | {r['momentum']} | {r['seed']} | {r['steps']} "
                     f"| {r['loss']:.3f} | {r['val_loss']:.3f} | {r['in_batch_val']:.3f} "
                     f"| {pct(r['t2i']['R@1'])} | {pct(r['t2i']['R@5'])} "
                     f"| {pct(r['i2t']['R@1'])} | {pct(r['i2t']['R@5'])} | {r['seconds']:.0f} | {r['other_load']:.0%} |")
    return lines


def summary(rows: list[dict]) -> list[str]:
    """Per setting: mean R@1 over seeds, and the queue arm minus the in-batch arm, seed by
    seed (same towers, same batches)."""
    groups: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        groups.setdefault((r["batch"], r["momentum"], r["queue"], r["start"]), {})[r["seed"]] = r
    lines = ["| batch | momentum | queue | from update | mean R@1 t→i | mean R@1 i→t "
             "| Δ R@1 t→i vs queue 0 (per seed) | Δ R@1 i→t vs queue 0 (per seed) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for (batch, momentum, queue, start), by_seed in sorted(groups.items()):
        base = groups.get((batch, momentum, 0, 0), {})
        mean = {d: statistics.mean(r[d]["R@1"] for r in by_seed.values()) for d in ("t2i", "i2t")}
        deltas = {}
        for d in ("t2i", "i2t"):
            per_seed = [by_seed[s][d]["R@1"] - base[s][d]["R@1"] for s in sorted(by_seed) if s in base]
            deltas[d] = "—" if queue == 0 or not per_seed else " / ".join(
                f"{100 * x:+.1f}" for x in per_seed)
        lines.append(f"| {batch} | {momentum} | {queue} | {'—' if queue == 0 else start} "
                     f"| {pct(mean['t2i'])} | {pct(mean['i2t'])} "
                     f"| {deltas['t2i']} | {deltas['i2t']} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIGS / "brivl-tiny.yaml")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--queues", type=int, nargs="+", default=[0, 64, 256])
    parser.add_argument("--starts", type=int, nargs="+", default=[0, 500],
                        help="model.moco.queue_start_step values of each queue arm")
    parser.add_argument("--momenta", type=float, nargs="+", default=[0.99])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 (default 3)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--scenes", type=int, default=2000)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench-brivl-queue",
                        help="tokenizer cache and (with --keep) the runs")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own, one per core); 1 suits a machine "
                             "other processes keep busy")
    parser.add_argument("--keep", action="store_true", help="keep each arm's run directory")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 30 steps, 1 seed, doc untouched")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seeds, args.warmup, args.scenes, args.no_doc = 30, 1, 3, 400, True
        args.starts = [0, 10]
        args.batches = args.batches[:1]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if 0 not in args.queues:
        args.queues = [0, *args.queues]

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = []
    for batch in args.batches:
        for momentum in args.momenta:
            for seed in range(args.seeds):
                for queue in args.queues:
                    for start in (args.starts if queue else [0]):
                        rows.append(run_arm(args, batch, queue, start, momentum, seed))
    total = time.perf_counter() - started
    threads = torch.get_num_threads()
    first = rows[0]
    chance = (f"chance R@1 t→i {pct(first['t2i']['chance']['R@1'])}%, i→t {pct(first['i2t']['chance']['R@1'])}%; "
              f"R@5 t→i {pct(first['t2i']['chance']['R@5'])}%, i→t {pct(first['i2t']['chance']['R@5'])}%")
    text = "\n".join([
        f"{datetime.date.today()}, torch {torch.__version__} ({threads} thread{'s' * (threads != 1)}), {machine()}; "
        f"{total / 60:.1f} min in all.",
        "",
        f"`{args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config}` on "
        f"`scenes` ({args.scenes} pictures; held out: {first['images']} images, {first['captions']} "
        f"distinct captions; {chance}). AdamW lr {args.lr:g} (warmup {args.warmup}, cosine to "
        f"{args.lr / 20:g}), temperature {args.temperature}, {args.steps} steps; \"from update\" is "
        "`model.moco.queue_start_step` (the loss is in-batch before it, while the queue fills); per "
        "seed every arm starts from the same towers and sees the same batches. Recall in %.",
        "",
        *table(rows),
        "",
        *summary(rows),
    ])
    publish("brivl-queue", "## BriVL's MoCo queue (bench/brivl_queue.py)", text, args.no_doc)


if __name__ == "__main__":
    main()

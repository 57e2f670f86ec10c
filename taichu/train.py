"""``taichu train``: the loop both backends share.

Schedule, evaluation, logging, checkpoints and resume live here, in numpy (what each
family's task feeds the loop, and which samples make each step: taichu/task_data.py);
a backend contributes only a ``Trainer`` (``torch_impl/train.py``,
``mindspore_impl/train.py``) that runs one optimizer step on numpy batches and exposes
its optimizer state under canonical names. Because the data order and the schedule are
computed here, the two backends see the same batches and learning rates step for step.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from taichu.config import dump_config
from taichu.fileio import sha256_file
from taichu.task_data import TASK_DATA, BucketOrder, SampleOrder, StreamOrder, TrainingData  # noqa: F401 (taichu.train exports the orders)
from taichu.weights import contiguous

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
CARRY_FILE = "memory.safetensors"      # TrainingData.carry's state (GPT-XL's memory)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the run stopped without writing a checkpoint."""


def learning_rate(step: int, train) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_learning_rate``."""
    if step < train.warmup_steps:
        return train.learning_rate * (step + 1) / train.warmup_steps
    span = max(1, train.max_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return train.min_learning_rate + (train.learning_rate - train.min_learning_rate) * cosine


def decay_names(config) -> set[str]:
    """Canonical names that get weight decay: linear and convolution weights; not biases,
    norms, embeddings or free parameters (CLIP's class embedding and logit scale), as in
    GPT-2 and OpenAI CLIP. Tensors the optimizer does not train (BriVL's momentum towers)
    may be listed; the trainers skip them."""
    from taichu.families import get_family

    specs = get_family(config.family).tensor_specs(config)
    return {name for name, spec in specs.items()
            if spec.kind in ("linear", "conv1d", "conv2d") and name.endswith(".weight")}


def micro_batches(indices: np.ndarray, rank: int, world: int, accum: int) -> list[np.ndarray]:
    """This rank's share of a global batch, cut into ``accum`` equal micro-batches."""
    share = np.array_split(indices, world)[rank]
    return np.array_split(share, accum)


# ----------------------------------------------------------------------------- checkpoints

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(out_dir: Path, step: int, config, model_arrays: dict, optimizer_arrays: dict,
                     state: dict, tokenizer_path, keep: int, extra_files: dict | None = None) -> Path:
    """A model directory plus optimizer and trainer state (and ``extra_files``, file name
    -> arrays: what a recipe trains beside the model), published by one rename.

    Files go to a hidden temp directory; the manifest (size and sha256 of every file) is
    written last, then the directory is renamed into place. A crash at any point leaves
    the previous checkpoints untouched and at worst a temp directory that is ignored.
    """
    from taichu.api import save_arrays

    root = out_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_arrays(config, model_arrays, tmp, tokenizer=tokenizer_path)
    _save_arrays(optimizer_arrays, tmp / OPTIMIZER_FILE)
    for name, arrays in (extra_files or {}).items():
        _save_arrays(arrays, tmp / name)
    (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))
    files = sorted(p for p in tmp.iterdir() if p.is_file())
    manifest = {"step": step, "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                                        for p in files}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for p in tmp.iterdir():
        with open(p, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def _save_arrays(arrays: dict, path: Path) -> None:
    from safetensors.numpy import save

    from taichu.fileio import atomic_write_bytes

    atomic_write_bytes(path, save({k: contiguous(v) for k, v in arrays.items()}))


def verify_checkpoint(path: Path) -> str | None:
    """None if every file matches the manifest, else what is wrong."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest (the checkpoint was not finished)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable manifest ({err})"
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {entry['bytes']}"
        if sha256_file(file) != entry["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


def latest_good_checkpoint(out_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; damaged newer ones are skipped with a warning."""
    for path in sorted((out_dir / CHECKPOINTS).glob("step-*"), reverse=True):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warnings.warn(f"checkpoint {path} is damaged ({problem}); falling back to an older one",
                      stacklevel=2)
    return None


# ----------------------------------------------------------------------------- metrics

class MetricsLog:
    """``metrics.jsonl``: one JSON record per logged step, appended and flushed at once."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is None:
            path.unlink(missing_ok=True)
        elif path.exists():
            # Records after the checkpoint belong to the interrupted attempt: drop them so
            # the log reads as one run.
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- the loop

@dataclass
class TrainResult:
    final_dir: Path
    steps: int
    last_loss: float
    val_loss: float | None
    start_val_loss: float | None = None  # at step 0 of a fresh run
    tokens: int = 0                      # tokens (or pairs) trained in this invocation
    seconds: float = 0.0
    val_metrics: dict | None = None      # the last validation's TrainingData.eval_metrics (accuracy)
    unit: str = "tokens"                 # what ``tokens`` counts: "tokens", "pairs", "clips", "images", "items", "texts"


class ModelRecipe:
    """What ``run_training`` trains and writes. This one, ``taichu train``'s: the config's
    model, its family's loss, the model's arrays as the checkpoint. taichu.distill's recipe
    wraps the model with a teacher and writes what it learns beside the model."""

    def tokenizer_dir(self, init_dir: Path | None) -> Path | None:
        """Whose tokenizer the run uses when it has one (else the config's, trained)."""
        return init_dir

    def wrap_data(self, data: "TrainingData") -> "TrainingData":
        return data

    def start(self, out_dir: Path, resuming: bool, is_main: bool) -> None:
        """Called once the model is built and initialised or resumed, before ``wrap``."""

    def wrap(self, model, resume_from: Path | None):
        """The model the trainer steps, around ``model`` (initialised or resumed already)."""
        return model

    def objective(self):
        """The backend module whose ``training_loss`` the trainer runs; None: the family's."""
        return None

    def decay_names(self, names: set[str]) -> set[str]:
        return names

    def split(self, arrays: dict) -> tuple[dict, dict]:
        """The trainer's canonical arrays -> (the model directory's, {extra file: arrays})."""
        return arrays, {}


def _evaluate(trainer, dataset, train, carry=None, eval_metrics=None) -> tuple[float, dict]:
    """(mean loss, {metric: mean}) over the first eval_batches * batch_size validation
    samples (fewer if the split is small), in micro-batches of the training micro-batch
    size; the metrics are TrainingData.eval_metrics' (none without). With ``carry``
    (TrainingData.carry) the micro-batches are consecutive segments of the same rows,
    each reading the state the one before returned, from the initial state."""
    count = min(len(dataset), train.eval_batches * train.batch_size)
    size = max(1, train.batch_size // train.grad_accum_steps)
    state = None
    if carry is not None:
        count = max(size, count // size * size)   # whole micro-batches: the state has `size` rows
        state = carry(size)
    total, samples, sums = 0.0, 0, {}
    for start in range(0, count, size):
        indices = np.arange(start, min(count, start + size))
        batch = dataset.batch(indices)  # fixed draws
        rows = len(indices)
        if state is not None:
            loss, outputs = trainer.eval_outputs({**batch, **state})
            state = dict(zip(state, outputs))
        elif eval_metrics is not None:
            loss, outputs = trainer.eval_outputs(batch)
            for name, value in eval_metrics(batch, outputs).items():
                sums[name] = sums.get(name, 0.0) + value
        else:
            loss = trainer.eval_loss(batch)
        total += loss * rows
        samples += rows
    return total / samples, {name: value / samples for name, value in sums.items()}


def run_training(config, backend: str, out_dir, init_dir=None, resume: bool = False,
                 progress: bool = True, recipe: ModelRecipe | None = None,
                 init_towers: dict | None = None) -> TrainResult:
    """Train ``config`` in ``backend``; returns where the final model directory is.

    ``recipe``: what is trained around the config's model (taichu.distill); by default
    the model alone. ``init_towers``: {tower: model directory} for a family with towers
    (tri-modal), loaded after ``init_dir``; the text tower's directory gives the tokenizer."""
    from taichu.api import build_model, load_state_dict, save_arrays
    from taichu.config import load_config
    from taichu.families import get_family
    from taichu.weights import load_safetensors

    out_dir = Path(out_dir)
    init_dir = Path(init_dir) if init_dir else None
    train = config.train
    recipe = recipe or ModelRecipe()
    trainer_module = __import__(f"{backend}_impl.train", fromlist=["Trainer"])
    rank, world = trainer_module.distributed_init(config)
    is_main = rank == 0
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    init_towers = {tower: Path(d) for tower, d in (init_towers or {}).items()}
    if init_towers and get_family(config.family).init_tower is None:
        raise ValueError(f"--init-tower: a {config.family} model has no towers")
    tokenizer_dir = recipe.tokenizer_dir(init_dir)
    if tokenizer_dir is None and "text" in init_towers:
        tokenizer_dir = init_towers["text"]
    data = recipe.wrap_data(TASK_DATA[get_family(config.family).task](config, tokenizer_dir, rank))
    tokenizer, train_set, val_set = data.tokenizer, data.train, data.validation
    tokenizer_path = tokenizer.path if tokenizer is not None else None

    trainer_module.seed_everything(train.seed)
    model = build_model(config, backend)
    if init_dir is not None:
        # The run's config decides the model (dropout may differ from the init's); the
        # weights must fit it exactly, name for name and shape for shape, except a head the
        # family starts fresh when the init has another (a pretrained speech model
        # fine-tuned with CTC).
        init_config = load_config(init_dir)
        _load_init(model, config, init_config, init_dir, is_main)
        changed = _changed_fields(init_config.model.model_dump(), config.model.model_dump())
        if changed and is_main:
            print(f"--init {init_dir}: model fields differ from its config.yaml "
                  f"(init -> this run): {changed}")
    frozen = get_family(config.family).frozen
    if frozen is not None and frozen(config):
        names = trainer_module.freeze(model, frozen(config))
        if is_main:
            print(f"train.freeze_layers {config.train.freeze_layers}: {len(names)} tensors not trained "
                  f"({', '.join(frozen(config))})")
    start_step, resume_from = 0, None
    if resume:
        resume_from = latest_good_checkpoint(out_dir)
        if resume_from is None:
            if is_main:
                print(f"--resume: no checkpoint in {out_dir / CHECKPOINTS}; starting from step 0")
        else:
            # Weights go in before the trainer wraps (and under FSDP shards) the model.
            load_state_dict(model, load_safetensors(resume_from), str(resume_from))
    if init_towers and resume_from is None:
        # Also when --resume finds no checkpoint: the run starts fresh, from the towers.
        _load_towers(model, config, init_towers, is_main)
    recipe.start(out_dir, resume_from is not None, is_main)
    model = recipe.wrap(model, resume_from)
    trainer = trainer_module.Trainer(model, config, recipe.decay_names(decay_names(config)), rank, world,
                                     recipe.objective())
    if resume_from is not None:
        state = json.loads((resume_from / TRAINER_STATE).read_text())
        trainer.load_optimizer_state(load_safetensors(resume_from / OPTIMIZER_FILE))
        trainer.load_extra_state(state["trainer"])
        start_step = state["step"]
        if is_main:
            print(f"resuming from {resume_from} at step {start_step}")

    metrics = MetricsLog(out_dir / "metrics.jsonl", start_step if resume_from else None) if is_main else None
    if is_main and not resume_from:
        dump_config(config, out_dir / "config.yaml")
    run_start, start_val_loss = time.perf_counter(), None
    if start_step == 0:
        # The starting point of the validation curve, before any update. Every rank
        # evaluates (under FSDP a forward pass is collective); rank 0 records.
        val_loss, val_metrics = _evaluate(trainer, val_set, train, data.carry, data.eval_metrics)
        start_val_loss = val_loss
        if is_main:
            metrics.write(_eval_record({"step": 0}, val_loss, data.unit, val_metrics))
    order = data.order or SampleOrder(len(train_set), train.seed)
    stochastic = getattr(train_set, "stochastic", False)
    # Each micro-batch's carried state (its rows' memory), from the checkpoint or initial.
    carries = None
    if data.carry is not None:
        carries = _start_carries(data.carry, resume_from, train, rank, world)
    units_per_step = train.batch_size * data.units_per_sample
    bar = _progress_bar(start_step, train.max_steps, progress and is_main)
    last_good, gathered_final = resume_from, False
    loss, val_loss, val_metrics = float("nan"), None, None
    window_start, window_units = time.perf_counter(), 0
    for step in range(start_step, train.max_steps):
        lr = learning_rate(step, train)
        indices = order.global_batch(step, train.batch_size)
        parts = micro_batches(indices, rank, world, train.grad_accum_steps)
        batches = [train_set.batch(part, step) if stochastic else train_set.batch(part)
                   for part in parts]
        if carries is not None:
            batches = [{**batch, **state} for batch, state in zip(batches, carries)]
        loss, grad_norm = trainer.train_step(batches, lr)
        if carries is not None:
            carries = [dict(zip(state, outputs)) for state, outputs in zip(carries, trainer.last_outputs())]
        done = step + 1
        if not math.isfinite(loss):
            bar.close()
            raise TrainingDiverged(
                f"loss is {loss} at step {done}: training stopped. The last good checkpoint is "
                f"{last_good or 'none (no checkpoint was written yet)'}; lower "
                f"train.learning_rate or check the data, then --resume")
        window_units += units_per_step
        record = None
        if done % train.log_interval == 0 or done == train.max_steps:
            elapsed = time.perf_counter() - window_start
            record = {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      f"{data.unit}_per_s": window_units / max(elapsed, 1e-9)}
            window_start, window_units = time.perf_counter(), 0
        if done % train.eval_interval == 0 or done == train.max_steps:
            val_loss, val_metrics = _evaluate(trainer, val_set, train, data.carry, data.eval_metrics)
            record = record or {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm}
            record = _eval_record(record, val_loss, data.unit, val_metrics)
        if record is not None and is_main:
            metrics.write(record)
            bar.set_postfix_str(_postfix(record), refresh=False)
        bar.update(1)
        if done % train.checkpoint_interval == 0 or done == train.max_steps:
            model_arrays, optimizer_arrays = trainer.full_state()  # collective under FSDP
            gathered_final = done == train.max_steps
            carried = _gather_carries(trainer, carries)          # collective with several ranks
            if is_main:
                state = {"step": done, "trainer": trainer.extra_state(), "backend": backend,
                         "world_size": world}
                saved, extra_files = recipe.split(model_arrays)
                if carried:
                    extra_files = {**extra_files, CARRY_FILE: carried}
                last_good = write_checkpoint(out_dir, done, config, saved, optimizer_arrays, state,
                                             tokenizer_path, train.keep_checkpoints, extra_files)
    bar.close()
    final_dir = out_dir / "final"
    if not gathered_final:  # the same on every rank, so FSDP's collective stays matched
        model_arrays, _ = trainer.full_state()
    if is_main:
        save_arrays(config, recipe.split(model_arrays)[0], final_dir, tokenizer=tokenizer_path)
    trainer_module.distributed_barrier(world)
    return TrainResult(final_dir, train.max_steps, loss, val_loss, start_val_loss,
                       (train.max_steps - start_step) * units_per_step, time.perf_counter() - run_start,
                       val_metrics, data.unit)


def _start_carries(carry, resume_from: Path | None, train, rank: int, world: int) -> list[dict]:
    """This rank's micro-batches' carried state: from the checkpoint's CARRY_FILE when
    resuming (refused, naming what differs, if it does not fit this run: another
    train.batch_size or model.mem_len), else the initial state."""
    from taichu.weights import CheckpointError, load_safetensors

    expected = carry(train.batch_size)
    if resume_from is None:
        state = expected
    else:
        path = resume_from / CARRY_FILE
        if not path.is_file():
            raise CheckpointError(f"--resume {resume_from}: no {CARRY_FILE} (the checkpoint was written "
                                  f"by a run that carried no memory: model.mem_len 0?); this run carries "
                                  f"{', '.join(expected)}")
        state = load_safetensors(path)
        differs = [f"{name}: checkpoint {None if name not in state else state[name].shape}, this run "
                   f"{array.shape}" for name, array in expected.items()
                   if name not in state or state[name].shape != array.shape]
        differs += [f"{name}: in the checkpoint only" for name in state if name not in expected]
        if differs:
            raise CheckpointError(f"--resume {resume_from}: its {CARRY_FILE} does not fit this run "
                                  f"(rows = train.batch_size, length = model.mem_len): {'; '.join(differs)}")
        state = {name: state[name] for name in expected}   # the loss's order, not the file's
    # The global batch's rows, cut as micro_batches cuts them.
    return [{name: np.ascontiguousarray(array[part]) for name, array in state.items()}
            for part in micro_batches(np.arange(train.batch_size), rank, world, train.grad_accum_steps)]


def _gather_carries(trainer, carries: list[dict] | None) -> dict | None:
    """The carried state of the whole global batch (rows in order), on rank 0."""
    if carries is None:
        return None
    names = list(carries[0])
    gathered = trainer.gather_rows([tuple(state[name] for name in names) for state in carries])
    return None if gathered is None else dict(zip(names, gathered))


def _changed_fields(before: dict, after: dict, prefix: str = "") -> dict:
    """``{dotted.field: (before, after)}`` for the leaves that differ: a config section
    (a speech model's quantizer) shows as the fields that changed, not both whole sections."""
    changed = {}
    for key, value in before.items():
        other = after.get(key)
        if isinstance(value, dict) and isinstance(other, dict):
            changed.update(_changed_fields(value, other, f"{prefix}{key}."))
        elif other != value:
            changed[f"{prefix}{key}"] = (value, other)
    return changed


def _load_init(model, config, init_config, init_dir: Path, verbose: bool) -> None:
    """Load ``--init`` weights into ``model``: every tensor must match (after the family's
    ``init_arrays`` renaming, if it has one), except those under the prefixes the family's
    ``fresh_on_init`` names for this pair of configs, which keep their fresh initialisation
    (and are dropped from the init), said in the log."""
    from taichu.api import load_state_dict, state_dict
    from taichu.families import get_family
    from taichu.weights import load_safetensors

    arrays = load_safetensors(init_dir)
    family = get_family(config.family)
    if family.init_arrays is not None:
        arrays, taken = family.init_arrays(init_config, config, arrays)
        if taken and verbose:
            print(f"--init {init_dir}: {taken}")
    fresh = family.fresh_on_init(init_config, config) if family.fresh_on_init else ()
    if fresh:
        specs = family.tensor_specs(config)
        dropped = sorted(n for n in arrays if n.startswith(fresh))
        arrays = {n: a for n, a in arrays.items() if n not in dropped}
        current = state_dict(model)
        started = sorted(n for n in specs if n.startswith(fresh))
        arrays.update({n: current[n] for n in started})
    # Said once the tensors are in: an init that does not fit is refused without a line
    # claiming it was loaded.
    load_state_dict(model, arrays, str(init_dir))
    if fresh and verbose:
        print(f"--init {init_dir}: {len(arrays) - len(started)} tensors loaded; "
              f"initialised fresh: {', '.join(started) or 'none'}; "
              f"not used from the init: {', '.join(dropped) or 'none'}")


def _load_towers(model, config, init_towers: dict[str, Path], verbose: bool) -> None:
    """--init-tower: each named tower's tensors from its model directory (the family's
    ``init_tower`` names them), the rest of the model as it is; a source of another
    architecture is refused naming the fields, a tensor of another shape by the loader."""
    from taichu.api import load_state_dict, state_dict
    from taichu.config import load_config
    from taichu.families import get_family
    from taichu.weights import load_safetensors

    init_tower = get_family(config.family).init_tower
    arrays = state_dict(model)
    for tower, directory in init_towers.items():
        taken, line = init_tower(config, tower, load_config(directory), load_safetensors(directory))
        unknown = sorted(set(taken) - set(arrays))
        if unknown:
            raise ValueError(f"--init-tower {tower}={directory}: tensors this model does not have: "
                             f"{', '.join(unknown[:5])}")
        arrays.update(taken)
        if verbose:
            print(f"--init-tower {tower}={directory}: {line}")
    load_state_dict(model, arrays, ", ".join(f"{t}={d}" for t, d in init_towers.items()))


def _eval_record(record: dict, val_loss: float, unit: str, val_metrics: dict | None = None) -> dict:
    # Perplexity means something for next-token losses only, not for contrastive ones.
    record = dict(record, val_loss=val_loss, **{f"val_{k}": v for k, v in (val_metrics or {}).items()})
    if unit == "tokens":
        record["val_ppl"] = math.exp(min(val_loss, 50.0))
    return record


def _postfix(record: dict) -> str:
    text = f"loss {record['loss']:.4f} lr {record['lr']:.2e}"
    if "tokens_per_s" in record:
        text += f" {record['tokens_per_s']:,.0f} tok/s"
    if "pairs_per_s" in record:
        text += f" {record['pairs_per_s']:,.1f} pairs/s"
    if "clips_per_s" in record:
        text += f" {record['clips_per_s']:,.1f} clips/s"
    if "images_per_s" in record:
        text += f" {record['images_per_s']:,.1f} images/s"
    if "texts_per_s" in record:
        text += f" {record['texts_per_s']:,.1f} texts/s"
    if "val_loss" in record:
        text += f" val {record['val_loss']:.4f}"
    if "val_ppl" in record:
        text += f" ppl {record['val_ppl']:.1f}"
    if "val_accuracy" in record:
        text += f" acc {record['val_accuracy']:.3f}"
    return text


def _progress_bar(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True,
                desc="train")


# ----------------------------------------------------------------------------- plot

def plot_runs(run_dirs, out_path) -> Path:
    """Training and validation loss of one or more runs against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for run in run_dirs:
        records = read_metrics(run)
        label = Path(run).name
        steps = [r for r in records if "loss" in r]
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], label=f"{label} train")
        evals = [r for r in records if "val_loss" in r]
        if evals:
            ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o--",
                    label=f"{label} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path

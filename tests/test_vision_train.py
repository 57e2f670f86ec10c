"""Training the vision family (MST) through ``taichu train``: both backends take the same
steps (crops and masking noise drawn in numpy per (seed, step, image)), the teacher, centre
and update count move and are saved, resume is exact, and two data-parallel processes take
the steps of one."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import taichu
from taichu.parallel import launch_command
from taichu.train import read_metrics, run_training
from conftest import CONFIGS

TINY = CONFIGS / "vision" / "vision-tiny.yaml"
# Few images keep the data set cheap; the tiny model sees 32 px crops of 64 px scenes.
DATA = ["data.source=scenes", "data.scene_count=60"]


def config(*extra):
    return taichu.load_config(TINY, [*DATA, "train.log_interval=1", "train.eval_interval=1000", *extra])


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def init_dir(out):
    import torch

    torch.manual_seed(0)
    return taichu.save_model(taichu.build_model(config(), "torch"), out)


def test_first_20_losses_agree_across_backends(tmp_path):
    """Same initial weights, views and masking noise: MindSpore takes PyTorch's 20 steps
    (<= 1e-4 relative), and both end with the same teacher, centre and update count; the
    teacher followed the student (EMA), the centre left zero."""
    init = init_dir(tmp_path / "init")
    runs, finals = {}, {}
    for backend in ("torch", "mindspore"):
        run_training(config(), backend, tmp_path / backend, init_dir=init, progress=False)
        runs[backend] = losses(tmp_path / backend)
        finals[backend] = taichu.state_dict(taichu.load_model(tmp_path / backend / "final", "torch"))
    assert sorted(runs["torch"]) == list(range(1, 21))
    torch_losses = np.array([runs["torch"][s] for s in range(1, 21)])
    ms_losses = np.array([runs["mindspore"][s] for s in range(1, 21)])
    relative = np.abs(torch_losses - ms_losses) / np.abs(torch_losses)
    print(f"torch losses {np.round(torch_losses, 4).tolist()}")
    assert relative.max() <= 1e-4, f"worst relative difference {relative.max():.2e} at step {relative.argmax() + 1}"
    start = taichu.state_dict(taichu.load_model(init, "torch"))
    a, b = finals["torch"], finals["mindspore"]
    assert a["num_updates"].tolist() == b["num_updates"].tolist() == [20]
    assert np.abs(a["center"]).max() > 0 and np.abs(a["center"] - b["center"]).max() <= 1e-4 * np.abs(a["center"]).max()
    name = "backbone.encoder.layers.0.self_attn.q_proj.weight"
    moved = np.abs(a[f"teacher.{name}"] - start[f"teacher.{name}"]).max()
    assert moved > 0 and np.abs(a[f"teacher.{name}"] - b[f"teacher.{name}"]).max() <= 1e-3 * moved
    # The teacher trails the student: closer to where both started than the student is.
    assert np.abs(a[f"teacher.{name}"] - start[name]).max() < np.abs(a[name] - start[name]).max()


def test_resume_continues_the_same_run(tmp_path):
    """Cut after step 3 and resumed: the same losses (the step decides the views and noise;
    the saved centre, teacher and update count the rest) and the same final tensors."""
    init = init_dir(tmp_path / "init")
    cfg = config("train.max_steps=6", "train.checkpoint_interval=3")
    run_training(cfg, "torch", tmp_path / "full", init_dir=init, progress=False)
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-00000006")
    shutil.rmtree(tmp_path / "cut" / "final")
    run_training(cfg, "torch", tmp_path / "cut", init_dir=init, resume=True, progress=False)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    a = taichu.state_dict(taichu.load_model(tmp_path / "cut" / "final", "torch"))
    b = taichu.state_dict(taichu.load_model(tmp_path / "full" / "final", "torch"))
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_process_data_parallel_matches_one_process(tmp_path):
    """torchrun with 2 workers = one process with 2 micro-batches: the same losses, gradient
    norms and weights, and the same centre (the mean of the ranks' new centres)."""
    from test_distributed import free_port

    init = init_dir(tmp_path / "init")
    lr, steps = 5e-4, 4
    overrides = [*DATA, f"train.max_steps={steps}", "train.log_interval=1", "train.eval_interval=1000",
                 "train.checkpoint_interval=1000"]
    single = tmp_path / "single"
    run_training(taichu.load_config(TINY, overrides + ["train.grad_accum_steps=2"]), "torch", single,
                 init_dir=init, progress=False)
    parallel = tmp_path / "parallel"
    extra = ["--out", str(parallel), "--init", str(init), "--no-progress",
             *[f"--set={o}" for o in overrides + ["parallel.data_parallel=2"]]]
    command = launch_command(str(TINY), "torch", 2, extra, master_port=free_port())
    done = subprocess.run(command, env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
                                        f"{os.environ['PATH']}"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    one, two = losses(single), losses(parallel)
    assert sorted(two) == list(range(1, steps + 1))
    assert max(abs(one[s] - two[s]) / one[s] for s in one) <= 1e-5
    norms = [{r["step"]: r["grad_norm"] for r in read_metrics(run) if "grad_norm" in r} for run in (single, parallel)]
    assert max(abs(norms[0][s] - norms[1][s]) / norms[0][s] for s in norms[0]) <= 1e-4
    a = taichu.state_dict(taichu.load_model(single / "final", backend="torch"))
    b = taichu.state_dict(taichu.load_model(parallel / "final", backend="torch"))
    # As in test_distributed: another summation order, turned by AdamW into step differences
    # of a fraction of lr where a gradient cancels. Bound: 1% of lr per step.
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a if k != "center") < 0.01 * lr * steps
    assert np.abs(a["center"] - b["center"]).max() <= 1e-5 * np.abs(a["center"]).max()

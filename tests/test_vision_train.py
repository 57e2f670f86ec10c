"""Training the vision family (MST) through ``taichu train``: both backends take the same
steps (crops and masking noise drawn in numpy per (seed, step, image)), the teacher, centre
and update count move and are saved, resume is exact, and two data-parallel processes take
the steps of one."""
import shutil

import numpy as np
import pytest

import taichu
from taichu.train import run_training
from conftest import CONFIGS, logged_losses as losses

TINY = CONFIGS / "vision" / "vision-tiny.yaml"
# Few images keep the data set cheap; the tiny model sees 32 px crops of 64 px scenes.
DATA = ["data.source=scenes", "data.scene_count=60"]


def config(*extra):
    return taichu.load_config(TINY, [*DATA, "train.log_interval=1", "train.eval_interval=1000", *extra])


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
    from test_distributed import assert_same_steps, launch_two_workers

    init = init_dir(tmp_path / "init")
    lr, steps = 5e-4, 4
    overrides = [*DATA, f"train.max_steps={steps}", "train.log_interval=1", "train.eval_interval=1000",
                 "train.checkpoint_interval=1000"]
    run_training(taichu.load_config(TINY, overrides + ["train.grad_accum_steps=2"]), "torch",
                 tmp_path / "single", init_dir=init, progress=False)
    launch_two_workers(TINY, "torch", tmp_path / "parallel", init, overrides)
    assert_same_steps(tmp_path / "single", tmp_path / "parallel", steps, lr, skip=("center",))
    # The centre: the mean of the ranks' new centres = the one process's over its micro-batches.
    a, b = (taichu.state_dict(taichu.load_model(tmp_path / run / "final", "torch"))["center"]
            for run in ("single", "parallel"))
    assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()

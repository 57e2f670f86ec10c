"""Data parallel on the real launchers (msrun, torchrun), 2 CPU processes: the same losses
as one process on the same global batch."""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import taichu
from taichu.parallel import launch_command
from taichu.train import read_metrics, run_training
from conftest import CONFIGS

TINY = CONFIGS / "gpt" / "gpt-tiny.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("backend, accum, fsdp", [("mindspore", 1, False), ("torch", 2, False),
                                                   ("torch", 1, True)])
def test_two_process_data_parallel_matches_one_process(tmp_path, tiny_tokenizer, backend, accum, fsdp):
    import torch

    torch.manual_seed(0)
    init = taichu.save_model(taichu.build_model(taichu.load_config(TINY), "torch"), tmp_path / "init",
                             tokenizer=tiny_tokenizer)
    overrides = [f"data.cache_dir={tmp_path / 'cache'}", "train.batch_size=8", f"train.grad_accum_steps={accum}",
                 "train.max_steps=8", "train.warmup_steps=2", "train.learning_rate=2e-3",
                 "train.log_interval=1", "train.eval_interval=1000", "train.eval_batches=1",
                 "model.dropout=0.0", "model.attention_dropout=0.0"]
    single = tmp_path / "single"
    run_training(taichu.load_config(TINY, overrides), backend, single, init_dir=init, progress=False)

    parallel = tmp_path / "parallel"
    parallel_sets = ["parallel.data_parallel=2", "train.checkpoint_interval=4"] + (["parallel.fsdp=true"] if fsdp else [])
    extra = ["--out", str(parallel), "--init", str(init), "--no-progress",
             *[f"--set={o}" for o in overrides + parallel_sets]]
    command = launch_command(str(TINY), backend, 2, extra, master_port=free_port(),
                             log_dir=str(parallel / "msrun_logs"))
    # msrun starts workers with the `python` found on PATH: the venv's must come first.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    if fsdp:
        # Resume under FSDP: from the step-4 checkpoint, steps 5-8 must come out the same.
        shutil.rmtree(parallel / "checkpoints" / "step-00000008")
        shutil.rmtree(parallel / "final")
        command = launch_command(str(TINY), backend, 2, extra + ["--resume"], master_port=free_port())
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        assert "resuming from" in done.stdout and "step-00000004" in done.stdout

    one = {r["step"]: r["loss"] for r in read_metrics(single) if "loss" in r}
    two = {r["step"]: r["loss"] for r in read_metrics(parallel) if "loss" in r}
    assert sorted(two) == list(range(1, 9))
    relative = max(abs(one[s] - two[s]) / one[s] for s in one)
    assert relative <= 1e-5, f"worst relative loss difference {relative:.2e}"
    a = taichu.state_dict(taichu.load_model(single / "final", backend="torch"))
    b = taichu.state_dict(taichu.load_model(parallel / "final", backend="torch"))
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-5

"""Training: both backends take the same steps; resume is exact; checkpoints are safe."""
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import taichu
from taichu.train import (SampleOrder, learning_rate, latest_good_checkpoint, micro_batches,
                          read_metrics, run_training, verify_checkpoint)
from conftest import CONFIGS, LoggedProcess, logged_losses as losses

TINY = CONFIGS / "gpt" / "gpt-tiny.yaml"


def short_run(tmp_path, *extra):
    """Overrides for a few-second run on the tiny config, with its own token cache."""
    return [f"data.cache_dir={tmp_path / 'cache'}", "train.batch_size=8", "train.warmup_steps=3",
            "train.learning_rate=2e-3", "train.min_learning_rate=1e-4", "train.log_interval=1",
            "train.eval_interval=1000", "train.eval_batches=2", *extra]


@pytest.fixture
def init_dir(tmp_path, tiny_tokenizer):
    """Shared starting weights (PyTorch init) with the session's tokenizer."""
    import torch

    torch.manual_seed(0)
    config = taichu.load_config(TINY)
    return taichu.save_model(taichu.build_model(config, "torch"), tmp_path / "init",
                             tokenizer=tiny_tokenizer)


def test_schedule_and_data_order():
    train = taichu.load_config(TINY, ["train.max_steps=100", "train.warmup_steps=10"]).train
    assert learning_rate(0, train) == pytest.approx(train.learning_rate / 10)
    assert learning_rate(9, train) == pytest.approx(train.learning_rate)
    assert learning_rate(99, train) == pytest.approx(train.min_learning_rate, rel=1e-2)
    assert learning_rate(55, train) == pytest.approx((train.learning_rate + train.min_learning_rate) / 2)
    order = SampleOrder(num_blocks=10, seed=3)
    epoch = np.concatenate([order.global_batch(step, 5) for step in range(2)])
    assert sorted(epoch) == list(range(10))               # one epoch covers every block once
    assert not np.array_equal(order.global_batch(2, 5), order.global_batch(0, 5))  # reshuffled
    assert np.array_equal(SampleOrder(10, 3).global_batch(3, 5), order.global_batch(3, 5))
    parts = [micro_batches(np.arange(8), rank, 2, 2) for rank in range(2)]
    assert [p.tolist() for rank in parts for p in rank] == [[0, 1], [2, 3], [4, 5], [6, 7]]


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_first_20_losses_agree_across_backends(tmp_path, init_dir, accum):
    """Same initial weights, batches and hyperparameters, fp32: MindSpore = PyTorch."""
    overrides = short_run(tmp_path, "train.max_steps=20", f"train.grad_accum_steps={accum}",
                          "model.dropout=0.0")
    runs = {}
    for backend in ("torch", "mindspore"):
        config = taichu.load_config(TINY, overrides)
        run_training(config, backend, tmp_path / backend, init_dir=init_dir, progress=False)
        runs[backend] = losses(tmp_path / backend)
    assert sorted(runs["torch"]) == list(range(1, 21))
    torch_losses = np.array([runs["torch"][s] for s in range(1, 21)])
    ms_losses = np.array([runs["mindspore"][s] for s in range(1, 21)])
    relative = np.abs(torch_losses - ms_losses) / np.abs(torch_losses)
    assert relative.max() <= 1e-4, f"worst relative difference {relative.max():.2e} at step {relative.argmax() + 1}"
    assert torch_losses[-1] < torch_losses[0] - 0.5       # it really trained
    # The final weights agree too, and either backend's checkpoint resumes in the other.
    a = taichu.state_dict(taichu.load_model(tmp_path / "torch" / "final", backend="torch"))
    b = taichu.state_dict(taichu.load_model(tmp_path / "mindspore" / "final", backend="torch"))
    assert max(np.abs(a[k] - b[k]).max() for k in a) < 1e-3


def _train_cmd(out, backend, *overrides, resume=False):
    cmd = [sys.executable, "-m", "taichu", "train", str(TINY), "--backend", backend, "--out", str(out),
           "--no-progress"]
    for item in overrides:
        cmd += ["--set", item]
    return cmd + (["--resume"] if resume else [])


@pytest.mark.slow
@pytest.mark.parametrize("backend, dropout", [("torch", 0.1), ("mindspore", 0.0)])
def test_sigkill_then_resume_logs_the_same_losses(tmp_path, init_dir, backend, dropout):
    overrides = short_run(tmp_path, "train.max_steps=60", "train.checkpoint_interval=10",
                          "train.keep_checkpoints=2", f"model.dropout={dropout}",
                          f"model.attention_dropout={dropout}")
    full = tmp_path / "uninterrupted"
    # The uninterrupted run goes on beside the interrupted one (each is one process and
    # mostly one core busy; the two runs share nothing but the token cache, whose files
    # appear whole by rename).
    with LoggedProcess(_train_cmd(full, backend, *overrides) + ["--init", str(init_dir)],
                       tmp_path / "uninterrupted.log") as reference_run:
        cut = tmp_path / "interrupted"
        process = subprocess.Popen(_train_cmd(cut, backend, *overrides) + ["--init", str(init_dir)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not (cut / "checkpoints" / "step-00000010").exists() and time.time() < deadline:
            if process.poll() is not None:
                pytest.fail("the run ended before it could be killed")
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        killed_at = max(losses(cut))
        assert killed_at < 60, "the process was killed after it finished"
        subprocess.run(_train_cmd(cut, backend, *overrides, resume=True) + ["--init", str(init_dir)],
                       check=True, capture_output=True)
        reference_run.finish()
    resumed, reference = losses(cut), losses(full)
    assert sorted(resumed) == list(range(1, 61))          # one record per step, none twice
    assert all(resumed[s] == reference[s] for s in range(1, 61)), \
        [(s, resumed[s], reference[s]) for s in range(1, 61) if resumed[s] != reference[s]][:3]
    final_a = taichu.state_dict(taichu.load_model(cut / "final", backend="torch"))
    final_b = taichu.state_dict(taichu.load_model(full / "final", backend="torch"))
    assert all(np.array_equal(final_a[k], final_b[k]) for k in final_a)


def test_damaged_latest_checkpoint_falls_back_to_previous(tmp_path, init_dir):
    config = taichu.load_config(TINY, short_run(tmp_path, "train.max_steps=6", "train.checkpoint_interval=2",
                                                "train.keep_checkpoints=3"))
    run_training(config, "torch", tmp_path / "run", init_dir=init_dir, progress=False)
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in sorted(root.glob("step-*"))] == ["step-00000002", "step-00000004", "step-00000006"]
    weights = root / "step-00000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])                       # truncated
    assert "model.safetensors has" in verify_checkpoint(root / "step-00000006")
    optimizer = root / "step-00000004" / "optimizer.safetensors"
    data = bytearray(optimizer.read_bytes())
    data[-10] ^= 0xFF                                                        # same size, one bit flipped
    optimizer.write_bytes(bytes(data))
    assert "sha256" in verify_checkpoint(root / "step-00000004")
    with pytest.warns(UserWarning, match="step-00000006 is damaged"):
        assert latest_good_checkpoint(tmp_path / "run") == root / "step-00000002"
    # A crash while writing leaves a temp directory that is never taken for a checkpoint.
    shutil.copytree(root / "step-00000002", root / ".tmp-step-00000008-1")
    (root / ".tmp-step-00000008-1" / "manifest.json").unlink()
    config = taichu.load_config(TINY, short_run(tmp_path, "train.max_steps=8", "train.checkpoint_interval=2"))
    with pytest.warns(UserWarning, match="damaged"):
        run_training(config, "torch", tmp_path / "run", init_dir=init_dir, resume=True, progress=False)
    assert sorted(losses(tmp_path / "run")) == list(range(1, 9))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, init_dir):
    good = subprocess.run(_train_cmd(tmp_path / "run", "torch", *short_run(tmp_path, "train.max_steps=4",
                                                                          "train.checkpoint_interval=2"))
                          + ["--init", str(init_dir)], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    broken = tmp_path / "broken"
    shutil.copytree(init_dir, broken)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(broken / "model.safetensors")
    tensors["ln_f.weight"][:] = np.nan
    save_file(tensors, broken / "model.safetensors")
    result = subprocess.run(_train_cmd(tmp_path / "run", "torch", *short_run(tmp_path, "train.max_steps=4",
                                                                            "train.checkpoint_interval=1"))
                            + ["--init", str(broken)], capture_output=True, text=True)
    assert result.returncode == 3
    assert "loss is nan at step 1: training stopped" in result.stderr
    assert "Traceback" not in result.stderr
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert checkpoints == ["step-00000002", "step-00000004"]
    assert all(verify_checkpoint(tmp_path / "run" / "checkpoints" / c) is None for c in checkpoints)


@pytest.mark.slow
def test_training_lowers_held_out_perplexity(tmp_path, init_dir):
    """A real run: People's Daily validation perplexity falls far below where it started."""
    config = taichu.load_config(TINY, short_run(tmp_path, "train.max_steps=300", "train.batch_size=16",
                                                "train.warmup_steps=20", "train.learning_rate=5e-3",
                                                "train.min_learning_rate=2e-4", "train.eval_interval=100",
                                                "train.eval_batches=4", "train.log_interval=10"))
    result = run_training(config, "torch", tmp_path / "run", init_dir=init_dir, progress=False)
    records = read_metrics(tmp_path / "run")
    start = records[0]
    assert start["step"] == 0 and start["val_ppl"] > 2000                 # ~uniform over 4096 tokens
    evals = [r["val_ppl"] for r in records if "val_ppl" in r]
    assert evals == sorted(evals, reverse=True)
    assert math.exp(result.val_loss) < start["val_ppl"] / 5
    assert all({"step", "loss", "lr", "tokens_per_s"} <= set(r) for r in records[1:])


def test_plot_and_print_launch(tmp_path, init_dir):
    config = taichu.load_config(TINY, short_run(tmp_path, "train.max_steps=3", "train.eval_interval=2"))
    run_training(config, "torch", tmp_path / "a", init_dir=init_dir, progress=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    subprocess.run([sys.executable, "-m", "taichu", "plot", str(tmp_path / "a"), str(tmp_path / "b"),
                          "--out", str(tmp_path / "loss.png")], capture_output=True, text=True, check=True)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for backend, launcher in (("mindspore", "msrun --worker_num=4 --local_worker_num=4"),
                              ("torch", "torchrun --nnodes=1 --master_port=29500 --nproc_per_node=4 -m taichu train")):
        printed = subprocess.run([sys.executable, "-m", "taichu", "train", str(TINY), "--backend", backend,
                                  "--out", "runs/x", "--print-launch", "4", "--set", "train.batch_size=16"],
                                 capture_output=True, text=True, check=True).stdout
        assert printed.startswith(launcher) and "--set=parallel.data_parallel=4" in printed
        assert "--set=train.batch_size=16" in printed and "--out runs/x" in printed


@pytest.mark.parametrize("backend, precision", [("torch", "bf16"), ("torch", "fp16"), ("mindspore", "fp16")])
def test_mixed_precision_steps_learn(tiny_config, backend, precision):
    from taichu.train import decay_names

    config = taichu.load_config(TINY, ["train.batch_size=8", f"train.precision={precision}"])
    trainer = __import__(f"{backend}_impl.train", fromlist=["Trainer"]).Trainer(
        taichu.build_model(config, backend), config, decay_names(config), 0, 1)
    batch = np.random.default_rng(0).integers(0, 4096, (8, 65))
    losses = [trainer.train_step([{"input_ids": batch}], 1e-3)[0] for _ in range(4)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.2
    assert math.isfinite(trainer.eval_loss({"input_ids": batch}))


def test_bf16_on_mindspore_cpu_is_a_clear_error(tiny_config):
    from mindspore_impl.train import Trainer
    from taichu.train import decay_names

    config = taichu.load_config(TINY, ["train.precision=bf16"])
    with pytest.raises(ValueError, match="no bfloat16 Gather"):
        Trainer(taichu.build_model(config, "mindspore"), config, decay_names(config), 0, 1)

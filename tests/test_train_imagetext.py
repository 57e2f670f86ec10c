"""Training the image-text families (CLIP, BriVL) through ``taichu train``: both backends
take the same steps; two data-parallel processes equal one process; BriVL's MoCo queue
is saved and survives resume; a short run really learns (zero-shot digits, Recall@K on
scenes, measured by ``taichu eval``)."""
import json
import shutil
import sys

import numpy as np
import pytest

import taichu
from taichu.imagetext import load_data_config
from taichu.train import TASK_DATA, read_metrics, run_training
from conftest import CONFIGS, LoggedProcess, logged_losses as losses

CLIP = CONFIGS / "clip" / "clip-tiny.yaml"
BRIVL = CONFIGS / "brivl" / "brivl-tiny.yaml"


def short_run(cache, *extra):
    return [f"data.cache_dir={cache}", "train.batch_size=8", "train.warmup_steps=3",
            "train.learning_rate=2e-3", "train.min_learning_rate=1e-4", "train.log_interval=1",
            "train.eval_interval=1000", "train.eval_batches=2", *extra]


def init_dir(config_path, cache, out):
    """Shared starting weights (PyTorch init) with the run's own tokenizer."""
    import torch

    config = taichu.load_config(config_path, [f"data.cache_dir={cache}"])
    tokenizer = TASK_DATA["image_text"](config, None, 0).tokenizer
    torch.manual_seed(0)
    return taichu.save_model(taichu.build_model(config, "torch"), out, tokenizer=tokenizer.path)


def state_differences(a_dir, b_dir) -> dict[str, float]:
    """Max |a - b| per canonical tensor of two model directories."""
    a = taichu.state_dict(taichu.load_model(a_dir, backend="torch"))
    b = taichu.state_dict(taichu.load_model(b_dir, backend="torch"))
    assert set(a) == set(b)
    return {k: float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a}


def final_features(model_dir, backend) -> tuple[np.ndarray, np.ndarray]:
    """Image and text features of 8 held-out digit pairs, from the model in ``backend``."""
    from taichu.retrieval import Embedder

    embedder = Embedder(model_dir, backend)
    pairs = load_data_config(embedder.config.data).test[:8]
    return (embedder.embed_images([p.image for p in pairs]),
            embedder.embed_texts([p.text for p in pairs]))


def max_state_difference(a_dir, b_dir) -> float:
    return max(state_differences(a_dir, b_dir).values())


@pytest.mark.slow
@pytest.mark.parametrize("config_path, accum", [(CLIP, 1), (BRIVL, 2)], ids=["clip", "brivl-accum2"])
def test_first_20_losses_agree_across_backends(tmp_path, imagetext_cache, config_path, accum):
    """Same initial weights, batches and hyperparameters, fp32: MindSpore = PyTorch, and
    for BriVL the queues and momentum towers they end with."""
    init = init_dir(config_path, imagetext_cache, tmp_path / "init")
    overrides = short_run(imagetext_cache, "train.max_steps=20", f"train.grad_accum_steps={accum}")
    runs = {}
    for backend in ("torch", "mindspore"):
        config = taichu.load_config(config_path, overrides)
        run_training(config, backend, tmp_path / backend, init_dir=init, progress=False)
        runs[backend] = losses(tmp_path / backend)
    assert sorted(runs["torch"]) == list(range(1, 21))
    torch_losses = np.array([runs["torch"][s] for s in range(1, 21)])
    ms_losses = np.array([runs["mindspore"][s] for s in range(1, 21)])
    relative = np.abs(torch_losses - ms_losses) / np.abs(torch_losses)
    assert relative.max() <= 1e-4, f"worst relative difference {relative.max():.2e} at step {relative.argmax() + 1}"
    print(f"torch losses {np.round(torch_losses, 3).tolist()}")
    if config.family == "clip":
        assert torch_losses[-5:].mean() < torch_losses[:5].mean() - 0.1     # it really trained
    else:
        # BriVL's queue joins at update 3 and its extra negatives raise the loss, so 20 noisy
        # steps do not show a falling loss; that every trained tensor moved shows they trained.
        moved = state_differences(init, tmp_path / "torch" / "final")
        trained = [k for k in moved if k.split(".")[0] in ("image_encoder", "text_encoder")
                   and not k.endswith("k_proj.bias")]   # zero true gradient, see below
        assert min(moved[k] for k in trained) > 1e-3, min(trained, key=moved.get)
    # The attention key bias adds q.b to every score of a query: softmax ignores it, its true
    # gradient is 0, and AdamW turns each framework's ~1e-10 rounding noise into steps of
    # ~lr. Those tensors wander apart without changing any output. Every other tensor agrees
    # to 1e-3 (as in test_train.py): rows of rarely seen tokens get small gradients whose
    # last bits depend on the CPU reduction order, which AdamW's normalisation magnifies
    # (measured 2e-5 to 1.2e-4 between runs); the features below are held to 1e-4.
    differences = state_differences(tmp_path / "torch" / "final", tmp_path / "mindspore" / "final")
    agreeing = {k: v for k, v in differences.items() if not k.endswith("k_proj.bias")}
    worst = max(agreeing, key=agreeing.get)
    assert agreeing[worst] < 1e-3, (worst, agreeing[worst])
    features = [final_features(tmp_path / backend / "final", backend) for backend in ("torch", "mindspore")]
    for ours, theirs in zip(*features):
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_brivl_queue_is_saved_and_survives_resume(tmp_path, imagetext_cache):
    """A run cut after step 3 and resumed logs the same losses and ends with the same
    queues as the run that was never interrupted: the queue is in the checkpoint."""
    init = init_dir(BRIVL, imagetext_cache, tmp_path / "init")
    overrides = short_run(imagetext_cache, "train.max_steps=6", "train.checkpoint_interval=3")
    config = taichu.load_config(BRIVL, overrides)
    run_training(config, "torch", tmp_path / "full", init_dir=init, progress=False)
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-00000006")
    shutil.rmtree(tmp_path / "cut" / "final")
    step3 = taichu.state_dict(taichu.load_model(tmp_path / "cut" / "checkpoints" / "step-00000003", "torch"))
    start = taichu.state_dict(taichu.load_model(init, "torch"))
    # 3 steps x 8 keys went into a 16-slot queue: it was written and wrapped around.
    assert int(step3["queue_ptr"].reshape(-1)[0]) == (3 * 8) % 16
    # The update count is saved too: brivl-tiny's queue joins the loss at update 3, so a
    # resumed run that restarted the count would take different steps 4-6.
    assert step3["num_updates"].tolist() == [3]
    assert not np.array_equal(step3["image_queue"], start["image_queue"])
    run_training(config, "torch", tmp_path / "cut", init_dir=init, resume=True, progress=False)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    assert max_state_difference(tmp_path / "cut" / "final", tmp_path / "full" / "final") == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "mindspore"])
def test_brivl_two_process_data_parallel_matches_one_process(tmp_path, imagetext_cache, backend):
    """torchrun / msrun with 2 workers and the queue filled from both (keys all-gathered in
    rank order) = one process with 2 micro-batches: the same losses, weights and queues."""
    from concurrent.futures import ThreadPoolExecutor

    from test_distributed import launch_two_workers

    init = init_dir(BRIVL, imagetext_cache, tmp_path / "init")
    overrides = short_run(imagetext_cache, "train.max_steps=5")
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    # The launch (its own processes) goes on while this process trains the reference run:
    # starting and compiling are mostly one core's work, and the two runs write no file in
    # common (the data and the init's tokenizer are already cached).
    with ThreadPoolExecutor(1) as pool:
        launched = pool.submit(launch_two_workers, BRIVL, backend, parallel, init, overrides)
        run_training(taichu.load_config(BRIVL, overrides + ["train.grad_accum_steps=2"]), backend, single,
                     init_dir=init, progress=False)
        launched.result()
    one, two = losses(single), losses(parallel)
    assert sorted(two) == list(range(1, 6))
    relative = max(abs(one[s] - two[s]) / one[s] for s in one)
    assert relative <= 1e-5, f"worst relative loss difference {relative:.2e}"
    assert max_state_difference(single / "final", parallel / "final") < 1e-5


def _evals(model_dir, sources) -> list[dict]:
    """``taichu eval`` of the model on each data source, the processes side by side (each
    is mostly one core's work)."""
    from contextlib import ExitStack

    outs = [model_dir.parent / f"eval-{data}.json" for data in sources]
    with ExitStack() as stack:
        runs = [stack.enter_context(LoggedProcess(
            [sys.executable, "-m", "taichu", "eval", str(model_dir), "--data", data, "--out", str(out)],
            model_dir.parent / f"eval-{data}.log")) for data, out in zip(sources, outs)]
        for run in runs:
            print(run.finish())
    return [json.loads(out.read_text()) for out in outs]


@pytest.mark.slow
def test_short_clip_run_learns_digits_and_scenes(tmp_path, imagetext_cache):
    """A few hundred CPU steps of clip-tiny on digits + scenes: zero-shot digit accuracy and
    Recall@K on held-out scenes, as ``taichu eval`` reports them, far above chance. From a
    random init that carries the session's image-text tokenizer (People's Daily + digit
    captions), so the run trains no tokenizer of its own (half a minute on two cores). It
    never saw a scene caption (it spells 橙 and 紫 in bytes, and cuts the end off 40 of 1000
    captions at the 32-token context): over train.seed 0-2, R@1 was 27-48x chance and R@5
    19-27x, as wide as with the run's own tokenizer (10-45x, 10-24x)."""
    init = init_dir(CLIP, imagetext_cache, tmp_path / "init")
    config = taichu.load_config(CLIP, short_run(
        imagetext_cache, "data.source=[digits, scenes]", "data.scene_count=1000",
        "train.max_steps=300", "train.batch_size=64", "train.warmup_steps=20",
        "train.log_interval=50", "train.eval_interval=150", "train.eval_batches=4"))
    result = run_training(config, "torch", tmp_path / "run", init_dir=init, progress=False)
    records = read_metrics(tmp_path / "run")
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    assert evals == sorted(evals, reverse=True) and evals[-1] < evals[0] - 1.0
    digits, scenes = _evals(result.final_dir, ["digits", "scenes"])
    print(json.dumps({"digits": digits, "scenes": scenes}, ensure_ascii=False))
    assert digits["zero_shot"]["accuracy"] > 0.5                   # chance: 0.1
    for direction in ("text_to_image", "image_to_text"):
        assert scenes[direction]["R@1"] > 10 * scenes[direction]["chance"]["R@1"]
        assert scenes[direction]["R@5"] > 5 * scenes[direction]["chance"]["R@5"]

"""Training the image tokenizer (vqvae) through ``taichu train`` and using it
(taichu.image_tokens): both backends take the same 20 steps (flips and restart draws made in
numpy per (seed, step, image)) and end with the same EMA state, resume is exact, two
micro-batches take the steps of one batch (restarts included), and the tokenize / decode /
report functions compute what they say on a trained model."""
import shutil

import numpy as np
import pytest

import taichu
from taichu.families.vqvae import code_usage, psnr
from taichu.train import run_training
from conftest import CONFIGS, logged_losses as losses

TINY = CONFIGS / "vqvae" / "vqvae-tiny.yaml"


def config(*extra):
    return taichu.load_config(TINY, ["train.log_interval=1", "train.eval_interval=1000", *extra])


def init_dir(out):
    import torch

    torch.manual_seed(0)
    return taichu.save_model(taichu.build_model(config(), "torch"), out)


def final_state(run_dir):
    return taichu.state_dict(taichu.load_model(run_dir / "final", "torch"))


def test_first_20_losses_agree_across_backends(tmp_path):
    """Same initial weights and draws: MindSpore takes PyTorch's 20 steps (<= 1e-4
    relative) and ends with the same codebook, cluster sizes and sums; codes were restarted
    (step 1 restarts every code the first batch did not use: cluster sizes start at 1)."""
    init = init_dir(tmp_path / "init")
    runs = {}
    for backend in ("torch", "mindspore"):
        run_training(config(), backend, tmp_path / backend, init_dir=init, progress=False)
        runs[backend] = losses(tmp_path / backend)
    assert sorted(runs["torch"]) == list(range(1, 21))
    torch_losses = np.array([runs["torch"][s] for s in range(1, 21)])
    ms_losses = np.array([runs["mindspore"][s] for s in range(1, 21)])
    relative = np.abs(torch_losses - ms_losses) / np.abs(torch_losses)
    print(f"torch losses {np.round(torch_losses, 4).tolist()}; worst relative {relative.max():.1e}")
    assert relative.max() <= 1e-4, f"worst relative difference {relative.max():.2e} at step {relative.argmax() + 1}"
    assert torch_losses[-5:].mean() < torch_losses[:5].mean()
    start = taichu.state_dict(taichu.load_model(init, "torch"))
    a, b = final_state(tmp_path / "torch"), final_state(tmp_path / "mindspore")
    for name in ("quantizer.codebook", "quantizer.cluster_size", "quantizer.embed_sum"):
        scale = np.abs(a[name]).max()
        assert np.abs(a[name] - start[name]).max() > 0.1 * scale, name
        assert np.abs(a[name] - b[name]).max() <= 1e-4 * scale, name


def test_resume_continues_the_same_run(tmp_path):
    """Cut after step 3 and resumed: the same losses and the same final tensors (the EMA
    state is in the checkpoint, the draws come from the step)."""
    init = init_dir(tmp_path / "init")
    cfg = config("train.max_steps=6", "train.checkpoint_interval=3")
    run_training(cfg, "torch", tmp_path / "full", init_dir=init, progress=False)
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-00000006")
    shutil.rmtree(tmp_path / "cut" / "final")
    run_training(cfg, "torch", tmp_path / "cut", init_dir=init, resume=True, progress=False)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    a, b = final_state(tmp_path / "cut"), final_state(tmp_path / "full")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_micro_batches_take_the_steps_of_one_batch(tmp_path):
    """grad_accum_steps 2 (micro-batches of 2) against one batch of 4: the same losses and
    the same EMA state, restarts included (each dead code takes the candidate of the
    best-scored image of the whole batch, whichever micro-batch holds it)."""
    init = init_dir(tmp_path / "init")
    cfg = ["train.max_steps=6"]
    run_training(config(*cfg), "torch", tmp_path / "one", init_dir=init, progress=False)
    run_training(config(*cfg, "train.grad_accum_steps=2"), "torch", tmp_path / "two", init_dir=init, progress=False)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert all(abs(a[s] - b[s]) <= 1e-5 * abs(a[s]) for s in a)
    one, two = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    for name in ("quantizer.codebook", "quantizer.cluster_size", "quantizer.embed_sum"):
        assert np.abs(one[name] - two[name]).max() <= 1e-4 * np.abs(one[name]).max(), name


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """vqvae-tiny trained 200 PyTorch steps on 60 scenes: ~4 s on one thread. On one
    thread because the kernels are tiny: two threads on a loaded 2-core machine spin-wait
    on each other (measured 100 s for the same run)."""
    import torch

    out = tmp_path_factory.mktemp("vqvae")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(config("train.max_steps=200", "train.learning_rate=3e-3", "train.log_interval=50"),
                     "torch", out, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out / "final"


def test_tokenize_decode_and_report(trained):
    """Codes of both backends identical (uint16 [n, 4, 4]); decode gives uint8 [n, 16, 16, 3];
    the report's PSNR and usage equal numpy's on the held-out images' round trip, and
    the trained tokenizer beats painting each image its mean colour."""
    from taichu.image_tokens import decode_codes, load_split, reconstruction_report, tokenize_images
    from taichu.images import crop_and_resize

    config_ = taichu.load_config(trained / "config.yaml")
    held_out = [pair.load() for pair in load_split(config_).test]
    codes = tokenize_images(trained, held_out, "torch")
    assert codes.dtype == np.uint16 and codes.shape == (len(held_out), 4, 4)
    assert np.array_equal(codes, tokenize_images(trained, held_out, "mindspore"))
    # one image, or a uint8 batch [n, H, W, 3], as well as a list
    assert np.array_equal(tokenize_images(trained, held_out[0], "torch"), codes[:1])
    batch = np.stack([np.asarray(image) for image in held_out[:2]])
    assert np.array_equal(tokenize_images(trained, batch, "torch"), codes[:2])
    images = decode_codes(trained, codes, "torch")
    assert images.dtype == np.uint8 and images.shape == (len(held_out), 16, 16, 3)
    assert np.abs(images.astype(int) - decode_codes(trained, codes, "mindspore").astype(int)).max() <= 1
    original = np.stack([crop_and_resize(image, 16) for image in held_out])
    report = reconstruction_report(trained, None, "torch")
    assert report["images"] == len(held_out) and report["codebook_size"] == 32
    assert np.isclose(report["psnr"], psnr(original, images).mean())
    assert (report["usage"], report["perplexity"]) == code_usage(codes, 32)
    print(report)
    assert report["psnr"] > report["psnr_mean_colour"] + 2.0
    with pytest.raises(ValueError, match="codes must be in"):
        decode_codes(trained, np.full((1, 4, 4), 32), "torch")

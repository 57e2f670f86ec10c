"""The m6 family through ``taichu train``: 20 steps of the whole task mix (captions,
image-conditioned continuation, questions, People's Daily continuation and denoising, text
to image on the codes of a random vqvae-tiny) from one saved init give the same losses in
MindSpore (graph mode, the trainer's compiled step) and PyTorch, and the loss falls."""
import numpy as np
import torch

import taichu
from taichu.config import load_config
from taichu.train import TASK_DATA, read_metrics, run_training
from conftest import CONFIGS

TINY = CONFIGS / "m6" / "m6-tiny.yaml"
VQVAE_TINY = CONFIGS / "vqvae" / "vqvae-tiny.yaml"
MIX = "data.tasks={caption: 1.0, image_text: 0.5, vqa: 1.0, text_continuation: 0.5, text_denoising: 0.5, text_to_image: 1.0}"


def test_first_20_losses_of_the_task_mix_agree_across_backends(tmp_path):
    torch.manual_seed(0)
    vq = taichu.save_model(taichu.build_model(load_config(VQVAE_TINY), "torch"), tmp_path / "vq")
    config = load_config(TINY, [MIX, f"data.image_tokenizer={vq}", "data.image_tokenizer_backend=torch",
                                f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=20",
                                "train.log_interval=1", "train.eval_interval=1000", "train.eval_batches=1"])
    data = TASK_DATA["m6"](config, None, 0)
    first = data.train.batch(np.arange(config.train.batch_size))
    # The mix reaches the first steps: an image row, a text-only row and a code row at least.
    segments = first["segment_ids"]
    assert (segments == taichu.families.m6.IMAGE).any() and (segments == taichu.families.m6.CODE).any()
    assert ((segments[:, :config.model.num_patches] == 0).all(axis=1)).any()
    torch.manual_seed(0)
    init = taichu.save_model(taichu.build_model(config, "torch"), tmp_path / "init", tokenizer=data.tokenizer.path)
    runs = {}
    for backend in ("torch", "mindspore"):
        run_training(config, backend, tmp_path / backend, init_dir=init, progress=False)
        runs[backend] = {r["step"]: r["loss"] for r in read_metrics(tmp_path / backend) if "loss" in r}
    assert sorted(runs["torch"]) == list(range(1, 21))
    a = np.array([runs["torch"][s] for s in range(1, 21)])
    b = np.array([runs["mindspore"][s] for s in range(1, 21)])
    relative = np.abs(a - b) / np.abs(a)
    print(f"torch losses {np.round(a, 4).tolist()}")
    assert relative.max() <= 1e-4, f"worst relative difference {relative.max():.2e} at step {relative.argmax() + 1}"
    assert a[-5:].mean() < a[:5].mean()

"""Text to image (taichu/imagine.py, taichu/cli_imagine.py) on tiny random models: the same
codes for the same seed in both backends (greedy and sampled), the codes a cached sampling
loop writes are the model's own argmax step by step, CLIP reranking sorts, the scene checker
scores each image, the image-tokenizer commands round-trip, and bad input is refused."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import taichu
from taichu.generate import SamplingConfig
from taichu.imagetext import draw_scene, make_scene
from taichu.imagine import dalle_step, prompt_ids, sample_codes
from taichu.tokenizer import Tokenizer
from conftest import CONFIGS

PROMPT = "左边一个红色的正方形，右边一个蓝色的圆形"


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer):
    """{vqvae, dalle, clip}: random tiny model directories; the DALL-E names the vqvae as
    its image tokenizer and carries the tokenizer, as a trained one does."""
    import torch

    root = tmp_path_factory.mktemp("imagine")
    torch.manual_seed(0)
    vq = taichu.save_model(taichu.build_model(taichu.load_config(CONFIGS / "vqvae" / "vqvae-tiny.yaml"), "torch"),
                           root / "vqvae")
    config = taichu.load_config(CONFIGS / "dalle" / "dalle-tiny.yaml", [f"data.image_tokenizer={vq}"])
    dalle = taichu.build_model(config, "torch")
    with torch.no_grad():     # sharper than the init, so that greedy codes vary over the grid
        dalle.image_head.weight.mul_(50.0)
    dalle_dir = taichu.save_model(dalle, root / "dalle", tokenizer=tiny_tokenizer)
    clip = taichu.save_model(taichu.build_model(taichu.load_config(CONFIGS / "clip" / "clip-tiny.yaml"), "torch"),
                             root / "clip", tokenizer=tiny_tokenizer)
    return {"vqvae": vq, "dalle": dalle_dir, "clip": clip}


def text_ids(models, prompt=PROMPT, rows=2):
    config = taichu.load_config(models["dalle"])
    ids, _ = prompt_ids(Tokenizer(models["dalle"] / "tokenizer.model"), prompt, config.model.text_length)
    return np.repeat(ids, rows, axis=0), config


@pytest.mark.parametrize("temperature,top_k", [(0.0, 0), (1.0, 8)])
def test_same_codes_in_both_backends(models, temperature, top_k):
    ids, config = text_ids(models)
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, seed=3)
    codes = {b: sample_codes(dalle_step(taichu.load_model(models["dalle"], b)), ids, config.model.image_grid, sampling)
             for b in ("torch", "mindspore")}
    assert codes["torch"].shape == (2, 4, 4)
    assert np.array_equal(codes["torch"], codes["mindspore"])
    assert len(np.unique(codes["torch"])) > 1
    if temperature == 0:   # greedy rows of one prompt are equal; sampled rows differ
        assert np.array_equal(codes["torch"][0], codes["torch"][1])
    else:
        assert not np.array_equal(codes["torch"][0], codes["torch"][1])


def test_greedy_codes_are_the_full_forward_argmax(models):
    """Each greedy code is the argmax of the full (cache-free) forward over the text and the
    codes before it."""
    import torch

    ids, config = text_ids(models, rows=1)
    model = taichu.load_model(models["dalle"], "torch")
    codes = sample_codes(dalle_step(model), ids, 4, SamplingConfig(temperature=0.0)).reshape(1, -1)
    with torch.no_grad():
        _, logits = model(torch.from_numpy(ids), torch.from_numpy(codes[:, :-1]))
    assert np.array_equal(logits.argmax(-1).numpy(), codes)


def taichu_cli(*args):
    return subprocess.run([sys.executable, "-m", "taichu", *map(str, args)], capture_output=True, text=True)


def test_imagine_command_reranks_and_checks(models, tmp_path):
    out = tmp_path / "grid.png"
    done = taichu_cli("imagine", models["dalle"], "--prompt", PROMPT, "--num", 3, "--rerank", models["clip"],
                      "--out", out, "--seed", 1, "--codes", tmp_path / "codes.npy")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(out.with_suffix(".json").read_text())
    scores = summary["clip_scores"]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)     # best first
    assert all(set(c) == {"colour", "shape", "position", "count"} and len(c["colour"]) == 2 for c in summary["checks"])
    with Image.open(out) as grid:     # 3 images of 16 px, 4x enlarged, in one row, 2-line labels
        assert grid.size == (3 * (64 + 4) + 4, 64 + 24 + 8)
    codes = np.load(tmp_path / "codes.npy")
    assert codes.shape == (3, 4, 4)
    # The reranked order holds the same samples: the CLIP scores of the decoded images.
    from taichu.image_tokens import decode_codes
    from taichu.imagine import rerank_scores

    rescored = rerank_scores(models["clip"], PROMPT, decode_codes(models["vqvae"], codes, "torch"))
    assert np.allclose(rescored, scores, atol=1e-5)


def test_imagine_refuses_bad_input(models, tmp_path):
    out = tmp_path / "x.png"
    for args, message in ((["--prompt", "  "], "prompt is empty"), (["--prompt", PROMPT, "--num", 0], "--num"),
                          (["--prompt", PROMPT, "--image-tokenizer", models["clip"]], "not an image tokenizer")):
        done = taichu_cli("imagine", models["dalle"], *args, "--out", out)
        assert done.returncode == 2 and message in done.stderr, done.stderr[-1000:]
    done = taichu_cli("imagine", models["vqvae"], "--prompt", PROMPT, "--out", out)
    assert done.returncode == 2 and "not a dalle model" in done.stderr
    long_prompt = "，".join([PROMPT] * 4)
    done = taichu_cli("imagine", models["dalle"], "--prompt", long_prompt, "--num", 1, "--out", out)
    assert done.returncode == 0 and "its end was cut" in done.stdout, done.stderr[-1000:]


def test_tokenize_and_decode_commands(models, tmp_path):
    from taichu.image_tokens import decode_codes, tokenize_images

    folder = tmp_path / "scenes"
    folder.mkdir()
    scenes = [draw_scene(make_scene(0, i), 64) for i in range(3)]
    for i, image in enumerate(scenes):
        image.save(folder / f"{i}.png")
    codes_file = tmp_path / "codes.npy"
    done = taichu_cli("tokenize-images", models["vqvae"], "--images", folder, "--out", codes_file)
    assert done.returncode == 0, done.stderr[-2000:]
    codes = np.load(codes_file)
    assert codes.shape == (3, 4, 4)
    assert np.array_equal(codes, tokenize_images(models["vqvae"], scenes, "torch"))
    assert json.loads(codes_file.with_suffix(".json").read_text())[0].endswith("0.png")
    done = taichu_cli("decode-images", models["vqvae"], codes_file, "--out", tmp_path / "decoded")
    assert done.returncode == 0, done.stderr[-2000:]
    decoded = np.stack([np.asarray(Image.open(tmp_path / "decoded" / f"{i:05d}.png")) for i in range(3)])
    assert np.array_equal(decoded, decode_codes(models["vqvae"], codes, "torch"))
    done = taichu_cli("decode-images", models["dalle"], codes_file, "--out", tmp_path / "x")
    assert done.returncode == 2 and "not a vqvae model" in done.stderr


def test_imagine_on_onnx_exports_writes_the_torch_codes(models, tmp_path):
    """`taichu imagine EXPORT --backend onnx --image-tokenizer VQVAE_EXPORT`: the codes torch
    samples for the same seed (sampled, not greedy), from onnxruntime alone."""
    from export.exporter import export_model

    dalle_onnx, vq_onnx = tmp_path / "dalle-onnx", tmp_path / "vq-onnx"
    export_model(models["dalle"], "onnx", dalle_onnx, log=lambda *_: None)
    export_model(models["vqvae"], "onnx", vq_onnx, log=lambda *_: None)
    codes = {}
    for backend, model, extra in (("torch", models["dalle"], []),
                                  ("onnx", dalle_onnx, ["--image-tokenizer", vq_onnx])):
        done = taichu_cli("imagine", model, "--backend", backend, *extra, "--prompt", PROMPT, "--num", 3,
                          "--seed", 5, "--top-k", 8, "--out", tmp_path / f"{backend}.png",
                          "--codes", tmp_path / f"{backend}.npy")
        assert done.returncode == 0, done.stderr[-2000:]
        codes[backend] = np.load(tmp_path / f"{backend}.npy")
    assert np.array_equal(codes["torch"], codes["onnx"])
    done = taichu_cli("imagine", dalle_onnx, "--backend", "onnx", "--prompt", PROMPT, "--out", tmp_path / "x.png")
    assert done.returncode == 2 and "--image-tokenizer" in done.stderr

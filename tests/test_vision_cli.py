"""The vision commands on a tiny model: ``taichu probe`` (accuracies, JSON), ``taichu attention``
(pictures), the runner's features, attention and masks equal in both backends, bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import taichu
from taichu.imagetext import draw_scene, make_scene
from taichu.vision_tasks import VisionRunner
from conftest import CONFIGS

TINY = CONFIGS / "vision" / "vision-tiny.yaml"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    return taichu.save_model(taichu.build_model(taichu.load_config(TINY), "torch"),
                             tmp_path_factory.mktemp("vision") / "model")


def taichu_cli(*args):
    return subprocess.run([sys.executable, "-m", "taichu", *map(str, args)], capture_output=True, text=True)


def test_runner_agrees_across_backends_on_any_image(model_dir):
    """Features, patch attention and the masks drawn from them: torch = MindSpore, for a
    grey-scale image, an odd-sized one and a scene (resized and cropped as documented)."""
    images = [Image.new("L", (45, 70), 90), draw_scene(make_scene(0, 2), 64),
              Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 50, 3), dtype=np.uint8))]
    runs = {b: VisionRunner(model_dir, b) for b in ("torch", "mindspore")}
    (f_t, a_t), (f_m, a_m) = (runs[b].run(images) for b in ("torch", "mindspore"))
    assert f_t.shape == (3, 32) and a_t.shape == (3, 16)
    # float32 forward passes of a 2-layer model: features of O(1) agree to ~1e-6.
    assert np.abs(f_t - f_m).max() <= 1e-5 and np.abs(a_t - a_m).max() <= 1e-6
    # Probabilities over the patches only: the CLS token's share of each head is left out.
    assert np.all((0 < a_t.sum(axis=1)) & (a_t.sum(axis=1) < 1))
    for rule in ("guided", "random", "none"):
        m_t, m_m = runs["torch"].masks(a_t, seed=1, mask=rule), runs["mindspore"].masks(a_t, seed=1, mask=rule)
        assert np.array_equal(m_t, m_m), rule
    guided = runs["torch"].masks(a_t, seed=1)
    # The guided rule only masks patches below each image's median attention.
    assert all((a[g] <= np.median(a)).all() for a, g in zip(a_t, guided))
    assert not runs["torch"].masks(a_t, seed=1, mask="none").any()


def test_probe_command(model_dir, tmp_path):
    out = tmp_path / "probe.json"
    done = taichu_cli("probe", model_dir, "--data", "digits", "--out", out)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["classes"] == 10 and result["encoder"] == "teacher"
    assert result["train_images"] + result["test_images"] == 1797
    # Even random features of a ViT separate the digits better than chance (they are the
    # pixels, projected); the number shows the probe runs, the claim is in bench/.
    assert result["linear_probe"] > 2 * result["chance"] and 0 <= result["knn"] <= 1
    assert "linear probe accuracy" in done.stdout
    bad = taichu_cli("probe", model_dir, "--data", "scenes")
    assert bad.returncode == 2 and "without a label" in bad.stderr


def test_attention_command(model_dir, tmp_path):
    scene = tmp_path / "scene.png"
    draw_scene(make_scene(0, 5), 64).save(scene)
    grey = tmp_path / "grey.jpg"
    Image.new("L", (50, 80), 30).save(grey)
    one = taichu_cli("attention", model_dir, scene, "--out", tmp_path / "one.png", "--size", "64")
    assert one.returncode == 0, one.stderr[-2000:]
    assert Image.open(tmp_path / "one.png").size == (3 * 64 + 2 * 4, 64)
    many = taichu_cli("attention", model_dir, scene, grey, "--out", tmp_path / "pictures", "--mask", "random")
    assert many.returncode == 0, many.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "pictures").iterdir()) == ["grey-attention.png", "scene-attention.png"]
    assert "(random)" in many.stdout
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    bad = taichu_cli("attention", model_dir, notes, "--out", tmp_path / "x.png")
    assert bad.returncode == 2 and "notes.txt" in bad.stderr


def test_a_model_of_another_family_is_refused(tmp_path):
    import torch

    torch.manual_seed(0)
    clip = taichu.save_model(taichu.build_model(taichu.load_config(CONFIGS / "clip" / "clip-tiny.yaml"), "torch"),
                             tmp_path / "clip")
    with pytest.raises(ValueError, match="not a vision model"):
        VisionRunner(clip, "torch")

"""Segmentation, the vision family's dense downstream task (objective ``segmentation``: the
ViT + the global decoder to per-pixel class scores): the two backends agree on scores, loss
and gradients, the loss equals a float64 numpy cross-entropy, the scene batches carry exact
labels, ``--init`` from a pretraining model takes the teacher's backbone and the student's
decoder, 20 training steps are the same in both backends, and ``taichu segment`` fine-tunes,
evaluates and refuses what it cannot do."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import taichu
from taichu.api import load_state_dict, state_dict
from taichu.config import ConfigError
from taichu.families import get_family
from taichu.train import read_metrics, run_training
from taichu.vision_data import SEGMENT_CLASSES, SegmentBatches, load_images
from taichu.vision_tasks import segmentation_config
from conftest import CONFIGS

TINY = CONFIGS / "vision" / "vision-tiny.yaml"
TOL = 1e-5
SMALL_DATA = ["data.scene_count=60", "train.log_interval=1", "train.eval_interval=1000"]


def segment_config(*extra):
    return segmentation_config(taichu.load_config(TINY), [*SMALL_DATA, "train.batch_size=4",
                                                          "train.max_steps=20", *extra])


def cross_entropy64(scores, labels):
    """Mean over pixels of -log softmax(scores)[label], in float64. scores [B, K, H, W]."""
    x = scores.astype(np.float64).transpose(0, 2, 3, 1).reshape(-1, scores.shape[1])
    x = x - x.max(axis=1, keepdims=True)
    log_probs = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(x)), labels.reshape(-1)].mean()


@pytest.fixture(scope="module")
def pair():
    """The tiny segmentation model in both backends with the same perturbed weights, and a
    batch of 3 scenes (flipped by step 5's draws)."""
    from mindspore_impl.vision import MST as MSMST
    from torch_impl.vision import MST as TorchMST

    config = segment_config()
    torch_model = TorchMST(config).eval()
    rng = np.random.default_rng(0)
    arrays = {n: (a + 0.3 * rng.standard_normal(a.shape)).astype(a.dtype) for n, a in state_dict(torch_model).items()}
    load_state_dict(torch_model, arrays)
    ms_model = MSMST(config)
    load_state_dict(ms_model, arrays)
    ms_model.set_train(False)
    images = load_images("scenes", 0.2, 0, scene_count=20, scene_seed=1)
    batch = SegmentBatches(images.train, 32).batch(np.arange(3), step=5)
    return config, torch_model, ms_model, batch


def test_config_and_names(pair):
    config, torch_model, ms_model, _ = pair
    m = config.model
    assert m.objective == "segmentation" and not m.mask_token and not m.pooler
    assert config.data.source == "scenes" and config.data.scene_seed == 1
    specs = get_family("vision").tensor_specs(config)
    assert list(state_dict(torch_model)) == list(specs) and set(state_dict(ms_model)) == set(specs)
    assert specs["decoder.out.weight"].shape == (len(SEGMENT_CLASSES), m.decoder.channels[-1], 3, 3)
    assert not any(n.startswith(("teacher.", "head.", "center")) for n in specs)
    with pytest.raises(ConfigError, match="mask_token"):
        segment_config("model.mask_token=true")
    with pytest.raises(ConfigError, match="pooler"):
        segment_config("model.pooler=true")


def test_backends_agree_on_scores_loss_and_gradients(pair):
    """Scores <= 1e-5 (relative to their size); both losses equal the float64 cross-entropy
    of torch's scores; MindSpore's compiled value_and_grad equals torch's backward.

    Loss tolerance: the mean over 3 x 32 x 32 pixels of terms of order 1 is within
    float32_tolerance of the exact mean when summed pairwise/blocked (torch; MindSpore's
    ReduceMean), so 1e-5 relative holds with room (mindspore_impl.gpt.cross_entropy says why
    NLLLoss's own mean is not used). Gradients: relative to the largest of their tensor,
    within the encoder chain's bound (tests/tolerance.py) plus the decoder's sums."""
    import mindspore as ms
    from mindspore_impl import vision as mv
    from mindspore_impl.weights import canonical_parameters
    from torch_impl import vision as tv
    from tolerance import encoder_chain_terms, float32_tolerance

    config, torch_model, ms_model, batch = pair
    m = config.model
    pixels, labels = batch["pixel_values"], batch["labels"]
    with torch.no_grad():
        t_scores = torch_model.segment(torch.from_numpy(pixels)).numpy()
    m_scores = ms_model.segment(ms.Tensor(pixels)).asnumpy()
    assert t_scores.shape == (3, len(SEGMENT_CLASSES), 32, 32)
    assert np.abs(t_scores - m_scores).max() <= TOL * max(1.0, np.abs(t_scores).max())
    reference = cross_entropy64(t_scores, labels)
    torch_model.zero_grad()
    (loss,) = tv.training_loss(torch_model, torch.from_numpy(pixels), torch.from_numpy(labels))
    loss.backward()
    expected = {n: p.grad.numpy() for n, p in torch_model.named_parameters() if p.requires_grad}
    params = ms_model.trainable_params()
    names = {p.name: n for n, (p, _) in canonical_parameters(ms_model).items()}
    def step(pixel_values, labels):
        return mv.training_loss(ms_model, pixel_values, labels)[0]
    grad_fn = ms.jit(ms.value_and_grad(step, None, params))
    ms_loss, grads = grad_fn(ms.Tensor(pixels), ms.Tensor(labels.astype(np.int32)))
    for value in (float(loss.detach()), float(ms_loss.asnumpy())):
        assert abs(value - reference) <= TOL * reference
    # The loss is not trivially ln K: the perturbed model's scores are far from uniform.
    assert abs(reference - np.log(len(SEGMENT_CLASSES))) > 0.1
    terms = encoder_chain_terms(m, m.num_patches + 1, m.num_channels * m.patch_size ** 2)
    terms += 9 * sum(m.decoder.channels)   # the decoder's 3x3 convolutions
    bound = float32_tolerance(1.0, 2 * terms)
    assert len(grads) == len(expected) and {names[p.name] for p in params} == set(expected)
    for param, grad in zip(params, grads):
        ref = expected[names[param.name]]
        assert np.abs(grad.asnumpy() - ref).max() <= bound * max(1.0, np.abs(ref).max()), names[param.name]


def test_scene_batches_have_exact_labels():
    from taichu.imagetext import draw_scene, scene_class_map

    images = load_images("scenes", 0.2, 0, scene_count=20, scene_seed=1)
    scenes = SegmentBatches(images.train, 32, seed=3)
    evaluation = scenes.batch([0, 1, 2])
    assert np.array_equal(evaluation["labels"][1], scene_class_map(images.train[1].scene, 32))
    assert set(np.unique(evaluation["labels"])) <= set(range(len(SEGMENT_CLASSES)))
    # Training draws flip an image and its labels together, the same whatever the neighbours.
    flips = []
    for step in range(8):
        a, b = scenes.batch([0, 1, 2], step), scenes.batch([5, 1], step)
        assert np.array_equal(a["labels"][1], b["labels"][1]) and np.array_equal(a["pixel_values"][1], b["pixel_values"][1])
        flipped = not np.array_equal(a["labels"][1], evaluation["labels"][1])
        if flipped:
            assert np.array_equal(a["labels"][1], evaluation["labels"][1][:, ::-1])
            assert np.array_equal(a["pixel_values"][1], evaluation["pixel_values"][1][:, :, ::-1])
        flips.append(flipped)
    assert any(flips) and not all(flips)
    # Pixels are the scene itself, normalised: a shape pixel differs from the background.
    raw = np.asarray(draw_scene(images.train[0].scene, 32).convert("RGB"))
    assert np.array_equal(scenes.item(0)[0], raw)
    digits = load_images("digits", 0.2, 0)
    with pytest.raises(ValueError, match="drawn scenes"):
        SegmentBatches(digits.train[:3], 32)


def test_init_from_pretraining_takes_teacher_backbone_and_student_decoder(tmp_path, capsys):
    from taichu.train import _load_init

    torch.manual_seed(0)
    pre_config = taichu.load_config(TINY)
    pretrained = taichu.build_model(pre_config, "torch")
    arrays = state_dict(pretrained)
    # Make teacher and student differ, so that the test sees which one was taken.
    rng = np.random.default_rng(1)
    arrays = {n: (a + rng.standard_normal(a.shape)).astype(a.dtype) if a.dtype == np.float32 else a
              for n, a in arrays.items()}
    load_state_dict(pretrained, arrays)
    pre_dir = taichu.save_model(pretrained, tmp_path / "pre")
    config = segment_config()
    model = taichu.build_model(config, "torch")
    fresh_out = state_dict(model)["decoder.out.weight"]
    _load_init(model, config, pre_config, pre_dir, verbose=True)
    loaded = state_dict(model)
    for name, array in loaded.items():
        if name.startswith("backbone."):
            assert np.array_equal(array, arrays[f"teacher.{name}"]), name
        elif name.startswith("decoder.out."):
            assert name != "decoder.out.weight" or np.array_equal(array, fresh_out)
        else:
            assert np.array_equal(array, arrays[name]), name
    said = capsys.readouterr().out
    assert "teacher.backbone.* as backbone.*" in said and "initialised fresh: decoder.out.bias, decoder.out.weight" in said


def test_twenty_steps_agree_across_backends(tmp_path):
    """The same 20 fine-tuning steps (same weights, same flips) in both backends (<= 1e-4
    relative, the design's training-parity bound), and the loss falls. The start is a whole
    segmentation model: a fresh decoder.out from ``--init`` of a pretraining model is drawn
    by each backend's own generator (the init mapping has its own test above)."""
    torch.manual_seed(0)
    init = taichu.save_model(taichu.build_model(segment_config(), "torch"), tmp_path / "pre")
    runs = {}
    for backend in ("torch", "mindspore"):
        run_training(segment_config(), backend, tmp_path / backend, init_dir=init, progress=False)
        runs[backend] = {r["step"]: r["loss"] for r in read_metrics(tmp_path / backend) if "loss" in r}
    a = np.array([runs["torch"][s] for s in range(1, 21)])
    b = np.array([runs["mindspore"][s] for s in range(1, 21)])
    assert (np.abs(a - b) / a).max() <= 1e-4, np.round(a, 5).tolist()
    assert a[-5:].mean() < a[:5].mean()


def taichu_cli(*args):
    return subprocess.run([sys.executable, "-m", "taichu", *map(str, args)], capture_output=True, text=True)


def test_segment_command(tmp_path):
    """Fine-tune, evaluate (scores beside "background everywhere"), picture and JSON; the
    segmentation model evaluates alone to the same numbers; refusals name the problem."""
    torch.manual_seed(0)
    pre = taichu.save_model(taichu.build_model(taichu.load_config(TINY), "torch"), tmp_path / "pre")
    out, picture = tmp_path / "seg", tmp_path / "seg.png"
    done = taichu_cli("segment", pre, "--out", out, "--set", "train.max_steps=10", "--set", "data.scene_count=60",
                      "--picture", picture, "--no-progress")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "mIoU" in done.stdout and "background everywhere" in done.stdout
    result = json.loads((out / "segmentation.json").read_text())
    assert result["classes"] == list(SEGMENT_CLASSES) and result["scenes"] == 12
    assert 0 <= result["iou"]["mean"] <= 1 and len(result["iou"]["per_class"]) == 4
    base = result["background_everywhere"]
    assert base["iou"]["per_class"][1:] == [0.0, 0.0, 0.0] and 0.5 < base["pixel_accuracy"] < 1
    from PIL import Image

    with Image.open(picture) as image:   # 8 rows of scene | truth | prediction, 3x enlarged
        assert image.size == (3 * (3 * 32 + 4), 3 * (8 * 32 + 7 * 2))
    again = taichu_cli("segment", out / "final", "--json", tmp_path / "again.json")
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((tmp_path / "again.json").read_text())["iou"] == result["iou"]
    refused = taichu_cli("segment", out / "final", "--scratch")
    assert refused.returncode != 0 and "already a segmentation model" in refused.stderr
    refused = taichu_cli("segment", pre)
    assert refused.returncode != 0 and "--out" in refused.stderr
    refused = taichu_cli("segment", pre, "--out", tmp_path / "x", "--set", "train.max_step=3")
    assert refused.returncode != 0 and "max_step" in refused.stderr and "max_steps" in refused.stderr

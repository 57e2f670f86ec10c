"""Vision export: the ViT backbone as one ``model`` graph (optimum's ViT feature-extraction names:
pixel_values -> last_hidden_state, pooler_output), ONNX from torch_impl and MINDIR from
mindspore_impl, checked against the source backbone at batch sizes of the test's own; an MST
model exports its teacher (here made to differ from the student), a ``backbone`` model its
pooler; Hugging Face's ViTConfig and ViTModel read the folder; VisionRunner gives the same
features through export.runtime_encoders.vision_network, with no framework loaded for ONNX."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

import taichu
from export.exporter import export_model
from export.runtime import OnnxGenerator
from export.runtime_encoders import speech_network, vision_network
from export.signature import decoder_graph, validation_cases
from export.signature_encoders import vision_graph, vision_inputs
from taichu.config import load_config, validate_config
from taichu.imagetext import draw_scene, make_scene
from taichu.vision_tasks import VisionRunner

from conftest import CONFIGS, export_models

TOLERANCE = 1e-4
TINY = CONFIGS / "vision" / "vision-tiny.yaml"
# Not a validation batch (1, 5) nor the trace's (2).
BATCH = 3


def _scaled_difference(actual, expected) -> float:
    """export/validate.py's measure: max |a - e| / max(1, max |e|)."""
    scale = max(1.0, float(np.abs(expected).max()))
    return float(np.abs(actual.astype(np.float64) - expected).max()) / scale


def _images():
    """A grey-scale image, a scene and an odd-sized colour one (preprocess resizes them)."""
    return [Image.new("L", (45, 70), 90), draw_scene(make_scene(0, 2), 64),
            Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 50, 3), dtype=np.uint8))]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{objective: (model directory, torch model)}. The MST model's teacher backbone is moved
    away from its student (they start equal), so that exporting the wrong one shows; the
    ``backbone`` model has a pooler, its dense layer perturbed out of its zero-bias init."""
    import torch

    torch.manual_seed(0)
    mst = taichu.build_model(load_config(TINY), "torch").eval()
    raw = json.loads(load_config(TINY).model_dump_json())
    raw["model"] = {**raw["model"], "objective": "backbone", "pooler": True}
    backbone = taichu.build_model(validate_config(raw, "vision-tiny-backbone"), "torch").eval()
    with torch.no_grad():
        for param in [*mst.teacher.backbone.parameters(), *backbone.backbone.pooler.parameters()]:
            param.add_(0.1 * torch.randn_like(param))
    return {name: (taichu.save_model(model, tmp_path_factory.mktemp(name) / "model"), model)
            for name, model in (("mst", mst), ("backbone", backbone))}


@pytest.fixture(scope="module")
def exports(models, tmp_path_factory):
    """{(objective, format): (export directory, export_info, log lines)}: ONNX of both, MINDIR
    of the MST model."""
    return export_models({name: model[0] for name, model in models.items()}, tmp_path_factory.mktemp("export"),
                         mindir=("mst",))


def _session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _torch_features(model, pixels, teacher: bool):
    """(last_hidden_state, pooled) of the teacher's backbone, or of the model's forward (the
    student's backbone and its pooler)."""
    import torch

    with torch.no_grad():
        x = torch.from_numpy(pixels)
        if teacher:
            hidden = model.teacher.backbone(x)[0]
            return hidden.numpy(), hidden[:, 0].numpy()
        return tuple(t.numpy() for t in model(x))


# ----------------------------------------------------------------------------- the folder

@pytest.mark.parametrize("objective", ["mst", "backbone"])
def test_onnx_export_records_its_graph_and_names_its_axes(exports, objective):
    import onnx

    directory, info, lines = exports[objective, "onnx"]
    assert info["task"] == "vision" and info["family"] == "vision" and info["opset"] == 18
    assert any(line.startswith("validated model.onnx against torch_impl") for line in lines), lines
    (graph,) = info["graphs"]
    assert graph["name"] == "model" and graph["file"] == "model.onnx"
    expected = [("pixel_values", ["batch", 3, 32, 32]), ("last_hidden_state", ["batch", 17, 32]),
                ("pooler_output", ["batch", 32])]
    assert [(t["name"], t["shape"]) for t in graph["inputs"] + graph["outputs"]] == expected
    assert {t["dtype"] for t in graph["inputs"] + graph["outputs"]} == {"float32"}
    validation = graph["validation"]
    assert validation["passed"] and [s["batch"] for s in validation["shapes"]] == [1, 5]
    assert all(s["max_difference"] <= TOLERANCE for s in validation["shapes"])
    assert sorted(info["files"]) == sorted(p.name for p in directory.iterdir()) == [
        "config.json", "config.yaml", "export_info.json", "model.onnx"]
    saved = onnx.load(str(directory / "model.onnx")).graph
    assert [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in list(saved.input) + list(saved.output)] == expected


def test_onnx_folder_is_a_hugging_face_vit_folder(exports, models, tmp_path):
    """config.json loads in ViTConfig with the model's sizes, and Hugging Face's ViTModel built
    from it with the teacher's weights (taichu convert --to hf) gives the graph's
    last_hidden_state."""
    import torch
    from transformers import ViTConfig, ViTModel

    from taichu import convert

    directory, info, _ = exports["mst", "onnx"]
    assert (info["huggingface"]["architecture"], info["huggingface"]["model_type"]) == ("ViTModel", "vit")
    config = ViTConfig.from_pretrained(directory)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size,
            config.image_size, config.patch_size, config.num_channels) == (32, 2, 4, 64, 32, 8, 3)
    convert.convert(models["mst"][0], tmp_path / "hf", to="hf")
    reference = ViTModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False, use_mask_token=True).eval()
    pixels = vision_inputs(models["mst"][1].config.model, BATCH, seed=11)["pixel_values"]
    with torch.no_grad():
        expected = reference(torch.from_numpy(pixels)).last_hidden_state.numpy()
    exported = _session(directory / "model.onnx").run(["last_hidden_state"], {"pixel_values": pixels})[0]
    assert _scaled_difference(exported, expected) <= TOLERANCE


# ----------------------------------------------------------------------------- numbers

def test_onnx_runtime_matches_the_torch_backbone_at_another_batch(exports, models):
    """Batch 3 (neither validated nor traced): the MST export is the teacher (not the
    student); the backbone export pools through its pooler (not the CLS state)."""
    mst = models["mst"][1]
    pixels = vision_inputs(mst.config.model, BATCH, seed=7)["pixel_values"]
    for objective, teacher in (("mst", True), ("backbone", False)):
        session = _session(exports[objective, "onnx"][0] / "model.onnx")
        hidden, pooled = session.run(["last_hidden_state", "pooler_output"], {"pixel_values": pixels})
        expected_hidden, expected_pooled = _torch_features(models[objective][1], pixels, teacher)
        assert hidden.shape == (BATCH, 17, 32) and pooled.shape == (BATCH, 32)
        assert _scaled_difference(hidden, expected_hidden) <= TOLERANCE, objective
        assert _scaled_difference(pooled, expected_pooled) <= TOLERANCE, objective
        if teacher:
            student = _torch_features(mst, pixels, teacher=False)[0]
            assert _scaled_difference(hidden, student) > 100 * TOLERANCE
            assert np.array_equal(pooled, hidden[:, 0])
        else:
            assert _scaled_difference(pooled, hidden[:, 0]) > 100 * TOLERANCE


def test_mindir_export_matches_mindspore_and_onnx(exports, models):
    import mindspore as ms

    from export.mindir_export import MindirGraph

    directory, info, lines = exports["mst", "mindir"]
    assert any(line.startswith("validated model.mindir against mindspore_impl") for line in lines), lines
    (graph,) = info["graphs"]
    assert graph["file"] == "model.mindir" and [o["name"] for o in graph["outputs"]] == [
        "last_hidden_state", "pooler_output"]
    assert graph["validation"]["passed"] and [s["batch"] for s in graph["validation"]["shapes"]] == [1, 5]
    assert "huggingface" not in info and sorted(info["files"]) == sorted(p.name for p in directory.iterdir())
    model_config = models["mst"][1].config.model
    pixels = vision_inputs(model_config, BATCH, seed=8)["pixel_values"]
    exported = MindirGraph(directory / "model.mindir", vision_graph(model_config)).run({"pixel_values": pixels})
    source = taichu.load_model(models["mst"][0], backend="mindspore")
    source.set_train(False)
    hidden = source.teacher.backbone(ms.Tensor(pixels))[0].asnumpy()
    onnx_hidden = _session(exports["mst", "onnx"][0] / "model.onnx").run(
        ["last_hidden_state"], {"pixel_values": pixels})[0]
    assert exported["last_hidden_state"].shape == (BATCH, 17, 32)
    assert _scaled_difference(exported["last_hidden_state"], hidden) <= TOLERANCE
    assert _scaled_difference(exported["pooler_output"], hidden[:, 0]) <= TOLERANCE
    assert _scaled_difference(exported["last_hidden_state"], onnx_hidden) <= TOLERANCE


# ----------------------------------------------------------------------------- runtime

@pytest.mark.parametrize("backend", ["onnx", "mindir"])
def test_vision_runner_on_an_export_gives_the_torch_features(exports, models, backend):
    directory = exports["mst", backend][0]
    expected, attention = VisionRunner(models["mst"][0], "torch").run(_images())
    runner = VisionRunner(directory, backend, batch_size=2, network=vision_network(directory, backend))
    features, none = runner.run(_images())
    assert runner.encoder_name == "teacher" and none is None and attention.shape == (3, 16)
    assert features.shape == (3, 32) and _scaled_difference(features, expected) <= TOLERANCE
    with pytest.raises(ValueError, match="not the CLS attention masks are drawn from"):
        runner.masks(attention)
    with pytest.raises(ValueError, match="holds the teacher's backbone only"):
        VisionRunner(directory, backend, network=vision_network(directory, backend), encoder="student")
    with pytest.raises(ValueError, match=rf"build it with export.vision_network\(DIR, '{backend}'\)"):
        VisionRunner(directory, backend)
    with pytest.raises(ValueError, match="is an export directory: use backend onnx or mindir"):
        VisionRunner(directory, "torch")


def test_onnx_features_need_no_framework(exports, models, tmp_path):
    """VisionRunner over vision_network in a process where torch, mindspore, the model code and
    transformers cannot be imported: the ONNX side is numpy + onnxruntime (+ pillow, yaml and
    pydantic for the runner's images and config)."""
    directory = exports["mst", "onnx"][0]
    paths = [str(tmp_path / f"{i}.png") for i in range(3)]
    for image, path in zip(_images(), paths):
        image.save(path)
    expected, _ = VisionRunner(models["mst"][0], "torch").run(paths)
    blocked = ("torch", "torch_impl", "mindspore", "mindspore_impl", "transformers")
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys
        BLOCKED = {blocked!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked: {{name}}")
        sys.meta_path.insert(0, Block())
        from export.runtime_encoders import vision_network
        from taichu.vision_tasks import VisionRunner
        runner = VisionRunner({str(directory)!r}, "onnx", network=vision_network({str(directory)!r}, "onnx"))
        print(json.dumps(runner.run({paths!r})[0].tolist()))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _scaled_difference(np.array(json.loads(done.stdout.strip().splitlines()[-1])), expected) <= TOLERANCE


def test_vision_network_checks_its_input_and_refuses_other_exports(exports, models, tmp_path):
    directory = exports["backbone", "onnx"][0]
    network = vision_network(directory, "onnx")
    assert network.encoder_name == "backbone" and network.input_shape == (3, 32, 32)
    pixels = vision_inputs(models["backbone"][1].config.model, 2, seed=3)["pixel_values"]
    assert {k: v.shape for k, v in network.run(pixels).items()} == {"last_hidden_state": (2, 17, 32),
                                                                     "pooler_output": (2, 32)}
    assert {k: v.shape for k, v in network.run(pixels[:0]).items()} == {"last_hidden_state": (0, 17, 32),
                                                                         "pooler_output": (0, 32)}
    for bad, message in [(pixels[:, :, :16, :16], r"must be \[batch, 3, 32, 32\]: the export's image size is "
                                                  r"fixed .* got shape \(2, 3, 16, 16\)"),
                         (pixels[0], r"must be \[batch, 3, 32, 32\].* got shape \(3, 32, 32\)"),
                         (pixels.astype(np.float64), r"must be a float32 numpy array \[batch, 3, 32, 32\]"),
                         (pixels.tolist(), "got list")]:
        with pytest.raises(ValueError, match=message):
            network(bad)
    with pytest.raises(ValueError, match=r"is an ONNX export; --backend mindir runs MINDIR exports"):
        vision_network(directory, "mindir")
    with pytest.raises(ValueError, match=r"an export of a vision model \(task vision\), not of a speech"):
        speech_network(directory, "onnx")
    with pytest.raises(ValueError, match=r"an export of a vision model \(task vision\): it has no decoder"):
        OnnxGenerator(directory)
    speech = tmp_path / "speech-onnx"
    speech.mkdir()
    (speech / "export_info.json").write_text(json.dumps({"format": "onnx", "family": "wav2vec2", "task": "speech"}))
    with pytest.raises(ValueError, match=r"an export of a wav2vec2 model \(task speech\), not of a vision model: "
                                         r"export a vision model directory"):
        vision_network(speech, "onnx")
    with pytest.raises(ValueError, match="--quantize int8 is not implemented for vision models"):
        export_model(models["mst"][0], "onnx", tmp_path / "int8", quantize="int8")
    assert not (tmp_path / "int8").exists()


def test_validation_cases_follow_the_task_not_the_graph_name(tiny_config):
    """The vision graph and the GPT decoder are both ``model``: each gets its own inputs."""
    vision = load_config(TINY).model
    assert vision_graph(vision).name == decoder_graph(tiny_config.model).name == "model"
    cases = validation_cases(vision, vision_graph(vision))
    assert [(shape, sorted(feeds), feeds["pixel_values"].shape) for shape, feeds in cases] == [
        ({"batch": 1}, ["pixel_values"], (1, 3, 32, 32)), ({"batch": 5}, ["pixel_values"], (5, 3, 32, 32))]
    assert "input_ids" in validation_cases(tiny_config.model, decoder_graph(tiny_config.model))[0][1]


def test_probe_command_on_an_export(exports, models, tmp_path):
    """`taichu probe EXPORT --backend onnx` gives the torch model's k-NN accuracy (features
    within 1e-4 of each other: the same neighbours) and names the teacher."""
    results = {}
    for backend, path in (("onnx", exports["mst", "onnx"][0]), ("torch", models["mst"][0])):
        out = tmp_path / f"{backend}.json"
        done = subprocess.run([sys.executable, "-m", "taichu", "probe", str(path), "--backend", backend,
                               "--out", str(out)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        results[backend] = json.loads(out.read_text())
    assert results["onnx"]["encoder"] == "teacher" and results["onnx"]["test_images"] == results["torch"]["test_images"]
    assert results["onnx"]["knn"] == results["torch"]["knn"]
    assert abs(results["onnx"]["linear_probe"] - results["torch"]["linear_probe"]) <= 0.01

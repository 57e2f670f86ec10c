"""Image-text export: CLIP's image and text towers as ONNX (from torch_impl, torch.onnx's
dynamo exporter) and MINDIR (from mindspore_impl) graphs, each checked against its source
model, with Hugging Face's config.json and tokenizer files in the ONNX folder, and embedding
with ONNX Runtime alone (export.OnnxImageTextEncoder)."""
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import taichu
from export.mindir_export import MindirGraph
from export.runtime_encoders import OnnxImageTextEncoder
from export.signature_encoders import image_inputs, image_text_graphs, text_inputs
from export.validate import ExportValidationError, tower_runner, validate_against_source
from taichu.cli import main as cli_main
from taichu.config import load_config
from taichu.retrieval import l2_normalize
from taichu.images import preprocess
from taichu.imagetext import caption_ids, draw_scene, make_scene
from taichu.tokenizer import Tokenizer

from conftest import CONFIGS
from tolerance import clip_embedding_tolerances, unit_norm_tolerance

TEXTS = ["中国人民", "今天上午，国务院总理在北京会见了外国客人", "经济", "中国" * 40]
TOLERANCE = 1e-4


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "taichu", *map(str, args)], capture_output=True, text=True)


# Pictures of different sizes and modes: drawn scenes and a grey-scale noise array. Source
# text, so that the subprocess with torch and mindspore blocked can build the same ones.
IMAGES = ("[draw_scene(make_scene(0, i), image_size=40 + 8 * i) for i in range(4)]"
          " + [np.random.default_rng(0).integers(0, 256, (50, 36), dtype=np.uint8)]")


def _images():
    return eval(IMAGES, {"np": np, "draw_scene": draw_scene, "make_scene": make_scene})


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, tiny_tokenizer):
    """A random clip-tiny model directory. The session's gpt-tiny tokenizer fits it as is:
    the same tokenizer section and vocab_size 4096 (load_model checks nothing about it,
    caption_ids and the export copy it)."""
    import torch

    config = load_config(CONFIGS / "clip" / "clip-tiny.yaml")
    torch.manual_seed(0)
    return taichu.save_model(taichu.build_model(config, "torch"), tmp_path_factory.mktemp("clip") / "model",
                             tokenizer=tiny_tokenizer)


@pytest.fixture(scope="module")
def onnx_dir(clip_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "onnx"
    done = _run_cli("export", clip_dir, "--format", "onnx", "--out", out)
    assert done.returncode == 0, done.stderr
    assert "validated image_encoder.onnx against torch_impl" in done.stdout
    assert "validated text_encoder.onnx against torch_impl" in done.stdout
    return out


@pytest.fixture(scope="module")
def mindir_dir(clip_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "mindir"
    done = _run_cli("export", clip_dir, "--format", "mindir", "--out", out)
    assert done.returncode == 0, done.stderr
    assert "validated image_encoder.mindir against mindspore_impl" in done.stdout
    assert "validated text_encoder.mindir against mindspore_impl" in done.stdout
    return out


@pytest.fixture(scope="module")
def torch_model(clip_dir):
    return taichu.load_model(clip_dir, backend="torch")


@pytest.fixture(scope="module")
def ms_model(clip_dir):
    return taichu.load_model(clip_dir, backend="mindspore")


HF_TOKENIZER_FILES = ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]


def test_onnx_export_directory_and_info(onnx_dir, clip_dir):
    assert sorted(p.name for p in onnx_dir.iterdir()) == sorted([
        "config.json", "config.yaml", "export_info.json", "image_encoder.onnx", "text_encoder.onnx",
        "tokenizer.model", *HF_TOKENIZER_FILES])
    assert (onnx_dir / "config.yaml").read_bytes() == (clip_dir / "config.yaml").read_bytes()
    assert (onnx_dir / "tokenizer.model").read_bytes() == (clip_dir / "tokenizer.model").read_bytes()
    assert not list(onnx_dir.parent.glob(".onnx.partial-*"))
    info = json.loads((onnx_dir / "export_info.json").read_text())
    assert (info["format"], info["family"], info["task"], info["opset"]) == ("onnx", "clip", "image_text", 18)
    assert info["exporter"].startswith("torch.onnx dynamo exporter (dynamo=True")
    assert info["source"] == str(clip_dir.resolve())
    assert sorted(info["files"]) == sorted(p.name for p in onnx_dir.iterdir())
    graphs = {g["name"]: g for g in info["graphs"]}
    assert list(graphs) == ["image_encoder", "text_encoder"]
    image, text = graphs["image_encoder"], graphs["text_encoder"]
    assert image["file"] == "image_encoder.onnx" and text["file"] == "text_encoder.onnx"
    assert image["inputs"] == [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 32, 32]}]
    assert image["outputs"] == [{"name": "image_embeds", "dtype": "float32", "shape": ["batch", 32]}]
    assert text["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
                              {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]}]
    assert text["outputs"] == [{"name": "text_embeds", "dtype": "float32", "shape": ["batch", 32]}]
    assert [(s["batch"], s.get("sequence")) for s in image["validation"]["shapes"]] == [(1, None), (5, None)]
    assert [(s["batch"], s["sequence"]) for s in text["validation"]["shapes"]] == [(1, 7), (5, 32)]
    for graph in (image, text):
        assert graph["validation"]["passed"]
        assert all(s["max_difference"] <= TOLERANCE for s in graph["validation"]["shapes"])
    # The axes are dynamic in the graphs themselves, by name.
    encoder = OnnxImageTextEncoder(onnx_dir)
    assert [i.shape for i in encoder.image_encoder.session.get_inputs()] == [["batch", 3, 32, 32]]
    assert [i.shape for i in encoder.text_encoder.session.get_inputs()] == [["batch", "sequence"]] * 2
    assert (encoder.image_size, encoder.context_length, encoder.embed_dim) == (32, 32, 32)
    # No exporter symbol (s0, "s1 + s2") is left anywhere in the graphs.
    import onnx

    for file in ("image_encoder.onnx", "text_encoder.onnx"):
        graph = onnx.load(str(onnx_dir / file)).graph
        symbols = {d.dim_param for v in list(graph.input) + list(graph.output) + list(graph.value_info)
                   for d in v.type.tensor_type.shape.dim if d.dim_param}
        assert "batch" in symbols and symbols <= {"batch", "sequence"}, (file, symbols)


def test_onnx_folder_has_hugging_face_config_and_tokenizer(onnx_dir, clip_dir):
    """CLIP exists in Hugging Face: the folder holds CLIPModel's config.json for the same
    model and the tokenizer files AutoTokenizer reads."""
    from taichu.convert import hf_to_config

    info = json.loads((onnx_dir / "export_info.json").read_text())
    hf = info["huggingface"]
    assert (hf["config"], hf["architecture"], hf["model_type"]) == ("config.json", "CLIPModel", "clip")
    assert hf["tokenizer_files"] == HF_TOKENIZER_FILES and "tokenizer_error" not in hf
    config_json = json.loads((onnx_dir / "config.json").read_text())
    assert config_json["architectures"] == ["CLIPModel"] and config_json["dtype"] == "float32"
    assert (config_json["projection_dim"], config_json["text_config"]["hidden_size"],
            config_json["vision_config"]["image_size"]) == (32, 32, 32)
    assert hf_to_config(config_json, "config.json").model == load_config(clip_dir).model
    tokenizer_json = json.loads((onnx_dir / "tokenizer.json").read_text())
    assert tokenizer_json["model"]["type"] == "Unigram"
    assert len(tokenizer_json["model"]["vocab"]) == 4096


def test_onnx_towers_match_torch_at_other_batches(onnx_dir, torch_model):
    """Batch 1 and 7 (the graphs were traced at batch 2 and validated at 1 and 5); text
    lengths 3 and the full context, right-padded rows of different lengths."""
    encoder = OnnxImageTextEncoder(onnx_dir, threads=1)
    image, text = image_text_graphs(torch_model.config.model)
    run_image, run_text = tower_runner(torch_model, image), tower_runner(torch_model, text)
    m = torch_model.config.model
    for batch, length in ((1, 3), (7, 32)):
        pixels = image_inputs(m, batch, seed=10 + batch)["pixel_values"]
        actual = encoder.image_features(pixels)
        assert actual.shape == (batch, 32) and actual.dtype == np.float32
        np.testing.assert_allclose(actual, run_image({"pixel_values": pixels})["image_embeds"],
                                   atol=TOLERANCE, rtol=0)
        feeds = text_inputs(m, batch, length, seed=20 + batch)
        actual = encoder.text_features(feeds["input_ids"], feeds["attention_mask"])
        assert actual.shape == (batch, 32)
        np.testing.assert_allclose(actual, run_text(feeds)["text_embeds"], atol=TOLERANCE, rtol=0)
    # Padding is invisible: a text alone, unpadded, embeds as it does in a padded batch.
    feeds = text_inputs(m, 7, 32, seed=3)
    padded = encoder.text_features(feeds["input_ids"], feeds["attention_mask"])
    n = int(feeds["attention_mask"][4].sum())
    alone = encoder.text_features(feeds["input_ids"][4:5, :n], feeds["attention_mask"][4:5, :n])
    np.testing.assert_allclose(alone[0], padded[4], atol=1e-5, rtol=0)


def test_onnx_embeddings_match_mindspore_and_torch(onnx_dir, ms_model, torch_model):
    """From pictures and strings to unit vectors: ONNX Runtime against both source models
    fed by the same preprocessing (taichu.images.preprocess, caption_ids)."""
    import mindspore as ms
    import torch

    encoder = OnnxImageTextEncoder(onnx_dir)
    images, tokenizer = _images(), Tokenizer(onnx_dir / "tokenizer.model")
    image_embeds, text_embeds = encoder.embed_images(images, batch_size=2), encoder.embed_texts(TEXTS)
    assert image_embeds.shape == (5, 32) and text_embeds.shape == (4, 32)
    assert image_embeds.dtype == text_embeds.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(image_embeds, axis=1), 1, atol=unit_norm_tolerance(32), rtol=0)
    np.testing.assert_allclose(np.linalg.norm(text_embeds, axis=1), 1, atol=unit_norm_tolerance(32), rtol=0)
    pixels = preprocess(images, 32)
    ids, mask = caption_ids(tokenizer, TEXTS, 32)
    assert mask[3].all() and ids[3, -1] == tokenizer.eos_id               # truncated, keeps eos
    expected_ms = (l2_normalize(ms_model.get_image_features(ms.Tensor(pixels)).asnumpy()),
                   l2_normalize(ms_model.get_text_features(ms.Tensor(ids.astype(np.int32)),
                                                           ms.Tensor(mask.astype(np.int32))).asnumpy()))
    with torch.no_grad():
        expected_torch = (l2_normalize(torch_model.get_image_features(torch.from_numpy(pixels)).numpy()),
                          l2_normalize(torch_model.get_text_features(torch.from_numpy(ids),
                                                                     torch.from_numpy(mask)).numpy()))
    for expected in (expected_ms, expected_torch):
        np.testing.assert_allclose(image_embeds, expected[0], atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(text_embeds, expected[1], atol=TOLERANCE, rtol=0)
    # The comparison says something: any two inputs' embeddings differ by far more than
    # the tolerance (a random model maps the white-background scenes close together).
    for embeds in (image_embeds, text_embeds):
        apart = np.abs(embeds[:, None] - embeds[None]).max(axis=2)
        assert apart[np.triu_indices(len(embeds), 1)].min() > 10 * TOLERANCE


def test_mindir_towers_match_mindspore_at_two_batches(mindir_dir, ms_model, clip_dir):
    assert sorted(p.name for p in mindir_dir.iterdir()) == [
        "config.yaml", "export_info.json", "image_encoder.mindir", "text_encoder.mindir", "tokenizer.model"]
    info = json.loads((mindir_dir / "export_info.json").read_text())
    graphs = {g["name"]: g for g in info["graphs"]}
    assert info["task"] == "image_text" and info["source_backend"] == "mindspore"
    assert [i["dtype"] for i in graphs["text_encoder"]["inputs"]] == ["int32", "int32"]
    assert all(g["validation"]["passed"] for g in graphs.values())
    image, text = image_text_graphs(ms_model.config.model)
    m = ms_model.config.model
    for graph in (image, text):
        loaded, source = MindirGraph(mindir_dir / f"{graph.name}.mindir", graph), tower_runner(ms_model, graph)
        for batch, length in ((1, 4), (7, 32)):
            feeds = (image_inputs(m, batch, seed=30 + batch) if graph is image
                     else text_inputs(m, batch, length, seed=40 + batch))
            (name,) = graph.output_names
            actual, expected = loaded.run(feeds)[name], source(feeds)[name]
            assert actual.shape == (batch, 32)
            np.testing.assert_allclose(actual, expected, atol=TOLERANCE, rtol=0, err_msg=f"{graph.name} {batch}")


def test_validation_catches_a_corrupted_tower(onnx_dir, torch_model, tmp_path):
    import onnx
    from onnx import numpy_helper

    graph_file = onnx.load(str(onnx_dir / "text_encoder.onnx"))
    # fc1 of a text layer: [hidden 32, ffn 128] once transposed for MatMul.
    matrices = [t for t in graph_file.graph.initializer if list(t.dims) == [32, 128]]
    assert matrices, "no text fc1 weight found"
    weight = numpy_helper.to_array(matrices[0]).copy()
    weight[3, 7] += 0.5
    matrices[0].CopyFrom(numpy_helper.from_array(weight, matrices[0].name))
    onnx.save(graph_file, str(tmp_path / "text_encoder.onnx"))
    from export.runtime import OnnxGraph

    _, text = image_text_graphs(torch_model.config.model)
    run_source = tower_runner(torch_model, text)
    validate_against_source(OnnxGraph(onnx_dir / "text_encoder.onnx").run, run_source,
                            torch_model.config.model, "good", graph=text)
    with pytest.raises(ExportValidationError, match=r"corrupted does not match its source: text_embeds differs by "
                                                    r"[0-9.e+-]+ \(tolerance 0.0001\) at batch 1, sequence 7"):
        validate_against_source(OnnxGraph(tmp_path / "text_encoder.onnx").run, run_source,
                                torch_model.config.model, "corrupted", graph=text)


def test_corrupted_model_dir_and_int8_are_refused(clip_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(clip_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])                      # truncated
    out = tmp_path / "out"
    assert cli_main(["export", str(broken), "--format", "onnx", "--out", str(out)]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    # Quantization is not implemented for towers: refused up front, not skipped quietly.
    assert cli_main(["export", str(clip_dir), "--format", "onnx", "--out", str(out), "--quantize", "int8"]) == 2
    assert ("--quantize int8 is not implemented for image-text models (clip)"
            in capsys.readouterr().err)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_runtime_errors(onnx_dir, tmp_path, capsys):
    encoder = OnnxImageTextEncoder(onnx_dir)
    with pytest.raises(ValueError, match=r"pixel_values must be \[batch, 3, 32, 32\], got shape \(2, 3, 16, 16\)"):
        encoder.image_features(np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(ValueError, match="token id 5000 is out of range for vocab_size 4096"):
        encoder.text_features(np.array([[2, 5000, 3]]), np.ones((1, 3), np.int64))
    with pytest.raises(ValueError, match="text length 40 exceeds the context max_position_embeddings 32"):
        encoder.text_features(np.full((1, 40), 5), np.ones((1, 40), np.int64))
    with pytest.raises(ValueError, match="right-padded"):
        encoder.text_features(np.array([[0, 2, 5, 3]]), np.array([[0, 1, 1, 1]]))
    with pytest.raises(TypeError, match="embed_texts takes a list of texts, not one str"):
        encoder.embed_texts("中国")
    assert encoder.embed_texts([]).shape == (0, 32)
    with pytest.raises(ValueError, match="caption 1 is empty"):
        encoder.embed_texts(["中国", " "])
    # A GPT-style use of a towers export, and a towers-style use of something else.
    assert cli_main(["generate", str(onnx_dir), "--backend", "onnx", "--prompt", "中国"]) == 2
    assert "is an image-text export (image_encoder.onnx, text_encoder.onnx)" in capsys.readouterr().err
    info = json.loads((onnx_dir / "export_info.json").read_text())
    (tmp_path / "export_info.json").write_text(json.dumps({**info, "task": "language_model"}))
    with pytest.raises(ValueError, match="is not an image-text ONNX export"):
        OnnxImageTextEncoder(tmp_path)


def test_embedding_runs_with_torch_and_mindspore_blocked(onnx_dir):
    encoder = OnnxImageTextEncoder(onnx_dir)
    expected_texts, expected_images = encoder.embed_texts(TEXTS), encoder.embed_images(_images())
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys
        BLOCKED = ("torch", "mindspore", "transformers", "pydantic", "yaml", "safetensors")
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked: {{name}}")
        sys.meta_path.insert(0, Block())
        import numpy as np
        from export import OnnxImageTextEncoder
        from taichu.imagetext import draw_scene, make_scene
        encoder = OnnxImageTextEncoder({str(onnx_dir)!r}, threads=1)
        texts, images = encoder.embed_texts({TEXTS!r}), encoder.embed_images({IMAGES})
        assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
        print(json.dumps({{"texts": texts.tolist(), "images": images.tolist()}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    # One thread there, the default here: other kernels, the rounding of each tower's chain.
    image_tol, text_tol = clip_embedding_tolerances(load_config(onnx_dir / "config.yaml").model)
    np.testing.assert_allclose(np.array(result["texts"], np.float32), expected_texts, atol=text_tol, rtol=0)
    np.testing.assert_allclose(np.array(result["images"], np.float32), expected_images, atol=image_tol, rtol=0)


@pytest.mark.parametrize("fmt", ["onnx", "mindir"])
def test_brivl_towers_export_and_match_both_backends(tmp_path, tiny_tokenizer, fmt):
    """BriVL exports through the same path: each tower validated against its source at two
    batch sizes by `taichu export`, then ONNX / MINDIR embeddings at batch 1 and 6 equal
    PyTorch's and MindSpore's (BriVL's features are already unit vectors)."""
    import mindspore as ms
    import torch

    config = load_config(CONFIGS / "brivl" / "brivl-tiny.yaml")
    torch.manual_seed(1)
    model_dir = taichu.save_model(taichu.build_model(config, "torch"), tmp_path / "brivl",
                                  tokenizer=tiny_tokenizer)
    out = tmp_path / fmt
    done = _run_cli("export", model_dir, "--format", fmt, "--out", out)
    assert done.returncode == 0, done.stderr
    assert f"validated image_encoder.{fmt}" in done.stdout and f"validated text_encoder.{fmt}" in done.stdout
    if fmt == "onnx":
        # Hugging Face has no BriVL: no config.json, and export_info.json says why; the
        # tokenizer files are written all the same.
        assert not (out / "config.json").exists()
        hf = json.loads((out / "export_info.json").read_text())["huggingface"]
        assert hf["config"] is None and "no brivl architecture" in hf["note"]
        assert hf["tokenizer_files"] == HF_TOKENIZER_FILES
        assert all((out / name).is_file() for name in HF_TOKENIZER_FILES)
    models = {backend: taichu.load_model(model_dir, backend=backend) for backend in ("torch", "mindspore")}
    image, text = image_text_graphs(config.model)
    m = config.model
    for batch, length in ((1, 5), (6, 32)):
        feeds = {"image_encoder": image_inputs(m, batch, seed=batch),
                 "text_encoder": text_inputs(m, batch, length, seed=50 + batch)}
        if fmt == "onnx":
            encoder = OnnxImageTextEncoder(out, threads=1)
            actual = {"image_encoder": encoder.image_features(feeds["image_encoder"]["pixel_values"]),
                      "text_encoder": encoder.text_features(feeds["text_encoder"]["input_ids"],
                                                            feeds["text_encoder"]["attention_mask"])}
        else:
            actual = {g.name: MindirGraph(out / f"{g.name}.mindir", g).run(feeds[g.name])[g.output_names[0]]
                      for g in (image, text)}
        for graph in (image, text):
            (name,) = graph.output_names
            assert actual[graph.name].shape == (batch, m.embed_dim)
            for backend, model in models.items():
                expected = tower_runner(model, graph)(feeds[graph.name])[name]
                np.testing.assert_allclose(actual[graph.name], expected, atol=TOLERANCE, rtol=0,
                                           err_msg=f"{fmt} {graph.name} batch {batch} vs {backend}")


def test_mindir_embeddings_run_on_mindspore_alone(mindir_dir, clip_dir, tmp_path):
    """`taichu embed/search/eval EXPORT --backend mindir` (export.MindirImageTextEncoder):
    the MINDIR towers in nn.GraphCell, no model code imported, the model's embeddings."""
    from taichu.retrieval import Embedder

    source = Embedder(clip_dir, "mindspore")
    expected = {"texts": source.embed_texts(TEXTS), "images": source.embed_images(_images())}
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from taichu.imagetext import draw_scene, make_scene
        from export.runtime_encoders import export_embedder
        embedder = export_embedder({str(mindir_dir)!r}, "mindir")
        out = {{"texts": embedder.embed_texts({TEXTS!r}).tolist(), "images": embedder.embed_images({IMAGES}).tolist()}}
        out["loaded"] = [m for m in sys.modules if m.split(".")[0] in ("mindspore_impl", "torch_impl", "torch")]
        print(json.dumps(out))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    for what in ("texts", "images"):
        np.testing.assert_allclose(np.array(result[what]), expected[what], atol=1e-5, rtol=0, err_msg=what)
    (tmp_path / "captions.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    done = _run_cli("embed", mindir_dir, "--backend", "mindir", "--texts", tmp_path / "captions.txt",
                    "--out", tmp_path / "emb.npy")
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(np.load(tmp_path / "emb.npy"), expected["texts"], atol=1e-5, rtol=0)

"""Tri-modal export: the image, text and speech towers as ONNX (from torch_impl, torch.onnx's
dynamo exporter) and MINDIR (from mindspore_impl) graphs, each checked against its source
model at shapes of the test's own (two batch sizes, two audio lengths, right-padded audio
rows), the folder's config and tokenizer files, and the towers run by export.runtime_encoders'
encoder with the runtime alone (no torch, no model code)."""
import importlib.util
import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import taichu
from export.exporter import export_model
from export.runtime_encoders import OnnxImageTextEncoder
from export.signature_encoders import image_inputs, speech_inputs, text_inputs, trimodal_graphs
from export.validate import tower_runner
from taichu.config import load_config
from taichu.imagetext import caption_texts, digit_texts, scene_texts
from taichu.speech_inputs import receptive_field_of
from taichu.tokenizer import train_tokenizer

from conftest import CONFIGS, export_models

TOLERANCE = 1e-4
# A caption tokenizer trained in a fraction of a second (the session's gpt-tiny tokenizer
# takes half a minute): the text tower gets its vocabulary size.
VOCAB = 330
DIM = 24
HF_TOKENIZER_FILES = ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
TEXTS = ["左边一个紫色的正方形", "手写的数字七", "白色背景的右边有一个红色的圆形"]
# Clips for the embedders (samples; none a multiple of any hop), random noise at 0.1.
CLIP_LENGTHS = (7001, 12345, 3001, 16037)
# Whether mindspore_impl has the family yet (the MINDIR half of this file needs it).
HAS_MINDSPORE_TRIMODAL = importlib.util.find_spec("mindspore_impl.trimodal") is not None


def _shapes(model_config):
    """(batch, text length, audio samples, real samples per row): shapes other than the
    exporter's trace (batch 2 at 5 tokens, 4000 samples) and than its validation (batch 1
    and 5 / 3), every audio row but the first right-padded, each ending mid-hop, one just
    over the receptive field."""
    shortest = receptive_field_of(model_config.speech.conv_kernel, model_config.speech.conv_stride)
    return [(2, 3, 5003, [5003, 1501]), (4, 32, 12347, [12347, 12346, 4000, shortest + 3])]


def _feeds(model_config, batch, length, samples, lengths, seed):
    return {"image_encoder": image_inputs(model_config, batch, seed),
            "text_encoder": text_inputs(model_config, batch, length, seed + 1),
            "speech_encoder": speech_inputs(model_config.speech, batch, samples, seed + 2, lengths)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random trimodal-tiny model directory with a caption tokenizer of VOCAB pieces."""
    import torch

    root = tmp_path_factory.mktemp("trimodal")
    config = load_config(CONFIGS / "trimodal" / "trimodal-tiny.yaml",
                         [f"model.text.vocab_size={VOCAB}", "tokenizer.character_coverage=1.0"])
    tokenizer = root / "tokenizer.model"
    train_tokenizer(caption_texts(scene_texts(300, seed=0), digit_texts()), config.tokenizer, VOCAB, tokenizer)
    torch.manual_seed(0)
    return taichu.save_model(taichu.build_model(config, "torch"), root / "model", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def exports(model_dir, tmp_path_factory):
    """{format: (export directory, export_info, log lines)}: ONNX here while `taichu export
    --format mindir` runs in a process of its own (when mindspore_impl has the family)."""
    done = export_models({"tri": model_dir}, tmp_path_factory.mktemp("export"),
                         mindir=("tri",) if HAS_MINDSPORE_TRIMODAL else ())
    return {fmt: value for (_, fmt), value in done.items()}


@pytest.fixture(scope="module")
def torch_model(model_dir):
    return taichu.load_model(model_dir, backend="torch")


def _clips():
    rng = np.random.default_rng(7)
    return [rng.standard_normal(n).astype(np.float32) * 0.1 for n in CLIP_LENGTHS]


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """(clips file, {"texts", "audio"}: taichu.retrieval.Embedder's unit vectors with the torch
    model), what the export embedders must give."""
    from taichu.retrieval import Embedder

    clips = _clips()
    path = tmp_path_factory.mktemp("clips") / "clips.npz"
    np.savez(path, *clips)
    embedder = Embedder(model_dir, "torch", batch_size=2)
    return path, {"texts": embedder.embed_texts(TEXTS), "audio": embedder.embed_audio(clips)}


# ----------------------------------------------------------------------------- the folder

def test_onnx_export_folder_and_info(exports, model_dir):
    import onnx

    directory, info, lines = exports["onnx"]
    for name in ("image_encoder", "text_encoder", "speech_encoder"):
        assert any(line.startswith(f"validated {name}.onnx against torch_impl") for line in lines), lines
    assert sorted(p.name for p in directory.iterdir()) == sorted([
        "config.yaml", "export_info.json", "image_encoder.onnx", "speech_encoder.onnx", "text_encoder.onnx",
        "tokenizer.model", *HF_TOKENIZER_FILES])
    assert (directory / "config.yaml").read_bytes() == (model_dir / "config.yaml").read_bytes()
    assert (directory / "tokenizer.model").read_bytes() == (model_dir / "tokenizer.model").read_bytes()
    assert sorted(info["files"]) == sorted(p.name for p in directory.iterdir())
    assert (info["format"], info["family"], info["task"], info["opset"]) == ("onnx", "trimodal", "trimodal", 18)
    # Hugging Face has no tri-modal architecture: no config.json, its tokenizer files all the same.
    hf = info["huggingface"]
    assert hf["config"] is None and "no trimodal architecture" in hf["note"]
    assert hf["tokenizer_files"] == HF_TOKENIZER_FILES and "tokenizer_error" not in hf
    assert len(json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"]) == VOCAB

    graphs = {g["name"]: g for g in info["graphs"]}
    assert list(graphs) == ["image_encoder", "text_encoder", "speech_encoder"]
    assert [g["file"] for g in graphs.values()] == ["image_encoder.onnx", "text_encoder.onnx", "speech_encoder.onnx"]
    assert graphs["image_encoder"]["inputs"] == [
        {"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 32, 32]}]
    assert graphs["text_encoder"]["inputs"] == [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]}]
    assert graphs["speech_encoder"]["inputs"] == [
        {"name": "input_values", "dtype": "float32", "shape": ["batch", "samples"]},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "samples"]}]
    for name, output in (("image_encoder", "image_embeds"), ("text_encoder", "text_embeds"),
                         ("speech_encoder", "speech_embeds")):
        assert graphs[name]["outputs"] == [{"name": output, "dtype": "float32", "shape": ["batch", DIM]}]
        validation = graphs[name]["validation"]
        assert validation["passed"] and len(validation["shapes"]) == 2
        assert all(s["max_difference"] <= TOLERANCE for s in validation["shapes"])
    speech = graphs["speech_encoder"]["validation"]["shapes"]
    assert [(s["batch"], s["samples"]) for s in speech] == [(1, 16000), (3, 24000)]
    assert len(set(speech[1]["real_samples"])) == 3 and max(speech[1]["real_samples"]) == 24000
    # The saved graphs name their dynamic axes; no exporter symbol (s0, s1) is left.
    for name, axes in (("image_encoder", {"batch"}), ("text_encoder", {"batch", "sequence"}),
                       ("speech_encoder", {"batch", "samples"})):
        saved = onnx.load(str(directory / f"{name}.onnx")).graph
        named = {d.dim_param for v in list(saved.input) + list(saved.output) for d in v.type.tensor_type.shape.dim
                 if d.dim_param}
        assert named == axes, (name, named)
        symbols = {d.dim_param for v in list(saved.value_info) for d in v.type.tensor_type.shape.dim if d.dim_param}
        assert not [s for s in symbols if re.search(r"\bs\d+\b", s)], (name, symbols)


def test_int8_is_refused(model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"--quantize int8 is not implemented for tri-modal models \(trimodal\)"):
        export_model(model_dir, "onnx", tmp_path / "int8", quantize="int8")
    assert not (tmp_path / "int8").exists()


# ----------------------------------------------------------------------------- numbers

def test_onnx_towers_match_torch_at_two_shapes(exports, torch_model):
    """Every tower through the runtime's encoder (image_features, text_features,
    speech_features) against the torch model's get_*_features, at two shapes."""
    encoder = OnnxImageTextEncoder(exports["onnx"][0], threads=2)
    assert encoder.has_speech and (encoder.embed_dim, encoder.image_size, encoder.context_length) == (DIM, 32, 32)
    m = torch_model.config.model
    runners = {g.name: (g, tower_runner(torch_model, g)) for g in trimodal_graphs(m)}
    methods = {"image_encoder": encoder.image_features, "text_encoder": encoder.text_features,
               "speech_encoder": encoder.speech_features}
    for seed, (batch, length, samples, lengths) in enumerate(_shapes(m)):
        feeds = _feeds(m, batch, length, samples, lengths, 10 * seed)
        assert feeds["speech_encoder"]["attention_mask"].sum(axis=1).tolist() == lengths
        for name, (graph, run_source) in runners.items():
            (output,) = graph.output_names
            actual = methods[name](*(feeds[name][n] for n in graph.input_names))
            expected = run_source(feeds[name])[output]
            assert actual.shape == (batch, DIM) and actual.dtype == np.float32
            np.testing.assert_allclose(actual, expected, atol=TOLERANCE, rtol=0, err_msg=f"{name} batch {batch}")
            # The comparison says something: rows differ by far more than the tolerance.
            apart = np.abs(expected[:, None] - expected[None]).max(axis=2)
            assert apart[np.triu_indices(batch, 1)].min() > 10 * TOLERANCE, name


def test_onnx_speech_tower_is_padding_invariant(exports, torch_model):
    """A clip alone and in a batch padded to a longer clip: the same speech embedding."""
    encoder = OnnxImageTextEncoder(exports["onnx"][0], threads=2)
    rng = np.random.default_rng(3)
    short, long = rng.standard_normal(7777).astype(np.float32), rng.standard_normal(13001).astype(np.float32)
    alone = encoder.speech_features(short[None])                           # no mask: every sample real
    values, mask = np.zeros((2, len(long)), np.float32), np.zeros((2, len(long)), np.int64)
    values[0], mask[0] = long, 1
    values[1, :len(short)], mask[1, :len(short)] = short, 1
    np.testing.assert_allclose(encoder.speech_features(values, mask)[1], alone[0], atol=1e-5, rtol=0)


def test_runtime_speech_checks_and_image_text_exports(exports, tmp_path):
    directory = exports["onnx"][0]
    encoder = OnnxImageTextEncoder(directory, threads=1)
    values = np.random.default_rng(0).standard_normal((2, 4000)).astype(np.float32)
    mask = np.ones((2, 4000), np.int64)
    shortest = encoder.receptive_field
    assert shortest == receptive_field_of(*(load_config(directory).model.speech.model_dump()[k]
                                            for k in ("conv_kernel", "conv_stride")))
    left, short = mask.copy(), mask.copy()
    left[1, :100] = 0
    short[1, shortest - 1:] = 0
    for args, message in [((values[0], mask[0]), r"must be \[batch, samples\]"),
                          ((values.astype(np.int32), mask), "must be floating point"),
                          ((values, mask[:, :-1]), "must have the shape of input_values"),
                          ((values, left), "row 1 is not right-padded"),
                          ((values, short), f"row 1 has {shortest - 1} real samples; the feature encoder "
                                            f"needs at least {shortest}")]:
        with pytest.raises(ValueError, match=message):
            encoder.speech_features(*args)
    assert encoder.speech_features(values[:0], mask[:0]).shape == (0, DIM)
    # An export without the speech tower (an image-text one) opens, and says it has none.
    info = json.loads((directory / "export_info.json").read_text())
    two = tmp_path / "two"
    two.mkdir()
    for name in ("image_encoder.onnx", "text_encoder.onnx", "tokenizer.model"):
        (two / name).symlink_to(directory / name)
    (two / "export_info.json").write_text(json.dumps(
        {**info, "family": "clip", "task": "image_text", "graphs": info["graphs"][:2]}))
    image_text = OnnxImageTextEncoder(two)
    assert not image_text.has_speech and image_text.speech_encoder is None
    with pytest.raises(ValueError, match="this clip export has no speech tower"):
        image_text.speech_features(values, mask)
    (two / "export_info.json").write_text(json.dumps({**info, "graphs": info["graphs"][:2]}))
    with pytest.raises(ValueError, match="lists no speech_encoder graph"):
        OnnxImageTextEncoder(two)


def _blocked_run(directory, backend, blocked, feeds_file, clips_file=None):
    """Run the export's three towers in a process where ``blocked`` cannot be imported:
    {tower: features, "loaded": the runtime and blocked modules that got imported}; with
    ``clips_file`` also export_embedder's unit vectors of TEXTS and those clips."""
    cls = {"onnx": "OnnxImageTextEncoder", "mindir": "MindirImageTextEncoder"}[backend]
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys
        BLOCKED = {blocked!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked: {{name}}")
        sys.meta_path.insert(0, Block())
        import numpy as np
        from export.runtime_encoders import {cls}
        feeds = np.load({str(feeds_file)!r})
        encoder = {cls}({str(directory)!r})
        out = {{"speech": encoder.speech_features(feeds["input_values"], feeds["audio_mask"]).tolist(),
                "text": encoder.text_features(feeds["input_ids"], feeds["attention_mask"]).tolist(),
                "image": encoder.image_features(feeds["pixel_values"]).tolist(),
                "loaded": []}}
        if {str(clips_file) if clips_file else ""!r}:
            from export.runtime_encoders import export_embedder
            data = np.load({str(clips_file)!r})
            embedder = export_embedder({str(directory)!r}, {backend!r}, batch_size=2)
            out["texts"] = embedder.embed_texts({TEXTS!r}).tolist()
            out["audio"] = embedder.embed_audio([data[f"arr_{{i}}"] for i in range(len(data.files))]).tolist()
        out["loaded"] = sorted({{m.split(".")[0] for m in sys.modules}} & {{"mindspore", "onnxruntime", *BLOCKED}})
        print(json.dumps(out))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _runtime_feeds(model_config, path):
    feeds = _feeds(model_config, 3, 9, 9001, [9001, 6000, 3333], seed=5)
    np.savez(path, pixel_values=feeds["image_encoder"]["pixel_values"], **feeds["text_encoder"],
             input_values=feeds["speech_encoder"]["input_values"],
             audio_mask=feeds["speech_encoder"]["attention_mask"])
    return feeds


def _expected(model, model_config, feeds):
    return {short: tower_runner(model, graph)(feeds[graph.name])[graph.output_names[0]]
            for short, graph in zip(("image", "text", "speech"), trimodal_graphs(model_config))}


def test_onnx_runtime_runs_without_torch_or_model_code(exports, torch_model, tmp_path):
    """OnnxImageTextEncoder on the tri-modal export in a process where torch, mindspore, the
    model code, pydantic and yaml cannot be imported: the torch model's features."""
    m = torch_model.config.model
    expected = _expected(torch_model, m, _runtime_feeds(m, tmp_path / "feeds.npz"))
    blocked = ("torch", "mindspore", "torch_impl", "mindspore_impl", "transformers", "pydantic", "yaml",
               "safetensors")
    result = _blocked_run(exports["onnx"][0], "onnx", blocked, tmp_path / "feeds.npz")
    assert result["loaded"] == ["onnxruntime"]
    for tower, value in expected.items():
        np.testing.assert_allclose(np.array(result[tower], np.float32), value, atol=TOLERANCE, rtol=0, err_msg=tower)


def test_export_embedder_serves_a_trimodal_export(exports, reference):
    """export_embedder(DIR, "onnx"): taichu.retrieval.Embedder over the export, its encoder
    the runtime's (speech_features included): the torch Embedder's unit vectors for
    captions and clips."""
    from export.runtime_encoders import export_embedder

    embedder = export_embedder(exports["onnx"][0], "onnx", batch_size=2)
    assert embedder.dim == DIM and embedder.model.has_speech
    _, expected = reference
    np.testing.assert_allclose(embedder.embed_texts(TEXTS), expected["texts"], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(embedder.embed_audio(_clips()), expected["audio"], atol=TOLERANCE, rtol=0)


# ----------------------------------------------------------------------------- MINDIR

needs_mindspore_trimodal = pytest.mark.skipif(not HAS_MINDSPORE_TRIMODAL,
                                              reason="mindspore_impl/trimodal.py does not exist yet")


@pytest.fixture(scope="module")
def ms_model(model_dir):
    return taichu.load_model(model_dir, backend="mindspore")


@needs_mindspore_trimodal
def test_mindir_towers_match_mindspore_at_two_shapes(exports, ms_model, torch_model):
    from export.mindir_export import MindirGraph

    directory, info, lines = exports["mindir"]
    for name in ("image_encoder", "text_encoder", "speech_encoder"):
        assert any(line.startswith(f"validated {name}.mindir against mindspore_impl") for line in lines), lines
    assert sorted(p.name for p in directory.iterdir()) == [
        "config.yaml", "export_info.json", "image_encoder.mindir", "speech_encoder.mindir", "text_encoder.mindir",
        "tokenizer.model"]
    assert (info["task"], info["source_backend"]) == ("trimodal", "mindspore") and "huggingface" not in info
    graphs = {g["name"]: g for g in info["graphs"]}
    assert [i["dtype"] for i in graphs["text_encoder"]["inputs"]] == ["int32", "int32"]
    assert [i["dtype"] for i in graphs["speech_encoder"]["inputs"]] == ["float32", "int32"]
    assert all(g["validation"]["passed"] for g in graphs.values())
    m = ms_model.config.model
    towers = {graph: MindirGraph(directory / f"{graph.name}.mindir", graph) for graph in trimodal_graphs(m)}
    for seed, (batch, length, samples, lengths) in enumerate(_shapes(m)):
        feeds = _feeds(m, batch, length, samples, lengths, 20 + 10 * seed)
        for graph, loaded in towers.items():
            (output,) = graph.output_names
            actual = loaded.run(feeds[graph.name])[output]
            assert actual.shape == (batch, DIM)
            for source in (ms_model, torch_model):
                expected = tower_runner(source, graph)(feeds[graph.name])[output]
                np.testing.assert_allclose(actual, expected, atol=TOLERANCE, rtol=0,
                                           err_msg=f"{graph.name} batch {batch} vs {type(source).__module__}")


@needs_mindspore_trimodal
def test_mindir_runtime_runs_on_mindspore_alone(exports, ms_model, reference, tmp_path):
    """MindirImageTextEncoder and export_embedder(DIR, "mindir") on the tri-modal export with
    torch and the model code blocked: MindSpore's features, the torch Embedder's vectors."""
    m = ms_model.config.model
    expected = _expected(ms_model, m, _runtime_feeds(m, tmp_path / "feeds.npz"))
    clips_file, vectors = reference
    result = _blocked_run(exports["mindir"][0], "mindir", ("torch", "torch_impl", "mindspore_impl", "transformers"),
                          tmp_path / "feeds.npz", clips_file)
    assert result["loaded"] == ["mindspore"]
    for tower, value in {**expected, **vectors}.items():
        np.testing.assert_allclose(np.array(result[tower], np.float32), value, atol=TOLERANCE, rtol=0, err_msg=tower)

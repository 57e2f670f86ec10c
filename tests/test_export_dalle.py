"""Text-to-image export (issue 17 part 5): a DALL-E as ``prefill`` + ``decode`` graphs with a KV
cache and an image tokenizer (vqvae) as ``decoder`` + ``encoder`` graphs, ONNX from torch_impl
and MINDIR from mindspore_impl; checked here against the source models at shapes of the test's
own (not the exporter's validation shapes), greedy and sampled codes equal to the torch model's
step by step through export.runtime_dalle.dalle_network, images equal to taichu.image_tokens'
decode_codes through export.runtime_dalle.image_decoder_network, refusals."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import taichu
from export.exporter import export_model
from export.runtime import OnnxGenerator
from export.runtime_dalle import DalleCache, dalle_network, image_decoder_network
from export.runtime_encoders import vision_network
from export.signature_dalle import dalle_graphs, dalle_inputs, image_tokenizer_graphs
from taichu.config import load_config
from taichu.generate import SamplingConfig
from taichu.image_tokens import decode_codes, tokenize_images
from taichu.imagetext import draw_scene, make_scene
from taichu.imagine import dalle_step, sample_codes

from conftest import CONFIGS, export_models

TOLERANCE = 1e-4
DALLE = CONFIGS / "dalle" / "dalle-tiny.yaml"      # text 16, grid 4 (16 codes), 32 codes, 2 layers
VQVAE = CONFIGS / "vqvae" / "vqvae-tiny.yaml"      # 16 px, grid 4, 32 codes


def _scaled_difference(actual, expected) -> float:
    """export/validate.py's measure: max |a - e| / max(1, max |e|)."""
    scale = max(1.0, float(np.abs(expected).max()))
    return float(np.abs(np.asarray(actual, np.float64) - expected).max()) / scale


def _captions(batch: int, seed: int) -> np.ndarray:
    """[batch, 16] captions as caption_ids makes them: bos, tokens, eos, pads."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, 16), np.int64)
    for row, n in enumerate(np.linspace(13, 2, batch).round().astype(int)):
        ids[row, 0], ids[row, 1:n + 1], ids[row, n + 1] = 2, rng.integers(4, 4096, n), 3
    return ids


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer):
    """{family: (model directory, torch model)}: tiny models with every weight moved off its
    init (the DALL-E's N(0, 0.02) start gives near-equal logits, whose argmax a 1e-7
    difference could flip; the vqvae's EMA codebook gets distinct vectors). The DALL-E has
    the tiny tokenizer (its vocabulary, 4096), the vqvae none."""
    import torch

    torch.manual_seed(0)
    out = {}
    for name, path in (("dalle", DALLE), ("vqvae", VQVAE)):
        model = taichu.build_model(load_config(path), "torch").eval()
        with torch.no_grad():
            for tensor in list(model.parameters()) + [model.quantizer.codebook] if name == "vqvae" else model.parameters():
                tensor.add_(0.3 * torch.randn_like(tensor))
        tokenizer = tiny_tokenizer if name == "dalle" else None
        out[name] = (taichu.save_model(model, tmp_path_factory.mktemp(name) / "model", tokenizer=tokenizer), model)
    return out


@pytest.fixture(scope="module")
def exports(models, tmp_path_factory):
    """{(family, format): (export directory, export_info, log lines)}: ONNX and MINDIR of both."""
    return export_models({name: model[0] for name, model in models.items()}, tmp_path_factory.mktemp("export"),
                         mindir=tuple(models))


@pytest.fixture(scope="module")
def mindspore_dalle(models):
    model = taichu.load_model(models["dalle"][0], backend="mindspore")
    model.set_train(False)
    return model


def _session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _torch_forward(model, text, codes, past):
    import torch

    with torch.no_grad():
        return model(None if text is None else torch.from_numpy(text),
                     None if codes is None else torch.from_numpy(codes), past, True)


# ----------------------------------------------------------------------------- the folders

def test_dalle_onnx_folder_records_both_graphs_with_named_axes(exports):
    import onnx

    directory, info, lines = exports["dalle", "onnx"]
    assert info["task"] == "text_to_image" and info["family"] == "dalle"
    assert any(line.startswith("validated decode.onnx against torch_impl") for line in lines), lines
    prefill, decode = info["graphs"]
    assert (prefill["name"], prefill["file"], decode["name"], decode["file"]) == (
        "prefill", "prefill.onnx", "decode", "decode.onnx")
    assert [(t["name"], t["dtype"], t["shape"]) for t in prefill["inputs"]] == [("input_ids", "int64", ["batch", 16])]
    assert [(t["name"], t["shape"]) for t in prefill["outputs"][:2]] == [
        ("logits", ["batch", 32]), ("present.0.key", ["batch", 4, 16, 8])]
    expected = [("image_codes", ["batch", "sequence"])] + [
        (f"past_key_values.{i}.{kind}", ["batch", 4, "past_sequence", 8]) for i in range(2) for kind in ("key", "value")]
    expected += [("logits", ["batch", "sequence", 32])] + [
        (f"present.{i}.{kind}", ["batch", 4, "total_sequence", 8]) for i in range(2) for kind in ("key", "value")]
    assert [(t["name"], t["shape"]) for t in decode["inputs"] + decode["outputs"]] == expected
    saved = onnx.load(str(directory / "decode.onnx")).graph
    assert [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in list(saved.input) + list(saved.output)] == expected
    assert [s["batch"] for s in prefill["validation"]["shapes"]] == [1, 3]
    assert [(s["batch"], s["sequence"], s["past"]) for s in decode["validation"]["shapes"]] == [(1, 1, 16), (3, 4, 21)]
    assert all(s["max_difference"] <= TOLERANCE for g in (prefill, decode) for s in g["validation"]["shapes"])
    # The Hugging Face tokenizer files frame a caption as DALL-E reads it: [bos] + text +
    # [eos], right-padded to text_length (no config.json: transformers has no DALL-E).
    assert sorted(info["files"]) == sorted(p.name for p in directory.iterdir()) == [
        "config.yaml", "decode.onnx", "export_info.json", "prefill.onnx", "special_tokens_map.json",
        "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert info["huggingface"]["config"] is None and "no dalle architecture" in info["huggingface"]["note"]
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    assert (tokenizer_config["padding_side"], tokenizer_config["model_max_length"]) == ("right", 16)


def test_vqvae_folders_record_decoder_and_encoder(exports):
    for fmt, ids in (("onnx", "int64"), ("mindir", "int32")):
        directory, info, _ = exports["vqvae", fmt]
        assert info["task"] == "image_tokenizer" and info["format"] == fmt
        decoder, encoder = info["graphs"]
        assert [(t["name"], t["dtype"], t["shape"]) for t in decoder["inputs"] + decoder["outputs"]] == [
            ("codes", ids, ["batch", 4, 4]), ("pixel_values", "float32", ["batch", 3, 16, 16])]
        assert [(t["name"], t["dtype"]) for t in encoder["inputs"] + encoder["outputs"]] == [
            ("pixel_values", "float32"), ("codes", ids)]
        for graph in (decoder, encoder):
            assert graph["file"] == f"{graph['name']}.{fmt}"
            assert [s["batch"] for s in graph["validation"]["shapes"]] == [1, 5]
            assert all(s["max_difference"] <= TOLERANCE for s in graph["validation"]["shapes"])


# ----------------------------------------------------------------------------- numbers

def test_dalle_onnx_matches_torch_at_other_shapes(exports, models):
    """Prefill at batch 2 and 4, decode of 5 codes after 3 and of the last code after 15 at
    batches 2 and 4: none a validation or trace shape."""
    model = models["dalle"][1]
    directory = exports["dalle", "onnx"][0]
    prefill, decode = (_session(directory / f"{name}.onnx") for name in ("prefill", "decode"))
    graph = dalle_graphs(model.config.model)[1]
    for batch, codes, done in ((2, 5, 3), (4, 1, 15)):
        text = _captions(batch, seed=batch)
        logits, *presents = prefill.run(None, {"input_ids": text})
        _, expected, expected_presents = _torch_forward(model, text, None, None)
        assert _scaled_difference(logits, expected[:, -1].numpy()) <= TOLERANCE
        for got, want in zip(presents, [t for kv in expected_presents for t in kv]):
            assert _scaled_difference(got, want.numpy()) <= TOLERANCE
        feeds = dalle_inputs(model.config.model, graph, batch, codes, done, seed=10 + batch)
        outputs = decode.run(None, feeds)
        past = [feeds[n] for n in graph.input_names[1:]]
        import torch

        _, expected, expected_presents = _torch_forward(
            model, None, feeds["image_codes"], tuple((torch.from_numpy(past[2 * i]), torch.from_numpy(past[2 * i + 1]))
                                                     for i in range(2)))
        assert outputs[0].shape == (batch, codes, 32) and outputs[1].shape == (batch, 4, 16 + done + codes, 8)
        assert _scaled_difference(outputs[0], expected.numpy()) <= TOLERANCE
        for got, want in zip(outputs[1:], [t for kv in expected_presents for t in kv]):
            assert _scaled_difference(got, want.numpy()) <= TOLERANCE


def _greedy(step, text, steps):
    """Greedy codes and every step's logits: prefill, then ``steps`` one-code decodes."""
    logits, past = step(text, None, None)
    codes, all_logits = [], [logits]
    for _ in range(steps):
        codes.append(logits.argmax(axis=1))
        logits, past = step(None, codes[-1][:, None], past)
        all_logits.append(logits)
    return np.stack(codes, axis=1), all_logits


@pytest.mark.parametrize("backend", ["onnx", "mindir"])
def test_greedy_codes_equal_the_torch_models_step_by_step(exports, models, mindspore_dalle, backend):
    """Prefill + 16 decode steps (every code of the 4x4 grid fed back, the model's own bound)
    through dalle_network give the torch model's greedy codes and logits; the MindSpore model
    gives them too (three runtimes and both frameworks agree)."""
    text = _captions(3, seed=5)
    network = dalle_network(exports["dalle", backend][0], backend)
    expected_codes, expected_logits = _greedy(dalle_step(models["dalle"][1]), text, 16)
    codes, logits = _greedy(network.step, text, 16)
    assert codes.shape == (3, 16) and len(set(codes.ravel().tolist())) > 4
    np.testing.assert_array_equal(codes, expected_codes)
    assert max(_scaled_difference(a, b) for a, b in zip(logits, expected_logits)) <= TOLERANCE
    assert all(a.dtype == np.float32 and a.shape == (3, 32) for a in logits)
    if backend == "mindir":
        ms_codes, _ = _greedy(dalle_step(mindspore_dalle), text, 16)
        np.testing.assert_array_equal(ms_codes, expected_codes)


@pytest.mark.parametrize("backend", ["onnx", "mindir"])
def test_sampled_codes_and_multi_code_steps_match_torch(exports, models, backend):
    """taichu.imagine.sample_codes with the same seed gives the torch model's codes; a decode
    step of several codes gives the logits of feeding them one by one."""
    network = dalle_network(exports["dalle", backend][0], backend)
    text = _captions(2, seed=6)
    sampling = SamplingConfig(temperature=1.0, top_k=8, seed=3)
    expected = sample_codes(dalle_step(models["dalle"][1]), text, 4, sampling)
    np.testing.assert_array_equal(sample_codes(network.step, text, 4, sampling), expected)
    flat = expected.reshape(2, 16)
    _, past = network.step(text, None, None)
    at_once, cache = network.step(None, flat[:, :6], past)
    assert isinstance(cache, DalleCache) and cache.length == 22
    _, one_by_one = network.step(text, None, None)
    for k in range(6):
        single, one_by_one = network.step(None, flat[:, k:k + 1], one_by_one)
    assert _scaled_difference(at_once, single) <= TOLERANCE


def test_mindir_dalle_decode_matches_mindspore_at_another_slot(exports, mindspore_dalle):
    """decode.mindir writes one code at slot 16 + 9 of a 28-slot cache: the logits of the
    MindSpore model's forward over the first 25 slots, the new key and value at slot 25 and
    the other slots untouched."""
    import mindspore as ms

    from export.mindir_export import MindirGraph

    directory, info, lines = exports["dalle", "mindir"]
    assert any(line.startswith("validated decode.mindir against mindspore_impl") for line in lines), lines
    prefill, decode = info["graphs"]
    assert [(t["name"], t["dtype"], t["shape"]) for t in decode["inputs"][:3]] == [
        ("image_codes", "int32", ["batch", 1]), ("write_position", "int32", []),
        ("past_key_values.0.key", "float32", ["batch", 4, "cache_sequence", 8])]
    assert [s["write_position"] for s in decode["validation"]["shapes"]] == [16, 21]
    graph = dalle_graphs(mindspore_dalle.config.model, static=True)[1]
    feeds = dalle_inputs(mindspore_dalle.config.model, graph, 2, 1, 9, seed=4, cache=28)
    outputs = MindirGraph(directory / "decode.mindir", graph).run(feeds)
    past = tuple((ms.Tensor(feeds[f"past_key_values.{i}.key"][:, :, :25]),
                  ms.Tensor(feeds[f"past_key_values.{i}.value"][:, :, :25])) for i in range(2))
    _, logits, presents = mindspore_dalle(None, ms.Tensor(feeds["image_codes"].astype(np.int32)), past, True)
    assert _scaled_difference(outputs["logits"], logits[:, -1].asnumpy()) <= TOLERANCE
    key = outputs["present.1.key"]
    assert key.shape == (2, 4, 28, 8)
    assert _scaled_difference(key[:, :, :26], presents[1][0].asnumpy()) <= TOLERANCE
    np.testing.assert_array_equal(key[:, :, 26:], feeds["past_key_values.1.key"][:, :, 26:])


@pytest.mark.parametrize("backend", ["onnx", "mindir"])
def test_image_decoder_gives_decode_codes_images(exports, models, backend):
    """The exported decoder's images are taichu.image_tokens.decode_codes' (torch), pixel for
    pixel, except where the torch pixel lies within 1e-3 of a level's .5: the graph's float32
    pixels differ from torch's by ~1e-7 relative (other kernels, other summation order), which
    at a few hundred levels is ~1e-4 of a level, enough to round the other way there and
    nowhere else (denormalise is shared: the same float64 arithmetic and np.rint). The encoder
    gives tokenize_images' codes of real scenes."""
    import torch

    network = image_decoder_network(exports["vqvae", backend][0], backend)
    codes = np.random.default_rng(2).integers(0, 32, (70, 4, 4))      # more than one graph batch (64)
    images = network.decode(codes.astype(np.int32))
    expected = decode_codes(models["vqvae"][0], codes)
    assert images.dtype == np.uint8 and images.shape == (70, 16, 16, 3)
    differ = images != expected
    assert np.abs(images.astype(int) - expected).max() <= 1 and differ.mean() < 1e-3
    model = models["vqvae"][1]
    with torch.no_grad():
        pixels = model.decode(torch.from_numpy(codes)).numpy().astype(np.float64).transpose(0, 2, 3, 1)
    levels = (pixels * np.asarray(model.config.model.pixel_std) + np.asarray(model.config.model.pixel_mean)) * 255.0
    assert np.all(np.abs(levels[differ] % 1.0 - 0.5) < 1e-3), levels[differ]
    assert network.decode(codes[:0]).shape == (0, 16, 16, 3)
    scenes = [draw_scene(make_scene(i, 2), 32) for i in range(3)]
    from taichu.images import normalise, crop_and_resize

    model = models["vqvae"][1]
    pixels = normalise(np.stack([crop_and_resize(s, 16) for s in scenes]), model.config.model.pixel_mean,
                       model.config.model.pixel_std)
    np.testing.assert_array_equal(network.encode(pixels), tokenize_images(models["vqvae"][0], scenes))


def test_onnx_runtimes_need_no_framework(exports, models):
    """dalle_network and image_decoder_network in a process where torch, mindspore, the model
    code, pydantic and yaml cannot be imported: numpy + onnxruntime only."""
    text = _captions(2, seed=8)
    expected = sample_codes(dalle_step(models["dalle"][1]), text, 4, SamplingConfig(temperature=0))
    images = decode_codes(models["vqvae"][0], expected)
    blocked = ("torch", "torch_impl", "mindspore", "mindspore_impl", "pydantic", "yaml")
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys
        import numpy as np
        BLOCKED = {blocked!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked: {{name}}")
        sys.meta_path.insert(0, Block())
        from export.runtime_dalle import dalle_network, image_decoder_network
        from taichu.generate import SamplingConfig
        from taichu.imagine import sample_codes
        step = dalle_network({str(exports["dalle", "onnx"][0])!r}).step
        codes = sample_codes(step, np.array({text.tolist()!r}), 4, SamplingConfig(temperature=0))
        images = image_decoder_network({str(exports["vqvae", "onnx"][0])!r}).decode(codes)
        print(json.dumps([codes.tolist(), images.tolist()]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    codes, pixels = json.loads(done.stdout.strip().splitlines()[-1])
    np.testing.assert_array_equal(np.array(codes), expected)
    np.testing.assert_array_equal(np.array(pixels, np.uint8), images)


# ----------------------------------------------------------------------------- refusals

def test_dalle_network_checks_its_inputs(exports):
    network = dalle_network(exports["dalle", "onnx"][0], "onnx")
    other = dalle_network(exports["dalle", "onnx"][0], "onnx")
    text = _captions(2, seed=9)
    _, past = network.step(text, None, None)
    for args, message in [
        ((text[:, :12], None, None), r"text_ids must be \[batch, text_length = 16\].* got shape \(2, 12\)"),
        ((text[:0], None, None), r"with batch >= 1"),
        ((text.astype(np.float32), None, None), r"text_ids must be an integer numpy array"),
        ((np.full((1, 16), 4096), None, None), r"token id 4096 is out of range for vocab_size 4096"),
        ((text, np.zeros((2, 1), np.int64), None), r"prefill takes text_ids alone"),
        ((None, None, past), r"give text_ids \(prefill\) or codes"),
        ((None, np.zeros((2, 1), np.int64), None), r"past must be the cache a previous step of this network"),
        ((None, np.zeros((2, 1), np.int64), other.step(text, None, None)[1]), r"of this network returned"),
        ((None, np.zeros((3, 1), np.int64), past), r"codes has batch 3, the cache 2"),
        ((None, np.full((2, 1), 32), past), r"image code 32 is out of range for codebook_size 32"),
        ((None, np.full((2, 1), -1), past), r"image code -1 is out of range"),
        ((None, np.zeros((2, 17), np.int64), past), r"image codes 0..16 exceed the 4x4 grid \(16 codes\)"),
        ((None, np.zeros((2, 0), np.int64), past), r"at least one code"),
        ((None, [[1, 2]], past), r"codes must be an integer numpy array"),
    ]:
        with pytest.raises(ValueError, match=message):
            network.step(*args)
    _, full = network.step(None, np.zeros((2, 16), np.int64), past)     # the whole grid: allowed
    with pytest.raises(ValueError, match=r"image codes 16..16 exceed the 4x4 grid"):
        network.step(None, np.zeros((2, 1), np.int64), full)


def test_image_decoder_checks_its_inputs(exports):
    network = image_decoder_network(exports["vqvae", "onnx"][0], "onnx")
    for bad, message in [(np.zeros((2, 8, 8), np.int64), r"codes must be \[batch, 4, 4\] \(the export's grid is fixed\)"),
                         (np.zeros((4, 4), np.int64), r"got shape \(4, 4\)"),
                         (np.full((1, 4, 4), 32), r"code 32 is out of range for the codebook size 32"),
                         (np.zeros((1, 4, 4), np.float32), r"codes must be an integer numpy array")]:
        with pytest.raises(ValueError, match=message):
            network.decode(bad)
    with pytest.raises(ValueError, match=r"pixel_values must be float32 \[batch, 3, 16, 16\]"):
        network.encode(np.zeros((1, 3, 32, 32), np.float32))


def test_exports_of_other_families_and_formats_are_refused(exports, models, tmp_path):
    dalle_dir, vqvae_dir = exports["dalle", "onnx"][0], exports["vqvae", "onnx"][0]
    with pytest.raises(ValueError, match=r"an export of a vqvae model \(task image_tokenizer\), not of a "
                                         r"text-to-image \(DALL-E\) model: export a DALL-E model directory"):
        dalle_network(vqvae_dir, "onnx")
    with pytest.raises(ValueError, match=r"an export of a dalle model \(task text_to_image\), not of an image "
                                         r"tokenizer \(vqvae\) model"):
        image_decoder_network(dalle_dir, "onnx")
    with pytest.raises(ValueError, match=r"is an ONNX export; --backend mindir runs MINDIR exports"):
        dalle_network(dalle_dir, "mindir")
    with pytest.raises(ValueError, match=r"is a MINDIR export; --backend onnx runs ONNX exports"):
        image_decoder_network(exports["vqvae", "mindir"][0], "onnx")
    with pytest.raises(ValueError, match=r"an export of a dalle model \(task text_to_image\), not of a vision"):
        vision_network(dalle_dir, "onnx")
    with pytest.raises(ValueError, match=r"an export of a dalle model \(task text_to_image\): it has no text decoder"):
        OnnxGenerator(dalle_dir)
    with pytest.raises(ValueError, match="unknown export backend 'torch'"):
        dalle_network(dalle_dir, "torch")
    for name, kind in (("dalle", "text-to-image"), ("vqvae", "image tokenizer")):
        with pytest.raises(ValueError, match=f"--quantize int8 is not implemented for {kind} models \\({name}\\)"):
            export_model(models[name][0], "onnx", tmp_path / "int8", quantize="int8")
    assert not (tmp_path / "int8").exists()


def test_signatures_of_both_formats(models):
    m = models["dalle"][1].config.model
    onnx_decode, mindir_decode = dalle_graphs(m)[1], dalle_graphs(m, static=True)[1]
    assert onnx_decode.dynamic_axes()["image_codes"] == {0: "batch", 1: "sequence"}
    assert mindir_decode.input_names[:2] == ["image_codes", "write_position"]
    assert [g.name for g in image_tokenizer_graphs(models["vqvae"][1].config.model)] == ["decoder", "encoder"]

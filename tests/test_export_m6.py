"""M6 export (issue 20): ONNX from torch_impl (``image_encoder`` + one ``decoder`` over a KV
cache) and MINDIR from mindspore_impl (``prefill`` + ``decode`` / ``decode_codes`` over a
static cache), each validated by the exporter against its source model at two shapes per kind
of call; greedy generation through export.runtime_m6.m6_network equal to the torch model's token
for token and logits within tolerance (a caption of images, text alone from left-padded
prompts, the image codes of captions), the ONNX runtime without torch or the model code, the
step's checks and refusals."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import taichu
from export.exporter import export_model
from export.runtime import OnnxGenerator
from export.runtime_m6 import M6Cache, m6_network
from taichu.config import load_config
from taichu.generate import SamplingConfig, choose_tokens, process_logits

from conftest import CONFIGS, export_models

TOLERANCE = 1e-4
# A caption tokenizer trained in a fraction of a second: the model gets its vocabulary size.
VOCAB = 330
CONFIG = load_config(CONFIGS / "m6" / "m6-tiny.yaml", [f"model.vocab_size={VOCAB}", "tokenizer.character_coverage=1.0"])
# 32 px in 4 patches of 16, 24 text slots, a grid of 4x4 codes of 32 (vqvae-tiny's), 2 layers.
SIZE, PATCHES, TEXT = CONFIG.model.image_size, CONFIG.model.num_patches, CONFIG.model.text_length
CODEBOOK, GRID, CODES = CONFIG.model.codebook_size, CONFIG.model.image_grid, CONFIG.model.num_codes
HEADS, HEAD_DIM, HIDDEN = CONFIG.model.num_heads, CONFIG.model.head_dim, CONFIG.model.hidden_size
PAD, IMAGE, PREFIX, TARGET, CODE = range(5)
BOS, EOS = 2, 3
GREEDY = SamplingConfig(temperature=0.0)


def _scaled_difference(actual, expected) -> float:
    """export/validate.py's measure: max |a - e| / max(1, max |e|)."""
    scale = max(1.0, float(np.abs(expected).max()))
    return float(np.abs(np.asarray(actual, np.float64) - expected).max()) / scale


def _scenarios() -> dict:
    """The three generations, as the first step's inputs and the number of tokens or codes:
    captions of two images ([bos] after the patches), text from three left-padded prompts of
    different lengths (no image), all the codes of two captions right-padded to the text
    length (as training makes them) after the start code."""
    rng = np.random.default_rng(7)
    pixels = rng.standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    caption = {"pixel_values": pixels, "input_ids": np.full((2, 1), BOS, np.int64), "image_codes": None,
               "segment_ids": np.array([[IMAGE] * PATCHES + [PREFIX]] * 2, np.int64), "steps": 9}
    lengths = (3, 8, 5)
    ids = np.zeros((3, 8), np.int64)
    segments = np.full((3, 8), PAD, np.int64)
    for row, n in enumerate(lengths):
        ids[row, 8 - n:] = np.concatenate([[BOS], rng.integers(4, VOCAB, n - 1)])
        segments[row, 8 - n:] = PREFIX
    text = {"pixel_values": None, "input_ids": ids, "image_codes": None, "segment_ids": segments, "steps": 10}
    captions = np.zeros((2, TEXT), np.int64)
    caption_segments = np.full((2, TEXT + 1), PAD, np.int64)
    for row, n in enumerate((9, 14)):
        captions[row, :n + 2] = np.concatenate([[BOS], rng.integers(4, VOCAB, n), [EOS]])
        caption_segments[row, :n + 2] = PREFIX
    caption_segments[:, -1] = CODE
    codes = {"pixel_values": None, "input_ids": captions, "image_codes": np.full((2, 1), CODEBOOK, np.int64),
             "segment_ids": caption_segments, "steps": CODES}
    return {"caption": caption, "text": text, "codes": codes}


def _generate(step, scenario):
    """(tokens or codes [B, steps], the logits of every step): the shared numpy sampler
    (greedy) over ``step``, each chosen token fed back as a TARGET (a code as a CODE)."""
    codes = scenario["image_codes"] is not None
    segments = scenario["segment_ids"]
    logits, past = step(scenario["pixel_values"], scenario["input_ids"], scenario["image_codes"], segments, None)
    rng = np.random.default_rng(0)
    chosen, all_logits, seen = [], [logits], [[] for _ in segments]
    for k in range(scenario["steps"]):
        token = choose_tokens(process_logits(logits, seen, GREEDY), GREEDY, rng).astype(np.int64)
        chosen.append(token)
        if k + 1 == scenario["steps"]:
            break
        segments = np.concatenate([segments, np.full((len(token), 1), CODE if codes else TARGET)], axis=1)
        new = token[:, None]
        logits, past = step(None, None if codes else new, new if codes else None, segments, past)
        all_logits.append(logits)
    return np.stack(chosen, axis=1), all_logits


def _torch_step(model):
    """The step of the torch model's own forward over its growing cache (last position's
    logits: text, or code when the step has codes)."""
    import torch

    def tensor(x):
        return None if x is None else torch.from_numpy(np.ascontiguousarray(x))

    def step(pixel_values, input_ids, image_codes, segment_ids, past):
        with torch.no_grad():
            text, code, past = model(tensor(pixel_values), tensor(input_ids), tensor(segment_ids),
                                     tensor(image_codes), past, True)
        return (text if image_codes is None else code)[:, -1].numpy(), past
    return step


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """m6-tiny with a caption tokenizer of VOCAB pieces and every weight moved off its init
    (N(0, 0.02) gives near-equal logits, whose argmax a 1e-7 difference could flip)."""
    import torch

    from taichu.imagetext import caption_texts, digit_texts, scene_texts
    from taichu.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("m6")
    tokenizer = root / "tokenizer.model"
    train_tokenizer(caption_texts(scene_texts(300, seed=0), digit_texts()), CONFIG.tokenizer, VOCAB, tokenizer)
    torch.manual_seed(0)
    model = taichu.build_model(CONFIG, "torch").eval()
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.add_(0.3 * torch.randn_like(tensor))
    return taichu.save_model(model, root / "model", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def torch_model(model_dir):
    return taichu.load_model(model_dir, backend="torch")


@pytest.fixture(scope="module")
def exports(model_dir, tmp_path_factory):
    """{format: (export directory, export_info, log lines)}: ONNX here while `taichu export
    --format mindir` runs in a process of its own."""
    done = export_models({"m6": model_dir}, tmp_path_factory.mktemp("export"), mindir=("m6",))
    return {fmt: value for (_, fmt), value in done.items()}


@pytest.fixture(scope="module")
def expected(torch_model):
    """{scenario: (tokens, logits)} of the torch model."""
    step = _torch_step(torch_model)
    return {name: _generate(step, scenario) for name, scenario in _scenarios().items()}


# ----------------------------------------------------------------------------- the folders

def test_onnx_folder_records_both_graphs_with_named_axes(exports):
    import onnx

    directory, info, lines = exports["onnx"]
    assert (info["task"], info["family"], info["format"]) == ("m6", "m6", "onnx")
    assert any(line.startswith("validated decoder.onnx against torch_impl") for line in lines), lines
    image, decoder = info["graphs"]
    assert (image["name"], image["file"], decoder["name"], decoder["file"]) == (
        "image_encoder", "image_encoder.onnx", "decoder", "decoder.onnx")
    assert [(t["name"], t["dtype"], t["shape"]) for t in image["inputs"] + image["outputs"]] == [
        ("pixel_values", "float32", ["batch", 3, SIZE, SIZE]), ("patch_embeds", "float32", ["batch", PATCHES, HIDDEN])]
    expected = [("patch_embeds", ["batch", "patches", HIDDEN]), ("input_ids", ["batch", "sequence"]),
                ("image_codes", ["batch", "codes"]), ("segment_ids", ["batch", "total_sequence"])]
    expected += [(f"past_key_values.{i}.{kind}", ["batch", HEADS, "past_sequence", HEAD_DIM])
                 for i in range(2) for kind in ("key", "value")]
    expected += [("logits", ["batch", VOCAB]), ("code_logits", ["batch", CODEBOOK])]
    expected += [(f"present.{i}.{kind}", ["batch", HEADS, "total_sequence", HEAD_DIM])
                 for i in range(2) for kind in ("key", "value")]
    assert [(t["name"], t["shape"]) for t in decoder["inputs"] + decoder["outputs"]] == expected
    saved = onnx.load(str(directory / "decoder.onnx")).graph
    assert [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in list(saved.input) + list(saved.output)] == expected
    assert [s["batch"] for s in image["validation"]["shapes"]] == [1, 5]
    # Prefill with an image (one row without) and a left-padded prompt; a caption and the
    # start code; a text token after an image and 9 text slots; the 4th code.
    shapes = [(s["batch"], s["patches"], s["sequence"], s["codes"], s["past"]) for s in decoder["validation"]["shapes"]]
    assert shapes == [(3, PATCHES, 7, 0, 0), (2, 0, 9, 1, 0), (3, 0, 1, 0, PATCHES + 9), (2, 0, 0, 1, 13)]
    assert all(s["max_difference"] <= TOLERANCE for g in (image, decoder) for s in g["validation"]["shapes"])
    assert sorted(info["files"]) == sorted(p.name for p in directory.iterdir()) == [
        "config.yaml", "decoder.onnx", "export_info.json", "image_encoder.onnx", "special_tokens_map.json",
        "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert info["huggingface"]["config"] is None and "no m6 architecture" in info["huggingface"]["note"]


def test_mindir_folder_records_static_cache_graphs(exports):
    directory, info, lines = exports["mindir"]
    assert (info["task"], info["format"]) == ("m6", "mindir")
    assert any(line.startswith("validated decode_codes.mindir against mindspore_impl") for line in lines), lines
    prefill, decode, decode_codes = info["graphs"]
    assert [g["file"] for g in info["graphs"]] == ["prefill.mindir", "decode.mindir", "decode_codes.mindir"]
    assert [(t["name"], t["dtype"], t["shape"]) for t in prefill["inputs"]] == [
        ("pixel_values", "float32", ["batch", 3, SIZE, SIZE]), ("input_ids", "int32", ["batch", TEXT]),
        ("segment_ids", "int32", ["batch", PATCHES + TEXT])]
    assert [(t["name"], t["shape"]) for t in prefill["outputs"][:2]] == [
        ("logits", ["batch", VOCAB]), ("present.0.key", ["batch", HEADS, PATCHES + TEXT, HEAD_DIM])]
    assert [(t["name"], t["dtype"], t["shape"]) for t in decode_codes["inputs"][:4]] == [
        ("image_codes", "int32", ["batch", 1]), ("segment_ids", "int32", ["batch", "cache_sequence"]),
        ("write_position", "int32", []),
        ("past_key_values.0.key", "float32", ["batch", HEADS, "cache_sequence", HEAD_DIM])]
    assert [t["name"] for t in decode["inputs"][:1] + decode["outputs"][:1] + decode_codes["outputs"][:1]] == [
        "input_ids", "logits", "code_logits"]
    assert [(s["image"], s["prompt"]) for s in prefill["validation"]["shapes"]] == [(True, 7), (False, TEXT)]
    # The first step after a prefill with an image and 7 prompt tokens, in the whole cache
    # (patches + 2 text_length + grid^2 slots); the 4th after 3 in a cache 4 slots longer
    # than the history (the prompt's slots come first: patches + text_length).
    first, later = PATCHES + TEXT, PATCHES + TEXT + 3
    for graph in (decode, decode_codes):
        assert [(s["cache"], s["write_position"]) for s in graph["validation"]["shapes"]] == [
            (PATCHES + 2 * TEXT + CODES, first), (later + 5, later)]
    assert all(s["max_difference"] <= TOLERANCE for g in info["graphs"] for s in g["validation"]["shapes"])
    assert {"config.yaml", "tokenizer.model", "export_info.json"} <= {p.name for p in directory.iterdir()}


# ----------------------------------------------------------------------------- generation

@pytest.mark.parametrize("backend", ["onnx", "mindir"])
def test_greedy_generation_equals_the_torch_models(exports, expected, backend):
    """Captions of images, text from left-padded prompts and text-to-image codes through
    m6_network's step: the torch model's tokens and codes, every step's logits within the
    tolerance, float32 of the right head's width."""
    network = m6_network(exports[backend][0], backend)
    assert (network.text_length, network.codebook_size, network.num_patches) == (TEXT, CODEBOOK, PATCHES)
    assert network.config["model"]["vocab_size"] == VOCAB and network.tokenizer.vocab_size == VOCAB
    for name, scenario in _scenarios().items():
        tokens, logits = _generate(network.step, scenario)
        want_tokens, want_logits = expected[name]
        np.testing.assert_array_equal(tokens, want_tokens, err_msg=name)
        assert max(_scaled_difference(a, b) for a, b in zip(logits, want_logits)) <= TOLERANCE, name
        width = CODEBOOK if name == "codes" else VOCAB
        assert all(a.dtype == np.float32 and a.shape == (len(tokens), width) for a in logits), name
    assert len(set(expected["text"][0].ravel().tolist())) > 3 and len(set(expected["codes"][0].ravel().tolist())) > 1


def test_onnx_runtime_needs_no_framework(exports, expected):
    """m6_network in a process where torch, mindspore, the model code, pydantic and yaml
    cannot be imported: numpy + onnxruntime only; the same greedy tokens as torch's."""
    scenarios = {name: {key: (value.tolist() if isinstance(value, np.ndarray) else value)
                        for key, value in scenario.items()} for name, scenario in _scenarios().items()}
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
        from export.runtime_m6 import m6_network
        step = m6_network({str(exports["onnx"][0])!r}).step
        out = {{}}
        for name, s in json.loads({json.dumps(scenarios)!r}).items():
            arrays = {{k: None if v is None else np.array(v, np.float32 if k == "pixel_values" else np.int64)
                      for k, v in s.items() if k != "steps"}}
            codes = arrays["image_codes"] is not None
            segments = arrays["segment_ids"]
            logits, past = step(arrays["pixel_values"], arrays["input_ids"], arrays["image_codes"], segments, None)
            chosen = []
            for k in range(s["steps"]):
                token = logits.argmax(axis=1)[:, None]
                chosen.append(token[:, 0].tolist())
                segments = np.concatenate([segments, np.full(token.shape, 4 if codes else 3)], axis=1)
                if k + 1 < s["steps"]:
                    logits, past = step(None, None if codes else token, token if codes else None, segments, past)
            out[name] = np.array(chosen).T.tolist()
        print(json.dumps(out))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    tokens = json.loads(done.stdout.strip().splitlines()[-1])
    for name, (want, _) in expected.items():
        np.testing.assert_array_equal(np.array(tokens[name]), want, err_msg=name)


# ----------------------------------------------------------------------------- refusals

def test_m6_network_checks_its_inputs(exports):
    network = m6_network(exports["onnx"][0], "onnx")
    other = m6_network(exports["onnx"][0], "onnx")
    ids = np.array([[BOS, 5], [BOS, 6]], np.int64)
    segments = np.full((2, 2), PREFIX, np.int64)
    pixels = np.zeros((2, 3, SIZE, SIZE), np.float32)
    _, past = network.step(None, ids, None, segments, None)
    assert isinstance(past, M6Cache) and (past.length, past.text, past.codes) == (2, 2, 0)
    step = np.array([[7], [8]], np.int64)
    grown = np.full((2, 3), TARGET, np.int64)
    for args, message in [
        ((None, None, None, segments, None), r"give input_ids and/or image_codes"),
        ((pixels, None, None, np.full((2, PATCHES), IMAGE), None), r"a prefill of pixel_values alone"),
        ((pixels[:, :, :16, :16], ids, None, segments, None), rf"pixel_values must be \[batch, 3, {SIZE}, {SIZE}\]"),
        ((pixels.astype(np.float64), ids, None, segments, None), r"pixel_values must be a float32 numpy array"),
        ((pixels[:1], ids, None, np.full((2, PATCHES + 2), PREFIX), None),
         r"input_ids has batch 2, the other inputs 1"),
        ((None, ids.astype(np.float32), None, segments, None), r"input_ids must be an integer numpy array"),
        ((None, np.full((2, TEXT + 1), 4), None, np.full((2, TEXT + 1), PREFIX), None),
         rf"input_ids must be \[batch, length <= text_length = {TEXT}\]"),
        ((None, np.full((2, 1), VOCAB), None, np.full((2, 1), PREFIX), None),
         rf"token id {VOCAB} is out of range for vocab_size {VOCAB}"),
        ((None, ids, np.full((2, 1), CODEBOOK + 1), np.full((2, 3), PREFIX), None),
         rf"image code {CODEBOOK + 1} is out of range \(valid: 0..{CODEBOOK - 1}, and {CODEBOOK} the start code\)"),
        ((None, ids, np.zeros((2, CODES + 1), np.int64), np.full((2, CODES + 3), PREFIX), None),
         rf"image_codes must be \[batch, n <= {CODES}\]"),
        ((None, ids, None, np.full((2, 3), PREFIX), None),
         r"segment_ids must be \[batch, past \+ positions\] = \[2, 2\]"),
        ((None, ids, None, np.full((2, 2), 5), None), r"segment id 5 is out of range \(0..4: pad, image"),
        ((None, step, None, grown, "cache"), r"past must be the cache a previous step of this network"),
        ((None, step, None, grown, other.step(None, ids, None, segments, None)[1]), r"of this network returned"),
        ((pixels, step, None, grown, past), r"pixel_values with a past"),
        ((None, np.array([[7, 8], [8, 9]]), None, np.full((2, 4), TARGET), past), r"one new position per step"),
        ((None, step, step, np.full((2, 4), TARGET), past), r"one new position per step"),
        ((None, step[:1], None, grown[:1], past), r"the inputs have batch 1, the cache 2"),
        ((None, step, None, segments, past), r"segment_ids must be \[batch, past \+ positions\] = \[2, 3\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            network.step(*args)
    # The text slots: a prompt of text_length - 2 leaves 2 steps; the codes: the whole grid.
    _, full = network.step(None, np.full((1, TEXT - 2), 5), None, np.full((1, TEXT - 2), PREFIX), None)
    for k in range(2):
        _, full = network.step(None, np.full((1, 1), 5), None, np.full((1, TEXT - 1 + k), TARGET), full)
    with pytest.raises(ValueError, match=rf"text slot {TEXT} exceeds the model's text_length {TEXT}"):
        network.step(None, np.full((1, 1), 5), None, np.full((1, TEXT + 1), TARGET), full)
    _, full = network.step(None, ids[:1], np.full((1, 1), CODEBOOK), np.full((1, 3), PREFIX), None)
    for k in range(CODES - 1):
        _, full = network.step(None, None, np.full((1, 1), 3), np.full((1, 4 + k), CODE), full)
    with pytest.raises(ValueError, match=rf"image code slot {CODES} exceeds the {GRID}x{GRID} grid \({CODES} codes\)"):
        network.step(None, None, np.full((1, 1), 3), np.full((1, CODES + 3), CODE), full)


def test_exports_of_other_formats_and_uses_are_refused(exports, model_dir, tmp_path):
    onnx_dir, mindir_dir = exports["onnx"][0], exports["mindir"][0]
    with pytest.raises(ValueError, match=r"is a MINDIR export; --backend onnx runs ONNX exports"):
        m6_network(mindir_dir, "onnx")
    with pytest.raises(ValueError, match=r"is an ONNX export; --backend mindir runs MINDIR exports"):
        m6_network(onnx_dir, "mindir")
    with pytest.raises(ValueError, match="unknown export backend 'torch'"):
        m6_network(onnx_dir, "torch")
    with pytest.raises(ValueError, match=r"is an export of an M6 model: it generates through export.m6_network"):
        OnnxGenerator(onnx_dir)
    with pytest.raises(ValueError, match=r"--quantize int8 is not implemented for M6 models \(m6\)"):
        export_model(model_dir, "onnx", tmp_path / "int8", quantize="int8")
    assert not (tmp_path / "int8").exists()

"""Speech export: a wav2vec2 model's ``encoder`` graph as ONNX (from torch_impl, torch.onnx's
dynamo exporter) and MINDIR (from mindspore_impl), checked here against the source models at
shapes of the test's own, padding-invariant, with Hugging Face's config.json and CTC tokenizer
files in the ONNX folder, and run by taichu.recognition.SpeechRunner through
export.runtime_encoders.speech_network with no model code loaded."""
import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import taichu
from export.exporter import export_model
from export.runtime_encoders import speech_network
from export.signature_encoders import speech_inputs
from taichu.config import ConfigError, load_config
from taichu.families.wav2vec2 import frame_count, receptive_field

from conftest import CONFIGS

TOLERANCE = 1e-4
THREADS = 2
CONFIG_FILES = {"ctc": "wav2vec2-tiny-ctc.yaml", "pretraining": "wav2vec2-tiny.yaml"}
# Clips for SpeechRunner (lengths in samples, none a multiple of the 80-sample hop).
CLIP_LENGTHS = (7001, 12345, 16037, 9999)


def _scaled_difference(actual, expected) -> float:
    """export/validate.py's measure: max |a - e| / max(1, max |e|)."""
    scale = max(1.0, float(np.abs(expected).max()))
    return float(np.abs(actual.astype(np.float64) - expected).max()) / scale


def _clips():
    rng = np.random.default_rng(7)
    return [rng.standard_normal(n).astype(np.float32) * 0.1 for n in CLIP_LENGTHS]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{head: (model directory, torch model)}: random tiny models. The CTC head's weights
    are scaled by 20 so that its logits spread (std ~2) and greedy transcripts are not all
    blanks nor decided by near-ties."""
    import torch

    out = {}
    for head, file in CONFIG_FILES.items():
        torch.manual_seed(0)
        model = taichu.build_model(load_config(CONFIGS / "wav2vec2" / file), "torch").eval()
        if head == "ctc":
            with torch.no_grad():
                model.lm_head.weight.mul_(20.0)
        out[head] = (taichu.save_model(model, tmp_path_factory.mktemp(head) / "model"), model)
    return out


@pytest.fixture(scope="module")
def exports(models, tmp_path_factory):
    """The three exports, started at once: the CTC model's ONNX here, the pretraining model's
    ONNX and the CTC model's MINDIR by `taichu export` in processes of their own (tracing and
    compiling are mostly single-threaded: on two cores this about halves the wait). Output
    goes to files, so that no pipe fills up. {(head, format): export directory, or the
    running process and its log}."""
    root = tmp_path_factory.mktemp("export")
    started = {}
    for head, fmt in (("pretraining", "onnx"), ("ctc", "mindir")):
        target, log = root / f"{head}-{fmt}", root / f"{head}-{fmt}.log"
        with open(log, "w") as out:
            started[head, fmt] = (target, log, subprocess.Popen(
                [sys.executable, "-m", "taichu", "export", str(models[head][0]), "--format", fmt, "--out", str(target)],
                stdout=out, stderr=subprocess.STDOUT, text=True))
    lines = []
    try:
        info = export_model(models["ctc"][0], "onnx", root / "ctc-onnx", log=lines.append)
    except BaseException:
        for _, _, process in started.values():
            process.kill()
        raise
    yield {("ctc", "onnx"): (root / "ctc-onnx", info, lines), **started}
    for _, _, process in started.values():
        process.kill()
        process.wait()


def _finished(job):
    """(export directory, export_info, log lines) of an export, waiting for its process."""
    if len(job) == 3 and isinstance(job[2], subprocess.Popen):
        target, log, process = job
        process.wait(timeout=300)
        output = log.read_text()
        assert process.returncode == 0, output[-3000:]
        return target, json.loads((target / "export_info.json").read_text()), output.splitlines()
    return job


@pytest.fixture(scope="module")
def onnx_exports(exports):
    """{head: (export directory, export_info, log lines)} of the ONNX exports."""
    return {head: _finished(exports[head, "onnx"]) for head in CONFIG_FILES}


@pytest.fixture(scope="module")
def mindir_ctc(exports):
    return _finished(exports["ctc", "mindir"])


def _torch_outputs(model, input_values, attention_mask):
    import torch

    x, m = torch.from_numpy(input_values), torch.from_numpy(attention_mask)
    with torch.no_grad():
        out = {"last_hidden_state": model.encode(x, m)[0].numpy(), "embedding": model.embed(x, m).numpy()}
        if model.head == "ctc":
            out["logits"] = model(x, m).numpy()
    return out


def _session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run_session(session, input_values, attention_mask):
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"input_values": input_values, "attention_mask": attention_mask})))


# ----------------------------------------------------------------------------- the folder

@pytest.mark.parametrize("head", ["ctc", "pretraining"])
def test_onnx_export_records_its_graph_and_names_its_axes(onnx_exports, head):
    import onnx

    directory, info, lines = onnx_exports[head]
    assert info["task"] == "speech" and info["family"] == "wav2vec2" and info["opset"] == 18
    assert any(line.startswith("validated encoder.onnx against torch_impl") for line in lines), lines
    (graph,) = info["graphs"]
    assert graph["name"] == "encoder" and graph["file"] == "encoder.onnx"
    assert [(t["name"], t["dtype"], t["shape"]) for t in graph["inputs"]] == [
        ("input_values", "float32", ["batch", "samples"]), ("attention_mask", "int64", ["batch", "samples"])]
    expected = [("last_hidden_state", ["batch", "frames", 32]), ("embedding", ["batch", 32])]
    if head == "ctc":
        expected.append(("logits", ["batch", "frames", 33]))
    assert [(t["name"], t["shape"]) for t in graph["outputs"]] == expected
    validation = graph["validation"]
    assert validation["passed"] and [(s["batch"], s["samples"]) for s in validation["shapes"]] == [
        (1, 16000), (3, 24000)]
    assert len(set(validation["shapes"][1]["real_samples"])) == 3           # rows of three lengths
    assert all(s["max_difference"] <= TOLERANCE for s in validation["shapes"])
    assert sorted(info["files"]) == sorted(p.name for p in directory.iterdir())
    # The saved graph names its axes; no exporter symbol (s0, s1) is left in it.
    saved = onnx.load(str(directory / "encoder.onnx")).graph
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(saved.input) + list(saved.output)}
    assert shapes == {name: shape for name, shape in
                      [("input_values", ["batch", "samples"]), ("attention_mask", ["batch", "samples"])] + expected}
    symbols = {d.dim_param for v in list(saved.input) + list(saved.output) + list(saved.value_info)
               for d in v.type.tensor_type.shape.dim if d.dim_param}
    assert not [s for s in symbols if re.search(r"\bs\d+\b", s)], symbols


def test_onnx_folder_is_a_hugging_face_folder(onnx_exports, models, tmp_path):
    """config.json (Wav2Vec2ForCTC / Wav2Vec2ForPreTraining by head) and the CTC alphabet as
    Wav2Vec2CTCTokenizer's files; Hugging Face's Wav2Vec2ForCTC built from the folder's
    config.json with our weights gives the ONNX graph's logits."""
    import torch
    from safetensors.torch import load_file
    from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2ForCTC

    from taichu import convert

    directory, info, _ = onnx_exports["ctc"]
    hf = info["huggingface"]
    assert (hf["config"], hf["architecture"], hf["model_type"]) == ("config.json", "Wav2Vec2ForCTC", "wav2vec2")
    assert sorted(hf["tokenizer_files"]) == ["tokenizer_config.json", "vocab.json"]
    config = Wav2Vec2Config.from_pretrained(directory)
    assert config.architectures == ["Wav2Vec2ForCTC"] and config.vocab_size == 33 and config.conv_kernel == [10, 4, 4]
    alphabet = load_config(directory / "config.yaml").model.ctc.alphabet
    tokenizer = Wav2Vec2CTCTokenizer.from_pretrained(directory)
    assert tokenizer.convert_ids_to_tokens([1, 2, 28]) == alphabet[1:3] + alphabet[28:29]
    pretraining = onnx_exports["pretraining"][1]["huggingface"]
    assert pretraining["architecture"] == "Wav2Vec2ForPreTraining" and pretraining["tokenizer_files"] == []
    assert Wav2Vec2Config.from_pretrained(onnx_exports["pretraining"][0]).architectures == ["Wav2Vec2ForPreTraining"]

    convert.convert(models["ctc"][0], tmp_path / "hf", to="hf")
    reference = Wav2Vec2ForCTC(config).eval()
    reference.load_state_dict(load_file(str(tmp_path / "hf" / "model.safetensors")))
    feeds = speech_inputs(models["ctc"][1].config.model, 3, 9001, seed=5, lengths=[9001, 6000, 3333])
    with torch.no_grad():
        expected = reference(torch.from_numpy(feeds["input_values"]),
                             attention_mask=torch.from_numpy(feeds["attention_mask"])).logits.numpy()
    logits = _run_session(_session(directory / "encoder.onnx"), **feeds)["logits"]
    frames = frame_count(models["ctc"][1].config.model, feeds["attention_mask"].sum(axis=1))
    for row, n in enumerate(frames):           # HF's padded frames are its own business
        assert _scaled_difference(logits[row, :n], expected[row, :n]) <= TOLERANCE


# ----------------------------------------------------------------------------- numbers

@pytest.mark.parametrize("head", ["ctc", "pretraining"])
def test_onnx_runtime_matches_torch_at_two_shapes(onnx_exports, models, head):
    """Shapes other than the exporter's (and than its trace): batch 2 at an odd length with
    the second row shorter than a third, batch 4 with four lengths, one just over the
    receptive field."""
    model = models[head][1]
    session = _session(onnx_exports[head][0] / "encoder.onnx")
    shortest = receptive_field(model.config.model)
    for seed, (batch, samples, lengths) in enumerate([(2, 5003, [5003, 1501]),
                                                      (4, 12347, [12347, 12346, 4000, shortest + 3])]):
        feeds = speech_inputs(model.config.model, batch, samples, seed, lengths)
        exported, expected = _run_session(session, **feeds), _torch_outputs(model, **feeds)
        assert sorted(exported) == sorted(expected)
        for name, value in expected.items():
            assert exported[name].shape == value.shape, name
            assert _scaled_difference(exported[name], value) <= TOLERANCE, (name, batch, samples)


def _padding_invariance(run, model_config):
    """A clip alone and in a batch padded to a longer clip: the same logits over its real
    frames and the same embedding (a "layer"-norm feature encoder sees no padding)."""
    rng = np.random.default_rng(3)
    short, long = rng.standard_normal(7777).astype(np.float32), rng.standard_normal(13001).astype(np.float32)
    alone = run(short[None], np.ones((1, len(short)), np.int64))
    values = np.zeros((2, len(long)), np.float32)
    mask = np.zeros((2, len(long)), np.int64)
    values[0], mask[0] = long, 1
    values[1, :len(short)], mask[1, :len(short)] = short, 1
    batched = run(values, mask)
    frames = frame_count(model_config, len(short))
    assert alone["embedding"].shape == (1, model_config.hidden_size)
    assert _scaled_difference(batched["embedding"][1], alone["embedding"][0]) <= 1e-5
    for name in ("logits", "last_hidden_state"):
        if name in alone:
            assert alone[name].shape[1] == frames
            assert _scaled_difference(batched[name][1, :frames], alone[name][0]) <= 1e-5, name


@pytest.mark.parametrize("head", ["ctc", "pretraining"])
def test_onnx_graph_is_padding_invariant(onnx_exports, models, head):
    session = _session(onnx_exports[head][0] / "encoder.onnx")
    _padding_invariance(lambda v, m: _run_session(session, v, m), models[head][1].config.model)


def test_mindir_export_matches_mindspore_and_onnx(mindir_ctc, onnx_exports, models):
    import mindspore as ms

    from export.mindir_export import MindirGraph
    from export.signature_encoders import speech_graph

    directory, info, lines = mindir_ctc
    assert any(line.startswith("validated encoder.mindir against mindspore_impl") for line in lines)
    (graph,) = info["graphs"]
    assert graph["file"] == "encoder.mindir" and graph["inputs"][1]["dtype"] == "int32"
    assert [o["name"] for o in graph["outputs"]] == ["last_hidden_state", "embedding", "logits"]
    assert graph["validation"]["passed"] and len(graph["validation"]["shapes"]) == 2
    assert "huggingface" not in info and sorted(info["files"]) == sorted(p.name for p in directory.iterdir())
    model_config = models["ctc"][1].config.model
    mindir = MindirGraph(directory / "encoder.mindir", speech_graph(model_config))
    source = taichu.load_model(models["ctc"][0], backend="mindspore")
    session = _session(onnx_exports["ctc"][0] / "encoder.onnx")
    feeds = speech_inputs(model_config, 3, 10007, seed=9, lengths=[10007, 7001, 2222])
    exported = mindir.run(feeds)
    values, mask = ms.Tensor(feeds["input_values"]), ms.Tensor(feeds["attention_mask"].astype(np.int32))
    expected = {"logits": source(values, mask).asnumpy(), "embedding": source.embed(values, mask).asnumpy()}
    onnx_outputs = _run_session(session, **feeds)
    for name, value in expected.items():
        assert _scaled_difference(exported[name], value) <= TOLERANCE, name
        assert _scaled_difference(exported[name], onnx_outputs[name]) <= TOLERANCE, name
    _padding_invariance(lambda v, m: mindir.run({"input_values": v, "attention_mask": m}), model_config)


# ----------------------------------------------------------------------------- runtime

@pytest.fixture(scope="module")
def torch_transcripts(models, tmp_path_factory):
    """(clips file, transcripts, embeddings) of SpeechRunner on the torch CTC model."""
    from taichu.recognition import SpeechRunner

    clips = _clips()
    path = tmp_path_factory.mktemp("clips") / "clips.npz"
    np.savez(path, *clips)
    runner = SpeechRunner(models["ctc"][0], "torch")
    texts = runner.transcribe(clips)
    assert len(set(texts)) > 1 and all(texts)       # random weights, but not degenerate
    return path, texts, runner.embed(clips)


@pytest.mark.parametrize("backend", ["onnx", "mindir"])
def test_speech_runner_on_an_export_transcribes_like_torch(backend, torch_transcripts, request):
    """SpeechRunner over speech_network in a process where torch, torch_impl, mindspore_impl
    and transformers cannot be imported, and mindspore neither for ONNX: the transcripts and
    embeddings of backend torch (clips of four lengths, batched with padding)."""
    directory = (request.getfixturevalue("onnx_exports")["ctc"] if backend == "onnx"
                 else request.getfixturevalue("mindir_ctc"))[0]
    clips_file, expected, embeddings = torch_transcripts
    blocked = ("torch", "torch_impl", "mindspore_impl", "transformers") + (("mindspore",) if backend == "onnx" else ())
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys
        BLOCKED = {blocked!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked: {{name}}")
        sys.meta_path.insert(0, Block())
        import numpy as np
        from export.runtime_encoders import speech_network
        from taichu.recognition import SpeechRunner
        data = np.load({str(clips_file)!r})
        clips = [data[f"arr_{{i}}"] for i in range(len(data.files))]
        runner = SpeechRunner({str(directory)!r}, {backend!r}, network=speech_network({str(directory)!r}, {backend!r}))
        print(json.dumps({{"texts": runner.transcribe(clips), "embeddings": runner.embed(clips).tolist(),
                          "loaded": sorted({{m.split(".")[0] for m in sys.modules}} & {{"mindspore", *BLOCKED}})}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] == ([] if backend == "onnx" else ["mindspore"])
    assert result["texts"] == expected
    assert _scaled_difference(np.array(result["embeddings"]), embeddings) <= TOLERANCE


def test_speech_network_checks_inputs_and_refuses_other_exports(onnx_exports, tmp_path):
    directory = onnx_exports["ctc"][0]
    network = speech_network(directory, "onnx")
    assert network.graph.session.get_session_options().intra_op_num_threads == THREADS
    values = np.random.default_rng(0).standard_normal((2, 4000)).astype(np.float32)
    mask = np.ones((2, 4000), np.int64)
    out = network(values, mask)
    assert sorted(out) == ["embedding", "logits"] and out["logits"].shape == (2, frame_count(
        load_config(directory / "config.yaml").model, 4000), 33)
    assert sorted(network.run(values)) == ["embedding", "last_hidden_state", "logits"]   # no mask: all real
    left = mask.copy()
    left[1, :100] = 0
    short = mask.copy()
    short[1, 80:] = 0
    for args, message in [((values.astype(np.float64), mask), "must be a float32 numpy array"),
                          ((values[0], mask[0]), r"must be \[batch, samples\]"),
                          ((values, mask[:, :-1]), "must have the shape of input_values"),
                          ((values, mask.astype(np.float32)), "must hold integers"),
                          ((values, left), "row 1 is not right-padded"),
                          ((values, short), "row 1 has 80 real samples; the feature encoder needs at least 85"),
                          ((values[:0], mask[:0]), "empty batch")]:
        with pytest.raises(ValueError, match=message):
            network(*args)
    with pytest.raises(ValueError, match=r"is an ONNX export; --backend mindir runs MINDIR exports"):
        speech_network(directory, "mindir")
    mindir = tmp_path / "mindir"
    mindir.mkdir()
    (mindir / "export_info.json").write_text(json.dumps({"format": "mindir", "family": "wav2vec2", "task": "speech"}))
    with pytest.raises(ValueError, match=r"is a MINDIR export; --backend onnx runs ONNX exports \(use --backend "
                                         r"mindir\)"):
        speech_network(mindir, "onnx")
    other = tmp_path / "clip-onnx"
    other.mkdir()
    (other / "export_info.json").write_text(json.dumps({"format": "onnx", "family": "clip", "task": "image_text"}))
    with pytest.raises(ValueError, match=r"an export of a clip model \(task image_text\), not of a speech"):
        speech_network(other, "onnx")
    with pytest.raises(ConfigError, match="not an ONNX export"):
        speech_network(tmp_path, "onnx")
    with pytest.raises(ValueError, match="--quantize int8 is not implemented for speech models"):
        export_model(onnx_exports["ctc"][0], "onnx", tmp_path / "int8", quantize="int8")


def test_an_exported_graph_that_fails_to_run_is_rejected():
    """A graph that does not run in its runtime (a MINDIR whose control flow MindSpore cannot
    compile when loaded, say) fails validation, naming the file and the shape."""
    from export.validate import ExportValidationError, validate_cases

    def broken(feeds):
        raise RuntimeError("The actor already exists: Default/Switch-op0\n\n--- C++ Call Stack ---")

    cases = [({"batch": 1, "samples": 16000}, {"input_values": np.zeros((1, 16000), np.float32)})]
    with pytest.raises(ExportValidationError, match=r"encoder.mindir in mindspore.nn.GraphCell failed to run at "
                                                    r"batch 1, samples 16000: RuntimeError: The actor already "
                                                    r"exists: Default/Switch-op0$"):
        validate_cases(broken, lambda feeds: {"embedding": np.zeros((1, 4))}, cases,
                       "encoder.mindir in mindspore.nn.GraphCell")

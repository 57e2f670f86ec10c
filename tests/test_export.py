"""Deployment: ONNX and MINDIR exports are checked against their source, and generation
gives the same tokens on MindSpore, PyTorch and ONNX Runtime."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import taichu
from export.exporter import export_model
from export.runtime import OnnxDecoder, OnnxGenerator
from export.signature import sample_inputs
from export.validate import ExportValidationError, source_runner, validate_against_source
from taichu.generate import SamplingConfig, generate_ids, model_step
from taichu.tokenizer import Tokenizer

PROMPTS = ["中国人民", "今天上午，国务院总理在北京", "经济发展的"]


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "taichu", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def onnx_dir(trained_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "onnx"
    done = _run_cli("export", trained_tiny, "--format", "onnx", "--out", out, "--quantize", "int8")
    assert done.returncode == 0, done.stderr
    assert "validated model.onnx against torch_impl" in done.stdout
    return out


def test_export_info_records_the_signature_and_validation(onnx_dir, trained_tiny):
    info = json.loads((onnx_dir / "export_info.json").read_text())
    assert info["opset"] == 17 and info["source"] == str(trained_tiny.resolve())
    names = [i["name"] for i in info["inputs"]]
    assert names == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key",
                     "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value"]
    assert info["inputs"][3]["shape"] == ["batch", 4, "past_sequence", 16]
    assert [o["name"] for o in info["outputs"]][:2] == ["logits", "present.0.key"]
    validation = info["validation"]
    assert validation["passed"] and len(validation["shapes"]) == 2
    assert {(s["batch"], s["sequence"], s["past"]) for s in validation["shapes"]} == {(2, 7, 0), (3, 2, 5)}
    assert all(s["max_difference"] <= 1e-4 for s in validation["shapes"])
    int8 = info["int8_validation"]
    assert int8["passed"] and int8["text"] == "peoples_daily validation split"
    assert int8["top1_agreement"] >= 0.9 and abs(int8["perplexity_change"]) <= 0.05
    assert sorted(info["files"]) == sorted(p.name for p in onnx_dir.iterdir())
    # The graph has dynamic axes: ONNX Runtime reports them by name.
    decoder = OnnxDecoder(onnx_dir)
    shapes = {i.name: i.shape for i in decoder.session.get_inputs()}
    assert shapes["attention_mask"] == ["batch", "total_sequence"]
    assert shapes["past_key_values.1.value"] == ["batch", 4, "past_sequence", 16]


def test_onnx_matches_torch_at_shapes_other_than_the_validated_ones(onnx_dir, trained_tiny):
    model = taichu.load_model(trained_tiny, backend="torch")
    run_torch, decoder = source_runner(model), OnnxDecoder(onnx_dir)
    for batch, length, past in ((1, 1, 0), (4, 9, 11), (1, 1, 40)):
        feeds = sample_inputs(model.config.model, batch, length, past, seed=5)
        expected, actual = run_torch(feeds), decoder.run(feeds)
        for name in expected:
            np.testing.assert_allclose(actual[name], expected[name], atol=1e-4, rtol=0, err_msg=name)


def test_export_signature_is_the_same_in_both_backends(trained_tiny):
    """DecoderForExport (what ONNX and MINDIR are traced from) mirrors across backends:
    the same logits and the same present key/value per layer, in the same order."""
    runners = [source_runner(taichu.load_model(trained_tiny, backend=b)) for b in ("torch", "mindspore")]
    config = taichu.load_config(trained_tiny).model
    for batch, length, past in ((2, 7, 0), (3, 2, 5)):
        feeds = sample_inputs(config, batch, length, past, seed=11)
        torch_out, ms_out = (run(feeds) for run in runners)
        assert list(torch_out) == list(ms_out)
        for name in torch_out:
            np.testing.assert_allclose(ms_out[name], torch_out[name], atol=1e-5, rtol=0, err_msg=name)
        # present.i.key = [past ; new keys]: the cache passes through unchanged.
        np.testing.assert_array_equal(torch_out["present.1.key"][:, :, :past], feeds["past_key_values.1.key"])


def test_greedy_tokens_equal_on_mindspore_torch_and_onnx_runtime(onnx_dir, trained_tiny):
    tokenizer = Tokenizer(trained_tiny / "tokenizer.model")
    prompts = [tokenizer.encode(p, add_bos=True) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == 3                     # a ragged batch
    # A strong CTRL penalty walks greedy decoding down the ranking of a weak model, where
    # small numerical differences would show first.
    greedy = SamplingConfig(max_new_tokens=16, temperature=0, repetition_penalty=2.0)
    max_positions = taichu.load_config(trained_tiny).model.max_position_embeddings
    steps = {backend: model_step(taichu.load_model(trained_tiny, backend=backend))
             for backend in ("torch", "mindspore")}
    steps["onnx"] = OnnxDecoder(onnx_dir).step
    # eos_id -1: the briefly trained model says eos after a token or two; run on past it so
    # that 16 decoding steps with a growing cache are compared.
    runs = {name: generate_ids(step, prompts, greedy, -1, tokenizer.pad_id, max_positions)
            for name, step in steps.items()}
    assert runs["torch"] == runs["mindspore"] == runs["onnx"]
    assert all(len(set(row)) == 16 for row in runs["torch"])
    # The same through the command line, which prints text.
    outputs = {}
    for backend, model in (("torch", trained_tiny), ("mindspore", trained_tiny), ("onnx", onnx_dir)):
        args = [a for p in PROMPTS for a in ("--prompt", p)]
        done = _run_cli("generate", model, "--backend", backend, *args, "--max-new-tokens", 16,
                        "--temperature", 0, "--repetition-penalty", 2.0)
        assert done.returncode == 0, done.stderr
        outputs[backend] = done.stdout
    assert outputs["torch"] == outputs["mindspore"] == outputs["onnx"]
    until_eos = [row[:row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row for row in runs["onnx"]]
    assert outputs["onnx"].splitlines() == [p + tokenizer.decode(r) for p, r in zip(PROMPTS, until_eos)]


def test_sampling_is_the_same_on_onnx_runtime_and_torch(onnx_dir, trained_tiny):
    tokenizer = Tokenizer(trained_tiny / "tokenizer.model")
    prompts = [tokenizer.encode(p, add_bos=True) for p in PROMPTS]
    sample = SamplingConfig(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=3)
    torch_ids = generate_ids(model_step(taichu.load_model(trained_tiny, backend="torch")), prompts, sample,
                             tokenizer.eos_id, tokenizer.pad_id, 128)
    assert OnnxGenerator(onnx_dir).generate_ids(prompts, sample) == torch_ids


def test_validation_catches_a_corrupted_weight(onnx_dir, trained_tiny, tmp_path):
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_dir / "model.onnx"))
    matrices = [t for t in graph.graph.initializer if len(t.dims) == 2 and t.dims[0] == 64 and t.dims[1] == 256]
    assert matrices, "no fc_in weight found"
    weight = numpy_helper.to_array(matrices[0]).copy()
    weight[3, 7] += 0.5                                          # one number out of 370 K
    matrices[0].CopyFrom(numpy_helper.from_array(weight, matrices[0].name))
    onnx.save(graph, str(tmp_path / "model.onnx"))
    model = taichu.load_model(trained_tiny, backend="torch")
    # The untouched export passes, the corrupted one fails and names a tensor.
    validate_against_source(OnnxDecoder(onnx_dir).run, source_runner(model), model.config.model, "good")
    with pytest.raises(ExportValidationError, match=r"corrupted does not match its source: (logits|present\.\d\.\w+) "
                                                    r"differs by [0-9.e+-]+ \(tolerance 0.0001\) at batch 2"):
        validate_against_source(OnnxDecoder(tmp_path / "model.onnx").run, source_runner(model),
                                model.config.model, "corrupted")


def test_int8_that_loses_accuracy_is_rejected_and_the_previous_export_kept(tiny_config, tmp_path):
    """Per-tensor int8 cannot represent a matrix with one huge outlier: every other weight
    rounds to zero. The int8 check must notice, and a failed export must not replace a good one."""
    import torch

    torch.manual_seed(0)
    model = taichu.build_model(tiny_config, "torch")
    source = taichu.save_model(model, tmp_path / "model")
    out = tmp_path / "exported"
    export_model(source, "onnx", out, log=lambda *_: None)
    before = (out / "model.onnx").read_bytes()
    with torch.no_grad():
        for layer in model.layers:
            layer.mlp.fc_in.weight[0, 0] = 1000.0
            layer.attn.q_proj.weight[0, 0] = 1000.0
    outlier = taichu.save_model(model, tmp_path / "outlier")
    done = _run_cli("export", outlier, "--format", "onnx", "--out", out, "--quantize", "int8")
    assert done.returncode == 1
    assert "validation failed: model_int8.onnx drifts too far from fp32: top-1 agreement" in done.stderr
    assert (out / "model.onnx").read_bytes() == before and not (out / "model_int8.onnx").exists()
    rejected = json.loads((tmp_path / "exported.rejected" / "export_info.json").read_text())
    assert not rejected["int8_validation"]["passed"] and "drifts" in rejected["validation_error"]
    assert not list(tmp_path.glob(".exported.partial-*"))


def test_mindir_export_is_validated_and_runs_at_other_shapes(trained_tiny, tmp_path):
    from export.mindir_export import MindirDecoder

    done = _run_cli("export", trained_tiny, "--format", "mindir", "--out", tmp_path / "mindir")
    assert done.returncode == 0, done.stderr
    assert "validated model.mindir against mindspore_impl" in done.stdout
    info = json.loads((tmp_path / "mindir" / "export_info.json").read_text())
    assert info["validation"]["passed"] and info["inputs"][0]["dtype"] == "int32"
    model = taichu.load_model(trained_tiny, backend="mindspore")
    run_source, graph = source_runner(model), MindirDecoder(tmp_path / "mindir" / "model.mindir")
    for batch, length, past in ((1, 1, 0), (4, 9, 11)):
        feeds = sample_inputs(model.config.model, batch, length, past, seed=9)
        expected, actual = run_source(feeds), graph.run(feeds)
        for name in expected:
            np.testing.assert_allclose(actual[name], expected[name], atol=1e-4, rtol=0, err_msg=name)


def test_large_models_write_external_data_that_runtime_loads(tiny_config, tmp_path):
    import torch

    from export.onnx_export import export_onnx

    torch.manual_seed(1)
    model = taichu.build_model(tiny_config, "torch").eval()
    files = export_onnx(model, tmp_path / "model.onnx", opset=18, external_data_threshold=0)
    assert [f.name for f in files] == ["model.onnx", "model.onnx.data"]
    assert (tmp_path / "model.onnx").stat().st_size < 200_000 < (tmp_path / "model.onnx.data").stat().st_size
    validate_against_source(OnnxDecoder(tmp_path / "model.onnx").run, source_runner(model), tiny_config.model,
                            "external data")


def test_onnx_generator_runs_with_torch_and_mindspore_blocked(onnx_dir, trained_tiny):
    tokenizer = Tokenizer(trained_tiny / "tokenizer.model")
    expected = generate_ids(model_step(taichu.load_model(trained_tiny, backend="torch")),
                            [tokenizer.encode(p, add_bos=True) for p in PROMPTS],
                            SamplingConfig(max_new_tokens=10, temperature=0), tokenizer.eos_id, tokenizer.pad_id, 128)
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys
        BLOCKED = ("torch", "mindspore", "transformers", "pydantic", "yaml", "safetensors")
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked: {{name}}")
        sys.meta_path.insert(0, Block())
        from export import OnnxGenerator
        generator = OnnxGenerator({str(onnx_dir)!r})
        texts = generator.generate({PROMPTS!r}, max_new_tokens=10, temperature=0)
        ids = generator.generate_ids([generator.tokenizer.encode(p, add_bos=True) for p in {PROMPTS!r}],
                                     __import__("taichu.generate").generate.SamplingConfig(10, temperature=0))
        assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
        print(json.dumps({{"texts": texts, "ids": ids}}, ensure_ascii=False))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["ids"] == expected
    assert result["texts"] == [tokenizer.decode(row) for row in expected]


def test_onnx_generation_errors(onnx_dir, tmp_path):
    generator = OnnxGenerator(onnx_dir / "model_int8.onnx")
    assert len(generator.generate(["中国"], max_new_tokens=3, temperature=0)) == 1
    with pytest.raises(ValueError, match="exceeds the model's window of 128 positions"):
        generator.generate(["中国" * 200], max_new_tokens=5)
    with pytest.raises(ValueError, match="token id 99999 is out of range for vocab_size 4096"):
        generator.decoder.step(np.array([[99999]]), np.ones((1, 1), np.int64), None)
    done = _run_cli("generate", tmp_path, "--backend", "onnx", "--prompt", "中国")
    assert done.returncode == 2 and "no ONNX model here" in done.stderr
    done = _run_cli("generate", onnx_dir, "--backend", "torch", "--prompt", "中国")
    assert done.returncode == 2 and "is an ONNX export: use --backend onnx" in done.stderr
    done = _run_cli("export", onnx_dir, "--format", "mindir", "--out", tmp_path / "x", "--quantize", "int8")
    assert done.returncode == 2 and "--quantize int8 applies to ONNX exports only" in done.stderr

"""Deployment: ONNX (torch.onnx's dynamo exporter) and MINDIR exports are checked against
their source, generation gives the same tokens on MindSpore, PyTorch and ONNX Runtime, and an
ONNX export folder serves generation alone (numpy, onnxruntime, sentencepiece)."""
import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import taichu
from export.exporter import export_model
from export.runtime import OnnxDecoder, OnnxGenerator
from export.signature import position_ids, sample_inputs
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
    assert info["opset"] == 18 and info["source"] == str(trained_tiny.resolve())
    assert info["exporter"].startswith("torch.onnx dynamo exporter (dynamo=True")
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
    # The folder is self-contained: Hugging Face's config.json and tokenizer files beside ours.
    hf = info["huggingface"]
    assert (hf["config"], hf["architecture"], hf["model_type"]) == ("config.json", "GPT2LMHeadModel", "gpt2")
    assert {"config.json", "config.yaml", "tokenizer.model", *hf["tokenizer_files"]} <= set(info["files"])
    assert "tokenizer.json" in hf["tokenizer_files"]
    # The graph has dynamic axes: ONNX Runtime reports them by name.
    decoder = OnnxDecoder(onnx_dir)
    shapes = {i.name: i.shape for i in decoder.session.get_inputs()}
    assert shapes["attention_mask"] == ["batch", "total_sequence"]
    assert shapes["past_key_values.1.value"] == ["batch", 4, "past_sequence", 16]


def test_saved_graph_names_its_axes(onnx_dir):
    """The dynamo exporter's own symbols (s0, "s1 + s2") are renamed to the signature's axis
    names in the graph's inputs, outputs and value_info; the int8 graph keeps them."""
    import onnx

    for file in ("model.onnx", "model_int8.onnx"):
        graph = onnx.load(str(onnx_dir / file), load_external_data=False).graph
        shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                  for v in list(graph.input) + list(graph.output)}
        assert shapes["input_ids"] == shapes["position_ids"] == ["batch", "sequence"], file
        assert shapes["attention_mask"] == ["batch", "total_sequence"], file
        assert shapes["past_key_values.0.key"] == ["batch", 4, "past_sequence", 16], file
        assert shapes["logits"] == ["batch", "sequence", 4096], file
        assert shapes["present.1.value"] == ["batch", 4, "total_sequence", 16], file
        symbols = {d.dim_param for v in list(graph.input) + list(graph.output) + list(graph.value_info)
                   for d in v.type.tensor_type.shape.dim if d.dim_param}
        assert {"batch", "sequence", "past_sequence", "total_sequence"} <= symbols, file
        assert not [s for s in symbols if re.search(r"\bs\d+\b", s)], file
    # int8 quantized the blocks' twelve MatMuls (2 layers x q, k, v, out, fc_in, fc_out), not the head.
    int8 = onnx.load(str(onnx_dir / "model_int8.onnx")).graph
    assert sum(n.op_type == "MatMulInteger" for n in int8.node) == 12
    assert [n.op_type for n in int8.node if "logits" in n.output] == ["MatMul"]


def test_name_axes_refuses_a_specialised_axis(tiny_config):
    """A dynamic axis that the exporter turned into a constant (torch.export does that to
    axes traced at size 0 or 1) is an error naming the axis, not a graph that fails later."""
    from onnx import TensorProto, helper

    from export.onnx_export import name_axes
    from export.signature import decoder_graph

    graph = decoder_graph(tiny_config.model)
    # The symbols torch.export would use; the present cache's length is a sum of two.
    symbols = {"batch": "s0", "sequence": "s1", "past_sequence": "s2", "total_sequence": "s2 + s1"}

    def model(input_shape):
        values = [helper.make_tensor_value_info(t.name, TensorProto.INT64 if t.dtype == "int64" else TensorProto.FLOAT,
                                                input_shape if t.name == "input_ids" else
                                                [symbols.get(d, d) for d in t.shape])
                  for t in graph.inputs + graph.outputs]
        n = len(graph.inputs)
        return helper.make_model(helper.make_graph([], "g", values[:n], values[n:], value_info=[
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["s0", "s2 + s1", 64])]))

    renamed = model(["s0", "s1"])
    assert name_axes(renamed, graph) == {v: k for k, v in symbols.items()}
    assert [d.dim_param for d in renamed.graph.output[1].type.tensor_type.shape.dim] == [
        "batch", "", "total_sequence", ""]
    assert [d.dim_param for d in renamed.graph.value_info[0].type.tensor_type.shape.dim][:2] == [
        "batch", "total_sequence"]
    with pytest.raises(ExportValidationError, match=r"the exporter fixed axis 1 \(sequence\) of input_ids to 1: "
                                                    r"it specialised a dynamic axis"):
        name_axes(model(["s0", 1]), graph)
    with pytest.raises(ExportValidationError, match=r"the exporter made sequence and batch one axis \('s0'\)"):
        name_axes(model(["s0", "s0"]), graph)


def test_cached_decoding_matches_torch_step_by_step(onnx_dir, trained_tiny):
    """Prefill with an empty past (a size the exporter must not specialise), then three
    single-token steps that feed the graph's own present back as its past: every step's
    logits and cache equal torch_impl's, at two batch sizes, and the last step's logits equal
    the model's run over the whole sequence without a cache."""
    import torch

    model = taichu.load_model(trained_tiny, backend="torch")
    run_torch, decoder = source_runner(model), OnnxDecoder(onnx_dir)
    config = model.config.model
    for batch, prompt_length in ((1, 5), (3, 9)):
        feeds = sample_inputs(config, batch, prompt_length, 0, seed=batch)
        ids = feeds["input_ids"]
        for step in range(4):
            expected, actual = run_torch(feeds), decoder.run(feeds)
            for name in expected:
                np.testing.assert_allclose(actual[name], expected[name], atol=1e-4, rtol=0,
                                           err_msg=f"{name} batch {batch} step {step}")
            if step == 3:
                break
            next_ids = actual["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
            ids = np.concatenate([ids, next_ids], axis=1)
            mask = np.concatenate([feeds["attention_mask"], np.ones((batch, 1), np.int64)], axis=1)
            feeds = {"input_ids": next_ids, "attention_mask": mask, "position_ids": position_ids(mask, 1),
                     **{n.replace("present", "past_key_values"): v for n, v in actual.items() if n != "logits"}}
        assert feeds["past_key_values.0.key"].shape == (batch, 4, prompt_length + 2, 16)
        with torch.no_grad():
            uncached = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(feeds["attention_mask"]))
        np.testing.assert_allclose(actual["logits"][:, -1], uncached[:, -1].numpy(), atol=1e-4, rtol=0)


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


@pytest.fixture(scope="module")
def mindir_dir(trained_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "mindir"
    done = _run_cli("export", trained_tiny, "--format", "mindir", "--out", out)
    assert done.returncode == 0, done.stderr
    for name in ("model", "prefill", "decode"):
        assert f"validated {name}.mindir against mindspore_impl" in done.stdout
    return out


def test_mindir_export_is_validated_and_runs_at_other_shapes(mindir_dir, trained_tiny):
    from export.mindir_export import MindirDecoder

    info = json.loads((mindir_dir / "export_info.json").read_text())
    assert info["validation"]["passed"] and info["inputs"][0]["dtype"] == "int32"
    graphs = {g["name"]: g for g in info["graphs"]}
    assert sorted(graphs) == ["decode", "prefill"] and all(g["validation"]["passed"] for g in graphs.values())
    assert [i["name"] for i in graphs["decode"]["inputs"][:4]] == ["input_ids", "attention_mask", "write_position",
                                                                   "past_key_values.0.key"]
    assert graphs["decode"]["inputs"][3]["shape"] == ["batch", 4, "cache_sequence", 16]
    model = taichu.load_model(trained_tiny, backend="mindspore")
    run_source, graph = source_runner(model), MindirDecoder(mindir_dir / "model.mindir")
    for batch, length, past in ((1, 1, 0), (4, 9, 11)):
        feeds = sample_inputs(model.config.model, batch, length, past, seed=9)
        expected, actual = run_source(feeds), graph.run(feeds)
        for name in expected:
            np.testing.assert_allclose(actual[name], expected[name], atol=1e-4, rtol=0, err_msg=name)


def test_mindir_generation_runs_on_mindspore_alone_with_the_same_tokens(mindir_dir, trained_tiny):
    """`taichu generate EXPORT --backend mindir`: prefill.mindir and decode.mindir in
    nn.GraphCell, no model code imported, the same greedy tokens as torch_impl."""
    tokenizer = Tokenizer(trained_tiny / "tokenizer.model")
    prompts = [tokenizer.encode(p, add_bos=True) for p in PROMPTS]
    greedy = SamplingConfig(max_new_tokens=16, temperature=0, repetition_penalty=2.0)
    expected = generate_ids(model_step(taichu.load_model(trained_tiny, backend="torch")), prompts, greedy,
                            -1, tokenizer.pad_id, 128)
    # eos_id -1 as in the tests above: generate past the eos the briefly trained model says.
    script = textwrap.dedent(f"""
        import json, sys
        from export import MindirGenerator
        from taichu.generate import SamplingConfig, generate_ids
        generator = MindirGenerator({str(mindir_dir)!r})
        ids = generate_ids(generator.step, {prompts!r}, SamplingConfig(16, temperature=0, repetition_penalty=2.0),
                           -1, {tokenizer.pad_id}, generator.max_positions)
        loaded = [m for m in sys.modules if m.split(".")[0] in ("mindspore_impl", "torch_impl", "torch")]
        print(json.dumps({{"ids": ids, "loaded": loaded}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    assert result["ids"] == expected
    outputs = {}
    for backend, model in (("torch", trained_tiny), ("mindir", mindir_dir)):
        args = [a for p in PROMPTS for a in ("--prompt", p)]
        done = _run_cli("generate", model, "--backend", backend, *args, "--max-new-tokens", 16,
                        "--temperature", 0, "--repetition-penalty", 2.0)
        assert done.returncode == 0, done.stderr
        outputs[backend] = done.stdout
    assert outputs["mindir"] == outputs["torch"]


def test_mindir_generation_errors(mindir_dir, onnx_dir):
    done = _run_cli("generate", mindir_dir, "--backend", "mindspore", "--prompt", "中国")
    assert done.returncode == 2 and "is a MINDIR export: use --backend mindir" in done.stderr
    done = _run_cli("generate", onnx_dir, "--backend", "mindir", "--prompt", "中国")
    assert done.returncode == 2 and "no prefill.mindir or decode.mindir here" in done.stderr


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


def test_opset_below_the_dynamo_exporters_is_refused(tiny_config, tmp_path):
    from export.onnx_export import export_onnx

    model = taichu.build_model(tiny_config, "torch").eval()
    with pytest.raises(ValueError, match=r"opset 17 is too old: taichu exports opset >= 18"):
        export_onnx(model, tmp_path / "model.onnx", opset=17)
    assert not list(tmp_path.iterdir())


# Greedy generation from an export folder with nothing but numpy, onnxruntime and sentencepiece:
# what a deployment without taichu writes. It reads the sizes and special ids from the folder's
# Hugging Face config.json and the tokenizer from tokenizer.model.
STANDALONE_GENERATE = r'''
import importlib.abc, json, sys
BLOCKED = ("taichu", "export", "torch_impl", "mindspore_impl", "torch", "mindspore", "transformers",
           "tokenizers", "yaml", "pydantic", "safetensors")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
from pathlib import Path
import numpy as np, onnxruntime, sentencepiece

folder, max_new_tokens, stop_at_eos = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "eos"
penalty, prompts = float(sys.argv[4]), json.loads(sys.argv[5])
config = json.loads((folder / "config.json").read_text())
tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
outputs = [o.name for o in session.get_outputs()]
heads, head_dim = config["n_head"], config["n_embd"] // config["n_head"]
special = {config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]}
results = []
for prompt in prompts:
    feed = [config["bos_token_id"]] + tokenizer.encode(prompt)
    seen_ids = list(feed)
    past = {f"past_key_values.{i}.{kind}": np.zeros((1, heads, 0, head_dim), np.float32)
            for i in range(config["n_layer"]) for kind in ("key", "value")}
    seen, new = 0, []
    while len(new) < max_new_tokens:
        total = seen + len(feed)
        run = dict(zip(outputs, session.run(None, {
            "input_ids": np.array([feed], np.int64), "attention_mask": np.ones((1, total), np.int64),
            "position_ids": np.arange(seen, total, dtype=np.int64)[None], **past})))
        logits = run["logits"][0, -1].astype(np.float64)
        ids = np.unique(seen_ids)                  # CTRL repetition penalty, as taichu.generate
        logits[ids] = np.where(logits[ids] > 0, logits[ids] / penalty, logits[ids] * penalty)
        token = int(logits.argmax())
        if stop_at_eos and token == config["eos_token_id"]:
            break
        new.append(token)
        seen_ids.append(token)
        past = {name.replace("present", "past_key_values"): run[name] for name in outputs[1:]}
        seen, feed = total, [token]
    results.append({"ids": new, "text": prompt + tokenizer.decode([i for i in new if i not in special])})
assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
print(json.dumps(results, ensure_ascii=False))
'''


def test_export_folder_alone_generates_what_taichu_generates(onnx_dir, trained_tiny, tmp_path):
    """Copied elsewhere, the folder alone runs greedy generation (no taichu import): the
    text equals `taichu generate --temperature 0` on torch, and with eos ignored 20 tokens a
    prompt equal taichu.generate's on torch_impl. The CTRL penalty keeps the briefly trained
    model from repeating one token, so the rows say something about the logits."""
    folder = tmp_path / "deployed"
    folder.mkdir()
    for name in ("model.onnx", "config.json", "tokenizer.model"):
        (folder / name).write_bytes((onnx_dir / name).read_bytes())
    script = tmp_path / "generate.py"
    script.write_text(STANDALONE_GENERATE)

    def standalone(max_new_tokens, until):
        done = subprocess.run([sys.executable, str(script), str(folder), str(max_new_tokens), until, "2.0",
                               json.dumps(PROMPTS, ensure_ascii=False)], capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    cli = _run_cli("generate", trained_tiny, "--backend", "torch", *[a for p in PROMPTS for a in ("--prompt", p)],
                   "--max-new-tokens", 20, "--temperature", 0, "--repetition-penalty", 2.0)
    assert cli.returncode == 0, cli.stderr
    assert [r["text"] for r in standalone(20, "eos")] == cli.stdout.splitlines()
    tokenizer = Tokenizer(trained_tiny / "tokenizer.model")
    expected = generate_ids(model_step(taichu.load_model(trained_tiny, backend="torch")),
                            [tokenizer.encode(p, add_bos=True) for p in PROMPTS],
                            SamplingConfig(max_new_tokens=20, temperature=0, repetition_penalty=2.0), -1,
                            tokenizer.pad_id, 128)
    ids = [r["ids"] for r in standalone(20, "none")]
    assert ids == expected and all(len(row) == 20 for row in ids)
    assert all(len(set(row)) >= 10 for row in ids)

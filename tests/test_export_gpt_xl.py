"""GPT-XL export: one ONNX ``decoder`` (torch_impl.gpt_xl.DecoderForExport) with dynamic
batch, sequence and memory, validated by the exporter against torch at three shapes; through
export.gpt_xl_network the same logits as torch for a step after a memory, at two shapes, and
the same greedy tokens past the window (one prompt, a left-padded batch); the runtime without
torch, mindspore or the model code; `taichu generate --backend onnx --max-new-tokens 2000`;
MINDIR and the other refusals. Generation in torch and MindSpore: test_gpt_xl_generate.py."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import taichu
from export.exporter import export_model
from export.runtime import OnnxGenerator
from export.runtime_gpt_xl import gpt_xl_network
from taichu.generate import SamplingConfig, recurrent_model_step

from test_gpt_xl_generate import (BATCHES, BOS, CONFIG, MEM_LEN, MEMORY, SEGMENT, TOLERANCE, VOCAB, build_model_dir,
                                  greedy, scaled_difference)

HIDDEN, LAYERS = CONFIG.model.hidden_size, CONFIG.model.num_layers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("gpt_xl"))


@pytest.fixture(scope="module")
def torch_model(model_dir):
    return taichu.load_model(model_dir, backend="torch")


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    """(export directory, export_info, log lines) of `taichu export --format onnx`."""
    lines = []
    out = tmp_path_factory.mktemp("export") / "onnx"
    info = export_model(model_dir, "onnx", out, log=lines.append)
    return out, info, lines


@pytest.fixture(scope="module")
def expected(torch_model):
    step = recurrent_model_step(torch_model)
    return {batch: greedy(step, prompts) for batch, prompts in BATCHES.items()}


def test_onnx_folder_records_the_decoder_with_named_axes(exported):
    import onnx

    directory, info, lines = exported
    assert (info["task"], info["family"], info["format"]) == ("recurrent_language_model", "gpt_xl", "onnx")
    assert any(line.startswith("validated decoder.onnx against torch_impl") for line in lines), lines
    (decoder,) = info["graphs"]
    assert (decoder["name"], decoder["file"]) == ("decoder", "decoder.onnx")
    memory = [(f"memory.{i}", ["batch", "memory", HIDDEN]) for i in range(LAYERS)]
    want = [("input_ids", ["batch", "sequence"]), ("document_ids", ["batch", "sequence"]),
            ("memory_document_ids", ["batch", "memory"])] + memory
    want += [("logits", ["batch", VOCAB]), ("new_memory_document_ids", ["batch", "memory"])]
    want += [("new_" + name, shape) for name, shape in memory]
    assert [(t["name"], t["shape"]) for t in decoder["inputs"] + decoder["outputs"]] == want
    saved = onnx.load(str(directory / "decoder.onnx")).graph
    assert [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in list(saved.input) + list(saved.output)] == want
    # A left-padded segment and one token after a memory longer than training's, a segment
    # after a memory of 3.
    shapes = decoder["validation"]["shapes"]
    assert [(s["batch"], s["sequence"], s["memory"]) for s in shapes] == [
        (2, 7, MEM_LEN + 6), (3, 1, MEM_LEN + 6), (1, 5, 3)]
    assert all(s["max_difference"] <= TOLERANCE for s in shapes)
    assert info["generation"]["segment_length"] == SEGMENT and info["generation"]["memory"] == MEMORY
    assert sorted(info["files"]) == sorted(p.name for p in directory.iterdir()) == [
        "config.yaml", "decoder.onnx", "export_info.json", "special_tokens_map.json", "tokenizer.json",
        "tokenizer.model", "tokenizer_config.json"]
    assert json.loads((directory / "tokenizer_config.json").read_text())["model_max_length"] == int(1e30)


def test_a_step_after_a_memory_matches_torch_at_two_shapes(exported, torch_model):
    """The decoder's every output against torch's DecoderForExport: one token per row of a
    batch of 2 after the memory a real prompt left (generation's length), and a whole segment
    at batch 1 after a memory of 10 with empty slots."""
    import torch

    from torch_impl.gpt_xl import DecoderForExport

    network = gpt_xl_network(exported[0])
    decoder = DecoderForExport(torch_model).eval()
    rng = np.random.default_rng(1)
    prompt = rng.integers(4, VOCAB, (2, SEGMENT))
    documents, memories = network.initial_memories(2)
    _, documents, memories = network.forward(prompt, np.zeros_like(prompt), documents, memories)
    empty_documents, empty = network.initial_memories(1, 10)
    empty[0][:, 4:], empty[1][:, 4:] = rng.standard_normal((2, 1, 6, HIDDEN)).astype(np.float32)
    empty_documents[:, 4:] = 0
    cases = [(rng.integers(4, VOCAB, (2, 1)), np.zeros((2, 1), np.int64), documents, memories),
             (rng.integers(4, VOCAB, (1, SEGMENT)), np.zeros((1, SEGMENT), np.int64), empty_documents, empty)]
    for ids, docs, memory_documents, memory in cases:
        logits, new_documents, new_memory = network.forward(ids, docs, memory_documents, memory)
        with torch.no_grad():
            want = decoder(*(torch.from_numpy(np.asarray(a)) for a in (ids, docs, memory_documents, *memory)))
        assert new_documents.shape == memory_documents.shape and new_memory[0].shape == memory[0].shape
        np.testing.assert_array_equal(new_documents, want[1].numpy())
        for got, ref in zip([logits] + new_memory, [want[0]] + list(want[2:])):
            assert got.shape == tuple(ref.shape) and scaled_difference(got, ref.numpy()) <= TOLERANCE


@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_greedy_tokens_equal_the_torch_models_past_the_window(exported, expected, batch):
    network = gpt_xl_network(exported[0])
    tokens, logits = greedy(network.step(), BATCHES[batch])
    np.testing.assert_array_equal(tokens, expected[batch][0])
    assert max(scaled_difference(a, b) for a, b in zip(logits, expected[batch][1])) <= TOLERANCE
    assert all(a.dtype == np.float32 and a.shape == (batch, VOCAB) for a in logits)


def test_onnx_runtime_needs_no_framework(exported, expected, torch_model, model_dir):
    """gpt_xl_network in a process where torch, mindspore, the model code, pydantic and yaml
    cannot be imported: the torch model's greedy tokens for both batches, and its text."""
    from taichu.generate import generate_text
    from taichu.tokenizer import Tokenizer

    prompts = ["左边一个", "白色背景的左边有一个蓝色的正方形"]
    blocked = ("torch", "torch_impl", "mindspore", "mindspore_impl", "pydantic", "yaml")
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys
        BLOCKED = {blocked!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked: {{name}}")
        sys.meta_path.insert(0, Block())
        from export.runtime_gpt_xl import gpt_xl_network
        from taichu.generate import SamplingConfig, generate_ids
        network = gpt_xl_network({str(exported[0])!r})
        greedy = SamplingConfig({len(expected[1][1])}, temperature=0)
        tokens = {{b: generate_ids(network.step(), p, greedy, -1, 0, None)
                  for b, p in json.loads({json.dumps(BATCHES)!r}).items()}}
        text = network.generate({prompts!r}, max_new_tokens=100, temperature=0)
        print(json.dumps({{"tokens": tokens, "text": text}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for batch, (tokens, _) in expected.items():
        np.testing.assert_array_equal(np.array(out["tokens"][str(batch)]), tokens)
    assert out["text"] == generate_text(torch_model, Tokenizer(model_dir / "tokenizer.model"), prompts,
                                        SamplingConfig(100, temperature=0))


def test_cli_generates_2000_tokens_from_the_export(exported, capsys, monkeypatch):
    from export.runtime_gpt_xl import GPTXLNetwork
    from taichu.cli import main

    network = gpt_xl_network(exported[0])
    produced = []
    original = GPTXLNetwork.generate_ids

    def recording(self, prompts, sampling, memory=None):
        produced.append(original(self, prompts, sampling, memory))
        return produced[-1]
    monkeypatch.setattr(GPTXLNetwork, "generate_ids", recording)
    arguments = ["generate", str(exported[0]), "--backend", "onnx", "--prompt", "左边一个", "--temperature", "0",
                 "--max-new-tokens", "2000"]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    (ids,), = produced
    assert len(ids) == 2000          # no eos from this model: the whole 2000, far past the window
    assert printed == "左边一个" + network.tokenizer.decode(ids) + "\n"
    # The first tokens are the ones the step gives without the CLI (and, by the test above, torch's).
    assert ids[:60] == greedy(network.step(), [network.tokenizer.encode("左边一个", add_bos=True)])[0][0].tolist()
    assert main(arguments[:-1] + ["50", "--memory", "5"]) == 0
    assert capsys.readouterr().out == "左边一个" + network.generate(["左边一个"], memory=5, max_new_tokens=50,
                                                                 temperature=0)[0] + "\n"
    assert main(arguments[:3] + ["torch"] + arguments[4:]) == 2
    assert "is an ONNX export of a gpt_xl: use --backend onnx" in capsys.readouterr().err


def test_refusals(exported, model_dir, tmp_path, capsys):
    from taichu.cli import main

    directory = exported[0]
    with pytest.raises(NotImplementedError, match=r"gpt_xl models export to ONNX only \(--format onnx.*there is "
                                                  r"no MINDIR export of a gpt_xl"):
        export_model(model_dir, "mindir", tmp_path / "ms")
    assert main(["export", str(model_dir), "--format", "mindir", "--out", str(tmp_path / "ms")]) == 2
    assert "no MINDIR export of a gpt_xl" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--quantize int8 is not implemented for GPT-XL models \(gpt_xl\)"):
        export_model(model_dir, "onnx", tmp_path / "int8", quantize="int8")
    assert not (tmp_path / "ms").exists() and not (tmp_path / "int8").exists()
    with pytest.raises(ValueError, match="is an export of a GPT-XL .* it generates through export.gpt_xl_network"):
        OnnxGenerator(directory)
    with pytest.raises(ValueError, match="a GPT-XL export runs in ONNX Runtime only"):
        gpt_xl_network(directory, "mindir")
    network = gpt_xl_network(directory)
    documents, memories = network.initial_memories(2)
    ids = np.full((3, 1), 5)
    for args, message in [
        ((ids, np.zeros((3, 1), np.int64), documents, memories), "memory 0 holds 2 rows, but input_ids has 3"),
        ((ids[:2], np.zeros((2, 1), np.int64)) + network.initial_memories(2, 0), "a memory of length 0"),
        ((ids[:2], np.zeros((2, 1), np.int64), documents, [m.astype(np.float64) for m in memories]),
         "memory 0 must be a float32 numpy array"),
        ((ids[:2], np.zeros((2, 2), np.int64), documents, memories), "document_ids must have input_ids' shape"),
        ((ids[:2], np.full((2, 1), -2), documents, memories), "document id -2 is out of range"),
        ((np.full((2, 1), VOCAB), np.zeros((2, 1), np.int64), documents, memories),
         f"token id {VOCAB} is out of range for vocab_size {VOCAB}"),
        ((ids[:2], np.zeros((2, 1), np.int64), documents[:, 1:], memories), r"memory_document_ids must be "),
        ((ids[:2], np.zeros((2, 1), np.int64), documents, memories[:1]), f"1 arrays for {LAYERS} layers"),
        ((np.zeros((2, 0), np.int64), np.zeros((2, 0), np.int64), documents, memories), "input_ids must be"),
    ]:
        with pytest.raises(ValueError, match=message):
            network.forward(*args)
    with pytest.raises(ValueError, match="the memory must hold at least 1 position, got 0"):
        network.step(0)
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        network.generate_ids([[BOS], []], SamplingConfig(3, temperature=0))

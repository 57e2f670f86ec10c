"""Text classifier export: one ONNX ``classifier`` graph (the torch model's forward: token ids
and mask -> logits) with dynamic batch and sequence, validated by the exporter against torch
at three shapes; through export.classifier_network the torch logits at two other shapes
(different batch and length, with padding); `taichu classify` giving the same labels and
probabilities on torch, MindSpore and ONNX; `taichu eval` of the export; the runtime without
torch, mindspore, the model code, pydantic or yaml; MINDIR, int8 and the other refusals. The
model (gpt-tiny-reviews, 10 steps) is test_classify_cli.py's."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import taichu
from export.exporter import export_model
from export.runtime import OnnxGenerator
from export.runtime_classifier import classifier_network

from test_classify_cli import LONG, classifier_dir, printed

TEXTS = ["这个手机很好用", "质量太差了，用了两天就坏了", LONG, "好", "物流很快，但是包装破了，有点失望"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return classifier_dir(tmp_path_factory)


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


def test_onnx_folder_records_the_classifier_and_how_to_read_text(exported, model_dir):
    import onnx

    from taichu.tokenizer import Tokenizer

    directory, info, lines = exported
    assert (info["task"], info["family"], info["format"]) == ("classification", "gpt_classifier", "onnx")
    assert any(line.startswith("validated classifier.onnx against torch_impl") for line in lines), lines
    (graph,) = info["graphs"]
    assert (graph["name"], graph["file"]) == ("classifier", "classifier.onnx")
    want = [("input_ids", "int64", ["batch", "sequence"]), ("attention_mask", "int64", ["batch", "sequence"]),
            ("logits", "float32", ["batch", 2])]
    assert [(t["name"], t["dtype"], t["shape"]) for t in graph["inputs"] + graph["outputs"]] == want
    saved = onnx.load(str(directory / "classifier.onnx")).graph
    assert [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in list(saved.input) + list(saved.output)] == [(name, shape) for name, _, shape in want]
    shapes = graph["validation"]["shapes"]
    assert [(s["batch"], s["sequence"], s["padding"]) for s in shapes] == [(1, 5, "none"), (3, 12, "right"),
                                                                            (2, 9, "left")]
    assert all(s["max_difference"] <= 1e-4 for s in shapes)
    tokenizer = Tokenizer(model_dir / "tokenizer.model")
    spec = info["classifier"]
    assert (spec["labels"], spec["seq_len"], spec["truncation"], spec["pad_to_multiple_of"]) == (
        ["negative", "positive"], 64, "right", 32)
    assert spec["special_ids"] == {"pad": tokenizer.pad_id, "bos": tokenizer.bos_id, "eos": tokenizer.eos_id}
    assert (spec["vocab_size"], spec["max_position_embeddings"]) == (2048, 128)
    assert sorted(info["files"]) == sorted(p.name for p in directory.iterdir())
    assert {"classifier.onnx", "config.yaml", "export_info.json", "tokenizer.model"} <= set(info["files"])


def test_logits_match_torch_at_two_shapes(exported, torch_model):
    """Right-padded batch of 4 rows of 30 (rows of 30, 21, 9, 1 real tokens) and a batch of 2
    rows of 64 (one left-padded by 5): every row's logits within 1e-4 of torch's."""
    import torch

    network = classifier_network(exported[0])
    rng = np.random.default_rng(3)
    cases = []
    for batch, length, real, left in ((4, 30, [30, 21, 9, 1], False), (2, 64, [59, 64], True)):
        ids = rng.integers(4, 2048, (batch, length))
        mask = np.zeros((batch, length), np.int64)
        for row, n in enumerate(real):
            if left:
                mask[row, length - n:] = 1
            else:
                mask[row, :n] = 1
        ids[mask == 0] = 0
        cases.append((ids, mask))
    for ids, mask in cases:
        got = network.logits(ids, mask)
        with torch.no_grad():
            want = torch_model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        assert got.dtype == np.float32 and got.shape == want.shape == (ids.shape[0], 2)
        assert np.abs(got - want).max() <= 1e-4
    # The padding is invisible: row 2 of the first batch alone, unpadded.
    ids, mask = cases[0]
    alone = network.logits(ids[2:3, :9], mask[2:3, :9])
    assert np.abs(alone - network.logits(ids, mask)[2:3]).max() <= 1e-5


def test_classify_gives_the_same_labels_and_probabilities_on_three_backends(exported, model_dir, capsys):
    from taichu.cli import main

    outputs = {}
    for backend, model in (("torch", model_dir), ("mindspore", model_dir), ("onnx", exported[0]),
                           (None, exported[0])):
        arguments = ["classify", str(model), *TEXTS, "--all-labels", "--batch-size", "2"]
        assert main(arguments + (["--backend", backend] if backend else [])) == 0, backend
        captured = capsys.readouterr()
        assert "1 of 5 texts is longer than data.seq_len 64" in captured.err
        outputs[backend] = printed(captured.out)
    assert outputs[None] == outputs["onnx"]          # onnx: the default for an export directory
    reference = outputs["torch"]
    assert [text for _, text in reference] == TEXTS
    for backend, tolerance in (("mindspore", 1e-5), ("onnx", 1e-4)):
        for (pairs, text), (want, want_text) in zip(outputs[backend], reference):
            assert text == want_text and [label for label, _ in pairs] == [label for label, _ in want]
            assert max(abs(p - q) for (_, p), (_, q) in zip(pairs, want)) <= tolerance, backend
            # The same winning label (printed probabilities are 6 decimals: no near-tie here).
            assert max(pairs, key=lambda x: x[1])[0] == max(want, key=lambda x: x[1])[0]


def test_eval_of_the_export_equals_the_model_directorys(exported, model_dir, tmp_path, capsys):
    from taichu.cli import main

    from taichu.classify import load_labelled
    from taichu.config import load_config

    # 300 held-out reviews as a .jsonl (all of it is evaluated): the held-out split's path is
    # test_classify_cli.py's, and this one is quicker.
    config = load_config(model_dir)
    held_out = load_labelled(config.data, config.model.labels)
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": int(y)}, ensure_ascii=False) + "\n"
                            for t, y in zip(held_out.test_texts[:300], held_out.test_labels)), encoding="utf-8")
    results = {}
    for name, model, backend in (("torch", model_dir, "torch"), ("onnx", exported[0], "onnx")):
        out = tmp_path / f"{name}.json"
        assert main(["eval", str(model), "--backend", backend, "--data", str(data), "--out", str(out)]) == 0
        results[name] = json.loads(out.read_text(encoding="utf-8"))
    capsys.readouterr()
    assert results["onnx"]["backend"] == "onnx" and results["onnx"]["examples"] == results["torch"]["examples"] == 300
    # Predictions may differ only where torch's two logits are within float noise.
    different = sum(a != b for a, b in zip(results["onnx"]["predictions"], results["torch"]["predictions"]))
    assert different <= 1
    assert abs(results["onnx"]["accuracy"] - results["torch"]["accuracy"]) <= different / results["torch"]["examples"]


def test_onnx_runtime_needs_no_framework(exported, model_dir):
    """classifier_network in a process where torch, mindspore, the model code, pydantic, yaml
    and taichu's config, families and api cannot be imported: torch's probabilities."""
    from taichu.classify import model_classifier

    blocked = ("torch", "torch_impl", "mindspore", "mindspore_impl", "pydantic", "yaml", "taichu.config",
               "taichu.families", "taichu.api")
    script = textwrap.dedent(f"""
        import importlib.abc, json, sys
        BLOCKED = {blocked!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in BLOCKED or name in BLOCKED or name.rsplit(".", 1)[0] in BLOCKED:
                    raise ImportError(f"blocked: {{name}}")
        sys.meta_path.insert(0, Block())
        from export.runtime_classifier import classifier_network
        result = classifier_network({str(exported[0])!r}).classify({TEXTS!r}, batch_size=2)
        print(json.dumps({{"probabilities": result.probabilities.tolist(), "labels": result.labels,
                          "truncated": result.truncated}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    want = model_classifier(model_dir, "torch").classify(TEXTS)
    assert out["labels"] == ["negative", "positive"] and out["truncated"] == 1
    assert np.abs(np.array(out["probabilities"]) - want.probabilities).max() <= 1e-4


def test_refusals(exported, model_dir, tmp_path, capsys):
    from taichu.cli import main

    directory = exported[0]
    with pytest.raises(NotImplementedError, match=r"gpt_classifier models export to ONNX only .* there is no "
                                                  r"MINDIR export of a gpt_classifier"):
        export_model(model_dir, "mindir", tmp_path / "ms")
    assert main(["export", str(model_dir), "--format", "mindir", "--out", str(tmp_path / "ms")]) == 2
    assert "no MINDIR export of a gpt_classifier" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--quantize int8 is not implemented for text classifier models"):
        export_model(model_dir, "onnx", tmp_path / "int8", quantize="int8")
    assert not (tmp_path / "ms").exists() and not (tmp_path / "int8").exists()
    with pytest.raises(ValueError, match="is an export of a gpt_classifier model .* it has no text decoder"):
        OnnxGenerator(directory)
    with pytest.raises(ValueError, match="a gpt_classifier export runs in ONNX Runtime only"):
        classifier_network(directory, "mindir")
    for arguments, message in [
        (["classify", str(directory), "好", "--backend", "torch"],
         f"is an ONNX export of a gpt_classifier: use --backend onnx (--backend torch runs its model directory, "
         f"{model_dir.resolve()})"),
        (["eval", str(directory), "--backend", "mindir"], "there is no MINDIR export of a gpt_classifier"),
        (["eval", str(directory)], "is an ONNX export of a gpt_classifier: use --backend onnx"),
    ]:
        assert main(arguments) == 2
        assert message in capsys.readouterr().err
    network = classifier_network(directory)
    ids, mask = np.full((2, 3), 5), np.ones((2, 3), np.int64)
    for args, message in [
        ((ids.astype(np.float32), mask), "input_ids must be an integer numpy array"),
        ((np.full((2, 3), 2048), mask), "token id 2048 is out of range for vocab_size 2048"),
        ((ids, mask[:, :2]), "attention_mask must have input_ids' shape"),
        ((ids, mask * 2), "attention_mask must hold 0 .* and 1"),
        ((ids, np.array([[1, 1, 0], [0, 0, 0]])), "row 1 of attention_mask has no real token"),
        ((np.zeros((2, 0), np.int64), np.zeros((2, 0), np.int64)), "input_ids must be"),
        ((np.full((1, 129), 5), np.ones((1, 129), np.int64)), "sequence length 129 exceeds max_position_embeddings"),
    ]:
        with pytest.raises(ValueError, match=message):
            network.logits(*args)
    with pytest.raises(ValueError, match="text 2 is empty"):
        network.classify(["好", " "])

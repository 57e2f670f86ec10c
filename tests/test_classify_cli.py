"""`taichu classify` and `taichu eval` of a gpt_classifier (taichu/cli_text.py, taichu.classify's
TextClassifier) on gpt-tiny-reviews trained for 10 steps: one line per text in input order,
each probability the softmax of the model's logits for that text alone (no padding, no
batch); --file, --top-k, --all-labels; a long text cut on data.truncation's side (right: its
end does not matter; left: its beginning does not) and said on stderr; the refusals; eval's
accuracy, macro-F1, per-label scores and confusion recomputed with scikit-learn. The three
backends and the ONNX export: test_export_classifier.py (which shares this module's model)."""
import json
import shutil

import numpy as np
import pytest

from conftest import CONFIGS

CONFIG_FILE = CONFIGS / "gpt_classifier" / "gpt-tiny-reviews.yaml"
# A BPE vocabulary of 2048 trains in about a second on 3000 reviews (unigram over 4096 takes
# minutes on a loaded machine).
OVERRIDES = ["model.vocab_size=2048", "tokenizer.model_type=bpe"]
# A text far longer than data.seq_len 64 (~2 tokens per character pair at most).
LONG = "这家店的服务态度一般，物流速度还可以，包装也算完整，" * 12
_BUILT = {}


def classifier_dir(tmp_path_factory):
    """A gpt_classifier model directory (gpt-tiny-reviews, BPE vocabulary of 2048 trained
    in-process on 3000 training reviews, 10 torch steps), built once per test process: the
    two classifier test modules share it."""
    if "model" not in _BUILT:
        import torch

        import taichu
        from taichu.classify import load_labelled
        from taichu.tokenizer import train_tokenizer
        from taichu.train import run_training

        root = tmp_path_factory.mktemp("gpt_classifier")
        config = taichu.load_config(CONFIG_FILE, OVERRIDES + [
            f"data.cache_dir={root / 'cache'}", "train.max_steps=10", "train.warmup_steps=2",
            "train.learning_rate=3e-3", "train.eval_interval=1000", "train.eval_batches=1"])
        texts = load_labelled(config.data, config.model.labels)
        tokenizer = train_tokenizer(texts.train_texts[:3000], config.tokenizer, config.model.vocab_size,
                                    root / "tokenizer.model")
        torch.manual_seed(0)
        init = taichu.save_model(taichu.build_model(config, "torch"), root / "init", tokenizer=tokenizer.path)
        _BUILT["model"] = run_training(config, "torch", root / "run", init_dir=init, progress=False).final_dir
    return _BUILT["model"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return classifier_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def alone(model_dir):
    """probabilities(text): softmax of the torch model's logits for [bos] + ids + [eos] alone
    (cut to seq_len on truncation's side), no padding: the reference of every batched path."""
    import torch

    import taichu
    from taichu.tokenizer import Tokenizer

    model = taichu.load_model(model_dir, backend="torch")
    tokenizer = Tokenizer(model_dir / "tokenizer.model")
    seq_len = model.config.data.seq_len

    def probabilities(text, truncation="right"):
        ids = tokenizer.encode(text.strip())
        if len(ids) > seq_len - 2:
            ids = ids[:seq_len - 2] if truncation == "right" else ids[len(ids) - (seq_len - 2):]
        with torch.no_grad():
            logits = model(torch.tensor([[tokenizer.bos_id] + ids + [tokenizer.eos_id]])).double()
        return torch.softmax(logits, -1)[0].numpy()
    return probabilities


def printed(out: str) -> list[tuple[list[tuple[str, float]], str]]:
    """`taichu classify` lines -> [([(label, probability), ...], text)]."""
    rows = []
    for line in out.splitlines():
        fields = line.split("\t")
        pairs = [(fields[i], float(fields[i + 1])) for i in range(0, len(fields) - 1, 2)]
        rows.append((pairs, fields[-1]))
    return rows


def classify(capsys, *arguments) -> tuple[int, str, str]:
    from taichu.cli import main

    code = main(["classify", *map(str, arguments)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_one_line_per_text_in_input_order_with_the_softmax_of_its_logits(model_dir, alone, capsys):
    from taichu.classify import model_classifier

    labels = ("negative", "positive")
    texts = ["这个手机很好用", LONG, "质量太差了，用了两天就坏了", "好"]
    # Batches of 2, sorted by length: the long text and the short ones in different batches.
    code, out, err = classify(capsys, model_dir, *texts, "--batch-size", "2")
    assert code == 0
    rows = printed(out)
    assert [text for _, text in rows] == texts
    for (pairs, _), text in zip(rows, texts):
        want = alone(text)
        ((label, p),) = pairs
        assert label == labels[int(want.argmax())] and abs(p - want.max()) <= 1e-5
    assert err == ("note: 1 of 4 texts is longer than data.seq_len 64 tokens (62 between bos and eos): cut on "
                   "the right (data.truncation), its beginning classified\n")
    # The API the command runs: probabilities sum to 1, the same as the command printed.
    result = model_classifier(model_dir, "torch", batch_size=3).classify(texts)
    assert result.truncated == 1 and result.labels == labels
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(result.probabilities, [alone(t) for t in texts], atol=1e-5)
    assert [labels[i] for i in result.predicted] == [pairs[0][0] for pairs, _ in rows]
    # Texts after an option, as users type them: the same lines; an unknown option still refused.
    assert classify(capsys, model_dir, "--batch-size", "2", *texts)[:2] == (0, out)
    assert classify(capsys, model_dir, texts[0], "--batch-size", "2", *texts[1:])[:2] == (0, out)
    with pytest.raises(SystemExit):
        classify(capsys, model_dir, texts[0], "--no-such-option", *texts[1:])


def test_file_top_k_and_all_labels(model_dir, alone, tmp_path, capsys):
    texts_file = tmp_path / "texts.txt"
    texts_file.write_text("\ufeff物流很快，包装完好\r\n不会再买了\n", encoding="utf-8")
    texts = ["一般般", "物流很快，包装完好", "不会再买了"]
    code, out, err = classify(capsys, model_dir, texts[0], "--file", texts_file, "--top-k", "2")
    assert code == 0 and err == ""
    for (pairs, text), want in zip(printed(out), texts):
        reference = alone(want)
        assert text == want and len(pairs) == 2 and pairs[0][1] >= pairs[1][1]
        assert {label for label, _ in pairs} == {"negative", "positive"}
        assert abs(sum(p for _, p in pairs) - 1) <= 2e-6
        assert dict(pairs) == pytest.approx({"negative": reference[0], "positive": reference[1]}, abs=1e-5)
    code, out, _ = classify(capsys, model_dir, *texts, "--all-labels")
    assert code == 0
    for (pairs, _), want in zip(printed(out), texts):
        assert [label for label, _ in pairs] == ["negative", "positive"]      # the model's order
        np.testing.assert_allclose([p for _, p in pairs], alone(want), atol=1e-5)


def test_a_long_text_is_cut_on_the_configured_side(model_dir, alone, tmp_path, capsys):
    from taichu.config import dump_config, load_config

    code, out, err = classify(capsys, model_dir, LONG + "太差了，马上退货", LONG + "非常满意，五星好评", "很差" + LONG)
    assert code == 0 and "3 of 3 texts are longer than data.seq_len 64 tokens" in err
    (first, _), (second, _), (third, _) = printed(out)
    assert first == second                 # cut on the right: the different ends are gone
    assert abs(first[0][1] - third[0][1]) > 1e-6 or first[0][0] != third[0][0]   # the beginning counts
    # The same weights read left-truncated: the beginning is cut, the end decides.
    left = tmp_path / "left"
    shutil.copytree(model_dir, left)
    config = load_config(left)
    dump_config(config.model_copy(update={"data": config.data.model_copy(update={"truncation": "left"})}),
                left / "config.yaml")
    code, out, err = classify(capsys, left, "很差很差" + LONG, "非常满意" + LONG, LONG + "太差了，马上退货")
    assert code == 0 and err.endswith("cut on the left (data.truncation), their ends classified\n")
    (first, _), (second, _), (third, _) = printed(out)
    assert first == second
    assert abs(first[0][1] - third[0][1]) > 1e-6 or first[0][0] != third[0][0]
    want = alone("非常满意" + LONG, truncation="left")
    assert first[0] == ("positive" if want[1] > want[0] else "negative", pytest.approx(want.max(), abs=1e-5))


def test_refusals(model_dir, tmp_path, capsys):
    import taichu

    gpt = taichu.save_model(taichu.build_model(taichu.load_config(CONFIGS / "gpt" / "gpt-tiny.yaml"), "torch"),
                            tmp_path / "gpt")
    blank = tmp_path / "blank.txt"
    blank.write_text("好用\n\n不好用\n", encoding="utf-8")
    for arguments, message in [
        ((model_dir, "好用", ""), "text 2 is empty: there is nothing to classify"),
        ((model_dir, "  "), "text 1 is empty"),
        ((model_dir, "--file", blank), f"{blank}:2: the text is empty"),
        ((model_dir,), "no texts: give them as arguments or with --file"),
        ((model_dir, "好", "--top-k", "0"), "--top-k must be >= 1"),
        ((gpt, "好用"), f"{gpt} is a gpt model: it has no classification head. Fine-tune one with `taichu train "
                      f"<gpt_classifier config> --init {gpt}`"),
        ((tmp_path / "missing", "好用"), f"{tmp_path / 'missing'}: no such model directory"),
        ((model_dir, "好用", "--backend", "onnx"), "is a model directory: --backend onnx runs an export"),
        ((model_dir, "好用", "--batch-size", "0"), "batch size must be a positive integer"),
    ]:
        code, out, err = classify(capsys, *arguments)
        assert code == 2 and out == "" and message in err, (arguments, err)
    from taichu.cli import main

    data = tmp_path / "other.jsonl"
    data.write_text(json.dumps({"text": "好用", "label": "positive"}, ensure_ascii=False) + "\n", encoding="utf-8")
    for arguments, message in [
        (["--data", str(data), "--split", "train"], "is evaluated whole (--split test or all)"),
        (["--backend", "mindir"], "there is no MINDIR export of a gpt_classifier"),
        (["--data", str(tmp_path / "none.jsonl")], "not found"),
    ]:
        assert main(["eval", str(model_dir), *arguments]) == 2
        assert message in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "好用", "label": "neutral"}\n', encoding="utf-8")
    assert main(["eval", str(model_dir), "--data", str(bad)]) == 2
    assert f"{bad}:1: label 'neutral' is not one of model.labels" in capsys.readouterr().err


def _sklearn_metrics(truth, predicted, labels):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    indices = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=indices,
                                                                     zero_division=0)
    return {"accuracy": accuracy_score(truth, predicted),
            "macro_f1": f1_score(truth, predicted, labels=indices, average="macro", zero_division=0),
            "per_label": {label: {"precision": precision[i], "recall": recall[i], "f1": f1[i],
                                  "support": int(support[i])} for i, label in enumerate(labels)},
            "confusion": confusion_matrix(truth, predicted, labels=indices).tolist()}


def test_eval_on_the_held_out_split_matches_scikit_learn(model_dir, alone, tmp_path, capsys):
    from taichu.classify import load_labelled
    from taichu.cli import main
    from taichu.config import load_config

    out = tmp_path / "metrics.json"
    assert main(["eval", str(model_dir), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    results = json.loads(out.read_text(encoding="utf-8"))
    config = load_config(model_dir)
    held_out = load_labelled(config.data, config.model.labels)
    labels = list(config.model.labels)
    truth = held_out.test_labels
    predicted = np.array([labels.index(p) for p in results["predictions"]])
    assert results["examples"] == len(held_out.test_texts) == len(predicted) and results["split"] == "test"
    # The predictions are the model's for each text alone (the first 40, independently).
    assert all(predicted[i] == alone(text).argmax() for i, text in enumerate(held_out.test_texts[:40]))
    want = _sklearn_metrics(truth, predicted, labels)
    assert results["accuracy"] == pytest.approx(want["accuracy"], abs=1e-12)
    assert results["macro_f1"] == pytest.approx(want["macro_f1"], abs=1e-12)
    for label in labels:
        assert results["per_label"][label] == pytest.approx(want["per_label"][label], abs=1e-12)
    assert results["confusion"] == want["confusion"]
    counts = np.bincount(truth, minlength=2)
    assert results["majority_baseline"]["label"] == labels[counts.argmax()]
    assert results["majority_baseline"]["accuracy"] == pytest.approx(counts.max() / counts.sum())
    assert results["majority_baseline"]["macro_f1"] == pytest.approx(
        _sklearn_metrics(truth, np.full_like(truth, counts.argmax()), labels)["macro_f1"])
    assert lines[0] == f"{model_dir} (torch) on reviews, held-out split ({len(truth)} texts)"
    assert lines[1].startswith(f"accuracy {want['accuracy']:.4f}  macro-F1 {want['macro_f1']:.4f}  "
                               f"({len(truth)} texts; majority class '{labels[counts.argmax()]}'")
    assert lines[-1] == f"wrote {out}"


def test_eval_of_a_jsonl_file_takes_all_of_it(model_dir, alone, tmp_path, capsys):
    from taichu.cli import main

    texts = ["物流很快，包装完好", "不会再买了", "一般般吧", "质量很好，推荐购买", "客服态度太差", LONG, "还行",
             "非常失望", "超出预期", "颜色和图片不一样"]
    records = [{"text": t, "label": ("positive", 0, 1)[i % 3]} for i, t in enumerate(texts)]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "mine.json"
    assert main(["eval", str(model_dir), "--data", str(data), "--out", str(out), "--batch-size", "4"]) == 0
    printed_lines = capsys.readouterr().out
    results = json.loads(out.read_text(encoding="utf-8"))
    truth = np.array([1 if r["label"] in ("positive", 1) else 0 for r in records])
    predicted = np.array([alone(t).argmax() for t in texts])
    assert results["examples"] == 10 and results["truncated"] == 1
    assert results["predictions"] == [("negative", "positive")[i] for i in predicted]
    want = _sklearn_metrics(truth, predicted, ["negative", "positive"])
    assert (results["accuracy"], results["macro_f1"]) == pytest.approx((want["accuracy"], want["macro_f1"]), abs=1e-12)
    assert results["confusion"] == want["confusion"]
    assert f"on mine.jsonl (all 10 texts)" in printed_lines and "1 of 10 texts is longer" in printed_lines

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from taichu.config import validate_config
from taichu.corpus import (SPLIT_CHUNK, load_corpus, peoples_daily_paragraphs, read_text_files,
                           split_documents)

REPO = Path(__file__).resolve().parents[1]


def gpt_config(**data):
    return validate_config({
        "family": "gpt",
        "model": {"vocab_size": 2048, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
                  "max_position_embeddings": 128, "activation": "gelu", "layer_norm_eps": 1e-5},
        "data": {"seq_len": 64, **data}}, "test")


@pytest.fixture(scope="module")
def paragraphs():
    return peoples_daily_paragraphs()


def test_peoples_daily_is_running_text_without_tags(paragraphs):
    assert len(paragraphs) > 19_000
    assert paragraphs[0] == "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"
    assert paragraphs[1] == "中共中央总书记、国家主席江泽民"
    text = "".join(paragraphs)
    assert not re.search(r"/[A-Za-z]", text), "a /tag suffix survived"
    assert not re.search(r"\s", text), "token separators survived"
    assert text.count("中国") > 1000
    assert "１９９８年" in text  # full-width digits kept as they are
    assert all(paragraphs)


def test_split_is_deterministic_disjoint_ordered_and_chunked():
    ids = [str(i) for i in range(20_000)]
    train, validation = split_documents(ids, 0.1, seed=0)
    assert (train, validation) == split_documents(ids, 0.1, seed=0)
    assert set(train).isdisjoint(validation) and len(train) + len(validation) == len(ids)
    assert [int(i) for i in train] == sorted(int(i) for i in train)
    assert [int(i) for i in validation] == sorted(int(i) for i in validation)
    assert 0.07 < len(validation) / len(ids) < 0.13
    # Whole chunks of consecutive documents go to validation.
    chunks = {int(i) // SPLIT_CHUNK for i in validation}
    assert len(validation) == SPLIT_CHUNK * len(chunks)
    assert split_documents(ids, 0.1, seed=1)[1] != validation


def test_split_does_not_depend_on_python_hash_seed():
    code = ("from taichu.corpus import split_documents; "
            "print(split_documents([str(i) for i in range(3000)], 0.05, 7)[1])")
    outputs = {subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                              check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
               for seed in ("1", "2")}
    assert len(outputs) == 1 and "'" in outputs.pop()


def test_split_small_corpora_keep_both_sides():
    docs = [f"d{i}" for i in range(SPLIT_CHUNK + 1)]  # two chunks
    train, validation = split_documents(docs, 0.001, seed=0)
    assert train and validation
    train, validation = split_documents(docs, 0.999, seed=0)
    assert train and validation
    assert split_documents(docs[:3], 0.5, seed=0) == (docs[:3], [])  # one chunk: all train
    with pytest.raises(ValueError, match="validation_fraction"):
        split_documents(docs, 1.0, seed=0)


def test_read_txt_and_jsonl(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_bytes("\ufeff第一篇  文章\r\n\r\n   \n第二篇\n".encode("utf-8"))
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text('{"text": "第三篇\\n两行"}\n\n{"text": "😀 four", "id": 4}\n', encoding="utf-8")
    assert read_text_files([txt, jsonl]) == ["第一篇  文章", "第二篇", "第三篇\n两行", "😀 four"]
    assert read_text_files(str(txt)) == ["第一篇  文章", "第二篇"]


def test_bad_inputs_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "ok"}\n{"title": "no text"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: .*'text'"):
        read_text_files([bad])
    bad.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        read_text_files([bad])
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.csv: unknown extension '\.csv'"):
        read_text_files([csv])
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_text_files([tmp_path / "missing.txt"])


def test_load_corpus_from_files_and_fingerprint(tmp_path, paragraphs):
    path = tmp_path / "news.txt"
    path.write_text("\n".join(paragraphs[:500]), encoding="utf-8")
    corpus = load_corpus(gpt_config(corpus=str(path), validation_fraction=0.1).data)
    assert corpus.name == "news.txt"
    assert len(corpus.train) + len(corpus.validation) == 500 and corpus.validation
    assert corpus.fingerprint == load_corpus(gpt_config(corpus=[str(path)], validation_fraction=0.1).data).fingerprint
    assert corpus.fingerprint != load_corpus(gpt_config(corpus=str(path), validation_fraction=0.2).data).fingerprint
    assert corpus.fingerprint != load_corpus(gpt_config(corpus=str(path), validation_fraction=0.1,
                                                        split_seed=1).data).fingerprint
    path.write_text("\n".join(paragraphs[:499]), encoding="utf-8")
    assert corpus.fingerprint != load_corpus(gpt_config(corpus=str(path), validation_fraction=0.1).data).fingerprint
    assert re.fullmatch(r"[0-9a-f]{64}", corpus.fingerprint)


def test_load_peoples_daily():
    corpus = load_corpus(gpt_config().data)
    assert corpus.name == "peoples_daily"
    assert 0.01 < len(corpus.validation) / (len(corpus.train) + len(corpus.validation)) < 0.04
    assert corpus.train[0].startswith("迈向充满希望的新世纪") or corpus.validation[0].startswith("迈向")


def test_empty_corpus_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n" + json.dumps({"text": "  "}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no non-empty documents"):
        load_corpus(gpt_config(corpus=str(path)).data)

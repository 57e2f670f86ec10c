"""Tokenizers travel with converted models (taichu/convert/hf_tokenizer.py): the Hugging Face
directory `taichu convert --to hf` writes has a tokenizer that AutoTokenizer and
pipeline("text-generation") load with no help, giving taichu's ids, text and greedy
continuation; converting back brings the tokenizer home (from tokenizer.model, or rebuilt from
tokenizer.json); a tokenizer that cannot be expressed is a note, and exit 1 with --strict."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import taichu
from taichu import convert
from taichu.config import ConfigError, load_config
from taichu.convert.hf_tokenizer import read_hf_tokenizer, write_hf_tokenizer
from taichu.tokenizer import Tokenizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RARE = "龘"   # not a piece of the tiny tokenizer: byte fallback (checked below)
TEXTS = [
    "1998年，中国人民庆祝香港回归一周年。",             # digits
    "“你好！”他说：（这是）《人民日报》；……",            # full-width punctuation
    f"一个罕见的字：{RARE}。",                           # byte fallback
    "表情😀👍🏽🚀结束",                                    # emoji (4-byte UTF-8, a modifier)
    "两个  空格   三个    四个 ",                         # repeated and trailing spaces
    "GPT-2 模型 v3.5 has 100% OK? snake_case，CamelCase",  # mixed ASCII
    "全角　空格，ＡＢＣ１２３",                            # ideographic space, full-width ASCII
    "第一行\n第二行\t制表",                               # newline and tab
    "<s>不是特殊</s> <0x41>",                            # special and byte pieces spelt out
]


def taichu_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "taichu", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def hf_dir(trained_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "hf"
    done = taichu_cli("convert", trained_tiny, out, "--to", "hf", "--strict")
    assert done.returncode == 0, done.stderr
    assert "tokenizer.json" in done.stdout and "U+2581" in done.stdout   # the one known difference
    return out


def test_auto_tokenizer_encodes_and_decodes_as_taichu(hf_dir, trained_tiny):
    from transformers import AutoTokenizer

    ours = Tokenizer(trained_tiny / "tokenizer.model")
    hf = AutoTokenizer.from_pretrained(hf_dir)
    assert {name: getattr(hf, f"{name}_token_id") for name in ("bos", "eos", "pad", "unk")} == \
        {name: getattr(ours, f"{name}_id") for name in ("bos", "eos", "pad", "unk")}
    assert len(hf) == ours.vocab_size
    rare = ours.encode(RARE)
    assert len(rare) == len(RARE.encode()) and all(ours.id_to_piece(i).startswith("<0x") for i in rare)
    for text in TEXTS:
        ids = ours.encode(text, add_bos=True)   # what taichu generate feeds the model
        assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids) == text
    # A batch pads on the left with our pad id, as batched generation needs.
    batch = hf(TEXTS[:2], padding=True)
    short = min(range(2), key=lambda i: len(ours.encode(TEXTS[i])))
    assert batch["input_ids"][short][0] == ours.pad_id and batch["attention_mask"][short][0] == 0
    assert set(batch) == {"input_ids", "attention_mask"}   # no token_type_ids for GPT-2 to embed


def test_literal_space_mark_is_the_reported_difference(hf_dir, trained_tiny):
    """The note names U+2581 as the input that differs: check that it is true."""
    from transformers import AutoTokenizer

    ours = Tokenizer(trained_tiny / "tokenizer.model")
    hf = AutoTokenizer.from_pretrained(hf_dir)
    assert hf("a\u2581b", add_special_tokens=False)["input_ids"] == hf("a b", add_special_tokens=False)["input_ids"]
    assert ours.encode("a\u2581b") != ours.encode("a b")


def test_pipeline_continues_as_taichu_generate(hf_dir, trained_tiny):
    """pipeline("text-generation", model=DIR) with the directory's own tokenizer, greedy, gives
    the text `taichu generate --temperature 0` prints (prompt + continuation); both with the
    same CTRL repetition penalty, which keeps the briefly trained model from repeating one token."""
    from transformers import pipeline

    config = json.loads((hf_dir / "config.json").read_text())
    ours = Tokenizer(trained_tiny / "tokenizer.model")
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == \
        (ours.bos_id, ours.eos_id, ours.pad_id)
    generator = pipeline("text-generation", model=str(hf_dir))
    assert generator.model.generation_config.eos_token_id == ours.eos_id
    continuations = ""
    for prompt in ("中国人民", "经济"):    # here the first stops at eos, the second runs 24 tokens
        done = taichu_cli("generate", trained_tiny, "--backend", "torch", "--prompt", prompt,
                          "--temperature", "0", "--max-new-tokens", "24", "--repetition-penalty", "1.5")
        assert done.returncode == 0, done.stderr
        expected = done.stdout.rstrip("\n")
        text = generator(prompt, max_new_tokens=24, do_sample=False, repetition_penalty=1.5)[0]["generated_text"]
        assert text == expected, (prompt, text, expected)
        continuations += expected[len(prompt):]
    assert len(set(continuations)) > 2          # real continuations, not one repeated token


def test_hf_directory_round_trip_brings_the_tokenizer_back(hf_dir, trained_tiny, tmp_path):
    """HF -> ours keeps tokenizer.model as it is; without it, one rebuilt from tokenizer.json
    encodes as the original, and config.yaml's tokenizer section follows it."""
    done = taichu_cli("convert", hf_dir, tmp_path / "back", "--strict")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == (trained_tiny / "tokenizer.model").read_bytes()
    assert load_config(tmp_path / "back") == load_config(trained_tiny)

    bare = tmp_path / "bare"
    shutil.copytree(hf_dir, bare)
    (bare / "tokenizer.model").unlink()
    hf_config = json.loads((bare / "config.json").read_text())
    del hf_config["taichu_config"]                  # as a directory not written by taichu
    (bare / "config.json").write_text(json.dumps(hf_config))
    report = convert.convert(bare, tmp_path / "rebuilt")
    assert report["tokenizer_problem"] is None
    assert any("rebuilt from" in n for n in report["notes"]), report["notes"]
    original, rebuilt = Tokenizer(trained_tiny / "tokenizer.model"), Tokenizer(tmp_path / "rebuilt" / "tokenizer.model")
    assert [rebuilt.id_to_piece(i) for i in range(rebuilt.vocab_size)] == \
        [original.id_to_piece(i) for i in range(original.vocab_size)]
    for text in TEXTS + ["a\u2581b"]:
        assert rebuilt.encode(text, add_bos=True) == original.encode(text, add_bos=True), text
        assert rebuilt.decode(rebuilt.encode(text)) == text
    assert load_config(tmp_path / "rebuilt").tokenizer.special_tokens == \
        load_config(trained_tiny).tokenizer.special_tokens
    done = taichu_cli("generate", tmp_path / "rebuilt", "--backend", "torch", "--prompt", "中国",
                      "--temperature", "0", "--max-new-tokens", "5")
    assert done.returncode == 0, done.stderr


def test_hf_directory_without_a_sentencepiece_tokenizer(hf_dir, tmp_path):
    """No tokenizer (or GPT-2's byte-level BPE): the weights convert, a note says why there is
    no tokenizer.model, and --strict turns it into exit 1."""
    bare = tmp_path / "bare"
    shutil.copytree(hf_dir, bare)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink()
    with pytest.raises(ConfigError, match="no SentencePiece-based tokenizer"):
        read_hf_tokenizer(bare, tmp_path / "nothing")
    assert not (tmp_path / "nothing" / "tokenizer.model").exists()
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    gpt2_style = HFTokenizer(models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")]))
    gpt2_style.pre_tokenizer = pre_tokenizers.ByteLevel()
    gpt2_style.save(str(bare / "tokenizer.json"))
    for strict, code in (([], 0), (["--strict"], 1)):
        out = tmp_path / f"out{len(strict)}"
        done = taichu_cli("convert", bare, out, *strict)
        assert done.returncode == code, done.stderr
        assert "model type 'BPE' has no SentencePiece equivalent" in done.stdout
        assert (out / "model.safetensors").is_file() and not (out / "tokenizer.model").exists()


def test_bpe_tokenizer_converts_exactly(tmp_path):
    """A config with tokenizer.model_type bpe: its SentencePiece BPE as ranked merges gives
    the same ids and text in transformers."""
    from transformers import AutoTokenizer

    from taichu.corpus import load_corpus
    from taichu.tokenizer import train_tokenizer

    config = load_config(CONFIGS / "gpt" / "gpt-tiny.yaml", ["tokenizer.model_type=bpe"])
    ours = train_tokenizer(load_corpus(config.data).train[:3000], config.tokenizer, config.model.vocab_size,
                           tmp_path / "tokenizer.model")
    write_hf_tokenizer(ours.path, tmp_path / "hf", config)
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    for text in TEXTS:
        ids = ours.encode(text, add_bos=True)
        assert hf(text)["input_ids"] == ids, text
        assert hf.decode(ids, skip_special_tokens=True) == text


def _foreign_tokenizer(path: Path, vocab_size: int) -> Path:
    """A SentencePiece model trained with SentencePiece's own defaults (NFKC normalisation,
    a dummy space prefix) and taichu's special pieces: taichu can use it, but this converter
    writes no tokenizer.json for it. At most ``vocab_size`` pieces (the text is small)."""
    import sentencepiece as spm

    lines = ["中国人民在北京庆祝节日。", "今天天气很好，我们去公园。", "一二三四五六七八九十"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(path.with_suffix("")),
                                   vocab_size=vocab_size, byte_fallback=True, pad_id=0, unk_id=1, bos_id=2,
                                   eos_id=3, minloglevel=2, hard_vocab_limit=False)
    return path


def test_inexpressible_tokenizer_is_a_note_and_strict_exits_1(tmp_path):
    tokenizer = _foreign_tokenizer(tmp_path / "tokenizer.model", 300)
    config = load_config(CONFIGS / "gpt" / "gpt-tiny.yaml", [f"model.vocab_size={Tokenizer(tokenizer).vocab_size}"])
    source = taichu.save_model(taichu.build_model(config, "torch"), tmp_path / "ours", tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="normalization rule 'nmt_nfkc'.*add_dummy_prefix"):
        write_hf_tokenizer(tokenizer, tmp_path / "direct", config)
    assert not (tmp_path / "direct").exists()
    for strict, code in (([], 0), (["--strict"], 1)):
        out = tmp_path / f"hf{len(strict)}"
        done = taichu_cli("convert", source, out, "--to", "hf", *strict)
        assert done.returncode == code, done.stderr
        assert "the Hugging Face directory has no tokenizer" in done.stdout
        assert "normalization rule 'nmt_nfkc'" in done.stdout
        assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
        assert not (out / "tokenizer.json").exists()
    assert "--strict" in taichu_cli("convert", source, tmp_path / "hf9", "--to", "hf", "--strict").stderr


def test_clip_directory_tokenizer_frames_captions_as_taichu(tiny_tokenizer, tmp_path):
    """A CLIP's tokenizer.json adds bos and eos and pads on the right: the ids
    taichu.imagetext.caption_ids gives the text tower."""
    from transformers import AutoTokenizer

    from taichu.imagetext import caption_ids

    config = load_config(CONFIGS / "clip" / "clip-tiny.yaml")
    source = taichu.save_model(taichu.build_model(config, "torch"), tmp_path / "clip", tokenizer=tiny_tokenizer)
    report = convert.convert(source, tmp_path / "hf", to="hf")
    assert report["tokenizer_problem"] is None
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    length = config.model.text.max_position_embeddings
    texts = ["左边一个红色的正方形", f"手写的数字七{RARE}😀"]
    ids, mask = caption_ids(Tokenizer(tiny_tokenizer), texts, length)
    batch = hf(texts, padding="max_length", max_length=length)
    assert batch["input_ids"] == ids.tolist() and batch["attention_mask"] == mask.tolist()

import json
import subprocess
import sys

import numpy as np
import pytest

from taichu.config import validate_config
from taichu.corpus import load_corpus, peoples_daily_paragraphs
from taichu.data import BlockDataset, default_cache_dir, load_blocks, pack_corpus
from taichu.tokenizer import Tokenizer, ensure_tokenizer, train_tokenizer

# SentencePiece refuses character_coverage < 0.98; at 0.98 these 3000 paragraphs need
# about 1700 characters, so the vocabulary must be larger than that.
VOCAB = 2048
SUBSET = 3000


def gpt_config(tmp, vocab_size=VOCAB, **tokenizer):
    return validate_config({
        "family": "gpt",
        "model": {"vocab_size": vocab_size, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
                  "max_position_embeddings": 128, "activation": "gelu", "layer_norm_eps": 1e-5},
        "tokenizer": {"model_type": "unigram", "character_coverage": 0.98, **tokenizer},
        "data": {"corpus": str(tmp / "news.txt"), "seq_len": 64, "validation_fraction": 0.05,
                 "cache_dir": str(tmp / "cache")}}, "test")


@pytest.fixture(scope="module")
def paragraphs():
    return peoples_daily_paragraphs()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, paragraphs):
    """A config whose corpus is the first 3000 People's Daily paragraphs, and its tokenizer."""
    tmp = tmp_path_factory.mktemp("tok")
    (tmp / "news.txt").write_text("\n".join(paragraphs[:SUBSET]), encoding="utf-8")
    config = gpt_config(tmp)
    tokenizer = ensure_tokenizer(config, tmp / "tokenizer.model")
    return config, tokenizer, tmp


def test_round_trips_unseen_validation_text_exactly(trained):
    config, tokenizer, _ = trained
    validation = load_corpus(config.data).validation
    assert len(validation) > 50
    for batch in (validation, ["\n".join(validation)]):
        for text, ids in zip(batch, tokenizer.encode_batch(batch)):
            assert tokenizer.decode(ids) == text
            assert tokenizer.unk_id not in ids
    # Learned pieces, not just characters.
    assert len(tokenizer.encode("中国人民")) <= 2


@pytest.mark.parametrize("text", [
    "𠀀", "😀", "𠀀中国😀人民", "Hello, World! 123", "  leading and  double  spaces ",
    "line one\nline two\r\n\ttab", "\u2581literal space mark\u2581 ", "<s></s><unk><pad>", "",
])
def test_round_trips_rare_characters_without_unk(trained, text):
    _, tokenizer, _ = trained
    ids = tokenizer.encode(text)
    assert tokenizer.unk_id not in ids
    assert tokenizer.decode(ids) == text


def test_special_tokens_as_configured(trained):
    config, tokenizer, _ = trained
    special = config.tokenizer.special_tokens
    assert tokenizer.vocab_size == VOCAB
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    assert [tokenizer.id_to_piece(i) for i in range(4)] == [special.pad, special.unk, special.bos, special.eos]
    ids = tokenizer.encode("中国", add_bos=True, add_eos=True)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id and len(ids) >= 3
    assert tokenizer.decode([tokenizer.pad_id] + ids + [tokenizer.pad_id]) == "中国"
    with pytest.raises(ValueError, match="out of range"):
        tokenizer.decode([VOCAB])


def test_custom_special_ids_and_bpe(tmp_path, paragraphs):
    config = gpt_config(tmp_path, vocab_size=2000, model_type="bpe", special_tokens={
        "pad_id": 3, "unk_id": 0, "bos_id": 1, "eos_id": 2, "bos": "<bos>", "eos": "<eos>"})
    tokenizer = train_tokenizer(paragraphs[:600], config.tokenizer, 2000, tmp_path / "bpe.model")
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (3, 0, 1, 2)
    assert tokenizer.id_to_piece(1) == "<bos>" and tokenizer.id_to_piece(2) == "<eos>"
    text = paragraphs[1000] + " 😀"
    assert tokenizer.decode(tokenizer.encode(text, add_bos=True, add_eos=True)) == text


def test_too_small_corpus_says_what_to_do(tmp_path, paragraphs):
    config = gpt_config(tmp_path)
    out = tmp_path / "small.model"
    with pytest.raises(ValueError, match=r"too small for model\.vocab_size 2048.*lower model\.vocab_size"):
        train_tokenizer(paragraphs[:20], config.tokenizer, VOCAB, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"vocab_size 1024 cannot hold .*character_coverage"):
        train_tokenizer(paragraphs[:SUBSET], config.tokenizer, 1024, out)


def test_ensure_tokenizer_reuses_and_refuses_other_vocab(trained):
    config, tokenizer, tmp = trained
    path = tmp / "tokenizer.model"
    mtime = path.stat().st_mtime_ns
    again = ensure_tokenizer(config, path)
    assert again.sha256 == tokenizer.sha256 and path.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match=r"tokenizer\.model.*vocab_size is 2048 but model\.vocab_size is 4096"):
        ensure_tokenizer(gpt_config(tmp, vocab_size=4096), path)


def test_missing_or_corrupt_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match=r"bad\.model: not a valid SentencePiece model"):
        Tokenizer(bad)


def test_packed_blocks_are_cached_and_overlap(trained):
    config, tokenizer, tmp = trained
    first = load_blocks(config, tokenizer, "validation")
    second = load_blocks(config, tokenizer, "validation")
    assert not first.packed.from_cache and second.packed.from_cache
    assert first.packed.path == second.packed.path and first.packed.path.parent == tmp / "cache"
    assert np.array_equal(first.tokens, second.tokens) and first.tokens.dtype == np.uint16
    meta = json.loads(first.packed.path.with_suffix(".json").read_text(encoding="utf-8"))
    assert meta["length"] == len(first.tokens) and meta["key"]["split"] == "validation"
    assert meta["key"]["tokenizer_sha256"] == tokenizer.sha256

    # The stream is [bos] doc [eos] [bos] doc ... in corpus order.
    validation = load_corpus(config.data).validation
    head = [tokenizer.bos_id] + tokenizer.encode(validation[0]) + [tokenizer.eos_id, tokenizer.bos_id]
    assert first.tokens[:len(head)].tolist() == head
    assert int((first.tokens == tokenizer.bos_id).sum()) == len(validation)

    ds, seq = second, config.data.seq_len
    assert len(ds) == (len(ds.tokens) - 1) // seq > 5
    block = ds[0]
    assert block.dtype == np.int64 and block.shape == (seq + 1,)
    for i in range(len(ds) - 1):
        assert ds[i][-1] == ds[i + 1][0]
    assert np.array_equal(ds[len(ds) - 1][1:], ds.tokens[len(ds) * seq - seq + 1: len(ds) * seq + 1])
    assert np.array_equal(ds.batch([2, 0, len(ds) - 1]), np.stack([ds[2], ds[0], ds[-1]]))
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(IndexError):
        ds.batch([0, len(ds)])

    train = load_blocks(config, tokenizer, "train")
    assert train.packed.path != first.packed.path and len(train) > 10 * len(ds)


def test_corrupt_cache_is_rebuilt(trained, tmp_path):
    config, tokenizer, _ = trained
    texts = load_corpus(config.data).validation[:40]
    packed = pack_corpus(texts, tokenizer, tmp_path, {"split": "validation"})
    original = np.array(packed.tokens)
    with open(packed.path, "ab") as f:  # a torn or foreign file: size no longer matches
        f.write(b"\0\0\0")
    with pytest.warns(UserWarning, match="corrupt"):
        rebuilt = pack_corpus(texts, tokenizer, tmp_path, {"split": "validation"})
    assert not rebuilt.from_cache and np.array_equal(rebuilt.tokens, original)
    assert pack_corpus(texts, tokenizer, tmp_path, {"split": "validation"}).from_cache
    # Different texts never hit the same cache entry.
    assert not pack_corpus(texts[:-1], tokenizer, tmp_path, {"split": "validation"}).from_cache
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".bin", ".bin", ".json", ".json"]


def test_block_dataset_needs_one_block():
    with pytest.raises(ValueError, match="lower data.seq_len"):
        BlockDataset(np.arange(10, dtype=np.uint16), seq_len=10)
    assert len(BlockDataset(np.arange(11, dtype=np.uint16), seq_len=10)) == 1


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TAICHU_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "data"
    monkeypatch.delenv("TAICHU_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "taichu", "data")


def test_training_on_a_sample_is_reproducible(tmp_path):
    """More lines than tokenizer.max_training_sentences: every process draws the same
    sample and trains the same model (SentencePiece's own sampling, even after
    set_random_generator_seed, gave another model in every process). Separate processes:
    within one process SentencePiece repeated itself."""
    script = (
        "import sys\n"
        "from taichu.config import TokenizerConfig\n"
        "from taichu.corpus import peoples_daily_paragraphs\n"
        "from taichu.tokenizer import train_tokenizer\n"
        "config = TokenizerConfig(character_coverage=0.98, max_training_sentences=3000)\n"
        "start = int(sys.argv[2])\n"
        "train_tokenizer(peoples_daily_paragraphs()[start:start + 6000], config, 2048, sys.argv[1])\n")
    models = []
    for run, start in enumerate((0, 0, 0, 6000)):
        out = tmp_path / f"{run}.model"
        subprocess.run([sys.executable, "-c", script, str(out), str(start)], check=True)
        models.append(out.read_bytes())
    assert models[0] == models[1] == models[2]
    assert models[3] != models[0]          # another slice of the corpus, another model

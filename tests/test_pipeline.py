"""The command-line path a user takes: tokenizer -> model directory -> both backends."""
import subprocess
import sys

import numpy as np

import taichu
from taichu.tokenizer import Tokenizer
from conftest import CONFIGS

TINY = str(CONFIGS / "gpt" / "gpt-tiny.yaml")


def taichu_cli(*args):
    return subprocess.run([sys.executable, "-m", "taichu", *map(str, args)], capture_output=True, text=True)


def test_init_then_parity_on_held_out_text(tiny_tokenizer, tmp_path):
    model_dir = tmp_path / "init"
    done = taichu_cli("init", TINY, "--backend", "mindspore", "--tokenizer", tiny_tokenizer,
                      "--out", model_dir, "--set", "model.num_layers=3")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.yaml", "model.safetensors", "tokenizer.model"]
    assert taichu.load_config(model_dir).model.num_layers == 3
    info = taichu_cli("info", model_dir)
    assert "layers:     3" in info.stdout and "tokenizer:  " + str(model_dir / "tokenizer.model") in info.stdout
    for mode in ([], ["--graph"]):
        parity = taichu_cli("parity", model_dir, *mode)
        assert parity.returncode == 0, parity.stderr
        diff = float(parity.stdout.split("logit = ")[1].split(",")[0])
        assert diff <= 1e-5 and "argmax agreement 100.00%" in parity.stdout


def test_resaved_model_keeps_its_tokenizer(tiny_tokenizer, tmp_path, tiny_config):
    first = taichu.save_model(taichu.build_model(tiny_config, "torch"), tmp_path / "a", tokenizer=tiny_tokenizer)
    second = taichu.save_model(taichu.load_model(first, backend="mindspore"), tmp_path / "b")
    assert (second / "tokenizer.model").read_bytes() == tiny_tokenizer.read_bytes()
    tokenizer = Tokenizer(second / "tokenizer.model")
    text = "中国人民银行今天宣布，😀 emoji 与罕见字𠀀都能还原。"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and tokenizer.unk_id not in ids
    logits = taichu.load_model(second, backend="torch")(__import__("torch").tensor([ids])).detach().numpy()
    assert logits.shape == (1, len(ids), tiny_config.model.vocab_size) and np.isfinite(logits).all()


def test_parity_without_tokenizer_is_a_clear_error(tiny_config, tmp_path):
    taichu.save_model(taichu.build_model(tiny_config, "torch"), tmp_path / "m")
    done = taichu_cli("parity", tmp_path / "m")
    assert done.returncode == 2 and "parity needs a tokenizer.model" in done.stderr

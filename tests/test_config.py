"""Config errors name the key and the file; overrides are typed and checked."""
import subprocess
import sys

import pytest
import yaml

from taichu.config import ConfigError, load_config
from conftest import CONFIGS

TINY = CONFIGS / "gpt" / "gpt-tiny.yaml"


def write_variant(tmp_path, edit):
    raw = yaml.safe_load(TINY.read_text())
    edit(raw)
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return path


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    config = load_config(path)
    assert config.model.activation in ("gelu", "gelu_new", "relu", "quick_gelu")


@pytest.mark.parametrize("edit, expected", [
    (lambda r: r["model"].update(num_layer=4), r"model\.num_layer: unknown key \(did you mean 'num_layers'\?\)"),
    (lambda r: r.update(trainer={}), r"trainer: unknown key"),
    (lambda r: r["model"].update(num_layers="four"), r"model\.num_layers: .*integer.*'four'"),
    (lambda r: r["model"].update(num_layers=2.5), r"model\.num_layers: .*integer"),
    (lambda r: r["model"].update(num_heads=3), r"hidden_size 64 is not divisible by num_heads 3"),
    (lambda r: r["model"].update(vocab_size=200), r"vocab_size 200 is smaller than the 4 special tokens \+ 256 byte-fallback pieces \(260\)"),
    (lambda r: r["model"].update(activation="swish"), r"model\.activation: Input should be 'gelu', 'gelu_new' or 'relu'"),
    (lambda r: r["model"].pop("layer_norm_eps"), r"model\.layer_norm_eps: Field required"),
    (lambda r: r["data"].update(seq_len=256), r"data\.seq_len 256 exceeds model\.max_position_embeddings 128"),
    (lambda r: r["tokenizer"].update(special_tokens={"pad_id": 1}), r"special token ids must be distinct"),
    (lambda r: r.update(family="bert"), r"family: unknown family 'bert'"),
])
def test_bad_config_names_key_and_file(tmp_path, edit, expected):
    path = write_variant(tmp_path, edit)
    with pytest.raises(ConfigError, match=expected) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_all_errors_are_reported_at_once(tmp_path):
    def edit(raw):
        raw["model"].update(hidden=1, dropuot=0.1)
    with pytest.raises(ConfigError) as err:
        load_config(write_variant(tmp_path, edit))
    assert "model.hidden: unknown key" in str(err.value)
    assert "model.dropuot: unknown key (did you mean 'dropout'?)" in str(err.value)


def test_overrides_are_typed_and_validated():
    config = load_config(TINY, ["model.num_layers=4", "model.layer_norm_eps=1e-6", "data.corpus=a.txt"])
    assert config.model.num_layers == 4 and config.model.layer_norm_eps == 1e-6
    assert config.data.corpus == "a.txt"
    with pytest.raises(ConfigError, match=r"model\.num_layerz: unknown key .*\[from --set model\.num_layerz=4\]"):
        load_config(TINY, ["model.num_layerz=4"])
    with pytest.raises(ConfigError, match=r"model\.num_heads.*\[from --set model\.num_heads=x\]"):
        load_config(TINY, ["model.num_heads=x"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(TINY, ["model.num_layers"])


def test_yaml_float_without_dot_and_missing_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(TINY.read_text().replace("1.0e-5", "1e-5"))
    assert load_config(path).model.layer_norm_eps == 1e-5
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    path.write_text("family: gpt\nmodel: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_importing_taichu_imports_no_framework():
    code = "import sys, taichu, taichu.cli; assert 'torch' not in sys.modules and 'mindspore' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_info_prints_parameter_count():
    out = subprocess.run([sys.executable, "-m", "taichu", "info", str(CONFIGS / "gpt" / "taichu-text-3b2.yaml")],
                         capture_output=True, text=True, check=True).stdout
    assert "family:     gpt" in out and "layers:     40" in out
    assert "(3.23 B)" in out
    out = subprocess.run([sys.executable, "-m", "taichu", "info", str(TINY), "--set", "model.num_layers=3"],
                         capture_output=True, text=True, check=True).stdout
    assert "layers:     3" in out


def test_cli_bad_config_exits_2_with_message(tmp_path):
    path = write_variant(tmp_path, lambda r: r["model"].update(num_heads=5))
    result = subprocess.run([sys.executable, "-m", "taichu", "info", str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "not divisible by num_heads 5" in result.stderr and "Traceback" not in result.stderr

"""Model directories: strict loading, refusal of corrupt files, nothing half-loaded."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import taichu
from taichu.weights import CheckpointError, from_mindspore_name, load_safetensors, to_mindspore_name


@pytest.fixture
def model_dir(tiny_config, tmp_path):
    return taichu.save_model(taichu.build_model(tiny_config, "torch"), tmp_path / "model")


def test_directory_is_self_describing(model_dir, tiny_config):
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.yaml", "model.safetensors"]
    assert taichu.load_config(model_dir) == tiny_config
    names = set(load_file(model_dir / "model.safetensors"))
    assert "embed_tokens.weight" in names and "layers.1.ln_2.bias" in names


def test_mismatched_checkpoint_lists_missing_unexpected_misshaped(model_dir):
    tensors = load_file(model_dir / "model.safetensors")
    tensors["layers.0.attn.q_projection.weight"] = tensors.pop("layers.0.attn.q_proj.weight")
    tensors["layers.1.mlp.fc_in.bias"] = np.zeros(7, np.float32)
    tensors["extra.scale"] = np.ones(1, np.float32)
    save_file(tensors, model_dir / "model.safetensors")
    for backend in ("torch", "mindspore"):
        with pytest.raises(CheckpointError) as err:
            taichu.load_model(model_dir, backend=backend)
        text = str(err.value)
        assert "1 missing, 2 unexpected, 1 mis-shaped" in text
        assert "missing:     layers.0.attn.q_proj.weight (64, 64)" in text
        assert ("unexpected:  layers.0.attn.q_projection.weight (64, 64) "
                "(closest expected name: layers.0.attn.q_proj.weight)") in text
        assert "mis-shaped:  layers.1.mlp.fc_in.bias has (7,), config expects (256,)" in text


def test_config_with_other_layer_count_is_refused(model_dir):
    config_path = model_dir / "config.yaml"
    config_path.write_text(config_path.read_text().replace("num_layers: 2", "num_layers: 3"))
    with pytest.raises(CheckpointError, match=r"missing:     layers\.2\.ln_1\.weight"):
        taichu.load_model(model_dir, backend="torch")


@pytest.mark.parametrize("cut", [10, 100, -100])
def test_truncated_file_is_refused(model_dir, cut):
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        taichu.load_model(model_dir, backend="mindspore")


@pytest.mark.parametrize("backend", ["torch", "mindspore"])
def test_failed_load_changes_no_weight(tiny_config, backend):
    model = taichu.build_model(tiny_config, backend)
    before = taichu.state_dict(model)
    bad = {name: np.full_like(a, 7.0) for name, a in before.items()}
    bad["ln_f.weight"] = np.ones(65, np.float32)
    with pytest.raises(CheckpointError, match="mis-shaped:  ln_f.weight"):
        taichu.load_state_dict(model, bad)
    after = taichu.state_dict(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_sharded_directory_round_trips(tiny_config, tmp_path):
    model = taichu.build_model(tiny_config, "torch")
    path = taichu.save_model(model, tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (path / "model.safetensors").exists()
    loaded = taichu.load_model(path, backend="mindspore")
    expected, got = taichu.state_dict(model), taichu.state_dict(loaded)
    assert all(np.array_equal(expected[k], got[k]) for k in expected)
    (path / sorted(shards)[0]).unlink()
    with pytest.raises(CheckpointError, match="shards named in the index are missing"):
        taichu.load_model(path, backend="torch")


def test_resaving_a_directory_replaces_shards(tiny_config, tmp_path):
    model = taichu.build_model(tiny_config, "torch")
    taichu.save_model(model, tmp_path / "m", max_shard_bytes=200_000)
    taichu.save_model(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").glob("model*")) == ["model.safetensors"]
    assert set(load_safetensors(tmp_path / "m")) == set(taichu.state_dict(model))


def test_mindspore_leaf_names_follow_layer_kind(tiny_config):
    assert to_mindspore_name("layers.0.ln_1.weight", "layer_norm") == "layers.0.ln_1.gamma"
    assert to_mindspore_name("embed_tokens.weight", "embedding") == "embed_tokens.embedding_table"
    assert to_mindspore_name("layers.0.attn.q_proj.weight", "linear") == "layers.0.attn.q_proj.weight"
    assert from_mindspore_name("ln_f.beta", "layer_norm") == "ln_f.bias"
    ms_model = taichu.build_model(tiny_config, "mindspore")
    ms_names = {p.name for p in ms_model.get_parameters()}
    assert "layers.0.ln_1.gamma" in ms_names and "embed_tokens.embedding_table" in ms_names
    assert set(taichu.state_dict(ms_model)) == set(taichu.state_dict(taichu.build_model(tiny_config, "torch")))


def test_mindspore_graph_compiled_before_a_load_sees_the_loaded_weights(tiny_config):
    """A MindSpore graph keeps reading the buffers a parameter had when it compiled:
    loading must write into them (set_data would leave the graph on the old weights)."""
    import mindspore as ms

    model = taichu.build_model(tiny_config, "mindspore")
    model.set_train(False)
    ids = ms.Tensor(np.arange(1, 9, dtype=np.int32).reshape(1, 8))

    def forward(input_ids):
        return model(input_ids)

    compiled = ms.jit(forward)
    before = compiled(ids).asnumpy()
    other = taichu.build_model(tiny_config, "torch")
    taichu.load_state_dict(model, taichu.state_dict(other))
    import torch

    with torch.no_grad():
        expected = other(torch.from_numpy(np.arange(1, 9).reshape(1, 8))).numpy()
    after = compiled(ids).asnumpy()
    assert np.abs(before - expected).max() > 1e-2       # the load changed the outputs
    np.testing.assert_allclose(after, expected, atol=1e-5, rtol=0)

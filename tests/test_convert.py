"""Weight conversion (taichu/convert.py): exact round trips, Hugging Face as the oracle,
real MindSpore reading and writing our .ckpt files, strict errors, bounded shards."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import taichu
from taichu import convert
from taichu.config import ConfigError, validate_config
from taichu.weights import CheckpointError

DTYPES = ["fp32", "fp16", "bf16"]


def small_config(layers=2, hidden=64, heads=4, activation="gelu_new", eps=1e-5, vocab=320, positions=32):
    return validate_config({
        "family": "gpt",
        "model": {"vocab_size": vocab, "hidden_size": hidden, "num_layers": layers, "num_heads": heads,
                  "max_position_embeddings": positions, "activation": activation, "layer_norm_eps": eps},
        "data": {"seq_len": positions}}, "test config")


def randomise(module, seed):
    """Every weight random (not HF's ones/zeros init), so a mis-mapped bias or norm shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    model = taichu.build_model(small_config(), "torch")
    randomise(model, 0)
    return taichu.save_model(model, tmp_path_factory.mktemp("ours") / "model")


def bits(arrays):
    return {k: (v.dtype.name, v.shape, v.tobytes()) for k, v in arrays.items()}


def ids(vocab, shape=(2, 7), seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape)


def torch_logits(model, input_ids):
    with torch.no_grad():
        return model(torch.tensor(input_ids)).numpy()


def mindspore_logits(model, input_ids):
    import mindspore as ms

    return model(ms.Tensor(input_ids, ms.int32)).asnumpy()


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("via", ["x.ckpt", "ms.safetensors", "hf", "torch.safetensors"])
def test_round_trip_is_bitwise_exact(ours, tmp_path, dtype, via):
    start = tmp_path / "start"
    convert.convert(ours, start, dtype=dtype)
    to = {"x.ckpt": None, "ms.safetensors": "mindspore", "hf": "hf", "torch.safetensors": None}[via]
    report = convert.convert(start, tmp_path / via, to=to)
    assert report["target_format"] == {"x.ckpt": "mindspore", "ms.safetensors": "mindspore",
                                       "hf": "hf", "torch.safetensors": "torch"}[via]
    assert convert.detect_format(tmp_path / via) == report["target_format"]
    convert.convert(tmp_path / via, tmp_path / "back", config=None if via == "hf" else start)
    config, before = convert.load(start)
    config_back, after = convert.load(tmp_path / "back")
    assert config_back == config
    assert bits(after) == bits(before)
    assert {a.dtype.name for a in after.values()} == {convert.DTYPES[dtype]}


def test_save_and_load_api(ours, tmp_path):
    config, arrays = convert.load(ours)
    for fmt, path in (("mindspore", tmp_path / "m.ckpt"), ("hf", tmp_path / "hf"), ("taichu", tmp_path / "t")):
        convert.save(config, arrays, path, format=fmt, dtype="fp16")
        _, back = convert.load(path, config=config if fmt == "mindspore" else None)
        assert bits(back) == bits({k: v.astype(np.float16) for k, v in arrays.items()})


# ----------------------------------------------------------------------------- Hugging Face oracle

HF_SHAPES = [
    dict(n_embd=96, n_head=3, n_layer=2, activation_function="gelu_new", layer_norm_epsilon=1e-5),
    dict(n_embd=64, n_head=4, n_layer=3, n_inner=96, activation_function="gelu", layer_norm_epsilon=1e-6),
    dict(n_embd=32, n_head=2, n_layer=1, activation_function="relu", layer_norm_epsilon=1e-5),
]


@pytest.mark.parametrize("shape", HF_SHAPES, ids=["3heads-of-32", "n_inner-gelu", "relu"])
def test_hugging_face_gpt2_converts_to_the_same_logits(tmp_path, shape):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = GPT2Config(vocab_size=300, n_positions=40, attn_implementation="eager", **shape)
    hf_model = GPT2LMHeadModel(hf_config).eval()
    randomise(hf_model, 1)
    hf_model.save_pretrained(tmp_path / "hf")
    report = convert.convert(tmp_path / "hf", tmp_path / "ours")
    assert report["source_format"] == "hf" and any("tokenizer" in n for n in report["notes"])
    input_ids = ids(300, (2, 9))
    with torch.no_grad():
        expected = hf_model(torch.tensor(input_ids)).logits.numpy()
    config = taichu.load_config(tmp_path / "ours")
    assert config.model.layer_norm_eps == shape["layer_norm_epsilon"]
    np.testing.assert_allclose(torch_logits(taichu.load_model(tmp_path / "ours", "torch"), input_ids),
                               expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(mindspore_logits(convert.load_model(tmp_path / "hf", "mindspore"), input_ids),
                               expected, atol=1e-4, rtol=0)


def test_our_model_loads_in_hugging_face(ours, tmp_path):
    from transformers import GPT2LMHeadModel

    convert.convert(ours, tmp_path / "hf", to="hf", max_shard_bytes=200_000)  # sharded, with index
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    hf_model, info = GPT2LMHeadModel.from_pretrained(tmp_path / "hf", output_loading_info=True,
                                                     attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    input_ids = ids(320)
    with torch.no_grad():
        got = hf_model.eval()(torch.tensor(input_ids)).logits.numpy()
    np.testing.assert_allclose(got, torch_logits(taichu.load_model(ours, "torch"), input_ids),
                               atol=1e-4, rtol=0)


def test_hf_tied_head_and_old_buffers(ours, tmp_path):
    from safetensors.numpy import load_file, save_file

    convert.convert(ours, tmp_path / "hf", to="hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(path)
    # The hub's gpt2 layout: no "transformer." prefix, causal-mask buffers saved.
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
    tensors["lm_head.weight"] = tensors["wte.weight"].copy()
    save_file(tensors, path, metadata={"format": "pt"})
    _, arrays = convert.load(tmp_path / "hf")
    assert bits(arrays) == bits(convert.load(ours)[1])
    tensors["lm_head.weight"][0, 0] += 1
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        convert.load(tmp_path / "hf")


def test_unsupported_hf_features_are_refused(ours, tmp_path):
    convert.convert(ours, tmp_path / "hf", to="hf")
    path = tmp_path / "hf" / "config.json"
    hf = json.loads(path.read_text())
    hf.pop("taichu_config")
    path.write_text(json.dumps({**hf, "scale_attn_by_inverse_layer_idx": True}))
    with pytest.raises(ConfigError, match="scale_attn_by_inverse_layer_idx"):
        convert.load(tmp_path / "hf")
    path.write_text(json.dumps({**hf, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="only Hugging Face GPT-2"):
        convert.load(tmp_path / "hf")


# ----------------------------------------------------------------------------- MindSpore

def test_ckpt_reader_and_writer_agree_with_mindspore(tmp_path):
    import mindspore as ms
    from ml_dtypes import bfloat16

    rng = np.random.default_rng(0)
    arrays = {"a.weight": rng.standard_normal((3, 5)).astype(np.float32),
              "b.gamma": rng.standard_normal(7).astype(np.float16),
              "c.embedding_table": rng.standard_normal((4, 2)).astype(bfloat16),
              "d.scalar": np.array(2.5, np.float32)}
    # 16-byte slices: tensors split into several entries with one tag, as MindSpore does
    # above 512 MiB, so the real loader must join them.
    convert.write_ckpt(convert.Tensors.from_arrays(arrays), tmp_path / "ours.ckpt", slice_bytes=16)
    loaded = ms.load_checkpoint(str(tmp_path / "ours.ckpt"))
    assert set(loaded) == set(arrays)
    for name, array in arrays.items():
        got = loaded[name]
        assert str(got.dtype) == {"float32": "Float32", "float16": "Float16", "bfloat16": "BFloat16"}[array.dtype.name]
        assert tuple(got.shape) == array.shape
        assert np.array_equal(got.float().asnumpy(), array.astype(np.float32))

    params = [{"name": k, "data": ms.Tensor(v.astype(np.float32), dtype=ms.bfloat16 if v.dtype == bfloat16
                                            else ms.float16 if v.dtype == np.float16 else ms.float32)}
              for k, v in arrays.items()]
    ms.save_checkpoint(params, str(tmp_path / "theirs.ckpt"), crc_check=True,
                       append_dict={"epoch_num": 3, "note": "hello"})
    tensors, strings = convert.read_ckpt(tmp_path / "theirs.ckpt")
    assert strings == {"note": "hello"}
    assert bits({k: tensors.read(k) for k in arrays}) == bits(arrays)
    assert tensors.read("epoch_num").item() == 3
    data = bytearray((tmp_path / "theirs.ckpt").read_bytes())
    data[40] ^= 1
    (tmp_path / "bad.ckpt").write_bytes(data)
    with pytest.raises(CheckpointError, match="CRC32"):
        convert.read_ckpt(tmp_path / "bad.ckpt")


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_mindspore_written_checkpoint_converts(ours, tmp_path, fmt):
    import mindspore as ms

    model = taichu.load_model(ours, backend="mindspore")
    ms.save_checkpoint(model, str(tmp_path / f"ms.{fmt}"), format=fmt,
                       append_dict={"epoch_num": 1, "step_num": 10})
    with pytest.raises(ConfigError, match="carries no config: pass --config"):
        convert.load(tmp_path / f"ms.{fmt}")
    config, arrays = convert.load(tmp_path / f"ms.{fmt}", config=ours)
    assert bits(arrays) == bits(convert.load(ours)[1])
    # ... and our .ckpt loads into the MindSpore model with MindSpore's own loader
    convert.convert(ours, tmp_path / "ours.ckpt")
    fresh = taichu.build_model(config, "mindspore")
    not_loaded, _ = ms.load_param_into_net(fresh, ms.load_checkpoint(str(tmp_path / "ours.ckpt")), strict_load=True)
    assert not not_loaded
    input_ids = ids(320)
    np.testing.assert_array_equal(mindspore_logits(fresh.set_train(False), input_ids),
                                  mindspore_logits(model, input_ids))


# ----------------------------------------------------------------------------- bad input

def test_truncated_safetensors_is_refused(ours, tmp_path):
    convert.convert(ours, tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    for cut in (9, 100, len(data) - 100):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            convert.load(tmp_path / "cut.safetensors", config=ours)


def test_truncated_ckpt_is_refused(ours, tmp_path):
    convert.convert(ours, tmp_path / "t.ckpt")
    data = (tmp_path / "t.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        convert.load(tmp_path / "cut.ckpt", config=ours)


def test_checkpoint_of_another_architecture_is_refused(tmp_path, ours):
    import mindspore as ms
    from mindspore import nn

    ms.save_checkpoint(nn.SequentialCell([nn.Dense(4, 8), nn.LayerNorm((8,))]), str(tmp_path / "other.ckpt"))
    with pytest.raises(CheckpointError) as err:
        convert.convert(tmp_path / "other.ckpt", tmp_path / "out", config=ours)
    text = str(err.value)
    assert "missing:     embed_tokens.embedding_table (320, 64)" in text
    assert "unexpected:  0.weight (8, 4)" in text
    assert not (tmp_path / "out").exists()


def test_config_with_other_layer_count_is_refused(ours, tmp_path):
    convert.convert(ours, tmp_path / "m.ckpt")
    with pytest.raises(CheckpointError, match=r"missing:     layers\.2\.ln_1\.gamma") as err:
        convert.convert(tmp_path / "m.ckpt", tmp_path / "out", config=ours,
                        overrides=["model.num_layers=3"])
    assert "2 mis-shaped" not in str(err.value) and "0 unexpected" in str(err.value)
    # a mis-named tensor is listed with its closest expected name
    from safetensors.numpy import load_file, save_file
    tensors = load_file(ours / "model.safetensors")
    tensors["layers.0.attn.q_projection.weight"] = tensors.pop("layers.0.attn.q_proj.weight")
    save_file(tensors, tmp_path / "renamed.safetensors")
    with pytest.raises(CheckpointError, match="closest expected name: layers.0.attn.q_proj.weight"):
        convert.load(tmp_path / "renamed.safetensors", config=ours)


def test_pickle_needs_allow_pickle(ours, tmp_path):
    state = {k: torch.from_numpy(v).bfloat16() for k, v in convert.load(ours)[1].items()}
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        convert.convert(tmp_path / "model.pt", tmp_path / "out", config=ours)
    convert.convert(tmp_path / "model.pt", tmp_path / "out", config=ours, allow_pickle=True)
    _, arrays = convert.load(tmp_path / "out")
    assert bits(arrays) == bits(convert.load(ours, dtype="bf16")[1])


# ----------------------------------------------------------------------------- streaming, CLI

def test_streaming_keeps_one_tensor_in_memory(tmp_path):
    import tracemalloc

    config = small_config(layers=8, vocab=300)
    arrays = {k: np.full(s.shape, 0.5, np.float32)
              for k, s in taichu.families.get_family("gpt").tensor_specs(config).items()}
    convert.save(config, arrays, tmp_path / "big")
    total = sum(a.nbytes for a in arrays.values())
    largest = max(a.nbytes for a in arrays.values())
    del arrays
    tracemalloc.start()
    convert.convert(tmp_path / "big", tmp_path / "hf", to="hf", dtype="bf16", max_shard_bytes=total // 5)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 4 * largest < total / 2, (peak, largest, total)
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    # bf16 halves the bytes: at least 3 shards, none over the bound (plus its JSON header)
    assert len(shards) >= 3 and all(s.stat().st_size <= total // 5 + 4096 for s in shards)


def test_cli_convert(ours, tmp_path, capsys):
    args = argparse.Namespace(src=str(ours), dst=str(tmp_path / "m.ckpt"), to=None, dtype="fp16",
                              config=None, allow_pickle=False, overrides=[])
    assert convert.cli_convert(args) == 0
    out = capsys.readouterr().out
    assert "(taichu)" in out and "(mindspore, float16)" in out
    args = argparse.Namespace(src=str(tmp_path / "m.ckpt"), dst=str(tmp_path / "hf"), to="hf", dtype=None,
                              config=str(ours), allow_pickle=False, overrides=[])
    assert convert.cli_convert(args) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "float16"


def test_cli_convert_and_load_model_accept_every_format(tmp_path, tiny_config):
    """The command a user runs, and taichu.load_model on its outputs, in both backends."""
    import subprocess
    import sys

    import torch

    model = taichu.build_model(tiny_config, "torch").eval()
    source = taichu.save_model(model, tmp_path / "ours")
    ids = torch.tensor([[5, 17, 300, 9]])
    expected = model(ids).detach().numpy()
    for to, dst, dtype in (("hf", tmp_path / "hf", "fp32"), ("mindspore", tmp_path / "m.ckpt", "fp32"),
                           ("taichu", tmp_path / "bf16", "bf16")):
        done = subprocess.run([sys.executable, "-m", "taichu", "convert", str(source), str(dst), "--to", to,
                               "--dtype", dtype], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert f"({to}" in done.stdout or to in done.stdout
        config = str(source) if to == "mindspore" else None
        for backend in ("torch", "mindspore"):
            loaded = taichu.load_model(dst, backend=backend, config=config)
            got = (loaded(ids).detach().numpy() if backend == "torch"
                   else loaded(__import__("mindspore").Tensor(ids.numpy().astype("int32"))).asnumpy())
            tolerance = 0.05 if dtype == "bf16" else 1e-5
            assert np.abs(got - expected).max() <= tolerance, (to, backend)
    done = subprocess.run([sys.executable, "-m", "taichu", "convert", str(tmp_path / "m.ckpt"), str(tmp_path / "x")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "carries no config: pass --config" in done.stderr


@pytest.mark.slow
def test_trained_model_continues_the_same_in_hugging_face(tmp_path, trained_tiny):
    """A GPT trained on People's Daily, converted to HF: transformers' greedy generate and
    pipeline("text-generation") give what `taichu generate --temperature 0` gives, in both backends (with the same CTRL
    repetition penalty, which also keeps a briefly trained model from repeating one token)."""
    import subprocess
    import sys

    from transformers import GPT2LMHeadModel

    from taichu.generate import SamplingConfig, generate_ids, model_step
    from taichu.tokenizer import Tokenizer

    config = taichu.load_config(trained_tiny)
    done = subprocess.run([sys.executable, "-m", "taichu", "convert", str(trained_tiny), str(tmp_path / "hf"),
                           "--to", "hf"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    tokenizer = Tokenizer(trained_tiny / "tokenizer.model")
    prompt = tokenizer.encode("中国人民", add_bos=True)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        hf_out = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                             repetition_penalty=1.5, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)[0, len(prompt):].tolist()
    hf_out = hf_out[:hf_out.index(tokenizer.eos_id)] if tokenizer.eos_id in hf_out else hf_out
    assert len(set(hf_out)) > 1                            # a real continuation, not one repeated id
    for backend in ("torch", "mindspore"):
        ours = generate_ids(model_step(taichu.load_model(trained_tiny, backend=backend)), [prompt],
                            SamplingConfig(max_new_tokens=20, temperature=0, repetition_penalty=1.5),
                            tokenizer.eos_id, tokenizer.pad_id,
                            config.model.max_position_embeddings)[0]
        assert ours == hf_out, (backend, tokenizer.decode(ours), tokenizer.decode(hf_out))
    # The public path: transformers.pipeline("text-generation") on the converted directory,
    # with the tokenizer convert wrote there (tests/test_convert_tokenizer.py tests it in depth).
    from transformers import pipeline

    generator = pipeline("text-generation", model=str(tmp_path / "hf"))
    text = generator("中国人民", max_new_tokens=20, do_sample=False, repetition_penalty=1.5,
                     return_full_text=False)[0]["generated_text"]
    assert text == tokenizer.decode(hf_out) and text


def test_config_is_compared_with_config_json_by_meaning(ours, tmp_path):
    """--config with intermediate_size null (4 x hidden) matches a config.json whose n_inner
    says 256 for hidden 64; a real difference is refused, naming the field and both values."""
    convert.convert(ours, tmp_path / "hf", to="hf")
    path = tmp_path / "hf" / "config.json"
    hf = json.loads(path.read_text())
    hf.pop("taichu_config")
    assert small_config().model.intermediate_size is None
    path.write_text(json.dumps({**hf, "n_inner": 256}))
    config, arrays = convert.load(tmp_path / "hf", config=small_config())
    assert config.model.intermediate_size is None
    assert bits(arrays) == bits(convert.load(ours)[1])
    path.write_text(json.dumps({**hf, "n_inner": 128}))
    with pytest.raises(ConfigError, match=r"disagrees with config.json on \{'intermediate_size': \(128, 256\)\}"):
        convert.load(tmp_path / "hf", config=small_config())

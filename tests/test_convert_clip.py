"""Hugging Face CLIPModel <-> our CLIP through `taichu convert` (taichu/convert.py): a random
CLIPModel converted in gives HF's features and logits in both backends; our clip-tiny
converted out loads in CLIPModel.from_pretrained and gives ours; round trips are exact;
what our CLIP cannot be is refused naming the key and the file."""
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import taichu
from taichu import convert
from taichu.cli import main as taichu_main
from taichu.config import ConfigError
from taichu.weights import CheckpointError
from conftest import CONFIGS
from tolerance import scaled_differences

PAD_ID, BOS_ID, EOS_ID = 0, 2, 3
TOL = 1e-5
# (images, text lengths): two input shapes, one with a text at the full context and one
# that is only its eos; more texts than images so the logit matrices are not square.
SHAPES = ((3, [7, 2, 13]), (2, [32, 5, 9, 1]))


def hf_clip_config(**text_extra):
    from transformers import CLIPConfig

    common = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0}
    # Towers of different widths, MLPs other than 4x, head dims 8 and 12.
    return CLIPConfig(
        text_config={**common, "vocab_size": 4096, "hidden_size": 32, "intermediate_size": 80,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 32,
                     "pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, **text_extra},
        vision_config={**common, "hidden_size": 48, "intermediate_size": 112, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": 32, "patch_size": 8, "num_channels": 3},
        projection_dim=24, logit_scale_init_value=2.6592)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random CLIPModel saved with save_pretrained, every weight perturbed (HF's init has
    LayerNorms 1/0 and biases 0, which would hide a swapped norm or a dropped bias)."""
    from transformers import CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(hf_clip_config()).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
        model.logit_scale.fill_(3.0)
    path = tmp_path_factory.mktemp("hf") / "clip"
    model.save_pretrained(path)
    return path


def inputs(seed, n_images, lengths, image_size=32):
    """Images and right-padded texts: random ordinary ids, eos last, then padding."""
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((n_images, 3, image_size, image_size)).astype(np.float32)
    ids = np.full((len(lengths), max(lengths)), PAD_ID, np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n - 1] = rng.integers(4, 4096, n - 1)
        ids[row, n - 1] = EOS_ID
        mask[row, :n] = 1
    return pixels, ids, mask


def hf_outputs(model, pixels, ids, mask):
    with torch.no_grad():
        pixels_t, ids_t, mask_t = (torch.from_numpy(x) for x in (pixels, ids, mask))
        image = model.get_image_features(pixel_values=pixels_t)
        text = model.get_text_features(input_ids=ids_t, attention_mask=mask_t)
        out = model(input_ids=ids_t, pixel_values=pixels_t, attention_mask=mask_t)
    # transformers 5 returns a model output whose pooler_output is the projected features.
    return [getattr(image, "pooler_output", image).numpy(), getattr(text, "pooler_output", text).numpy(),
            out.logits_per_image.numpy(), out.logits_per_text.numpy()]


def our_outputs(model, backend, pixels, ids, mask):
    if backend == "torch":
        with torch.no_grad():
            pixels_t, ids_t, mask_t = (torch.from_numpy(x) for x in (pixels, ids, mask))
            per_image, per_text = model(pixels_t, ids_t, mask_t)
            return [model.get_image_features(pixels_t).numpy(), model.get_text_features(ids_t, mask_t).numpy(),
                    per_image.numpy(), per_text.numpy()]
    import mindspore as ms

    pixels_t, ids_t, mask_t = ms.Tensor(pixels), ms.Tensor(ids.astype(np.int32)), ms.Tensor(mask.astype(np.int32))
    per_image, per_text = model(pixels_t, ids_t, mask_t)
    return [model.get_image_features(pixels_t).asnumpy(), model.get_text_features(ids_t, mask_t).asnumpy(),
            per_image.asnumpy(), per_text.asnumpy()]


def max_diffs(a, b):
    """Max |a - b| / max(1, max |b|) of image features, text features, logits per image,
    logits per text."""
    assert [x.shape for x in a] == [y.shape for y in b]
    return scaled_differences(a, b)


def bits(arrays):
    return {k: (v.dtype.name, v.shape, v.tobytes()) for k, v in arrays.items()}


def run_cli(capsys, *argv):
    code = taichu_main(["convert", *map(str, argv)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


# ----------------------------------------------------------------------------- HF -> ours

def test_hf_clip_converts_to_the_same_outputs(hf_dir, tmp_path, capsys):
    from transformers import CLIPModel

    out = run_cli(capsys, hf_dir, tmp_path / "ours")
    assert "(hf)" in out and "(taichu, float32)" in out
    # The pooling condition is told, with this model's eos id.
    assert "pools each text at its first token 3 (eos_token_id)" in out
    config = taichu.load_config(tmp_path / "ours")
    image, text = config.model.image, config.model.text
    assert (image.hidden_size, image.ffn_size, text.hidden_size, text.ffn_size) == (48, 112, 32, 80)
    assert (config.model.projection_dim, config.model.logit_scale_init) == (24, 2.6592)
    assert config.tokenizer.special_tokens.eos_id == EOS_ID
    hf_model = CLIPModel.from_pretrained(hf_dir).eval()
    for backend in ("torch", "mindspore"):
        model = taichu.load_model(tmp_path / "ours", backend=backend)
        for seed, (n_images, lengths) in enumerate(SHAPES):
            batch = inputs(seed, n_images, lengths)
            diffs = max_diffs(our_outputs(model, backend, *batch), hf_outputs(hf_model, *batch))
            assert max(diffs) <= TOL, (backend, diffs)


def test_old_checkpoint_buffers_and_pickles(hf_dir, tmp_path):
    """position_ids buffers (persistent in older transformers) are skipped; a .bin is read
    only with allow_pickle; both give the same tensors as the safetensors file."""
    import shutil

    _, expected = convert.load(hf_dir)
    old = tmp_path / "old"
    shutil.copytree(hf_dir, old)
    tensors = load_file(old / "model.safetensors")
    tensors["text_model.embeddings.position_ids"] = np.arange(32, dtype=np.int64)[None]
    tensors["vision_model.embeddings.position_ids"] = np.arange(17, dtype=np.int64)[None]
    save_file(tensors, old / "model.safetensors", metadata={"format": "pt"})
    assert bits(convert.load(old)[1]) == bits(expected)

    (old / "model.safetensors").unlink()
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, old / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        convert.load(old)
    assert bits(convert.load(old, allow_pickle=True)[1]) == bits(expected)


# ----------------------------------------------------------------------------- ours -> HF

def test_our_clip_loads_in_hugging_face_and_round_trips(tmp_path, capsys):
    from transformers import CLIPModel

    assert taichu_main(["init", str(CONFIGS / "clip" / "clip-tiny.yaml"), "--out", str(tmp_path / "ours"),
                        "--seed", "3"]) == 0
    out = run_cli(capsys, tmp_path / "ours", tmp_path / "hf", "--to", "hf")
    assert "(hf, float32)" in out and "first token 3 (eos_token_id)" in out
    hf_model, info = CLIPModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf_model.eval()
    assert hf_model.config.text_config.eos_token_id == EOS_ID
    for backend in ("torch", "mindspore"):
        model = taichu.load_model(tmp_path / "ours", backend=backend)
        for seed, (n_images, lengths) in enumerate(SHAPES):
            batch = inputs(seed, n_images, lengths)
            diffs = max_diffs(hf_outputs(hf_model, *batch), our_outputs(model, backend, *batch))
            assert max(diffs) <= TOL, (backend, diffs)

    run_cli(capsys, tmp_path / "hf", tmp_path / "back")
    assert taichu.load_config(tmp_path / "back") == taichu.load_config(tmp_path / "ours")
    assert bits(load_file(tmp_path / "back" / "model.safetensors")) == \
        bits(load_file(tmp_path / "ours" / "model.safetensors"))
    # HF's own names in the HF directory: the misspelt LayerNorm, nothing else renamed.
    names = set(load_file(tmp_path / "hf" / "model.safetensors"))
    assert "vision_model.pre_layrnorm.weight" in names and not any("pre_layernorm" in n for n in names)


# ----------------------------------------------------------------------------- pooling condition

def test_text_pooling_condition(hf_dir, tmp_path, capsys):
    """HF pools at the first eos_token_id (or, with eos_token_id 2, at the row's largest
    id); ours at the last real token. Equal exactly when those are the same token."""
    from transformers import CLIPModel

    run_cli(capsys, hf_dir, tmp_path / "ours")
    ours = taichu.load_model(tmp_path / "ours", backend="torch")
    hf_model = CLIPModel.from_pretrained(hf_dir).eval()
    _, ids, mask = inputs(0, 1, [6, 9])

    def text_diff(model, ids):
        _, hf_text, _, _ = hf_outputs(model, np.zeros((1, 3, 32, 32), np.float32), ids, mask)
        return float(np.abs(our_outputs(ours, "torch", np.zeros((1, 3, 32, 32), np.float32), ids, mask)[1]
                            - hf_text).max(axis=1).max())

    assert text_diff(hf_model, ids) <= TOL
    early = ids.copy()
    early[1, 4] = EOS_ID             # an eos before the last real token: HF pools there
    assert text_diff(hf_model, early) > 1e-3

    # The legacy rule: eos_token_id 2 pools at the row's largest id.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "model.safetensors").symlink_to(hf_dir / "model.safetensors")
    hf_json = json.loads((hf_dir / "config.json").read_text())
    hf_json["text_config"].update(eos_token_id=2, bos_token_id=0, pad_token_id=1)
    (legacy / "config.json").write_text(json.dumps(hf_json))
    out = run_cli(capsys, legacy, tmp_path / "ours-legacy")
    assert "eos_token_id 2 (its legacy rule)" in out
    assert taichu.load_config(tmp_path / "ours-legacy").tokenizer.special_tokens.eos_id == 2
    legacy_model = CLIPModel.from_pretrained(legacy).eval()
    largest_last = ids.copy()
    largest_last[:, :] = np.minimum(largest_last, 4000)
    largest_last[0, 5], largest_last[1, 8] = 4095, 4095  # the last real tokens; padding 0 below
    assert text_diff(legacy_model, largest_last) <= TOL
    assert text_diff(legacy_model, ids) > 1e-3     # eos 3 is nobody's largest id


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("edit, key", [
    (lambda hf: hf["vision_config"].update(hidden_act="gelu"), "hidden_act"),
    (lambda hf: hf["text_config"].update(layer_norm_eps=1e-6), "layer_norm_eps"),
    (lambda hf: [hf[t].update(hidden_act="gelu_new") for t in ("text_config", "vision_config")],
     "hidden_act 'gelu_new' is not supported"),
    (lambda hf: hf["vision_config"].update(image_size=[32, 48]), "vision_config.image_size"),
    (lambda hf: hf["text_config"].update(eos_token_id=[3, 4]), "text_config.eos_token_id"),
])
def test_unrepresentable_config_is_refused_naming_key_and_file(hf_dir, tmp_path, edit, key):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").symlink_to(hf_dir / "model.safetensors")
    hf_json = json.loads((hf_dir / "config.json").read_text())
    edit(hf_json)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_json))
    with pytest.raises(ConfigError) as err:
        convert.convert(tmp_path / "hf", tmp_path / "out")
    assert key in str(err.value) and str(tmp_path / "hf" / "config.json") in str(err.value)
    assert not (tmp_path / "out").exists()


def test_missing_and_misshaped_tensors_are_listed(hf_dir, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text((hf_dir / "config.json").read_text())
    tensors = load_file(hf_dir / "model.safetensors")
    del tensors["text_projection.weight"]
    tensors["vision_model.post_layernorm.bias"] = np.zeros(32, np.float32)
    # Our spelling in an HF file is a stray name, shown with HF's.
    tensors["vision_model.pre_layernorm.weight"] = tensors.pop("vision_model.pre_layrnorm.weight")
    save_file(tensors, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        convert.convert(tmp_path / "hf", tmp_path / "out")
    text = str(err.value)
    assert "2 missing, 1 unexpected, 1 mis-shaped" in text
    assert "missing:     text_projection.weight (24, 32)" in text
    assert ("unexpected:  vision_model.pre_layernorm.weight (48,) "
            "(closest expected name: vision_model.pre_layrnorm.weight)") in text
    assert "mis-shaped:  vision_model.post_layernorm.bias has (32,), config expects (48,)" in text
    assert not (tmp_path / "out").exists()


def test_defaults_are_transformers_defaults():
    """A config.json key left out means transformers' default (save_pretrained omits them)."""
    from transformers import CLIPConfig

    hf = CLIPConfig().to_dict()
    for tower in ("text_config", "vision_config"):
        assert {k: hf[tower][k] for k in convert.CLIP_HF_DEFAULTS[tower]} == convert.CLIP_HF_DEFAULTS[tower]
    assert hf["projection_dim"] == convert.CLIP_HF_DEFAULTS["projection_dim"]
    assert hf["logit_scale_init_value"] == convert.CLIP_HF_DEFAULTS["logit_scale_init_value"]
    config = convert.hf_to_config({"model_type": "clip"}, "bare config.json")
    assert (config.model.image.image_size, config.model.text.vocab_size) == (224, 49408)
    assert config.tokenizer.special_tokens.eos_id == 49407

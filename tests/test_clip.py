"""CLIP in both backends: same weights give the same features and logits; padding is
invisible; the contrastive loss is the textbook one; model directories round-trip; and a
random Hugging Face CLIPModel, copied in by renaming, gives the same outputs."""
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import taichu
from taichu import convert
from taichu.config import load_config, validate_config
from taichu.families import get_family, num_parameters
from taichu.weights import CheckpointError
from conftest import CONFIGS
from tolerance import scaled_differences

TINY = CONFIGS / "clip" / "clip-tiny.yaml"
PAD_ID, EOS_ID = 0, 3     # taichu.config.SpecialTokens defaults
TOL = 1e-5


@pytest.fixture
def clip_config():
    return load_config(TINY)


def caption_batch(rng, vocab_size, lengths, width=None):
    """Right-padded ids and mask; each row: random ordinary ids, eos last, then padding."""
    width = width or max(lengths)
    ids = np.full((len(lengths), width), PAD_ID, np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for row, n in enumerate(lengths):
        ids[row, :n - 1] = rng.integers(4, vocab_size, n - 1)
        ids[row, n - 1] = EOS_ID
        mask[row, :n] = 1
    return ids, mask


def images(rng, batch, config):
    image = config.model.image
    return rng.standard_normal((batch, image.num_channels, image.image_size, image.image_size)
                               ).astype(np.float32)


# One entry point per backend: (image features, text features, (logits_per_image, logits_per_text)).
def torch_outputs(model, pixels, ids, mask):
    import torch

    with torch.no_grad():
        pixels_t, ids_t = torch.from_numpy(pixels), torch.from_numpy(ids)
        mask_t = None if mask is None else torch.from_numpy(mask)
        logits = model(pixels_t, ids_t, mask_t)
        return (model.get_image_features(pixels_t).numpy(),
                model.get_text_features(ids_t, mask_t).numpy(),
                tuple(x.numpy() for x in logits))


def ms_outputs(model, pixels, ids, mask):
    import mindspore as ms

    pixels_t, ids_t = ms.Tensor(pixels), ms.Tensor(ids.astype(np.int32))
    mask_t = None if mask is None else ms.Tensor(mask.astype(np.int32))
    logits = model(pixels_t, ids_t, mask_t)
    return (model.get_image_features(pixels_t).asnumpy(),
            model.get_text_features(ids_t, mask_t).asnumpy(),
            tuple(x.asnumpy() for x in logits))


OUTPUTS = {"torch": torch_outputs, "mindspore": ms_outputs}


def max_diffs(a, b):
    """Max |a - b| / max(1, max |b|) of image features, text features, logits_per_image,
    logits_per_text."""
    return scaled_differences((a[0], a[1], *a[2]), (b[0], b[1], *b[2]))


def build(config, backend, seed=0):
    import mindspore as ms
    import torch

    torch.manual_seed(seed)
    ms.set_seed(seed)
    model = taichu.build_model(config, backend)
    if backend == "torch":
        model.eval()
    else:
        model.set_train(False)
    return model


# (1) torch vs MindSpore ------------------------------------------------------------------

@pytest.mark.parametrize("source", ["torch", "mindspore"])
def test_same_weights_same_features_and_logits(clip_config, ms_mode, source):
    """Random init in one backend, its canonical state dict loaded into the other."""
    target = "mindspore" if source == "torch" else "torch"
    model = build(clip_config, source, seed=1)
    other = build(clip_config, target, seed=2)
    taichu.load_state_dict(other, taichu.state_dict(model))
    models = {source: model, target: other}

    rng = np.random.default_rng(0)
    # Two batch sizes; right-padded texts of different lengths, one at the full context,
    # one only an eos; more texts than images, so the logit matrices are not square.
    for n_images, lengths in ((2, [5, 12, 1]), (4, [32, 7, 3, 19, 2])):
        pixels = images(rng, n_images, clip_config)
        ids, mask = caption_batch(rng, 4096, lengths)
        got = {b: OUTPUTS[b](models[b], pixels, ids, mask) for b in models}
        diffs = max_diffs(got["torch"], got["mindspore"])
        print(f"[{ms_mode}, {source}->{target}, {n_images} images x {len(lengths)} texts] max "
              f"|torch - mindspore| / max(1, |.|) image/text features, logits per image/text: {diffs}")
        assert max(diffs) <= TOL, diffs
        logits_per_image, logits_per_text = got["torch"][2]
        assert logits_per_image.shape == (n_images, len(lengths))
        assert np.array_equal(logits_per_text, logits_per_image.T)
        assert all(np.isfinite(x).all() for x in (got["mindspore"][0], got["mindspore"][1]))


def test_different_weights_give_different_outputs(clip_config):
    """Guards the parity test: independently initialised models must not agree."""
    rng = np.random.default_rng(0)
    pixels, (ids, mask) = images(rng, 2, clip_config), caption_batch(rng, 4096, [6, 9])
    diffs = max_diffs(torch_outputs(build(clip_config, "torch", 1), pixels, ids, mask),
                      ms_outputs(build(clip_config, "mindspore", 2), pixels, ids, mask))
    assert min(diffs) > 1e-3


# (2) padding is invisible -----------------------------------------------------------------

def text_features(backend, model, ids, mask):
    if backend == "torch":
        import torch

        with torch.no_grad():
            return model.get_text_features(torch.from_numpy(ids),
                                           None if mask is None else torch.from_numpy(mask)).numpy()
    import mindspore as ms

    return model.get_text_features(ms.Tensor(ids.astype(np.int32)),
                                   None if mask is None else ms.Tensor(mask.astype(np.int32))).asnumpy()


def test_padding_and_batch_are_invisible_torch(clip_config):
    check_padding_and_batch_are_invisible(clip_config, "torch", "-")


def test_padding_and_batch_are_invisible_mindspore(clip_config, ms_mode):
    check_padding_and_batch_are_invisible(clip_config, "mindspore", ms_mode)


def check_padding_and_batch_are_invisible(clip_config, backend, ms_mode):
    """A text's features depend neither on its padding nor on the other rows; an image's
    features not on the other images."""
    model = build(clip_config, backend)
    rng = np.random.default_rng(4)
    lengths = [9, 4, 15, 1]
    ids, mask = caption_batch(rng, 4096, lengths)
    batched = text_features(backend, model, ids, mask)
    # The same batch padded to the full context.
    wide_ids, wide_mask = (np.pad(a, ((0, 0), (0, 32 - a.shape[1]))) for a in (ids, mask))
    worst = float(np.abs(text_features(backend, model, wide_ids, wide_mask) - batched).max())
    # A text alone, unpadded, with its all-ones mask and with none.
    for row in (0, 3):
        n = lengths[row]
        for row_mask in (mask[row:row + 1, :n], None):
            alone = text_features(backend, model, ids[row:row + 1, :n], row_mask)
            worst = max(worst, float(np.abs(alone[0] - batched[row]).max()))
    pixels = images(rng, 3, clip_config)
    image_diff = float(np.abs(OUTPUTS[backend](model, pixels[1:2], ids[:1], mask[:1])[0][0]
                              - OUTPUTS[backend](model, pixels, ids[:1], mask[:1])[0][1]).max())
    print(f"[{backend}, {ms_mode}] max |alone - padded batch| text {worst}, image {image_diff}")
    assert worst <= TOL and image_diff <= TOL


# (3) contrastive loss ---------------------------------------------------------------------

def numpy_contrastive_loss(logits):
    def cross_entropy(rows):
        top = rows.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(rows - top).sum(axis=1)) + top[:, 0]
        return float(np.mean(log_z - np.diag(rows)))
    logits = logits.astype(np.float64)
    return (cross_entropy(logits) + cross_entropy(logits.T)) / 2


def test_contrastive_loss_equals_numpy(ms_mode):
    import mindspore as ms
    import torch

    from mindspore_impl.clip import contrastive_loss as ms_loss
    from torch_impl.clip import contrastive_loss as torch_loss

    rng = np.random.default_rng(5)
    # Asymmetric logits at CLIP's scale (exp(ln 100) * cosine), so the two directions differ.
    logits = (100 * np.tanh(rng.standard_normal((6, 6)))).astype(np.float32)
    expected = numpy_contrastive_loss(logits)
    assert abs(numpy_contrastive_loss(logits.T) - expected) < 1e-9
    assert abs(expected - (numpy_contrastive_loss(logits[:, ::-1].copy()))) > 1e-2
    got_torch = float(torch_loss(torch.from_numpy(logits)))
    loss_fn = ms.jit(ms_loss) if ms_mode == "graph" else ms_loss
    got_ms = float(loss_fn(ms.Tensor(logits)).asnumpy())
    print(f"[{ms_mode}] contrastive loss numpy {expected}, |torch - numpy| {abs(got_torch - expected)}, "
          f"|mindspore - numpy| {abs(got_ms - expected)}")
    assert abs(got_torch - expected) <= 1e-5 * max(1.0, abs(expected))
    assert abs(got_ms - expected) <= 1e-5 * max(1.0, abs(expected))
    # Matched pairs on the diagonal: a lower loss than the same logits shuffled.
    assert numpy_contrastive_loss(np.eye(4) * 10) < numpy_contrastive_loss(np.ones((4, 4)) * 10)


def test_contrastive_loss_of_model_logits_trains(clip_config):
    """The loss of a forward pass has gradients for every parameter (torch)."""
    import torch

    from torch_impl.clip import contrastive_loss

    model = build(clip_config, "torch").train()
    rng = np.random.default_rng(6)
    ids, mask = caption_batch(rng, 4096, [5, 8, 3])
    logits_per_image, _ = model(torch.from_numpy(images(rng, 3, clip_config)), torch.from_numpy(ids),
                                torch.from_numpy(mask))
    loss = contrastive_loss(logits_per_image)
    assert abs(loss.item() - numpy_contrastive_loss(logits_per_image.detach().numpy())) <= 1e-5
    loss.backward()
    # Every parameter but the embeddings of ids absent from the batch gets a gradient.
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.logit_scale.grad.item() != 0.0


def test_same_weights_same_loss_and_gradients(clip_config, ms_mode):
    """One contrastive step's loss and every parameter's gradient agree across backends
    (MindSpore through value_and_grad, compiled with jit in graph mode)."""
    import mindspore as ms
    import torch

    from mindspore_impl.clip import contrastive_loss as ms_loss
    from mindspore_impl.weights import canonical_parameters
    from torch_impl.clip import contrastive_loss as torch_loss

    torch_model = build(clip_config, "torch", seed=5).train()
    ms_model = build(clip_config, "mindspore", seed=6)
    ms_model.set_train(True)
    taichu.load_state_dict(ms_model, taichu.state_dict(torch_model))
    rng = np.random.default_rng(10)
    pixels = images(rng, 4, clip_config)
    ids, mask = caption_batch(rng, 4096, [6, 11, 2, 8])

    loss = torch_loss(torch_model(*(torch.from_numpy(x) for x in (pixels, ids, mask)))[0])
    loss.backward()
    expected = {name: p.grad.numpy() for name, p in torch_model.named_parameters()}

    params = ms_model.trainable_params()
    def forward(pixel_values, input_ids, attention_mask):
        return ms_loss(ms_model(pixel_values, input_ids, attention_mask)[0])

    step = ms.value_and_grad(forward, None, params)
    if ms_mode == "graph":
        step = ms.jit(step)
    ms_value, grads = step(ms.Tensor(pixels), ms.Tensor(ids.astype(np.int32)),
                           ms.Tensor(mask.astype(np.int32)))
    names = {param.name: name for name, (param, _) in canonical_parameters(ms_model).items()}
    assert sorted(names[p.name] for p in params) == sorted(expected)
    loss_diff = abs(float(ms_value.asnumpy()) - loss.item())
    # Relative to each tensor's largest gradient; k_proj biases have zero true gradient
    # (softmax ignores a per-query constant), hence the absolute floor.
    worst = max(float(np.abs(g.asnumpy() - expected[names[p.name]]).max())
                / (1e-3 + float(np.abs(expected[names[p.name]]).max())) for p, g in zip(params, grads))
    print(f"[{ms_mode}] loss {loss.item()}: |torch - mindspore| loss {loss_diff}, "
          f"gradients (relative to each tensor's max) {worst}")
    assert loss_diff <= TOL and worst <= 1e-4


# (4) model directories -------------------------------------------------------------------

@pytest.mark.parametrize("source", ["torch", "mindspore"])
def test_save_load_round_trip(clip_config, tmp_path, source):
    model = build(clip_config, source, seed=3)
    path = taichu.save_model(model, tmp_path / "clip")
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "model.safetensors"]
    assert taichu.load_config(path) == clip_config
    saved = load_file(path / "model.safetensors")
    assert saved["logit_scale"].shape == () and "vision_model.pre_layernorm.weight" in saved
    expected = taichu.state_dict(model)
    rng = np.random.default_rng(7)
    pixels, (ids, mask) = images(rng, 2, clip_config), caption_batch(rng, 4096, [4, 11])
    own = OUTPUTS[source](model, pixels, ids, mask)
    for backend in ("torch", "mindspore"):
        loaded = taichu.load_model(path, backend=backend)
        got = taichu.state_dict(loaded)
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in expected.items()}
        assert all(np.array_equal(expected[k], got[k]) for k in expected)
        assert max(max_diffs(OUTPUTS[backend](loaded, pixels, ids, mask), own)) <= TOL


def test_mismatched_checkpoint_lists_missing_unexpected_misshaped(clip_config, tmp_path):
    path = taichu.save_model(build(clip_config, "torch"), tmp_path / "clip")
    tensors = load_file(path / "model.safetensors")
    # Hugging Face's spelling of the pre-encoder LayerNorm, a wrong width, a stray tensor.
    tensors["vision_model.pre_layrnorm.weight"] = tensors.pop("vision_model.pre_layernorm.weight")
    tensors["text_projection.weight"] = np.zeros((32, 48), np.float32)
    tensors["logit_bias"] = np.zeros((), np.float32)
    save_file(tensors, path / "model.safetensors")
    for backend in ("torch", "mindspore"):
        with pytest.raises(CheckpointError) as err:
            taichu.load_model(path, backend=backend)
        text = str(err.value)
        assert "1 missing, 2 unexpected, 1 mis-shaped" in text
        assert "missing:     vision_model.pre_layernorm.weight (48,)" in text
        assert ("unexpected:  vision_model.pre_layrnorm.weight (48,) "
                "(closest expected name: vision_model.pre_layernorm.weight)") in text
        assert "unexpected:  logit_bias ()" in text
        assert "mis-shaped:  text_projection.weight has (32, 48), config expects (32, 32)" in text


def test_mindspore_names_differ_only_in_leaves(clip_config):
    ms_names = {p.name for p in build(clip_config, "mindspore").get_parameters()}
    assert {"vision_model.pre_layernorm.gamma", "vision_model.embeddings.class_embedding",
            "vision_model.embeddings.patch_embedding.weight", "logit_scale",
            "text_model.embeddings.token_embedding.embedding_table",
            "text_model.encoder.layers.1.self_attn.q_proj.weight"} <= ms_names


@pytest.mark.parametrize("name", ["clip-tiny", "clip-light"])
def test_parameter_count_from_config_equals_built_models(name):
    config = load_config(CONFIGS / "clip" / f"{name}.yaml")
    specs = get_family("clip").tensor_specs(config)
    for backend in ("torch", "mindspore"):
        arrays = taichu.state_dict(taichu.build_model(config, backend))
        assert {k: v.shape for k, v in arrays.items()} == {k: s.shape for k, s in specs.items()}
        assert sum(a.size for a in arrays.values()) == num_parameters(config)


def test_config_sizes():
    light = load_config(CONFIGS / "clip" / "clip-light.yaml")
    image, text = light.model.image, light.model.text
    assert (image.num_layers, image.hidden_size, image.num_heads) == (6, 256, 16)
    assert (text.num_layers, text.hidden_size, text.num_heads) == (3, 192, 12)
    assert num_parameters(light) == 12_208_833
    teacher = load_config(CONFIGS / "clip" / "clip-teacher.yaml")
    assert 3.9e8 <= num_parameters(teacher) <= 4.2e8


def test_info_command_describes_clip():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "taichu", "info", str(CONFIGS / "clip" / "clip-light.yaml")],
                         check=True, capture_output=True, text=True).stdout
    assert "family:     clip" in out and "6 layers, hidden 256, 16 heads" in out
    assert "parameters: 12,208,833 (12.21 M)" in out


@pytest.mark.parametrize("edit, expected", [
    (lambda r: r["model"]["image"].update(patch_size=7), r"image_size 32 is not divisible by patch_size 7"),
    (lambda r: r["model"]["text"].update(num_heads=5), r"hidden_size 32 is not divisible by num_heads 5"),
    (lambda r: r["model"]["text"].update(vocab_size=100), r"model\.text\.vocab_size 100 is smaller"),
    (lambda r: r["model"].update(activation="gelu_new"), r"model\.activation: Input should be 'quick_gelu' or 'gelu'"),
    (lambda r: r["model"]["image"].update(layers=2), r"model\.image\.layers: unknown key"),
])
def test_bad_config_is_named(edit, expected):
    import yaml

    raw = yaml.safe_load(TINY.read_text())
    edit(raw)
    with pytest.raises(taichu.ConfigError, match=expected):
        validate_config(raw, "clip-variant.yaml")


@pytest.mark.parametrize("backend", ["torch", "mindspore"])
def test_bad_inputs_are_clear_errors(clip_config, backend):
    model = build(clip_config, backend)
    rng = np.random.default_rng(8)
    pixels = images(rng, 2, clip_config)
    ids, mask = caption_batch(rng, 4096, [3, 5])
    run = OUTPUTS[backend]
    with pytest.raises(ValueError, match=r"pixel_values must be \[batch, 3, 32, 32\], got shape \(2, 3, 16, 16\)"):
        run(model, pixels[:, :, :16, :16].copy(), ids, mask)
    bad = ids.copy()
    bad[0, 0] = 4096
    with pytest.raises(ValueError, match="token id 4096 is out of range for vocab_size 4096"):
        run(model, pixels, bad, mask)
    with pytest.raises(ValueError, match="text length 33 exceeds the context max_position_embeddings 32"):
        run(model, pixels, np.full((1, 33), 5), None)
    with pytest.raises(ValueError, match="left-padded row"):
        run(model, pixels, ids[:, ::-1].copy(), mask[:, ::-1].copy())
    with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids"):
        run(model, pixels, ids, mask[:, :-1].copy())


# (5) Hugging Face oracle ------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_clip():
    import torch
    from transformers import CLIPConfig, CLIPModel

    common = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0}
    hf_config = CLIPConfig(
        # Towers of different widths, MLPs other than 4x, head dims 8 and 12.
        text_config={**common, "vocab_size": 4096, "hidden_size": 32, "intermediate_size": 80,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 32,
                     # Pooled at the first eos_token_id: our eos, the last real token here.
                     "pad_token_id": PAD_ID, "bos_token_id": 2, "eos_token_id": EOS_ID},
        vision_config={**common, "hidden_size": 48, "intermediate_size": 112, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": 32, "patch_size": 8, "num_channels": 3},
        projection_dim=24, logit_scale_init_value=2.6592)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = CLIPModel(hf_config).eval()
    # HF initialises LayerNorms to 1/0 and biases to 0: perturb everything, so that a
    # mapping that swapped two LayerNorms or dropped a bias would show.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
        model.logit_scale.fill_(3.0)
    return model


def test_hugging_face_clip_is_an_oracle(hf_clip, ms_mode):
    import torch

    # The library's Hugging Face mapping (taichu/convert.py): config.json and tensor names.
    config = convert.hf_to_config(hf_clip.config.to_dict(), "Hugging Face CLIPConfig")
    arrays = convert.to_canonical(config, {k: v.numpy() for k, v in hf_clip.state_dict().items()},
                                  "hf", "Hugging Face CLIPModel")
    rng = np.random.default_rng(9)
    for n_images, lengths in ((3, [7, 2, 13]), (2, [32, 5, 9, 1])):
        pixels = images(rng, n_images, config)
        ids, mask = caption_batch(rng, 4096, lengths)
        with torch.no_grad():
            pixels_t, ids_t, mask_t = (torch.from_numpy(x) for x in (pixels, ids, mask))
            hf_image = hf_clip.get_image_features(pixel_values=pixels_t)
            hf_text = hf_clip.get_text_features(input_ids=ids_t, attention_mask=mask_t)
            hf_out = hf_clip(input_ids=ids_t, pixel_values=pixels_t, attention_mask=mask_t)
        expected = (getattr(hf_image, "pooler_output", hf_image).numpy(),
                    getattr(hf_text, "pooler_output", hf_text).numpy(),
                    (hf_out.logits_per_image.numpy(), hf_out.logits_per_text.numpy()))
        for backend in ("torch", "mindspore"):
            model = build(config, backend)
            taichu.load_state_dict(model, arrays, source="Hugging Face CLIPModel")
            diffs = max_diffs(OUTPUTS[backend](model, pixels, ids, mask), expected)
            print(f"[{backend}, {ms_mode}, {n_images} images x {len(lengths)} texts] max |ours - HF| / max(1, |.|) "
                  f"image/text features, logits per image/text: {diffs}")
            assert max(diffs) <= TOL, (backend, diffs)

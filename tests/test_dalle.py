"""The dalle family (taichu/families/dalle.py): a float64 numpy reference of what is not the
GPT's (text and row/column image embeddings, the text/image logits split, the weighted loss
with pads ignored), the two backends on the same weights (logits, loss, graph-mode
gradients), the GPT's KV cache (prefill of the text + one image code per step = the full
forward), 20 training steps through ``taichu train`` in both backends on codes of a (random)
image tokenizer, cached, and the config's refusals."""
import json

import numpy as np
import pytest
import torch

import taichu
from taichu.api import load_state_dict, state_dict
from taichu.config import ConfigError, load_config
from taichu.train import TASK_DATA, read_metrics, run_training
from conftest import CONFIGS, perturbed_state

TINY = CONFIGS / "dalle" / "dalle-tiny.yaml"
VQVAE_TINY = CONFIGS / "vqvae" / "vqvae-tiny.yaml"
TOL = 1e-5   # the design's parity bound (fp32), relative to the logits' scale



def inputs(config, seed=1, batch=3):
    """Captions with pads (rows of 16, 9 and 5 real tokens: bos ... eos, then pad 0) and
    codes over the whole grid."""
    m = config.model
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, m.text_length), np.int64)
    for row, real in enumerate([m.text_length, 9, 5][:batch]):
        ids[row, :real] = rng.integers(4, m.vocab_size, real)
        ids[row, 0], ids[row, real - 1] = 2, 3
    codes = rng.integers(0, m.codebook_size, (batch, m.image_tokens))
    return ids, codes


@pytest.fixture(scope="module")
def pair():
    import mindspore as ms

    config = load_config(TINY)
    torch.manual_seed(0)
    torch_model = taichu.build_model(config, "torch").eval()
    arrays = perturbed_state(torch_model)
    load_state_dict(torch_model, arrays)
    ms_model = taichu.build_model(config, "mindspore")
    load_state_dict(ms_model, arrays)
    ms_model.set_train(False)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    return config, torch_model, ms_model, arrays


def test_tensor_specs_are_both_backends_state_dicts(pair):
    """The canonical specs (what `taichu info` counts) are torch's state_dict, name for name
    in order and shape for shape, and MindSpore's canonical names; the GPT's layers keep
    the GPT's names. The light size is about 100 M with its vocabularies."""
    from taichu.families import get_family, num_parameters

    config, torch_model, ms_model, _ = pair
    specs = get_family("dalle").tensor_specs(config)
    torch_state = state_dict(torch_model)
    assert list(specs) == list(torch_state)
    assert all(tuple(specs[k].shape) == torch_state[k].shape for k in specs)
    assert set(state_dict(ms_model)) == set(specs)
    assert num_parameters(config) == sum(p.numel() for p in torch_model.parameters())
    assert "layers.1.attn.q_proj.weight" in specs and "layers.1.mlp.fc_out.bias" in specs
    assert 95e6 < num_parameters(load_config(CONFIGS / "dalle" / "dalle-light.yaml")) < 105e6
    assert 750e6 < num_parameters(load_config(CONFIGS / "dalle" / "dalle-teacher.yaml")) < 850e6


# ----------------------------------------------------------------------------- numpy reference

def numpy_embeddings(arrays, config, ids, codes, start=0):
    """Text tokens + text positions; image codes + row + column embeddings (row-major)."""
    grid = config.model.image_grid
    text = arrays["embed_text.weight"][ids] + arrays["embed_text_positions.weight"][np.arange(ids.shape[1])]
    index = np.arange(start, start + codes.shape[1])
    image = (arrays["embed_image.weight"][codes] + arrays["embed_image_rows.weight"][index // grid]
             + arrays["embed_image_cols.weight"][index % grid])
    return text, image


def numpy_loss(text_logits, image_logits, ids, codes, pad_id, weights):
    """Weighted mean of the two mean cross-entropies; text targets equal to pad_id ignored."""
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    targets = ids[:, 1:]
    text_nll = -np.take_along_axis(log_softmax(text_logits), targets[..., None], -1)[..., 0]
    keep = targets != pad_id
    image_nll = -np.take_along_axis(log_softmax(image_logits), codes[..., None], -1)[..., 0]
    return weights[0] * text_nll[keep].mean() + weights[1] * image_nll.mean()


def test_float64_reference_of_embeddings_split_and_loss(pair):
    """In float64 (rounding cannot decide): the embedding sums entering the first GPT block,
    the heads applied to the final LayerNorm's output split at the last text position, and
    the weighted loss with the pad targets left out, against numpy."""
    from taichu.families.dalle import loss_weights
    from torch_impl.dalle import training_loss
    from tolerance import float32_tolerance

    config, torch_model, _, arrays = pair
    m = config.model
    model = taichu.build_model(config, "torch").double().eval()
    load_state_dict(model, arrays)
    arrays64 = {k: v.astype(np.float64) for k, v in arrays.items()}
    ids, codes = inputs(config)
    seen = {}
    model.layers[0].register_forward_pre_hook(lambda _, args: seen.update(x=args[0].detach().numpy()))
    model.ln_f.register_forward_hook(lambda _, __, out: seen.update(h=out.detach().numpy()))
    with torch.no_grad():
        text_logits, image_logits = model(torch.tensor(ids), torch.tensor(codes[:, :-1]))
    text, image = numpy_embeddings(arrays64, config, ids, codes[:, :-1])
    np.testing.assert_allclose(seen["x"], np.concatenate([text, image], 1), rtol=0, atol=1e-12)
    h, split = seen["h"], m.text_length - 1
    assert text_logits.shape == (3, m.text_length - 1, m.vocab_size)
    assert image_logits.shape == (3, m.image_tokens, m.codebook_size)
    np.testing.assert_allclose(text_logits.numpy(), h[:, :split] @ arrays64["text_head.weight"].T, atol=1e-12)
    np.testing.assert_allclose(image_logits.numpy(), h[:, split:] @ arrays64["image_head.weight"].T, atol=1e-12)
    # A later start (decoding from the cache): rows and columns continue along the grid.
    with torch.no_grad():
        later = model.image_embeddings(torch.tensor(codes[:, 5:11]), 5).numpy()
    np.testing.assert_allclose(later, numpy_embeddings(arrays64, config, ids, codes[:, 5:11], 5)[1], atol=1e-12)

    weights = loss_weights(config)
    assert weights == (0.125, 0.875)
    expected = numpy_loss(text_logits.numpy(), image_logits.numpy(), ids, codes, 0, weights)
    with torch.no_grad():
        loss, = training_loss(model, torch.tensor(ids), torch.tensor(codes))
    # training_loss takes the cross-entropy in float32 whatever the model's precision: the
    # logits' rounding to float32, the log-sum-exp over the vocabulary, the mean over targets.
    scale = np.abs(text_logits.numpy()).max() + expected
    assert abs(float(loss) - expected) <= float32_tolerance(scale, m.vocab_size + ids.size)
    # The weights are normalised (a weighted mean), and a pad target changes nothing.
    other = load_config(TINY, ["model.text_loss_weight=1", "model.image_loss_weight=3"])
    assert loss_weights(other) == (0.25, 0.75)
    with torch.no_grad():
        changed = ids.copy()
        changed[2, -1] = 0  # already a pad: the row's targets are the same
        assert float(training_loss(model, torch.tensor(changed), torch.tensor(codes))[0]) == float(loss)


# ----------------------------------------------------------------------------- backends

def test_backends_agree_on_logits_loss_and_graph_mode_gradients(pair):
    """Same weights, same inputs: logits within 1e-5 of their scale, the same loss, and
    MindSpore's jit(value_and_grad(training_loss)) (the trainer's path) equal to torch's
    backward. Gradient bound (tests/tolerance.py): the forward chain (GPT layers over the
    whole sequence, the head, the log-sum-exp over the text vocabulary) walked twice."""
    import mindspore as ms
    from mindspore_impl import dalle as md
    from mindspore_impl.weights import canonical_parameters
    from torch_impl import dalle as td
    from tolerance import encoder_chain_terms, float32_tolerance, scaled_differences

    config, torch_model, ms_model, _ = pair
    m = config.model
    ids, codes = inputs(config)
    with torch.no_grad():
        expected = [x.numpy() for x in torch_model(torch.tensor(ids), torch.tensor(codes[:, :-1]))]
    got = [x.asnumpy() for x in ms_model(ms.Tensor(ids, ms.int32), ms.Tensor(codes[:, :-1], ms.int32))]
    assert max(scaled_differences(got, expected)) <= TOL

    torch_model.zero_grad()
    loss, = td.training_loss(torch_model, torch.tensor(ids), torch.tensor(codes))
    loss.backward()
    loss = loss.detach()
    grads_torch = {n: p.grad.numpy() for n, p in torch_model.named_parameters()}
    params = ms_model.trainable_params()
    names = {p.name: n for n, (p, _) in canonical_parameters(ms_model).items()}

    def step(*batch):
        return md.training_loss(ms_model, *batch)[0]
    grad_fn = ms.jit(ms.value_and_grad(step, None, params))
    ms_loss, grads = grad_fn(ms.Tensor(ids, ms.int32), ms.Tensor(codes, ms.int32))
    assert abs(float(ms_loss.asnumpy()) - float(loss)) <= TOL * max(1.0, float(loss))
    terms = encoder_chain_terms(m, m.max_length) + m.hidden_size + m.vocab_size
    bound = float32_tolerance(1.0, 2 * terms)
    assert len(grads) == len(grads_torch)
    for param, grad in zip(params, grads):
        ref = grads_torch[names[param.name]]
        assert np.abs(grad.asnumpy() - ref).max() <= bound * max(1.0, np.abs(ref).max()), names[param.name]


@pytest.mark.parametrize("backend", ["torch", "mindspore"])
def test_kv_cache_prefill_and_decoding_equal_the_full_forward(pair, backend):
    """The GPT's cache: the text in one pass, then the image codes one (and once two) at a
    time, give the full forward's logits for every image position; bad calls are refused."""
    import mindspore as ms

    config, torch_model, ms_model, _ = pair
    m = config.model
    ids, codes = inputs(config)
    if backend == "torch":
        model, tensor, numpy = torch_model, torch.tensor, lambda x: x.detach().numpy()
    else:
        model, tensor, numpy = ms_model, (lambda x: ms.Tensor(x, ms.int32)), lambda x: x.asnumpy()
    with torch.no_grad():
        full_text, full_image = (numpy(x) for x in model(tensor(ids), tensor(codes[:, :-1])))
        text_logits, image_logits, past = model(tensor(ids), None, None, True)
        steps = [numpy(image_logits)]
        assert np.abs(numpy(text_logits) - full_text).max() <= TOL * np.abs(full_text).max()
        j = 0
        while j < m.image_tokens - 1:
            width = 2 if j == 6 else 1
            _, logits, past = model(None, tensor(codes[:, j:j + width]), past, True)
            steps.append(numpy(logits))
            j += width
        assert past[0][0].shape[2] == m.max_length
        decoded = np.concatenate(steps, axis=1)
        assert decoded.shape == full_image.shape
        assert np.abs(decoded - full_image).max() <= TOL * np.abs(full_image).max()
        with pytest.raises(ValueError, match="text goes in whole"):
            model(tensor(ids), tensor(codes[:, :1]), past, True)
        with pytest.raises(ValueError, match="exceed"):
            model(None, tensor(codes[:, :2]), past, True)
        with pytest.raises(ValueError, match="out of range for codebook_size"):
            model(tensor(ids), tensor(np.full((3, 2), m.codebook_size)))
        with pytest.raises(ValueError, match="text_length"):
            model(tensor(ids[:, :-1]))


def test_mindspore_cross_entropy_leaves_ignored_rows_out():
    """mindspore_impl.gpt.cross_entropy with ignored targets (the pads) = torch's, in
    PyNative and compiled: NLLLoss's CPU kernel leaves the ignored rows' losses unwritten
    (they read 1.0 or -inf before the rows were masked explicitly)."""
    import mindspore as ms
    from mindspore_impl.gpt import IGNORE_INDEX, cross_entropy

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((30, 100)).astype(np.float32)
    labels = rng.integers(0, 100, 30)
    labels[::3] = IGNORE_INDEX
    expected = float(torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels)))
    for run in (cross_entropy, ms.jit(cross_entropy)):
        got = float(run(ms.Tensor(logits), ms.Tensor(labels, ms.int32)).asnumpy())
        assert abs(got - expected) <= 1e-6 * expected


# ----------------------------------------------------------------------------- config and data

@pytest.mark.parametrize("override,message", [
    ("model.attention=row", "sparse attention patterns are not implemented"),
    ("model.attention=strided", "attention"),
    ("model.image_loss_weight=-0.5", "image_loss_weight"),
    ("model.text_loss_weight=0", None),
    ("model.vocab_size=100", "smaller than the 4 special tokens"),
    ("model.text_length=2", "text_length"),
])
def test_config_refusals(override, message):
    if message is None:   # one weight 0 is allowed (image-only training); both 0 is not
        load_config(TINY, [override])
        with pytest.raises(ConfigError, match="both 0"):
            load_config(TINY, [override, "model.image_loss_weight=0"])
        return
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, [override])


def tokenizer_dir(path, *overrides):
    """A vqvae model directory as far as the data path reads it: config.yaml and a weights file."""
    from taichu.config import dump_config

    path.mkdir(parents=True, exist_ok=True)
    dump_config(load_config(VQVAE_TINY, list(overrides)), path / "config.yaml")
    (path / "model.safetensors").write_bytes(b"weights-1")
    return path


def test_image_tokenizer_checks_and_code_cache(tmp_path, monkeypatch):
    """Codes are encoded once (the encoder is called once for two loads), keyed by the
    tokenizer's files: rewritten weights are encoded again. A tokenizer whose codebook or
    grid differs from the model's, a directory of another family and no tokenizer at all
    are refused by name."""
    from taichu import dalle_data

    calls = []

    def fake_encoder(model_dir, images, backend):
        calls.append(backend)
        return np.random.default_rng(len(calls)).integers(0, 32, (len(images), 4, 4)).astype(np.uint16)
    monkeypatch.setattr(dalle_data, "encode_images", fake_encoder)
    vq = tokenizer_dir(tmp_path / "vq")
    config = load_config(TINY, [f"data.image_tokenizer={vq}", f"data.cache_dir={tmp_path / 'cache'}",
                                "data.image_tokenizer_backend=torch", "data.scene_count=20"])
    first = dalle_data.load_caption_codes(config)
    second = dalle_data.load_caption_codes(config)
    assert calls == ["torch"] and np.array_equal(first.train_codes, second.train_codes)
    assert len(first.train) + len(first.test) == 20 and first.train_codes.shape[1:] == (4, 4)
    index = json.loads((tmp_path / "cache" / "image_codes" / first.key[:16] / "index.json").read_text())
    assert index["backend"] == "torch" and index["train"] == len(first.train)
    (vq / "model.safetensors").write_bytes(b"weights-2")
    third = dalle_data.load_caption_codes(config)
    assert len(calls) == 2 and third.key != first.key and third.fingerprint == first.fingerprint

    for overrides, message in [(["model.codebook.size=64"], "codebook has 64 codes"),
                               (["model.image_size=32"], "8x8 codes per image")]:
        other = tokenizer_dir(tmp_path / message.split()[0], *overrides)
        with pytest.raises(ValueError, match=message):
            dalle_data.load_caption_codes(load_config(TINY, [f"data.image_tokenizer={other}"]))
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.yaml").write_text((CONFIGS / "gpt" / "gpt-tiny.yaml").read_text())
    with pytest.raises(ValueError, match="a gpt model, not an image tokenizer"):
        dalle_data.load_caption_codes(load_config(TINY, [f"data.image_tokenizer={gpt}"]))
    with pytest.raises(ValueError, match="data.image_tokenizer: the dalle family trains on image codes"):
        dalle_data.load_caption_codes(load_config(TINY))


# ----------------------------------------------------------------------------- training

def test_first_20_losses_agree_across_backends(tmp_path, monkeypatch, tiny_tokenizer, eager_mindspore_eval):
    """A random vqvae-tiny encodes 60 scenes once (torch); from the same saved init both
    backends then train on the cached codes (the encoder is not called again) and take the
    same 20 steps (<= 1e-4 relative). The init carries the session's tiny tokenizer (dalle-tiny's
    settings and vocabulary size), so the run trains none of its own."""
    from taichu import dalle_data

    torch.manual_seed(0)
    vq = taichu.save_model(taichu.build_model(load_config(VQVAE_TINY), "torch"), tmp_path / "vq")
    overrides = [f"data.image_tokenizer={vq}", f"data.cache_dir={tmp_path / 'cache'}",
                 "data.image_tokenizer_backend=torch", "train.log_interval=1", "train.eval_interval=1000",
                 "train.eval_batches=2"]
    config = load_config(TINY, overrides)
    torch.manual_seed(0)
    init = taichu.save_model(taichu.build_model(config, "torch"), tmp_path / "init", tokenizer=tiny_tokenizer)
    TASK_DATA["text_to_image"](config, init, 0)     # encodes the scenes into the code cache

    def no_encoding(*_):
        raise AssertionError("the codes should come from the cache")
    monkeypatch.setattr(dalle_data, "encode_images", no_encoding)
    runs = {}
    for backend in ("torch", "mindspore"):
        run_training(config, backend, tmp_path / backend, init_dir=init, progress=False)
        runs[backend] = {r["step"]: r["loss"] for r in read_metrics(tmp_path / backend) if "loss" in r}
    assert sorted(runs["torch"]) == list(range(1, 21))
    a = np.array([runs["torch"][s] for s in range(1, 21)])
    b = np.array([runs["mindspore"][s] for s in range(1, 21)])
    relative = np.abs(a - b) / np.abs(a)
    print(f"torch losses {np.round(a, 4).tolist()}")
    assert relative.max() <= 1e-4, f"worst relative difference {relative.max():.2e} at step {relative.argmax() + 1}"
    assert a[-1] < a[0]

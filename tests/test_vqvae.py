"""The image tokenizer (vqvae family; taichu/families/vqvae.py): numpy references of the
quantizer written from the equations (nearest code, commitment and codebook losses, the
EMA step with Laplace smoothing, dead-code restarts), the two backends against each other on
the same weights (codes, reconstructions, loss, after_step, gradients through MindSpore's
compiled value_and_grad), and the numbers taichu.image_tokens reports."""
import json

import numpy as np
import pytest
import torch

from taichu.api import load_state_dict, state_dict
from taichu.config import load_config, validate_config
from taichu.families import get_family
from taichu.families.vqvae import code_usage, psnr
from conftest import CONFIGS

TOL = 1e-5   # the design's parity bound (fp32) on values of order 1
TINY = CONFIGS / "vqvae" / "vqvae-tiny.yaml"


def tiny_config(**codebook):
    config = load_config(TINY)
    raw = json.loads(config.model_dump_json())
    raw["model"]["codebook"] = {**raw["model"]["codebook"], **codebook}
    return validate_config(raw, "vqvae-tiny")


def perturbed_state(model, seed=0, scale=0.3):
    """Every tensor moved by noise (zero-mean init hides swapped tensors); cluster sizes
    spread over [0.2, 3] so that some codes are below the restart threshold and some not."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, array in state_dict(model).items():
        out[name] = (array + scale * rng.standard_normal(array.shape)).astype(array.dtype)
    out["quantizer.cluster_size"] = rng.uniform(0.2, 3.0, out["quantizer.cluster_size"].shape).astype(np.float32)
    return out


def make_batch(config, n=3, seed=5):
    m = config.model
    rng = np.random.default_rng(seed)
    k = m.codebook.size
    return (rng.standard_normal((n, 3, m.image_size, m.image_size), dtype=np.float32),
            rng.random((n, k), dtype=np.float32),
            rng.integers(0, m.grid ** 2, (n, k)).astype(np.int64))


def build_pair(config):
    from mindspore_impl.vqvae import VQVAE as MSVQVAE
    from torch_impl.vqvae import VQVAE as TorchVQVAE

    torch_model = TorchVQVAE(config).eval()
    arrays = perturbed_state(torch_model)
    load_state_dict(torch_model, arrays)
    ms_model = MSVQVAE(config)
    load_state_dict(ms_model, arrays)
    ms_model.set_train(False)
    return torch_model, ms_model, arrays


@pytest.fixture(scope="module", params=["ema", "loss"])
def pair(request):
    """The tiny tokenizer (both codebook updates) in both backends with the same perturbed
    weights, and one batch of 3 images with restart draws."""
    config = tiny_config(update=request.param)
    torch_model, ms_model, arrays = build_pair(config)
    return config, torch_model, ms_model, arrays, make_batch(config)


def test_canonical_names_and_trainable_sets(pair):
    from mindspore_impl.weights import canonical_parameters

    config, torch_model, ms_model, _, _ = pair
    specs = get_family("vqvae").tensor_specs(config)
    assert list(state_dict(torch_model)) == list(specs)
    assert set(state_dict(ms_model)) == set(specs)
    trained = {n for n, p in torch_model.named_parameters() if p.requires_grad}
    assert ("quantizer.codebook" in trained) == (config.model.codebook.update == "loss")
    assert not trained & {"quantizer.cluster_size", "quantizer.embed_sum"}
    names = {p.name: n for n, (p, _) in canonical_parameters(ms_model).items()}
    assert {names[p.name] for p in ms_model.trainable_params()} == trained


def test_config_refusals():
    from taichu.config import ConfigError

    raw = json.loads(load_config(TINY).model_dump_json())
    for edit, message in (({"image_size": 18}, "not divisible by 2\\^2"),
                          ({"decoder_channels": [8, 16]}, "one per resolution"),
                          ({"num_channels": 1}, "RGB")):
        with pytest.raises(ConfigError, match=message):
            validate_config({**raw, "model": {**raw["model"], **edit}}, "bad")


# ----------------------------------------------------------------------------- references

def quantizer_reference(z, codebook):
    """float64 from the definitions: z [B, D, h, w], codebook [K, D] -> (codes [B, h, w],
    quantized [B, D, h, w], flat [N, D], the distance margin between the best two codes)."""
    b, d, h, w = z.shape
    flat = z.transpose(0, 2, 3, 1).reshape(-1, d).astype(np.float64)
    distances = ((flat[:, None, :] - codebook[None].astype(np.float64)) ** 2).sum(-1)
    codes = distances.argmin(axis=1)
    ordered = np.sort(distances, axis=1)
    quantized = codebook.astype(np.float64)[codes].reshape(b, h, w, d).transpose(0, 3, 1, 2)
    return codes.reshape(b, h, w), quantized, flat, float((ordered[:, 1] - ordered[:, 0]).min())


def after_step_reference(arrays, c, counts, sums, scores, candidates):
    """The EMA step (Laplace smoothing) and the restarts, in float64."""
    size = c.decay * arrays["quantizer.cluster_size"].astype(np.float64) + (1 - c.decay) * counts.sum(0)
    embed_sum = c.decay * arrays["quantizer.embed_sum"].astype(np.float64) + (1 - c.decay) * sums.sum(0)
    codebook = arrays["quantizer.codebook"].astype(np.float64)
    if c.update == "ema":
        n = size.sum()
        codebook = embed_sum / ((size + c.epsilon) / (n + c.size * c.epsilon) * n)[:, None]
    if c.restart:
        dead = size < c.restart_threshold
        chosen = candidates[scores.argmax(0), np.arange(c.size)].astype(np.float64)
        codebook = np.where(dead[:, None], chosen, codebook)
        embed_sum = np.where(dead[:, None], c.restart_threshold * chosen, embed_sum)
        size = np.where(dead, c.restart_threshold, size)
    return {"quantizer.cluster_size": size, "quantizer.embed_sum": embed_sum, "quantizer.codebook": codebook}


def test_quantizer_and_loss_against_numpy(pair):
    """torch's loss terms against the equations in float64 on torch's own encoder output and
    reconstruction: nearest codes, commitment ||z - sg(e)||^2, codebook loss, reconstruction,
    the per-code counts and sums, and the restart candidates (code k: the vector at its drawn
    position of the image with the largest score)."""
    from torch_impl import vqvae as tv

    config, torch_model, _, arrays, batch = pair
    m, c = config.model, config.model.codebook
    pixels, score, position = batch
    with torch.no_grad():
        z = torch_model.encoder(torch.tensor(pixels)).numpy()
        t = tv.loss_terms(torch_model, *map(torch.tensor, batch))
        loss = tv.training_loss(torch_model, *map(torch.tensor, batch))
    codes, quantized, flat, margin = quantizer_reference(z, arrays["quantizer.codebook"])
    assert margin > 1e-4   # no near-tie that float32 could decide either way
    assert np.array_equal(t["codes"].numpy(), codes) and len(np.unique(codes)) > 3
    commitment = ((z.astype(np.float64) - quantized) ** 2).mean()
    assert abs(float(t["commitment"]) - commitment) <= 1e-6 * commitment
    assert abs(float(t["codebook"]) - commitment) <= 1e-6 * commitment
    recon = t["pixels"].numpy().astype(np.float64) - pixels
    reconstruction = (recon ** 2).mean() if m.reconstruction == "l2" else np.abs(recon).mean()
    assert abs(float(t["reconstruction"]) - reconstruction) <= 1e-6 * reconstruction
    expected = reconstruction + c.beta * commitment + (commitment if c.update == "loss" else 0.0)
    assert abs(float(loss[0]) - expected) <= 1e-6 * expected
    onehot = np.eye(c.size)[codes.reshape(-1)]
    assert np.array_equal(t["counts"].numpy()[0], onehot.sum(0))
    assert np.abs(t["sums"].numpy()[0] - onehot.T @ flat).max() <= 1e-5 * np.abs(flat).sum(0).max()
    best = score.argmax(0)
    positions = m.grid ** 2
    candidates = flat[best * positions + position[best, np.arange(c.size)]]
    assert np.abs(t["candidates"].numpy()[0] - candidates).max() <= 1e-6 * np.abs(candidates).max()
    assert np.array_equal(t["best_score"].numpy()[0], score.max(0))


# ----------------------------------------------------------------------------- backends

def test_backends_agree_on_codes_reconstruction_and_loss(pair):
    """Same weights, same batch: identical codes, reconstructions (forward, and decode of the
    codes) <= 1e-5 relative to their scale, every loss term and after_step statistic."""
    import mindspore as ms
    from mindspore_impl import vqvae as mv
    from torch_impl import vqvae as tv

    _, torch_model, ms_model, _, batch = pair
    pixels = batch[0]
    with torch.no_grad():
        t_codes = torch_model.encode(torch.tensor(pixels)).numpy()
        t_pixels = torch_model(torch.tensor(pixels)).numpy()
        t_decoded = torch_model.decode(torch.tensor(t_codes)).numpy()
        t = tv.loss_terms(torch_model, *map(torch.tensor, batch))
        t_out = tv.training_loss(torch_model, *map(torch.tensor, batch))
    m_codes = ms_model.encode(ms.Tensor(pixels)).asnumpy()
    m_pixels = ms_model(ms.Tensor(pixels)).asnumpy()
    m_decoded = ms_model.decode(ms.Tensor(m_codes)).asnumpy()
    m = mv.loss_terms(ms_model, *map(ms.Tensor, batch))
    m_out = mv.training_loss(ms_model, *map(ms.Tensor, batch))
    assert np.array_equal(t_codes, m_codes) and t_codes.shape == (3, 4, 4)
    for a, b in ((t_pixels, m_pixels), (t_decoded, m_decoded), (t_pixels, t_decoded)):
        assert np.abs(a - b).max() <= TOL * max(1.0, np.abs(a).max())
    for key in ("reconstruction", "commitment", "codebook"):
        a, b = float(t[key]), float(m[key].asnumpy())
        assert abs(a - b) <= TOL * max(1.0, abs(a)), key
    assert abs(float(t_out[0]) - float(m_out[0].asnumpy())) <= TOL * max(1.0, float(t_out[0]))
    assert np.array_equal(t_out[1].numpy(), m_out[1].asnumpy())          # counts
    assert np.array_equal(t_out[3].numpy(), m_out[3].asnumpy())          # best scores
    for i in (2, 4):                                                     # sums, candidates
        a, b = t_out[i].numpy(), m_out[i].asnumpy()
        assert np.abs(a - b).max() <= TOL * max(1.0, np.abs(a).max())


@pytest.mark.parametrize("restart", [True, False])
def test_after_step_against_numpy(pair, restart):
    """after_step in both backends against the float64 reference: 2 micro-batches'
    statistics, an EMA step, Laplace smoothing (update ema), restarts of the dead codes
    (cluster size below 1 after the step) with the best-scored micro-batch's candidate."""
    import mindspore as ms
    from mindspore_impl import vqvae as mv
    from torch_impl import vqvae as tv

    config, torch_model, ms_model, arrays, _ = pair
    raw = json.loads(config.model_dump_json())
    raw["model"]["codebook"]["restart"] = restart
    config = validate_config(raw, "vqvae-tiny")
    c = config.model.codebook
    rng = np.random.default_rng(11)
    counts = rng.integers(0, 4, (2, c.size)).astype(np.float32)
    sums = rng.standard_normal((2, c.size, c.dim)).astype(np.float32)
    scores = rng.random((2, c.size), dtype=np.float32)
    candidates = rng.standard_normal((2, c.size, c.dim)).astype(np.float32)
    expected = after_step_reference(arrays, c, counts, sums, scores, candidates)
    dead = expected["quantizer.cluster_size"] == c.restart_threshold
    if restart:
        assert 0 < dead.sum() < c.size
    try:
        for model, module, to in ((torch_model, tv, torch.tensor), (ms_model, mv, ms.Tensor)):
            model.config = config
            module.after_step(model, *map(to, (counts, sums, scores, candidates)))
            after = state_dict(model)
            for name, value in expected.items():
                assert np.abs(after[name] - value).max() <= 1e-6 * max(1.0, np.abs(value).max()), name
            others = [n for n in arrays if not n.startswith("quantizer.")]
            assert all(np.array_equal(after[n], arrays[n]) for n in others)
    finally:   # restore the shared fixture
        for model in (torch_model, ms_model):
            model.config = pair[0]
            load_state_dict(model, arrays)


def chain_terms(m) -> int:
    """Accumulated terms from the pixels to the loss (tests/tolerance.py): every conv and
    linear's fan-in along the encoder and the decoder, and the loss's mean over the pixels."""
    enc, dec = m.channels, m.decoder_widths[::-1]
    d = m.codebook.dim
    terms = 27 + sum(m.num_res_blocks * 10 * w for w in enc) + sum(4 * w for w in enc[:-1]) + enc[-1]
    terms += 9 * d + sum(m.num_res_blocks * 10 * w for w in dec) + sum(dec[:-1]) + 9 * dec[-1]
    return terms + 3 * m.image_size ** 2 * 3


def test_gradients_agree_in_graph_mode(pair):
    """The trainer's path: MindSpore's jit(value_and_grad(training_loss)) over the trainable
    parameters compiles; its loss and gradients equal torch's backward (the straight-through
    estimator; the codebook's gradient from the codebook loss for update ``loss``).

    Tolerance, derived (tests/tolerance.py): the forward chain (chain_terms, ~3,400 terms)
    walked again backwards (x2), relative to the largest gradient of the tensor (bound 8e-4;
    observed 1e-6: a worst-case bound, tests/tolerance.py)."""
    import mindspore as ms
    from mindspore_impl import vqvae as mv
    from mindspore_impl.weights import canonical_parameters
    from torch_impl import vqvae as tv
    from tolerance import float32_tolerance

    config, torch_model, ms_model, _, batch = pair
    torch_model.zero_grad()
    loss = tv.training_loss(torch_model, *map(torch.tensor, batch))[0]
    loss.backward()
    loss = loss.detach()
    expected = {n: p.grad.numpy() for n, p in torch_model.named_parameters() if p.requires_grad}
    params = ms_model.trainable_params()
    names = {p.name: n for n, (p, _) in canonical_parameters(ms_model).items()}

    def step(*inputs):
        return mv.training_loss(ms_model, *inputs)
    grad_fn = ms.jit(ms.value_and_grad(step, None, params, has_aux=True))
    outputs, grads = grad_fn(ms.Tensor(batch[0]), ms.Tensor(batch[1]), ms.Tensor(batch[2].astype(np.int32)))
    bound = float32_tolerance(1.0, 2 * chain_terms(config.model))
    assert abs(float(outputs[0].asnumpy()) - float(loss)) <= TOL * max(1.0, float(loss))
    assert len(grads) == len(expected)
    for param, grad in zip(params, grads):
        ref = expected[names[param.name]]
        assert np.abs(ref).max() > 0, names[param.name]
        assert np.abs(grad.asnumpy() - ref).max() <= bound * max(1.0, np.abs(ref).max()), names[param.name]


# ----------------------------------------------------------------------------- reports

def test_psnr_and_code_usage_from_definitions():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (2, 4, 4, 3)).astype(np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] = a[0, 0, 0, 0] ^ 1      # one value off by 1
    mse = 1.0 / 48
    assert np.allclose(psnr(a, b), [10 * np.log10(255 ** 2 / mse), np.inf])
    usage, perplexity = code_usage(np.array([[0, 0], [1, 3]]), 8)
    p = np.array([0.5, 0.25, 0.25])
    assert usage == 3 / 8 and np.isclose(perplexity, np.exp(-(p * np.log(p)).sum()))

"""The GPT in both backends: same weights give the same logits; cache equals full pass."""
import numpy as np
import pytest

import taichu
from taichu.families import get_family, num_parameters
from conftest import CONFIGS, padded_batch


def run_torch(model, ids, mask=None):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(ids), None if mask is None else torch.from_numpy(mask)).numpy()


def run_ms(model, ids, mask=None):
    import mindspore as ms

    return model(ms.Tensor(ids.astype(np.int32)),
                 None if mask is None else ms.Tensor(mask.astype(np.int32))).asnumpy()


@pytest.mark.parametrize("source", ["torch", "mindspore"])
def test_same_weights_same_logits_through_model_directory(tiny_config, tmp_path, ms_mode, source):
    """Random init in one backend, saved, loaded in both: logits equal with padding."""
    import mindspore as ms
    import torch

    torch.manual_seed(1)
    ms.set_seed(1)
    model = taichu.build_model(tiny_config, source)
    taichu.save_model(model, tmp_path / "model")
    torch_model = taichu.load_model(tmp_path / "model", backend="torch")
    ms_model = taichu.load_model(tmp_path / "model", backend="mindspore")

    rng = np.random.default_rng(0)
    left_ids, left_mask = padded_batch(rng, 4096, [23, 9, 16], left=True)
    right_ids, right_mask = padded_batch(rng, 4096, [5, 23, 12], left=False)
    for ids, mask in ((left_ids, left_mask), (right_ids, right_mask)):
        torch_logits = run_torch(torch_model, ids, mask)
        ms_logits = run_ms(ms_model, ids, mask)
        assert np.isfinite(ms_logits).all()
        diff = np.abs(torch_logits - ms_logits).max()
        assert diff <= 1e-5, f"max |torch - mindspore| = {diff}"
        # The model saved is the model loaded: its own logits survive the round trip.
        own = run_torch(model, ids, mask) if source == "torch" else run_ms(model, ids, mask)
        assert np.abs(own - torch_logits).max() <= 1e-5
    # Padding is invisible: a padded row's real positions equal the sequence run alone.
    row_ids = left_ids[1:2, -9:]
    alone = run_torch(torch_model, row_ids)
    assert np.abs(alone[0] - run_torch(torch_model, left_ids, left_mask)[1, -9:]).max() <= 1e-5
    assert np.abs(run_ms(ms_model, row_ids)[0] - alone[0]).max() <= 1e-5


def test_mindspore_and_torch_logits_differ_for_different_weights(tiny_config):
    """Guards the parity test: independently initialised models must not agree."""
    ids = np.random.default_rng(0).integers(0, 4096, (2, 8))
    torch_model = taichu.build_model(tiny_config, "torch").eval()
    ms_model = taichu.build_model(tiny_config, "mindspore")
    ms_model.set_train(False)
    assert np.abs(run_torch(torch_model, ids) - run_ms(ms_model, ids)).max() > 1e-3


def _decode_with_cache_torch(model, ids, mask, prefill):
    import torch

    with torch.no_grad():
        ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
        logits, past = model(ids_t[:, :prefill], mask_t[:, :prefill], use_cache=True)
        steps = [logits.numpy()]
        for t in range(prefill, ids.shape[1]):
            logits, past = model(ids_t[:, t:t + 1], mask_t[:, :t + 1], past_key_values=past,
                                 use_cache=True)
            steps.append(logits.numpy())
    return np.concatenate(steps, axis=1)


def _decode_with_cache_ms(model, ids, mask, prefill):
    import mindspore as ms

    ids_t, mask_t = ms.Tensor(ids.astype(np.int32)), ms.Tensor(mask.astype(np.int32))
    logits, past = model(ids_t[:, :prefill], mask_t[:, :prefill], use_cache=True)
    steps = [logits.asnumpy()]
    for t in range(prefill, ids.shape[1]):
        logits, past = model(ids_t[:, t:t + 1], mask_t[:, :t + 1], past_key_values=past,
                             use_cache=True)
        steps.append(logits.asnumpy())
    return np.concatenate(steps, axis=1)


def test_kv_cache_decoding_equals_full_forward(tiny_config, tmp_path):
    taichu.save_model(taichu.build_model(tiny_config, "torch"), tmp_path / "m")
    torch_model = taichu.load_model(tmp_path / "m", backend="torch")
    ms_model = taichu.load_model(tmp_path / "m", backend="mindspore")
    ids, mask = padded_batch(np.random.default_rng(3), 4096, [14, 8, 11], left=True)
    full = run_torch(torch_model, ids, mask)
    real = mask.astype(bool)
    cached_torch = _decode_with_cache_torch(torch_model, ids, mask, prefill=6)
    cached_ms = _decode_with_cache_ms(ms_model, ids, mask, prefill=6)
    assert np.abs(cached_torch - full)[real].max() <= 1e-5
    assert np.abs(cached_ms - full)[real].max() <= 1e-5
    # The cache is really used: decoding one token without it sees no context.
    no_context = run_torch(torch_model, ids[:, -1:], mask[:, -1:])
    assert np.abs(no_context[:, 0] - full[:, -1]).max() > 1e-3


@pytest.mark.parametrize("name", ["gpt-tiny", "gpt-small"])
def test_parameter_count_from_config_equals_built_models(name):
    config = taichu.load_config(CONFIGS / "gpt" / f"{name}.yaml")
    specs = get_family("gpt").tensor_specs(config)
    for backend in ("torch", "mindspore"):
        arrays = taichu.state_dict(taichu.build_model(config, backend))
        assert {k: v.shape for k, v in arrays.items()} == {k: s.shape for k, s in specs.items()}
        assert sum(a.size for a in arrays.values()) == num_parameters(config)
    torch_model = taichu.build_model(config, "torch")
    # Tied output projection: no parameter is counted twice or left out.
    assert sum(p.numel() for p in torch_model.parameters()) == num_parameters(config)


def test_released_size_is_about_3b2():
    config = taichu.load_config(CONFIGS / "gpt" / "taichu-text-3b2.yaml")
    assert (config.model.num_layers, config.model.hidden_size, config.model.num_heads) == (40, 2560, 32)
    assert 3.1e9 <= num_parameters(config) <= 3.3e9


@pytest.mark.parametrize("backend", ["torch", "mindspore"])
def test_bad_inputs_are_clear_errors(tiny_config, backend):
    model = taichu.build_model(tiny_config, backend)
    run = run_torch if backend == "torch" else run_ms
    with pytest.raises(ValueError, match="token id 4096 is out of range for vocab_size 4096"):
        run(model, np.array([[5, 4096, 7]]))
    with pytest.raises(ValueError, match="token id -1 is out of range"):
        run(model, np.array([[5, -1, 7]]))
    with pytest.raises(ValueError, match="sequence length 129 .* exceeds max_position_embeddings 128"):
        run(model, np.zeros((1, 129), np.int64))
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, past \+ sequence\]"):
        run(model, np.zeros((2, 4), np.int64), np.ones((2, 5), np.int64))
    # The longest allowed sequence still runs.
    assert run(model, np.zeros((1, 128), np.int64)).shape == (1, 128, 4096)


def test_cache_past_the_position_table_is_an_error(tiny_config):
    import torch

    model = taichu.build_model(tiny_config, "torch").eval()
    with torch.no_grad():
        _, past = model(torch.zeros((1, 127), dtype=torch.long), use_cache=True)
        model(torch.zeros((1, 1), dtype=torch.long), past_key_values=past, use_cache=True)
        with pytest.raises(ValueError, match=r"sequence length 129 \(past 127 \+ new 2\)"):
            model(torch.zeros((1, 2), dtype=torch.long), past_key_values=past, use_cache=True)


def test_mindspore_exact_gelu_and_its_written_out_gradient_match_torch():
    """mindspore_impl.gpt.GELU (a bprop cell: Phi(x) + x phi(x)) against torch's exact GELU and
    autograd, both in float64, over the range activations reach; graph mode and PyNative."""
    import mindspore as ms
    import torch
    from mindspore_impl.gpt import GELU
    from tolerance import float32_tolerance

    x = np.linspace(-8, 8, 4001, dtype=np.float32)
    reference = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    torch.nn.functional.gelu(reference).sum().backward()
    expected_value = torch.nn.functional.gelu(reference).detach().numpy()
    expected_grad = reference.grad.numpy()
    gelu = GELU()

    def total(t):
        return gelu(t).sum()

    grad_fn = ms.value_and_grad(total)
    for run in (grad_fn, ms.jit(grad_fn)):
        _, grad = run(ms.Tensor(x))
        value = gelu(ms.Tensor(x)).asnumpy()
        # Scale: |x| <= 8 for the value, Phi(x) + |x| phi(x) <= 1.25 for the derivative. Terms:
        # the chain's element-wise roundings (4 for the value, 8 for the derivative) plus 4
        # for each of erf and exp, whose CPU kernels are accurate to a few ulps, not to one.
        # (Seen here: 4.3e-7 and 7.6e-7 against bounds of 7.6e-6 and 2.4e-6.)
        np.testing.assert_allclose(value, expected_value, rtol=0, atol=float32_tolerance(8.0, 8))
        np.testing.assert_allclose(grad.asnumpy(), expected_grad, rtol=0,
                                   atol=float32_tolerance(1.25, 16))
    # The derivative really is the written one: it differs from the tanh approximation's.
    tanh_gelu = ms.nn.GELU(approximate=True)

    def tanh_total(t):
        return tanh_gelu(t).sum()

    approx = ms.value_and_grad(tanh_total)(ms.Tensor(x))[1]
    assert np.abs(approx.asnumpy() - expected_grad).max() > 100 * float32_tolerance(1.25, 16)


@pytest.mark.parametrize("name", ["SOFTMAX", "LOG_SOFTMAX"])
def test_mindspore_softmax_and_its_written_out_gradient_match_torch(name):
    """mindspore_impl.gpt.Softmax and LogSoftmax (bprop cells whose row sums are a MatMul)
    against torch's and autograd in float64, on attention-shaped scores with masked
    (dtype-min) entries; graph mode and PyNative."""
    import mindspore as ms
    import torch
    import mindspore_impl.gpt as ms_gpt
    from tolerance import float32_tolerance

    cell = getattr(ms_gpt, name)
    reference_fn = torch.softmax if name == "SOFTMAX" else torch.log_softmax
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 3, 5, 64)) * 4).astype(np.float32)
    x[..., 40:] += np.float32(np.finfo(np.float32).min)        # a causal-style masked block
    weights = rng.uniform(-1, 1, x.shape).astype(np.float32)
    if name == "LOG_SOFTMAX":
        x, weights = x[..., :40], weights[..., :40]              # -inf-like values would dominate
    reference = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    expected_value = reference_fn(reference, dim=-1)
    (expected_value * torch.tensor(weights, dtype=torch.float64)).sum().backward()
    expected_value, expected_grad = expected_value.detach().numpy(), reference.grad.numpy()

    def total(t, w):
        return (cell(t) * w).sum()

    grad_fn = ms.value_and_grad(total)
    for run in (grad_fn, ms.jit(grad_fn)):
        _, grad = run(ms.Tensor(x), ms.Tensor(weights))
        # Softmax: values p <= 1 from exp (a few ulps), a row sum of 64 terms and a division;
        # gradient p (w - sum w p), |.| <= 2: the 64-term row sum, p w and the roundings of p.
        # Log-softmax: values x - max - log(sum exp) with |x - max| <= ~40 here; gradient
        # w - p sum w, |.| <= 1 + 40 (|sum w| <= 40 columns): the same chain.
        # (Seen: values 3.6e-7 / 5.2e-6, gradients 2.5e-7 / 2.1e-5, softmax / log-softmax.)
        value_scale, grad_scale = (1.0, 2.0) if name == "SOFTMAX" else (40.0, 41.0)
        np.testing.assert_allclose(cell(ms.Tensor(x)).asnumpy(), expected_value, rtol=0,
                                   atol=float32_tolerance(value_scale, 64))
        np.testing.assert_allclose(grad.asnumpy(), expected_grad, rtol=0,
                                   atol=float32_tolerance(grad_scale, 72))
        if name == "SOFTMAX":
            assert np.all(grad.asnumpy()[..., 40:] == 0)             # masked keys get nothing

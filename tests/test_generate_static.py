"""Generation over a static cache (StaticCachePrefill + StaticCacheDecoder, taichu.generate.
StaticCacheStep): the same logits and tokens as the growing cache and as torch_impl, in
MindSpore PyNative (the graphs jit-compiled) and graph mode."""
from pathlib import Path

import numpy as np
import pytest

import taichu
from taichu.generate import (MIN_CACHE, PROMPT_BUCKET, SamplingConfig, StaticCacheStep, generate_ids,
                             model_step, static_cache_step)

# Left-padded batches: 8 prompts of 8 lengths (the longest, 20, pads to a bucket of 32), and
# one prompt alone. 40 new tokens run the cache past its first 64 slots, so it grows once.
RNG = np.random.default_rng(3)
BATCHES = {1: [[2, 311, 95, 1200, 40]],
           8: [[2] + RNG.integers(4, 4096, n - 1).tolist() for n in (1, 3, 5, 7, 9, 12, 17, 20)]}
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    config = taichu.load_config(Path(__file__).resolve().parents[1] / "configs" / "gpt" / "gpt-tiny.yaml")
    return taichu.save_model(taichu.build_model(config, "torch"), tmp_path_factory.mktemp("m") / "m")


def recorded(step, logits_log):
    def wrapped(input_ids, attention_mask, past):
        logits, past = step(input_ids, attention_mask, past)
        logits_log.append(np.array(logits))
        return logits, past
    return wrapped


def greedy(step, prompts):
    logits = []
    tokens = generate_ids(recorded(step, logits), prompts, SamplingConfig(NEW_TOKENS, temperature=0),
                          eos_id=-1, pad_id=0, max_positions=128)
    return tokens, logits


@pytest.fixture(scope="module")
def references(model_dir):
    """Tokens and per-step logits of the growing cache in both backends (MindSpore
    PyNative) and of torch_impl's static cache, by batch size."""
    import mindspore as ms

    ms.set_context(mode=ms.PYNATIVE_MODE)
    torch_model = taichu.load_model(model_dir, backend="torch")
    ms_model = taichu.load_model(model_dir, backend="mindspore")
    return {batch: {"torch": greedy(model_step(torch_model), prompts),
                    "torch static": greedy(model_step(torch_model, static_cache=True), prompts),
                    "mindspore dynamic": greedy(model_step(ms_model, static_cache=False), prompts)}
            for batch, prompts in BATCHES.items()}


@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_static_cache_equals_the_growing_cache_and_torch(references, model_dir, ms_mode, batch):
    model = taichu.load_model(model_dir, backend="mindspore")
    step = model_step(model)                      # MindSpore's default: the static cache
    assert isinstance(step, StaticCacheStep)
    tokens, logits = greedy(step, BATCHES[batch])
    assert all(len(row) == NEW_TOKENS for row in tokens)
    for name, (expected_tokens, expected_logits) in references[batch].items():
        assert tokens == expected_tokens, name
        assert len(logits) == len(expected_logits) == NEW_TOKENS
        worst = max(float(np.abs(a - b).max()) for a, b in zip(logits, expected_logits))
        assert worst <= 1e-5, f"{name}: logits differ by {worst:.3g} ({ms_mode})"


def test_decoding_runs_at_fixed_shapes(model_dir):
    """Each decoding step gets the cache at its bucket's full length; the prompt pass a
    prompt padded to its bucket: a handful of shapes, whatever the lengths."""
    shapes = {"prefill": [], "decode": []}
    inner = static_cache_step(taichu.load_model(model_dir, backend="torch"))

    def prefill(input_ids, attention_mask):
        shapes["prefill"].append(input_ids.shape)
        return inner.prefill(input_ids, attention_mask)

    def decode(input_ids, attention_mask, write_position, cache):
        shapes["decode"].append((attention_mask.shape, tuple(cache[0].shape)))
        return inner.decode(input_ids, attention_mask, write_position, cache)
    step = StaticCacheStep(prefill, decode, inner.extend, inner.vocab_size)
    greedy(step, BATCHES[8])
    assert shapes["prefill"] == [(8, 2 * PROMPT_BUCKET)]
    # 32 prompt slots + 39 decoding steps: 64 slots, then 128 once they are full.
    assert sorted(set(shapes["decode"])) == [((8, MIN_CACHE), (8, 4, MIN_CACHE, 16)),
                                            ((8, 2 * MIN_CACHE), (8, 4, 2 * MIN_CACHE, 16))]
    assert len(shapes["decode"]) == NEW_TOKENS - 1


def test_last_position_logits_equal_the_full_ones(model_dir):
    """logits_to_keep=1 (what the prompt pass uses) is the last row of the full logits."""
    import mindspore as ms
    import torch

    ids = np.array([[2, 17, 300, 9, 4000], [0, 0, 2, 55, 6]])
    mask = (np.arange(5) >= np.array([[0], [2]])).astype(np.int64)
    torch_model = taichu.load_model(model_dir, backend="torch")
    with torch.no_grad():
        full = torch_model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        last = torch_model(torch.from_numpy(ids), torch.from_numpy(mask), logits_to_keep=1).numpy()
    assert last.shape == (2, 1, 4096)
    np.testing.assert_allclose(last[:, 0], full[:, -1], atol=1e-6, rtol=0)
    ms_model = taichu.load_model(model_dir, backend="mindspore")
    ms_last = ms_model(ms.Tensor(ids.astype(np.int32)), ms.Tensor(mask.astype(np.int32)),
                       logits_to_keep=1).asnumpy()
    np.testing.assert_allclose(ms_last[:, 0], full[:, -1], atol=1e-5, rtol=0)


def test_out_of_range_ids_are_refused_before_the_graph(model_dir):
    step = model_step(taichu.load_model(model_dir, backend="mindspore"))
    with pytest.raises(ValueError, match="token id 4096 is out of range for vocab_size 4096"):
        step(np.array([[2, 4096]]), np.ones((1, 2), np.int64), None)

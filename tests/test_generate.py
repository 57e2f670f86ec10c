"""Generation: one numpy sampler over both backends; padding and batching change nothing."""
import numpy as np
import pytest

import taichu
from taichu.generate import SamplingConfig, generate_ids, model_step, process_logits


@pytest.fixture
def model_dir(tiny_config, tmp_path):
    import torch

    torch.manual_seed(0)
    return taichu.save_model(taichu.build_model(tiny_config, "torch"), tmp_path / "m")


PROMPTS = [[2, 100, 200, 300, 400, 17, 9], [2, 55], [2, 7, 8, 9, 1000]]


def test_greedy_tokens_equal_in_both_backends_for_a_ragged_batch(model_dir):
    greedy = SamplingConfig(max_new_tokens=12, temperature=0)
    runs = {}
    for backend in ("torch", "mindspore"):
        model = taichu.load_model(model_dir, backend=backend)
        runs[backend] = generate_ids(model_step(model), PROMPTS, greedy, eos_id=3, pad_id=0,
                                     max_positions=128)
    assert runs["torch"] == runs["mindspore"]
    assert all(len(row) == 12 for row in runs["torch"])
    # Batching is invisible: each prompt alone continues the same way.
    model = taichu.load_model(model_dir, backend="torch")
    for prompt, row in zip(PROMPTS, runs["torch"]):
        assert generate_ids(model_step(model), [prompt], greedy, 3, 0, 128)[0] == row


def test_sampling_is_seeded_and_stops_at_eos(model_dir):
    model = taichu.load_model(model_dir, backend="torch")
    sample = SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=20, seed=7)
    first = generate_ids(model_step(model), PROMPTS, sample, 3, 0, 128)
    assert first == generate_ids(model_step(model), PROMPTS, sample, 3, 0, 128)
    assert first != generate_ids(model_step(model), PROMPTS, SamplingConfig(10, 1.0, 20, seed=8), 3, 0, 128)

    def always_eos_after_two(input_ids, mask, past):
        logits = np.zeros((input_ids.shape[0], 50), np.float32)
        logits[:, 5 if mask.shape[1] < 4 else 3] = 10.0
        return logits, None
    out = generate_ids(always_eos_after_two, [[1, 2]], SamplingConfig(10, temperature=0), 3, 0, 64)
    assert out == [[5, 5]]


def test_logits_processing():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(process_logits(logits, [[]], SamplingConfig(top_p=0.7)))
    assert kept.tolist() == [[True, True, False, False]]          # 0.5 < 0.7, 0.8 covers it
    kept = np.isfinite(process_logits(logits, [[]], SamplingConfig(top_k=3)))
    assert kept.tolist() == [[True, True, True, False]]
    penalised = process_logits(np.array([[2.0, 2.0, -1.0]]), [[0, 2]], SamplingConfig(repetition_penalty=2.0))
    assert penalised[0, 1] > penalised[0, 0] > penalised[0, 2]     # 2/2=1 and -1*2=-2 vs 2
    cold = process_logits(np.array([[1.0, 2.0]]), [[]], SamplingConfig(temperature=0.1))
    assert np.exp(cold[0, 1]) > 0.9999
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingConfig(temperature=-1)


def test_prompt_longer_than_window_is_a_clear_error(model_dir):
    model = taichu.load_model(model_dir, backend="torch")
    with pytest.raises(ValueError, match="prompt of 120 tokens \\+ max_new_tokens 20 exceeds the model's window of 128"):
        generate_ids(model_step(model), [[5] * 120], SamplingConfig(20, 0), 3, 0, 128)

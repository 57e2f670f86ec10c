"""Training wav2vec 2.0 through ``taichu train``: batches whose random draws depend only on
(seed, step, clip), both backends taking the same steps for both heads, two data-parallel
processes taking the steps of one, resume, and a pretrained model fine-tuned with CTC through
``--init`` (backbone loaded, head fresh)."""
import shutil

import numpy as np
import pytest

import taichu
from taichu.speech import load_speech_data
from taichu.speech_batches import SpeechBatches, padded_length
from taichu.train import BucketOrder, micro_batches, run_training
from conftest import CONFIGS, logged_losses as losses

PRETRAIN = CONFIGS / "wav2vec2" / "wav2vec2-tiny.yaml"
CTC = CONFIGS / "wav2vec2" / "wav2vec2-tiny-ctc.yaml"


@pytest.fixture(scope="session")
def speech_cache(tmp_path_factory):
    """One synthesised data set for the session (both tiny configs speak the same clips)."""
    return tmp_path_factory.mktemp("speech-cache")


def config(path, cache, *extra):
    return taichu.load_config(path, [f"data.cache_dir={cache}", *extra])


def init_dir(path, cache, out):
    import torch

    torch.manual_seed(0)
    return taichu.save_model(taichu.build_model(config(path, cache), "torch"), out)


# ----------------------------------------------------------------------------- batches

def test_a_clips_draws_do_not_depend_on_its_batch(speech_cache):
    """Mask, distractors and noise of a clip are the same whichever clips share its batch
    and however long the batch is padded; they change with the step; evaluation batches
    draw the same every time."""
    cfg = config(PRETRAIN, speech_cache)
    batches = SpeechBatches(load_speech_data(cfg.data).train, cfg, seed=0)
    short, long_ = np.argsort(batches.lengths)[[0, -1]]
    alone = batches.batch([short], step=5)
    mixed = batches.batch([long_, short], step=5)
    assert mixed["input_values"].shape[1] > alone["input_values"].shape[1]
    frames = alone["mask_time_indices"].shape[1]
    for key in ("mask_time_indices", "gumbel_noise"):
        assert np.array_equal(alone[key][0], mixed[key][1][:frames]), key
        assert not mixed[key][1][frames:].any(), key            # nothing drawn for padding
    # Distractor indices point into the flattened batch: row 1 of the mixed batch is
    # offset by one row of frames, and points at the same frames of its own row.
    real = alone["mask_time_indices"][0]
    total = mixed["mask_time_indices"].shape[1]
    assert np.array_equal(alone["sampled_negative_indices"][0][real],
                          mixed["sampled_negative_indices"][1][:frames][real] - total)
    chosen = mixed["sampled_negative_indices"][1][mixed["mask_time_indices"][1]]
    assert ((chosen >= total) & (chosen < 2 * total)).all()
    # every distractor is another masked frame of the same clip
    masked = set(np.flatnonzero(real))
    for frame in np.flatnonzero(real):
        assert set(alone["sampled_negative_indices"][0][frame]) <= masked - {frame}
    assert not np.array_equal(batches.batch([short], step=6)["mask_time_indices"], alone["mask_time_indices"])
    assert np.array_equal(batches.batch([short])["gumbel_noise"], batches.batch([short])["gumbel_noise"])
    # zero mean, unit variance over the real samples; zeros after
    row = mixed["input_values"][1][mixed["attention_mask"][1] == 1]
    assert abs(row.mean()) < 1e-4 and abs(row.std() - 1) < 1e-3
    assert not mixed["input_values"][1][mixed["attention_mask"][1] == 0].any()
    assert mixed["input_values"].shape[1] == padded_length(batches.lengths[long_], cfg.data.pad_to_seconds)


def test_ctc_batches_hold_the_transcripts(speech_cache):
    from taichu.speech import decode_ids

    cfg = config(CTC, speech_cache)
    clips = load_speech_data(cfg.data).train
    batch = SpeechBatches(clips, cfg, seed=0).batch([0, 1, 2], step=0)
    alphabet = cfg.model.ctc.alphabet
    for row in range(3):
        ids = batch["labels"][row][batch["labels"][row] >= 0]
        assert "".join(alphabet[i] for i in ids) == clips[row].pinyin
    assert decode_ids(np.array([1, 0, 1]), alphabet) == "||"


def test_bucket_order_groups_similar_lengths_and_is_a_function_of_the_step():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 1000, 400)
    order = BucketOrder(lengths, seed=3)
    batches = [order.global_batch(step, 8) for step in range(50)]     # one epoch
    seen = np.concatenate(batches)
    assert len(set(seen.tolist())) == len(seen) == 400                # each sample once
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    random_spread = np.mean([np.ptp(lengths[rng.permutation(400)[:8]]) for _ in range(50)])
    assert spread < 0.2 * random_spread
    again = BucketOrder(lengths, seed=3)
    assert np.array_equal(again.global_batch(37, 8), batches[37])     # resume: step alone
    assert not np.array_equal(order.global_batch(50, 8), batches[0])  # a new epoch reshuffles
    # Two data-parallel ranks split the same global batch
    parts = [micro_batches(batches[4], rank, 2, 1)[0] for rank in (0, 1)]
    assert np.array_equal(np.concatenate(parts), batches[4])


# ----------------------------------------------------------------------------- training

@pytest.mark.parametrize("path", [PRETRAIN, CTC], ids=["pretraining", "ctc"])
def test_first_20_losses_agree_across_backends(tmp_path, speech_cache, path):
    """Same initial weights and batches (masks, distractors, Gumbel noise drawn in numpy):
    MindSpore takes the same 20 steps as PyTorch, for both heads; the loss falls."""
    init = init_dir(path, speech_cache, tmp_path / "init")
    runs = {}
    for backend in ("torch", "mindspore"):
        # Pretraining: every batch padded to 3 s (the clips last up to 2.8 s), one audio shape,
        # so MindSpore compiles its step once; CTC keeps the 1.5 s buckets (two shapes), so a
        # MindSpore run over several batch shapes stays under test. The validation losses (not
        # compared) at the start and the end only, on one batch.
        padding = ["data.pad_to_seconds=3.0"] if path == PRETRAIN else []
        cfg = config(path, speech_cache, "train.log_interval=1", *padding,
                     "train.eval_interval=1000", "train.eval_batches=1")
        run_training(cfg, backend, tmp_path / backend, init_dir=init, progress=False)
        runs[backend] = losses(tmp_path / backend)
    assert sorted(runs["torch"]) == list(range(1, 21))
    torch_losses = np.array([runs["torch"][s] for s in range(1, 21)])
    ms_losses = np.array([runs["mindspore"][s] for s in range(1, 21)])
    relative = np.abs(torch_losses - ms_losses) / np.abs(torch_losses)
    print(f"torch losses {np.round(torch_losses, 4).tolist()}")
    assert relative.max() <= 1e-4, f"worst relative difference {relative.max():.2e} at step {relative.argmax() + 1}"
    assert torch_losses[-5:].mean() < torch_losses[:5].mean()
    for backend in ("torch", "mindspore"):
        final = taichu.state_dict(taichu.load_model(tmp_path / backend / "final", "torch"))
        assert final["num_updates"].tolist() == [20]


def test_resume_continues_the_same_run(tmp_path, speech_cache):
    """Cut after step 3 and resumed: the same losses (the step decides the draws, the saved
    update count the Gumbel temperature)."""
    init = init_dir(PRETRAIN, speech_cache, tmp_path / "init")
    cfg = config(PRETRAIN, speech_cache, "train.max_steps=6", "train.checkpoint_interval=3",
                 "train.log_interval=1")
    run_training(cfg, "torch", tmp_path / "full", init_dir=init, progress=False)
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-00000006")
    shutil.rmtree(tmp_path / "cut" / "final")
    run_training(cfg, "torch", tmp_path / "cut", init_dir=init, resume=True, progress=False)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


@pytest.mark.slow
def test_two_process_data_parallel_matches_one_process(tmp_path, speech_cache):
    """torchrun with 2 workers, each padding its own half of the global batch and drawing
    its masks and distractors = one process with 2 micro-batches: the same losses, gradient
    norms (the ranks' gradients averaged, not summed) and weights. The pretraining head: its
    distractor indices point into the rank's own batch. Torch only (the speech-specific part
    is numpy; MindSpore's gradient exchange is the one tests/test_distributed.py and BriVL's
    test check, and an msrun run here costs ~1.5 min of the family's test budget)."""
    from test_distributed import assert_same_steps, launch_two_workers

    init = init_dir(PRETRAIN, speech_cache, tmp_path / "init")
    lr, steps = 1e-3, 5
    overrides = [f"data.cache_dir={speech_cache}", f"train.max_steps={steps}", f"train.learning_rate={lr}",
                 "train.log_interval=1", "train.eval_interval=1000", "train.checkpoint_interval=1000"]
    run_training(taichu.load_config(PRETRAIN, overrides + ["train.grad_accum_steps=2"]), "torch",
                 tmp_path / "single", init_dir=init, progress=False)
    launch_two_workers(PRETRAIN, "torch", tmp_path / "parallel", init, overrides)
    assert_same_steps(tmp_path / "single", tmp_path / "parallel", steps, lr)


def test_pretrained_model_fine_tunes_with_ctc(tmp_path, speech_cache, capsys):
    """--init a pretraining model into a CTC run: the backbone is loaded, the quantizer and
    projections are dropped, lm_head and the update counter start fresh, and the log says so."""
    cfg = config(PRETRAIN, speech_cache, "train.max_steps=3")
    pretrained = run_training(cfg, "torch", tmp_path / "pretrain", progress=False).final_dir
    capsys.readouterr()
    ctc = config(CTC, speech_cache, "train.max_steps=2")
    tuned = run_training(ctc, "torch", tmp_path / "ctc", init_dir=pretrained, progress=False).final_dir
    log = capsys.readouterr().out
    assert "initialised fresh: lm_head.bias, lm_head.weight, num_updates" in log
    assert "quantizer.codevectors" in log.split("not used from the init:")[1]
    # The config fields that differ, leaf by leaf (not the two whole head sections).
    assert "'head': ('pretraining', 'ctc')" in log and "'ctc.freeze_feature_encoder_steps': (0, 3)" in log
    assert "'ctc': (" not in log and "'quantizer': (" not in log
    before = taichu.state_dict(taichu.load_model(pretrained, "torch"))
    # Two steps later, the frozen feature encoder (freeze_feature_encoder_steps 3) is unchanged
    # (weight decay is 0 in the CTC config) and the Transformer moved.
    after = taichu.state_dict(taichu.load_model(tuned, "torch"))
    assert after["num_updates"].tolist() == [2]
    conv = "wav2vec2.feature_extractor.conv_layers.0.conv.weight"
    assert np.array_equal(after[conv], before[conv])
    layer = "wav2vec2.encoder.layers.0.attention.q_proj.weight"
    assert not np.array_equal(after[layer], before[layer])
    # A CTC run cannot --init from a model of another size: every mismatch is listed.
    wrong = config(CTC, speech_cache, "train.max_steps=2", "model.hidden_size=16",
                   "model.intermediate_size=32")
    with pytest.raises(ValueError, match="mis-shaped"):
        run_training(wrong, "torch", tmp_path / "wrong", init_dir=pretrained, progress=False)

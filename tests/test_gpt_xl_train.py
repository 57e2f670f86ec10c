"""GPT-XL training: rows read contiguous streams, the memory is carried from step to step and
saved with each checkpoint (exact resume), both backends take the same steps."""
import numpy as np
import pytest

import taichu
from taichu.data import StreamSegments
from taichu.train import CARRY_FILE, StreamOrder, micro_batches, read_metrics, run_training
from taichu.weights import CheckpointError, load_safetensors
from conftest import CONFIGS, logged_losses as losses

TINY = CONFIGS / "gpt_xl" / "gpt-xl-tiny.yaml"


def short_run(tmp_path, *extra):
    return [f"data.cache_dir={tmp_path / 'cache'}", "train.batch_size=4", "train.warmup_steps=3",
            "train.learning_rate=2e-3", "train.min_learning_rate=1e-4", "train.log_interval=1",
            "train.eval_interval=1000", "train.eval_batches=2", *extra]


@pytest.fixture
def init_dir(tmp_path, tiny_tokenizer):
    import torch

    torch.manual_seed(0)
    config = taichu.load_config(TINY)
    return taichu.save_model(taichu.build_model(config, "torch"), tmp_path / "init", tokenizer=tiny_tokenizer)


def test_rows_read_contiguous_streams_and_documents_are_counted():
    bos = 2
    tokens = np.array([bos, 5, 6, 7, bos, 8, 9, bos, 10, 11, 12, 13, bos, 14, 15, 16, 17, 18, 19, 20] * 3)
    for reset in ("never", "document"):
        streams = StreamSegments(tokens, rows=2, seq_len=4, bos_id=bos, reset_memory=reset)
        order = StreamOrder()
        assert streams.stream_tokens == 30 and streams.segments == 7
        step0, step1 = (streams.batch(order.global_batch(s, 2)) for s in (0, 1))
        # Row r of the next step starts where row r of this one ended (one shared token).
        assert np.array_equal(step1["input_ids"][:, 0], step0["input_ids"][:, -1])
        assert np.array_equal(step0["input_ids"][1], tokens[30:35])
        # Past the last whole segment a stream starts again from its own beginning.
        wrapped = streams.batch(order.global_batch(7, 2))
        assert np.array_equal(wrapped["input_ids"], step0["input_ids"])
        if reset == "never":
            assert (step0["document_ids"] == 0).all() and (wrapped["document_ids"] == 1).all()
        else:
            # Row 0 = [bos 5 6 7 | bos 8 9 bos 10 ...]: a new id at every bos.
            assert step0["document_ids"][0].tolist() == [1, 1, 1, 1]
            assert step1["document_ids"][0].tolist() == [2, 2, 2, 3]
            # A wrapped stream never repeats an id its memory may still hold.
            last = streams.batch(order.global_batch(6, 2))["document_ids"]
            assert (wrapped["document_ids"].min(axis=1) > last.max(axis=1)).all()


def test_first_20_losses_agree_across_backends_with_the_memory_carried(tmp_path, init_dir):
    """Same weights, batches and memory rule, fp32, with accumulation (two micro-batches, each
    carrying its own rows' memory): MindSpore graph = PyTorch. Validation runs with the memory
    too."""
    overrides = short_run(tmp_path, "train.max_steps=20", "train.grad_accum_steps=2",
                          "train.eval_interval=10")
    runs, val = {}, {}
    for backend in ("torch", "mindspore"):
        config = taichu.load_config(TINY, overrides)
        run_training(config, backend, tmp_path / backend, init_dir=init_dir, progress=False)
        runs[backend] = losses(tmp_path / backend)
        val[backend] = [r["val_loss"] for r in read_metrics(tmp_path / backend) if "val_loss" in r]
    torch_losses = np.array([runs["torch"][s] for s in range(1, 21)])
    ms_losses = np.array([runs["mindspore"][s] for s in range(1, 21)])
    relative = np.abs(torch_losses - ms_losses) / np.abs(torch_losses)
    assert relative.max() <= 1e-4, f"worst relative difference {relative.max():.2e} at step {relative.argmax() + 1}"
    assert torch_losses[-1] < torch_losses[0] - 0.3
    assert len(val["torch"]) == 3 and np.allclose(val["torch"], val["mindspore"], rtol=1e-4)
    # The memory written with the last checkpoint: one row per batch row, mem_len slots, and
    # (after 20 segments of 32 > mem_len) every slot filled.
    for backend in ("torch", "mindspore"):
        memory = load_safetensors(tmp_path / backend / "checkpoints" / "step-00000020" / CARRY_FILE)
        assert memory["memory.0"].shape == (4, 32, 64) and (memory["memory_document_ids"] >= 0).all()
    a = load_safetensors(tmp_path / "torch" / "checkpoints" / "step-00000020" / CARRY_FILE)
    b = load_safetensors(tmp_path / "mindspore" / "checkpoints" / "step-00000020" / CARRY_FILE)
    # The same documents in the same slots (the hidden states themselves are what the 20
    # losses above already read).
    assert np.array_equal(a["memory_document_ids"], b["memory_document_ids"])


def test_memory_changes_the_losses(tmp_path, init_dir):
    """The carried memory is really read: the same 6 steps with mem_len 0 give other losses
    from step 2 on (step 1 reads an empty memory in both), and write no memory file."""
    with_memory = taichu.load_config(TINY, short_run(tmp_path, "train.max_steps=6"))
    without = taichu.load_config(TINY, short_run(tmp_path, "train.max_steps=6", "model.mem_len=0"))
    run_training(with_memory, "torch", tmp_path / "memory", init_dir=init_dir, progress=False)
    run_training(without, "torch", tmp_path / "none", init_dir=init_dir, progress=False)
    a, b = losses(tmp_path / "memory"), losses(tmp_path / "none")
    assert a[1] == pytest.approx(b[1], rel=1e-6)
    assert all(abs(a[s] - b[s]) > 1e-4 for s in range(2, 7))
    assert not (tmp_path / "none" / "checkpoints" / "step-00000006" / CARRY_FILE).exists()


def test_resume_is_exact(tmp_path, init_dir):
    """Stopped after the checkpoint of step 4 and resumed: the same losses bit for bit, the
    memory read back from the checkpoint (written and read by taichu.train whatever the
    backend). PyTorch: a resumed MindSpore run is not bitwise (its gradients differ at 1e-6
    relative from the first step after resume, with inputs and weights bitwise equal: see
    docs/training.md), so bitwise is asserted where it holds."""
    import shutil

    overrides = short_run(tmp_path, "train.max_steps=8", "train.checkpoint_interval=4")
    config = taichu.load_config(TINY, overrides)
    run_training(config, "torch", tmp_path / "full", init_dir=init_dir, progress=False)
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-00000008")
    run_training(config, "torch", tmp_path / "cut", init_dir=init_dir, resume=True, progress=False)
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(cut) == list(range(1, 9))
    assert all(cut[s] == full[s] for s in range(1, 9)), [(s, cut[s], full[s]) for s in range(1, 9)]


def test_resume_refuses_a_memory_that_does_not_fit(tmp_path, init_dir):
    overrides = short_run(tmp_path, "train.max_steps=4", "train.checkpoint_interval=4")
    run_training(taichu.load_config(TINY, overrides), "torch", tmp_path / "run", init_dir=init_dir, progress=False)
    # Another memory length or batch size cannot continue these rows' memory.
    for change, words in (("model.mem_len=16", "memory.0: checkpoint (4, 32, 64), this run (4, 16, 64)"),
                          ("train.batch_size=2", "memory_document_ids: checkpoint (4, 32), this run (2, 32)")):
        other = taichu.load_config(TINY, overrides + [change, "train.max_steps=6"])
        with pytest.raises(CheckpointError, match=words.replace("(", r"\(").replace(")", r"\)")):
            run_training(other, "torch", tmp_path / "run", init_dir=init_dir, resume=True, progress=False)
    none = taichu.load_config(TINY, overrides + ["model.mem_len=0"])
    run_training(none, "torch", tmp_path / "none", init_dir=init_dir, progress=False)
    with pytest.raises(CheckpointError, match="no memory.safetensors"):
        run_training(taichu.load_config(TINY, overrides + ["train.max_steps=6"]), "torch", tmp_path / "none",
                     init_dir=init_dir, resume=True, progress=False)


def test_micro_batches_keep_their_rows():
    """What lets each micro-batch (and rank) carry its own rows' memory: the same positions of
    the global batch every step."""
    order = StreamOrder()
    for step in range(3):
        rows = [part % 8 for rank in range(2)
                for part in micro_batches(order.global_batch(step, 8), rank, 2, 2)]
        assert [r.tolist() for r in rows] == [[0, 1], [2, 3], [4, 5], [6, 7]]

"""Training the tri-modal family through ``taichu train``: its data (spoken captions, a held-out
voice, items missing a modality, the user's jsonl), refusals of bad input, both backends
taking the same 20 steps over batches that lack modalities, --init-tower and frozen towers."""
import json
import subprocess
import sys

import numpy as np
import pytest

import taichu
from taichu.train import TASK_DATA, run_training
from taichu.trimodal_data import TriModalBatches, load_trimodal, read_jsonl, speak_all
from conftest import CONFIGS, logged_losses

TINY = CONFIGS / "trimodal" / "trimodal-tiny.yaml"


def tiny(cache, *extra):
    return taichu.load_config(TINY, [f"data.cache_dir={cache}", *extra])


@pytest.fixture(scope="module")
def tokenizer(imagetext_cache):
    """The tiny CLIP's tokenizer (trained once per session for the image-text tests): the
    tri-modal runs take it through their init directory instead of training their own."""
    clip_config = taichu.load_config(CONFIGS / "clip" / "clip-tiny.yaml", [f"data.cache_dir={imagetext_cache}"])
    return TASK_DATA["image_text"](clip_config, None, 0).tokenizer


@pytest.fixture(scope="module")
def tiny_data(imagetext_cache):
    config = tiny(imagetext_cache)
    return config, load_trimodal(config)


def test_spoken_captions_split_and_voices(tiny_data):
    config, data = tiny_data
    spoken = config.data.spoken
    train_voices = {item.voice for item in data.train if item.audio is not None}
    assert train_voices and spoken.held_out_voice not in train_voices
    assert {item.voice for item in data.held_out_voice} == {spoken.held_out_voice}
    # The held-out voice reads exactly the test captions; no test image is in training.
    assert [i.text for i in data.held_out_voice] == [i.text for i in data.validation]
    assert not {i.key for i in data.validation} & {i.key for i in data.train if i.image is not None}
    # fraction 0.75 of the training pairs are spoken (a seeded draw), the rest image-text only.
    pairs = [i for i in data.train if i.image is not None]
    share = np.mean([i.audio is not None for i in pairs])
    assert 0.7 < share < 0.8, share
    sentences = [i for i in data.train if i.image is None]
    assert len(sentences) == spoken.sentences and all(i.present == (False, True, True) for i in sentences)
    # The same spoken caption of a voice, rate and pitch is the same audio, from the cache.
    again = load_trimodal(config)
    assert all(np.array_equal(a.audio, b.audio) for a, b in zip(data.held_out_voice, again.held_out_voice))


def test_batches_carry_placeholders_the_loss_leaves_out(tiny_data, tokenizer):
    """A batch with image-text, spoken pairs and sentences: present says which rows have
    what; placeholders are zero pixels, [bos, eos] and zero audio of the receptive field."""
    config, data = tiny_data
    batches = TriModalBatches(data.train, tokenizer, config)
    no_audio = next(i for i, item in enumerate(data.train) if item.audio is None)
    no_image = next(i for i, item in enumerate(data.train) if item.image is None)
    spoken = next(i for i, item in enumerate(data.train) if item.audio is not None and item.image is not None)
    batch = batches.batch([no_audio, no_image, spoken])
    np.testing.assert_array_equal(batch["present"], [[1, 1, 0], [0, 1, 1], [1, 1, 1]])
    assert not batch["pixel_values"][1].any() and batch["pixel_values"][0].any()
    shortest = taichu.families.trimodal.shortest_audio(config)
    assert batch["audio_mask"][0].sum() == shortest and not batch["input_values"][0].any()
    assert batch["audio_mask"][2].sum() == len(data.train[spoken].audio)
    assert batch["input_values"].shape[1] % int(config.data.spoken.pad_to_seconds * 16000) == 0
    assert list(batch) == ["pixel_values", "input_ids", "attention_mask", "input_values", "audio_mask",
                           "present"]


def _write_wav(path, audio):
    import soundfile

    soundfile.write(str(path), np.asarray(audio, np.float32), 16000)
    return path.name


def test_user_jsonl_takes_any_subset_and_refuses_bad_items(tmp_path, tiny_data):
    config, data = tiny_data
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "red.png")
    speech = _write_wav(tmp_path / "a.wav", data.held_out_voice[0].audio)
    lines = [{"image": "red.png", "text": "红色"}, {"audio": speech, "text": "说的话"}, {"image": "red.png"},
             {"audio": speech}]
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n", encoding="utf-8")
    items = read_jsonl(good)
    assert [i.present for i in items] == [(True, True, False), (False, True, True), (True, False, False),
                                          (False, False, True)]

    def refused(line: dict, match: str):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(lines[0]) + "\n" + json.dumps(line, ensure_ascii=False) + "\n", encoding="utf-8")
        with pytest.raises(ValueError, match=match):
            read_jsonl(bad)

    refused({"label": 3}, r"bad.jsonl:2: no modality")
    refused({"audio": _write_wav(tmp_path / "quiet.wav", np.zeros(16000))}, r"bad.jsonl:2: .*silence")
    refused({"image": "missing.png", "text": "x"}, r"bad.jsonl:2: image file .*missing.png not found")
    refused({"text": "  "}, r"bad.jsonl:2: 'text' must be a non-empty string")


def test_a_caption_with_no_spoken_form_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"caption '。' \(train item 'k1'\) has no spoken form"):
        speak_all([("。", "m1", 175, 50)], tmp_path, ["train item 'k1'"])
    assert not list((tmp_path / "spoken").glob("*/index.json"))   # nothing half-written


def tower_sources(tmp_path, config, tokenizer):
    """A CLIP directory (with its tokenizer) with the tiny model's image/text towers and a
    wav2vec 2.0 directory with its speech backbone, randomly initialised (seeded)."""
    import torch

    clip_config = taichu.load_config(CONFIGS / "clip" / "clip-tiny.yaml")
    speech = config.model.speech.model_dump()
    w2v_config = taichu.load_config(CONFIGS / "wav2vec2" / "wav2vec2-tiny.yaml",
                                    [f"model.{k}={json.dumps(v)}" for k, v in speech.items()])
    torch.manual_seed(1)
    clip_dir = taichu.save_model(taichu.build_model(clip_config, "torch"), tmp_path / "clip",
                                 tokenizer=tokenizer.path)
    w2v_dir = taichu.save_model(taichu.build_model(w2v_config, "torch"), tmp_path / "w2v")
    return clip_dir, w2v_dir


def test_init_tower_loads_each_tower_and_refuses_a_mismatch(tmp_path, imagetext_cache, tokenizer):
    config = tiny(imagetext_cache, "train.max_steps=1", "train.eval_interval=1000",
                  "train.learning_rate=1e-12", "train.min_learning_rate=1e-12", "train.warmup_steps=0")
    clip_dir, w2v_dir = tower_sources(tmp_path, config, tokenizer)
    result = run_training(config, "torch", tmp_path / "run", progress=False,
                          init_towers={"image": clip_dir, "text": clip_dir, "speech": w2v_dir})
    after = taichu.weights.load_safetensors(result.final_dir)
    clip_arrays = taichu.weights.load_safetensors(clip_dir)
    w2v_arrays = taichu.weights.load_safetensors(w2v_dir)
    # lr 1e-12: one step moves nothing measurably; the towers are their sources'.
    for name in ("vision_model.encoder.layers.1.mlp.fc2.weight", "text_model.embeddings.token_embedding.weight"):
        np.testing.assert_allclose(after[name], clip_arrays[name], atol=1e-8)
    np.testing.assert_allclose(after["wav2vec2.encoder.layers.0.attention.q_proj.weight"],
                               w2v_arrays["wav2vec2.encoder.layers.0.attention.q_proj.weight"], atol=1e-8)
    # clip-tiny projects to 32, this model to 24: its projections start fresh.
    assert after["visual_projection.weight"].shape == (24, 48)
    # The refused runs name the text tower too, after the speech tower: the towers load in
    # the order given, so the speech tower is refused first, and the run takes the CLIP's
    # tokenizer instead of training its own (which a run with no text tower does first).
    bigger = tiny(imagetext_cache, "model.speech.hidden_size=48")
    with pytest.raises(ValueError, match=r"model.speech.hidden_size: 40 there, 48 here"):
        run_training(bigger, "torch", tmp_path / "bad", progress=False,
                     init_towers={"speech": w2v_dir, "text": clip_dir})
    with pytest.raises(ValueError, match=r"speech tower initialises from a wav2vec2 or trimodal model, not a clip"):
        run_training(config, "torch", tmp_path / "bad2", progress=False,
                     init_towers={"speech": clip_dir, "text": clip_dir})


def test_frozen_tower_does_not_move(tmp_path, imagetext_cache, tokenizer):
    config = tiny(imagetext_cache, "train.max_steps=3", "train.eval_interval=1000", "model.frozen_towers=[speech]")
    import torch

    torch.manual_seed(0)
    init = taichu.save_model(taichu.build_model(config, "torch"), tmp_path / "init",
                             tokenizer=tokenizer.path)
    result = run_training(config, "torch", tmp_path / "run", init_dir=init, progress=False)
    before, after = taichu.weights.load_safetensors(init), taichu.weights.load_safetensors(result.final_dir)
    moved = {k: float(np.abs(before[k] - after[k]).max()) for k in before}
    assert max(v for k, v in moved.items() if k.startswith(("wav2vec2.", "speech_projection."))) == 0.0
    assert moved["text_model.encoder.layers.0.mlp.fc1.weight"] > 1e-4
    assert moved["vision_model.encoder.layers.0.mlp.fc1.weight"] > 1e-4


@pytest.mark.slow
def test_first_20_losses_agree_across_backends(tmp_path, imagetext_cache, tokenizer, eager_mindspore_eval):
    """Same initial weights and batches (rows missing images, rows missing speech, the
    sentences with no image): MindSpore's compiled step = PyTorch's, fp32."""
    import torch

    # Every batch padded to 3 s (the digits' captions last up to ~2.6 s): one audio shape, so
    # MindSpore compiles its step once, not once per 0.5 s bucket.
    config = tiny(imagetext_cache, "train.log_interval=1", "train.eval_interval=1000",
                  "data.spoken.pad_to_seconds=3.0")
    torch.manual_seed(0)
    init = taichu.save_model(taichu.build_model(config, "torch"), tmp_path / "init",
                             tokenizer=tokenizer.path)
    runs = {}
    for backend in ("torch", "mindspore"):
        run_training(config, backend, tmp_path / backend, init_dir=init, progress=False)
        runs[backend] = logged_losses(tmp_path / backend)
    # The 20 batches held rows without speech and rows without an image.
    data = TASK_DATA["trimodal"](config, init, 0)
    present = np.concatenate([data.train.present[data.order.global_batch(step, config.train.batch_size)]
                              for step in range(20)])
    assert (present[:, 2] == 0).any() and (present[:, 0] == 0).any() and present.all(axis=1).any()
    steps = range(1, 21)
    ours = np.array([runs["torch"][s] for s in steps])
    theirs = np.array([runs["mindspore"][s] for s in steps])
    relative = np.abs(ours - theirs) / np.abs(ours)
    assert relative.max() <= 1e-4, f"worst relative difference {relative.max():.2e} at step {relative.argmax() + 1}"
    assert ours[-5:].mean() < ours[:5].mean() - 0.1     # it really trained


def test_cli_names_a_bad_init_tower_argument(tmp_path):
    out = subprocess.run([sys.executable, "-m", "taichu", "train", str(TINY), "--backend", "torch",
                          "--out", str(tmp_path / "x"), "--init-tower", "speech"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "expected TOWER=DIR" in out.stderr

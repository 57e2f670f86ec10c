"""Using a tri-modal model: speech embeddings (Embedder.embed_audio) against the model's own
speech tower, spoken queries through `taichu index` / `taichu search`, `taichu eval`'s six
directions recomputed from the embeddings, and the inputs it refuses. On a randomly
initialised trimodal-tiny (its rankings are arbitrary but exact, which is what is checked)."""
import json
from math import comb
from pathlib import Path

import numpy as np
import pytest
import soundfile

from taichu.cli import main as taichu_main
from taichu.config import load_config
from taichu.imagetext import digit_prompts, digit_texts, digits_pairs
from taichu.retrieval import Embedder
from taichu.speech_batches import normalise
from conftest import CONFIGS
from tolerance import encoder_chain_terms, float32_tolerance, unit_norm_tolerance

TINY = CONFIGS / "trimodal" / "trimodal-tiny.yaml"
CLIP_TINY = CONFIGS / "clip" / "clip-tiny.yaml"
DIRECTIONS = ("text_to_image", "image_to_text", "speech_to_image", "image_to_speech",
              "speech_to_text", "text_to_speech")


def speech_tolerance(config, samples: int) -> float:
    """Two float32 evaluations of a unit speech embedding (another batch shape, padding):
    the accumulated terms on the speech tower's chain (feature encoder convolutions and
    layer norms, feature projection, positional convolution, the Transformer, the mean over
    frames, the projection), as tests/tolerance.py counts them."""
    s = config.model.speech
    frames, channels, terms = samples, 1, 0
    for dim, kernel, stride in zip(s.conv_dim, s.conv_kernel, s.conv_stride):
        terms += channels * kernel + dim
        channels, frames = dim, (frames - kernel) // stride + 1
    terms += channels + s.hidden_size // s.num_conv_pos_embedding_groups * s.num_conv_pos_embeddings
    terms += encoder_chain_terms(s, frames) + frames + config.model.projection_dim
    return float32_tolerance(1.0, terms)


# ------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def tri_root(tmp_path_factory):
    return tmp_path_factory.mktemp("trimodal_retrieval")


@pytest.fixture(scope="session")
def tri_tokenizer(tri_root):
    """A 4096-piece tokenizer (trimodal-tiny's vocabulary) on People's Daily plus the digit
    captions: seconds, where the CLI's tokenizer fixture takes most of a minute."""
    from taichu.corpus import peoples_daily_paragraphs
    from taichu.tokenizer import train_tokenizer

    config = load_config(TINY)
    path = tri_root / "tokenizer.model"
    train_tokenizer(peoples_daily_paragraphs()[:1500] + digit_texts(), config.tokenizer,
                    config.model.text.vocab_size, path)
    return path


def random_model(root: Path, tokenizer, seed: int, config_path=TINY, overrides=()) -> Path:
    import torch

    import taichu

    config = load_config(config_path, list(overrides))
    torch.manual_seed(seed)
    return taichu.save_model(taichu.build_model(config, "torch"), root, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def model_dir(tri_root, tri_tokenizer):
    """A random trimodal-tiny whose data speaks only the test captions (no training clips,
    no People's Daily sentences): the held-out set eval reads, synthesised in seconds."""
    return random_model(tri_root / "model", tri_tokenizer, 0, overrides=[
        f"data.cache_dir={tri_root / 'cache'}", "data.spoken.fraction=0", "data.spoken.sentences=0"])


@pytest.fixture(scope="session")
def embedder(model_dir):
    return Embedder(model_dir, "torch", batch_size=4)


@pytest.fixture(scope="session")
def spoken(tri_root, model_dir):
    """Three digit prompts spoken by the held-out voice, as 16-bit wav files (lossless:
    the synthesiser's samples are int16 / 32768), and their arrays."""
    from taichu.trimodal_data import speak_all

    prompts = digit_prompts()[:3]
    clips = speak_all([(p, "f2", 175, 50) for p in prompts], tri_root / "cache")
    paths = []
    for i, clip in enumerate(clips):
        paths.append(tri_root / f"prompt{i}.wav")
        soundfile.write(paths[-1], clip, 16000, subtype="PCM_16")
    return paths, clips


def run_cli(capsys, *argv):
    code = taichu_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------------ embeddings


def test_embed_audio_is_the_speech_tower_normalised_whatever_the_batch(embedder, spoken):
    import torch

    paths, clips = spoken
    # Different lengths, in no length order; a fourth clip (a prompt cut short) so that the
    # batch of 4 pads three rows to the longest.
    short = clips[1][:9000]
    inputs = [paths[0], clips[1], short, paths[2]]
    assert len({len(clips[0]), len(clips[1]), len(short), len(clips[2])}) == 4
    vectors = embedder.embed_audio(inputs)
    assert vectors.shape == (4, 24) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=unit_norm_tolerance(24), rtol=0)
    for row, clip in enumerate([clips[0], clips[1], short, clips[2]]):
        # The row alone: normalised as in training, no padding, no mask.
        with torch.no_grad():
            alone = embedder.model.get_speech_features(torch.from_numpy(normalise(clip)[None])).numpy()
        alone = alone / np.linalg.norm(alone)
        np.testing.assert_allclose(vectors[row], alone[0], rtol=0,
                                   atol=speech_tolerance(embedder.config, len(clip)))
    # Different clips do give different vectors, and the file equals its samples.
    assert np.abs(vectors[0] - vectors[1]).max() > 1e-3
    np.testing.assert_array_equal(embedder.embed_audio([clips[0]]), embedder.embed_audio([paths[0]]))


def test_mindspore_embed_audio_agrees_with_torch(embedder, model_dir, spoken):
    paths, clips = spoken
    ms_embedder = Embedder(model_dir, "mindspore", batch_size=4)
    np.testing.assert_allclose(ms_embedder.embed_audio(clips), embedder.embed_audio(clips), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------ commands


def ranked_lines(out):
    """(score, shown item) of each result line of `taichu search`."""
    return [(float(line.split()[1]), line.split(maxsplit=2)[2]) for line in out.splitlines()[1:]]


def test_spoken_query_searches_images_and_images_search_clips(tmp_path, capsys, embedder, spoken,
                                                               tri_root, tri_tokenizer):
    paths, clips = spoken
    folder = tmp_path / "images"
    folder.mkdir()
    for i, pair in enumerate(digits_pairs()[:7]):
        pair.image.save(folder / f"{i}.png")
    images = sorted(folder.iterdir())
    model = embedder.model_dir
    code, out, err = run_cli(capsys, "index", model, "--images", folder, "--out", tmp_path / "images.idx")
    assert code == 0, err
    # speech -> images: the printed ranking is the exact ranking of the embeddings.
    code, out, err = run_cli(capsys, "search", model, "--index", tmp_path / "images.idx",
                             "--audio", paths[1], "-k", 4)
    assert code == 0, err
    assert out.splitlines()[0].startswith(f"audio {paths[1]} -> top 4 of 7 images")
    scores = embedder.embed_images(images) @ embedder.embed_audio([clips[1]])[0]
    best = np.argsort(-scores, kind="stable")[:4]
    lines = ranked_lines(out)
    assert [shown for _, shown in lines] == [str(images[i].resolve()) for i in best]
    np.testing.assert_allclose([score for score, _ in lines], scores[best], atol=1e-4, rtol=0)

    # An index of spoken clips: image -> speech and text -> speech.
    code, out, err = run_cli(capsys, "index", model, "--audio", *paths, "--out", tmp_path / "clips.idx")
    assert code == 0, err
    manifest = json.loads((tmp_path / "clips.idx" / "index.json").read_text())
    assert manifest["metadata"]["modality"] == "audio" and manifest["count"] == 3
    items = [json.loads(line) for line in (tmp_path / "clips.idx" / "items.jsonl").read_text().splitlines()]
    assert items == [{"audio": str(p.resolve())} for p in paths]
    clip_vectors = embedder.embed_audio(clips)
    for flag, query, vector in (("--image", images[3], embedder.embed_images([images[3]])[0]),
                                ("--text", "手写的数字一", embedder.embed_texts(["手写的数字一"])[0])):
        code, out, err = run_cli(capsys, "search", model, "--index", tmp_path / "clips.idx", flag, query)
        assert code == 0, err
        assert "top 3 of 3 audio clips" in out.splitlines()[0]
        order = np.argsort(-(clip_vectors @ vector), kind="stable")
        assert [shown for _, shown in ranked_lines(out)] == [str(paths[i].resolve()) for i in order]

    # Another model's space: refused, for a spoken query as for any other.
    other = random_model(tmp_path / "other", tri_tokenizer, 1, overrides=[f"data.cache_dir={tri_root / 'cache'}"])
    code, out, err = run_cli(capsys, "search", other, "--index", tmp_path / "images.idx", "--audio", paths[0])
    assert code == 2 and "built with another model" in err


def brute_recall(similarity, k, query_groups, item_groups):
    """Recall@K by definition: the best relevant item's rank counts the non-relevant items
    scoring at least as high (ties count against the model)."""
    hits = 0
    for row, group in zip(similarity, query_groups):
        relevant = [j for j, g in enumerate(item_groups) if g == group]
        best = max(row[j] for j in relevant)
        rank = 1 + sum(1 for j, g in enumerate(item_groups) if g != group and row[j] >= best)
        hits += rank <= k
    return hits / len(query_groups)


@pytest.mark.slow
def test_eval_reports_six_directions_that_the_embeddings_confirm(tmp_path, capsys, model_dir):
    from taichu.trimodal_data import load_trimodal

    code, out, err = run_cli(capsys, "eval", model_dir, "--out", tmp_path / "metrics.json")
    assert code == 0, err
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    config = load_config(model_dir)
    held = load_trimodal(config).held_out_voice   # the test pairs, the held-out voice (f2)
    assert {item.voice for item in held} == {"f2"}
    captions = list(dict.fromkeys(item.text for item in held))
    assert metrics["images"] == len(held) == 379 and metrics["unique_captions"] == len(captions) == 60
    # One voice, rate and pitch: a repeated caption is the same clip, counted once.
    assert metrics["clips"] == 60 and "held-out voice f2" in metrics["speech"]
    assert metrics["ks"] == [1, 5]

    # Recompute every direction from the embeddings (the CLI's batch size, the same rows).
    embedder = Embedder(model_dir, "torch")
    image = embedder.embed_images([item.image for item in held])
    text = embedder.embed_texts(captions)
    first = {}
    for item in held:
        first.setdefault(item.text, item.audio)
    speech = embedder.embed_audio([first[c] for c in captions])   # clip i speaks caption i
    image_groups = [captions.index(item.text) for item in held]
    units = {"image": (image, image_groups), "text": (text, list(range(60))),
             "speech": (speech, list(range(60)))}
    counts = [image_groups.count(g) for g in range(60)]
    n = len(held)
    for name in DIRECTIONS:
        query, target = name.split("_to_")
        (qv, qg), (tv, tg) = units[query], units[target]
        d = metrics[name]
        assert (d["queries"], d["items"]) == (len(qg), len(tg))
        for k in (1, 5):
            assert 0.0 <= d[f"R@{k}"] <= 1.0
            assert d[f"R@{k}"] == pytest.approx(brute_recall(qv @ tv.T, k, qg, tg), abs=1e-12), (name, k)
        # Chance: one relevant item among 60, or a caption's m images among the n.
        if target == "image":
            expected = {k: sum(1 - comb(n - m, k) / comb(n, k) for m in counts) / 60 for k in (1, 5)}
        else:
            expected = {1: 1 / 60, 5: 5 / 60}
        assert d["chance"] == pytest.approx({f"R@{k}": expected[k] for k in (1, 5)})
        assert d["R@1"] <= d["R@5"]

    # Zero-shot digits from written and from spoken prompts (the held-out voice).
    z = metrics["zero_shot"]
    labels = np.array([item.label for item in held])
    prompt_text = embedder.embed_texts(digit_prompts())
    assert z["accuracy"] == pytest.approx(np.mean((image @ prompt_text.T).argmax(1) == labels))
    from taichu.trimodal_data import speak_all

    prompt_clips = speak_all([(p, "f2", 175, 50) for p in digit_prompts()], Path(config.data.cache_dir) / "speech")
    prompt_speech = embedder.embed_audio(prompt_clips)
    assert z["spoken_accuracy"] == pytest.approx(np.mean((image @ prompt_speech.T).argmax(1) == labels))
    assert z["chance"] == 0.1 and z["spoken_by"] == {"voice": "f2", "held_out": True, "rate": 175, "pitch": 50}
    for label in ("speech -> image", "image -> speech", "speech -> text", "text -> speech", "spoken prompts"):
        assert label in out


# ------------------------------------------------------------------------ refusals


def test_silent_or_too_short_audio_is_refused_naming_it(tmp_path, capsys, embedder, spoken):
    paths, clips = spoken
    silent = tmp_path / "silence.wav"
    soundfile.write(silent, np.zeros(16000, np.float32), 16000, subtype="PCM_16")
    code, out, err = run_cli(capsys, "embed", embedder.model_dir, "--audio", paths[0], silent,
                             "--out", tmp_path / "emb.npy")
    assert code == 2 and str(silent) in err and "silence" in err
    assert not (tmp_path / "emb.npy").exists() and not (tmp_path / "emb.jsonl").exists()
    # One sample fewer than the feature encoder's receptive field.
    from taichu.families.trimodal import shortest_audio

    shortest = shortest_audio(embedder.config)
    assert shortest > 1
    with pytest.raises(ValueError, match=rf"audio 1: the audio has {shortest - 1} samples, fewer than "
                                         rf".*receptive field \({shortest} samples\)"):
        embedder.embed_audio([clips[0], clips[1][4000:4000 + shortest - 1]])
    embedder.embed_audio([clips[1][4000:4000 + shortest]])   # exactly the receptive field: fine
    with pytest.raises(ValueError, match="spoken prompt: the audio is silence"):
        embedder.embed_audio([np.full(4000, 1e-5, np.float32)], names=["spoken prompt"])
    with pytest.raises(ValueError, match="1-D float array"):
        embedder.embed_audio([np.zeros((2, 4000), np.float32)])


def test_a_model_without_a_speech_tower_refuses_audio(tmp_path, capsys, spoken, tri_tokenizer):
    paths, clips = spoken
    clip = random_model(tmp_path / "clip", tri_tokenizer, 0, config_path=CLIP_TINY)
    code, out, err = run_cli(capsys, "embed", clip, "--audio", paths[0], "--out", tmp_path / "emb.npy")
    assert code == 2 and "is a clip model with no speech tower" in err and "tri-modal" in err
    assert not (tmp_path / "emb.npy").exists()
    code, out, err = run_cli(capsys, "index", clip, "--audio", paths[0], "--out", tmp_path / "clips.idx")
    assert code == 2 and "no speech tower" in err and not (tmp_path / "clips.idx").exists()
    with pytest.raises(ValueError, match="is a clip model with no speech tower"):
        Embedder(clip, "torch").embed_audio(clips)

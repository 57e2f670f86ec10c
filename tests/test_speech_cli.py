"""The speech commands a user runs: ``taichu transcribe``, ``taichu embed --audio`` and
``taichu eval`` on a CTC model directory, with the awkward inputs users have: stereo, other
sample rates, silence, clips too short for the model, files that are not audio."""
import json
import subprocess
import sys

import numpy as np
import pytest

import taichu
from taichu.recognition import SpeechRunner
from conftest import CONFIGS

CTC = CONFIGS / "wav2vec2" / "wav2vec2-tiny-ctc.yaml"


def taichu_cli(*args):
    return subprocess.run([sys.executable, "-m", "taichu", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def speech_files(tmp_path_factory):
    """A random CTC model directory and audio files: one synthesised clip as 16 kHz mono,
    the same as 16 kHz stereo, at 44.1 and 8 kHz, silence, a too short clip, a text file."""
    import soundfile
    import torch

    from taichu.speech import synthesize

    root = tmp_path_factory.mktemp("speech-cli")
    torch.manual_seed(0)
    config = taichu.load_config(CTC)
    model = taichu.save_model(taichu.build_model(config, "torch"), root / "model")
    clip = synthesize("中国人民", "m1")
    files = {"mono": root / "mono.wav", "stereo": root / "stereo.wav", "high": root / "high.flac",
             "low": root / "low.wav", "silence": root / "silence.wav", "short": root / "short.wav",
             "text": root / "notes.txt"}
    soundfile.write(files["mono"], clip, 16000)
    soundfile.write(files["stereo"], np.stack([clip, clip], axis=1), 16000)
    from taichu.speech import resample

    soundfile.write(files["high"], resample(clip, 16000, 44100), 44100)
    soundfile.write(files["low"], resample(clip, 16000, 8000), 8000)
    soundfile.write(files["silence"], np.zeros(16000, np.float32), 16000)
    soundfile.write(files["short"], clip[:40], 16000)
    files["text"].write_text("这不是音频")
    return model, files


def test_transcribe_handles_what_users_feed_it(speech_files):
    model, f = speech_files
    done = taichu_cli("transcribe", model, f["mono"], f["stereo"], f["high"], f["low"], f["silence"])
    assert done.returncode == 0, done.stderr
    lines = dict(line.split("\t") for line in done.stdout.splitlines())
    assert set(lines) == {str(f[k]) for k in ("mono", "stereo", "high", "low", "silence")}
    # Stereo with two equal channels is the mono clip once downmixed: the same transcript.
    assert lines[str(f["stereo"])] == lines[str(f["mono"])]
    # The transcript is what the Python API gives for the same audio.
    from taichu.speech import load_audio

    runner = SpeechRunner(model, "torch")
    assert runner.transcribe([load_audio(f["mono"])]) == [lines[str(f["mono"])]]
    # Resampled files are read at 16 kHz: their length in samples is the clip's.
    mono = load_audio(f["mono"])
    for key in ("high", "low"):
        assert abs(len(load_audio(f[key])) - len(mono)) <= 2


def test_bad_audio_is_refused_by_name(speech_files):
    model, f = speech_files
    short = taichu_cli("transcribe", model, f["mono"], f["short"])
    assert short.returncode == 2 and short.stdout == ""
    assert f"{f['short']}: 40 samples" in short.stderr and "receptive field" in short.stderr
    text = taichu_cli("transcribe", model, f["text"])
    assert text.returncode == 2 and str(f["text"]) in text.stderr and "not an audio file" in text.stderr
    missing = taichu_cli("transcribe", model, f["mono"].with_name("nowhere.wav"))
    assert missing.returncode == 2 and "nowhere.wav" in missing.stderr


def test_embed_audio_writes_one_vector_per_file(speech_files, tmp_path):
    model, f = speech_files
    out = tmp_path / "speech.npy"
    done = taichu_cli("embed", model, "--audio", f["mono"], f["stereo"], f["silence"], "--out", out)
    assert done.returncode == 0, done.stderr
    vectors = np.load(out)
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert vectors.shape == (3, taichu.load_config(model).model.hidden_size)
    assert [r["audio"] for r in rows] == [str(f["mono"]), str(f["stereo"]), str(f["silence"])]
    # The same audio (the stereo file downmixed) in another row of the batch: equal up to
    # float32 rounding (kernels may block rows differently; 6e-8 seen).
    from taichu.speech import load_audio

    np.testing.assert_array_equal(load_audio(f["stereo"]), load_audio(f["mono"]))
    np.testing.assert_allclose(vectors[0], vectors[1], rtol=1e-5, atol=1e-6)
    assert np.isfinite(vectors).all()
    assert not np.allclose(vectors[0], vectors[2])


def test_eval_reports_error_rates_on_held_out_clips(speech_files, tmp_path):
    model, f = speech_files
    cache = tmp_path / "cache"
    config = taichu.load_config(model, [f"data.cache_dir={cache}"])
    from taichu.config import dump_config

    dump_config(config, model / "config.yaml")          # the clips go to a private cache
    out = tmp_path / "eval.json"
    done = taichu_cli("eval", model, "--out", out)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert set(results) == {"test (seen voices)", "held-out voice f2"}
    for rates in results.values():
        assert rates["utterances"] > 0
        assert rates["syllable_error_rate"] > 0.5          # an untrained model
    # A user's own jsonl of clips and texts
    manifest = tmp_path / "mine.jsonl"
    manifest.write_text(json.dumps({"audio": str(f["mono"]), "text": "中国人民"}, ensure_ascii=False) + "\n")
    done = taichu_cli("eval", model, "--data", manifest)
    assert done.returncode == 0, done.stderr
    assert "mine: 1 clips" in done.stdout


def test_mindspore_transcribes_like_torch(speech_files):
    """The same transcripts from the MindSpore backend (greedy decoding of logits equal to
    1e-5: an argmax could only flip on a near tie, which these random logits do not have)."""
    model, f = speech_files
    files = [f["mono"], f["low"], f["silence"]]
    runs = {backend: taichu_cli("transcribe", model, *files, "--backend", backend)
            for backend in ("torch", "mindspore")}
    for backend, done in runs.items():
        assert done.returncode == 0, (backend, done.stderr[-2000:])
    assert runs["mindspore"].stdout == runs["torch"].stdout

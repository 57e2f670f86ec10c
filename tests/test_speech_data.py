"""taichu.speech: real espeak-ng, soxr, soundfile, pypinyin and jiwer; no mocks."""
import json

import numpy as np
import pytest

from taichu.families.wav2vec2 import PINYIN_ALPHABET, SAMPLE_RATE, SpeechDataConfig
from taichu.speech import (SPLITS, cache_path, decode_ids, encode_transcript, error_rates, load_audio,
                           load_speech_data, read_jsonl, spoken_tones, synthesize, synthetic_plan,
                           to_pinyin)


def rms(audio):
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))


# ---------------------------------------------------------------------------- synthesis


def test_synthesize_is_speech_of_plausible_length():
    audio = synthesize("中国人民", voice="m1", rate=175, pitch=50)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert np.abs(audio).max() <= 1.0
    seconds = len(audio) / SAMPLE_RATE
    assert 4 * 0.15 <= seconds <= 4 * 0.6, seconds
    assert rms(audio) > 1e-3


def test_voices_and_rates_differ():
    base = synthesize("今天天气很好", voice="m1", rate=175)
    other_voice = synthesize("今天天气很好", voice="f2", rate=175)
    slow = synthesize("今天天气很好", voice="m1", rate=120)
    fast = synthesize("今天天气很好", voice="m1", rate=300)
    n = min(len(base), len(other_voice))
    assert not np.allclose(base[:n], other_voice[:n], atol=1e-3)
    assert len(fast) < len(base) < len(slow)
    # Deterministic: the same request gives the same samples.
    assert np.array_equal(base, synthesize("今天天气很好", voice="m1", rate=175))


def test_synthesis_is_the_same_in_another_process():
    """espeak-ng keeps state between utterances and seeds its noise with the clock; the
    breathy variant f2 shows both. A fresh process must still give the same samples."""
    import subprocess
    import sys

    import time

    synthesize("中国人民", voice="m1", rate=300)   # leaves state behind in this process
    here = synthesize("今天天气很好", voice="f2")
    time.sleep(1.0 - time.time() % 1.0)            # the other process starts in the next second
    code = ("import sys; from taichu.speech import synthesize; "
            "sys.stdout.buffer.write(synthesize('今天天气很好', voice='f2').tobytes())")
    other = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True).stdout
    assert np.array_equal(np.frombuffer(other, np.float32), here)


def test_synthesize_refuses_unknown_voice_and_bad_rate():
    with pytest.raises(ValueError, match="no-such-voice"):
        synthesize("中国", voice="no-such-voice")
    with pytest.raises(ValueError, match="rate 10"):
        synthesize("中国", rate=10)


# ---------------------------------------------------------------------------- transcripts


def test_to_pinyin():
    assert to_pinyin("中国人民") == "zhong1|guo2|ren2|min2"
    assert to_pinyin("女") == "nv3"          # ü is written v
    assert to_pinyin("绿色") == "lv4|se4"
    assert to_pinyin("我们的") == "wo3|men5|de5"  # neutral tone 5
    assert to_pinyin("你好，世界。") == "ni3|hao3|shi4|jie4"  # punctuation is not spoken
    with pytest.raises(ValueError, match="'A'"):
        to_pinyin("A股上涨")
    with pytest.raises(ValueError, match="'3'"):
        to_pinyin("3个人")


def test_spoken_tones_are_what_espeak_says_and_leave_synthesis_alone():
    """The tones espeak-ng speaks, from its phonemes: no third-tone sandhi (你好 stays 3 3),
    一 before a fourth tone becomes 2, 个 and 面 spoken neutral where pypinyin writes 4:
    where the synthetic transcripts' tones are not what the audio says."""
    assert spoken_tones("你好") == [3, 3] and to_pinyin("你好") == "ni3|hao3"
    assert spoken_tones("一个") == [2, 5] and to_pinyin("一个") == "yi2|ge4"
    assert spoken_tones("外面一片宁静") == [4, 5, 2, 4, 2, 4]
    assert to_pinyin("外面一片宁静") == "wai4|mian4|yi1|pian4|ning2|jing4"
    before = synthesize("今天天气很好", voice="f2")
    spoken_tones("中国人民")
    assert np.array_equal(synthesize("今天天气很好", voice="f2"), before)


def test_encode_decode_round_trip():
    pinyin = "zhong1|guo2|nv3|de5"
    ids = encode_transcript(pinyin, PINYIN_ALPHABET)
    assert ids.dtype == np.int32 and len(ids) == len(pinyin)
    assert 0 not in ids
    # Pinyin never repeats a symbol back to back, so ids decode to themselves ...
    assert decode_ids(ids, PINYIN_ALPHABET) == pinyin
    # ... and so do frames that hold each symbol twice, then a blank.
    framed = np.stack([ids, ids, np.zeros_like(ids)], axis=1).reshape(-1)
    assert decode_ids(framed, PINYIN_ALPHABET) == pinyin
    with pytest.raises(ValueError, match="'ü'"):
        encode_transcript("nü3", PINYIN_ALPHABET)


def test_decode_collapses_repeats_and_drops_blanks():
    alphabet = ("<blank>", "a", "b")
    assert decode_ids([1, 1, 0, 1], alphabet) == "aa"      # "aa<blank>a"
    assert decode_ids([0, 1, 1, 2, 2, 0, 0, 2], alphabet) == "abb"
    assert decode_ids(np.array([[0, 0]]), alphabet) == ""


def test_error_rates_known_answer():
    references = ["zhong1|guo2|ren2|min2", "ni3|hao3"]
    hypotheses = ["zhong1|guo1|ren2", "ni3|hao3"]
    # Syllables: 6 in the references; "guo2" -> "guo1" is 1 substitution, "min2" is
    # 1 deletion, the second utterance is exact: 2 / 6.
    # Characters (separators removed): "zhong1guo2ren2min2" (18) vs "zhong1guo1ren2":
    # 1 substitution (2 -> 1) + 4 deletions ("min2"); "ni3hao3" (7) exact: 5 / 25.
    rates = error_rates(references, hypotheses)
    assert rates["utterances"] == 2
    assert rates["syllable_error_rate"] == pytest.approx(2 / 6)
    assert rates["character_error_rate"] == pytest.approx(5 / 25)
    assert error_rates(references, references)["syllable_error_rate"] == 0.0
    with pytest.raises(ValueError):
        error_rates(references, hypotheses[:1])


# ---------------------------------------------------------------------------- audio files


def test_load_audio_downmixes_and_resamples(tmp_path):
    import soundfile

    t = np.arange(44_100) / 44_100                       # one second at 44.1 kHz
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    soundfile.write(tmp_path / "stereo.wav", stereo, 44_100, subtype="PCM_16")
    audio = load_audio(tmp_path / "stereo.wav")
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - SAMPLE_RATE) <= 1
    assert rms(audio) == pytest.approx(0.25 / np.sqrt(2), rel=0.02)  # the channels' mean

    soundfile.write(tmp_path / "narrow.flac", 0.3 * np.sin(2 * np.pi * 200 * np.arange(4000) / 8000),
                    8000)
    audio = load_audio(tmp_path / "narrow.flac")
    assert abs(len(audio) - 8000) <= 1                   # half a second at 16 kHz

    soundfile.write(tmp_path / "silence.wav", np.zeros(1600, np.int16), SAMPLE_RATE)
    assert np.array_equal(load_audio(tmp_path / "silence.wav"), np.zeros(1600, np.float32))

    text = tmp_path / "notes.wav"
    text.write_text("not audio")
    with pytest.raises(ValueError, match="notes.wav: not an audio file"):
        load_audio(text)


# ---------------------------------------------------------------------------- data sets


def test_synthetic_speech_data(tmp_path):
    data = SpeechDataConfig(sentences=24, max_characters=6, cache_dir=str(tmp_path))
    speech = load_speech_data(data)
    counts = {split: len(clips) for split, clips in speech.splits().items()}
    assert counts == {"train": 20, "validation": 2, "test": 2, "held_out_voice": 2}
    assert speech.name == "synthetic" and len(speech.fingerprint) == 64

    sentences = {split: {c.text for c in clips} for split, clips in speech.splits().items()}
    assert len(set().union(*(sentences[s] for s in ("train", "validation", "test")))) == 24
    assert not sentences["train"] & sentences["validation"]
    assert not sentences["train"] & sentences["test"]
    assert not sentences["validation"] & sentences["test"]
    assert sentences["held_out_voice"] == sentences["test"]
    assert {c.voice for c in speech.held_out_voice} == {"f4"}
    for split in ("train", "validation", "test"):
        for clip in speech.splits()[split]:
            assert clip.voice in {"m1", "m3", "f1", "f2"}
            assert clip.pinyin == to_pinyin(clip.text)
            assert 2 <= len(clip.text) <= 6 and clip.source.startswith("pd-")
            assert clip.audio.dtype == np.float32 and rms(clip.audio) > 1e-3
            assert clip.pinyin.count("|") + 1 == len(clip.text)

    path = cache_path(data, speech.fingerprint)
    assert (path / "audio.npy").is_file() and (path / "index.json").is_file()
    again = load_speech_data(data, rank=1)   # a waiting rank reads rank 0's cache
    assert again.fingerprint == speech.fingerprint
    for split in SPLITS:
        first, second = speech.splits()[split], again.splits()[split]
        assert [(c.text, c.voice, c.source) for c in first] == [(c.text, c.voice, c.source) for c in second]
        assert all(np.array_equal(a.audio, b.audio) for a, b in zip(first, second))

    # Synthesis is a pure function of the plan: another cache gets the same samples.
    elsewhere = load_speech_data(data.model_copy(update={"cache_dir": str(tmp_path / "other")}))
    assert elsewhere.fingerprint == speech.fingerprint
    assert all(np.array_equal(a.audio, b.audio) for a, b in zip(speech.train, elsewhere.train))

    reseeded = synthetic_plan(data.model_copy(update={"split_seed": 1}))
    assert [u.text for u in reseeded] != [c.text for c in speech.train]


def test_jsonl_speech_data(tmp_path):
    import soundfile

    (tmp_path / "audio").mkdir()
    soundfile.write(tmp_path / "audio" / "a.wav", synthesize("中国人民"), SAMPLE_RATE)
    soundfile.write(tmp_path / "b.flac", synthesize("天气很好", voice="f1"), SAMPLE_RATE)
    lines = [{"audio": "audio/a.wav", "text": "中国人民。"},
             {"audio": str(tmp_path / "b.flac"), "pinyin": "tian1|qi4|hen3|hao3"}]
    source = tmp_path / "clips.jsonl"
    source.write_text("\n".join(json.dumps(line, ensure_ascii=False) for line in lines) + "\n\n")

    clips = read_jsonl(source)
    assert [c.pinyin for c in clips] == ["zhong1|guo2|ren2|min2", "tian1|qi4|hen3|hao3"]
    assert [c.text for c in clips] == ["中国人民。", ""]
    assert clips[0].voice == "" and clips[0].source == str(tmp_path / "audio" / "a.wav")

    speech = load_speech_data(SpeechDataConfig(source=str(source)))
    assert speech.name == "clips" and speech.held_out_voice == []
    assert sum(len(clips) for clips in speech.splits().values()) == 2
    assert speech.fingerprint == load_speech_data(SpeechDataConfig(source=[str(source)])).fingerprint

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"audio": "audio/a.wav"}) + "\n" + json.dumps({"audio": "missing.wav"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*missing.wav"):
        read_jsonl(bad)
    bad.write_text(json.dumps({"audio": "audio/a.wav", "pinyin": "zhong1 guo2"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*' '"):
        read_jsonl(bad)

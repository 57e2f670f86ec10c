"""Mandarin speech for the wav2vec 2.0 family, offline and deterministic.

Two sources, one ``Clip`` type, one ``SpeechData``:

- ``synthetic``: clauses of the People's Daily 1998 corpus (taichu.corpus) spoken by
  libespeak-ng's Mandarin voice (``cmn``) from the ``espeakng-loader`` wheel, through
  ctypes: no system package, no download. Each sentence is spoken once, by a voice variant
  (m1, f2, ...) at a rate and pitch drawn per clip; one variant (``held_out_voice``) never
  speaks a training sentence and reads every test sentence, so a recogniser can be measured
  on a voice it has never heard. Transcripts are tone-numbered pinyin from pypinyin in the
  CTC alphabet of taichu.families.wav2vec2 (``zhong1|guo2``, ü written ``v``).
  Synthesis is cached on disk (int16 audio + a JSON index), keyed by a fingerprint of
  everything that determines the clips.
- a user's ``.jsonl`` files of ``{"audio": path, "text": ..., "pinyin": ...}`` lines
  (``read_jsonl``), decoded with soundfile and resampled to 16 kHz.

The split is by sentence (synthetic) or by line (jsonl), from a seeded permutation: the
same config gives the same clips on every machine and run. Metrics (``error_rates``) are
jiwer's WER over pinyin syllables and CER over pinyin letters.

Only numpy is imported here; espeak, soxr, soundfile, pypinyin and jiwer are imported by
the functions that need them.
"""
from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from taichu.families.wav2vec2 import PINYIN_ALPHABET, SAMPLE_RATE
from taichu.fileio import write_cache_folder

SYNTHETIC = "synthetic"
# Bump when anything that shapes a synthetic clip changes (synthesis, trimming, the
# sentence selection, the draws): it is part of the cache fingerprint.
SYNTHESIS_VERSION = 1
CACHE_FORMAT = 1
SPLITS = ("train", "validation", "test", "held_out_voice")
# Silence kept before the first and after the last loud sample of a synthetic clip.
TRIM_KEEP_SECONDS = 0.05
# espeak's documented ranges: words per minute, and base pitch.
RATE_RANGE = (80, 450)
PITCH_RANGE = (0, 100)
# rank != 0 waits this long for rank 0's cache before synthesising itself.
CACHE_WAIT_SECONDS = 3600


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy arrays field-wise is ambiguous
class Clip:
    """One utterance. ``audio`` is float32 mono at SAMPLE_RATE, raw amplitude in [-1, 1]
    (not normalised: the feature pipeline decides that)."""

    audio: np.ndarray
    text: str      # the Chinese sentence ('' if unknown)
    pinyin: str    # transcript in the CTC alphabet, e.g. "zhong1|guo2" ('' if unknown)
    voice: str     # espeak variant name for synthetic clips, '' for user files
    source: str    # sentence id ("pd-000123") or the audio file path

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE


@dataclass
class SpeechData:
    train: list[Clip]
    validation: list[Clip]
    test: list[Clip]            # held-out sentences spoken by the seen (training) voices
    held_out_voice: list[Clip]  # the test sentences spoken by data.held_out_voice ([] if none)
    name: str                   # "synthetic" or the jsonl file stem(s) joined by "+"
    fingerprint: str            # sha256 hex of everything that determines the clips

    def splits(self) -> dict[str, list[Clip]]:
        return {split: getattr(self, split) for split in SPLITS}

    @property
    def hours(self) -> float:
        return sum(len(c.audio) for clips in self.splits().values() for c in clips) / SAMPLE_RATE / 3600


# ---------------------------------------------------------------------------- espeak-ng

# espeak-ng's speak_lib.h constants.
AUDIO_OUTPUT_SYNCHRONOUS = 2
ESPEAK_INITIALIZE_DONT_EXIT = 0x8000  # return an error instead of calling exit()
ESPEAK_RATE, ESPEAK_PITCH = 1, 3
POS_CHARACTER = 1
ESPEAK_CHARS_UTF8 = 1
# espeak-ng's noise generator (breath, aspiration) is seeded with this instead of the time.
RANDOM_SEED = 1
# int SynthCallback(short *wav, int numsamples, espeak_EVENT *events); 0 = go on.
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                   ctypes.c_void_p)


class _Espeak:
    """libespeak-ng through ctypes, one per process; every use holds ``lock`` (the library
    keeps its voice, parameters and callback in globals).

    espeak-ng's output depends on state an utterance leaves behind (flutter and wave phase,
    the noise generator's position: the same request twice gives different samples), and
    espeak_Terminate does not reset all of it. So the library is unloaded and loaded again
    (about 1 ms) before every utterance but the first: each one starts from the state right
    after espeak_Initialize. The library is a private copy of the wheel's file, so that no
    other user of espeakng-loader in the process can keep it loaded (dlopen of one path
    shares one instance, whose globals would then survive the unload). espeak_Initialize
    seeds the noise generator (breath noise: variants f2, f3, f5) with the time of day, so
    it is seeded again with RANDOM_SEED. Together these make ``synthesize`` a pure function
    of its arguments, the same in every process.
    """

    def __init__(self):
        try:
            import espeakng_loader
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                "synthetic speech needs libespeak-ng from the espeakng-loader package, which is "
                "not installed: pip install espeakng-loader (or install taichu with the 'data' "
                "extra)") from None
        self.data_path = Path(espeakng_loader.get_data_path())
        private = Path(tempfile.mkdtemp(prefix="taichu-espeak-"))
        atexit.register(shutil.rmtree, private, True)
        self.library_path = private / Path(espeakng_loader.get_library_path()).name
        shutil.copyfile(espeakng_loader.get_library_path(), self.library_path)
        self.lock = threading.Lock()
        self._chunks: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._collect)  # referenced here so it is never freed
        self.lib = None
        self._load()
        self._fresh = True
        self.version = self.lib.espeak_Info(None).decode()
        # SetVoiceByName accepts unknown variants silently (plain cmn): check them here.
        self.variants = tuple(sorted(p.name for p in (self.data_path / "voices" / "!v").iterdir()
                                     if p.is_file()))

    def _load(self) -> None:
        if self.lib is not None:
            self.lib.espeak_Terminate()
            _dlclose(self.lib._handle)
            self.lib = None
        lib = ctypes.CDLL(str(self.library_path))
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Info.argtypes = [ctypes.c_void_p]
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.sample_rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, os.fsencode(self.data_path),
                                                 ESPEAK_INITIALIZE_DONT_EXIT)
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({self.sample_rate}) with data {self.data_path}")
        lib.espeak_ng_SetRandSeed(RANDOM_SEED)
        lib.espeak_SetSynthCallback(self._callback)
        self.lib = lib

    def _collect(self, wav, count, events) -> int:
        if count > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0

    def speak(self, text: str, variant: str, rate: int, pitch: int) -> np.ndarray:
        """int16 samples at ``self.sample_rate``."""
        data = text.encode("utf-8")
        with self.lock:
            if not self._fresh:
                self._load()
            self._fresh = False
            self._chunks = []
            if self.lib.espeak_SetVoiceByName(f"cmn+{variant}".encode()) != 0:
                raise RuntimeError(f"espeak-ng refused the voice cmn+{variant}")
            self.lib.espeak_SetParameter(ESPEAK_RATE, rate, 0)
            self.lib.espeak_SetParameter(ESPEAK_PITCH, pitch, 0)
            error = self.lib.espeak_Synth(data, len(data) + 1, 0, POS_CHARACTER, 0, ESPEAK_CHARS_UTF8,
                                          None, None)
            self.lib.espeak_Synchronize()
            chunks, self._chunks = self._chunks, []
        if error != 0:
            raise RuntimeError(f"espeak_Synth failed ({error}) on {text!r}")
        return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)


    def phonemes(self, text: str) -> str:
        """espeak-ng's phoneme mnemonics for ``text`` in the plain ``cmn`` voice (what it
        speaks, tones as pitch contours: 55, 35, 214, 51, 11 for the neutral tone)."""
        buffer = ctypes.create_string_buffer(text.encode("utf-8"))
        pointer = ctypes.c_void_p(ctypes.addressof(buffer))
        parts = []
        with self.lock:
            self._fresh = False  # the next speak() reloads: no state of this call carries over
            if self.lib.espeak_SetVoiceByName(b"cmn") != 0:
                raise RuntimeError("espeak-ng refused the voice cmn")
            while pointer.value:  # one clause per call; the pointer moves on (NULL at the end)
                part = self.lib.espeak_TextToPhonemes(ctypes.byref(pointer), ESPEAK_CHARS_UTF8, 0)
                if part:
                    parts.append(part.decode("utf-8"))
        return " ".join(parts)


def _dlclose(handle) -> None:
    import _ctypes

    (_ctypes.dlclose if hasattr(_ctypes, "dlclose") else _ctypes.FreeLibrary)(handle)


_ESPEAK: _Espeak | None = None
_ESPEAK_INIT = threading.Lock()


def _espeak() -> _Espeak:
    global _ESPEAK
    with _ESPEAK_INIT:
        if _ESPEAK is None:
            _ESPEAK = _Espeak()
    return _ESPEAK


def espeak_version() -> str:
    return _espeak().version


# espeak-ng's Mandarin pitch contours (espeak-ng-data/phsource/ph_cmn) as pinyin tone numbers.
SPOKEN_TONES = {"55": 1, "35": 2, "214": 3, "51": 4, "11": 5}


def spoken_tones(text: str) -> list[int] | None:
    """The tone of each syllable espeak-ng speaks for Chinese ``text`` (1-4, 5 neutral),
    read from its phonemes; None where a contour is not one of SPOKEN_TONES. It applies
    some sandhi (一, 不) and neutral tones of its own, so this can differ from
    ``to_pinyin``'s tones: the label noise of the synthetic transcripts."""
    tones = [SPOKEN_TONES.get(code) for code in re.findall(r"\d+", _espeak().phonemes(text))]
    return None if None in tones else tones


def voice_variants() -> tuple[str, ...]:
    """The voice variants the espeak-ng data ships (espeak-ng-data/voices/!v)."""
    return _espeak().variants


def _check_speech(voices: Iterable[str] = (), rates: Iterable[int] = (), pitches: Iterable[int] = ()) -> None:
    """ValueError for a voice variant the data lacks, or a rate / pitch out of espeak's range."""
    for voice in voices:
        if voice not in voice_variants():
            raise ValueError(f"unknown espeak-ng voice variant {voice!r}; the data ships: "
                             f"{', '.join(voice_variants())}")
    for rate in rates:
        if not RATE_RANGE[0] <= rate <= RATE_RANGE[1]:
            raise ValueError(f"speaking rate {rate} is outside espeak-ng's {RATE_RANGE[0]}-"
                             f"{RATE_RANGE[1]} words per minute")
    for pitch in pitches:
        if not PITCH_RANGE[0] <= pitch <= PITCH_RANGE[1]:
            raise ValueError(f"pitch {pitch} is outside espeak-ng's {PITCH_RANGE[0]}-{PITCH_RANGE[1]}")


def resample(audio: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """float32 ``audio`` from ``rate`` to ``target`` Hz (soxr, high quality), clipped to [-1, 1]
    (the filter may overshoot a full-scale signal slightly)."""
    import soxr

    if rate == target:
        return audio
    return np.clip(soxr.resample(audio, rate, target), -1.0, 1.0).astype(np.float32, copy=False)


def trim_silence(audio: np.ndarray, keep_seconds: float = TRIM_KEEP_SECONDS,
                 threshold: float = 0.01) -> np.ndarray:
    """``audio`` without its leading and trailing quiet part, ``keep_seconds`` of it kept on
    each side. Quiet = below ``threshold`` x the peak: a relative threshold, so a soft clip
    is trimmed like a loud one. All-silent audio is returned as is."""
    loud = np.flatnonzero(np.abs(audio) > threshold * float(np.abs(audio).max(initial=0.0)))
    if len(loud) == 0:
        return audio
    keep = int(round(keep_seconds * SAMPLE_RATE))
    return audio[max(0, loud[0] - keep):min(len(audio), loud[-1] + 1 + keep)]


def synthesize(text: str, voice: str = "m1", rate: int = 175, pitch: int = 50) -> np.ndarray:
    """``text`` spoken by espeak-ng's Mandarin voice variant ``voice``: float32 mono at
    SAMPLE_RATE in [-1, 1], silence trimmed to TRIM_KEEP_SECONDS. ``rate`` is words per
    minute, ``pitch`` the base pitch (50 = the voice's normal)."""
    if not text.strip():
        raise ValueError("nothing to synthesise: empty text")
    engine = _espeak()
    _check_speech([voice], [rate], [pitch])
    samples = engine.speak(text, voice, rate, pitch)
    if len(samples) == 0:
        raise ValueError(f"espeak-ng produced no audio for {text!r}")
    audio = resample(samples.astype(np.float32) / 32768.0, engine.sample_rate)
    return trim_silence(audio)


# ---------------------------------------------------------------------------- transcripts

_SYLLABLE = re.compile(r"[a-z]+[1-5]")


def is_hanzi(char: str) -> bool:
    """A Chinese character pypinyin can read: CJK unified ideographs (and extension A), 〇."""
    return "\u4e00" <= char <= "\u9fff" or "\u3400" <= char <= "\u4dbf" or char == "\u3007"


def to_pinyin(text: str) -> str:
    """Tone-numbered pinyin of Chinese ``text`` in the CTC alphabet: syllables joined by
    "|", neutral tone 5, ü as "v" ("绿色" -> "lv4|se4"). Punctuation and spaces are not
    spoken and are skipped; any other non-Chinese character (latin letters, digits) has no
    pinyin and raises ValueError: write such a transcript's pinyin by hand."""
    from pypinyin import Style, lazy_pinyin

    kept = []
    for position, char in enumerate(text):
        if is_hanzi(char):
            kept.append(char)
        elif unicodedata.category(char)[0] not in "PZ" and not char.isspace():
            raise ValueError(f"{text!r}: character {char!r} at position {position} is not Chinese "
                             "(pinyin can only be derived from Chinese characters)")
    if not kept:
        raise ValueError(f"{text!r}: no Chinese characters to transcribe")
    syllables = lazy_pinyin("".join(kept), style=Style.TONE3, neutral_tone_with_five=True,
                            v_to_u=False)
    for char, syllable in zip(kept, syllables):
        if not _SYLLABLE.fullmatch(syllable):
            raise ValueError(f"{text!r}: pypinyin has no pinyin for {char!r} (got {syllable!r})")
    return "|".join(syllables)


def encode_transcript(pinyin: str, alphabet: Sequence[str] = PINYIN_ALPHABET) -> np.ndarray:
    """int32 ids of the characters of ``pinyin`` in ``alphabet`` (one symbol per character).
    The blank (id 0) is never produced; an unknown character raises ValueError naming it."""
    ids = {symbol: i for i, symbol in enumerate(alphabet) if i != 0}
    out = np.empty(len(pinyin), dtype=np.int32)
    for position, char in enumerate(pinyin):
        if char not in ids:
            raise ValueError(f"transcript {pinyin!r}: symbol {char!r} at position {position} is "
                             f"not in the alphabet ({''.join(alphabet[1:])})")
        out[position] = ids[char]
    return out


def decode_ids(ids: Iterable[int], alphabet: Sequence[str] = PINYIN_ALPHABET, blank: int = 0) -> str:
    """CTC greedy decoding of one row of frame-wise argmax ids: merge repeats, then drop
    blanks ([a, a, blank, a] -> "aa": a blank separates two real repeats)."""
    out, previous = [], None
    for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
        if i != previous and i != blank:
            out.append(alphabet[i])
        previous = i
    return "".join(out)


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict:
    """Corpus-level error rates of pinyin transcripts (total edits / total reference length):
    ``syllable_error_rate`` = WER over "|"-separated syllables (a wrong tone is a wrong
    syllable), ``character_error_rate`` = CER over the letters and tone digits, separators
    removed."""
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("no transcripts to score")
    for i, reference in enumerate(references):
        if not reference.replace("|", "").strip():
            raise ValueError(f"reference {i} is empty: error rates are undefined for it")

    def words(transcript: str) -> str:
        return " ".join(s for s in transcript.split("|") if s)

    return {
        "syllable_error_rate": float(jiwer.wer([words(r) for r in references],
                                               [words(h) for h in hypotheses])),
        "character_error_rate": float(jiwer.cer([r.replace("|", "") for r in references],
                                                [h.replace("|", "") for h in hypotheses])),
        "utterances": len(references),
    }


# ---------------------------------------------------------------------------- audio files


def load_audio(path: str | Path) -> np.ndarray:
    """An audio file (whatever libsndfile reads: wav, flac, ogg, ...) as float32 mono at
    SAMPLE_RATE: channels averaged, integer samples scaled to [-1, 1), resampled with soxr
    when the file's rate differs. Silence is valid audio; an empty file is not."""
    import soundfile

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"audio file {path} not found")
    try:
        audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.SoundFileError, RuntimeError) as err:
        raise ValueError(f"{path}: not an audio file soundfile can read ({err})") from None
    if audio.shape[0] == 0 or audio.shape[1] == 0:
        raise ValueError(f"{path}: the audio is empty")
    mono = audio.mean(axis=1, dtype=np.float32) if audio.shape[1] > 1 else audio[:, 0]
    return np.ascontiguousarray(resample(mono, int(rate)), dtype=np.float32)


def read_jsonl(path: str | Path) -> list[Clip]:
    """Clips from a ``.jsonl`` file, one ``{"audio": path, "text": ..., "pinyin": ...}`` per
    line, the audio decoded now (``load_audio``).

    Audio paths are relative to the folder of the ``.jsonl`` file (absolute paths and ``~``
    work too). ``text`` (Chinese) and ``pinyin`` (tone-numbered syllables joined by "|", ü
    as "v") are optional: pretraining needs neither; when only ``text`` is given, the pinyin
    is derived from it (``to_pinyin``). Other keys are ignored, blank lines skipped. Every
    problem raises ValueError (FileNotFoundError for a missing .jsonl) naming the file and
    the line.
    """
    from taichu.fileio import jsonl_objects

    path = Path(path).expanduser()
    clips = []
    for where, record in jsonl_objects(path, "speech file", "with an 'audio' key"):
        if "audio" not in record:
            raise ValueError(f"{where}: missing key 'audio' (each line needs 'audio'; 'text' and "
                             "'pinyin' are optional)")
        for key in ("audio", "text", "pinyin"):
            if key in record and not isinstance(record[key], str):
                raise ValueError(f"{where}: '{key}' must be a string, got {type(record[key]).__name__}")
        if not record["audio"].strip():
            raise ValueError(f"{where}: empty audio path")
        text, pinyin = record.get("text", "").strip(), record.get("pinyin", "").strip()
        try:
            if pinyin:
                encode_transcript(pinyin, PINYIN_ALPHABET)
            elif text:
                pinyin = to_pinyin(text)
        except ValueError as err:
            raise ValueError(f"{where}: {err} (give 'pinyin' as tone-numbered syllables joined by "
                             "'|', ü as v, e.g. \"zhong1|guo2\")") from None
        audio_path = Path(record["audio"]).expanduser()
        if not audio_path.is_absolute():
            audio_path = path.parent / audio_path
        try:
            audio = load_audio(audio_path)
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from None
        clips.append(Clip(audio=audio, text=text, pinyin=pinyin, voice="", source=str(audio_path)))
    if not clips:
        raise ValueError(f"{path}: no clips")
    return clips


# ---------------------------------------------------------------------------- split


def split_indices(count: int, fraction: float, seed: int, salt: str) -> dict[str, list[int]]:
    """Indices 0..count-1 into train / validation / test, each sorted: a seeded permutation
    gives validation its first round(count x fraction) entries, test as many next, train the
    rest. From 3 items on, validation and test get at least one each."""
    if not 0.0 < fraction < 0.5:
        raise ValueError(f"validation_fraction must be in (0, 0.5) (test takes as much), got {fraction}")
    held = int(count * fraction + 0.5)
    if count >= 3:
        held = max(1, held)
    if count - 2 * held < 1:
        raise ValueError(f"{count} items leave nothing to train on with validation and test "
                         f"fractions of {fraction}")
    order = np.random.default_rng([seed, _salt(salt)]).permutation(count)
    return {"validation": sorted(order[:held].tolist()),
            "test": sorted(order[held:2 * held].tolist()),
            "train": sorted(order[2 * held:].tolist())}


def _salt(name: str) -> int:
    """A stream number per purpose, so drawing voices never shifts the sentence selection."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")


# ---------------------------------------------------------------------------- synthetic data


def chinese_clauses(paragraphs: Iterable[str], max_characters: int) -> list[str]:
    """Unique clauses (in order of first appearance) of 2..max_characters characters, all
    Chinese: paragraphs are cut at punctuation and spaces, and a clause holding anything
    else (digits, latin letters, symbols) is dropped whole, never cut around it."""
    clauses: dict[str, None] = {}
    for paragraph in paragraphs:
        clause: list[str] = []
        for char in paragraph + " ":
            if unicodedata.category(char)[0] in "PZ" or char.isspace():
                if 2 <= len(clause) <= max_characters and all("\u4e00" <= c <= "\u9fff" for c in clause):
                    clauses["".join(clause)] = None
                clause = []
            else:
                clause.append(char)
    return list(clauses)


@functools.lru_cache(maxsize=4)
def _clause_pool(max_characters: int) -> tuple[str, ...]:
    """People's Daily's clauses, read once per process (about a second)."""
    from taichu.corpus import peoples_daily_paragraphs

    return tuple(chinese_clauses(peoples_daily_paragraphs(), max_characters))


@dataclass(frozen=True)
class _Utterance:
    """One synthetic clip to make: everything that determines it."""

    split: str
    source: str     # "pd-<clause index>"
    text: str
    pinyin: str
    voice: str
    rate: int
    pitch: int


def synthetic_plan(data) -> list[_Utterance]:
    """The synthetic clips of ``data`` (a SpeechDataConfig), in SPLITS order, before synthesis.

    ``data.sentences`` clauses are drawn from People's Daily (a seeded permutation, so a
    larger count extends a smaller one's draw), split by sentence, and each is spoken once
    by a seen voice (the variants minus the held-out one), rate and pitch drawn per clip;
    the held-out voice reads every test sentence again.
    """
    held_out = data.held_out_voice
    seen = [v for v in dict.fromkeys(data.voices) if v != held_out]
    if not seen:
        raise ValueError(f"data.voices {data.voices} leaves no voice to train on besides the "
                         f"held-out voice {held_out!r}")
    if not data.rates or not data.pitches:
        raise ValueError("data.rates and data.pitches need at least one value each")
    _check_speech(seen + ([held_out] if held_out else []), data.rates, data.pitches)
    pool = _clause_pool(data.max_characters)
    if len(pool) < data.sentences:
        raise ValueError(f"People's Daily has {len(pool)} distinct all-Chinese clauses of 2..."
                         f"{data.max_characters} characters, fewer than data.sentences = {data.sentences}")
    chosen = np.random.default_rng([data.split_seed, _salt("sentences")]).permutation(len(pool))
    chosen = chosen[:data.sentences]
    splits = split_indices(len(chosen), data.validation_fraction, data.split_seed, "sentence-split")
    draws = np.random.default_rng([data.split_seed, _salt("voices")])
    width = max(6, len(str(len(pool))))

    def utterance(split: str, index: int, voice: str | None = None) -> _Utterance:
        clause = int(chosen[index])
        pick = draws.integers(0, [len(seen), len(data.rates), len(data.pitches)])
        text = pool[clause]
        return _Utterance(split=split, source=f"pd-{clause:0{width}d}", text=text, pinyin=to_pinyin(text),
                          voice=voice or seen[pick[0]], rate=data.rates[pick[1]], pitch=data.pitches[pick[2]])

    plan = [utterance(split, i) for split in ("train", "validation", "test") for i in splits[split]]
    if held_out:
        plan += [utterance("held_out_voice", i, held_out) for i in splits["test"]]
    return plan


def _plan_fingerprint(plan: Sequence[_Utterance]) -> str:
    h = hashlib.sha256(json.dumps({
        "format": "taichu-speech-synthetic", "version": SYNTHESIS_VERSION, "espeak": espeak_version(),
        "sample_rate": SAMPLE_RATE, "trim": TRIM_KEEP_SECONDS,
        "clips": [[u.split, u.source, u.text, u.pinyin, u.voice, u.rate, u.pitch] for u in plan],
    }, ensure_ascii=False).encode())
    return h.hexdigest()


def _quantize(audio: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> int16, the cache's sample format (x 32768, rounded, clipped)."""
    return np.clip(np.rint(audio * 32768.0), -32768, 32767).astype(np.int16)


# ---------------------------------------------------------------------------- cache


def cache_root(data) -> Path:
    """(data.cache_dir or $TAICHU_CACHE or ~/.cache/taichu) / speech."""
    if data.cache_dir:
        return Path(data.cache_dir).expanduser() / "speech"
    root = os.environ.get("TAICHU_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "taichu") / "speech"


def cache_path(data, fingerprint: str) -> Path:
    """The folder holding the cached clips of ``fingerprint``: audio.npy + index.json."""
    return cache_root(data) / fingerprint[:16]


def _speech_data(audio: np.ndarray, index: dict) -> SpeechData:
    """SpeechData from the cache's int16 samples and index: the one way clips are built, so
    fresh synthesis and a cache read give identical arrays."""
    splits: dict[str, list[Clip]] = {split: [] for split in SPLITS}
    for entry in index["clips"]:
        samples = audio[entry["offset"]:entry["offset"] + entry["length"]]
        splits[entry["split"]].append(Clip(audio=samples.astype(np.float32) / np.float32(32768.0),
                                           text=entry["text"], pinyin=entry["pinyin"],
                                           voice=entry["voice"], source=entry["source"]))
    return SpeechData(**splits, name=index["name"], fingerprint=index["fingerprint"])


def _read_cache(path: Path, fingerprint: str) -> SpeechData:
    index = json.loads((path / "index.json").read_text(encoding="utf-8"))
    audio = np.load(path / "audio.npy", allow_pickle=False)
    if index.get("format") != CACHE_FORMAT or index.get("fingerprint") != fingerprint:
        raise ValueError(f"speech cache {path} belongs to other data (fingerprint "
                         f"{index.get('fingerprint')}); delete the folder")
    if audio.dtype != np.int16 or audio.ndim != 1 or len(audio) != index["samples"]:
        raise ValueError(f"speech cache {path} is damaged ({audio.dtype} {audio.shape}, index says "
                         f"{index['samples']} samples); delete the folder")
    return _speech_data(audio, index)


def _synthesise(plan: Sequence[_Utterance], fingerprint: str, path: Path) -> SpeechData:
    from tqdm import tqdm

    start = time.time()
    pieces, entries, offset = [], [], 0
    for u in tqdm(plan, desc="synthesising speech", unit="clip", disable=None, dynamic_ncols=True):
        samples = _quantize(synthesize(u.text, u.voice, u.rate, u.pitch))
        pieces.append(samples)
        entries.append({"split": u.split, "source": u.source, "text": u.text, "pinyin": u.pinyin,
                        "voice": u.voice, "rate": u.rate, "pitch": u.pitch,
                        "offset": offset, "length": len(samples)})
        offset += len(samples)
    audio = np.concatenate(pieces) if pieces else np.zeros(0, np.int16)
    counts = {split: sum(e["split"] == split for e in entries) for split in SPLITS}
    hours = len(audio) / SAMPLE_RATE / 3600
    index = {"format": CACHE_FORMAT, "name": SYNTHETIC, "fingerprint": fingerprint,
             "sample_rate": SAMPLE_RATE, "samples": len(audio), "espeak": espeak_version(),
             "synthesis_version": SYNTHESIS_VERSION, "counts": counts, "hours": hours, "clips": entries}
    write_cache_folder(path, {"audio": audio}, index)
    print(f"speech data {SYNTHETIC}: {counts['train']} train, {counts['validation']} validation, "
          f"{counts['test']} test, {counts['held_out_voice']} held-out-voice clips, {hours:.2f} hours "
          f"(synthesised in {time.time() - start:.0f} s, cached in {path})", flush=True)
    return _speech_data(audio, index)


# ---------------------------------------------------------------------------- entry point


def _user_data(data) -> SpeechData:
    """The clips of the .jsonl file(s) in ``data.source``, split by line; no held-out voice.
    Decoded on every call, not cached: the files are already on disk."""
    paths = [data.source] if isinstance(data.source, str) else list(data.source)
    if not paths:
        raise ValueError("data.source is an empty list (give 'synthetic' or .jsonl paths)")
    clips = []
    for path in paths:
        if Path(path).suffix.lower() != ".jsonl":
            raise ValueError(f"data.source {path!r}: expected '{SYNTHETIC}' or .jsonl files of "
                             '{"audio": path, "text": ..., "pinyin": ...} lines')
        clips += read_jsonl(path)
    splits = split_indices(len(clips), data.validation_fraction, data.split_seed, "line-split")
    h = hashlib.sha256(f"taichu-speech-jsonl:{data.validation_fraction!r}:{data.split_seed}".encode())
    for clip in clips:
        for part in (clip.source, clip.text, clip.pinyin):
            h.update(part.encode() + b"\0")
        h.update(len(clip.audio).to_bytes(8, "little"))
        h.update(clip.audio.tobytes())
    return SpeechData(train=[clips[i] for i in splits["train"]],
                      validation=[clips[i] for i in splits["validation"]],
                      test=[clips[i] for i in splits["test"]], held_out_voice=[],
                      name="+".join(Path(p).stem for p in paths), fingerprint=h.hexdigest())


def load_speech_data(data, rank: int = 0) -> SpeechData:
    """The clips ``data`` (a SpeechDataConfig) describes: synthetic (cached, synthesised by
    rank 0 only: other ranks wait for its cache) or the user's .jsonl files."""
    if data.source != SYNTHETIC:
        return _user_data(data)
    plan = synthetic_plan(data)
    fingerprint = _plan_fingerprint(plan)
    path = cache_path(data, fingerprint)
    if rank != 0:
        # Rank 0 synthesises; the folder appears whole (atomic rename) when it is done.
        deadline = time.time() + CACHE_WAIT_SECONDS
        while not path.exists() and time.time() < deadline:
            time.sleep(1)
    if (path / "index.json").is_file():
        return _read_cache(path, fingerprint)
    return _synthesise(plan, fingerprint, path)

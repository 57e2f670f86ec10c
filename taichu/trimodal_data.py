"""Data of the tri-modal family: items holding any non-empty subset of image, text and audio.

Sources (``data.source`` of a trimodal config):
- ``digits`` / ``scenes``: the image-text pairs of taichu.imagetext, split as the CLIP family
  splits them (by image key). A share (``data.spoken.fraction``) of the training pairs get
  their caption spoken by the offline Mandarin synthesiser (taichu.speech.synthesize), a
  seen voice, rate and pitch drawn per pair; the others stay image-text only. Every test
  pair is spoken once by a seen voice (``validation``: the validation loss) and once by the
  held-out voice (``held_out_voice``: what ``taichu eval`` measures).
- ``.jsonl`` files of {"image", "text", "audio"} lines with any non-empty subset of the keys;
  image-text lines without audio get a spoken caption as above; split by line key.
- ``data.spoken.sentences`` People's Daily clauses spoken by seen voices: speech-text pairs
  with no image, added to the training set.

Synthesised audio is cached by content (one folder per set of utterances), like the speech
family's clips.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from taichu.families.wav2vec2 import SAMPLE_RATE

# Peak below this (about -70 dBFS) is silence: there is nothing to embed.
SILENCE_PEAK = 10 / 32768
SYNTHESIS_CACHE_FORMAT = 1


@dataclass(frozen=True, eq=False)  # eq=False: numpy fields
class Item:
    """One training or evaluation example; None marks a missing modality."""

    image: object | None       # a PIL image or an image file path (taichu.images.load_image)
    text: str | None
    audio: np.ndarray | None   # float32 mono at SAMPLE_RATE, raw amplitude
    key: str                   # what the split and the evaluation's grouping go by
    voice: str = ""            # synthetic audio: the espeak voice variant
    label: int | None = None   # digits: 0..9

    @property
    def present(self) -> tuple[bool, bool, bool]:
        return (self.image is not None, self.text is not None, self.audio is not None)


@dataclass
class TriModalSet:
    train: list[Item]
    validation: list[Item]        # the test pairs, spoken by seen voices
    held_out_voice: list[Item]    # the test pairs, spoken by the held-out voice ([] if none)
    name: str
    fingerprint: str


def is_silent(audio: np.ndarray) -> bool:
    return len(audio) == 0 or float(np.abs(audio).max()) < SILENCE_PEAK


def check_audio_clip(audio: np.ndarray, where: str, shortest: int, max_samples: int | None = None) -> None:
    """Refuse audio there is nothing to learn from or that the model cannot take, naming
    ``where`` it came from."""
    if is_silent(audio):
        raise ValueError(f"{where}: the audio is silence (peak below {SILENCE_PEAK:.1e}): nothing to embed")
    if len(audio) < shortest:
        raise ValueError(f"{where}: the audio has {len(audio)} samples, fewer than the speech tower's "
                         f"receptive field ({shortest} samples)")
    if max_samples is not None and len(audio) > max_samples:
        raise ValueError(f"{where}: the audio lasts {len(audio) / SAMPLE_RATE:.1f} s, more than "
                         f"data.spoken.max_seconds ({max_samples / SAMPLE_RATE:g} s)")


def require_speech(config, model_dir) -> None:
    """Refuse audio for a model without a speech tower in the shared space."""
    if config.family != "trimodal":
        hint = (" (a wav2vec2 model gives utterance embeddings of its own with `taichu embed "
                "MODEL --audio`, not in an image-text space)" if config.family != "wav2vec2" else
                ": `taichu embed MODEL --audio` gives this speech model's own utterance embeddings")
        raise ValueError(f"{model_dir} is a {config.family} model with no speech tower: audio "
                         f"embeddings in a space shared with images and captions need a tri-modal "
                         f"(trimodal) model{hint}")


def load_clips(audios: Sequence, config, names: Sequence[str] | None = None) -> tuple[list[str], list[np.ndarray]]:
    """(names, float32 16 kHz mono clips) of audio files or arrays, each checked for the
    speech tower of ``config`` (a tri-modal config): mono, finite, not silence
    (taichu.trimodal_data.is_silent), at least the receptive field. Errors name the clip."""
    from taichu.families.trimodal import shortest_audio

    if names is not None and len(names) != len(audios):
        raise ValueError(f"{len(audios)} clips but {len(names)} names")
    if not audios:
        raise ValueError("no audio given")
    shortest = shortest_audio(config)
    out_names, clips = [], []
    for i, audio in enumerate(audios):
        if isinstance(audio, (str, Path)):
            from taichu.speech import load_audio

            name = names[i] if names is not None else str(audio)
            audio = load_audio(audio)   # a missing or unreadable file raises, naming itself
        else:
            name = names[i] if names is not None else f"audio {i}"
            audio = np.asarray(audio)
            if audio.ndim != 1 or not np.issubdtype(audio.dtype, np.floating):
                raise ValueError(f"{name}: expected 16 kHz mono audio as a 1-D float array, got "
                                 f"{audio.dtype} {list(audio.shape)}")
            audio = audio.astype(np.float32, copy=False)
        if not np.all(np.isfinite(audio)):
            raise ValueError(f"{name}: the audio contains NaN or infinite samples")
        check_audio_clip(audio, name, shortest)
        out_names.append(name)
        clips.append(audio)
    return out_names, clips


# ---------------------------------------------------------------------------- synthesis


def speak_all(utterances: Sequence[tuple[str, str, int, int]], cache_root: Path,
              what: Sequence[str] | None = None) -> list[np.ndarray]:
    """Audio of each (text, voice, rate, pitch), synthesised once and cached by content.

    ``what`` names each utterance's origin for the error raised when a text has no spoken
    form (espeak-ng makes no sound of it)."""
    from taichu.fileio import write_cache_folder
    from taichu.speech import SYNTHESIS_VERSION, TRIM_KEEP_SECONDS, _quantize, espeak_version, synthesize

    distinct = list(dict.fromkeys(utterances))
    key = hashlib.sha256(json.dumps({
        "format": "taichu-spoken-captions", "version": SYNTHESIS_VERSION, "espeak": espeak_version(),
        "sample_rate": SAMPLE_RATE, "trim": TRIM_KEEP_SECONDS, "utterances": distinct,
    }, ensure_ascii=False).encode()).hexdigest()
    path = Path(cache_root) / "spoken" / key[:16]
    if (path / "index.json").is_file():
        index = json.loads((path / "index.json").read_text(encoding="utf-8"))
        audio = np.load(path / "audio.npy", allow_pickle=False)
        if index.get("format") != SYNTHESIS_CACHE_FORMAT or index.get("key") != key \
                or len(audio) != index.get("samples"):
            raise ValueError(f"spoken-caption cache {path} is damaged or belongs to other data; delete it")
    else:
        from tqdm import tqdm

        start, pieces, offsets = time.time(), [], [0]
        origin = dict(zip(utterances, what)) if what is not None else {}
        for u in tqdm(distinct, desc="speaking captions", unit="clip", disable=None, dynamic_ncols=True):
            try:
                spoken = synthesize(*u)
            except ValueError as err:
                spoken, why = None, str(err)
            else:
                why = "espeak-ng speaks it as silence"
            if spoken is None or is_silent(spoken):
                # Punctuation or symbols only: espeak-ng says nothing (a few silent samples).
                raise ValueError(f"caption {u[0]!r} ({origin.get(u, 'spoken caption')}) has no spoken "
                                 f"form: {why}")
            pieces.append(_quantize(spoken))
            offsets.append(offsets[-1] + len(pieces[-1]))
        audio = np.concatenate(pieces) if pieces else np.zeros(0, np.int16)
        index = {"format": SYNTHESIS_CACHE_FORMAT, "key": key, "samples": len(audio), "offsets": offsets,
                 "utterances": distinct}
        write_cache_folder(path, {"audio": audio}, index)
        print(f"spoke {len(distinct)} captions ({len(audio) / SAMPLE_RATE / 60:.1f} min of audio) in "
              f"{time.time() - start:.0f} s, cached in {path}", flush=True)
    offsets = index["offsets"]
    clips = {u: audio[offsets[i]:offsets[i + 1]].astype(np.float32) / np.float32(32768.0)
             for i, u in enumerate(distinct)}
    return [clips[u] for u in utterances]


# ---------------------------------------------------------------------------- sources


def read_jsonl(path: str | Path) -> list[Item]:
    """Items from a ``.jsonl`` file: each line an object with any non-empty subset of
    "image" (a path), "text" (a caption) and "audio" (a path; taichu.speech.load_audio),
    paths relative to the file; an optional integer "label". Every problem raises
    ValueError naming the file and line: no modality, a missing file, an empty caption,
    audio that is silence or not audio."""
    from taichu.fileio import jsonl_objects
    from taichu.speech import load_audio

    path = Path(path).expanduser()
    items = []
    for where, record in jsonl_objects(path, "tri-modal file", "with 'image', 'text' and/or 'audio' keys"):
        given = [k for k in ("image", "text", "audio") if k in record]
        if not given:
            raise ValueError(f"{where}: no modality: a line needs at least one of 'image', 'text', 'audio'")
        for key in given:
            if not isinstance(record[key], str) or not record[key].strip():
                raise ValueError(f"{where}: '{key}' must be a non-empty string, got {record[key]!r}")
        label = record.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
            raise ValueError(f"{where}: 'label' must be an integer, got {label!r}")

        def local(name: str) -> Path:
            p = Path(name).expanduser()
            return p if p.is_absolute() else path.parent / p

        image = audio = None
        if "image" in record:
            image = local(record["image"])
            if not image.is_file():
                raise ValueError(f"{where}: image file {image} not found")
        if "audio" in record:
            try:
                audio = load_audio(local(record["audio"]))
            except (FileNotFoundError, ValueError) as err:
                raise ValueError(f"{where}: {err}") from None
            if is_silent(audio):
                raise ValueError(f"{where}: the audio {record['audio']} is silence: nothing to embed")
        key = record.get("image") or record.get("audio") or record["text"]
        items.append(Item(image=image, text=record.get("text"), audio=audio, key=str(key), label=label))
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def _image_text_items(source: str, data) -> tuple[list[Item], list[Item], str]:
    """(train, test) items of an image-text source, split as taichu.imagetext splits it."""
    from taichu.imagetext import load_image_text

    pairs = load_image_text(source, test_fraction=data.validation_fraction, seed=data.split_seed,
                            scene_count=data.scene_count, scene_seed=data.scene_seed)

    def items(chosen):
        return [Item(image=p.image, text=p.text, audio=None, key=p.key, label=p.label) for p in chosen]

    return items(pairs.train), items(pairs.test), pairs.name


def _split_items(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    from taichu.imagetext import split_pairs

    # split_pairs reads .key only: items split by key as pairs are.
    return split_pairs(items, fraction, seed)


def _voices(spoken) -> tuple[list[str], str | None]:
    held_out = spoken.held_out_voice
    seen = [v for v in dict.fromkeys(spoken.voices) if v != held_out]
    if not seen:
        raise ValueError(f"data.spoken.voices {spoken.voices} leaves no voice to train on besides the "
                         f"held-out voice {held_out!r}")
    return seen, held_out


def load_trimodal(config, rank: int = 0) -> TriModalSet:
    """The items ``config.data`` describes, spoken captions synthesised (or read from the
    cache), every clip checked (silence, receptive field, max_seconds)."""
    from taichu.families.trimodal import shortest_audio
    from taichu.speech import _clause_pool, _salt, cache_root

    data = config.data
    spoken = data.spoken
    sources = [data.source] if isinstance(data.source, str) else list(data.source)
    train, test, names = [], [], []
    for source in sources:
        if str(source).endswith(".jsonl"):
            a, b = _split_items(read_jsonl(source), data.validation_fraction, data.split_seed)
            name = Path(source).name
        else:
            a, b, name = _image_text_items(source, data)
        train += a
        test += b
        names.append(name)
    seen, held_out = _voices(spoken)
    rng = np.random.default_rng([data.split_seed, _salt("spoken-captions")])

    def draw_voice() -> tuple[str, int, int]:
        v, r, p = rng.integers(0, [len(seen), len(spoken.rates), len(spoken.pitches)])
        return seen[v], spoken.rates[r], spoken.pitches[p]

    # What to speak: (item list, position, (text, voice, rate, pitch)).
    plan: list[tuple[str, int, tuple]] = []
    for i, item in enumerate(train):
        if item.audio is None and item.text is not None and item.image is not None \
                and rng.random() < spoken.fraction:
            plan.append(("train", i, (item.text, *draw_voice())))
    validation = list(test)
    held = []
    for i, item in enumerate(test):
        if item.audio is None and item.text is not None:
            plan.append(("validation", i, (item.text, *draw_voice())))
            if held_out:
                held.append(item)
                plan.append(("held_out_voice", len(held) - 1, (item.text, held_out, spoken.rates[len(spoken.rates) // 2],
                                                              spoken.pitches[len(spoken.pitches) // 2])))
    sentence_items = []
    if spoken.sentences:
        pool = _clause_pool(spoken.sentence_characters)
        if len(pool) < spoken.sentences:
            raise ValueError(f"data.spoken.sentences {spoken.sentences}: People's Daily has only "
                             f"{len(pool)} clauses of up to {spoken.sentence_characters} characters")
        chosen = np.random.default_rng([data.split_seed, _salt("spoken-sentences")]).permutation(len(pool))
        for n, clause in enumerate(chosen[:spoken.sentences]):
            text = pool[int(clause)]
            sentence_items.append(Item(image=None, text=text, audio=None, key=f"pd-{int(clause)}"))
            plan.append(("sentences", n, (text, *draw_voice())))
    lists = {"train": train, "validation": validation, "held_out_voice": held, "sentences": sentence_items}
    what = [f"{'test' if where in ('validation', 'held_out_voice') else 'train'} item "
            f"{lists[where][i].key!r}" for where, i, _ in plan]
    audio = speak_all([u for _, _, u in plan], cache_root(data), what) if plan else []
    max_samples = int(spoken.max_seconds * SAMPLE_RATE)
    too_long = dict.fromkeys(lists, 0)
    for (where, i, u), clip in zip(plan, audio):
        if len(clip) > max_samples:
            # A spoken caption longer than max_seconds is not used: the item keeps its other
            # modalities (the long captions of scene rows would otherwise set every batch's
            # padded length). The user's own audio is refused instead (check below).
            too_long[where] += 1
            continue
        item = lists[where][i]
        lists[where][i] = Item(image=item.image, text=item.text, audio=clip, key=item.key, voice=u[1],
                               label=item.label)
    if any(too_long.values()):
        print(f"spoken captions longer than data.spoken.max_seconds {spoken.max_seconds:g} s left out: "
              + ", ".join(f"{n} {where}" for where, n in too_long.items() if n), flush=True)
    train = train + [item for item in sentence_items if item.audio is not None]
    shortest = shortest_audio(config)
    for split, items in (("train", train), ("validation", validation), ("held_out_voice", held)):
        for item in items:
            if item.audio is not None:
                check_audio_clip(item.audio, f"{split} item {item.key!r}", shortest, max_samples)
    h = hashlib.sha256(f"taichu-trimodal-v1:{data.model_dump_json()}".encode())
    for items in (train, validation, held):
        for item in items:
            h.update(f"{item.key}\0{item.text}\0{item.voice}\0{item.present}\0".encode())
            if item.audio is not None:
                h.update(item.audio.tobytes())
    return TriModalSet(train=train, validation=validation, held_out_voice=held, name="+".join(names),
                       fingerprint=h.hexdigest())


# ---------------------------------------------------------------------------- batches


class TriModalBatches:
    """Batches by index: the inputs of the trimodal ``training_loss`` by name, in its order
    (pixel_values, input_ids, attention_mask, input_values, audio_mask, present).

    A missing modality gets a placeholder the loss leaves out: zero pixels, the text
    [bos, eos], zero audio of the receptive field's length (finite through every layer).
    Audio is normalised per clip and padded to a multiple of data.spoken.pad_to_seconds (few
    shapes for a compiled graph)."""

    def __init__(self, items: Sequence[Item], tokenizer, config):
        from taichu.families.trimodal import shortest_audio
        from taichu.imagetext import caption_ids

        if not items:
            raise ValueError("no items in this split")
        self.items = list(items)
        m = config.model
        self.image_size = m.image.image_size
        self.pad_to_seconds = config.data.spoken.pad_to_seconds
        self.shortest = shortest_audio(config)
        context = m.text.max_position_embeddings
        texts = [item.text for item in self.items if item.text is not None]
        ids, mask = caption_ids(tokenizer, texts, context) if texts else (None, None)
        self.input_ids = np.full((len(self.items), context), tokenizer.pad_id, np.int64)
        self.attention_mask = np.zeros((len(self.items), context), np.int64)
        self.input_ids[:, :2] = (tokenizer.bos_id, tokenizer.eos_id)
        self.attention_mask[:, :2] = 1
        with_text = [i for i, item in enumerate(self.items) if item.text is not None]
        if with_text:
            self.input_ids[with_text] = ids
            self.attention_mask[with_text] = mask
        self.present = np.array([item.present for item in self.items], np.float32)
        # Samples of audio per item (0: none): what the training order buckets by.
        self.lengths = np.array([0 if item.audio is None else len(item.audio) for item in self.items], np.int64)
        self._pixels: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.items)

    def pixels(self, index: int) -> np.ndarray:
        from taichu.images import load_image, preprocess

        if index not in self._pixels:
            item = self.items[index]
            self._pixels[index] = (np.zeros((3, self.image_size, self.image_size), np.float32)
                                   if item.image is None else preprocess([load_image(item.image)], self.image_size)[0])
        return self._pixels[index]

    def batch(self, indices) -> dict[str, np.ndarray]:
        from taichu.speech_batches import normalise, padded_length

        indices = [int(i) for i in indices]
        audio = [None if self.items[i].audio is None else normalise(self.items[i].audio) for i in indices]
        longest = max([len(a) for a in audio if a is not None] or [self.shortest])
        length = padded_length(longest, self.pad_to_seconds)
        input_values = np.zeros((len(indices), length), np.float32)
        audio_mask = np.zeros((len(indices), length), np.int32)
        for row, a in enumerate(audio):
            if a is None:
                audio_mask[row, :self.shortest] = 1
            else:
                input_values[row, :len(a)] = a
                audio_mask[row, :len(a)] = 1
        return {"pixel_values": np.stack([self.pixels(i) for i in indices]),
                "input_ids": self.input_ids[indices], "attention_mask": self.attention_mask[indices],
                "input_values": input_values, "audio_mask": audio_mask, "present": self.present[indices]}

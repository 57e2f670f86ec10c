"""``taichu eval`` of a tri-modal model: Recall@K in the six directions between images,
captions and speech, each beside its chance level, and zero-shot digits from written and
from spoken prompts.

Backend-neutral (numpy at import time): the model runs in whatever backend its
``taichu.retrieval.Embedder`` holds (torch, mindspore, or an ONNX / MINDIR export).

The evaluation set is the model's own held-out data (``taichu.trimodal_data.load_trimodal``
of its config): the images and captions of the test split, the speech the same test
captions spoken by the held-out voice, a voice training never heard. Without a held-out
voice, or when a source is a user ``.jsonl`` (whose lines may bring audio of their own),
the speech is the validation split's (seen voices, or the file's audio).

Relevance goes by caption, as in ``taichu.retrieval.evaluate``: captions are deduplicated
(one text query or gallery entry per distinct caption) and an image or clip is relevant to
every image, clip and caption of the same caption. Identical clips (the held-out voice
reads a repeated caption the same way every time) are deduplicated too, so that copies of
one wrong clip cannot fill a top K. An item without a caption (a .jsonl line of image and
audio) is its own group. Each direction uses the items that have both of its modalities.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from taichu.retrieval import chance_recall_at_k, recall_at_k, zero_shot_accuracy

# (query modality, item modality), in the order reported.
DIRECTIONS = (("text", "image"), ("image", "text"), ("speech", "image"), ("image", "speech"),
              ("speech", "text"), ("text", "speech"))
# Item attribute holding each modality.
_FIELD = {"image": "image", "text": "text", "speech": "audio"}


def direction_name(query: str, item: str) -> str:
    return f"{query}_to_{item}"


@dataclass
class TriModalMetrics:
    values: dict

    def lines(self) -> list[str]:
        v = self.values
        out = [f"model {v['model']} ({v['backend']}), data {v['data']} {v['split']} split: "
               f"{v['images']} images, {v['unique_captions']} distinct captions, {v['clips']} distinct "
               f"clips (speech: {v['speech']})"]
        for query, item in DIRECTIONS:
            d = v.get(direction_name(query, item))
            if d is None:
                continue
            parts = [f"R@{k} {d[f'R@{k}']:.2%} (chance {d['chance'][f'R@{k}']:.2%})" for k in v["ks"]]
            out.append(f"{query + ' -> ' + item + ':':<18} " + ", ".join(parts)
                       + f"  [{d['queries']} queries, {d['items']} items]")
        for note in v.get("notes", []):
            out.append(f"note: {note}")
        if "zero_shot" in v:
            z = v["zero_shot"]
            s = z["spoken_by"]
            out.append(f"zero-shot digit accuracy: text prompts {z['accuracy']:.2%}, spoken prompts "
                       f"{z['spoken_accuracy']:.2%} (voice {s['voice']}{' held out' if s['held_out'] else ''}, "
                       f"rate {s['rate']}, pitch {s['pitch']}); chance {z['chance']:.2%}, "
                       f"{z['classes']} prompts like {z['prompts'][0]!r}")
        return out


def evaluation_items(config, data: str | None = None, split: str = "test"):
    """(items, data set, what the speech is) of a tri-modal config's data (``data``
    replaces its source, keeping the split parameters)."""
    from taichu.trimodal_data import load_trimodal

    if split not in ("test", "train", "all"):
        raise ValueError(f"split must be test, train or all, got {split!r}")
    if data is not None:
        config = config.model_copy(update={"data": config.data.model_copy(update={"source": data})})
    dataset = load_trimodal(config)
    user_file = any(str(s).endswith(".jsonl") for s in _sources(config))
    held_out = config.data.spoken.held_out_voice
    if dataset.held_out_voice and not user_file and len(dataset.held_out_voice) == len(dataset.validation):
        test, speech = dataset.held_out_voice, f"test captions spoken by the held-out voice {held_out}"
    else:
        why = "the sources include a .jsonl" if user_file else "no held-out voice"
        test, speech = dataset.validation, f"the validation split's audio ({why})"
    if split == "train":
        speech = "the training split's audio (seen voices)"
    elif split == "all":
        speech = f"training audio + {speech}"
    items = {"test": test, "train": dataset.train, "all": dataset.train + test}[split]
    return config, items, dataset, speech


def evaluate_trimodal(embedder, data: str | None = None, split: str = "test",
                      ks: Sequence[int] = (1, 5)) -> TriModalMetrics:
    """Recall@K in the six directions (and zero-shot digits on digits) of the embedder's
    tri-modal model on its held-out data; see the module docstring for what is measured."""
    from taichu.imagetext import DIGITS, digit_prompts
    from taichu.trimodal_data import require_speech

    require_speech(embedder.config, embedder.model_dir)
    config, items, dataset, speech = evaluation_items(embedder.config, data, split)
    if not items:
        raise ValueError(f"the {split} split of {dataset.name} has no items")
    ks = sorted({int(k) for k in ks})

    # Groups: the caption, else the item itself.
    group_of_item = [("text", it.text) if it.text is not None else ("key", it.key) for it in items]
    group_ids = {g: i for i, g in enumerate(dict.fromkeys(group_of_item))}
    item_group = np.array([group_ids[g] for g in group_of_item])

    # Units of each modality: one image per item, one entry per distinct caption, one per
    # distinct clip; unit_of[modality][item index] -> unit index.
    with_image = [i for i, it in enumerate(items) if it.image is not None]
    captions = list(dict.fromkeys(it.text for it in items if it.text is not None))
    caption_index = {c: i for i, c in enumerate(captions)}
    clip_keys: dict = {}
    unit_of = {"image": {i: n for n, i in enumerate(with_image)},
               "text": {i: caption_index[it.text] for i, it in enumerate(items) if it.text is not None},
               "speech": {}}
    for i, it in enumerate(items):
        if it.audio is not None:
            key = (hashlib.sha256(np.ascontiguousarray(it.audio).tobytes()).hexdigest(), item_group[i])
            unit_of["speech"][i] = clip_keys.setdefault(key, len(clip_keys))
    first_item: dict = {}
    for i, u in unit_of["speech"].items():
        first_item.setdefault(u, i)
    clip_items = sorted(first_item.items())   # (unit, the first item with that clip)
    embeddings = {
        "image": embedder.embed_images([items[i].image for i in with_image]) if with_image else None,
        "text": embedder.embed_texts(captions) if captions else None,
        "speech": embedder.embed_audio([items[i].audio for _, i in clip_items],
                                       names=[f"{split} item {items[i].key!r}" for _, i in clip_items])
        if clip_items else None,
    }
    unit_group = {m: np.zeros(len(set(unit_of[m].values())), np.int64) for m in unit_of}
    for m, mapping in unit_of.items():
        for i, u in mapping.items():
            unit_group[m][u] = item_group[i]

    values = {"model": str(embedder.model_dir), "backend": embedder.backend, "data": dataset.name,
              "split": split, "fingerprint": dataset.fingerprint, "speech": speech,
              "images": len(with_image), "unique_captions": len(captions), "clips": len(clip_items),
              "ks": ks}
    notes = []
    for query, target in DIRECTIONS:
        both = [i for i, it in enumerate(items)
                if getattr(it, _FIELD[query]) is not None and getattr(it, _FIELD[target]) is not None]
        if not both:
            notes.append(f"{query} -> {target}: no item has both, not measured")
            continue
        q_units = list(dict.fromkeys(unit_of[query][i] for i in both))
        t_units = list(dict.fromkeys(unit_of[target][i] for i in both))
        q_groups, t_groups = unit_group[query][q_units], unit_group[target][t_units]
        similarity = embeddings[query][q_units] @ embeddings[target][t_units].T
        values[direction_name(query, target)] = {
            "queries": len(q_units), "items": len(t_units),
            **{f"R@{k}": recall_at_k(similarity, k, q_groups, t_groups) for k in ks},
            "chance": {f"R@{k}": chance_recall_at_k(k, query_groups=q_groups, item_groups=t_groups)
                       for k in ks}}
    if data is not None and str(data) not in map(str, _sources(embedder.config)):
        notes.append(f"data {data} is not the data the model's config trains on "
                     f"({embedder.config.data.source}); its split applies the config's "
                     "validation_fraction and split_seed to it")
    if notes:
        values["notes"] = notes

    labelled = [n for n, i in enumerate(with_image) if items[i].label is not None]
    if list(map(str, _sources(config))) == [DIGITS] and with_image and len(labelled) == len(with_image):
        prompts = digit_prompts()
        labels = [items[i].label for i in with_image]
        spoken_by = _prompt_voice(config)
        clips = _speak_prompts(config, prompts, spoken_by)
        spoken = embedder.embed_audio(clips, names=[f"spoken prompt {p!r}" for p in prompts])
        image_emb = embeddings["image"]
        values["zero_shot"] = {
            "accuracy": zero_shot_accuracy(image_emb @ embedder.embed_texts(prompts).T, labels),
            "spoken_accuracy": zero_shot_accuracy(image_emb @ spoken.T, labels),
            "chance": 1.0 / len(prompts), "classes": len(prompts), "prompts": prompts,
            "spoken_by": spoken_by}
    return TriModalMetrics(values)


def _sources(config) -> list:
    source = config.data.source
    return [source] if isinstance(source, str) else list(source)


def _prompt_voice(config) -> dict:
    """The voice that speaks the zero-shot prompts: the held-out voice at the middle rate and
    pitch, as it reads the test captions; without one, the first voice (seen in training)."""
    spoken = config.data.spoken
    held_out = spoken.held_out_voice
    return {"voice": held_out or spoken.voices[0], "held_out": bool(held_out),
            "rate": spoken.rates[len(spoken.rates) // 2], "pitch": spoken.pitches[len(spoken.pitches) // 2]}


def _speak_prompts(config, prompts: list[str], voice: dict) -> list[np.ndarray]:
    from taichu.speech import cache_root
    from taichu.trimodal_data import speak_all

    utterances = [(p, voice["voice"], voice["rate"], voice["pitch"]) for p in prompts]
    return speak_all(utterances, cache_root(config.data), what=[f"zero-shot prompt {p!r}" for p in prompts])

"""Training batches of the wav2vec 2.0 family: audio in, every random draw made here.

A batch is the inputs of ``training_loss`` by name: the normalised, zero-padded audio and
its sample mask, then, for pretraining, the masked frames, the distractor indices and the
Gumbel noise; for CTC, the masked frames (SpecAugment-style, ``model.mask_time_prob``) and
the padded label ids. Each row's draws come from its own generator, seeded by (train seed,
step, clip index): a clip's mask, distractors and noise do not depend on which clips share
its batch, how long the batch is padded, or how many data-parallel ranks split it, and both
backends get the same arrays.
"""
from __future__ import annotations

import math

import numpy as np

from taichu.families.wav2vec2 import (SAMPLE_RATE, compute_span_mask, frame_count, gumbel_noise,
                                      receptive_field, sample_negative_indices)

# The key evaluation batches draw with: the same masks and distractors at every evaluation.
EVAL_STEP = -1
LABEL_PAD = -100


def normalise(audio: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the clip (Hugging Face's Wav2Vec2FeatureExtractor with
    do_normalize, eps 1e-7), in float64 then float32."""
    audio = np.asarray(audio, dtype=np.float64)
    return ((audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)).astype(np.float32)


def padded_length(longest: int, pad_to_seconds: float) -> int:
    """``longest`` rounded up to a multiple of pad_to_seconds: few distinct batch shapes, so
    a compiled graph (MindSpore) is built a few times, not once per batch."""
    unit = max(1, int(round(pad_to_seconds * SAMPLE_RATE)))
    return int(math.ceil(longest / unit) * unit)


class SpeechBatches:
    """Batches of clips (taichu.speech.Clip) by index for head ``pretraining`` or ``ctc``."""

    stochastic = True   # batch(indices, step): the draws depend on the step

    def __init__(self, clips, config, seed: int):
        if not clips:
            raise ValueError("no speech clips in this split")
        self.model = config.model
        self.data = config.data
        self.seed = seed
        self.head = self.model.head
        self.max_samples = int(self.data.max_seconds * SAMPLE_RATE)
        shortest = receptive_field(self.model)
        short = [c.source for c in clips if len(c.audio) < shortest]
        if short:
            raise ValueError(f"{len(short)} clip(s) are shorter than the feature encoder's "
                             f"receptive field ({shortest} samples), e.g. {short[0]}")
        self.clips = list(clips)
        if self.head == "ctc":
            from taichu.speech import encode_transcript

            alphabet = self.model.ctc.alphabet
            untranscribed = [c.source for c in self.clips if not c.pinyin]
            if untranscribed:
                raise ValueError(f"CTC training needs transcripts: {len(untranscribed)} clip(s) "
                                 f"have none, e.g. {untranscribed[0]}")
            too_long = [c.source for c in self.clips if len(c.audio) > self.max_samples]
            if too_long:
                raise ValueError(f"{len(too_long)} clip(s) are longer than data.max_seconds "
                                 f"{self.data.max_seconds} (CTC cannot crop a transcribed clip), "
                                 f"e.g. {too_long[0]}")
            self.labels = [encode_transcript(c.pinyin, alphabet) for c in self.clips]
            # Every batch's labels padded to the split's longest (a multiple of 8): one label
            # shape, so a compiled step (MindSpore) is not rebuilt for each batch.
            self.label_width = -(-max(len(ids) for ids in self.labels) // 8) * 8
        # Lengths after cropping: what the bucketing order groups by.
        self.lengths = np.array([min(len(c.audio), self.max_samples) for c in self.clips], np.int64)

    def __len__(self) -> int:
        return len(self.clips)

    def _row_rng(self, step: int | None, index: int) -> np.random.Generator:
        key = EVAL_STEP if step is None else step
        return np.random.default_rng([self.seed, key + 1, index])  # SeedSequence needs >= 0

    def batch(self, indices, step: int | None = None) -> dict[str, np.ndarray]:
        indices = [int(i) for i in indices]
        rngs = [self._row_rng(step, i) for i in indices]
        audio = []
        for i, rng in zip(indices, rngs):
            clip = self.clips[i].audio
            if len(clip) > self.max_samples:  # pretraining only (CTC refused these above)
                start = int(rng.integers(0, len(clip) - self.max_samples + 1))
                clip = clip[start:start + self.max_samples]
            audio.append(normalise(clip))
        length = padded_length(max(len(a) for a in audio), self.data.pad_to_seconds)
        batch = len(indices)
        input_values = np.zeros((batch, length), np.float32)
        attention_mask = np.zeros((batch, length), np.int32)
        for row, a in enumerate(audio):
            input_values[row, :len(a)] = a
            attention_mask[row, :len(a)] = 1
        frames = frame_count(self.model, np.array([len(a) for a in audio]))
        total = frame_count(self.model, length)
        m = self.model
        mask = np.zeros((batch, total), bool)
        for row, rng in enumerate(rngs):
            mask[row] = compute_span_mask(rng, frames[row:row + 1], total, m.mask_time_prob,
                                          m.mask_time_length, m.mask_time_min_masks)[0]
        out = {"input_values": input_values, "attention_mask": attention_mask,
               "mask_time_indices": mask}
        if self.head == "pretraining":
            q = m.quantizer
            width = q.num_codevector_groups * q.num_codevectors_per_group
            negatives = np.zeros((batch, total, q.num_negatives), np.int32)
            noise = np.zeros((batch, total, width), np.float32)
            for row, rng in enumerate(rngs):
                local = sample_negative_indices(rng, mask[row:row + 1], q.num_negatives)[0]
                negatives[row] = local + row * total   # indices into the flattened batch
                noise[row, :frames[row]] = gumbel_noise(rng, (int(frames[row]), width))
            out["sampled_negative_indices"] = negatives
            out["gumbel_noise"] = noise
        else:
            labels = np.full((batch, self.label_width), LABEL_PAD, np.int32)
            for row, i in enumerate(indices):
                labels[row, :len(self.labels[i])] = self.labels[i]
            out["labels"] = labels
        return out

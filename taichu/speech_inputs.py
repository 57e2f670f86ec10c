"""Checks of a speech model's audio inputs, in numpy alone: shared by the models
(taichu.families.wav2vec2.check_inputs) and by the export runtimes (export.runtime), which
run without pydantic or the model code."""
from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16_000


def receptive_field_of(kernels, strides) -> int:
    """Samples the first frame of a conv stack sees: the shortest clip that gives a frame."""
    size = 1
    for kernel, stride in reversed(list(zip(kernels, strides))):
        size = (size - 1) * stride + kernel
    return size


def check_audio_batch(shape, attention_mask, shortest: int, dtype=None) -> np.ndarray:
    """Each row's number of real samples; raises ValueError, with one wording everywhere.

    ``input_values`` is [batch, samples] of a floating dtype (``dtype``: its name, numpy's or
    the framework's, e.g. "float32" or "torch.float32"); ``attention_mask`` (1 = real
    sample) has its shape and is right-padded (ones, then zeros), because frames are
    counted from each row's number of real samples, as Hugging Face does. Every row must be
    at least ``shortest`` samples (the receptive field): shorter, the feature encoder gives
    it no frame at all.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 2:
        raise ValueError(f"input_values must be [batch, samples] (16 kHz mono audio), got shape {shape}")
    if shape[0] == 0:
        raise ValueError("input_values has an empty batch")
    if dtype is not None and "float" not in str(dtype):
        raise ValueError(f"input_values must be floating point (normalised audio), got {dtype}")
    if attention_mask is None:
        lengths = np.full(shape[0], shape[1], dtype=np.int64)
    else:
        attention_mask = np.asarray(attention_mask)
        if tuple(attention_mask.shape) != shape:
            raise ValueError(f"attention_mask must have the shape of input_values {shape}, "
                             f"got {tuple(attention_mask.shape)}")
        if attention_mask.dtype != np.bool_ and not np.issubdtype(attention_mask.dtype, np.integer):
            raise ValueError(f"attention_mask must hold integers (1 = real sample, 0 = padding), "
                             f"got {attention_mask.dtype}")
        mask = attention_mask != 0
        lengths = mask.sum(axis=1)
        right_padded = mask == (np.arange(shape[1])[None, :] < lengths[:, None])
        if not right_padded.all():
            row = int(np.flatnonzero(~right_padded.all(axis=1))[0])
            raise ValueError(f"attention_mask row {row} is not right-padded (ones, then zeros): "
                             "frames are counted from each row's number of real samples")
    if lengths.min() < shortest:
        row = int(np.argmin(lengths))
        raise ValueError(f"input row {row} has {int(lengths[row])} real samples; the feature encoder needs "
                         f"at least {shortest} samples ({1000 * shortest / SAMPLE_RATE:.1f} ms at "
                         f"{SAMPLE_RATE} Hz) to make one frame")
    return lengths

"""Codecs: canonical names (taichu.families tensor specs) <-> one foreign format's names.

``Codec`` is the identity (our directories, PyTorch state dicts); ``StepCodec`` is a format
described by a table of reversible ``Step`` rules; ``HFFamily`` says how one of our
families is a Hugging Face model (its config.json both ways and its codec).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from taichu.config import ConfigError
from taichu.convert.safetensors_io import FLOAT_DTYPES, Tensors
from taichu.families import get_family
from taichu.weights import CheckpointError, check_tensors

HF_CONFIG = "config.json"
COUNTER_DTYPES = ("int64", "int32")


class Codec:
    """Canonical names <-> one format's names, for one config. Identity by default."""

    def __init__(self, config):
        self.config = config
        self.specs = get_family(config.family).tensor_specs(config)

    def expected(self) -> dict[str, tuple[int, ...]]:
        return {k: s.shape for k, s in self.specs.items()}

    def harmless(self) -> set[str]:
        """Names a file of this format may carry beyond the weights (never a pattern)."""
        return set()

    def adapt(self, tensors: Tensors) -> Tensors:
        """A file of this format whose names are spelt another known way, in the usual ones."""
        return tensors

    def to_canonical(self, tensors: Tensors) -> Tensors:
        return tensors

    def from_canonical(self, tensors: Tensors) -> Tensors:
        return tensors

    def check(self, tensors: Tensors, source: str) -> None:
        found = {k: v for k, v in tensors.shapes.items() if k not in self.harmless()}
        check_tensors(found, self.expected(), source)
        # One-element integer tensors are counters (BriVL's queue_ptr, num_updates), not weights.
        expected = self.expected()
        wrong = {k: tensors.dtypes[k] for k in found if tensors.dtypes[k] not in FLOAT_DTYPES
                 and not (tensors.dtypes[k] in COUNTER_DTYPES and tuple(expected.get(k, ())) == (1,))}
        if wrong:
            raise CheckpointError(f"{source}: weights must be floating point, got {wrong}")


@dataclass(frozen=True)
class Step:
    """One reversible rule: canonical tensors ``ours`` <-> the foreign tensor ``theirs``.

    Forward (ours -> theirs): transpose each (HF Conv1D stores [in, out], nn.Linear
    [out, in]), then concatenate along ``axis`` when several (fused qkv). The reverse
    splits into equal parts and transposes back. ``{i}`` is the layer index.
    """
    ours: tuple[str, ...]
    theirs: str
    transpose: bool = False
    axis: int = 0

    def layer(self, i: int) -> "Step":
        return Step(tuple(n.format(i=i) for n in self.ours), self.theirs.format(i=i), self.transpose,
                    self.axis)

    def forward(self, arrays: list[np.ndarray]) -> np.ndarray:
        parts = [a.T if self.transpose else a for a in arrays]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=self.axis)

    def forward_shape(self, shapes: list[tuple]) -> tuple[int, ...]:
        parts = [tuple(reversed(s)) if self.transpose else tuple(s) for s in shapes]
        if len(parts) == 1:  # nothing to concatenate; also the 0-d case (CLIP's logit_scale)
            return parts[0]
        out = list(parts[0])
        out[self.axis] = sum(p[self.axis] for p in parts)
        return tuple(out)

    def backward(self, array: np.ndarray, index: int) -> np.ndarray:
        part = np.split(array, len(self.ours), axis=self.axis)[index] if len(self.ours) > 1 else array
        return part.T if self.transpose else part


def rename(ours: str, theirs: str) -> Step:
    return Step((ours,), theirs)


def conv1d(ours: str, theirs: str) -> Step:
    return Step((ours,), theirs, transpose=True)


class StepCodec(Codec):
    """A format described by a table of reversible Steps (one per foreign tensor); both
    directions come from the same table."""

    def __init__(self, config):
        super().__init__(config)
        self.steps = self.build_steps()
        self.by_ours = {name: (step, j) for step in self.steps for j, name in enumerate(step.ours)}

    def build_steps(self) -> list[Step]:
        raise NotImplementedError

    def expected(self) -> dict[str, tuple[int, ...]]:
        shapes = super().expected()
        return {s.theirs: s.forward_shape([shapes[n] for n in s.ours]) for s in self.steps}

    def to_canonical(self, tensors: Tensors) -> Tensors:
        shapes = super().expected()
        return Tensors(shapes, {k: tensors.dtypes[self.by_ours[k][0].theirs] for k in shapes},
                       lambda k: self.by_ours[k][0].backward(tensors.read(self.by_ours[k][0].theirs),
                                                             self.by_ours[k][1]))

    def from_canonical(self, tensors: Tensors) -> Tensors:
        steps = {s.theirs: s for s in self.steps}
        dtypes = {}
        for s in self.steps:
            kinds = {tensors.dtypes[n] for n in s.ours}
            if len(kinds) > 1:
                raise CheckpointError(f"{s.theirs}: cannot fuse {s.ours} of dtypes {sorted(kinds)}")
            dtypes[s.theirs] = kinds.pop()
        return Tensors(self.expected(), dtypes,
                       lambda n: steps[n].forward([tensors.read(o) for o in steps[n].ours]))


def refuse(source: str, why: str) -> ConfigError:
    return ConfigError(f"{source}: {why}")


@dataclass(frozen=True)
class HFFamily:
    """How one of our families is a Hugging Face model: config.json both ways and the
    tensor codec. ``from_hf`` returns our raw (unvalidated) config."""
    model_type: str
    architecture: str
    codec: type
    from_hf: Callable[[dict, str], dict]
    to_hf: Callable[[object], dict]
    notes: Callable[[dict], list[str]] = lambda hf: []

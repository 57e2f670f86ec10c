"""Weight names and files, on numpy + safetensors only.

Canonical names are the PyTorch state_dict names. A MindSpore cell has the same
attribute path; only the leaf differs, and that difference depends on the layer type
alone. It is written once, here, and used by mindspore_impl and by file conversion.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Mapping

import numpy as np

from taichu.fileio import atomic_write_bytes

# layer kind -> {canonical leaf: MindSpore leaf}
MINDSPORE_LEAF_RENAMES: dict[str, dict[str, str]] = {
    "layer_norm": {"weight": "gamma", "bias": "beta"},
    "group_norm": {"weight": "gamma", "bias": "beta"},
    "embedding": {"weight": "embedding_table"},
    "batch_norm": {"weight": "gamma", "bias": "beta",
                   "running_mean": "moving_mean", "running_var": "moving_variance"},
}

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


class CheckpointError(ValueError):
    """A weights file that is corrupt, truncated, or does not match its config."""


def to_mindspore_name(name: str, kind: str) -> str:
    prefix, _, leaf = name.rpartition(".")
    leaf = MINDSPORE_LEAF_RENAMES.get(kind, {}).get(leaf, leaf)
    return f"{prefix}.{leaf}" if prefix else leaf


def from_mindspore_name(name: str, kind: str) -> str:
    prefix, _, leaf = name.rpartition(".")
    reverse = {ms: canonical for canonical, ms in MINDSPORE_LEAF_RENAMES.get(kind, {}).items()}
    leaf = reverse.get(leaf, leaf)
    return f"{prefix}.{leaf}" if prefix else leaf


def to_mindspore_array(array: np.ndarray, kind: str) -> np.ndarray:
    # MindSpore's Conv1d is a Conv2d over a height of 1: weight [out, in, 1, k].
    if kind == "conv1d" and array.ndim == 3:
        return array[:, :, None, :]
    return array


def from_mindspore_array(array: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv1d" and array.ndim == 4:
        return array[:, :, 0, :]
    return array


def contiguous(array: np.ndarray) -> np.ndarray:
    """C-contiguous ``array`` of the same shape (np.ascontiguousarray makes a 0-d array 1-d)."""
    return array if array.flags.c_contiguous else array.copy(order="C")


def check_tensors(found: Mapping[str, tuple], expected: Mapping[str, tuple], source: str) -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped tensors.

    ``found`` and ``expected`` map names to shapes. An unexpected name is shown with the
    closest missing name, which is usually the renamed tensor the user meant.
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = sorted(name for name in set(found) & set(expected)
                       if tuple(found[name]) != tuple(expected[name]))
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{source}: the tensors do not match the config "
             f"({len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} mis-shaped)"]
    for name in missing:
        lines.append(f"  missing:     {name} {tuple(expected[name])}")
    for name in unexpected:
        close = difflib.get_close_matches(name, missing, n=1)
        hint = f" (closest expected name: {close[0]})" if close else ""
        lines.append(f"  unexpected:  {name} {tuple(found[name])}{hint}")
    for name in misshaped:
        lines.append(f"  mis-shaped:  {name} has {tuple(found[name])}, "
                     f"config expects {tuple(expected[name])}")
    raise CheckpointError("\n".join(lines))


def _shard_groups(tensors: Mapping[str, np.ndarray], max_shard_bytes: int) -> list[list[str]]:
    groups, current, size = [], [], 0
    for name, array in tensors.items():
        if current and size + array.nbytes > max_shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += array.nbytes
    if current:
        groups.append(current)
    return groups


def save_safetensors(tensors: Mapping[str, np.ndarray], directory: str | Path,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """Write ``model.safetensors``, or shards plus an index (HF layout) when too large."""
    from safetensors.numpy import save

    directory = Path(directory)
    groups = _shard_groups(tensors, max_shard_bytes)
    metadata = {"format": "np", "writer": "taichu"}
    if len(groups) <= 1:
        path = directory / SAFETENSORS_FILE
        data = save({k: contiguous(v) for k, v in tensors.items()}, metadata=metadata)
        atomic_write_bytes(path, data)
        return [path]
    written, weight_map = [], {}
    for i, names in enumerate(groups, start=1):
        shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        data = save({k: contiguous(tensors[k]) for k in names}, metadata=metadata)
        atomic_write_bytes(directory / shard, data)
        written.append(directory / shard)
        weight_map.update({name: shard for name in names})
    total = sum(int(a.nbytes) for a in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write_bytes(directory / SAFETENSORS_INDEX, json.dumps(index, indent=2).encode())
    return written + [directory / SAFETENSORS_INDEX]


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a file, a single-file directory or a sharded directory."""
    if path.is_file():
        return [path]
    if (path / SAFETENSORS_INDEX).is_file():
        try:
            index = json.loads((path / SAFETENSORS_INDEX).read_text())
            shards = sorted(set(index["weight_map"].values()))
        except (ValueError, KeyError, AttributeError, TypeError) as err:
            raise CheckpointError(f"{path / SAFETENSORS_INDEX}: not a valid index: {err}") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{path}: shards named in the index are missing: {missing}")
        return [path / s for s in shards]
    if (path / SAFETENSORS_FILE).is_file():
        return [path / SAFETENSORS_FILE]
    raise CheckpointError(f"{path}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}")


def read_safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes from the headers only; also refuses corrupt or truncated files."""
    from safetensors import SafetensorError, safe_open

    shapes = {}
    for file in weight_files(Path(path)):
        try:
            with safe_open(file, framework="numpy") as handle:
                for name in handle.keys():
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except SafetensorError as err:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({err})") from None
    return shapes


def load_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a file or model directory (single file or sharded)."""
    from safetensors import SafetensorError, safe_open

    tensors = {}
    for file in weight_files(Path(path)):
        try:
            with safe_open(file, framework="numpy") as handle:
                for name in handle.keys():
                    tensors[name] = handle.get_tensor(name)
        except SafetensorError as err:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({err})") from None
    return tensors


def load(path, config=None, allow_pickle: bool = False, dtype=None):
    """(config, canonical arrays) from any supported format (see taichu.convert)."""
    from taichu.convert import load as load_any

    return load_any(path, config=config, allow_pickle=allow_pickle, dtype=dtype)


def save(config, arrays, path, format: str = "taichu", dtype=None, **kwargs):
    """Write canonical arrays as ``format``: taichu | mindspore | torch | hf."""
    from taichu.convert import save as save_any

    return save_any(config, arrays, path, format=format, dtype=dtype, **kwargs)

"""Named tensors read lazily (the unit of streaming), their dtypes, and safetensors files
read and written byte for byte with numpy alone (plus ml_dtypes for bfloat16)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from taichu.fileio import atomic_write, atomic_write_bytes
from taichu.weights import (DEFAULT_MAX_SHARD_BYTES, SAFETENSORS_FILE, SAFETENSORS_INDEX, CheckpointError, contiguous,
                            weight_files)

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")

# ----------------------------------------------------------------------------- dtypes

# numpy dtype name -> (safetensors name, MindSpore name, item size)
DTYPE_TABLE = {
    "float64": ("F64", "Float64", 8), "float32": ("F32", "Float32", 4),
    "float16": ("F16", "Float16", 2), "bfloat16": ("BF16", "BFloat16", 2),
    "int64": ("I64", "Int64", 8), "int32": ("I32", "Int32", 4), "int16": ("I16", "Int16", 2),
    "int8": ("I8", "Int8", 1), "uint64": ("U64", "UInt64", 8), "uint32": ("U32", "UInt32", 4),
    "uint16": ("U16", "UInt16", 2), "uint8": ("U8", "UInt8", 1), "bool": ("BOOL", "Bool", 1),
}
FROM_SAFETENSORS = {st: name for name, (st, _, _) in DTYPE_TABLE.items()}
FROM_MINDSPORE = {ms: name for name, (_, ms, _) in DTYPE_TABLE.items()}


def np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:  # numpy has no bfloat16 of its own
            raise CheckpointError("bfloat16 tensors need the ml_dtypes package "
                                  "(pip install 'ml_dtypes>=0.5.4,<0.6')") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def nbytes(shape: Iterable[int], dtype: str) -> int:
    return math.prod(shape) * DTYPE_TABLE[dtype][2]


def frombuffer(buffer, dtype: str, shape) -> np.ndarray:
    return np.frombuffer(buffer, dtype=np_dtype(dtype)).reshape(shape)


# ----------------------------------------------------------------------------- lazy tensors

@dataclass
class Tensors:
    """Named tensors whose shapes and dtypes are known up front and whose data is read
    one tensor at a time: the unit of streaming."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]                 # numpy dtype names: "float32", "bfloat16", ...
    read: Callable[[str], np.ndarray]

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "Tensors":
        arrays = dict(arrays)
        return cls({k: tuple(v.shape) for k, v in arrays.items()},
                   {k: np.dtype(v.dtype).name for k, v in arrays.items()}, arrays.__getitem__)

    def cast(self, dtype: str | None) -> "Tensors":
        """Floating tensors as ``dtype`` (None keeps each tensor's own dtype)."""
        if dtype is None:
            return self
        target = np_dtype(dtype)
        dtypes = {k: dtype if d in FLOAT_DTYPES else d for k, d in self.dtypes.items()}
        return Tensors(self.shapes, dtypes, lambda name: (
            self.read(name).astype(target, copy=False) if self.dtypes[name] in FLOAT_DTYPES
            else self.read(name)))

    def nbytes(self, name: str) -> int:
        return nbytes(self.shapes[name], self.dtypes[name])


# ----------------------------------------------------------------------------- safetensors

def _safetensors_header(file: Path) -> tuple[dict, dict, int]:
    """(entries, metadata, data start) of one file, refusing anything truncated or corrupt.

    The same checks as the safetensors library: offsets must tile the data exactly, and
    the data must end where the file ends.
    """
    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{file}: corrupt or truncated safetensors file ({why})")

    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise corrupt(f"{size} bytes, shorter than the 8-byte header length")
        length = int.from_bytes(head, "little")
        if length > size - 8:
            raise corrupt(f"header of {length} bytes, but the file has {size} bytes")
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError) as err:
            raise corrupt(f"header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    entries, spans = {}, []
    for name, entry in header.items():
        try:
            dtype = FROM_SAFETENSORS[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"bad header entry for {name}: {entry}") from None
        if end - begin != nbytes(shape, dtype) or begin < 0:
            raise corrupt(f"{name}: offsets {begin}..{end} do not hold {dtype} {shape}")
        entries[name] = (dtype, shape, begin)
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise corrupt(f"{name} starts at {begin}, expected {position}")
        position = end
    if 8 + length + position != size:
        raise corrupt(f"the tensors need {8 + length + position} bytes, the file has {size}")
    return entries, metadata, 8 + length


def read_safetensors(path: str | Path) -> tuple[Tensors, dict]:
    """Lazy tensors and metadata of a safetensors file or (sharded) directory; bf16 included."""
    where, shapes, dtypes, metadata = {}, {}, {}, {}
    for file in weight_files(Path(path)):
        entries, meta, start = _safetensors_header(file)
        metadata.update(meta)
        for name, (dtype, shape, begin) in entries.items():
            if name in where:
                raise CheckpointError(f"{path}: tensor {name} is in two shards")
            where[name] = (file, start + begin)
            shapes[name], dtypes[name] = shape, dtype

    def read(name: str) -> np.ndarray:
        file, offset = where[name]
        buffer = bytearray(nbytes(shapes[name], dtypes[name]))
        with open(file, "rb") as handle:
            handle.seek(offset)
            if handle.readinto(buffer) != len(buffer):
                raise CheckpointError(f"{file}: truncated while reading {name}")
        return frombuffer(buffer, dtypes[name], shapes[name])

    return Tensors(shapes, dtypes, read), metadata


def write_safetensors_file(path: Path, tensors: Tensors, names: list[str], metadata: dict) -> None:
    """Header first (every shape and dtype is known), then the tensors one at a time."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name in names:
        size = tensors.nbytes(name)
        header[name] = {"dtype": DTYPE_TABLE[tensors.dtypes[name]][0],
                        "shape": list(tensors.shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the library writes it

    def write(handle) -> None:
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        for name in names:
            handle.write(checked_bytes(tensors, name))

    atomic_write(path, write)


def checked_bytes(tensors: Tensors, name: str) -> np.ndarray:
    array = contiguous(tensors.read(name))
    if tuple(array.shape) != tensors.shapes[name] or array.dtype.name != tensors.dtypes[name]:
        raise CheckpointError(f"{name}: produced {array.dtype.name} {array.shape}, "
                              f"planned {tensors.dtypes[name]} {tensors.shapes[name]}")
    return array.reshape(-1).view(np.uint8)


def write_safetensors(tensors: Tensors, directory: str | Path, metadata: dict,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """``model.safetensors``, or shards of at most ``max_shard_bytes`` plus the HF index.

    Stale weight files of an earlier save in ``directory`` are removed.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stale = set(directory.glob("model*.safetensors")) | set(directory.glob(SAFETENSORS_INDEX))
    groups, current, size = [], [], 0
    for name in tensors.shapes:
        if current and size + tensors.nbytes(name) > max_shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += tensors.nbytes(name)
    groups.append(current)
    if len(groups) == 1:
        written = [directory / SAFETENSORS_FILE]
        write_safetensors_file(written[0], tensors, groups[0], metadata)
    else:
        written, weight_map = [], {}
        for i, names in enumerate(groups, start=1):
            shard = directory / f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            write_safetensors_file(shard, tensors, names, metadata)
            written.append(shard)
            weight_map.update({name: shard.name for name in names})
        total = sum(tensors.nbytes(name) for name in tensors.shapes)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        written.append(directory / SAFETENSORS_INDEX)
        atomic_write_bytes(written[-1], json.dumps(index, indent=2).encode())
    for old in stale - set(written):
        old.unlink()
    return written


def is_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length (never near 2**32), then the JSON header.
    return len(head) >= 9 and head[4:8] == b"\0\0\0\0" and head[8:9] == b"{"

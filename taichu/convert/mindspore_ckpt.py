"""MindSpore's formats: ``.ckpt`` files read and written byte for byte (no MindSpore
import), and the codec between canonical names and MindSpore leaf names."""
from __future__ import annotations

import mmap
import zlib
from pathlib import Path

import numpy as np

from taichu.convert.codec import Codec
from taichu.convert.safetensors_io import (DTYPE_TABLE, FROM_MINDSPORE, Tensors, checked_bytes, frombuffer,
                                           nbytes)
from taichu.fileio import atomic_write
from taichu.weights import CheckpointError, from_mindspore_array, to_mindspore_array, to_mindspore_name

# ----------------------------------------------------------------------------- MindSpore .ckpt
# The file is protobuf (mindspore/train/checkpoint.proto):
#   message Checkpoint { repeated Value value = 1; }
#   message Value { required string tag = 1; oneof { TensorProto tensor = 2; MapTensorProto maptensor = 3; } }
#   message TensorProto { repeated int64 dims = 1; required string tensor_type = 2; required bytes tensor_content = 3; }
# mindspore.save_checkpoint writes one Checkpoint message per tensor, back to back (which
# protobuf reads as one message), splits tensors over 512 MiB into several Values with the
# same tag whose contents concatenate, and with crc_check=True appends b"crc_num" + the
# CRC32 of everything before it as 10 big-endian bytes. append_dict entries are Values too
# (scalars with no dims; strings with tensor_type "str").

_CKPT_SLICE_BYTES = 512 * 1024 * 1024
_CRC_MARK = b"crc_num"


def _varint(buffer, pos: int, end: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= end:
            raise IndexError("varint runs past the end")
        byte = buffer[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(buffer, pos: int, end: int):
    """(field number, wire type, value) of one protobuf message; LEN values as (start, stop)."""
    while pos < end:
        key, pos = _varint(buffer, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buffer, pos, end)
        elif wire == 2:
            length, pos = _varint(buffer, pos, end)
            if pos + length > end:
                raise IndexError(f"field {field} of {length} bytes runs past the end")
            value, pos = (pos, pos + length), pos + length
        elif wire in (1, 5):
            value, pos = None, pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise IndexError("field runs past the end")
        yield field, wire, value


def read_ckpt(path: str | Path) -> tuple[Tensors, dict]:
    """Lazy tensors of a MindSpore .ckpt, and its string entries (append_dict)."""
    path = Path(path)
    # The map is only walked for the protobuf framing (tags, dims, offsets) and closed
    # before any tensor is read: pages of tensor data touched through it would stay
    # resident, and converting would then hold the whole file in memory.
    with open(path, "rb") as handle:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: empty file")
        data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    end = len(data)
    if end >= 17 and data[end - 17:end - 10] == _CRC_MARK:
        end -= 17
        stored = int.from_bytes(data[end + 7:], "big")
        crc, remaining = 0, end
        with open(path, "rb") as handle:
            while remaining:
                block = handle.read(min(remaining, 64 << 20))
                crc, remaining = zlib.crc32(block, crc), remaining - len(block)
        if crc != stored:
            raise CheckpointError(f"{path}: CRC32 check failed: the checkpoint is corrupt")
    chunks: dict[str, list[tuple[int, int]]] = {}
    shapes, dtypes, strings = {}, {}, {}
    previous = None
    try:
        for field, wire, span in _fields(data, 0, end):
            if field != 1 or wire != 2:
                raise ValueError(f"unexpected top-level field {field}")
            tag, tensor = None, None
            for vfield, vwire, value in _fields(data, *span):
                if vfield == 1 and vwire == 2:
                    tag = bytes(data[value[0]:value[1]]).decode("utf-8")
                elif vfield == 2 and vwire == 2:
                    tensor = value
                elif vfield == 3:
                    raise CheckpointError(f"{path}: {tag or 'an entry'} is a MindSpore MapParameter, "
                                          "which cannot be converted")
            if tag is None or tensor is None:
                raise ValueError("an entry without a tag or a tensor")
            dims, type_name, content = [], None, None
            for tfield, twire, value in _fields(data, *tensor):
                if tfield == 1 and twire == 0:
                    dims.append(value)
                elif tfield == 1 and twire == 2:  # packed dims, as other writers may emit
                    pos = value[0]
                    while pos < value[1]:
                        dim, pos = _varint(data, pos, value[1])
                        dims.append(dim)
                elif tfield == 2 and twire == 2:
                    type_name = bytes(data[value[0]:value[1]]).decode("utf-8")
                elif tfield == 3 and twire == 2:
                    content = value
            if type_name is None or content is None:
                raise ValueError(f"{tag}: a tensor without tensor_type or tensor_content")
            if type_name == "str":
                strings[tag] = bytes(data[content[0]:content[1]]).decode("utf-32-le").rstrip("\0")
                continue
            if type_name not in FROM_MINDSPORE:
                raise CheckpointError(f"{path}: {tag} has tensor_type {type_name!r}, which is not "
                                      f"supported (known: {', '.join(FROM_MINDSPORE)})")
            if tag in chunks and previous != tag:
                raise ValueError(f"tensor {tag} appears twice")
            chunks.setdefault(tag, []).append(content)
            shapes[tag], dtypes[tag] = tuple(dims), FROM_MINDSPORE[type_name]
            previous = tag
    except (IndexError, ValueError, UnicodeDecodeError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not a readable MindSpore checkpoint (truncated, "
                              f"encrypted or not a .ckpt): {err}") from None
    finally:
        data.close()
    for tag, parts in chunks.items():
        stored, needed = sum(b - a for a, b in parts), nbytes(shapes[tag], dtypes[tag])
        if stored != needed:
            raise CheckpointError(f"{path}: {tag} holds {stored} bytes, but {dtypes[tag]} "
                                  f"{shapes[tag]} needs {needed} (truncated or corrupt)")

    def read(name: str) -> np.ndarray:
        # One buffer per tensor, filled in place from the file (no intermediate copies).
        buffer = bytearray(nbytes(shapes[name], dtypes[name]))
        view, filled = memoryview(buffer), 0
        with open(path, "rb") as handle:
            for a, b in chunks[name]:
                handle.seek(a)
                if handle.readinto(view[filled:filled + b - a]) != b - a:
                    raise CheckpointError(f"{path}: truncated while reading {name}")
                filled += b - a
        return frombuffer(buffer, dtypes[name], shapes[name])

    return Tensors(shapes, dtypes, read), strings


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(field: int, length: int) -> bytes:
    return _encode_varint(field << 3 | 2) + _encode_varint(length)


def write_ckpt(tensors: Tensors, path: str | Path, slice_bytes: int = _CKPT_SLICE_BYTES) -> None:
    """A .ckpt that mindspore.load_checkpoint reads, written one tensor at a time.

    Like MindSpore, a tensor larger than ``slice_bytes`` is written as several entries with
    the same tag (protobuf messages are limited to 2 GB)."""
    def write(handle) -> None:
        for name in tensors.shapes:
            array = checked_bytes(tensors, name)
            tag = name.encode()
            dims = b"".join(b"\x08" + _encode_varint(d) for d in tensors.shapes[name])
            type_name = DTYPE_TABLE[tensors.dtypes[name]][1].encode()
            for start in range(0, max(len(array), 1), slice_bytes):
                content = array[start:start + slice_bytes]
                proto_head = dims + _len_field(2, len(type_name)) + type_name + _len_field(3, len(content))
                proto_len = len(proto_head) + len(content)
                value_head = _len_field(1, len(tag)) + tag + _len_field(2, proto_len)
                value_len = len(value_head) + proto_len
                handle.write(_len_field(1, value_len) + value_head + proto_head)
                handle.write(content)

    atomic_write(Path(path), write)


def is_ckpt(head: bytes) -> bool:
    if head[:1] != b"\x0a":
        return False
    try:
        _, pos = _varint(head, 1, len(head))
    except (IndexError, ValueError):
        return False
    return head[pos:pos + 1] == b"\x0a"  # a Value starts with its tag


MINDSPORE_LEAVES = (".gamma", ".beta", ".embedding_table", ".moving_mean", ".moving_variance")


class MindSporeCodec(Codec):
    """MindSpore leaf names and layouts, derived from each tensor's layer kind."""

    # mindspore.train.callback.ModelCheckpoint appends these scalars to every checkpoint.
    HARMLESS = {"epoch_num", "step_num"}

    def _names(self) -> dict[str, str]:
        return {k: to_mindspore_name(k, s.kind) for k, s in self.specs.items()}

    def expected(self) -> dict[str, tuple[int, ...]]:
        return {self._names()[k]: to_mindspore_array(np.broadcast_to(np.uint8(0), s.shape), s.kind).shape
                for k, s in self.specs.items()}

    def harmless(self) -> set[str]:
        return self.HARMLESS

    def to_canonical(self, tensors: Tensors) -> Tensors:
        names = self._names()
        shapes = {k: s.shape for k, s in self.specs.items()}
        return Tensors(shapes, {k: tensors.dtypes[names[k]] for k in shapes},
                       lambda k: from_mindspore_array(tensors.read(names[k]), self.specs[k].kind))

    def from_canonical(self, tensors: Tensors) -> Tensors:
        names = self._names()
        back = {v: k for k, v in names.items()}
        shapes = self.expected()
        return Tensors(shapes, {n: tensors.dtypes[back[n]] for n in shapes},
                       lambda n: to_mindspore_array(tensors.read(back[n]), self.specs[back[n]].kind))

"""Weight conversion: our model directories <-> MindSpore <-> PyTorch <-> Hugging Face.

Built on numpy alone (plus ml_dtypes for bfloat16): safetensors and MindSpore ``.ckpt``
files are read and written here byte for byte, so converting needs neither framework.

Every format is a *codec* between canonical names (taichu.families tensor specs) and the
format's own names. A conversion reads the source's headers, checks every tensor against
the config in the source's own names (missing / unexpected / mis-shaped, with the closest
name), then streams: one tensor is read, converted and written at a time, into output
shards of bounded size. Nothing is ever held twice in memory.

Formats:
  taichu     our model directory: config.yaml + model.safetensors (+ index when sharded)
  mindspore  a MindSpore .ckpt, or a MindSpore-written .safetensors (MindSpore leaf names)
  torch      a PyTorch state_dict: .safetensors, or .pt/.bin pickles with allow_pickle
  hf         a Hugging Face directory (config.json + model.safetensors; pytorch_model.bin
             with allow_pickle): GPT2LMHeadModel for the gpt family, CLIPModel for clip
             (HF_FAMILIES: config.json mapping and tensor codec per family)
"""
from __future__ import annotations

import json
import math
import mmap
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from taichu.config import ConfigError, apply_overrides, config_to_dict, dump_config, load_config, validate_config
from taichu.families import get_family
from taichu.fileio import atomic_write, atomic_write_bytes
from taichu.weights import (DEFAULT_MAX_SHARD_BYTES, SAFETENSORS_FILE, SAFETENSORS_INDEX,
                            CheckpointError, check_tensors, contiguous, from_mindspore_array, to_mindspore_array,
                            to_mindspore_name, weight_files)

FORMATS = ("taichu", "mindspore", "torch", "hf")
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
TOKENIZER_FILE = "tokenizer.model"
HF_CONFIG = "config.json"
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")

# ----------------------------------------------------------------------------- dtypes

# numpy dtype name -> (safetensors name, MindSpore name, item size)
_DTYPE_TABLE = {
    "float64": ("F64", "Float64", 8), "float32": ("F32", "Float32", 4),
    "float16": ("F16", "Float16", 2), "bfloat16": ("BF16", "BFloat16", 2),
    "int64": ("I64", "Int64", 8), "int32": ("I32", "Int32", 4), "int16": ("I16", "Int16", 2),
    "int8": ("I8", "Int8", 1), "uint64": ("U64", "UInt64", 8), "uint32": ("U32", "UInt32", 4),
    "uint16": ("U16", "UInt16", 2), "uint8": ("U8", "UInt8", 1), "bool": ("BOOL", "Bool", 1),
}
_FROM_SAFETENSORS = {st: name for name, (st, _, _) in _DTYPE_TABLE.items()}
_FROM_MINDSPORE = {ms: name for name, (_, ms, _) in _DTYPE_TABLE.items()}


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:  # numpy has no bfloat16 of its own
            raise CheckpointError("bfloat16 tensors need the ml_dtypes package "
                                  "(pip install 'ml_dtypes>=0.5.4,<0.6')") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _nbytes(shape: Iterable[int], dtype: str) -> int:
    return math.prod(shape) * _DTYPE_TABLE[dtype][2]


def _frombuffer(buffer, dtype: str, shape) -> np.ndarray:
    return np.frombuffer(buffer, dtype=_np_dtype(dtype)).reshape(shape)


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
        target = _np_dtype(dtype)
        dtypes = {k: dtype if d in FLOAT_DTYPES else d for k, d in self.dtypes.items()}
        return Tensors(self.shapes, dtypes, lambda name: (
            self.read(name).astype(target, copy=False) if self.dtypes[name] in FLOAT_DTYPES
            else self.read(name)))

    def nbytes(self, name: str) -> int:
        return _nbytes(self.shapes[name], self.dtypes[name])


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
            dtype = _FROM_SAFETENSORS[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"bad header entry for {name}: {entry}") from None
        if end - begin != _nbytes(shape, dtype) or begin < 0:
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
        buffer = bytearray(_nbytes(shapes[name], dtypes[name]))
        with open(file, "rb") as handle:
            handle.seek(offset)
            if handle.readinto(buffer) != len(buffer):
                raise CheckpointError(f"{file}: truncated while reading {name}")
        return _frombuffer(buffer, dtypes[name], shapes[name])

    return Tensors(shapes, dtypes, read), metadata


def _write_safetensors_file(path: Path, tensors: Tensors, names: list[str], metadata: dict) -> None:
    """Header first (every shape and dtype is known), then the tensors one at a time."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name in names:
        size = tensors.nbytes(name)
        header[name] = {"dtype": _DTYPE_TABLE[tensors.dtypes[name]][0],
                        "shape": list(tensors.shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the library writes it

    def write(handle) -> None:
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        for name in names:
            handle.write(_checked_bytes(tensors, name))

    atomic_write(path, write)


def _checked_bytes(tensors: Tensors, name: str) -> np.ndarray:
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
        _write_safetensors_file(written[0], tensors, groups[0], metadata)
    else:
        written, weight_map = [], {}
        for i, names in enumerate(groups, start=1):
            shard = directory / f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            _write_safetensors_file(shard, tensors, names, metadata)
            written.append(shard)
            weight_map.update({name: shard.name for name in names})
        total = sum(tensors.nbytes(name) for name in tensors.shapes)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        written.append(directory / SAFETENSORS_INDEX)
        atomic_write_bytes(written[-1], json.dumps(index, indent=2).encode())
    for old in stale - set(written):
        old.unlink()
    return written


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
            if type_name not in _FROM_MINDSPORE:
                raise CheckpointError(f"{path}: {tag} has tensor_type {type_name!r}, which is not "
                                      f"supported (known: {', '.join(_FROM_MINDSPORE)})")
            if tag in chunks and previous != tag:
                raise ValueError(f"tensor {tag} appears twice")
            chunks.setdefault(tag, []).append(content)
            shapes[tag], dtypes[tag] = tuple(dims), _FROM_MINDSPORE[type_name]
            previous = tag
    except (IndexError, ValueError, UnicodeDecodeError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not a readable MindSpore checkpoint (truncated, "
                              f"encrypted or not a .ckpt): {err}") from None
    finally:
        data.close()
    for tag, parts in chunks.items():
        stored, needed = sum(b - a for a, b in parts), _nbytes(shapes[tag], dtypes[tag])
        if stored != needed:
            raise CheckpointError(f"{path}: {tag} holds {stored} bytes, but {dtypes[tag]} "
                                  f"{shapes[tag]} needs {needed} (truncated or corrupt)")

    def read(name: str) -> np.ndarray:
        # One buffer per tensor, filled in place from the file (no intermediate copies).
        buffer = bytearray(_nbytes(shapes[name], dtypes[name]))
        view, filled = memoryview(buffer), 0
        with open(path, "rb") as handle:
            for a, b in chunks[name]:
                handle.seek(a)
                if handle.readinto(view[filled:filled + b - a]) != b - a:
                    raise CheckpointError(f"{path}: truncated while reading {name}")
                filled += b - a
        return _frombuffer(buffer, dtypes[name], shapes[name])

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
            array = _checked_bytes(tensors, name)
            tag = name.encode()
            dims = b"".join(b"\x08" + _encode_varint(d) for d in tensors.shapes[name])
            type_name = _DTYPE_TABLE[tensors.dtypes[name]][1].encode()
            for start in range(0, max(len(array), 1), slice_bytes):
                content = array[start:start + slice_bytes]
                proto_head = dims + _len_field(2, len(type_name)) + type_name + _len_field(3, len(content))
                proto_len = len(proto_head) + len(content)
                value_head = _len_field(1, len(tag)) + tag + _len_field(2, proto_len)
                value_len = len(value_head) + proto_len
                handle.write(_len_field(1, value_len) + value_head + proto_head)
                handle.write(content)

    atomic_write(Path(path), write)


# ----------------------------------------------------------------------------- codecs

def _spec_shapes(config) -> dict[str, tuple[int, ...]]:
    return {k: s.shape for k, s in get_family(config.family).tensor_specs(config).items()}


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
        wrong = {k: tensors.dtypes[k] for k in found if tensors.dtypes[k] not in FLOAT_DTYPES}
        if wrong:
            raise CheckpointError(f"{source}: weights must be floating point, got {wrong}")


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


def _rename(ours: str, theirs: str) -> Step:
    return Step((ours,), theirs)


def _conv1d(ours: str, theirs: str) -> Step:
    return Step((ours,), theirs, transpose=True)


# Our GPT <-> Hugging Face GPT2LMHeadModel. The output projection is tied on both sides:
# HF files usually omit lm_head.weight; when present it must equal the token embedding.
GPT2_STEPS = (
    _rename("embed_tokens.weight", "transformer.wte.weight"),
    _rename("embed_positions.weight", "transformer.wpe.weight"),
    _rename("ln_f.weight", "transformer.ln_f.weight"),
    _rename("ln_f.bias", "transformer.ln_f.bias"),
)
GPT2_LAYER_STEPS = (
    _rename("layers.{i}.ln_1.weight", "transformer.h.{i}.ln_1.weight"),
    _rename("layers.{i}.ln_1.bias", "transformer.h.{i}.ln_1.bias"),
    Step(("layers.{i}.attn.q_proj.weight", "layers.{i}.attn.k_proj.weight", "layers.{i}.attn.v_proj.weight"),
         "transformer.h.{i}.attn.c_attn.weight", transpose=True, axis=1),
    Step(("layers.{i}.attn.q_proj.bias", "layers.{i}.attn.k_proj.bias", "layers.{i}.attn.v_proj.bias"),
         "transformer.h.{i}.attn.c_attn.bias", axis=0),
    _conv1d("layers.{i}.attn.out_proj.weight", "transformer.h.{i}.attn.c_proj.weight"),
    _rename("layers.{i}.attn.out_proj.bias", "transformer.h.{i}.attn.c_proj.bias"),
    _rename("layers.{i}.ln_2.weight", "transformer.h.{i}.ln_2.weight"),
    _rename("layers.{i}.ln_2.bias", "transformer.h.{i}.ln_2.bias"),
    _conv1d("layers.{i}.mlp.fc_in.weight", "transformer.h.{i}.mlp.c_fc.weight"),
    _rename("layers.{i}.mlp.fc_in.bias", "transformer.h.{i}.mlp.c_fc.bias"),
    _conv1d("layers.{i}.mlp.fc_out.weight", "transformer.h.{i}.mlp.c_proj.weight"),
    _rename("layers.{i}.mlp.fc_out.bias", "transformer.h.{i}.mlp.c_proj.bias"),
)
GPT2_TIED = {"lm_head.weight": "transformer.wte.weight"}
# Causal-mask buffers that older transformers versions saved with the weights.
GPT2_BUFFERS = ("transformer.h.{i}.attn.bias", "transformer.h.{i}.attn.masked_bias")


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


class HFGPT2Codec(StepCodec):
    def build_steps(self) -> list[Step]:
        if not self.config.model.bias:
            raise CheckpointError("GPT2LMHeadModel always has biases; model.bias: false cannot be "
                                  "converted to Hugging Face")
        layers = self.config.model.num_layers
        return list(GPT2_STEPS) + [s.layer(i) for i in range(layers) for s in GPT2_LAYER_STEPS]

    def adapt(self, tensors: Tensors) -> Tensors:
        """Files saved from GPT2Model (the hub's gpt2) lack the ``transformer.`` prefix."""
        if "wte.weight" not in tensors.shapes:
            return tensors
        rename = {n: n if n in GPT2_TIED else f"transformer.{n}" for n in tensors.shapes}
        back = {v: k for k, v in rename.items()}
        return Tensors({rename[k]: v for k, v in tensors.shapes.items()},
                       {rename[k]: v for k, v in tensors.dtypes.items()}, lambda n: tensors.read(back[n]))

    def harmless(self) -> set[str]:
        buffers = {b.format(i=i) for i in range(self.config.model.num_layers) for b in GPT2_BUFFERS}
        return buffers | set(GPT2_TIED)

    def check(self, tensors: Tensors, source: str) -> None:
        super().check(tensors, source)
        for tied, origin in GPT2_TIED.items():
            if tied in tensors.shapes:
                a, b = tensors.read(tied), tensors.read(origin)
                if a.shape != b.shape or a.dtype != b.dtype or a.tobytes() != b.tobytes():
                    raise CheckpointError(f"{source}: {tied} differs from {origin}; our GPT ties "
                                          "them, so an untied model cannot be converted")


# Our CLIP <-> Hugging Face CLIPModel. Our modules mirror CLIPModel's, so the table is the
# identity except for CLIPVisionTransformer's misspelt pre-encoder LayerNorm.
CLIP_RENAMES = {"vision_model.pre_layernorm.": "vision_model.pre_layrnorm."}
# arange buffers that transformers saved with the weights before it made them
# non-persistent; CLIPModel rebuilds them, so they carry nothing.
CLIP_BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def _clip_hf_name(name: str) -> str:
    for ours, theirs in CLIP_RENAMES.items():
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


class HFCLIPCodec(StepCodec):
    def build_steps(self) -> list[Step]:
        return [_rename(name, _clip_hf_name(name)) for name in self.specs]

    def harmless(self) -> set[str]:
        return set(CLIP_BUFFERS)


# ----------------------------------------------------------------------------- HF config.json

_HF_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


def _refuse(source: str, why: str) -> ConfigError:
    return ConfigError(f"{source}: {why}")


def _gpt2_from_hf(hf: dict, source: str) -> dict:
    """Our raw config from a GPT2LMHeadModel config.json; HF features we lack are refused."""
    for key, needed in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("reorder_and_upcast_attn", False), ("add_cross_attention", False),
                        ("tie_word_embeddings", True)):
        if hf.get(key, needed) != needed:
            raise _refuse(source, f"{key}: {hf[key]} is not supported (our GPT needs {needed})")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _HF_ACTIVATIONS:
        raise _refuse(source, f"activation_function {activation!r} is not supported "
                              f"(supported: {', '.join(_HF_ACTIVATIONS)})")
    try:
        n_positions = int(hf.get("n_positions", hf.get("n_ctx", 1024)))
        vocab = int(hf["vocab_size"])
        model = {"vocab_size": vocab, "hidden_size": int(hf["n_embd"]), "num_layers": int(hf["n_layer"]),
                 "num_heads": int(hf["n_head"]), "intermediate_size": hf.get("n_inner"),
                 "max_position_embeddings": n_positions,
                 "activation": _HF_ACTIVATIONS[activation],
                 "layer_norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
                 # One dropout rate for embeddings and residuals; inference ignores both.
                 "dropout": float(hf.get("resid_pdrop", 0.1)),
                 "attention_dropout": float(hf.get("attn_pdrop", 0.1)),
                 "bias": True, "initializer_range": float(hf.get("initializer_range", 0.02))}
    except (KeyError, TypeError, ValueError) as err:
        raise _refuse(source, f"not a usable GPT-2 config.json: {err!r}") from None
    raw = {"family": "gpt", "model": model, "data": {"seq_len": min(128, n_positions)}}
    if vocab < 260:  # too small for 256 byte pieces; the tokenizer is not carried anyway
        raw["tokenizer"] = {"byte_fallback": False}
    stored = hf.get("taichu_config")
    if isinstance(stored, dict) and stored.get("model") == model:
        raw = stored  # written by us: keeps the tokenizer, data and train sections
    return raw


def _gpt2_to_hf(config) -> dict:
    m, special = config.model, config.tokenizer.special_tokens
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": m.vocab_size, "n_embd": m.hidden_size, "n_layer": m.num_layers,
        "n_head": m.num_heads, "n_inner": m.intermediate_size, "n_positions": m.max_position_embeddings,
        "activation_function": m.activation, "layer_norm_epsilon": m.layer_norm_eps,
        "resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": m.attention_dropout,
        "initializer_range": m.initializer_range, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "bos_token_id": special.bos_id, "eos_token_id": special.eos_id,
        "pad_token_id": special.pad_id,
    }


# transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults: save_pretrained
# writes only what differs from them, so a key a config.json lacks has this value.
CLIP_HF_DEFAULTS = {
    "text_config": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
                    "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
                    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
                    "initializer_range": 0.02, "pad_token_id": 1, "bos_token_id": 49406,
                    "eos_token_id": 49407},
    "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
                      "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
                      "initializer_range": 0.02},
    "projection_dim": 512, "logit_scale_init_value": 2.6592,
}
CLIP_ACTIVATIONS = ("quick_gelu", "gelu")   # HF's "gelu" is the exact erf GELU, as ours
# Held once in our config for both towers: the towers of a config.json must agree.
CLIP_SHARED = {"hidden_act": "activation", "layer_norm_eps": "layer_norm_eps",
               "attention_dropout": "attention_dropout", "initializer_range": "initializer_range"}
# eos_token_id 2 is the value of CLIP configs written before transformers PR #24773;
# CLIPTextTransformer then pools at each row's largest id instead of at the eos.
CLIP_LEGACY_EOS = 2


def _clip_towers(hf: dict, source: str) -> tuple[dict, dict]:
    towers = []
    for key in ("text_config", "vision_config"):
        # Old config.json files also carry ``text_config_dict``; transformers lets its
        # values win, and so do we.
        parts = [hf.get(key), hf.get(f"{key}_dict")]
        for part, name in zip(parts, (key, f"{key}_dict")):
            if part is not None and not isinstance(part, dict):
                raise _refuse(source, f"{name} must be an object, got {part!r}")
        towers.append({**CLIP_HF_DEFAULTS[key], **(parts[0] or {}), **(parts[1] or {})})
    return towers[0], towers[1]


def _clip_from_hf(hf: dict, source: str) -> dict:
    """Our raw config from a CLIPModel config.json; what our CLIP cannot be is refused."""
    text, vision = _clip_towers(hf, source)

    def integer(tower: dict, key: str, where: str) -> int:
        value = tower[key]
        if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
            value = value[0]   # [n, n]: a square image or patch, which is all we have
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            square = "; images and patches are square here" if key in ("image_size", "patch_size") else ""
            raise _refuse(source, f"{where}{key}: {value!r} is not supported (a positive integer{square})")
        return value

    def number(value, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _refuse(source, f"{where}: {value!r} is not a number")
        return float(value)

    shared = {}
    for key, ours in CLIP_SHARED.items():
        if text[key] != vision[key]:
            raise _refuse(source, f"text_config.{key} {text[key]!r} and vision_config.{key} "
                                  f"{vision[key]!r} differ; our CLIP has one model.{ours} for both towers")
        shared[ours] = text[key]
    if shared["activation"] not in CLIP_ACTIVATIONS:
        raise _refuse(source, f"hidden_act {shared['activation']!r} is not supported "
                              f"(supported: {', '.join(CLIP_ACTIVATIONS)})")
    for key, ours in CLIP_SHARED.items():
        if ours != "activation":
            shared[ours] = number(shared[ours], f"text_config.{key}")

    def tower(c: dict, where: str) -> dict:  # where: "text_config." or "vision_config."
        return {"hidden_size": integer(c, "hidden_size", where),
                "num_layers": integer(c, "num_hidden_layers", where),
                "num_heads": integer(c, "num_attention_heads", where),
                "intermediate_size": integer(c, "intermediate_size", where)}

    vocab = integer(text, "vocab_size", "text_config.")
    top = {**CLIP_HF_DEFAULTS, **hf}
    model = {
        "image": {**tower(vision, "vision_config."), "image_size": integer(vision, "image_size", "vision_config."),
                  "patch_size": integer(vision, "patch_size", "vision_config."),
                  "num_channels": integer(vision, "num_channels", "vision_config.")},
        "text": {**tower(text, "text_config."), "vocab_size": vocab,
                 "max_position_embeddings": integer(text, "max_position_embeddings", "text_config.")},
        "projection_dim": integer(top, "projection_dim", ""),
        "logit_scale_init": number(top["logit_scale_init_value"], "logit_scale_init_value"),
        **shared}
    raw = {"family": "clip", "model": model,
           "tokenizer": {"special_tokens": _clip_special_tokens(text, vocab, source)}}
    if vocab < 260:  # too small for 256 byte pieces; the tokenizer is not carried anyway
        raw["tokenizer"]["byte_fallback"] = False
    stored = hf.get("taichu_config")
    if isinstance(stored, dict) and stored.get("family") == "clip":
        # Written by us: keep its tokenizer, data and train sections when it describes
        # the model this config.json describes (it may have been edited since).
        try:
            same = _clip_to_hf(validate_config(json.loads(json.dumps(stored)), source)) == \
                _clip_to_hf(validate_config(json.loads(json.dumps(raw)), source))
        except ConfigError:
            same = False
        if same:
            raw = stored
    return raw


def _clip_special_tokens(text: dict, vocab: int, source: str) -> dict:
    """Our special token ids from text_config's: eos must survive (CLIPModel pools the text
    at it, so HF -> ours -> HF keeps the pooling); bos and pad when they fit."""
    eos = text["eos_token_id"]
    if isinstance(eos, bool) or not isinstance(eos, int) or not 0 <= eos < vocab:
        raise _refuse(source, f"text_config.eos_token_id {eos!r} is not supported: CLIPModel pools "
                              f"each text at its first eos_token_id, so it must be one id in "
                              f"0..{vocab - 1} (vocab_size {vocab})")
    special = {"eos_id": eos}
    for ours, key in (("bos_id", "bos_token_id"), ("pad_id", "pad_token_id")):
        value = text.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab \
                and value not in special.values():
            special[ours] = value
    # unk (CLIP configs name none) and whatever did not fit: the smallest free ids. Our
    # ids must be distinct; none of these three affects what the model computes.
    free = (i for i in range(vocab) if i not in special.values())
    for ours in ("pad_id", "unk_id", "bos_id"):
        special.setdefault(ours, next(free))
    return special


def _clip_to_hf(config) -> dict:
    m, special = config.model, config.tokenizer.special_tokens
    shared = {"hidden_act": m.activation, "layer_norm_eps": m.layer_norm_eps,
              "attention_dropout": m.attention_dropout, "initializer_range": m.initializer_range,
              # HF scales its init stds by this; ours follow OpenAI CLIP's scheme unscaled.
              "initializer_factor": 1.0, "projection_dim": m.projection_dim}

    def tower(t) -> dict:
        return {"hidden_size": t.hidden_size, "intermediate_size": t.ffn_size,
                "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads, **shared}
    return {
        "architectures": ["CLIPModel"], "model_type": "clip",
        "projection_dim": m.projection_dim, "logit_scale_init_value": m.logit_scale_init,
        "initializer_factor": 1.0,
        "text_config": {"model_type": "clip_text_model", **tower(m.text), "vocab_size": m.text.vocab_size,
                        "max_position_embeddings": m.text.max_position_embeddings,
                        "bos_token_id": special.bos_id, "eos_token_id": special.eos_id,
                        "pad_token_id": special.pad_id},
        "vision_config": {"model_type": "clip_vision_model", **tower(m.image),
                          "image_size": m.image.image_size, "patch_size": m.image.patch_size,
                          "num_channels": m.image.num_channels},
    }


def _clip_notes(hf: dict) -> list[str]:
    """Where CLIPModel pools the text, against ours (the last real token of the
    right-padded attention_mask, or the last position without a mask)."""
    eos = _clip_towers(hf, HF_CONFIG)[0]["eos_token_id"]   # config.json was checked already
    if eos == CLIP_LEGACY_EOS:
        return [f"text pooling: CLIPModel with eos_token_id {eos} (its legacy rule) pools each text at "
                "the first occurrence of the row's largest id, taichu at the last real token of the "
                "right-padded attention_mask; they agree when that token's id is larger than every "
                "id before it and not smaller than any padding id after it"]
    return [f"text pooling: CLIPModel pools each text at its first token {eos} (eos_token_id), taichu at "
            "the last real token of the right-padded attention_mask; they agree when every text ends "
            f"with its first {eos}"]


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


HF_FAMILIES = {
    "gpt": HFFamily("gpt2", "GPT2LMHeadModel", HFGPT2Codec, _gpt2_from_hf, _gpt2_to_hf),
    "clip": HFFamily("clip", "CLIPModel", HFCLIPCodec, _clip_from_hf, _clip_to_hf, _clip_notes),
}


def _hf_family(config) -> HFFamily:
    if config.family not in HF_FAMILIES:
        raise CheckpointError(f"Hugging Face conversion exists for the "
                              f"{' and '.join(HF_FAMILIES)} families, not {config.family}")
    return HF_FAMILIES[config.family]


def hf_codec(config) -> Codec:
    return _hf_family(config).codec(config)


CODECS = {"taichu": Codec, "torch": Codec, "mindspore": MindSporeCodec, "hf": hf_codec}


def hf_to_config(hf: dict, source: str, overrides: Iterable[str] = ()):
    """Our config from a Hugging Face config.json (GPT2LMHeadModel or CLIPModel); HF
    features we lack are refused, naming the key and ``source``."""
    model_type = hf.get("model_type")
    family = next((f for f in HF_FAMILIES.values() if f.model_type == model_type), None)
    if family is None:
        supported = " and ".join(f"{f.architecture} ({f.model_type})" for f in HF_FAMILIES.values())
        raise _refuse(source, f"model_type {model_type!r}: only Hugging Face GPT-2 and CLIP are "
                              f"supported ({supported})")
    raw = json.loads(json.dumps(family.from_hf(hf, source)))
    applied = apply_overrides(raw, overrides)
    return validate_config(raw, source, applied)


def config_to_hf(config, dtype: str) -> dict:
    """The config.json of ``config`` as its Hugging Face architecture."""
    return {**_hf_family(config).to_hf(config), "dtype": dtype,
            # Our full config rides along (HF keeps unknown keys), so ours -> HF -> ours is exact.
            "taichu_config": config_to_dict(config)}


# ----------------------------------------------------------------------------- detection

def _head(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(16)


def _is_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length (never near 2**32), then the JSON header.
    return len(head) >= 9 and head[4:8] == b"\0\0\0\0" and head[8:9] == b"{"


def _is_pickle(head: bytes) -> bool:
    return head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"  # torch.save's zip, or a bare pickle


def _is_ckpt(head: bytes) -> bool:
    if head[:1] != b"\x0a":
        return False
    try:
        _, pos = _varint(head, 1, len(head))
    except (IndexError, ValueError):
        return False
    return head[pos:pos + 1] == b"\x0a"  # a Value starts with its tag


_MINDSPORE_LEAVES = (".gamma", ".beta", ".embedding_table", ".moving_mean", ".moving_variance")


def detect_format(path: str | Path) -> str:
    """"taichu", "hf", "mindspore", "torch" or "pickle", from the content, not the name."""
    path = Path(path)
    if path.is_dir():
        if (path / "config.yaml").is_file():
            return "taichu"
        if (path / HF_CONFIG).is_file():
            return "hf"
        if (path / SAFETENSORS_FILE).is_file() or (path / SAFETENSORS_INDEX).is_file():
            return _classify_safetensors(path)
        raise CheckpointError(f"{path}: not a model directory (no config.yaml, config.json "
                              f"or {SAFETENSORS_FILE})")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or directory")
    head = _head(path)
    if _is_safetensors(head):
        return _classify_safetensors(path)
    if _is_ckpt(head):
        return "mindspore"
    if _is_pickle(head):
        return "pickle"
    raise CheckpointError(f"{path}: not a weights file this converter knows (safetensors, "
                          "MindSpore .ckpt or PyTorch pickle)")


def _classify_safetensors(path: Path) -> str:
    tensors, metadata = read_safetensors(path)
    names = list(tensors.shapes)
    if metadata.get("format") == "ms" or any(n.endswith(_MINDSPORE_LEAVES) for n in names):
        return "mindspore"
    # GPT2LMHeadModel's prefix, GPT2Model's embedding, CLIPModel's misspelt LayerNorm.
    if any(n.startswith(("transformer.", "vision_model.pre_layrnorm.")) or n == "wte.weight" for n in names):
        return "hf"
    return "torch"


# ----------------------------------------------------------------------------- load

def _read_pickle(path: Path, allow_pickle: bool) -> Tensors:
    if not allow_pickle:
        raise CheckpointError(f"{path}: is a pickle (PyTorch .pt/.bin); unpickling can run code, so it "
                              "is refused unless you pass --allow-pickle (allow_pickle=True), and even "
                              "then it is loaded with torch.load(weights_only=True)")
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad or unsafe pickle
        raise CheckpointError(f"{path}: cannot load as a PyTorch state_dict: {err}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a flat state_dict of tensors")
    arrays = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
            arrays[name] = tensor.view(torch.int16).numpy().view(_np_dtype("bfloat16"))
        else:
            arrays[name] = tensor.numpy()
    return Tensors.from_arrays(arrays)


def _resolve_config(config, source: Path, what: str, overrides: Iterable[str]):
    if config is None:
        raise ConfigError(f"{source} is {what}, which carries no config: pass --config CONFIG "
                          "(a YAML config or a model directory)")
    if isinstance(config, (str, Path)):
        return load_config(config, overrides)
    return config


@dataclass
class Source:
    """A weights source, checked against its config, read lazily in canonical names."""
    path: Path
    format: str                 # "taichu", "hf", "mindspore", "torch"
    config: object
    tensors: Tensors            # canonical names
    notes: list[str]
    tokenizer: Path | None = None


def _effective_fields(section, prefix: str = "") -> dict:
    """A config section as flat ``dotted.name: value`` pairs with defaults resolved: a null
    intermediate_size is its stack's ffn_size, so null and an explicit 4 * hidden_size,
    the same model, compare equal."""
    fields = {}
    for name, value in section:
        if hasattr(value, "model_fields"):
            fields.update(_effective_fields(value, f"{prefix}{name}."))
        elif name == "intermediate_size" and value is None and hasattr(section, "ffn_size"):
            fields[prefix + name] = section.ffn_size
        else:
            fields[prefix + name] = value
    return fields


def open_source(path: str | Path, config=None, allow_pickle: bool = False,
                overrides: Iterable[str] = ()) -> Source:
    """Detect, read headers, check every tensor against the config; reads no weights yet."""
    path = Path(path)
    kind = detect_format(path)
    notes, tokenizer = [], None
    if kind == "taichu":
        config = _resolve_config(config, path, "", overrides) if config is not None \
            else load_config(path, overrides)
        raw, _ = read_safetensors(path)
        tokenizer = path / TOKENIZER_FILE if (path / TOKENIZER_FILE).is_file() else None
    elif kind == "hf":
        hf_dir = path if path.is_dir() else None
        derived = None
        if hf_dir is not None:
            try:
                hf = json.loads((hf_dir / HF_CONFIG).read_text())
            except ValueError as err:
                raise ConfigError(f"{hf_dir / HF_CONFIG}: not valid JSON: {err}") from None
            if not isinstance(hf, dict):
                raise ConfigError(f"{hf_dir / HF_CONFIG}: not a JSON object")
            derived = hf_to_config(hf, str(hf_dir / HF_CONFIG), overrides)
            if not isinstance(hf.get("taichu_config"), dict):
                # CLIP's special token ids do come across: HF pools the text at its eos id.
                ids = " (special token ids from config.json)" if derived.family == "clip" else ""
                notes.append("the Hugging Face tokenizer (BPE) is not carried; the config has "
                             f"taichu's default tokenizer section{ids}")
            notes += HF_FAMILIES[derived.family].notes(hf)
        if config is not None:
            given = _resolve_config(config, path, "", overrides)
            if derived is not None:
                theirs, ours = _effective_fields(derived.model), _effective_fields(given.model)
                diff = {k: (v, ours.get(k)) for k, v in theirs.items() if ours.get(k) != v}
                if diff:
                    raise ConfigError(f"{path}: --config disagrees with config.json on {diff} "
                                      "(config.json value, --config value)")
            config = given
        elif derived is None:
            config = _resolve_config(None, path, "a Hugging Face weights file", overrides)
        else:
            config = derived
        if hf_dir is not None and not ((hf_dir / SAFETENSORS_FILE).is_file()
                                       or (hf_dir / SAFETENSORS_INDEX).is_file()):
            bins = [hf_dir / "pytorch_model.bin"]
            if not bins[0].is_file():
                raise CheckpointError(f"{hf_dir}: no model.safetensors or pytorch_model.bin")
            raw = _read_pickle(bins[0], allow_pickle)
        else:
            raw, _ = read_safetensors(path)
    elif kind == "mindspore":
        config = _resolve_config(config, path, "a MindSpore checkpoint", overrides)
        if path.is_file() and _is_ckpt(_head(path)):
            raw, strings = read_ckpt(path)
            if strings:
                notes.append(f"skipped string entries of the checkpoint: {sorted(strings)}")
        else:
            raw, _ = read_safetensors(path)
    elif kind == "torch":
        config = _resolve_config(config, path, "a PyTorch state_dict", overrides)
        raw, _ = read_safetensors(path)
    else:  # pickle
        config = _resolve_config(config, path, "a PyTorch pickle", overrides)
        raw, kind = _read_pickle(path, allow_pickle), "torch"
    codec = CODECS[kind](config)
    raw = codec.adapt(raw)
    codec.check(raw, f"{path} ({kind})")
    return Source(path, kind, config, codec.to_canonical(raw), notes, tokenizer)


def to_canonical(config, arrays: Mapping[str, np.ndarray], format: str = "hf",
                 source: str = "arrays") -> dict[str, np.ndarray]:
    """Arrays in memory named as ``format`` names them (a Hugging Face model's state_dict
    as numpy, say), checked against ``config`` and returned with canonical names."""
    codec = CODECS[format](config)
    tensors = codec.adapt(Tensors.from_arrays(arrays))
    codec.check(tensors, source)
    tensors = codec.to_canonical(tensors)
    return {name: contiguous(tensors.read(name)) for name in tensors.shapes}


def load(path: str | Path, config=None, allow_pickle: bool = False,
         dtype: str | None = None) -> tuple[object, dict[str, np.ndarray]]:
    """(config, canonical numpy arrays) from any supported format; dtypes kept unless ``dtype``."""
    source = open_source(path, config, allow_pickle)
    tensors = source.tensors.cast(DTYPES.get(dtype, dtype))
    return source.config, {name: contiguous(tensors.read(name)) for name in tensors.shapes}


# ----------------------------------------------------------------------------- save

def _target_format(dst: Path, to: str | None) -> str:
    if to is not None:
        if to not in FORMATS:
            raise ValueError(f"--to {to}: unknown format (choose from {', '.join(FORMATS)})")
        return to
    suffix = dst.suffix.lower()
    if suffix == ".ckpt":
        return "mindspore"
    if suffix == ".safetensors":
        return "torch"
    if suffix in (".pt", ".bin", ".pth"):
        raise ValueError(f"{dst}: writing pickles is not supported; write a .safetensors state_dict")
    return "taichu"


def write(config, tensors: Tensors, dst: str | Path, to: str = "taichu",
          max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tokenizer: Path | None = None) -> list[Path]:
    """Write canonical ``tensors`` (checked against ``config``) in format ``to``; streams."""
    dst = Path(dst)
    Codec(config).check(tensors, f"weights being written to {dst}")
    foreign = CODECS[to](config).from_canonical(tensors)
    if to == "taichu":
        written = write_safetensors(foreign, dst, {"format": "np", "writer": "taichu"}, max_shard_bytes)
        dump_config(config, dst / "config.yaml")
        written.append(dst / "config.yaml")
        if tokenizer is not None and tokenizer.resolve() != (dst / TOKENIZER_FILE).resolve():
            atomic_write_bytes(dst / TOKENIZER_FILE, tokenizer.read_bytes())
            written.append(dst / TOKENIZER_FILE)
        return written
    if to == "hf":
        # HF's from_pretrained refuses safetensors files whose metadata lacks format "pt".
        written = write_safetensors(foreign, dst, {"format": "pt"}, max_shard_bytes)
        # config.json's dtype: that of the first tensor (the token embedding of both families).
        dtype = next(iter(foreign.dtypes.values()))
        atomic_write_bytes(dst / HF_CONFIG, json.dumps(config_to_hf(config, dtype), indent=2).encode())
        return written + [dst / HF_CONFIG]
    if to == "mindspore" and dst.suffix.lower() != ".safetensors":
        write_ckpt(foreign, dst)
        return [dst]
    if to in ("mindspore", "torch"):  # a single state_dict file
        if dst.suffix.lower() != ".safetensors":
            raise ValueError(f"{dst}: a {to} state_dict is written as .safetensors")
        metadata = {"format": "ms"} if to == "mindspore" else {"format": "pt"}
        _write_safetensors_file(dst, foreign, list(foreign.shapes), metadata)
        return [dst]
    raise ValueError(f"unknown format {to}")


def save(config, arrays: Mapping[str, np.ndarray], path: str | Path, format: str = "taichu",
         dtype: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """Write canonical numpy ``arrays`` of ``config`` as ``format``; returns the files written."""
    tensors = Tensors.from_arrays(arrays).cast(DTYPES.get(dtype, dtype))
    return write(config, tensors, path, format, max_shard_bytes)


def convert(src: str | Path, dst: str | Path, to: str | None = None, dtype: str | None = None,
            config=None, allow_pickle: bool = False, overrides: Iterable[str] = (),
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict:
    """Convert ``src`` to ``dst``; a report of what was done (formats, files, notes)."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: choose from {', '.join(DTYPES)}")
    dst = Path(dst)
    target = _target_format(dst, to)
    source = open_source(src, config, allow_pickle, overrides)
    if Path(src).resolve() == dst.resolve():
        raise ValueError(f"{dst}: the destination is the source")
    tensors = source.tensors.cast(DTYPES.get(dtype))
    tokenizer = source.tokenizer if target == "taichu" else None
    notes = list(source.notes)
    if source.tokenizer is not None and target != "taichu":
        notes.append(f"{source.tokenizer} is not carried into the {target} format")
    if target == "hf":
        family = _hf_family(source.config)
        notes += [n for n in family.notes(family.to_hf(source.config)) if n not in notes]
    written = write(source.config, tensors, dst, target, max_shard_bytes, tokenizer)
    dtypes = sorted(set(tensors.dtypes.values()))
    return {"source": str(src), "source_format": source.format, "target_format": target,
            "destination": str(dst), "tensors": len(tensors.shapes), "dtypes": dtypes,
            "bytes": sum(tensors.nbytes(n) for n in tensors.shapes),
            "files": [str(p) for p in written], "notes": notes}


def load_model(path: str | Path, backend: str = "torch", config=None, allow_pickle: bool = False):
    """A model of ``backend`` from any supported format (the models are built in fp32)."""
    from taichu.api import _set_eval, build_model, load_state_dict

    config, arrays = load(path, config, allow_pickle, dtype="fp32")
    model = build_model(config, backend)
    load_state_dict(model, arrays, str(path))
    _set_eval(model, backend)
    if Path(path).is_dir():
        model.taichu_source_dir = str(path)
    return model


def cli_convert(args) -> int:
    """``taichu convert SRC DST [--to FORMAT] [--dtype fp32|fp16|bf16] [--config CONFIG]``."""
    report = convert(args.src, args.dst, to=args.to, dtype=args.dtype, config=args.config,
                     allow_pickle=getattr(args, "allow_pickle", False),
                     overrides=getattr(args, "overrides", None) or ())
    size = report["bytes"] / 2**20
    print(f"read {report['source']} ({report['source_format']}): {report['tensors']} tensors, "
          f"{size:.1f} MiB, checked against the config")
    print(f"wrote {report['destination']} ({report['target_format']}, {'/'.join(report['dtypes'])}): "
          + ", ".join(Path(f).name for f in report["files"]))
    for note in report["notes"]:
        print(f"note: {note}")
    return 0


__all__ = ["FORMATS", "Tensors", "detect_format", "open_source", "load", "save", "write", "convert",
           "load_model", "cli_convert", "read_safetensors", "write_safetensors", "read_ckpt",
           "write_ckpt", "hf_to_config", "config_to_hf", "to_canonical", "GPT2_STEPS", "GPT2_LAYER_STEPS",
           "HF_FAMILIES", "CLIP_RENAMES"]

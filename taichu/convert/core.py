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
             with allow_pickle): GPT2LMHeadModel for the gpt family,
             GPT2ForSequenceClassification for gpt_classifier, CLIPModel for clip,
             Wav2Vec2ForPreTraining / Wav2Vec2ForCTC for wav2vec2, ViTModel for vision's
             backbone (HF_FAMILIES: config.json mapping and tensor codec per family; a
             config.json names its family by model_type, and by architectures where one
             model_type is several of ours: gpt2 is gpt_classifier when architectures says
             GPT2ForSequenceClassification, else gpt)
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from taichu.config import ConfigError, apply_overrides, config_to_dict, dump_config, load_config, validate_config
from taichu.convert.codec import HF_CONFIG, Codec, HFFamily, refuse
from taichu.convert.hf_clip import CLIP
from taichu.convert.hf_gpt2 import GPT2, GPT2_CLASSIFIER
from taichu.convert.hf_vit import VIT
from taichu.convert.hf_wav2vec2 import WAV2VEC2
from taichu.convert.hf_tokenizer import (SP_MODEL, SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG, TOKENIZER_JSON,
                                         read_hf_tokenizer, tokenizer_section, write_hf_tokenizer)
from taichu.convert.mindspore_ckpt import MINDSPORE_LEAVES, MindSporeCodec, is_ckpt, read_ckpt, write_ckpt
from taichu.convert.safetensors_io import (Tensors, is_safetensors, np_dtype, read_safetensors,
                                           write_safetensors, write_safetensors_file)
from taichu.fileio import atomic_write_bytes
from taichu.weights import DEFAULT_MAX_SHARD_BYTES, SAFETENSORS_FILE, SAFETENSORS_INDEX, CheckpointError, contiguous

FORMATS = ("taichu", "mindspore", "torch", "hf")
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
TOKENIZER_FILE = SP_MODEL
HF_TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP, SP_MODEL)

# Which Hugging Face architecture each of our families is (config.json both ways, tensor codec).
# Where one model_type is several families (gpt2), the first listed is the one a config.json
# gets when its architectures name none of theirs.
HF_FAMILIES = {"gpt": GPT2, "gpt_classifier": GPT2_CLASSIFIER, "clip": CLIP, "wav2vec2": WAV2VEC2, "vision": VIT}


def _hf_family(config) -> HFFamily:
    if config.family not in HF_FAMILIES:
        raise CheckpointError(f"Hugging Face conversion exists for the "
                              f"{' and '.join(HF_FAMILIES)} families, not {config.family}")
    return HF_FAMILIES[config.family]


def hf_codec(config) -> Codec:
    return _hf_family(config).codec(config)


CODECS = {"taichu": Codec, "torch": Codec, "mindspore": MindSporeCodec, "hf": hf_codec}


def _hf_family_of(hf: dict) -> HFFamily | None:
    """The family of a config.json: by model_type, then by architectures among the families
    of that model_type (GPT2ForSequenceClassification -> gpt_classifier; GPT2LMHeadModel,
    GPT2Model or none -> gpt, the first listed)."""
    candidates = [f for f in HF_FAMILIES.values() if f.model_type == hf.get("model_type")]
    architectures = hf.get("architectures") or []
    named = [f for f in candidates if isinstance(architectures, list) and f.architecture in architectures]
    return next(iter(named or candidates), None)



def _own_vocabulary(config) -> bool:
    """Whether no SentencePiece tokenizer travels with the family's Hugging Face form: it
    carries its vocabulary in files of its own (wav2vec2's vocab.json), or has no text
    (vision)."""
    return hasattr(HF_FAMILIES.get(config.family), "write_files") or not hasattr(config, "tokenizer")


def hf_to_config(hf: dict, source: str, overrides: Iterable[str] = ()):
    """Our config from a Hugging Face config.json (GPT2LMHeadModel, GPT2ForSequenceClassification,
    CLIPModel, Wav2Vec2ForPreTraining, Wav2Vec2ForCTC or ViTModel); HF features we lack are
    refused, naming the key and ``source``."""
    model_type = hf.get("model_type")
    family = _hf_family_of(hf)
    if family is None:
        supported = " and ".join(f"{f.architecture} ({f.model_type})" for f in HF_FAMILIES.values())
        raise refuse(source, f"model_type {model_type!r}: only Hugging Face GPT-2, CLIP, wav2vec 2.0 and ViT "
                             f"are supported ({supported})")
    raw = json.loads(json.dumps(family.from_hf(hf, source)))
    applied = apply_overrides(raw, overrides)
    return validate_config(raw, source, applied)


def config_to_hf(config, dtype: str) -> dict:
    """The config.json of ``config`` as its Hugging Face architecture."""
    return {**_hf_family(config).to_hf(config), "dtype": dtype,
            # Our full config rides along (HF keeps unknown keys), so ours -> HF -> ours is exact.
            "taichu_config": config_to_dict(config)}


def _family_mismatch(source: Path, hf: dict, theirs: str, ours: str) -> str:
    """Why --config of family ``ours`` cannot read a config.json that is family ``theirs``."""
    named = hf.get("architectures")
    what = f"architectures {named}" if named else f"model_type {hf.get('model_type')!r} without architectures"
    why = ""
    if (theirs, ours) == ("gpt", "gpt_classifier"):
        why = (": a GPT-2 language model has no classification head (score.weight). Convert it as a gpt "
               "and start a classifier from it with `taichu train CONFIG --init DIR` (the head starts fresh)")
    elif (theirs, ours) == ("gpt_classifier", "gpt"):
        why = (": its score head has no place in a gpt and its lm_head is not in the file; convert it as a "
               "gpt_classifier (without --config, or a gpt_classifier --config)")
    return f"{source}: {what} is our {theirs} family, but --config is a {ours} config{why}"


# ----------------------------------------------------------------------------- detection

def _head(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(16)


def _is_pickle(head: bytes) -> bool:
    return head[:4] == b"PK\x03\x04" or head[:1] == b"\x80"  # torch.save's zip, or a bare pickle


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
    if is_safetensors(head):
        return _classify_safetensors(path)
    if is_ckpt(head):
        return "mindspore"
    if _is_pickle(head):
        return "pickle"
    raise CheckpointError(f"{path}: not a weights file this converter knows (safetensors, "
                          "MindSpore .ckpt or PyTorch pickle)")


def _classify_safetensors(path: Path) -> str:
    tensors, metadata = read_safetensors(path)
    names = list(tensors.shapes)
    if metadata.get("format") == "ms" or any(n.endswith(MINDSPORE_LEAVES) for n in names):
        return "mindspore"
    # GPT2LMHeadModel's prefix, GPT2Model's embedding, CLIPModel's misspelt LayerNorm,
    # wav2vec2's parametrized (weight-normalised) position convolution, ViTModel's attention.
    if any(n.startswith(("transformer.", "vision_model.pre_layrnorm.")) or n == "wte.weight"
           or ".parametrizations.weight." in n or ".attention.attention.query." in n for n in names):
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
            arrays[name] = tensor.view(torch.int16).numpy().view(np_dtype("bfloat16"))
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
            # Config kept in files beside config.json (wav2vec2's vocab.json).
            read_files = getattr(_hf_family_of(hf), "read_files", None)
            if read_files is not None:
                hf = read_files(hf, hf_dir)
            derived = hf_to_config(hf, str(hf_dir / HF_CONFIG), overrides)
            if not isinstance(hf.get("taichu_config"), dict):
                # Special token ids HF pools by do come across: CLIP's (the text's eos), the
                # classifier's pad (each row's last token that is not the pad).
                ids = {"clip": " (special token ids from config.json)",
                       "gpt_classifier": " (pad_id from config.json's pad_token_id)"}.get(derived.family, "")
                if not _own_vocabulary(derived):
                    notes.append(f"config.json has no taichu_config: the config's tokenizer section is taichu's "
                                 f"default{ids} unless a tokenizer is carried")
            notes += HF_FAMILIES[derived.family].notes(hf)
        if config is not None:
            given = _resolve_config(config, path, "", overrides)
            if derived is not None and derived.family != given.family:
                raise ConfigError(_family_mismatch(hf_dir / HF_CONFIG, hf, derived.family, given.family))
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
        if path.is_file() and is_ckpt(_head(path)):
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
        written.append(dst / HF_CONFIG)
        for name, data in getattr(_hf_family(config), "write_files", lambda c: {})(config).items():
            atomic_write_bytes(dst / name, data)   # wav2vec2's vocab.json and tokenizer_config.json
            written.append(dst / name)
        return written
    if to == "mindspore" and dst.suffix.lower() != ".safetensors":
        write_ckpt(foreign, dst)
        return [dst]
    if to in ("mindspore", "torch"):  # a single state_dict file
        if dst.suffix.lower() != ".safetensors":
            raise ValueError(f"{dst}: a {to} state_dict is written as .safetensors")
        metadata = {"format": "ms"} if to == "mindspore" else {"format": "pt"}
        write_safetensors_file(dst, foreign, list(foreign.shapes), metadata)
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
    """Convert ``src`` to ``dst``; a report of what was done (formats, files, notes).

    The tokenizer travels where the target format has a convention for one (our
    directories, Hugging Face); ``report["tokenizer_problem"]`` says why it could not,
    else None. The weights are written either way.
    """
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
    if source.tokenizer is not None and target not in ("taichu", "hf"):
        notes.append(f"{source.tokenizer} is not carried into the {target} format")
    if target == "hf":
        family = _hf_family(source.config)
        notes += [n for n in family.notes(family.to_hf(source.config)) if n not in notes]
    written = write(source.config, tensors, dst, target, max_shard_bytes, tokenizer)
    problem = None
    if _own_vocabulary(source.config):
        pass   # its vocabulary is part of the config (wav2vec2's CTC alphabet <-> vocab.json)
    elif target == "hf":
        problem = _write_hf_tokenizer(source, dst, written, notes)
    elif target == "taichu" and source.format == "hf" and source.path.is_dir():
        problem = _read_hf_tokenizer(source, dst, written, notes)
    if problem is not None:
        notes.append(problem)
    dtypes = sorted(set(tensors.dtypes.values()))
    return {"source": str(src), "source_format": source.format, "target_format": target,
            "destination": str(dst), "tensors": len(tensors.shapes), "dtypes": dtypes,
            "bytes": sum(tensors.nbytes(n) for n in tensors.shapes),
            "files": [str(p) for p in written], "notes": notes, "tokenizer_problem": problem}


def _write_hf_tokenizer(source: Source, dst: Path, written: list[Path], notes: list[str]) -> str | None:
    """Our tokenizer.model as Hugging Face tokenizer files beside the weights; why not, or None."""
    if source.tokenizer is None:
        problem = (f"the Hugging Face directory has no tokenizer: {source.path} has no {TOKENIZER_FILE}"
                   + ("" if source.format == "taichu" else " (only our model directories carry one)"))
    else:
        try:
            notes += [f"tokenizer: {n}" for n in write_hf_tokenizer(source.tokenizer, dst, source.config)]
            written += [dst / name for name in HF_TOKENIZER_FILES]
            return None
        except ConfigError as err:
            problem = f"the Hugging Face directory has no tokenizer: {err}"
    # Tokenizer files of an earlier conversion into dst would belong to other weights.
    for name in HF_TOKENIZER_FILES:
        (dst / name).unlink(missing_ok=True)
    return problem


def _read_hf_tokenizer(source: Source, dst: Path, written: list[Path], notes: list[str]) -> str | None:
    """A Hugging Face directory's SentencePiece tokenizer as our tokenizer.model, with the
    config's tokenizer section following it; why not, or None."""
    try:
        notes += [f"tokenizer: {n}" for n in read_hf_tokenizer(source.path, dst)]
        config = tokenizer_section(dst / TOKENIZER_FILE, source.config)
    except ConfigError as err:
        (dst / TOKENIZER_FILE).unlink(missing_ok=True)
        return f"no {TOKENIZER_FILE} written: {err}"
    if config != source.config:
        dump_config(config, dst / "config.yaml")
        notes.append("config.yaml's tokenizer section now describes the carried tokenizer")
    written.append(dst / TOKENIZER_FILE)
    return None


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
    """``taichu convert SRC DST [--to FORMAT] [--dtype fp32|fp16|bf16] [--config CONFIG] [--strict]``;
    --strict: exit 1 when the tokenizer could not be carried (the weights are written anyway)."""
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
    if report["tokenizer_problem"] is not None and getattr(args, "strict", False):
        print(f"error (--strict): {report['tokenizer_problem']}", file=sys.stderr)
        return 1
    return 0

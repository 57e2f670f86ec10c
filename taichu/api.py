"""Python API shared by every family: build, load and save model directories.

A model directory is self-describing: ``config.yaml`` + ``model.safetensors`` (canonical
names; sharded with an index when large) + ``tokenizer.model`` where the model has text.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from taichu.config import dump_config, load_config
from taichu.families import BACKENDS, backend_module, get_family
from taichu.fileio import atomic_write_bytes
from taichu.weights import (DEFAULT_MAX_SHARD_BYTES, CheckpointError, check_tensors,
                            load_safetensors, read_safetensors_shapes, save_safetensors)

TOKENIZER_FILE = "tokenizer.model"


def _weights_module(backend: str):
    return importlib.import_module(f"{backend}_impl.weights")


def build_model(config, backend: str):
    """A randomly initialised model of ``config`` in ``backend`` ("mindspore" | "torch")."""
    family = get_family(config.family)
    model_class = getattr(backend_module(family, backend), family.class_name)
    return model_class(config)


def backend_of(model) -> str:
    root = type(model).__module__.split(".")[0]
    backend = root.removesuffix("_impl")
    if backend not in BACKENDS:
        raise TypeError(f"{type(model).__name__} is not a taichu model (module {root})")
    return backend


def state_dict(model) -> dict:
    """Canonical numpy state dict of a model of either backend."""
    return _weights_module(backend_of(model)).canonical_state_dict(model)


def load_state_dict(model, arrays: dict, source: str = "state dict") -> None:
    """Load canonical arrays after checking names and shapes against the model's config."""
    specs = get_family(model.config.family).tensor_specs(model.config)
    check_tensors({k: v.shape for k, v in arrays.items()}, {k: s.shape for k, s in specs.items()},
                  source)
    _weights_module(backend_of(model)).load_canonical_state_dict(model, arrays)


def load_model(path: str | Path, backend: str = "torch", config=None, allow_pickle: bool = False):
    """Rebuild a model from a model directory; checks every tensor before loading any.

    Other formats work too (a Hugging Face GPT-2 directory, a MindSpore .ckpt or a PyTorch
    state dict with ``config``); see taichu.convert.

    The returned model is in evaluation mode, and remembers its directory so that
    ``save_model`` can carry the tokenizer along.
    """
    path = Path(path)
    if not (path / "config.yaml").is_file():
        # Another format (Hugging Face directory, .ckpt, state dict): convert in memory.
        from taichu.convert import load_model as load_any

        return load_any(path, backend=backend, config=config, allow_pickle=allow_pickle)
    config = load_config(path / "config.yaml")
    specs = get_family(config.family).tensor_specs(config)
    check_tensors(read_safetensors_shapes(path), {k: s.shape for k, s in specs.items()}, str(path))
    model = build_model(config, backend)
    _weights_module(backend).load_canonical_state_dict(model, load_safetensors(path))
    _set_eval(model, backend)
    model.taichu_source_dir = str(path)
    return model


def _set_eval(model, backend: str) -> None:
    if backend == "torch":
        model.eval()
    else:
        model.set_train(False)


def save_model(model, path: str | Path, tokenizer: str | Path | None = None,
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write ``model`` (either backend) as a model directory at ``path``.

    The tokenizer is ``tokenizer`` if given, else the one of the directory the model was
    loaded from, if any.
    """
    return save_arrays(model.config, state_dict(model), path, tokenizer or _source_tokenizer(model),
                       max_shard_bytes)


def save_arrays(config, arrays: dict, path: str | Path, tokenizer: str | Path | None = None,
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write canonical ``arrays`` of ``config`` as a model directory (no model needed)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    specs = get_family(config.family).tensor_specs(config)
    check_tensors({k: v.shape for k, v in arrays.items()}, {k: s.shape for k, s in specs.items()},
                  f"weights being saved to {path}")
    stale = list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json"))
    written = save_safetensors(arrays, path, max_shard_bytes)
    for old in stale:
        if old not in written:
            old.unlink()
    dump_config(config, path / "config.yaml")
    if tokenizer is not None:
        source = Path(tokenizer)
        if not source.is_file():
            raise FileNotFoundError(f"{source}: tokenizer model not found")
        if source.resolve() != (path / TOKENIZER_FILE).resolve():
            atomic_write_bytes(path / TOKENIZER_FILE, source.read_bytes())
    return path


def _source_tokenizer(model):
    source_dir = getattr(model, "taichu_source_dir", None)
    if source_dir and (Path(source_dir) / TOKENIZER_FILE).is_file():
        return Path(source_dir) / TOKENIZER_FILE
    return None


__all__ = ["build_model", "load_model", "save_model", "save_arrays", "state_dict", "load_state_dict",
           "CheckpointError"]

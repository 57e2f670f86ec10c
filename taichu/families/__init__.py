"""Registry of model families: config schema, tensor specs and backend class per family.

Backend modules are found by name (``torch_impl.<module>``, ``mindspore_impl.<module>``)
and imported only when a model is built, so ``taichu`` never imports a framework.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    # Layer kind that owns the tensor ("linear", "embedding", "layer_norm", ...): the
    # MindSpore leaf names are derived from it (taichu.weights.MINDSPORE_LEAF_RENAMES).
    kind: str


def linear_specs(prefix: str, n_in: int, n_out: int, bias: bool = True) -> dict[str, TensorSpec]:
    """A Linear layer's tensors: weight [out, in] (torch's layout) and optional bias."""
    specs = {f"{prefix}.weight": TensorSpec((n_out, n_in), "linear")}
    if bias:
        specs[f"{prefix}.bias"] = TensorSpec((n_out,), "linear")
    return specs


def layer_norm_specs(prefix: str, width: int) -> dict[str, TensorSpec]:
    return {f"{prefix}.weight": TensorSpec((width,), "layer_norm"),
            f"{prefix}.bias": TensorSpec((width,), "layer_norm")}


@dataclass(frozen=True)
class DistillStream:
    """One Transformer stack of a model as distillation sees it (``distill_outputs`` in the
    backend files gives its hidden states and attention scores in this order)."""
    name: str           # "decoder"; CLIP's "text" and "image"
    hidden_size: int
    num_layers: int
    num_heads: int
    causal: bool        # a query sees only the keys up to itself


@dataclass(frozen=True)
class Family:
    name: str
    module: str          # file name in torch_impl/ and mindspore_impl/
    class_name: str      # top-level model class in both files
    config_class: type
    tensor_specs: Callable[[Any], dict[str, TensorSpec]]   # full config -> canonical specs
    describe: Callable[[Any], dict[str, Any]]               # full config -> sizes for `taichu info`
    # What ``taichu train`` feeds it (taichu.task_data.TASK_DATA): "language_model" (token
    # blocks, next-token loss), "image_text" (image-caption pairs, the family's contrastive
    # loss), "classification" (labelled texts), ...
    task: str = "language_model"
    # (init config, run config) -> name prefixes that ``taichu train --init`` leaves freshly
    # initialised instead of loading (a head the init model does not have); None: none.
    fresh_on_init: Callable[[Any, Any], tuple[str, ...]] | None = None
    # (init config, run config, init arrays) -> (the arrays as the run names them, a line
    # for the log or ""): ``taichu train --init`` from a model whose tensors the run takes
    # under other names (a pretrained vision model's teacher backbone as the backbone of a
    # segmentation model); applied before fresh_on_init. None: names are kept.
    init_arrays: Callable[[Any, Any, dict], tuple[dict, str]] | None = None
    # config -> the model's Transformer stacks, for ``taichu distill`` (whose backend files
    # have ``distill_outputs``); None: the family cannot be distilled.
    distill_streams: Callable[[Any], tuple[DistillStream, ...]] | None = None
    # (config, tower, source config, source arrays) -> (the tower's arrays as this family
    # names them, a line for the log): ``taichu train --init-tower TOWER=DIR``; refuses a
    # source of another architecture. None: the family has no towers.
    init_tower: Callable[[Any, str, Any, dict], tuple[dict, str]] | None = None
    # Dotted config keys the student and the teacher must share (what the inputs are and
    # how long each stream is: distillation compares position for position).
    distill_shared_keys: tuple[str, ...] = ()
    # config -> canonical name prefixes ``taichu train`` does not train (no gradient, no
    # optimizer state: a classifier's lower layers); None: everything trains.
    frozen: Callable[[Any], tuple[str, ...]] | None = None


_FAMILIES: dict[str, str] = {"gpt": "taichu.families.gpt", "gpt_xl": "taichu.families.gpt_xl",
                             "gpt_classifier": "taichu.families.gpt_classifier",
                             "clip": "taichu.families.clip",
                             "brivl": "taichu.families.brivl",
                             "wav2vec2": "taichu.families.wav2vec2",
                             "vision": "taichu.families.vision",
                             "vqvae": "taichu.families.vqvae",
                             "dalle": "taichu.families.dalle",
                             "trimodal": "taichu.families.trimodal",
                             "m6": "taichu.families.m6"}
BACKENDS = ("mindspore", "torch")


def family_names() -> list[str]:
    return sorted(_FAMILIES)


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        raise KeyError(f"unknown family '{name}' (known: {', '.join(family_names())})")
    return importlib.import_module(_FAMILIES[name]).FAMILY


def backend_module(family: Family, backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    return importlib.import_module(f"{backend}_impl.{family.module}")


def num_parameters(config) -> int:
    """Parameter count of a config, from its tensor specs, without building a model."""
    total = 0
    for spec in get_family(config.family).tensor_specs(config).values():
        count = 1
        for dim in spec.shape:
            count *= dim
        total += count
    return total

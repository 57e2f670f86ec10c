"""Canonical numpy state dicts for MindSpore cells.

Each parameter's layer kind comes from the cell that owns it; the leaf rename for that
kind comes from taichu.weights, the one place the MindSpore <-> canonical rules live.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from taichu.weights import contiguous, from_mindspore_array, from_mindspore_name, to_mindspore_array

LAYER_KINDS = ((nn.LayerNorm, "layer_norm"), (nn.GroupNorm, "group_norm"), (nn.Embedding, "embedding"), (nn.Dense, "linear"),
               (nn.Conv1d, "conv1d"), (nn.BatchNorm1d, "batch_norm"), (nn.BatchNorm2d, "batch_norm"))


def layer_kind(cell: nn.Cell) -> str:
    for cell_type, kind in LAYER_KINDS:
        if isinstance(cell, cell_type):
            return kind
    return "other"


def canonical_parameters(net: nn.Cell) -> dict[str, tuple[ms.Parameter, str]]:
    """canonical name -> (MindSpore parameter, layer kind)."""
    params = {}
    for _, cell in net.cells_and_names():
        kind = layer_kind(cell)
        for param in cell.get_parameters(expand=False):
            params[from_mindspore_name(param.name, kind)] = (param, kind)
    return params


def canonical_state_dict(net: nn.Cell) -> dict[str, np.ndarray]:
    return {name: from_mindspore_array(param.asnumpy(), kind).copy()
            for name, (param, kind) in canonical_parameters(net).items()}


def load_canonical_state_dict(net: nn.Cell, arrays: dict[str, np.ndarray]) -> None:
    """Load arrays already checked against the config (taichu.weights.check_tensors).

    Every tensor is converted and shape-checked before the first write, so a failure
    loads nothing (load_param_into_net would cast and skip silently); graphs compiled
    before the load see the loaded values (write_parameters).
    """
    params = canonical_parameters(net)
    if set(params) != set(arrays):
        raise ValueError(f"names differ: missing {sorted(set(params) - set(arrays))}, "
                         f"unexpected {sorted(set(arrays) - set(params))}")
    staged = []
    for name, (param, kind) in params.items():
        array = to_mindspore_array(arrays[name], kind)
        if tuple(array.shape) != tuple(param.shape):
            raise ValueError(f"{name}: shape {array.shape} does not fit parameter {param.shape}")
        staged.append((param, ms.Tensor(contiguous(array), dtype=param.dtype)))
    write_parameters(staged)


def write_parameters(staged: list[tuple[ms.Parameter, ms.Tensor]]) -> None:
    """Write each tensor into its parameter's buffer (ops.assign), so that graphs compiled
    before the write read the new values: set_data gives a parameter a new buffer that a
    compiled graph never sees. set_data only where assign cannot run: a parameter whose
    lazy init never ran, and bfloat16 (MindSpore 2.10 has no CPU Assign kernel for it)."""
    for param, tensor in staged:
        if param.has_init or param.dtype == ms.bfloat16:
            param.set_data(tensor)
        else:
            ops.assign(param, tensor)

"""Canonical numpy state dicts for PyTorch modules (canonical names are torch's own)."""
from __future__ import annotations

import numpy as np
import torch

from taichu.weights import contiguous


def canonical_state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {name: tensor.detach().cpu().numpy().copy() for name, tensor in model.state_dict().items()}


def load_canonical_state_dict(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load arrays already checked against the config (taichu.weights.check_tensors).

    Everything is converted before anything is copied, so a failure loads nothing.
    """
    current = model.state_dict()
    # torch.from_numpy knows no ml_dtypes bfloat16; widening to fp32 is exact.
    tensors = {name: torch.from_numpy(contiguous(
                   array.astype(np.float32) if array.dtype.name == "bfloat16" else array)
               ).to(current[name].dtype) for name, array in arrays.items()}
    model.load_state_dict(tensors, strict=True)

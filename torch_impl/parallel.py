"""PyTorch data parallelism: DDP (every family) or FSDP2 (the GPT) over torchrun's processes.

The counterpart of mindspore_impl/parallel.py, with less in it: PyTorch runs data
parallelism only. Tensor (model_parallel) and pipeline splits are MindSpore semi-auto
parallel features; taichu.parallel.validate_parallel refuses them for the torch backend.
"""
from __future__ import annotations

import torch
from torch import nn

from taichu.parallel import ParallelConfig


def wrap_data_parallel(model: nn.Module, parallel: ParallelConfig, world: int,
                       device: torch.device) -> nn.Module:
    """The module to run forward/backward through: ``model`` itself for one process or
    FSDP2 (sharded in place), a DistributedDataParallel wrapper otherwise."""
    if world == 1:
        return model
    if parallel.fsdp:
        # FSDP2 (fully_shard): one shard group per Block plus the root (embeddings,
        # final norm). Unlike FSDP1 it also runs on CPU with gloo.
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # Buffers (BriVL's MoCo queues) stay equal on every rank by construction: after_step
    # enqueues the keys all ranks gathered. Broadcasting them each forward would only cost.
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

"""MindSpore semi-auto parallel for the GPT: Megatron shard strategies, pipeline stages,
recomputation, and the auto-parallel context (design.md §2.8, §4).

Strategies are set on the primitives inside ``nn.Dense`` / ``nn.Embedding`` and take
effect only in (semi-)auto parallel mode, on Ascend or GPU. ``nn.Dense`` flattens its
input to 2-D and calls ``MatMul(transpose_b=True)`` on a weight laid out [out, in], so a
strategy is ((rows of x, in), (out, in)).

The attention core (``ops.matmul`` of q·kᵀ and probs·v, softmax) and the tied output
projection are functional calls in ``construct`` with no primitive to shard from here;
under SEMI_AUTO_PARALLEL MindSpore gives them its default (batch-split) strategy and
inserts the redistribution. Sharding those too is open work (see docs/parallel.md).
"""
from __future__ import annotations

import mindspore as ms
from mindspore import nn

from taichu.parallel import ParallelConfig, check_device_target, check_model_split


def _shard_dense(dense: nn.Dense, path: str, dp: int, mp: int, column: bool, out: dict) -> None:
    """Column split (q/k/v_proj, fc_in) needs no communication; row split (out_proj,
    fc_out) consumes the column layer's split output and ends in one AllReduce."""
    if column:
        # x [tokens, in] split by batch; W [out, in] split by out -> y [tokens, out] split (dp, mp).
        out[f"{path}.matmul"] = ((dp, 1), (mp, 1))
        bias = ((dp, mp), (mp,))
    else:
        # x [tokens, in] arrives split by in (the column layer's output); W split by in too:
        # each device holds a partial sum of y, which MindSpore all-reduces over mp.
        out[f"{path}.matmul"] = ((dp, mp), (1, mp))
        bias = ((dp, 1), (1,))
    dense.matmul.shard(out[f"{path}.matmul"])
    if dense.has_bias:
        out[f"{path}.bias_add"] = bias
        dense.bias_add.shard(bias)


def apply_shard_strategies(model: nn.Cell, parallel: ParallelConfig) -> dict[str, tuple]:
    """Set shard strategies, pipeline stages and recomputation on a GPT; returns
    {primitive path: in_strategy} for every strategy set.

    Pipeline: Block i goes to stage i // (num_layers / pipeline_stages); the embeddings
    live in stage 0 and the final LayerNorm in the last stage.
    """
    check_model_split(parallel, model.config)
    dp, mp, stages = parallel.data_parallel, parallel.model_parallel, parallel.pipeline_stages
    strategies: dict[str, tuple] = {}
    # Token embedding split by vocabulary rows (it is also the tied output projection,
    # whose logits are then split by vocabulary); nn.Embedding gathers with 1-D ids.
    strategies["embed_tokens.gather"] = ((mp, 1), (dp,))
    model.embed_tokens.gather.shard(strategies["embed_tokens.gather"])
    # Positions: a small table, replicated; only the ids are split by batch.
    strategies["embed_positions.gather"] = ((1, 1), (dp,))
    model.embed_positions.gather.shard(strategies["embed_positions.gather"])

    per_stage = len(model.layers) // stages
    for i, block in enumerate(model.layers):
        for path, dense, column in (("attn.q_proj", block.attn.q_proj, True),
                                    ("attn.k_proj", block.attn.k_proj, True),
                                    ("attn.v_proj", block.attn.v_proj, True),
                                    ("attn.out_proj", block.attn.out_proj, False),
                                    ("mlp.fc_in", block.mlp.fc_in, True),
                                    ("mlp.fc_out", block.mlp.fc_out, False)):
            _shard_dense(dense, f"layers.{i}.{path}", dp, mp, column, strategies)
        block.pipeline_stage = i // per_stage
        if parallel.recompute:
            block.recompute()
    for cell in (model.embed_tokens, model.embed_positions, model.dropout):
        cell.pipeline_stage = 0
    model.ln_f.pipeline_stage = stages - 1
    return strategies


def configure_auto_parallel(parallel: ParallelConfig, device_target: str) -> dict:
    """Set MindSpore's parallel context for ``parallel``; returns the arguments used.

    Call after ``mindspore.communication.init()`` in every msrun worker, before the
    network is compiled. With mode semi_auto_parallel every rank must feed the same full
    global batch (``dataset_strategy="full_batch"``): MindSpore slices it over
    data_parallel itself, and ranks of one model-parallel group need identical data.
    """
    check_device_target(parallel, device_target)
    if parallel.mode == "data_parallel":
        if parallel.data_parallel == 1:
            return {}  # one process: stand-alone, nothing to set
        kwargs = dict(parallel_mode=ms.ParallelMode.DATA_PARALLEL, device_num=parallel.data_parallel,
                      gradients_mean=True, enable_parallel_optimizer=parallel.optimizer_shard)
    else:
        kwargs = dict(parallel_mode=ms.ParallelMode.SEMI_AUTO_PARALLEL, device_num=parallel.device_count, pipeline_stages=parallel.pipeline_stages,
                      enable_parallel_optimizer=parallel.optimizer_shard, gradients_mean=True,
                      dataset_strategy="full_batch")
    # set_auto_parallel_context is marked "to be deprecated" in 2.10 in favour of
    # mindspore.parallel.auto_parallel.AutoParallel, but it still works without a warning,
    # and AutoParallel needs an initialised communication group just to be constructed.
    ms.set_auto_parallel_context(**kwargs)
    return kwargs

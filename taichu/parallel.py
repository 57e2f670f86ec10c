"""The ``parallel:`` config section, its checks, and the commands that launch training.

Backend-neutral (pydantic only). The MindSpore shard strategies that realise a
``semi_auto_parallel`` config live in ``mindspore_impl/parallel.py``; PyTorch supports
data parallelism only (DDP, or FSDP with ``fsdp: true``; ``torch_impl/parallel.py``).

Device layout: ``data_parallel * model_parallel * pipeline_stages`` processes, one per
device (msrun workers / torchrun processes).
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Literal

from pydantic import Field, StrictBool, StrictInt

from taichu.config import Section

BACKENDS = ("mindspore", "torch")


class ParallelConfig(Section):
    # Replicas of the model, each fed a different slice of the batch (both backends:
    # MindSpore DATA_PARALLEL or the batch axis of semi-auto parallel; PyTorch DDP/FSDP).
    data_parallel: StrictInt = Field(1, ge=1)
    # Tensor (Megatron) parallel degree: attention heads, MLP width and vocabulary are
    # split over this many devices. MindSpore semi-auto parallel only.
    model_parallel: StrictInt = Field(1, ge=1)
    # Consecutive groups of Blocks placed on different devices. MindSpore semi-auto only.
    pipeline_stages: StrictInt = Field(1, ge=1)
    # Micro-batches a step's batch is cut into so pipeline stages overlap; needs at least
    # one per stage to keep every stage busy. Only meaningful with pipeline_stages > 1.
    micro_batch_num: StrictInt = Field(1, ge=1)
    # MindSpore optimizer parallel (ZeRO-1: optimizer state sharded over data-parallel
    # replicas). Semi-auto parallel on Ascend/GPU, or data parallel on Ascend.
    # PyTorch: use fsdp instead.
    optimizer_shard: StrictBool = False
    # Recompute each Block's activations in the backward pass instead of storing them
    # (MindSpore Cell.recompute, PyTorch activation checkpointing).
    recompute: StrictBool = False
    # PyTorch only: FullyShardedDataParallel (parameters, gradients and optimizer state
    # sharded over replicas) instead of DistributedDataParallel.
    fsdp: StrictBool = False
    # data_parallel: plain data parallelism (CPU works: msrun / torchrun with N processes).
    # semi_auto_parallel: MindSpore with shard strategies set on the model (Ascend/GPU only).
    mode: Literal["data_parallel", "semi_auto_parallel"] = "data_parallel"

    @property
    def device_count(self) -> int:
        return self.data_parallel * self.model_parallel * self.pipeline_stages


def check_device_target(parallel: ParallelConfig, device_target: str) -> None:
    """MindSpore refuses semi-auto parallel on CPU; say so before it fails deep in compile."""
    if parallel.mode == "semi_auto_parallel" and device_target.upper() == "CPU":
        raise ValueError(
            "parallel.mode semi_auto_parallel: MindSpore semi-auto parallel (tensor/pipeline "
            "parallelism, optimizer sharding) needs Ascend or GPU; it refuses the CPU backend. "
            "CPU supports data parallelism: parallel.mode data_parallel with parallel.data_parallel N "
            "and N msrun workers")


def _split_problems(p: ParallelConfig, model) -> list[str]:
    problems = []
    if not (hasattr(model, "num_heads") and hasattr(model, "vocab_size")):
        # Only the GPT has shard strategies: the image-text towers (CLIP, BriVL) and the
        # speech model (wav2vec2) train data-parallel.
        if p.model_parallel > 1 or p.pipeline_stages > 1 or p.mode != "data_parallel":
            problems.append("only the GPT has tensor/pipeline strategies; this model supports data "
                            "parallelism only: parallel.model_parallel and parallel.pipeline_stages "
                            "must be 1 and parallel.mode data_parallel")
        if p.fsdp:
            # BriVL's and wav2vec2's losses run their parts directly; FSDP only unshards
            # around forward.
            problems.append("parallel.fsdp is for the GPT; this model trains with DDP "
                            "(parallel.fsdp: false)")
        return problems
    # Megatron splits: q/k/v by heads (whole heads per device), fc_in by MLP width, the
    # row-split out_proj/fc_out by their input width, the tied embedding by vocabulary.
    for key, size in (("num_heads", model.num_heads), ("hidden_size", model.hidden_size),
                      ("ffn_size (MLP width)", model.ffn_size), ("vocab_size", model.vocab_size)):
        if size % p.model_parallel:
            problems.append(f"parallel.model_parallel {p.model_parallel} does not divide "
                            f"model.{key} {size}")
    if model.num_layers % p.pipeline_stages:
        problems.append(f"parallel.pipeline_stages {p.pipeline_stages} does not divide "
                        f"model.num_layers {model.num_layers} (each stage holds the same number of Blocks)")
    return problems


def check_model_split(parallel: ParallelConfig, model_config) -> None:
    """Raise ValueError when the model's shapes cannot be split as ``parallel`` asks."""
    problems = _split_problems(parallel, getattr(model_config, "model", model_config))
    if problems:
        raise ValueError("invalid parallel config:\n  " + "\n  ".join(problems))


def validate_parallel(parallel: ParallelConfig, model_config, device_count: int, backend: str,
                      device_target: str = "CPU") -> None:
    """Raise ValueError listing every reason ``parallel`` cannot run this model on these devices.

    ``model_config`` is the ``model:`` section (a whole config is accepted too).
    ``device_count`` is the number of processes launched (msrun workers / torchrun ranks).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    model = getattr(model_config, "model", model_config)
    p = parallel
    problems = []
    if p.device_count != device_count:
        problems.append(
            f"parallel.data_parallel {p.data_parallel} x parallel.model_parallel {p.model_parallel} x "
            f"parallel.pipeline_stages {p.pipeline_stages} = {p.device_count} devices, but "
            f"{device_count} {'is' if device_count == 1 else 'are'} launched")
    problems.extend(_split_problems(p, model))
    if p.pipeline_stages > 1 and p.micro_batch_num < p.pipeline_stages:
        problems.append(f"parallel.micro_batch_num {p.micro_batch_num} is smaller than "
                        f"parallel.pipeline_stages {p.pipeline_stages}: some stages would sit idle")
    if p.pipeline_stages == 1 and p.micro_batch_num > 1:
        problems.append(f"parallel.micro_batch_num {p.micro_batch_num} needs parallel.pipeline_stages > 1 "
                        "(micro-batches only feed a pipeline; use gradient accumulation otherwise)")
    if backend == "torch":
        if p.model_parallel > 1 or p.pipeline_stages > 1 or p.mode != "data_parallel":
            problems.append(
                "the PyTorch backend supports data parallelism only (DDP, or FSDP with parallel.fsdp): "
                "parallel.model_parallel and parallel.pipeline_stages must be 1 and parallel.mode "
                "data_parallel; tensor/pipeline parallelism is MindSpore semi_auto_parallel")
        if p.optimizer_shard:
            problems.append("parallel.optimizer_shard is MindSpore's optimizer parallel; "
                            "with --backend torch use parallel.fsdp: true to shard optimizer state")
    else:
        if p.fsdp:
            problems.append("parallel.fsdp is PyTorch only (FullyShardedDataParallel); with "
                            "--backend mindspore use parallel.optimizer_shard")
        if (p.model_parallel > 1 or p.pipeline_stages > 1) and p.mode != "semi_auto_parallel":
            problems.append("parallel.model_parallel / parallel.pipeline_stages > 1 need "
                            "parallel.mode semi_auto_parallel (MindSpore on Ascend or GPU)")
        if p.optimizer_shard and p.mode == "data_parallel" and device_target.upper() != "ASCEND":
            # MindSpore: in DATA_PARALLEL mode optimizer parallel exists only on Ascend
            # (and only for Lamb/AdamWeightDecay); semi-auto supports it on GPU too.
            problems.append("parallel.optimizer_shard with parallel.mode data_parallel needs Ascend; "
                            "on GPU use parallel.mode semi_auto_parallel")
        try:
            check_device_target(p, device_target)
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ValueError("invalid parallel config:\n  " + "\n  ".join(problems))


def validate_batch(parallel: ParallelConfig, global_batch_size: int, grad_accum: int = 1) -> int:
    """The batch each replica runs per forward call; raises when it is not a whole number.

    ``global_batch_size`` counts the samples of one optimizer step over all replicas.
    Each replica takes 1/data_parallel of it, split into ``grad_accum`` forward calls;
    under pipelining each call's batch is cut again into ``micro_batch_num`` micro-batches.
    """
    p = parallel
    if global_batch_size < 1 or grad_accum < 1:
        raise ValueError(f"global batch size {global_batch_size} and gradient accumulation steps "
                         f"{grad_accum} must be positive")
    micro = p.micro_batch_num if p.pipeline_stages > 1 else 1
    divisor = p.data_parallel * grad_accum * micro
    if global_batch_size % divisor:
        parts = [f"parallel.data_parallel {p.data_parallel}"]
        if grad_accum > 1:
            parts.append(f"gradient accumulation steps {grad_accum}")
        if micro > 1:
            parts.append(f"parallel.micro_batch_num {micro}")
        raise ValueError(f"global batch size {global_batch_size} is not divisible by "
                         f"{' x '.join(parts)} = {divisor}")
    return global_batch_size // (p.data_parallel * grad_accum)


def cli_script() -> str:
    """Absolute path of taichu/cli.py: msrun launches ``python <script file> args``."""
    return str(Path(__file__).resolve().with_name("cli.py"))


def launch_command(config_path: str, backend: str, num_devices: int, extra_args: list[str] = (),
                   master_port: int | None = 29500, log_dir: str = "msrun_logs",
                   command: str = "train") -> list[str]:
    """The command that runs ``taichu COMMAND CONFIG`` (train, distill) on ``num_devices``
    local processes.

    mindspore: msrun (MindSpore's launcher: a scheduler plus N workers, logs in ``log_dir``).
      msrun starts each worker as ``python <script>`` with the ``python`` found on PATH,
      so the environment holding mindspore must be first on PATH (activate the venv).
    torch: torchrun (runs workers with its own interpreter). ``master_port=None`` uses
      ``--standalone``, which picks a free port itself (single node only).
    """
    if num_devices < 1:
        raise ValueError(f"number of devices must be >= 1, got {num_devices}")
    train = [command, str(config_path), "--backend", backend, *extra_args]
    if backend == "mindspore":
        port = [] if master_port is None else [f"--master_port={master_port}"]
        return ["msrun", f"--worker_num={num_devices}", f"--local_worker_num={num_devices}", *port,
                "--join=True", f"--log_dir={log_dir}", cli_script(), *train]
    if backend == "torch":
        rendezvous = ["--standalone"] if master_port is None else ["--nnodes=1", f"--master_port={master_port}"]
        return ["torchrun", *rendezvous, f"--nproc_per_node={num_devices}", "-m", "taichu", *train]
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def format_command(command: list[str]) -> str:
    """A command line the user can paste into a shell."""
    return shlex.join(command)

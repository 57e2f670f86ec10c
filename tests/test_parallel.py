"""The parallel: section: validation, MindSpore shard strategies, and the launch commands."""
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

import taichu
from taichu.parallel import (ParallelConfig, format_command, launch_command, validate_batch,
                             validate_parallel)
from conftest import CONFIGS, ROOT

BIN = Path(sys.executable).parent
TINY = CONFIGS / "gpt" / "gpt-tiny.yaml"
BIG = CONFIGS / "gpt" / "taichu-text-3b2.yaml"


@pytest.fixture(scope="module")
def big_model():
    return taichu.load_config(BIG).model


@pytest.fixture(scope="module")
def tiny_model():
    return taichu.load_config(TINY).model


def semi(**kw):
    return ParallelConfig(mode="semi_auto_parallel", **kw)


def test_defaults_and_strict_types():
    p = ParallelConfig()
    assert (p.data_parallel, p.model_parallel, p.pipeline_stages, p.micro_batch_num) == (1, 1, 1, 1)
    assert (p.optimizer_shard, p.recompute, p.fsdp, p.mode) == (False, False, False, "data_parallel")
    for bad in ({"data_parallel": 0}, {"model_parallel": "2"}, {"fsdp": "yes"}, {"mode": "auto"},
                {"tensor_parallel": 2}):
        with pytest.raises(ValidationError):
            ParallelConfig(**bad)


def test_3b2_tensor_and_pipeline_parallel_on_128_ascend_devices(big_model):
    p = semi(data_parallel=4, model_parallel=8, pipeline_stages=4, micro_batch_num=8,
             optimizer_shard=True, recompute=True)
    validate_parallel(p, big_model, 128, "mindspore", "Ascend")
    validate_parallel(p, big_model, 128, "mindspore", "GPU")
    assert validate_batch(p, 512, grad_accum=2) == 64


@pytest.mark.parametrize("kw, devices, message", [
    (dict(model_parallel=3), 3, r"parallel.model_parallel 3 does not divide model.num_heads 32"),
    (dict(model_parallel=32, data_parallel=4), 128, r"parallel.model_parallel 32 does not divide model.vocab_size 30000"),
    (dict(pipeline_stages=3, micro_batch_num=3), 3, r"parallel.pipeline_stages 3 does not divide model.num_layers 40"),
    (dict(pipeline_stages=4, micro_batch_num=2), 4, r"parallel.micro_batch_num 2 is smaller than parallel.pipeline_stages 4"),
    (dict(micro_batch_num=4), 1, r"parallel.micro_batch_num 4 needs parallel.pipeline_stages > 1"),
    (dict(data_parallel=4, model_parallel=8), 64, r"= 32 devices, but 64 are launched"),
])
def test_invalid_splits_name_the_key(big_model, kw, devices, message):
    with pytest.raises(ValueError, match=message):
        validate_parallel(semi(**kw), big_model, devices, "mindspore", "Ascend")


def test_semi_auto_parallel_is_refused_on_cpu_with_the_way_out(tiny_model):
    with pytest.raises(ValueError, match=r"needs Ascend or GPU; it refuses the CPU backend"
                                         r".*CPU supports data parallelism.*msrun"):
        validate_parallel(semi(model_parallel=2), tiny_model, 2, "mindspore", "CPU")
    # Data parallel runs on CPU (msrun workers / torchrun processes).
    validate_parallel(ParallelConfig(data_parallel=2), tiny_model, 2, "mindspore", "CPU")
    validate_parallel(ParallelConfig(data_parallel=2, fsdp=True), tiny_model, 2, "torch", "CPU")


def test_backend_specific_options(tiny_model):
    with pytest.raises(ValueError, match=r"PyTorch backend supports data parallelism only \(DDP, or FSDP"):
        validate_parallel(semi(model_parallel=2), tiny_model, 2, "torch", "GPU")
    with pytest.raises(ValueError, match=r"use parallel.fsdp"):
        validate_parallel(ParallelConfig(data_parallel=2, optimizer_shard=True), tiny_model, 2, "torch")
    with pytest.raises(ValueError, match=r"parallel.fsdp is PyTorch only"):
        validate_parallel(ParallelConfig(data_parallel=2, fsdp=True), tiny_model, 2, "mindspore")
    with pytest.raises(ValueError, match=r"need parallel.mode semi_auto_parallel"):
        validate_parallel(ParallelConfig(model_parallel=2), tiny_model, 2, "mindspore", "Ascend")
    with pytest.raises(ValueError, match=r"optimizer_shard with parallel.mode data_parallel needs Ascend"):
        validate_parallel(ParallelConfig(data_parallel=2, optimizer_shard=True), tiny_model, 2, "mindspore", "GPU")


def test_all_problems_are_reported_at_once(big_model):
    with pytest.raises(ValueError) as err:
        validate_parallel(ParallelConfig(model_parallel=3, pipeline_stages=3), big_model, 8, "torch")
    text = str(err.value)
    for needle in ("= 9 devices, but 8 are launched", "model.num_heads 32", "model.num_layers 40",
                   "PyTorch backend supports data parallelism only"):
        assert needle in text


def test_batch_divisibility():
    assert validate_batch(ParallelConfig(data_parallel=4), 32) == 8
    with pytest.raises(ValueError, match=r"global batch size 30 is not divisible by parallel.data_parallel 4 = 4"):
        validate_batch(ParallelConfig(data_parallel=4), 30)
    pipe = semi(data_parallel=2, pipeline_stages=2, micro_batch_num=4)
    with pytest.raises(ValueError, match=r"parallel.data_parallel 2 x parallel.micro_batch_num 4 = 8"):
        validate_batch(pipe, 12)
    assert validate_batch(pipe, 16) == 8


def test_megatron_strategies_on_the_tiny_mindspore_gpt():
    from mindspore_impl.parallel import apply_shard_strategies

    config = taichu.load_config(TINY)
    model = taichu.build_model(config, "mindspore")
    p = semi(data_parallel=2, model_parallel=2, pipeline_stages=2, micro_batch_num=2, recompute=True)
    strategies = apply_shard_strategies(model, p)

    for i, block in enumerate(model.layers):
        column = {"attn.q_proj": block.attn.q_proj, "attn.k_proj": block.attn.k_proj,
                  "attn.v_proj": block.attn.v_proj, "mlp.fc_in": block.mlp.fc_in}
        row = {"attn.out_proj": block.attn.out_proj, "mlp.fc_out": block.mlp.fc_out}
        for name, dense in column.items():
            # nn.Dense multiplies x [tokens, in] by W [out, in] transposed: split W's out rows.
            assert dense.matmul.transpose_b
            assert dense.matmul.attrs["in_strategy"] == ((2, 1), (2, 1))
            assert dense.bias_add.attrs["in_strategy"] == ((2, 2), (2,))
            assert strategies[f"layers.{i}.{name}.matmul"] == ((2, 1), (2, 1))
        for name, dense in row.items():
            assert dense.matmul.attrs["in_strategy"] == ((2, 2), (1, 2))
            assert dense.bias_add.attrs["in_strategy"] == ((2, 1), (1,))
            assert strategies[f"layers.{i}.{name}.bias_add"] == ((2, 1), (1,))
        assert block.pipeline_stage == i  # 2 layers over 2 stages
        assert block._has_config_recompute
    assert model.embed_tokens.gather.attrs["in_strategy"] == ((2, 1), (2,))  # split by vocab
    assert model.embed_positions.gather.attrs["in_strategy"] == ((1, 1), (2,))
    assert model.embed_tokens.pipeline_stage == 0 and model.ln_f.pipeline_stage == 1
    assert len(strategies) == 2 + 2 * 6 * 2  # embeddings + 2 layers x 6 Dense x (matmul, bias_add)

    with pytest.raises(ValueError, match=r"parallel.model_parallel 3 does not divide model.num_heads 4"):
        apply_shard_strategies(model, semi(model_parallel=3))


def test_configure_auto_parallel_refuses_semi_auto_on_cpu():
    from mindspore_impl.parallel import configure_auto_parallel

    # Raised before set_auto_parallel_context, which would accept it and fail at compile.
    with pytest.raises(ValueError, match=r"MindSpore semi-auto parallel .* needs Ascend or GPU"):
        configure_auto_parallel(semi(model_parallel=2), "CPU")
    assert configure_auto_parallel(ParallelConfig(), "CPU") == {}  # one process: nothing to set


def test_launch_commands():
    cli = str(ROOT / "taichu" / "cli.py")
    assert launch_command("c.yaml", "mindspore", 8, ["--set", "train.steps=10"], 29501, "out/msrun_logs") == [
        "msrun", "--worker_num=8", "--local_worker_num=8", "--master_port=29501", "--join=True",
        "--log_dir=out/msrun_logs", cli, "train", "c.yaml", "--backend", "mindspore", "--set", "train.steps=10"]
    assert launch_command("c.yaml", "torch", 4, ["--set", "a=1"], 29502) == [
        "torchrun", "--nnodes=1", "--master_port=29502", "--nproc_per_node=4", "-m", "taichu",
        "train", "c.yaml", "--backend", "torch", "--set", "a=1"]
    assert launch_command("c.yaml", "torch", 2, [], None)[:3] == ["torchrun", "--standalone", "--nproc_per_node=2"]
    assert format_command(launch_command("my dir/c.yaml", "torch", 2, [])).endswith(
        "-m taichu train 'my dir/c.yaml' --backend torch")
    with pytest.raises(ValueError, match="backend"):
        launch_command("c.yaml", "jax", 2, [])


def _options(launcher: str) -> set[str]:
    help_text = subprocess.run([str(BIN / launcher), "--help"], capture_output=True, text=True,
                               check=True).stdout
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", help_text))


@pytest.mark.parametrize("backend, launcher", [("mindspore", "msrun"), ("torch", "torchrun")])
def test_launchers_know_every_flag_we_emit(backend, launcher):
    options = _options(launcher)
    for port in (29500, None):
        command = launch_command(str(TINY), backend, 2, [], port)
        launcher_args = command[1:command.index("train")]
        for arg in launcher_args:
            if arg.startswith("-"):
                assert arg.split("=")[0] in options, f"{launcher} has no option {arg}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backend", ["mindspore", "torch"])
def test_launch_prefix_really_starts_two_workers(backend, tmp_path):
    """The launcher part of the command, run for real with `taichu info` on two CPU workers."""
    command = launch_command(str(TINY), backend, 2, [], _free_port(), str(tmp_path / "logs"))
    command = [str(BIN / command[0])] + command[1:command.index("train")] + ["info", str(TINY)]
    # msrun starts workers with the `python` on PATH: put this environment's first.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    if backend == "mindspore":
        logs = [(tmp_path / "logs" / f"worker_{rank}.log").read_text() for rank in range(2)]
    else:
        logs = [run.stdout]
    assert sum(len(re.findall(r"family:\s+gpt", log)) for log in logs) == 2

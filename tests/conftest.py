from pathlib import Path

import numpy as np
import pytest

from taichu.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def logged_losses(run_dir) -> dict:
    """{step: training loss} of a run's metrics.jsonl (what the parity tests compare)."""
    from taichu.train import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


class LoggedProcess:
    """A command run beside the test, its output to a log file (so no pipe fills up): the
    test goes on with other work, then ``finish()`` waits for it and asserts that it
    succeeded (showing the log's end if not). As a context manager it is killed on the way
    out, so a failing test leaves nothing running."""

    def __init__(self, command: list, log: Path):
        import subprocess

        self.log = Path(log)
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)

    def finish(self, timeout: float = 600) -> str:
        """Wait for the command; its output, after asserting that it exited with 0."""
        self.process.wait(timeout=timeout)
        output = self.log.read_text()
        assert self.process.returncode == 0, output[-3000:]
        return output

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.process.kill()
        self.process.wait()


def export_models(model_dirs: dict, root: Path, mindir: tuple = ()) -> dict:
    """{(name, format): (export directory, export_info, log lines)}: every model exported to
    ONNX here while the ``mindir`` ones are exported to MINDIR by `taichu export` in a process
    of their own (output to a file, so no pipe fills up); the two overlap in time."""
    import json
    import subprocess
    import sys

    from export.exporter import export_model

    log = root / "mindir.log"
    commands = " && ".join(f"{sys.executable} -m taichu export {model_dirs[name]} --format mindir "
                           f"--out {root / (name + '-mindir')}" for name in mindir) or "true"
    with open(log, "w") as out:
        process = subprocess.Popen(commands, shell=True, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        done = {}
        for name, model_dir in model_dirs.items():
            lines = []
            info = export_model(model_dir, "onnx", root / f"{name}-onnx", log=lines.append)
            done[name, "onnx"] = (root / f"{name}-onnx", info, lines)
        process.wait(timeout=300)
    finally:
        process.kill()
        process.wait()
    output = log.read_text()
    assert process.returncode == 0, output[-3000:]
    for name in mindir:
        target = root / f"{name}-mindir"
        done[name, "mindir"] = (target, json.loads((target / "export_info.json").read_text()), output.splitlines())
    return done


@pytest.fixture(scope="session")
def imagetext_cache(tmp_path_factory):
    """One tokenizer cache for the session: the tiny image-text configs (CLIP, BriVL, the
    distillation tests) train the same tokenizer (People's Daily + the digit captions, vocab
    4096), once."""
    return tmp_path_factory.mktemp("imagetext-cache") / "data"


@pytest.fixture
def tiny_config():
    return load_config(CONFIGS / "gpt" / "gpt-tiny.yaml")


@pytest.fixture
def eager_mindspore_eval(monkeypatch):
    """MindSpore's trainer computes its validation losses eagerly (PyNative), its training
    step still compiled: for the tests that compare the training losses of the two backends
    and not the validation losses, whose graph (built for the step-0 and last-step
    evaluations, once per batch shape) would take a sixth to a third of the test compiling.
    The eager loss is the same function of the same weights and batch."""
    from mindspore_impl.train import Trainer

    compiled_init = Trainer.__init__

    def init(self, *args, **kwargs):
        compiled_init(self, *args, **kwargs)
        assert callable(self._eval), "the Trainer's compiled validation loss has moved: update this fixture"
        self._eval = self._loss

    monkeypatch.setattr(Trainer, "__init__", init)


@pytest.fixture(params=["pynative", "graph"])
def ms_mode(request):
    """Run a test in MindSpore PyNative and in graph mode, restoring PyNative after."""
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE if request.param == "graph" else ms.PYNATIVE_MODE)
    yield request.param
    ms.set_context(mode=ms.PYNATIVE_MODE)


def padded_batch(rng, vocab_size, lengths, pad_id=0, left=True):
    """Token ids and attention mask for rows of the given real lengths."""
    width = max(lengths)
    ids = np.full((len(lengths), width), pad_id, np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for row, n in enumerate(lengths):
        span = slice(width - n, width) if left else slice(0, n)
        ids[row, span] = rng.integers(4, vocab_size, n)
        mask[row, span] = 1
    return ids, mask


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """The tiny config's tokenizer, trained once per session by the real CLI command."""
    import subprocess
    import sys

    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    subprocess.run([sys.executable, "-m", "taichu", "tokenizer", "train",
                    str(CONFIGS / "gpt" / "gpt-tiny.yaml"), "--out", str(path)],
                   check=True, capture_output=True, text=True)
    return path


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory, tiny_tokenizer):
    """gpt-tiny trained for 60 PyTorch steps on People's Daily: a model directory whose
    logits mean something (random weights give near-ties that hide real differences).
    GPT-2's activation, so Hugging Face can serve as an oracle on it too."""
    import torch

    import taichu
    from taichu.train import run_training

    root = tmp_path_factory.mktemp("trained_tiny")
    config = load_config(CONFIGS / "gpt" / "gpt-tiny.yaml", [
        f"data.cache_dir={root / 'cache'}", "train.max_steps=60", "train.warmup_steps=5",
        "train.batch_size=16", "train.learning_rate=5e-3", "train.eval_interval=1000",
        "train.eval_batches=1", "model.activation=gelu_new"])
    torch.manual_seed(0)
    init = taichu.save_model(taichu.build_model(config, "torch"), root / "init", tokenizer=tiny_tokenizer)
    return run_training(config, "torch", root / "run", init_dir=init, progress=False).final_dir


def _machine_lines() -> list[str]:
    """CPU, thread counts and library versions, so that a failure report says which machine
    and which kernels it came from (float32 results differ by kernel choice)."""
    import os
    import platform
    from importlib import metadata

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    simd = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")
            if f in flags]
    versions = []
    for package in ("torch", "mindspore", "numpy", "onnxruntime", "onnx", "transformers", "sentencepiece"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} missing")
    threads = [f"cpus {os.cpu_count()}"] + [f"{k}={os.environ[k]}" for k in (
        "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ATEN_CPU_CAPABILITY",
        "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "OPENBLAS_CORETYPE",
        "TAICHU_TEST_MS_THREADS") if k in os.environ]
    try:
        import torch

        threads.append(f"torch threads {torch.get_num_threads()} "
                       f"(cpu capability {torch.backends.cpu.get_cpu_capability()})")
    except ImportError:
        pass
    return [f"cpu: {cpu}; {' '.join(simd) or 'no simd flags read'}; {platform.machine()} {platform.system()}",
            f"threads: {', '.join(threads)}",
            f"versions: python {platform.python_version()}, {', '.join(versions)}"]


def pytest_sessionstart(session):
    import os

    # `make shake` runs the parity tests with MindSpore's op threads set too (its default is 25).
    if os.environ.get("TAICHU_TEST_MS_THREADS"):
        import mindspore as ms

        ms.device_context.cpu.op_tuning.threads_num(int(os.environ["TAICHU_TEST_MS_THREADS"]))
    # Written through the terminal reporter so that it shows under -q too (report headers do not).
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        for line in _machine_lines():
            reporter.write_line(line)


def perturbed_state(model, seed=0, scale=0.3):
    """A model's canonical arrays, every float tensor moved by noise: the init's zero biases
    and unit norms would hide a swapped or dropped tensor in a parity test. Integer tensors
    (BriVL's queue_ptr, num_updates) are kept."""
    from taichu.api import state_dict

    rng = np.random.default_rng(seed)
    return {name: (np.asarray(array + scale * rng.standard_normal(array.shape)).astype(array.dtype)
                   if array.dtype.kind == "f" else array)
            for name, array in state_dict(model).items()}

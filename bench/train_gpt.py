"""Training-step throughput of the GPT: torch_impl vs mindspore_impl vs Hugging Face GPT-2.

Same config (gpt-small, dropout 0), same token batch, same optimizer math (AdamW, global
norm clipping, mean token cross-entropy on inputs = block[:, :-1], targets = block[:, 1:]).
Ours run through the real Trainer classes; Hugging Face's GPT2LMHeadModel (built offline,
the same architecture) runs in an equivalent torch loop. Reported: tokens/s, the ratio to
Hugging Face, and achieved FLOP/s as a fraction of this machine's measured fp32 matmul peak.

Each framework runs in its own subprocess (clean thread pools and memory). torch_impl and
Hugging Face alternate step by step in one process, so background load hits both alike.
Numbers are compared within one run; nothing here is a test.

    .venv/bin/python bench/train_gpt.py                 # table to stdout and docs/benchmarks.md
    .venv/bin/python bench/train_gpt.py --breakdown     # + forward/backward/optimizer, top ops
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Training step (bench/train_gpt.py)"
BEGIN, END = "<!-- train_gpt:begin -->", "<!-- train_gpt:end -->"
CORES = os.cpu_count() or 1


# ---------------------------------------------------------------- shared helpers

def load_config(args, *extra):
    import taichu

    overrides = [f"train.batch_size={args.batch_size}", f"data.seq_len={args.seq_len}",
                 "train.grad_accum_steps=1", *args.set, "model.dropout=0.0",
                 "model.attention_dropout=0.0", *extra]
    return taichu.load_config(args.config, overrides)


def token_batch(config, args) -> np.ndarray:
    """The one batch every implementation trains on: [batch, seq_len + 1] int64."""
    rng = np.random.default_rng(0)
    return rng.integers(0, config.model.vocab_size, (args.batch_size, args.seq_len + 1))


def flops_per_token(config, seq_len: int) -> tuple[float, int]:
    """Training FLOPs per token, 6 N + 12 L H T (PaLM appendix B, nanoGPT estimate_mfu).

    N counts every parameter except the position table: the tied token table is counted
    once, for the output projection (a real vocab x hidden matmul); the lookup is free.
    """
    import taichu

    m = config.model
    n = taichu.num_parameters(config) - m.max_position_embeddings * m.hidden_size
    return 6.0 * n + 12.0 * m.num_layers * m.hidden_size * seq_len, n


def best_time(fn, repeats: int) -> float:
    fn()  # warm: first call allocates / compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak(matmul, make, sizes=(2048, 3072, 4096), repeats=3) -> float:
    """Best fp32 GFLOP/s of square GEMMs: the ceiling a training step can approach."""
    best = 0.0
    for n in sizes:
        a, b = make(n), make(n)
        best = max(best, 2 * n**3 / best_time(lambda: matmul(a, b), repeats) / 1e9)
    return best


def timed_steps(steps: dict, warmup: int, count: int) -> dict:
    """Run each step function warmup + count times, interleaved; per-step seconds."""
    result = {name: {"first": None, "times": [], "losses": []} for name in steps}
    for i in range(warmup + count):
        for name, step in steps.items():
            start = time.perf_counter()
            loss = step()
            elapsed = time.perf_counter() - start
            entry = result[name]
            entry["losses"].append(loss)
            if i == 0:
                entry["first"] = elapsed
            if i >= warmup:
                entry["times"].append(elapsed)
            print(f"  {name:22s} step {i:2d} {elapsed:7.2f} s  loss {loss:.4f}", file=sys.stderr,
                  flush=True)
    return result


# ---------------------------------------------------------------- torch worker

def torch_worker(args) -> dict:
    import torch
    import transformers
    from torch.nn import functional as F

    import taichu
    from taichu.train import decay_names
    from torch_impl.train import Trainer

    torch.set_num_threads(CORES)
    out = {"torch_version": torch.__version__, "transformers_version": transformers.__version__,
           "threads": torch.get_num_threads()}
    out["peak_torch"] = matmul_peak(torch.mm, lambda n: torch.randn(n, n))

    config = load_config(args)
    m, train = config.model, config.train
    block = token_batch(config, args)
    lr = train.learning_rate

    torch.manual_seed(0)
    ours = Trainer(taichu.build_model(config, "torch"), config, decay_names(config), 0, 1)

    # Hugging Face GPT-2 with our shape; "gelu" in HF is the exact erf GELU, like ours.
    hf_config = transformers.GPT2Config(
        vocab_size=m.vocab_size, n_positions=m.max_position_embeddings, n_embd=m.hidden_size,
        n_layer=m.num_layers, n_head=m.num_heads, n_inner=m.ffn_size,
        activation_function={"gelu": "gelu", "gelu_new": "gelu_new", "relu": "relu"}[m.activation],
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=m.layer_norm_eps,
        use_cache=False)
    hf = transformers.GPT2LMHeadModel(hf_config).train()
    out["hf_attention"] = hf.config._attn_implementation
    # Same grouping as ours: decay on matrices (HF Conv1D/Linear weights), not on
    # biases, norms or embeddings; same betas, eps and clipping.
    decay = [p for n, p in hf.named_parameters() if p.dim() == 2 and "wte" not in n and "wpe" not in n]
    no_decay = [p for n, p in hf.named_parameters() if not (p.dim() == 2 and "wte" not in n
                                                              and "wpe" not in n)]
    hf_opt = torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                                {"params": no_decay, "weight_decay": 0.0}],
                               lr=lr, betas=(train.beta1, train.beta2), eps=train.eps)
    tokens = torch.from_numpy(block)

    def hf_loss():
        logits = hf(input_ids=tokens[:, :-1]).logits
        return F.cross_entropy(logits.float().reshape(-1, m.vocab_size), tokens[:, 1:].reshape(-1))

    def hf_step():
        hf_opt.zero_grad(set_to_none=True)
        loss = hf_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), train.max_grad_norm or float("inf"))
        hf_opt.step()
        return float(loss)

    steps = {"torch_impl": lambda: ours.train_step([block], lr)[0], "huggingface": hf_step}
    out["runs"] = timed_steps(steps, args.warmup_steps, args.steps)

    if args.breakdown:
        def ours_backward():
            ours.optimizer.zero_grad(set_to_none=True)
            ours._loss(ours.module, block).backward()

        def hf_backward():
            hf_opt.zero_grad(set_to_none=True)
            hf_loss().backward()

        def hf_forward():
            with torch.no_grad():
                hf_loss()

        reps = 2
        out["parts"] = {
            "torch_impl": {"forward": best_time(lambda: ours.eval_loss(block), reps),
                           "forward+backward": best_time(ours_backward, reps)},
            "huggingface": {"forward": best_time(hf_forward, reps),
                            "forward+backward": best_time(hf_backward, reps)},
        }
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            ours.train_step([block], lr)
        rows = [(e.key, e.self_cpu_time_total / 1e3) for e in prof.key_averages()]
        out["top_ops"] = {"torch_impl": top_ops(rows)}
    return out


def top_ops(rows, count=10):
    """[(name, ms per step, share)] of the most expensive op types."""
    total = sum(ms for _, ms in rows)
    rows = sorted(rows, key=lambda row: -row[1])[:count]
    return [(name, ms, ms / total) for name, ms in rows]


# ---------------------------------------------------------------- MindSpore worker

def mindspore_worker(args, graph_mode: bool) -> dict:
    import mindspore as ms

    ms.set_device("CPU")
    # The CPU kernel pool defaults to 25 threads whatever the core count: use the cores.
    ms.device_context.cpu.op_tuning.threads_num(CORES)
    import taichu
    from taichu.train import decay_names
    from mindspore_impl.train import Trainer

    out = {"mindspore_version": ms.__version__, "threads": CORES}
    if graph_mode:
        @ms.jit
        def matmul(a, b):
            return ms.ops.matmul(a, b)

        out["peak_mindspore"] = matmul_peak(
            lambda a, b: matmul(a, b).asnumpy(),
            lambda n: ms.Tensor(np.random.default_rng(n).standard_normal((n, n), np.float32)),
            sizes=(2048, 3072))

    config = load_config(args, f"train.graph_mode={str(graph_mode).lower()}")
    block = token_batch(config, args)
    lr = config.train.learning_rate
    ms.set_seed(0)
    trainer = Trainer(taichu.build_model(config, "mindspore"), config, decay_names(config), 0, 1)
    name = "mindspore_impl graph" if graph_mode else "mindspore_impl pynative"
    warmup, count = ((args.warmup_steps, args.steps) if graph_mode
                     else (1, args.pynative_steps))
    out["runs"] = timed_steps({name: lambda: trainer.train_step([block], lr)[0]}, max(1, warmup),
                              count)

    if args.breakdown and graph_mode:
        batch = ms.Tensor(block.astype(np.int32))
        scale = ms.Tensor(1.0, ms.float32)

        def forward_backward():
            # The Trainer's own compiled gradient graph (the grad-accumulation path).
            loss, grads = trainer._forward_backward(batch[:, :-1], batch[:, 1:], scale)
            return float(loss)

        parts = {}
        for part, fn in (("forward", lambda: trainer.eval_loss(block)),
                         ("forward+backward", forward_backward)):
            start = time.perf_counter()
            fn()
            parts[f"{part} compile"] = time.perf_counter() - start
            parts[part] = best_time(fn, 2)
        out["parts"] = {name: parts}
        out["top_ops"] = {name: mindspore_top_ops(trainer, block, lr)}
    return out


def mindspore_top_ops(trainer, block, lr):
    """Per-op-type time of one compiled step from mindspore.profiler (works on CPU)."""
    import csv

    import mindspore as ms
    from mindspore.profiler import ProfilerActivity, tensorboard_trace_handler

    with tempfile.TemporaryDirectory() as folder:
        with ms.profiler.profile(activities=[ProfilerActivity.CPU],
                                 on_trace_ready=tensorboard_trace_handler(folder)) as prof:
            trainer.train_step([block], lr)
            prof.step()
        rows = {}
        for path in Path(folder).rglob("cpu_op_detail_info_*.csv"):
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    # Scope tells forward from backward ("Gradients/...") and exposes
                    # ops that the 3-D x 2-D matmul expands into ("Expand/_MatMulExt/...").
                    scope = "grad " if row["full_op_name"].startswith("Gradients/") else ""
                    if "_MatMulExt" in row["full_op_name"]:
                        scope += "matmul-3d "
                    key = scope + row["op_type"]
                    rows[key] = rows.get(key, 0.0) + float(row["op_total_time(ms)"])
    return top_ops(list(rows.items()), count=12)


# ---------------------------------------------------------------- orchestration

def run_worker(kind: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        cmd = [sys.executable, __file__, "--worker", kind, "--result", result.name, *args.passthrough]
        print(f"[{kind}]", file=sys.stderr, flush=True)
        start = time.perf_counter()
        # GLOG_v=3: MindSpore errors only; its warnings print whole tensors.
        env = {**os.environ, "GLOG_v": os.environ.get("GLOG_v", "3")}
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=sys.stderr, env=env)
        out = json.loads(Path(result.name).read_text())
        out["wall"] = time.perf_counter() - start
        return out


def numpy_peak() -> float:
    return matmul_peak(np.matmul, lambda n: np.random.default_rng(n).standard_normal(
        (n, n), np.float32), sizes=(2048, 3072))


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        flags = next((l for l in Path("/proc/cpuinfo").read_text().splitlines()
                      if l.startswith("flags")), "")
        simd = [f for f in ("avx512f", "avx2", "fma") if f" {f}" in flags]
        model += f" ({', '.join(simd)})" if simd else ""
    except OSError:
        pass
    return f"{CORES} cores, {model}, {platform.system()} {platform.machine()}"


def report(args, results: dict, extras: dict, wall: float) -> str:
    config = load_config(args)
    tokens = args.batch_size * args.seq_len
    per_token, n = flops_per_token(config, args.seq_len)
    torch_out = results["torch"]
    peak = torch_out["peak_torch"]
    rows, runs = [], {}
    for kind, out in results.items():
        for name, run in out["runs"].items():
            runs[name] = (run, out["threads"])
    hf_median = statistics.median(runs["huggingface"][0]["times"])
    lines = ["| implementation | threads | first step (s) | median step (s) | step range (s) "
             "| tokens/s | vs HF | GFLOP/s | MFU |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, (run, threads) in runs.items():
        median = statistics.median(run["times"])
        flops = tokens * per_token / median
        lines.append(f"| {name} | {threads} | {run['first']:.1f} | {median:.2f} | "
                     f"{min(run['times']):.2f}-{max(run['times']):.2f} | {tokens / median:.0f} | "
                     f"{hf_median / median:.2f}x | {flops / 1e9:.1f} | {flops / 1e9 / peak:.0%} |")
    ms_out = results.get("mindspore", {})
    m = config.model
    notes = [
        f"- Shape: `{args.config}` (hidden {m.hidden_size}, {m.num_layers} layers, "
        f"{m.num_heads} heads, vocab {m.vocab_size}, activation {m.activation}), dropout 0, "
        f"batch {args.batch_size} x seq_len {args.seq_len} = {tokens} tokens/step, fp32, "
        f"AdamW + clip {config.train.max_grad_norm}.",
        f"- Steps: {args.warmup_steps} warm-up step(s) excluded (the first MindSpore graph step "
        f"compiles), then {args.steps} timed ({args.pynative_steps} for PyNative); tokens/s = "
        f"tokens per step / median step time. torch_impl and Hugging Face alternate step by step.",
        f"- FLOPs/token = 6 N + 12 L H T = 6 x {n:,} + 12 x {m.num_layers} x {m.hidden_size} x "
        f"{args.seq_len} = {per_token / 1e6:.1f} MFLOP (N = parameters without the position "
        "table; the tied output projection counted once, as a matmul).",
        f"- Matmul peak (fp32, best square GEMM 2048-4096): torch {peak:.1f} GFLOP/s (MFU "
        f"denominator), numpy {extras['numpy_peak']:.1f}"
        + (f", MindSpore {ms_out['peak_mindspore']:.1f}" if "peak_mindspore" in ms_out else "")
        + " GFLOP/s.",
        f"- Threads: torch.set_num_threads({CORES}); MindSpore "
        f"`device_context.cpu.op_tuning.threads_num({CORES})` (default 25). Hugging Face "
        f"attention: `{torch_out['hf_attention']}`.",
        f"- Initial losses (same batch, independent inits): "
        + ", ".join(f"{name} {run['losses'][0]:.3f}" for name, (run, _) in runs.items())
        + f". 1-minute load average before/after: {extras['load_before']:.2f} / "
        f"{extras['load_after']:.2f} (other processes share the cores).",
    ]
    parts = {}
    for out in results.values():
        parts.update(out.get("parts", {}))
    breakdown = []
    if parts:
        breakdown += ["", "Breakdown (best of 2, seconds; optimizer = median step - forward+backward):", "",
                      "| implementation | forward (eval_loss) | forward+backward | clip+AdamW+rest | compile fwd / fwd+bwd |",
                      "| --- | ---: | ---: | ---: | ---: |"]
        for name, part in parts.items():
            rest = statistics.median(runs[name][0]["times"]) - part["forward+backward"]
            compile_ = (f"{part['forward compile']:.1f} / {part['forward+backward compile']:.1f}"
                        if "forward compile" in part else "-")
            breakdown.append(f"| {name} | {part['forward']:.2f} | {part['forward+backward']:.2f} "
                             f"| {rest:.2f} | {compile_} |")
        for out in results.values():
            for name, ops in out.get("top_ops", {}).items():
                breakdown += ["", f"Top ops of one {name} step (self time):", "",
                              "| op | ms | share |", "| --- | ---: | ---: |"]
                breakdown += [f"| {op} | {ms:.0f} | {share:.0%} |" for op, ms, share in ops]
    versions = (f"torch {torch_out['torch_version']}, mindspore {ms_out.get('mindspore_version', '-')}, "
                f"transformers {torch_out['transformers_version']}, numpy {np.__version__}, "
                f"Python {platform.python_version()}")
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/train_gpt.py",
                                                *args.passthrough])
    header = [f"{datetime.date.today().isoformat()}, {machine()}; {versions}.",
              f"Command: `{command}` (total {wall:.0f} s).", ""]
    return "\n".join(header + lines + [""] + notes + breakdown)


def write_doc(text: str) -> None:
    block = f"{BEGIN}\n{text}\n{END}"
    doc = DOC.read_text(encoding="utf-8") if DOC.exists() else "# Benchmarks\n"
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        doc = head + block + rest.split(END, 1)[1]
    else:
        doc = doc.rstrip("\n") + f"\n\n{SECTION}\n\n{block}\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(doc, encoding="utf-8")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/gpt/gpt-small.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (repeatable); dropout is forced to 0")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per implementation")
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--pynative-steps", type=int, default=2,
                        help="timed MindSpore PyNative steps (0 skips PyNative)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time forward / forward+backward and list the top ops")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--worker", choices=["torch", "mindspore", "pynative"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    if args.worker:
        out = (torch_worker(args) if args.worker == "torch"
               else mindspore_worker(args, graph_mode=args.worker == "mindspore"))
        Path(args.result).write_text(json.dumps(out))
        return

    args.passthrough = [a for a in (argv if argv is not None else sys.argv[1:])
                        if a not in ("--no-doc",)]
    start = time.perf_counter()
    extras = {"load_before": os.getloadavg()[0], "numpy_peak": numpy_peak()}
    results = {"torch": run_worker("torch", args), "mindspore": run_worker("mindspore", args)}
    if args.pynative_steps:
        results["pynative"] = run_worker("pynative", args)
    extras["load_after"] = os.getloadavg()[0]
    text = report(args, results, extras, time.perf_counter() - start)
    print(text)
    if not args.no_doc:
        write_doc(text)
        print(f"\nwrote {DOC.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()

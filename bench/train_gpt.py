"""Training-step throughput of the GPT: torch_impl vs mindspore_impl vs Hugging Face GPT-2.

Same config (gpt-small, dropout 0), same token batch, same optimizer math (AdamW, global
norm clipping, mean token cross-entropy on inputs = block[:, :-1], targets = block[:, 1:]).
Ours run through the real Trainer classes; Hugging Face's GPT2LMHeadModel (built offline,
the same architecture) runs in an equivalent torch loop. Reported: tokens/s, the ratio to
Hugging Face, and achieved FLOP/s as a fraction of this machine's measured fp32 matmul peak.

Each framework runs in its own worker process, one after another (clean thread pools;
a MindSpore graph-mode worker alone holds ~6 GB at gpt-small). torch_impl and Hugging
Face share one worker and alternate step by step, so load from other processes hits both
alike. Ratios within one run are the result; nothing here is a test.

    .venv/bin/python bench/train_gpt.py                # table to stdout and docs/benchmarks.md
    .venv/bin/python bench/train_gpt.py --breakdown    # + forward / backward / optimizer, top ops
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

from benchdoc import CORES, WAIT_IDLE, cpu_ticks, drive, machine, others_share, settle

ROOT = Path(__file__).resolve().parents[1]
NAME = "train_gpt"
SECTION = "## Training step (bench/train_gpt.py)"
WORKERS = ("torch", "mindspore", "pynative", "parts")
RSS_LABELS = {"torch": "torch (torch_impl and Hugging Face together)",
              "mindspore": "mindspore_impl graph", "pynative": "mindspore_impl pynative",
              "parts": "MindSpore forward + gradient graphs (breakdown)"}


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




def best_time(fn, repeats: int, warm: int = 1) -> float:
    for _ in range(warm):
        fn()  # warm: first call allocates / compiles
    times = []
    for _ in range(repeats):
        settle()
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






def top_ops(rows, count=10):
    """[(name, ms per step, share)] of the most expensive op types."""
    total = sum(ms for _, ms in rows)
    rows = sorted(rows, key=lambda row: -row[1])[:count]
    return [(name, ms, ms / total) for name, ms in rows]


# ---------------------------------------------------------------- torch worker

def torch_worker(args):
    """(info, {name: step function}, finish function) for torch_impl and Hugging Face."""
    import torch
    import transformers
    from torch.nn import functional as F

    import taichu
    from taichu.train import decay_names
    from torch_impl.train import Trainer

    torch.set_num_threads(CORES)
    info = {"torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "threads": torch.get_num_threads(),
            "peak_torch": matmul_peak(torch.mm, lambda n: torch.randn(n, n))}
    config = load_config(args)
    m, train = config.model, config.train
    block = token_batch(config, args)
    lr = train.learning_rate

    torch.manual_seed(0)
    ours = Trainer(taichu.build_model(config, "torch"), config, decay_names(config), 0, 1)

    # Hugging Face GPT-2 with our shape; HF's "gelu" is the exact erf GELU, like ours.
    hf_config = transformers.GPT2Config(
        vocab_size=m.vocab_size, n_positions=m.max_position_embeddings, n_embd=m.hidden_size,
        n_layer=m.num_layers, n_head=m.num_heads, n_inner=m.ffn_size,
        activation_function=m.activation, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=m.layer_norm_eps, use_cache=False,
        bos_token_id=config.tokenizer.special_tokens.bos_id,
        eos_token_id=config.tokenizer.special_tokens.eos_id)
    hf = transformers.GPT2LMHeadModel(hf_config).train()
    info["hf_attention"] = hf.config._attn_implementation
    # Our grouping: decay on matrices (HF Conv1D weights), not biases, norms, embeddings.
    is_decay = {n: p.dim() == 2 and not n.startswith("transformer.wte")
                and not n.startswith("transformer.wpe") for n, p in hf.named_parameters()}
    hf_opt = torch.optim.AdamW(
        [{"params": [p for n, p in hf.named_parameters() if is_decay[n]],
          "weight_decay": train.weight_decay},
         {"params": [p for n, p in hf.named_parameters() if not is_decay[n]],
          "weight_decay": 0.0}],
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
        return float(loss.detach())

    def finish():
        # The peak again, after the steps: the better of two reads is less disturbed by
        # other processes on the machine.
        out = {"peak_torch": max(info["peak_torch"],
                                 matmul_peak(torch.mm, lambda n: torch.randn(n, n)))}
        if not args.breakdown:
            return out

        def ours_backward():
            ours.optimizer.zero_grad(set_to_none=True)
            ours._loss(ours.module, {"input_ids": block})[0].backward()

        def hf_backward():
            hf_opt.zero_grad(set_to_none=True)
            hf_loss().backward()

        def hf_forward():
            with torch.no_grad():
                hf_loss()

        def clip_step(model, optimizer):
            # After a backward the gradients stay in place: clip and step repeatedly.
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.max_grad_norm or float("inf"))
            optimizer.step()

        out["parts"] = {
            "torch_impl": {"forward": best_time(lambda: ours.eval_loss({"input_ids": block}), 2),
                           "forward+backward": best_time(ours_backward, 2),
                           "clip+AdamW": best_time(lambda: clip_step(ours.model, ours.optimizer),
                                                   2)},
            "huggingface": {"forward": best_time(hf_forward, 2),
                            "forward+backward": best_time(hf_backward, 2),
                            "clip+AdamW": best_time(lambda: clip_step(hf, hf_opt), 2)}}
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            ours.train_step([{"input_ids": block}], lr)
        out["top_ops"] = {"torch_impl": top_ops(
            [(e.key, e.self_cpu_time_total / 1e3) for e in prof.key_averages()])}
        return out

    steps = {"torch_impl": lambda: ours.train_step([{"input_ids": block}], lr)[0], "huggingface": hf_step}
    return info, steps, finish


# ---------------------------------------------------------------- MindSpore worker

def mindspore_worker(args, mode: str):
    """mode "graph" | "pynative": (info, {name: step}, finish); "parts": info only."""
    import mindspore as ms

    ms.set_device("CPU")
    # The CPU kernel pool defaults to 25 threads whatever the core count: use the cores.
    ms.device_context.cpu.op_tuning.threads_num(CORES)
    import taichu
    from taichu.train import decay_names
    from mindspore_impl.train import Trainer

    info = {"mindspore_version": ms.__version__, "threads": CORES}
    if mode == "graph":
        @ms.jit
        def matmul(a, b):
            return ms.ops.matmul(a, b)

        info["peak_mindspore"] = matmul_peak(
            lambda a, b: matmul(a, b).asnumpy(),
            lambda n: ms.Tensor(np.random.default_rng(n).standard_normal((n, n), np.float32)),
            sizes=(2048, 3072))

    # The parts worker times the accumulation path's graphs: they exist with 2 micro-batches.
    config = load_config(args, f"train.graph_mode={str(mode != 'pynative').lower()}",
                         *(["train.grad_accum_steps=2"] if mode == "parts" else []))
    block = token_batch(config, args)
    lr = config.train.learning_rate
    ms.set_seed(0)
    trainer = Trainer(taichu.build_model(config, "mindspore"), config, decay_names(config), 0, 1)
    name = "mindspore_impl pynative" if mode == "pynative" else "mindspore_impl graph"

    if mode == "parts":
        # Every compiled graph keeps its own memory (see the RSS notes): these two graphs
        # get a process of their own.
        batch = ms.Tensor(block.astype(np.int32))
        scale = ms.Tensor(1.0, ms.float32)

        def forward_backward():
            # The Trainer's own compiled graphs of its grad-accumulation path: gradients are
            # added into its buffers, then clipped and applied (which zeroes the buffers).
            return float(trainer._accumulate(scale, batch)[0])

        def clip_step():
            return float(trainer._apply_sums(scale, max_norm, lr_tensor))

        max_norm = ms.Tensor(config.train.max_grad_norm or float("inf"), ms.float32)
        lr_tensor = ms.Tensor(lr, ms.float32)
        parts = {}
        for part, fn in (("forward", lambda: trainer.eval_loss({"input_ids": block})),
                         ("forward+backward", forward_backward), ("clip+AdamW", clip_step)):
            start = time.perf_counter()
            fn()
            parts[f"{part} compile"] = time.perf_counter() - start
            # As many warm calls as the steps get: MindSpore's first calls run slower.
            parts[part] = best_time(fn, 2, warm=max(1, args.warmup_steps - 1))
            parts[f"rss after {part}"] = peak_rss()
        return {**info, "parts": {name: parts}}, {}, dict

    def finish():
        if args.breakdown and mode == "graph":
            return {"top_ops": {name: mindspore_top_ops(trainer, block, lr)}}
        return {}

    return info, {name: lambda: trainer.train_step([{"input_ids": block}], lr)[0]}, finish


def peak_rss() -> float:
    """This process's peak resident memory in GB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def mindspore_top_ops(trainer, block, lr):
    """Per-op-type time of one compiled step from mindspore.profiler (works on CPU)."""
    import csv

    import mindspore as ms
    from mindspore.profiler import ProfilerActivity, tensorboard_trace_handler

    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        with ms.profiler.profile(activities=[ProfilerActivity.CPU],
                                 on_trace_ready=tensorboard_trace_handler(folder)) as prof:
            trainer.train_step([{"input_ids": block}], lr)
            prof.step()
        for path in Path(folder).rglob("cpu_op_detail_info_*.csv"):
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    # The scope separates backward ("Gradients/...") and the ops a batched
                    # 3-D x 2-D ops.matmul expands into ("Expand/_MatMulExt/...").
                    scope = row["full_op_name"]
                    key = (("grad " if scope.startswith("Gradients/") else "")
                           + ("3-D matmul: " if "_MatMulExt" in scope else "") + row["op_type"])
                    rows[key] = rows.get(key, 0.0) + float(row["op_total_time(ms)"])
    return top_ops(list(rows.items()), count=12)


def serve(args) -> None:
    """Worker side: set up, warm up, time the steps, write one JSON line to stdout."""
    # Libraries print to stdout; keep the real stdout for the result, the rest to stderr.
    result = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    if args.worker == "torch":
        info, steps, finish = torch_worker(args)
    else:
        info, steps, finish = mindspore_worker(args, {"mindspore": "graph"}.get(args.worker,
                                                                                args.worker))
    # PyNative (11 s a step) gets one warm-up step: it is reported for context only.
    warmup = 1 if args.worker == "pynative" else max(1, args.warmup_steps)
    count = args.pynative_steps if args.worker == "pynative" else args.steps
    runs = {name: {"times": [], "losses": [], "others": [], "warmup": [],
                   "threads": info["threads"]} for name in steps}
    for i in range(warmup + count):
        # Several implementations in one worker alternate step by step: same load for each.
        for name, step in steps.items():
            settle()
            ticks, start = cpu_ticks(), time.perf_counter()
            loss = step()
            elapsed = time.perf_counter() - start
            others = others_share(ticks, cpu_ticks(), elapsed)
            run = runs[name]
            run["losses"].append(loss)
            if i == 0:
                run["first"] = elapsed  # includes MindSpore's graph compilation
            if 0 < i < warmup:
                run["warmup"].append(elapsed)
            if i >= warmup:
                run["times"].append(elapsed)
                run["others"].append(others)
            print(f"  {name:24s} step {i:2d} {elapsed:6.2f} s  loss {loss:.4f}  other "
                  f"processes {others:.0%} of the cores", file=sys.stderr, flush=True)
    info.update(finish())
    result.write(json.dumps({**info, "runs": runs, "rss": peak_rss(), "waited": WAIT_IDLE[1]})
                 + "\n")
    result.close()


# ---------------------------------------------------------------- orchestration

def run_worker(kind: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, *args.passthrough]
    # GLOG_v=3: MindSpore errors only; some of its warnings print whole tensors.
    env = {**os.environ, "GLOG_v": os.environ.get("GLOG_v", "3")}
    print(f"[{kind}]", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def numpy_peak() -> float:
    return matmul_peak(np.matmul, lambda n: np.random.default_rng(n).standard_normal(
        (n, n), np.float32), sizes=(2048, 3072))





def run(args) -> tuple[dict, dict]:
    """Run the workers one after another; (runs by implementation, everything else)."""
    extras = {"numpy_peak": numpy_peak(), "rss": {}, "parts": {}, "top_ops": {}}
    extras["waited"] = WAIT_IDLE[1]
    kinds = (["torch", "mindspore"] + (["pynative"] if args.pynative_steps else [])
             + (["parts"] if args.breakdown else []))
    runs = {}
    for kind in kinds:
        out = run_worker(kind, args)
        extras["waited"] += out.pop("waited")
        runs.update(out.pop("runs"))
        extras["rss"][kind] = out.pop("rss")
        for key in ("parts", "top_ops"):
            extras[key].update(out.pop(key, {}))
        extras.update({k: v for k, v in out.items() if k.endswith("version")
                       or k.startswith("peak") or k == "hf_attention"})
    return runs, extras


def report(args, runs: dict, extras: dict, wall: float) -> str:
    config = load_config(args)
    m = config.model
    tokens = args.batch_size * args.seq_len
    per_token, n = flops_per_token(config, args.seq_len)
    peak = extras["peak_torch"]
    hf = runs["huggingface"]
    lines = ["| implementation | threads | first step (s) | warm-up steps (s) | median step (s) "
             "| best step (s) | tokens/s (median) | vs HF | GFLOP/s | MFU (median) | MFU (best) "
             "| other load |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, run in runs.items():
        median, best = statistics.median(run["times"]), min(run["times"])
        flops = tokens * per_token / median / 1e9
        lines.append(
            f"| {name} | {run['threads']} | {run['first']:.1f} | "
            f"{' '.join(f'{t:.1f}' for t in run.get('warmup', [])) or '-'} | {median:.2f} | {best:.2f} | "
            f"{tokens / median:.0f} | {statistics.median(hf['times']) / median:.2f}x | "
            f"{flops:.1f} | {flops / peak:.0%} | {tokens * per_token / best / 1e9 / peak:.0%} | "
            f"{statistics.median(run['others']):.0%} |")
    notes = [
        f"- Shape: `{args.config}` (hidden {m.hidden_size}, {m.num_layers} layers, "
        f"{m.num_heads} heads, vocab {m.vocab_size}, activation {m.activation}), dropout 0, "
        f"batch {args.batch_size} x seq_len {args.seq_len} = {tokens} tokens/step, fp32, "
        f"AdamW + clip {config.train.max_grad_norm}; the same token batch every step.",
        f"- Steps: {args.warmup_steps} warm-up step(s) per implementation excluded (1 for "
        "PyNative; \"first step\" includes MindSpore's graph compilation; the later warm-up "
        "steps are listed: MindSpore's CPU kernels search their parallel split over their "
        f"first calls, so its early steps run slower), then {args.steps} timed steps "
        f"({args.pynative_steps} for PyNative). tokens/s = tokens per step / median step "
        "time; vs HF = HF median / median. torch_impl and Hugging Face alternate step by step "
        "in one process; the MindSpore workers run after it, one at a time.",
        f"- FLOPs/token = 6 N + 12 L H T = 6 x {n:,} + 12 x {m.num_layers} x {m.hidden_size} x "
        f"{args.seq_len} = {per_token / 1e6:.1f} MFLOP. N = all parameters except the position "
        "table (the tied token table counted once, as the output projection's vocab x hidden "
        "matmul; the embedding lookup costs no FLOPs).",
        f"- MFU = achieved FLOP/s / measured fp32 matmul peak: torch {peak:.1f} GFLOP/s (best "
        f"square GEMM 2048-4096, before and after the steps); for context numpy "
        f"{extras['numpy_peak']:.1f}"
        + (f", MindSpore {extras['peak_mindspore']:.1f}" if "peak_mindspore" in extras else "")
        + " GFLOP/s.",
        f"- Threads: `torch.set_num_threads({CORES})`; MindSpore "
        f"`mindspore.device_context.cpu.op_tuning.threads_num({CORES})` (its default is 25). "
        f"Hugging Face attention implementation: `{extras['hf_attention']}`.",
        "- First-step losses (same batch, independent random inits): "
        + ", ".join(f"{name} {run['losses'][0]:.3f}" for name, run in runs.items()) + ".",
        "- Peak resident memory per worker process: "
        + ", ".join(f"{RSS_LABELS[kind]} {gb:.1f} GB" for kind, gb in extras["rss"].items()) + ".",
        "- Other load: median share of the cores used by other processes during the timed "
        "steps (/proc/stat minus the worker's own ticks). On a shared machine the best step "
        "is the least disturbed estimate; rows with other load above ~5% are not comparable.",
    ]
    breakdown = []
    if extras.get("parts"):
        pieces = ("forward", "forward+backward", "clip+AdamW")
        breakdown += ["", "Breakdown (seconds, best of 2 calls after warm ones (torch 1, MindSpore "
                      f"{max(1, args.warmup_steps - 1)} after the compiling call); forward = "
                      "`eval_loss`; MindSpore: the Trainer's compiled graphs of its "
                      "grad-accumulation path, each compiled in a fresh process):", "",
                      "| implementation | forward | forward+backward | clip+AdamW | best full step "
                      "| compile: forward / forward+backward / clip+AdamW |",
                      "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, part in extras["parts"].items():
            compiled = (" / ".join(f"{part[f'{p} compile']:.1f}" for p in pieces)
                        if "forward compile" in part else "-")
            breakdown.append(f"| {name} | " + " | ".join(f"{part[p]:.2f}" for p in pieces)
                             + f" | {min(runs[name]['times']):.2f} | {compiled} |")
        for name, ops in extras.get("top_ops", {}).items():
            breakdown += ["", f"Top op types of one {name} step (profiler self time):", "",
                          "| op | ms | share |", "| --- | ---: | ---: |"]
            breakdown += [f"| {op} | {ms:.0f} | {share:.0%} |" for op, ms, share in ops]
    versions = (f"torch {extras['torch_version']}, "
                f"mindspore {extras.get('mindspore_version', '-')}, "
                f"transformers {extras['transformers_version']}, numpy {np.__version__}, "
                f"Python {platform.python_version()}")
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/train_gpt.py",
                                                *args.passthrough])
    header = [f"{datetime.date.today().isoformat()}; {machine()}; {versions}.", "",
              f"Command: `{command}` ({wall - extras['waited']:.0f} s"
              + (f", plus {extras['waited']:.0f} s waiting for idle cores"
                 if extras["waited"] else "")
              + ").", ""]
    return "\n".join(header + lines + [""] + notes + breakdown)



def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/gpt/gpt-small.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override (repeatable); dropout is always 0")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per implementation")
    parser.add_argument("--warmup-steps", type=int, default=5,
                        help="untimed steps per implementation (MindSpore's steps 2-5 still "
                             "run ~25%% slower than later ones on 2 cores)")
    parser.add_argument("--pynative-steps", type=int, default=2,
                        help="timed MindSpore PyNative steps (0 skips PyNative)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time forward / forward+backward and list the top ops")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="on a shared machine: before each timed call, wait up to this "
                             "long for other processes to leave the cores idle")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    drive(args, argv, NAME, SECTION, serve, run, report)


if __name__ == "__main__":
    main()

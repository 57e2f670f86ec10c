"""Peak memory of converting a checkpoint much larger than the test models.

A random GPT of about --params parameters (the 3.2 B config's shape with fewer layers) is
written shard by shard into a temp directory, never held whole in memory. Each conversion
then runs in a fresh worker process while this process samples the worker's
/proc/PID/status; its exact peak RSS is the worker's own VmHWM. The baseline is a
worker that only imports taichu.convert, numpy and safetensors. The claim under test
(taichu/convert.py streams tensor by tensor): peak - baseline stays near the largest
tensor / one shard, not the model size.

    .venv/bin/python bench/convert.py            # ~1 B parameters, table to docs/benchmarks.md
    .venv/bin/python bench/convert.py --quick    # ~100 M parameters, doc untouched
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchdoc import machine, publish

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: taichu is the checkout's
NAME = "convert"
SECTION = "## Converting a large checkpoint (bench/convert.py)"
BASE_CONFIG = ROOT / "configs" / "gpt" / "taichu-text-3b2.yaml"
MB = 1e6


# ---------------------------------------------------------------- the random model

def sized_config(params: float):
    """The 3.2 B config with the widest hidden size (of a few) that still gets 4+ layers."""
    import taichu

    for hidden in (2560, 2048, 1536, 1024, 768, 512):
        base = [f"model.hidden_size={hidden}", "model.num_heads=32", "model.num_layers=1"]
        one = taichu.num_parameters(taichu.load_config(BASE_CONFIG, base))
        two = taichu.num_parameters(taichu.load_config(BASE_CONFIG, base[:2] + ["model.num_layers=2"]))
        layers = max(1, round((params - (2 * one - two)) / (two - one)))
        if layers >= 4 or hidden == 512:
            return taichu.load_config(BASE_CONFIG, base[:2] + [f"model.num_layers={layers}"])


def write_random_model(config, directory: Path, dtype: str, shard_bytes: int) -> dict:
    """Our model directory (config.yaml + sharded safetensors + index) of random weights.

    Written with a few lines of our own rather than taichu's writer, so the source does not
    depend on the code under test; one tensor is in memory at a time.
    """
    from taichu.config import dump_config
    from taichu.families import get_family

    specs = {name: spec.shape for name, spec in get_family("gpt").tensor_specs(config).items()}
    item = np.dtype(dtype).itemsize
    groups, size = [[]], 0
    for name, shape in specs.items():
        nbytes = int(np.prod(shape)) * item
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    rng = np.random.default_rng(0)
    weight_map, total = {}, 0
    for i, names in enumerate(groups, start=1):
        shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "np"}}, 0
        for name in names:
            nbytes = int(np.prod(specs[name])) * item
            header[name] = {"dtype": {"float32": "F32", "float16": "F16"}[dtype],
                            "shape": list(specs[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        with open(directory / shard, "wb") as handle:
            handle.write(len(text).to_bytes(8, "little") + text)
            for name in names:
                # uniform, not normal: 3x faster to draw, and the values do not matter here
                array = rng.random(specs[name], dtype=np.float32)
                array -= 0.5
                array *= 0.04
                handle.write(array.astype(dtype, copy=False).tobytes())
                weight_map[name] = shard
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    dump_config(config, directory / "config.yaml")
    largest = max(specs, key=lambda n: np.prod(specs[n]))
    return {"bytes": total, "shards": len(groups), "largest": largest,
            "largest_bytes": int(np.prod(specs[largest])) * item}


# ---------------------------------------------------------------- one measured worker

def worker(job: dict) -> None:
    """Runs in the measured process: import, (convert), print timings and VmHWM as JSON."""
    import numpy  # noqa: F401  (the baseline: what every conversion pays before reading)
    import safetensors  # noqa: F401
    import taichu.convert

    result = {"seconds": 0.0}
    if job["kind"] != "baseline":
        start = time.perf_counter()
        taichu.convert.convert(job["src"], job["dst"], to=job.get("to"), dtype=job.get("dtype"),
                               config=job.get("config"), max_shard_bytes=job["shard_bytes"])
        result["seconds"] = time.perf_counter() - start
    # VmHWM, the kernel's exact peak RSS of this process's memory since exec. Not wait4's
    # ru_maxrss: across fork + exec that keeps the parent's high-water mark (this script's
    # generator, ~300 MB), which would hide everything below it.
    result["peak_kb"] = status_kb(os.getpid(), "VmHWM")["VmHWM"]
    print(json.dumps(result))


def status_kb(pid: int, *keys: str) -> dict:
    """Fields of /proc/PID/status in kB ({} once the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: int(v.split()[0]) for k, _, v in (l.partition(":") for l in text.splitlines())
            if k in keys}


def measure(job: dict) -> dict:
    """Run ``job`` in a fresh interpreter; its exact peak RSS, and anon / file peaks sampled.

    A fresh process per case: numpy and glibc keep freed memory around, so a second
    conversion in the same process would start from the first one's high-water mark.
    """
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    peaks = {"RssAnon": 0, "RssFile": 0}
    while True:
        pid, status = os.waitpid(proc.pid, os.WNOHANG)
        if pid:
            break
        for key, kb in status_kb(proc.pid, *peaks).items():
            if key in peaks:
                peaks[key] = max(peaks[key], kb)
        time.sleep(0.005)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"worker {job['kind']} failed (exit {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "peak": result["peak_kb"] * 1024, "anon": peaks["RssAnon"] * 1024,
            "file": peaks["RssFile"] * 1024}


def dir_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def same_tensors(a: Path, b: Path, names: list[str]) -> bool:
    """Spot check that a round trip kept the bytes (a few tensors, read one at a time)."""
    from taichu.convert import read_safetensors

    ta, tb = read_safetensors(a)[0], read_safetensors(b)[0]
    return all(ta.read(n).tobytes() == tb.read(n).tobytes() for n in names)


# ---------------------------------------------------------------- the run

# (label, source, destination, convert() keywords); sources, destinations and a config
# name directories or files under the temp dir (a .ckpt carries no config). Outputs are deleted once nothing later reads them.
CASES = (
    ("ours -> HF (sharded)", "ours", "hf", {"to": "hf"}),
    ("HF -> ours", "hf", "back", {"to": "taichu"}),
    ("ours -> MindSpore .ckpt", "ours", "model.ckpt", {}),
    ("MindSpore .ckpt -> ours", "model.ckpt", "from_ckpt", {"to": "taichu", "config": "ours"}),
    ("ours -> ours (--dtype bf16)", "ours", "bf16", {"to": "taichu", "dtype": "bf16"}),
)
LAST_READ = {"hf": "HF -> ours", "back": "HF -> ours", "model.ckpt": "MindSpore .ckpt -> ours",
             "from_ckpt": "MindSpore .ckpt -> ours", "bf16": "ours -> ours (--dtype bf16)"}


def run(args) -> tuple[dict, dict, list]:
    import taichu

    config = sized_config(args.params)
    tmp = Path(tempfile.mkdtemp(prefix="taichu-bench-convert-", dir=args.tmp))
    try:
        free = shutil.disk_usage(tmp).free
        params = taichu.num_parameters(config)
        dtype = args.dtype
        if dtype == "auto":  # the source, the HF copy and one more output live at once
            dtype = "float32" if 3.5 * params * 4 < free else "float16"
        if 3.5 * params * np.dtype(dtype).itemsize > free:
            raise SystemExit(f"{tmp}: {free / 1e9:.1f} GB free, not enough for 3 copies of {params:,} "
                             f"{dtype} parameters")
        print(f"{params:,} parameters, {dtype}, in {tmp} ({free / 1e9:.0f} GB free)", file=sys.stderr)
        (tmp / "ours").mkdir()
        start = time.perf_counter()
        model = write_random_model(config, tmp / "ours", dtype, args.shard_mb * 1_000_000)
        model.update(params=params, dtype=dtype, config=config, free=free,
                     generate_s=time.perf_counter() - start)
        print(f"generated {model['bytes'] / 1e9:.2f} GB in {model['shards']} shards, "
              f"{model['generate_s']:.0f} s", file=sys.stderr)
        rows = {"baseline": measure({"kind": "baseline"})}
        checks = []
        for label, src, dst, kwargs in CASES:
            job = {"kind": "convert", "src": str(tmp / src), "dst": str(tmp / dst),
                   "shard_bytes": args.shard_mb * 1_000_000, **kwargs}
            if "config" in job:
                job["config"] = str(tmp / job["config"])
            rows[label] = measure(job)
            rows[label]["out_bytes"] = dir_bytes(tmp / dst)
            print(f"{label}: {rows[label]['seconds']:.1f} s, peak RSS {rows[label]['peak'] / MB:.0f} MB",
                  file=sys.stderr)
            if label == "HF -> ours":
                checks.append(("ours -> HF -> ours", same_tensors(
                    tmp / "ours", tmp / "back", [model["largest"], "layers.0.attn.q_proj.weight"])))
            if label == "MindSpore .ckpt -> ours":
                checks.append(("ours -> .ckpt -> ours", same_tensors(
                    tmp / "ours", tmp / "from_ckpt", [model["largest"], "layers.0.ln_1.weight"])))
            for name, last in LAST_READ.items():  # free the disk as soon as nothing reads it
                if last == label and (tmp / name).exists():
                    (shutil.rmtree if (tmp / name).is_dir() else os.remove)(tmp / name)
        return model, rows, checks
    finally:
        shutil.rmtree(tmp, ignore_errors=True)



def report(args, model: dict, rows: dict, checks: list, wall: float) -> str:
    m, base = model["config"].model, rows["baseline"]["peak"]
    shard = args.shard_mb * MB
    lines = ["| conversion | time (s) | MB/s | output (MB) | peak RSS (MB) | peak - baseline (MB) "
             "| / model | / largest tensor | / shard | peak anon (MB) | peak file-backed (MB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| baseline (import taichu.convert, numpy, safetensors) | - | - | - | {base / MB:.0f} | 0 "
             f"| - | - | - | {rows['baseline']['anon'] / MB:.0f} | {rows['baseline']['file'] / MB:.0f} |"]
    for label, _, _, _ in CASES:
        r = rows[label]
        extra = r["peak"] - base
        lines.append(f"| {label} | {r['seconds']:.1f} | {model['bytes'] / MB / r['seconds']:.0f} "
                     f"| {r['out_bytes'] / MB:.0f} | {r['peak'] / MB:.0f} | {extra / MB:.0f} "
                     f"| {extra / model['bytes']:.2f} | {extra / model['largest_bytes']:.1f} "
                     f"| {extra / shard:.2f} | {r['anon'] / MB:.0f} | {r['file'] / MB:.0f} |")
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/convert.py", *args.passthrough])
    notes = [
        f"- Model: `{BASE_CONFIG.relative_to(ROOT)}` with hidden {m.hidden_size}, {m.num_layers} "
        f"layers, vocab {m.vocab_size}: {model['params']:,} parameters, random {model['dtype']}, "
        f"{model['bytes'] / MB:,.0f} MB in {model['shards']} source shards of at most "
        f"{args.shard_mb} MB (written shard by shard, one tensor in memory at a time). Largest "
        f"tensor: `{model['largest']}`, {model['largest_bytes'] / MB:.0f} MB. Output shards: "
        f"`max_shard_bytes` = {args.shard_mb} MB (the CLI default is 2 GiB); a .ckpt is one file.",
        "- Each conversion is `taichu.convert.convert()` in a fresh worker process; peak RSS is "
        "its exact `VmHWM` (read by the worker at its end); peak anon / file-backed are the largest `RssAnon` / "
        "`RssFile` seen sampling /proc every 5 ms (file-backed = mmap'd checkpoint pages, "
        "which the kernel can drop under pressure; anon is what must fit). MB/s = source model "
        "bytes / conversion time; sources are warm in the page cache, outputs are fsync'ed.",
        "- Round-trip spot checks (largest tensor + one layer tensor, byte-equal): "
        + ", ".join(f"{name} {'ok' if ok else 'DIFFERS'}" for name, ok in checks) + ".",
        f"- 1-minute load average before/after: {args.load[0]:.2f} / {args.load[1]:.2f}; "
        f"generating the source took {model['generate_s']:.0f} s.",
    ]
    header = [f"{datetime.date.today().isoformat()}; {machine()}; numpy {np.__version__}, "
              f"Python {platform.python_version()}.", "", f"Command: `{command}` (total {wall:.0f} s).", ""]
    return "\n".join(header + lines + [""] + notes + [""] + interpretation(model, rows, args.shard_mb))


def interpretation(model: dict, rows: dict, shard_mb: int) -> list[str]:
    """The reading of the table, from the numbers: which cases stay near one tensor."""
    base, largest = rows["baseline"]["peak"], model["largest_bytes"]
    extra = {label: rows[label]["peak"] - base for label, _, _, _ in CASES}
    bounded = [label for label, x in extra.items() if x < 2 * largest]
    grown = [label for label in extra if label not in bounded]
    text = (f"Reading: {', '.join(bounded)} stay bounded: peak - baseline is "
            f"{min(extra[l] for l in bounded) / MB:.0f}-{max(extra[l] for l in bounded) / MB:.0f} MB, "
            f"1-1.5x the largest tensor ({largest / MB:.0f} MB; bf16 holds the fp32 tensor and its "
            f"cast) and {max(extra[l] for l in bounded) / model['bytes']:.0%} of the "
            f"{model['bytes'] / MB:,.0f} MB model and at most one {shard_mb} MB output shard: "
            "converting never holds the model, let alone two copies.")
    for label in grown:
        r = rows[label]
        text += (f" {label} does not: its peak RSS is {r['peak'] / MB:,.0f} MB "
                 f"({extra[label] / model['bytes']:.0%} of the model), of which "
                 f"{r['file'] / MB:,.0f} MB file-backed and {r['anon'] / MB:.0f} MB anonymous "
                 f"({(r['anon'] - rows['baseline']['anon']) / largest:.1f}x the largest tensor).")
    if grown:
        text += (" Cause, in `taichu/convert.py` `read_ckpt`: the whole .ckpt is one `mmap` kept "
                 "open by the `read` closure for the whole conversion, so every page a tensor "
                 "read touches stays mapped and RSS grows to the file size (clean page cache the "
                 "kernel can reclaim, but it is what `ps`, `ru_maxrss` and cgroup limits see); and "
                 "`bytearray(b\"\".join(data[a:b] ...))` copies each tensor twice (slice bytes, then "
                 "the bytearray). Reading each tensor with `readinto` into one preallocated buffer, "
                 "as `read_safetensors` does, would bound it like the other cases.")
    return [text]



def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=1e9, help="model size (default 1e9)")
    parser.add_argument("--quick", action="store_true",
                        help="~100 M parameters, 100 MB shards, doc untouched (a smoke run)")
    parser.add_argument("--shard-mb", type=int, default=500, help="source and output shard size")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16"), default="auto",
                        help="of the random source (auto: fp32 unless disk is short)")
    parser.add_argument("--tmp", help="where the temp directory goes (default: $TMPDIR)")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.quick:
        args.params, args.shard_mb, args.no_doc = 1e8, 100, True
    args.passthrough = [a for a in argv if a != "--no-doc"]
    start, load = time.perf_counter(), os.getloadavg()[0]
    model, rows, checks = run(args)
    args.load = (load, os.getloadavg()[0])
    text = report(args, model, rows, checks, time.perf_counter() - start)
    publish(NAME, SECTION, text, args.no_doc)


if __name__ == "__main__":
    main()

"""What every benchmark shares: the machine line, its own block of docs/benchmarks.md, and
the measurement of (and waiting out) load from other processes."""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def machine() -> str:
    """Cores, CPU model with its SIMD flags and clock, memory, OS."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = text.splitlines()
    model = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")),
                 platform.processor() or "unknown CPU")
    flags = next((l for l in lines if l.startswith("flags")), "").split()
    simd = [f for f in ("avx512f", "avx2", "fma") if f in flags]
    mhz = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("cpu MHz")), None)
    details = ", ".join(simd + ([f"{float(mhz):.0f} MHz"] if mhz else []))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} cores, {model} ({details}), {ram:.0f} GB RAM, "
            f"{platform.system()} {platform.machine()}")


def write_section(name: str, heading: str, text: str) -> None:
    """Replace the block between <!-- NAME:begin --> and <!-- NAME:end -->, read fresh,
    keeping everything else; append the heading and block if the file has none yet."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text}\n{end}"
    doc = DOC.read_text(encoding="utf-8") if DOC.exists() else "# Benchmarks\n"
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        doc = head + block + rest.split(end, 1)[1]
    else:
        doc = doc.rstrip("\n") + f"\n\n{heading}\n\n{block}\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(doc, encoding="utf-8")


# ------------------------------------------------ load from other processes (--wait-idle)

CORES = os.cpu_count() or 1
WAIT_IDLE = [0.0, 0.0]  # --wait-idle limit per wait, seconds waited so far


def cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks of this process) from /proc."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    idle = int(fields[3]) + int(fields[4])  # idle + iowait
    own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[:8]) - idle, int(own[11]) + int(own[12])


def others_share(before, after, seconds: float) -> float:
    """Share of all cores that other processes used between two cpu_ticks() reads."""
    ticks = (after[0] - before[0]) - (after[1] - before[1])
    # Clamped: /proc counts in 10 ms ticks, so a run of a few ms reads anything from 0 to >1.
    return min(1.0, max(0.0, ticks / (seconds * CORES * os.sysconf("SC_CLK_TCK"))))


def wait_until_idle(limit: float, window: float = 2.0, threshold: float = 0.05) -> float:
    """Wait (at most ``limit`` seconds) until other processes use < 5% of the cores."""
    start = time.monotonic()
    while time.monotonic() < start + limit:
        before = cpu_ticks()
        time.sleep(window)
        share = others_share(before, cpu_ticks(), window)
        if share < threshold:
            break
        print(f"  waiting: other processes use {share:.0%} of the cores", file=sys.stderr,
              flush=True)
    return time.monotonic() - start


def settle(window: float = 2.0, wake=()) -> None:
    """With --wait-idle: before anything timed, wait until the other processes are quiet
    (measured over ``window`` seconds; a shorter window suits many short timed calls).
    ``wake``: calls made untimed after the wait. Thread pools that slept through it wake
    slowly, and only the runtime timed first would pay for it (measured: a 12 ms wav2vec2
    call of torch_impl took 40 ms as the first call after a 0.5 s wait)."""
    if WAIT_IDLE[0]:
        WAIT_IDLE[1] += wait_until_idle(WAIT_IDLE[0], window)
        for call in wake:
            call()


def publish(name: str, heading: str, text: str, no_doc: bool) -> None:
    """Print a benchmark's report and, unless ``no_doc``, rewrite its block of the doc."""
    print(text)
    if not no_doc:
        write_section(name, heading, text)
        print(f"\nwrote {DOC.relative_to(DOC.parents[1])}", file=sys.stderr)


def driver_arguments(parser, workers, wait_when: str) -> None:
    """The flags of a benchmark run through ``drive``: --wait-idle (``wait_when``: before
    what it waits), --no-doc, and the two its driver hands each worker process
    (``run_worker``: --worker KIND --model-dir FOLDER)."""
    import argparse

    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help=f"on a shared machine: {wait_when}, wait up to this long for other "
                             "processes to leave the cores idle")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--worker", choices=workers, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)


def drive(args, argv, name: str, heading: str, serve, run, report) -> None:
    """The shared end of a benchmark's main(): a ``--worker`` process serves its one
    framework; the driver runs the workers, builds the report and publishes it."""
    import os
    import time
    from pathlib import Path

    WAIT_IDLE[0] = args.wait_idle
    os.chdir(Path(__file__).resolve().parents[1])
    if args.worker:
        serve(args)
        return
    args.passthrough = [a for a in argv if a != "--no-doc"]
    start = time.perf_counter()
    results, extras = run(args)
    publish(name, heading, report(args, results, extras, time.perf_counter() - start), args.no_doc)


# ------------------------------------------------ one framework per worker process

def run_worker(script: str, kind: str, folder: Path, passthrough) -> dict:
    """Run ``script --worker KIND --model-dir FOLDER ...`` in a fresh process (clean thread
    pools, one framework each) and return the JSON its last stdout line holds."""
    import json
    import subprocess

    cmd = [sys.executable, str(Path(script).resolve()), "--worker", kind, "--model-dir", str(folder),
           *passthrough]
    # GLOG_v=3: MindSpore errors only; some of its warnings print whole tensors.
    env = {**os.environ, "GLOG_v": os.environ.get("GLOG_v", "3")}
    print(f"[{kind}]", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, cwd=Path(script).resolve().parents[1], env=env, text=True,
                          stdout=subprocess.PIPE, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])

"""What every benchmark shares: the machine line and its own block of docs/benchmarks.md."""
from __future__ import annotations

import os
import platform
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

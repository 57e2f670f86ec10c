"""Crash-safe file writes: a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(handle)`` on a temp file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o644)  # mkstemp's 0600 would hide the file from others
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (checkpoint manifests, saved indexes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def text_lines(path, what: str) -> list[str]:
    """The lines of a UTF-8 text file (a BOM is fine; each line keeps a CR of a CRLF ending,
    and the last line is "" when the file ends with a newline); FileNotFoundError names
    ``what``, ValueError says the file is not UTF-8."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        return path.read_text(encoding="utf-8-sig").split("\n")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None


def jsonl_objects(path, what: str, expected: str):
    """(``file:line``, object) for every non-blank line of a UTF-8 ``.jsonl`` file, with one
    wording for every data reader: FileNotFoundError names ``what`` ("image-text file"),
    ValueError names the file and line of bad UTF-8, bad JSON or a line that is not a JSON
    object (``expected`` says what it should be, e.g. "with an 'audio' key")."""
    import json

    path = Path(path).expanduser()
    for number, line in enumerate(text_lines(path, what), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object {expected}, got {type(record).__name__}")
        yield where, record


def write_cache_folder(path: str | Path, arrays: dict, index: dict) -> None:
    """A cache folder written whole or not at all: ``NAME.npy`` per array (no pickle) and
    ``index.json`` in a temp folder beside ``path``, then one rename. If another process
    finished the same folder first, its copy stays (the rename fails; ours is dropped)."""
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the cache from other users
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array, allow_pickle=False)
        (tmp / "index.json").write_text(json.dumps(index, ensure_ascii=False, indent=1), encoding="utf-8")
        try:
            os.replace(tmp, path)
        except OSError:
            if not (path / "index.json").is_file():  # not another process's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

"""Using image-text models (CLIP, BriVL) and the tri-modal model: embeddings, a vector
index, retrieval metrics.

Backend-neutral: numpy at import time; PyTorch or MindSpore are imported only when an
``Embedder`` loads a model (through ``taichu.api``), faiss only when an index is built.

- ``Embedder``: a model directory in PyTorch or MindSpore, or an ONNX export in ONNX
  Runtime -> float32, L2-normalised ``[n, dim]`` embeddings of images
  (``taichu.images.preprocess``, the one pipeline training uses), of captions
  (``taichu.imagetext.caption_ids``, the same ids training sees) and, for a tri-modal
  model, of speech (16 kHz clips normalised and padded as training pads them).
- ``VectorIndex``: inner-product search (cosine on normalised vectors). faiss
  ``IndexFlatIP`` when faiss imports, otherwise an exact numpy search; both return the
  same ids: scores descending, equal scores by ascending id (see ``VectorIndex.search``).
  Saved as a directory (``index.json`` + ``vectors.npy`` + ``items.jsonl``), checked
  by sha256 when loaded.
- ``recall_at_k``, ``chance_recall_at_k``, ``zero_shot_accuracy``: evaluation on a
  similarity matrix, with caption groups for data sets whose captions repeat.
- ``evaluate``: ``taichu eval`` (held-out split of the model's own data config);
  ``taichu.trimodal_eval.evaluate_trimodal`` for a tri-modal model's six directions.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from taichu.fileio import sha256_file

EMBED_BACKENDS = ("torch", "mindspore", "onnx", "mindir")
# Backends that run an export directory (``taichu export``) rather than a model directory.
EXPORT_BACKENDS = ("onnx", "mindir")
INDEX_BACKENDS = ("auto", "faiss", "numpy")
INDEX_FORMAT = "taichu-vector-index"
INDEX_VERSION = 1
MANIFEST, VECTORS, ITEMS = "index.json", "vectors.npy", "items.jsonl"
# Written by `taichu export` (export.runtime.INFO_FILE): marks an export directory.
EXPORT_INFO = "export_info.json"
# Queries scored at once by the numpy search: bounds the [queries, items] score matrix.
_NUMPY_SCORE_ELEMENTS = 1 << 24
# Family tasks an Embedder runs: image-text models, and the tri-modal one (a speech tower too).
EMBED_TASKS = ("image_text", "trimodal")


# ---------------------------------------------------------------------------- helpers


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, float32. Computed in float64 so the result does not
    depend on the framework that produced ``x``; a zero row stays zero (like
    torch.nn.functional.normalize's eps) instead of becoming NaN."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be [n, dim], got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 of what decides a model's embeddings: the config's ``model`` section, the
    weight files (safetensors, or an ONNX export's graphs) and the tokenizer. An index
    remembers it so that a search with another model, whose vectors live in another
    space, is refused."""
    from taichu.config import load_config
    from taichu.weights import weight_files

    path = Path(model_dir)
    config = load_config(path)
    h = hashlib.sha256(b"taichu-embedding-model-v1\n")
    h.update(json.dumps(config.model.model_dump(mode="json"), sort_keys=True).encode())
    if (path / EXPORT_INFO).is_file():
        # An export holds graphs (and their external data) instead of safetensors: the
        # files export_info.json lists, less the ones that say nothing about the weights.
        listed = json.loads((path / EXPORT_INFO).read_text(encoding="utf-8")).get("files", [])
        h.update(b"\nexport")
        files = [path / name for name in sorted(listed) if name not in (EXPORT_INFO, "config.yaml")]
    else:
        files = weight_files(path) + [p for p in [path / "tokenizer.model"] if p.is_file()]
    for file in files:
        h.update(f"\n{file.name}:{sha256_file(file)}".encode())
    return h.hexdigest()


def _check_finite(name: str, x: np.ndarray) -> None:
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contain NaN or infinite values")


# ---------------------------------------------------------------------------- embeddings


def check_export_directory(directory: str | Path, backend: str) -> None:
    """Refuse a directory that `taichu export --format BACKEND` did not write."""
    directory = Path(directory)
    if not (directory / EXPORT_INFO).is_file():
        # Imported only to refuse: taichu.config needs yaml and pydantic, which the export
        # runtimes (export.runtime) do not.
        from taichu.config import ConfigError

        kind = {"onnx": "an ONNX", "mindir": "a MINDIR"}[backend]
        raise ConfigError(f"{directory} is not {kind} export (no {EXPORT_INFO}): --backend "
                          f"{backend} takes the directory written by `taichu export "
                          f"{directory} --format {backend} --out DIR`")


class Embedder:
    """Embeds images and captions with an image-text model (CLIP, BriVL), and speech too
    with a tri-modal model (``embed_audio``: clips in the space of its images and captions).

    ``backend``: "torch" or "mindspore" (PyNative, or whatever context the caller set)
    with a model directory; "onnx" or "mindir" with an export directory (``taichu export
    MODEL --format onnx|mindir --out DIR``) and ``encoder``, the object that runs its
    graphs (``image_features``, ``text_features``, ``tokenizer``; ``speech_features`` for
    a tri-modal export): ``export.export_embedder(DIR, "onnx")`` builds both.
    taichu/ does not import export/ (the layers run one way), so the encoder comes from
    the caller.
    Outputs are float32 ``[n, dim]`` with unit rows whatever the family returns (CLIP's
    features are unnormalised, BriVL's normalised), so inner product = cosine.
    """

    def __init__(self, model_dir: str | Path, backend: str = "torch", batch_size: int = 64,
                 encoder=None):
        from taichu.config import ConfigError, load_config
        from taichu.families import get_family

        if backend not in EMBED_BACKENDS:
            raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(EMBED_BACKENDS)})")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
        self.model_dir = Path(model_dir)
        self.backend = backend
        self.batch_size = batch_size
        self._fingerprint = None
        self.config = load_config(self.model_dir)
        family = get_family(self.config.family)
        self.task = getattr(family, "task", None)
        if self.task not in EMBED_TASKS:
            raise ConfigError(f"{self.model_dir} is a {self.config.family} model: embeddings need "
                              "an image-text model (clip, brivl) or a tri-modal model (trimodal)")
        self.image_size = self.config.model.image.image_size
        self.context_length = self.config.model.text.max_position_embeddings
        if backend in EXPORT_BACKENDS:
            self._init_export(encoder)
            return
        if (self.model_dir / EXPORT_INFO).is_file():
            raise ConfigError(f"{self.model_dir} is an export directory: use --backend onnx or mindir "
                              f"(its format)")
        tokenizer_path = self.model_dir / "tokenizer.model"
        if not tokenizer_path.is_file():
            raise ConfigError(f"{self.model_dir}: no tokenizer.model (captions need the model's "
                              "tokenizer)")
        from taichu.api import load_model
        from taichu.tokenizer import Tokenizer

        self.tokenizer = Tokenizer(tokenizer_path)
        self.model = load_model(self.model_dir, backend=backend)

    def _init_export(self, encoder) -> None:
        check_export_directory(self.model_dir, self.backend)
        if encoder is None:
            raise ValueError(f"backend {self.backend} runs the graphs of {self.model_dir} through an "
                             "encoder from export: use export.export_embedder("
                             f"DIR, {self.backend!r}) (what `taichu embed --backend {self.backend}` "
                             "does)")
        self.model = encoder
        self.tokenizer = encoder.tokenizer
        # Batching and normalisation stay here, so the three backends differ only in the
        # forward pass.
        self._export_methods = {"get_image_features": encoder.image_features,
                                "get_text_features": encoder.text_features}
        if getattr(encoder, "has_speech", hasattr(encoder, "speech_features")):
            self._export_methods["get_speech_features"] = encoder.speech_features

    @property
    def dim(self) -> int:
        m = self.config.model
        return getattr(m, "projection_dim", None) or m.embed_dim

    def _run(self, method: str, *arrays: np.ndarray) -> np.ndarray:
        if self.backend in EXPORT_BACKENDS:
            return np.asarray(self._export_methods[method](*arrays), dtype=np.float32)
        if self.backend == "torch":
            import torch

            with torch.no_grad():
                out = getattr(self.model, method)(*(torch.from_numpy(a) for a in arrays))
            return out.float().numpy()
        import mindspore as ms

        # Token ids go in as int32, as everywhere in mindspore_impl (CPU gather kernels).
        tensors = [ms.Tensor(a.astype(np.int32) if a.dtype == np.int64 else a) for a in arrays]
        return getattr(self.model, method)(*tensors).asnumpy().astype(np.float32)

    def _batches(self, items: Sequence, encode, method: str) -> np.ndarray:
        out = np.empty((len(items), self.dim), dtype=np.float32)
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            out[start:start + len(chunk)] = l2_normalize(self._run(method, *encode(chunk)))
        return out

    def embed_images(self, images: Sequence) -> np.ndarray:
        """Images (paths, bytes, PIL images, uint8 arrays) -> float32 [n, dim], unit rows.

        A file that is not an image raises ValueError naming it (taichu.images.load_image)."""
        from taichu.images import preprocess

        if isinstance(images, (str, Path, bytes)):   # iterating one would give characters
            raise TypeError("embed_images takes a list of images, not one")
        images = list(images)
        return self._batches(images, lambda chunk: (preprocess(chunk, self.image_size),),
                             "get_image_features")

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Captions -> float32 [n, dim], unit rows. Ids are [bos] + text + [eos], right-padded
        to the context length; a longer caption is cut at the context (the end of the
        text is dropped); an empty caption raises ValueError."""
        from taichu.imagetext import caption_ids

        if isinstance(texts, str):
            raise TypeError("embed_texts takes a list of captions, not one str")
        texts = list(texts)
        # Refuse an empty caption before any batch runs, naming its position in the whole
        # list (caption_ids, run per batch, would give its position within the batch).
        _check_captions(texts)
        return self._batches(texts, lambda chunk: caption_ids(self.tokenizer, chunk, self.context_length),
                             "get_text_features")

    @property
    def has_speech(self) -> bool:
        """Whether ``embed_audio`` can run: a tri-modal model (an export's encoder with its
        speech tower)."""
        return self.task == "trimodal" and (self.backend not in EXPORT_BACKENDS
                                            or "get_speech_features" in self._export_methods)

    def embed_audio(self, audios: Sequence, names: Sequence[str] | None = None) -> np.ndarray:
        """Speech clips -> float32 [n, dim], unit rows (tri-modal models).

        ``audios``: audio files (any format and rate taichu.speech.load_audio reads,
        resampled to 16 kHz mono) or float32 1-D arrays already at 16 kHz; ``names`` says
        what each one is in error messages (default: the path, or "audio i"). Every clip is
        checked before any batch runs: silence, or fewer samples than the speech tower's
        receptive field, raises ValueError naming it. Each clip is normalised as in
        training (taichu.speech_batches.normalise) and batched with right padding to a
        multiple of data.spoken.pad_to_seconds and a sample mask, clips sorted by length
        (little padding); rows come back in input order."""
        from taichu.speech_batches import normalise, padded_length
        from taichu.trimodal_data import load_clips, require_speech

        require_speech(self.config, self.model_dir)
        if isinstance(audios, (str, Path, bytes)) or (isinstance(audios, np.ndarray) and audios.ndim == 1):
            raise TypeError("embed_audio takes a list of clips, not one")
        names, clips = load_clips(list(audios), self.config, names)
        if self.backend in EXPORT_BACKENDS and "get_speech_features" not in self._export_methods:
            raise ValueError(f"{self.model_dir}: this {self.backend} export's encoder runs no speech tower "
                             "(export the tri-modal model again with this taichu)")
        out = np.empty((len(clips), self.dim), dtype=np.float32)
        # A group-norm feature encoder normalises over the padded clip: one clip per batch
        # keeps a clip's vector independent of its batch (taichu.recognition does the same).
        step = 1 if self.config.model.speech.feat_extract_norm == "group" else self.batch_size
        order = np.argsort([len(c) for c in clips], kind="stable")
        pad_to = self.config.data.spoken.pad_to_seconds
        for start in range(0, len(order), step):
            rows = order[start:start + step]
            chunk = [normalise(clips[i]) for i in rows]
            length = padded_length(max(len(c) for c in chunk), pad_to)
            values = np.zeros((len(chunk), length), np.float32)
            mask = np.zeros((len(chunk), length), np.int64)
            for r, clip in enumerate(chunk):
                values[r, :len(clip)] = clip
                mask[r, :len(clip)] = 1
            out[rows] = l2_normalize(self._run("get_speech_features", values, mask))
        return out

    def fingerprint(self) -> str:
        if self._fingerprint is None:  # hashes the weights: once per Embedder
            self._fingerprint = model_fingerprint(self.model_dir)
        return self._fingerprint


def _check_captions(texts: Sequence[str]) -> None:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"caption {i} is {type(text).__name__}, not str")
        if not text.strip():
            raise ValueError(f"caption {i} is empty: every image needs a caption with some text")


# ---------------------------------------------------------------------------- inputs


def _image_extensions() -> set[str]:
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}


def list_images(sources: Iterable[str | Path]) -> list[Path]:
    """Image files from files and directories, in a stable order.

    A file named explicitly is always taken (and later refused by name if it does not
    decode as an image). A directory contributes, recursively and sorted by relative
    path, every non-hidden file with an extension pillow can read; other files in it
    (READMEs, captions) are skipped, as a folder of images usually has some.
    """
    extensions = _image_extensions()
    found: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted((p for p in path.rglob("*") if p.is_file()),
                           key=lambda p: p.relative_to(path).as_posix())
            files = [p for p in files
                     if not any(part.startswith(".") for part in p.relative_to(path).parts)
                     and p.suffix.lower() in extensions]
            if not files:
                raise ValueError(f"{path}: no image files in this directory")
            found += files
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
    if not found:
        raise ValueError("no images given")
    return found


def read_captions(path: str | Path) -> list[str]:
    """One caption per line of a UTF-8 file (a BOM and CRLF endings are fine).

    An empty or whitespace-only line raises ValueError naming the file and line number:
    silently dropping it would shift every later row against the line numbers.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"captions file {path} not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    captions = []
    for number, line in enumerate(lines, start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            raise ValueError(f"{path}:{number}: empty caption line (one caption per line, no blank lines)")
        captions.append(line)
    if not captions:
        raise ValueError(f"{path}: no captions")
    return captions


# ---------------------------------------------------------------------------- index


class CorruptIndexError(ValueError):
    """An index directory that is incomplete, truncated or modified since it was saved."""


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_index_backend(backend: str) -> str:
    if backend not in INDEX_BACKENDS:
        raise ValueError(f"unknown index backend {backend!r} (choose from {', '.join(INDEX_BACKENDS)})")
    if backend == "auto":
        return "faiss" if faiss_available() else "numpy"
    if backend == "faiss" and not faiss_available():
        raise ModuleNotFoundError("faiss is not installed: pip install faiss-cpu (or taichu[index]), "
                                  "or use the numpy backend")
    return backend


class VectorIndex:
    """Exact inner-product search over float32 vectors, with one metadata item per vector.

    Cosine similarity when the vectors are L2-normalised (``Embedder`` output is); the
    index stores vectors as given. ``backend``: "faiss" (``IndexFlatIP``), "numpy" (the
    fallback when faiss is missing) or "auto". ``self.backend`` says which one runs.
    """

    def __init__(self, dim: int, backend: str = "auto", metadata: dict | None = None):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        self.backend = _resolve_index_backend(backend)
        self.metadata = dict(metadata or {})   # e.g. the model and modality, saved in index.json
        self.items: list = []
        self._vectors = np.zeros((0, self.dim), dtype=np.float32)
        self._faiss = None
        if self.backend == "faiss":
            import faiss

            self._faiss = faiss.IndexFlatIP(self.dim)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def vectors(self) -> np.ndarray:
        return self._vectors

    def add(self, vectors: np.ndarray, items: Sequence | None = None) -> None:
        """Append ``vectors`` [n, dim]; ``items`` (JSON-serialisable, one per row) say what
        each row is; default: the row numbers."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors must be [n, {self.dim}], got shape {vectors.shape}")
        _check_finite("vectors", vectors)
        items = list(range(len(self), len(self) + len(vectors))) if items is None else list(items)
        if len(items) != len(vectors):
            raise ValueError(f"{len(vectors)} vectors but {len(items)} items")
        for item in items:
            json.dumps(item, ensure_ascii=False)  # fail now, not at save time
        self._vectors = np.concatenate([self._vectors, vectors]) if len(self) else vectors.copy()
        self.items += items
        if self._faiss is not None:
            self._faiss.add(vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [q, k], ids int64 [q, k]) of the k highest inner products.

        Order: score descending, then id ascending among equal scores, in both backends
        (faiss alone returns tied ids in heap order, larger ids first). When several
        vectors tie with the k-th score, the lowest ids are the ones kept. ``k`` above
        the index size is clamped to it.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [q, {self.dim}], got shape {queries.shape}")
        _check_finite("queries", queries)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if not len(self):
            raise ValueError("the index is empty")
        k = min(int(k), len(self))
        if self.backend == "faiss":
            return self._search_faiss(queries, k)
        return self._search_numpy(queries, k)

    def _search_numpy(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        scores_out = np.empty((len(queries), k), np.float32)
        ids_out = np.empty((len(queries), k), np.int64)
        step = max(1, _NUMPY_SCORE_ELEMENTS // n)
        for start in range(0, len(queries), step):
            scores = queries[start:start + step] @ self._vectors.T
            # The k-th largest score of each row; every item scoring at least that is a
            # candidate (ties at the boundary included), then (-score, id) decides.
            kth = np.partition(scores, n - k, axis=1)[:, n - k]
            for row, (row_scores, bound) in enumerate(zip(scores, kth)):
                candidates = np.flatnonzero(row_scores >= bound)
                order = np.lexsort((candidates, -row_scores[candidates]))[:k]
                ids_out[start + row] = candidates[order]
                scores_out[start + row] = row_scores[candidates[order]]
        return scores_out, ids_out

    def _search_faiss(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        # Ask for more than k while the last score returned still equals the k-th (a tie
        # group straddles the cut): faiss keeps an arbitrary subset of such a group.
        fetch = min(n, k + 1)
        while True:
            scores, ids = self._faiss.search(queries, fetch)
            if fetch == n or np.all(scores[:, fetch - 1] < scores[:, k - 1]):
                break
            fetch = min(n, fetch * 2)
        order = np.lexsort((ids, -scores), axis=1)[:, :k]
        return (np.take_along_axis(scores, order, 1).astype(np.float32),
                np.take_along_axis(ids, order, 1).astype(np.int64))

    # -------------------------------------------------------------- persistence

    def save(self, path: str | Path) -> Path:
        """Write the index as a directory, replacing an older index there.

        ``vectors.npy`` (float32 [n, dim], readable without faiss), ``items.jsonl`` (one
        JSON value per row) and ``index.json`` (format, dim, count, backend, metadata and
        the sha256 of both files). Written into a temporary directory beside ``path`` and
        renamed into place, so a crash leaves the old index or the new one. A directory
        that holds something other than a taichu index is never replaced.
        """
        path = Path(path)
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"{path} exists and is not a directory")
            if any(path.iterdir()) and not (path / MANIFEST).is_file():
                raise ValueError(f"{path} is a non-empty directory that is not a taichu index; "
                                 "choose a new path")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the index from other users
            _write_synced(tmp / VECTORS, lambda h: np.save(h, self._vectors, allow_pickle=False))
            lines = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in self.items)
            _write_synced(tmp / ITEMS, lambda h: h.write(lines.encode("utf-8")))
            manifest = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "dim": self.dim,
                        "count": len(self), "metric": "inner_product", "built_with": self.backend,
                        "files": {VECTORS: sha256_file(tmp / VECTORS), ITEMS: sha256_file(tmp / ITEMS)},
                        "metadata": self.metadata}
            text = json.dumps(manifest, ensure_ascii=False, indent=2) + "\n"
            _write_synced(tmp / MANIFEST, lambda h: h.write(text.encode("utf-8")))
            if path.exists():
                old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
                os.replace(path, old / "index")
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto") -> "VectorIndex":
        """Read an index directory; CorruptIndexError if any file is missing, truncated or
        differs from the sha256 recorded when it was saved."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"index directory {path} not found")
        if not (path / MANIFEST).is_file():
            raise CorruptIndexError(f"{path}: no {MANIFEST}; not a taichu index (or an "
                                    "incomplete one)")
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
            if manifest.get("format") != INDEX_FORMAT:
                raise CorruptIndexError(f"{path / MANIFEST}: not a {INDEX_FORMAT} manifest")
            if manifest.get("version") != INDEX_VERSION:
                raise CorruptIndexError(f"{path / MANIFEST}: version {manifest.get('version')!r}, "
                                        f"this taichu reads version {INDEX_VERSION}")
            dim, count, files = int(manifest["dim"]), int(manifest["count"]), dict(manifest["files"])
        except CorruptIndexError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CorruptIndexError(f"{path / MANIFEST}: unreadable manifest ({err})") from None
        for name in (VECTORS, ITEMS):
            file = path / name
            if not file.is_file():
                raise CorruptIndexError(f"{path}: {name} is missing")
            if sha256_file(file) != files.get(name):
                raise CorruptIndexError(f"{file}: contents differ from the sha256 in {MANIFEST} "
                                        "(truncated or modified); rebuild the index")
        try:
            vectors = np.load(path / VECTORS, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise CorruptIndexError(f"{path / VECTORS}: unreadable ({err})") from None
        if vectors.dtype != np.float32 or vectors.shape != (count, dim):
            raise CorruptIndexError(f"{path / VECTORS}: expected float32 [{count}, {dim}], got "
                                    f"{vectors.dtype} {list(vectors.shape)}")
        lines = (path / ITEMS).read_text(encoding="utf-8").split("\n")
        if lines[-1] == "":
            lines.pop()
        if len(lines) != count:
            raise CorruptIndexError(f"{path / ITEMS}: {len(lines)} items for {count} vectors")
        try:
            items = [json.loads(line) for line in lines]
        except json.JSONDecodeError as err:
            raise CorruptIndexError(f"{path / ITEMS}: not JSON lines ({err})") from None
        index = cls(dim, backend=backend, metadata=manifest.get("metadata") or {})
        if count:
            index.add(vectors, items)
        return index


def build_index(embedder: Embedder, images: Sequence[str | Path] | None = None,
                texts: Sequence[str] | None = None, backend: str = "auto",
                audio: Sequence[str | Path] | None = None) -> VectorIndex:
    """An index of image files (items ``{"image": absolute path}``), of captions (items
    ``{"text": caption}``) or of audio files (``{"audio": absolute path}``, a tri-modal
    model), remembering the modality and the model that embedded them."""
    if sum(x is not None for x in (images, texts, audio)) != 1:
        raise ValueError("index one modality: images, texts or audio")
    if images is not None:
        paths = [Path(p) for p in images]
        vectors = embedder.embed_images(paths)
        # Absolute: an index outlives the working directory it was built from.
        items, modality = [{"image": str(p.resolve())} for p in paths], "image"
    elif audio is not None:
        paths = [Path(p) for p in audio]
        vectors = embedder.embed_audio(paths)
        items, modality = [{"audio": str(p.resolve())} for p in paths], "audio"
    else:
        vectors = embedder.embed_texts(texts)
        items, modality = [{"text": t} for t in texts], "text"
    index = VectorIndex(vectors.shape[1], backend=backend, metadata={
        "modality": modality, "model": str(embedder.model_dir.resolve()),
        "family": embedder.config.family, "model_fingerprint": embedder.fingerprint(),
        "embedded_with": embedder.backend})
    index.add(vectors, items)
    return index


def check_index_model(index: VectorIndex, embedder: Embedder) -> None:
    """Refuse to query an index with a model other than the one that built it: its
    vectors would be in another embedding space and every score meaningless."""
    if index.dim != embedder.dim:
        raise ValueError(f"the index holds {index.dim}-d vectors but {embedder.model_dir} embeds "
                         f"{embedder.dim}-d ones: rebuild the index with this model")
    built = index.metadata.get("model_fingerprint")
    if built is not None and built != embedder.fingerprint():
        raise ValueError(f"the index was built with another model ({index.metadata.get('model')}, "
                         f"fingerprint {built[:12]}) than {embedder.model_dir} (fingerprint "
                         f"{embedder.fingerprint()[:12]}): rebuild it with this model")


def _write_synced(path: Path, write) -> None:
    with open(path, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


# ---------------------------------------------------------------------------- metrics


def _groups(groups, n: int, what: str) -> np.ndarray:
    if groups is None:
        return np.arange(n)
    array = np.asarray(groups)
    if array.shape != (n,):
        raise ValueError(f"{what} must have one entry per {what.split('_')[0]} ({n}), got shape "
                         f"{array.shape}")
    return array


def _relevance(similarity, query_groups, item_groups) -> tuple[np.ndarray, np.ndarray]:
    similarity = np.asarray(similarity, dtype=np.float64)
    if similarity.ndim != 2 or 0 in similarity.shape:
        raise ValueError(f"similarity must be a non-empty [queries, items] matrix, got shape "
                         f"{similarity.shape}")
    if np.isnan(similarity).any():
        raise ValueError("similarity contains NaN")
    n_queries, n_items = similarity.shape
    if query_groups is None and item_groups is None and n_queries != n_items:
        raise ValueError(f"without groups, query i matches item i: the similarity must be square, "
                         f"got {n_queries} x {n_items}")
    relevant = (_groups(query_groups, n_queries, "query_groups")[:, None]
                == _groups(item_groups, n_items, "item_groups")[None, :])
    missing = np.flatnonzero(~relevant.any(axis=1))
    if len(missing):
        raise ValueError(f"queries {missing[:5].tolist()} have no relevant item (no item has their "
                         "group): recall is undefined for them")
    return similarity, relevant


def recall_at_k(similarity, k: int, query_groups=None, item_groups=None) -> float:
    """Recall@K: the share of queries with a relevant item among their top K items.

    ``similarity[i, j]`` scores item j for query i (higher = more similar). Item j is
    relevant to query i when ``item_groups[j] == query_groups[i]``; without groups, query
    i's only relevant item is item i (pairs on the diagonal). Use text->image with
    ``similarity = text_emb @ image_emb.T`` and image->text with its transpose; with
    captions that repeat, give every caption and image the id of its caption string as
    group, so an image matches any copy of its caption and a caption any image it
    describes.

    Ties count against the model: the rank of query i's best relevant item is 1 + the
    number of NON-relevant items scoring at least as high, and the query is a hit when
    that rank is <= K. A model whose embeddings collapse (all scores equal) gets 0,
    not a lucky 1 from index order.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    similarity, relevant = _relevance(similarity, query_groups, item_groups)
    best = np.where(relevant, similarity, -np.inf).max(axis=1)
    outranking = ((similarity >= best[:, None]) & ~relevant).sum(axis=1)
    return float((outranking < k).mean())


def chance_recall_at_k(k: int, n_items: int | None = None, query_groups=None, item_groups=None) -> float:
    """Expected Recall@K of a ranking drawn uniformly at random (what a model that has
    learned nothing scores on average): for a query with m relevant items among N,
    ``1 - C(N - m, K) / C(N, K)``, averaged over the queries. Without groups (pairs on
    the diagonal, m = 1) it is ``K / n_items``."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if item_groups is None:
        if n_items is None or n_items <= 0:
            raise ValueError("give n_items, or item_groups and query_groups")
        return min(1.0, k / n_items)
    items = np.asarray(item_groups)
    n = len(items)
    values, counts = np.unique(items, return_counts=True)
    per_group = dict(zip(values.tolist(), counts.tolist()))
    queries = np.asarray(query_groups).tolist()
    total = Fraction(0)
    for group in queries:
        m = per_group.get(group, 0)
        if m == 0:
            raise ValueError(f"query group {group!r} has no item")
        # Exact rationals: 1 - a/b in floats loses the last digits (K/N came out 0.0166...625).
        total += 1 - (Fraction(math.comb(n - m, k), math.comb(n, k)) if k <= n else 0)
    return float(total / len(queries))


def zero_shot_accuracy(similarity, labels) -> float:
    """Share of images whose most similar prompt is their label's.

    ``similarity[i, c]``: image i against the prompt of class c (e.g. ``image_emb @
    prompt_emb.T`` with prompts ``taichu.imagetext.digit_prompts()``). A tie for the
    highest score counts as wrong, as in ``recall_at_k``.
    """
    similarity = np.asarray(similarity, dtype=np.float64)
    labels = np.asarray(labels)
    if similarity.ndim != 2 or 0 in similarity.shape:
        raise ValueError(f"similarity must be a non-empty [images, classes] matrix, got shape "
                         f"{similarity.shape}")
    if labels.shape != (similarity.shape[0],):
        raise ValueError(f"need one label per image ({similarity.shape[0]}), got shape {labels.shape}")
    if np.isnan(similarity).any():
        raise ValueError("similarity contains NaN")
    if labels.min() < 0 or labels.max() >= similarity.shape[1]:
        raise ValueError(f"labels must be in 0..{similarity.shape[1] - 1}")
    rows = np.arange(len(labels))
    own = similarity[rows, labels]
    others = similarity.copy()
    others[rows, labels] = -np.inf
    return float((own > others.max(axis=1)).mean())


# ---------------------------------------------------------------------------- evaluation


@dataclass
class Metrics:
    values: dict

    def lines(self) -> list[str]:
        v = self.values
        out = [f"model {v['model']} ({v['backend']}), data {v['data']} {v['split']} split: "
               f"{v['images']} images, {v['unique_captions']} distinct captions"]
        for direction, label in (("text_to_image", "text -> image"), ("image_to_text", "image -> text")):
            d = v[direction]
            parts = [f"R@{k} {d[f'R@{k}']:.2%} (chance {d['chance'][f'R@{k}']:.2%})" for k in v["ks"]]
            out.append(f"{label}: " + ", ".join(parts) + f"  [{d['queries']} queries, {d['items']} items]")
        if "note" in v:
            out.append(f"note: {v['note']}")
        if "zero_shot" in v:
            z = v["zero_shot"]
            out.append(f"zero-shot digit accuracy: {z['accuracy']:.2%} (chance {z['chance']:.2%}, "
                       f"{z['classes']} prompts like {z['prompts'][0]!r})")
        return out


def evaluate(embedder: Embedder, data: str | None = None, split: str = "test",
             ks: Sequence[int] = (1, 5)) -> Metrics:
    """Recall@K both ways (and zero-shot digit accuracy on digits) on a held-out split,
    with the embedder's model in its backend.

    The split is the one training used: ``load_image_text`` with the model config's data
    section (validation_fraction, split_seed, scene_count, scene_seed); the split is a
    hash of image keys, so it does not depend on image sizes or order. ``data`` replaces
    the source (digits, scenes or a .jsonl), keeping the config's split parameters.

    Captions are deduplicated: text->image has one query per distinct caption, relevant
    = every image with that caption; image->text ranks the distinct captions, relevant =
    the image's own caption (a gallery with repeats would let copies of one wrong
    caption fill the top K).
    """
    from taichu.imagetext import DIGITS, digit_prompts, load_image_text

    if split not in ("test", "train", "all"):
        raise ValueError(f"split must be test, train or all, got {split!r}")
    cfg = embedder.config.data
    source = data if data is not None else cfg.source
    dataset = load_image_text(source, test_fraction=cfg.validation_fraction, seed=cfg.split_seed,
                              scene_count=cfg.scene_count, scene_seed=cfg.scene_seed)
    pairs = {"test": dataset.test, "train": dataset.train, "all": dataset.train + dataset.test}[split]
    captions = list(dict.fromkeys(p.text for p in pairs))
    group = {text: i for i, text in enumerate(captions)}
    image_groups = np.array([group[p.text] for p in pairs])
    caption_groups = np.arange(len(captions))
    image_emb = embedder.embed_images([p.image for p in pairs])
    text_emb = embedder.embed_texts(captions)
    similarity = text_emb @ image_emb.T   # [captions, images]
    ks = sorted({int(k) for k in ks})
    values = {"model": str(embedder.model_dir), "backend": embedder.backend, "data": dataset.name,
              "split": split,
              "fingerprint": dataset.fingerprint, "images": len(pairs),
              "unique_captions": len(captions), "ks": ks}
    values["text_to_image"] = {
        "queries": len(captions), "items": len(pairs),
        **{f"R@{k}": recall_at_k(similarity, k, caption_groups, image_groups) for k in ks},
        "chance": {f"R@{k}": chance_recall_at_k(k, query_groups=caption_groups, item_groups=image_groups)
                   for k in ks}}
    values["image_to_text"] = {
        "queries": len(pairs), "items": len(captions),
        **{f"R@{k}": recall_at_k(similarity.T, k, image_groups, caption_groups) for k in ks},
        "chance": {f"R@{k}": chance_recall_at_k(k, query_groups=image_groups, item_groups=caption_groups)
                   for k in ks}}
    trained_on = [cfg.source] if isinstance(cfg.source, str) else list(cfg.source)
    if data is not None and str(data) not in map(str, trained_on):
        values["note"] = (f"data {data} is not the data the model's config trains on ({cfg.source}); "
                          "its split applies the config's validation_fraction and split_seed to it")
    labels = [p.label for p in pairs]
    if str(source) == DIGITS and all(label is not None for label in labels):
        prompts = digit_prompts()
        prompt_emb = embedder.embed_texts(prompts)
        values["zero_shot"] = {"accuracy": zero_shot_accuracy(image_emb @ prompt_emb.T, labels),
                               "chance": 1.0 / len(prompts), "classes": len(prompts),
                               "prompts": prompts}
    return Metrics(values)

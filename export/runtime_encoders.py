"""Running the encoder exports (one forward pass each, no generation), with ONNX Runtime or
from MINDIR with MindSpore: the image and text towers of an image-text model (CLIP, BriVL)
and the three towers of a tri-modal model (``ImageTextEncoder``, ``export_embedder``), a
speech model's encoder (wav2vec2: CTC logits and utterance embeddings, ``speech_network``)
and a vision model's backbone (features, ``vision_network``).

Their needs are those of export.runtime (its docstring): numpy, onnxruntime, sentencepiece
and pillow for ONNX; mindspore and no model code for MINDIR. Images and captions are
prepared by taichu.images.preprocess and taichu.imagetext.caption_ids, as in training. The
shared machinery (export directories, graphs by name) is export.runtime's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from export.runtime import (IMAGE_ENCODER, ExportTokenizer, IMAGE_TEXT, SPEECH, SPEECH_ENCODER, SPEECH_FAMILY, SPEECH_TOWER,
                            TEXT_ENCODER, TOKENIZER_FILE, TRIMODAL, VISION, VISION_FAMILY, VISION_MODEL, OnnxGraph,
                            mindir_graph, open_single_graph, read_export_info)
from taichu.retrieval import EXPORT_BACKENDS, Embedder, check_export_directory, l2_normalize
from taichu.speech_inputs import check_audio_batch, receptive_field_of

# Exports ImageTextEncoder runs: image-text towers, and a tri-modal model's three.
EMBEDDING_TASKS = (IMAGE_TEXT, TRIMODAL)
# ONNX Runtime threads of a speech network (as the tests and the 2-core CI machines use).
SPEECH_THREADS = 2


# ----------------------------------------------------------------------- image-text towers


class ImageTextEncoder(ExportTokenizer):
    """Image and text embeddings from an image-text export (``taichu export CLIP_DIR
    --format FORMAT --out DIR``): ``image_encoder`` and ``text_encoder`` graphs, run by a
    subclass's ``_graph`` (OnnxImageTextEncoder, MindirImageTextEncoder).

    ``image_features`` / ``text_features`` run the graphs on model inputs and return the
    raw projected features (the model's ``get_image_features`` / ``get_text_features``);
    ``embed_images`` / ``embed_texts`` start from pictures and strings and return unit-length
    float32 rows, so that a dot product is the cosine similarity.

    A tri-modal export (``taichu export TRIMODAL_DIR``) has a third graph, ``speech_encoder``:
    ``speech_features(input_values, attention_mask)`` runs it (the model's
    ``get_speech_features``: raw features in the same space); ``has_speech`` says whether an
    export has it (``speech_encoder`` is None otherwise).

    >>> encoder = OnnxImageTextEncoder("exported/")
    >>> scores = encoder.embed_images(["cat.jpg"]) @ encoder.embed_texts(["一只猫", "一辆车"]).T
    """

    FORMAT = ""

    def __init__(self, export_dir: str | Path):
        path = Path(export_dir)
        directory = path.parent if path.is_file() else path
        self.info = read_export_info(directory)
        if self.info.get("task") not in EMBEDDING_TASKS or self.info.get("format") != self.FORMAT:
            raise ValueError(f"{directory} is not an image-text {self.FORMAT.upper()} export (task "
                             f"{self.info.get('task', 'language_model')}, format {self.info.get('format')}): "
                             f"export a CLIP, BriVL or tri-modal model directory with `taichu export "
                             f"MODEL_DIR --format {self.FORMAT} --out DIR`")
        graphs = {g["name"]: g for g in self.info["graphs"]}
        self.image_encoder = self._graph(directory / graphs[IMAGE_ENCODER]["file"], graphs[IMAGE_ENCODER])
        self.text_encoder = self._graph(directory / graphs[TEXT_ENCODER]["file"], graphs[TEXT_ENCODER])
        self.speech_encoder, self.receptive_field = None, None
        if self.info["task"] == TRIMODAL:
            if SPEECH_TOWER not in graphs:
                raise ValueError(f"{directory}: export_info.json lists no {SPEECH_TOWER} graph (a tri-modal "
                                 f"export has three towers)")
            self.speech_encoder = self._graph(directory / graphs[SPEECH_TOWER]["file"], graphs[SPEECH_TOWER])
            speech = self.info["config"]["model"]["speech"]
            self.receptive_field = receptive_field_of(speech["conv_kernel"], speech["conv_stride"])
        # Sizes come from export_info.json (the signature and a JSON copy of the config)
        # rather than config.yaml, which would need yaml and pydantic to read.
        _, self.num_channels, self.image_size, _ = graphs[IMAGE_ENCODER]["inputs"][0]["shape"]
        self.embed_dim = graphs[IMAGE_ENCODER]["outputs"][0]["shape"][1]
        text = self.info["config"]["model"]["text"]
        self.context_length, self.vocab_size = text["max_position_embeddings"], text["vocab_size"]
        self.tokenizer_path = directory / TOKENIZER_FILE

    def _graph(self, path: Path, entry: dict):
        """A graph of this format with ``run(feeds) -> outputs`` by name; ``entry`` is its
        export_info.json entry (name, inputs, outputs)."""
        raise NotImplementedError


    def image_features(self, pixel_values: np.ndarray) -> np.ndarray:
        """float32 [batch, embed_dim] from pixel_values [batch, channels, size, size]
        (taichu.images.preprocess); not normalised."""
        pixel_values = np.asarray(pixel_values)
        expected = (self.num_channels, self.image_size, self.image_size)
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != expected:
            raise ValueError(f"pixel_values must be [batch, {', '.join(map(str, expected))}], "
                             f"got shape {pixel_values.shape}")
        if pixel_values.shape[0] == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        feeds = {"pixel_values": np.ascontiguousarray(pixel_values, np.float32)}
        return self.image_encoder.run(feeds)["image_embeds"]

    def text_features(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """float32 [batch, embed_dim] from right-padded ids and mask [batch, sequence]
        (taichu.imagetext.caption_ids); not normalised."""
        input_ids, attention_mask = np.asarray(input_ids), np.asarray(attention_mask)
        self._check_text(input_ids, attention_mask)
        if input_ids.shape[0] == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
        return self.text_encoder.run(feeds)["text_embeds"]

    @property
    def has_speech(self) -> bool:
        return self.speech_encoder is not None

    def speech_features(self, input_values: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """float32 [batch, embed_dim] from audio [batch, samples] (16 kHz, normalised per clip,
        zero padded) and its sample mask [batch, samples] (1 = real sample, right-padded;
        None: every sample real); not normalised. Tri-modal exports only. The inputs are
        checked as the models check theirs (taichu.speech_inputs.check_audio_batch: every
        row at least the receptive field)."""
        if self.speech_encoder is None:
            raise ValueError(f"this {self.info.get('family')} export has no speech tower: speech_features "
                             f"needs a tri-modal export (taichu export TRIMODAL_DIR)")
        input_values = np.asarray(input_values)
        if input_values.ndim == 2 and input_values.shape[0] == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        check_audio_batch(input_values.shape, attention_mask, self.receptive_field, input_values.dtype)
        mask = (np.ones(input_values.shape, np.int64) if attention_mask is None
                else (np.asarray(attention_mask) != 0).astype(np.int64))
        feeds = {"input_values": np.ascontiguousarray(input_values, np.float32), "attention_mask": mask}
        return self.speech_encoder.run(feeds)["speech_embeds"]

    def _check_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> None:
        """What the models check before a forward pass (taichu.families.clip.check_inputs),
        for the same reasons: the graph would read past the embedding table or the
        positions, or pool a padding token."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, sequence], got shape {input_ids.shape}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {input_ids.shape}, "
                             f"got {attention_mask.shape}")
        if input_ids.shape[0] == 0:
            return
        if input_ids.shape[1] == 0:
            raise ValueError(f"input_ids has an empty sequence axis, shape {input_ids.shape}")
        if input_ids.shape[1] > self.context_length:
            raise ValueError(f"text length {input_ids.shape[1]} exceeds the context "
                             f"max_position_embeddings {self.context_length}")
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is out of range for vocab_size {self.vocab_size}")
        mask = attention_mask != 0
        if not mask[:, 0].all() or (mask[:, 1:] & ~mask[:, :-1]).any():
            raise ValueError("attention_mask must be right-padded with a real token first in every "
                             "row (ones, then zeros), as taichu.imagetext.caption_ids makes it")

    def embed_images(self, images, batch_size: int = 64) -> np.ndarray:
        """Unit-length float32 [len(images), embed_dim] for a list of images (paths, encoded
        bytes, PIL images, uint8 arrays), preprocessed as in training, ``batch_size`` at a time."""
        from taichu.images import preprocess

        images = self._as_list(images, "images", batch_size)
        rows = [l2_normalize(self.image_features(preprocess(images[i:i + batch_size], self.image_size)))
                for i in range(0, len(images), batch_size)]
        return np.concatenate(rows) if rows else np.zeros((0, self.embed_dim), np.float32)

    def embed_texts(self, texts, batch_size: int = 256) -> np.ndarray:
        """Unit-length float32 [len(texts), embed_dim] for a list of strings: [bos] + text +
        [eos], right-padded to the model's context (taichu.imagetext.caption_ids)."""
        from taichu.imagetext import caption_ids

        texts = self._as_list(texts, "texts", batch_size)
        if not texts:
            return np.zeros((0, self.embed_dim), np.float32)
        input_ids, attention_mask = caption_ids(self.tokenizer, texts, self.context_length)
        rows = [l2_normalize(self.text_features(input_ids[i:i + batch_size], attention_mask[i:i + batch_size]))
                for i in range(0, len(texts), batch_size)]
        return np.concatenate(rows)

    @staticmethod
    def _as_list(items, what: str, batch_size: int) -> list:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        # A lone path or string is iterable too (by character); it is almost surely a mistake.
        if isinstance(items, (str, bytes, Path)):
            raise TypeError(f"embed_{what} takes a list of {what}, not one {type(items).__name__}")
        return list(items)


class OnnxImageTextEncoder(ImageTextEncoder):
    """ImageTextEncoder over ONNX Runtime (``taichu export ... --format onnx``): numpy,
    onnxruntime, sentencepiece and pillow only. ``threads``: None is ORT's default."""

    FORMAT = "onnx"

    def __init__(self, export_dir: str | Path, threads: int | None = None):
        self.threads = threads
        super().__init__(export_dir)

    def _graph(self, path: Path, entry: dict):
        return OnnxGraph(path, self.threads)


class MindirImageTextEncoder(ImageTextEncoder):
    """ImageTextEncoder over MINDIR towers (``taichu export ... --format mindir``), loaded
    with mindspore.load + nn.GraphCell: mindspore without any model code."""

    FORMAT = "mindir"

    def _graph(self, path: Path, entry: dict):
        return mindir_graph(path, entry)


def export_embedder(directory: str | Path, backend: str = "onnx", batch_size: int = 64) -> Embedder:
    """taichu.retrieval.Embedder over an image-text or tri-modal export: ONNX Runtime
    ("onnx") or mindspore alone ("mindir"), no model code. Its encoder (``model``) is an
    OnnxImageTextEncoder / MindirImageTextEncoder, with ``speech_features`` for a tri-modal
    export."""
    if backend not in EXPORT_BACKENDS:
        raise ValueError(f"unknown export backend {backend!r} (choose from {', '.join(EXPORT_BACKENDS)})")
    check_export_directory(directory, backend)
    encoder = {"onnx": OnnxImageTextEncoder, "mindir": MindirImageTextEncoder}[backend](directory)
    return Embedder(directory, backend, batch_size, encoder=encoder)


# ----------------------------------------------------------------------- speech and vision


class SpeechNetwork:
    """A speech export's ``encoder`` graph (``taichu export W2V_DIR --format onnx|mindir``)
    as the network taichu.recognition.SpeechRunner drives: ``network(input_values,
    attention_mask) -> {"embedding": [batch, hidden], "logits": [batch, frames, vocab]}``
    (logits with the CTC head only); ``run`` gives every output of the graph by name
    (``last_hidden_state`` too).

    Inputs are checked before the graph runs, as the models check theirs
    (taichu.families.wav2vec2.check_inputs, same wording): input_values float32 [batch,
    samples] with samples > 0; attention_mask [batch, samples] of integers or booleans, 1 for
    real samples, right-padded; every row at least the receptive field. The sizes come from
    export_info.json, so this needs numpy and the runtime only (onnxruntime, or mindspore
    without any model code for "mindir").
    """

    def __init__(self, export_dir: str | Path, backend: str = "onnx", threads: int = SPEECH_THREADS):
        self.info, entry, self.graph = open_single_graph(export_dir, backend, SPEECH, SPEECH_FAMILY,
                                                         "a speech (wav2vec2)", "a wav2vec2", SPEECH_ENCODER,
                                                         threads)
        model = self.info["config"]["model"]
        self.backend = backend
        self.head = model["head"]
        self.hidden_size = model["hidden_size"]
        self.receptive_field = receptive_field_of(model["conv_kernel"], model["conv_stride"])
        self.output_names = [o["name"] for o in entry["outputs"]]

    def check(self, input_values: np.ndarray, attention_mask: np.ndarray | None) -> np.ndarray:
        """The int64 mask to feed (all ones for None); raises ValueError on bad inputs."""
        if not isinstance(input_values, np.ndarray) or input_values.dtype != np.float32:
            kind = input_values.dtype if isinstance(input_values, np.ndarray) else type(input_values).__name__
            raise ValueError(f"input_values must be a float32 numpy array (normalised 16 kHz audio), got {kind}")
        if attention_mask is None:
            attention_mask = np.ones(input_values.shape, np.int64)
        check_audio_batch(input_values.shape, attention_mask, self.receptive_field)
        return (np.asarray(attention_mask) != 0).astype(np.int64)

    def run(self, input_values: np.ndarray, attention_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Every output of the graph by name, after checking the inputs."""
        mask = self.check(input_values, attention_mask)
        return self.graph.run({"input_values": np.ascontiguousarray(input_values), "attention_mask": mask})

    def __call__(self, input_values: np.ndarray, attention_mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        outputs = self.run(input_values, attention_mask)
        return {name: outputs[name] for name in ("logits", "embedding") if name in outputs}


def speech_network(export_dir: str | Path, backend: str = "onnx") -> SpeechNetwork:
    """The network of a speech export for taichu.recognition.SpeechRunner: ONNX Runtime
    ("onnx", SPEECH_THREADS intra-op threads) or mindspore.nn.GraphCell ("mindir", mindspore
    alone, no model code); ``network(values float32 [B, L], mask int [B, L]) ->
    {"logits" (CTC head), "embedding"}``. Refuses an export of another family or format."""
    if backend not in EXPORT_BACKENDS:
        raise ValueError(f"unknown export backend {backend!r} (choose from {', '.join(EXPORT_BACKENDS)})")
    check_export_directory(export_dir, backend)
    return SpeechNetwork(export_dir, backend)


class VisionNetwork:
    """A vision export's ``model`` graph (``taichu export VISION_DIR --format onnx|mindir``):
    ``run(pixel_values) -> {"last_hidden_state": [batch, 1 + patches, hidden],
    "pooler_output": [batch, hidden]}`` (numpy), the backbone an MST model's teacher
    (export/signature_encoders.py). What taichu.vision_tasks.VisionRunner drives for ``taichu probe
    --backend onnx|mindir`` (``network(pixel_values)`` is ``run``).

    pixel_values are checked before the graph runs: float32 [batch, channels, size, size]
    at the exported size (taichu.images.preprocess makes them; the graph's positions fix the
    size). The sizes come from export_info.json: numpy and the runtime only (onnxruntime, or
    mindspore without any model code for "mindir").
    """

    def __init__(self, export_dir: str | Path, backend: str = "onnx", threads: int | None = None):
        self.info, entry, self.graph = open_single_graph(export_dir, backend, VISION, VISION_FAMILY, "a vision",
                                                         "a vision", VISION_MODEL, threads)
        self.backend = backend
        self.encoder_name = "teacher" if self.info["config"]["model"]["objective"] == "mst" else "backbone"
        self.input_shape = tuple(entry["inputs"][0]["shape"][1:])              # (channels, size, size)
        self.output_shapes = {o["name"]: tuple(o["shape"][1:]) for o in entry["outputs"]}

    def check(self, pixel_values) -> None:
        """Raises ValueError unless ``pixel_values`` is float32 [batch, channels, size, size]."""
        expected = f"[batch, {', '.join(map(str, self.input_shape))}]"
        if not isinstance(pixel_values, np.ndarray) or pixel_values.dtype != np.float32:
            kind = pixel_values.dtype if isinstance(pixel_values, np.ndarray) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be a float32 numpy array {expected} (taichu.images.preprocess), "
                             f"got {kind}")
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != self.input_shape:
            raise ValueError(f"pixel_values must be {expected}: the export's image size is fixed (resize with "
                             f"taichu.images.preprocess), got shape {pixel_values.shape}")

    def run(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """Both outputs of the graph by name, after checking the input; an empty batch gives
        empty outputs without running the graph."""
        self.check(pixel_values)
        if pixel_values.shape[0] == 0:
            return {name: np.zeros((0, *shape), np.float32) for name, shape in self.output_shapes.items()}
        return self.graph.run({"pixel_values": np.ascontiguousarray(pixel_values)})

    __call__ = run


def vision_network(export_dir: str | Path, backend: str = "onnx") -> VisionNetwork:
    """The backbone of a vision export for taichu.vision_tasks.VisionRunner: ONNX Runtime
    ("onnx", ORT's default threads) or mindspore.nn.GraphCell ("mindir", mindspore alone, no
    model code); ``network(pixel_values float32 [B, C, S, S]) -> {"last_hidden_state",
    "pooler_output"}``. Refuses an export of another family or format."""
    if backend not in EXPORT_BACKENDS:
        raise ValueError(f"unknown export backend {backend!r} (choose from {', '.join(EXPORT_BACKENDS)})")
    check_export_directory(export_dir, backend)
    return VisionNetwork(export_dir, backend)

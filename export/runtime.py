"""Running exports: a GPT decoder step and text generator, the image and text towers of
an image-text model (CLIP, BriVL) and the three towers of a tri-modal model, a speech
model's encoder (wav2vec2: CTC logits and utterance embeddings, ``speech_network``), a
vision model's backbone (features, ``vision_network``), a DALL-E's generation step
(``dalle_network``), an image tokenizer's decoder (codes -> uint8 images,
``image_decoder_network``) and an M6's generation step (``m6_network``), with ONNX Runtime or
from MINDIR with MindSpore.

The ONNX side needs only numpy, onnxruntime and sentencepiece, plus pillow for images (no
torch, no mindspore, no yaml or pydantic: what an export needs is in its export_info.json):
this is what a deployment installs. The MINDIR side (MindirGenerator,
MindirImageTextEncoder) needs mindspore instead of onnxruntime, and no model code
(mindspore_impl), as a deployment on Ascend would. Sampling is taichu.generate's, so the same seed gives the same
tokens here as with the PyTorch and MindSpore models; images and captions are prepared by
taichu.images.preprocess and taichu.imagetext.caption_ids, as in training.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from export.signature import input_names, output_names, position_ids
from taichu.generate import SamplingConfig, generate_ids
from taichu.retrieval import EXPORT_BACKENDS, Embedder, check_export_directory, l2_normalize
from taichu.speech_inputs import check_audio_batch, receptive_field_of

MODEL_FILE = "model.onnx"
INT8_FILE = "model_int8.onnx"
INFO_FILE = "export_info.json"
TOKENIZER_FILE = "tokenizer.model"
IMAGE_TEXT, TRIMODAL = "image_text", "trimodal"
IMAGE_ENCODER, TEXT_ENCODER, SPEECH_TOWER = "image_encoder", "text_encoder", "speech_encoder"
# Exports ImageTextEncoder runs: image-text towers, and a tri-modal model's three.
EMBEDDING_TASKS = (IMAGE_TEXT, TRIMODAL)
SPEECH, SPEECH_ENCODER, SPEECH_FAMILY = "speech", "encoder", "wav2vec2"
VISION, VISION_MODEL, VISION_FAMILY = "vision", "model", "vision"
TEXT_TO_IMAGE, DALLE_FAMILY, PREFILL, DECODE = "text_to_image", "dalle", "prefill", "decode"
IMAGE_TOKENIZER, VQVAE_FAMILY, CODE_DECODER, CODE_ENCODER = "image_tokenizer", "vqvae", "decoder", "encoder"
# Images per run of an image tokenizer's graph (taichu.image_tokens.BATCH's).
CODE_BATCH = 64
# ONNX Runtime threads of a speech network (as the tests and the 2-core CI machines use).
SPEECH_THREADS = 2


def resolve_onnx(path: str | Path) -> tuple[Path, Path]:
    """(model file, export directory) for an export directory or a .onnx file in one."""
    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    towers = all((path / f"{name}.onnx").is_file() for name in (IMAGE_ENCODER, TEXT_ENCODER))
    if not file.is_file() and towers:
        raise FileNotFoundError(f"{path} is an image-text export ({IMAGE_ENCODER}.onnx, {TEXT_ENCODER}.onnx): "
                                f"it embeds images and texts (export.OnnxImageTextEncoder), it has no "
                                f"decoder to generate with")
    if not file.is_file() and (file.parent / INFO_FILE).is_file():
        info = read_export_info(file.parent)
        if info.get("task") == M6_TASK:
            raise ValueError(f"{file.parent} is an export of an M6 model: it generates through "
                             f"export.m6_network (taichu.m6_generate), not the GPT's generator")
        if info.get("task", "language_model") != "language_model":
            raise ValueError(f"{file.parent} is an export of a {info.get('family')} model (task {info['task']}): "
                             f"it has no text decoder to generate with")
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no ONNX model here (make one with `taichu export MODEL_DIR "
                                f"--format onnx --out DIR`)")
    return file, file.parent


def read_export_info(directory: Path) -> dict:
    info = directory / INFO_FILE
    if not info.is_file():
        raise FileNotFoundError(f"{info} not found: the directory was not written by taichu export")
    return json.loads(info.read_text(encoding="utf-8"))


class OnnxDecoder:
    """One ONNX Runtime session of the decoder; ``step`` is what taichu.generate drives."""

    def __init__(self, path: str | Path, threads: int = 0):
        import onnxruntime as ort

        self.path, _ = resolve_onnx(path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.num_layers = (len(inputs) - 3) // 2
        if sorted(inputs) != sorted(input_names(self.num_layers)):
            raise ValueError(f"{self.path}: inputs {sorted(inputs)} are not a taichu GPT decoder's "
                             f"({input_names(self.num_layers)[:4]} ...)")
        _, self.num_heads, _, self.head_dim = inputs["past_key_values.0.key"].shape
        self.vocab_size = self.session.get_outputs()[0].shape[2]
        self.output_names = output_names(self.num_layers)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.num_heads, 0, self.head_dim), np.float32)
                for _ in range(2 * self.num_layers)]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, past):
        """Last-position logits [batch, vocab] and the new cache (a list of arrays)."""
        if input_ids.min() < 0 or input_ids.max() >= self.vocab_size:
            bad = input_ids.min() if input_ids.min() < 0 else input_ids.max()
            raise ValueError(f"token id {bad} is out of range for vocab_size {self.vocab_size}")
        past = self.empty_past(input_ids.shape[0]) if past is None else past
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                 "position_ids": position_ids(attention_mask, input_ids.shape[1])}
        feeds.update(zip(input_names(self.num_layers)[3:], past))
        outputs = self.session.run(self.output_names, feeds)
        return outputs[0][:, -1], outputs[1:]


class ExportGenerator:
    """Text generation from an export directory: its tokenizer, window and the shared
    sampler; a subclass sets ``self.step`` (what taichu.generate drives)."""

    def __init__(self, directory: Path):
        from taichu.tokenizer import Tokenizer

        self.info = read_export_info(directory)
        task = self.info.get("task", "language_model")
        if task != "language_model":     # a vision export's graph is model.onnx too
            raise ValueError(f"{directory} is an export of a {self.info.get('family')} model (task {task}): "
                             f"it has no decoder to generate with")
        tokenizer = directory / TOKENIZER_FILE
        if not tokenizer.is_file():
            raise FileNotFoundError(f"{tokenizer} not found: generation needs the model's tokenizer "
                                    f"(export a model directory that has one)")
        self.tokenizer = Tokenizer(tokenizer)
        self.max_positions = self.info["max_position_embeddings"]

    def generate_ids(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[int]]:
        return generate_ids(self.step, prompts, sampling, self.tokenizer.eos_id,
                            self.tokenizer.pad_id, self.max_positions)

    def generate(self, prompts: list[str], **sampling) -> list[str]:
        """Continuations of ``prompts``; keyword arguments are taichu.generate.SamplingConfig's."""
        encoded = [self.tokenizer.encode(p, add_bos=True) for p in prompts]
        ids = self.generate_ids(encoded, SamplingConfig(**sampling))
        return [self.tokenizer.decode(row) for row in ids]


class OnnxGenerator(ExportGenerator):
    """Text generation from an ONNX export directory (``taichu export ... --format onnx``).

    >>> generator = OnnxGenerator("exported/")           # or "exported/model_int8.onnx"
    >>> generator.generate(["中国人民"], max_new_tokens=20, temperature=0)
    """

    def __init__(self, path: str | Path, threads: int = 0):
        file, directory = resolve_onnx(path)
        super().__init__(directory)
        self.decoder = OnnxDecoder(file, threads)
        self.step = self.decoder.step


def mindir_step(directory: str | Path):
    """The ``step`` of a MINDIR export directory: its ``prefill.mindir`` and ``decode.mindir``
    (static cache) loaded with ``mindspore.load`` + ``nn.GraphCell``, driven by
    taichu.generate.StaticCacheStep; mindspore alone, no model code is imported."""
    import mindspore as ms
    from mindspore import nn

    from export.mindir_export import DECODE, PREFILL, SUFFIX
    from taichu.generate import mindspore_graph_step

    directory = Path(directory)
    files = [directory / f"{name}{SUFFIX}" for name in (PREFILL, DECODE)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: no {' or '.join(missing)} here (make a MINDIR export "
                                f"of a GPT with `taichu export MODEL_DIR --format mindir --out DIR`)")
    vocab_size = read_export_info(directory)["config"]["model"]["vocab_size"]
    prefill, decode = (nn.GraphCell(ms.load(str(f))) for f in files)
    return mindspore_graph_step(prefill, decode, vocab_size)


class MindirGenerator(ExportGenerator):
    """Text generation from a MINDIR export directory (``taichu export ... --format
    mindir``) with mindspore alone (``mindir_step``).

    >>> MindirGenerator("exported-ms/").generate(["中国人民"], max_new_tokens=20, temperature=0)
    """

    def __init__(self, path: str | Path):
        self.step = mindir_step(path)
        super().__init__(Path(path))


class OnnxGraph:
    """One ONNX Runtime session on the CPU: ``run(feeds) -> outputs`` by name."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such ONNX graph")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, {name: feeds[name] for name in self.input_names})
        return dict(zip(self.output_names, outputs))



class ImageTextEncoder:
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
        self._tokenizer = None

    def _graph(self, path: Path, entry: dict):
        """A graph of this format with ``run(feeds) -> outputs`` by name; ``entry`` is its
        export_info.json entry (name, inputs, outputs)."""
        raise NotImplementedError

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from taichu.tokenizer import Tokenizer

            if not self.tokenizer_path.is_file():
                raise FileNotFoundError(f"{self.tokenizer_path} not found: embedding texts needs the "
                                        f"model's tokenizer (export a model directory that has one)")
            self._tokenizer = Tokenizer(self.tokenizer_path)
        return self._tokenizer

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


def mindir_graph(path: Path, entry: dict):
    """A MINDIR graph (export.mindir_export.MindirGraph, mindspore alone) of the signature in
    its export_info.json ``entry`` (name, inputs, outputs)."""
    from export.mindir_export import MindirGraph
    from export.signature import GraphSignature, TensorInfo

    def tensors(specs):
        return tuple(TensorInfo(t["name"], t["dtype"], tuple(t["shape"])) for t in specs)
    return MindirGraph(path, GraphSignature(entry["name"], tensors(entry["inputs"]), tensors(entry["outputs"])))


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


def open_single_graph(export_dir: str | Path, backend: str, task: str, family: str, kind: str,
                      source: str, name: str, threads: int | None):
    """(export_info, the graph's export_info entry, the graph: ``run(feeds) -> outputs``) of
    the one graph ``name`` of an export of ``task`` in ``backend`` (onnx: ONNX Runtime with
    ``threads``; mindir: mindspore.nn.GraphCell). Refuses an export of another task or family
    (``kind`` and ``source`` say which it should be: "a speech (wav2vec2)" model, exported
    from "a wav2vec2" model directory) or another format, naming the command that makes one."""
    info, graphs = open_graphs(export_dir, backend, task, family, kind, source, (name,), threads)
    return (info,) + graphs[name]


def open_graphs(export_dir: str | Path, backend: str, task: str, family: str, kind: str,
                source: str, names, threads: int | None):
    """(export_info, {name: (export_info entry, graph)}) for the graphs ``names`` of an
    export; the checks and refusals of open_single_graph."""
    if backend not in ("onnx", "mindir"):
        raise ValueError(f"unknown export backend {backend!r} (choose from onnx, mindir)")
    path = Path(export_dir)
    directory = path.parent if path.is_file() else path
    info = read_export_info(directory)
    found, found_task, fmt = info.get("family"), info.get("task", "language_model"), info.get("format")
    if found_task != task or found != family:
        raise ValueError(f"{directory} is an export of a {found} model (task {found_task}), not of {kind} "
                         f"model: export {source} model directory with `taichu export MODEL_DIR --format "
                         f"{backend} --out DIR`")
    if fmt != backend:
        described = {"onnx": "an ONNX", "mindir": "a MINDIR"}.get(fmt, f"a {fmt}")
        raise ValueError(f"{directory} is {described} export; --backend {backend} runs "
                         f"{backend.upper()} exports (use --backend {fmt})")
    listed = {g["name"]: g for g in info["graphs"]}
    opened = {}
    for name in names:
        if name not in listed:
            raise ValueError(f"{directory}: export_info.json lists no {name} graph")
        entry = listed[name]
        file = directory / entry["file"]
        opened[name] = (entry, OnnxGraph(file, threads) if backend == "onnx" else mindir_graph(file, entry))
    return info, opened


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
    (export/signature.py). What taichu.vision_tasks.VisionRunner drives for ``taichu probe
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


# ----------------------------------------------------------------------- text to image


class DalleCache:
    """What ``DalleNetwork.step`` carries between steps: the per-layer keys and values
    (``tensors``: numpy arrays of exactly ``length`` positions for ONNX; MindSpore tensors of
    a fixed number of slots for MINDIR, the first ``length`` written) and ``length``, the
    positions so far (the text's and the codes')."""

    def __init__(self, tensors: list, length: int, batch: int, owner):
        self.tensors, self.length, self.batch, self.owner = tensors, length, batch, owner


def _integers(array, what: str, shape_text: str) -> np.ndarray:
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.integer):
        kind = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
        raise ValueError(f"{what} must be an integer numpy array {shape_text}, got {kind}")
    return array


def _in_range(array: np.ndarray, size: int, what: str, size_name: str) -> None:
    if array.size:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= size:
            raise ValueError(f"{what} {low if low < 0 else high} is out of range for {size_name} {size} "
                             f"(valid: 0..{size - 1})")


class DalleNetwork:
    """A DALL-E export (``taichu export DALLE_DIR --format onnx|mindir``) as the step of
    generation that taichu.imagine drives (``sample_codes``, ``imagine``), with the contract of
    taichu.imagine.dalle_step for the torch and MindSpore models, so the same seed gives the same
    codes on every runtime:

        step(text_ids, None, None) -> (logits float32 [B, codebook], cache)     prefill
        step(None, codes, cache)   -> (logits float32 [B, codebook], cache)     decode

    ``text_ids``: integer [B, text_length] (taichu.imagetext.caption_ids: [bos] + tokens +
    [eos], right-padded); ``codes``: integer [B, m], the next m codes (row-major) after the
    ``cache`` a previous step returned; logits are the last position's (the next code's).

    ONNX runs ``prefill.onnx`` once and ``decode.onnx`` for all m codes at once (the cache grows
    by concatenation, the positions come from its length). MINDIR runs ``prefill.mindir``, puts
    the text's keys and values in a cache of text_length + grid^2 slots (every position the
    model can take) and runs ``decode.mindir`` once per code with its slot as
    ``write_position``; the cache stays in MindSpore tensors between steps.

    Inputs are checked before any graph runs (the graphs cannot: an id out of range would read
    past an embedding table): shapes, ids and codes in range, the grid not overrun, a cache of
    this network and batch. Sizes come from export_info.json: numpy and the runtime only
    (onnxruntime, or mindspore without any model code for "mindir").
    """

    def __init__(self, export_dir: str | Path, backend: str = "onnx", threads: int | None = None):
        self.info, graphs = open_graphs(export_dir, backend, TEXT_TO_IMAGE, DALLE_FAMILY, "a text-to-image (DALL-E)",
                                        "a DALL-E", (PREFILL, DECODE), threads)
        self.backend = backend
        (_, self.prefill_graph), (decode_entry, self.decode_graph) = graphs[PREFILL], graphs[DECODE]
        m = self.info["config"]["model"]
        self.text_length, self.vocab_size = m["text_length"], m["vocab_size"]
        self.codebook_size, self.image_grid = m["codebook_size"], m["image_grid"]
        self.image_tokens = self.image_grid ** 2
        self.num_layers, self.num_heads = m["num_layers"], m["num_heads"]
        self.head_dim = m["hidden_size"] // m["num_heads"]
        # Every position the model can take (its own bound: the text and all grid^2 codes).
        self.capacity = self.text_length + self.image_tokens
        self.past_names = [t["name"] for t in decode_entry["inputs"] if t["name"].startswith("past_key_values.")]
        if backend == "mindir":   # the static-cache loop the MindSpore model compiles too
            from taichu.imagine import static_cache_step

            self._mindir_step = static_cache_step(self.prefill_graph.cell, self.decode_graph.cell, self.capacity)

    def check_text(self, text_ids) -> np.ndarray:
        shape_text = f"[batch, text_length = {self.text_length}]"
        text_ids = _integers(text_ids, "text_ids", shape_text)
        if text_ids.ndim != 2 or text_ids.shape[1] != self.text_length or text_ids.shape[0] == 0:
            raise ValueError(f"text_ids must be {shape_text} with batch >= 1 (captions padded to the text length, "
                             f"taichu.imagetext.caption_ids), got shape {text_ids.shape}")
        _in_range(text_ids, self.vocab_size, "token id", "vocab_size")
        return text_ids.astype(np.int64)

    def check_codes(self, codes, cache) -> np.ndarray:
        if not isinstance(cache, DalleCache) or cache.owner is not self:
            raise ValueError("past must be the cache a previous step of this network returned (prefill first: "
                             "step(text_ids, None, None))")
        codes = _integers(codes, "codes", "[batch, codes]")
        if codes.ndim != 2 or codes.shape[1] == 0:
            raise ValueError(f"codes must be [batch, codes] with at least one code, got shape {codes.shape}")
        if codes.shape[0] != cache.batch:
            raise ValueError(f"codes has batch {codes.shape[0]}, the cache {cache.batch}")
        start = cache.length - self.text_length
        if start + codes.shape[1] > self.image_tokens:
            raise ValueError(f"image codes {start}..{start + codes.shape[1] - 1} exceed the {self.image_grid}x"
                             f"{self.image_grid} grid ({self.image_tokens} codes)")
        _in_range(codes, self.codebook_size, "image code", "codebook_size")
        return codes.astype(np.int64)

    def step(self, text_ids, codes, past):
        """Prefill (``text_ids``, no codes, no past) or decode (``codes`` after ``past``);
        returns the last position's logits float32 [B, codebook] and the cache."""
        if text_ids is not None:
            if codes is not None or past is not None:
                raise ValueError("prefill takes text_ids alone (codes and past None); later steps take codes "
                                 "and the cache, without text_ids")
            return self._prefill(self.check_text(text_ids))
        if codes is None:
            raise ValueError("give text_ids (prefill) or codes and the cache of a previous step")
        return self._decode(self.check_codes(codes, past), past)

    __call__ = step

    def _prefill(self, text_ids: np.ndarray):
        batch = text_ids.shape[0]
        if self.backend == "onnx":
            out = self.prefill_graph.session.run(None, {"input_ids": text_ids})
            return out[0], DalleCache(list(out[1:]), self.text_length, batch, self)
        logits, (cache, length) = self._mindir_step(text_ids, None, None)
        return logits, DalleCache(cache, length, batch, self)

    def _decode(self, codes: np.ndarray, cache: DalleCache):
        if self.backend == "onnx":
            feeds = {"image_codes": codes, **dict(zip(self.past_names, cache.tensors))}
            out = self.decode_graph.session.run(None, feeds)
            logits = np.ascontiguousarray(out[0][:, -1])
            return logits, DalleCache(list(out[1:]), cache.length + codes.shape[1], cache.batch, self)
        logits, (tensors, length) = self._mindir_step(None, codes, (cache.tensors, cache.length))
        return logits, DalleCache(tensors, length, cache.batch, self)


def dalle_network(export_dir: str | Path, backend: str = "onnx") -> DalleNetwork:
    """The generation step of a DALL-E export for taichu.imagine: ONNX Runtime ("onnx", ORT's
    default threads) or mindspore.nn.GraphCell ("mindir", mindspore alone, no model code);
    ``network.step(text_ids or None, codes or None, past) -> (logits [B, K], past)``.
    Refuses an export of another family or format."""
    if backend not in EXPORT_BACKENDS:
        raise ValueError(f"unknown export backend {backend!r} (choose from {', '.join(EXPORT_BACKENDS)})")
    check_export_directory(export_dir, backend)
    return DalleNetwork(export_dir, backend)


class ImageDecoderNetwork:
    """An image tokenizer export (``taichu export VQVAE_DIR --format onnx|mindir``):
    ``decode(codes int [B, h, w]) -> uint8 [B, S, S, 3]``, what taichu.image_tokens.decode_codes
    gives for the model: the ``decoder`` graph's normalised pixels turned into images by
    taichu.images.denormalise with the model's pixel_mean / pixel_std (from export_info.json),
    the same float64 arithmetic, rounding (half to even) and clipping. ``encode(pixel_values
    float32 [B, 3, S, S] normalised) -> int64 codes [B, h, w]`` runs the ``encoder`` graph.

    Checks before a graph runs: integer codes [B, grid, grid] in [0, codebook size); float32
    pixels at the exported size. numpy and the runtime only (onnxruntime, or mindspore without
    any model code for "mindir").
    """

    def __init__(self, export_dir: str | Path, backend: str = "onnx", threads: int | None = None):
        self.info, graphs = open_graphs(export_dir, backend, IMAGE_TOKENIZER, VQVAE_FAMILY, "an image tokenizer (vqvae)",
                                        "a vqvae", (CODE_DECODER,), threads)
        self.backend, self.export_dir, self.threads = backend, export_dir, threads
        self.graph = graphs[CODE_DECODER][1]
        m = self.info["config"]["model"]
        self.codebook_size = m["codebook"]["size"]
        self.image_size = m["image_size"]
        self.grid = m["image_size"] // 2 ** (len(m["channels"]) - 1)
        self.pixel_mean, self.pixel_std = tuple(m["pixel_mean"]), tuple(m["pixel_std"])
        self._encoder = None

    def check(self, codes) -> np.ndarray:
        shape_text = f"[batch, {self.grid}, {self.grid}]"
        codes = _integers(codes, "codes", shape_text)
        if codes.ndim != 3 or codes.shape[1:] != (self.grid, self.grid):
            raise ValueError(f"codes must be {shape_text} (the export's grid is fixed), got shape {codes.shape}")
        _in_range(codes, self.codebook_size, "code", "the codebook size")
        return codes.astype(np.int64)

    def pixel_values(self, codes) -> np.ndarray:
        """float32 [B, 3, S, S]: the decoder graph's normalised pixels, CODE_BATCH codes at a time."""
        codes = self.check(codes)
        parts = [self.graph.run({"codes": codes[i:i + CODE_BATCH]})["pixel_values"]
                 for i in range(0, len(codes), CODE_BATCH)]
        return np.concatenate(parts) if parts else np.zeros((0, 3, self.image_size, self.image_size), np.float32)

    def decode(self, codes) -> np.ndarray:
        """uint8 [B, S, S, 3] images of ``codes`` [B, grid, grid]."""
        from taichu.images import denormalise

        return denormalise(self.pixel_values(codes), self.pixel_mean, self.pixel_std)

    __call__ = decode

    def encode(self, pixel_values) -> np.ndarray:
        """int64 codes [B, grid, grid] of normalised pixels float32 [B, 3, S, S]
        (taichu.images.normalise with the model's mean and std)."""
        expected = (3, self.image_size, self.image_size)
        if not isinstance(pixel_values, np.ndarray) or pixel_values.dtype != np.float32 \
                or pixel_values.ndim != 4 or pixel_values.shape[1:] != expected:
            got = pixel_values.shape if isinstance(pixel_values, np.ndarray) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be float32 [batch, {', '.join(map(str, expected))}] (normalised "
                             f"with the model's pixel_mean / pixel_std), got {got}")
        if self._encoder is None:
            _, graphs = open_graphs(self.export_dir, self.backend, IMAGE_TOKENIZER, VQVAE_FAMILY,
                                    "an image tokenizer (vqvae)", "a vqvae", (CODE_ENCODER,), self.threads)
            self._encoder = graphs[CODE_ENCODER][1]
        parts = [self._encoder.run({"pixel_values": np.ascontiguousarray(pixel_values[i:i + CODE_BATCH])})["codes"]
                 for i in range(0, len(pixel_values), CODE_BATCH)]
        return (np.concatenate(parts).astype(np.int64) if parts
                else np.zeros((0, self.grid, self.grid), np.int64))


def image_decoder_network(export_dir: str | Path, backend: str = "onnx") -> ImageDecoderNetwork:
    """The decoder of an image tokenizer export for taichu.imagine: ONNX Runtime ("onnx") or
    mindspore.nn.GraphCell ("mindir", mindspore alone, no model code); ``network.decode(codes
    [B, h, w]) -> uint8 [B, S, S, 3]``. Refuses an export of another family or format."""
    if backend not in EXPORT_BACKENDS:
        raise ValueError(f"unknown export backend {backend!r} (choose from {', '.join(EXPORT_BACKENDS)})")
    check_export_directory(export_dir, backend)
    return ImageDecoderNetwork(export_dir, backend)


# ----------------------------------------------------------------------- M6

M6_TASK = M6_FAMILY = "m6"
M6_DECODER, DECODE_CODES = "decoder", "decode_codes"
# taichu.families.m6's segments (PAD 0, IMAGE 1, PREFIX 2, TARGET 3, CODE 4).
PAD_SEGMENT, SEGMENT_NAMES = 0, ("pad", "image", "prefix", "target", "code")


class M6Cache:
    """What ``M6Network.step`` carries between steps: the per-layer keys and values
    (``tensors``: numpy arrays of exactly ``length`` positions for ONNX; MindSpore tensors of
    a static cache for MINDIR), ``length`` (the positions given so far: the width of the
    next step's segment_ids minus one), the patches (0 or the model's), text slots and code
    slots among them, and for MINDIR ``slots``, the cache slot of every position given (the
    prompt sits left-padded to the text length after the patches' slots) and ``next_slot``."""

    def __init__(self, tensors: list, length: int, batch: int, owner, patches: int, text: int, codes: int,
                 slots: np.ndarray | None = None, next_slot: int = 0):
        self.tensors, self.length, self.batch, self.owner = tensors, length, batch, owner
        self.patches, self.text, self.codes = patches, text, codes
        self.slots, self.next_slot = slots, next_slot


class M6Network:
    """An M6 export (``taichu export M6_DIR --format onnx|mindir``) as the runtime-neutral step
    of M6 generation (taichu.m6_generate drives it; the same contract as its ``model_step``
    for the torch and MindSpore models, so the same seed gives the same tokens on every
    runtime):

        step(pixel_values | None, input_ids | None, image_codes | None, segment_ids, past)
            -> (logits float32 [B, vocab], or [B, codebook] when the last new position is an
                image code slot; past)

    - prefill (``past`` None): pixel_values float32 [B, C, S, S] or None, input_ids integer
      [B, L] (the prompt, left-padded) or None, image_codes integer [B, n] (the start code,
      id codebook_size, then codes) or None, segment_ids [B, (patches) + L + n] (PAD 0 /
      IMAGE 1 / PREFIX 2 / TARGET 3 / CODE 4, taichu.families.m6);
    - each later call: one new position, input_ids [B, 1] (a text token) or image_codes [B, 1]
      (a code), and segment_ids [B, past + 1] (the whole history's and the new one's);
      ``past`` is what the previous call returned.

    ONNX runs ``image_encoder.onnx`` on the pixels and ``decoder.onnx`` for the prefill and
    every step (the cache grows by concatenation). MINDIR runs ``prefill.mindir`` on the
    pixels (zeros and PAD patches for no image) and the prompt left-padded to text_length,
    puts its keys and values in a static cache of patches + 2 text_length + grid^2 slots
    (export/signature.py, m6_cache_capacity), then ``decode.mindir`` or
    ``decode_codes.mindir`` once per new position (a start code given to the prefill
    included) with its slot as ``write_position`` and the segments of every slot; the cache
    stays in MindSpore tensors between steps.

    Inputs are checked before any graph runs, as the models check theirs
    (taichu.families.m6.check_inputs): shapes, ids, codes and segments in range, one new
    position per step, the model's text slots (text_length) and code slots (grid^2) not
    overrun, a cache of this network and batch. Sizes come from export_info.json (``info``;
    ``config`` is the model directory's config as JSON): numpy and the runtime only
    (onnxruntime, or mindspore without any model code for "mindir"); ``tokenizer`` loads the
    export's tokenizer.model (sentencepiece) when first used.
    """

    def __init__(self, export_dir: str | Path, backend: str = "onnx", threads: int | None = None):
        path = Path(export_dir)
        self.directory = path.parent if path.is_file() else path
        info = read_export_info(self.directory)
        codebook = (info.get("config") or {}).get("model", {}).get("codebook_size")
        names = ((IMAGE_ENCODER, M6_DECODER) if backend == "onnx" else
                 (PREFILL, DECODE) + ((DECODE_CODES,) if codebook else ()))
        self.info, graphs = open_graphs(export_dir, backend, M6_TASK, M6_FAMILY, "an M6", "an M6", names, threads)
        self.backend = backend
        self.config = self.info["config"]
        m = self.config["model"]
        self.vocab_size, self.text_length = m["vocab_size"], m["text_length"]
        self.image_size, self.num_channels = m["image_size"], m.get("num_channels", 3)
        self.num_patches = (m["image_size"] // m["patch_size"]) ** 2
        self.codebook_size = m.get("codebook_size") or 0
        self.image_grid = m.get("image_grid") or 0
        self.num_codes = self.image_grid ** 2 if self.codebook_size else 0
        self.hidden_size, self.num_layers, self.num_heads = m["hidden_size"], m["num_layers"], m["num_heads"]
        self.head_dim = self.hidden_size // self.num_heads
        # The static cache (MINDIR): the prefill's slots (patches + the prompt left-padded to
        # text_length), then every text and code slot the model has.
        self.capacity = self.num_patches + 2 * self.text_length + self.num_codes
        self.graphs = {name: graph for name, (_, graph) in graphs.items()}
        decoder_entry = graphs[M6_DECODER if backend == "onnx" else DECODE][0]
        self.past_names = [t["name"] for t in decoder_entry["inputs"] if t["name"].startswith("past_key_values.")]
        self.tokenizer_path = self.directory / TOKENIZER_FILE
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from taichu.tokenizer import Tokenizer

            if not self.tokenizer_path.is_file():
                raise FileNotFoundError(f"{self.tokenizer_path} not found: text needs the model's tokenizer "
                                        f"(export a model directory that has one)")
            self._tokenizer = Tokenizer(self.tokenizer_path)
        return self._tokenizer

    # ------------------------------------------------------------------ checks

    def check(self, pixel_values, input_ids, image_codes, segment_ids, past):
        """(pixel_values float32 or None, input_ids int64 [B, L], image_codes int64 [B, n],
        segment_ids int64) after the checks of the class docstring; raises ValueError."""
        if past is not None and (not isinstance(past, M6Cache) or past.owner is not self):
            raise ValueError("past must be the cache a previous step of this network returned (or None for the "
                             "prefill)")
        if input_ids is None and image_codes is None and (pixel_values is None or past is not None):
            raise ValueError("give input_ids and/or image_codes (the prefill may add pixel_values; each later "
                             "step one new token or code)")
        if input_ids is None and image_codes is None:
            raise ValueError("a prefill of pixel_values alone has no position to predict from: give the prompt's "
                             "input_ids ([bos] at least) and/or the start code as image_codes")
        batch = None
        arrays = {}
        if pixel_values is not None:
            expected = (self.num_channels, self.image_size, self.image_size)
            if not isinstance(pixel_values, np.ndarray) or pixel_values.dtype != np.float32:
                kind = pixel_values.dtype if isinstance(pixel_values, np.ndarray) else type(pixel_values).__name__
                raise ValueError(f"pixel_values must be a float32 numpy array [batch, {', '.join(map(str, expected))}]"
                                 f" (images resized to model.image_size), got {kind}")
            if past is not None:
                raise ValueError("pixel_values with a past: the image goes in with the prompt (prefill)")
            if pixel_values.ndim != 4 or pixel_values.shape[1:] != expected:
                raise ValueError(f"pixel_values must be [batch, {', '.join(map(str, expected))}] (images resized to "
                                 f"model.image_size), got shape {tuple(pixel_values.shape)}")
            arrays["pixel_values"] = pixel_values
        for name, value, shape_text in (("input_ids", input_ids, "[batch, length]"),
                                        ("image_codes", image_codes, "[batch, codes]")):
            if value is None:
                continue
            value = _integers(value, name, shape_text)
            if value.ndim != 2:
                raise ValueError(f"{name} must be {shape_text}, got shape {value.shape}")
            arrays[name] = value
        for name, value in arrays.items():
            if batch is not None and value.shape[0] != batch:
                raise ValueError(f"{name} has batch {value.shape[0]}, the other inputs {batch}")
            batch = value.shape[0]
        if batch == 0:
            raise ValueError("an empty batch: give at least one row")
        if past is not None and batch != past.batch:
            raise ValueError(f"the inputs have batch {batch}, the cache {past.batch}")
        length = self.num_patches if pixel_values is not None else 0
        ids = arrays.get("input_ids", np.zeros((batch, 0), np.int64))
        codes = arrays.get("image_codes", np.zeros((batch, 0), np.int64))
        if ids.shape[1] > self.text_length:
            raise ValueError(f"input_ids must be [batch, length <= text_length = {self.text_length}], got shape "
                             f"{ids.shape}")
        _in_range(ids, self.vocab_size, "token id", "vocab_size")
        if codes.shape[1]:
            if not self.codebook_size:
                raise ValueError("image_codes given to a model without a codebook (model.codebook_size is null)")
            if codes.shape[1] > self.num_codes:
                raise ValueError(f"image_codes must be [batch, n <= {self.num_codes}], got shape {codes.shape}")
            low, high = int(codes.min()), int(codes.max())
            if low < 0 or high > self.codebook_size:
                raise ValueError(f"image code {low if low < 0 else high} is out of range (valid: 0.."
                                 f"{self.codebook_size - 1}, and {self.codebook_size} the start code)")
        length += ids.shape[1] + codes.shape[1]
        past_length = 0 if past is None else past.length
        if past is not None and length != 1:
            raise ValueError(f"with a past, one new position per step (input_ids [B, 1] or image_codes [B, 1]), "
                             f"got {length}")
        segment_ids = _integers(segment_ids, "segment_ids", "[batch, past + positions]")
        if segment_ids.shape != (batch, past_length + length):
            raise ValueError(f"segment_ids must be [batch, past + positions] = [{batch}, {past_length + length}], "
                             f"got {tuple(segment_ids.shape)}")
        if segment_ids.size and (segment_ids.min() < 0 or segment_ids.max() >= len(SEGMENT_NAMES)):
            bad = int(segment_ids.min() if segment_ids.min() < 0 else segment_ids.max())
            raise ValueError(f"segment id {bad} is out of range (0..{len(SEGMENT_NAMES) - 1}: "
                             f"{', '.join(SEGMENT_NAMES)})")
        text = (0 if past is None else past.text) + ids.shape[1]
        if text > self.text_length:
            raise ValueError(f"text slot {text - 1} exceeds the model's text_length {self.text_length} (the prompt "
                             f"and what was generated share them)")
        count = (0 if past is None else past.codes) + codes.shape[1]
        if count > self.num_codes:
            raise ValueError(f"image code slot {count - 1} exceeds the {self.image_grid}x{self.image_grid} grid "
                             f"({self.num_codes} codes)")
        return (arrays.get("pixel_values"), ids.astype(np.int64), codes.astype(np.int64),
                segment_ids.astype(np.int64))

    # ------------------------------------------------------------------ steps

    def step(self, pixel_values, input_ids, image_codes, segment_ids, past):
        """Prefill (``past`` None) or one new position after ``past``; returns the last new
        position's logits float32 [B, vocab] (a text token's next) or [B, codebook] (an
        image code slot's: the next code) and the cache."""
        pixel_values, ids, codes, segments = self.check(pixel_values, input_ids, image_codes, segment_ids, past)
        if self.backend == "onnx":
            return self._onnx_step(pixel_values, ids, codes, segments, past)
        if past is None:
            return self._mindir_prefill(pixel_values, ids, codes, segments)
        return self._mindir_decode(ids, codes, segments, past)

    __call__ = step

    def _onnx_step(self, pixel_values, ids, codes, segments, past):
        batch = segments.shape[0]
        if pixel_values is None:
            patches = np.zeros((batch, 0, self.hidden_size), np.float32)
        else:
            feeds = {"pixel_values": np.ascontiguousarray(pixel_values)}
            patches = self.graphs[IMAGE_ENCODER].run(feeds)["patch_embeds"]
        feeds = {"patch_embeds": patches, "input_ids": ids, "segment_ids": segments}
        if self.codebook_size:
            feeds["image_codes"] = codes
        if past is None:
            empty = np.zeros((batch, self.num_heads, 0, self.head_dim), np.float32)
            feeds.update((name, empty) for name in self.past_names)
        else:
            feeds.update(zip(self.past_names, past.tensors))
        out = self.graphs[M6_DECODER].run(feeds)
        logits = out["code_logits"] if codes.shape[1] else out["logits"]
        presents = [out[name.replace("past_key_values.", "present.")] for name in self.past_names]
        previous = past or M6Cache([], 0, batch, self, 0, 0, 0)
        return logits, M6Cache(presents, segments.shape[1], batch, self,
                               previous.patches + patches.shape[1], previous.text + ids.shape[1],
                               previous.codes + codes.shape[1])

    def _mindir_segments(self, segments: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """int64 [B, capacity]: each given position's segment at its slot, PAD elsewhere."""
        full = np.full((segments.shape[0], self.capacity), PAD_SEGMENT, np.int64)
        full[:, slots] = segments
        return full

    def _mindir_prefill(self, pixel_values, ids, codes, segments):
        import mindspore as ms

        batch, patches, length = segments.shape[0], 0 if pixel_values is None else self.num_patches, ids.shape[1]
        pad = self.text_length - length
        # The prompt's slots: after the patches', left-padded to the text length (PAD: never
        # attended to, and positions count PREFIX and TARGET slots only).
        prompt_end = self.num_patches + self.text_length
        slots = np.concatenate([np.arange(patches), np.arange(prompt_end - length, prompt_end)])
        prompt = self._mindir_segments(segments[:, :patches + length], slots)[:, :prompt_end]
        pixels = (np.zeros((batch, self.num_channels, self.image_size, self.image_size), np.float32)
                  if pixel_values is None else np.ascontiguousarray(pixel_values))
        text = np.zeros((batch, self.text_length), np.int32)
        text[:, pad:] = ids
        out = self.graphs[PREFILL].cell(ms.Tensor(pixels), ms.Tensor(text), ms.Tensor(prompt.astype(np.int32)))
        logits = out[0].asnumpy().astype(np.float32)
        extra = ((0, 0), (0, 0), (0, self.capacity - prompt_end), (0, 0))
        # Once per generation, through numpy: no graph to compile for it.
        tensors = [ms.Tensor(np.pad(t.asnumpy(), extra)) for t in out[1:]]
        cache = M6Cache(tensors, patches + length, batch, self, patches, length, 0, slots, prompt_end)
        for k in range(codes.shape[1]):          # the start code (and any codes after it): one step each
            logits, cache = self._mindir_decode(ids[:, :0], codes[:, k:k + 1], segments[:, :cache.length + 1], cache)
        return logits, cache

    def _mindir_decode(self, ids, codes, segments, cache: M6Cache):
        import mindspore as ms

        code = codes.shape[1] == 1
        slots = np.append(cache.slots, cache.next_slot)
        full = self._mindir_segments(segments, slots)
        graph = self.graphs[DECODE_CODES if code else DECODE]
        out = graph.cell(ms.Tensor((codes if code else ids).astype(np.int32)), ms.Tensor(full.astype(np.int32)),
                         ms.Tensor(cache.next_slot, ms.int32), *cache.tensors)
        return out[0].asnumpy().astype(np.float32), M6Cache(
            list(out[1:]), cache.length + 1, cache.batch, self, cache.patches, cache.text + ids.shape[1],
            cache.codes + codes.shape[1], slots, cache.next_slot + 1)


def m6_network(export_dir: str | Path, backend: str = "onnx") -> M6Network:
    """The generation step of an M6 export for taichu.m6_generate: ONNX Runtime ("onnx", ORT's
    default threads) or mindspore.nn.GraphCell ("mindir", mindspore alone, no model code);
    ``network.step(pixel_values, input_ids, image_codes, segment_ids, past) -> (logits,
    past)``. Refuses an export of another family or format."""
    if backend not in EXPORT_BACKENDS:
        raise ValueError(f"unknown export backend {backend!r} (choose from {', '.join(EXPORT_BACKENDS)})")
    check_export_directory(export_dir, backend)
    return M6Network(export_dir, backend)

"""Running exports: a GPT decoder step and text generator, with ONNX Runtime or from MINDIR
with MindSpore, and what the runtimes of every family share: export directories and their
export_info.json (``read_export_info``), an ONNX Runtime session (``OnnxGraph``) or a MINDIR
graph (``mindir_graph``) with ``run(feeds) -> outputs`` by name, the graphs of an export
opened after checking its task, family and format (``open_graphs``, ``open_single_graph``),
and the checks of integer inputs. The other families run from their own modules, which
import this one (never the reverse):

- export/runtime_encoders.py: the image and text towers of an image-text model (CLIP, BriVL)
  and the three towers of a tri-modal model, a speech model's encoder (wav2vec2: CTC logits
  and utterance embeddings, ``speech_network``) and a vision model's backbone (features,
  ``vision_network``);
- export/runtime_dalle.py: a DALL-E's generation step (``dalle_network``) and an image
  tokenizer's decoder (codes -> uint8 images, ``image_decoder_network``);
- export/runtime_m6.py: an M6's generation step (``m6_network``);
- export/runtime_gpt_xl.py: a GPT-XL's decoder over its segment memory and text generation
  without a window (``gpt_xl_network``);
- export/runtime_classifier.py: a text classifier's logits and label probabilities
  (``classifier_network``).

Their classes and entry points are also the export package's names (``export.m6_network``,
loaded on first use: taichu.cli hands that package to its commands).

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

MODEL_FILE = "model.onnx"
INT8_FILE = "model_int8.onnx"
INFO_FILE = "export_info.json"
TOKENIZER_FILE = "tokenizer.model"


class ExportTokenizer:
    """For a runtime class with ``tokenizer_path``: ``tokenizer``, the export's SentencePiece
    model, read when first needed (ids in, ids out needs none)."""

    _tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from taichu.tokenizer import Tokenizer

            if not self.tokenizer_path.is_file():
                raise FileNotFoundError(f"{self.tokenizer_path} not found: text needs the model's tokenizer "
                                        f"(export a model directory that has one)")
            self._tokenizer = Tokenizer(self.tokenizer_path)
        return self._tokenizer
IMAGE_TEXT, TRIMODAL = "image_text", "trimodal"
IMAGE_ENCODER, TEXT_ENCODER, SPEECH_TOWER = "image_encoder", "text_encoder", "speech_encoder"
SPEECH, SPEECH_ENCODER, SPEECH_FAMILY = "speech", "encoder", "wav2vec2"
VISION, VISION_MODEL, VISION_FAMILY = "vision", "model", "vision"
TEXT_TO_IMAGE, DALLE_FAMILY, PREFILL, DECODE = "text_to_image", "dalle", "prefill", "decode"
IMAGE_TOKENIZER, VQVAE_FAMILY, CODE_DECODER, CODE_ENCODER = "image_tokenizer", "vqvae", "decoder", "encoder"
M6_TASK = M6_FAMILY = "m6"
GPT_XL_TASK = "recurrent_language_model"


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
        if info.get("task") == GPT_XL_TASK:
            raise ValueError(f"{file.parent} is an export of a GPT-XL (gpt_xl): it generates through "
                             f"export.gpt_xl_network (decoder.onnx over its segment memory), not the "
                             f"GPT's generator")
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


# ----------------------------------------------------------------------- graphs of every family


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


def mindir_graph(path: Path, entry: dict):
    """A MINDIR graph (export.mindir_export.MindirGraph, mindspore alone) of the signature in
    its export_info.json ``entry`` (name, inputs, outputs)."""
    from export.mindir_export import MindirGraph
    from export.signature import GraphSignature, TensorInfo

    def tensors(specs):
        return tuple(TensorInfo(t["name"], t["dtype"], tuple(t["shape"])) for t in specs)
    return MindirGraph(path, GraphSignature(entry["name"], tensors(entry["inputs"]), tensors(entry["outputs"])))


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

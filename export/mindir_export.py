"""MINDIR from the MindSpore model, for MindSpore Lite and Ascend inference.

MindSpore's own ONNX exporter writes opset 11 without dynamic shapes (design.md §4), so
ONNX comes from PyTorch and MindSpore exports MINDIR with the same signatures as the ONNX
graphs (export/signature*.py) except that token ids, masks and positions are int32:

- GPT: ``model.mindir``, the decoder, every batch, sequence and past axis dynamic, and an
  empty past for prefill; and the two graphs of generation over a static cache,
  ``prefill.mindir`` and ``decode.mindir`` (mindspore_impl.gpt's StaticCachePrefill and
  StaticCacheDecoder, signatures in ``static_cache_graphs``), which ``MindirGenerator``
  (export/runtime.py) runs with mindspore alone;
- image-text families: ``image_encoder.mindir`` (dynamic batch) and ``text_encoder.mindir``
  (dynamic batch and sequence); a tri-modal model those two and ``speech_encoder.mindir``
  (dynamic batch and samples; the attention mask int32);
- speech (wav2vec2): ``encoder.mindir`` (dynamic batch and samples; the attention mask int32);
- vision: ``model.mindir``, the ViT backbone (dynamic batch; fixed channels and image size);
- DALL-E: ``prefill.mindir`` (the ONNX prefill's signature, int32 ids) and ``decode.mindir``
  over a static cache (signature_dalle.dalle_graphs(static=True): one code, an explicit int32
  ``write_position``, a cache whose length is dynamic; export.runtime_dalle.dalle_network uses
  text_length + grid^2 - 1 slots, all generation needs). Not the ONNX decode's growing cache:
  its positions come from the past's length, a shape MindSpore would have to turn into a
  value inside a dynamic-shape graph, and a cache that grows changes the shapes every step
  (the GPT's reason for its static cache, design.md §4); with the static cache the shapes stay
  the same for a whole generation;
- image tokenizer (vqvae): ``decoder.mindir`` and ``encoder.mindir`` (dynamic batch; codes
  int32);
- M6: ``prefill.mindir`` (pixels, the prompt left-padded to text_length and the segments ->
  the last position's logits and the keys and values; only batch dynamic), ``decode.mindir``
  (one text token) and, with a codebook, ``decode_codes.mindir`` (one image code), both over a
  static cache (batch and cache length dynamic) with an explicit ``write_position`` and the
  segments of every slot (mindspore_impl.m6's StaticCachePrefill and StaticCacheDecoder;
  signature_m6.m6_graphs(static=True)). export.runtime_m6.m6_network uses
  signature_m6.m6_cache_capacity slots (the prefill's, then every text and code slot the model
  has); the start code of text to image is a decode_codes step after the caption's prefill.
  The prompt axis is fixed because M6.construct branches on the lengths of its inputs, which
  MindSpore cannot compile over a dynamic axis ("the inputs should be constant").
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from export import signature, signature_dalle, signature_encoders, signature_m6
from export.signature import BATCH, SEQUENCE, GraphSignature, TensorInfo, input_names, output_names

MODEL_FILE = "model.mindir"
SUFFIX = ".mindir"
PREFILL, DECODE = "prefill", "decode"
CACHE = "cache_sequence"
# Validation shapes: (batch, prompt) of the prefill, (batch, cache, write position) of decode.
PREFILL_VALIDATION_SHAPES = ((2, 7), (3, 16))
DECODE_VALIDATION_SHAPES = ((2, 64, 20), (3, 128, 70))


def static_cache_graphs(model_config) -> tuple[GraphSignature, GraphSignature]:
    """The prefill and decode graphs of generation over a static cache (int32 ids):

    - ``prefill``: ``input_ids``, ``attention_mask`` [batch, sequence], left-padded ->
      ``logits`` [batch, vocab] of the last position, ``present.{i}.key`` / ``.value``
      [batch, heads, sequence, head_dim];
    - ``decode``: ``input_ids`` [batch, 1], ``attention_mask`` [batch, cache] (1 for the real
      tokens up to and with this one), ``write_position`` (scalar: the slot this token's key
      and value go to), ``past_key_values.{i}.key`` / ``.value`` [batch, heads, cache,
      head_dim] -> ``logits`` [batch, vocab] and the cache with that slot written.
    """
    m = model_config

    def cache(names, length):
        return tuple(TensorInfo(n, "float32", (BATCH, m.num_heads, length, m.head_dim)) for n in names)
    logits = TensorInfo("logits", "float32", (BATCH, m.vocab_size))
    past, present = input_names(m.num_layers)[3:], output_names(m.num_layers)[1:]
    prefill = GraphSignature(PREFILL, (TensorInfo("input_ids", "int32", (BATCH, SEQUENCE)),
                                       TensorInfo("attention_mask", "int32", (BATCH, SEQUENCE))),
                             (logits,) + cache(present, SEQUENCE))
    decode = GraphSignature(DECODE, (TensorInfo("input_ids", "int32", (BATCH, 1)),
                                     TensorInfo("attention_mask", "int32", (BATCH, CACHE)),
                                     TensorInfo("write_position", "int32", ())) + cache(past, CACHE),
                            (logits,) + cache(present, CACHE))
    return prefill, decode


def static_cache_cases(model_config, graph: GraphSignature) -> list[tuple[dict, dict[str, np.ndarray]]]:
    """(shape description, random inputs) at the two shapes each static-cache graph is
    validated at: left padding in row 0, a random cache written up to the position."""
    m = model_config
    cases = []
    shapes = PREFILL_VALIDATION_SHAPES if graph.name == PREFILL else DECODE_VALIDATION_SHAPES
    for seed, shape in enumerate(shapes):
        rng = np.random.default_rng(seed)
        batch, width = shape[:2]
        length = 1 if graph.name == DECODE else width
        mask = np.zeros((batch, width), np.int32)
        mask[:, :length if graph.name == PREFILL else shape[2] + 1] = 1
        mask[0, :2] = 0
        feeds = {"input_ids": rng.integers(4, m.vocab_size, (batch, length)).astype(np.int32),
                 "attention_mask": mask}
        if graph.name == DECODE:
            feeds["write_position"] = np.array(shape[2], np.int32)
            for name in graph.input_names[3:]:
                feeds[name] = rng.standard_normal((batch, m.num_heads, width, m.head_dim)).astype(np.float32)
        cases.append((dict(zip(("batch", "sequence") if graph.name == PREFILL else
                               ("batch", "cache", "write_position"), shape)), feeds))
    return cases


def _placeholders(graph: GraphSignature) -> list:
    """ms.export inputs: every axis named in the signature dynamic (None), the others fixed;
    a scalar as a value."""
    import mindspore as ms

    dtypes = {"float32": ms.float32, "int32": ms.int32, "int64": ms.int32}
    return [ms.Tensor(shape=[None if isinstance(d, str) else d for d in t.shape], dtype=dtypes[t.dtype])
            if t.shape else ms.Tensor(np.zeros((), np.int32)) for t in graph.inputs]


def run_cell(cell, graph: GraphSignature, feeds: dict) -> dict:
    """Run a MindSpore cell (a model's or a loaded MINDIR's) on numpy feeds by name;
    int64 arrays go in as int32, as exported."""
    import mindspore as ms

    args = [ms.Tensor(feeds[n].astype(np.int32) if feeds[n].dtype == np.int64 else feeds[n])
            for n in graph.input_names]
    outputs = cell(*args)
    if not isinstance(outputs, (tuple, list)):
        outputs = (outputs,)
    return {name: tensor.asnumpy() for name, tensor in zip(graph.output_names, outputs)}


def export_mindir(model, out_file: Path) -> list[Path]:
    """Write the MindSpore GPT ``model`` as a decoder graph to ``out_file`` (…/model.mindir)."""
    import mindspore as ms

    from mindspore_impl.gpt import DecoderForExport

    if out_file.suffix != ".mindir":
        raise ValueError(f"{out_file}: a MINDIR file name must end in .mindir")
    m = model.config.model
    model.set_train(False)
    decoder = DecoderForExport(model)
    decoder.set_train(False)
    ids = [ms.Tensor(shape=[None, None], dtype=ms.int32) for _ in range(3)]
    cache = [ms.Tensor(shape=[None, m.num_heads, None, m.head_dim], dtype=ms.float32)
             for _ in range(2 * m.num_layers)]
    # ms.export appends ".mindir" to the name it is given.
    ms.export(decoder, *ids, *cache, file_name=str(out_file.with_suffix("")), file_format="MINDIR")
    return [out_file]


def export_mindir_towers(model, directory: Path) -> dict[str, list[Path]]:
    """Write the MindSpore image-text ``model`` as ``image_encoder.mindir`` and
    ``text_encoder.mindir`` in ``directory``; the files written, by graph name."""
    import mindspore as ms

    from export.towers_mindspore import ImageEncoder, TextEncoder, input_checks_off

    image, text = signature_encoders.image_text_graphs(model.config.model)
    model.set_train(False)
    cells = {image.name: ImageEncoder(model), text.name: TextEncoder(model)}
    with input_checks_off(model):
        return _export_cells(cells, (image, text), directory)


def export_mindir_trimodal(model, directory: Path) -> dict[str, list[Path]]:
    """Write the MindSpore tri-modal ``model`` as ``image_encoder.mindir``,
    ``text_encoder.mindir`` and ``speech_encoder.mindir`` in ``directory``; the files
    written, by graph name."""
    from export.towers_mindspore import TriModalImageTower, TriModalSpeechTower, TriModalTextTower

    graphs = signature_encoders.trimodal_graphs(model.config.model)
    model.set_train(False)
    cells = {signature.IMAGE_ENCODER: TriModalImageTower(model), signature.TEXT_ENCODER: TriModalTextTower(model),
             signature.SPEECH_TOWER: TriModalSpeechTower(model)}
    return _export_cells(cells, graphs, directory)


def export_mindir_speech(model, directory: Path) -> dict[str, list[Path]]:
    """Write the MindSpore wav2vec2 ``model`` as ``encoder.mindir`` in ``directory`` (batch
    and samples dynamic); the files written, by graph name."""
    from export.towers_mindspore import SpeechEncoder

    graph = signature_encoders.speech_graph(model.config.model)
    model.set_train(False)
    return _export_cells({graph.name: SpeechEncoder(model)}, (graph,), directory)


def export_mindir_vision(model, directory: Path) -> dict[str, list[Path]]:
    """Write the MindSpore vision ``model``'s backbone (signature_encoders.vision_backbone) as
    ``model.mindir`` in ``directory`` (batch dynamic); the files written, by graph name."""
    from export.towers_mindspore import VisionEncoder

    graph = signature_encoders.vision_graph(model.config.model)
    model.set_train(False)
    return _export_cells({graph.name: VisionEncoder(model)}, (graph,), directory)


def export_mindir_dalle(model, directory: Path) -> dict[str, list[Path]]:
    """Write the MindSpore DALL-E ``model`` as ``prefill.mindir`` and ``decode.mindir`` (static
    cache; batch and cache length dynamic) in ``directory``; the files written, by graph name."""
    from mindspore_impl.dalle import StaticCacheDecoder, StaticCachePrefill

    model.set_train(False)
    graphs = signature_dalle.dalle_graphs(model.config.model, static=True)
    return _export_cells({signature.PREFILL: StaticCachePrefill(model), signature.DECODE: StaticCacheDecoder(model)},
                         graphs, directory)


def export_mindir_m6(model, directory: Path) -> dict[str, list[Path]]:
    """Write the MindSpore M6 ``model`` as ``prefill.mindir`` (batch dynamic, the prompt
    left-padded to text_length), ``decode.mindir`` and, with a codebook,
    ``decode_codes.mindir`` (static cache; batch and cache length dynamic), the signatures of
    signature_m6.m6_graphs(static=True), in ``directory``; the files written, by graph name."""
    from mindspore_impl.m6 import StaticCacheDecoder, StaticCachePrefill

    model.set_train(False)
    graphs = signature_m6.m6_graphs(model.config.model, static=True)
    cells = {signature.PREFILL: StaticCachePrefill(model), signature.DECODE: StaticCacheDecoder(model),
             signature_m6.DECODE_CODES: StaticCacheDecoder(model, codes=True)}
    return _export_cells(cells, graphs, directory)


def export_mindir_image_tokenizer(model, directory: Path) -> dict[str, list[Path]]:
    """Write the MindSpore vqvae ``model`` as ``decoder.mindir`` and ``encoder.mindir`` (batch
    dynamic) in ``directory``; the files written, by graph name."""
    from export.towers_mindspore import CodeDecoder, CodeEncoder

    model.set_train(False)
    graphs = signature_dalle.image_tokenizer_graphs(model.config.model)
    return _export_cells({signature.CODE_DECODER: CodeDecoder(model), signature.CODE_ENCODER: CodeEncoder(model)},
                         graphs, directory)


def export_mindir_static_cache(model, directory: Path) -> dict[str, list[Path]]:
    """Write the MindSpore GPT ``model``'s static-cache generation graphs, ``prefill.mindir``
    and ``decode.mindir`` (batch, prompt and cache length dynamic), in ``directory``."""
    from mindspore_impl.gpt import StaticCacheDecoder, StaticCachePrefill

    model.set_train(False)
    graphs = static_cache_graphs(model.config.model)
    return _export_cells({PREFILL: StaticCachePrefill(model), DECODE: StaticCacheDecoder(model)},
                         graphs, directory)


def static_cache_runner(model, graph: GraphSignature):
    """``run(feeds) -> outputs`` of mindspore_impl's cell for ``graph`` (prefill or decode),
    the reference its MINDIR must match."""
    from mindspore_impl.gpt import StaticCacheDecoder, StaticCachePrefill

    cell = (StaticCachePrefill if graph.name == PREFILL else StaticCacheDecoder)(model)
    cell.set_train(False)
    return lambda feeds: run_cell(cell, graph, feeds)


def export_generation_graphs(model, directory: Path, validate: bool, log) -> list[dict]:
    """Export prefill.mindir and decode.mindir, validate each (when ``validate``) against
    mindspore_impl at its two shapes (``static_cache_cases``) and return their entries for
    export_info.json's ``graphs`` (name, file, inputs, outputs, validation)."""
    from export.exporter import _summary
    from export.validate import validate_cases

    files = export_mindir_static_cache(model, directory)
    log(f"exported {', '.join(f[0].name for f in files.values())} (static cache: dynamic batch, "
        f"prompt and cache length)")
    entries = []
    for graph in static_cache_graphs(model.config.model):
        file = files[graph.name][0]
        entry = {"name": graph.name, "file": file.name, **graph.describe()}
        entries.append(entry)
        if validate:
            entry["validation"] = validate_cases(
                MindirGraph(file, graph).run, static_cache_runner(model, graph),
                static_cache_cases(model.config.model, graph), f"{file.name} in mindspore.nn.GraphCell")
            log(f"validated {file.name} against mindspore_impl: {_summary(entry['validation'])}")
    return entries


def _export_cells(cells: dict, graphs, directory: Path) -> dict[str, list[Path]]:
    import mindspore as ms

    written = {}
    for graph in graphs:
        cell = cells[graph.name]
        cell.set_train(False)
        out_file = directory / f"{graph.name}{SUFFIX}"
        # ms.export appends ".mindir" to the name it is given.
        ms.export(cell, *_placeholders(graph), file_name=str(out_file.with_suffix("")), file_format="MINDIR")
        written[graph.name] = [out_file]
    return written


class MindirGraph:
    """A loaded MINDIR graph of ``graph``'s signature: ``run(feeds) -> outputs`` by name,
    with int64 inputs passed as int32 (as exported)."""

    def __init__(self, path: str | Path, graph: signature.GraphSignature):
        import mindspore as ms
        from mindspore import nn

        self.path, self.graph = Path(path), graph
        self.cell = nn.GraphCell(ms.load(str(self.path)))

    def run(self, feeds: dict) -> dict:
        return run_cell(self.cell, self.graph, feeds)


class MindirDecoder:
    """A loaded MINDIR decoder (mindspore.load + nn.GraphCell) with OnnxDecoder's ``run``."""

    def __init__(self, path: str | Path):
        import mindspore as ms
        from mindspore import nn

        self.path = Path(path)
        self.cell = nn.GraphCell(ms.load(str(self.path)))

    def run(self, feeds: dict) -> dict:
        import mindspore as ms
        import numpy as np

        num_layers = (len(feeds) - 3) // 2
        args = [ms.Tensor(feeds[name].astype(np.int32) if i < 3 else feeds[name])
                for i, name in enumerate(input_names(num_layers))]
        return {name: tensor.asnumpy()
                for name, tensor in zip(output_names(num_layers), self.cell(*args))}

"""MINDIR from the MindSpore model, for MindSpore Lite and Ascend inference.

MindSpore's own ONNX exporter writes opset 11 without dynamic shapes (design.md §4), so
ONNX comes from PyTorch and MindSpore exports MINDIR with the same signatures as the ONNX
graphs (export/signature.py) except that token ids, masks and positions are int32:

- GPT: ``model.mindir``, the decoder, every batch, sequence and past axis dynamic, and an
  empty past for prefill;
- image-text families: ``image_encoder.mindir`` (dynamic batch) and ``text_encoder.mindir``
  (dynamic batch and sequence).
"""
from __future__ import annotations

from pathlib import Path

from export import signature
from export.signature import input_names, output_names

MODEL_FILE = "model.mindir"
SUFFIX = ".mindir"


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

    image, text = signature.image_text_graphs(model.config.model)
    model.set_train(False)
    cells = {image.name: ImageEncoder(model), text.name: TextEncoder(model)}
    written = {}
    with input_checks_off(model):
        for graph in (image, text):
            cell = cells[graph.name]
            cell.set_train(False)
            # Every axis named in the signature is dynamic (None); the others are fixed.
            inputs = [ms.Tensor(shape=[None if isinstance(d, str) else d for d in t.shape],
                                dtype=ms.float32 if t.dtype == "float32" else ms.int32)
                      for t in graph.inputs]
            out_file = directory / f"{graph.name}{SUFFIX}"
            ms.export(cell, *inputs, file_name=str(out_file.with_suffix("")), file_format="MINDIR")
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
        import mindspore as ms
        import numpy as np

        args = [ms.Tensor(feeds[n].astype(np.int32) if feeds[n].dtype == np.int64 else feeds[n])
                for n in self.graph.input_names]
        outputs = self.cell(*args)
        if not isinstance(outputs, (tuple, list)):
            outputs = (outputs,)
        return {name: tensor.asnumpy() for name, tensor in zip(self.graph.output_names, outputs)}


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

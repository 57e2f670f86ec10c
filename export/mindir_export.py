"""MINDIR from the MindSpore model, for MindSpore Lite and Ascend inference.

MindSpore's own ONNX exporter writes opset 11 without dynamic shapes (design.md §4), so
ONNX comes from PyTorch and MindSpore exports MINDIR: the same decoder signature as the
ONNX graph (export/signature.py), with int32 token ids and positions, every batch,
sequence and past axis dynamic, and an empty past for prefill.
"""
from __future__ import annotations

from pathlib import Path

from export.signature import input_names, output_names

MODEL_FILE = "model.mindir"


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

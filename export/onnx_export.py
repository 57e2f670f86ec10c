"""ONNX from the PyTorch model: one decoder graph with a KV cache (GPT), optional int8, or
an image encoder and a text encoder graph (image-text families).

The exporter is chosen explicitly: torch.onnx's TorchScript exporter (``dynamo=False``).
The dynamo exporter needs onnxscript and specialises axes whose example size is 0 or 1,
which a graph that takes an empty past for prefill cannot afford; the TorchScript exporter
traces once with sizes that are all distinct and marks batch, sequence and past dynamic.
"""
from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

from export import signature

# Protocol buffers cannot exceed 2 GiB; above this many bytes of weights the tensors go to
# one external data file beside the graph (ONNX's external data format).
EXTERNAL_DATA_THRESHOLD = 2 ** 31 - 2 ** 26
EXTERNAL_DATA_SUFFIX = ".data"
MIN_OPSET = 17


def export_onnx(model, out_file: Path, opset: int = MIN_OPSET,
                external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """Write the torch GPT ``model`` as a decoder graph to ``out_file``; the files written."""
    from torch_impl.gpt import DecoderForExport

    m = model.config.model
    graph = signature.decoder_graph(m)
    example = signature.sample_inputs(m, batch=2, length=3, past=4, seed=0)
    return export_graph(DecoderForExport(model).eval(), graph, example, out_file, opset,
                        external_data_threshold)


def export_onnx_towers(model, directory: Path, opset: int = MIN_OPSET,
                       external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> dict[str, list[Path]]:
    """Write the torch image-text ``model`` as ``image_encoder.onnx`` and
    ``text_encoder.onnx`` in ``directory``; the files written, by graph name."""
    from export.towers_torch import ImageEncoder, TextEncoder

    m = model.config.model
    image, text = signature.image_text_graphs(m)
    # Traced at sizes distinct from each other and from the model's widths, so that no
    # dynamic axis can be mistaken for a constant; the text example has padding.
    examples = {image.name: (ImageEncoder(model).eval(), signature.image_inputs(m, batch=2, seed=0)),
                text.name: (TextEncoder(model).eval(),
                            signature.text_inputs(m, batch=2, length=min(5, m.text.max_position_embeddings),
                                                  seed=0))}
    return {graph.name: export_graph(examples[graph.name][0], graph, examples[graph.name][1],
                                     directory / f"{graph.name}.onnx", opset, external_data_threshold)
            for graph in (image, text)}


def export_graph(module, graph: signature.GraphSignature, example: dict, out_file: Path,
                 opset: int = MIN_OPSET, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """Trace ``module`` on ``example`` (inputs by name) into ``out_file`` with ``graph``'s
    names and dynamic axes; the files written."""
    import onnx
    import torch

    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: taichu exports opset >= {MIN_OPSET}")
    with tempfile.TemporaryDirectory(dir=out_file.parent) as scratch:
        traced_file = Path(scratch) / "traced.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter announces its own deprecation on every call.
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message="The feature will be removed.*")
            torch.onnx.export(module, tuple(torch.from_numpy(example[n]) for n in graph.input_names),
                              str(traced_file), dynamo=False, opset_version=opset,
                              input_names=graph.input_names, output_names=graph.output_names,
                              dynamic_axes=graph.dynamic_axes(), do_constant_folding=True)
        # Re-save from the scratch copy: one graph file, plus one data file when large
        # (the exporter itself may scatter one file per tensor for big models).
        model = onnx.load(str(traced_file), load_external_data=True)
        weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
        external = weight_bytes > external_data_threshold
        data_file = out_file.with_name(out_file.name + EXTERNAL_DATA_SUFFIX)
        onnx.save_model(model, str(out_file), save_as_external_data=external,
                        all_tensors_to_one_file=True, location=data_file.name, size_threshold=0)
    return [out_file, data_file] if external else [out_file]


def quantize_int8(fp32_file: Path, int8_file: Path) -> list[Path]:
    """Dynamic int8 quantization of the blocks' MatMul weights (onnxruntime.quantization).

    The output projection (the MatMul producing ``logits``, tied to the embedding) stays
    fp32: one per-tensor int8 scale over the whole vocabulary flips the argmax of weakly
    trained models (gpt-tiny after 60 steps: top-1 agreement with fp32 0.65 with it
    quantized, 1.00 without; docs/deployment.md).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(fp32_file), load_external_data=False)
    head = [node.name for node in graph.graph.node if node.op_type == "MatMul" and "logits" in node.output]
    data_file = fp32_file.with_name(fp32_file.name + EXTERNAL_DATA_SUFFIX)
    large = data_file.is_file()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quiet ORT's generic "run pre-processing first" advice
    try:
        quantize_dynamic(str(fp32_file), str(int8_file), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=head,
                         use_external_data_format=large)
    finally:
        root.setLevel(level)
    written = [int8_file]
    int8_data = int8_file.with_name(int8_file.name + EXTERNAL_DATA_SUFFIX)
    if large and int8_data.is_file():
        written.append(int8_data)
    return written

"""ONNX from the PyTorch model: one decoder graph with a KV cache (GPT), optional int8, an
image encoder and a text encoder graph (image-text families; a tri-modal model adds a speech
encoder graph), a speech encoder graph (wav2vec2), or a ViT backbone graph (vision); an M6
as an image encoder and one decoder graph with a KV cache (export/signature*.py).

The exporter is torch.onnx's dynamo exporter (``torch.onnx.export(..., dynamo=True)``, which
needs onnxscript), the one PyTorch supports; the TorchScript exporter (``dynamo=False``) is
deprecated and no graph of ours needs it any more. Every dynamic axis is an explicit
``torch.export.Dim`` named after the axis in export/signature.py (``batch``, ``sequence``,
``past_sequence``, ``total_sequence``), one Dim object per name, so inputs that share an axis
share its symbol and the saved graph carries the names; what the exporter derives itself
(the present cache's ``past_sequence + sequence``) is renamed to the signature's name
(``total_sequence``) in the graph's inputs, outputs and value_info (name_axes).

torch.export specialises an axis whose example size is 0 or 1 to that constant. The
examples are therefore traced at sizes that are all distinct and >= 2 (decoder: batch 2,
3 new tokens after a past of 4; towers: batch 2, 5 tokens), and name_axes refuses a graph in
which a named axis came out as a constant. The empty past of prefill (size 0) and batch 1 are
then checked by validation, which runs both (export/validate.py).

The speech encoder's only dynamic input axes are ``batch`` and ``samples``; ``frames`` is
what torch.export derives from ``samples`` through the conv stack (an expression such as
``((samples//5 - 5)//4 - 3)//4 + 1``, exact floor arithmetic, so the graph is right at every
length), renamed ``frames`` in the outputs and wherever value_info has the same expression.
The frame mask is computed inside the graph from the sample mask (sum, the same floor
arithmetic per row, compare with a range over frames): no data-dependent shape arises, and
the encoder runs through ``Wav2Vec2.encode``, which has no numpy input check (see
export/towers_torch.py).

An M6's decoder is traced at batch 2 with 6 patch embeddings, 5 tokens and 3 code slots
after a past of 7; validation runs it with no patches, no text, no codes or no past (size 0
on those axes), as generation does (export/validate.py).

A GPT-XL's decoder is traced at batch 2, 3 tokens after a memory of 5; validation runs
it with one token, with a left-padded segment and with memories of other lengths.

A classifier (gpt_classifier) is its torch model's own forward, traced at batch 3 and 8
tokens with one row right-padded (other sizes where num_labels is 3 or 8); validation runs
batch 1, right and left padding.

The vision backbone's only dynamic axis is ``batch``: the image size fixes the patch grid and
with it the positions (a resize would be a different graph), so the example is batch 2 at
the model's size.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import tempfile
import warnings
from pathlib import Path

from export import signature, signature_classifier, signature_dalle, signature_encoders, signature_gpt_xl, signature_m6
from export.validate import ExportValidationError

# Protocol buffers cannot exceed 2 GiB; above this many bytes of weights the tensors go to
# one external data file beside the graph (ONNX's external data format).
EXTERNAL_DATA_THRESHOLD = 2 ** 31 - 2 ** 26
EXTERNAL_DATA_SUFFIX = ".data"
# The dynamo exporter's lowest opset with implementations of its own (it converts down to
# older ones through onnx's version converter, which it warns may fail).
MIN_OPSET = 18
EXPORTER = "torch.onnx dynamo exporter (dynamo=True, dynamic_shapes of named torch.export.Dim)"


def export_onnx(model, out_file: Path, opset: int = MIN_OPSET,
                external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """Write the torch GPT ``model`` as a decoder graph to ``out_file``; the files written."""
    from torch_impl.gpt import DecoderForExport

    m = model.config.model
    graph = signature.decoder_graph(m)
    # Distinct sizes >= 2 on every axis (batch 2, sequence 3, past 4, total 7): see above.
    example = signature.sample_inputs(m, batch=2, length=3, past=4, seed=0)
    return export_graph(DecoderForExport(model).eval(), graph, example, out_file, opset,
                        external_data_threshold)


def export_onnx_towers(model, directory: Path, opset: int = MIN_OPSET,
                       external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> dict[str, list[Path]]:
    """Write the torch image-text ``model`` as ``image_encoder.onnx`` and
    ``text_encoder.onnx`` in ``directory``; the files written, by graph name."""
    from export.towers_torch import ImageEncoder, TextEncoder

    m = model.config.model
    image, text = signature_encoders.image_text_graphs(m)
    # Traced at sizes distinct from each other and from the model's widths, so that no
    # dynamic axis can be mistaken for a constant; the text example has padding.
    examples = {image.name: (ImageEncoder(model).eval(), signature_encoders.image_inputs(m, batch=2, seed=0)),
                text.name: (TextEncoder(model).eval(),
                            signature_encoders.text_inputs(m, batch=2, length=min(5, m.text.max_position_embeddings),
                                                  seed=0))}
    return {graph.name: export_graph(examples[graph.name][0], graph, examples[graph.name][1],
                                     directory / f"{graph.name}.onnx", opset, external_data_threshold)
            for graph in (image, text)}


def export_onnx_trimodal(model, directory: Path, opset: int = MIN_OPSET,
                         external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> dict[str, list[Path]]:
    """Write the torch tri-modal ``model`` as ``image_encoder.onnx``, ``text_encoder.onnx``
    and ``speech_encoder.onnx`` in ``directory``; the files written, by graph name."""
    from export.towers_torch import ImageEncoder, SpeechTower, TextEncoder

    m = model.config.model
    image, text, speech = signature_encoders.trimodal_graphs(m)
    # The image-text towers' examples (export_onnx_towers); the speech tower's as the speech
    # encoder's (export_onnx_speech): batch 2 of padded rows, at least 4000 samples.
    shortest = signature_encoders.audio_sizes(m.speech)["receptive_field"]
    examples = {image.name: (ImageEncoder(model).eval(), signature_encoders.image_inputs(m, batch=2, seed=0)),
                text.name: (TextEncoder(model).eval(),
                            signature_encoders.text_inputs(m, batch=2, length=min(5, m.text.max_position_embeddings),
                                                           seed=0)),
                speech.name: (SpeechTower(model).eval(),
                              signature_encoders.speech_inputs(m.speech, batch=2, samples=max(4000, 4 * shortest),
                                                               seed=0))}
    return {graph.name: export_graph(examples[graph.name][0], graph, examples[graph.name][1],
                                     directory / f"{graph.name}.onnx", opset, external_data_threshold)
            for graph in (image, text, speech)}


def export_onnx_speech(model, directory: Path, opset: int = MIN_OPSET,
                       external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> dict[str, list[Path]]:
    """Write the torch wav2vec2 ``model`` as ``encoder.onnx`` in ``directory``; the files
    written, by graph name."""
    from export.towers_torch import SpeechEncoder

    m = model.config.model
    graph = signature_encoders.speech_graph(m)
    # Batch 2 of padded rows, at least 4000 samples (distinct from every fixed width) and
    # several frames for every conv stack.
    shortest = signature_encoders.speech_sizes(m)["receptive_field"]
    example = signature_encoders.speech_inputs(m, batch=2, samples=max(4000, 4 * shortest), seed=0)
    return {graph.name: export_graph(SpeechEncoder(model).eval(), graph, example,
                                     directory / f"{graph.name}.onnx", opset, external_data_threshold)}


def export_onnx_vision(model, directory: Path, opset: int = MIN_OPSET,
                       external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> dict[str, list[Path]]:
    """Write the torch vision ``model``'s backbone (signature_encoders.vision_backbone) as
    ``model.onnx`` in ``directory``; the files written, by graph name."""
    from export.towers_torch import VisionEncoder

    m = model.config.model
    graph = signature_encoders.vision_graph(m)
    return {graph.name: export_graph(VisionEncoder(model).eval(), graph,
                                     signature_encoders.vision_inputs(m, batch=2, seed=0),
                                     directory / f"{graph.name}.onnx", opset, external_data_threshold)}


def export_onnx_dalle(model, directory: Path, opset: int = MIN_OPSET,
                      external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> dict[str, list[Path]]:
    """Write the torch DALL-E ``model`` as ``prefill.onnx`` and ``decode.onnx`` in
    ``directory`` (signature_dalle.dalle_graphs); the files written, by graph name."""
    from export.towers_torch import DalleDecoder, DallePrefill

    m = model.config.model
    prefill, decode = signature_dalle.dalle_graphs(m)
    # Distinct sizes >= 2: batch 2; decode 3 codes after the text and 4 codes (a past of
    # text_length + 4, a total of text_length + 7), or fewer on a grid too small for that.
    codes = max(2, min(3, m.image_tokens - 3))
    done = max(2, min(4, m.image_tokens - 1 - codes))
    examples = {prefill.name: (DallePrefill(model).eval(),
                               signature_dalle.dalle_inputs(m, prefill, 2, 0, 0, seed=0)),
                decode.name: (DalleDecoder(model).eval(),
                              signature_dalle.dalle_inputs(m, decode, 2, codes, done, seed=0))}
    return {graph.name: export_graph(examples[graph.name][0], graph, examples[graph.name][1],
                                     directory / f"{graph.name}.onnx", opset, external_data_threshold)
            for graph in (prefill, decode)}


def export_onnx_m6(model, directory: Path, opset: int = MIN_OPSET,
                   external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> dict[str, list[Path]]:
    """Write the torch M6 ``model`` as ``image_encoder.onnx`` (pixels -> patch embeddings) and
    ``decoder.onnx`` (prefill and steps over a KV cache) in ``directory``
    (signature_m6.m6_graphs); the files written, by graph name."""
    import numpy as np

    from export.towers_torch import M6Decoder, M6ImageEncoder, M6TextDecoder

    m = model.config.model
    image, decoder = signature_m6.m6_graphs(m)
    # Distinct sizes >= 2 on every dynamic axis: batch 2, 6 patch embeddings (the decoder
    # takes any number: their positions are the image encoder's), 5 tokens, 3 code slots
    # after a past of 7 (a total of 21). The values only need to be in range.
    rng = np.random.default_rng(0)
    batch, patches, length, codes, past = 2, 6, 5, 3, 7
    segments = [rng.integers(1, 5, (batch, past)), np.full((batch, patches), signature_m6.IMAGE_SEGMENT),
                np.full((batch, length), signature_m6.PREFIX_SEGMENT)]
    feeds = {"patch_embeds": rng.standard_normal((batch, patches, m.hidden_size)).astype(np.float32),
             "input_ids": rng.integers(0, m.vocab_size, (batch, length)).astype(np.int64)}
    if m.codebook_size:
        feeds["image_codes"] = rng.integers(0, m.codebook_size + 1, (batch, codes)).astype(np.int64)
        segments.append(np.full((batch, codes), signature_m6.CODE_SEGMENT))
    feeds["segment_ids"] = np.concatenate(segments, axis=1).astype(np.int64)
    for name in signature_m6.m6_cache_names(m.num_layers)[0]:
        feeds[name] = rng.standard_normal((batch, m.num_heads, past, m.head_dim)).astype(np.float32)
    examples = {image.name: (M6ImageEncoder(model).eval(), signature._pixels(2, m.num_channels, m.image_size, 0)),
                decoder.name: ((M6Decoder if m.codebook_size else M6TextDecoder)(model).eval(), feeds)}
    return {graph.name: export_graph(examples[graph.name][0], graph, examples[graph.name][1],
                                     directory / f"{graph.name}.onnx", opset, external_data_threshold)
            for graph in (image, decoder)}


def export_onnx_gpt_xl(model, directory: Path, opset: int = MIN_OPSET,
                       external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> dict[str, list[Path]]:
    """Write the torch GPT-XL ``model`` as ``decoder.onnx`` in ``directory``
    (signature_gpt_xl.gpt_xl_graph: a segment or a token after a memory of any length); the
    files written, by graph name."""
    from torch_impl.gpt_xl import DecoderForExport

    m = model.config.model
    graph = signature_gpt_xl.gpt_xl_graph(m)
    # Distinct sizes >= 2, none a width of the model: batch 2, 3 tokens, a memory of 5.
    example = signature_gpt_xl.gpt_xl_inputs(m, batch=2, length=3, memory=5, seed=0)
    return {graph.name: export_graph(DecoderForExport(model).eval(), graph, example,
                                     directory / f"{graph.name}.onnx", opset, external_data_threshold)}


def export_onnx_classifier(model, directory: Path, opset: int = MIN_OPSET,
                           external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> dict[str, list[Path]]:
    """Write the torch gpt_classifier ``model`` as ``classifier.onnx`` in ``directory``
    (signature_classifier.classifier_graph: its forward, token ids and mask -> logits); the
    files written, by graph name."""
    m = model.config.model
    graph = signature_classifier.classifier_graph(m)
    batch, length = signature_classifier.trace_sizes(m)
    example = signature_classifier.classifier_inputs(m, batch, length, "right", seed=0)
    return {graph.name: export_graph(model.eval(), graph, example, directory / f"{graph.name}.onnx", opset,
                                     external_data_threshold)}


def export_onnx_image_tokenizer(model, directory: Path, opset: int = MIN_OPSET,
                                external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> dict[str, list[Path]]:
    """Write the torch vqvae ``model`` as ``decoder.onnx`` (codes -> pixels) and
    ``encoder.onnx`` (pixels -> codes) in ``directory``; the files written, by graph name."""
    from export.towers_torch import CodeDecoder, CodeEncoder

    m = model.config.model
    graphs = signature_dalle.image_tokenizer_graphs(m)
    modules = {signature.CODE_DECODER: CodeDecoder(model).eval(), signature.CODE_ENCODER: CodeEncoder(model).eval()}
    return {graph.name: export_graph(modules[graph.name], graph,
                                     signature_dalle.image_tokenizer_inputs(m, graph, 2, seed=0),
                                     directory / f"{graph.name}.onnx", opset, external_data_threshold)
            for graph in graphs}


def export_graph(module, graph: signature.GraphSignature, example: dict, out_file: Path,
                 opset: int = MIN_OPSET, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """Export ``module`` on ``example`` (inputs by name) into ``out_file`` with ``graph``'s
    names and named dynamic axes; the files written."""
    import onnx
    import torch

    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: taichu exports opset >= {MIN_OPSET} "
                         f"(the dynamo exporter's lowest)")
    args = tuple(torch.from_numpy(example[n]) for n in graph.input_names)
    with tempfile.TemporaryDirectory(dir=out_file.parent) as scratch:
        traced_file = Path(scratch) / "traced.onnx"
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset,
                                        input_names=graph.input_names, output_names=graph.output_names,
                                        dynamic_shapes=dynamic_shapes(module, graph), verbose=False,
                                        optimize=True)
            # Always external while in scratch: a graph over 2 GiB cannot be one protobuf.
            program.save(str(traced_file), external_data=True)
        model = onnx.load(str(traced_file), load_external_data=True)
        name_axes(model, graph)
        # Re-save: one graph file, plus one data file when large.
        weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
        external = weight_bytes > external_data_threshold
        data_file = out_file.with_name(out_file.name + EXTERNAL_DATA_SUFFIX)
        # Small tensors stay in the graph: onnxruntime reads shape operands (Slice starts,
        # Reshape shapes) only from tensors inside it.
        onnx.save_model(model, str(out_file), save_as_external_data=external,
                        all_tensors_to_one_file=True, location=data_file.name, size_threshold=1024)
    return [out_file, data_file] if external else [out_file]


def dynamic_shapes(module, graph: signature.GraphSignature) -> tuple:
    """torch.onnx.export's ``dynamic_shapes`` for ``graph``: per input {axis: Dim}, one
    ``torch.export.Dim`` per axis name (so equal names are one symbol), grouped as
    ``module.forward`` takes its arguments (a ``*past`` takes the trailing inputs as one tuple)."""
    from torch.export import Dim

    dims: dict[str, Dim] = {}
    axes = graph.dynamic_axes()
    per_input = [{axis: dims.setdefault(name, Dim(name)) for axis, name in axes[t.name].items()}
                 if t.name in axes else None for t in graph.inputs]
    parameters = list(inspect.signature(module.forward).parameters.values())
    for position, parameter in enumerate(parameters):
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            return tuple(per_input[:position]) + (tuple(per_input[position:]),)
    if len(parameters) != len(per_input):
        raise ValueError(f"{type(module).__name__}.forward takes {len(parameters)} arguments, "
                         f"the {graph.name} graph has {len(per_input)} inputs")
    return tuple(per_input)


def name_axes(model, graph: signature.GraphSignature) -> dict[str, str]:
    """Give the axes of the ONNX ``model``'s inputs and outputs the names in ``graph`` and
    rename the same symbols in value_info; returns {exporter's symbol: name}.

    Raises ExportValidationError where the exported graph disagrees with the signature: a
    named axis exported as a constant (a specialisation), a fixed size that differs, or one
    exporter symbol standing for two named axes."""
    expected = {t.name: t for t in graph.inputs + graph.outputs}
    renames: dict[str, str] = {}
    values = list(model.graph.input) + list(model.graph.output)
    for value in values:
        info = expected.get(value.name)
        if info is None:
            raise ExportValidationError(f"{graph.name}: the exported graph has an unexpected "
                                        f"input or output {value.name!r}")
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(info.shape):
            raise ExportValidationError(f"{graph.name}: {value.name} has rank {len(dims)} in the "
                                        f"exported graph, {len(info.shape)} in the signature")
        for axis, (dim, want) in enumerate(zip(dims, info.shape)):
            got = (dim.dim_param if dim.HasField("dim_param")
                   else dim.dim_value if dim.HasField("dim_value") else None)
            if got is None and isinstance(want, str):
                dim.dim_param = want                 # unknown size: the signature names it
                continue
            if isinstance(want, int):
                if got != want:
                    raise ExportValidationError(f"{graph.name}: {value.name} axis {axis} is {got!r} "
                                                f"in the exported graph, {want} in the signature")
                continue
            if not isinstance(got, str):
                raise ExportValidationError(
                    f"{graph.name}: the exporter fixed axis {axis} ({want}) of {value.name} to {got}: "
                    f"it specialised a dynamic axis (trace at sizes >= 2, all distinct)")
            if renames.setdefault(got, want) != want:
                raise ExportValidationError(f"{graph.name}: the exporter made {want} and "
                                            f"{renames[got]} one axis ({got!r})")
    for value in values + list(model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in renames:
                dim.dim_param = renames[dim.dim_param]
    return renames


@contextlib.contextmanager
def _quiet_exporter():
    """Silence what the dynamo exporter says on every call that is not about our graph: its
    progress lines, "torchvision is not installed", pytree deprecations, and that a named
    Dim shared by several inputs keeps its one name."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo",
                                                      "torch.fx.experimental.symbolic_shapes")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


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

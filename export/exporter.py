"""``taichu export``: model directory -> validated ONNX or MINDIR directory.

What is exported depends on the family's task (export/signature.py): a GPT becomes one
decoder graph (``model.onnx`` / ``model.mindir``, optional ``model_int8.onnx``); an
image-text family (CLIP, BriVL) becomes two towers, ``image_encoder`` and ``text_encoder``
(``.onnx`` / ``.mindir``); a tri-modal model three, the same two and ``speech_encoder``
(audio -> speech_embeds); a speech family (wav2vec2) one ``encoder`` graph (hidden states,
utterance embedding and, with the CTC head, logits); the vision family one ``model`` graph,
its ViT backbone (an MST model's teacher) as optimum exports a ViTModel: pixel_values ->
last_hidden_state and pooler_output, batch dynamic, image size fixed. Tower, speech and
vision graphs are listed with their inputs, outputs and validation under ``graphs`` in
export_info.json. A DALL-E (text_to_image) becomes ``prefill`` (caption -> first code's
logits + cache) and ``decode`` (codes + past -> logits + presents; in MINDIR one code over a
static cache with an explicit write position); an image tokenizer (vqvae) ``decoder`` (codes
-> normalised pixels) and ``encoder`` (pixels -> codes); an M6 ``image_encoder`` (pixels ->
patch embeddings) and one ``decoder`` over a KV cache in ONNX, ``prefill``, ``decode`` and
``decode_codes`` over a static cache in MINDIR; a GPT-XL (recurrent_language_model) one
``decoder`` over its segment memory, ONNX only (it generates in MindSpore from its model
directory); a text classifier (gpt_classifier) one ``classifier`` graph (token ids and mask
-> logits), ONNX only, with what its runtime needs to read text under ``classifier``; all
listed under ``graphs`` too (export/signature.py and its family modules,
signature_*.py, have every signature).

An ONNX export folder is self-contained: beside the graphs it holds ``config.yaml`` and
``tokenizer.model`` (ours, where the model has one), the Hugging Face ``config.json`` of the
family's HF architecture (GPT -> GPT2LMHeadModel, CLIP -> CLIPModel, wav2vec2 ->
Wav2Vec2ForCTC or Wav2Vec2ForPreTraining by its head, vision -> ViTModel; none for a family
HF lacks, such as BriVL, which export_info.json says under ``huggingface``) and the Hugging
Face tokenizer files (a SentencePiece model's tokenizer.json...; a CTC model's vocab.json and
tokenizer_config.json of Wav2Vec2CTCTokenizer), so that optimum's loaders and plain
onnxruntime users start from the folder alone.

The export is built in a staging directory beside ``out`` and only moved to ``out`` once
every file has been checked against its source model; an export that fails validation is
kept as ``<out>.rejected`` (with its export_info.json saying why) and never replaces a
good export.
"""
from __future__ import annotations

import json
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np

from export import signature, signature_classifier, signature_gpt_xl, signature_m6
from export.runtime import INFO_FILE, INT8_FILE, MODEL_FILE, TOKENIZER_FILE
from export.validate import ExportValidationError

FORMATS = ("onnx", "mindir")
TASKS = (signature.LANGUAGE_MODEL, signature.IMAGE_TEXT, signature.SPEECH, signature.VISION,
         signature.TEXT_TO_IMAGE, signature.IMAGE_TOKENIZER, signature.TRIMODAL, signature.M6,
         signature.RECURRENT_LANGUAGE_MODEL, signature.CLASSIFICATION)
# Tasks exported as a set of named graphs (export_info.json's ``graphs``): every task but the
# GPT's, whose decoder keeps its top-level entries (inputs, outputs, validation).
ENCODER_TASKS = (signature.IMAGE_TEXT, signature.SPEECH, signature.VISION, signature.TEXT_TO_IMAGE,
                 signature.IMAGE_TOKENIZER, signature.TRIMODAL)
# Per encoder task: its ONNX exporter (export/onnx_export.py), MINDIR exporter
# (export/mindir_export.py), validation reference (export/validate.py) and the MINDIR's
# dynamic axes. Names: the modules import their framework, loaded only when used.
ENCODER_EXPORTS = {
    signature.IMAGE_TEXT: ("export_onnx_towers", "export_mindir_towers", "tower_runner", "batch and sequence"),
    signature.SPEECH: ("export_onnx_speech", "export_mindir_speech", "speech_runner", "batch and samples"),
    signature.VISION: ("export_onnx_vision", "export_mindir_vision", "vision_runner", "batch"),
    signature.TEXT_TO_IMAGE: ("export_onnx_dalle", "export_mindir_dalle", "dalle_runner",
                              "batch; decode over a static cache of dynamic length"),
    signature.IMAGE_TOKENIZER: ("export_onnx_image_tokenizer", "export_mindir_image_tokenizer",
                                "image_tokenizer_runner", "batch"),
    signature.TRIMODAL: ("export_onnx_trimodal", "export_mindir_trimodal", "tower_runner",
                         "batch, sequence (text) and samples (speech)"),
}
# --quantize int8 is refused for every task but the GPT's: what kind of model, what it exports.
NO_INT8 = {signature.IMAGE_TEXT: ("image-text", "their towers export"),
           signature.SPEECH: ("speech", "the encoder exports"),
           signature.VISION: ("vision", "the backbone exports"),
           signature.TEXT_TO_IMAGE: ("text-to-image", "the prefill and decode graphs export"),
           signature.IMAGE_TOKENIZER: ("image tokenizer", "the decoder and encoder export"),
           signature.TRIMODAL: ("tri-modal", "their towers export"),
           signature.M6: ("M6", "the image encoder and decoder export"),
           signature.RECURRENT_LANGUAGE_MODEL: ("GPT-XL", "the decoder exports"),
           signature.CLASSIFICATION: ("text classifier", "the classifier graph exports")}


def export_model(model_dir: str | Path, fmt: str, out: str | Path, opset: int | None = None,
                 quantize: str | None = None, validate: bool = True, log=print) -> dict:
    """Export, validate and install; returns the export_info written beside the files."""
    from taichu.api import load_model
    from taichu.config import ConfigError, load_config
    from taichu.fileio import atomic_write_bytes

    model_dir, out = Path(model_dir), Path(out)
    config = load_config(model_dir)
    task = signature.task_of(config)
    if task not in TASKS:
        raise ConfigError(f"{model_dir}: export supports {' and '.join(TASKS)} families, not "
                          f"{config.family} (task {task})")
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    if quantize not in (None, "int8"):
        raise ValueError(f"unknown quantization {quantize!r}; only int8 is supported")
    if quantize and fmt != "onnx":
        raise ValueError("--quantize int8 applies to ONNX exports only")
    if quantize and task in NO_INT8:
        # Not implemented rather than unchecked: the int8 check (validate_int8) measures a GPT's
        # next-token agreement on text, which says nothing about embeddings, features, pixels
        # or image codes.
        kind, graph = NO_INT8[task]
        raise ValueError(f"--quantize int8 is not implemented for {kind} models ({config.family}): "
                         f"{graph} in fp32 only; run without --quantize")
    if opset is not None and fmt != "onnx":
        raise ValueError("--opset applies to ONNX exports only")
    if task == signature.RECURRENT_LANGUAGE_MODEL and fmt != "onnx":
        raise NotImplementedError(
            f"{config.family} models export to ONNX only (--format onnx: one decoder graph over the "
            f"segment memory, run by export.gpt_xl_network); there is no MINDIR export of a "
            f"{config.family}: in MindSpore it generates from its model directory (taichu generate "
            f"{model_dir} --backend mindspore, compiled with mindspore.jit)")
    if task == signature.CLASSIFICATION and fmt != "onnx":
        raise NotImplementedError(
            f"{config.family} models export to ONNX only (--format onnx: one classifier graph, run by "
            f"export.classifier_network and `taichu classify EXPORT_DIR`); there is no MINDIR export of a "
            f"{config.family}: in MindSpore it classifies from its model directory (taichu classify "
            f"{model_dir} --backend mindspore)")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        backend = "torch" if fmt == "onnx" else "mindspore"
        model = load_model(model_dir, backend=backend)
        info = {"format": fmt, "family": config.family, "task": task, "source": str(model_dir.resolve()),
                "source_backend": backend}
        if task == signature.M6:
            info["config"] = config.model_dump(mode="json")
            _export_m6(model, config, fmt, staging, opset, validate, info, log)
        elif task == signature.RECURRENT_LANGUAGE_MODEL:
            info["config"] = config.model_dump(mode="json")
            _export_gpt_xl(model, config, staging, opset, validate, info, log)
        elif task == signature.CLASSIFICATION:
            info["config"] = config.model_dump(mode="json")
            _export_classifier(model, config, model_dir, staging, opset, validate, info, log)
        elif task in ENCODER_TASKS:
            info["config"] = config.model_dump(mode="json")
            _export_towers(model, config, fmt, staging, opset, validate, info, log)
        else:
            info.update(max_position_embeddings=config.model.max_position_embeddings,
                        config=config.model_dump(mode="json"), **signature.describe(config.model))
            if fmt == "onnx":
                _export_onnx(model, config, model_dir, staging, opset, quantize, validate, info, log)
            else:
                _export_mindir(model, config, staging, validate, info, log)
        shutil.copy2(model_dir / "config.yaml", staging / "config.yaml")
        if (model_dir / TOKENIZER_FILE).is_file():
            shutil.copy2(model_dir / TOKENIZER_FILE, staging / TOKENIZER_FILE)
        if fmt == "onnx":
            info["huggingface"] = _write_huggingface_files(config, staging, log)
        info["files"] = sorted(p.name for p in staging.iterdir()) + [INFO_FILE]
    except ExportValidationError as error:
        info["validation_error"] = str(error)
        atomic_write_bytes(staging / INFO_FILE, _json(info))
        rejected = out.with_name(out.name + ".rejected")
        shutil.rmtree(rejected, ignore_errors=True)
        staging.rename(rejected)
        raise ExportValidationError(f"{error}; the export was kept for inspection in {rejected}, "
                                    f"{out} was not touched") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    atomic_write_bytes(staging / INFO_FILE, _json(info))
    # mkdtemp makes the directory private and ms.export makes its file read-only.
    staging.chmod(0o755)
    for file in staging.iterdir():
        file.chmod(0o644)
    _install(staging, out)
    return info


def _write_huggingface_files(config, staging: Path, log) -> dict:
    """config.json (where Hugging Face has the family) and the tokenizer files in ``staging``,
    which already holds tokenizer.model; what was written, for export_info.json."""
    from taichu import convert
    from taichu.fileio import atomic_write_bytes

    written = {"config": None, "tokenizer_files": []}
    if config.family in convert.HF_FAMILIES:
        family = convert.HF_FAMILIES[config.family]
        # The graphs are fp32 whatever the source directory's dtype.
        hf = convert.config_to_hf(config, "float32")
        atomic_write_bytes(staging / convert.HF_CONFIG, _json(hf))
        # The architecture config.json names: a family may have several (wav2vec2: one per
        # head), where HF_FAMILIES' ``architecture`` is the one it reads by default.
        written.update(config=convert.HF_CONFIG, architecture=hf["architectures"][0], model_type=family.model_type)
        # Files of a family whose config lives partly beside config.json (wav2vec2's CTC
        # alphabet as Wav2Vec2CTCTokenizer's vocab.json and tokenizer_config.json).
        for name, data in getattr(family, "write_files", lambda c: {})(config).items():
            atomic_write_bytes(staging / name, data)
            written["tokenizer_files"].append(name)
    else:
        written["note"] = (f"Hugging Face transformers has no {config.family} architecture: no "
                           f"{convert.HF_CONFIG} is written")
    if (staging / TOKENIZER_FILE).is_file():
        from taichu.config import ConfigError
        from taichu.convert.hf_tokenizer import write_hf_tokenizer

        before = {p.name for p in staging.iterdir()}
        try:
            written["tokenizer_notes"] = write_hf_tokenizer(staging / TOKENIZER_FILE, staging, config)
        except ConfigError as error:
            # The graphs are valid and tokenizer.model is there: say why, do not fail.
            written["tokenizer_error"] = str(error)
            log(f"no Hugging Face tokenizer files: {error}")
        written["tokenizer_files"] += sorted({p.name for p in staging.iterdir()} - before)
    log(f"wrote {', '.join(filter(None, [written['config'], *written['tokenizer_files']])) or 'no'} "
        f"Hugging Face files" + (f" ({written['note']})" if "note" in written else ""))
    return written


def _install(staging: Path, out: Path) -> None:
    """Replace ``out`` with ``staging`` without a moment where neither exists complete."""
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a directory")
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old)
    else:
        staging.rename(out)


def _export_onnx(model, config, model_dir, staging, opset, quantize, validate, info, log):
    import onnxruntime
    import torch

    from export.onnx_export import EXPORTER, MIN_OPSET, export_onnx, quantize_int8
    from export.runtime import OnnxDecoder
    from export.validate import source_runner, validate_against_source, validate_int8

    opset = MIN_OPSET if opset is None else opset
    files = export_onnx(model, staging / MODEL_FILE, opset)
    log(f"exported {MODEL_FILE} (opset {opset}, {'external data' if len(files) > 1 else 'one file'})")
    info.update(opset=opset, exporter=_onnx_exporter(EXPORTER, torch),
                runtime=f"onnxruntime {onnxruntime.__version__}", platform=platform.platform())
    decoder = OnnxDecoder(staging / MODEL_FILE)
    if validate:
        info["validation"] = validate_against_source(decoder.run, source_runner(model), config.model,
                                                     f"{MODEL_FILE} in onnxruntime")
        log(f"validated {MODEL_FILE} against torch_impl: {_summary(info['validation'])}")
    if quantize == "int8":
        quantize_int8(staging / MODEL_FILE, staging / INT8_FILE)
        log(f"quantized {INT8_FILE} (dynamic int8 MatMul weights)")
        if validate:
            int8 = OnnxDecoder(staging / INT8_FILE)
            sequences, source = evaluation_sequences(config, model_dir, decoder)
            result = validate_int8(decoder, int8, sequences, source)
            info["int8_validation"] = result
            log(f"int8 vs fp32 on {result['tokens']} tokens of {source}: top-1 agreement "
                f"{result['top1_agreement']:.3f}, perplexity {result['perplexity_fp32']:.2f} -> "
                f"{result['perplexity_int8']:.2f} ({result['perplexity_change']:+.1%})")
            if not result["passed"]:
                raise ExportValidationError(
                    f"{INT8_FILE} drifts too far from fp32: top-1 agreement {result['top1_agreement']:.3f} "
                    f"(need >= {result['min_top1_agreement']}), perplexity change "
                    f"{result['perplexity_change']:+.1%} (need within ±{result['max_perplexity_change']:.0%})")


def _export_mindir(model, config, staging, validate, info, log):
    import mindspore as ms

    from export.mindir_export import MODEL_FILE as MINDIR_FILE, MindirDecoder, export_mindir
    from export.mindir_export import export_generation_graphs
    from export.validate import source_runner, validate_against_source

    export_mindir(model, staging / MINDIR_FILE)
    log(f"exported {MINDIR_FILE} (dynamic batch, sequence and past)")
    info.update(exporter=f"mindspore.export MINDIR, mindspore {ms.__version__}", platform=platform.platform())
    for spec in info["inputs"][:3]:
        spec["dtype"] = "int32"
    if validate:
        info["validation"] = validate_against_source(MindirDecoder(staging / MINDIR_FILE).run,
                                                     source_runner(model), config.model,
                                                     f"{MINDIR_FILE} in mindspore.nn.GraphCell")
        log(f"validated {MINDIR_FILE} against mindspore_impl: {_summary(info['validation'])}")
    # The graphs `taichu generate --backend mindir` runs (export.runtime.MindirGenerator).
    info["graphs"] = export_generation_graphs(model, staging, validate, log)


def _export_towers(model, config, fmt, staging, opset, validate, info, log):
    """The graphs of an image-text model (image encoder and text encoder, each validated
    against the model's own get_image_features / get_text_features), of a tri-modal model
    (those two and the speech encoder, against its get_speech_features), of a speech model (one
    encoder, validated against the model's encode, embed and forward), of a vision model (its
    backbone, validated against the backbone the model runs), of a DALL-E (prefill and
    decode, validated against its forward with the growing cache) or of an image tokenizer
    (decoder and encoder, validated against its decode and encode)."""
    from export import validate as checks

    onnx_exporter, mindir_exporter, runner, dynamic = ENCODER_EXPORTS[signature.task_of(config)]
    runner = getattr(checks, runner)
    if fmt == "onnx":
        import onnxruntime
        import torch

        from export import onnx_export
        from export.runtime import OnnxGraph

        opset = onnx_export.MIN_OPSET if opset is None else opset
        files = getattr(onnx_export, onnx_exporter)(model, staging, opset)
        detail = f"opset {opset}"
        info.update(opset=opset, exporter=_onnx_exporter(onnx_export.EXPORTER, torch),
                    runtime=f"onnxruntime {onnxruntime.__version__}")
        runtime, source, int_dtype = "onnxruntime", "torch_impl", "int64"

        def load(path, graph):
            return OnnxGraph(path).run
    else:
        import mindspore as ms

        from export import mindir_export

        files = getattr(mindir_export, mindir_exporter)(model, staging)
        detail = f"dynamic {dynamic}"
        info.update(exporter=f"mindspore.export MINDIR, mindspore {ms.__version__}")
        runtime, source, int_dtype = "mindspore.nn.GraphCell", "mindspore_impl", "int32"

        def load(path, graph):
            return mindir_export.MindirGraph(path, graph).run
    log(f"exported {', '.join(f.name for fs in files.values() for f in fs)} ({detail})")
    info.update(platform=platform.platform(), graphs=[])
    for graph in signature.graphs(config, fmt):
        file = files[graph.name][0].name
        entry = _list_graph(info, graph, file, int_dtype)
        if validate:
            entry["validation"] = checks.validate_against_source(
                load(staging / file, graph), runner(model, graph), config.model,
                f"{file} in {runtime}", graph=graph)
            log(f"validated {file} against {source}: {_summary(entry['validation'])}")


def _list_graph(info: dict, graph, file: str, int_dtype: str) -> dict:
    """The export_info.json entry of one graph (ids in the runtime's integer type), appended to
    info["graphs"] before validation, so a rejection shows it."""
    entry = {"name": graph.name, "file": file, **graph.describe()}
    for spec in entry["inputs"] + entry["outputs"]:
        if spec["dtype"] == "int64":
            spec["dtype"] = int_dtype
    info["graphs"].append(entry)
    return entry


def _export_m6(model, config, fmt, staging, opset, validate, info, log):
    """The graphs of an M6 (export/signature_m6.py, ``m6_graphs``), listed under ``graphs`` and
    each validated against the model's own forward (export.validate.m6_runner): ONNX
    ``image_encoder`` and ``decoder`` (the decoder run on pixels through the exported image
    encoder, as export.runtime_m6.M6Network runs it); MINDIR ``prefill``, ``decode`` and
    ``decode_codes`` over a static cache."""
    from export import validate as checks

    m = config.model
    graphs = signature_m6.m6_graphs(m, static=fmt == "mindir")
    if fmt == "onnx":
        import onnxruntime
        import torch

        from export import onnx_export
        from export.runtime import OnnxGraph

        opset = onnx_export.MIN_OPSET if opset is None else opset
        files = onnx_export.export_onnx_m6(model, staging, opset)
        detail = (f"opset {opset}; dynamic batch, and patches, sequence, codes and past (each may be 0) "
                  f"in the decoder")
        info.update(opset=opset, exporter=_onnx_exporter(onnx_export.EXPORTER, torch),
                    runtime=f"onnxruntime {onnxruntime.__version__}")
        runtime, source, int_dtype = "onnxruntime", "torch_impl", "int64"
        loaded = {graph.name: OnnxGraph(staging / files[graph.name][0].name).run for graph in graphs}
        image, decoder = (graph.name for graph in graphs)
        runs = {image: loaded[image], decoder: checks.m6_exported_runner(loaded[image], loaded[decoder], m)}
    else:
        import mindspore as ms

        from export import mindir_export

        files = mindir_export.export_mindir_m6(model, staging)
        detail = "static cache: dynamic batch and cache length, the prompt left-padded to text_length"
        info.update(exporter=f"mindspore.export MINDIR, mindspore {ms.__version__}")
        runtime, source, int_dtype = "mindspore.nn.GraphCell", "mindspore_impl", "int32"
        runs = {graph.name: mindir_export.MindirGraph(files[graph.name][0], graph).run for graph in graphs}
    log(f"exported {', '.join(f.name for fs in files.values() for f in fs)} ({detail})")
    info.update(platform=platform.platform(), graphs=[])
    for graph in graphs:
        file = files[graph.name][0].name
        entry = _list_graph(info, graph, file, int_dtype)
        if validate:
            entry["validation"] = checks.validate_cases(
                runs[graph.name], checks.m6_runner(model, graph), signature.validation_cases(m, graph),
                f"{file} in {runtime}")
            log(f"validated {file} against {source}: {_summary(entry['validation'])}")


def _export_gpt_xl(model, config, staging, opset, validate, info, log):
    """The ONNX ``decoder`` of a GPT-XL (export/signature_gpt_xl.py), listed under ``graphs``
    and validated against the torch model's DecoderForExport (export.validate.gpt_xl_runner)
    at signature_gpt_xl.GPT_XL_VALIDATION_SHAPES; ``generation`` says how the runtime feeds
    it (segment length, default memory)."""
    import onnxruntime
    import torch

    from export import onnx_export, validate as checks
    from export.runtime import OnnxGraph
    from taichu.generate import generation_memory

    m = config.model
    opset = onnx_export.MIN_OPSET if opset is None else opset
    files = onnx_export.export_onnx_gpt_xl(model, staging, opset)
    log(f"exported {', '.join(f.name for fs in files.values() for f in fs)} (opset {opset}; dynamic batch, "
        f"sequence and memory)")
    info.update(opset=opset, exporter=_onnx_exporter(onnx_export.EXPORTER, torch),
                runtime=f"onnxruntime {onnxruntime.__version__}", platform=platform.platform(), graphs=[],
                generation={"segment_length": config.data.seq_len, "mem_len": m.mem_len,
                            "memory": generation_memory(m.mem_len, config.data.seq_len),
                            "rule": "the prompt left-padded to a multiple of segment_length and run in "
                                    "segments of it, then one token per call; memory: the default "
                                    "length of the memory (mem_len + segment_length - 1), any length "
                                    ">= 1 runs"})
    graph = signature_gpt_xl.gpt_xl_graph(m)
    file = files[graph.name][0].name
    entry = _list_graph(info, graph, file, "int64")
    if validate:
        entry["validation"] = checks.validate_cases(
            OnnxGraph(staging / file).run, checks.gpt_xl_runner(model, graph),
            signature_gpt_xl.gpt_xl_validation_cases(m, graph), f"{file} in onnxruntime")
        log(f"validated {file} against torch_impl: {_summary(entry['validation'])}")


def _export_classifier(model, config, model_dir, staging, opset, validate, info, log):
    """The ONNX ``classifier`` of a gpt_classifier (export/signature_classifier.py), listed under
    ``graphs`` and validated against the torch model's forward (export.validate.classifier_runner)
    at signature_classifier.CLASSIFIER_VALIDATION_SHAPES; ``classifier`` says how a runtime turns
    text into its inputs (taichu.classify.TextClassifier's rule) and what the logits are."""
    import onnxruntime
    import torch

    from export import onnx_export, validate as checks
    from export.runtime import OnnxGraph

    m, data = config.model, config.data
    special = None
    if (model_dir / TOKENIZER_FILE).is_file():
        from taichu.tokenizer import Tokenizer

        tokenizer = Tokenizer(model_dir / TOKENIZER_FILE)
        special = {"pad": tokenizer.pad_id, "bos": tokenizer.bos_id, "eos": tokenizer.eos_id}
    opset = onnx_export.MIN_OPSET if opset is None else opset
    files = onnx_export.export_onnx_classifier(model, staging, opset)
    log(f"exported {', '.join(f.name for fs in files.values() for f in fs)} (opset {opset}; dynamic batch and "
        f"sequence)")
    info.update(opset=opset, exporter=_onnx_exporter(onnx_export.EXPORTER, torch),
                runtime=f"onnxruntime {onnxruntime.__version__}", platform=platform.platform(), graphs=[],
                classifier={"labels": list(m.labels), "seq_len": data.seq_len, "truncation": data.truncation,
                            "pad_to_multiple_of": data.pad_to_multiple_of, "special_ids": special,
                            "vocab_size": m.vocab_size, "max_position_embeddings": m.max_position_embeddings,
                            "rule": "a text is [bos] + its ids + [eos], with more than seq_len - 2 ids cut on "
                                    "truncation's side (right: its beginning kept; left: its end); rows "
                                    "right-padded with pad, attention_mask 1 for real tokens; logits [batch, "
                                    "labels] in the order of labels, probabilities their softmax"})
    graph = signature_classifier.classifier_graph(m)
    file = files[graph.name][0].name
    entry = _list_graph(info, graph, file, "int64")
    if validate:
        entry["validation"] = checks.validate_cases(
            OnnxGraph(staging / file).run, checks.classifier_runner(model, graph),
            signature_classifier.classifier_validation_cases(m, graph), f"{file} in onnxruntime")
        log(f"validated {file} against torch_impl: {_summary(entry['validation'])}")


def _onnx_exporter(exporter: str, torch) -> str:
    import onnxscript

    return f"{exporter}, torch {torch.__version__}, onnxscript {onnxscript.__version__}"


def _summary(validation: dict) -> str:
    worst = max(validation["shapes"], key=lambda s: s["max_difference"])
    return (f"worst {worst['worst_tensor']} {worst['max_difference']:.2g} "
            f"(tolerance {validation['tolerance']:g}, {len(validation['shapes'])} shapes)")


def evaluation_sequences(config, model_dir: Path, decoder, count: int = 8,
                         length: int = 128) -> tuple[np.ndarray, str]:
    """Token blocks [count, length] for the int8 check, and where they came from.

    Held-out text of the model's own corpus when it and the tokenizer are available;
    otherwise text sampled from the fp32 graph (temperature 1).
    """
    from taichu.generate import SamplingConfig, generate_ids

    length = min(length, config.model.max_position_embeddings)
    tokenizer_file = model_dir / TOKENIZER_FILE
    if tokenizer_file.is_file():
        from taichu.corpus import load_corpus
        from taichu.tokenizer import Tokenizer

        try:
            corpus = load_corpus(config.data)
        except (ImportError, OSError, ValueError):
            corpus = None
        if corpus is not None and corpus.validation:
            tokenizer = Tokenizer(tokenizer_file)
            ids = [i for doc in corpus.validation[:2000] for i in tokenizer.encode(doc, add_bos=True, add_eos=True)]
            if len(ids) >= count * length:
                return (np.asarray(ids[:count * length], np.int64).reshape(count, length),
                        f"{corpus.name} validation split")
    prompts = [[int(i)] for i in np.random.default_rng(0).integers(4, config.model.vocab_size, count)]
    sampled = generate_ids(decoder.step, prompts, SamplingConfig(max_new_tokens=length - 1, temperature=1.0),
                           eos_id=-1, pad_id=0, max_positions=length)
    return np.asarray([p + s for p, s in zip(prompts, sampled)], np.int64), "text sampled from the fp32 graph"


def _json(info: dict) -> bytes:
    return (json.dumps(info, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

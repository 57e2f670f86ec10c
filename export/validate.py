"""Checking an exported graph against the framework it came from.

fp32: the exported file and the source model run the same random inputs at two shapes
(export/signature.py, validation_cases: for the GPT decoder a left-padded prompt with an
empty past and a short continuation with a cache; for image-text towers batch 1 and a
right-padded batch of 5 (a tri-modal model's image and text towers too; its speech tower as
a speech encoder); for a speech encoder one clip of a second and three right-padded
clips of different lengths; for a vision backbone batch 1 and batch 5; for a DALL-E's
prefill batch 1 and 3, for its decode the first code after the text and 4 codes after 5 (a
static-cache decode: the first code's slot and a later one); for an image tokenizer's
decoder and encoder batch 1 and 5; for an M6's image encoder batch 1 and 5, for its ONNX
decoder a prefill and a one-position step each ending once in text and once in a code, for
its MINDIR prefill and static-cache decodes two shapes each; for a GPT-XL's decoder a
left-padded segment and one token after a memory longer than training's, and a segment
after a memory of 3; for a classifier one text alone, right-padded rows and a left-padded
row); every output tensor
must agree within TOLERANCE, measured as max |exported - source| / max(1, max |source|) so
that it is an absolute bound for values of order 1 and a relative one for larger logits. A
failure names the worst tensor, the shape and the difference.

int8: quantization changes the numbers by design, so the check is on what generation
sees: top-1 agreement with the fp32 graph on held-out text and the change in perplexity
(bounds INT8_MIN_TOP1 and INT8_MAX_PERPLEXITY_CHANGE, see docs/deployment.md).
"""
from __future__ import annotations

import numpy as np

from export import signature, signature_dalle, signature_encoders, signature_gpt_xl, signature_m6

TOLERANCE = 1e-4
# (batch, sequence, past) of the GPT decoder's check.
VALIDATION_SHAPES = signature.DECODER_VALIDATION_SHAPES
INT8_MIN_TOP1 = 0.90
INT8_MAX_PERPLEXITY_CHANGE = 0.05


class ExportValidationError(RuntimeError):
    pass


def source_runner(model):
    """``run(feeds) -> outputs`` for a taichu GPT of either backend, through DecoderForExport."""
    from taichu.api import backend_of

    names = signature.output_names(model.config.model.num_layers)
    if backend_of(model) == "torch":
        import torch

        from torch_impl.gpt import DecoderForExport

        decoder = DecoderForExport(model).eval()

        def run(feeds):
            with torch.no_grad():
                outputs = decoder(*(torch.from_numpy(v) for v in feeds.values()))
            return {n: o.numpy() for n, o in zip(names, outputs)}
        return run

    import mindspore as ms

    from mindspore_impl.gpt import DecoderForExport

    decoder = DecoderForExport(model)
    decoder.set_train(False)

    def run(feeds):
        outputs = decoder(*(ms.Tensor(v.astype(np.int32) if v.dtype == np.int64 else v)
                            for v in feeds.values()))
        return {n: o.asnumpy() for n, o in zip(names, outputs)}
    return run


def tower_runner(model, graph: signature.GraphSignature):
    """``run(feeds) -> outputs`` for one tower of an image-text or tri-modal model of either
    backend: the model's own ``get_image_features`` / ``get_text_features`` /
    ``get_speech_features`` (with its input checks), the reference an exported tower must
    match."""
    from taichu.api import backend_of

    method = getattr(model, {signature.IMAGE_ENCODER: "get_image_features",
                             signature.TEXT_ENCODER: "get_text_features",
                             signature.SPEECH_TOWER: "get_speech_features"}[graph.name])
    (output,) = graph.output_names
    if backend_of(model) == "torch":
        import torch

        def run(feeds):
            with torch.no_grad():
                return {output: method(*(torch.from_numpy(feeds[n]) for n in graph.input_names)).numpy()}
        return run

    import mindspore as ms

    def run(feeds):
        # int32 ids, as in the MINDIR (export/mindir_export.py).
        args = [ms.Tensor(feeds[n].astype(np.int32) if feeds[n].dtype == np.int64 else feeds[n])
                for n in graph.input_names]
        return {output: method(*args).asnumpy()}
    return run


def speech_runner(model, graph: signature.GraphSignature):
    """``run(feeds) -> outputs`` of a wav2vec2 model of either backend through its own
    methods, the reference an exported speech encoder must match: ``encode``'s hidden states
    (last_hidden_state), ``embed`` (embedding) and, with the CTC head, ``forward`` (logits),
    the last two with the model's input checks."""
    from taichu.api import backend_of

    wanted = set(graph.output_names)
    if backend_of(model) == "torch":
        import torch

        def run(feeds):
            values = torch.from_numpy(feeds["input_values"])
            mask = torch.from_numpy(feeds["attention_mask"])
            with torch.no_grad():
                outputs = {"last_hidden_state": model.encode(values, mask)[0], "embedding": model.embed(values, mask)}
                if "logits" in wanted:
                    outputs["logits"] = model(values, mask)
            return {name: tensor.numpy() for name, tensor in outputs.items()}
        return run

    import mindspore as ms

    def run(feeds):
        # An int32 mask, as in the MINDIR (export/mindir_export.py).
        values = ms.Tensor(feeds["input_values"])
        mask = ms.Tensor(feeds["attention_mask"].astype(np.int32))
        outputs = {"last_hidden_state": model.encode(values, mask)[0], "embedding": model.embed(values, mask)}
        if "logits" in wanted:
            outputs["logits"] = model(values, mask)
        return {name: tensor.asnumpy() for name, tensor in outputs.items()}
    return run


def vision_runner(model, graph: signature.GraphSignature):
    """``run(feeds) -> outputs`` of a vision model of either backend: the exported backbone
    (signature_encoders.vision_backbone) run as the model runs it, its final hidden states and their
    pooling as the model's ``forward`` pools (the pooler's output, else the CLS state)."""
    from taichu.api import backend_of

    backbone = signature_encoders.vision_backbone(model)

    def outputs(hidden):
        return hidden, backbone.pooler(hidden) if backbone.pooler is not None else hidden[:, 0]

    if backend_of(model) == "torch":
        import torch

        def run(feeds):
            with torch.no_grad():
                hidden, pooled = outputs(backbone(torch.from_numpy(feeds["pixel_values"]))[0])
            return {"last_hidden_state": hidden.numpy(), "pooler_output": pooled.numpy()}
        return run

    import mindspore as ms

    def run(feeds):
        hidden, pooled = outputs(backbone(ms.Tensor(feeds["pixel_values"]))[0])
        return {"last_hidden_state": hidden.asnumpy(), "pooler_output": pooled.asnumpy()}
    return run


def dalle_runner(model, graph: signature.GraphSignature):
    """``run(feeds) -> outputs`` of a DALL-E of either backend through its own ``forward``
    with the growing cache, the reference its exported ``prefill`` and ``decode`` must match:
    prefill = forward(input_ids, None, None, True), its last image logits and presents;
    decode = forward(None, image_codes, past, True). For the static-cache decode (MINDIR),
    the past is the cache's slots before ``write_position``, and the expected cache is the
    forward's presents followed by the input cache's later slots, untouched."""
    from taichu.api import backend_of

    torch_backend = backend_of(model) == "torch"
    past_names, present_names = signature_dalle.dalle_cache_names(model.config.model.num_layers)
    if torch_backend:
        import torch

        def tensor(x):
            return torch.from_numpy(x)
    else:
        import mindspore as ms

        def tensor(x):
            return ms.Tensor(x.astype(np.int32) if x.dtype == np.int64 else x)

    def numpy(x):
        return x.numpy() if torch_backend else x.asnumpy()

    def forward(text, codes, past):
        if torch_backend:
            with torch.no_grad():
                return model(text, codes, past, True)
        return model(text, codes, past, True)

    def run(feeds):
        if graph.name == signature.PREFILL:
            _, logits, presents = forward(tensor(feeds["input_ids"]), None, None)
            logits = logits[:, -1]
        else:
            cache = [feeds[n] for n in past_names]
            slot = int(feeds["write_position"]) if signature.is_static_decode(graph) else cache[0].shape[2]
            past = tuple((tensor(cache[2 * i][:, :, :slot]), tensor(cache[2 * i + 1][:, :, :slot]))
                         for i in range(len(cache) // 2))
            _, logits, presents = forward(None, tensor(feeds["image_codes"]), past)
            if signature.is_static_decode(graph):
                logits = logits[:, -1]
        outputs = {"logits": numpy(logits)}
        for i, key_value in enumerate(presents):
            for j, t in enumerate(key_value):
                name, value = present_names[2 * i + j], numpy(t)
                if graph.name == signature.DECODE and signature.is_static_decode(graph):
                    value = np.concatenate([value, cache[2 * i + j][:, :, value.shape[2]:]], axis=2)
                outputs[name] = value
        return outputs
    return run


def m6_runner(model, graph: signature.GraphSignature):
    """``run(feeds) -> outputs`` of an M6 of either backend, the reference of its exported
    graphs (feeds: signature_m6.m6_validation_cases'):

    - ``image_encoder``: ``patch_encoder(pixels) + embed_patch_positions`` (the image's term
      of M6.embeddings);
    - ``decoder`` (ONNX): the model's own ``forward`` with the growing cache on the call's
      pixels (if any), text, codes and segments after the past (None where empty): its
      last text position's logits and last code slot's code logits (zeros where the call has
      none) and the presents;
    - ``prefill`` (MINDIR): ``forward(pixel_values, input_ids, segment_ids, None, None,
      True)``: the last position's logits and the presents;
    - ``decode`` / ``decode_codes`` (MINDIR, static cache): ``forward`` of the new token or
      code after the cache's slots before ``write_position`` (the segments up to it); the
      expected cache is the presents followed by the input cache's later slots, untouched.
    """
    from taichu.api import backend_of

    torch_backend = backend_of(model) == "torch"
    m = model.config.model
    past_names, present_names = signature_m6.m6_cache_names(m.num_layers)
    if torch_backend:
        import torch

        def tensor(x):
            return torch.from_numpy(np.ascontiguousarray(x))

        def numpy(x):
            return x.numpy()
    else:
        import mindspore as ms

        def tensor(x):
            return ms.Tensor(np.ascontiguousarray(x.astype(np.int32) if x.dtype == np.int64 else x))

        def numpy(x):
            return x.asnumpy()

    def call(function, *args):
        if torch_backend:
            with torch.no_grad():
                return function(*args)
        return function(*args)

    def given(feeds, name):
        value = feeds.get(name)
        return None if value is None or value.shape[1] == 0 else tensor(value)

    def run(feeds):
        if graph.name == signature.IMAGE_ENCODER:
            embeds = call(lambda x: model.patch_encoder(x) + _patch_positions(model),
                          tensor(feeds["pixel_values"]))
            return {"patch_embeds": numpy(embeds)}
        static = signature.is_static_decode(graph)
        cache = [feeds[n] for n in past_names] if past_names[0] in feeds else None
        segments = feeds["segment_ids"]
        if static:
            slot = int(feeds["write_position"])
            segments = segments[:, :slot + 1]
            cache_in = cache
            cache = [t[:, :, :slot] for t in cache]
        past = None
        if cache is not None and cache[0].shape[2]:
            past = tuple((tensor(cache[2 * i]), tensor(cache[2 * i + 1])) for i in range(m.num_layers))
        text_logits, code_logits, presents = call(model, given(feeds, "pixel_values"), given(feeds, "input_ids"),
                                                  tensor(segments), given(feeds, "image_codes"), past, True)
        batch = segments.shape[0]
        outputs = {}
        if "logits" in graph.output_names:
            outputs["logits"] = (np.zeros((batch, m.vocab_size), np.float32) if text_logits is None
                                 else numpy(text_logits[:, -1]))
        if "code_logits" in graph.output_names:
            outputs["code_logits"] = (np.zeros((batch, m.codebook_size), np.float32) if code_logits is None
                                      else numpy(code_logits[:, -1]))
        for i, key_value in enumerate(presents):
            for j, t in enumerate(key_value):
                value = numpy(t)
                if static:
                    value = np.concatenate([value, cache_in[2 * i + j][:, :, value.shape[2]:]], axis=2)
                outputs[present_names[2 * i + j]] = value
        return outputs
    return run


def gpt_xl_runner(model, graph: signature.GraphSignature | None = None):
    """``run(feeds) -> outputs`` of a GPT-XL of either backend through its DecoderForExport
    (the model's forward with the memory, the last position's logits), the reference of the
    exported ``decoder`` (feeds: signature_gpt_xl.gpt_xl_validation_cases')."""
    from taichu.api import backend_of

    m = model.config.model
    inputs, outputs = signature_gpt_xl.gpt_xl_memory_names(m.num_layers)
    names = ["logits"] + outputs
    if backend_of(model) == "torch":
        import torch

        from torch_impl.gpt_xl import DecoderForExport

        decoder = DecoderForExport(model).eval()

        def run(feeds):
            with torch.no_grad():
                out = decoder(*(torch.from_numpy(feeds[n]) for n in ["input_ids", "document_ids"] + inputs))
            return {n: o.numpy() for n, o in zip(names, out)}
        return run

    import mindspore as ms

    from mindspore_impl.gpt_xl import DecoderForExport

    decoder = DecoderForExport(model)
    decoder.set_train(False)

    def run(feeds):
        out = decoder(*(ms.Tensor(v.astype(np.int32) if v.dtype == np.int64 else v)
                        for v in (feeds[n] for n in ["input_ids", "document_ids"] + inputs)))
        return {n: o.asnumpy().astype(np.int64 if n == outputs[0] else np.float32) for n, o in zip(names, out)}
    return run


def classifier_runner(model, graph: signature.GraphSignature | None = None):
    """``run(feeds) -> {"logits"}`` of a gpt_classifier of either backend through its own
    forward (with its input checks), the reference of the exported ``classifier``."""
    from taichu.classify import model_logits

    logits = model_logits(model)

    def run(feeds):
        return {"logits": logits(feeds["input_ids"], feeds["attention_mask"])}
    return run


def _patch_positions(model):
    """The patch position table of an M6 of either backend (torch's ``weight``, MindSpore's
    ``embedding_table``)."""
    table = model.embed_patch_positions
    return table.weight if hasattr(table, "weight") else table.embedding_table


def m6_exported_runner(image_encoder, decoder, model_config):
    """``run(feeds) -> outputs`` of an ONNX M6 ``decoder`` on signature_m6.m6_validation_cases'
    feeds: ``pixel_values`` (when the call has an image) through ``image_encoder`` into
    ``patch_embeds``, the inputs the call lacks as empty arrays (no patches, no text, no codes,
    an empty past), as export.runtime_m6.M6Network feeds the graphs. ``image_encoder`` and
    ``decoder``: ``run(feeds) -> outputs`` by name."""
    m = model_config
    past_names = signature_m6.m6_cache_names(m.num_layers)[0]

    def run(feeds):
        batch = feeds["segment_ids"].shape[0]
        inputs = dict(feeds)
        pixels = inputs.pop("pixel_values", None)
        inputs["patch_embeds"] = (np.zeros((batch, 0, m.hidden_size), np.float32) if pixels is None
                                  else image_encoder({"pixel_values": pixels})["patch_embeds"])
        inputs.setdefault("input_ids", np.zeros((batch, 0), np.int64))
        if m.codebook_size:
            inputs.setdefault("image_codes", np.zeros((batch, 0), np.int64))
        for name in past_names:
            inputs.setdefault(name, np.zeros((batch, m.num_heads, 0, m.head_dim), np.float32))
        return decoder(inputs)
    return run


def image_tokenizer_runner(model, graph: signature.GraphSignature):
    """``run(feeds) -> outputs`` of a vqvae of either backend: its ``decode`` (codes ->
    normalised pixels) or ``encode`` (pixels -> codes), the reference of its exported graphs."""
    from taichu.api import backend_of

    method = model.decode if graph.name == signature.CODE_DECODER else model.encode
    (name,) = graph.input_names
    (output,) = graph.output_names
    if backend_of(model) == "torch":
        import torch

        def run(feeds):
            with torch.no_grad():
                return {output: method(torch.from_numpy(feeds[name])).numpy()}
        return run

    import mindspore as ms

    def run(feeds):
        value = feeds[name]
        return {output: method(ms.Tensor(value.astype(np.int32) if value.dtype == np.int64 else value)).asnumpy()}
    return run


def compare(source: dict[str, np.ndarray], exported: dict[str, np.ndarray]) -> tuple[str, float]:
    """(worst tensor, its scaled difference) over all outputs."""
    worst, worst_difference = "", -1.0
    for name, expected in source.items():
        actual = exported[name]
        if actual.shape != expected.shape:
            return name, float("inf")
        scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
        difference = float(np.abs(actual.astype(np.float64) - expected).max(initial=0.0)) / scale
        if not np.isfinite(difference) or difference > worst_difference:
            worst, worst_difference = name, difference
    return worst, worst_difference


def validate_cases(run_exported, run_source, cases, label: str, tolerance: float = TOLERANCE) -> dict:
    """Compare on each (shape description, inputs) of ``cases``; raises
    ExportValidationError, naming the tensor and the shape, above ``tolerance``."""
    results = []
    for shape, feeds in cases:
        expected = run_source(feeds)
        try:
            exported = run_exported(feeds)
        except Exception as error:     # an exported file that does not run is rejected too
            where = ", ".join(f"{axis} {size}" for axis, size in shape.items())
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ExportValidationError(f"{label} failed to run at {where}: {type(error).__name__}: "
                                        f"{first_line}") from error
        worst, difference = compare(expected, exported)
        results.append({**shape, "worst_tensor": worst, "max_difference": difference})
        if not difference <= tolerance:
            where = ", ".join(f"{axis} {size}" for axis, size in shape.items())
            raise ExportValidationError(
                f"{label} does not match its source: {worst} differs by {difference:.3g} "
                f"(tolerance {tolerance:g}) at {where}")
    return {"passed": True, "tolerance": tolerance,
            "metric": "max |exported - source| / max(1, max |source|)", "shapes": results}


def validate_against_source(run_exported, run_source, model_config, label: str,
                            tolerance: float = TOLERANCE,
                            graph: signature.GraphSignature | None = None) -> dict:
    """Compare ``graph`` (default: the GPT decoder) at its two validation shapes."""
    graph = signature.decoder_graph(model_config) if graph is None else graph
    return validate_cases(run_exported, run_source, signature.validation_cases(model_config, graph),
                          label, tolerance)


def _next_token_stats(decoder, sequences: np.ndarray) -> tuple[np.ndarray, float]:
    """Argmax predictions [batch, length - 1] and perplexity of ``sequences``."""
    batch, length = sequences.shape
    feeds = {"input_ids": sequences, "attention_mask": np.ones_like(sequences),
             "position_ids": np.broadcast_to(np.arange(length), (batch, length)).astype(np.int64)}
    feeds.update(zip(signature.input_names(decoder.num_layers)[3:], decoder.empty_past(batch)))
    logits = decoder.run(feeds)["logits"][:, :-1].astype(np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, sequences[:, 1:, None], axis=-1).mean()
    return logits.argmax(axis=-1), float(np.exp(nll))


def validate_int8(fp32_decoder, int8_decoder, sequences: np.ndarray, text_source: str) -> dict:
    """Top-1 agreement and perplexity change of the int8 graph against the fp32 graph."""
    fp32_top1, fp32_perplexity = _next_token_stats(fp32_decoder, sequences)
    int8_top1, int8_perplexity = _next_token_stats(int8_decoder, sequences)
    agreement = float((fp32_top1 == int8_top1).mean())
    change = int8_perplexity / fp32_perplexity - 1.0
    result = {"top1_agreement": agreement, "perplexity_fp32": fp32_perplexity,
              "perplexity_int8": int8_perplexity, "perplexity_change": change,
              "tokens": int(sequences[:, 1:].size), "text": text_source,
              "min_top1_agreement": INT8_MIN_TOP1, "max_perplexity_change": INT8_MAX_PERPLEXITY_CHANGE}
    result["passed"] = agreement >= INT8_MIN_TOP1 and abs(change) <= INT8_MAX_PERPLEXITY_CHANGE
    return result

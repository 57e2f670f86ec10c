"""The M6 commands (registered by taichu.cli): ``taichu caption`` and ``taichu ask``, and the
hooks through which ``taichu generate --image``, ``taichu imagine`` and ``taichu eval`` run an
M6 (taichu.m6_generate, taichu.m6_eval).

MODEL is a model directory (config.yaml + weights + tokenizer.model: taichu.api.load_model,
or a training run's final/), or with --backend onnx / mindir its export (``taichu export
MODEL --format onnx|mindir --out DIR``, run by export.m6_network). Image files are
read by taichu.images.load_image and resized to the model's image_size as training resizes
them (shorter side, centre crop: taichu.images.preprocess, through taichu.m6_data.prompt_inputs).
Output: one line per image, ``FILE<TAB>text`` (control characters of the text escaped:
``one_line``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

BACKENDS = ("torch", "mindspore")
EXPORTS = ("onnx", "mindir")


def family_of(path) -> str | None:
    """The family of a model directory (config.yaml) or export (export_info.json); None for
    anything else (a Hugging Face directory, an .onnx file)."""
    path = Path(path)
    info = path / "export_info.json"
    if info.is_file():
        try:
            return json.loads(info.read_text()).get("family")
        except (OSError, ValueError):
            return None
    if (path / "config.yaml").is_file():
        from taichu.config import load_config

        return load_config(path).family
    return None


def is_m6(path) -> bool:
    return family_of(path) == "m6"


def m6_config(path):
    """The config of an M6 model directory or export; ValueError for another family."""
    from taichu.config import load_config

    config = load_config(path)
    if config.family != "m6":
        raise ValueError(f"{path}: a {config.family} model, not an m6 model")
    return config


def load_step(model_dir, backend: str, export_runtime=None):
    """(step, config, tokenizer) of an M6 model directory (torch: eager; mindspore: compiled
    over a static cache) or of its export (onnx / mindir, through export.m6_network)."""
    from taichu.tokenizer import Tokenizer

    model_dir = Path(model_dir)
    config = m6_config(model_dir)
    if not (model_dir / "tokenizer.model").is_file():
        raise ValueError(f"{model_dir}: no tokenizer.model (an M6 model directory carries its tokenizer)")
    tokenizer = Tokenizer(model_dir / "tokenizer.model")
    if backend in EXPORTS:
        step = export_runtime().m6_network(model_dir, backend).step
    elif backend in BACKENDS:
        from taichu.api import load_model
        from taichu.m6_generate import model_step

        if (model_dir / "export_info.json").is_file():
            raise ValueError(f"{model_dir} is an export: use --backend onnx or mindir")
        step = model_step(load_model(model_dir, backend=backend))
    else:
        raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS + EXPORTS)})")
    return step, config, tokenizer


def imagine_config(model_dir):
    """The config of an M6 that can draw (cmd_imagine's hook): one with image codes."""
    config = m6_config(model_dir)
    if not config.model.codebook_size:
        raise ValueError(f"{model_dir}: this m6 model has no image codes (model.codebook_size is null): it "
                         "cannot draw images")
    return config


def imagine_step(model_dir, backend: str, export_runtime=None):
    """taichu.imagine's ``step(text_ids, codes, past)`` for an M6 (cmd_imagine's hook)."""
    from taichu.m6_generate import text_to_image_step

    step, config, tokenizer = load_step(model_dir, backend, export_runtime)
    return text_to_image_step(step, config, tokenizer.pad_id)


def _sampling(args, config):
    from taichu.generate import SamplingConfig

    most = args.max_new_tokens if args.max_new_tokens is not None else config.model.text_length
    return SamplingConfig(max_new_tokens=most, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          repetition_penalty=getattr(args, "repetition_penalty", 1.0), seed=args.seed,
                          min_new_tokens=min(getattr(args, "min_new_tokens", 0), most))


def _images(files):
    from taichu.images import load_image

    return [load_image(f) for f in files]


_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def one_line(text: str) -> str:
    """``text`` on one line (an untrained model generates any byte): a backslash, newline,
    carriage return and tab written as \\\\, \\n, \\r, \\t, any other control character
    or line / paragraph separator as \\xNN or \\uNNNN."""
    import unicodedata

    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def _in_batches(items, size: int):
    if size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {size}")
    return [items[i:i + size] for i in range(0, len(items), size)]


def cmd_caption(args) -> int:
    from taichu.m6_generate import caption

    step, config, tokenizer = load_step(args.model, args.backend, args.export_runtime)
    sampling = _sampling(args, config)
    for files in _in_batches(list(args.images), args.batch_size):
        for file, text in zip(files, caption(step, tokenizer, config, _images(files), sampling)):
            print(f"{file}\t{one_line(text)}")
    return 0


def cmd_ask(args) -> int:
    from taichu.m6_generate import ask

    if not args.question.strip():
        raise ValueError("the question is empty: ask something about the image, e.g. 左边是什么颜色？")
    step, config, tokenizer = load_step(args.model, args.backend, args.export_runtime)
    sampling = _sampling(args, config)
    for files in _in_batches(list(args.images), args.batch_size):
        answers = ask(step, tokenizer, config, _images(files), [args.question] * len(files), sampling)
        for file, answer in zip(files, answers):
            print(f"{file}\t{one_line(answer)}")
    return 0


def cmd_generate(args, export_runtime) -> int:
    """``taichu generate`` for an M6 (taichu.cli.cmd_generate's hook): each --prompt
    continued, conditioned on --image when given; prints prompt + continuation per line."""
    from taichu.m6_generate import continue_text

    family = family_of(args.model)
    if family != "m6":
        raise ValueError(f"--image: {args.model} is a {family or 'non-taichu'} model; only an m6 model takes an "
                         "image with its prompt")
    step, config, tokenizer = load_step(args.model, args.backend, export_runtime)
    sampling = _sampling(args, config)
    prompts = [p for p in args.prompt for _ in range(args.num_return)]
    images = None if not args.image else _images([args.image]) * len(prompts)
    for prompt, output in zip(prompts, continue_text(step, tokenizer, config, prompts, images, sampling)):
        print(f"{prompt}{output}")
    return 0


# ----------------------------------------------------------------------------- taichu eval

# Text to image in ``taichu eval``: one image per caption sampled as bench/m6.py samples them.
EVAL_DRAWING = {"temperature": 1.0, "top_k": 32, "seed": 0}


def _by_kind(right: list[bool], templates: list[str]) -> dict[str, float]:
    from taichu.m6_data import QUESTION_KINDS, QUESTION_TEMPLATES

    kinds = [QUESTION_TEMPLATES[t].kind for t in templates]
    return {kind: float(np.mean([r for r, k in zip(right, kinds) if k == kind]))
            for kind in QUESTION_KINDS if kind in kinds}


def _eval_captions(step, tokenizer, config, data, args, common: str) -> dict:
    from taichu.m6_eval import attribute_accuracy, caption_bleu, caption_cider, evaluate_captions

    result = evaluate_captions(step, tokenizer, config, limit=args.limit, batch_size=args.batch_size, data=data)
    truths = [e["truth"] for e in result["examples"]]
    blind = [common] * len(truths)
    result["blind"] = {"caption": common, "bleu4": caption_bleu(blind, truths),
                       "cider": caption_cider(blind, truths),
                       "attributes": attribute_accuracy(blind, truths) if result["attributes"] else None}
    return result


def _eval_vqa(step, tokenizer, config, data, args, answers: dict) -> dict:
    from taichu.m6_data import QUESTION_TEMPLATES
    from taichu.m6_eval import evaluate_vqa, vqa_accuracy

    result = evaluate_vqa(step, tokenizer, config, limit=args.limit, batch_size=args.batch_size, data=data)
    examples = result["examples"]
    templates = [e["template"] for e in examples]
    result["by_kind"] = _by_kind([e["predicted"].strip() == e["answer"].strip() for e in examples], templates)
    guesses = [answers.get(QUESTION_TEMPLATES[t].kind, "") for t in templates]
    blind = vqa_accuracy(guesses, [e["answer"] for e in examples], templates, data.held_out_templates)
    blind["by_kind"] = _by_kind([g == e["answer"].strip() for g, e in zip(guesses, examples)], templates)
    result["blind"] = {k: blind[k] for k in ("all", "seen", "held_out", "by_kind")}
    return result


def _image_decoder(config, backend: str):
    """decode(codes) with the model's data.image_tokenizer (a vqvae model directory), in the
    eval's framework (an ONNX export's in torch, a MINDIR export's in mindspore)."""
    from taichu.image_tokens import decode_codes
    from taichu.imagine import image_tokenizer_dir

    tokenizer_dir = image_tokenizer_dir(config)      # checked: the model's codebook and grid
    framework = backend if backend in BACKENDS else {"onnx": "torch", "mindir": "mindspore"}[backend]
    return lambda codes: decode_codes(tokenizer_dir, codes, framework)


def _eval_drawing(step, tokenizer, config, data, args, decode) -> dict:
    """One image per distinct held-out scene caption (sorted; the first --limit), checked by
    taichu.scene_check; beside it, the true image of another caption checked the same way."""
    from taichu.generate import SamplingConfig
    from taichu.images import load_image
    from taichu.m6_generate import imagine_codes
    from taichu.scene_check import check_image, parse_caption, score_images

    def readable(text):
        try:
            return bool(parse_caption(text))
        except ValueError:
            return False

    firsts = {}
    for e in data.held_out_pools.get("caption", []):
        if readable(e.target):
            firsts.setdefault(e.target, e)
    captions = sorted(firsts)[:args.limit]
    if not captions:
        return {"skipped": "no held-out scene captions (data.source has no drawn scenes)"}
    sampling = SamplingConfig(max_new_tokens=config.model.image_grid ** 2, **EVAL_DRAWING)
    images = []
    for start in range(0, len(captions), args.batch_size):
        codes = imagine_codes(step, tokenizer, config, captions[start:start + args.batch_size], sampling)
        images += list(decode(codes))
    scores = score_images(images, captions)
    others = [np.asarray(load_image(firsts[captions[(i + 1) % len(captions)]].image)) for i in range(len(captions))]
    scores["other_image"] = score_images(others, captions) if len(captions) > 1 else None
    scores["sampling"] = dict(EVAL_DRAWING)
    scores["examples"] = [{"caption": c, "checks": check_image(i, c)} for c, i in zip(captions, images)]
    return scores


def _percent(value) -> str:
    return "-" if value is None or value != value else f"{value:.1%}"


def _attributes(scores: dict) -> str:
    parts = [f"{k} {_percent(scores[k])}" for k in ("colour", "shape", "position", "count") if scores[k] == scores[k]]
    return ", ".join(parts + [f"all right {_percent(scores['all'])}"])


def _interleave(first: list, second: list) -> list:
    out = []
    for i in range(max(len(first), len(second))):
        out += first[i:i + 1] + second[i:i + 1]
    return out


def eval_lines(results: dict, examples: int) -> list[str]:
    """The printed summary of cmd_eval's results, then ``examples`` captions and answers (one
    line each: a mark, what the model said, then the truth)."""
    from taichu.m6_eval import caption_checks

    lines = [f"m6 {results['model']} ({results['backend']}) on the held-out side of {results['data']}"]
    captions, vqa, drawing = results["captions"], results["vqa"], results["text_to_image"]
    if captions:
        blind = captions["blind"]
        lines.append(f"captions of {captions['images']} held-out images: BLEU-4 {captions['bleu4']:.1f}, CIDEr-D "
                     f"{captions['cider']:.2f}  (blind: {blind['bleu4']:.1f}, {blind['cider']:.2f}; blind = the "
                     f"commonest training caption, {blind['caption']!r}, for every image)")
        if captions["attributes"]:
            lines.append(f"  what the captions state right: {_attributes(captions['attributes'])}; readable "
                         f"{_percent(captions['attributes']['parsed'])}  (blind: {_attributes(blind['attributes'])})")
    if vqa:
        q, blind = vqa["questions"], vqa["blind"]
        lines.append(f"answers, exact match: seen templates {_percent(vqa['seen'])} of {q['seen']}, held-out "
                     f"templates {_percent(vqa['held_out'])} of {q['held_out']}  (blind: {_percent(blind['seen'])}, "
                     f"{_percent(blind['held_out'])}; blind = the commonest training answer of the question's kind)")
        lines.append("  by kind (blind): " + ", ".join(f"{kind} {_percent(value)} ({_percent(blind['by_kind'][kind])})"
                                                        for kind, value in vqa["by_kind"].items()))
    elif results.get("vqa_note"):
        lines.append(f"answers: {results['vqa_note']}")
    if drawing and "skipped" not in drawing:
        other = drawing["other_image"]
        baseline = f"  (another caption's true image: {_attributes(other)})" if other else ""
        lines.append(f"text to image, one image per distinct held-out caption ({drawing['images']}, temperature "
                     f"{drawing['sampling']['temperature']:g}, top-k {drawing['sampling']['top_k']}, seed "
                     f"{drawing['sampling']['seed']}), checked in the pixels: {_attributes(drawing)}{baseline}")
    elif drawing:
        lines.append(f"text to image: {drawing['skipped']}")
    if examples and captions:
        lines.append("held-out captions (model | truth; ✓ every claim of the truth stated):")
        for e in captions["examples"][:examples]:
            checks = caption_checks(e["generated"], e["truth"]) if captions["attributes"] else None
            mark = "✓" if checks and all(all(v) for v in checks.values()) else "✗" if checks else "·"
            lines.append(f"  {mark} {one_line(e['generated'])} | truth: {one_line(e['truth'])}")
    if examples and vqa:
        held = set(results["held_out_templates"])
        seen = [e for e in vqa["examples"] if e["template"] not in held]
        unseen = [e for e in vqa["examples"] if e["template"] in held]
        lines.append("held-out scenes' questions (model | truth; ✓ exact match):")
        for e in _interleave(seen, unseen)[:examples]:
            mark = "✓" if e["predicted"].strip() == e["answer"].strip() else "✗"
            where = f"{e['template']}, held out" if e["template"] in held else e["template"]
            lines.append(f"  {mark} [{where}] {e['question']} -> {one_line(e['predicted'])} | truth: "
                         f"{one_line(e['answer'])}")
    return lines


def _json_ready(value):
    """NaN (a kind nothing was checked of) as null: the file stays strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def cmd_eval(args, export_runtime) -> int:
    """``taichu eval`` for an M6 (taichu.cli.cmd_eval's hook): on the held-out scenes of the
    model config's own split (data.source, scene_count, validation_fraction, split_seed),
    greedy captions (taichu.m6_eval: BLEU-4, CIDEr-D, what of each true caption they state)
    and answers to every question template (exact match: the templates training saw and
    data.held_out_templates, per question kind), each beside a blind baseline (the commonest
    training caption; the commonest training answer of the question's kind); for a model
    with image codes and a data.image_tokenizer, one drawn image per distinct held-out
    caption checked in its pixels by taichu.scene_check, beside another caption's true
    image. ``--limit N``: the first N images, N questions per template set (seen, held
    out), N captions drawn; ``--examples K``: K captions and K answers printed beside the
    truth (seen and held-out templates in turn)."""
    from taichu.fileio import atomic_write_bytes
    from taichu.m6_eval import blind_guesses, held_out_data

    if args.data or args.split != "test":
        raise ValueError("an m6 model is evaluated on its own held-out scenes (its config's split and held-out "
                         "templates): --data and --split do not apply")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.examples < 0:
        raise ValueError(f"--examples must be >= 0, got {args.examples}")
    config = m6_config(args.model)
    decode = None
    if config.model.codebook_size and config.data.image_tokenizer:
        decode = _image_decoder(config, args.backend)      # refused before anything runs
    step, config, tokenizer = load_step(args.model, args.backend, export_runtime)
    data = held_out_data(config)
    common, answers = blind_guesses(data)
    results = {"model": str(args.model), "backend": args.backend, "data": data.name,
               "held_out_templates": list(data.held_out_templates), "limit": args.limit,
               "captions": _eval_captions(step, tokenizer, config, data, args, common), "vqa": None,
               "text_to_image": None}
    if data.test_questions:
        results["vqa"] = _eval_vqa(step, tokenizer, config, data, args, answers)
    else:
        results["vqa_note"] = "no held-out questions (questions come from drawn scenes: data.source 'scenes')"
    if decode is not None:
        results["text_to_image"] = _eval_drawing(step, tokenizer, config, data, args, decode)
    elif config.model.codebook_size:
        results["text_to_image"] = {"skipped": "no data.image_tokenizer to decode the codes with"}
    for line in eval_lines(results, args.examples):
        print(line)
    if args.out:
        text = json.dumps(_json_ready(results), ensure_ascii=False, indent=2) + "\n"
        atomic_write_bytes(args.out, text.encode("utf-8"))
        print(f"wrote {args.out}")
    return 0


def add_eval_arguments(evaluation) -> None:
    """The m6 options of ``taichu eval`` (the parser taichu.cli builds)."""
    evaluation.add_argument("--limit", type=int, help="m6: the first N held-out images, N questions per template "
                                                      "set (seen / held-out), N distinct captions drawn "
                                                      "(default: all)")
    evaluation.add_argument("--examples", type=int, default=4, metavar="K",
                            help="m6: print K captions and K answers beside the truth (default 4)")


def _add_sampling(parser, temperature: float) -> None:
    parser.add_argument("--max-new-tokens", type=int, help="at most this many tokens (default: until eos or the "
                                                           "model's text slots are full)")
    parser.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature:g})")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)


def add_commands(commands, export_runtime) -> None:
    """Register the commands; ``export_runtime()`` returns the export package (taichu.cli hands it
    in: the CLI is the one part of taichu/ that imports export/)."""
    model_help = "m6 model directory, or its export with --backend onnx / mindir"
    backend_help = ("torch (eager), mindspore (compiled over a static cache), onnx / mindir (an export "
                    "directory)")
    captioner = commands.add_parser("caption", help="caption images with an M6 model (one line per image)")
    captioner.add_argument("model", help=model_help)
    captioner.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any size: resized to the "
                                                                      "model's image_size)")
    captioner.add_argument("--backend", choices=BACKENDS + EXPORTS, default="torch", help=backend_help)
    _add_sampling(captioner, 0.0)
    captioner.add_argument("--batch-size", type=int, default=16)
    captioner.set_defaults(func=cmd_caption, export_runtime=export_runtime)

    asker = commands.add_parser("ask", help="ask an M6 model a question about images (one answer per image)")
    asker.add_argument("model", help=model_help)
    asker.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any size)")
    asker.add_argument("question", help="the question, e.g. 左边是什么颜色？")
    asker.add_argument("--backend", choices=BACKENDS + EXPORTS, default="torch", help=backend_help)
    _add_sampling(asker, 0.0)
    asker.add_argument("--batch-size", type=int, default=16)
    asker.set_defaults(func=cmd_ask, export_runtime=export_runtime)
    add_eval_arguments(commands.choices["eval"])

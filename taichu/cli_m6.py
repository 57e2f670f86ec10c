"""The M6 commands (registered by taichu.cli): ``taichu caption`` and ``taichu ask``, and the
hooks through which ``taichu generate --image`` and ``taichu imagine`` run an M6
(taichu.m6_generate).

MODEL is a model directory (config.yaml + weights + tokenizer.model: taichu.api.load_model,
or a training run's final/), or with --backend onnx / mindir its export (``taichu export
MODEL --format onnx|mindir --out DIR``, run by export.runtime.m6_network). Image files are
read by taichu.images.load_image and resized to the model's image_size as training resizes
them (shorter side, centre crop: taichu.images.preprocess, through taichu.m6_data.prompt_inputs).
Output: one line per image, ``FILE<TAB>text`` (control characters of the text escaped:
``one_line``).
"""
from __future__ import annotations

import json
from pathlib import Path

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
    over a static cache) or of its export (onnx / mindir, through export.runtime)."""
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
                          repetition_penalty=getattr(args, "repetition_penalty", 1.0), seed=args.seed)


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


def _add_sampling(parser, temperature: float) -> None:
    parser.add_argument("--max-new-tokens", type=int, help="at most this many tokens (default: until eos or the "
                                                           "model's text slots are full)")
    parser.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature:g})")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)


def add_commands(commands, export_runtime) -> None:
    """Register the commands; ``export_runtime()`` returns export.runtime (taichu.cli hands it
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

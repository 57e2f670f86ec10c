"""The text classifier's commands (registered by taichu.cli): ``taichu classify``, and the hook
through which ``taichu eval`` evaluates a gpt_classifier (taichu.classify).

MODEL is a gpt_classifier model directory (config.yaml + model.safetensors +
tokenizer.model: taichu.api.load_model, or a training run's final/), run in torch or
MindSpore, or its ONNX export (``taichu export MODEL --format onnx --out DIR``, run by
export.classifier_network with onnxruntime alone; the default backend for an export
directory). Every backend goes through taichu.classify.TextClassifier: the same tokens,
truncation, batches and softmax.

``taichu classify`` prints one line per text, in input order:
``LABEL<TAB>PROBABILITY<TAB>TEXT`` (``--top-k K``: K label / probability pairs, most probable
first; ``--all-labels``: every label's, in the model's label order); the text's control
characters are escaped (taichu.cli_m6.one_line). Texts longer than the model's data.seq_len
are cut on data.truncation's side and stderr says how many.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

BACKENDS = ("torch", "mindspore", "onnx")


def read_texts(path: str | Path) -> list[str]:
    """One text per line of a UTF-8 file (a BOM and CRLF endings are fine); an empty line
    is refused naming the file and line: dropping it would shift the output against the lines."""
    from taichu.fileio import text_lines

    path = Path(path).expanduser()
    lines = text_lines(path, "texts file")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    texts = []
    for number, line in enumerate(lines, start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            raise ValueError(f"{path}:{number}: the text is empty: there is nothing to classify (one text per "
                             f"line, no blank lines)")
        texts.append(line)
    if not texts:
        raise ValueError(f"{path}: no texts")
    return texts


def text_classifier(model, backend: str | None, batch_size: int, export_runtime):
    """(taichu.classify.TextClassifier, the backend) of MODEL: a model directory in torch or
    mindspore, an ONNX export through export.classifier_network (``export_runtime()`` is the
    export package taichu.cli hands in: the CLI is the one part of taichu/ that imports
    export/)."""
    from taichu.classify import classifier_backend, model_classifier

    backend = classifier_backend(model, backend)
    if backend == "onnx":
        return export_runtime().classifier_network(model).classifier(batch_size), backend
    return model_classifier(model, backend, batch_size), backend


def cmd_classify(args) -> int:
    from taichu.cli_m6 import one_line

    texts = list(args.texts)
    if args.file:
        texts += read_texts(args.file)
    if not texts:
        raise ValueError("no texts: give them as arguments or with --file (one per line)")
    for i, text in enumerate(texts):
        if not text.strip():
            raise ValueError(f"text {i + 1} is empty: there is nothing to classify")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    classifier, _ = text_classifier(args.model, args.backend, args.batch_size, args.export_runtime)
    result = classifier.classify(texts)
    if result.truncated:
        print(f"note: {classifier.truncation_note(result.truncated, len(texts))}", file=sys.stderr)
    if args.all_labels:
        rows = [list(zip(result.labels, map(float, p))) for p in result.probabilities]
    else:
        rows = result.top(min(args.top_k or 1, len(result.labels)))
    for text, row in zip(texts, rows):
        print("\t".join(f"{label}\t{p:.6f}" for label, p in row) + f"\t{one_line(text)}")
    return 0


def cmd_eval(args, export_runtime) -> int:
    """``taichu eval`` for a gpt_classifier (taichu.cli.cmd_eval's hook): accuracy, macro-F1,
    per-label precision / recall / F1 and the confusion matrix on the model's held-out split
    (its config's data section, split as training split it), or --data (reviews, or a .jsonl of
    {"text", "label"}: all of it unless it is the model's own training file), beside the
    majority-class baseline; --out writes the JSON."""
    from taichu.classify import evaluate_texts, evaluation_texts, metrics_lines
    from taichu.config import load_config
    from taichu.fileio import atomic_write_bytes

    classifier, backend = text_classifier(args.model, args.backend, args.batch_size, export_runtime)
    config = load_config(args.model)
    texts, truth, what = evaluation_texts(config, args.data, args.split)
    metrics = evaluate_texts(classifier, texts, truth)
    print(f"{args.model} ({backend}) on {what}")
    for line in metrics_lines(metrics):
        print(line)
    if metrics["truncated"]:
        print(classifier.truncation_note(metrics["truncated"], len(texts)))
    if args.out:
        results = {"model": str(args.model), "backend": backend, "data": what, "split": args.split, **metrics}
        atomic_write_bytes(args.out, (json.dumps(results, ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
        print(f"wrote {args.out}")
    return 0


def add_commands(commands, export_runtime) -> None:
    """Register the commands; ``export_runtime()`` returns the export package (taichu.cli hands
    it in)."""
    classify = commands.add_parser("classify", help="classify Chinese texts with a gpt_classifier model "
                                                    "(label and probability per text)")
    classify.add_argument("model", help="gpt_classifier model directory, or its ONNX export")
    classify.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
    classify.add_argument("--file", help="UTF-8 file of texts, one per line (after any TEXT arguments)")
    classify.add_argument("--backend", choices=BACKENDS,
                          help="torch (default for a model directory), mindspore, onnx (an export "
                               "directory: its default)")
    classify.add_argument("--batch-size", type=int, default=32)
    labels = classify.add_mutually_exclusive_group()
    labels.add_argument("--top-k", type=int, metavar="K", help="print the K most probable labels (default 1)")
    labels.add_argument("--all-labels", action="store_true",
                        help="print every label's probability, in the model's label order")
    classify.set_defaults(func=cmd_classify, export_runtime=export_runtime)

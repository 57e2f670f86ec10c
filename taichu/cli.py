"""The ``taichu`` command line.

Every command that takes a model accepts a model directory (config.yaml +
model.safetensors [+ tokenizer.model]) and needs no other flag to rebuild it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from taichu.config import ConfigError, load_config


def _add_config_args(parser: argparse.ArgumentParser, what: str = "CONFIG") -> None:
    parser.add_argument("config", metavar=what, help="YAML config, or a model directory")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set model.num_layers=4 (repeatable)")


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    """What `taichu train` and `taichu distill` share: the config, backend, run directory,
    init / resume and the launcher."""
    _add_config_args(parser)
    parser.add_argument("--backend", choices=("mindspore", "torch"), default="mindspore")
    parser.add_argument("--out", required=True, help="run directory (checkpoints, metrics, final/)")
    parser.add_argument("--init", help="start from the weights of this model directory")
    parser.add_argument("--resume", action="store_true", help="continue from the last good checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--print-launch", type=int, metavar="N",
                        help="print the msrun/torchrun command for N devices and exit")


def _human(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return str(count)


def cmd_info(args) -> int:
    from taichu.families import get_family, num_parameters

    config = load_config(args.config, args.overrides)
    family = get_family(config.family)
    count = num_parameters(config)
    print(f"family:     {config.family}")
    for key, value in family.describe(config).items():
        print(f"{key + ':':<11} {value}")
    print(f"parameters: {count:,} ({_human(count)})")
    path = Path(args.config)
    if path.is_dir():
        from taichu.weights import read_safetensors_shapes

        shapes = read_safetensors_shapes(path)
        print(f"weights:    {len(shapes)} tensors in {path}")
        tokenizer = path / "tokenizer.model"
        print(f"tokenizer:  {tokenizer if tokenizer.is_file() else 'none'}")
    return 0


def cmd_tokenizer_train(args) -> int:
    from taichu.corpus import load_corpus
    from taichu.tokenizer import train_tokenizer

    config = load_config(args.config, args.overrides)
    corpus = load_corpus(config.data)
    print(f"training a {config.tokenizer.model_type} SentencePiece model "
          f"(vocab {config.model.vocab_size}) on {len(corpus.train):,} {corpus.name} documents")
    tokenizer = train_tokenizer(corpus.train, config.tokenizer, config.model.vocab_size, args.out)
    sample = corpus.validation[0] if corpus.validation else corpus.train[0]
    ids = tokenizer.encode(sample)
    print(f"wrote {args.out}; a validation line of {len(sample)} characters -> {len(ids)} tokens, "
          f"round trip {'exact' if tokenizer.decode(ids) == sample else 'NOT exact'}")
    return 0


def cmd_init(args) -> int:
    from taichu.api import build_model, save_model

    config = load_config(args.config, args.overrides)
    _seed(args.backend, args.seed)
    model = build_model(config, args.backend)
    save_model(model, args.out, tokenizer=args.tokenizer)
    print(f"wrote a randomly initialised {config.family} ({args.backend}, seed {args.seed}) to {args.out}")
    return 0


def _seed(backend: str, seed: int) -> None:
    if backend == "torch":
        import torch

        torch.manual_seed(seed)
    else:
        import mindspore

        mindspore.set_seed(seed)


def cmd_parity(args) -> int:
    """Load a model directory in both backends and compare logits on held-out text."""
    import numpy as np

    from taichu.api import load_model

    path = Path(args.model)
    config = load_config(path)
    tokenizer_path = path / "tokenizer.model"
    if not tokenizer_path.is_file():
        raise ConfigError(f"{path}: parity needs a tokenizer.model in the model directory")
    from taichu.corpus import load_corpus
    from taichu.tokenizer import Tokenizer

    tokenizer = Tokenizer(tokenizer_path)
    # Held-out paragraphs long enough to exercise many positions (headlines are short).
    texts = args.text or [t for t in load_corpus(config.data).validation if len(t) >= 40][: args.batch]
    xl = config.family == "gpt_xl"     # no window; padding is document id -1, not a mask
    length = args.max_length if xl else min(args.max_length, config.model.max_position_embeddings)
    encoded = [tokenizer.encode(t, add_bos=True)[:length] for t in texts]
    width = max(len(ids) for ids in encoded)
    # Left padding, as in generation: the mask and position ids must make it invisible.
    input_ids = np.full((len(encoded), width), tokenizer.pad_id, np.int64)
    attention_mask = np.zeros((len(encoded), width), np.int64)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids):] = ids
        attention_mask[row, width - len(ids):] = 1

    import mindspore as ms
    import torch

    torch_model = load_model(path, backend="torch")
    second = attention_mask - 1 if xl else attention_mask
    with torch.no_grad():
        torch_logits = torch_model(torch.from_numpy(input_ids), torch.from_numpy(second))
    ms.set_context(mode=ms.GRAPH_MODE if args.graph else ms.PYNATIVE_MODE)
    ms_model = load_model(path, backend="mindspore")
    ms_logits = ms_model(ms.Tensor(input_ids.astype(np.int32)), ms.Tensor(second.astype(np.int32)))
    if xl:      # (logits, memories, memory document ids)
        torch_logits, ms_logits = torch_logits[0], ms_logits[0]
    torch_logits, ms_logits = torch_logits.numpy(), ms_logits.asnumpy()
    real = attention_mask.astype(bool)
    diff = float(np.abs(torch_logits - ms_logits)[real].max())
    agree = float((torch_logits.argmax(-1) == ms_logits.argmax(-1))[real].mean())
    print(f"{len(texts)} texts, {int(real.sum())} tokens: max |torch - mindspore| logit = {diff:.3e}, "
          f"argmax agreement {agree:.2%} ({'graph' if args.graph else 'pynative'} mode)")
    if diff > args.tolerance:
        print(f"FAILED: above tolerance {args.tolerance}", file=sys.stderr)
        return 1
    return 0


def _print_launch(args, command: str, extra: list[str]) -> int:
    """--print-launch N: the msrun / torchrun command that runs ``taichu COMMAND`` on N devices."""
    from taichu.parallel import format_command, launch_command

    extra = ["--out", args.out] + extra + [f"--set={o}" for o in args.overrides
                                           if not o.startswith("parallel.data_parallel=")]
    extra.append(f"--set=parallel.data_parallel={args.print_launch}")
    if args.init:
        extra += ["--init", args.init]
    for tower in getattr(args, "init_tower", []):
        extra += ["--init-tower", tower]
    if args.resume:
        extra.append("--resume")
    log_dir = str(Path(args.out) / "msrun_logs")
    print(format_command(launch_command(args.config, args.backend, args.print_launch, extra,
                                        log_dir=log_dir, command=command)))
    return 0


def cmd_train(args) -> int:
    config = load_config(args.config, args.overrides)
    if args.print_launch:
        return _print_launch(args, "train", [])
    from taichu.train import TrainingDiverged, run_training

    try:
        result = run_training(config, args.backend, args.out, init_dir=args.init, resume=args.resume,
                              progress=not args.no_progress, init_towers=_init_towers(args.init_tower))
    except TrainingDiverged as err:
        print(f"taichu train: {err}", file=sys.stderr)
        return 3
    return _report_training(args, config, result)


def _init_towers(pairs: list[str]) -> dict[str, str]:
    """--init-tower TOWER=DIR (repeatable) -> {tower: DIR}."""
    towers: dict[str, str] = {}
    for pair in pairs:
        tower, sep, directory = pair.partition("=")
        if not sep or not tower or not directory:
            raise ValueError(f"--init-tower {pair!r}: expected TOWER=DIR, e.g. speech=runs/w2v/final")
        if tower in towers:
            raise ValueError(f"--init-tower names the {tower} tower twice")
        towers[tower] = directory
    return towers


def cmd_distill(args) -> int:
    config = load_config(args.config, args.overrides)
    if args.print_launch:
        return _print_launch(args, "distill", ["--teacher", args.teacher])
    from taichu.distill import run_distillation
    from taichu.train import TrainingDiverged

    try:
        result = run_distillation(config, args.teacher, args.backend, args.out, init_dir=args.init,
                                  resume=args.resume, progress=not args.no_progress)
    except TrainingDiverged as err:
        print(f"taichu distill: {err}", file=sys.stderr)
        return 3
    print("(held-out loss below: the student's own loss, comparable with `taichu train` of the "
          "same config; the projections are in the checkpoints, not in final/)")
    return _report_training(args, config, result)


def _report_training(args, config, result) -> int:
    import math

    print(f"trained to step {result.steps}: {result.tokens:,} {result.unit} in "
          f"{result.seconds / 60:.1f} min ({result.tokens / max(result.seconds, 1e-9):,.0f} "
          f"{result.unit}/s, {args.backend}), last training loss {result.last_loss:.4f}")
    if result.val_loss is not None:
        # What the held-out loss is, per unit the run counts; next-token losses as perplexity.
        show = (lambda loss: f"{loss:.4f}") if result.unit != "tokens" else (lambda loss: f"{math.exp(loss):,.1f}")
        what = {"pairs": "contrastive loss", "items": "contrastive loss (weighted sum over the modality pairs)",
                "clips": "pretraining loss (contrastive + diversity + feature penalty, per masked frame)",
                "images": "MST loss (self-distillation + restoring, fixed crops and masks)",
                "tokens": "validation perplexity", "texts": "cross-entropy"}[result.unit]
        if result.unit == "clips" and config.model.head == "ctc":
            what = "CTC loss"
        segmentation = result.unit == "images" and getattr(config.model, "objective", None) == "segmentation"
        if segmentation:
            what = "per-pixel cross-entropy"
        after = {"pairs": f" (taichu eval {result.final_dir} for zero-shot accuracy and Recall@K)",
                 "items": f" (taichu eval {result.final_dir} for Recall@K in all six directions)",
                 "clips": f" (taichu eval {result.final_dir} for error rates of a CTC model)",
                 "images": f" (taichu probe {result.final_dir} for frozen-feature accuracy)",
                 "tokens": f" (loss {result.val_loss:.4f})",
                 "texts": f" (accuracy {(result.val_metrics or {}).get('accuracy', float('nan')):.4f} on the "
                          f"validation batches; taichu eval {result.final_dir} for all held-out texts)"}[result.unit]
        if segmentation:
            after = f" (taichu segment {result.final_dir} for mIoU)"
        if config.family == "vqvae":
            what = "reconstruction + commitment loss (normalised pixels)"
            after = " (taichu.image_tokens.reconstruction_report for PSNR and codebook usage)"
        if config.family == "dalle":
            what = "next-token cross-entropy (text and image parts, weighted as model.*_loss_weight)"
            after = ""
        if config.family == "m6":
            what = "cross-entropy of the targets (text tokens + image codes, weighted as model.*_loss_weight)"
            after = f" (taichu eval {result.final_dir} for captions and answers on held-out scenes)"
        start = f"{show(result.start_val_loss)} at step 0 -> " if result.start_val_loss is not None else ""
        print(f"held-out {what}: {start}{show(result.val_loss)}{after}")
    print(f"final model: {result.final_dir}; metrics: {Path(args.out) / 'metrics.jsonl'} "
          f"(taichu plot {args.out})")
    return 0


def cmd_generate(args) -> int:
    from taichu.cli_m6 import cmd_generate as generate_m6, family_of, is_m6

    if args.image or is_m6(args.model):     # an M6 (taichu.cli_m6), with or without an image
        if args.memory is not None:
            raise ValueError("--memory applies to gpt_xl models, not to an m6 model")
        return generate_m6(args, _export_runtime)
    from taichu.generate import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty, seed=args.seed,
                              min_new_tokens=args.min_new_tokens)
    prompts = [p for p in args.prompt for _ in range(args.num_return)]
    path = Path(args.model)
    if family_of(path) == "gpt_xl":
        outputs = _generate_gpt_xl(args, path, prompts, sampling)
    elif args.memory is not None:
        raise ValueError(f"--memory applies to gpt_xl models (a segment memory, no window), not to "
                         f"{family_of(path) or path}")
    elif args.backend in ("onnx", "mindir"):
        from export.runtime import MindirGenerator, OnnxGenerator

        generator = OnnxGenerator(path) if args.backend == "onnx" else MindirGenerator(path)
        outputs = generator.generate(prompts, **vars(sampling))
    else:
        from taichu.api import load_model
        from taichu.generate import generate_text
        from taichu.tokenizer import Tokenizer

        if (path / "model.onnx").is_file() or path.suffix == ".onnx":
            raise ConfigError(f"{path} is an ONNX export: use --backend onnx")
        if (path / "model.mindir").is_file():
            raise ConfigError(f"{path} is a MINDIR export: use --backend mindir")
        if not (path / "tokenizer.model").is_file():
            raise ConfigError(f"{path}: generate needs a tokenizer.model in the model directory")
        model = load_model(path, backend=args.backend)
        outputs = generate_text(model, Tokenizer(path / "tokenizer.model"), prompts, sampling)
    for prompt, output in zip(prompts, outputs):
        print(f"{prompt}{output}")
    return 0


def _generate_gpt_xl(args, path: Path, prompts: list[str], sampling) -> list[str]:
    """A GPT-XL's continuations, without a window: its model directory in torch or mindspore
    (taichu.generate.generate_text), its ONNX export through export.gpt_xl_network; a memory
    of --memory positions (default mem_len + seq_len - 1)."""
    exported = (path / "export_info.json").is_file()
    if args.backend == "mindir":
        raise ConfigError(f"{path}: a gpt_xl has no MINDIR export; generate from its model directory with "
                          f"--backend mindspore (compiled with mindspore.jit), or from its ONNX export "
                          f"(taichu export MODEL_DIR --format onnx) with --backend onnx")
    if args.backend == "onnx":
        if not exported:
            raise ConfigError(f"{path} is a model directory: --backend onnx runs its ONNX export (taichu "
                              f"export {path} --format onnx --out DIR); or use --backend torch / mindspore")
        return _export_runtime().gpt_xl_network(path).generate(prompts, memory=args.memory, **vars(sampling))
    from taichu.api import load_model
    from taichu.generate import generate_text
    from taichu.tokenizer import Tokenizer

    if exported:
        raise ConfigError(f"{path} is an ONNX export of a gpt_xl: use --backend onnx")
    if not (path / "tokenizer.model").is_file():
        raise ConfigError(f"{path}: generate needs a tokenizer.model in the model directory")
    model = load_model(path, backend=args.backend)
    return generate_text(model, Tokenizer(path / "tokenizer.model"), prompts, sampling, memory=args.memory)


def cmd_export(args) -> int:
    from export.exporter import export_model
    from export.validate import ExportValidationError

    try:
        export_model(args.model, args.format, args.out, opset=args.opset, quantize=args.quantize,
                     validate=not args.no_validate)
    except ExportValidationError as err:
        print(f"taichu export: validation failed: {err}", file=sys.stderr)
        return 1
    note = "" if not args.no_validate else " (NOT validated: --no-validate)"
    print(f"wrote {args.out}{note}")
    return 0


def cmd_convert(args) -> int:
    from taichu.convert import cli_convert

    return cli_convert(args)


def cmd_plot(args) -> int:
    from taichu.train import plot_runs

    print(f"wrote {plot_runs(args.runs, args.out)}")
    return 0


def _embedder(args, batch_size: int = 64):
    """The Embedder of args.model in args.backend; an export's graphs run through
    export.runtime (which the CLI, unlike taichu/, may import)."""
    from taichu.retrieval import EXPORT_BACKENDS, Embedder

    if args.backend in EXPORT_BACKENDS:
        from export.runtime_encoders import export_embedder

        return export_embedder(args.model, args.backend, batch_size)
    return Embedder(args.model, args.backend, batch_size)


def cmd_embed(args) -> int:
    """Embed images or captions with an image-text or tri-modal model, or audio with a
    tri-modal model (its shared space) or a wav2vec2 model (utterance embeddings): OUT.npy +
    OUT.jsonl (what each row is)."""
    import json

    import numpy as np

    from taichu.fileio import atomic_write, atomic_write_bytes
    from taichu.retrieval import list_images, read_captions

    out = Path(args.out)
    if out.suffix != ".npy":
        raise ValueError(f"--out {out}: must end in .npy (the row list goes beside it as .jsonl)")
    if args.audio and load_config(args.model).family == "wav2vec2":
        return _embed_audio(args, out)
    # Read and check every input before loading the model: a bad caption line or audio file
    # fails fast.
    if args.images:
        images = list_images(args.images)
    elif args.audio:
        names, audios = _shared_space_audio(args)
    else:
        texts = read_captions(args.texts)
    embedder = _embedder(args, args.batch_size)
    if args.images:
        vectors = embedder.embed_images(images)  # a non-image file raises here: nothing is written
        rows = [{"row": i, "image": str(path)} for i, path in enumerate(images)]
    elif args.audio:
        vectors = embedder.embed_audio(audios, names=names)
        rows = [{"row": i, "audio": name, "seconds": round(len(a) / 16000, 3)}
                for i, (name, a) in enumerate(zip(names, audios))]
    else:
        vectors = embedder.embed_texts(texts)
        rows = [{"row": i, "text": text} for i, text in enumerate(texts)]
    sidecar = out.with_suffix(".jsonl")
    atomic_write_bytes(sidecar, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    atomic_write(out, lambda handle: np.save(handle, vectors, allow_pickle=False))
    print(f"wrote {out} (float32 {list(vectors.shape)}, L2-normalised, {args.backend}) and {sidecar}")
    return 0


def _shared_space_audio(args, paths=None) -> tuple[list[str], list]:
    """Audio files for a tri-modal model's speech tower, read and checked (silence, length)
    before the model loads; a model without one is refused first."""
    from taichu.trimodal_data import load_clips, require_speech

    config = load_config(args.model)
    require_speech(config, args.model)
    names, audios = _read_audio_files(args.audio if paths is None else paths)
    return load_clips(audios, config, names)


def _speech_runner(args, batch_size: int = 8):
    """A taichu.recognition.SpeechRunner of args.model in args.backend; an export's graphs
    run through export.runtime (which the CLI, unlike taichu/, may import)."""
    from taichu.recognition import SpeechRunner

    network = None
    if args.backend in ("onnx", "mindir"):
        from export.runtime_encoders import speech_network

        network = speech_network(args.model, args.backend)
    return SpeechRunner(args.model, args.backend, batch_size, network=network)


def _read_audio_files(paths) -> tuple[list[str], list]:
    """Every file read (and resampled to 16 kHz mono) before a model is loaded: a bad file
    fails fast, naming itself."""
    from taichu.speech import load_audio

    names = [str(p) for p in paths]
    return names, [load_audio(p) for p in names]


def _embed_audio(args, out: Path) -> int:
    import json

    import numpy as np

    from taichu.fileio import atomic_write, atomic_write_bytes

    names, audios = _read_audio_files(args.audio)
    runner = _speech_runner(args, args.batch_size)
    runner.check(audios, names)
    vectors = runner.embed(audios)
    rows = [{"row": i, "audio": name, "seconds": round(len(a) / 16000, 3)}
            for i, (name, a) in enumerate(zip(names, audios))]
    sidecar = out.with_suffix(".jsonl")
    atomic_write_bytes(sidecar, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    atomic_write(out, lambda handle: np.save(handle, vectors, allow_pickle=False))
    print(f"wrote {out} (float32 {list(vectors.shape)}, mean of the last hidden states over "
          f"real frames, {args.backend}) and {sidecar}")
    return 0


def cmd_transcribe(args) -> int:
    """Greedy CTC transcripts (tone-numbered pinyin) of audio files, one line per file."""
    names, audios = _read_audio_files(args.audio)
    runner = _speech_runner(args, args.batch_size)
    runner.check(audios, names)
    for name, text in zip(names, runner.transcribe(audios)):
        print(f"{name}\t{text}")
    return 0


def _eval_speech(args) -> int:
    """Syllable / character error rates of a CTC model on held-out clips: the model's own
    test sentences (seen voices) and held-out voice, or a .jsonl of {audio, text|pinyin}."""
    import json

    from taichu.fileio import atomic_write_bytes
    from taichu.recognition import evaluate_clips
    from taichu.speech import load_speech_data, read_jsonl

    runner = _speech_runner(args, args.batch_size)
    if args.data:
        sets = {Path(args.data).stem: read_jsonl(args.data)}
    else:
        data = load_speech_data(runner.config.data)
        split = {"test": "test", "train": "train", "all": "test"}[args.split]
        sets = {f"{split} (seen voices)": getattr(data, split)}
        if data.held_out_voice and args.split != "train":
            sets[f"held-out voice {runner.config.data.held_out_voice}"] = data.held_out_voice
    results = {}
    for name, clips in sets.items():
        rates = evaluate_clips(runner, clips)
        results[name] = rates
        print(f"{name}: {rates['utterances']} clips, syllable error rate "
              f"{rates['syllable_error_rate']:.1%}, character error rate "
              f"{rates['character_error_rate']:.1%} ({args.backend})")
        for example in rates["examples"][:2]:
            print(f"    ref {example['reference']}\n    hyp {example['hypothesis']}")
    if args.out:
        atomic_write_bytes(args.out, (json.dumps(results, ensure_ascii=False, indent=2) + "\n").encode())
        print(f"wrote {args.out}")
    return 0


def cmd_index(args) -> int:
    """Embed images, captions or audio and save them as a searchable index directory."""
    from taichu.retrieval import build_index, list_images, read_captions

    images = list_images(args.images) if args.images else None
    texts = read_captions(args.texts) if args.texts else None
    audio = None
    if args.audio:
        _shared_space_audio(args)   # every file checked before the model loads
        audio = [Path(p) for p in args.audio]
    embedder = _embedder(args, args.batch_size)
    index = build_index(embedder, images=images, texts=texts, audio=audio, backend=args.index_backend)
    index.save(args.out)
    what = "images" if images is not None else "audio clips" if audio is not None else "captions"
    print(f"wrote {args.out}: {len(index)} {what}, {index.dim}-d ({index.backend} search)")
    return 0


def cmd_search(args) -> int:
    """Rank the items of an index (images, captions or audio) against a caption, an image or
    a spoken query (audio needs a tri-modal model)."""
    from taichu.retrieval import VectorIndex, check_index_model

    index = VectorIndex.load(args.index, backend=args.index_backend)
    if args.audio is not None:
        names, audios = _shared_space_audio(args, [args.audio])
    embedder = _embedder(args)
    check_index_model(index, embedder)
    if args.text is not None:
        query, what = embedder.embed_texts([args.text]), f"text {args.text!r}"
    elif args.audio is not None:
        query, what = embedder.embed_audio(audios, names=names), f"audio {args.audio}"
    else:
        query, what = embedder.embed_images([args.image]), f"image {args.image}"
    scores, ids = index.search(query, args.k)
    modality = index.metadata.get("modality", "item")
    plural = {"image": "images", "text": "texts", "audio": "audio clips"}.get(modality, f"{modality}s")
    print(f"{what} -> top {ids.shape[1]} of {len(index)} {plural} in {args.index} "
          f"({index.backend} search, cosine similarity)")
    for rank, (score, i) in enumerate(zip(scores[0], ids[0]), start=1):
        item = index.items[i]
        shown = (next((item[key] for key in ("image", "text", "audio") if key in item), item)
                 if isinstance(item, dict) else item)
        print(f"{rank:>3}  {score:+.4f}  {shown}")
    return 0


def cmd_eval(args) -> int:
    """Recall@1/5 both ways (and zero-shot digit accuracy) on the model's held-out split; all
    six directions for a tri-modal model; an m6 model: taichu.cli_m6.cmd_eval."""
    import json

    from taichu.cli_m6 import cmd_eval as eval_m6, is_m6
    from taichu.fileio import atomic_write_bytes
    from taichu.retrieval import evaluate

    if is_m6(args.model):       # captions and answers (taichu.cli_m6), a directory or an export
        return eval_m6(args, _export_runtime)
    family = load_config(args.model).family
    if family == "wav2vec2":
        return _eval_speech(args)
    if family == "gpt_classifier":      # accuracy, macro-F1, confusion (taichu.cli_text)
        from taichu.cli_text import cmd_eval as eval_classifier

        return eval_classifier(args, _export_runtime)
    if family in ("gpt", "gpt_xl"):     # perplexity over long held-out documents (taichu.xl_eval)
        from taichu.xl_eval import evaluate_model, write_json

        table = evaluate_model(args.model, args.backend, args.context, args.memory, args.document_tokens,
                               data=args.data, split=args.split, limit=args.documents, log=print)
        print("\n".join(table.lines()))
        if args.out:
            write_json(table, args.out)
            print(f"wrote {args.out}")
        return 0
    if family == "trimodal":
        from taichu.trimodal_eval import evaluate_trimodal

        metrics = evaluate_trimodal(_embedder(args, args.batch_size), data=args.data, split=args.split)
    else:
        metrics = evaluate(_embedder(args, args.batch_size), data=args.data, split=args.split)
    for line in metrics.lines():
        print(line)
    if args.out:
        text = json.dumps(metrics.values, ensure_ascii=False, indent=2) + "\n"
        atomic_write_bytes(args.out, text.encode("utf-8"))
        print(f"wrote {args.out}")
    return 0


def _add_embed_inputs(parser: argparse.ArgumentParser, model_help: str, audio_help: str) -> None:
    """MODEL and what to embed, for `taichu embed` and `taichu index` (images, texts or audio)."""
    parser.add_argument("model", help=model_help)
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--images", nargs="+", metavar="DIR_OR_FILE",
                        help="image files, or directories (image files found recursively)")
    inputs.add_argument("--texts", metavar="FILE", help="UTF-8 file, one caption per line")
    inputs.add_argument("--audio", nargs="+", metavar="FILE", help=audio_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taichu", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="family, sizes and parameter count of a config or model")
    _add_config_args(info, "PATH_OR_CONFIG")
    info.set_defaults(func=cmd_info)

    tokenizer = commands.add_parser("tokenizer", help="SentencePiece tokenizer commands")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True)
    train = tokenizer_commands.add_parser("train", help="train the config's tokenizer on its corpus")
    _add_config_args(train)
    train.add_argument("--out", required=True, help="path of the .model file to write")
    train.set_defaults(func=cmd_tokenizer_train)

    init = commands.add_parser("init", help="write a randomly initialised model directory")
    _add_config_args(init)
    init.add_argument("--backend", choices=("mindspore", "torch"), default="mindspore")
    init.add_argument("--tokenizer", help="tokenizer.model to put in the directory")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--out", required=True)
    init.set_defaults(func=cmd_init)

    train = commands.add_parser("train", help="train a model (single process, msrun or torchrun)")
    _add_run_args(train)
    train.add_argument("--init-tower", action="append", default=[], metavar="TOWER=DIR",
                       help="start one tower of a tri-modal model from a trained model directory: "
                            "image=CLIP_DIR, text=CLIP_DIR (its tokenizer too), speech=WAV2VEC2_DIR "
                            "(repeatable)")
    train.set_defaults(func=cmd_train)

    distill = commands.add_parser("distill", help="train a student from a trained teacher (TinyBERT: "
                                                  "embeddings, hidden states, attention scores, "
                                                  "predictions; the config's distill: section)")
    _add_run_args(distill)
    distill.add_argument("--teacher", required=True, help="the teacher's model directory (same family)")
    distill.set_defaults(func=cmd_distill)

    generate = commands.add_parser("generate", help="continue Chinese prompts with a model")
    generate.add_argument("model", help="model directory, or an export directory with --backend "
                                        "onnx / mindir")
    generate.add_argument("--backend", choices=("mindspore", "torch", "onnx", "mindir"), default="torch",
                          help="mindspore: compiled graphs over a static cache; mindir: the "
                               "exported graphs, mindspore without model code")
    generate.add_argument("--prompt", action="append", required=True, help="repeatable: a batch")
    generate.add_argument("--max-new-tokens", type=int, default=50)
    generate.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--repetition-penalty", type=float, default=1.0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--min-new-tokens", type=int, default=0,
                          help="no end of text before this many new tokens (default 0)")
    generate.add_argument("--num-return", type=int, default=1, help="samples per prompt")
    generate.add_argument("--image", help="an image the prompts are about (m6 models: image-conditioned text)")
    generate.add_argument("--memory", type=int, metavar="N",
                          help="gpt_xl models: positions of segment memory each new token sees besides "
                               "itself (default model.mem_len + data.seq_len - 1, the longest context "
                               "training showed); a gpt_xl has no window, --max-new-tokens has no limit")
    generate.set_defaults(func=cmd_generate)

    export = commands.add_parser("export", help="export a model to ONNX or MINDIR, validated "
                                                "against its source framework")
    export.add_argument("model", help="model directory")
    export.add_argument("--format", choices=("onnx", "mindir"), required=True,
                        help="onnx (from torch_impl, onnxruntime) or mindir (from mindspore_impl)")
    export.add_argument("--out", required=True, help="directory to write (replaced only once valid)")
    export.add_argument("--opset", type=int, help="ONNX opset (default 18, the minimum)")
    export.add_argument("--quantize", choices=("int8",), help="also write model_int8.onnx")
    export.add_argument("--no-validate", action="store_true",
                        help="skip running the export against its source model")
    export.set_defaults(func=cmd_export)

    convert = commands.add_parser("convert", help="convert weights between taichu, MindSpore, "
                                                  "PyTorch and Hugging Face formats")
    convert.add_argument("src", help="model directory, .ckpt, .safetensors, HF directory (.pt/.bin "
                                     "with --allow-pickle)")
    convert.add_argument("dst")
    convert.add_argument("--to", choices=("taichu", "mindspore", "torch", "hf"),
                         help="output format (default: from DST's extension, else taichu)")
    convert.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="cast floating tensors")
    convert.add_argument("--config", help="config for sources that carry none (.ckpt, state dicts)")
    convert.add_argument("--allow-pickle", action="store_true",
                         help="read .pt/.bin pickles (torch.load with weights_only=True)")
    convert.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    convert.add_argument("--strict", action="store_true",
                         help="exit 1 when the tokenizer cannot be carried into DST (hf, taichu); "
                              "the weights are written anyway")
    convert.set_defaults(func=cmd_convert)

    plot = commands.add_parser("plot", help="draw the loss curves of runs to a PNG")
    plot.add_argument("runs", nargs="+", help="run directories (with metrics.jsonl)")
    plot.add_argument("--out", default="loss.png")
    plot.set_defaults(func=cmd_plot)

    parity = commands.add_parser("parity", help="compare MindSpore and PyTorch logits of a model")
    parity.add_argument("model", help="model directory")
    parity.add_argument("--text", action="append", help="text to run (default: validation corpus)")
    parity.add_argument("--batch", type=int, default=4, help="validation texts to use")
    parity.add_argument("--max-length", type=int, default=128)
    parity.add_argument("--graph", action="store_true", help="MindSpore graph mode (default PyNative)")
    parity.add_argument("--tolerance", type=float, default=1e-5)
    parity.set_defaults(func=cmd_parity)

    embed_backends = ("torch", "mindspore", "onnx", "mindir")
    image_text_model = ("image-text or tri-modal model directory (clip, brivl, trimodal), or its "
                        "export with --backend onnx / mindir")
    audio_files = "audio files (wav, flac, ...; resampled to 16 kHz mono)"
    embed = commands.add_parser("embed", help="embed images, captions or speech with an image-text "
                                              "or tri-modal model (L2-normalised), or audio with a "
                                              "speech model (float32 .npy + a .jsonl of the rows)")
    _add_embed_inputs(embed, image_text_model + "; or a speech (wav2vec2) model with --audio",
                      audio_files + ": a tri-modal model embeds them in its shared space; a "
                      "speech (wav2vec2) model gives one utterance embedding each")
    embed.add_argument("--out", required=True, help="embeddings .npy (rows listed in the same name .jsonl)")
    embed.add_argument("--backend", choices=embed_backends, default="torch")
    embed.add_argument("--batch-size", type=int, default=64)
    embed.set_defaults(func=cmd_embed)

    index = commands.add_parser("index", help="build a vector index of images, captions or audio "
                                              "(tri-modal models) for taichu search")
    _add_embed_inputs(index, image_text_model, audio_files + " (a tri-modal model)")
    index.add_argument("--out", required=True, help="index directory to write (replaced atomically)")
    index.add_argument("--backend", choices=embed_backends, default="torch")
    index.add_argument("--index-backend", choices=("auto", "faiss", "numpy"), default="auto",
                       help="faiss IndexFlatIP, or the exact numpy search (auto: faiss if installed)")
    index.add_argument("--batch-size", type=int, default=64)
    index.set_defaults(func=cmd_index)

    search = commands.add_parser("search", help="search an index (taichu index) with a caption, "
                                                "an image or a spoken query (tri-modal models)")
    search.add_argument("model", help="the model the index was built with (directory, or its "
                                         "export with --backend onnx / mindir)")
    search.add_argument("--index", required=True, help="index directory")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="caption to search with (text -> images, texts or audio)")
    query.add_argument("--image", help="image file to search with (image -> texts, or images)")
    query.add_argument("--audio", help="audio file to search with, a tri-modal model (speech -> "
                                       "images, texts or audio)")
    search.add_argument("-k", type=int, default=5, help="results to show")
    search.add_argument("--backend", choices=embed_backends, default="torch")
    search.add_argument("--index-backend", choices=("auto", "faiss", "numpy"), default="auto")
    search.set_defaults(func=cmd_search)

    evaluation = commands.add_parser("eval", help="Recall@1/5 text->image and image->text (and "
                                                  "zero-shot digits) on the held-out split; all six "
                                                  "directions of a tri-modal model; an m6 model's "
                                                  "captions and answers on held-out scenes; a gpt / "
                                                  "gpt_xl model's perplexity on long held-out documents; "
                                                  "a gpt_classifier's accuracy and macro-F1")
    evaluation.add_argument("model", help=image_text_model + "; or a CTC speech (wav2vec2) model: "
                                                            "syllable and character error rates; or an "
                                                            "m6 model (or its export): captions, answers "
                                                            "and drawn images of its held-out scenes; or a "
                                                            "gpt_xl / gpt model directory: perplexity per "
                                                            "context and memory length (taichu.xl_eval); "
                                                            "or a gpt_classifier (or its ONNX export): "
                                                            "accuracy, macro-F1, per-label scores and the "
                                                            "confusion matrix (taichu.cli_text)")
    evaluation.add_argument("--backend", choices=embed_backends, default="torch")
    evaluation.add_argument("--data", help="digits, scenes or a .jsonl (default: the model "
                                           "config's data.source; speech: its held-out sentences "
                                           "and held-out voice, or a .jsonl of {audio, text|pinyin}; "
                                           "tri-modal: its test split with the captions spoken by "
                                           "the held-out voice, or a .jsonl of {image, text, audio}; "
                                           "gpt / gpt_xl: a .txt or .jsonl of text in place of "
                                           "data.corpus, split as it (--split all: all of it); "
                                           "gpt_classifier: reviews or a .jsonl of {text, label}, all of it)")
    evaluation.add_argument("--split", choices=("test", "train", "all"), default="test",
                            help="test = the held-out split training did not see")
    evaluation.add_argument("--out", help="also write the metrics as JSON")
    evaluation.add_argument("--batch-size", type=int, default=64)
    evaluation.add_argument("--context", type=int, action="append", metavar="L",
                            help="gpt / gpt_xl: an evaluation context length, repeatable (default: "
                                 "data.seq_len / 2, seq_len, 2 seq_len; a gpt: at most its window)")
    evaluation.add_argument("--memory", type=int, action="append", metavar="M",
                            help="gpt_xl: a memory length, repeatable (default 0, model.mem_len, "
                                 "2 mem_len); a gpt has none")
    evaluation.add_argument("--document-tokens", type=int, default=2048, metavar="D",
                            help="gpt / gpt_xl: predicted tokens per held-out document (default 2048)")
    evaluation.add_argument("--documents", type=int, metavar="N",
                            help="gpt / gpt_xl: score the first N documents only (default all)")
    evaluation.set_defaults(func=cmd_eval)     # and the m6 options: taichu.cli_m6.add_eval_arguments

    transcribe = commands.add_parser("transcribe", help="transcribe audio files to tone-numbered "
                                                        "pinyin with a CTC speech model")
    transcribe.add_argument("model", help="speech model directory (wav2vec2, head ctc), or its "
                                          "export with --backend onnx / mindir")
    transcribe.add_argument("audio", nargs="+", help="audio files (wav, flac, ...; any rate, "
                                                     "any channels: resampled to 16 kHz mono)")
    transcribe.add_argument("--backend", choices=embed_backends, default="torch")
    transcribe.add_argument("--batch-size", type=int, default=8)
    transcribe.set_defaults(func=cmd_transcribe)
    from taichu.cli_imagine import add_commands as add_imagine_commands
    from taichu.cli_m6 import add_commands as add_m6_commands
    from taichu.cli_text import add_commands as add_text_commands
    from taichu.cli_vision import add_commands as add_vision_commands
    from taichu.fewshot import add_command as add_fewshot_command

    add_vision_commands(commands, _export_runtime)
    add_imagine_commands(commands, _export_runtime)
    add_m6_commands(commands, _export_runtime)
    add_text_commands(commands, _export_runtime)
    add_fewshot_command(commands)
    return parser


def _export_runtime():
    """The export package (its runtimes by name, loaded on first use: export.m6_network,
    export.vision_network, ...), imported when a command runs an export: the command modules
    split out of this file (taichu/cli_*.py) get it from here, so the CLI stays the one part
    of taichu/ that imports export/."""
    import export

    return export


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Positionals after an option (`taichu classify DIR --backend onnx "text" ...`): the
        # command's own parser reads its arguments intermixed, as users type them (argparse's
        # top level cannot, with subcommands). Anything it does not know is still refused.
        command = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices[args.command]
        try:
            args = command.parse_intermixed_args(argv[argv.index(args.command) + 1:],
                                                 argparse.Namespace(command=args.command))
        except TypeError:   # a command with subcommands of its own (tokenizer train): not intermixed
            command.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, NotImplementedError) as err:
        print(f"taichu {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The vision family's commands (registered by taichu.cli): ``taichu probe`` (linear probe and
k-NN on frozen features), ``taichu attention`` (the teacher's CLS attention and the mask it
draws, as a picture) and ``taichu segment`` (fine-tuning for per-pixel classes, mIoU)."""
from __future__ import annotations

import json
from pathlib import Path


def cmd_probe(args) -> int:
    """Frozen features of the labelled images' train and held-out splits (the model config's
    split), a linear probe and DINO's k-NN, accuracy beside chance."""
    from taichu.fileio import atomic_write_bytes
    from taichu.probe import knn_accuracy, linear_probe
    from taichu.vision_data import load_images
    from taichu.vision_tasks import VisionRunner

    network = None
    if args.backend in ("onnx", "mindir"):
        network = args.export_runtime().vision_network(args.model, args.backend)
    runner = VisionRunner(args.model, args.backend, args.batch_size, args.encoder, network=network)
    data = runner.config.data
    images = load_images(args.data, data.validation_fraction, data.split_seed, scene_count=data.scene_count,
                         scene_seed=data.scene_seed)
    unlabelled = [p.key for p in images.train + images.test if p.label is None]
    if unlabelled:
        raise ValueError(f"{args.data}: {len(unlabelled)} image(s) without a label (e.g. {unlabelled[0]}); "
                         "a probe needs labelled images (digits, or a .jsonl with 'label')")
    split = {}
    for name, pairs in (("train", images.train), ("test", images.test)):
        features, _ = runner.run([p.load() for p in pairs])
        split[name] = features, [p.label for p in pairs]
    classes = len({label for _, labels in split.values() for label in labels})
    result = {"model": str(args.model), "encoder": runner.encoder_name, "data": str(args.data),
              "train_images": len(images.train), "test_images": len(images.test), "classes": classes,
              "chance": 1.0 / classes,
              "linear_probe": linear_probe(*split["train"], *split["test"]),
              "knn": knn_accuracy(*split["train"], *split["test"], k=args.k)}
    print(f"{args.data}: {len(images.train)} train / {len(images.test)} held-out images, {classes} classes, "
          f"{runner.encoder_name} features ({args.backend})")
    print(f"linear probe accuracy {100 * result['linear_probe']:.1f} %   k-NN (k={args.k}) "
          f"{100 * result['knn']:.1f} %   chance {100 * result['chance']:.1f} %")
    if args.out:
        atomic_write_bytes(Path(args.out), json.dumps(result, indent=1).encode())
    return 0


def cmd_attention(args) -> int:
    """One picture per image: the image, the teacher's CLS attention over it, and the mask
    the model's rule draws (seeded)."""
    from taichu.images import load_image
    from taichu.vision_tasks import VisionRunner, attention_picture

    runner = VisionRunner(args.model, args.backend, encoder=args.encoder)
    images = [load_image(path) for path in args.images]
    _, attention = runner.run(images)
    masks = runner.masks(attention, seed=args.seed, mask=args.mask)
    out = Path(args.out)
    single = len(images) == 1 and out.suffix.lower() == ".png"
    if not single:
        out.mkdir(parents=True, exist_ok=True)
    for path, image, attn, mask in zip(args.images, images, attention, masks):
        target = out if single else out / f"{Path(path).stem}-attention.png"
        attention_picture(image, attn, mask, size=args.size).save(target)
        print(f"{target}: {int(mask.sum())} of {mask.size} patches masked ({args.mask or runner.config.model.masking.mask})")
    return 0


def cmd_segment(args) -> int:
    """A pretrained vision model: fine-tune it (or, --scratch, the same model from random
    weights) for per-pixel shape classes on drawn scenes, then evaluate. A segmentation
    model: evaluate it. Evaluation: mIoU on the held-out scenes, beside "background
    everywhere"; --picture draws scenes, truth and prediction."""
    from taichu.config import load_config
    from taichu.fileio import atomic_write_bytes
    from taichu.vision_tasks import evaluate_segmentation, segmentation_config, segmentation_picture

    model_dir = Path(args.model)
    base = load_config(model_dir)
    if base.family == "vision" and base.model.objective == "segmentation":
        if args.scratch or args.overrides:
            raise ValueError(f"{model_dir} is already a segmentation model: it is evaluated as it is "
                             "(--scratch and --set apply to fine-tuning a pretrained model)")
        evaluated = model_dir
    else:
        if not args.out:
            raise ValueError(f"{model_dir} is a pretrained model: --out DIR says where the fine-tuned "
                             "segmentation model goes")
        from taichu.train import run_training

        config = segmentation_config(base, args.overrides, source=f"taichu segment {model_dir}")
        init = None if args.scratch else model_dir
        print(f"fine-tuning {'a random model of the shape of ' if args.scratch else ''}{model_dir} for "
              f"{len(config.model.segmentation.classes)} per-pixel classes on {config.data.source}, "
              f"{config.train.max_steps} steps ({args.backend})")
        evaluated = run_training(config, args.backend, args.out, init_dir=init,
                                 progress=not args.no_progress).final_dir
    result = evaluate_segmentation(evaluated, args.backend, count=args.scenes)
    examples = result.pop("examples")
    iou, base_iou = result["iou"], result["background_everywhere"]["iou"]
    per_class = "  ".join(f"{name} {100 * value:.1f}" for name, value in zip(result["classes"], iou["per_class"]))
    print(f"{evaluated}: {result['scenes']} held-out scenes, IoU (%) {per_class}")
    print(f"mIoU {100 * iou['mean']:.1f} %, pixel accuracy {100 * result['pixel_accuracy']:.1f} %   "
          f"(background everywhere: mIoU {100 * base_iou['mean']:.1f} %, pixel accuracy "
          f"{100 * result['background_everywhere']['pixel_accuracy']:.1f} %)")
    out_json = Path(args.json) if args.json else (Path(args.out) / "segmentation.json" if args.out else None)
    if out_json is not None:
        atomic_write_bytes(out_json, json.dumps(result, indent=1, ensure_ascii=False).encode())
    if args.picture:
        segmentation_picture(examples).save(args.picture)
        print(f"{args.picture}: scene | true classes | predicted classes, {len(examples)} held-out scenes")
    return 0


def add_commands(commands, export_runtime) -> None:
    """Register the commands; ``export_runtime()`` returns the export package (taichu.cli hands it
    in: the CLI is the one part of taichu/ that imports export/)."""
    backends = ("torch", "mindspore")
    probe = commands.add_parser("probe", help="linear probe and k-NN accuracy of a vision model's frozen "
                                              "features on labelled images")
    probe.add_argument("model", help="vision model directory (MST pretraining or backbone), or its export "
                                     "with --backend onnx / mindir")
    probe.add_argument("--data", default="digits", help="digits, or a .jsonl of {image, label} lines")
    probe.add_argument("--backend", choices=(*backends, "onnx", "mindir"), default="torch")
    probe.add_argument("--encoder", choices=("teacher", "student"), default="teacher",
                       help="an MST model's teacher (default, as DINO evaluates) or student backbone")
    probe.add_argument("--k", type=int, default=20, help="neighbours of the k-NN vote (DINO: 20)")
    probe.add_argument("--batch-size", type=int, default=64)
    probe.add_argument("--out", help="also write the accuracies as JSON")
    probe.set_defaults(func=cmd_probe, export_runtime=export_runtime)

    attention = commands.add_parser("attention", help="draw a vision model's CLS attention and the mask it "
                                                      "draws over images")
    attention.add_argument("model", help="vision model directory")
    attention.add_argument("images", nargs="+", help="image files (any size and mode)")
    attention.add_argument("--out", required=True, help="a .png for one image, else a folder")
    attention.add_argument("--backend", choices=backends, default="torch")
    attention.add_argument("--encoder", choices=("teacher", "student"), default="teacher")
    attention.add_argument("--mask", choices=("guided", "random", "none"),
                           help="masking rule (default: the model config's)")
    attention.add_argument("--seed", type=int, default=0, help="seed of the masking noise")
    attention.add_argument("--size", type=int, default=224, help="side of each panel in pixels")
    attention.set_defaults(func=cmd_attention)

    segment = commands.add_parser("segment", help="fine-tune a pretrained vision model for per-pixel shape "
                                                  "classes on drawn scenes and report mIoU (or evaluate a "
                                                  "segmentation model)")
    segment.add_argument("model", help="pretrained vision model directory (fine-tuned), or a segmentation "
                                       "model directory (evaluated)")
    segment.add_argument("--out", help="where the fine-tuned model goes (a training run directory)")
    segment.add_argument("--backend", choices=backends, default="torch")
    segment.add_argument("--scratch", action="store_true",
                         help="train the same segmentation model from random weights (the baseline)")
    segment.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="change the recipe (taichu.vision_tasks.SEGMENT_RECIPE), e.g. train.max_steps=600")
    segment.add_argument("--scenes", type=int, help="evaluate on the first N held-out scenes (default all)")
    segment.add_argument("--picture", help="write a .png of held-out scenes, true and predicted classes")
    segment.add_argument("--json", help="write the scores as JSON (default <out>/segmentation.json)")
    segment.add_argument("--no-progress", action="store_true")
    segment.set_defaults(func=cmd_segment)

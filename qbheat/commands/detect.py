"""``qbheat detect``: the light detector on a frozen backbone, scored with COCO mAP.

    qbheat detect make-data --out runs/fm_canvas                 # Fashion-MNIST canvases in COCO layout
    qbheat detect train --checkpoint last.pt --data runs/fm_canvas --save-head det.pt --out det.json
    qbheat detect eval  --checkpoint det.pt --data runs/fm_canvas --split test

``train`` caches the frozen backbone's stride-8/16/32 features of the train and val splits, trains
one detector head per learning rate, keeps the one with the best val mAP and scores the test split
once. ``--data fashion-mnist`` writes (or reuses) the canvas set under ``--canvas-root`` first.
The saved "detector" checkpoint is what ``qbheat-export export --checkpoint`` ships.
"""
from __future__ import annotations

import argparse
import time

DEFAULT_CANVAS_ROOT = "runs/fashion_mnist_canvas"  # runs/ is git-ignored


def _sizes(p: argparse.ArgumentParser, train: int, val: int, test: int) -> None:
    p.add_argument("--train-size", type=int, default=train, help=f"training canvases (default {train})")
    p.add_argument("--val-size", type=int, default=val, help=f"val canvases, for choosing the learning rate (default {val})")
    p.add_argument("--test-size", type=int, default=test, help=f"test canvases (default {test})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    mk = sub.add_parser("make-data", help="write Fashion-MNIST canvases (COCO format)")
    mk.add_argument("--out", default=DEFAULT_CANVAS_ROOT, help=f"root folder (default {DEFAULT_CANVAS_ROOT})")
    _sizes(mk, 2000, 500, 1000)
    mk.add_argument("--canvas-size", type=int, default=96, help="canvas side in px (default 96)")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--no-progress", action="store_true")

    tr = sub.add_parser("train", help="train the detector head on frozen features; val chooses the lr")
    src = tr.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="FILE", help="qbheat checkpoint whose backbone is used")
    src.add_argument("--model", metavar="NAME", help="timm model at random initialisation (reference)")
    tr.add_argument("--data", default="fashion-mnist", help="COCO folder (annotations/instances_<split>.json) or 'fashion-mnist'")
    tr.add_argument("--canvas-root", default=DEFAULT_CANVAS_ROOT, help="where --data fashion-mnist writes its canvases")
    _sizes(tr, 2000, 500, 1000)
    tr.add_argument("--image-size", type=int, default=None, help="detector input size (default: the canvas size)")
    tr.add_argument("--epochs", type=int, default=None, help="training epochs (default 12)")
    tr.add_argument("--lr", type=float, action="append", help="AdamW learning rate to try (repeatable; default 1e-3 and 3e-3)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    tr.add_argument("--out", metavar="JSON", help="write the results here")
    tr.add_argument("--save-head", metavar="FILE", help="write a 'detector' checkpoint")
    tr.add_argument("--no-progress", action="store_true")

    ev = sub.add_parser("eval", help="COCO mAP of a saved detector checkpoint")
    ev.add_argument("--checkpoint", required=True, metavar="FILE", help="'detector' checkpoint from 'qbheat detect train'")
    ev.add_argument("--data", required=True, help="COCO folder")
    ev.add_argument("--split", default="test", help="split to score (default test)")
    ev.add_argument("--limit", type=int, default=None, help="score only the first N images")
    ev.add_argument("--threads", type=int, default=None)
    ev.add_argument("--out", metavar="JSON", help="write the results here")
    ev.add_argument("--no-progress", action="store_true")


def _positive(args: argparse.Namespace, *names: str) -> None:
    from qbheat.errors import QBHeatError

    for name in names:
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise QBHeatError(f"--{name.replace('_', '-')} must be ≥ 1, not {v}.")


def _make_data(args: argparse.Namespace) -> int:
    from qbheat.data.detection_canvas import CanvasConfig, write_coco

    _positive(args, "train_size", "val_size", "test_size")
    cfg = CanvasConfig(canvas_size=args.canvas_size, seed=args.seed)
    for split, n in (("train", args.train_size), ("val", args.val_size), ("test", args.test_size)):
        path = write_coco(args.out, split, n, cfg, progress=not args.no_progress)
        print(f"{split}: {n} canvases, {path}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import torch

    from qbheat.checkpoint import save_checkpoint
    from qbheat.errors import QBHeatError
    from qbheat.evaluation.detection import DetectionConfig, load_coco_split, run_detection
    from qbheat.evaluation.features import ProbePreprocessing
    from qbheat.evaluation.sources import load_backbone, probe_payload, write_json

    _positive(args, "train_size", "val_size", "test_size", "image_size", "epochs", "threads")
    if args.lr and min(args.lr) <= 0:
        raise QBHeatError(f"--lr must be > 0, not {min(args.lr)}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    t0 = time.perf_counter()
    root = args.data
    if args.data == "fashion-mnist":
        from qbheat.data.detection_canvas import write_coco

        root = args.canvas_root
        for split, n in (("train", args.train_size), ("val", args.val_size), ("test", args.test_size)):
            write_coco(root, split, n, progress=progress)
    train = load_coco_split(root, "train", args.train_size)
    val = load_coco_split(root, "val", args.val_size)
    test = load_coco_split(root, "test", args.test_size)
    source = load_backbone(args.checkpoint, args.model, seed=args.seed)
    size = args.image_size or int(train.images.shape[1])
    base = ProbePreprocessing.from_dict(source.preprocessing) if source.preprocessing else ProbePreprocessing()
    pre = ProbePreprocessing(input_size=(3, size, size), mean=base.mean, std=base.std, interpolation=base.interpolation)
    cfg = DetectionConfig(seed=args.seed, **({"epochs": args.epochs} if args.epochs else {}),
                          **({"lrs": tuple(args.lr)} if args.lr else {}))
    res = run_detection(source.backbone, train, val, test, pre, cfg, progress)
    results = {
        "task": "detection", "source": source.info,
        "data": {"root": str(root), "train_images": len(train), "val_images": len(val), "test_images": len(test),
                 "classes": train.class_names},
        "preprocessing": pre.to_dict(),
        "metrics": {f"test_{k}": v for k, v in res.test.items()},
        "details": res.summary(),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    print(f"chosen lr {res.lr:g} (val mAP {100 * res.val['mAP']:.2f}); test mAP {100 * res.test['mAP']:.2f}, "
          f"AP50 {100 * res.test['AP50']:.2f}")
    if args.out:
        write_json(args.out, results)
        print(f"results: {args.out}")
    if args.save_head:
        save_checkpoint(args.save_head, probe_payload(source, "detector", res.head, train.class_names, pre, results))
        print(f"detector checkpoint: {args.save_head}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from qbheat.checkpoint import build_backbone, load_checkpoint
    from qbheat.evaluation.detection import evaluate_detector, extract_multiscale, load_coco_split
    from qbheat.evaluation.features import ProbePreprocessing
    from qbheat.evaluation.sources import write_json
    from qbheat.heads import head_from_spec

    _positive(args, "limit", "threads")
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.checkpoint, kinds=("detector",))
    backbone = build_backbone(ckpt)
    head = head_from_spec(ckpt["head"])
    pre = ProbePreprocessing.from_dict(ckpt["preprocessing"])
    split = load_coco_split(args.data, args.split, args.limit)
    feats = extract_multiscale(backbone, split.images, pre, tuple(head.strides), progress=not args.no_progress)
    metrics = evaluate_detector(head, feats, split, pre.input_size[1])
    print(f"{args.split}: mAP {100 * metrics['mAP']:.2f}, AP50 {100 * metrics['AP50']:.2f}, AP75 {100 * metrics['AP75']:.2f}")
    if args.out:
        write_json(args.out, {"task": "detection", "checkpoint": args.checkpoint, "split": args.split,
                              "images": len(split), "metrics": metrics})
    return 0


def run(args: argparse.Namespace) -> int:
    return {"make-data": _make_data, "train": _train, "eval": _eval}[args.action](args)

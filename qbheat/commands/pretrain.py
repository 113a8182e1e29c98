"""``qbheat pretrain``: self-supervised pre-training with QB-Heat or MoCo-v2, plus MSBReg and HSSL.

Settings come from ``qbheat.config.PretrainConfig`` defaults, then ``--config FILE.yaml``, then
the flags below, then ``--set KEY=VALUE`` (dotted keys reach method sections, e.g.
``--set qbheat.decoder_dim=64``). Under ``torchrun --nproc-per-node N`` the same command trains
with DDP (NCCL on GPUs, gloo on CPUs); ``--batch-size`` is the global batch.

Examples:
    qbheat pretrain --config qbheat/configs/qbheat_fashion_mnist_micro.yaml
    qbheat pretrain --method mocov2 --model resnet10t --data /data/imagenet --image-size 224 --epochs 200
    qbheat pretrain --method mocov2 --regularizer msbreg --data fashion-mnist ...   # MoCo-v2 + MSBReg
    qbheat pretrain --method qbheat --hssl --data fashion-mnist ...                 # QB-Heat + HSSL
    torchrun --nproc-per-node 8 -m qbheat.cli pretrain --config my.yaml --resume auto
"""
from __future__ import annotations

import argparse

# flag → config key; None defaults mean "not given" so YAML values survive
_FLAGS = [
    ("--method", "method", str, "pre-training method: qbheat (default) or mocov2"),
    ("--model", "model", str, "timm backbone name (default mobileformer_294m)"),
    ("--data", "data", str, "ImageFolder path, 'fashion-mnist' or 'synthetic'"),
    ("--image-size", "image_size", int, "training resolution (default 224)"),
    ("--batch-size", "batch_size", int, "global batch over all processes (default 256, MoCo v2's)"),
    ("--steps", "steps", int, "optimizer steps (wins over --epochs)"),
    ("--epochs", "epochs", float, "passes over the data (default 200)"),
    ("--stop-after", "stop_after", int, "end this invocation after this global step; the schedule still spans --steps"),
    ("--optimizer", "optimizer", str, "adamw or sgd (default: the method's recipe)"),
    ("--lr", "lr", float, "absolute learning rate (default: recipe base lr × batch/256)"),
    ("--weight-decay", "weight_decay", float, "weight decay (default: the method's recipe)"),
    ("--warmup-fraction", "warmup_fraction", float, "share of steps in linear warm-up"),
    ("--grad-clip", "grad_clip", float, "max gradient norm, 0 disables (default: recipe)"),
    ("--precision", "precision", str, "auto | fp32 | bf16 | fp16"),
    ("--device", "device", str, "auto | cpu | cuda"),
    ("--num-workers", "num_workers", int, "data-loader workers per process"),
    ("--seed", "seed", int, "random seed"),
    ("--log-every", "log_every", int, "steps between metric rows"),
    ("--ckpt-every", "ckpt_every", int, "steps between checkpoints"),
    ("--out-dir", "out_dir", str, "folder for last.pt, metrics.csv and tb/"),
    ("--resume", "resume", str, "checkpoint path, or 'auto' for <out-dir>/last.pt"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", help="YAML file of PretrainConfig fields")
    for flag, _, tp, text in _FLAGS:
        parser.add_argument(flag, type=tp, default=None, help=text)
    parser.add_argument("--regularizer", dest="regularizer_names", action="append", metavar="NAME",
                        help="add a regularizer to the method's loss (repeatable; replaces the YAML list): msbreg")
    parser.add_argument("--hssl", action="store_true",
                        help="add HSSL's heterogeneous auxiliary head and its momentum teacher (hssl.enabled)")
    parser.add_argument("--no-tensorboard", action="store_true", help="write metrics.csv only")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. mocov2.queue_size=4096 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")


def overrides_from_args(args: argparse.Namespace) -> dict:
    from qbheat.config import parse_assignment

    out = {key: getattr(args, key) for _, key, _, _ in _FLAGS if getattr(args, key) is not None}
    if args.regularizer_names:
        out["regularizers"] = list(args.regularizer_names)
    if args.hssl:
        out["hssl.enabled"] = True
    if args.no_tensorboard:
        out["tensorboard"] = False
    if args.no_progress:
        out["progress"] = False
    for text in args.assignments:
        k, v = parse_assignment(text)
        out[k] = v
    return out


def run(args: argparse.Namespace) -> int:
    from qbheat.config import load_config

    config = load_config(args.config, overrides_from_args(args))
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    import os

    from qbheat.train import pretrain

    path = pretrain(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"checkpoint: {path}")
    return 0

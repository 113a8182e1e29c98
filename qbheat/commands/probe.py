"""``qbheat probe``: frozen-backbone kNN, linear and non-linear probes, with a results JSON.

The backbone is a qbheat checkpoint (``--checkpoint``) or a timm model at random initialisation
(``--model``, a reference row); it stays frozen (eval mode, BatchNorm included) and its features
are extracted once. Hyper-parameters are chosen on a held-out part of the training images; the
test images are scored once. ``--save-head`` writes a "probe" checkpoint (backbone + trained head +
labels + preprocessing) that ``qbheat-export export --checkpoint`` ships.

Examples:
    qbheat probe --checkpoint runs/qbheat_fashion_mnist_micro/last.pt --protocol linear --out linear.json
    qbheat probe --model mobileformer_micro --protocol knn                        # random-init reference
    qbheat probe --checkpoint last.pt --protocol nonlinear --save-head probe.pt   # then: qbheat-export export --checkpoint probe.pt
"""
from __future__ import annotations

import argparse
import time

PROTOCOLS = ("knn", "linear", "nonlinear")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="FILE", help="qbheat checkpoint whose backbone is probed")
    src.add_argument("--model", metavar="NAME", help="timm model at random initialisation (reference)")
    parser.add_argument("--protocol", choices=PROTOCOLS, required=True,
                        help="knn (cosine, k=20/T=0.07 and k=200/T=0.1), linear (logistic regression, weight decay "
                             "chosen on a held-out split) or nonlinear (the paper's one-transformer-block probe)")
    parser.add_argument("--data", default="fashion-mnist",
                        help="'fashion-mnist' (default) or an ImageFolder root with train/ and val/ (or test/)")
    parser.add_argument("--train-size", type=int, default=10_000,
                        help="training images used (random subset; default 10000, the issue's floor setting)")
    parser.add_argument("--test-size", type=int, default=None, help="test images used (default: all)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="input size (default: the checkpoint's, else 64 for fashion-mnist and 224 otherwise)")
    parser.add_argument("--pool", choices=("pooled", "embedding"), default="pooled",
                        help="linear/kNN features: 'pooled' = mean of the last map (+ token 0), 'embedding' = timm pre-logits")
    parser.add_argument("--epochs", type=int, default=None, help="non-linear probe epochs (default 10)")
    parser.add_argument("--batch-size", type=int, default=256, help="feature-extraction batch")
    parser.add_argument("--seed", type=int, default=0, help="subset, split and initialisation seed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", metavar="JSON", help="write the results here")
    parser.add_argument("--save-head", metavar="FILE", help="write a 'probe' checkpoint (linear / nonlinear)")
    parser.add_argument("--recalibrate-bn", action="store_true",
                        help="first estimate the statistics of BatchNorm layers pre-training never updated, on the "
                             "training images (label-free); recommended before --save-head for export, where layers "
                             "left at their initial statistics make the head ill-conditioned for FP16/INT8")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    import torch

    from qbheat.errors import QBHeatError
    from qbheat.evaluation.features import extract_features
    from qbheat.evaluation.sources import (classification_data, load_backbone, probe_payload, resolve_preprocessing,
                                           write_json)

    if args.protocol == "knn" and args.save_head:
        raise QBHeatError("kNN has no trained head to save; drop --save-head or use --protocol linear/nonlinear.")
    for name in ("train_size", "test_size", "epochs", "batch_size", "image_size", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise QBHeatError(f"--{name.replace('_', '-')} must be ≥ 1, not {v}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    t0 = time.perf_counter()
    source = load_backbone(args.checkpoint, args.model, seed=args.seed)
    pre = resolve_preprocessing(source, args.data, args.image_size)
    x_tr, y_tr, classes = classification_data(args.data, "train", limit=args.train_size, seed=args.seed, preprocessing=pre)
    x_te, y_te, _ = classification_data(args.data, "test", limit=args.test_size, seed=args.seed, preprocessing=pre)
    recalibrated = []
    if args.recalibrate_bn:
        from qbheat.evaluation.features import recalibrate_untracked_batchnorm

        recalibrated = recalibrate_untracked_batchnorm(source.backbone, x_tr, pre, batch_size=args.batch_size,
                                                       progress=progress)
        print(f"BatchNorm statistics estimated for {len(recalibrated)} layer(s) pre-training never updated")
    spatial = args.protocol == "nonlinear"
    train = extract_features(source.backbone, x_tr, pre, y_tr, batch_size=args.batch_size, spatial=spatial,
                             pool=args.pool, progress=progress, desc="train features")
    test = extract_features(source.backbone, x_te, pre, y_te, batch_size=args.batch_size, spatial=spatial,
                            pool=args.pool, progress=progress, desc="test features")
    t_feat = time.perf_counter() - t0
    k = len(classes)
    head = None
    if args.protocol == "knn":
        from qbheat.evaluation.knn import run_knn

        metrics = run_knn(train, test, num_classes=k)
        details = {}
    elif args.protocol == "linear":
        from qbheat.evaluation.linear_probe import LinearProbeConfig, run_linear_probe
        from qbheat.heads import create_head

        cfg = LinearProbeConfig(seed=args.seed)
        res = run_linear_probe(train, test, cfg, k, progress)
        metrics = {"linear_top1": res.test_accuracy}
        details = res.summary()
        head = create_head("linear", in_features=train.pooled.shape[1], num_classes=k, pool=args.pool)
        head.load_state_dict(res.head_state())
    else:
        from qbheat.evaluation.nonlinear_probe import NonlinearProbeConfig, run_nonlinear_probe

        cfg = NonlinearProbeConfig(seed=args.seed, **({"epochs": args.epochs} if args.epochs else {}))
        res = run_nonlinear_probe(train, test, cfg, k, progress)
        metrics = {"nonlinear_top1": res.test_accuracy}
        details = res.summary()
        head = res.head
    results = {
        "protocol": args.protocol,
        "source": source.info,
        "data": {"spec": args.data, "train_images": len(train), "test_images": len(test), "classes": classes,
                 "seed": args.seed},
        "preprocessing": pre.to_dict(),
        "batchnorm_recalibrated": recalibrated,
        "metrics": metrics,
        "details": details,
        "seconds": {"features": round(t_feat, 2), "total": round(time.perf_counter() - t0, 2)},
    }
    for name, value in metrics.items():
        print(f"{name}: {100 * value:.2f} %")
    if args.out:
        write_json(args.out, results)
        print(f"results: {args.out}")
    if args.save_head:
        from qbheat.checkpoint import save_checkpoint

        save_checkpoint(args.save_head, probe_payload(source, "probe", head, classes, pre, results))
        print(f"probe checkpoint: {args.save_head}")
    return 0

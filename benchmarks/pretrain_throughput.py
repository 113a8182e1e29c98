"""Pre-training throughput with data loading included: the trainer as it is vs the trainer before issue 19.

What is timed is whole training steps as ``qbheat pretrain`` runs them: fetch a batch, make the
method's views, forward, backward, clip, optimizer and schedule step, ``after_step``. Images/s =
batch × steps / wall time of the loop. Both feed the same ``qbheat.train.training_step``:

- **reference** (the trainer up to issue 19, kept here): a DataLoader with ``--workers`` processes
  (2, as the quickstart ran) where each image goes through torchvision ``transforms.v2``
  (RandomResizedCrop, flip; MoCo-v2 adds jitter, greyscale, blur) in a forked, per-image-seeded RNG;
  contiguous (NCHW) weights and views; DyReLU as ``max(a₁x, a₂x)`` in training too; QB-Heat's loss on
  the pixel-shuffled image, patchified again (``reference_compute``);
- **now** (``qbheat.data`` and the trainer's defaults): Fashion-MNIST held as one uint8 tensor, one
  gather per step, the method's view augmentation applied to the whole batch (``qbheat.data.transforms``),
  channels-last weights and views, DyReLU's training form and QB-Heat's loss on the decoder's patches.

A third row, "batched data, reference compute", splits the gain into data loading and compute. Both
run the same method configuration (``--qbheat-strides``; default 16, the pre-issue-19 default), and
QB-Heat's new default (strides 16 and 32, every part trained) is reported beside them. Configurations
alternate round by round so that machine drift hits all; ratios are of median images/s over rounds.

Run:  .venv/bin/python benchmarks/pretrain_throughput.py        (writes benchmarks/results/pretrain_throughput.{json,md})
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import qbheat  # noqa: F401  (torchvision shim before timm)
import qbheat.methods.qbheat as qbheat_method
from deploy_targets.fingerprint import cpu_model
from qbheat.models.mobileformer import DynamicReLU

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGET = 2.0  # issue 19: at least 2× the per-image pipeline's images/s


# --- the per-image reference pipeline (the trainer's data path before issue 19) ----------------------
def _per_image_transform(method: str, size: int, crop_scale):
    from torchvision.transforms import v2

    from qbheat.data.transforms import IMAGENET_MEAN, IMAGENET_STD, blur_kernel_size

    finish = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))]
    if method == "mocov2":
        return v2.Compose([
            v2.RandomResizedCrop(size, scale=crop_scale, antialias=True),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(blur_kernel_size(size), sigma=(0.1, 2.0))], p=0.5),
            v2.RandomHorizontalFlip(), *finish])
    return v2.Compose([v2.RandomResizedCrop(size, scale=crop_scale, interpolation=v2.InterpolationMode.BICUBIC,
                                            antialias=True), v2.RandomHorizontalFlip(), *finish])


class PerImageViews(torch.utils.data.Dataset):
    """(epoch, index) → tuple of views, each image augmented alone in a per-image-seeded forked RNG."""

    def __init__(self, images, transform, views: int, seed: int = 0):
        self.images, self.transform, self.views, self.seed = images, transform, views, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key):
        from qbheat.data.build import _view_seed

        epoch, index = key
        image = self.images[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_view_seed(self.seed, epoch, index))
            return tuple(self.transform(image) for _ in range(self.views))


# --- the compute of the trainer before issue 19 ---------------------------------------------------------
def _reference_patch_loss(patches, image, mask, patch, norm_pix=True, eps=1e-6):
    """QB-Heat's loss as it was: pixel-shuffle the decoder's patches into an image, then patchify it,
    the target and the mask again (B×N×P, permuted copies) and take the masked mean there."""
    def patchify(x):
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)

    pred = F.pixel_shuffle(patches, patch)
    target = patchify(image.float())
    if norm_pix:
        target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + eps).sqrt()
    err = (patchify(pred.float()) - target).pow(2)
    b, n, _ = err.shape
    err = err.reshape(b, n, patch * patch, -1).sum(dim=-1)
    weight = patchify(mask.float())
    return (err * weight).sum() / (weight.sum() * pred.shape[1]).clamp(min=1.0)


def _reference_dyrelu(self, x, token0):
    a1, a2 = self.coefficients(token0)
    return torch.maximum(x * a1, x * a2)


@contextlib.contextmanager
def reference_compute():
    """The model and loss code of the trainer before issue 19, for the reference rows only."""
    saved = DynamicReLU.forward, qbheat_method.masked_patch_loss
    DynamicReLU.forward, qbheat_method.masked_patch_loss = _reference_dyrelu, _reference_patch_loss
    try:
        yield
    finally:
        DynamicReLU.forward, qbheat_method.masked_patch_loss = saved


# --- one pipeline, timed ------------------------------------------------------------------------------
def build(method: str, strides: list[int], args):
    from qbheat.config import load_config
    from qbheat.train import WarmupCosine, build_objective, build_optimizer, resolved_recipe

    ov = {"batch_size": args.batch_size, "image_size": args.image_size, "model": args.model}
    if method == "qbheat":
        ov["qbheat.feature_strides"] = strides
        ov["qbheat.token_conditioning"] = strides != [16]
    cfg = load_config(ROOT / "qbheat" / "configs" / f"{method}_fashion_mnist_micro.yaml", ov)
    torch.manual_seed(0)
    objective = build_objective(cfg).train()
    recipe = resolved_recipe(cfg)
    optimizer = build_optimizer(objective, recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(10_000, 0))
    return cfg, objective, optimizer, scheduler, recipe


def batches(pipeline: str, cfg, method_cls, args, start: int):
    """An iterator of view lists for steps start, start+1, ..."""
    from qbheat.data.build import GlobalStepSampler, batch_iterator, build_pretrain_dataset, view_generator

    dataset = build_pretrain_dataset("fashion-mnist", cfg.image_size)
    sampler = GlobalStepSampler(len(dataset), cfg.batch_size, start_step=start)
    if pipeline == "per_image":
        ds = PerImageViews(dataset.images, _per_image_transform(cfg.method, cfg.image_size, tuple(cfg.crop_scale)),
                           method_cls.num_views)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=args.workers,
                                             persistent_workers=args.workers > 0)
        for views in loader:
            yield list(views)
    else:
        make_views = method_cls.view_transform(cfg)
        device = torch.device("cpu")
        for step, images in enumerate(batch_iterator(dataset, sampler), start=start):
            yield list(make_views(images, view_generator(0, step, device)))


def measure(method: str, pipeline: str, compute: str, strides: list[int], args) -> float:
    """Images/s of ``--steps`` steps after ``--warmup`` untimed ones, one fresh model."""
    from qbheat.methods import method_class
    from qbheat.train import training_step

    cfg, objective, optimizer, scheduler, recipe = build(method, strides, args)
    fmt = torch.channels_last if compute == "now" and cfg.channels_last else torch.contiguous_format
    objective.to(memory_format=fmt)  # as the trainer does
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    params = [p for p in objective.parameters() if p.requires_grad]
    it = batches(pipeline, cfg, method_class(method), args, 0)

    def step():
        views = [v.contiguous(memory_format=fmt) for v in next(it)]
        training_step(objective, objective, views, optimizer, scaler, scheduler, params,
                      grad_clip=recipe["grad_clip"], amp_dtype=None, progress=0.5)

    with reference_compute() if compute == "reference" else contextlib.nullcontext():
        for _ in range(args.warmup):
            step()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        return args.steps * args.batch_size / (time.perf_counter() - t0)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mobileformer_micro")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30, help="timed steps per round and configuration")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the per-image pipeline (quickstart: 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=["qbheat", "mocov2"])
    p.add_argument("--qbheat-strides", type=int, nargs="+", default=[16])
    p.add_argument("--results-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    # (method, data pipeline, compute, QB-Heat strides)
    configs = []
    for m in args.methods:
        configs += [(m, "per_image", "reference", args.qbheat_strides), (m, "batched", "reference", args.qbheat_strides),
                    (m, "batched", "now", args.qbheat_strides)]
        if m == "qbheat" and args.qbheat_strides != [16, 32]:
            configs.append((m, "batched", "now", [16, 32]))
    names = {("per_image", "reference"): "before issue 19", ("batched", "reference"): "batched data, reference compute",
             ("batched", "now"): "now"}
    samples: dict[str, list[float]] = {}
    label = lambda m, pl, c, s: f"{m} {names[pl, c]}" + (f" strides {s}" if m == "qbheat" else "")  # noqa: E731
    for r in range(args.rounds):
        order = configs if r % 2 == 0 else configs[::-1]
        for m, pl, c, s in order:
            v = measure(m, pl, c, s, args)
            samples.setdefault(label(m, pl, c, s), []).append(v)
            print(f"round {r}: {label(m, pl, c, s)}: {v:.0f} img/s", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    ratios = {}
    for m in args.methods:
        before = med[label(m, "per_image", "reference", args.qbheat_strides)]
        ratios[f"{m}: now / before issue 19"] = med[label(m, "batched", "now", args.qbheat_strides)] / before
        ratios[f"{m}: batched data only / before"] = med[label(m, "batched", "reference", args.qbheat_strides)] / before
    if "qbheat" in args.methods and args.qbheat_strides != [16, 32]:
        ratios[f"qbheat: now with strides [16, 32] / before issue 19 with strides {args.qbheat_strides}"] = \
            med[label("qbheat", "batched", "now", [16, 32])] / med[label("qbheat", "per_image", "reference", args.qbheat_strides)]
    result = {
        "schema": "qbheat.bench.pretrain_throughput/1",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/pretrain_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "threads": args.threads, "loadavg": os.getloadavg()[0]},
        "settings": vars(args), "images_per_s": samples, "median_images_per_s": med, "ratios": ratios, "target": TARGET,
    }
    from qbheat.checkpoint import atomic_write_bytes

    d = Path(args.results_dir)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(d / "pretrain_throughput.json", (json.dumps(result, indent=2) + "\n").encode())
    lines = ["# Pre-training throughput, data loading included", "",
             f"- Date: {result['date']}", f"- Machine: {result['machine']['cpu']}, {os.cpu_count()} cores, "
             f"{args.threads} torch threads, load average {result['machine']['loadavg']:.2f} at the end",
             f"- Command: `{result['command']}`",
             f"- `{args.model}` at {args.image_size} px, batch {args.batch_size}, Fashion-MNIST; {args.rounds} rounds × "
             f"{args.steps} timed steps per configuration, alternating order", "",
             "| configuration | images/s per round | median |", "|---|---|---|"]
    lines += [f"| {k} | {', '.join(f'{x:.0f}' for x in v)} | {med[k]:.0f} |" for k, v in samples.items()]
    lines += ["", "| ratio | value | target |", "|---|---|---|"]
    lines += [f"| {k} | {v:.2f}× | {'–' if 'only' in k else f'≥ {TARGET}×'} |" for k, v in ratios.items()]
    atomic_write_bytes(d / "pretrain_throughput.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()

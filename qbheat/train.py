"""The pre-training loop: one function, read top to bottom.

``pretrain(config)`` builds the backbone and method, the data, the optimiser and schedule, then
runs: fetch a global-step batch → forward under autocast → backward → clip → optimiser step →
schedule step → ``method.after_step`` → log → checkpoint. It runs in one process or under
``torchrun`` (DDP, gloo on CPU and NCCL on GPU) and returns the path of the last checkpoint.

Recipe notes next to the values:
- Learning rate = base_lr × global batch / 256 (linear scaling, Goyal et al. 2017; MoCo v2 and
  MAE both state their lr this way). Linear warm-up, then a half-cosine to ``min_lr_ratio``.
- Weight decay skips biases and normalisation weights for AdamW (MAE practice); MoCo v2's SGD
  decays all weights, as its paper does.
- bf16 autocast needs no loss scaling; fp16 uses a GradScaler. Losses are computed in float32.
- Checkpoints (``<out_dir>/last.pt``) hold only tensors and plain values and resume exactly:
  model, method buffers (MoCo queue), optimiser, schedule, scaler, every rank's RNG states and
  the data position (the global step; see ``qbheat.data.build``).
"""
from __future__ import annotations

import csv
import math
import random
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qbheat import distributed
from qbheat.checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint
from qbheat.config import PretrainConfig
from qbheat.data.build import GlobalStepSampler, batch_iterator, build_pretrain_dataset, view_generator
from qbheat.errors import QBHeatError
from qbheat.evaluation.features import ProbePreprocessing
from qbheat.additions import ADDITIONS, build_additions, names_of
from qbheat.methods import build_method, method_class
from qbheat.methods._recipe import OptimRecipe


# ---------------------------------------------------------------------------------------------
# Pieces the loop is made of (also used by tests and benchmarks).
# ---------------------------------------------------------------------------------------------

class Objective(nn.Module):
    """The method plus its additions (``qbheat.additions``: HSSL's head, regularizers): the module DDP wraps.

    ``out["loss"]`` = method loss + Σ addition losses, in the order given; the method's own loss stays
    available as ``out["method_loss"]``, each addition's as ``out["<name>_loss"]`` and its other
    scalars as ``out["<name>_<key>"]`` (all logged). ``after_step`` updates every momentum state.
    Regularizers live in ``self.regularizers[name]``, a head addition as ``self.<name>`` (None when off).
    """

    def __init__(self, method: nn.Module, additions: dict[str, nn.Module] | None = None):
        super().__init__()
        additions = additions or {}
        self.method = method
        for name in names_of("head"):  # registered before the regularizers: the optimizer's parameter order
            setattr(self, name, additions.get(name))
        self.regularizers = nn.ModuleDict({n: t for n, t in additions.items() if ADDITIONS[n].kind == "regularizer"})
        self._order = list(additions)

    def additions(self) -> list[tuple[str, nn.Module]]:
        return [(name, self.regularizers[name] if name in self.regularizers else getattr(self, name))
                for name in self._order]

    def _heads(self) -> dict[str, nn.Module | None]:
        return {name: getattr(self, name, None) for name in names_of("head")}

    def addition_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """Checkpoint entries: "regularizers" and one per head addition ({} when it is off)."""
        return {"regularizers": self.regularizers.state_dict(),
                **{name: head.state_dict() if head is not None else {} for name, head in self._heads().items()}}

    def load_addition_states(self, ckpt: dict[str, Any]) -> None:
        self.regularizers.load_state_dict(ckpt.get("regularizers", {}), strict=True)
        for name, head in self._heads().items():
            if head is not None:
                head.load_state_dict(ckpt.get(name, {}), strict=True)

    def forward(self, batch: list[torch.Tensor]) -> dict[str, Any]:
        out = self.method(batch)
        additions = self.additions()
        if additions:
            out["method_loss"] = out["loss"]
            total = out["loss"]
            for name, term in additions:
                r = term(out)
                total = total + r["loss"]
                out |= {f"{name}_{k}": v for k, v in r.items()}
            out["loss"] = total
        return out

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """After the optimizer step: the method's momentum updates, then each addition's."""
        self.method.after_step(progress)
        for _, term in self.additions():
            if hasattr(term, "after_step"):
                term.after_step(progress)


def build_objective(config: PretrainConfig) -> Objective:
    """Backbone (timm, num_classes=0) → method → its additions (HSSL head, regularizers), on the CPU."""
    from qbheat.models import create_model

    backbone = create_model(config.model, num_classes=0, **config.model_kwargs)
    method = build_method(config, backbone)
    return Objective(method, build_additions(config, method))


def resolved_recipe(config: PretrainConfig) -> dict[str, Any]:
    """The optimiser settings in force: config fields, else the method's recipe."""
    r: OptimRecipe = method_class(config.method).recipe
    return {
        "optimizer": config.optimizer or r.optimizer,
        "lr": config.lr if config.lr is not None else r.lr_for(config.batch_size),
        "weight_decay": config.weight_decay if config.weight_decay is not None else r.weight_decay,
        "warmup_fraction": config.warmup_fraction if config.warmup_fraction is not None else r.warmup_fraction,
        "grad_clip": config.grad_clip if config.grad_clip is not None else r.grad_clip,
        "betas": r.betas, "momentum": r.momentum, "decay_1d": r.decay_1d,
    }


def build_optimizer(model: nn.Module, recipe: dict[str, Any]) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if recipe["decay_1d"] or p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe["weight_decay"]}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if recipe["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=recipe["lr"], betas=recipe["betas"])
    return torch.optim.SGD(groups, lr=recipe["lr"], momentum=recipe["momentum"])


class WarmupCosine:
    """LR multiplier at step s: linear warm-up over ``warmup`` steps, then a half-cosine to ``floor``.

    Warm-up starts at 1/warmup rather than 0 so that no step is wasted (a choice; MAE starts at 0).
    """

    def __init__(self, total_steps: int, warmup_steps: int, floor: float = 0.0):
        self.total, self.warmup, self.floor = total_steps, warmup_steps, floor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def wrap_ddp(objective: nn.Module, ctx: distributed.DistContext, find_unused: bool) -> nn.Module:
    """DDP around the objective when more than one process runs; the objective itself otherwise."""
    if ctx.world_size <= 1:
        return objective
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DDP(objective, device_ids=ids, find_unused_parameters=find_unused)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None for float32; bf16 for "bf16" (and "auto" on GPUs with bf16); fp16 for "fp16"."""
    if precision == "auto":
        use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if use_bf16 else None
    if precision == "fp16" and device.type != "cuda":
        raise QBHeatError("precision fp16 needs a GPU; use bf16 or fp32 on the CPU.")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def get_rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with weights_only)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class MetricsLog:
    """Rows of scalars to ``metrics.csv`` (and TensorBoard under ``tb/``), rank 0 only.

    On resume, rows after the resumed step are dropped so that the file reads as one run.
    """

    def __init__(self, out_dir: Path, start_step: int, tensorboard: bool):
        self.path = out_dir / "metrics.csv"
        self.fields: list[str] | None = None
        if self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
            if rows:
                self.fields = list(rows[0].keys())
                lines = [",".join(self.fields)] + [",".join(r[k] for k in self.fields) for r in rows]
                atomic_write_bytes(self.path, ("\n".join(lines) + "\n").encode())
            else:
                self.path.unlink()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise QBHeatError("tensorboard is not installed; install it or set tensorboard: false.") from None
            self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1 if start_step else None)

    def write(self, row: dict[str, float]) -> None:
        if self.fields is None:
            self.fields = list(row)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if f.tell() == 0:
                w.writeheader()
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"pretrain/{k}", v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _next_batch(it):
    """Next batch; a QBHeatError raised in a loader worker comes back as its own one sentence."""
    try:
        return next(it)
    except QBHeatError as e:
        msg = str(e)
        if "Original Traceback" in msg:
            msg = msg.strip().splitlines()[-1].split("QBHeatError: ", 1)[-1]
        raise QBHeatError(msg) from None


def _check_resumable(ckpt: dict[str, Any], config: PretrainConfig, path: Path) -> None:
    want = {"name": config.model, "kwargs": config.model_kwargs}
    got = ckpt.get("model", {})
    if got.get("name") != want["name"] or dict(got.get("kwargs", {})) != want["kwargs"]:
        raise QBHeatError(f"checkpoint {path} holds model {got.get('name')!r} {got.get('kwargs', {})}, not "
                          f"{config.model!r} {config.model_kwargs}; resume with the same model or start a new out_dir.")
    if ckpt.get("method") != config.method_label:
        raise QBHeatError(f"checkpoint {path} was pre-trained with method {ckpt.get('method')!r}, not "
                          f"{config.method_label!r}; resume with the same method and additions or start a new out_dir.")
    saved_batch = ckpt.get("data", {}).get("global_batch")
    if saved_batch != config.batch_size:
        raise QBHeatError(f"checkpoint {path} was trained with batch_size {saved_batch}; resume with the same "
                          "batch_size (the data position and schedule depend on it).")
    for key in ("method_state", "optimizer", "scheduler", "rng", "data", "step"):
        if key not in ckpt:
            raise QBHeatError(f"checkpoint {path} lacks {key!r}, so it cannot resume training; it is not a "
                              "pre-training checkpoint written by 'qbheat pretrain'.")


def _resume_path(config: PretrainConfig, out_dir: Path) -> Path | None:
    if config.resume is None:
        return None
    if config.resume == "auto":
        last = out_dir / "last.pt"
        return last if last.is_file() else None
    return Path(config.resume)


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------

def training_step(model: nn.Module, method: nn.Module, batch: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                  scaler: torch.amp.GradScaler, scheduler, params: list[torch.Tensor], *, grad_clip: float,
                  amp_dtype: torch.dtype | None, progress: float) -> tuple[dict[str, Any], torch.Tensor]:
    """One optimisation step: forward under autocast → backward → clip → optimizer and schedule step →
    ``method.after_step`` (pass the ``Objective`` so that its additions' momentum states update too).
    Returns the method's output (loss detached) and the pre-clip gradient norm.

    The caller checks ``out["loss"]`` for non-finite values; the step is taken by then, so the loop
    stops without saving and points at the last good checkpoint.
    """
    device_type = batch[0].device.type
    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        out = model(batch)
    loss = out["loss"]
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    scaler.step(optimizer)
    scaler.update()
    if scheduler is not None:
        scheduler.step()
    method.after_step(progress)
    out["loss"] = loss.detach()
    return out, grad_norm


def pretrain(config: PretrainConfig) -> Path:
    """Run pre-training as ``config`` says (single process or torchrun DDP); return the last checkpoint."""
    ctx = distributed.setup(config.device)
    try:
        return _pretrain(config, ctx)
    finally:
        distributed.teardown(ctx)


def _pretrain(config: PretrainConfig, ctx: distributed.DistContext) -> Path:
    config.validate(ctx.world_size)
    device, rank, is_main = ctx.device, ctx.rank, ctx.rank == 0
    out_dir = Path(config.out_dir)
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    np.random.seed(config.seed)
    random.seed(config.seed)

    # model: backbone → method → additions, optionally SyncBN, then DDP
    objective = build_objective(config)
    method = objective.method
    if config.sync_bn and ctx.world_size > 1:
        if device.type != "cuda":
            raise QBHeatError("sync_bn needs GPUs (SyncBatchNorm has no CPU kernel); set sync_bn: false on the CPU.")
        objective = nn.SyncBatchNorm.convert_sync_batchnorm(objective)
        method = objective.method
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    objective.to(device, memory_format=memory_format)
    recipe = resolved_recipe(config)
    optimizer = build_optimizer(objective, recipe)

    # data: a fixed order of global batches, indexed by step
    dataset = build_pretrain_dataset(config.data, config.image_size, seed=config.seed,
                                     synthetic_size=config.synthetic_size)
    make_views = type(method).view_transform(config)  # uint8 batch + generator → the method's views
    probe = GlobalStepSampler(len(dataset), config.batch_size, world_size=ctx.world_size)
    total_steps = config.steps if config.steps is not None else probe.steps_for_epochs(config.epochs)
    warmup = round(recipe["warmup_fraction"] * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup, config.min_lr_ratio))
    amp_dtype = autocast_dtype(config.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # resume: everything that the next step depends on
    start_step = 0
    resume_from = _resume_path(config, out_dir)
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from, kinds=("pretrain",))
        _check_resumable(ckpt, config, resume_from)
        state = {f"backbone.{k}": v for k, v in ckpt["backbone"].items()} | ckpt["method_state"]
        try:
            method.load_state_dict(state, strict=True)
            objective.load_addition_states(ckpt)
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise QBHeatError(f"checkpoint {resume_from} does not fit this configuration ({str(e).splitlines()[0][:160]}); "
                              "resume with the settings it was saved with.") from None
        scheduler.load_state_dict(ckpt["scheduler"])
        # the schedule follows this run's budget (equal to the saved one for an exact resume)
        scheduler.lr_lambdas[0] = WarmupCosine(total_steps, warmup, config.min_lr_ratio)
        if is_main and ckpt.get("total_steps") != total_steps:
            print(f"qbheat: the run now spans {total_steps} steps, not {ckpt.get('total_steps')}; "
                  "the learning-rate schedule is stretched from here on.")
        scaler.load_state_dict(ckpt.get("scaler") or {})
        start_step = int(ckpt["step"])
        rngs = ckpt["rng"]
        set_rng_state(rngs[rank] if len(rngs) == ctx.world_size else rngs[0], device)
        if is_main and ckpt["data"].get("dataset_size") != len(dataset):
            print(f"qbheat: the data now holds {len(dataset)} images, not {ckpt['data'].get('dataset_size')}; "
                  "the batch order after the resume differs from the original run.")
    else:
        torch.manual_seed(config.seed + rank)  # per-rank randomness (dropout, masks) from here on

    model = wrap_ddp(objective, ctx, getattr(method, "ddp_find_unused_parameters", True))
    end_step = total_steps if config.stop_after is None else min(total_steps, config.stop_after)
    sampler = GlobalStepSampler(len(dataset), config.batch_size, rank=rank, world_size=ctx.world_size,
                                seed=config.seed, start_step=start_step, end_step=max(start_step, end_step))
    batches = batch_iterator(dataset, sampler, config.num_workers, pin_memory=device.type == "cuda")

    out_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out_dir, start_step, config.tensorboard) if is_main else None
    last_path = out_dir / "last.pt"

    def save(step: int) -> None:
        rngs = distributed.all_gather_objects(get_rng_state(device))
        if is_main:
            method_state = {k: v for k, v in method.state_dict().items() if not k.startswith("backbone.")}
            save_checkpoint(last_path, {
                "kind": "pretrain",
                "model": {"name": config.model, "kwargs": dict(config.model_kwargs)},
                "backbone": method.backbone.state_dict(),
                "method": config.method_label,  # "qbheat", or with additions: "qbheat+hssl", "mocov2+msbreg"
                "method_state": method_state,
                **objective.addition_states(),  # "regularizers", "hssl": the additions are not in "backbone"
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rngs,
                "step": step,
                "total_steps": total_steps,
                "data": {"step": step, "epoch": step // sampler.steps_per_epoch, "seed": config.seed,
                         "global_batch": config.batch_size, "dataset_size": len(dataset), "spec": config.data},
                # the evaluation recipe probes and exports use (not the training augmentation's)
                "preprocessing": ProbePreprocessing(input_size=(3, config.image_size, config.image_size),
                                               mean=tuple(config.mean), std=tuple(config.std)).to_dict(),
                "world_size": ctx.world_size,
                "config": config.to_dict(),
            })
        distributed.barrier()

    from tqdm import tqdm

    bar = tqdm(total=end_step, initial=start_step, disable=not (is_main and config.progress),
               desc=f"{config.method_label} {config.model}", dynamic_ncols=True)
    window: dict[str, list[float]] = {}
    window_time, window_images = 0.0, 0
    params = [p for p in objective.parameters() if p.requires_grad]
    model.train()
    try:
        for step in range(start_step, end_step):
            t0 = time.perf_counter()
            images = _next_batch(batches).to(device, non_blocking=True)  # uint8 b×3×h×w
            # views, each b×3×S×S: this rank's rows of the global batch's augmentation draws
            batch = [v.contiguous(memory_format=memory_format) for v in
                     make_views(images, view_generator(config.seed, step, device), rank * sampler.local_batch,
                                config.batch_size)]

            lr = scheduler.get_last_lr()[0]
            out, grad_norm = training_step(model, objective, batch, optimizer, scaler, scheduler, params,
                                           grad_clip=recipe["grad_clip"], amp_dtype=amp_dtype,
                                           progress=(step + 1) / total_steps)
            if not torch.isfinite(out["loss"]):
                raise QBHeatError(f"the loss became {out['loss'].item()} at step {step}; lower lr (or grad_clip) and "
                                  f"resume from {last_path}.")

            # metrics: window means, averaged over ranks at log time
            for k, v in out.items():
                if isinstance(v, torch.Tensor) and v.ndim == 0:
                    window.setdefault(k, []).append(float(v.detach()))
            window.setdefault("grad_norm", []).append(float(grad_norm))
            window_time += time.perf_counter() - t0
            window_images += config.batch_size
            done = step + 1
            bar.update(1)
            if done % config.log_every == 0 or done == end_step:
                means = {k: sum(v) / len(v) for k, v in window.items()}
                keys = sorted(means)
                reduced = distributed.all_reduce_mean(torch.tensor([means[k] for k in keys], dtype=torch.float64))
                row = {"step": done, "epoch": done / sampler.steps_per_epoch, "lr": lr}
                row |= {k: float(x) for k, x in zip(keys, reduced)}
                row |= {"images_per_s": window_images / max(window_time, 1e-9),
                        "step_time_s": window_time / len(window["grad_norm"]),
                        "peak_mem_mb": _peak_memory_mb(device)}
                if log is not None:
                    log.write(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
                window, window_time, window_images = {}, 0.0, 0
            if done % config.ckpt_every == 0 or done == end_step:
                save(done)
    finally:
        bar.close()
        if log is not None:
            log.close()
    if start_step >= end_step and resume_from is not None and resume_from != last_path and is_main:
        # nothing left to train: the resumed checkpoint is the result
        return resume_from
    return last_path

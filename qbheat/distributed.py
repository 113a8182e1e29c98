"""Process-group plumbing for ``torchrun`` DDP: gloo on CPU, NCCL on GPU, and the collectives methods use.

Everything here also works in a single process without a process group (the collectives then
return their input), so methods and the loop never branch on "am I distributed".

- ``all_gather_with_grad``: concatenation of every rank's tensor along dim 0 that carries
  gradients back to each rank's own slice (``torch.distributed.nn.functional.all_gather``, whose
  backward sums the incoming gradients across ranks). Use it for losses over the global batch.
- ``all_gather_no_grad``: the same without autograd, for MoCo keys entering the queue.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qbheat.errors import QBHeatError


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    created_group: bool  # True if ``setup`` initialised the process group (and must destroy it)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """"auto" → this process's GPU if CUDA is available, else the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise QBHeatError("device 'cuda' was requested but this torch build sees no GPU; use --device cpu.")
        return torch.device("cuda", local_rank) if requested == "cuda" else torch.device(requested)
    if requested != "cpu":
        raise QBHeatError(f"device must be 'auto', 'cpu' or 'cuda', not {requested!r}.")
    return torch.device("cpu")


def setup(device: str = "auto") -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Reuses a group that is already initialised (e.g. by a test that spawned the processes).
    The backend is NCCL when the processes use GPUs and gloo otherwise.
    """
    if dist.is_available() and dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        dev = resolve_device(device, local_rank)
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, created_group=False)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistContext(0, 1, 0, dev, created_group=False)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, created_group=True)


def teardown(ctx: DistContext) -> None:
    if ctx.created_group and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(W·B)×… concatenation of every rank's B×… tensor, differentiable w.r.t. the local slice."""
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """(W·B)×… concatenation of every rank's B×… tensor, outside autograd."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (a copy; ``x`` itself is untouched)."""
    if not is_distributed():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / dist.get_world_size()


def broadcast_(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_distributed():
        dist.broadcast(x, src)
    return x


def all_gather_objects(obj):
    """List of one picklable object per rank (used for per-rank RNG states at checkpoint time)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()

"""MoCo-v2: momentum contrast with an MLP head and strong augmentations, the QB-Heat paper's baseline.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning" (MoCo, arXiv
1911.05722) and Chen et al., "Improved Baselines with Momentum Contrastive Learning" (MoCo v2,
arXiv 2003.04297). Written from the papers; no code is taken from the CC BY-NC reference code.

- Query encoder f_q = backbone + projection MLP (fc–ReLU–fc, 128-d output; MoCo v2 §2).
- Key encoder f_k = a momentum copy, θ_k ← m θ_k + (1 − m) θ_q with m = 0.999 (MoCo Eq. 2),
  updated by ``after_step`` once the optimizer has stepped.
- A queue of K = 65536 keys from earlier batches serves as negatives (MoCo §3.2); the newest
  global batch of keys (all-gathered over ranks) replaces the oldest. Queue and pointer are
  registered buffers, so checkpoints carry them and resume restores them.
- Loss: InfoNCE with temperature τ = 0.2 (MoCo Eq. 1; τ from MoCo v2), positive = the key of the
  same image's other view. One query view and one key view per image (asymmetric, as in MoCo v2).
- Shuffling BN (MoCo §3.3): under DDP the key batch is shuffled across ranks before the key
  encoder and restored after it, so BatchNorm statistics cannot leak the positive pair. A single
  process has nothing to shuffle across.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from qbheat import distributed
from qbheat.errors import QBHeatError
from qbheat.methods import register_method
from qbheat.methods._momentum import momentum_at, momentum_copy, momentum_update_
from qbheat.methods._recipe import OptimRecipe

if TYPE_CHECKING:
    from qbheat.config import PretrainConfig

MOMENTUM_SCHEDULES = ("constant", "cosine")


@dataclass
class MoCoV2Config:
    dim: int = 128  # MoCo v2 §2: 128-d projection output
    hidden_dim: int | None = None  # None: the backbone's feature width (MoCo v2: 2048, ResNet-50's)
    queue_size: int = 65536  # MoCo K; must be a multiple of the global batch
    momentum: float = 0.999  # MoCo m
    momentum_schedule: str = "constant"  # MoCo v1/v2 keep m fixed; "cosine" is BYOL/MoCo v3's
    temperature: float = 0.2  # MoCo v2 τ
    shuffle_bn: bool = True  # MoCo §3.3; only acts with more than one process

    def problems(self, global_batch: int | None = None) -> list[str]:
        out = []
        if self.dim < 1 or (self.hidden_dim is not None and self.hidden_dim < 1):
            out.append("mocov2.dim and mocov2.hidden_dim must be positive")
        if self.queue_size < 1:
            out.append("mocov2.queue_size must be positive")
        elif global_batch and self.queue_size % global_batch:
            out.append(f"mocov2.queue_size ({self.queue_size}) must be a multiple of batch_size ({global_batch}); "
                       f"e.g. set it to {max(1, self.queue_size // global_batch) * global_batch}")
        if not 0.0 <= self.momentum <= 1.0:
            out.append(f"mocov2.momentum must lie in [0, 1], not {self.momentum}")
        if self.momentum_schedule not in MOMENTUM_SCHEDULES:
            out.append(f"mocov2.momentum_schedule must be one of {list(MOMENTUM_SCHEDULES)}")
        if self.temperature <= 0:
            out.append(f"mocov2.temperature must be positive, not {self.temperature}")
        return out


def info_nce_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's logits B×(1+K): column 0 = q·k⁺ (positive), then q·queueᵀ (negatives), divided by τ.

    q, k: B×D unit vectors; queue: K×D unit vectors. Computed in float32.
    """
    q, k, queue = q.float(), k.float(), queue.float()
    l_pos = (q * k).sum(dim=1, keepdim=True)  # B×1
    l_neg = q @ queue.t()  # B×K
    return torch.cat([l_pos, l_neg], dim=1) / temperature


def info_nce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE (MoCo Eq. 1): −log exp(q·k⁺/τ) / (exp(q·k⁺/τ) + Σ_queue exp(q·k⁻/τ)), batch mean."""
    logits = info_nce_logits(q, k, queue, temperature)
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """MoCo v2's head: fc → ReLU → fc (no BatchNorm)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


def embedding_dim(backbone: nn.Module) -> int:
    """Width of ``backbone(x)`` for a timm model created with num_classes=0."""
    width = getattr(backbone, "head_hidden_size", None) or getattr(backbone, "num_features", None)
    if not width:
        raise QBHeatError(f"backbone {type(backbone).__name__} does not report its feature width (num_features).")
    return int(width)


@register_method("mocov2")
class MoCoV2(nn.Module):
    """MoCo-v2 around any timm backbone (pooled features from ``backbone(x)``, num_classes=0).

    ``batch`` is a list of two views, each B×3×H×W: view 0 is the query, view 1 the key. Returns
    {"loss", "contrastive_acc", "embeddings": [query-view features B×F], "features": [the query
    encoder's ``forward_features`` output], "target_inputs": [the key view],
    "momentum_embeddings": [key-view features from the key encoder B×F]}.
    """

    name = "mocov2"
    Config = MoCoV2Config
    num_views = 2
    has_momentum_encoder = True  # out["momentum_embeddings"] are its key encoder's features
    ddp_find_unused_parameters = False
    # MoCo v2 recipe: SGD, lr 0.03 for batch 256, momentum 0.9, weight decay 1e-4 on all weights,
    # cosine schedule, no warm-up, no gradient clipping.
    recipe = OptimRecipe(optimizer="sgd", base_lr=0.03, weight_decay=1e-4, momentum=0.9,
                         warmup_fraction=0.0, grad_clip=0.0, decay_1d=True)

    queue: torch.Tensor
    queue_ptr: torch.Tensor

    def __init__(self, backbone: nn.Module, cfg: MoCoV2Config):
        super().__init__()
        bad = cfg.problems()
        if bad:
            raise QBHeatError(bad[0] + ".")
        self.cfg = cfg
        width = embedding_dim(backbone)
        self.backbone = backbone
        self.projector = projection_mlp(width, cfg.hidden_dim or width, cfg.dim)
        self.momentum_backbone = momentum_copy(backbone)
        self.momentum_projector = momentum_copy(self.projector)
        self.register_buffer("queue", F.normalize(torch.randn(cfg.queue_size, cfg.dim), dim=1))  # K×D
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.momentum = cfg.momentum
        self.embedding_dim = width

    def encoder_input_size(self, image_size: int) -> int:
        return image_size

    def features(self, x: torch.Tensor, backbone: nn.Module | None = None):
        """(``forward_features`` output, pooled B×F) of ``x``: timm's ``forward_head(forward_features(x))``
        is ``backbone(x)`` for a num_classes=0 model."""
        backbone = self.backbone if backbone is None else backbone
        f = backbone.forward_features(x)
        return f, backbone.forward_head(f)

    @classmethod
    def from_config(cls, config: "PretrainConfig", backbone: nn.Module) -> "MoCoV2":
        return cls(backbone, config.mocov2)

    @staticmethod
    def view_transform(config: "PretrainConfig"):
        """Two independent MoCo v2 "aug+" views per image."""
        from qbheat.data.transforms import MultiView, mocov2_augmentation

        return MultiView(mocov2_augmentation(config.image_size, tuple(config.crop_scale), config.mean, config.std), 2)

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Key-encoder features B×F and unit keys B×D, with Shuffling BN across ranks under DDP."""
        shuffle = self.cfg.shuffle_bn and distributed.is_distributed()
        if shuffle:
            x, restore = _shuffle_across_ranks(x)
        h = self.momentum_backbone(x)  # B×F
        k = F.normalize(self.momentum_projector(h).float(), dim=1)  # B×D
        if shuffle:
            h, k = restore(h), restore(k)
        return h, k

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest len(keys) entries of the queue by ``keys`` (global batch, rank order)."""
        n, size = keys.shape[0], self.queue.shape[0]
        if size % n:
            raise QBHeatError(f"mocov2.queue_size ({size}) must be a multiple of the global batch ({n}).")
        ptr = int(self.queue_ptr.item())
        self.queue[ptr:ptr + n] = keys.to(self.queue.dtype)
        self.queue_ptr[0] = (ptr + n) % size

    def forward(self, batch: list[torch.Tensor]) -> dict[str, Any]:
        if len(batch) < 2:
            raise QBHeatError("MoCo-v2 needs two views per image; build the data with MoCoV2.view_transform.")
        x_q, x_k = batch[0], batch[1]  # B×3×H×W each
        f_q, h_q = self.features(x_q)  # encoder output, B×F
        q = F.normalize(self.projector(h_q).float(), dim=1)  # B×D
        h_k, k = self._keys(x_k)
        queue = self.queue.clone().detach()  # the enqueue below must not touch what autograd saved
        logits = info_nce_logits(q, k, queue, self.cfg.temperature)  # B×(1+K)
        loss = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
        if self.training:
            self._dequeue_and_enqueue(distributed.all_gather_no_grad(k))
        acc = (logits.detach().argmax(dim=1) == 0).float().mean()
        return {"loss": loss, "contrastive_acc": acc, "embeddings": [h_q], "features": [f_q], "target_inputs": [x_k],
                "momentum_embeddings": [h_k]}

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """Momentum update of the key encoder (MoCo Eq. 2), after the optimizer step."""
        self.momentum = momentum_at(self.cfg.momentum, progress, self.cfg.momentum_schedule)
        momentum_update_(self.momentum_backbone, self.backbone, self.momentum)
        momentum_update_(self.momentum_projector, self.projector, self.momentum)


def _shuffle_across_ranks(x: torch.Tensor):
    """Give this rank a random slice of the global key batch; return it and the function that undoes it."""
    import torch.distributed as dist

    b, rank = x.shape[0], dist.get_rank()
    x_all = distributed.all_gather_no_grad(x)  # (W·B)×…
    perm = torch.randperm(x_all.shape[0], device=x.device) if rank == 0 else torch.empty(x_all.shape[0], dtype=torch.long, device=x.device)
    distributed.broadcast_(perm, src=0)
    inverse = torch.argsort(perm)
    mine = perm[rank * b:(rank + 1) * b]

    def restore(y: torch.Tensor) -> torch.Tensor:
        y_all = distributed.all_gather_no_grad(y)  # rows in shuffled order
        return y_all[inverse[rank * b:(rank + 1) * b]]

    return x_all[mine], restore

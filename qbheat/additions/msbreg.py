"""MSBReg: multiview centroid, singular-value and Brownian diffusive losses on pooled embeddings.

Moon, Buracas, Park, Kim, Canny, "An Embedding-Dynamic Approach to Self-supervised Learning",
WACV 2023 (arXiv 2207.03552). No official code is public. Facts and evidence tags are in
``/work/shared/reference/other_seeds.md`` §1; what the paper's retrieved text says [P]:

- embeddings are particles; an attractive force between views of the same image, a local
  dispersive force (Brownian motion) and a global dispersive force toward homogeneous density;
- a delayed-parameter (BYOL-style momentum) network and several views;
- the terms act on the embedding layer only, and can be added to other methods.

**The formulas below are inferred [I], not read from the paper** (its method section was not
retrievable); each function's docstring names the form it implements:

- multiview centroid loss (attraction):  L_MC = mean_i ‖c_i − c'_i‖², c_i the normalised mean of
  the online views' unit predictions, c'_i the same for the delayed network's unit projections;
- singular-value loss (global dispersion):  L_SV = (1/D) Σ_k (D σ_k² − 1)², σ_k the singular
  values of the centred batch Z/√(N−1); zero when the spectrum is flat (whitened unit embeddings);
- Brownian diffusive loss (local dispersion):  L_B = mean_{i,m} ⟨p̂_i^m, r̂_i⟩ with a fresh random
  unit direction r̂_i per image and step: a random kick of fixed size, no other particle needed.

Total, added to the method's loss:  λ_MC L_MC + λ_SV L_SV + λ_B L_B.

How it attaches to a method (our design): MSBReg owns a BYOL-style projector g and predictor q
on the method's pooled embeddings, and a delayed projector g_ξ (EMA of g). The delayed encoder
is the method's own momentum encoder when it has one (MoCo-v2's key encoder, whose key-view
features arrive as ``out["momentum_embeddings"]``); otherwise (QB-Heat) MSBReg keeps an EMA copy
of the backbone and encodes ``out["target_inputs"]`` with it, the way the method encodes. With
MoCo-v2 the online view is the query and the delayed view the key (M = 1 + 1, cross-view); with
QB-Heat both see the same visible quarter. The online side is Σ views the method gives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from qbheat import distributed
from qbheat.additions import register_addition
from qbheat.errors import QBHeatError
from qbheat.methods._momentum import momentum_at, momentum_copy, momentum_update_

if TYPE_CHECKING:
    from qbheat.config import PretrainConfig

NORMS = ("layer", "batch")
MOMENTUM_SCHEDULES = ("constant", "cosine")


@dataclass
class MSBRegConfig:
    """MSBReg options. Loss weights, widths and the EMA rate were not retrieved from the paper."""

    weight_centroid: float = 1.0  # λ_MC (choice: the attraction term at unit weight, as BYOL's loss)
    weight_singular_value: float = 1.0  # λ_SV (choice; the loss is already a mean over D)
    weight_brownian: float = 0.1  # λ_B: labd_brownian of the secondary code [S] (czi-ai/sub-cell-embed)
    per_sample_noise: bool = True  # one random direction per image (False: one per batch, the [S] EMA variant)
    dim: int = 256  # projection width (BYOL)
    hidden_dim: int = 4096  # projector / predictor hidden width (BYOL)
    norm: str = "layer"  # "layer" (choice: MSBReg decouples dispersion from BatchNorm) or "batch" (BYOL)
    momentum: float = 0.996  # delayed network EMA rate (BYOL's base τ)
    momentum_schedule: str = "cosine"  # BYOL: τ rises to 1 along a half cosine

    def problems(self) -> list[str]:
        out = []
        for name in ("weight_centroid", "weight_singular_value", "weight_brownian"):
            if getattr(self, name) < 0:
                out.append(f"msbreg.{name} must be ≥ 0, not {getattr(self, name)}")
        if self.dim < 2 or self.hidden_dim < 1:
            out.append("msbreg.dim must be ≥ 2 and msbreg.hidden_dim ≥ 1")
        if self.norm not in NORMS:
            out.append(f"msbreg.norm must be one of {list(NORMS)}, not {self.norm!r}")
        if not 0.0 <= self.momentum <= 1.0:
            out.append(f"msbreg.momentum must lie in [0, 1], not {self.momentum}")
        if self.momentum_schedule not in MOMENTUM_SCHEDULES:
            out.append(f"msbreg.momentum_schedule must be one of {list(MOMENTUM_SCHEDULES)}")
        return out


# ---------------------------------------------------------------------------------------------
# The three terms as pure functions (float32).
# ---------------------------------------------------------------------------------------------

def multiview_centroid_loss(online: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Multiview centroid loss [I]: mean_i ‖c_i − c'_i‖² = mean_i (2 − 2⟨c_i, c'_i⟩).

    online: N×M×D online predictions (M views), target: N×M'×D delayed-network projections.
    Every view is ℓ2-normalised, the per-image mean over views is the centroid, and the centroid
    is normalised again: c_i = n(Σ_m n(p_i^m)), c'_i = n(Σ_m n(z_i^m)). ``target`` gets no gradient.
    The paper's caption: "minimize the distance between centroids of online and target network
    embeddings of different views of the same image".
    """
    c_on = F.normalize(F.normalize(online.float(), dim=-1).mean(dim=1), dim=-1)  # N×D
    c_tg = F.normalize(F.normalize(target.detach().float(), dim=-1).mean(dim=1), dim=-1)  # N×D
    return (2.0 - 2.0 * (c_on * c_tg).sum(dim=-1)).mean()


def singular_value_loss(z: torch.Tensor) -> torch.Tensor:
    """Singular-value loss [I, form (c1) of the spec]: (1/D) Σ_{k=1..D} (D σ_k² − 1)².

    z: N×D embeddings (the whole batch, all views). σ_k are the singular values of the centred
    Z/√(N−1), i.e. σ_k² the eigenvalues of the covariance C (zeros included when N ≤ D). Computed
    without a decomposition through Σ σ_k⁴ = ‖C‖_F² and Σ σ_k² = tr C:
    L = D ‖C‖_F² − 2 tr C + 1 = D ‖C − I/D‖_F² (a flat spectrum is a whitened covariance).
    ‖C‖_F² uses the smaller of the D×D and N×N Gram matrices. With N ≤ D embeddings at least
    D − N + 1 eigenvalues are zero, so the loss cannot fall below (D − N + 1)/D: use a global batch
    larger than ``msbreg.dim`` for a reachable optimum (it is gathered over all processes).
    """
    n, d = z.shape
    if n < 2:
        raise QBHeatError("the singular-value loss needs at least two embeddings in the batch; raise batch_size.")
    zc = z.float() - z.float().mean(dim=0, keepdim=True)
    gram = zc.t() @ zc if d <= n else zc @ zc.t()  # same non-zero spectrum
    frob2 = gram.pow(2).sum() / (n - 1) ** 2  # ‖C‖_F²
    trace = zc.pow(2).sum() / (n - 1)  # tr C
    return d * frob2 - 2.0 * trace + 1.0


def brownian_diffusive_loss(online: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Brownian diffusive loss [I]: mean_{i,m} ⟨n(p_i^m), r̂_i⟩.

    online: N×M×D; directions: N×D (one per image) or 1×D (one per batch) unit vectors, drawn
    afresh every step. The gradient on each unit embedding is the constant r̂_i, whose tangential
    part is an isotropic random kick: summed over steps, Brownian motion on the sphere. It needs
    no other particle's coordinates, as the paper stresses.
    """
    p = F.normalize(online.float(), dim=-1)
    return (p * directions.float()[:, None, :]).sum(dim=-1).mean()


def random_directions(n: int, d: int, device: torch.device) -> torch.Tensor:
    """n random unit vectors in R^d (isotropic), from torch's global generator."""
    return F.normalize(torch.randn(n, d, device=device), dim=-1)


# ---------------------------------------------------------------------------------------------
# The module: projector, predictor, delayed network state.
# ---------------------------------------------------------------------------------------------

def byol_mlp(in_dim: int, hidden_dim: int, out_dim: int, norm: str) -> nn.Sequential:
    """BYOL's projector / predictor: Linear → norm → ReLU → Linear."""
    layer = nn.LayerNorm(hidden_dim) if norm == "layer" else nn.BatchNorm1d(hidden_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), layer, nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


@register_addition("msbreg")  # a regularizer: switched on by ``regularizers: [msbreg]``
class MSBReg(nn.Module):
    """The MSBReg regularizer for any method (see the module docstring).

    ``forward(out)`` reads ``out["embeddings"]`` (online, B×F per view) and either
    ``out["momentum_embeddings"]`` or, through its own delayed backbone, ``out["target_inputs"]``.
    Returns {"loss" (weighted sum), "centroid", "singular_value", "brownian"} (terms unweighted).
    """

    Config = MSBRegConfig

    def __init__(self, cfg: MSBRegConfig, method: nn.Module):
        super().__init__()
        bad = cfg.problems()
        if bad:
            raise QBHeatError(bad[0] + ".")
        self.cfg = cfg
        width = int(method.embedding_dim)
        self.projector = byol_mlp(width, cfg.hidden_dim, cfg.dim, cfg.norm)
        self.predictor = byol_mlp(cfg.dim, cfg.hidden_dim, cfg.dim, cfg.norm)
        self.target_projector = momentum_copy(self.projector)
        self.uses_method_momentum = bool(getattr(method, "has_momentum_encoder", False))
        # Not submodules: the method owns them (a tuple keeps nn.Module from registering them).
        self._online = (method.backbone, method.features)
        self.delayed_backbone = None if self.uses_method_momentum else momentum_copy(method.backbone)
        self.momentum = cfg.momentum

    @classmethod
    def from_config(cls, config: "PretrainConfig", method: nn.Module) -> "MSBReg":
        return cls(config.msbreg, method)

    def _targets(self, out: dict[str, Any]) -> list[torch.Tensor]:
        """Delayed-encoder pooled features, one B×F per target view, without gradients."""
        if self.uses_method_momentum:
            return [h.detach() for h in out["momentum_embeddings"]]
        encode = self._online[1]
        with torch.no_grad():
            return [encode(x, self.delayed_backbone)[1].detach() for x in out["target_inputs"]]

    def forward(self, out: dict[str, Any]) -> dict[str, torch.Tensor]:
        online = torch.stack([self.predictor(self.projector(h)) for h in out["embeddings"]], dim=1)  # N×M×D
        with torch.no_grad():
            target = torch.stack([self.target_projector(h) for h in self._targets(out)], dim=1)  # N×M'×D
        n, m, d = online.shape
        l_mc = multiview_centroid_loss(online, target)
        unit = F.normalize(online.float(), dim=-1)
        l_sv = singular_value_loss(distributed.all_gather_with_grad(unit.reshape(n * m, d)))  # global batch
        r = random_directions(n if self.cfg.per_sample_noise else 1, d, online.device)
        l_b = brownian_diffusive_loss(online, r)
        c = self.cfg
        loss = c.weight_centroid * l_mc + c.weight_singular_value * l_sv + c.weight_brownian * l_b
        return {"loss": loss, "centroid": l_mc.detach(), "singular_value": l_sv.detach(), "brownian": l_b.detach()}

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """EMA of the delayed projector (and delayed backbone, if MSBReg owns one)."""
        self.momentum = momentum_at(self.cfg.momentum, progress, self.cfg.momentum_schedule)
        momentum_update_(self.target_projector, self.projector, self.momentum)
        if self.delayed_backbone is not None:
            momentum_update_(self.delayed_backbone, self._online[0], self.momentum)

"""QB-Heat: masked image modelling with one visible quarter block and a heat-equation predictor.

Chen et al., "Self-Supervised Learning based on Heat Equation", arXiv 2211.13228 (2022). Facts
used here (see ``/work/shared/reference/qbheat_mobileformer.md`` §A):

- [paper] One block of quarter-image size stays visible; the other three quarters are masked and
  extrapolated linearly from the encoder's features of the visible block.
- [paper, Fig. 1] First-order simplification of the steady, anisotropic heat (Laplace) equation:
  ∂z/∂x = A z and ∂z/∂y = B z with learned C×C matrices A, B; forward-Euler finite differences
  give z(x+Δx, y) = (I + A) z(x, y) and z(x, y+Δy) = (I + B) z(x, y) (Δ folded into A and B).
- [secondary] A smaller decoder reconstructs the image from the predicted full feature map.

Choices where the paper is silent (each one a ``QBHeatConfig`` field):

- ``visible_corner``: "top_left" (Fig. 1's layout), "random" per sample (the default: on Fashion-MNIST,
  whose items are centred, a fixed top-left quarter is mostly background; see
  ``benchmarks/results/qbheat_ablation.md``), or "centre": the visible block is the image's central
  half-by-half block and the step goes outwards in all eight directions (``centre_latent``; on
  validation over two seeds it tied with the random corner, 80.4 ± 1.3 vs 80.6 ± 0.4 linear, so the
  random corner stays the default). A step
  towards −x uses z(x−Δx) = (I − A) z, the same forward-Euler step taken the other way.
- ``diagonal``: order of the two steps for the diagonal quarter, (I+B)(I+A) ("x_then_y"), the
  reverse, or their average; they differ unless A and B commute.
- ``feature_strides``: which encoder levels are extrapolated, each with its own predictor and
  decoder; the loss is the mean of their reconstruction losses. None picks the last level and the
  one before it when the last level's quarter grid tiles the image (strides 16 and 32 at 64, 128 or
  256 px), so that the last stage, which probes, detectors and exported heads read, is trained too;
  at 224 px only stride 16 tiles and is chosen. A stage
  deeper than every chosen level takes no part in QB-Heat and is not trained by it.
- ``token_conditioning``: on Mobile-Former, each decoder also reads global token 0 (after the final
  Mobile→Former bridge) through a linear map added to its input, so the final bridge and the
  tokens, which the pooled features append, are trained by the loss as well.
- The predictor jumps a whole quarter in one step (block-wise, as Fig. 1 labels the quarters);
  per-cell stepping (I + A)^k collapses to one learned linear map anyway.
- The decoder (``PixelDecoder``), the target (per-patch normalised pixels, MAE's ``norm_pix_loss``)
  and the loss (mean squared error over the three masked quarters) follow MAE (He et al., 2021).
- A and B start at zero, so the first prediction copies the visible features; weight decay pulls
  them back towards that "no change" step.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from qbheat.errors import QBHeatError
from qbheat.methods import register_method
from qbheat.methods._recipe import OptimRecipe

if TYPE_CHECKING:
    from qbheat.config import PretrainConfig

CORNERS = ("top_left", "random", "centre")
DIAGONALS = ("x_then_y", "y_then_x", "average")


@dataclass
class QBHeatConfig:
    """QB-Heat options. Every default is a choice (the paper's body and code are not public)."""

    visible_corner: str = "random"  # Fig. 1 shows the top left; a random corner won on validation (issue 19)
    diagonal: str = "x_then_y"  # (I+B)(I+A) z for the diagonal quarter; order is a choice
    feature_strides: list[int] | None = None  # None: the two deepest strides whose quarters tile the image
    token_conditioning: bool = True  # decoders read Mobile-Former's global token 0 (trains the final bridge)
    decoder_dim: int = 128  # light decoder width (choice; "smaller decoder" [secondary source])
    decoder_depth: int = 1  # residual 3×3 conv blocks in the decoder (choice)
    norm_pix_loss: bool = True  # per-patch normalised pixel target, as MAE's norm_pix_loss (choice)

    def problems(self) -> list[str]:
        out = []
        if self.visible_corner not in CORNERS:
            out.append(f"qbheat.visible_corner must be one of {list(CORNERS)}, not {self.visible_corner!r}")
        if self.diagonal not in DIAGONALS:
            out.append(f"qbheat.diagonal must be one of {list(DIAGONALS)}, not {self.diagonal!r}")
        if self.feature_strides is not None:
            bad = [s for s in self.feature_strides if s < 1 or s & (s - 1)]
            if not self.feature_strides or bad or len(set(self.feature_strides)) != len(self.feature_strides):
                out.append("qbheat.feature_strides must list distinct powers of two (e.g. [16, 32]) or be null, "
                           f"not {self.feature_strides}")
        if self.decoder_dim < 1 or self.decoder_depth < 0:
            out.append("qbheat.decoder_dim must be ≥ 1 and qbheat.decoder_depth ≥ 0")
        return out


# ---------------------------------------------------------------------------------------------
# Quarter blocks: which quarter is visible, the visible crop and the mask.
# A sample's visible quarter is (cy, cx) ∈ {0, 1}²: row 0 = top, column 0 = left.
# ---------------------------------------------------------------------------------------------

def sample_visible_corners(batch: int, corner: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column (each B, int64 in {0, 1}) of every sample's visible quarter."""
    if corner == "top_left":
        zero = torch.zeros(batch, dtype=torch.long, device=device)
        return zero, zero.clone()
    if corner == "centre":
        raise ValueError("the centred block is not a quarter; use centre_latent and centre_block_mask")
    if corner == "random":
        cy = torch.randint(0, 2, (batch,), device=device)
        cx = torch.randint(0, 2, (batch,), device=device)
        return cy, cx
    raise ValueError(f"unknown visible corner {corner!r}")


def _quarters(x: torch.Tensor) -> torch.Tensor:
    """B×C×H×W → B×2×2×C×H/2×W/2, indexed [b, row, col]."""
    b, c, h, w = x.shape
    return x.reshape(b, c, 2, h // 2, 2, w // 2).permute(0, 2, 4, 1, 3, 5)


def visible_quarter(x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor) -> torch.Tensor:
    """The one block the encoder sees: B×C×H×W → B×C×H/2×W/2, quarter (cy[b], cx[b]) of sample b."""
    if x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible into quarters")
    return _quarters(x)[torch.arange(x.shape[0], device=x.device), cy, cx]


def quarter_block_mask(cy: torch.Tensor, cx: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boolean B×1×H×W mask, True on the three masked quarters, False on the visible one."""
    rows = torch.arange(height, device=cy.device).div(height // 2, rounding_mode="floor")  # H: 0 top, 1 bottom half
    cols = torch.arange(width, device=cx.device).div(width // 2, rounding_mode="floor")  # W: 0 left, 1 right half
    visible = (rows[None, :, None] == cy[:, None, None]) & (cols[None, None, :] == cx[:, None, None])
    return ~visible[:, None]  # B×1×H×W


def centre_block_mask(batch: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """Boolean B×1×H×W mask, True outside the central (H/2)×(W/2) block, False on it."""
    rows = (torch.arange(height, device=device) - height // 4).div(height // 2, rounding_mode="floor") != 0
    cols = (torch.arange(width, device=device) - width // 4).div(width // 2, rounding_mode="floor") != 0
    return (rows[:, None] | cols[None, :]).expand(batch, 1, height, width)


def centre_latent(z: torch.Tensor, predictor: "HeatPredictor") -> torch.Tensor:
    """Full latent map B×C×2c×2c around a centred visible block's features z (B×C×c×c).

    The eight neighbouring blocks, one block-width away in each direction, are heat steps of z:
    (I ± A) z sideways, (I ± B) z up and down, both for the diagonals. Laid out 3×3 they span
    [−c/2, 5c/2) around the image's 2c cells; the image's window is cut out. Where c is odd the
    layout is first repeated 2× (nearest) so the window falls on whole cells, then pooled back.
    """
    b = z.shape[0]
    ones = torch.ones(b, device=z.device)
    right, down, down_right = predictor(z, ones, ones)
    left, up, up_left = predictor(z, -ones, -ones)
    _, _, up_right = predictor(z, ones, -ones)
    _, _, down_left = predictor(z, -ones, ones)
    grid = torch.cat([torch.cat(row, dim=3) for row in
                      ((up_left, up, up_right), (left, z.float(), right), (down_left, down, down_right))], dim=2)
    c = z.shape[-1]
    if c % 2 == 0:
        return grid[..., c // 2: c // 2 + 2 * c, c // 2: c // 2 + 2 * c]
    fine = grid.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # 6c cells; the image is [c, 5c)
    return F.avg_pool2d(fine[..., c: 5 * c, c: 5 * c], 2)


def assemble_quarters(z: torch.Tensor, z_h: torch.Tensor, z_v: torch.Tensor, z_d: torch.Tensor,
                      cy: torch.Tensor, cx: torch.Tensor) -> torch.Tensor:
    """Lay out the visible, horizontal, vertical and diagonal quarters (each B×C×h×w) as B×C×2h×2w.

    Quarter (r, c) of sample b holds the visible features if (r, c) = (cy, cx), the horizontal
    neighbour's if only c differs, the vertical neighbour's if only r differs, else the diagonal's.
    """
    same_row = [(cy == r)[:, None, None, None] for r in (0, 1)]
    same_col = [(cx == c)[:, None, None, None] for c in (0, 1)]
    rows = []
    for r in (0, 1):
        cells = [torch.where(same_row[r], torch.where(same_col[c], z, z_h), torch.where(same_col[c], z_v, z_d)) for c in (0, 1)]
        rows.append(torch.cat(cells, dim=3))
    return torch.cat(rows, dim=2)  # B×C×2h×2w


# ---------------------------------------------------------------------------------------------
# The heat predictor.
# ---------------------------------------------------------------------------------------------

class HeatPredictor(nn.Module):
    """First-order heat-equation predictor: z(x±Δx, y) = (I ± A) z and z(x, y±Δy) = (I ± B) z.

    Implements the finite-difference form of ∂z/∂x = A z, ∂z/∂y = B z (QB-Heat, Fig. 1). A and B
    are C×C and shared by all positions and images, i.e. two bias-free 1×1 convolutions added to
    the identity. The sign ±1 per sample points the step towards the masked neighbour. Runs in
    float32 even under autocast (a choice: the predictor is tiny and its products compound).
    """

    def __init__(self, dim: int, diagonal: str = "x_then_y"):
        super().__init__()
        if diagonal not in DIAGONALS:
            raise ValueError(f"unknown diagonal order {diagonal!r}")
        self.dim, self.diagonal = dim, diagonal
        self.A = nn.Parameter(torch.zeros(dim, dim))  # horizontal derivative operator
        self.B = nn.Parameter(torch.zeros(dim, dim))  # vertical derivative operator

    @staticmethod
    def _step(z: torch.Tensor, m: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
        # (I + s·M) z for every position: z + s · (M z); z: B×C×h×w, sign: B
        return z + sign[:, None, None, None] * torch.einsum("oc,bchw->bohw", m, z)

    def forward(self, z: torch.Tensor, sx: torch.Tensor | None = None, sy: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z: B×C×h×w visible features → (horizontal, vertical, diagonal) neighbours, each B×C×h×w."""
        b = z.shape[0]
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            sx = torch.ones(b, device=z.device) if sx is None else sx.to(z.dtype)
            sy = torch.ones(b, device=z.device) if sy is None else sy.to(z.dtype)
            z_h = self._step(z, self.A, sx)
            z_v = self._step(z, self.B, sy)
            if self.diagonal == "x_then_y":
                z_d = self._step(z_h, self.B, sy)
            elif self.diagonal == "y_then_x":
                z_d = self._step(z_v, self.A, sx)
            else:
                z_d = 0.5 * (self._step(z_h, self.B, sy) + self._step(z_v, self.A, sx))
        return z_h, z_v, z_d


# ---------------------------------------------------------------------------------------------
# Decoder and loss.
# ---------------------------------------------------------------------------------------------

class _LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of a B×C×H×W map (per position, so independent of batch size)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _ResidualConv(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = _LayerNorm2d(dim)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(F.gelu(self.norm(x)))


class PixelDecoder(nn.Module):
    """Light decoder: full latent map B×C×2h×2w → image B×3×H×W (a choice; the paper's is unknown).

    1×1 projection to ``dim``, ``depth`` residual 3×3 conv blocks (pre-LayerNorm, GELU) that mix
    information across quarter borders, then a 1×1 conv to stride²·3 values per cell that
    pixel-shuffle into a stride×stride patch, like MAE's per-patch linear prediction.
    """

    def __init__(self, in_dim: int, dim: int, depth: int, stride: int, out_chans: int = 3, cond_dim: int = 0):
        super().__init__()
        self.stride = stride
        self.embed = nn.Conv2d(in_dim, dim, 1)
        self.cond = nn.Linear(cond_dim, dim) if cond_dim else None  # a global vector added to every cell
        self.blocks = nn.Sequential(*[_ResidualConv(dim) for _ in range(depth)])
        self.norm = _LayerNorm2d(dim)
        self.to_pixels = nn.Conv2d(dim, stride * stride * out_chans, 1)

    def patches(self, latent: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Each cell's stride×stride×3 patch, B×(3·stride²)×2h×2w in ``F.pixel_unshuffle``'s channel order."""
        x = self.embed(latent)  # B×D×2h×2w
        if self.cond is not None:
            x = x + self.cond(cond.float())[:, :, None, None]
        x = self.blocks(x)
        return self.to_pixels(self.norm(x))

    def forward(self, latent: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        return F.pixel_shuffle(self.patches(latent, cond), self.stride)  # B×3×H×W


def masked_reconstruction_loss(pred: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, patch: int,
                               norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Mean squared error over masked patches (MAE, He et al. 2021, Eq. in §3 "Reconstruction target").

    pred, image: B×3×H×W; mask: B×1×H×W, True where masked. ``masked_patch_loss`` of the predicted
    image's patches (the training step skips the pixel shuffle and calls that directly).
    """
    return masked_patch_loss(F.pixel_unshuffle(pred, patch), image, mask, patch, norm_pix, eps)


def masked_patch_loss(pred: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, patch: int,
                      norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """The reconstruction loss on per-cell patch predictions, B×(C·p²)×H/p×W/p (``F.pixel_unshuffle`` order).

    The target is the image unshuffled the same way, so each cell's channels are its p×p×C patch:
    with ``norm_pix`` it is normalised by that patch's mean and (unbiased) variance (MAE's
    ``norm_pix_loss``). The loss is the mean squared error over masked pixels, which for masks of
    whole patches is the mean over masked patches of the per-patch mean squared error (the centred
    block's mask cuts patches at stride 32). Working in this layout keeps every reduction over one
    dimension and leaves the pixel shuffle out of the graph: no permuted copies of the prediction,
    the target or their gradients.
    """
    b, c = image.shape[:2]
    with torch.no_grad():
        target = F.pixel_unshuffle(image.float(), patch)  # B×(C·p²)×h×w
        if norm_pix:
            mean = target.mean(dim=1, keepdim=True)
            var = target.var(dim=1, keepdim=True)
            target = (target - mean) / (var + eps).sqrt()
        weight = F.pixel_unshuffle(mask.float(), patch)  # B×p²×h×w, 1 on masked pixels
    err = (pred.float() - target).square().reshape(b, c, patch * patch, *pred.shape[-2:]).sum(dim=1)  # B×p²×h×w
    return (err * weight).sum() / (weight.sum() * c).clamp(min=1.0)


# ---------------------------------------------------------------------------------------------
# Encoder features at a chosen stride, for any timm backbone with a spatial feature map.
# ---------------------------------------------------------------------------------------------

def resolve_feature_levels(backbone: nn.Module, image_size: int, requested: list[int] | None) -> list[tuple[int, int]]:
    """(stride, channels) of each encoder level QB-Heat extrapolates, shallow to deep.

    The quarter of an ``image_size`` image must tile into whole cells at every level. With
    ``requested`` None: the last level and the one before it when the last level tiles (64, 128, 256 px
    on a stride-32 backbone), else only the deepest level that tiles (stride 16 at 224 px, which leaves
    the last stage untrained: pre-train at 256 px to train it).
    """
    info = getattr(backbone, "feature_info", None)
    if not info:
        raise QBHeatError(f"backbone {type(backbone).__name__} has no timm feature_info; QB-Heat needs a spatial feature map.")
    levels: dict[int, int] = {}
    for f in info:
        levels[int(f["reduction"])] = int(f["num_chs"])  # later (deeper) entries at a stride win
    quarter = image_size // 2
    if requested is not None:
        for s in requested:
            if s not in levels:
                raise QBHeatError(f"qbheat.feature_strides lists {s}, which is not a level of this backbone; "
                                  f"it offers strides {sorted(levels)}.")
            if quarter % s:
                raise QBHeatError(
                    f"image_size {image_size} gives a {quarter}-pixel quarter that stride {s} does not tile; "
                    f"use an image_size that is a multiple of {2 * s} or other qbheat.feature_strides."
                )
        return [(s, levels[s]) for s in sorted(requested)]
    fitting = sorted(s for s in levels if quarter % s == 0 and s >= 4)
    if not fitting:
        last = int(info[-1]["reduction"])
        raise QBHeatError(
            f"image_size {image_size} has no encoder stride whose quarter tiles ({sorted(levels)}); "
            f"use a multiple of {2 * last} (e.g. {4 * last})."
        )
    # the last level and the one before it where the last tiles; else only the deepest that tiles
    chosen = fitting[-2:] if fitting[-1] == int(info[-1]["reduction"]) else fitting[-1:]
    return [(s, levels[s]) for s in chosen]


@register_method("qbheat")
class QBHeat(nn.Module):
    """QB-Heat pre-training around any timm backbone that has a spatial feature map.

    ``batch`` is a list of views, each B×3×H×W; QB-Heat uses the first (one view per image).
    Returns {"loss", "embeddings": [pooled visible-quarter features B×C], "features": [their map
    B×C×h×w], "target_inputs": [the visible quarter B×3×H/2×W/2]}.
    """

    name = "qbheat"
    Config = QBHeatConfig
    num_views = 1
    has_momentum_encoder = False
    # The deeper stages and the pooled head of the backbone may take no part in the loss.
    ddp_find_unused_parameters = True
    # MAE's pre-training recipe (He et al. 2021, Table 8): the QB-Heat recipe was not retrieved.
    recipe = OptimRecipe(optimizer="adamw", base_lr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95),
                         warmup_fraction=0.05, grad_clip=3.0, decay_1d=False)

    def __init__(self, backbone: nn.Module, cfg: QBHeatConfig, image_size: int):
        super().__init__()
        bad = cfg.problems()
        if bad:
            raise QBHeatError(bad[0] + ".")
        self.cfg, self.image_size = cfg, image_size
        self.backbone = backbone
        levels = resolve_feature_levels(backbone, image_size, cfg.feature_strides)
        self.feature_strides = [s for s, _ in levels]
        last_stride = int(backbone.feature_info[-1]["reduction"])
        self._reaches_last = self.feature_strides[-1] == last_stride  # the full forward pass is needed
        self._stop_early = "stop_early" in inspect.signature(backbone.forward_intermediates).parameters \
            if hasattr(backbone, "forward_intermediates") else False
        token_dim = getattr(getattr(backbone, "cfg", None), "token_dim", 0)  # Mobile-Former's global tokens
        cond_dim = token_dim if cfg.token_conditioning and self._reaches_last else 0
        self.predictors = nn.ModuleList(HeatPredictor(c, cfg.diagonal) for _, c in levels)
        self.decoders = nn.ModuleList(PixelDecoder(c, cfg.decoder_dim, cfg.decoder_depth, s, cond_dim=cond_dim)
                                      for s, c in levels)
        self.embedding_dim = levels[-1][1]  # width of the pooled deepest visible-quarter features

    def encoder_input_size(self, image_size: int) -> int:
        """The encoder sees one quarter block: half the image side."""
        return image_size // 2

    @classmethod
    def from_config(cls, config: "PretrainConfig", backbone: nn.Module) -> "QBHeat":
        return cls(backbone, config.qbheat, config.image_size)

    @staticmethod
    def view_transform(config: "PretrainConfig"):
        """One MAE-style view per image: random resized crop + horizontal flip (a choice, see module doc)."""
        from qbheat.data.transforms import MultiView, mae_augmentation

        return MultiView(mae_augmentation(config.image_size, tuple(config.crop_scale), config.mean, config.std), 1)

    def encode(self, x: torch.Tensor, backbone: nn.Module | None = None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Feature maps B×C×h×w of the visible quarter at each of ``feature_strides`` (shallow to deep),
        and Mobile-Former's global tokens B×T×d after the final bridge (None for other backbones, or
        when the deepest level is not the last one).

        ``backbone`` defaults to ``self.backbone``; a teacher or delayed copy of it (HSSL, MSBReg)
        encodes the same way.
        """
        from qbheat.models import feature_indices

        backbone = self.backbone if backbone is None else backbone
        idx = feature_indices(backbone, tuple(self.feature_strides))
        if self._reaches_last:
            final, maps = backbone.forward_intermediates(x, indices=idx)
            tokens = final[1] if isinstance(final, (tuple, list)) else None
            return list(maps), tokens
        kw: dict[str, Any] = {"stop_early": True} if self._stop_early else {}
        return list(backbone.forward_intermediates(x, indices=idx, intermediates_only=True, **kw)), None

    def features(self, x: torch.Tensor, backbone: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(deepest extrapolated feature map B×C×h×w, its global average B×C) of an encoder input."""
        z = self.encode(x, backbone)[0][-1]
        return z, z.float().mean(dim=(2, 3))

    def forward(self, batch: list[torch.Tensor]) -> dict[str, Any]:
        x = batch[0]  # B×3×H×W
        b, _, h, w = x.shape
        if h != self.image_size or w != self.image_size:
            raise QBHeatError(f"QB-Heat was built for {self.image_size}-pixel images but got {h}×{w}; keep image_size fixed.")
        centre = self.cfg.visible_corner == "centre"
        if centre:
            visible = x[:, :, h // 4: h // 4 + h // 2, w // 4: w // 4 + w // 2]  # B×3×H/2×W/2
            mask = centre_block_mask(b, h, w, x.device)  # B×1×H×W
        else:
            cy, cx = sample_visible_corners(b, self.cfg.visible_corner, x.device)
            visible = visible_quarter(x, cy, cx)  # B×3×H/2×W/2
            sx, sy = 1 - 2 * cx, 1 - 2 * cy  # +1: masked neighbour lies towards +x / +y
            mask = quarter_block_mask(cy, cx, h, w)  # B×1×H×W
        maps, tokens = self.encode(visible)  # per level B×C×h'×w'; B×T×d or None
        token0 = tokens[:, 0] if tokens is not None else None  # B×d
        losses = []
        for z, stride, predictor, decoder in zip(maps, self.feature_strides, self.predictors, self.decoders):
            cells = (h // 2) // stride
            if z.shape[-2:] != (cells, cells) or z.shape[1] != predictor.dim:
                raise ValueError(f"encoder gave {tuple(z.shape)} at stride {stride}; expected B×{predictor.dim}×{cells}×{cells}")
            if centre:
                latent = centre_latent(z, predictor)  # B×C×2h'×2w'
            else:
                z_h, z_v, z_d = predictor(z, sx, sy)
                latent = assemble_quarters(z.float(), z_h, z_v, z_d, cy, cx)  # B×C×2h'×2w'
            patches = decoder.patches(latent, token0)  # B×(3·stride²)×h/stride×w/stride
            losses.append(masked_patch_loss(patches, x, mask, stride, self.cfg.norm_pix_loss))
        out: dict[str, Any] = {"loss": torch.stack(losses).mean()}
        if len(losses) > 1:
            out |= {f"loss_s{s}": l.detach() for s, l in zip(self.feature_strides, losses)}
        z = maps[-1]
        # one view: a teacher or delayed encoder (HSSL, MSBReg) sees the same visible quarter
        return out | {"embeddings": [z.float().mean(dim=(2, 3))], "features": [z], "target_inputs": [visible]}

    def after_step(self, progress: float) -> None:
        """Nothing to update after the optimizer step (no momentum encoder)."""

"""HcNet: the Heat Conduction Network, as timm models.

Paper: Zhemin Zhang, Xun Gong, "Efficient Visual Representation Learning with Heat Conduction
Equation", IJCAI 2025 (arXiv 2408.05901; v1/v2 titled "HcNet: Image Modeling with Heat Conduction
Equation"). Official code: github.com/ZheminZhang1/HcNet (``HcNet/models/HcNet.py``, a Swin-codebase
fork). This file is our own implementation of the published layers; facts come from
``reference/other_seeds.md`` section 3.

Image features are temperatures u(x, y, t); a block is one explicit finite-difference (FDM) time step
of the heat equation ∂u/∂t = α (∂²u/∂x² + ∂²u/∂y²), and depth is time:

* ``HeatConduction`` (the HC layer) is the Euler step u ← u + α·Δt · Δ_K u, with a learnable
  zero-sum depthwise 5×5 stencil Δ_K (a discrete anisotropic Laplacian: a constant field does not
  change) and α·Δt = σ(W_g · GAP(u)) per channel, an SE-style gate that the paper reads as an
  input-adaptive thermal diffusivity times time step. The residual connection *is* the u^n term.
* ``RefinementApproximation`` (the RA layer) refines the step's result with a truncated series
  u ≈ Σ_k a_k φ_k: 1×1 conv C→rC with GELU gives rC non-linear "basis" responses, a depthwise
  3×3 filter refines them spatially, and a 1×1 conv rC→C combines them (the paper's Fourier-series
  reading of an FFN; the basis/coefficient correspondence is our interpretation).

Macro-architecture (official code): a two-conv stride-4 stem, four stages at strides 4/8/16/32,
a stride-2 conv + GroupNorm between stages, and GroupNorm → global average pool → linear head.

Where this file departs from the official code, on purpose:
  * The official blocks assert a fixed ``input_resolution``; here nothing depends on the input size,
    so any input divisible by 32 works (the stencil is local).
  * The official downsampling layer closes stages 1–3; here it opens stages 2–4 (the same
    computation), so that ``stages.i`` ends at stride 4·2^i and timm's feature taps sit at the
    strides they name.
  * The zero-sum stencil is applied as one depthwise conv with kernel K − s·δ_centre instead of
    ``DWConv_K(x) − s·x``. The two are equal (the centre tap never falls in the padding); the folded
    form is one op, which exports and runs faster.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ClassifierHead, DropPath, GroupNorm1, trunc_normal_
from timm.models import build_model_with_cfg, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from timm.models._registry import generate_default_cfgs

from qbheat.errors import QBHeatError

__all__ = [
    "HcNetConfig",
    "HCNET_CONFIGS",
    "HeatConduction",
    "RefinementApproximation",
    "HcNetBlock",
    "HcNetStage",
    "HeatStem",
    "HcNet",
]


@dataclass(frozen=True)
class HcNetConfig:
    """Architecture of one HcNet.

    Defaults are HcNet-T from the official code: widths [64, 128, 320, 512], RA ratio 4,
    5×5 stencil, 3×3 RA filter. Depths: the official ``HcNet-T.yaml`` says [3, 8, 18, 3] (28.0 M,
    4.76 G MACs) while the final model file's ``__main__`` says [5, 5, 14, 5] (28.6 M, 4.22 G MACs);
    only the latter matches the published "28 M params, 4.1 G MACs", so it is the default here
    (which one gave 83.0 % top-1 is not stated: an inference, see reference section 3.6).
    """

    widths: Tuple[int, int, int, int] = (64, 128, 320, 512)
    depths: Tuple[int, int, int, int] = (5, 5, 14, 5)
    ra_ratio: float = 4.0  # RA hidden width = ratio × C ("mlp_ratio" 4 in the official code)
    stencil_size: int = 5  # HC layer's learnable depthwise stencil (official: 5×5)
    ra_filter_size: int = 3  # RA layer's depthwise "Filters" (official: 3×3)
    drop_path_rate: float = 0.2  # HcNet-T.yaml DROP_PATH_RATE (linear over all blocks)

    def validate(self) -> None:
        if len(self.widths) != 4 or len(self.depths) != 4:
            raise QBHeatError(f"HcNet needs 4 widths and 4 depths, got {self.widths} and {self.depths}; give one per stage.")
        if min(self.widths) < 2 or min(self.depths) < 1:
            raise QBHeatError(f"HcNet widths must be ≥ 2 and depths ≥ 1, got {self.widths} and {self.depths}.")
        if self.widths[0] % 2:
            raise QBHeatError(f"HcNet's first width must be even (the stem's first conv has half of it), got {self.widths[0]}.")
        for name, k in (("stencil_size", self.stencil_size), ("ra_filter_size", self.ra_filter_size)):
            if k < 1 or k % 2 == 0:
                raise QBHeatError(f"HcNet {name} must be an odd positive kernel size, got {k}.")
        if self.ra_ratio <= 0:
            raise QBHeatError(f"HcNet ra_ratio must be positive, got {self.ra_ratio}.")


# hcnet_tiny is HcNet-T as published. The edge variants are our choice (only HcNet-T is published):
# they keep HcNet-T's block, width proportions 1:2:5:8 and stage depths [2, 2, 6, 2] (the official
# model's constructor default), and are sized to sit beside the Mobile-Former configs that qbheat
# benchmarks, so that a comparison is at equal MACs: edge_s at half of HcNet-T's width (≈ 0.50 G MACs,
# 3.5 M params, vs Mobile-Former-508M) and edge_xs at 3/8 (≈ 0.29 G MACs, 2.0 M params, vs
# Mobile-Former-294M). Depth is kept and width shrunk because the stencil's receptive field grows
# only with depth (about 2 px per block and stage). Drop-path 0.05 / 0 is also our choice: smaller
# models need less stochastic depth (HcNet-T uses 0.2).
HCNET_CONFIGS: Dict[str, HcNetConfig] = {
    "hcnet_tiny": HcNetConfig(),
    "hcnet_edge_s": HcNetConfig(widths=(32, 64, 160, 256), depths=(2, 2, 6, 2), drop_path_rate=0.05),
    "hcnet_edge_xs": HcNetConfig(widths=(24, 48, 120, 192), depths=(2, 2, 6, 2), drop_path_rate=0.0),
}


class HeatConduction(nn.Module):
    """The Heat Conduction (HC) layer: one explicit FDM step u + α·Δt ⊙ Δ_K u.

    Δ_K is a depthwise conv whose k×k kernel K_c is learned per channel and made zero-sum by
    subtracting its tap sum s_c at the centre (K_c − s_c δ), so a constant field is stationary as
    under true diffusion. α·Δt = σ(W_g GAP(u)) ∈ (0, 1)^C per image and channel (W_g: 1×1 conv,
    no bias). As in the official final code: no pre-norm, no drop-path, no biases, and zero padding,
    so a constant field is stationary in the interior while the k//2-pixel border sees a cold
    (zero-temperature) outside.
    """

    def __init__(self, channels: int, stencil_size: int = 5):
        super().__init__()
        # K: the learnable anisotropic stencil, C×1×k×k (official name "Anisotropic_conv").
        self.stencil = nn.Parameter(torch.empty(channels, 1, stencil_size, stencil_size))
        # W_g: α·Δt from the pooled temperatures (official name "DeltaT_DeltaD").
        self.diffusivity = nn.Conv2d(channels, channels, 1, bias=False)
        centre = torch.zeros(1, 1, stencil_size, stencil_size)
        centre[..., stencil_size // 2, stencil_size // 2] = 1.0
        self.register_buffer("centre", centre, persistent=False)  # δ at the centre tap
        trunc_normal_(self.stencil, std=0.02)
        trunc_normal_(self.diffusivity.weight, std=0.02)

    def laplacian_kernel(self) -> torch.Tensor:
        """The zero-sum stencil K − s·δ (C×1×k×k); each channel's taps sum to 0."""
        tap_sum = self.stencil.sum(dim=(2, 3), keepdim=True)  # C×1×1×1
        return self.stencil - tap_sum * self.centre

    def alpha_dt(self, u: torch.Tensor) -> torch.Tensor:
        """α·Δt = σ(W_g GAP(u)), B×C×1×1."""
        return torch.sigmoid(self.diffusivity(u.mean(dim=(2, 3), keepdim=True)))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        k = self.stencil.shape[-1]
        lap = F.conv2d(u, self.laplacian_kernel(), padding=k // 2, groups=u.shape[1])  # B×C×H×W
        return u + self.alpha_dt(u) * lap


class RefinementApproximation(nn.Module):
    """The Refinement Approximation (RA) layer: u + DropPath(FC2(Drop(DW(GELU(FC1(GN(u))))))).

    FC1: 1×1 conv C→rC (bias), DW: depthwise k×k on rC (no bias, official "Filters"),
    FC2: 1×1 conv rC→C (bias); GN is GroupNorm(1, C). Read as a truncated series expansion that
    refines the HC step (paper); which op is "basis" and which "coefficient" is our reading.
    """

    def __init__(self, channels: int, ratio: float = 4.0, filter_size: int = 3, drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        hidden = int(channels * ratio)
        self.norm = GroupNorm1(channels)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.GELU()
        self.filters = nn.Conv2d(hidden, hidden, filter_size, padding=filter_size // 2, groups=hidden, bias=False)
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        for conv in (self.fc1, self.filters, self.fc2):
            trunc_normal_(conv.weight, std=0.02)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        basis = self.filters(self.act(self.fc1(self.norm(u))))  # B×rC×H×W
        return u + self.drop_path(self.drop(self.fc2(self.drop(basis))))


class HcNetBlock(nn.Module):
    """One time step: the HC layer, then the RA layer."""

    def __init__(self, channels: int, cfg: HcNetConfig, drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.heat_conduction = HeatConduction(channels, cfg.stencil_size)
        self.refinement = RefinementApproximation(channels, cfg.ra_ratio, cfg.ra_filter_size, drop, drop_path)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.refinement(self.heat_conduction(u))


class HeatStem(nn.Module):
    """Stride-4 stem: Conv3×3 s2 (→C/2, bias) → GN → GELU → Conv3×3 s2 (→C, bias) → GN."""

    def __init__(self, in_chans: int, out_chans: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans // 2, 3, stride=2, padding=1)
        self.norm1 = GroupNorm1(out_chans // 2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(out_chans // 2, out_chans, 3, stride=2, padding=1)
        self.norm2 = GroupNorm1(out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))  # B×C0×H/4×W/4


class HcNetStage(nn.Module):
    """Optional stride-2 downsampling (Conv3×3 s2, no bias → GN), then ``depth`` HcNet blocks."""

    def __init__(self, in_chans: int, out_chans: int, depth: int, cfg: HcNetConfig, downsample: bool,
                 drop: float = 0.0, drop_paths: Optional[List[float]] = None):
        super().__init__()
        if downsample:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chans, out_chans, 3, stride=2, padding=1, bias=False), GroupNorm1(out_chans)
            )
        else:
            self.downsample = nn.Identity()
        drop_paths = drop_paths or [0.0] * depth
        self.blocks = nn.Sequential(*[HcNetBlock(out_chans, cfg, drop, drop_paths[i]) for i in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class HcNet(nn.Module):
    """Heat Conduction Network with timm's model surface.

    ``forward_features`` returns the final GroupNorm'd map B×C×H/32×W/32; ``forward_head`` pools and
    classifies; ``feature_info`` names ``stages.0``..``stages.3`` at strides 4, 8, 16, 32.
    """

    def __init__(self, cfg: HcNetConfig = HcNetConfig(), num_classes: int = 1000, in_chans: int = 3,
                 global_pool: str = "avg", drop_rate: float = 0.0, drop_path_rate: Optional[float] = None,
                 proj_drop_rate: float = 0.0):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.stem = HeatStem(in_chans, cfg.widths[0])

        dpr = cfg.drop_path_rate if drop_path_rate is None else drop_path_rate
        rates = torch.linspace(0, dpr, sum(cfg.depths)).tolist()  # stochastic depth, linear in block index
        stages, self.feature_info, prev, start = [], [], cfg.widths[0], 0
        for i, (width, depth) in enumerate(zip(cfg.widths, cfg.depths)):
            stages.append(HcNetStage(prev, width, depth, cfg, downsample=i > 0, drop=proj_drop_rate,
                                     drop_paths=rates[start:start + depth]))
            self.feature_info.append(dict(num_chs=width, reduction=4 * 2 ** i, module=f"stages.{i}"))
            prev, start = width, start + depth
        self.stages = nn.Sequential(*stages)

        self.num_features = self.head_hidden_size = cfg.widths[-1]
        self.norm = GroupNorm1(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        if isinstance(self.head.fc, nn.Linear):
            trunc_normal_(self.head.fc.weight, std=0.02)
            nn.init.zeros_(self.head.fc.bias)
        # Stem and downsampling convs keep PyTorch's default init, as in the official code.

    # --- timm surface -------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None, **kwargs) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, **kwargs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # B×C0×H/4×W/4
        x = self.stages(x)  # B×C3×H/32×W/32
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (timm's contract): ``indices`` = last n stages if int, all if None, else those listed.

        ``norm`` applies the final GroupNorm to the last stage's map only (it is sized for it).
        """
        if output_fmt != "NCHW":
            raise QBHeatError(f"HcNet gives NCHW feature maps only, not {output_fmt!r}; pass output_fmt='NCHW'.")
        take, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                intermediates.append(self.norm(x) if norm and i == last else x)
        if intermediates_only:
            return intermediates
        if i == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop stages after the last wanted one (and the head), as timm's feature getter expects."""
        take, max_index = feature_take_indices(len(self.stages), indices)
        pruned_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_norm or pruned_end:
            self.norm = nn.Identity()
        if pruned_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or pruned_end:
            self.reset_classifier(0, "", in_features=self.num_features)
        return take


# --- registry -----------------------------------------------------------------------------------
def _cfg(**kwargs: Any) -> Dict[str, Any]:
    """Pre-processing that travels with the model. No URL: qbheat never downloads weights.

    ImageNet mean/std, 224² input, bicubic resize and crop 0.875 follow the official recipe
    (Swin codebase: bicubic interpolation, crop 0.875 at test time).
    """
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "stem.conv1", "classifier": "head.fc",
        "paper_ids": "arXiv:2408.05901",
        "paper_name": "Efficient Visual Representation Learning with Heat Conduction Equation",
        "origin_url": "https://github.com/ZheminZhang1/HcNet",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({name: _cfg() for name in HCNET_CONFIGS})


def _create_hcnet(variant: str, pretrained: bool = False, **kwargs: Any) -> HcNet:
    if pretrained:
        raise QBHeatError("HcNet has no downloadable weights in qbheat; pass a local checkpoint instead of pretrained=True.")
    return build_model_with_cfg(
        HcNet, variant, pretrained,
        model_cfg=HCNET_CONFIGS[variant],
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs,
    )


@register_model
def hcnet_tiny(pretrained: bool = False, **kwargs: Any) -> HcNet:
    """HcNet-T as published: widths [64, 128, 320, 512], depths [5, 5, 14, 5] (28.6 M, 4.2 G MACs at 224²)."""
    return _create_hcnet("hcnet_tiny", pretrained, **kwargs)


@register_model
def hcnet_edge_s(pretrained: bool = False, **kwargs: Any) -> HcNet:
    """Edge HcNet (our config): widths [32, 64, 160, 256], depths [2, 2, 6, 2] (3.5 M, 0.50 G MACs at 224²)."""
    return _create_hcnet("hcnet_edge_s", pretrained, **kwargs)


@register_model
def hcnet_edge_xs(pretrained: bool = False, **kwargs: Any) -> HcNet:
    """Edge HcNet (our config): widths [24, 48, 120, 192], depths [2, 2, 6, 2] (2.0 M, 0.29 G MACs at 224²)."""
    return _create_hcnet("hcnet_edge_xs", pretrained, **kwargs)


def config_dict(name: str) -> Dict[str, Any]:
    """The architecture of a registered HcNet as plain values (for model cards and reports)."""
    if name not in HCNET_CONFIGS:
        raise QBHeatError(f"unknown HcNet config {name!r}; choose one of {sorted(HCNET_CONFIGS)}.")
    return asdict(HCNET_CONFIGS[name])

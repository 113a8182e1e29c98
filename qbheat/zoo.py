"""The model zoo: each backbone qbheat knows, measured here beside its published figures.

Parameters are counted from the created model (its default classifier included); MACs are counted
with ``torch.utils.flop_counter.FlopCounterMode`` at the model's input size (224² unless noted),
batch 1, as FLOPs / 2. That counter sees convolutions and matrix products only (not BN,
activations, pooling or softmax), so measured MACs run a few percent under published ones that
count more. Mobile-Former's and MobileNetV3's papers say "FLOPs" for multiply-adds: the published
column holds those numbers, which are MACs. Nothing is cached: every call measures again.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from qbheat.errors import QBHeatError

__all__ = ["ZooEntry", "ZOO", "measure", "zoo_rows", "format_table"]


@dataclass(frozen=True)
class ZooEntry:
    """One zoo row's fixed facts. ``None`` where nothing is published."""

    name: str
    params_m: Optional[float]  # published parameters, millions
    macs_m: Optional[float]  # published multiply-adds at 224², millions
    top1: Optional[float]  # published ImageNet-1k top-1, %
    note: str = ""
    input_size: int = 224


_MF = "Mobile-Former README (AAboys/MobileFormer)"
ZOO: tuple[ZooEntry, ...] = (
    ZooEntry("mobileformer_26m", 3.2, 26, 64.0, _MF),
    ZooEntry("mobileformer_52m", 3.5, 52, 68.7, _MF),
    ZooEntry("mobileformer_96m", 4.6, 96, 72.8, _MF),
    ZooEntry("mobileformer_151m", 7.6, 151, 75.2, _MF),
    ZooEntry("mobileformer_214m", 9.4, 214, 76.7, _MF),
    ZooEntry("mobileformer_294m", 11.4, 294, 77.9, _MF),
    ZooEntry("mobileformer_508m", 14.0, 508, 79.3, _MF),
    ZooEntry("mobileformer_qbheat_285m", 5.8, 285, None,
             "stand-in for QB-Heat's encoder (not public; paper: 5.8 M, 285 M): the MF-294M architecture, "
             "6.69 M params without its classifier"),
    ZooEntry("mobileformer_micro", None, None, None, "ours, for 64 px Fashion-MNIST (10 classes)", input_size=64),
    ZooEntry("hcnet_tiny", 28.0, 4100, 83.0, "HcNet-T (IJCAI 2025)"),
    ZooEntry("hcnet_edge_s", None, None, None, "ours: HcNet at half HcNet-T's width, sized like MF-508M"),
    ZooEntry("hcnet_edge_xs", None, None, None, "ours: HcNet at 3/8 HcNet-T's width, sized like MF-294M"),
    ZooEntry("mobilenetv3_large_100", 5.4, 219, 75.2, "peer; MobileNetV3 paper Table 3 (timm's weights: 75.8)"),
    ZooEntry("mobilenetv3_small_100", 2.5, 56, 67.4, "peer; MobileNetV3 paper Table 3"),
)


def measure(name: str, input_size: int = 224) -> tuple[float, float]:
    """(parameters in millions, MACs in millions at input_size², batch 1) of a freshly created model."""
    from torch.utils.flop_counter import FlopCounterMode

    from qbheat.models import create_model

    model = create_model(name).eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, input_size, input_size))
    return params, counter.get_total_flops() / 2 / 1e6


def zoo_rows(pattern: Optional[str] = None) -> List[Dict[str, Any]]:
    """Measured and published figures for the zoo entries whose name matches the glob ``pattern``."""
    entries = [e for e in ZOO if pattern is None or fnmatch.fnmatch(e.name, pattern)]
    if not entries:
        raise QBHeatError(f"no zoo model matches {pattern!r}; try a glob such as 'mobileformer_*'.")
    rows = []
    for e in entries:
        params, macs = measure(e.name, e.input_size)
        rows.append(dict(
            name=e.name, input_size=e.input_size,
            params_m=round(params, 3), params_m_published=e.params_m,
            macs_m=round(macs, 1), macs_m_published=e.macs_m,
            macs_ratio=round(macs / e.macs_m, 3) if e.macs_m else None,
            top1_published=e.top1, note=e.note,
        ))
    return rows


def format_table(rows: List[Dict[str, Any]]) -> str:
    """A Markdown table of ``zoo_rows`` output."""
    def fmt(v: Any, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    lines = [
        "| model | input | params M (measured) | params M (published) | MACs M (measured) | MACs M (published) "
        "| MACs ratio | top-1 % (published) | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['input_size']} | {fmt(r['params_m'], '.2f')} | {fmt(r['params_m_published'], '.1f')} "
            f"| {fmt(r['macs_m'], '.1f')} | {fmt(r['macs_m_published'], '.0f')} | {fmt(r['macs_ratio'], '.3f')} "
            f"| {fmt(r['top1_published'], '.1f')} | {r['note']} |"
        )
    lines.append("")
    lines.append("MACs: multiply-accumulates counted by torch.utils.flop_counter (convs and matmuls only), "
                 "batch 1; published FLOPs of Mobile-Former and MobileNetV3 are multiply-adds (MACs).")
    return "\n".join(lines)

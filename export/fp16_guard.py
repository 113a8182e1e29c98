"""FP16 guard: find the modules that overflow in float16 before any FP16 artifact ships.

Two passes over the calibration images:

1. FP32 with forward hooks: a module whose output magnitude reaches ``margin × 65504`` (the largest
   float16) is a risk — its FP16 version overflows on these images or on slightly brighter ones.
2. FP16 (the whole model ``.half()``): a module whose inputs are finite but whose output is not
   is where an overflow (attention logits, LayerNorm variance, DyReLU's hyper-MLP, ...) is born.

3. Precision: every leaf module (no children) is run alone in float16 on the FP32 pass's inputs of the
   first batch and compared with its FP32 output. A module whose relative error exceeds
   ``precision_tol`` (1e-2, ours; a float16 op on well-scaled data is ~1e-3) loses its signal to
   rounding even without overflowing: e.g. a linear probe whose feature standardisation was folded
   into large weights and a bias that cancel (|w| ~ 1e3) gives logits with 20 % error in float16.

The union, reduced to the deepest modules (a parent is dropped when a child explains it), is
``overflowing``. Formats then keep those modules in FP32: ONNX by building the FP16 graph from
``half_with_fp32_islands`` (the pinned modules run in float32 inside an otherwise float16 graph;
TensorRT FP16 is built from that file); OpenVINO by marking the matching nodes
``disable_fp16_compression`` (found through the ONNX nodes' module scopes:
``export.openvino_format.onnx_nodes_in``); Core ML by excluding their ops from
``FP16ComputePrecision`` (``pinned_node_names`` maps module paths to the ExportedProgram's node
names, which Core ML keeps as op names). ``margin`` = 0.5 is ours.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

FP16_MAX = float(torch.finfo(torch.float16).max)


@dataclass
class GuardReport:
    checked_on: int
    overflowing: list[str] = field(default_factory=list)
    details: dict[str, dict] = field(default_factory=dict)

    fp16_checked_on: int = 0

    def card(self) -> dict:
        return {"checked_on": self.checked_on, "fp16_pass_on": self.fp16_checked_on, "overflowing": list(self.overflowing),
                "details": self.details}


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _float_max(ts: list[torch.Tensor]) -> float:
    vals = [float(t.detach().abs().float().max()) for t in ts if t.is_floating_point() and t.numel()]
    return max(vals) if vals else 0.0


def _all_finite(ts: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ts if t.is_floating_point())


@torch.no_grad()
def check(model: nn.Module, inputs: np.ndarray, margin: float = 0.5, batch: int = 4, fp16_images: int = 4,
          precision_tol: float = 1e-2) -> GuardReport:
    """Run ``model`` in FP32 on ``inputs`` (N×3×H×W) and in FP16 on the first ``fp16_images`` of them.

    The FP16 pass is limited (ours) because CPU float16 kernels are ~10× slower than float32; the
    FP32 magnitude pass, which sees every image, catches activations near the float16 limit.
    """
    report = GuardReport(checked_on=int(inputs.shape[0]))
    names = {m: n for n, m in model.named_modules() if n}
    peak: dict[str, float] = {}
    born: dict[str, str] = {}

    names32 = dict(names)
    leaves = {m for m in names if not any(True for _ in m.children())}
    first_io: dict[nn.Module, tuple] = {}

    def fp32_hook(mod, args, out):
        n = names.get(mod)
        if n is not None:
            peak[n] = max(peak.get(n, 0.0), _float_max(_tensors(out)))
            if mod in leaves and mod not in first_io and isinstance(out, torch.Tensor) and out.is_floating_point():
                first_io[mod] = (tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args),
                                 out.detach().clone())

    def fp16_hook(mod, args, out):
        n = names.get(mod)
        if n is not None and _all_finite(_tensors(args)) and not _all_finite(_tensors(out)):
            born.setdefault(n, "non-finite output from finite inputs in float16")

    x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))
    handles = [m.register_forward_hook(fp32_hook) for m in names]
    try:
        for i in range(0, len(x), batch):
            model(x[i:i + batch])
    finally:
        for h in handles:
            h.remove()
    half = copy.deepcopy(model).half()
    names_half = {m: n for n, m in half.named_modules() if n}
    names = names_half
    handles = [m.register_forward_hook(fp16_hook) for m in names_half]
    try:
        x16 = x[:fp16_images]
        report.fp16_checked_on = int(len(x16))
        for i in range(0, len(x16), batch):
            half(x16[i:i + batch].half())
    finally:
        for h in handles:
            h.remove()
    flagged = {n: {"reason": r} for n, r in born.items()}
    for mod, (args, out32) in first_io.items():
        if not any(isinstance(a, torch.Tensor) and a.is_floating_point() for a in args) or not out32.abs().max() > 0:
            continue
        try:
            out16 = copy.deepcopy(mod).half()(*(a.half() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                                for a in args))
        except (RuntimeError, TypeError):  # an op without a CPU float16 kernel: nothing to learn here
            continue
        if not isinstance(out16, torch.Tensor):
            continue
        rel = float((out16.float() - out32).norm() / out32.norm())
        if not rel <= precision_tol:  # also catches NaN
            flagged.setdefault(names32[mod], {"reason": f"float16 rounding error {rel:.2g} > {precision_tol} relative"})
            flagged[names32[mod]]["fp16_rel_err"] = rel
    for n, v in peak.items():
        if v >= margin * FP16_MAX:
            flagged.setdefault(n, {"reason": f"FP32 output reaches {v:.3g} ≥ {margin} × float16 max"})
            flagged[n]["fp32_peak"] = v
    deepest = [n for n in flagged if not any(o != n and o.startswith(n + ".") for o in flagged)]
    report.overflowing = sorted(deepest)
    report.details = {n: flagged[n] for n in report.overflowing}
    return report


class Fp32Island(nn.Module):
    """Runs ``module`` in float32 inside a float16 graph: casts float inputs up and outputs back down."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.float()

    def forward(self, *args):
        args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        out = self.module(*args)
        if isinstance(out, torch.Tensor):
            return out.half() if out.is_floating_point() else out
        return type(out)(o.half() if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in out)


class Float16Model(nn.Module):
    """``model`` in float16 with float32 inputs and outputs (like ``keep_io_types``), ``pinned`` modules in float32."""

    def __init__(self, model: nn.Module, pinned: list[str] = ()):
        super().__init__()
        half = copy.deepcopy(model).half()
        for path in pinned:
            parent_path, _, leaf = path.rpartition(".")
            parent = half.get_submodule(parent_path) if parent_path else half
            setattr(parent, leaf, Fp32Island(getattr(parent, leaf)))
        self.model = half
        self.output_names = getattr(model, "output_names", None)

    def forward(self, image: torch.Tensor):
        out = self.model(image.half())
        return tuple(o.float() if o.is_floating_point() else o for o in out)


def half_with_fp32_islands(model: nn.Module, pinned: list[str]) -> Float16Model:
    return Float16Model(model, pinned).eval()


def pinned_node_names(exported_program, module_paths: list[str]) -> set[str]:
    """Names of ExportedProgram nodes created inside any of ``module_paths`` (from ``nn_module_stack``)."""
    if not module_paths:
        return set()
    out = set()
    for node in exported_program.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        paths = [v[0] for v in stack.values()]
        for p in paths:
            p = p.replace("L['self'].", "").replace("L__self___", "")
            if any(p == m or p.startswith(m + ".") for m in module_paths):
                out.add(node.name)
                break
    return out

"""Where an artifact departs from PyTorch: the first module whose intermediate output falls below
the cosine tolerance.

``torch.onnx.export`` records on every ONNX node the module scopes it was created in
(``pkg.torch.onnx.name_scopes``: ``['', 'backbone', 'backbone.layer2', ..., <op>]``; the FP16 guard
reads the same map, ``export.openvino_format.onnx_nodes_in``). A module's output in the graph is
taken to be the output of the last node (in graph order) created inside its scope; where its shape
equals the module's PyTorch output (a forward hook on the model the file was exported from), the two
are compared per sample by cosine. Modules are visited in the order their last node runs (the deeper
one first where a module and its parent end on the same node), so a module comes before the blocks
that contain it, and the first one below ``tolerance`` is named.
Quantised graphs keep the original nodes and their scopes (Q/DQ pairs are added around them), so the
same map serves INT8 files. Q/DQ nodes and integer tensors are never compared.

When nothing falls below the tolerance (an accuracy drop spread thinly over the network), the result
names no module and gives the lowest cosine seen, and where.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import torch

from qbheat_contract.parity import error_stats

SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def scope_outputs(onnx_model) -> dict[str, tuple[str, str, int]]:
    """{module path: (tensor name, node name, position of that node)} — each module's last node."""
    last: dict[str, tuple[str, str, int]] = {}
    for i, node in enumerate(onnx_model.graph.node):
        meta = {p.key: p.value for p in node.metadata_props}
        if SCOPES_KEY not in meta or not node.output:
            continue
        try:
            scopes = ast.literal_eval(meta[SCOPES_KEY])
        except (ValueError, SyntaxError):
            continue
        for scope in scopes[1:-1]:  # the root '' and the op's own name are not modules
            last[scope] = (node.output[0], node.name, i)
    return last


def module_outputs(model: torch.nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    """Each named module's (first tensor) output on ``x``, by dotted path."""
    outs: dict[str, np.ndarray] = {}
    handles = []
    for name, mod in model.named_modules():
        if not name:
            continue

        def hook(_m, _args, out, name=name):
            t = out if isinstance(out, torch.Tensor) else next((o for o in out if isinstance(o, torch.Tensor)), None) \
                if isinstance(out, (tuple, list)) else None
            if t is not None and t.is_floating_point() and name not in outs:
                outs[name] = t.detach().float().numpy().copy()

        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
    finally:
        for h in handles:
            h.remove()
    return outs


def _onnx_intermediates(path: Path, tensors: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    known = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in known:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every named tensor
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    res = sess.run(names, {sess.get_inputs()[0].name: np.ascontiguousarray(x, np.float32)})
    return dict(zip(names, res))


def first_divergence(artifact: str | os.PathLike, model: torch.nn.Module, x: np.ndarray, tolerance: float) -> dict | None:
    """The first module of an ONNX artifact whose output's cosine with PyTorch's is below ``tolerance``.

    ``model`` is the module the file was exported from (after reparameterisation); ``x`` a few
    normalised images. Returns {module, cosine, tolerance, onnx_node, compared, lowest} or None where
    the file carries no module scopes (not an ONNX file from this exporter).
    """
    import onnx

    path = Path(artifact)
    if path.suffix != ".onnx":
        return None
    scopes = scope_outputs(onnx.load(str(path), load_external_data=False))
    if not scopes:
        return None
    ref = module_outputs(model, x)
    # in graph order; where a module and its parent end on the same node, the deeper one (the culprit) first
    order = sorted((pos, -scope.count("."), scope, tensor, node) for scope, (tensor, node, pos) in scopes.items() if scope in ref)
    got = _onnx_intermediates(path, [o[3] for o in order], x)
    compared, lowest = 0, None
    for _, _, scope, tensor, node in order:
        out = got.get(tensor)
        if out is None or not np.issubdtype(np.asarray(out).dtype, np.floating) or np.shape(out) != ref[scope].shape:
            continue
        cos = error_stats(ref[scope], out)["cosine_min"]
        compared += 1
        entry = {"module": scope, "cosine": round(cos, 6), "onnx_node": node}
        if lowest is None or cos < lowest["cosine"]:
            lowest = entry
        if cos < tolerance:
            return {**entry, "tolerance": tolerance, "compared": compared, "lowest": entry}
    return {"module": None, "cosine": None, "onnx_node": None, "tolerance": tolerance, "compared": compared, "lowest": lowest}


def for_artifact(path: str | os.PathLike, art: dict, model: torch.nn.Module, x: np.ndarray) -> dict | None:
    """``first_divergence`` at the parity tolerance of the artifact's precision; None for non-ONNX artifacts."""
    from qbheat_contract.parity import tolerance

    if art["format"] != "onnx":
        return None
    return first_divergence(path, model, x, tolerance("onnx", art["precision"]).cosine)


def describe(div: dict | None) -> str:
    """One clause for an error message."""
    if not div:
        return ""
    if div["module"]:
        return (f"; first module below cosine {div['tolerance']}: {div['module']} (cosine {div['cosine']:.4f}, "
                f"ONNX node {div['onnx_node']})")
    low = div.get("lowest")
    return f"; no module's output fell below cosine {div['tolerance']}" + (
        f" (lowest {low['cosine']:.4f} at {low['module']})" if low else "")

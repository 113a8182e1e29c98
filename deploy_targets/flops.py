"""Operation counts read from an ONNX graph, by op type, and artifact sizes.

MACs (multiply-accumulates) are counted for the ops that dominate a vision backbone —
``Conv``, ``ConvTranspose``, ``MatMul`` and ``Gemm`` — from the shapes ONNX shape inference gives
with every symbolic dimension of the graph inputs set to 1 (batch = 1); where it cannot follow a
shape (reshape targets computed at run time), one ONNX Runtime pass on zeros supplies it. FLOPs are reported as
2 × MACs and named as such; bias additions, normalisations, activations and other element-wise ops
are not counted in MACs (they appear in the per-op node counts). PyTorch-side counts (FLOPs and
parameters per model) come from the model card, which export writes.

This module needs the ``onnx`` package; it is host-side only (not copied into bundles).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from qbheat_contract.errors import QBHeatError
from qbheat_contract.hashing import artifact_size

MAC_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
_FLOAT_TYPES = (1, 10, 11, 16)  # FLOAT, FLOAT16, DOUBLE, BFLOAT16: weights, not shape constants


def _fix_batch(model, batch: int = 1) -> None:
    for value in model.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") or not dim.HasField("dim_value"):
                dim.Clear()
                dim.dim_value = batch


def _shapes(model) -> dict[str, list[int]]:
    shapes = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [d.dim_value for d in dims]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _runtime_shapes(model, batch: int) -> dict[str, list[int]]:
    """Shapes of every intermediate tensor from one ONNX Runtime pass on zeros at ``batch``.

    The fallback for graphs whose reshape targets are computed from ``Shape`` ops, which static
    shape inference cannot always follow (Mobile-Former reads every shape from its input)."""
    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    known = {o.name for o in m.graph.output}
    for node in m.graph.node:
        for name in node.output:
            if name and name not in known:
                m.graph.output.append(onnx.ValueInfoProto(name=name))
                known.add(name)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
             "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_, "tensor(double)": np.float64}
    feeds = {i.name: np.zeros([d if isinstance(d, int) else batch for d in i.shape], dtype=types.get(i.type, np.float32))
             for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    return {n: list(np.shape(v)) for n, v in zip(names, sess.run(names, feeds))}


def _attr(node, name: str, default: Any) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def node_macs(node, shapes: dict[str, list[int]]) -> int | None:
    """MACs of one node, or None when a needed shape is unknown."""
    def s(i, out=False):
        names = node.output if out else node.input
        return shapes.get(names[i]) if i < len(names) else None

    if node.op_type == "Conv":
        w, y = s(1), s(0, out=True)
        if w is None or y is None:
            return None
        return int(np.prod(y)) * int(np.prod(w[1:]))                      # out elements × (Cin/g · kH · kW)
    if node.op_type == "ConvTranspose":
        x, w = s(0), s(1)
        if x is None or w is None:
            return None
        return int(np.prod(x)) * int(np.prod(w[1:]))                      # in elements × (Cout/g · kH · kW)
    if node.op_type == "MatMul":
        a, y = s(0), s(0, out=True)
        if a is None or y is None:
            return None
        return int(np.prod(y)) * a[-1]                                    # out elements × K
    if node.op_type == "Gemm":
        a, y = s(0), s(0, out=True)
        if a is None or y is None:
            return None
        k = a[0] if _attr(node, "transA", 0) else a[1]
        return int(np.prod(y)) * k
    return 0


def count_onnx(path: str | Path, batch: int = 1) -> dict[str, Any]:
    """Per-op-type node counts and MACs of an ONNX graph at ``batch``; FLOPs = 2 × MACs."""
    try:
        import onnx
    except ImportError:
        raise QBHeatError("counting ONNX operations needs the 'onnx' package; install it (pip install onnx).") from None
    path = Path(path)
    try:
        model = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 (protobuf DecodeError and friends)
        raise QBHeatError(f"{path} is not a readable ONNX file ({type(e).__name__}).") from None
    _fix_batch(model, batch)
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = _shapes(model)
    needed = [n for n in model.graph.node if n.op_type in MAC_OPS and node_macs(n, shapes) is None]
    shape_source = "onnx shape inference"
    if needed:
        try:
            shapes.update(_runtime_shapes(model, batch))
            shape_source = "onnx shape inference + one ONNX Runtime pass on zeros"
        except Exception:  # noqa: BLE001 (no onnxruntime, or the graph does not run: report the gaps)
            pass
    nodes, macs, unknown = Counter(), Counter(), []
    for node in model.graph.node:
        nodes[node.op_type] += 1
        m = node_macs(node, shapes)
        if m is None:
            unknown.append(node.name or node.op_type)
        elif m:
            macs[node.op_type] += m
    total = sum(macs.values())
    return {
        "file": path.name, "batch": batch, "nodes": sum(nodes.values()),
        "nodes_by_op": dict(nodes.most_common()),
        "macs": total, "flops": 2 * total, "macs_by_op": dict(macs.most_common()),
        "params": int(sum(int(np.prod(i.dims)) for i in model.graph.initializer if i.data_type in _FLOAT_TYPES)),
        "uncounted_nodes": unknown, "size_bytes": artifact_size(path), "shapes_from": shape_source,
        "convention": "MACs of Conv/ConvTranspose/MatMul/Gemm from ONNX shape inference; FLOPs = 2 x MACs; bias and element-wise ops not counted",
    }

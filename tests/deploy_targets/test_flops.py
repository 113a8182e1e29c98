"""MACs counted from ONNX graphs by op type, at symbolic batch = 1; FLOPs = 2 × MACs."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from deploy_targets.flops import count_onnx

from conftest import SIZE


def test_tiny_classifier_counts_by_hand(export_dir):
    c = count_onnx(export_dir / "model.onnx")
    conv = 16 * 16 * 8 * (3 * 3 * 3)          # stride-2 conv: 16×16 outputs × 8 channels × (Cin·kH·kW)
    dw = 16 * 16 * 8 * (1 * 3 * 3)            # depthwise: Cin/groups = 1
    fc = 5 * 8
    assert c["macs_by_op"] == {"Conv": conv + dw, "Gemm": fc} or c["macs_by_op"] == {"Conv": conv + dw, "MatMul": fc}
    assert c["macs"] == conv + dw + fc and c["flops"] == 2 * c["macs"]
    assert c["nodes_by_op"]["Conv"] == 2 and c["nodes"] == sum(c["nodes_by_op"].values())
    assert c["uncounted_nodes"] == [] and c["size_bytes"] > 0 and "FLOPs = 2 x MACs" in c["convention"]
    assert c["params"] == 3 * 8 * 9 + 8 + 8 * 9 + 8 + 8 * 5 + 5


def test_matmul_gemm_convtranspose_with_symbolic_batch(tmp_path):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
             [("W1", (16, 32)), ("W2", (10, 32)), ("WT", (4, 2, 3, 3))]]
    nodes = [helper.make_node("MatMul", ["tokens", "W1"], ["h"]),            # B×6×16 @ 16×32: 6·32·16 per image
             helper.make_node("ReduceMean", ["h"], ["pooled"], axes=[1], keepdims=0),
             helper.make_node("Gemm", ["pooled", "W2"], ["logits"], transB=1),  # B×32 → B×10: 10·32
             helper.make_node("ConvTranspose", ["fmap", "WT"], ["up"], strides=[2, 2])]  # in 4×5×5 × (2·3·3)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", 6, 16]),
                                           helper.make_tensor_value_info("fmap", TensorProto.FLOAT, ["batch", 4, 5, 5])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("up", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    c = count_onnx(path)
    assert c["macs_by_op"] == {"MatMul": 6 * 32 * 16, "ConvTranspose": 4 * 5 * 5 * 2 * 9, "Gemm": 10 * 32}
    c8 = count_onnx(path, batch=8)
    assert c8["macs"] == 8 * c["macs"]


def test_runtime_shape_pass_agrees_with_shape_inference(export_dir):
    import onnx

    from deploy_targets.flops import _fix_batch, _runtime_shapes, _shapes

    model = onnx.load(str(export_dir / "model.onnx"))
    _fix_batch(model, 3)
    static = _shapes(onnx.shape_inference.infer_shapes(model, data_prop=True))
    measured = _runtime_shapes(model, 3)
    common = set(static) & set(measured)
    assert len(common) >= 5 and all(static[n] == measured[n] for n in common)
    assert measured[model.graph.output[0].name] == [3, 5]

"""Each runner that can run here, against PyTorch or numpy; the others fail clearly or skip."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from qbheat_contract.errors import QBHeatError
from deploy_targets.harness import bench_artifact, check_golden, compare_outputs
from deploy_targets.protocol import ProtocolConfig
from deploy_targets.runners import available, format_of, get_runner

from conftest import SIZE

QUICK = ProtocolConfig(warmup_runs=1, warmup_seconds=0.0, min_runs=3, min_seconds=0.0)


def _reference(model, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("runtime, path", [("onnxruntime", "model.onnx"), ("openvino", "model.xml"), ("openvino", "model.onnx")])
def test_cpu_runners_match_pytorch_at_two_batches(export_dir, tiny_model, runtime, path):
    runner = get_runner(runtime, threads=1).load(export_dir / path)
    x = np.random.default_rng(1).standard_normal((3, 3, SIZE, SIZE), dtype=np.float32)
    out = runner.run({"x": x})
    (name, y), = out.items()
    assert y.shape == (3, 5)
    np.testing.assert_allclose(y, _reference(tiny_model, x), atol=1e-5)
    info = runner.describe()
    assert info["runtime"] == runtime and info["threads"] == 1 and info["runtime_version"]
    if runtime == "openvino":
        assert info["inference_precision"] == "f32"  # never the CPU's silent bf16


def test_openvino_compiles_for_the_timed_batch_and_still_runs_others(export_dir, tiny_model):
    x = np.random.default_rng(2).standard_normal((4, 3, SIZE, SIZE), dtype=np.float32)
    static = get_runner("openvino", threads=1).load(export_dir / "model.xml", batch=4)
    assert static.inputs()[0]["shape"] == [4, 3, SIZE, SIZE] and static.describe()["input_shape"] == [4, 3, SIZE, SIZE]
    np.testing.assert_allclose(next(iter(static.run({"x": x}).values())), _reference(tiny_model, x), atol=1e-5)
    one = next(iter(static.run({"x": x[:1]}).values()))  # another shape compiles on first use (golden checks)
    np.testing.assert_allclose(one, _reference(tiny_model, x[:1]), atol=1e-5)
    dynamic = get_runner("openvino", threads=1, static_shapes=False).load(export_dir / "model.xml", batch=4)
    assert dynamic.inputs()[0]["shape"][0] == "dynamic" and dynamic.describe()["input_shape"] == "dynamic"
    unknown = get_runner("openvino", threads=1).load(export_dir / "model.xml")  # no batch given: stays dynamic
    assert unknown.inputs()[0]["shape"][0] == "dynamic"
    with pytest.raises(QBHeatError, match=r"cannot run .* on an input of shape \[1, 4, 32, 32\]"):
        static.run({"x": np.zeros((1, 4, SIZE, SIZE), np.float32)})  # 4 channels: one sentence, not OpenVINO's C++ text


def test_missing_artifact_and_unknown_runtime_are_user_errors(tmp_path):
    with pytest.raises(QBHeatError, match="does not exist"):
        get_runner("onnxruntime").load(tmp_path / "nope.onnx")
    with pytest.raises(QBHeatError, match="no runner for runtime"):
        get_runner("tvm")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(QBHeatError, match="ONNX Runtime could not load"):
        get_runner("onnxruntime").load(bad)
    with pytest.raises(QBHeatError, match="cannot tell the format"):
        format_of("model.bin")


def test_bench_rows_carry_fingerprint_golden_and_sweep(export_dir, tiny_model, jpeg_bytes):
    x = np.random.default_rng(2).standard_normal((2, 3, SIZE, SIZE), dtype=np.float32)
    golden = {"inputs": {"x": x}, "outputs": {"logits": _reference(tiny_model, x)}}
    from qbheat_contract.card import read_model_card
    card = read_model_card(export_dir)
    art = dict(card["artifacts"][0], abs_path=str(export_dir / "model.onnx"))
    # The profile's 224×224 is only a fallback: the card's size (SIZE), at which the export was verified, wins.
    rows = bench_artifact(art, "onnxruntime", QUICK, threads=[1, 2], batches=[1, 4], options={}, input_size=(224, 224),
                          target="t", card=card, image_bytes=jpeg_bytes, golden=golden)
    assert [(r["threads"], r["batch"]) for r in rows] == [(1, 1), (1, 4), (2, 1), (2, 4)]
    for r in rows:
        assert r["golden"]["passed"] and r["golden"]["max_abs"] < 1e-5
        assert r["steady"]["n"] == 3 and len(r["steady"]["samples_ms"]) == 3 and r["end_to_end"]["n"] == 3
        assert r["input_shapes"] == {"x": [r["batch"], 3, SIZE, SIZE]}
        fp = r["fingerprint"]
        assert fp["artifact_sha256"] == card["artifacts"][0]["sha256"] and fp["threads"] == r["threads"]
        assert fp["cpu_model"] and fp["cores"] >= 1 and fp["runtime"] == "onnxruntime" and fp["os"]
        assert r["model"] == "tiny_classifier" and r["macs"] == 89_000


def test_golden_check_fails_on_wrong_outputs():
    good = {"y": np.array([[1.0, 2.0, 3.0]], np.float32)}
    assert compare_outputs(good, good, "fp32")["passed"]
    wrong = {"y": np.array([[3.0, 2.0, 1.0]], np.float32)}
    r = compare_outputs(wrong, good, "fp32")
    assert not r["passed"] and r["top1_agreement"] == 0.0 and r["max_abs"] == 2.0
    slightly = {"y": good["y"] + 0.01}  # int8-level error passes int8, fails fp32
    assert compare_outputs(slightly, good, "int8")["passed"] and not compare_outputs(slightly, good, "fp32")["passed"]


def test_static_batch_is_skipped_not_crashed(tmp_path, tiny_model):
    path = tmp_path / "static.onnx"
    torch.onnx.export(tiny_model, (torch.randn(1, 3, SIZE, SIZE),), str(path), dynamo=False, input_names=["x"])
    rows = bench_artifact({"abs_path": str(path), "format": "onnx", "precision": "fp32"}, "onnxruntime", QUICK,
                          threads=[1], batches=[1, 2], options={}, input_size=(SIZE, SIZE), target="t")
    assert rows[0]["skipped"] is None and rows[0]["steady"]["n"] == 3
    assert "fixed batch of 1" in rows[1]["skipped"] and "steady" not in rows[1]


def _tflite_fully_connected(path, weights: np.ndarray) -> None:
    """A one-op .tflite (FULLY_CONNECTED over the flattened NCHW input), written with LiteRT's own schema."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    def tensor(shape, buffer, name):
        t = s.TensorT()
        t.shape, t.type, t.buffer, t.name = list(shape), s.TensorType.FLOAT32, buffer, name
        return t

    out_dim, in_dim = weights.shape
    sub = s.SubGraphT()
    sub.tensors = [tensor([1, 3, SIZE, SIZE], 1, "x"), tensor([out_dim, in_dim], 2, "w"), tensor([1, out_dim], 3, "logits")]
    sub.inputs, sub.outputs = [0], [2]
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1, -1], [2]
    op.builtinOptionsType, op.builtinOptions = s.BuiltinOptions.FullyConnectedOptions, s.FullyConnectedOptionsT()
    sub.operators = [op]
    code = s.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version = s.BuiltinOperator.FULLY_CONNECTED, s.BuiltinOperator.FULLY_CONNECTED, 1
    buffers = [s.BufferT() for _ in range(4)]
    buffers[2].data = list(weights.astype(np.float32).tobytes())
    model = s.ModelT()
    model.version, model.operatorCodes, model.subgraphs, model.buffers, model.description = 3, [code], [sub], buffers, "qbheat test"
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(builder.Output())


def test_litert_runner(tmp_path):
    pytest.importorskip("ai_edge_litert.interpreter", reason="LiteRT is the optional extra qbheat[litert]")
    w = np.random.default_rng(0).standard_normal((5, 3 * SIZE * SIZE), dtype=np.float32) * 0.01
    path = tmp_path / "fc.tflite"
    _tflite_fully_connected(path, w)
    runner = get_runner("litert", threads=2).load(path)
    x = np.random.default_rng(1).standard_normal((1, 3, SIZE, SIZE), dtype=np.float32)
    (y,) = runner.run({"x": x}).values()
    np.testing.assert_allclose(y, x.reshape(1, -1) @ w.T, rtol=1e-4, atol=1e-5)
    assert runner.inputs() == [{"name": "x", "shape": [1, 3, SIZE, SIZE], "dtype": "float32"}]
    assert runner.describe()["runtime_version"] == "2.3.0"


def test_executorch_runner(tmp_path, tiny_model):
    pytest.importorskip("executorch.runtime", reason="ExecuTorch is the optional extra qbheat[executorch]")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    x = torch.randn(1, 3, SIZE, SIZE)
    program = to_edge_transform_and_lower(torch.export.export(tiny_model, (x,)), partitioner=[XnnpackPartitioner()]).to_executorch()
    path = tmp_path / "tiny.pte"
    path.write_bytes(program.buffer)
    runner = get_runner("executorch", threads=1).load(path)
    (y,) = runner.run({"x": x.numpy()}).values()
    np.testing.assert_allclose(y, _reference(tiny_model, x.numpy()), atol=1e-5)
    assert "XnnpackBackend" in runner.describe()["backends"]
    assert check_golden(runner, {"inputs": {"x": x.numpy()}, "outputs": {"logits": _reference(tiny_model, x.numpy())}}, "fp32")["passed"]


def test_tensorrt_runner_needs_tensorrt(export_dir):
    if available("tensorrt"):
        pytest.skip("TensorRT is installed here: covered by the GPU job")
    with pytest.raises(QBHeatError, match="needs the Python package 'tensorrt'"):
        get_runner("tensorrt").load(export_dir / "model.onnx")


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS the Core ML runner really runs")
def test_coreml_runner_refuses_clearly_off_macos(tmp_path):
    (tmp_path / "m.mlpackage").mkdir()
    with pytest.raises(QBHeatError, match="Core ML prediction needs macOS"):
        get_runner("coreml", compute_units="cpu_and_ne").load(tmp_path / "m.mlpackage")
    assert not available("coreml")

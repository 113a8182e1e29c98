"""Fast checks: CLI errors, recipe, parity metrics, FP16 guard, TensorRT operator check, doctor."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn as nn

from export import backends, worker
from qbheat_contract import parity
from export.cli import main
from export.recipe import ExportRecipe
from qbheat.checkpoint import save_checkpoint
from qbheat.errors import QBHeatError


def _err(capsys) -> str:
    """The error line (step lines on stderr come before it)."""
    return capsys.readouterr().err.strip().splitlines()[-1]


# -- CLI errors: one sentence, exit 2, nothing left ---------------------------------------------

def test_unknown_model_is_one_sentence_exit_2(tmp_path, capsys):
    assert main(["export", "--model", "mobilenetv9_huge", "--out", str(tmp_path / "o"), "--formats", "onnx"]) == 2
    err = _err(capsys)
    assert err.startswith("qbheat-export: error: unknown model 'mobilenetv9_huge'") and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_that_does_not_match_its_model(tmp_path, capsys):
    from qbheat.models import create_model

    ckpt = tmp_path / "c.pt"
    save_checkpoint(ckpt, {"kind": "pretrain", "model": {"name": "resnet10t", "kwargs": {}},
                           "backbone": create_model("mobilenetv3_small_100", num_classes=0).state_dict()})
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"), "--formats", "onnx"]) == 2
    assert "do not fit model 'resnet10t'" in _err(capsys)
    assert not (tmp_path / "o").exists() and [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_corrupt_checkpoint_file(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    assert main(["export", "--checkpoint", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "corrupt or not a torch file" in _err(capsys)


def test_missing_backend_fails_before_any_work(tmp_path, capsys, monkeypatch):
    real = backends.format_status

    def no_openvino(fmt):
        st = real(fmt)
        if fmt == "openvino":
            st.can_build, st.why_not_build = False, "openvino does not import here (ModuleNotFoundError); install qbheat[openvino]"
        return st

    monkeypatch.setattr(backends, "format_status", no_openvino)
    assert main(["export", "--model", "resnet10t", "--formats", "onnx,openvino", "--out", str(tmp_path / "o")]) == 2
    assert "cannot export openvino: openvino does not import here" in _err(capsys)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["export", "--model", "resnet10t", "--formats", "onnx", "--out", str(blocker / "sub" / "o")]) == 2
    assert "choose a writable --out folder" in _err(capsys)


def test_non_empty_output_needs_overwrite(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    assert main(["export", "--model", "resnet10t", "--formats", "onnx", "--out", str(tmp_path / "o")]) == 2
    assert "--overwrite" in _err(capsys)
    assert (tmp_path / "o" / "keep.txt").read_text() == "x"


def test_calibration_folder_without_images(tmp_path, capsys):
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "notes.txt").write_text("no images")
    from export.calibration import Preprocessing, load_images

    with pytest.raises(QBHeatError, match="holds no images"):
        load_images(Preprocessing(input_size=32), tmp_path / "calib")
    assert main(["export", "--model", "resnet10t", "--formats", "onnx", "--calibration", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "calibration folder" in _err(capsys)


def test_calibration_folder_images_are_preprocessed(tmp_path):
    from PIL import Image

    from export.calibration import Preprocessing, load_images

    for i, (w, h) in enumerate([(80, 50), (40, 90)]):
        Image.fromarray(np.full((h, w, 3), 255 if i else 0, np.uint8)).save(tmp_path / f"{i}.png")
    pre = Preprocessing(input_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    imgs = load_images(pre, tmp_path, count=8)
    assert imgs.inputs.shape == (2, 3, 32, 32) and imgs.images_u8.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(imgs.inputs[0], -2.0)  # (0 - 0.5) / 0.25
    np.testing.assert_allclose(imgs.inputs[1], 2.0)


def test_parity_uses_held_out_folder_images_else_photographs(tmp_path):
    """Parity runs on the user's own images that calibration did not use; too few left → skimage photographs."""
    from PIL import Image

    from export.calibration import Preprocessing, load_images, parity_images

    for i in range(10):
        Image.fromarray(np.full((40, 40, 3), 20 * i, np.uint8)).save(tmp_path / f"{i:02d}.png")
    pre = Preprocessing(input_size=32)
    calib = load_images(pre, tmp_path, count=4)
    check = parity_images(pre, 4, tmp_path, skip=len(calib.names))
    assert calib.names == ["00.png", "01.png", "02.png", "03.png"]
    assert check.names == ["04.png", "06.png", "07.png", "09.png"] and "held out" in check.source
    assert not set(check.names) & set(calib.names) and check.inputs.shape == (4, 3, 32, 32)
    fallback = parity_images(pre, 4, tmp_path, skip=8)  # only 2 left
    assert fallback.source.startswith("skimage.data") and fallback.inputs.shape == (4, 3, 32, 32)
    assert parity_images(pre, 4).source == fallback.source


def test_calibration_and_parity_list_the_folder_once(tmp_path, monkeypatch):
    from PIL import Image

    from export import calibration

    for i in range(10):
        Image.fromarray(np.full((40, 40, 3), 20 * i, np.uint8)).save(tmp_path / f"{i:02d}.png")
    listed = []
    real = calibration._image_files
    monkeypatch.setattr(calibration, "_image_files", lambda folder: listed.append(folder) or real(folder))
    calib, check = calibration.calibration_and_parity(calibration.Preprocessing(input_size=32), tmp_path, 4, 4)
    assert listed == [tmp_path]
    assert calib.names == ["00.png", "01.png", "02.png", "03.png"] and check.names == ["04.png", "06.png", "07.png", "09.png"]
    with pytest.raises(QBHeatError, match="does not exist"):
        calibration.calibration_and_parity(calibration.Preprocessing(input_size=32), tmp_path / "missing", 4, 4)


def test_tensorrt_only_is_refused_when_it_cannot_build(tmp_path, capsys):
    if backends.format_status("tensorrt").can_build:
        pytest.skip("TensorRT can build here")
    assert main(["export", "--model", "resnet10t", "--formats", "tensorrt", "--out", str(tmp_path / "o")]) == 2
    assert "none of the requested formats can be built here" in _err(capsys)


def test_bad_flags(tmp_path, capsys):
    assert main(["export", "--model", "resnet10t", "--formats", "tflite", "--out", str(tmp_path)]) == 2
    assert "unknown format 'tflite'" in _err(capsys)
    assert main(["export", "--model", "resnet10t", "--checkpoint", "x.pt", "--out", str(tmp_path)]) == 2
    assert "exactly one of" in _err(capsys)
    assert main(["export", "--model", "resnet10t", "--image-size", "50", "--out", str(tmp_path)]) == 2
    assert "multiple of 32" in _err(capsys)
    assert main(["export", "--model", "resnet10t", "--head", "detector", "--head-variant", "logits", "--out", str(tmp_path)]) == 2
    assert "variants decode, nms" in _err(capsys)


# -- recipe --------------------------------------------------------------------------------------

def test_recipe_yaml_and_flags_override(tmp_path):
    from export.commands.export import recipe_from_args

    path = tmp_path / "r.yaml"
    path.write_text("model: resnet10t\nhead: detector\nhead_variant: nms\nformats: [onnx, coreml]\nprecision: fp16\n"
                    "image_size: 128\nout: /tmp/x\n")
    r = ExportRecipe.from_yaml(path).validate()
    assert (r.model, r.head, r.head_variant, r.formats, r.precisions, r.image_size) == \
        ("resnet10t", "detector", "nms", ["onnx", "coreml"], ["fp16"], 128)
    import argparse

    from export.commands import export as cmd

    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    args = parser.parse_args(["--recipe", str(path), "--formats", "openvino", "--image-size", "64"])
    r2 = recipe_from_args(args)
    assert r2.formats == ["openvino"] and r2.image_size == 64 and r2.head_variant == "nms"
    path.write_text("model: resnet10t\nout: x\nfrobnicate: 1\n")
    with pytest.raises(QBHeatError, match="unknown field 'frobnicate'"):
        ExportRecipe.from_yaml(path)
    assert r.int8_scope == "convs" and recipe_from_args(parser.parse_args(["--model", "m", "--out", "o", "--int8-scope", "all"])).int8_scope == "all"
    with pytest.raises(QBHeatError, match="unknown --int8-scope 'matmuls'; choose convs, all or auto"):
        ExportRecipe(model="m", out="o", int8_scope="matmuls").validate()


# -- parity metrics ------------------------------------------------------------------------------

def test_parity_metrics_and_gates():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(4, 10)).astype(np.float32)
    ok = parity.compare("classifier", "logits", ("logits",), [ref], [ref + 1e-7], "onnx", "fp32")
    assert ok["passed"] and ok["outputs"]["logits"]["top1_agreement"] == 1.0
    bad = ref.copy()
    bad[0] = -bad[0]
    res = parity.compare("classifier", "logits", ("logits",), [ref], [bad], "onnx", "fp32")
    assert not res["passed"] and any("cosine" in f for f in res["failures"]) and res["outputs"]["logits"]["cosine_min"] < 0
    nan = ref.copy()
    nan[1, 2] = np.nan
    assert "logits: non-finite values" in parity.compare("classifier", "logits", ("logits",), [ref], [nan], "onnx", "fp16")["failures"]
    assert parity.tolerance("coreml", "int8") != parity.tolerance("onnx", "int8")
    # the benchmarks' form: the same statistics over flattened rows, with top-1 and the row count
    maps = rng.normal(size=(3, 2, 4, 4))
    flipped = maps.copy()
    flipped[1] = -flipped[1]
    got = parity.agreement(maps, flipped)
    assert got["n"] == 3 and got["top1_agreement"] == pytest.approx(2 / 3) and got["cosine_min"] == pytest.approx(-1.0)
    assert got["max_abs"] == pytest.approx(2 * np.abs(maps[1]).max())
    assert got["rel_max"] == pytest.approx(got["max_abs"] / np.abs(maps).max())


def test_box_agreement_matches_one_to_one_with_labels():
    boxes = np.array([[[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 0, 0]]], np.float32)
    scores = np.array([[0.9, 0.8, 0.0]], np.float32)
    labels = np.array([[1, 2, -1]])
    ref = (boxes, scores, labels, np.array([2]))
    assert parity.box_agreement(ref, ref)["box_match"] == 1.0
    shifted = (boxes + np.array([6, 0, 6, 0], np.float32) * (scores[..., None] > 0), scores, labels, np.array([2]))
    assert parity.box_agreement(ref, shifted)["box_match"] == 0.0  # IoU 4/16 < 0.5
    relabelled = (boxes, scores, np.array([[1, 3, -1]]), np.array([2]))
    assert parity.box_agreement(ref, relabelled)["box_match"] == 0.5


# -- FP16 guard ----------------------------------------------------------------------------------

class _Energy(nn.Module):
    """Like attention logits: a large intermediate (≈1e6, past float16's 65504) behind a modest output."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, h):
        big = self.proj(h) * 300.0
        return (big * big).mean(dim=1, keepdim=True) * 1e-6 + h


class _Overflowing(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.energy = _Energy()
        self.out = nn.Linear(4, 2)
        self.output_names = ("logits",)

    def forward(self, image):
        h = self.conv(image).mean((2, 3)) * 10.0
        return (self.out(self.energy(h)),)


def test_fp16_guard_finds_the_overflow_and_pinning_fixes_it():
    from export.fp16_guard import check, half_with_fp32_islands, pinned_node_names

    torch.manual_seed(0)
    model = _Overflowing().eval()
    x = np.random.default_rng(0).normal(size=(4, 3, 16, 16)).astype(np.float32) * 3
    report = check(model, x)
    assert report.overflowing == ["energy"] and report.checked_on == 4
    ref = model(torch.from_numpy(x))[0]
    naive = half_with_fp32_islands(model, [])(torch.from_numpy(x))[0]
    assert not torch.isfinite(naive).all()
    pinned = half_with_fp32_islands(model, report.overflowing)(torch.from_numpy(x))[0]
    assert pinned.dtype == torch.float32 and torch.isfinite(pinned).all()
    torch.testing.assert_close(pinned, ref, rtol=2e-2, atol=2e-2)
    program = torch.export.export(model, (torch.from_numpy(x[:2]),))
    names = pinned_node_names(program, report.overflowing)
    assert any("linear" in n for n in names) and any(n.startswith("mul") for n in names)


def test_openvino_pins_the_flagged_module_through_the_onnx_scopes(tmp_path):
    """OpenVINO reads the export's ONNX file; the FP16 guard's module paths reach its nodes through the
    ONNX nodes' module scopes, and only the flagged module's nodes are kept out of FP16 compression."""
    from export import onnx_format, openvino_format

    torch.manual_seed(0)
    model = _Overflowing().eval()
    x = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)
    example = torch.from_numpy(x)
    program = torch.export.export(model, (example,), dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1, max=8)}})
    path = tmp_path / "m.onnx"
    onnx_format.export_program(program, example, path, "image", ("logits",), {"k": "v"})
    names = openvino_format.onnx_nodes_in(path, ["energy"])
    assert names and all(n.startswith("node_") for n in names)
    assert openvino_format.onnx_nodes_in(path, []) == set() and openvino_format.onnx_nodes_in(path, ["energ"]) == set()
    ov_model = openvino_format.from_onnx(path, "image", ("logits",), {"k": "v"})
    assert ov_model.get_rt_info(["model_info", "k"]).astype(str) == "v"
    pinned = openvino_format.pin_fp32(ov_model, names)
    kinds = {op.get_friendly_name(): op.get_type_name() for op in ov_model.get_ops()}
    assert any(kinds[p] == "MatMul" for p in pinned) and any(kinds[p] == "Multiply" for p in pinned)
    # the classifier layer outside the flagged module stays compressible
    out_layer = openvino_format.onnx_nodes_in(path, ["out"])
    assert out_layer and not any(p.split("/")[0] in out_layer for p in pinned)


def test_onnx_fp16_both_paths_keep_float32_io_and_the_function(tmp_path):
    """Nothing pinned: the FP32 file cast by ORT's converter. Pinned: the mixed module exported itself."""
    import onnx
    import onnxruntime as ort

    from export import onnx_format
    from export.fp16_guard import half_with_fp32_islands

    torch.manual_seed(0)
    model = _Overflowing().eval()
    x = np.random.default_rng(0).normal(size=(4, 3, 16, 16)).astype(np.float32) * 3
    ref = model(torch.from_numpy(x))[0].detach().numpy()
    dims = {"image": {0: torch.export.Dim("batch", min=1, max=8)}}
    example = torch.from_numpy(x[:2])

    def run(path):
        (out,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})
        return out

    fp32 = tmp_path / "m.fp32.onnx"
    onnx_format.export_program(torch.export.export(model, (example,), dynamic_shapes=dims), example, fp32, "image",
                               ("logits",), {"precision": "fp32", "k": "v"})
    cast = tmp_path / "m.fp16.onnx"
    onnx_format.to_float16(fp32, cast, {"precision": "fp16"})
    m = onnx.load(str(cast))
    assert {p.key: p.value for p in m.metadata_props} == {"precision": "fp16", "k": "v"}
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer)
    # ORT's CPU provider has no float16 kernels for most ops and runs them through casts to float32, so the overflow
    # a GPU or NPU would hit does not show here: the guard, not CPU parity, is what pins such modules.
    np.testing.assert_allclose(run(cast), ref, rtol=2e-2, atol=2e-2)

    pinned = tmp_path / "m.pinned.onnx"
    half = half_with_fp32_islands(model, ["energy"])
    onnx_format.export_program(torch.export.export(half, (example,), dynamic_shapes=dims), example, pinned, "image",
                               ("logits",), {"precision": "fp16"})
    np.testing.assert_allclose(run(pinned), ref, rtol=2e-2, atol=2e-2)


def test_fp16_guard_is_quiet_on_a_normal_network():
    from export.fp16_guard import check

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1)).eval()
    assert check(net, np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32)).overflowing == []


# -- TensorRT ------------------------------------------------------------------------------------

def test_tensorrt_operator_check_flags_unsupported_ops(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from export.tensorrt_format import check_onnx

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Hardmax", ["r"], ["h"]),
                               helper.make_node("MyOp", ["h"], ["y"], domain="custom")], "g", [x], [y])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)]), str(path))
    rep = check_onnx(path)
    assert rep["unsupported"] == ["Hardmax", "custom::MyOp"] and not rep["parsable"] and "Relu" in rep["ops"]

    # Q/DQ typing: TensorRT takes signed, symmetric quantisation only
    def qdq_model(zero_point):
        inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])]
        args = ["x", "s"]
        if zero_point is not None:
            inits.append(helper.make_tensor("z", zero_point[0], [], [zero_point[1]]))
            args.append("z")
        nodes = [helper.make_node("QuantizeLinear", args, ["q"], name="q0"), helper.make_node("DequantizeLinear", ["q", *args[1:]], ["y"], name="dq0")]
        m = tmp_path / f"qdq{zero_point}.onnx"
        onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)]), str(m))
        return check_onnx(m)

    assert qdq_model((TensorProto.INT8, 0))["parsable"]
    assert any("non-zero zero point" in r for r in qdq_model((TensorProto.INT8, 3))["restrictions"])
    assert any("UINT8" in r for r in qdq_model((TensorProto.UINT8, 0))["restrictions"])
    assert any("UINT8" in r for r in qdq_model(None)["restrictions"])  # ONNX's default type without a zero point


def test_quantize_styles_type_the_qdq_nodes_for_their_runtime(tmp_path):
    import onnx
    from onnx import numpy_helper

    from export.onnx_format import runner
    from export.quantize import quantize_onnx_int8
    from export.tensorrt_format import check_onnx

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                        nn.Conv2d(16, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32)
    src = tmp_path / "m.onnx"
    torch.onnx.export(net, (torch.from_numpy(x[:1]),), str(src), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}}, dynamo=False)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    for style in ("onnxruntime", "tensorrt"):
        dst = tmp_path / f"m.{style}.onnx"
        notes = quantize_onnx_int8(src, dst, x, "image", "convs", style=style)
        assert f"in {style} style" in notes[-1]
        model = onnx.load(str(dst))
        inits = {i.name: i for i in model.graph.initializer}
        zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
        assert zero_points and sum(n.op_type == "Conv" for n in model.graph.node) == 3
        dq_inputs = {inits[n.input[0]].data_type for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
        if style == "tensorrt":  # signed, symmetric, biases left in float: what TensorRT's parser takes
            assert {z.data_type for z in zero_points} == {onnx.TensorProto.INT8}
            assert not any(numpy_helper.to_array(z).any() for z in zero_points)
            assert dq_inputs == {onnx.TensorProto.INT8} and check_onnx(dst)["parsable"]
        else:
            assert {z.data_type for z in zero_points} == {onnx.TensorProto.UINT8} and onnx.TensorProto.INT32 in dq_inputs
            assert not check_onnx(dst)["parsable"]
        out = runner(dst)(x)[0]
        cosine = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
        assert cosine.min() > 0.99, (style, cosine)


def test_tensorrt_engine_build(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installable from this project's registries")
    if not backends.has_cuda_gpu():
        pytest.skip("TensorRT builds engines only on an NVIDIA GPU")
    from export.cli import main as cli

    out = tmp_path / "trt"
    assert cli(["export", "--model", "resnet10t", "--head", "classifier", "--formats", "tensorrt", "--precision", "fp32,fp16,int8",
                "--image-size", "64", "--out", str(out), "--quiet", "--allow-mismatch"]) == 0
    from qbheat_contract.card import read_model_card

    arts = {a["precision"]: a for a in read_model_card(out)["artifacts"] if a["format"] == "tensorrt"}
    assert set(arts) == {"fp32", "fp16", "int8"} and all(a["verified"] == "parity" for a in arts.values())
    assert arts["fp32"]["parity"]["batch4"]["passed"]  # random weights: INT8 top-1 on flat logits may miss
    assert any(f["path"].endswith("model.int8.qdq.onnx") for f in arts["int8"]["files"])
    assert "strongly typed" in arts["int8"]["notes"][-1] or "weakly typed" in arts["int8"]["notes"][-1]


def test_doctor_reports_every_format(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for fmt in ("onnx", "openvino", "coreml", "tensorrt"):
        assert f"  {fmt}" in out
    info = backends.probe()
    assert info["formats"]["onnx"]["can_run"] and info["packages"]["torch"].startswith("2.13")


# -- the forked worker that builds Core ML beside the other formats ------------------------------

def _own_name(job):
    import os
    import time

    time.sleep(0.05)
    return job, open(f"/proc/{os.getpid()}/comm").read().strip(), os.getpid()


def _raise_value_error(job):
    raise ValueError(f"job {job} failed")


def _raise_user_error(job):
    raise QBHeatError("calibration folder x has no images.")


def _die(job):
    import os

    os._exit(7)


def _chatty(job):
    import sys

    print("progress-bar noise", file=sys.stderr, flush=True)
    print("stdout noise", flush=True)
    return job


def _sleep_forever(job):
    import time

    time.sleep(600)


fork_only = pytest.mark.skipif(not worker.can_fork(), reason="the worker forks only on Linux with two or more cores")


@fork_only
def test_worker_runs_jobs_in_order_in_one_named_child_process():
    import os

    w = worker.ForkedBuilds(_own_name, ["fp32", "fp16", "int8"])
    results = w.results()
    w.close()
    assert [job for job, _, _ in results] == ["fp32", "fp16", "int8"]
    pids = {pid for _, (_, _, pid), _ in results}
    assert len(pids) == 1 and os.getpid() not in pids
    assert all(name == worker.WORKER_NAME.decode() and got == job for job, (got, name, _), _ in results)
    assert all(seconds >= 0.05 for _, _, seconds in results)


@fork_only
def test_worker_errors_come_back_to_the_parent():
    w = worker.ForkedBuilds(_raise_value_error, ["fp32"])
    with pytest.raises(RuntimeError, match=r"ValueError: job fp32 failed[\s\S]*in the export worker process[\s\S]*Traceback"):
        w.results()
    w.close()
    w = worker.ForkedBuilds(_raise_user_error, ["fp32"])
    with pytest.raises(QBHeatError, match=r"^calibration folder x has no images\.$"):
        w.results()
    w.close()
    w = worker.ForkedBuilds(_die, ["fp32"])
    with pytest.raises(RuntimeError, match="died without a result \\(exit code 7\\)"):
        w.results()
    w.close()


@fork_only
def test_closing_a_running_worker_ends_it():
    w = worker.ForkedBuilds(_sleep_forever, ["fp32"])
    w.close()
    assert not w._proc.is_alive() and w._proc.exitcode is not None


def test_openvino_telemetry_is_off_in_this_process(tmp_path, monkeypatch):
    """No usage events: the consent check declines, so importing and converting sends nothing and writes no stats."""
    pytest.importorskip("openvino_telemetry")
    from openvino_telemetry import Telemetry
    from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker

    import export  # noqa: F401  (conftest imported it already; importing switches telemetry off)

    monkeypatch.setenv("HOME", str(tmp_path))  # even with no consent file at all, which OpenVINO treats as "send"
    assert OptInChecker().check(enable_opt_in_dialog=False) == ConsentCheckResult.DECLINED
    t = Telemetry(app_name="qbheat-test", app_version="0", tid="G-TEST", enable_opt_in_dialog=False)
    assert t.consent is False
    assert not (tmp_path / "intel").exists()


@fork_only
def test_worker_output_does_not_reach_the_terminal(capfd):
    w = worker.ForkedBuilds(_chatty, ["fp32"])
    assert [job for job, _, _ in w.results()] == ["fp32"]
    w.close()
    out, err = capfd.readouterr()
    assert "noise" not in out + err


class _ConvThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_int8_scope_convs_leaves_matmuls_in_float_on_both_quantisers(tmp_path):
    """'convs' (the default) quantises the convolutions only; 'all' also the Linear layer, in ONNX
    Runtime's QDQ graph and in NNCF's OpenVINO model alike."""
    import onnx
    import openvino as ov

    from export.openvino_format import quantize_int8
    from export.quantize import quantize_onnx_int8

    net = _ConvThenLinear().eval()
    images = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    torch.onnx.export(net, (torch.from_numpy(images[:1]),), str(tmp_path / "m.onnx"), dynamo=True, input_names=["image"])

    def onnx_quantised(scope: str) -> set[str]:
        dst = tmp_path / f"{scope}.onnx"
        notes = quantize_onnx_int8(tmp_path / "m.onnx", dst, images, "image", scope)
        assert f"scope {scope!r}" in notes[-1]
        g = onnx.load(str(dst)).graph
        from_dq = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear"}
        return {n.op_type for n in g.node if n.op_type in ("Conv", "Gemm", "MatMul") and any(i in from_dq for i in n.input)}

    def openvino_quantised(scope: str) -> tuple[set[str], bool]:
        """Op types fed by a FakeQuantize (INT8 activations), and whether the MatMul's weight is an INT8 constant."""
        q = quantize_int8(ov.convert_model(net, example_input=torch.from_numpy(images[:1])), images, detector=False,
                          quiet=True, scope=scope)
        fq = {op.output(0).get_node() for op in q.get_ops() if op.get_type_name() == "FakeQuantize"}
        fed = {t.get_node().get_type_name() for op in fq for t in op.output(0).get_target_inputs()}
        matmul = next(op for op in q.get_ops() if op.get_type_name() == "MatMul")
        node, int8_weight = matmul.input_value(1).get_node(), False
        for _ in range(6):  # Convert <- Multiply <- Subtract <- Convert <- Constant(u8) under weight compression
            int8_weight |= node.get_type_name() == "Constant" and node.get_element_type().get_type_name() in ("u8", "i8")
            if node.get_input_size() == 0:
                break
            node = node.input_value(0).get_node()
        return fed, int8_weight

    assert onnx_quantised("convs") == {"Conv"} and onnx_quantised("all") >= {"Conv"} and len(onnx_quantised("all")) == 2
    fed, int8_weight = openvino_quantised("convs")
    assert "Convolution" in fed and "MatMul" not in fed and int8_weight  # float activations, INT8 weights
    assert "MatMul" in openvino_quantised("all")[0]


@pytest.mark.parametrize("quiet", [False, True])
def test_nncf_progress_goes_to_stderr_or_nowhere_when_quiet(capfd, quiet):
    import openvino as ov

    from export.openvino_format import quantize_int8

    from nncf.common.logging import nncf_logger

    net = _ConvThenLinear().eval()  # the Linear layer is left out by the default scope: NNCF logs that at INFO
    model = ov.convert_model(net, example_input=torch.zeros(1, 3, 16, 16))
    images = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    quantize_int8(model, images, detector=False, quiet=quiet)
    out, err = capfd.readouterr()
    assert out == ""  # stdout is the CLI's (e.g. --json); neither NNCF's bars nor its log write there
    assert "INFO:nncf" not in err and nncf_logger.level == logging.INFO  # the INFO list is dropped, the level restored
    assert ("Statistics collection" in err) != quiet, err[-300:]


def test_mobileformer_openvino_int8_runs_at_static_batches(tmp_path):
    """Mobile-Former's first bridge projects the learned tokens, a MatMul that depends on the input only
    through the batch size. OpenVINO 2026.4 fails to compile the INT8 IR for a static batch when that
    MatMul's weight is compressed; the export leaves it float and verifies with static shapes."""
    from deploy_targets.runners import get_runner
    from qbheat_contract.card import read_model_card
    from export.openvino_format import from_onnx, input_independent

    out = tmp_path / "mf"
    assert main(["export", "--model", "mobileformer_micro", "--head", "classifier", "--formats", "onnx,openvino",
                 "--precision", "fp32,int8", "--image-size", "64", "--calibration-count", "8", "--out", str(out),
                 "--quiet", "--allow-mismatch"]) == 0
    arts = {(a["format"], a["precision"]): a for a in read_model_card(out)["artifacts"]}
    ov_int8 = arts["openvino", "int8"]
    assert ov_int8["verified"] == "parity" and set(ov_int8["parity"]) == {"batch1", "batch4"}
    for batch in (1, 8):
        runner = get_runner("openvino", threads=1, precision="int8").load(out / ov_int8["path"], batch=batch)
        (logits,) = runner.run({"image": np.zeros((batch, 3, 64, 64), np.float32)}).values()
        assert logits.shape[0] == batch and np.isfinite(logits).all()
    tokens_only = input_independent(from_onnx(out / arts["onnx", "fp32"]["path"], "image", ("logits",), {}), "MatMul", (1, 3, 64, 64))
    assert len(tokens_only) == 1


def test_an_unexpected_builder_failure_is_one_sentence_naming_the_format(tmp_path, monkeypatch, capsys):
    import dataclasses

    from export.formats import BUILDERS

    def broken(ctx, precision):
        raise ValueError("converter exploded\nsecond line")

    monkeypatch.setitem(BUILDERS, "onnx", dataclasses.replace(BUILDERS["onnx"], build=broken))
    args = ["export", "--quiet", "--model", "resnet10t", "--head", "features", "--formats", "onnx", "--precision", "fp32",
            "--image-size", "32", "--calibration-count", "2"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "building the onnx fp32 artifact failed (ValueError: converter exploded)" in err and "--debug" in err
    assert "Traceback" not in err and not (tmp_path / "a").exists()
    assert main(["--debug", *args, "--out", str(tmp_path / "b")]) == 2
    assert "Traceback" in capsys.readouterr().err

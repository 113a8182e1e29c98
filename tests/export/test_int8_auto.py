"""``--int8-scope auto``: the greedy loop's arithmetic, the module map, a deliberately sensitive layer
kept in float by the real ONNX Runtime quantiser, the export's card fields and its user errors."""
from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export import int8_auto
from export.cli import main
from export.localize import SCOPES_KEY
from qbheat_contract.card import read_model_card


def _measured(drop: float, half: float = 0.2, flips: float = 0.0) -> dict:
    return {"drop_top1": drop, "drop_top1_ci": [drop - half, drop + half], "flips": flips}


def test_greedy_keeps_the_most_sensitive_modules_in_float_until_the_drop_fits():
    sensitivity = {"a": {"flips": 0.1, "logit_mse": 0.0}, "b": {"flips": 2.0, "logit_mse": 0.0},
                   "c": {"flips": 0.5, "logit_mse": 0.0}, "d": {"flips": 1.0, "logit_mse": 0.0}}
    order = int8_auto.rank(sensitivity)
    assert order == ["b", "d", "c", "a"]
    seen = []

    def trial(floats):  # synthetic: each module in float gives back its own sensitivity
        seen.append(list(floats))
        return _measured(3.6 - sum(sensitivity[m]["flips"] for m in floats))

    floats, trials = int8_auto.greedy(order, trial, budget=1.0)
    # 3.6 (upper 3.8) → b in float: 1.6 (1.8) → b, d: 0.6 (0.8) fits
    assert floats == ["b", "d"] and seen == [[], ["b"], ["b", "d"]]
    assert [t["float_modules"] for t in trials] == [0, 1, 2]
    assert trials[-1]["drop_top1"] == pytest.approx(0.6) and trials[-1]["drop_top1_ci"] == pytest.approx([0.4, 0.8])

    # the interval's upper end decides, not the point estimate: 0.9 ± 0.2 does not fit a budget of 1
    floats, _ = int8_auto.greedy(order, lambda f: _measured(0.9 if not f else 0.0), budget=1.0)
    assert floats == ["b"]
    # nothing fits: every module ends in float
    floats, trials = int8_auto.greedy(order, lambda f: _measured(5.0), budget=1.0)
    assert floats == order and len(trials) == len(order) + 1


def test_greedy_ranks_only_when_the_widest_scope_does_not_fit():
    calls = []

    def order():
        calls.append(1)
        return ["x", "y"]

    assert int8_auto.greedy(order, lambda f: _measured(0.1), budget=1.0) == ([], [{"float_modules": 0, **_measured(0.1)}])
    assert calls == []
    floats, _ = int8_auto.greedy(order, lambda f: _measured(0.1 if f else 2.0), budget=1.0)
    assert floats == ["x"] and calls == [1]


def test_rank_breaks_ties_by_logit_error_then_name():
    s = {"m2": {"flips": 1.0, "logit_mse": 0.1}, "m1": {"flips": 1.0, "logit_mse": 0.1}, "m3": {"flips": 1.0, "logit_mse": 0.5}}
    assert int8_auto.rank(s) == ["m3", "m1", "m2"]


def test_module_of_cuts_scopes_at_the_module_depth():
    assert int8_auto.module_of(["", "backbone.blocks.1", "backbone.blocks.1.former", "backbone.blocks.1.former.q", "linear"]) \
        == "backbone.blocks.1.former"
    assert int8_auto.module_of(["", "backbone.stem", "backbone.stem.1", "conv"]) == "backbone.stem.1"
    assert int8_auto.module_of(["", "head", "head.fc", "linear"]) == "head.fc"
    assert int8_auto.module_of(["", "conv"]) is None


def _two_layer_model(path: Path, rng) -> tuple[np.ndarray, np.ndarray]:
    """x (N×16) → MatMul 'A' (module net.a) → Relu → MatMul 'B' (module net.b) → logits (N×10).

    Input channel 0 is ~10⁴ times larger than the others and A's weights for it ~10⁴ times smaller:
    the same function in float, but one per-tensor INT8 scale on A's input rounds every other
    channel to zero. B's input is ordinary. Returns (weights A, weights B)."""
    wa = rng.normal(size=(16, 32)).astype(np.float32)
    wa[0] *= 1e-4
    wb = rng.normal(size=(32, 10)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["h"], name="A"), helper.make_node("Relu", ["h"], ["r"], name="R"),
             helper.make_node("MatMul", ["r", "wb"], ["logits"], name="B")]
    for node, scope in zip(nodes, ("net.a", "net.a", "net.b")):
        node.metadata_props.add(key=SCOPES_KEY, value=repr(["", scope, node.name.lower()]))
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
                              [numpy_helper.from_array(wa, "wa"), numpy_helper.from_array(wb, "wb")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return wa, wb


def _inputs(rng, n: int) -> np.ndarray:
    x = rng.normal(size=(n, 16)).astype(np.float32)
    x[:, 0] = 1e4 * rng.normal(size=n)
    return x


def _sensitive_problem(tmp_path, n: int):
    """The two-layer model with its sensitive first layer, ``n`` validation inputs, PyTorch-free reference
    scores and labels: (rng to draw calibration inputs from, model path, inputs, reference, labelled set)."""
    rng = np.random.default_rng(0)
    fp32 = tmp_path / "model.onnx"
    wa, wb = _two_layer_model(fp32, rng)
    val_x = _inputs(rng, n)
    ref = np.maximum(val_x @ wa, 0) @ wb
    data = types.SimpleNamespace(labels=ref.argmax(1), card=lambda: {"source": "synthetic", "count": len(val_x)})
    return rng, fp32, val_x, ref, data


def test_a_deliberately_sensitive_layer_stays_in_float_and_the_rest_is_int8(tmp_path):
    import onnxruntime as ort

    rng, fp32, val_x, ref, data = _sensitive_problem(tmp_path, 2000)

    def scores_of(fmt, path):  # the real ONNX Runtime session on the validation inputs
        assert fmt == "onnx"
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": val_x})[0]

    search = int8_auto.Search(fp32, _inputs(rng, 64), "x", int8_auto.Validation(data, ref), 3.0, scores_of, tmp_path)
    assert search.groups == {"net.a": ["A"], "net.b": ["B"]}
    dst = tmp_path / "int8.onnx"
    record, notes = search.onnx(dst, "onnxruntime")

    assert record["float_modules"] == ["net.a"] and record["float_nodes"] == ["A"]
    assert [s["module"] for s in record["sensitivity"]] == ["net.a", "net.b"]
    assert record["sensitivity"][0]["flips"] > 50 > 3 > record["sensitivity"][1]["flips"]
    first, last = record["trials"][0], record["trials"][-1]
    assert first["float_modules"] == 0 and first["drop_top1"] > 50  # everything INT8: the outlier channel wins the scale
    assert last["float_modules"] == 1 and last["drop_top1_ci"][1] <= 3.0 == record["budget"]
    assert record["validation_drop_top1"] == last["drop_top1"] and record["validation"]["source"] == "synthetic"
    assert "1 nodes kept in float" in notes[-1]

    q = onnx.load(str(dst))
    producer = {o: n.op_type for n in q.graph.node for o in n.output}
    by_name = {n.name: n for n in q.graph.node}
    assert producer.get(by_name["A"].input[0]) != "DequantizeLinear"  # A reads the float input
    assert producer[by_name["B"].input[0]] == "DequantizeLinear" and producer[by_name["B"].input[1]] == "DequantizeLinear"
    assert (tmp_path / "ranges.onnxruntime.json").is_file()  # calibrated once, reused by every trial


def test_auto_without_max_drop_or_validation_is_a_one_sentence_user_error(tmp_path, capsys):
    base = ["export", "--model", "resnet10t", "--head", "classifier", "--formats", "onnx", "--precision", "int8", "--int8-scope", "auto"]
    out = tmp_path / "x"
    assert main([*base, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--int8-scope auto needs --max-drop POINTS and --eval-data SOURCE" in err and err.count("\n") == 1
    folder = tmp_path / "imgs"
    (folder / "cat").mkdir(parents=True)
    assert main([*base, "--eval-data", str(folder), "--max-drop", "1", "--out", str(out)]) == 2
    assert "needs --int8-validation SOURCE" in capsys.readouterr().err
    assert main([*base, "--eval-data", str(folder), "--int8-validation", str(folder), "--max-drop", "1", "--out", str(out)]) == 2
    assert "--int8-validation must differ from --eval-data" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_auto_records_the_float_modules_and_the_drop_in_the_card(fashion_ckpt, tmp_path):
    from export.commands.quickstart import _calibration_folder

    calib = _calibration_folder("fashion-mnist", tmp_path / "calib")
    out = tmp_path / "auto"
    assert main(["export", "--checkpoint", str(fashion_ckpt), "--formats", "onnx", "--precision", "fp32,int8", "--calibration", str(calib),
                 "--calibration-count", "32", "--int8-scope", "auto", "--max-drop", "1.0", "--eval-data", "fashion-mnist",
                 "--eval-limit", "1000", "--int8-validation-limit", "800", "--quiet", "--out", str(out)]) == 0
    card = read_model_card(out)
    (art,) = [a for a in card["artifacts"] if a["precision"] == "int8"]
    auto = art["int8_auto"]
    assert auto["start_scope"] == "all" and auto["budget"] == 1.0
    assert auto["validation"]["source"] == "fashion-mnist (training split)" and auto["validation"]["count"] == 800
    assert card["evaluation"]["data"]["source"] == "fashion-mnist (test split)"  # chosen on one set, reported on the other
    assert auto["validation_drop_top1_ci"][1] <= 1.0
    if auto["sensitivity"] is not None:  # the float set is the ranking's prefix
        assert auto["float_modules"] == [s["module"] for s in auto["sensitivity"]][:len(auto["float_modules"])]
    assert auto["float_nodes"] == [n for m in auto["float_modules"] for n in auto_groups(out, m, auto)]
    assert art["accuracy"]["n"] == 1000 and "drop_top1" in art["accuracy"]
    assert card["recipe"]["int8_scope"] == "auto"
    assert not (out / ".int8_auto").exists()


def auto_groups(out: Path, module: str, auto: dict) -> list[str]:
    """The INT8 nodes of ``module`` in the shipped FP32 file (what the card's float_nodes must list)."""
    return int8_auto.module_groups(out / "onnx" / "model.fp32.onnx", ["Conv", "Gemm", "MatMul"]).get(module, [])


def test_openvino_search_leaves_no_fake_quantize_in_a_float_module(tmp_path):
    import openvino as ov

    from export import openvino_format

    rng, fp32, val_x, ref, data = _sensitive_problem(tmp_path, 1000)

    def scores_of(fmt, path):  # real runtimes: ONNX Runtime for the ranking, OpenVINO for its own search
        if fmt == "onnx":
            import onnxruntime as ort

            return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": val_x})[0]
        return ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(val_x)[0]

    assert int8_auto.module_nodes(fp32, ["net.a"]) == {"A", "R"}  # every op of the module, not only its MatMul
    search = int8_auto.Search(fp32, _inputs(rng, 64), "x", int8_auto.Validation(data, ref), 8.0, scores_of, tmp_path)
    search.latency_step = False  # the accuracy search alone (the latency step: the next test)
    model = ov.convert_model(str(fp32))
    q, record = search.openvino(model, tmp_path / "int8.xml", detector=False, quiet=True)
    assert record["float_modules"] == ["net.a"] and record["openvino_float_ops"] >= 2  # A and its Relu
    assert record["trials"][0]["drop_top1"] > 50 > 8 >= record["trials"][1]["drop_top1_ci"][1]
    by_name = {op.get_friendly_name(): op for op in q.get_ops()}
    def feeds(name):
        return {i.get_source_output().get_node().get_type_name() for i in by_name[name].inputs()}

    assert "FakeQuantize" not in feeds("A") and "R" in by_name and "FakeQuantize" not in feeds("R")
    assert any(op.get_type_name() == "FakeQuantize" for op in q.get_ops())  # B is INT8
    assert openvino_format.ops_of_onnx_nodes(model, {"A"}) == ["A"]


@pytest.mark.parametrize("candidate_faster", [True, False])
def test_openvino_latency_step_keeps_the_matmuls_in_f32_only_when_that_is_faster(tmp_path, monkeypatch, candidate_faster):
    """The step's decision on fixed timings (no clock in the test): faster in most rounds and by the median → kept."""
    import openvino as ov

    rng, fp32, val_x, ref, data = _sensitive_problem(tmp_path, 500)

    def scores_of(fmt, path):
        return ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(val_x)[0]

    timed = []

    def fake_timing(paths, x, **kw):
        timed.append(sorted(paths))
        fast, slow = ("candidate", "search") if candidate_faster else ("search", "candidate")
        return {"threads": 1, "batch": 1, "rounds": 7, "iters_per_round": 40, "p50_ms": {fast: 0.2, slow: 0.3},
                "faster_rounds": {fast: 6, slow: 1}}

    monkeypatch.setattr(int8_auto, "time_alternating", fake_timing)
    search = int8_auto.Search(fp32, _inputs(rng, 64), "x", int8_auto.Validation(data, ref), 100.0, scores_of, tmp_path)
    q, record = search.openvino(ov.convert_model(str(fp32)), tmp_path / "int8.xml", detector=False, quiet=True)
    step = record["latency_step"]
    assert timed == [["candidate", "search"]] and step["fits"] and step["kept"] is candidate_faster
    saved = ov.Core().read_model(str(tmp_path / "int8.xml"))
    fq = [op for op in saved.get_ops() if op.get_type_name() == "FakeQuantize"]
    assert (not fq) if candidate_faster else fq  # the MatMuls in f32 where the candidate won; INT8 where it lost
    assert record["float_modules"] == [] and (record["openvino_float_ops"] >= 2) is candidate_faster

"""End-to-end exports: every format that runs here × FP32/FP16/INT8, both heads, fail-closed parity."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from export import backends
from export.cli import main
from qbheat_contract.card import read_model_card
from qbheat_contract.hashing import artifact_sha256 as sha256_file

SIZE = "64"


def _export(*argv: str) -> int:
    return main(["export", "--quiet", "--calibration-count", "8", *argv])


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def classifier_export(probe_ckpt, tmp_path_factory):
    ckpt, labels = probe_ckpt
    out = tmp_path_factory.mktemp("cls") / "out"
    rc = _export("--checkpoint", str(ckpt), "--formats", "onnx,openvino,coreml,tensorrt", "--precision", "fp32,fp16,int8",
                 "--out", str(out), "--simplify")
    return rc, out, labels


def test_probe_checkpoint_exports_to_every_format_and_precision_with_parity(classifier_export):
    rc, out, labels = classifier_export
    assert rc == 0
    card = read_model_card(out)
    got = {(a["format"], a["precision"]): a for a in card["artifacts"]}
    assert set(got) == {(f, p) for f in ("onnx", "openvino", "coreml") for p in ("fp32", "fp16", "int8")}
    for (fmt, precision), a in got.items():
        assert a["sha256"] == sha256_file(out / a["path"]) and a["size_bytes"] > 0
        if fmt == "coreml":
            assert a["verified"] == "spec-only" and a["spec"]["passed"] and a["spec"]["op_count"] > 10
            continue
        assert a["verified"] == "parity" and not a.get("mismatch")
        for batch in ("batch1", "batch4"):
            res = a["parity"][batch]
            assert res["passed"] and res["outputs"]["logits"]["top1_agreement"] >= res["tolerance"]["top1"]
        if precision == "fp32":
            assert a["parity"]["batch4"]["outputs"]["logits"]["rel_max"] < 1e-3
    # the trained head and its labels shipped: card, ONNX metadata_props, OpenVINO rt_info, Core ML metadata
    assert card["head"]["labels"] == labels and card["head"]["type"] == "classifier" and card["head"]["head_type"] == "linear"
    assert card["model"]["source"]["checkpoint_kind"] == "probe" and card["model"]["pretrain_method"] == "qbheat"
    assert card["model"]["macs"] > 0 and card["model"]["flops"] == 2 * card["model"]["macs"]
    meta = {p.key: p.value for p in onnx.load(str(out / got["onnx", "fp32"]["path"])).metadata_props}
    assert json.loads(meta["labels"]) == labels and json.loads(meta["preprocessing"])["input_size"] == [3, 64, 64]
    from export.openvino_format import read_metadata

    assert json.loads(read_metadata(out / got["openvino", "fp16"]["path"])["labels"]) == labels
    spec = got["coreml", "fp16"]["spec"]
    assert "classLabel" in spec["outputs"] and json.loads(spec["metadata"]["labels"]) == labels
    assert card["io"]["outputs"] == [{"name": "logits", "shape": ["batch", 5], "dtype": "float32"}]
    assert {"torch", "onnx", "onnxruntime", "openvino", "nncf", "coremltools"} <= set(card["tools"])
    assert card["fp16_guard"]["checked_on"] == 8


def test_onnx_batch_is_symbolic_and_runs_at_other_batches(classifier_export):
    _, out, _ = classifier_export
    from export.onnx_format import io_spec, runner

    path = out / "onnx" / "model.fp32.onnx"
    assert io_spec(path)["inputs"][0]["shape"] == ["batch", 3, 64, 64]
    assert runner(path)(np.zeros((3, 3, 64, 64), np.float32))[0].shape == (3, 5)


def test_tensorrt_is_reported_not_built_with_an_onnx_check(classifier_export):
    _, out, _ = classifier_export
    card = read_model_card(out)
    if backends.format_status("tensorrt").can_build:
        pytest.skip("TensorRT can build here; the engine path is tested in test_export_units.py")
    (entry,) = card["not_built"]
    assert entry["format"] == "tensorrt" and "tensorrt" in entry["reason"].lower() or "GPU" in entry["reason"]
    check = entry["onnx_check"]
    assert check["parsable"] and "Conv" in check["ops"] and check["unsupported"] == []
    assert not any(a["format"] == "tensorrt" for a in card["artifacts"])
    # INT8 was asked for: the Q/DQ file an engine would be built from passes TensorRT's rules, runs on
    # ONNX Runtime with its parity recorded, and is not left in the output. Symmetric INT8 activations
    # cost this 64-px probe accuracy (min cosine 0.90 against 0.98 for the ONNX Runtime-style file on
    # the same images), so the check reports the tolerance verdict rather than assuming it.
    qdq = entry["int8_qdq_check"]
    assert qdq["check"]["parsable"] and qdq["check"]["restrictions"] == [] and "QuantizeLinear" in qdq["check"]["ops"]
    assert "tensorrt style" in qdq["notes"][-1] and 0.85 <= qdq["min_cosine"] <= 1.0
    assert qdq["passed"] == all(r["passed"] for r in qdq["onnxruntime_parity"].values())
    assert set(qdq["onnxruntime_parity"]) == {"batch1", "batch4"}
    assert not (out / "tensorrt").exists()


def test_onnx_runtime_int8_file_is_not_tensorrt_ready(classifier_export):
    """The ONNX INT8 artifact is typed for ONNX Runtime (UINT8 activations with zero points, INT32
    biases); TensorRT's check names what it would reject, which is why TensorRT gets its own file."""
    _, out, _ = classifier_export
    from export.tensorrt_format import check_onnx

    rep = check_onnx(out / "onnx" / "model.int8.onnx")
    assert not rep["parsable"] and rep["unsupported"] == []
    assert any("non-zero zero point" in r for r in rep["restrictions"]) and any("UINT8" in r for r in rep["restrictions"])


@pytest.mark.parametrize("variant,formats,precisions", [("decode", "onnx", "fp32,int8"),
                                                        ("nms", "openvino,coreml", "fp16")])
def test_detector_checkpoint_exports_both_variants_with_box_agreement(detector_ckpt, tmp_path, variant, formats, precisions):
    ckpt, labels = detector_ckpt
    out = tmp_path / "det"
    assert _export("--checkpoint", str(ckpt), "--head-variant", variant, "--formats", formats, "--precision", precisions,
                   "--out", str(out)) == 0
    card = read_model_card(out)
    assert card["head"]["type"] == "detector" and card["head"]["variant"] == variant and card["head"]["labels"] == labels
    names = [o["name"] for o in card["io"]["outputs"]]
    assert names == (["boxes", "scores"] if variant == "decode" else ["boxes", "scores", "labels", "num_detections"])
    for a in card["artifacts"]:
        if a["verified"] == "spec-only":
            assert set(names) <= set(a["spec"]["outputs"])
            continue
        det = a["parity"]["batch4"]["detections"]
        assert det["detections_reference"] > 0, "the fixture head should produce detections"
        assert det["box_match"] >= a["parity"]["batch4"]["tolerance"]["box_match"]
        if a["precision"] in ("fp32", "fp16"):
            assert det["box_match"] >= 0.9


def test_plain_timm_model_exports_the_same_way(tmp_path):
    out = tmp_path / "mnv3"
    assert _export("--model", "mobilenetv3_small_100", "--head", "classifier", "--num-classes", "7",
                   "--formats", "onnx,openvino", "--precision", "fp32", "--out", str(out), "--image-size", SIZE) == 0
    card = read_model_card(out)
    assert card["model"]["source"]["kind"] == "timm" and len(card["head"]["labels"]) == 7
    assert any("untrained" in n for n in card["notes"])
    assert all(a["verified"] == "parity" and not a.get("mismatch") for a in card["artifacts"])


def _tight_int8(monkeypatch):
    """INT8 held to an FP32-grade cosine: every real INT8 file misses it. (A random-init MobileNetV3 used to
    miss the normal 0.97 by itself; with today's convs-only scope and runtime versions it can pass, so the
    mismatch is made certain by the tolerance, not by hoping the quantisation is bad.)"""
    from qbheat_contract import parity

    monkeypatch.setitem(parity.TOLERANCES, "int8", parity.Tolerance(cosine=0.999999, top1=1.0, box_match=1.0, rel_max=None))


def test_int8_outside_tolerance_fails_closed_then_allow_mismatch_records_it(tmp_path, capsys, monkeypatch):
    _tight_int8(monkeypatch)
    args = ["--model", "mobilenetv3_small_100", "--head", "features", "--formats", "onnx", "--precision", "int8",
            "--image-size", "32"]
    out = tmp_path / "q"
    assert _export(*args, "--out", str(out)) == 3
    assert "outside its tolerance" in capsys.readouterr().err
    assert not out.exists() and _leftovers(tmp_path) == []
    assert _export(*args, "--out", str(out), "--allow-mismatch") == 0
    card = read_model_card(out)
    (a,) = card["artifacts"]
    assert a["mismatch"] and card["allow_mismatch"] and any(n.startswith("MISMATCH") for n in a["notes"])


def test_corrupted_artifact_is_rejected_and_nothing_is_left(probe_ckpt, tmp_path, monkeypatch, capsys):
    import onnx as onnx_lib
    from onnx import numpy_helper

    from export import onnx_format

    real = onnx_format.export_program

    def corrupting(program, example, path, *a, **kw):
        facts = real(program, example, path, *a, **kw)
        model = onnx_lib.load(str(path))
        stem = next(n for n in model.graph.node if n.op_type == "Conv")  # the first convolution's weight
        init = next(t for t in model.graph.initializer if t.name == stem.input[1])
        arr = numpy_helper.to_array(init).copy()
        arr.flat[: arr.size // 2] *= -3.0
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
        onnx_lib.save(model, str(path))
        return facts

    monkeypatch.setattr(onnx_format, "export_program", corrupting)
    ckpt, _ = probe_ckpt
    out = tmp_path / "bad"
    assert _export("--checkpoint", str(ckpt), "--formats", "onnx", "--precision", "fp32", "--out", str(out)) == 3
    err = capsys.readouterr().err
    assert "onnx fp32 is outside its tolerance" in err and "nothing was written" in err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_core_ml_builds_the_same_in_the_parallel_worker_and_with_serial(tmp_path, capsys, monkeypatch):
    import tempfile

    from export import worker

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # coremltools' in-memory packages go here (the worker forks it)
    args = ["--model", "mobilenetv3_small_100", "--head", "classifier", "--num-classes", "5", "--formats", "onnx,coreml",
            "--precision", "fp32,fp16", "--image-size", SIZE, "--calibration-count", "8"]
    assert main(["export", *args, "--out", str(tmp_path / "parallel")]) == 0
    said = capsys.readouterr().err
    assert ("building in a parallel worker process" in said) == worker.can_fork()
    assert main(["export", *args, "--out", str(tmp_path / "serial"), "--serial"]) == 0
    assert "parallel worker" not in capsys.readouterr().err
    cards = {k: read_model_card(tmp_path / k) for k in ("parallel", "serial")}
    got = {k: {(a["format"], a["precision"]): a for a in c["artifacts"]} for k, c in cards.items()}
    assert list(got["parallel"]) == list(got["serial"]) == [("onnx", "fp32"), ("onnx", "fp16"), ("coreml", "fp32"), ("coreml", "fp16")]
    for key in (("coreml", "fp32"), ("coreml", "fp16")):
        a, b = got["parallel"][key], got["serial"][key]
        assert a["verified"] == b["verified"] == "spec-only" and a["spec"] == b["spec"] and a["fp32_pinned"] == b["fp32_pinned"]
        assert (tmp_path / "parallel" / a["path"]).is_dir() and sha256_file(tmp_path / "parallel" / a["path"]) == a["sha256"]
    assert not list(scratch.glob("*.mlpackage"))  # the worker exits without atexit hooks: packages are deleted explicitly


def test_a_parity_failure_ends_the_worker_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the worker's scratch folder is made
    _tight_int8(monkeypatch)
    args = ["--model", "mobilenetv3_small_100", "--head", "features", "--formats", "onnx,coreml", "--precision", "int8",
            "--image-size", "32"]
    assert _export(*args, "--out", str(tmp_path / "q")) == 3  # ONNX INT8 fails its (tightened) tolerance while Core ML builds
    assert "outside its tolerance" in capsys.readouterr().err
    assert not (tmp_path / "q").exists() and _leftovers(tmp_path) == []
    assert list(scratch.iterdir()) == []  # the killed worker's temporary Core ML package went with its folder
    children = [int(pid) for task in Path("/proc/self/task").iterdir() for pid in (task / "children").read_text().split()]
    assert not [pid for pid in children if Path(f"/proc/{pid}/comm").read_text().strip() == "qbheat-worker"]


def test_card_bundle_and_bench_agree_on_every_artifact_hash(classifier_export, tmp_path):
    """OpenVINO (.xml + .bin) and Core ML (.mlpackage folder): the card's hash is the bundle's (recomputed on
    the bundled copy) and a bench row's (recomputed from the file when no card is given)."""
    from deploy_targets.bundle import write_bundle
    from deploy_targets.harness import bench_artifact
    from deploy_targets.profiles import load_profile
    from deploy_targets.protocol import ProtocolConfig

    _, out, _ = classifier_export
    card = read_model_card(out)
    by_path = {f"artifacts/{a['path']}": a for a in card["artifacts"]}
    for profile in ("local-cpu-openvino", "iphone-coreml"):
        bundle = write_bundle(card, out, load_profile(profile), tmp_path / profile)
        entries = json.loads((bundle / "bundle.json").read_text())["artifacts"]
        assert profile.split("-")[-1] in {e["format"] for e in entries}
        for e in entries:
            assert e["sha256"] == by_path[e["path"]]["sha256"] == sha256_file(bundle / e["path"])
    ov = next(a for a in card["artifacts"] if a["format"] == "openvino" and a["precision"] == "fp32")
    quick = ProtocolConfig(warmup_runs=1, warmup_seconds=0.0, min_runs=2, min_seconds=0.0)
    rows = bench_artifact({"abs_path": str(out / ov["path"]), "format": "openvino", "precision": "fp32"}, "openvino", quick,
                          threads=[1], batches=[1], options={}, input_size=(64, 64), target="t")
    assert rows[0]["fingerprint"]["artifact_sha256"] == rows[0]["artifact"]["sha256"] == ov["sha256"]

"""``qbheat-export eval`` of a detector export: COCO mAP of PyTorch and of each artifact on the
Fashion-MNIST detection canvases, equal to the detection probe's own number, and the gate."""
from __future__ import annotations

import ast
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from export.cli import main
from export.localize import SCOPES_KEY
from qbheat_contract.card import read_model_card
SIZE = 64
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def trained_detector(tmp_path_factory):
    """A detector head trained briefly on frozen resnet10t features of 300 canvases (96 px, input 64 px), 80 test and 60 val canvases."""
    from qbheat.checkpoint import save_checkpoint
    from qbheat.data import fashion_mnist
    from qbheat.data.detection_canvas import write_coco
    from qbheat.evaluation.detection import DetectionConfig, _scale_boxes, extract_multiscale, load_coco_split, train_detector
    from qbheat.evaluation.features import ProbePreprocessing as Preprocessing, recalibrate_untracked_batchnorm
    from qbheat.heads import head_spec
    from qbheat.models import create_model

    if not fashion_mnist.is_available():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    root = tmp_path_factory.mktemp("det")
    data = root / "canvas"
    write_coco(data, "train", 300)
    write_coco(data, "test", 80)
    write_coco(data, "val", 60)
    train = load_coco_split(data, "train")
    pre = Preprocessing(input_size=(3, SIZE, SIZE), mean=MEAN, std=STD, interpolation="bilinear", crop_pct=1.0)
    torch.manual_seed(0)
    backbone = create_model("resnet10t", num_classes=0)
    recalibrate_untracked_batchnorm(backbone, train.images, pre, batch_size=100, progress=False, every_layer=True)
    backbone.eval()
    feats = extract_multiscale(backbone, train.images, pre, progress=False)
    s = SIZE / train.images.shape[1]
    head = train_detector(feats, _scale_boxes(train.boxes, s, s), train.labels, 10, SIZE, DetectionConfig(epochs=6), 3e-3)
    ckpt = root / "det.pt"
    save_checkpoint(ckpt, {"kind": "detector", "model": {"name": "resnet10t", "kwargs": {}}, "backbone": backbone.state_dict(),
                           "method": "qbheat", "head": head_spec(head), "labels": list(fashion_mnist.CLASSES),
                           "preprocessing": pre.to_dict()})
    out = root / "export"
    assert main(["export", "--quiet", "--checkpoint", str(ckpt), "--formats", "onnx", "--precision", "fp32", "--out", str(out)]) == 0
    return {"data": data, "export": out, "backbone": backbone, "head": head, "pre": pre, "ckpt": ckpt}


def _scale_box_regression(path, factor: float = -1.0) -> None:
    """Scale the weights of every Conv created in head.box_pred, in place (by default negate them: the
    predicted box sides shrink where they grew)."""
    model = onnx.load(str(path))
    done = set()
    for node in model.graph.node:
        scopes = ast.literal_eval(next((p.value for p in node.metadata_props if p.key == SCOPES_KEY), "[]"))
        if node.op_type == "Conv" and "head.box_pred" in scopes and node.input[1] not in done:
            init = next(t for t in model.graph.initializer if t.name == node.input[1])
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, init.name))
            done.add(node.input[1])
    assert done
    onnx.save(model, str(path))


def test_eval_of_a_detector_gives_the_probe_s_map_and_the_artifact_s_drop(trained_detector, tmp_path, capsys):
    from qbheat.evaluation.detection import evaluate_detector, extract_multiscale, load_coco_split

    out = tmp_path / "export"
    shutil.copytree(trained_detector["export"], out)
    assert main(["eval", str(out), "--data", str(trained_detector["data"]), "--quiet"]) == 0
    card = read_model_card(out)
    ev = card["evaluation"]
    assert ev["task"] == "detection" and ev["data"]["count"] == 80 and "(test split)" in ev["data"]["source"]
    # the detection probe's own path (cached multiscale features → head decode + NMS → pycocotools) on the same canvases
    test = load_coco_split(trained_detector["data"], "test")
    with torch.no_grad():
        feats = extract_multiscale(trained_detector["backbone"], test.images, trained_detector["pre"], progress=False)
    probe = evaluate_detector(trained_detector["head"], feats, test, SIZE)
    assert ev["pytorch"]["mAP"] == pytest.approx(100 * probe["mAP"], abs=1e-3) and ev["pytorch"]["mAP"] > 0.5
    (art,) = card["artifacts"]
    acc = art["accuracy"]
    assert acc["n"] == 80 and abs(acc["drop_mAP"]) < 0.05 and acc["mAP"] == pytest.approx(ev["pytorch"]["mAP"] - acc["drop_mAP"], abs=1e-3)
    lo, hi = acc["drop_mAP_ci"]
    assert lo <= acc["drop_mAP"] <= hi and hi - lo < 0.5  # the same detections up to float noise: a narrow interval
    assert ev["bootstrap"]["resamples"] == 1000 and ev["bootstrap"]["method"].startswith("paired over images")
    assert "mAP %" in capsys.readouterr().out

    _scale_box_regression(out / art["path"])  # a copy whose box regression is off: the gate names it
    from qbheat_contract.hashing import artifact_sha256 as sha256_file

    card["artifacts"][0]["sha256"] = sha256_file(out / art["path"])
    (out / "model_card.json").write_text(__import__("json").dumps(card))
    budget = ev["pytorch"]["mAP"] / 2
    assert main(["eval", str(out), "--data", str(trained_detector["data"]), "--quiet", "--max-drop", f"{budget:.3f}"]) == 4
    err = capsys.readouterr().err
    bad = read_model_card(out)["artifacts"][0]["accuracy"]
    assert bad["drop_mAP"] > budget and bad["within_budget"] is False and bad["drop_mAP_ci"][0] > 0
    lo, hi = bad["drop_mAP_ci"]
    assert (f"onnx fp32 (onnx/model.fp32.onnx) loses {bad['drop_mAP']:.2f} points of COCO mAP (95 % CI {lo:.2f} to {hi:.2f}), "
            f"over the --max-drop budget of {float(f'{budget:.3f}'):g} points" in err)


def test_detector_eval_on_a_folder_without_annotations_is_a_user_error(trained_detector, tmp_path, capsys):
    assert main(["eval", str(trained_detector["export"]), "--data", str(tmp_path), "--quiet"]) == 2
    assert "is not a COCO folder" in capsys.readouterr().err


def test_export_of_a_detector_with_a_non_coco_eval_folder_fails_before_any_conversion(trained_detector, tmp_path, capsys,
                                                                                       monkeypatch):
    from export import pipeline

    def no_build(*a, **kw):
        raise AssertionError("an artifact was built before --eval-data was checked")

    monkeypatch.setattr(pipeline, "_build", no_build)
    out = tmp_path / "out"
    assert main(["export", "--quiet", "--checkpoint", str(trained_detector["ckpt"]), "--formats", "onnx", "--precision", "fp32",
                 "--eval-data", str(tmp_path), "--out", str(out)]) == 2
    assert f"{tmp_path} is not a COCO folder (no annotations/)" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def _shrinking_runners(monkeypatch, fmt: str):
    """Runners of ``fmt`` artifacts whose boxes come out 0.7× as wide and tall (PyTorch and other formats untouched)."""
    from export import evaluate

    real = evaluate.artifact_runner

    class Shrunk:
        def __init__(self, runner):
            self.runner = runner

        def __getattr__(self, name):
            return getattr(self.runner, name)

        def run(self, inputs):
            out = dict(self.runner.run(inputs))
            b = np.array(out["boxes"], np.float32)
            b[..., 2:] = b[..., :2] + 0.7 * (b[..., 2:] - b[..., :2])
            out["boxes"] = b
            return out

    def runner(art, *a, **kw):
        r = real(art, *a, **kw)
        return Shrunk(r) if art["format"] == fmt and not isinstance(r, str) else r

    monkeypatch.setattr(evaluate, "artifact_runner", runner)


def test_export_gate_on_a_detector_fails_closed_on_the_map_drop_and_drop_mismatch_leaves_it_out(trained_detector, tmp_path, capsys,
                                                                                                 monkeypatch):
    pytest.importorskip("openvino")
    args = ["export", "--quiet", "--checkpoint", str(trained_detector["ckpt"]), "--formats", "onnx,openvino", "--precision", "fp32",
            "--eval-data", str(trained_detector["data"]), "--eval-limit", "40", "--max-drop", "1.0"]
    good = tmp_path / "good"
    assert main([*args, "--out", str(good)]) == 0
    card = read_model_card(good)
    assert card["evaluation"]["task"] == "detection" and card["evaluation"]["data"]["count"] == 40 and card["evaluation"]["max_drop"] == 1.0
    assert all(a["accuracy"]["within_budget"] and "drop_mAP_ci" in a["accuracy"] for a in card["artifacts"])
    capsys.readouterr()

    _shrinking_runners(monkeypatch, "openvino")
    bad = tmp_path / "bad"
    assert main([*args, "--out", str(bad)]) == 4
    err = capsys.readouterr().err
    assert "openvino fp32 (openvino/fp32/model.xml) loses" in err and "points of COCO mAP (95 % CI" in err
    assert "over the --max-drop budget of 1 points" in err and "nothing was written" in err and not bad.exists()

    assert main([*args, "--out", str(bad), "--drop-mismatch"]) == 0
    card = read_model_card(bad)
    assert [(a["format"], a["precision"]) for a in card["artifacts"]] == [("onnx", "fp32")]
    (dropped,) = [n for n in card["not_built"] if n["format"] == "openvino"]
    assert dropped["reason"].startswith("accuracy: openvino fp32") and dropped["accuracy"]["drop_mAP"] > 1.0
    assert not (bad / "openvino" / "fp32" / "model.xml").exists()


def test_detection_validation_measures_the_map_drop_and_the_class_flips(trained_detector):
    from export import eval_detection as ed
    from export.deployable import DeployableModel
    from export.int8_auto import DetectionValidation, fits

    card = {"head": {"labels": list(__import__("qbheat.data.fashion_mnist", fromlist=["CLASSES"]).CLASSES)},
            "preprocessing": trained_detector["pre"].to_dict()}
    data = ed.load_detection_set(str(trained_detector["data"]), card, splits=("val",))
    assert data.source.endswith("(val split)") and len(data) == 60
    model = DeployableModel(trained_detector["backbone"], trained_detector["head"], "decode").eval()
    ref = ed.torch_outputs(model, data, batch=16)
    val = DetectionValidation(data, ref, ed.nms_of(model, SIZE))
    same = val.measure(ref)
    assert same["drop_mAP"] == 0.0 and same["drop_mAP_ci"] == [0.0, 0.0] and same["flips"] == 0.0 and same["logit_mse"] == 0.0
    assert fits(same, 0.0)
    shrunk = dict(ref, boxes=ref["boxes"].copy())
    b = shrunk["boxes"]
    b[..., 2:] = b[..., :2] + 0.5 * (b[..., 2:] - b[..., :2])  # every box half as wide and tall: IoU 0.25 at best
    worse = val.measure(shrunk)
    ref_map = ed.coco_result(ed.detections(ref, val.nms), data)["mAP"]
    assert ref_map > 0.5 and worse["drop_mAP"] > 0.8 * ref_map and worse["drop_mAP_ci"][0] > 0 and worse["logit_mse"] > 0
    assert not fits(worse, 0.5 * ref_map)
    swapped = dict(ref, scores=ref["scores"][..., ::-1].copy())  # class scores reversed: the top detections change class
    assert val.measure(swapped)["flips"] > 50


def test_export_auto_on_a_detector_searches_on_the_val_split_and_reports_on_test(trained_detector, tmp_path):
    pytest.importorskip("openvino")
    out = tmp_path / "auto"
    assert main(["export", "--quiet", "--checkpoint", str(trained_detector["ckpt"]), "--formats", "onnx,openvino", "--precision", "int8",
                 "--int8-scope", "auto", "--max-drop", "3.0", "--eval-data", str(trained_detector["data"]), "--eval-limit", "80",
                 "--out", str(out)]) == 0
    card = read_model_card(out)
    assert card["evaluation"]["task"] == "detection" and card["evaluation"]["data"]["source"].endswith("(test split)")
    for art in card["artifacts"]:
        auto = art["int8_auto"]
        assert auto["metric"] == "COCO mAP" and auto["budget"] == 3.0 and auto["start_scope"] == "all"
        assert auto["validation"]["source"].endswith("(val split)") and auto["validation"]["count"] == 60
        assert auto["validation_drop_mAP_ci"][1] <= 3.0 or len(auto["float_modules"]) == auto["modules"]
        if auto["sensitivity"] is not None:  # the float set is the ranking's prefix
            ranked = [s["module"] for s in auto["sensitivity"]]
            assert auto["float_modules"] == ranked[:len(auto["float_modules"])] and "drop_mAP" in auto["sensitivity"][0]
        assert any(n.startswith("--int8-scope auto:") and "validation COCO mAP drop" in n for n in art["notes"])
        assert "drop_mAP" in art["accuracy"] and art["accuracy"]["n"] == 80
    assert card["recipe"]["int8_scope"] == "auto" and not (out / ".int8_auto").exists()

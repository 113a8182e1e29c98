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
    """A detector head trained briefly on frozen resnet10t features of 300 canvases (96 px, input 64 px), and 80 test canvases."""
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
    return {"data": data, "export": out, "backbone": backbone, "head": head, "pre": pre}


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
    assert "mAP %" in capsys.readouterr().out

    _scale_box_regression(out / art["path"])  # a copy whose box regression is off: the gate names it
    from qbheat_contract.hashing import artifact_sha256 as sha256_file

    card["artifacts"][0]["sha256"] = sha256_file(out / art["path"])
    (out / "model_card.json").write_text(__import__("json").dumps(card))
    budget = ev["pytorch"]["mAP"] / 2
    assert main(["eval", str(out), "--data", str(trained_detector["data"]), "--quiet", "--max-drop", f"{budget:.3f}"]) == 4
    err = capsys.readouterr().err
    assert "onnx fp32 (onnx/model.fp32.onnx) loses" in err and "points of COCO mAP, over the --max-drop budget" in err
    bad = read_model_card(out)["artifacts"][0]["accuracy"]
    assert bad["drop_mAP"] > budget and bad["within_budget"] is False


def test_detector_eval_on_a_folder_without_annotations_is_a_user_error(trained_detector, tmp_path, capsys):
    assert main(["eval", str(trained_detector["export"]), "--data", str(tmp_path), "--quiet"]) == 2
    assert "is not a COCO folder" in capsys.readouterr().err

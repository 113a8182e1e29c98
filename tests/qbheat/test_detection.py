"""Detection: the Fashion-MNIST canvas generator, COCO evaluation, and the detector on frozen features."""
import json

import numpy as np
import pytest
import torch

from qbheat.data import fashion_mnist
from qbheat.errors import QBHeatError
from qbheat.evaluation.detection import (DetectionConfig, coco_map, load_coco_split, run_detection)
from qbheat.evaluation.features import ProbePreprocessing as Preprocessing

needs_fm = pytest.mark.skipif(not fashion_mnist.is_available(), reason="install dataset-fashion-mnist (apt-get) for this test")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@needs_fm
def test_canvases_are_deterministic_with_boxes_inside_and_non_degenerate():
    from qbheat.data.detection_canvas import CanvasConfig, CanvasGenerator

    a, b = CanvasGenerator(), CanvasGenerator()
    counts = []
    for split in ("train", "val", "test"):
        for i in range(40):
            img, boxes, labels = a.canvas(split, i)
            img2, boxes2, labels2 = b.canvas(split, i)
            assert np.array_equal(img, img2) and np.array_equal(boxes, boxes2) and np.array_equal(labels, labels2)
            assert img.shape == (96, 96) and img.dtype == np.uint8
            assert 1 <= len(boxes) <= 4 and len(labels) == len(boxes)
            x, y, w, h = boxes.T
            assert (x >= 0).all() and (y >= 0).all() and (x + w <= 96).all() and (y + h <= 96).all()
            assert (w >= 2).all() and (h >= 2).all()
            assert ((labels >= 0) & (labels <= 9)).all()
            # the box hugs ink: its border rows/columns hold pixels brighter than the background
            for (bx, by, bw, bh) in boxes.astype(int):
                assert img[by:by + bh, bx:bx + bw].max() > 24
            counts.append(len(boxes))
    assert set(counts) == {1, 2, 3, 4}
    assert not np.array_equal(a.canvas("train", 0)[0], a.canvas("test", 0)[0])  # splits differ
    other = CanvasGenerator(CanvasConfig(seed=1))
    assert not np.array_equal(a.canvas("train", 0)[0], other.canvas("train", 0)[0])


@needs_fm
def test_write_coco_layout_and_reuse(tmp_path):
    from qbheat.data.detection_canvas import CanvasGenerator, write_coco

    path = write_coco(tmp_path, "val", 12)
    coco = json.loads(path.read_text())
    assert path == tmp_path / "annotations" / "instances_val.json"
    assert len(coco["images"]) == 12 and len(list((tmp_path / "val").glob("*.png"))) == 12
    assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
    assert coco["categories"][0]["name"] == "T-shirt/top"
    _, boxes, labels = CanvasGenerator().canvas("val", 3)
    anns = [a for a in coco["annotations"] if a["image_id"] == 4]
    assert [a["category_id"] - 1 for a in anns] == labels.tolist()
    np.testing.assert_allclose([a["bbox"] for a in anns], boxes, atol=0.01)
    mtime = path.stat().st_mtime_ns
    write_coco(tmp_path, "val", 12)  # same config and size: left alone
    assert path.stat().st_mtime_ns == mtime
    split = load_coco_split(tmp_path, "val")
    assert split.images.shape == (12, 96, 96, 3) and len(split.boxes) == 12
    torch.testing.assert_close(split.boxes[3][:, 2:] - split.boxes[3][:, :2], torch.tensor(boxes[:, 2:]), atol=0.01, rtol=0)
    assert not list(tmp_path.glob(".val.*"))  # no temporary folder left


def _toy_coco():
    images = [{"id": i, "file_name": f"{i}.png", "height": 64, "width": 64} for i in (1, 2, 3)]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 30], "area": 600, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [30, 10, 25, 25], "area": 625, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 2, "bbox": [10, 20, 40, 30], "area": 1200, "iscrowd": 0},
        {"id": 4, "image_id": 3, "category_id": 1, "bbox": [0, 0, 16, 16], "area": 256, "iscrowd": 0},
    ]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def test_coco_map_of_perfect_predictions_is_one_and_degrades():
    coco = _toy_coco()
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in coco["annotations"]]
    assert coco_map(coco, perfect) == {"mAP": 1.0, "AP50": 1.0, "AP75": 1.0}
    shifted = [dict(d, bbox=[d["bbox"][0] + 2, d["bbox"][1] + 2, d["bbox"][2], d["bbox"][3]]) for d in perfect]
    m = coco_map(coco, shifted)
    assert 0 < m["mAP"] < 1 and m["AP50"] == 1.0
    wrong_class = [dict(d, category_id=3 - d["category_id"]) for d in perfect]
    assert coco_map(coco, wrong_class)["mAP"] == 0.0
    assert coco_map(coco, []) == {"mAP": 0.0, "AP50": 0.0, "AP75": 0.0}


def test_load_coco_split_errors(tmp_path):
    with pytest.raises(QBHeatError, match="no COCO annotations"):
        load_coco_split(tmp_path, "train")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train.json").write_text("{}")
    with pytest.raises(QBHeatError, match="not a COCO annotation file"):
        load_coco_split(tmp_path, "train")
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(_toy_coco()))
    with pytest.raises(QBHeatError, match="missing"):
        load_coco_split(tmp_path, "train")


@needs_fm
def test_detector_trains_on_frozen_features_and_scores_in_range(tmp_path):
    from qbheat.data.detection_canvas import write_coco
    from qbheat.models import create_model

    for split, n in (("train", 24), ("val", 8), ("test", 8)):
        write_coco(tmp_path, split, n)
    splits = {s: load_coco_split(tmp_path, s) for s in ("train", "val", "test")}
    torch.manual_seed(0)
    backbone = create_model("mobileformer_micro", num_classes=0)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    res = run_detection(backbone, splits["train"], splits["val"], splits["test"], Preprocessing(input_size=(3, 96, 96)),
                        DetectionConfig(epochs=2, batch_size=8, lrs=(1e-3, 3e-3)), progress=False)
    assert [g["lr"] for g in res.grid] == [1e-3, 3e-3] and res.lr == max(res.grid, key=lambda g: g["val_mAP"])["lr"]
    assert all(0.0 <= v <= 1.0 for v in res.test.values())
    assert res.head.kwargs["size_ranges"] == [16.0, 32.0] and res.head.kwargs["num_classes"] == 10
    for k, v in backbone.state_dict().items():  # frozen: not even BN statistics move
        assert torch.equal(v, before[k]), k

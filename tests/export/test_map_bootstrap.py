"""The detector's mAP drop interval on synthetic detections: COCOeval's accumulation re-done with image
multiplicities must equal pycocotools on the resample written out image by image, and the paired
drop's interval must behave (zero for identical detections, around the drop for worse ones)."""
from __future__ import annotations

import numpy as np
import pytest

from export.accuracy import image_resamples, percentile_interval
from export.eval_detection import CocoMatches, paired_map_drop
from qbheat.evaluation.detection import coco_map

N_IMAGES, N_CATS = 24, 3


def _dataset(seed: int = 0):
    """Ground truth (1–3 boxes per image, 3 categories) and detections: jittered true boxes, some missed,
    some mislabelled, plus false positives; continuous scores (no ties)."""
    rng = np.random.default_rng(seed)
    images = [{"id": 100 + i, "width": 96, "height": 96} for i in range(N_IMAGES)]
    anns, dets = [], []
    for im in images:
        for _ in range(rng.integers(1, 4)):
            x, y, w, h = rng.uniform(0, 50), rng.uniform(0, 50), rng.uniform(10, 40), rng.uniform(10, 40)
            cat = int(rng.integers(1, N_CATS + 1))
            anns.append({"id": len(anns) + 1, "image_id": im["id"], "category_id": cat, "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            if rng.random() < 0.85:
                j = rng.normal(0, 3, 4)
                label = cat if rng.random() < 0.9 else int(rng.integers(1, N_CATS + 1))
                dets.append({"image_id": im["id"], "category_id": label, "bbox": [x + j[0], y + j[1], w + j[2], h + j[3]],
                             "score": float(rng.uniform(0.3, 1.0))})
        for _ in range(rng.integers(0, 3)):
            dets.append({"image_id": im["id"], "category_id": int(rng.integers(1, N_CATS + 1)),
                         "bbox": [*rng.uniform(0, 60, 2), *rng.uniform(5, 30, 2)], "score": float(rng.uniform(0.0, 0.8))})
    gt = {"images": images, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in range(1, N_CATS + 1)]}
    return gt, dets


def _written_out(gt: dict, dets: list[dict], counts: np.ndarray):
    """The resample as a dataset: image i copied counts[i] times (new ids), with its boxes and detections."""
    images, anns, out = [], [], []
    by_image = {im["id"]: k for k, im in enumerate(gt["images"])}
    for k, im in enumerate(gt["images"]):
        for c in range(int(counts[k])):
            images.append({**im, "id": 10_000 * (c + 1) + im["id"]})
    for a in gt["annotations"]:
        for c in range(int(counts[by_image[a["image_id"]]])):
            anns.append({**a, "id": len(anns) + 1, "image_id": 10_000 * (c + 1) + a["image_id"]})
    for d in dets:
        for c in range(int(counts[by_image[d["image_id"]]])):
            out.append({**d, "image_id": 10_000 * (c + 1) + d["image_id"]})
    return {**gt, "images": images, "annotations": anns}, out


def test_unit_multiplicities_give_cocoeval_s_map():
    gt, dets = _dataset()
    m = CocoMatches.of(gt, dets)
    ours = m.weighted_map(np.ones((1, N_IMAGES)))[0]
    assert ours == pytest.approx(100 * coco_map(gt, dets)["mAP"], abs=1e-9)
    assert 10 < ours < 95  # neither trivial nor perfect


@pytest.mark.parametrize("row", [0, 1, 2])
def test_a_resample_s_map_equals_cocoeval_on_the_resample_written_out(row):
    gt, dets = _dataset(1)
    counts = image_resamples(N_IMAGES, resamples=3, seed=7)[row]
    assert counts.sum() == N_IMAGES and (counts == 0).any() and (counts > 1).any()
    ours = CocoMatches.of(gt, dets).weighted_map(counts[None])[0]
    gt_r, dets_r = _written_out(gt, dets, counts)
    assert ours == pytest.approx(100 * coco_map(gt_r, dets_r)["mAP"], abs=1e-9)


def test_paired_drop_is_zero_for_identical_detections_and_brackets_a_real_drop():
    gt, dets = _dataset(2)
    ref = CocoMatches.of(gt, dets)
    same = paired_map_drop(ref, CocoMatches.of(gt, [dict(d) for d in dets]), resamples=200)
    assert same["drop"] == 0.0 and same["ci"] == [0.0, 0.0] and same["n"] == N_IMAGES
    worse = [{**d, "bbox": [*d["bbox"][:2], 0.8 * d["bbox"][2], 0.8 * d["bbox"][3]]} for d in dets]  # boxes shrunk: IoU ≤ 0.64
    drop = paired_map_drop(ref, CocoMatches.of(gt, worse), resamples=500)
    expected = 100 * (coco_map(gt, dets)["mAP"] - coco_map(gt, worse)["mAP"])
    assert drop["drop"] == pytest.approx(expected, abs=1e-4) and drop["drop"] > 2
    assert drop["ci"][0] < drop["drop"] < drop["ci"][1] and drop["ci"][0] > 0  # paired: the same images on both sides


def test_no_detections_scores_zero_on_every_resample():
    gt, dets = _dataset(4)
    empty = CocoMatches.of(gt, [])
    assert (empty.weighted_map(image_resamples(N_IMAGES, 5)) == 0).all()
    d = paired_map_drop(CocoMatches.of(gt, dets), empty, resamples=100)
    assert d["drop"] == pytest.approx(100 * coco_map(gt, dets)["mAP"], abs=1e-4) and d["ci"][0] > 0


def test_percentile_interval_is_the_2_5_and_97_5_percentiles():
    assert percentile_interval(np.arange(1001) / 10) == [2.5, 97.5]

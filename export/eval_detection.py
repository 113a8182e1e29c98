"""COCO mAP of a detector export: PyTorch and every runnable artifact on a COCO-format folder
(the Fashion-MNIST detection canvases the probes use: ``qbheat detect make-data``).

SOURCE is a folder with ``annotations/instances_<split>.json`` and ``<split>/`` images, split
``test`` where it exists, else ``val``. Images are resized to the card's input size and normalised
as the card says (``qbheat.evaluation.features.Preprocessing``, as the detection probe does);
boxes are mapped back to the canvas's pixels. Categories map to the model's labels by name (by
position for unnamed ``class_<i>`` labels). A ``decode`` export's boxes and scores go through the
head's own NMS (the PyTorch function the ``nms`` variant exports); an ``nms`` export's detections
are used as they are. The metric is pycocotools' bbox mAP@[.5:.95] (with AP50, AP75), in %; the
drop is in mAP points against PyTorch. There is no bootstrap interval here: one COCOeval per
resample would cost more than the evaluation itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qbheat.errors import QBHeatError


@dataclass
class DetectionSet:
    source: str
    split: object  # qbheat.evaluation.detection.CocoSplit
    x: np.ndarray  # N×3×S×S float32, normalised
    scale: tuple[float, float]  # input pixels → canvas pixels (x, y)
    label_to_category: list[int]  # model label index → COCO category id

    def __len__(self) -> int:
        return len(self.x)

    def card(self) -> dict:
        import hashlib

        h = hashlib.sha256(np.ascontiguousarray(self.split.images).tobytes())
        return {"source": self.source, "count": len(self), "sha256": h.hexdigest()}

    def batches(self, batch: int):
        for start in range(0, len(self), batch):
            rows = slice(start, min(start + batch, len(self)))
            yield rows, self.x[rows]


def load_detection_set(source: str, card: dict, limit: int | None = None) -> DetectionSet:
    from qbheat.evaluation.detection import load_coco_split
    from qbheat.evaluation.features import ProbePreprocessing as Preprocessing, as_uint8_chw

    root = Path(source).expanduser()
    if not (root / "annotations").is_dir():
        raise QBHeatError(f"--data {source} is not a COCO folder (no annotations/); write one with 'qbheat detect make-data --out DIR'.")
    split = next((s for s in ("test", "val") if (root / "annotations" / f"instances_{s}.json").is_file()), None)
    if split is None:
        raise QBHeatError(f"{root / 'annotations'} has neither instances_test.json nor instances_val.json.")
    data = load_coco_split(root, split, limit)
    labels = (card.get("head") or {}).get("labels") or []
    names = data.class_names
    index = {n: i for i, n in enumerate(labels)}
    if all(n in index for n in names):
        label_to_category = [None] * len(labels)
        for c in data.categories:
            label_to_category[index[c["name"]]] = c["id"]
    elif labels == [f"class_{i}" for i in range(len(labels))] and len(names) <= len(labels):
        label_to_category = [c["id"] for c in data.categories] + [None] * (len(labels) - len(names))
    else:
        raise QBHeatError(f"the categories of {root} ({', '.join(names[:3])}, ...) are not among the model's labels "
                          f"({', '.join(labels[:4])}, ...); evaluate on data labelled like the model.")
    pre = Preprocessing.from_dict(card["preprocessing"])
    x = torch.cat([pre(as_uint8_chw(data.images[i:i + 256])) for i in range(0, len(data), 256)]).numpy()
    h, w = data.images.shape[1:3]
    size = pre.input_size
    return DetectionSet(f"{root} ({split} split)", data, x, (w / size[2], h / size[1]), label_to_category)


def detections(outputs: dict[str, np.ndarray], nms) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image (boxes D×4, scores D, labels D) from one batch of a model's named outputs."""
    if "num_detections" not in outputs:  # decode variant: the head's NMS
        b, s, lab, count = nms(np.asarray(outputs["boxes"], np.float32), np.asarray(outputs["scores"], np.float32))
    else:
        b, s, lab, count = (np.asarray(outputs[k]) for k in ("boxes", "scores", "labels", "num_detections"))
    return [(b[j, :int(count[j])], s[j, :int(count[j])], lab[j, :int(count[j])]) for j in range(len(b))]


def coco_result(dets, data: DetectionSet) -> dict:
    """pycocotools' bbox metrics (%) of per-image detections."""
    from qbheat.evaluation.detection import coco_map

    sx, sy = data.scale
    res = []
    for (boxes, scores, labels), image_id in zip(dets, data.split.image_ids):
        for (x1, y1, x2, y2), score, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            cat = data.label_to_category[int(lab)] if 0 <= int(lab) < len(data.label_to_category) else None
            if cat is None:
                continue
            res.append({"image_id": image_id, "category_id": cat, "bbox": [x1 * sx, y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy],
                        "score": float(score)})
    m = coco_map(data.split.coco, res)
    return {k: round(100.0 * v, 4) for k, v in m.items()} | {"detections": len(res)}


def nms_of(model, size: int):
    """The head's NMS on numpy decode outputs (the function the 'nms' variant exports)."""

    def nms(boxes, scores):
        with torch.no_grad():
            out = model.head.nms(torch.from_numpy(boxes), torch.from_numpy(scores), size, size)
        return tuple(o.numpy() for o in out)

    return nms


def torch_detections(model, data: DetectionSet, batch: int, size: int, threads: int = 1):
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    out = []
    try:
        with torch.no_grad():
            for _, x in data.batches(batch):
                outputs = dict(zip(model.output_names, (o.numpy() for o in model(torch.from_numpy(x)))))
                out += detections(outputs, nms_of(model, size))
    finally:
        torch.set_num_threads(before)
    return out


def evaluate(folder: Path, card: dict, data: DetectionSet, reference, batch: int = 64, threads: int = 1) -> tuple[dict, dict]:
    """(PyTorch's metrics, {artifact path: entry}) — entries hold mAP, AP50, AP75 (%) and drop_mAP (points)."""
    from export.evaluate import artifact_runner
    from qbheat_contract.card import artifact_path

    size = int(card["preprocessing"]["input_size"][-1])
    ref = coco_result(torch_detections(reference, data, batch, size, threads), data)
    nms = nms_of(reference, size)
    results = {}
    for art in card["artifacts"]:
        runner = artifact_runner(art, artifact_path(folder, art), batch, threads)
        if isinstance(runner, str):
            results[art["path"]] = {"skipped": runner}
            continue
        name = runner.inputs()[0]["name"]
        dets = []
        try:
            for _, x in data.batches(batch):
                dets += detections(runner.run({name: np.ascontiguousarray(x)}), nms)
        finally:
            runner.close()
        m = coco_result(dets, data)
        results[art["path"]] = {**m, "drop_mAP": round(ref["mAP"] - m["mAP"], 4), "n": len(data)}
    return ref, results


def block(data: DetectionSet, ref: dict, max_drop: float | None) -> dict:
    """The card's ``evaluation`` block for a detector."""
    from datetime import datetime, timezone

    return {"data": data.card(), "task": "detection", "metric": "COCO bbox mAP@[.5:.95] (%), drop in points vs PyTorch (no interval)",
            "pytorch": {**ref, "n": len(data)}, "max_drop": max_drop, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def format_table(card: dict, ev: dict) -> str:
    p = ev["pytorch"]
    lines = [f"COCO bbox metrics on {ev['data']['source']}, {ev['data']['count']} images",
             f"{'model':<16} {'mAP %':>7} {'AP50 %':>7} {'AP75 %':>7}  drop mAP (points)",
             f"{'pytorch':<16} {p['mAP']:7.2f} {p['AP50']:7.2f} {p['AP75']:7.2f}  reference"]
    for art in card["artifacts"]:
        a = art.get("accuracy") or {}
        name = f"{art['format']} {art['precision']}"
        if "skipped" in a:
            lines.append(f"{name:<16} {'–':>7} {'–':>7} {'–':>7}  not run: {a['skipped']}")
        elif a:
            lines.append(f"{name:<16} {a['mAP']:7.2f} {a['AP50']:7.2f} {a['AP75']:7.2f}  {a['drop_mAP']:+.2f}")
    return "\n".join(lines)

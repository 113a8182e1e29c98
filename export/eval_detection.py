"""COCO mAP of a detector export: PyTorch and every runnable artifact on a COCO-format folder
(the Fashion-MNIST detection canvases the probes use: ``qbheat detect make-data``).

SOURCE is a folder with ``annotations/instances_<split>.json`` and ``<split>/`` images, split
``test`` where it exists, else ``val``. Images are resized to the card's input size and normalised
as the card says (``qbheat.evaluation.features.Preprocessing``, as the detection probe does);
boxes are mapped back to the canvas's pixels. Categories map to the model's labels by name (by
position for unnamed ``class_<i>`` labels). A ``decode`` export's boxes and scores go through the
head's own NMS (the PyTorch function the ``nms`` variant exports); an ``nms`` export's detections
are used as they are. The metric is pycocotools' bbox mAP@[.5:.95] (with AP50, AP75), in %; the
drop is in mAP points against PyTorch, with a paired-bootstrap 95 % interval over images.

The interval (``paired_map_drop``): one COCOeval per resample would cost more than the evaluation
itself, but only the accumulation depends on which images a resample drew. So pycocotools'
``evaluate()`` (the IoU matching of each image, area "all", 100 detections) runs once per model
(``CocoMatches``), and each resample re-accumulates AP exactly as ``COCOeval.accumulate`` does, with
each image's detections and ground truths counted as often as the resample drew the image
(``export.accuracy.image_resamples``: the classifier's resampling, as multiplicities). PyTorch and the
artifact are scored on the same resamples; the interval is the percentile interval of their mAP
differences (``export.accuracy.percentile_interval``). With all multiplicities 1 it is COCOeval's mAP.
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


def coco_splits(source: str | Path) -> list[str]:
    """The splits of a COCO folder (``annotations/instances_<split>.json``), or [] where it is none."""
    ann = Path(source).expanduser() / "annotations"
    return sorted(f.name[len("instances_"):-len(".json")] for f in ann.glob("instances_*.json")) if ann.is_dir() else []


def load_detection_set(source: str, card: dict, limit: int | None = None, splits: tuple[str, ...] = ("test", "val")) -> DetectionSet:
    """The first of ``splits`` that ``source`` holds (the reported evaluation: test, else val; ``--int8-scope
    auto``'s validation: val), preprocessed as the card says, its categories mapped to the model's labels."""
    from qbheat.evaluation.detection import load_coco_split
    from qbheat.evaluation.features import ProbePreprocessing as Preprocessing, as_uint8_chw

    root = Path(source).expanduser()
    if not (root / "annotations").is_dir():
        raise QBHeatError(f"{source} is not a COCO folder (no annotations/); write one with 'qbheat detect make-data --out DIR'.")
    have = coco_splits(root)
    split = next((s for s in splits if s in have), None)
    if split is None:
        raise QBHeatError(f"{root / 'annotations'} has none of {', '.join(f'instances_{s}.json' for s in splits)}.")
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


def detections(outputs: dict[str, np.ndarray], nms, batch: int = 64) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image (boxes D×4, scores D, labels D) from a model's named outputs on any number of images; a decode
    variant's outputs go through the head's NMS ``batch`` images at a time (its IoU matrices grow with the batch)."""
    if "num_detections" in outputs:
        b, s, lab, count = (np.asarray(outputs[k]) for k in ("boxes", "scores", "labels", "num_detections"))
        return [(b[j, :int(count[j])], s[j, :int(count[j])], lab[j, :int(count[j])]) for j in range(len(b))]
    out = []
    for i in range(0, len(outputs["boxes"]), batch):
        out += detections(dict(zip(("boxes", "scores", "labels", "num_detections"),
                                   nms(np.asarray(outputs["boxes"][i:i + batch], np.float32),
                                       np.asarray(outputs["scores"][i:i + batch], np.float32)))), nms)
    return out


def coco_detections(dets, data: DetectionSet) -> list[dict]:
    """Per-image detections as COCO results (canvas pixels, xywh, category ids)."""
    sx, sy = data.scale
    res = []
    for (boxes, scores, labels), image_id in zip(dets, data.split.image_ids):
        for (x1, y1, x2, y2), score, lab in zip(boxes.tolist(), scores.tolist(), labels.tolist()):
            cat = data.label_to_category[int(lab)] if 0 <= int(lab) < len(data.label_to_category) else None
            if cat is None:
                continue
            res.append({"image_id": image_id, "category_id": cat, "bbox": [x1 * sx, y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy],
                        "score": float(score)})
    return res


def coco_result(dets, data: DetectionSet) -> dict:
    """pycocotools' bbox metrics (%) of per-image detections."""
    from qbheat.evaluation.detection import coco_map

    res = coco_detections(dets, data)
    m = coco_map(data.split.coco, res)
    return {k: round(100.0 * v, 4) for k, v in m.items()} | {"detections": len(res)}


AREA_ALL, MAX_DETS = [0, 1e10], 100  # COCOeval's "all" area range and its largest maxDets: the mAP of stats[0]


@dataclass
class CocoMatches:
    """pycocotools' per-image matching of one model's detections, kept so that mAP (AP@[.5:.95], area
    "all", 100 detections) can be re-accumulated for any multiplicities of the images.

    Per category: ``image`` (D, index into ``image_ids`` of each detection, in COCOeval's score order),
    ``tp`` / ``fp`` (T×D bool: matched / unmatched and not ignored, per IoU threshold) and ``gt`` (N,
    non-ignored ground truths per image)."""

    image_ids: list
    categories: list[dict]  # [{image, tp, fp, gt}]
    rec_thrs: np.ndarray

    @classmethod
    def of(cls, coco_gt: dict, detections: list[dict]) -> "CocoMatches":
        import contextlib
        import io

        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        image_ids = [im["id"] for im in coco_gt["images"]]
        row = {i: j for j, i in enumerate(image_ids)}
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO()
            gt.dataset = {k: v for k, v in coco_gt.items() if k in ("images", "annotations", "categories", "info")}
            gt.dataset.setdefault("info", {})
            gt.createIndex()
            ev = COCOeval(gt, gt.loadRes(detections) if detections else COCO(), "bbox")
            ev.params.imgIds = image_ids
            if detections:
                ev.evaluate()
        n_t = len(ev.params.iouThrs)
        per_cat: dict = {c: {"image": [], "scores": [], "m": [], "ig": [], "gt": np.zeros(len(image_ids))} for c in ev.params.catIds}
        if detections:
            for e in ev.evalImgs:
                if e is None or list(e["aRng"]) != AREA_ALL:
                    continue
                c = per_cat[e["category_id"]]
                k = min(len(e["dtScores"]), MAX_DETS)
                c["image"] += [row[e["image_id"]]] * k
                c["scores"] += list(e["dtScores"][:k])
                c["m"].append(np.asarray(e["dtMatches"])[:, :k].reshape(n_t, k))
                c["ig"].append(np.asarray(e["dtIgnore"])[:, :k].reshape(n_t, k))
                c["gt"][row[e["image_id"]]] = int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0))
        else:  # no detections at all: AP 0 wherever there are ground truths
            for a in coco_gt["annotations"]:
                if not a.get("iscrowd", 0):
                    per_cat[a["category_id"]]["gt"][row[a["image_id"]]] += 1
        cats = []
        for c in per_cat.values():
            order = np.argsort(-np.asarray(c["scores"], np.float64), kind="mergesort")  # COCOeval.accumulate's order
            m = np.concatenate(c["m"], 1)[:, order] if c["m"] else np.zeros((n_t, 0))
            ig = np.concatenate(c["ig"], 1)[:, order].astype(bool) if c["ig"] else np.zeros((n_t, 0), bool)
            cats.append({"image": np.asarray(c["image"], np.int64)[order], "tp": (m != 0) & ~ig, "fp": (m == 0) & ~ig, "gt": c["gt"]})
        return cls(image_ids, cats, np.asarray(ev.params.recThrs, np.float64))

    def weighted_map(self, weights: np.ndarray, chunk_elems: int = 2_000_000) -> np.ndarray:
        """mAP (%) for each row of ``weights`` (R×N image multiplicities), as COCOeval.accumulate + summarize."""
        weights = np.atleast_2d(np.asarray(weights, np.float64))
        n_r, n_q = len(weights), len(self.rec_thrs)
        total, valid = np.zeros(n_r), np.zeros(n_r)
        for c in self.categories:
            npig = weights @ c["gt"]  # R: non-ignored ground truths of the resample
            has = npig > 0  # COCOeval leaves a category without ground truths out of the mean (-1)
            valid += has
            n_t, n_d = c["tp"].shape
            if n_d == 0:
                continue  # its precision is 0 at every recall threshold
            step = max(1, chunk_elems // (n_t * n_d))
            for lo in range(0, n_r, step):
                w = weights[lo:lo + step][:, c["image"]][:, None, :]  # r×1×D
                tp, fp = np.cumsum(w * c["tp"], -1), np.cumsum(w * c["fp"], -1)  # r×T×D
                with np.errstate(invalid="ignore", divide="ignore"):
                    rc = tp / npig[lo:lo + step, None, None]
                pr = tp / (fp + tp + np.spacing(1))
                pr = np.maximum.accumulate(pr[..., ::-1], -1)[..., ::-1]  # the precision envelope
                # first detection whose recall reaches each threshold (searchsorted 'left' per row, in integers):
                reached = np.searchsorted(self.rec_thrs, np.nan_to_num(rc, nan=-1.0), side="right")  # thresholds ≤ rc
                rows = np.arange(reached.shape[0] * n_t)[:, None]
                counts = np.bincount((rows * (n_q + 1) + reached.reshape(-1, n_d)).ravel(), minlength=len(rows) * (n_q + 1))
                first = np.cumsum(counts.reshape(-1, n_q + 1), 1)[:, :n_q]  # per threshold j: detections with fewer than j+1 reached
                env = pr.reshape(-1, n_d)
                q = np.where(first < n_d, np.take_along_axis(env, np.minimum(first, n_d - 1), 1), 0.0)
                total[lo:lo + step] += np.where(has[lo:lo + step], q.reshape(-1, n_t * n_q).sum(1), 0.0)
        n_each = (self.categories[0]["tp"].shape[0] if self.categories else 1) * n_q  # IoU thresholds × recall thresholds
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(valid > 0, 100.0 * total / (valid * n_each), 0.0)


def paired_map_drop(ref: CocoMatches, art: CocoMatches, resamples: int | None = None, confidence: float | None = None,
                    seed: int | None = None) -> dict:
    """Drop in mAP points (PyTorch − artifact) and its paired-bootstrap interval over images."""
    from export import accuracy

    resamples = accuracy.RESAMPLES if resamples is None else resamples
    weights = accuracy.image_resamples(len(ref.image_ids), resamples, accuracy.SEED if seed is None else seed)
    drops = ref.weighted_map(weights) - art.weighted_map(weights)
    ones = np.ones((1, len(ref.image_ids)))
    point = float(ref.weighted_map(ones)[0] - art.weighted_map(ones)[0])
    return {"drop": round(point, 4), "ci": accuracy.percentile_interval(drops, accuracy.CONFIDENCE if confidence is None else confidence),
            "n": len(ref.image_ids)}


def nms_of(model, size: int):
    """The head's NMS on numpy decode outputs (the function the 'nms' variant exports)."""

    def nms(boxes, scores):
        with torch.no_grad():
            out = model.head.nms(torch.from_numpy(boxes), torch.from_numpy(scores), size, size)
        return tuple(o.numpy() for o in out)

    return nms


def torch_outputs(model, data: DetectionSet, batch: int = 64, threads: int = 0) -> dict[str, np.ndarray]:
    """PyTorch's outputs by name on every image of ``data`` (concatenated over batches), on ``threads``
    intra-op threads (0: as set)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    parts: dict[str, list] = {}
    try:
        with torch.no_grad():
            for _, x in data.batches(batch):
                for name, o in zip(model.output_names, model(torch.from_numpy(x))):
                    parts.setdefault(name, []).append(o.numpy())
    finally:
        torch.set_num_threads(before)
    return {k: np.concatenate(v) for k, v in parts.items()}


def runner_outputs(runner, data: DetectionSet, batch: int = 64) -> dict[str, np.ndarray]:
    """A loaded runner's outputs by name on every image of ``data`` (an ``nms`` export's detections padded
    to its fixed maximum, so batches concatenate)."""
    name = runner.inputs()[0]["name"]
    parts: dict[str, list] = {}
    for _, x in data.batches(batch):
        for k, v in runner.run({name: np.ascontiguousarray(x)}).items():
            parts.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v) for k, v in parts.items()}


def evaluate(folder: Path, card: dict, data: DetectionSet, reference, batch: int = 64, threads: int = 1) -> tuple[dict, dict]:
    """(PyTorch's metrics, {artifact path: entry}) — entries hold mAP, AP50, AP75 (%), drop_mAP (points) and
    drop_mAP_ci (its paired-bootstrap interval)."""
    from export.evaluate import artifact_runner
    from qbheat_contract.card import artifact_path

    nms = nms_of(reference, int(card["preprocessing"]["input_size"][-1]))
    ref_dets = detections(torch_outputs(reference, data, batch, threads), nms, batch)
    ref = coco_result(ref_dets, data)
    ref_matches = CocoMatches.of(data.split.coco, coco_detections(ref_dets, data))
    results = {}
    for art in card["artifacts"]:
        runner = artifact_runner(art, artifact_path(folder, art), batch, threads)
        if isinstance(runner, str):
            results[art["path"]] = {"skipped": runner}
            continue
        try:
            dets = detections(runner_outputs(runner, data, batch), nms, batch)
        finally:
            runner.close()
        results[art["path"]] = entry(ref, coco_result(dets, data), ref_matches, CocoMatches.of(data.split.coco, coco_detections(dets, data)))
    return ref, results


def entry(ref: dict, metrics: dict, ref_matches: CocoMatches, matches: CocoMatches) -> dict:
    """One artifact's accuracy entry: its metrics, the mAP drop against PyTorch and the drop's interval."""
    drop = paired_map_drop(ref_matches, matches)
    return {**metrics, "drop_mAP": round(ref["mAP"] - metrics["mAP"], 4), "drop_mAP_ci": drop["ci"], "n": drop["n"]}


def gate(results: dict[str, dict], card: dict, max_drop: float) -> list[tuple[dict, object]]:
    """(artifact, ``accuracy.BudgetVerdict``) for each evaluated artifact whose mAP drop is over ``max_drop``
    points; sets each evaluated entry's ``within_budget``."""
    from export import accuracy

    over = []
    for art in card["artifacts"]:
        r = results.get(art["path"]) or {}
        if "drop_mAP" not in r:
            continue
        verdict = accuracy.within_budget(r["drop_mAP"], max_drop, "COCO mAP")
        r["within_budget"] = verdict.passed
        if not verdict.passed:
            over.append((art, verdict))
    return over


def block(data: DetectionSet, ref: dict, max_drop: float | None) -> dict:
    """The card's ``evaluation`` block for a detector."""
    from datetime import datetime, timezone

    from export import accuracy

    return {"data": data.card(), "task": "detection", "metric": "COCO bbox mAP@[.5:.95] (%), drop in points vs PyTorch",
            "pytorch": {**ref, "n": len(data)},
            "bootstrap": {"resamples": accuracy.RESAMPLES, "confidence": accuracy.CONFIDENCE, "seed": accuracy.SEED,
                          "method": "paired over images (pycocotools' matching once per model, mAP re-accumulated per resample "
                                    "with image multiplicities)"},
            "max_drop": max_drop, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def format_table(card: dict, ev: dict) -> str:
    p = ev["pytorch"]
    lines = [f"COCO bbox metrics on {ev['data']['source']}, {ev['data']['count']} images",
             f"{'model':<16} {'mAP %':>7} {'AP50 %':>7} {'AP75 %':>7}  drop mAP (points, 95 % CI)",
             f"{'pytorch':<16} {p['mAP']:7.2f} {p['AP50']:7.2f} {p['AP75']:7.2f}  reference"]
    for art in card["artifacts"]:
        a = art.get("accuracy") or {}
        name = f"{art['format']} {art['precision']}"
        if "skipped" in a:
            lines.append(f"{name:<16} {'–':>7} {'–':>7} {'–':>7}  not run: {a['skipped']}")
        elif a:
            ci = f" [{a['drop_mAP_ci'][0]:+.2f}, {a['drop_mAP_ci'][1]:+.2f}]" if a.get("drop_mAP_ci") else ""
            lines.append(f"{name:<16} {a['mAP']:7.2f} {a['AP50']:7.2f} {a['AP75']:7.2f}  {a['drop_mAP']:+.2f}{ci}")
    return "\n".join(lines)


def export_gate(folder: Path, artifacts: list[dict], labels, preprocessing: dict, reference, data: DetectionSet,
                max_drop: float | None):
    """The export's ``--eval-data`` gate for a detector head on ``data`` (``load_detection_set``): (results,
    over-budget (artifact, verdict) pairs, the card's evaluation block), for ``export.pipeline._accuracy_gate``."""
    card = {"artifacts": artifacts, "head": {"labels": labels}, "preprocessing": preprocessing}
    ref, results = evaluate(folder, card, data, reference)
    over = gate(results, card, max_drop) if max_drop is not None else []
    return results, over, block(data, ref, max_drop)

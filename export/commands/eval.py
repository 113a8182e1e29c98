"""``qbheat-export eval EXPORT --data SOURCE``: task accuracy of PyTorch and of every runnable artifact.

Examples:
    qbheat-export eval quickstart_out/export --data fashion-mnist
    qbheat-export eval out/ --data /data/imagenet --limit 5000 --max-drop 1.0
    qbheat-export eval det_export/ --data runs/fm_canvas       # a detector: COCO mAP on a COCO folder (test, else val split)

Top-1 / top-5 of the export's source model and of each artifact on the labelled set, the drop in
points with a paired-bootstrap 95 % interval, written into the folder's ``model_card.json``; for a
detector, COCO mAP and its drop in mAP points, with the same interval (``export.eval_detection``).
Exit status: 0; 2 for a user error (bad path, unknown source, folder without a card); 4 when
``--max-drop`` is given and an artifact loses more top-1 (detector: mAP) points than it allows (results are recorded).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qbheat_contract.errors import ACCURACY_FAILED as ACCURACY_EXIT


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("export_dir", metavar="EXPORT", help="an export folder holding model_card.json")
    p.add_argument("--data", required=True, metavar="SOURCE", help="classifier: fashion-mnist (its 10k test images) or an ImageFolder tree of class sub-folders; "
                                                                 "detector: a COCO folder (qbheat detect make-data)")
    p.add_argument("--limit", type=int, help="evaluate on an evenly spaced subset of this many images")
    p.add_argument("--batch-size", type=int, default=64, help="images per run (default 64)")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads per model (default 1: PyTorch runs beside the artifacts, one core each; 0 = each runtime's default)")
    p.add_argument("--checkpoint", metavar="FILE", help="the export's source checkpoint, where it moved (its SHA-256 must match the card)")
    p.add_argument("--max-drop", type=float, metavar="POINTS", help="exit 4 when an artifact loses more top-1 points (detector: COCO mAP points) than this")
    p.add_argument("--out", metavar="JSON", help="also write the evaluation as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from deploy_targets.results import write_text_atomic
    from export import evaluate
    from export.eval_data import load_eval_set
    from export.localize import describe
    from qbheat_contract.card import ModelCardError, read_model_card
    from qbheat.errors import QBHeatError

    folder = Path(args.export_dir)
    if not folder.is_dir():
        raise QBHeatError(f"{folder} is not a folder; pass an export folder written by 'qbheat-export export'.")
    try:
        card = read_model_card(folder)
    except ModelCardError as e:
        raise QBHeatError(f"{e}; pass a folder written by 'qbheat-export export'.") from None
    if card["head"]["type"] not in ("classifier", "detector"):
        raise QBHeatError(f"eval measures classifier heads (top-1 / top-5) and detector heads (COCO mAP); this export's head is "
                          f"a {card['head']['type']}.")
    if args.batch_size < 1 or (args.max_drop is not None and args.max_drop < 0):
        raise QBHeatError("--batch-size must be at least 1 and --max-drop non-negative.")
    evaluate.check_hashes(folder, card)
    if card["head"]["type"] == "detector":
        return _run_detection(args, folder, card)
    data = load_eval_set(args.data, card, args.limit)
    reference, deploy = evaluate.reference_model(card, args.checkpoint)
    ref_scores, results = evaluate.evaluate_all(folder, card, data, reference, args.batch_size, args.threads, args.quiet)
    over = evaluate.gate(results, card, args.max_drop) if args.max_drop is not None else []
    for art, _ in over:  # where the artifact departs from PyTorch: into the card and the message
        results[art["path"]]["divergence"] = evaluate.divergence(folder, art, deploy, data)
    block = evaluate.evaluation_block(data, ref_scores, args.max_drop)
    evaluate.record(folder, card, block, results)
    if args.out:
        write_text_atomic(args.out, json.dumps({"evaluation": block, "artifacts": results}, indent=1) + "\n")
    print(format_table(card, block))
    for art, verdict in over:
        r = results[art["path"]]
        name = f"{art['format']} {art['precision']} ({art['path']})"
        print(f"qbheat-export: accuracy: {verdict.sentence(name, r['drop_top1_ci'])}{describe(r['divergence'])}.", file=sys.stderr)
    print(f"model card: {folder / 'model_card.json'}", file=sys.stderr)
    return ACCURACY_EXIT if over else 0


def _run_detection(args: argparse.Namespace, folder: Path, card: dict) -> int:
    """COCO mAP of a detector export (export.eval_detection); same card, gate and exit codes as classifiers."""
    from deploy_targets.results import write_text_atomic
    from export import eval_detection, evaluate

    data = eval_detection.load_detection_set(args.data, card, args.limit)
    reference, _ = evaluate.reference_model(card, args.checkpoint)
    ref, results = eval_detection.evaluate(folder, card, data, reference, args.batch_size, args.threads)
    over = eval_detection.gate(results, card, args.max_drop) if args.max_drop is not None else []
    block = eval_detection.block(data, ref, args.max_drop)
    evaluate.record(folder, card, block, results)
    if args.out:
        write_text_atomic(args.out, json.dumps({"evaluation": block, "artifacts": results}, indent=1) + "\n")
    print(eval_detection.format_table(card, block))
    for art, verdict in over:
        name = f"{art['format']} {art['precision']} ({art['path']})"
        print(f"qbheat-export: accuracy: {verdict.sentence(name, results[art['path']]['drop_mAP_ci'])}.", file=sys.stderr)
    print(f"model card: {folder / 'model_card.json'}", file=sys.stderr)
    return ACCURACY_EXIT if over else 0


def format_table(card: dict, block: dict) -> str:
    ev = block["pytorch"]
    lines = [f"accuracy on {block['data']['source']}, {block['data']['count']} images",
             f"{'model':<16} {'top-1 %':>8} {'top-5 %':>8}  drop top-1 (95 % CI)",
             f"{'pytorch':<16} {ev['top1']:8.2f} {ev['top5']:8.2f}  reference"]
    for art in card["artifacts"]:
        a = art.get("accuracy") or {}
        name = f"{art['format']} {art['precision']}"
        if "skipped" in a:
            lines.append(f"{name:<16} {'–':>8} {'–':>8}  not run: {a['skipped']}")
        elif a:
            lo, hi = a["drop_top1_ci"]
            lines.append(f"{name:<16} {a['top1']:8.2f} {a['top5']:8.2f}  {a['drop_top1']:+.2f} [{lo:+.2f}, {hi:+.2f}]")
    return "\n".join(lines)

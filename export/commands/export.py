"""``qbheat-export export``: checkpoint or timm model + head → verified ONNX / OpenVINO / Core ML / TensorRT.

Examples:
    qbheat-export export --model mobileformer_294m --head classifier --formats onnx,openvino,coreml \\
        --precision fp32,fp16,int8 --out artifacts/mf294
    qbheat-export export --checkpoint runs/probe.pt --formats onnx --precision int8 --calibration data/calib --out out/
    qbheat-export export --model hcnet_edge_xs --head detector --head-variant nms --image-size 320 --out out/det
    qbheat-export export --recipe export.yaml --out out/   # flags override the recipe

Exit status: 0 on success; 2 for a user error (unknown model, mismatched checkpoint, missing backend,
unwritable --out, empty calibration folder); 3 when an artifact fails parity (nothing is written
unless --allow-mismatch); 4 when an artifact loses more than --max-drop top-1 points (a detector: COCO mAP points) on --eval-data
(nothing is written unless --drop-mismatch, which leaves that artifact out).
"""
from __future__ import annotations

import argparse
import json
import sys

from export.quantize import AUTO, INT8_SCOPES
from export.recipe import ExportRecipe
from qbheat_contract.errors import ACCURACY_FAILED as ACCURACY_EXIT
from qbheat_contract.errors import PARITY_FAILED as PARITY_EXIT


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("source (one of)")
    src.add_argument("--checkpoint", metavar="FILE", help="qbheat checkpoint (pretrain, probe or detector)")
    src.add_argument("--model", metavar="NAME", help="timm model name (random init; qbheat never downloads weights)")
    p.add_argument("--recipe", metavar="YAML", help="YAML file with the same fields as these flags; flags win")
    p.add_argument("--head", choices=["classifier", "detector", "features"],
                   help="head to export (default: the checkpoint's own head, else features)")
    p.add_argument("--head-variant", help="classifier: logits|probabilities; detector: decode (boxes+scores) | nms (fixed-size detections)")
    p.add_argument("--head-type", choices=["linear", "transformer_probe"], help="new classifier head type (default linear)")
    p.add_argument("--num-classes", type=int, help="classes of a new, untrained head (default 1000 / 80)")
    p.add_argument("--formats", help="comma list of onnx,openvino,coreml,tensorrt (default onnx,openvino,coreml)")
    p.add_argument("--precision", dest="precisions", help="comma list of fp32,fp16,int8 (default all three)")
    p.add_argument("--calibration", metavar="DIR", help="folder of images: the first --calibration-count calibrate FP16/INT8, 4 of the rest check parity "
                        "(default: scikit-image's photos for both)")
    p.add_argument("--calibration-count", type=int, help="calibration images to use (default 16)")
    p.add_argument("--int8-scope", choices=[*INT8_SCOPES, AUTO],
                   help="what INT8 quantises: convs (default; token matmuls, attention and elementwise ops stay float), all, or auto "
                        "(all, with the most sensitive modules kept in float until the top-1 drop fits --max-drop; needs --eval-data)")
    p.add_argument("--int8-validation", metavar="SOURCE",
                   help="auto: labelled images to choose the float modules on, not --eval-data's (default for fashion-mnist: its training split)")
    p.add_argument("--int8-validation-limit", type=int, metavar="N", help="auto: evenly spaced validation images to use (default 5000)")
    p.add_argument("--image-size", type=int, help="input size, a multiple of 32 (default: the model's)")
    p.add_argument("--max-batch", type=int, help="largest batch of the dynamic batch dimension (default 64)")
    p.add_argument("--out", metavar="DIR", help="output folder (written atomically)")
    p.add_argument("--allow-mismatch", action="store_true", default=None, help="keep artifacts outside tolerance (recorded in the card)")
    p.add_argument("--drop-mismatch", action="store_true", default=None,
                   help="ship the artifacts that pass parity and list the others under not_built (fails only if none passes)")
    p.add_argument("--eval-data", metavar="SOURCE", help="measure every artifact's top-1 against PyTorch on fashion-mnist (test split) or an ImageFolder tree; "
                                                                "a detector: COCO mAP on a COCO folder (qbheat detect make-data)")
    p.add_argument("--eval-limit", type=int, metavar="N", help="evaluate on an evenly spaced subset of N images")
    p.add_argument("--max-drop", type=float, metavar="POINTS",
                   help="fail (exit 4, nothing written) when an artifact loses more top-1 (detector: mAP) points than this; with --drop-mismatch it is left out")
    p.add_argument("--simplify", action="store_true", default=None, help="run onnxslim (kept only if outputs are unchanged)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace a non-empty --out folder")
    p.add_argument("--serial", dest="parallel", action="store_false", default=None,
                   help="build every artifact in this process, in order (default on Linux: Core ML in a parallel worker)")
    p.add_argument("--quiet", action="store_true", help="no step lines on stderr")
    p.add_argument("--json", action="store_true", help="print the model card as JSON on stdout")


FIELDS = ("checkpoint", "model", "head", "head_variant", "head_type", "num_classes", "formats", "precisions", "calibration",
          "calibration_count", "int8_scope", "int8_validation", "int8_validation_limit", "image_size", "max_batch", "out", "allow_mismatch", "drop_mismatch", "simplify", "overwrite", "parallel",
          "eval_data", "eval_limit", "max_drop")


def recipe_from_args(args: argparse.Namespace) -> ExportRecipe:
    recipe = ExportRecipe.from_yaml(args.recipe) if args.recipe else ExportRecipe()
    return recipe.merged({k: getattr(args, k) for k in FIELDS}).validate()


def run(args: argparse.Namespace) -> int:
    from export.pipeline import AccuracyError, ParityError, run_export

    recipe = recipe_from_args(args)
    try:
        card = run_export(recipe, quiet=args.quiet)
    except ParityError as e:
        print(f"qbheat-export: parity failed: {e}", file=sys.stderr)
        return PARITY_EXIT
    except AccuracyError as e:
        print(f"qbheat-export: accuracy gate failed: {e}", file=sys.stderr)
        return ACCURACY_EXIT
    if args.json:
        print(json.dumps(card, indent=2))
    else:
        for a in card["artifacts"]:
            flag = " MISMATCH (kept: --allow-mismatch)" if a.get("mismatch") else ""
            print(f"{a['format']:<9} {a['precision']:<5} {a['verified']:<9} {a['size_bytes'] / 1e6:7.2f} MB  {a['path']}{flag}")
        for a in card["artifacts"]:
            acc = a.get("accuracy") or {}
            if "top1" in acc:
                print(f"{a['format']:<9} {a['precision']:<5} top-1 {acc['top1']:.2f} %, drop {acc['drop_top1']:+.2f} points "
                      f"[{acc['drop_top1_ci'][0]:+.2f}, {acc['drop_top1_ci'][1]:+.2f}] against PyTorch's "
                      f"{card['evaluation']['pytorch']['top1']:.2f} %")
        for n in card["not_built"]:
            print(f"{n['format']:<9} not built: {n['reason']}")
            chk = n.get("onnx_check")
            if chk:
                verdict = "parsable" if chk["parsable"] else f"unsupported {chk['unsupported'] + chk['restrictions']}"
                print(f"{'':<9} ONNX check against the TensorRT parser's operator list: {verdict}")
            qdq = n.get("int8_qdq_check")
            if qdq:
                verdict = "parsable" if qdq["check"]["parsable"] else f"rejected {qdq['check']['unsupported'] + qdq['check']['restrictions']}"
                agreement = "within" if qdq["passed"] else "outside"
                print(f"{'':<9} INT8 Q/DQ file (TensorRT style): {verdict}; on ONNX Runtime, min cosine {qdq['min_cosine']:.4f}, "
                      f"{agreement} the INT8 tolerance")
        print(f"model card: {recipe.out}/model_card.json")
    return 0

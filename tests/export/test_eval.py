"""``qbheat-export eval``: accuracy of PyTorch and of every runnable artifact on Fashion-MNIST and an
ImageFolder tree, written into the model card; user errors are one sentence and change nothing."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from export.cli import main
from qbheat_contract.card import read_model_card

LIMIT = "1500"


@pytest.fixture(scope="module")
def fashion_export(fashion_ckpt, tmp_path_factory):
    from export.commands.quickstart import _calibration_folder

    root = tmp_path_factory.mktemp("fm_export")
    calib = _calibration_folder("fashion-mnist", root / "calib")
    out = root / "export"
    rc = main(["export", "--quiet", "--checkpoint", str(fashion_ckpt), "--formats", "onnx,openvino", "--precision", "fp32,int8",
               "--calibration", str(calib), "--calibration-count", "32", "--drop-mismatch", "--out", str(out)])
    assert rc == 0
    return out


def _pytorch_top1(ckpt, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 of the checkpoint's backbone + head, computed here without the eval code."""
    from qbheat.checkpoint import build_backbone, load_checkpoint
    from qbheat.evaluation.features import ProbePreprocessing as Preprocessing, as_uint8_chw
    from qbheat.heads import head_from_spec, head_inputs

    ckpt = load_checkpoint(ckpt)
    backbone, head = build_backbone(ckpt).eval(), head_from_spec(ckpt["head"]).eval()
    x = Preprocessing.from_dict(ckpt["preprocessing"])(as_uint8_chw(images))
    with torch.no_grad():
        pred = head(head_inputs(backbone, x, "pooled")).argmax(1).numpy()
    return 100.0 * float((pred == labels).mean())


def test_eval_on_fashion_mnist_measures_every_artifact_and_writes_the_card(fashion_export, fashion_ckpt, tmp_path, capsys):
    from qbheat.data import fashion_mnist

    out = tmp_path / "export"
    shutil.copytree(fashion_export, out)
    rc = main(["eval", str(out), "--data", "fashion-mnist", "--limit", LIMIT, "--quiet", "--out", str(tmp_path / "eval.json")])
    assert rc == 0
    card = read_model_card(out)
    assert card["schema"] == "qbheat.model_card/2"
    ev = card["evaluation"]
    assert ev["data"]["count"] == int(LIMIT) and ev["data"]["source"].startswith("fashion-mnist")
    images, labels = fashion_mnist.load("test")
    pick = np.linspace(0, len(labels) - 1, int(LIMIT)).round().astype(int)
    assert ev["pytorch"]["top1"] == pytest.approx(_pytorch_top1(fashion_ckpt, images[pick], labels[pick]), abs=1e-3)
    assert ev["pytorch"]["top1"] > 50  # a real classifier, so a drop means something
    assert ev["pytorch"]["top5"] >= ev["pytorch"]["top1"]
    measured = {(a["format"], a["precision"]): a["accuracy"] for a in card["artifacts"]}
    assert ("onnx", "fp32") in measured and ("onnx", "int8") in measured and ("openvino", "fp32") in measured
    for (fmt, precision), acc in measured.items():
        assert acc["n"] == int(LIMIT) and acc["top5"] >= acc["top1"]
        assert acc["drop_top1"] == pytest.approx(ev["pytorch"]["top1"] - acc["top1"], abs=1e-3)
        lo, hi = acc["drop_top1_ci"]
        assert lo <= acc["drop_top1"] <= hi
        if precision == "fp32":  # the same function to float rounding: not one image changes
            assert acc["drop_top1"] == 0.0 and acc["drop_top1_ci"] == [0.0, 0.0]
    printed = capsys.readouterr().out
    assert "pytorch" in printed and "onnx int8" in printed and "drop top-1" in printed
    assert json.loads((tmp_path / "eval.json").read_text())["evaluation"]["pytorch"] == ev["pytorch"]


def test_eval_on_an_image_folder_maps_its_classes_by_name(fashion_export, fashion_ckpt, tmp_path):
    from PIL import Image

    from qbheat.data import fashion_mnist

    images, labels = fashion_mnist.load("test")
    tree = tmp_path / "tree"
    keep = {1: "Trouser", 8: "Bag", 9: "Ankle boot"}
    picked = []
    for i in range(len(labels)):
        if labels[i] in keep and sum(1 for _, l in picked if l == labels[i]) < 10:
            (tree / "val" / keep[labels[i]]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(tree / "val" / keep[labels[i]] / f"{i:05d}.png")
            picked.append((i, labels[i]))
    out = tmp_path / "export"
    shutil.copytree(fashion_export, out)
    assert main(["eval", str(out), "--data", str(tree), "--quiet"]) == 0
    ev = read_model_card(out)["evaluation"]
    # folder order is sorted by class name: Ankle boot, Bag, Trouser
    order = sorted(picked, key=lambda p: (keep[p[1]], p[0]))
    idx, lab = np.array([p[0] for p in order]), np.array([p[1] for p in order])
    assert ev["data"]["count"] == 30
    assert ev["pytorch"]["top1"] == pytest.approx(_pytorch_top1(fashion_ckpt, images[idx], lab), abs=1e-3)


def test_eval_user_errors_are_one_sentence_and_leave_the_card_alone(fashion_export, tmp_path, capsys):
    out = tmp_path / "export"
    shutil.copytree(fashion_export, out)
    before = (out / "model_card.json").read_bytes()
    cases = [
        ([str(tmp_path / "missing"), "--data", "fashion-mnist"], "is not a folder"),
        ([str(tmp_path), "--data", "fashion-mnist"], "no model card at"),
        ([str(out), "--data", "mnist-typo"], "neither 'fashion-mnist' nor an existing folder"),
        ([str(out), "--data", str(tmp_path / "flat")], "neither 'fashion-mnist' nor an existing folder"),
    ]
    for argv, expected in cases:
        assert main(["eval", *argv, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert expected in err and err.startswith("qbheat-export: error:") and err.count("\n") == 1, err
    (out / "onnx" / "model.int8.onnx").write_bytes(b"not the exported file")
    assert main(["eval", str(out), "--data", "fashion-mnist", "--quiet"]) == 2
    assert "does not match the SHA-256 in its model card" in capsys.readouterr().err
    assert (out / "model_card.json").read_bytes() == before
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_a_schema_1_card_is_still_read_and_eval_upgrades_it(fashion_export, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(fashion_export, out)
    card = json.loads((out / "model_card.json").read_text())
    card["schema"] = "qbheat.model_card/1"
    (out / "model_card.json").write_text(json.dumps(card))
    assert read_model_card(out)["schema"] == "qbheat.model_card/1"
    assert main(["eval", str(out), "--data", "fashion-mnist", "--limit", "64", "--quiet"]) == 0
    assert read_model_card(out)["schema"] == "qbheat.model_card/2"


def test_bench_rows_and_the_report_carry_the_measured_accuracy(fashion_export, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(fashion_export, out)
    assert main(["eval", str(out), "--data", "fashion-mnist", "--limit", "300", "--quiet"]) == 0
    card = read_model_card(out)
    bench = tmp_path / "bench.json"
    assert main(["bench", str(out), "--target", "local-cpu-ort", "--threads", "1", "--batch", "1", "--quick", "--no-e2e",
                 "--out", str(bench)]) == 0
    rows = json.loads(bench.read_text())["rows"]
    by_path = {a["path"]: a["accuracy"] for a in card["artifacts"]}
    assert rows and all(r["accuracy"] == by_path[r["artifact"]["path"]] for r in rows)
    for r in rows:  # peak resident memory at load and in the steady state, per artifact
        mem = r["memory"]
        assert mem["load"]["peak_mb"] >= mem["load"]["start_mb"] > 0 and mem["steady"]["peak_mb"] >= mem["steady"]["start_mb"] > 0
    assert main(["report", str(bench), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    int8 = by_path["onnx/model.int8.onnx"]
    assert "| top-1 % | drop (pts) | peak RSS MB load / run |" in md and f"| {int8['top1']:.2f} | {int8['drop_top1']:+.2f} [" in md


def test_the_set_is_preprocessed_once_and_pytorch_beside_the_artifacts_gives_the_sequential_numbers(fashion_export, monkeypatch):
    from export import eval_data, evaluate
    from export.eval_data import load_eval_set

    card = read_model_card(fashion_export)
    data = load_eval_set("fashion-mnist", card, 300)
    first, again = list(data.batches(64)), list(data.batches(64))
    assert len(first) == 5 and all(a[1] is b[1] for a, b in zip(first, again))  # kept, not recomputed
    reference, _ = evaluate.reference_model(card)
    threads = torch.get_num_threads()
    seq_ref = evaluate.torch_scores(reference, data, quiet=True, threads=1)
    assert torch.get_num_threads() == threads  # restored
    seq = evaluate.evaluate_artifacts(fashion_export, card, data, seq_ref, threads=1, quiet=True)
    par_ref, par = evaluate.evaluate_all(fashion_export, card, data, reference, quiet=True)
    np.testing.assert_array_equal(par_ref, seq_ref)
    assert par == seq and len(par) == len(card["artifacts"])
    assert torch.get_num_threads() == threads

    monkeypatch.setattr(eval_data, "CACHE_BYTES", 0)  # too large to keep: preprocessed per pass, same values
    big = load_eval_set("fashion-mnist", card, 300)
    one, two = list(big.batches(64)), list(big.batches(64))
    assert all(a[1] is not b[1] and np.array_equal(a[1], b[1]) for a, b in zip(one, two))
    np.testing.assert_array_equal(one[0][1], first[0][1])

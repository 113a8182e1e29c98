"""``qbheat probe`` and ``qbheat detect``: results files, exportable checkpoints, and error paths."""
import json

import pytest
import torch

from qbheat import cli
from qbheat.checkpoint import build_backbone, load_checkpoint, save_checkpoint
from qbheat.data import fashion_mnist

needs_fm = pytest.mark.skipif(not fashion_mnist.is_available(), reason="install dataset-fashion-mnist (apt-get) for this test")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _fails(argv, capsys, needle):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("qbheat: error:") and needle in err, err
    assert "Traceback" not in err


@needs_fm
def test_linear_probe_cli_writes_results_and_an_exportable_probe(tmp_path, capsys):
    out, head = tmp_path / "r.json", tmp_path / "probe.pt"
    assert cli.main(["probe", "--model", "mobileformer_micro", "--protocol", "linear", "--train-size", "300",
                     "--test-size", "100", "--image-size", "32", "--no-progress", "--out", str(out),
                     "--save-head", str(head)]) == 0
    res = json.loads(out.read_text())
    acc = res["metrics"]["linear_top1"]
    assert 0.2 < acc <= 1.0 and res["data"]["train_images"] == 300 and res["details"]["weight_decay"] > 0
    ckpt = load_checkpoint(head, kinds=("probe",))
    assert ckpt["head"]["type"] == "linear" and len(ckpt["labels"]) == 10
    assert ckpt["preprocessing"]["input_size"] == [3, 32, 32] and ckpt["preprocessing"]["interpolation"] == "bilinear"
    # the export contract: backbone + head rebuilt from the file give the reported accuracy
    from qbheat.evaluation.features import ProbePreprocessing as Preprocessing, as_uint8_chw
    from qbheat.evaluation.sources import classification_data
    from export.deployable import DeployableModel
    from qbheat.heads import head_from_spec

    model = DeployableModel(build_backbone(ckpt), head_from_spec(ckpt["head"]))
    pre = Preprocessing.from_dict(ckpt["preprocessing"])
    x, y, _ = classification_data("fashion-mnist", "test", limit=100, seed=0)
    with torch.no_grad():
        (logits,) = model(pre(as_uint8_chw(x)))
    assert abs(float((logits.argmax(1) == torch.as_tensor(y)).float().mean()) - acc) < 1e-6


@needs_fm
def test_knn_probe_cli_on_a_pretrain_checkpoint(tmp_path, capsys):
    from qbheat.models import create_model

    ck = tmp_path / "pre.pt"
    model = create_model("mobileformer_micro", num_classes=0)
    save_checkpoint(ck, {"kind": "pretrain", "model": {"name": "mobileformer_micro", "kwargs": {}},
                         "backbone": model.state_dict(), "method": "qbheat",
                         "preprocessing": {"mean": [0.5] * 3, "std": [0.5] * 3, "input_size": [3, 32, 32],
                                           "interpolation": "bicubic"}})
    out = tmp_path / "knn.json"
    assert cli.main(["probe", "--checkpoint", str(ck), "--protocol", "knn", "--train-size", "200", "--test-size", "50",
                     "--no-progress", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["metrics"]) == {"knn_k20_t0.07", "knn_k200_t0.1"}
    assert res["source"]["method"] == "qbheat" and res["preprocessing"]["input_size"] == [3, 32, 32]
    assert res["preprocessing"]["mean"] == [0.5] * 3
    assert "knn_k20_t0.07: " in capsys.readouterr().out


def test_probe_cli_error_paths(tmp_path, capsys):
    _fails(["probe", "--checkpoint", str(tmp_path / "none.pt"), "--protocol", "linear"], capsys, "does not exist")
    _fails(["probe", "--model", "mobileformer_micro", "--protocol", "knn", "--save-head", str(tmp_path / "h.pt")],
           capsys, "no trained head")
    _fails(["probe", "--model", "no_such_model", "--protocol", "linear"], capsys, "unknown model")
    _fails(["probe", "--model", "mobileformer_micro", "--protocol", "linear", "--train-size", "0"], capsys, "≥ 1")
    _fails(["probe", "--model", "mobileformer_micro", "--protocol", "linear", "--data", str(tmp_path)], capsys,
           "no train/ sub-folder")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    _fails(["probe", "--checkpoint", str(bad), "--protocol", "knn"], capsys, "corrupt")
    with pytest.raises(SystemExit):  # argparse: exactly one of --checkpoint / --model
        cli.main(["probe", "--protocol", "knn"])
    assert not (tmp_path / "h.pt").exists()


def test_detect_cli_error_paths(tmp_path, capsys):
    from qbheat.models import create_model

    ck = tmp_path / "pre.pt"
    save_checkpoint(ck, {"kind": "pretrain", "model": {"name": "mobileformer_micro", "kwargs": {}},
                         "backbone": create_model("mobileformer_micro", num_classes=0).state_dict()})
    _fails(["detect", "eval", "--checkpoint", str(ck), "--data", str(tmp_path)], capsys, "expected one of ['detector']")
    _fails(["detect", "train", "--model", "mobileformer_micro", "--data", str(tmp_path / "nowhere")], capsys,
           "no COCO annotations")
    _fails(["detect", "make-data", "--out", str(tmp_path / "c"), "--train-size", "0"], capsys, "≥ 1")
    _fails(["detect", "train", "--model", "mobileformer_micro", "--data", str(tmp_path), "--lr", "-1"], capsys, "> 0")


@needs_fm
def test_detect_cli_train_then_eval_agree(tmp_path, capsys):
    data = tmp_path / "canvas"
    assert cli.main(["detect", "make-data", "--out", str(data), "--train-size", "16", "--val-size", "8",
                     "--test-size", "8", "--no-progress"]) == 0
    det, out = tmp_path / "det.pt", tmp_path / "det.json"
    assert cli.main(["detect", "train", "--model", "mobileformer_micro", "--data", str(data), "--train-size", "16",
                     "--val-size", "8", "--test-size", "8", "--epochs", "1", "--lr", "3e-3", "--no-progress",
                     "--save-head", str(det), "--out", str(out)]) == 0
    trained = json.loads(out.read_text())["metrics"]["test_mAP"]
    ckpt = load_checkpoint(det, kinds=("detector",))
    assert ckpt["head"]["type"] == "detector" and ckpt["labels"][0] == "T-shirt/top"
    ev = tmp_path / "ev.json"
    assert cli.main(["detect", "eval", "--checkpoint", str(det), "--data", str(data), "--no-progress",
                     "--out", str(ev)]) == 0
    assert abs(json.loads(ev.read_text())["metrics"]["mAP"] - trained) < 1e-9

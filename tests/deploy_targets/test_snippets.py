"""Swift and Kotlin snippets carry the card's preprocessing, labels and I/O names."""
from __future__ import annotations

import pytest

from qbheat_contract.errors import QBHeatError
from deploy_targets.snippets import kotlin_snippet, swift_snippet, write_snippets
from qbheat_contract.card import read_model_card


def test_swift_uses_vision_and_the_labels(export_dir):
    card = read_model_card(export_dir)
    text = swift_snippet(card, {"format": "coreml", "precision": "fp16", "path": "coreml/tiny.mlpackage"})
    for needle in ("import Vision", "VNCoreMLRequest", "VNClassificationObservation", ".centerCrop", '"tee", "trouser"',
                   'forResource: "tiny"', "class TinyClassifierClassifier", "mean = [0.485, 0.456, 0.406]", "softmax"):
        assert needle in text
    assert "{{" not in text


@pytest.mark.parametrize("fmt, path, needles", [
    ("litert", "m.tflite", ["org.tensorflow.lite.Interpreter", "setNumThreads(threads)", 'openFd("m.tflite")', "FloatArray(5)"]),
    ("onnx", "model.onnx", ["ai.onnxruntime.OrtSession", 'mapOf("x" to tensor)', "longArrayOf(1, 3, HEIGHT.toLong(), WIDTH.toLong())"]),
])
def test_kotlin_preprocessing_from_the_card(export_dir, fmt, path, needles):
    text = kotlin_snippet(read_model_card(export_dir), {"format": fmt, "precision": "fp32", "path": path})
    for needle in needles + ["const val HEIGHT = 32", "const val CROP_PCT = 0.875f", "floatArrayOf(0.485f, 0.456f, 0.406f)",
                             "floatArrayOf(0.229f, 0.224f, 0.225f)", "PIXEL_SCALE = 0.00392157f", 'arrayOf("tee", "trouser"', "Bitmap"]:
        assert needle in text, needle
    assert "{{" not in text and text.count("{") == text.count("}")


def test_only_fitting_artifacts_get_snippets(export_dir, tmp_path):
    card = read_model_card(export_dir)
    written = write_snippets(card, card["artifacts"], tmp_path)
    assert [p.name for p in written] == ["model_onnx.kt"]  # the OpenVINO IR gets none
    with pytest.raises(QBHeatError, match="Swift snippet is for Core ML"):
        swift_snippet(card, card["artifacts"][0])
    features = dict(card, head={"type": "features", "labels": None})
    assert write_snippets(features, card["artifacts"], tmp_path / "f") == []

"""Integration snippets generated per artifact from ``model_card.json``.

* Swift (iOS / macOS): Vision + Core ML — ``VNCoreMLRequest`` with centre-crop scaling (the
  ``.mlpackage`` bakes mean/std into its ImageType), classification observations or softmax +
  top-k over the logits, and the card's labels.
* Kotlin (Android): LiteRT ``Interpreter`` for a ``.tflite`` artifact, ONNX Runtime Mobile
  (``OrtSession``) for an ``.onnx`` one — Bitmap → resize/crop → normalised NCHW float buffer with
  the card's size, mean and std, then softmax + top-k labels.

Templates live in ``templates/`` with ``{{name}}`` placeholders (Kotlin and Swift both use ``$``).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from qbheat_contract.errors import QBHeatError

TEMPLATES = Path(__file__).with_name("templates")

_KOTLIN_RUNTIME = {
    "litert": {
        "runtime_name": "LiteRT Interpreter (XNNPACK)",
        "gradle_dependency": 'implementation("com.google.ai.edge.litert:litert:1.4.0")',
        "imports": "import org.tensorflow.lite.Interpreter\nimport java.io.FileInputStream\nimport java.nio.channels.FileChannel",
        "session_fields": """    private val interpreter: Interpreter = context.assets.openFd("{{artifact_file}}").use { fd ->
        val model = FileInputStream(fd.fileDescriptor).channel.map(FileChannel.MapMode.READ_ONLY, fd.startOffset, fd.declaredLength)
        Interpreter(model, Interpreter.Options().setNumThreads(threads))
    }""",
        "run_function": """    private fun run(input: ByteBuffer): FloatArray {
        val output = Array(1) { FloatArray({{num_outputs}}) }
        interpreter.run(input, output)
        return output[0]
    }

    override fun close() = interpreter.close()""",
    },
    "onnx": {
        "runtime_name": "ONNX Runtime Mobile",
        "gradle_dependency": 'implementation("com.microsoft.onnxruntime:onnxruntime-android:1.22.0")',
        "imports": "import ai.onnxruntime.OnnxTensor\nimport ai.onnxruntime.OrtEnvironment\nimport ai.onnxruntime.OrtSession",
        "session_fields": """    private val env: OrtEnvironment = OrtEnvironment.getEnvironment()
    private val session: OrtSession = env.createSession(
        context.assets.open("{{artifact_file}}").readBytes(),
        OrtSession.SessionOptions().apply { setIntraOpNumThreads(threads) })""",
        "run_function": """    private fun run(input: ByteBuffer): FloatArray {
        OnnxTensor.createTensor(env, input.asFloatBuffer(), longArrayOf(1, 3, HEIGHT.toLong(), WIDTH.toLong())).use { tensor ->
            session.run(mapOf("{{input_name}}" to tensor)).use { result ->
                @Suppress("UNCHECKED_CAST")
                return (result[0].value as Array<FloatArray>)[0]
            }
        }
    }

    override fun close() = session.close()""",
    },
}


def _render(text: str, values: dict[str, Any]) -> str:
    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key not in values:
            raise KeyError(f"template placeholder {{{{{key}}}}} has no value")
        return str(values[key])
    # two passes: runtime blocks themselves hold placeholders
    return re.sub(r"\{\{(\w+)\}\}", sub, re.sub(r"\{\{(\w+)\}\}", sub, text))


def _class_name(model_name: str) -> str:
    parts = re.split(r"[^A-Za-z0-9]+", model_name or "model")
    name = "".join(p[:1].upper() + p[1:] for p in parts if p)
    return (name if name[:1].isalpha() else "Model" + name) + "Classifier"


def _values(card: dict[str, Any], artifact: dict[str, Any]) -> dict[str, Any]:
    prep, head, io = card["preprocessing"], card["head"], card["io"]
    _, h, w = prep["input_size"]
    labels = head.get("labels") or []
    scale = prep.get("pixel_scale", 1 / 255)
    scale_f = (float(scale.split("/")[0]) / float(scale.split("/")[1])) if isinstance(scale, str) else float(scale)
    crop = float(prep.get("crop_pct") or 1.0)
    outputs = io["outputs"][0]
    n_out = outputs["shape"][-1] if isinstance(outputs["shape"][-1], int) else len(labels)
    path = Path(artifact["path"])
    return {
        "model_name": card["model"].get("name", "model"), "artifact": artifact["path"], "artifact_file": path.name,
        "artifact_ext": path.suffix.lstrip("."), "model_stem": path.stem, "precision": artifact["precision"],
        "class_name": _class_name(card["model"].get("name", "model")), "height": h, "width": w,
        "resize": int(math.floor(min(h, w) / crop)), "crop_pct": crop, "pixel_scale": scale if isinstance(scale, str) else f"{scale_f:.6g}",
        "pixel_scale_float": f"{scale_f:.8f}", "mean": list(prep["mean"]), "std": list(prep["std"]),
        "kotlin_mean": ", ".join(f"{m}f" for m in prep["mean"]), "kotlin_std": ", ".join(f"{s}f" for s in prep["std"]),
        "swift_labels": ", ".join(json.dumps(lab) for lab in labels), "kotlin_labels": ", ".join(json.dumps(lab) for lab in labels),
        "input_name": io["inputs"][0]["name"], "output_name": outputs["name"], "num_outputs": n_out,
        "package": "ai.qbheat.generated",
    }


def swift_snippet(card: dict[str, Any], artifact: dict[str, Any]) -> str:
    if artifact["format"] != "coreml":
        raise QBHeatError(f"the Swift snippet is for Core ML artifacts; {artifact['path']} is {artifact['format']}.")
    if card["head"].get("type") != "classifier":
        raise QBHeatError("snippets are generated for classifier heads only; this card's head is "
                          f"{card['head'].get('type')!r}.")
    return _render((TEMPLATES / "ImageClassifier.swift.tmpl").read_text(), _values(card, artifact))


def kotlin_snippet(card: dict[str, Any], artifact: dict[str, Any]) -> str:
    kind = {"litert": "litert", "onnx": "onnx"}.get(artifact["format"])
    if kind is None:
        raise QBHeatError(f"the Kotlin snippet is for LiteRT (.tflite) or ONNX artifacts; {artifact['path']} is {artifact['format']}.")
    if card["head"].get("type") != "classifier":
        raise QBHeatError("snippets are generated for classifier heads only; this card's head is "
                          f"{card['head'].get('type')!r}.")
    values = dict(_values(card, artifact), **_KOTLIN_RUNTIME[kind])
    return _render((TEMPLATES / "ImageClassifier.kt.tmpl").read_text(), values)


def write_snippets(card: dict[str, Any], artifacts: list[dict[str, Any]], folder: str | Path) -> list[Path]:
    """Write the snippets that apply to ``artifacts`` into ``folder``; return their paths."""
    folder = Path(folder)
    written = []
    if card["head"].get("type") != "classifier":
        return written
    for a in artifacts:
        stem = Path(a["path"]).stem
        if a["format"] == "coreml":
            text, name = swift_snippet(card, a), f"{stem}.swift"
        elif a["format"] in ("litert", "onnx"):
            text, name = kotlin_snippet(card, a), f"{stem}_{a['format']}.kt"
        else:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
        written.append(folder / name)
    return written

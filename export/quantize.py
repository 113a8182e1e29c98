"""Static INT8 Q/DQ ONNX files from the calibration images (ONNX Runtime's quantiser).

Per-channel symmetric INT8 weights, MinMax calibration, QDQ format, in one of two ``QDQ_STYLES``:
'onnxruntime' (the ONNX INT8 artifact: asymmetric UINT8 activations and INT32 biases, which ONNX
Runtime and OpenVINO fuse into integer convolutions) and 'tensorrt' (the TensorRT INT8 engine's
source: signed INT8 activations with zero points 0 and float biases, the only Q/DQ TensorRT's parser
takes). What is quantised is the recipe's ``int8_scope``, one entry of ``INT8_SCOPES``, which also
sets what NNCF leaves out of OpenVINO's INT8. Elementwise ops
are never quantised: the detector's decoding math (box pixels 0…W next to probabilities 0…1) would
lose every score under one per-tensor scale — the reason Ultralytics limits ``op_types_to_quantize``
the same way.
``quant_pre_process`` (shape inference + ORT graph optimisation) runs first when it can; it can
fail on attention graphs with a bare AssertionError, and then the plain model is quantised.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

# What INT8 covers, by ``--int8-scope``: the ONNX op types ORT's quantiser may quantise, and the
# OpenVINO op types NNCF must leave in f32 (NNCF's default quantises everything it can).
# 'convs' is the default because it measured better on both counts for Mobile-Former (benchmarks/results/lean_graph.md,
# 224 px, batch 1, 2 threads, OpenVINO INT8 against f32 of the same graph on natural images):
# Mobile-Former-294M 1.12× f32 speed with cosine ≥ 0.997, against 0.71× and 0.80 for NNCF's default,
# whose INT8 token projections and attention are per-op overhead on 6-token tensors and lose the
# function (a later run: 1.05× at 0.9992 against 0.75× at 0.82); for MobileNetV3-L the scope made
# little difference (1.45× against 1.39×, then 1.32× against 1.34×).
# Under 'convs', OpenVINO also stores the float MatMuls' weights as INT8 (NNCF weight compression:
# activations stay float, weights are dequantised in the kernel), which keeps the file near the
# 'all' scope's size (MF-294M + MergeClassifier IR: 40.6 → 15.3 MB) at cosine 0.99993 to the INT8 model
# without it. Speed is within noise (one A/B: 1.04–1.19× f32 against 1.07–1.20×), though OpenVINO's
# counters show the compressed FullyConnected nodes ~24 % slower than f32 ones on an AVX2 CPU.
# ONNX has no portable weight-only form, so its Linear weights stay FP32.
INT8_SCOPES = {
    "convs": {"onnx_op_types": ["Conv"],
              "openvino_ignored_types": ["MatMul", "Softmax", "MVN", "Multiply", "Maximum", "Add"],
              "openvino_weight_only_int8": True},
    "all": {"onnx_op_types": ["Conv", "Gemm", "MatMul"], "openvino_ignored_types": [], "openvino_weight_only_int8": False},
}

AUTO = "auto"  # --int8-scope auto: INT8_SCOPES' widest, with sensitive modules kept in float (export.int8_auto)


# How the Q/DQ nodes are typed. The TensorRT style runs on ONNX Runtime's CPU provider too, but slower:
# with float biases ONNX Runtime cannot fuse DQ → Conv → Q into an integer convolution (MF-294M at
# 224 px, batch 1, 2 threads, convs scope: 16.4 ms against 10.3 ms for the 'onnxruntime' style, one
# side-by-side run on the 2-core AMD EPYC development VM), so each runtime gets its own file.
#
# The 'onnxruntime' style's weights use 7 bits (reduce_range). ONNX Runtime's x86 kernels multiply u8 activations
# by s8 weights with VPMADDUBSW, whose int16 pair sums saturate on CPUs without VNNI (AVX2 only, e.g. AMD EPYC
# Zen 3): a resnet10t Fashion-MNIST probe at 32 px, Conv scope, fell to min cosine 0.23 against FP32 and top-1
# 71.1 % (FP32 78.1 %) on 512 test images there; with 7-bit weights min cosine 0.91, mean 0.987, top-1 77.5 %.
# (u8 weights, the other documented fix, scored 0.92 / 0.993 / 77.5 % there but failed that probe's parity
# check at batch 1 through the whole pipeline.) ONNX Runtime documents reduce_range for exactly this; the same
# file then runs right on VNNI CPUs and on ARM too, at 7-bit weight precision everywhere.
QDQ_STYLES = {
    "onnxruntime": {"activation_type": "QUInt8", "reduce_range": True, "extra_options": {}},
    "tensorrt": {"activation_type": "QInt8",
                 "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}},
}


class _Reader:
    """``CalibrationDataReader``: one image at a time under the model's input name."""

    def __init__(self, input_name: str, images: np.ndarray):
        self.input_name, self.images, self.i = input_name, images, 0

    def get_next(self):
        if self.i >= len(self.images):
            return None
        x = self.images[self.i:self.i + 1]
        self.i += 1
        return {self.input_name: x}

    def rewind(self):
        self.i = 0


def quantize_onnx_int8(src: str | os.PathLike, dst: str | os.PathLike, images: np.ndarray, input_name: str,
                       scope: str = "convs", style: str = "onnxruntime", exclude: list[str] | tuple[str, ...] = (),
                       only: list[str] | None = None, calibration_cache: str | os.PathLike | None = None) -> list[str]:
    """Write an INT8 QDQ copy of ``src`` to ``dst``, quantising ``INT8_SCOPES[scope]``'s op types in
    ``QDQ_STYLES[style]``; return notes (e.g. pre-processing skipped).

    ``exclude`` (ONNX node names) stay float; ``only``, when given, are the only nodes quantised
    (``--int8-scope auto``'s search). ``calibration_cache``: a JSON file of tensor ranges that ONNX
    Runtime's quantiser writes on the first call and reads on later ones (the search calibrates once).
    Node names survive ``quant_pre_process``, so the FP32 file's names serve."""
    op_types = INT8_SCOPES[scope]["onnx_op_types"]
    typing = QDQ_STYLES[style]
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    notes: list[str] = []
    src, dst = Path(src), Path(dst)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(src), str(prepared), skip_symbolic_shape=False)
        except Exception as e:  # noqa: BLE001  (documented ORT failure mode on attention graphs)
            notes.append(f"quant_pre_process skipped ({type(e).__name__}); quantised the plain graph")
            prepared = src
        quantize_static(
            str(prepared), str(dst), _Reader(input_name, images.astype(np.float32)),
            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=getattr(QuantType, typing["activation_type"]),
            weight_type=QuantType.QInt8, reduce_range=typing.get("reduce_range", False), op_types_to_quantize=op_types,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options=dict(typing["extra_options"]), nodes_to_exclude=list(exclude) or None,
            nodes_to_quantize=list(only) if only is not None else None,
            **({"calibration_cache_path": str(calibration_cache)} if calibration_cache is not None else {}),
        )
    bits = "7-bit " if typing.get("reduce_range") else ""
    notes.append(f"static INT8 QDQ in {style} style (per-channel {bits}weights, MinMax on {len(images)} calibration images; "
                 f"scope {scope!r}: {', '.join(op_types)}" + (f"; {len(exclude)} nodes kept in float" if exclude else "") + ")")
    return notes

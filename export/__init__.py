"""export: convert a frozen qbheat backbone plus head to runtime formats, and verify each artifact.

PyTorch → torch.export ExportedProgram → ONNX / OpenVINO IR / Core ML, and ONNX → TensorRT.
Every artifact that can run here is compared with PyTorch; a mismatch fails the export.
"""
import qbheat  # noqa: F401  (installs the torchvision shim before timm is imported)
from deploy_targets.runners.openvino_runner import disable_telemetry  # noqa: E402

disable_telemetry()  # before backends or builders import openvino / nncf: qbheat makes no network calls

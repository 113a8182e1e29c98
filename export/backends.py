"""Which backend packages import here, their versions, and what each format can do on this machine.

``FORMATS`` is the one table of formats: the Python packages a format needs to be *built* and to be
*run* (for parity). ``probe()`` imports them (lazily, once) and says, per format, whether it can be
built, whether it can run here, and why not. ``qbheat-export doctor`` prints it; the pipeline asks
it before starting, so a missing backend fails in one sentence before any work is done.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import io
import logging
import platform
import shutil
import sys
import warnings
from dataclasses import asdict, dataclass, field
from deploy_targets.fingerprint import cpu_model

# format → (packages to build it, packages to run it here, extra condition to run)
FORMATS: dict[str, dict] = {
    "onnx": {"build": ["torch", "onnx", "onnxscript"], "run": ["onnxruntime"], "precisions": ("fp32", "fp16", "int8")},
    "openvino": {"build": ["openvino"], "run": ["openvino"], "int8": ["nncf"], "precisions": ("fp32", "fp16", "int8")},
    "coreml": {"build": ["coremltools"], "run": ["coremltools"], "precisions": ("fp32", "fp16", "int8")},
    "tensorrt": {"build": ["tensorrt"], "run": ["tensorrt"], "precisions": ("fp32", "fp16", "int8")},
}
PACKAGES = ("torch", "timm", "onnx", "onnxscript", "onnxruntime", "onnxslim", "openvino", "nncf", "coremltools", "tensorrt")
EXTRAS = {"openvino": "openvino", "nncf": "openvino", "coremltools": "coreml", "tensorrt": "tensorrt",
          "onnxslim": "simplify", "onnxruntime": "(core)", "onnx": "(core)", "onnxscript": "(core)"}


@dataclass
class FormatStatus:
    format: str
    can_build: bool
    can_run: bool
    precisions: list[str]
    why_not_build: str | None = None
    why_not_run: str | None = None
    notes: list[str] = field(default_factory=list)


@functools.lru_cache(maxsize=None)
def package_version(name: str) -> str | None:
    """Version of an importable package, or None when it does not import (any import error)."""
    try:
        with quiet_imports():
            mod = importlib.import_module(name)
    except Exception:  # noqa: BLE001  (a broken install, e.g. tensorrt without libnvinfer, counts as absent)
        return None
    return str(getattr(mod, "__version__", None) or getattr(mod, "version", "unknown"))


@contextlib.contextmanager
def quiet_imports():
    """Silence the import-time chatter of converters (coremltools logs a dozen lines on Linux)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


@functools.lru_cache(maxsize=None)
def import_error(name: str) -> str | None:
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return None


def has_cuda_gpu() -> bool:
    try:
        import torch

        if torch.cuda.is_available():
            return True
    except Exception:  # noqa: BLE001
        pass
    return shutil.which("nvidia-smi") is not None and _nvidia_smi_lists_gpu()


def _nvidia_smi_lists_gpu() -> bool:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def format_status(fmt: str) -> FormatStatus:
    spec = FORMATS[fmt]
    missing_build = [p for p in spec["build"] if package_version(p) is None]
    missing_run = [p for p in spec["run"] if package_version(p) is None]
    st = FormatStatus(fmt, not missing_build, not missing_run, list(spec["precisions"]))
    if missing_build:
        hint = ("it installs only from NVIDIA's package index, on a machine with an NVIDIA GPU" if fmt == "tensorrt"
                else f"install qbheat[{EXTRAS.get(missing_build[0], missing_build[0])}]")
        st.why_not_build = f"{', '.join(missing_build)} does not import here ({import_error(missing_build[0])}); {hint}"
    if missing_run:
        st.why_not_run = f"{', '.join(missing_run)} does not import here"
    if fmt == "openvino" and package_version("nncf") is None:
        st.precisions = [p for p in st.precisions if p != "int8"]
        st.notes.append("INT8 needs nncf (qbheat[openvino])")
    if fmt == "coreml" and sys.platform != "darwin":
        st.can_run = False
        st.why_not_run = "Core ML prediction needs macOS; on Linux the saved spec is verified instead (spec-only)"
    if fmt == "tensorrt":
        gpu = has_cuda_gpu()
        if st.can_build and not gpu:
            st.can_build = st.can_run = False
            st.why_not_build = st.why_not_run = "TensorRT builds engines only on an NVIDIA GPU, and none is visible"
        if not st.can_build:
            st.notes.append("the ONNX file is checked against the TensorRT ONNX parser's operator list instead")
    return st


def probe() -> dict:
    """Everything ``doctor`` prints: machine, package versions, per-format status."""
    return {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "processor": cpu_model(),
                    "cuda_gpu": has_cuda_gpu()},
        "packages": {p: package_version(p) for p in PACKAGES},
        "formats": {f: asdict(format_status(f)) for f in FORMATS},
    }


def tool_versions(formats: list[str]) -> dict[str, str]:
    """Versions of the packages that made an export (for the model card)."""
    names = ["torch", "timm", "onnx", "onnxscript", "onnxruntime"]
    if "onnx" in formats:
        names.append("onnxslim")
    if "openvino" in formats:
        names += ["openvino", "nncf"]
    if "coreml" in formats:
        names.append("coremltools")
    if "tensorrt" in formats:
        names.append("tensorrt")
    import qbheat

    out = {"qbheat": qbheat.__version__}
    for n in names:
        v = package_version(n)
        if v is not None:
            out[n] = v
    return out

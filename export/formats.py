"""``BUILDERS``: the one table of what the pipeline does per format, each format's code in its own module.

A ``FormatBuilder`` holds a format's two steps, both from its ``export.<format>_format`` module:
``build(ctx, precision)`` writes the artifact into the context's temporary folder and returns its
card record; ``verify(ctx, precision, art)`` checks it against PyTorch and records the result in
that record (``export.verification``). The pipeline loops over the plan (format × precision) and
calls these. The format names and their order are ``export.backends.FORMATS``' (what each format
needs installed); this table must cover exactly those.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from export import backends, coreml_format, onnx_format, openvino_format, tensorrt_format

if TYPE_CHECKING:
    from export.context import ExportContext


@dataclass(frozen=True)
class FormatBuilder:
    """One format: ``build`` → card record of the artifact, ``verify`` → result recorded in it."""

    name: str
    build: Callable[[ExportContext, str], dict]
    verify: Callable[[ExportContext, str, dict], None]


_MODULES = {"onnx": onnx_format, "openvino": openvino_format, "coreml": coreml_format, "tensorrt": tensorrt_format}
BUILDERS: dict[str, FormatBuilder] = {
    name: FormatBuilder(name, _MODULES[name].build_artifact, _MODULES[name].verify_artifact) for name in backends.FORMATS
}

"""An artifact's files, content hash and size: one rule, used by the model card, bundles and bench rows.

An artifact is what a card's ``path`` names: a file, plus the files that belong to it (an OpenVINO
``.xml``'s ``.bin``, an ONNX file's external weights ``<name>.onnx.data``, a TensorRT engine's
``<engine>.json`` sidecar), or a folder (``.mlpackage``) with everything below it.

The hash: for an artifact of one file, the SHA-256 of its bytes (what ``sha256sum`` prints); for
several files, one SHA-256 over each file's name (relative to the artifact's folder, ``/``-separated),
a NUL byte and its bytes, in sorted name order — so a renamed, missing or changed part changes it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

CHUNK = 1 << 20


def companion_files(path: str | os.PathLike) -> list[Path]:
    """The files that travel with a main file: ``.xml`` → ``.bin``; ``.onnx`` → ``.onnx.data``;
    ``.engine``/``.plan`` → ``<engine>.json``. Only those that exist."""
    path = Path(path)
    candidates = {".xml": [path.with_suffix(".bin")], ".onnx": [path.with_name(path.name + ".data")],
                  ".engine": [path.with_name(path.name + ".json")], ".plan": [path.with_name(path.name + ".json")]}
    return [p for p in candidates.get(path.suffix, []) if p.is_file()]


def artifact_files(path: str | os.PathLike) -> list[tuple[str, Path]]:
    """(name, file) for every file of the artifact, sorted by name; names relative to the artifact's
    folder (for a folder artifact, to the folder itself)."""
    path = Path(path)
    if path.is_dir():
        files = [(p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file()]
    else:
        files = [(p.name, p) for p in [path, *companion_files(path)]]
    return sorted(files)


def _update(h, file: Path) -> None:
    with open(file, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of one file's bytes (a part of an artifact, a checkpoint)."""
    h = hashlib.sha256()
    _update(h, Path(path))
    return h.hexdigest()


def artifact_sha256(path: str | os.PathLike) -> str:
    """The artifact's content hash (see the module docstring for the rule)."""
    files = artifact_files(path)
    if len(files) == 1 and not Path(path).is_dir():
        return file_sha256(files[0][1])
    h = hashlib.sha256()
    for name, file in files:
        h.update(name.encode() + b"\0")
        _update(h, file)
    return h.hexdigest()


def artifact_size(path: str | os.PathLike) -> int:
    """Bytes on disk of every file of the artifact."""
    return sum(f.stat().st_size for _, f in artifact_files(path))

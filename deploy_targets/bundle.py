"""``qbheat-export bundle``: a self-contained folder to verify and benchmark on a device this machine cannot reach.

The folder holds the artifacts that the profile's runtime can run, golden inputs with expected
outputs (``golden.npz``), a JPEG for the end-to-end timing, ``run_bundle.py`` plus a copy of the
device-side modules of this package (protocol, runners, fingerprint, pre/postprocessing, result
document) under ``qbheat_bench/``, a README with the transport commands for the profile's reach,
and Swift/Kotlin snippets. It is written to a temporary sibling and renamed into place.

Expected outputs: deploy_targets does not import torch, so they come from the export folder's fp32
ONNX artifact run with ONNX Runtime here — the artifact whose parity with PyTorch export verified
(fail closed) — or, without one, from the bundled artifact itself when it can run here.
"""
from __future__ import annotations

import dataclasses
import io
import json
import shlex
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import qbheat_contract
from qbheat_contract.errors import QBHeatError
from qbheat_contract.hashing import artifact_sha256, artifact_size, companion_files
from qbheat_contract.parity import tolerance as parity_tolerance
from qbheat_contract.preprocessing import Preprocessing

from .profiles import Profile
from .protocol import ProtocolConfig
from .runners import FORMAT_RUNTIMES, available, get_runner
from .snippets import write_snippets
from .transport import parse_reach, remote_run_plan

PACKAGE = Path(__file__).parent
TEMPLATES = PACKAGE / "templates"
# The device-side modules copied into a bundle (they import only numpy, the runtime, qbheat_contract
# and each other); qbheat_contract is copied whole, next to run_bundle.py.
DEVICE_MODULES = ("memory.py", "protocol.py", "fingerprint.py", "postprocess.py", "results.py", "harness.py")
CONTRACT = Path(qbheat_contract.__file__).parent
N_GOLDEN = 4


def select_artifacts(card: dict[str, Any], profile: Profile) -> list[dict[str, Any]]:
    """The card's artifacts the profile's runtime can run, at the profile's precision (``any`` = all).

    TensorRT does not take the ONNX INT8 artifact: it is typed for ONNX Runtime (UINT8 activations with
    zero points, INT32 biases), and TensorRT's INT8 source is the Q/DQ file that ships with its engine."""
    chosen = [a for a in card["artifacts"] if profile.runtime in FORMAT_RUNTIMES.get(a["format"], ())
              and (profile.precision == "any" or a["precision"] == profile.precision)
              and not (profile.runtime == "tensorrt" and a["format"] == "onnx" and a["precision"] == "int8")]
    if not chosen:
        have = [f"{a['format']}/{a['precision']}" for a in card["artifacts"]]
        raise QBHeatError(f"the export has no artifact that {profile.runtime} runs at precision {profile.precision} "
                          f"(it has {have}); export that format or pick another target.")
    return chosen


def _golden_images(n: int, h: int, w: int) -> tuple[np.ndarray, bytes]:
    """n natural-image crops (uint8 n×h×w×3) and one larger JPEG for the end-to-end timing."""
    from PIL import Image

    try:
        from qbheat.data.samples import sample_images
        crops = sample_images(n, size=max(h, w))[:, :h, :w]
        big = sample_images(1, size=max(h, w) * 8 // 7 + 1)[0]
    except Exception:  # noqa: BLE001 (no scikit-image: deterministic noise still exercises the numbers)
        rng = np.random.default_rng(0)
        crops = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
        big = rng.integers(0, 256, (max(h, w) * 8 // 7 + 1,) * 2 + (3,), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="JPEG", quality=95)
    return np.ascontiguousarray(crops), buf.getvalue()


def _reference_outputs(card: dict[str, Any], folder: Path, chosen: list[dict[str, Any]], profile: Profile,
                       inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    ref = next((a for a in card["artifacts"] if a["format"] == "onnx" and a["precision"] == "fp32"), None)
    if ref is not None and available("onnxruntime"):
        runtime, artifact = "onnxruntime", ref
        how = f"ONNX Runtime on {ref['path']} (fp32, parity with PyTorch verified at export), run on the host"
    else:
        artifact = next((a for a in chosen if available(profile.runtime)), None)
        if artifact is None:
            raise QBHeatError("cannot compute expected outputs: the export has no fp32 ONNX artifact and "
                              f"{profile.runtime} cannot run here; export ONNX too.")
        runtime = profile.runtime
        how = f"{runtime} on {artifact['path']} ({artifact['precision']}), run on the host"
    runner = get_runner(runtime, threads=0, precision=artifact["precision"]).load(folder / artifact["path"])
    n = next(iter(inputs.values())).shape[0]
    parts = [runner.run({k: v[i:i + 1] for k, v in inputs.items()}) for i in range(n)]
    runner.close()
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, how


def _copy_artifact(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)
        for extra in companion_files(src):
            shutil.copy2(extra, dst.parent / extra.name)


def _copy_device_code(out: Path, runtime: str) -> None:
    pkg = out / "qbheat_bench"
    (pkg / "runners").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""Device-side copy of qbheat\'s deploy_targets modules: protocol, runners, fingerprint."""\n')
    for name in DEVICE_MODULES:
        shutil.copy2(PACKAGE / name, pkg / name)
    shutil.copy2(PACKAGE / "runners" / "__init__.py", pkg / "runners" / "__init__.py")
    from .runners import RUNNERS
    shutil.copy2(PACKAGE / "runners" / f"{RUNNERS[runtime][0]}.py", pkg / "runners" / f"{RUNNERS[runtime][0]}.py")
    shutil.copytree(CONTRACT, out / "qbheat_contract", ignore=shutil.ignore_patterns("__pycache__"))


def _install_hint(runtime: str) -> str:
    return {"onnxruntime": "pip install numpy onnxruntime pillow", "openvino": "pip install numpy openvino pillow",
            "tensorrt": "pip install numpy tensorrt cuda-python pillow   # or JetPack's python3-libnvinfer",
            "coreml": "pip install numpy coremltools pillow   # macOS only",
            "executorch": "pip install numpy executorch pillow   # its Python runtime pulls torch",
            "litert": "pip install numpy ai-edge-litert pillow"}[runtime]


def write_bundle(card: dict[str, Any], export_folder: str | Path, profile: Profile, out: str | Path,
                 protocol: ProtocolConfig | None = None, overwrite: bool = False, only: list[str] | None = None) -> Path:
    """Write the bundle for ``profile`` into ``out`` (atomically: temp folder, then rename); ``only``: the
    artifact paths (as in the card) to include, e.g. the recommended one."""
    export_folder, out = Path(export_folder), Path(out)
    if out.exists() and not overwrite:
        raise QBHeatError(f"{out} already exists; pass --force to replace it or choose another --out.")
    chosen = select_artifacts(card, profile)
    if only is not None:
        chosen = [a for a in chosen if a["path"] in only]
        if not chosen:
            raise QBHeatError(f"none of {only} is an artifact of this export that {profile.runtime} runs; bundle the export the benchmarks ran on.")
    protocol = protocol or ProtocolConfig.from_dict(profile.protocol)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        prep = card["preprocessing"]
        _, h, w = prep["input_size"]
        # The artifacts were exported and verified at the card's resolution; the bundle runs them there.
        profile = dataclasses.replace(profile, input_size=(h, w))
        images, jpeg = _golden_images(N_GOLDEN, h, w)
        inputs = {card["io"]["inputs"][0]["name"]: Preprocessing.from_dict(prep).normalize(images)}
        expected, how = _reference_outputs(card, export_folder, chosen, profile, inputs)
        arrays = {f"input:{k}": v for k, v in inputs.items()}
        arrays.update({f"output:{k}": v for k, v in expected.items()})
        arrays["images"] = images
        np.savez(tmp / "golden.npz", **arrays)
        (tmp / "golden.jpg").write_bytes(jpeg)
        entries = []
        for a in chosen:
            src = export_folder / a["path"]
            if not src.exists():
                raise QBHeatError(f"the model card lists {a['path']} but it is not in {export_folder}.")
            dst = tmp / "artifacts" / a["path"]  # the card's own layout: precisions share file names
            _copy_artifact(src, dst)
            entries.append({"path": str(dst.relative_to(tmp)), "format": a["format"], "precision": a["precision"],
                            "sha256": artifact_sha256(dst), "size_bytes": artifact_size(dst), "parity": a.get("parity")})
        shutil.copy2(export_folder / "model_card.json", tmp / "model_card.json")
        kinds = {(e["format"], e["precision"]) for e in entries}
        tolerance = dataclasses.asdict(parity_tolerance(*kinds.pop())) if len(kinds) == 1 else None
        bundle = {
            "schema": "qbheat.bundle/1", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "profile": profile.to_dict(), "protocol": protocol.to_dict(), "artifacts": entries,
            "card": {k: card[k] for k in ("model", "head", "preprocessing", "io")},
            "golden_reference": how, "tolerance": tolerance,
        }
        (tmp / "bundle.json").write_text(json.dumps(bundle, indent=1) + "\n")
        shutil.copy2(TEMPLATES / "run_bundle.py", tmp / "run_bundle.py")
        _copy_device_code(tmp, profile.runtime)
        write_snippets(card, entries, tmp / "snippets")
        plan = remote_run_plan(parse_reach(profile.reach), out, "result.json")
        readme = (TEMPLATES / "README.md.tmpl").read_text()
        values = {
            "model_name": card["model"].get("name"), "target": profile.name, "created": bundle["created"],
            "runtime": profile.runtime, "torch_note": "; ExecuTorch's Python runtime itself needs torch" if profile.runtime == "executorch" else "",
            "hardware": profile.hardware, "precision": profile.precision, "reach": profile.reach,
            "artifact_list": ", ".join(f"`{e['path']}` ({e['format']}/{e['precision']}, {e['size_bytes'] / 1e6:.2f} MB)" for e in entries),
            "n_golden": N_GOLDEN, "height": h, "width": w, "golden_reference": how,
            "tolerance": json.dumps(tolerance) if tolerance else "per artifact format and precision (qbheat_contract/parity.py, the export's own table)",
            "install_hint": _install_hint(profile.runtime),
            "protocol": f"warmup ≥ {protocol.warmup_runs} runs and ≥ {protocol.warmup_seconds} s; timed ≥ {protocol.min_runs} runs and ≥ {protocol.min_seconds} s",
            "threads": list(profile.threads), "batch": list(profile.batch),
            "remote_plan": "\n".join(shlex.join(a) for a in plan),
            "profile_notes": f"Profile notes: {profile.notes}" if profile.notes else "",
        }
        for key, value in values.items():
            readme = readme.replace("{{" + key + "}}", str(value))
        (tmp / "README.md").write_text(readme)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

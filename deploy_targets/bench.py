"""Benchmark exported artifacts on this machine under a device profile: the Python API of ``qbheat-export bench``.

    from deploy_targets.bench import bench
    doc = bench(["out/mf294"], "local-cpu-openvino", threads=[1, 2], quick=True)
    doc["rows"][0]["latency_ms"]["p50"], doc["rows"][0]["fingerprint"]["artifact_sha256"]

``paths`` are export folders (their ``model_card.json`` says which artifacts exist; those the profile's
runtime can run at its precision are measured) or artifact files (a ``model_card.json`` next to a file is
used when it lists that file). Returns a ``qbheat.bench_report/1`` document (``deploy_targets.results``);
``results.write_document(doc, path)`` writes it.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from qbheat_contract.errors import QBHeatError


def resolve(paths: list[str], profile) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    """(artifact entry with abs_path, model card or None) for each artifact the profile can run."""
    from qbheat_contract.card import FILENAME, ModelCardError, read_model_card

    from deploy_targets.bundle import select_artifacts
    from deploy_targets.runners import FORMAT_RUNTIMES, format_of

    out = []
    for text in paths:
        path = Path(text)
        if not path.exists():
            raise QBHeatError(f"{path} does not exist; pass an export folder or artifact files.")
        try:
            if path.is_dir() and path.suffix != ".mlpackage":
                card = read_model_card(path)
                out += [(dict(a, abs_path=str(path / a["path"])), card) for a in select_artifacts(card, profile)]
                continue
            card = read_model_card(path.parent) if (path.parent / FILENAME).exists() else None
        except ModelCardError as e:
            raise QBHeatError(f"{e}.") from None
        fmt = format_of(path)
        if profile.runtime not in FORMAT_RUNTIMES[fmt]:
            raise QBHeatError(f"{path.name} is {fmt}, which target {profile.name} ({profile.runtime}) cannot run.")
        entry = next((a for a in (card or {}).get("artifacts", []) if (path.parent / a["path"]).resolve() == path.resolve()), None)
        out.append((dict(entry or {"path": path.name, "format": fmt, "precision": "fp32"}, abs_path=str(path)), card if entry else None))
    return out


def count_configurations(items: list, threads: list[int], batches: list[int], profile) -> int:
    from deploy_targets.protocol import expand_options

    return len(items) * len(threads) * len(batches) * len(expand_options(profile.options))


def bench(paths: list[str | Path], target: str, *, threads: list[int] | None = None, batches: list[int] | None = None,
          quick: bool = False, min_runs: int | None = None, min_seconds: float | None = None, e2e: bool = True,
          command: list[str] | None = None, on_artifact: Callable[[str], None] | None = None,
          on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the benchmark protocol for every artifact of ``paths`` that ``target`` (a profile name or .toml
    path, reached locally) can run, over its thread × batch × option sweep; return the result document.

    ``quick``: 2 warm-up and 5 timed runs (a smoke test, not for reporting); ``min_runs``/``min_seconds``
    override the profile's protocol; ``e2e``: also time decode + preprocess + infer + top-k on a JPEG."""
    from deploy_targets import fingerprint, flops, harness, results
    from deploy_targets.profiles import load_profile
    from deploy_targets.protocol import ProtocolConfig

    profile = load_profile(target)
    if profile.reach != "local":
        raise QBHeatError(f"target {profile.name} is reached by {profile.reach}, not from here; "
                          f"run 'qbheat-export bundle EXPORT --target {profile.name} --out DIR' and run the bundle on the device.")
    settings = dict(profile.protocol)
    if quick:
        settings.update(warmup_runs=2, warmup_seconds=0.0, min_runs=5, min_seconds=0.0)
    if min_runs is not None:
        settings["min_runs"] = min_runs
    if min_seconds is not None:
        settings["min_seconds"] = min_seconds
    cfg = ProtocolConfig.from_dict(settings)
    threads, batches = threads or list(profile.threads), batches or list(profile.batch)
    items = resolve([str(p) for p in paths], profile)
    doc = results.new_document(command or sys.argv, cfg.to_dict(), {profile.name: profile.to_dict()})
    host = fingerprint.host()
    image = None
    if e2e:
        from deploy_targets.bundle import _golden_images
        image = _golden_images(1, *profile.input_size)[1]
    for artifact, card in items:
        if on_artifact:
            on_artifact(Path(artifact["abs_path"]).name)
        rows = harness.bench_artifact(artifact, profile.runtime, cfg, threads=threads, batches=batches,
                                      options=profile.options, input_size=profile.input_size, target=profile.name,
                                      hardware=profile.hardware, card=card, image_bytes=image, host_info=host, on_row=on_row)
        if artifact.get("format") == "onnx":
            graph = flops.count_onnx(artifact["abs_path"])
            for row in rows:
                row["graph"] = {k: graph[k] for k in ("nodes", "macs", "flops", "nodes_by_op", "macs_by_op", "convention")}
        doc["rows"] += rows
    return doc

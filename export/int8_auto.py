"""``--int8-scope auto``: INT8 from the widest scope, with the most sensitive modules kept in float
until the task metric's drop (top-1 for a classifier head, COCO mAP for a detector head) fits ``--max-drop``.

1. Modules: every quantisable ONNX node (``INT8_SCOPES[START]``'s op types: Conv, Gemm, MatMul)
   belongs to the module it was created in, cut at ``MODULE_DEPTH`` (the deepest scope of
   ``pkg.torch.onnx.name_scopes`` with at most that many dots: ``backbone.blocks.3.former``,
   ``backbone.stem.1``, ``head.fc``), so a Mobile-Former block splits into its mobile, former and
   bridge parts.
2. Sensitivity, on the *validation* set (never the reported ``--eval-data``): each module quantised
   alone (ONNX Runtime QDQ, the rest float), scored by the top-1 flips against PyTorch (points; for a
   detector: images whose highest-scoring detection changes class), ties broken by the mean squared error
   of the outputs. Calibration runs once (ONNX Runtime's range cache).
3. Greedy, per backend (ONNX Runtime's QDQ file, the TensorRT-style Q/DQ file, OpenVINO through
   NNCF's ``IgnoredScope`` by node name): float set = the k most sensitive modules, k = 0, 1, ...;
   stop at the first k whose drop fits. "Fits" is ours: the upper end of the paired-bootstrap 95 %
   interval of the validation drop is at most the budget, so the reported drop on the test set is
   unlikely to exceed it. The export's accuracy gate then measures the drop on ``--eval-data``.

4. Latency (OpenVINO): the searched IR against the same with every MatMul and its elementwise neighbours
   in f32 (``Search.openvino_latency``): kept when it fits the budget too and runs faster here.

NNCF's ``quantize_with_accuracy_control`` was not used: it ranks and reverts NNCF's own quantisers,
which would leave ONNX Runtime's two files without a float set, and one search should explain all three.
"""
from __future__ import annotations

import ast
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from export import accuracy
from export.localize import SCOPES_KEY
from export.quantize import AUTO  # noqa: F401  (the --int8-scope value)

START = "all"  # the widest of INT8_SCOPES
MODULE_DEPTH = 3  # module = the deepest scope with at most this many dots


def module_of(scopes: list[str], depth: int = MODULE_DEPTH) -> str | None:
    """The module a node belongs to, from its name scopes (``['', 'backbone.blocks.1', ..., op]``)."""
    mods = [s for s in scopes[1:-1] if s and s.count(".") <= depth]
    return mods[-1] if mods else None


def module_groups(onnx_path: str | Path, op_types: list[str], depth: int = MODULE_DEPTH) -> dict[str, list[str]]:
    """{module: ONNX node names of its ``op_types`` nodes}, in graph order; nodes without scopes go under '(unscoped)'."""
    import onnx

    groups: dict[str, list[str]] = {}
    for node in onnx.load(str(onnx_path), load_external_data=False).graph.node:
        if node.op_type not in op_types:
            continue
        meta = {p.key: p.value for p in node.metadata_props}
        try:
            scopes = ast.literal_eval(meta.get(SCOPES_KEY, "[]"))
        except (ValueError, SyntaxError):
            scopes = []
        groups.setdefault(module_of(scopes, depth) or "(unscoped)", []).append(node.name)
    return groups


def module_nodes(onnx_path: str | Path, modules: list[str], depth: int = MODULE_DEPTH) -> set[str]:
    """Names of every ONNX node (any op type) created inside ``modules``: what NNCF must leave out so
    that a float module gets no FakeQuantize at all (NNCF also quantises Add, Multiply and others)."""
    import onnx

    wanted, found = set(modules), set()
    for node in onnx.load(str(onnx_path), load_external_data=False).graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        try:
            scopes = ast.literal_eval(meta.get(SCOPES_KEY, "[]"))
        except (ValueError, SyntaxError):
            continue
        if module_of(scopes, depth) in wanted:
            found.add(node.name)
    return found


def node_outputs(onnx_path: str | Path, names: set[str]) -> set[str]:
    """The output tensor names of the ONNX nodes ``names`` (OpenVINO may name an op after them)."""
    import onnx

    return {o for n in onnx.load(str(onnx_path), load_external_data=False).graph.node if n.name in names for o in n.output}


@dataclass
class Validation:
    """The validation images (an ``EvalSet``) with PyTorch's scores on them (a classifier head: top-1)."""

    data: object  # export.eval_data.EvalSet
    ref_scores: np.ndarray
    title = "top-1"  # the task metric, as the card names it (its drop key: drop_top1)

    @property
    def labels(self) -> np.ndarray:
        return self.data.labels

    def measure(self, scores: np.ndarray) -> dict:
        """Top-1 drop against PyTorch (with its interval), top-1 flips (points) and mean squared logit error."""
        ref_hits, hits = accuracy.topk_hits(self.ref_scores, self.labels, 1), accuracy.topk_hits(scores, self.labels, 1)
        drop = accuracy.paired_drop(ref_hits, hits)
        flips = 100.0 * float(np.mean(np.argmax(scores, 1) != np.argmax(self.ref_scores, 1)))
        mse = float(np.mean((np.asarray(scores, np.float64) - self.ref_scores) ** 2))
        return {"drop_top1": drop["drop"], "drop_top1_ci": drop["ci"], "flips": round(flips, 4), "logit_mse": mse}


class DetectionValidation:
    """The validation canvases (an ``export.eval_detection.DetectionSet``) with PyTorch's outputs on them (a
    detector head: COCO mAP). ``measure`` takes a model's outputs on them, by output name, concatenated over
    the images (``eval_detection.runner_outputs``)."""

    title = "COCO mAP"  # its drop key: drop_mAP

    def __init__(self, data, ref_outputs: dict[str, np.ndarray], nms):
        from export import eval_detection as ed

        self.data, self.ref_outputs, self.nms = data, ref_outputs, nms
        self._ref_dets = ed.detections(ref_outputs, nms)
        self._ref_matches = ed.CocoMatches.of(data.split.coco, ed.coco_detections(self._ref_dets, data))

    @staticmethod
    def _top_labels(dets) -> np.ndarray:
        return np.asarray([int(lab[np.argmax(sc)]) if len(sc) else -1 for _, sc, lab in dets])

    def measure(self, outputs: dict[str, np.ndarray]) -> dict:
        """COCO mAP drop against PyTorch (with its paired-bootstrap interval), the images whose highest-scoring
        detection changes class (points) and the mean squared error of the outputs PyTorch has too."""
        from export import eval_detection as ed

        dets = ed.detections(outputs, self.nms)
        drop = ed.paired_map_drop(self._ref_matches, ed.CocoMatches.of(self.data.split.coco, ed.coco_detections(dets, self.data)))
        flips = 100.0 * float(np.mean(self._top_labels(dets) != self._top_labels(self._ref_dets)))
        same = [k for k, v in self.ref_outputs.items() if k in outputs and np.shape(outputs[k]) == np.shape(v)
                and np.issubdtype(np.asarray(v).dtype, np.floating)]
        mse = float(np.mean([np.mean((np.asarray(outputs[k], np.float64) - self.ref_outputs[k]) ** 2) for k in same])) if same else 0.0
        return {"drop_mAP": drop["drop"], "drop_mAP_ci": drop["ci"], "flips": round(flips, 4), "logit_mse": mse}


def drop_key(measured: dict) -> str:
    """The measured dict's drop key: ``drop_top1`` (classifier) or ``drop_mAP`` (detector)."""
    return next(k for k in measured if k.startswith("drop_") and not k.endswith("_ci"))


def fits(measured: dict, budget: float) -> bool:
    """Our rule: the upper end of the validation drop's 95 % interval is within the budget."""
    return measured[f"{drop_key(measured)}_ci"][1] <= budget + 1e-9


def rank(sensitivity: dict[str, dict]) -> list[str]:
    """Modules, most sensitive first: more top-1 flips, then larger logit error, then name."""
    return sorted(sensitivity, key=lambda m: (-sensitivity[m]["flips"], -sensitivity[m]["logit_mse"], m))


def greedy(order: list[str] | Callable[[], list[str]], trial: Callable[[list[str]], dict], budget: float) -> tuple[list[str], list[dict]]:
    """The smallest prefix of ``order`` kept in float whose ``trial`` (a measured dict) fits ``budget``.

    ``order`` may be a function, called only when nothing in float does not fit (the ranking costs a
    quantisation per module). Returns (float modules, trials); where even all of them in float does
    not fit, all of them."""
    trials = []
    k = 0
    while True:
        floats = [] if k == 0 else order[:k]
        measured = trial(floats)
        key = drop_key(measured)
        trials.append({"float_modules": k, **{name: measured[name] for name in (key, f"{key}_ci", "flips")}})
        if fits(measured, budget):
            return floats, trials
        if callable(order):
            order = order()
        if k == len(order):
            return list(order), trials
        k += 1


class Search:
    """One ``--int8-scope auto`` search for an export: modules, validation set, sensitivity ranking (once)."""

    def __init__(self, fp32_onnx: Path, calib: np.ndarray, input_name: str, validation: Validation, budget: float,
                 scores_of: Callable[[str, Path], np.ndarray], workdir: Path):
        from export.quantize import INT8_SCOPES

        self.fp32, self.calib, self.input_name, self.val, self.budget = Path(fp32_onnx), calib, input_name, validation, budget
        self.scores_of = scores_of  # (format, file) → what ``validation.measure`` takes: N×C scores, or a detector's outputs
        self.workdir = workdir
        self.groups = module_groups(self.fp32, INT8_SCOPES[START]["onnx_op_types"])
        self._order: list[str] | None = None
        self.sensitivity: dict[str, dict] = {}
        self.latency_step = True  # OpenVINO: also try the MatMuls in f32 and keep that when it is faster (openvino_latency)

    def _quantize(self, dst: Path, style: str, exclude=(), only=None) -> list[str]:
        from export.quantize import quantize_onnx_int8

        return quantize_onnx_int8(self.fp32, dst, self.calib, self.input_name, START, style, exclude=exclude, only=only,
                                  calibration_cache=self.workdir / f"ranges.{style}.json")

    def order(self) -> list[str]:
        """Modules ranked by sensitivity, each quantised alone (ONNX Runtime QDQ style)."""
        if self._order is None:
            with tempfile.TemporaryDirectory(dir=self.workdir) as tmp:
                self._quantize(Path(tmp) / "all.onnx", "onnxruntime")  # calibrates every tensor once (the range cache)
                for module, nodes in self.groups.items():
                    path = Path(tmp) / "one.onnx"
                    self._quantize(path, "onnxruntime", only=nodes)
                    self.sensitivity[module] = self.val.measure(self.scores_of("onnx", path))
            self._order = rank(self.sensitivity)
        return self._order

    def float_nodes(self, modules: list[str]) -> list[str]:
        return [n for m in modules for n in self.groups[m]]

    def onnx(self, dst: Path, style: str) -> tuple[dict, list[str]]:
        """The searched ONNX INT8 file at ``dst`` in ``style``; (card record, quantiser notes)."""
        notes: list[str] = []

        def trial(floats: list[str]) -> dict:
            notes[:] = self._quantize(dst, style, exclude=self.float_nodes(floats))
            return self.val.measure(self.scores_of("onnx", dst))

        floats, trials = greedy(self.order, trial, self.budget)
        return self.record(floats, trials), notes

    def openvino(self, fp32_model, dst_xml: Path, detector: bool, quiet: bool):
        """The searched OpenVINO INT8 ov.Model (also saved at ``dst_xml``); (model, card record)."""
        from export import openvino_format

        chosen = {}

        def trial(floats: list[str]) -> dict:
            names = set(self.float_nodes(floats)) | module_nodes(self.fp32, floats)
            ignored = openvino_format.ops_of_onnx_nodes(fp32_model, names | node_outputs(self.fp32, names), types=None)
            model = openvino_format.quantize_int8(fp32_model.clone(), self.calib, detector, quiet=quiet, scope=START,
                                                  ignored_names=ignored)
            model.set_rt_info("int8", ["model_info", "precision"])
            openvino_format.save(model, dst_xml, compress_to_fp16=False)
            chosen.update(model=model, ignored=ignored)
            return self.val.measure(self.scores_of("openvino", dst_xml))

        floats, trials = greedy(self.order, trial, self.budget)
        record = self.record(floats, trials)
        record["openvino_float_ops"] = len(chosen["ignored"])
        return self.openvino_latency(fp32_model, dst_xml, detector, quiet, chosen, record)

    def openvino_latency(self, fp32_model, dst_xml: Path, detector: bool, quiet: bool, chosen: dict, record: dict):
        """The latency step (OpenVINO only): the accuracy search's IR against the same float modules with every
        MatMul (and the elementwise ops around it, ``INT8_SCOPES['convs']``' types) left in f32 and uncompressed.
        On the CPU plugin the INT8 FullyConnected and attention kernels of Mobile-Former's 6-token bridges cost more
        than their f32 ones (benchmarks/results/openvino_int8_latency.md). The candidate is kept when its validation
        drop fits too and it is faster than the search's IR here, batch 1, one thread, in alternating rounds
        (``time_alternating``): faster in more than half of the rounds and by the median."""
        from export import openvino_format
        from export.quantize import INT8_SCOPES

        types = set(INT8_SCOPES["convs"]["openvino_ignored_types"])
        if not self.latency_step:
            return chosen["model"], record
        extra = sorted({op.get_friendly_name() for op in fp32_model.get_ops() if op.get_type_name() in types} - set(chosen["ignored"]))
        if not extra:
            return chosen["model"], record
        ignored = sorted(set(chosen["ignored"]) | set(extra))
        model = openvino_format.quantize_int8(fp32_model.clone(), self.calib, detector, quiet=quiet, scope=START, ignored_names=ignored)
        model.set_rt_info("int8", ["model_info", "precision"])
        cand_xml = self.workdir / "openvino_latency" / "model.xml"
        openvino_format.save(model, cand_xml, compress_to_fp16=False)
        measured = self.val.measure(self.scores_of("openvino", cand_xml))
        key = drop_key(measured)
        step = {"candidate": "search's float modules + MatMul/Softmax/MVN/Add/Multiply/Maximum ops in f32 (no weight compression)",
                "candidate_float_ops": len(ignored), f"candidate_validation_{key}": measured[key],
                f"candidate_validation_{key}_ci": measured[f"{key}_ci"], "fits": fits(measured, self.budget)}
        if step["fits"]:
            timing = {k: v for k, v in time_alternating({"search": dst_xml, "candidate": cand_xml}, self.calib[:1]).items()
                      if k != "round_p50_ms"}  # the card keeps the summary
            step |= {"timing": timing, "kept": timing["faster_rounds"]["candidate"] * 2 > timing["rounds"]
                     and timing["p50_ms"]["candidate"] < timing["p50_ms"]["search"]}
        else:
            step["kept"] = False
        record["latency_step"] = step
        if not step["kept"]:
            return chosen["model"], record
        openvino_format.save(model, dst_xml, compress_to_fp16=False)
        record["openvino_float_ops"] = len(ignored)
        record[f"validation_{key}"], record[f"validation_{key}_ci"] = measured[key], measured[f"{key}_ci"]
        return model, record

    def record(self, floats: list[str], trials: list[dict]) -> dict:
        """What the card says of one backend's search."""
        last = next(t for t in reversed(trials) if t["float_modules"] == len(floats))
        key = drop_key(last)
        return {"start_scope": START, "module_depth": MODULE_DEPTH, "budget": self.budget, "metric": self.val.title,
                "rule": "keep the most sensitive modules in float until the upper end of the validation drop's 95 % interval fits the budget",
                "validation": self.val.data.card(), "modules": len(self.groups),
                "float_modules": list(floats), "float_nodes": self.float_nodes(floats),
                f"validation_{key}": last[key], f"validation_{key}_ci": last[f"{key}_ci"], "trials": trials,
                "sensitivity": [{"module": m, **{k: self.sensitivity[m][k] for k in ("flips", key, "logit_mse")}}
                                for m in self._order] if self._order is not None else None}


def note(auto: dict) -> str:
    """The card's sentence about one artifact's search record: the float modules and the validation drop."""
    floats = auto["float_modules"]
    key = "validation_drop_mAP" if "validation_drop_mAP" in auto else "validation_drop_top1"
    return (f"--int8-scope auto: {len(floats)} of {auto['modules']} modules kept in float "
            f"({', '.join(floats) if floats else 'none'}); validation {auto.get('metric', 'top-1')} drop {auto[key]:+.2f} points "
            f"(95 % CI {auto[f'{key}_ci'][0]:+.2f} to {auto[f'{key}_ci'][1]:+.2f}) on "
            f"{auto['validation']['count']} images of {auto['validation']['source']}, budget {auto['budget']:g}")


def time_alternating(paths: dict[str, Path], x: np.ndarray, rounds: int = 7, iters: int = 40, threads: int = 1,
                     warmup: int = 10) -> dict:
    """p50 (ms) of each OpenVINO IR at ``x``'s shape through ``deploy_targets``' runner, in alternating rounds
    (each round runs every IR ``iters`` times, after ``warmup`` untimed runs each), in how many rounds each was
    faster than the others' best, and every round's p50s (``round_p50_ms``, for other comparisons)."""
    import time

    from deploy_targets.runners import get_runner

    runners = {}
    x = np.ascontiguousarray(x, np.float32)
    try:
        for name, path in paths.items():
            r = get_runner("openvino", threads=threads, precision="int8")
            r.load(path, batch=len(x))
            runners[name] = (r, r.inputs()[0]["name"])
        for r, inp in runners.values():
            for _ in range(warmup):
                r.run({inp: x})
        times = {n: [] for n in runners}
        faster = {n: 0 for n in runners}
        per_round = []
        for _ in range(rounds):
            med = {}
            for n, (r, inp) in runners.items():
                t = []
                for _ in range(iters):
                    t0 = time.perf_counter()
                    r.run({inp: x})
                    t.append(time.perf_counter() - t0)
                times[n] += t
                med[n] = float(np.median(t))
            for n in runners:
                faster[n] += all(med[n] < v for m, v in med.items() if m != n)
            per_round.append({n: 1e3 * v for n, v in med.items()})
    finally:
        for r, _ in runners.values():
            r.close()
    return {"threads": threads, "batch": len(x), "rounds": rounds, "iters_per_round": iters,
            "p50_ms": {n: round(1e3 * float(np.median(t)), 4) for n, t in times.items()}, "faster_rounds": faster,
            "round_p50_ms": per_round}

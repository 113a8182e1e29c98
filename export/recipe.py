"""The export recipe: every ``qbheat-export export`` flag as one typed dataclass, also readable from YAML.

Order of precedence: dataclass defaults, then ``--recipe FILE.yaml``, then the flags given on the
command line. Validation happens once (``ExportRecipe.validate``), with a sentence that says what
to change. Example recipe::

    model: mobileformer_294m          # or checkpoint: runs/probe/last.pt
    head: classifier                  # classifier | detector | features
    head_variant: logits              # classifier: logits | probabilities; detector: decode | nms
    formats: [onnx, openvino, coreml]
    precisions: [fp32, fp16, int8]
    calibration: data/calib           # folder of images; default: scikit-image's bundled photos
    int8_scope: convs                 # convs (default) | all | auto (needs max_drop + eval_data)
    image_size: 224
    out: artifacts/mf294
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from export import backends
from export.deployable import check_variant
from export.quantize import AUTO, INT8_SCOPES
from qbheat.errors import QBHeatError

FORMATS = tuple(backends.FORMATS)  # the names of export.backends' format table, in its order
PRECISIONS = ("fp32", "fp16", "int8")
HEAD_TASKS = ("classifier", "detector", "features")
NEW_HEAD_CLASSES = {"classifier": 1000, "detector": 80}  # ImageNet-1k and COCO class counts, for untrained heads


@dataclass
class ExportRecipe:
    checkpoint: str | None = None  # a qbheat checkpoint (pretrain | probe | detector)
    model: str | None = None  # or a timm model name (random init: qbheat never downloads weights)
    head: str | None = None  # default: the checkpoint's own head (probe → classifier, detector → detector), else features
    head_variant: str | None = None  # default: logits / decode / embedding
    head_type: str = "linear"  # for a new (untrained) classifier head: linear | transformer_probe
    num_classes: int | None = None  # for a new head; default 1000 (classifier) / 80 (detector)
    formats: list[str] = field(default_factory=lambda: ["onnx", "openvino", "coreml"])
    precisions: list[str] = field(default_factory=lambda: ["fp32", "fp16", "int8"])
    calibration: str | None = None  # folder of images; None = scikit-image's bundled photographs
    calibration_count: int = 16  # images used for INT8 calibration and the FP16 guard
    int8_scope: str = "convs"  # what INT8 quantises, a key of export.quantize.INT8_SCOPES (convs | all), or auto (export.int8_auto)
    int8_validation: str | None = None  # auto: labelled images to choose the float modules on (default for fashion-mnist: its training split)
    int8_validation_limit: int = 5000  # auto: an evenly spaced subset of this many validation images
    image_size: int | None = None  # default: the checkpoint's / model's input size
    out: str | None = None
    allow_mismatch: bool = False  # keep artifacts outside tolerance, recorded in the card
    drop_mismatch: bool = False  # leave out only the artifacts outside tolerance (listed under not_built); fail if none is left
    simplify: bool = False  # run onnxslim on the ONNX files (kept only if outputs are unchanged)
    overwrite: bool = False  # replace a non-empty --out folder
    max_batch: int = 64  # upper bound of the dynamic batch (TensorRT profile max, torch.export Dim max)
    parallel: bool = True  # Linux, ≥ 2 cores: build Core ML in a forked worker beside the other formats
    eval_data: str | None = None  # labelled set for the accuracy gate: fashion-mnist | an ImageFolder tree
    eval_limit: int | None = None  # evaluate on an evenly spaced subset of this many images
    max_drop: float | None = None  # top-1 points an artifact may lose against PyTorch on eval_data

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ExportRecipe":
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise QBHeatError(f"recipe {path} does not exist.") from None
        except yaml.YAMLError as e:
            raise QBHeatError(f"recipe {path} is not valid YAML ({str(e).splitlines()[0]}).") from None
        if not isinstance(data, dict):
            raise QBHeatError(f"recipe {path} must be a mapping of field: value.")
        return cls().merged(data, origin=f"recipe {path}")

    def merged(self, values: dict, origin: str = "flags") -> "ExportRecipe":
        known = {f.name for f in fields(self)}
        aliases = {"precision": "precisions", "format": "formats"}
        out = asdict(self)
        for k, v in values.items():
            k = aliases.get(k.replace("-", "_"), k.replace("-", "_"))
            if k not in known:
                raise QBHeatError(f"{origin} has an unknown field {k!r}; known fields: {sorted(known)}.")
            if v is not None:
                out[k] = _split(v) if k in ("formats", "precisions") else v
        return ExportRecipe(**out)

    def validate(self) -> "ExportRecipe":
        if bool(self.checkpoint) == bool(self.model):
            raise QBHeatError("give exactly one of --checkpoint FILE or --model NAME.")
        if not self.out:
            raise QBHeatError("no output folder: pass --out DIR (or 'out:' in the recipe).")
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise QBHeatError(f"unknown format {bad[0] if bad else '(none)'!r}; choose from {', '.join(FORMATS)}.")
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad or not self.precisions:
            raise QBHeatError(f"unknown precision {bad[0] if bad else '(none)'!r}; choose from {', '.join(PRECISIONS)}.")
        if self.head is not None and self.head not in HEAD_TASKS:
            raise QBHeatError(f"unknown head {self.head!r}; choose classifier, detector or features.")
        if self.head and self.head_variant:
            check_variant(self.head, self.head_variant)
        if self.image_size is not None and (self.image_size < 32 or self.image_size % 32):
            raise QBHeatError(f"--image-size {self.image_size} must be a multiple of 32 (the backbones' largest stride), at least 32.")
        if self.num_classes is not None and self.num_classes < 1:
            raise QBHeatError("--num-classes must be at least 1.")
        if self.int8_scope not in INT8_SCOPES and self.int8_scope != AUTO:
            raise QBHeatError(f"unknown --int8-scope {self.int8_scope!r}; choose {', '.join(INT8_SCOPES)} or {AUTO}.")
        if self.calibration_count < 1:
            raise QBHeatError("--calibration-count must be at least 1.")
        if self.max_drop is not None and not self.eval_data:
            raise QBHeatError("--max-drop needs --eval-data SOURCE (fashion-mnist, an ImageFolder tree or a COCO folder) to measure the drop on.")
        if self.max_drop is not None and self.max_drop < 0:
            raise QBHeatError("--max-drop must be a non-negative number of points.")
        if self.eval_data and self.eval_data != "fashion-mnist" and not Path(self.eval_data).expanduser().is_dir():
            raise QBHeatError(f"--eval-data {self.eval_data} is neither 'fashion-mnist' nor an existing folder; pass an ImageFolder tree of "
                              "class sub-folders (a classifier) or a COCO folder (a detector).")
        if self.int8_scope == AUTO:
            self._validate_auto()
        if self.eval_limit is not None and self.eval_limit < 1:
            raise QBHeatError("--eval-limit must be at least 1.")
        if self.max_batch < 4:
            raise QBHeatError("--max-batch must be at least 4 (parity runs a batch of 4).")
        return self

    def _validate_auto(self) -> None:
        if self.max_drop is None or not self.eval_data:
            raise QBHeatError("--int8-scope auto needs --max-drop POINTS and --eval-data SOURCE: it keeps modules in float until "
                              "the measured drop (top-1, or COCO mAP for a detector) fits that budget.")
        if self.int8_validation is None and self.eval_data != "fashion-mnist" and not self._coco_with_val():
            raise QBHeatError("--int8-scope auto needs --int8-validation SOURCE (labelled images other than --eval-data's) to "
                              "choose the float modules on; only --eval-data fashion-mnist (its training split) and a COCO folder "
                              "with test and val splits (its val split) have a default.")
        if self.int8_validation is not None and self.int8_validation == self.eval_data:
            raise QBHeatError("--int8-validation must differ from --eval-data: the float modules are chosen on one set and the "
                              "drop is reported on the other.")
        if self.int8_validation not in (None, "fashion-mnist", "fashion-mnist-train") and not Path(self.int8_validation).expanduser().is_dir():
            raise QBHeatError(f"--int8-validation {self.int8_validation} is neither 'fashion-mnist-train' nor an existing folder; "
                              "pass an ImageFolder tree of class sub-folders.")
        if self.int8_validation_limit < 1:
            raise QBHeatError("--int8-validation-limit must be at least 1.")

    @property
    def validation_source(self) -> str:
        """Where ``--int8-scope auto`` measures: ``int8_validation``, else Fashion-MNIST's training split, else
        (a COCO ``--eval-data`` with test and val splits) that folder, whose val split it reads."""
        if self.int8_validation:
            return self.int8_validation
        return self.eval_data if self._coco_with_val() else "fashion-mnist-train"

    def _coco_with_val(self) -> bool:
        from export.eval_detection import coco_splits

        return bool(self.eval_data) and self.eval_data != "fashion-mnist" and {"test", "val"} <= set(coco_splits(self.eval_data))


def _split(v) -> list[str]:
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    return [str(s) for s in v]

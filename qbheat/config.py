"""Typed pre-training configuration: dataclass defaults ← YAML file ← command-line overrides.

``PretrainConfig`` holds the loop's settings plus one typed section per method (``qbheat``,
``mocov2``) and per addition (``hssl``, ``msbreg``). Optimiser fields left at None take the chosen method's recipe
(``qbheat.methods.<method>.recipe``). ``load_config(path, overrides)`` reads a YAML mapping with
the same keys (sections nested), applies dotted overrides such as ``{"qbheat.decoder_dim": 64}``,
checks every type, and ``validate()`` reports the first problem as one sentence saying what to change.

The sections' dataclasses belong to the registries (each method's and each addition's ``Config``,
``qbheat.methods.METHODS`` and ``qbheat.additions.ADDITIONS``; see ``section_types``): this module
names the sections but imports no method or addition when it is imported, and none imports it.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbheat.errors import QBHeatError
from qbheat_contract.preprocessing import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:  # the registries own these; config names its sections and never imports a method at import time
    from qbheat.additions.hssl import HSSLConfig
    from qbheat.additions.msbreg import MSBRegConfig
    from qbheat.methods.mocov2 import MoCoV2Config
    from qbheat.methods.qbheat import QBHeatConfig

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def section_types() -> dict[str, type]:
    """Section name → its config dataclass, from the registries that own them: every method's ``Config``
    (``qbheat.methods.METHODS``) and every addition's that has options (``qbheat.additions.ADDITIONS``)."""
    from qbheat.additions import ADDITIONS
    from qbheat.methods import METHODS

    return {name: cls.Config for name, cls in {**METHODS, **ADDITIONS}.items() if getattr(cls, "Config", None) is not None}


def _section(name: str):
    return field(default_factory=lambda: section_types()[name]())
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class PretrainConfig:
    """Everything one pre-training run needs. Defaults follow the papers where they say something."""

    # what to train
    method: str = "qbheat"  # "qbheat" (arXiv 2211.13228) or "mocov2" (arXiv 2003.04297)
    model: str = "mobileformer_294m"  # closest public config to the QB-Heat paper's encoder
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    # data
    data: str = ""  # ImageFolder path, "fashion-mnist" or "synthetic"
    synthetic_size: int = 1024  # images in the "synthetic" set
    image_size: int = 224  # ImageNet training resolution used by both papers
    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop scale: MoCo v2 and MAE
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_workers: int = 4  # data-loader processes per training process
    # budget: ``steps`` wins over ``epochs`` when both are set
    batch_size: int = 256  # global batch over all processes (MoCo v2: 256)
    epochs: float = 200.0  # MoCo v2's standard 200-epoch schedule
    steps: int | None = None
    stop_after: int | None = None  # end this invocation after this global step (schedule unchanged)
    # optimisation (None → the method's recipe)
    optimizer: str | None = None  # "adamw" (QB-Heat, MAE recipe) / "sgd" (MoCo v2)
    lr: float | None = None  # absolute; None → recipe base_lr × batch_size / 256
    weight_decay: float | None = None
    warmup_fraction: float | None = None  # share of steps in linear warm-up, then cosine decay
    min_lr_ratio: float = 0.0  # cosine decays to lr × this (MAE and MoCo v2: 0)
    grad_clip: float | None = None  # max global gradient norm; 0 disables
    precision: str = "auto"  # "auto": bf16 autocast on GPUs that support it, fp32 elsewhere
    # machinery
    device: str = "auto"
    seed: int = 0
    sync_bn: bool = False  # SyncBatchNorm across processes (NCCL/GPU only)
    channels_last: bool = True  # NHWC weights and views: convolutions skip layout reorders (pretrain_throughput.py)
    log_every: int = 20
    ckpt_every: int = 500
    out_dir: str = "runs/pretrain"
    resume: str | None = None  # checkpoint path, or "auto" for <out_dir>/last.pt if it exists
    tensorboard: bool = True
    progress: bool = True
    # composable additions (qbheat.additions.ADDITIONS), with either method: regularizers are listed
    # here (e.g. ["msbreg"]), heads switched on in their section (hssl.enabled)
    regularizers: list[str] = field(default_factory=list)
    # per-method sections
    qbheat: QBHeatConfig = _section("qbheat")
    mocov2: MoCoV2Config = _section("mocov2")
    # per-addition sections
    hssl: HSSLConfig = _section("hssl")
    msbreg: MSBRegConfig = _section("msbreg")

    @property
    def method_label(self) -> str:
        """The method with its additions, as checkpoints record it: "qbheat", "qbheat+hssl", "mocov2+msbreg"."""
        from qbheat.additions import enabled_additions

        return "+".join([self.method] + enabled_additions(self))

    def problems(self, world_size: int = 1) -> list[str]:
        """Every problem found, each phrased as what to change."""
        from qbheat.additions import ADDITIONS, enabled_additions, names_of
        from qbheat.methods import METHODS

        out: list[str] = []
        if self.method not in METHODS:
            out.append(f"method must be one of {sorted(METHODS)}, not {self.method!r}")
        if not self.model:
            out.append("model must name a timm model (e.g. mobileformer_294m)")
        if not self.data:
            out.append("data is not set; pass --data with a folder, 'fashion-mnist' or 'synthetic'")
        if self.image_size < 8 or self.image_size % 2:
            out.append(f"image_size must be an even number ≥ 8, not {self.image_size}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            out.append(f"crop_scale must satisfy 0 < low ≤ high ≤ 1, not {list(self.crop_scale)}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            out.append("mean and std need three values each, std positive")
        if self.batch_size < 1:
            out.append(f"batch_size must be ≥ 1, not {self.batch_size}")
        elif self.batch_size % world_size:
            out.append(f"batch_size {self.batch_size} must be a multiple of the {world_size} processes")
        if self.steps is not None and self.steps < 1:
            out.append(f"steps must be ≥ 1, not {self.steps}")
        if self.steps is None and not self.epochs > 0:
            out.append(f"epochs must be > 0 (or set steps), not {self.epochs}")
        if self.stop_after is not None and self.stop_after < 1:
            out.append(f"stop_after must be ≥ 1, not {self.stop_after}")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            out.append(f"optimizer must be one of {list(OPTIMIZERS)} or null, not {self.optimizer!r}")
        for name in ("lr", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if v is not None and v < 0:
                out.append(f"{name} must be ≥ 0, not {v}")
        if self.warmup_fraction is not None and not 0 <= self.warmup_fraction < 1:
            out.append(f"warmup_fraction must lie in [0, 1), not {self.warmup_fraction}")
        if not 0 <= self.min_lr_ratio <= 1:
            out.append(f"min_lr_ratio must lie in [0, 1], not {self.min_lr_ratio}")
        if self.precision not in PRECISIONS:
            out.append(f"precision must be one of {list(PRECISIONS)}, not {self.precision!r}")
        if self.num_workers < 0 or self.log_every < 1 or self.ckpt_every < 1 or self.synthetic_size < 1:
            out.append("num_workers must be ≥ 0 and log_every, ckpt_every, synthetic_size ≥ 1")
        regularizers = names_of("regularizer")
        unknown = [r for r in self.regularizers if r not in regularizers]
        if unknown:
            out.append(f"regularizers {unknown} are unknown; available: {regularizers or 'none yet'}")
        if len(set(self.regularizers)) != len(self.regularizers):
            out.append(f"regularizers lists a name twice: {self.regularizers}")
        for name in enabled_additions(self):  # an addition's options are checked only when it is on
            if name in ADDITIONS and name not in unknown and hasattr(getattr(self, name, None), "problems"):
                out += getattr(self, name).problems()
        if self.method == "qbheat":
            out += self.qbheat.problems()
        if self.method == "mocov2":
            out += self.mocov2.problems(self.batch_size)
        return out

    def validate(self, world_size: int = 1) -> "PretrainConfig":
        """Raise QBHeatError naming the first problem (and how many more there are)."""
        bad = self.problems(world_size)
        if bad:
            more = f" ({len(bad) - 1} more problem{'s' if len(bad) > 2 else ''} after this one)" if len(bad) > 1 else ""
            raise QBHeatError(f"config: {bad[0]}{more}.")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples become lists), as stored in checkpoints and YAML."""
        return _plain(dataclasses.asdict(self))


def _plain(v):
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


# ---------------------------------------------------------------------------------------------
# Building configs from dicts with type checks.
# ---------------------------------------------------------------------------------------------

def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp`` (converting list→tuple and int→float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except QBHeatError as e:
                errors.append(e)
        raise errors[0] if errors else QBHeatError(f"config: {where} cannot be null.")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise QBHeatError(f"config: {where} must be a mapping of its fields, not {value!r}.")
        return _from_dict(tp, value, where + ".")
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise QBHeatError(f"config: {where} must be a number, not {value!r}.")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise QBHeatError(f"config: {where} must be an integer, not {value!r}.")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise QBHeatError(f"config: {where} must be true or false, not {value!r}.")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise QBHeatError(f"config: {where} must be a string, not {value!r}.")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise QBHeatError(f"config: {where} must be a list of {len(args)} values, not {value!r}.")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (a,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise QBHeatError(f"config: {where} must be a list, not {value!r}.")
        return [_coerce(v, a, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise QBHeatError(f"config: {where} must be a mapping, not {value!r}.")
        return dict(value)
    raise TypeError(f"unsupported config annotation {tp!r} for {where}")


def _from_dict(cls, data: dict[str, Any], prefix: str = ""):
    hints = typing.get_type_hints(cls, localns={t.__name__: t for t in section_types().values()})
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise QBHeatError(f"config: unknown key {prefix + unknown[0]!r}; valid keys are {names}.")
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in data.items()})


def config_from_dict(data: dict[str, Any]) -> PretrainConfig:
    """A PretrainConfig from a (possibly partial) nested dict; unknown keys and wrong types are errors."""
    return _from_dict(PretrainConfig, data)


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``"mocov2.queue_size"``) in a nested dict copy."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for key, value in overrides.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise QBHeatError(f"config: {p!r} is not a section, so {key!r} cannot be set.")
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PretrainConfig:
    """Defaults ← YAML file at ``path`` (if any) ← ``overrides`` (dotted keys)."""
    data: dict[str, Any] = {}
    if path is not None:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise QBHeatError(f"config file {path} does not exist.")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise QBHeatError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]}).") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise QBHeatError(f"config file {path} must hold a mapping of settings at the top level.")
        data = loaded or {}
    return config_from_dict(apply_overrides(data, overrides or {}))


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"key=value"`` → (key, YAML-parsed value), for ``--set``."""
    import yaml

    if "=" not in text:
        raise QBHeatError(f"--set expects KEY=VALUE, got {text!r}.")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string; a number was meant
        try:
            value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            pass
    return key.strip(), value

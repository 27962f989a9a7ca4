"""The one typed configuration object: a YAML recipe (see docs/architecture.md) plus `--set`
overrides, validated completely before any framework import or Horovod init.

Every rank validates the same file the same way, so a bad recipe makes all ranks exit with the
same one-line ConfigError instead of some ranks hanging in a collective.
"""
import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import yaml

from hvdscale.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO_ROOT / "pipelines" / "fashion_mnist_lamb.yaml"

FRAMEWORKS = ("torch", "tensorflow")
MODELS = ("cnn", "resnet8", "resnet20", "resnet50", "mlp")
DATA_KINDS = ("fashion_mnist", "synthetic", "imagefolder")
DECODERS = ("auto", "cpu", "mixed")
OPTIMIZERS = ("sgd", "lars", "lamb", "adamw")
SCALING_RULES = ("linear", "sqrt", "none")
WARMUPS = ("linear", "zero", "none")
DECAYS = ("constant", "multistep", "cosine", "polynomial", "exponential")
NONFINITE_POLICIES = ("abort", "skip")
ELASTIC_POLICIES = ("keep_global_batch", "rescale_lr")


def _spec(default, kind, *, choices=None, nullable=False, check=None, why=None):
    """A schema field: `kind` is int|float|bool|str|"list_str"|"list_float"|"pair_float";
    `check(value) -> bool` rejects impossible values with the message `why`."""
    meta = {"kind": kind, "choices": choices, "nullable": nullable, "check": check, "why": why}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _positive(v):
    return v > 0


def _non_negative(v):
    return v >= 0


def _fraction(v):            # [0, 1)
    return 0 <= v < 1


@dataclass
class ModelConfig:
    name: str = _spec("cnn", str, choices=MODELS)
    zero_init_residual: bool = _spec(True, bool)
    label_smoothing: float = _spec(0.0, float, check=_fraction, why="must be in [0, 1)")


@dataclass
class DataConfig:
    kind: str = _spec("fashion_mnist", str, choices=DATA_KINDS)
    path: Optional[str] = _spec(None, str, nullable=True)
    image_size: int = _spec(28, int, check=_positive, why="must be > 0")
    num_classes: int = _spec(10, int, check=lambda v: v >= 2, why="must be >= 2")
    channels: Optional[int] = _spec(None, int, nullable=True, check=lambda v: v in (1, 3),
                                    why="must be 1 or 3")
    train_limit: Optional[int] = _spec(None, int, nullable=True, check=_positive, why="must be > 0")
    test_limit: Optional[int] = _spec(None, int, nullable=True, check=_positive, why="must be > 0")
    skip_corrupt: bool = _spec(False, bool)
    decode: str = _spec("auto", str, choices=DECODERS)


@dataclass
class BatchConfig:
    per_worker: int = _spec(128, int, check=_positive, why="must be > 0")
    reference: int = _spec(128, int, check=_positive, why="must be > 0")
    accumulation: int = _spec(1, int, check=_positive, why="must be > 0")


@dataclass
class OptimizerConfig:
    name: str = _spec("lamb", str, choices=OPTIMIZERS)
    base_lr: float = _spec(0.002, float, check=_positive, why="must be > 0")
    momentum: float = _spec(0.9, float, check=_fraction, why="must be in [0, 1)")
    betas: List[float] = _spec([0.9, 0.999], "pair_float",
                               check=lambda v: all(0 <= b < 1 for b in v),
                               why="must be two numbers in [0, 1)")
    eps: float = _spec(1e-6, float, check=_positive, why="must be > 0")
    weight_decay: float = _spec(0.01, float, check=_non_negative, why="must be >= 0")
    trust_coefficient: float = _spec(0.001, float, check=_positive, why="must be > 0")
    exclude_1d: bool = _spec(True, bool)
    exclude: List[str] = _spec([], "list_str")


@dataclass
class LRConfig:
    scaling: str = _spec("sqrt", str, choices=SCALING_RULES)
    warmup: str = _spec("linear", str, choices=WARMUPS)
    warmup_epochs: float = _spec(1.0, float, check=_non_negative, why="must be >= 0")
    warmup_steps: Optional[int] = _spec(None, int, nullable=True, check=_non_negative,
                                        why="must be >= 0")
    decay: str = _spec("cosine", str, choices=DECAYS)
    milestones: List[float] = _spec([], "list_float",
                                    check=lambda v: all(m > 0 for m in v) and list(v) == sorted(v),
                                    why="must be increasing positive epochs")
    gamma: float = _spec(0.1, float, check=lambda v: 0 < v <= 1, why="must be in (0, 1]")
    power: float = _spec(2.0, float, check=_positive, why="must be > 0")
    end_lr: float = _spec(0.0, float, check=_non_negative, why="must be >= 0")
    decay_rate: float = _spec(0.97, float, check=lambda v: 0 < v <= 1, why="must be in (0, 1]")
    decay_epochs: float = _spec(1.0, float, check=_positive, why="must be > 0")


@dataclass
class TrainConfig:
    epochs: float = _spec(3, float, check=_positive, why="must be > 0")
    max_steps: Optional[int] = _spec(None, int, nullable=True, check=_positive, why="must be > 0")
    seed: int = _spec(42, int, check=_non_negative, why="must be >= 0")
    eval_every_epochs: Optional[float] = _spec(1.0, float, nullable=True, check=_positive,
                                               why="must be > 0")
    eval_every_steps: Optional[int] = _spec(None, int, nullable=True, check=_positive,
                                            why="must be > 0")
    target_accuracy: Optional[float] = _spec(0.90, float, nullable=True,
                                             check=lambda v: 0 < v <= 1, why="must be in (0, 1]")
    stop_at_target: bool = _spec(False, bool)
    threads: Optional[int] = _spec(None, int, nullable=True, check=_positive, why="must be > 0")
    tau_ref: Optional[float] = _spec(None, float, nullable=True, check=_positive, why="must be > 0")


@dataclass
class HorovodConfig:
    fp16_compression: bool = _spec(False, bool)
    adasum: bool = _spec(False, bool)


@dataclass
class CheckpointConfig:
    every_steps: Optional[int] = _spec(None, int, nullable=True, check=_positive, why="must be > 0")
    every_epochs: Optional[float] = _spec(1.0, float, nullable=True, check=_positive,
                                          why="must be > 0")
    keep: int = _spec(2, int, check=_positive, why="must be > 0")


@dataclass
class FaultsConfig:
    nonfinite: str = _spec("abort", str, choices=NONFINITE_POLICIES)
    # a rank whose step has not finished for this long ends the job (null = never)
    step_timeout_s: Optional[float] = _spec(900.0, float, nullable=True, check=_positive,
                                            why="must be > 0 (null = no watchdog)")
    # debug: feed NaNs to rank inject_nan_rank at this step (tests of the policy)
    inject_nan_at_step: Optional[int] = _spec(None, int, nullable=True, check=_non_negative,
                                              why="must be >= 0")
    inject_nan_rank: int = _spec(0, int, check=_non_negative, why="must be >= 0")


@dataclass
class ElasticConfig:
    commit_every: int = _spec(10, int, check=_positive, why="must be > 0")
    policy: str = _spec("keep_global_batch", str, choices=ELASTIC_POLICIES)


@dataclass
class NoiseScaleConfig:
    every: int = _spec(0, int, check=_non_negative, why="must be >= 0 (0 = off)")
    ema: float = _spec(0.9, float, check=_fraction, why="must be in [0, 1)")


@dataclass
class LogConfig:
    tensorboard: bool = _spec(True, bool)
    progress: bool = _spec(True, bool)


SECTIONS = {
    "model": ModelConfig, "data": DataConfig, "batch": BatchConfig,
    "optimizer": OptimizerConfig, "lr": LRConfig, "train": TrainConfig,
    "horovod": HorovodConfig, "checkpoint": CheckpointConfig, "faults": FaultsConfig,
    "elastic": ElasticConfig, "noise_scale": NoiseScaleConfig, "log": LogConfig,
}


@dataclass
class Config:
    name: str = _spec("unnamed", str)
    framework: str = _spec("torch", str, choices=FRAMEWORKS)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr: LRConfig = field(default_factory=LRConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    horovod: HorovodConfig = field(default_factory=HorovodConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    noise_scale: NoiseScaleConfig = field(default_factory=NoiseScaleConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self):
        return dataclasses.asdict(self)

    @property
    def in_channels(self):
        """Fashion-MNIST is grey; synthetic and image-folder data are RGB unless stated."""
        if self.data.channels is not None:
            return self.data.channels
        return 1 if self.data.kind == "fashion_mnist" else 3


# ---------------------------------------------------------------------------------- coercion
def _number(value, key, integral):
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if isinstance(value, str):
        # PyYAML reads `1e-3` (no dot) as a string; accept what float() reads as a number.
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{key}: must be finite, got {value!r}")
    if integral:
        if float(value) != int(value):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    return float(value)


def _coerce(value, meta, key):
    kind = meta["kind"]
    if value is None:
        if meta["nullable"]:
            return None
        raise ConfigError(f"{key}: must not be null")
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        out = value
    elif kind is int:
        out = _number(value, key, integral=True)
    elif kind is float:
        out = _number(value, key, integral=False)
    elif kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        out = value
    elif kind == "list_str":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        out = list(value)
    elif kind == "list_float":
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of numbers, got {value!r}")
        out = [_number(v, key, integral=False) for v in value]
    elif kind == "pair_float":
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ConfigError(f"{key}: expected two numbers, got {value!r}")
        out = [_number(v, key, integral=False) for v in value]
    else:  # pragma: no cover - schema bug
        raise AssertionError(kind)
    if meta["choices"] and out not in meta["choices"]:
        raise ConfigError(f"{key}: {out!r} is not one of {', '.join(meta['choices'])}")
    if meta["check"] and not meta["check"](out):
        raise ConfigError(f"{key}: {meta['why']}, got {out!r}")
    return out


def _build(cls, raw, prefix):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'recipe'}: expected a mapping, got {raw!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ConfigError(f"unknown key {unknown[0]!r}{where} (known: {', '.join(known)})")
    values = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        if prefix == "" and name in SECTIONS:
            values[name] = _build(SECTIONS[name], value if value is not None else {}, name)
        else:
            values[name] = _coerce(value, known[name].metadata, key)
    return cls(**values)


# ---------------------------------------------------------------------------------- checks
def _check_consistency(cfg):
    """Rules that involve several fields (the single-field ones live in the schema)."""
    t, lr = cfg.train, cfg.lr
    if lr.warmup != "none" and lr.warmup_steps is None and lr.warmup_epochs > t.epochs:
        raise ConfigError(f"lr.warmup_epochs ({lr.warmup_epochs:g}) is longer than training "
                          f"(train.epochs = {t.epochs:g})")
    if lr.warmup != "none" and lr.warmup_steps is not None and t.max_steps is not None \
            and lr.warmup_steps > t.max_steps:
        raise ConfigError(f"lr.warmup_steps ({lr.warmup_steps}) is longer than training "
                          f"(train.max_steps = {t.max_steps})")
    if lr.decay == "multistep":
        if not lr.milestones:
            raise ConfigError("lr.decay multistep needs lr.milestones (epochs)")
        if lr.milestones[-1] >= t.epochs:
            raise ConfigError(f"lr.milestones: {lr.milestones[-1]:g} is not before the end of "
                              f"training (train.epochs = {t.epochs:g})")
    if lr.decay in ("cosine", "polynomial") and lr.end_lr >= cfg.optimizer.base_lr:
        raise ConfigError(f"lr.end_lr ({lr.end_lr:g}) must be below optimizer.base_lr "
                          f"({cfg.optimizer.base_lr:g})")
    if t.eval_every_epochs is None and t.eval_every_steps is None:
        # still evaluated at the end; that is allowed, nothing to check
        pass
    if cfg.data.kind == "fashion_mnist":
        if cfg.data.image_size != 28 or cfg.data.num_classes != 10:
            raise ConfigError(f"data: fashion_mnist is 28x28 with 10 classes, got "
                              f"image_size={cfg.data.image_size}, num_classes={cfg.data.num_classes}")
        if cfg.data.channels not in (None, 1):
            raise ConfigError(f"data.channels: fashion_mnist is grey (1 channel), got "
                              f"{cfg.data.channels}")
    if cfg.model.name.startswith("resnet") and cfg.data.image_size < 8:
        raise ConfigError(f"data.image_size {cfg.data.image_size} is too small for "
                          f"{cfg.model.name} (needs >= 8)")


# ---------------------------------------------------------------------------------- loading
def parse_override(text):
    """`a.b=value` -> (["a", "b"], value); the value is read as YAML (`0.1`, `true`, `[1,2]`)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. optimizer.base_lr=0.01")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({err.problem})") from None
    return key.split("."), value


def apply_overrides(raw, overrides):
    raw = copy.deepcopy(raw)
    for text in overrides or ():
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            if part not in SECTIONS and node is raw:
                raise ConfigError(f"--set {text!r}: unknown section {part!r} "
                                  f"(known: {', '.join(SECTIONS)})")
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return raw


def read_recipe(path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML "
                          f"({getattr(err, 'problem', None) or err})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}")
    return raw


def config_from_dict(raw):
    cfg = _build(Config, raw, "")
    _check_consistency(cfg)
    return cfg


def load_config(recipe=None, overrides=()):
    """Recipe file (default: the built-in Fashion-MNIST LAMB recipe) + `--set` overrides."""
    raw = read_recipe(recipe if recipe is not None else DEFAULT_RECIPE)
    try:
        return config_from_dict(apply_overrides(raw, overrides))
    except ConfigError as err:
        raise ConfigError(f"{recipe if recipe is not None else DEFAULT_RECIPE}: {err}") from None

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
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from hvdscale import registry
from hvdscale.core.optimizers import OPTIONS as OPTIMIZER_OPTIONS
# the same value checks as the optimizer options, one definition
from hvdscale.core.optimizers import _fraction, _non_negative, _positive
from hvdscale.errors import ConfigError, shown

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO_ROOT / "pipelines" / "fashion_mnist_lamb.yaml"

DECODERS = ("auto", "cpu", "mixed")
SCALING_RULES = ("linear", "sqrt", "none")
WARMUPS = ("linear", "zero", "none")
DECAYS = ("constant", "multistep", "cosine", "polynomial", "exponential")
NONFINITE_POLICIES = ("abort", "skip", "off")
PRECISIONS = ("fp32", "bf16", "fp16")
ELASTIC_POLICIES = ("keep_global_batch", "rescale_lr")


def _spec(default, kind, *, choices=None, nullable=False, check=None, why=None,
          entry_point=False):
    """A schema field: `kind` is int|float|bool|str|"list_str"|"list_float"|"pair_float";
    `choices` is a tuple or a registry (hvdscale.registry: read when a recipe is validated);
    `entry_point`: "package.module:factory" is accepted besides the choices;
    `check(value) -> bool` rejects impossible values with the message `why`."""
    meta = {"kind": kind, "choices": choices, "nullable": nullable, "check": check, "why": why,
            "entry_point": entry_point}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _option(key):
    """An optimizer option (hvdscale.core.optimizers.OPTIONS): null in the recipe means the
    chosen optimizer's default, which validation fills in."""
    return field(default=None, metadata={"option": key})


@dataclass
class ModelConfig:
    # a registered model (hvdscale.registry.MODELS) or your own "package.module:factory"
    name: str = _spec("cnn", str, choices=registry.MODELS, entry_point=True)
    zero_init_residual: bool = _spec(True, bool)
    label_smoothing: float = _spec(0.0, float, check=_fraction, why="must be in [0, 1)")


@dataclass
class DataConfig:
    # a registered kind (hvdscale.registry.DATA_KINDS) or your own "package.module:factory"
    kind: str = _spec("fashion_mnist", str, choices=registry.DATA_KINDS, entry_point=True)
    path: Optional[str] = _spec(None, str, nullable=True)
    image_size: int = _spec(28, int, check=_positive, why="must be > 0")
    num_classes: int = _spec(10, int, check=lambda v: v >= 2, why="must be >= 2")
    channels: Optional[int] = _spec(None, int, nullable=True, check=lambda v: v in (1, 3),
                                    why="must be 1 or 3")
    train_limit: Optional[int] = _spec(None, int, nullable=True, check=_positive, why="must be > 0")
    test_limit: Optional[int] = _spec(None, int, nullable=True, check=_positive, why="must be > 0")
    # hold out this many training images (a fixed seed-0 draw) as the evaluation set: every
    # evaluation of a run reads them, and the test set stays untouched (hvdscale sweep)
    validation: Optional[int] = _spec(None, int, nullable=True, check=_positive,
                                      why="must be > 0")
    skip_corrupt: bool = _spec(False, bool)
    decode: str = _spec("auto", str, choices=DECODERS)


ADAPTIVE_RULES = ("adascale", "linear", "sqrt")


@dataclass
class AdaptiveBatchConfig:
    """batch.adaptive: grow the global batch from the online noise scale
    (hvdscale/core/adaptive_batch.py, hvdscale/engine/adaptive.py, docs/training.md)."""
    enabled: bool = _spec(False, bool)
    # the largest global batch; a multiple of per_worker x workers (checked at start)
    max_global: Optional[int] = _spec(None, int, nullable=True, check=_positive,
                                      why="must be > 0")
    every_steps: int = _spec(100, int, check=_positive, why="must be > 0")
    rule: str = _spec("adascale", str, choices=ADAPTIVE_RULES)
    # the predicted fraction of steps saved that a change must exceed
    threshold: float = _spec(0.1, float, check=_fraction, why="must be in [0, 1)")
    # noise-scale estimates needed before the first decision
    min_samples: int = _spec(10, int, check=_positive, why="must be > 0")
    shrink: bool = _spec(False, bool)


@dataclass
class BatchConfig:
    per_worker: int = _spec(128, int, check=_positive, why="must be > 0")
    reference: int = _spec(128, int, check=_positive, why="must be > 0")
    accumulation: int = _spec(1, int, check=_positive, why="must be > 0")
    adaptive: AdaptiveBatchConfig = field(default_factory=AdaptiveBatchConfig,
                                          metadata={"section": AdaptiveBatchConfig})


@dataclass
class OptimizerConfig:
    """The optimizer (hvdscale.registry.OPTIMIZERS), its base LR and exclusion rule, and its
    options. Every option of hvdscale.core.optimizers.OPTIONS may be set; unset ones become
    the chosen optimizer's default there (one set of defaults for both frameworks). Options
    registered by a plugin are kept as attributes too (see `option`)."""
    name: str = _spec("lamb", str, choices=registry.OPTIMIZERS)
    base_lr: float = _spec(0.002, float, check=_positive, why="must be > 0")
    exclude_1d: bool = _spec(True, bool)
    exclude: List[str] = _spec([], "list_str")
    momentum: Optional[float] = _option("momentum")
    nesterov: Optional[bool] = _option("nesterov")
    betas: Optional[List[float]] = _option("betas")
    eps: Optional[float] = _option("eps")
    weight_decay: Optional[float] = _option("weight_decay")
    trust_coefficient: Optional[float] = _option("trust_coefficient")
    bias_correction: Optional[bool] = _option("bias_correction")
    clamp_value: Optional[float] = _option("clamp_value")
    max_trust_ratio: Optional[float] = _option("max_trust_ratio")

    def option(self, key: str) -> Any:
        """An option's value (None when unset and not taken by the chosen optimizer)."""
        return getattr(self, key, None)

    def options(self) -> Dict[str, Any]:
        """The options the chosen optimizer takes, with their values."""
        return {key: self.option(key) for key in registry.OPTIMIZERS.get(self.name).options}


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
    # arithmetic of forward/backward (autocast / Keras mixed policy); weights and optimizer
    # state stay fp32. fp16 needs a GPU (loss scaling); bf16 runs on CPUs too
    precision: str = _spec("fp32", str, choices=PRECISIONS)
    # torch.compile / Keras jit_compile of the step; refused where it was not measured faster
    compile: bool = _spec(False, bool)


@dataclass
class HorovodConfig:
    fp16_compression: bool = _spec(False, bool)
    adasum: bool = _spec(False, bool)
    # how the gradients are handed to Horovod: null = by device (one grouped allreduce after
    # backward on a CPU -- measured fastest on the 2-core node, benchmarks/RESULTS.md --,
    # Horovod's per-tensor allreduces during backward on a GPU, which overlap with it);
    # 0 = per tensor; n = n groups (Horovod's `groups`)
    groups: Optional[int] = _spec(None, int, nullable=True, check=_non_negative,
                                  why="must be >= 0 (null = by device)")


@dataclass
class CheckpointConfig:
    every_steps: Optional[int] = _spec(None, int, nullable=True, check=_positive, why="must be > 0")
    every_epochs: Optional[float] = _spec(1.0, float, nullable=True, check=_positive,
                                          why="must be > 0")
    keep: int = _spec(2, int, check=_positive, why="must be > 0")
    # a checkpoint that cannot be written (disk full, read-only): stop every rank, or warn
    # and train on (docs/reliability.md)
    on_error: str = _spec("stop", str, choices=("stop", "warn"))
    # exit code of every rank after a preemption checkpoint (SIGTERM/SIGUSR1); null = 0.
    # HVDSCALE_REQUEUE_EXIT_CODE overrides it (e.g. 75 from a requeueing batch script)
    requeue_exit_code: Optional[int] = _spec(None, int, nullable=True,
                                             check=lambda v: 1 <= v <= 255,
                                             why="must be in 1..255 (null = exit 0)")


@dataclass
class FaultsConfig:
    nonfinite: str = _spec("abort", str, choices=NONFINITE_POLICIES)
    # a rank whose step has not finished for this long ends the job (null = never)
    step_timeout_s: Optional[float] = _spec(900.0, float, nullable=True, check=_positive,
                                            why="must be > 0 (null = no watchdog)")
    # how often the ranks agree on a preemption signal (one small collective each time; a
    # check per step cost ~15 % of a small model's step at K=2, benchmarks/RESULTS.md)
    preemption_check_s: float = _spec(0.5, float, check=_positive, why="must be > 0")
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
    # the step statistics (loss, non-finite count) are read from the device this often, and
    # a line of training curves (loss, lr, img/s) goes to OUT/steps.jsonl
    every_steps: int = _spec(20, int, check=_positive, why="must be > 0")
    # where stderr is not a terminal (horovodrun, mpirun, srun, a batch log) the progress is
    # one plain line whenever this many seconds or this share of the run have passed
    progress_every_s: float = _spec(60.0, float, check=_positive, why="must be > 0")
    progress_every_percent: float = _spec(5.0, float, check=lambda v: 0 < v <= 100,
                                          why="must be in (0, 100]")
    # write the run's HTML report with plots to OUT/report at the end (hvdscale report)
    report: bool = _spec(False, bool)


PLUGINS_KEY = "plugins"   # modules imported before validation; they register their entries

SECTIONS = {
    "model": ModelConfig, "data": DataConfig, "batch": BatchConfig,
    "optimizer": OptimizerConfig, "lr": LRConfig, "train": TrainConfig,
    "horovod": HorovodConfig, "checkpoint": CheckpointConfig, "faults": FaultsConfig,
    "elastic": ElasticConfig, "noise_scale": NoiseScaleConfig, "log": LogConfig,
}


@dataclass
class Config:
    name: str = _spec("unnamed", str)
    plugins: List[str] = _spec([], "list_str")
    # "package.module:factory" entries: factory(cfg) -> hvdscale.engine.callbacks.Callback
    callbacks: List[str] = _spec([], "list_str")
    framework: str = _spec("torch", str, choices=registry.BACKENDS)
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

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        fields = {f.name for f in dataclasses.fields(OptimizerConfig)}
        out["optimizer"].update({k: v for k, v in vars(self.optimizer).items()
                                 if k not in fields})       # options added by plugins
        return out

    @property
    def in_channels(self) -> int:
        """data.channels, else the data kind's default (Fashion-MNIST grey, others RGB)."""
        if self.data.channels is not None:
            return self.data.channels
        if self.data.kind in registry.DATA_KINDS:
            return registry.DATA_KINDS.get(self.data.kind).channels
        return 3


# ---------------------------------------------------------------------------------- YAML
# A recipe has ~100 values. YAML aliases may repeat a subtree by reference, and ten nested
# levels of ten aliases (400 bytes) stand for 10^10 values: harmless as shared Python objects,
# but every later copy or message (dataclasses.asdict, json.dumps, repr) would expand them.
MAX_YAML_VALUES = 10_000


def _expanded_size(node, sizes, open_nodes):
    """Scalars + collections under `node` with every alias expanded, counted once per node
    object (memo), so a bomb is measured without being expanded; stops past the budget."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise ConfigError("a YAML alias refers to a node that contains it (recursive alias)")
    open_nodes.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [item for pair in node.value for item in pair]
    else:
        children = []
    for child in children:
        total += _expanded_size(child, sizes, open_nodes)
        if total > MAX_YAML_VALUES:
            break
    open_nodes.discard(key)
    sizes[key] = total
    return total


def safe_yaml(text: str, where: str) -> Any:
    """yaml.safe_load, refusing documents whose aliases expand to more than MAX_YAML_VALUES
    values before anything is built from them. YAML syntax errors propagate as
    yaml.YAMLError; the budget is a ConfigError naming `where`."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            size = _expanded_size(node, {}, set())
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        if size > MAX_YAML_VALUES:
            raise ConfigError(f"{where}: YAML aliases expand to more than {MAX_YAML_VALUES} "
                              f"values (a recipe has about 100); refused")
        return loader.construct_document(node)
    finally:
        loader.dispose()


# ---------------------------------------------------------------------------------- coercion
FLOAT32_MAX = 3.4028234663852886e38     # training computes in float32 (at least)


def _number(value, key, integral):
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number, got {shown(value)}")
    if isinstance(value, str):
        # PyYAML reads `1e-3` (no dot) as a string; accept what float() reads as a number.
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {shown(value)}") from None
    if not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {shown(value)}")
    if not math.isfinite(value):
        raise ConfigError(f"{key}: must be finite, got {shown(value)}")
    if integral:
        if float(value) != int(value):
            raise ConfigError(f"{key}: expected an integer, got {shown(value)}")
        if abs(int(value)) >= 2 ** 63:
            raise ConfigError(f"{key}: {value:g} overflows a 64-bit integer")
        return int(value)
    if abs(value) > FLOAT32_MAX:
        raise ConfigError(f"{key}: {value:g} overflows float32, the training's number type "
                          f"(largest {FLOAT32_MAX:.4g})")
    return float(value)


def _coerce(value, meta, key):
    kind = meta["kind"]
    if value is None:
        if meta["nullable"]:
            return None
        raise ConfigError(f"{key}: must not be null")
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {shown(value)}")
        out = value
    elif kind is int:
        out = _number(value, key, integral=True)
    elif kind is float:
        out = _number(value, key, integral=False)
    elif kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {shown(value)}")
        out = value
    elif kind == "list_str":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {shown(value)}")
        out = list(value)
    elif kind == "list_float":
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of numbers, got {shown(value)}")
        out = [_number(v, key, integral=False) for v in value]
    elif kind == "pair_float":
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ConfigError(f"{key}: expected two numbers, got {shown(value)}")
        out = [_number(v, key, integral=False) for v in value]
    else:  # pragma: no cover - schema bug
        raise AssertionError(kind)
    choices = meta["choices"]
    if choices is not None and out not in choices:
        if meta.get("entry_point") and registry.is_entry_point(out):
            registry.check_entry_point(out, key)
        else:
            names = choices.names() if isinstance(choices, registry.Registry) else choices
            extra = " or package.module:factory" if meta.get("entry_point") else ""
            raise ConfigError(f"{key}: {shown(out)} is not one of {', '.join(names)}{extra}")
    if meta["check"] and not meta["check"](out):
        raise ConfigError(f"{key}: {meta['why']}, got {shown(out)}")
    return out


def _build(cls, raw, prefix):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'recipe'}: expected a mapping, got {shown(raw)}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    # optimizer options registered by plugins are valid keys without a dataclass field
    extra = [k for k in OPTIMIZER_OPTIONS if k not in known] if cls is OptimizerConfig else []
    unknown = sorted(set(raw) - set(known) - set(extra))
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ConfigError(f"unknown key {shown(unknown[0])}{where} "
                          f"(known: {', '.join(list(known) + extra)})")
    values, extras = {}, {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        if prefix == "" and name in SECTIONS:
            values[name] = _build(SECTIONS[name], value if value is not None else {}, name)
        elif name in known and "section" in known[name].metadata:     # a nested section
            values[name] = _build(known[name].metadata["section"],
                                  value if value is not None else {}, key)
        elif name in extra or "option" in getattr(known.get(name), "metadata", {}):
            # None: the optimizer's default (filled in by _resolve_optimizer)
            target = extras if name in extra else values
            value = None if value is None else OPTIMIZER_OPTIONS[name].validate(value, key)
            target[name] = list(value) if isinstance(value, tuple) else value
        else:
            values[name] = _coerce(value, known[name].metadata, key)
    out = cls(**values)
    for name, value in extras.items():
        setattr(out, name, value)
    return out


def _resolve_optimizer(opt):
    """Fill the chosen optimizer's unset options with its defaults (hvdscale.core.optimizers)
    and check that the recipe's values fit it; list-valued options stay lists in the config."""
    info = registry.OPTIMIZERS.get(opt.name)
    for key, value in info.resolve_options(opt.option).items():
        setattr(opt, key, list(value) if isinstance(value, tuple) else value)


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
    _check_adaptive(cfg)
    for entry in cfg.callbacks:
        if not registry.is_entry_point(entry):
            raise ConfigError(f"callbacks: {shown(entry)}: expected package.module:factory")
        registry.check_entry_point(entry, "callbacks")
    opt = registry.OPTIMIZERS.get(cfg.optimizer.name)
    if cfg.framework not in opt.builders:
        raise ConfigError(f"optimizer.name: {opt.name!r} has no {cfg.framework} version "
                          f"(it has {', '.join(opt.builders) or 'none'})")
    if cfg.model.name in registry.MODELS \
            and cfg.framework not in registry.MODELS.get(cfg.model.name).builders:
        raise ConfigError(f"model.name: {cfg.model.name!r} has no {cfg.framework} build")
    kind = registry.DATA_KINDS.get(cfg.data.kind) if cfg.data.kind in registry.DATA_KINDS \
        else None
    if kind is not None and kind.fixed:
        d = cfg.data
        if any(getattr(d, k) != kind.fixed[k] for k in ("image_size", "num_classes")
               if k in kind.fixed):
            raise ConfigError(f"data: {kind.name} is {kind.fixed['image_size']}x"
                              f"{kind.fixed['image_size']} with {kind.fixed['num_classes']} "
                              f"classes, got image_size={d.image_size}, "
                              f"num_classes={d.num_classes}")
        if "channels" in kind.fixed and d.channels not in (None, kind.fixed["channels"]):
            raise ConfigError(f"data.channels: {kind.name} has {kind.fixed['channels']} "
                              f"channel(s), got {d.channels}")
    if cfg.model.name in registry.MODELS:
        need = registry.MODELS.get(cfg.model.name).min_image_size
        if cfg.data.image_size < need:
            raise ConfigError(f"data.image_size {cfg.data.image_size} is too small for "
                              f"{cfg.model.name} (needs >= {need})")


def _check_adaptive(cfg):
    """batch.adaptive, as far as it can be checked without the worker count (the rest, the
    global batches against per_worker x workers, is checked when the run starts)."""
    a, b = cfg.batch.adaptive, cfg.batch
    if not a.enabled:
        return
    if a.max_global is None:
        raise ConfigError("batch.adaptive.max_global: required when batch.adaptive.enabled "
                          "(the largest global batch the run may grow to)")
    if cfg.noise_scale.every == 0:
        raise ConfigError("batch.adaptive.enabled needs the online noise scale, which "
                          "noise_scale.every = 0 switches off (set it to e.g. 1-10)")
    if b.per_worker * b.accumulation > a.max_global:
        raise ConfigError(f"batch.adaptive.max_global ({a.max_global}) is below the global "
                          f"batch of one worker (per_worker x accumulation = "
                          f"{b.per_worker * b.accumulation})")
    if a.max_global % b.per_worker:
        raise ConfigError(f"batch.adaptive.max_global ({a.max_global}) is not a multiple of "
                          f"batch.per_worker ({b.per_worker})")


# ---------------------------------------------------------------------------------- loading
# the `setting` of errors in overrides (the CLI's --set)
OVERRIDES = "overrides"


def parse_override(text: str) -> Tuple[List[str], Any]:
    """`a.b=value` -> (["a", "b"], value); the value is read as YAML (`0.1`, `true`, `[1,2]`)."""
    if "=" not in text:
        raise ConfigError(f"override {shown(text)}: expected key=value, e.g. optimizer.base_lr=0.01",
                          setting=OVERRIDES)
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {shown(text)}: empty key", setting=OVERRIDES)
    try:
        value = safe_yaml(raw, f"override {shown(text)}") if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {shown(text)}: value is not valid YAML ({err.problem})",
                          setting=OVERRIDES) from None
    return key.split("."), value


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    raw = copy.deepcopy(raw)
    for text in overrides or ():
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            if part not in SECTIONS and node is raw:
                raise ConfigError(f"override {shown(text)}: unknown section {shown(part)} "
                                  f"(known: {', '.join(SECTIONS)})", setting=OVERRIDES)
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {shown(text)}: {shown(part)} is not a section",
                                  setting=OVERRIDES)
        node[path[-1]] = value
    return raw


def read_recipe(path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        raw = safe_yaml(path.read_text(), str(path))
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


def config_from_dict(raw: Dict[str, Any]) -> "Config":
    """Validate a recipe mapping completely; plugins named in it are imported first."""
    if isinstance(raw, dict) and raw.get(PLUGINS_KEY):
        plugins = _coerce(raw[PLUGINS_KEY], {"kind": "list_str", "nullable": False,
                                             "choices": None, "check": None}, PLUGINS_KEY)
        registry.load_plugins(plugins)
    cfg = _build(Config, raw, "")
    _resolve_optimizer(cfg.optimizer)
    _check_consistency(cfg)
    return cfg


def load_config(recipe: Optional[str] = None, overrides: Sequence[str] = ()) -> "Config":
    """Recipe file (default: the built-in Fashion-MNIST LAMB recipe) + `--set` overrides."""
    raw = apply_overrides(read_recipe(recipe if recipe is not None else DEFAULT_RECIPE),
                          overrides)         # a malformed override is not the recipe's fault
    try:
        return config_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{recipe if recipe is not None else DEFAULT_RECIPE}: {err}",
                          setting=err.setting) from None

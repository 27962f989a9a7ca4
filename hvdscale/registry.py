"""The registries of what people add to hvdscale: optimizers, models, data kinds and launchers.

Each entry holds its name, a one-line description, what it needs, and a builder per framework
(a callable or a "package.module:function" string, imported only when used, so reading the
registry never loads torch or TensorFlow). Config validation, `hvdscale train --help`, the run
summary and the docs tables all read these; adding an entry is the only change needed
(docs/extending.md). Models and data kinds may also be a user's own factory, named in the
recipe as "package.module:factory" (`model.name`, `data.kind`).

Modelled on timm's optimizer registry (OptimInfo + create_optimizer) and Lightning's strategy
registry: a name maps to a description and a builder, and unknown names fail with the list.
"""
import importlib
import importlib.util
import re
from dataclasses import dataclass, field
from typing import (Any, Callable, Dict, Generic, Iterable, Iterator, Mapping, Optional,
                    Tuple, TypeVar, Union)

from hvdscale.core import optimizers as core_optimizers
from hvdscale.errors import ConfigError

Builder = Union[str, Callable[..., Any]]
T = TypeVar("T")

_ENTRY_POINT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
                          r":[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def resolve(builder: Builder) -> Callable[..., Any]:
    """A builder given as "package.module:function" imported, or the callable itself."""
    if callable(builder):
        return builder
    module, _, attr = builder.partition(":")
    target = importlib.import_module(module)
    for part in attr.split("."):
        target = getattr(target, part)
    return target


class Registry(Generic[T]):
    """Entries by name, in registration order. `setting` is the recipe key that chooses one
    (errors name it)."""

    def __init__(self, what: str, setting: str):
        self.what, self.setting = what, setting
        self._entries: Dict[str, T] = {}

    def register(self, entry: T, *, replace: bool = False) -> T:
        name = entry.name
        if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", name):
            raise ValueError(f"{self.what} name {name!r}: letters, digits, '_', '-', '.' only")
        if name in self._entries and not replace:
            raise ValueError(f"{self.what} {name!r} is already registered "
                             f"(pass replace=True to override it)")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ConfigError(f"{self.setting}: {name!r} is not one of "
                              f"{', '.join(self._entries)}") from None

    def names(self) -> Tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)


# ------------------------------------------------------------------------------ optimizers
@dataclass(frozen=True)
class OptimizerInfo:
    """One optimizer. `defaults` lists the options it takes (keys of
    hvdscale.core.optimizers.OPTIONS) with their default values; `builders` maps a framework
    to a function called with that framework's own keywords:

        torch:       fn(named_params, *, lr, exclude_1d, exclude, **options) -> Optimizer
        tensorflow:  fn(*, learning_rate, exclude_1d, exclude, **options) -> keras Optimizer
    """
    name: str
    description: str
    defaults: Mapping[str, Any]
    builders: Mapping[str, Builder] = field(default_factory=dict)

    @property
    def options(self) -> Tuple[str, ...]:
        return tuple(self.defaults)

    def builder(self, framework: str) -> Callable[..., Any]:
        if framework not in self.builders:
            raise ConfigError(f"optimizer.name: {self.name!r} has no {framework} version "
                              f"(it has {', '.join(self.builders) or 'none'})")
        return resolve(self.builders[framework])

    def resolve_options(self, given: Callable[[str], Any]) -> Dict[str, Any]:
        return core_optimizers.resolve_options(self.name, self.defaults, given)

    def summary(self, values: Mapping[str, Any]) -> str:
        """`lamb (betas [0.9, 0.999], eps 1e-06, weight_decay 0.01, ...)` for the run header."""
        parts = [f"{key} {_show(values.get(key))}" for key in self.options]
        return f"{self.name} ({', '.join(parts)})" if parts else self.name


OPTIMIZERS: "Registry[OptimizerInfo]" = Registry("optimizer", "optimizer.name")


def register_optimizer(info: OptimizerInfo, *, replace: bool = False) -> OptimizerInfo:
    for key in info.defaults:
        if key not in core_optimizers.OPTIONS:
            raise ValueError(f"optimizer {info.name!r}: option {key!r} is not registered; "
                             "add it with hvdscale.core.optimizers.register_option first")
    return OPTIMIZERS.register(info, replace=replace)


for _name, _description in (
        ("sgd", "SGD with momentum (optionally Nesterov) and L2 weight decay added to the "
                "gradient; the large-batch baseline of Goyal et al. 2017"),
        ("sgdw", "SGD with momentum and decoupled weight decay, w <- w (1 - lr wd) before "
                 "the step (Loshchilov & Hutter 2019; what Keras's SGD weight_decay does)"),
        ("lars", "Layer-wise Adaptive Rate Scaling on SGD with momentum (You et al. 2017)"),
        ("lamb", "Layer-wise Adaptive Moments for Batch training, AdamW-based (You et al. "
                 "2019)"),
        ("adamw", "Adam with decoupled weight decay (Loshchilov & Hutter 2019)")):
    # builders: each backend adds its own when it registers (register_backend)
    register_optimizer(OptimizerInfo(_name, _description, core_optimizers.DEFAULTS[_name], {}))


def optimizer_table() -> str:
    """The Markdown table of every registered optimizer's options: recipe key, default, and
    the keyword each backend uses (checked against docs/extending.md by a test)."""
    backends = list(BACKENDS)
    lines = ["| optimizer | recipe key | default | "
             + " | ".join(b.display for b in backends) + " |",
             "|---|---|---|" + "---|" * len(backends)]
    for info in OPTIMIZERS:
        lines.append(f"| `{info.name}` | `base_lr` | (required) | "
                     + " | ".join(f"`{b.lr_name}`" for b in backends) + " |")
        for key, default in info.defaults.items():
            names = (", ".join(f"`{n}`" for n in b.native_names(key)) for b in backends)
            shown = "null" if default is None else (
                str(list(default)) if isinstance(default, tuple) else str(default).lower()
                if isinstance(default, bool) else f"{default:g}")
            lines.append(f"| `{info.name}` | `{key}` | {shown} | " + " | ".join(names) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ models
@dataclass(frozen=True)
class ModelInfo:
    """One built-in model. `builders[framework](cfg)` returns the framework's model (torch:
    NCHW input, Keras: NHWC) producing logits [N, data.num_classes]."""
    name: str
    description: str
    builders: Mapping[str, Builder] = field(default_factory=dict)
    min_image_size: int = 1

    def builder(self, framework: str) -> Callable[..., Any]:
        if framework not in self.builders:
            raise ConfigError(f"model.name: {self.name!r} has no {framework} build")
        return resolve(self.builders[framework])


MODELS: "Registry[ModelInfo]" = Registry("model", "model.name")


def register_model(info: ModelInfo, *, replace: bool = False) -> ModelInfo:
    return MODELS.register(info, replace=replace)


for _name, _description, _min in (
        ("cnn", "two conv blocks (3x3 conv, BN, ReLU, max-pool) and a 64-unit dense layer", 4),
        ("resnet8", "CIFAR ResNet-8 (He et al. 2016, 1 block per stage, option-A shortcuts)", 8),
        ("resnet20", "CIFAR ResNet-20 (3 blocks per stage)", 8),
        ("resnet50", "ImageNet ResNet-50 v1.5 (bottlenecks, stride in the 3x3 conv)", 8),
        ("mlp", "flatten, 128 ReLU units, classifier: the cheap model of CPU sweeps", 1),
        ("mlp4", "flatten, 4 x 128 ReLU units, classifier: the study's model (hvdscale sweep)",
         1)):
    # builders: each backend adds its own when it registers (register_backend)
    register_model(ModelInfo(_name, _description, {}, min_image_size=_min))


def build_model(cfg: Any, framework: Optional[str] = None) -> Any:
    """The recipe's model for `framework` (default cfg.framework): a registered one, or the
    user's "package.module:factory", called as factory(cfg) and checked (type, output shape)
    with errors that name the entry point."""
    framework = framework or cfg.framework
    name = cfg.model.name
    if name in MODELS or not is_entry_point(name):
        return MODELS.get(name).builder(framework)(cfg)
    where = f"model.name {name!r}"
    model = call_factory(load_entry_point(name, "model.name"), cfg, where)
    check = BACKENDS.get(framework).model_check
    return model if check is None else resolve(check)(model, cfg, where)


# ------------------------------------------------------------------------------ data kinds
@dataclass(frozen=True)
class DataKindInfo:
    """One data kind. `sources(cfg, rank, size)` returns this rank's (train source, eval
    source) (protocol: hvdscale/data/__init__.py); `check(data_cfg)` is a cheap test that
    may run before Horovod starts (missing files...); `fixed` are data settings the kind
    dictates (fashion_mnist: 28x28, 10 classes, 1 channel); `channels` is the default of
    data.channels."""
    name: str
    description: str
    sources: Builder
    check: Optional[Builder] = None
    channels: int = 3
    fixed: Mapping[str, int] = field(default_factory=dict)
    arrays: Optional[Builder] = None     # in memory: (data_cfg, seed) -> data.arrays.RawArrays
    # image files on disk, read by DALI's file reader: (data_cfg, train, check, threads) -> a
    # data.imagefolder listing (files, labels, classes, skipped, root)
    files: Optional[Builder] = None


DATA_KINDS: "Registry[DataKindInfo]" = Registry("data kind", "data.kind")


def register_data_kind(info: DataKindInfo, *, replace: bool = False) -> DataKindInfo:
    return DATA_KINDS.register(info, replace=replace)


register_data_kind(DataKindInfo(
    "fashion_mnist", "Fashion-MNIST from Debian's package (or data.path), held in memory",
    "hvdscale.data:array_sources", "hvdscale.data:check_fashion_mnist", channels=1,
    fixed={"image_size": 28, "num_classes": 10, "channels": 1},
    arrays="hvdscale.data.fashion_mnist:load_raw"))
register_data_kind(DataKindInfo(
    "synthetic", "random images and labels (throughput tests; nothing to learn)",
    "hvdscale.data:array_sources", arrays="hvdscale.data.synthetic:load_raw"))
register_data_kind(DataKindInfo(
    "imagefolder", "ImageNet-layout folders (data.path/train, data.path/val) through DALI",
    "hvdscale.data:dali_sources", "hvdscale.data:check_dali",
    files="hvdscale.data.dali.inputs:list_split"))


# ------------------------------------------------------------------------------ launchers
@dataclass(frozen=True)
class LauncherInfo:
    """One way to start workers. `command(layout, plan, env) -> argv` (hvdscale/launch/argv.py);
    `plan(layout, env) -> Plan` (hvdscale/launch/plan.py); `missing`: what to do when its
    executable is not on PATH (`hvdscale launch` says it)."""
    name: str
    description: str
    command: Builder
    plan: Builder = "hvdscale.launch.plan:plan_hosts"
    missing: str = "install it"


LAUNCHERS: "Registry[LauncherInfo]" = Registry("launcher", "--launcher")


def register_launcher(info: LauncherInfo, *, replace: bool = False) -> LauncherInfo:
    return LAUNCHERS.register(info, replace=replace)


register_launcher(LauncherInfo("horovodrun", "Horovod's launcher (Gloo or MPI; elastic jobs)",
                               "hvdscale.launch.argv:horovodrun_command",
                               missing="install Horovod (launchers/install.sh)"))
register_launcher(LauncherInfo("mpirun", "OpenMPI's mpirun (-bind-to none, -x forwarding)",
                               "hvdscale.launch.argv:mpirun_command",
                               missing="install OpenMPI (launchers/install.sh does)"))
register_launcher(LauncherInfo("srun", "SLURM's srun inside an allocation (PMIx/PMI2)",
                               "hvdscale.launch.argv:srun_command",
                               "hvdscale.launch.plan:plan_srun",
                               missing="run inside a SLURM allocation (sbatch/salloc)"))


# ------------------------------------------------------------------------------ entry points
def is_entry_point(text: Any) -> bool:
    """True for "package.module:factory" (a user's own model or data factory)."""
    return isinstance(text, str) and bool(_ENTRY_POINT.match(text))


def check_entry_point(text: str, setting: str) -> None:
    """Cheap check for config validation: the module can be found (not executed)."""
    module = text.partition(":")[0]
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError) as err:
        raise ConfigError(f"{setting} {text!r}: cannot import {module} "
                          f"({type(err).__name__}: {err})") from None
    if found is None:
        raise ConfigError(f"{setting} {text!r}: no module named {module!r} "
                          "(is its directory on PYTHONPATH?)")


def load_entry_point(text: str, setting: str) -> Callable[..., Any]:
    """Import "package.module:factory" and return the factory; ConfigError naming the entry
    point when it cannot be imported or is not callable."""
    if not is_entry_point(text):
        raise ConfigError(f"{setting} {text!r}: expected package.module:factory")
    module, _, attr = text.partition(":")
    try:
        target = importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - any failure inside the user's module
        first = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError(f"{setting} {text!r}: cannot import {module} "
                          f"({type(err).__name__}: {first})") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{setting} {text!r}: {module} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{setting} {text!r}: {attr} is a {type(target).__name__}, "
                          "not a callable factory")
    return target


def call_factory(factory: Callable[..., Any], cfg: Any, where: str) -> Any:
    """factory(cfg); an exception inside the user's factory becomes one ConfigError line."""
    try:
        return factory(cfg)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure inside the user's factory
        first = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError(f"{where}: the factory failed ({type(err).__name__}: {first})") \
            from None


def build_callbacks(cfg: Any) -> list:
    """The recipe's `callbacks` entries, each factory(cfg) -> a Callback (checked)."""
    from hvdscale.engine.callbacks import Callback
    out = []
    for entry in cfg.callbacks:
        made = call_factory(load_entry_point(entry, "callbacks"), cfg, f"callbacks {entry!r}")
        if not isinstance(made, Callback):
            raise ConfigError(f"callbacks {entry!r}: the factory returned a "
                              f"{type(made).__name__}, not a hvdscale.engine.callbacks.Callback")
        out.append(made)
    return out


def load_plugins(modules: Iterable[str], setting: str = "plugins") -> None:
    """Import the recipe's `plugins` modules: each registers its entries on import."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - any failure inside the plugin
            first = str(err).splitlines()[0] if str(err) else ""
            raise ConfigError(f"{setting}: cannot import {module!r} "
                              f"({type(err).__name__}: {first})") from None


def help_text() -> str:
    """What `hvdscale train --help` lists after the options: the registered names."""
    lines = ["optimizers (optimizer.name; options with their defaults):"]
    for info in OPTIMIZERS:
        opts = ", ".join(f"{k}={_show(v)}" for k, v in info.defaults.items())
        lines.append(f"  {info.name:<10} {info.description}")
        lines.append(f"  {'':<10} {opts}")
    lines.append("models (model.name, or package.module:factory):")
    lines += [f"  {m.name:<10} {m.description}" for m in MODELS]
    lines.append("data kinds (data.kind, or package.module:factory):")
    lines += [f"  {d.name:<14} {d.description}" for d in DATA_KINDS]
    return "\n".join(lines)


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(f"{v:g}" for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------ backends
@dataclass(frozen=True)
class BackendInfo:
    """One framework hvdscale trains with; the recipe's `framework` names it. A backend's own
    package registers it on import (hvdscale/torch/__init__.py), and nothing outside that
    package branches on its name (docs/extending.md, "A new backend"). Strings are
    "package.module:attr" (or a module for `collectives`), imported only when used, so
    reading the registry never loads a framework.

    trainer(cfg, comm, threads, model_fn=None) -> the engine's Backend
        (hvdscale/engine/backend.py);
    module: the framework's own Python module (`hvdscale doctor` reports its version);
    load: how to import the framework the first time (TensorFlow: without its C++ start-up
        chatter), called before Horovod's module is imported;
    horovod: Horovod's module for the framework ("horovod.torch"), None = no Horovod;
    collectives: a module with host_allreduce(hvd, array, op, name) -> ndarray and
        host_allreduce_async(hvd, array, op, name) -> fetch() | None, what hvdscale.comm
        reduces NumPy values with;
    lr_name / option_names: the framework's keywords (recipe key -> native names where they
        differ: Keras `betas` -> `beta_1`, `beta_2`);
    optimizers / models: builders of the built-in optimizers and models this backend has;
    model_check(model, cfg, where): checks a user's factory model (type, logits shape);
    elastic_groups: grouped gradient allreduce allowed in elastic runs;
    study: the critical-batch study's in-process runs support this backend;
    dali: its hvdscale.data.dali.DaliOutput (what DALI's output becomes for it), None = this
        backend cannot read data kinds through DALI.
    """
    name: str
    description: str
    trainer: Builder
    display: str
    lr_name: str
    module: str = ""
    load: Optional[Builder] = None
    horovod: Optional[str] = None
    collectives: Optional[str] = None
    option_names: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)
    optimizers: Mapping[str, Builder] = field(default_factory=dict)
    models: Mapping[str, Builder] = field(default_factory=dict)
    model_check: Optional[Builder] = None
    elastic_groups: bool = True
    study: bool = False
    dali: Optional[Builder] = None

    def native_names(self, key: str) -> Tuple[str, ...]:
        """This framework's keyword(s) for a recipe's optimizer option."""
        if key in self.option_names:
            return tuple(self.option_names[key])
        spec = core_optimizers.OPTIONS.get(key)
        return tuple(spec.native.get(self.name, (key,))) if spec is not None else (key,)

    def native_kwargs(self, values: Mapping[str, Any]) -> Dict[str, Any]:
        """Option values under this framework's keywords (a pair may split in two)."""
        out: Dict[str, Any] = {}
        for key, value in values.items():
            names = self.native_names(key)
            if len(names) == 1:
                out[names[0]] = value
            else:
                out.update(zip(names, value))
        return out

    def build_trainer(self, cfg: Any, comm: Any, threads: int, model_fn=None) -> Any:
        return resolve(self.trainer)(cfg, comm, threads, model_fn=model_fn)


BACKENDS: "Registry[BackendInfo]" = Registry("backend", "framework")


def register_backend(info: BackendInfo, *, replace: bool = False) -> BackendInfo:
    """Register a framework, and its builders of the built-in optimizers and models."""
    for name in info.optimizers:
        OPTIMIZERS.get(name)                # a typo fails here, not at training time
    for name in info.models:
        MODELS.get(name)
    BACKENDS.register(info, replace=replace)
    for name, builder in info.optimizers.items():
        OPTIMIZERS.get(name).builders[info.name] = builder
    for name, builder in info.models.items():
        MODELS.get(name).builders[info.name] = builder
    return info


# The built-in backends: each package's register() (light: no framework import) holds its
# registration; a third-party backend calls register_backend from a `plugins` module.
for _package in ("hvdscale.torch", "hvdscale.tensorflow"):
    importlib.import_module(_package).register()

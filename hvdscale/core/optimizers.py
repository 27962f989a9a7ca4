"""The optimizers' settings, written once for every backend: each option's recipe key, its
check, and every built-in optimizer's defaults.

A recipe says `optimizer.eps`; torch calls it `eps` and Keras `epsilon`: each backend names its
own keywords where they differ (hvdscale.registry.BackendInfo.option_names), its factory
translates through them, and the docs table (docs/extending.md) is generated from both, so
they cannot disagree. Plain Python: config validation reads it before any framework is
imported.
"""
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from hvdscale.errors import ConfigError, shown

FLOAT32_MAX = 3.4028234663852886e38     # optimizer state and updates are float32 at least


@dataclass(frozen=True)
class OptionSpec:
    """One optimizer option. `kind`: float | bool | "pair_float". The built-in options'
    keywords in each framework are in the backends' registrations
    (hvdscale.registry.BackendInfo.option_names); a plugin's own option may name its keyword(s)
    per backend in `native` ({"tensorflow": ("power",)}); otherwise the recipe key is used."""
    key: str
    kind: Any
    help: str
    check: Optional[Callable[[Any], bool]] = None
    why: str = ""
    nullable: bool = False
    native: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)

    def validate(self, value: Any, where: str) -> Any:
        """The value in its canonical type, or a ConfigError naming `where`."""
        if value is None:
            if self.nullable:
                return None
            raise ConfigError(f"{where}: must not be null")
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: expected true or false, got {shown(value)}")
            out = value
        elif self.kind == "pair_float":
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise ConfigError(f"{where}: expected two numbers, got {shown(value)}")
            out = tuple(_number(v, where) for v in value)
        else:
            out = _number(value, where)
        if self.check is not None and not self.check(out):
            raise ConfigError(f"{where}: {self.why}, got {_show(out)}")
        return out


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {shown(value)}")
    if abs(value) > FLOAT32_MAX:
        raise ConfigError(f"{where}: {value:g} overflows float32, the training's number type "
                          f"(largest {FLOAT32_MAX:.4g})")
    return float(value)


def _show(value: Any) -> str:
    return shown(list(value) if isinstance(value, tuple) else value)


def _positive(v):
    return v > 0


def _non_negative(v):
    return v >= 0


def _fraction(v):            # [0, 1)
    return 0 <= v < 1


OPTIONS: Dict[str, OptionSpec] = {spec.key: spec for spec in (
    OptionSpec("momentum", float, "momentum factor", _fraction, "must be in [0, 1)"),
    OptionSpec("nesterov", bool, "Nesterov momentum"),
    OptionSpec("betas", "pair_float", "decay rates of the first and second moment estimates",
               lambda v: all(0 <= b < 1 for b in v), "must be two numbers in [0, 1)"),
    OptionSpec("eps", float, "added to the denominator for numerical stability", _positive,
               "must be > 0"),
    OptionSpec("weight_decay", float, "weight decay: sgd/lars add wd*w to the gradient (L2), "
               "lamb to the update before the trust ratio, sgdw/adamw decay w directly "
               "(decoupled)",
               _non_negative, "must be >= 0"),
    OptionSpec("trust_coefficient", float, "LARS trust coefficient (eta)", _positive,
               "must be > 0"),
    OptionSpec("bias_correction", bool, "LAMB: correct the moment estimates' bias"),
    OptionSpec("clamp_value", float, "LAMB: clamp ||w|| at this value in the trust ratio "
               "(null: no clamp)", _positive, "must be > 0", nullable=True),
    OptionSpec("max_trust_ratio", float, "LAMB: upper bound of the trust ratio (null: none)",
               _positive, "must be > 0", nullable=True),
)}

# The one set of defaults. Each optimizer takes exactly the options listed for it; the
# frameworks' own defaults (e.g. Keras AdamW epsilon 1e-7, weight_decay 0.004) are never used.
DEFAULTS: Dict[str, Dict[str, Any]] = {
    "sgd": {"momentum": 0.9, "nesterov": False, "weight_decay": 0.0},
    "sgdw": {"momentum": 0.9, "nesterov": False, "weight_decay": 0.0},
    "lars": {"momentum": 0.9, "weight_decay": 0.0, "trust_coefficient": 0.001, "eps": 1e-8},
    "lamb": {"betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01, "bias_correction": True,
             "clamp_value": None, "max_trust_ratio": None},
    "adamw": {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01},
}


def register_option(spec: OptionSpec) -> OptionSpec:
    """Add an option a new optimizer needs (docs/extending.md); recipes may then set it."""
    known = OPTIONS.get(spec.key)
    if known is not None and known != spec:
        raise ValueError(f"optimizer option {spec.key!r} is already registered differently")
    OPTIONS[spec.key] = spec
    return spec


def resolve_options(name: str, defaults: Mapping[str, Any], given: Callable[[str], Any],
                    prefix: str = "optimizer") -> Dict[str, Any]:
    """The value of every option optimizer `name` takes: `given(key)` when not None, else the
    default; each one checked, errors naming `prefix.key`."""
    values = {}
    for key, default in defaults.items():
        spec = OPTIONS.get(key)
        if spec is None:
            raise ValueError(f"optimizer {name!r} has an option {key!r} that is not registered")
        value = given(key)
        values[key] = spec.validate(default if value is None else value, f"{prefix}.{key}")
    return values

"""Honest resume: what changed between the checkpoint's recipe and this run's.

Every checkpoint sidecar carries the full recipe (`Config.to_dict()`, key "config"). On
--resume each setting that differs is either

- applied: everything the run builds from the recipe after the checkpoint is loaded (the LR
  schedule is recomputed from lr.*, optimizer.base_lr, batch.reference and train.*; the
  optimizer's hyper-parameters are set from the recipe after its state is loaded, by the
  backend's `apply_optimizer_settings()`, because an optimizer's state dict would otherwise
  bring the old ones back), and listed in one line:
  "resumed with changed settings: optimizer.weight_decay 0.01 -> 0.05, ..."; or
- refused in one line, before anything is loaded, where the checkpoint cannot honour it (its
  state or its data position was made for the old value).

Framework-neutral: nothing here looks at a framework's objects.
"""
import json
from typing import Any, Dict, List, Mapping, Optional, Tuple

from hvdscale.errors import ConfigError

CONFIG_KEY = "config"        # the recipe in the checkpoint sidecar

# setting (or section prefix ending in ".") -> why a resumed run cannot take a new value
REFUSED: Dict[str, str] = {
    "framework": "the state is in the other framework's format",
    "model.name": "the weights belong to that model",
    "model.zero_init_residual": "it shapes only the initial weights, which the checkpoint "
                                "replaces",
    "optimizer.name": "the optimizer state of one family does not fit another",
    "optimizer.exclude_1d": "it decides which parameters' optimizer state is kept how",
    "optimizer.exclude": "it decides which parameters' optimizer state is kept how",
    "data.kind": "the weights and the data position belong to that data",
    "data.image_size": "the weights and the data position belong to that data",
    "data.num_classes": "the weights and the data position belong to that data",
    "data.channels": "the weights and the data position belong to that data",
    "data.train_limit": "the data position counts in that training set",
    "train.seed": "the data position counts in that seed's order of the examples",
}
SHOWN = 40       # characters of a value in a message, at most


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"optimizer": {"betas": [..]}} -> {"optimizer.betas": [..]} (lists stay values)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _normal(tree: Mapping[str, Any]) -> Dict[str, Any]:
    # what a JSON sidecar gives back: tuples become lists, keys strings
    return flatten(json.loads(json.dumps(tree)))


def show(value: Any) -> str:
    """A value for a one-line message, cut to a short prefix."""
    text = f"{value:g}" if isinstance(value, float) else json.dumps(value)
    return text if len(text) <= SHOWN else text[:SHOWN - 3] + "..."


def differences(saved: Mapping[str, Any],
                current: Mapping[str, Any]) -> List[Tuple[str, Any, Any]]:
    """(setting, checkpoint's value, this run's value) for every setting both recipes have
    and that differs, in the recipe's order."""
    old, new = _normal(saved), _normal(current)
    return [(key, old[key], value) for key, value in new.items()
            if key in old and old[key] != value]


def check_resume(meta: Mapping[str, Any], current: Mapping[str, Any]) -> Optional[str]:
    """Refuse (ConfigError, setting "checkpoint") what a resume from the checkpoint `meta`
    cannot honour; return the one line listing what it applies, or None when nothing
    differs (or the checkpoint predates recipes in sidecars)."""
    saved = meta.get(CONFIG_KEY)
    if not isinstance(saved, Mapping):
        return None
    changed = differences(saved, current)
    refused = [(key, old, new) for key, old, new in changed if key in REFUSED]
    if refused:
        key, old, new = refused[0]
        more = f" (and {', '.join(k for k, _, _ in refused[1:])})" if refused[1:] else ""
        raise ConfigError(f"checkpoint step {meta.get('step')} was written with {key} "
                          f"{show(old)}, this run has {show(new)}{more}: it cannot change "
                          f"on resume ({REFUSED[key]}); use the checkpoint's value or start "
                          f"a new run in another --out", setting="checkpoint")
    if not changed:
        return None
    return "resumed with changed settings: " + ", ".join(
        f"{key} {show(old)} -> {show(new)}" for key, old, new in changed)

"""Which parameters skip weight decay and the layer-wise trust ratio.

Biases and normalisation scales/offsets are 1-D; decaying them or rescaling their step by
||w|| / ||update|| hurts large-batch training (You et al. 2017/2019, Goyal et al. 2017), so by
default every tensor with ndim <= 1 is excluded. Name patterns (Python regexes, matched with
re.search against the parameter's name: torch `named_parameters()` names, Keras variable paths)
exclude further tensors. One rule, used by both backends.
"""
import re
from typing import Iterable, List, Sequence, Tuple, Union

from hvdscale.errors import ConfigError


class ExclusionRule:
    """`rule(name, ndim)` is True when the parameter is excluded."""

    def __init__(self, exclude_1d: bool = True, patterns: Union[str, Sequence[str]] = ()):
        if isinstance(patterns, str):
            patterns = [patterns]
        self.exclude_1d = bool(exclude_1d)
        self.patterns = tuple(patterns or ())
        self._compiled = []
        for p in self.patterns:
            if not isinstance(p, str):
                raise ConfigError(f"exclude patterns must be strings (regexes), got {p!r}")
            try:
                self._compiled.append(re.compile(p))
            except re.error as err:
                raise ConfigError(f"bad exclude pattern {p!r}: {err}") from None

    @property
    def needs_names(self):
        return bool(self._compiled)

    def __call__(self, name, ndim):
        if self.exclude_1d and ndim <= 1:
            return True
        if self._compiled:
            if name is None:
                raise ConfigError("exclude patterns need parameter names: pass named parameters "
                                  "(e.g. model.named_parameters()) or the model")
            return any(c.search(name) for c in self._compiled)
        return False

    def __repr__(self):
        return f"ExclusionRule(exclude_1d={self.exclude_1d}, patterns={list(self.patterns)})"


def excluded_names(named_shapes: Iterable[Tuple[str, Sequence[int]]], *, exclude_1d: bool = True,
                   patterns: Sequence[str] = ()) -> List[str]:
    """The names among (name, shape) pairs that the rule excludes, in input order."""
    rule = ExclusionRule(exclude_1d, patterns)
    return [name for name, shape in named_shapes if rule(name, len(tuple(shape)))]

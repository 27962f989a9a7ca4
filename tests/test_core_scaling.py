"""hvdscale.core.scaling: global batch and the lr scaling rules."""
import math

import pytest

from hvdscale.core import global_batch, scale_lr
from hvdscale.errors import ConfigError


def test_global_batch_counts_workers_batch_and_accumulation():
    assert global_batch(4, 128) == 512
    assert global_batch(2, 64, accumulation=8) == 1024


@pytest.mark.parametrize("args", [(0, 128), (2, 0), (2, 64, 0), (2.5, 64), (True, 64), (2, "64")])
def test_global_batch_rejects_non_positive_or_non_integers(args):
    with pytest.raises(ConfigError):
        global_batch(*args)


def test_linear_rule_multiplies_by_k():
    # Goyal et al.: 0.1 at 256 -> 3.2 at 8192 (k = 32)
    assert scale_lr(0.1, 256, 8192, "linear") == pytest.approx(3.2, rel=1e-12)


def test_sqrt_rule_multiplies_by_root_k():
    assert scale_lr(0.002, 128, 512, "sqrt") == pytest.approx(0.004, rel=1e-12)
    assert scale_lr(1.0, 100, 200, "sqrt") == pytest.approx(math.sqrt(2), rel=1e-12)


def test_rules_agree_at_reference_batch_and_none_never_scales():
    for rule in ("linear", "sqrt", "none"):
        assert scale_lr(0.05, 256, 256, rule) == 0.05
    assert scale_lr(0.05, 256, 4096, "none") == 0.05


def test_smaller_global_batch_scales_down():
    assert scale_lr(0.4, 1024, 256, "linear") == pytest.approx(0.1)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(rule="cubic"), "unknown learning-rate scaling rule 'cubic'"),
    (dict(base_lr=0.0), "base learning rate"),
    (dict(base_lr=float("nan")), "base learning rate"),
    (dict(reference_batch=0), "reference batch"),
    (dict(global_batch=-4), "global batch"),
])
def test_bad_input_is_a_config_error_naming_the_problem(kwargs, needle):
    args = dict(base_lr=0.1, reference_batch=256, global_batch=512, rule="linear")
    args.update(kwargs)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        scale_lr(**args)


def test_micro_batch_sizes_are_numpy_array_splits():
    import numpy as np
    from hvdscale.core.scaling import micro_batch_sizes
    for n in (1, 7, 32, 33, 100):
        for pieces in (1, 2, 3, 4, 7):
            if pieces <= n:
                want = [len(part) for part in np.array_split(np.arange(n), pieces)]
                assert micro_batch_sizes(n, pieces) == want

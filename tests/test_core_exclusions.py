"""hvdscale.core.exclusions: the one rule for weight decay / trust ratio exclusion."""
import pytest

from hvdscale.core import ExclusionRule, excluded_names
from hvdscale.errors import ConfigError

SHAPES = [("conv1.weight", (64, 3, 7, 7)), ("bn1.weight", (64,)), ("bn1.bias", (64,)),
          ("fc.weight", (10, 512)), ("fc.bias", (10,)), ("embed.pos", (1, 16, 32)), ("scale", ())]


def test_default_excludes_one_dimensional_and_scalar_tensors():
    assert excluded_names(SHAPES) == ["bn1.weight", "bn1.bias", "fc.bias", "scale"]


def test_patterns_add_exclusions_by_name():
    assert excluded_names(SHAPES, patterns=[r"^embed\."]) == \
        ["bn1.weight", "bn1.bias", "fc.bias", "embed.pos", "scale"]


def test_exclude_1d_off_keeps_only_pattern_matches():
    assert excluded_names(SHAPES, exclude_1d=False, patterns=["bias"]) == ["bn1.bias", "fc.bias"]
    assert excluded_names(SHAPES, exclude_1d=False) == []


def test_keras_style_paths_match_the_same_way():
    paths = [("sequential/dense/kernel", (4, 3)), ("sequential/batch_normalization/gamma", (3,)),
             ("sequential/dense/bias", (3,))]
    assert excluded_names(paths, exclude_1d=False, patterns=["batch_norm", "bias$"]) == \
        ["sequential/batch_normalization/gamma", "sequential/dense/bias"]


def test_bad_regex_and_missing_names_are_config_errors():
    with pytest.raises(ConfigError, match=r"bad exclude pattern '\(unclosed'"):
        ExclusionRule(True, ["(unclosed"])
    with pytest.raises(ConfigError, match="need parameter names"):
        ExclusionRule(True, ["bias"])(None, 2)
    # without patterns a nameless 2-D tensor is fine
    assert ExclusionRule(True)(None, 2) is False

"""The framework-neutral architecture tables in hvdscale.core.model_zoo."""
import subprocess
import sys
from pathlib import Path

import pytest

from hvdscale.core import model_zoo as zoo
from hvdscale.errors import ConfigError


def test_resnet50_has_the_published_parameter_count():
    # torchvision's resnet50 (v1 and v1.5 share it): 25,557,032 for 1000 classes.
    assert zoo.param_count("resnet50", 1000, 3, 224) == 25_557_032


def test_resnet20_matches_the_option_a_reference_count():
    # He et al. 2016 list ResNet-20 as 0.27M; the option-A PyTorch reference
    # (akamaster/pytorch_resnet_cifar10) prints 269,722 including BN and the fc bias.
    assert zoo.param_count("resnet20", 10, 3, 32) == 269_722


def test_depths_follow_6n_plus_2():
    for name, n in (("resnet8", 1), ("resnet20", 3)):
        spec = zoo.SPECS[name]
        convs = 1 + 2 * len(zoo.cifar_stage_plan(spec))
        assert spec.blocks_per_stage == n
        assert convs + 1 == 6 * n + 2   # + the classifier


def test_cnn_count_depends_on_image_size_and_channels_only_through_its_layers():
    base = zoo.param_count("cnn", 10, 1, 28)
    assert 100_000 <= base <= 400_000
    spec = zoo.SPECS["cnn"]
    # 32x32x3: the first conv sees 3 channels, the dense layer an 8x8 map instead of 7x7.
    grown = zoo.param_count("cnn", 10, 3, 32)
    extra_conv = 3 * 3 * 2 * spec.widths[0]
    extra_dense = (8 * 8 - 7 * 7) * spec.widths[-1] * spec.hidden
    assert grown - base == extra_conv + extra_dense


def test_resnet50_v15_puts_the_stride_on_the_first_block_of_stages_2_to_4():
    plan = zoo.bottleneck_stage_plan(zoo.SPECS["resnet50"])
    assert len(plan) == 16
    strided = [(stage, block) for stage, block, _, _, stride in plan if stride == 2]
    assert strided == [(1, 0), (2, 0), (3, 0)]


@pytest.mark.parametrize("args, fragment", [
    (("resnet18", 10, 3, 32), "unknown model 'resnet18'"),
    (("cnn", 0, 1, 28), "num_classes"),
    (("cnn", 10, 1.5, 28), "in_channels"),
    (("cnn", 10, 1, True), "image_size"),
    (("cnn", 10, 1, 3), "image_size >= 4"),
])
def test_bad_model_arguments_are_config_errors(args, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        zoo.check_model_args(*args)


def test_the_tables_load_no_framework():
    code = ("import sys, hvdscale.core.model_zoo; "
            "print(sorted(m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    assert out == "[]"

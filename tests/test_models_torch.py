"""PyTorch model zoo: shapes, parameter counts, initialisation, zero-init residual blocks."""
import math

import pytest

torch = pytest.importorskip("torch")

from hvdscale.core import model_zoo as zoo  # noqa: E402
from hvdscale.errors import ConfigError  # noqa: E402
from hvdscale.torch.models import build_model, residual_blocks  # noqa: E402

torch.set_num_threads(1)

SMALL = [  # (name, classes, channels, size)
    ("cnn", 10, 1, 28), ("cnn", 7, 3, 33),
    ("resnet8", 10, 3, 32), ("resnet8", 5, 1, 28),
    ("resnet20", 10, 3, 32), ("resnet20", 100, 3, 17),
    ("mlp", 10, 1, 28), ("mlp4", 10, 1, 28),
]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


_BUILT = {}


def built(name, zero_init_residual=True):
    """Each test model is built once per session: ResNet-50 takes seconds to initialise."""
    key = (name, zero_init_residual)
    if key not in _BUILT:
        torch.manual_seed(3)
        _BUILT[key] = build_model(name, 10, 3, 32, zero_init_residual=zero_init_residual)
    return _BUILT[key]


@pytest.mark.parametrize("name, classes, channels, size", SMALL)
def test_small_models_give_logits_of_the_right_shape_and_count(name, classes, channels, size):
    torch.manual_seed(0)
    model = build_model(name, classes, channels, size)
    out = model(torch.randn(3, channels, size, size))
    assert out.shape == (3, classes)
    assert torch.isfinite(out).all()
    assert n_params(model) == zoo.param_count(name, classes, channels, size)


def test_resnet50_count_and_one_small_forward():
    model = build_model("resnet50", 1000, 3, 224)
    assert n_params(model) == 25_557_032
    assert n_params(built("resnet50")) == zoo.param_count("resnet50", 10, 3, 32)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1000)


def test_resnet50_strides_on_the_3x3_conv():
    model = built("resnet50")
    first_of_stage2 = model.layer2_0
    assert first_of_stage2.conv1.stride == (1, 1)
    assert first_of_stage2.conv2.stride == (2, 2)
    assert first_of_stage2.shortcut_conv.stride == (2, 2)


def test_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown model 'vgg16'"):
        build_model("vgg16", 10, 3, 32)


@pytest.mark.parametrize("name", ["resnet8", "resnet20", "resnet50"])
def test_zero_init_zeroes_only_the_last_bn_gamma_of_each_block(name):
    model = built(name)
    blocks = residual_blocks(model)
    assert len(blocks) == {"resnet8": 3, "resnet20": 9, "resnet50": 16}[name]
    last = {id(b.last_bn) for b in blocks}
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            expected = 0.0 if id(module) in last else 1.0
            assert torch.all(module.weight == expected)
            assert torch.all(module.bias == 0.0)
    plain = built(name, zero_init_residual=False)
    assert all(torch.all(b.last_bn.weight == 1.0) for b in residual_blocks(plain))


@pytest.mark.parametrize("name", ["resnet8", "resnet50"])
@pytest.mark.parametrize("training", [True, False])
def test_zero_init_blocks_pass_the_shortcut_through(name, training):
    torch.manual_seed(1)
    model = built(name).train(training)
    for block in residual_blocks(model):
        cin = block.conv1.in_channels
        x = torch.rand(2, cin, 8, 8)      # non-negative, like the ReLU output feeding a block
        with torch.no_grad():
            assert torch.all(block.residual(x) == 0)
            shortcut = block.shortcut(x)
            torch.testing.assert_close(block(x), torch.relu(shortcut), rtol=0, atol=0)
            if shortcut.shape == x.shape and not getattr(block, "has_projection", False):
                torch.testing.assert_close(block(x), x, rtol=0, atol=0)   # exact identity
    # Without zero-init the residual branch is live, so the checks above can fail.
    live = built(name, zero_init_residual=False).train(training)
    block = residual_blocks(live)[0]
    with torch.no_grad():
        assert block.residual(torch.rand(2, block.conv1.in_channels, 8, 8)).abs().max() > 0.1


def test_option_a_shortcut_subsamples_and_zero_pads_channels():
    down = built("resnet8").layer2_0                       # 16 -> 32 channels, stride 2
    x = torch.rand(1, 16, 8, 8)
    s = down.shortcut(x)
    assert s.shape == (1, 32, 4, 4)
    torch.testing.assert_close(s[:, 8:24], x[:, :, ::2, ::2])
    assert torch.all(s[:, :8] == 0) and torch.all(s[:, 24:] == 0)


def test_initialisation_follows_he_fan_out_and_goyal_classifier():
    model = built("resnet20")
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            w = module.weight
            fan_out = w.shape[0] * w.shape[2] * w.shape[3]
            ratio = w.std().item() / math.sqrt(2.0 / fan_out)
            assert abs(ratio - 1) < 6 / math.sqrt(2 * w.numel()), (name, ratio)
    assert abs(model.fc.weight.std().item() / zoo.CLASSIFIER_INIT_STD - 1) < 0.2
    assert torch.all(model.fc.bias == 0)

"""The model zoo's architecture tables, written once for both frameworks.

hvdscale/torch/models.py and hvdscale/tensorflow/models.py build their networks from these
tables, so the two backends cannot drift apart; `param_count` is the analytic trainable-parameter
count that the tests hold both builds to. Plain Python: importing this never loads a framework,
so recipe validation can check a model name cheaply.
"""
from dataclasses import dataclass
from typing import Dict, Union

from hvdscale.errors import ConfigError

MODEL_NAMES = ("cnn", "resnet8", "resnet20", "resnet50", "mlp", "mlp4")

# BatchNorm as in PyTorch: running = (1 - momentum) * running + momentum * batch.
# (Keras counts momentum the other way round; its adapter passes 1 - BN_MOMENTUM.)
BN_MOMENTUM = 0.1
BN_EPSILON = 1e-5
# Goyal et al. (2017), sec. 5.1: the classifier starts from N(0, 0.01^2) with zero bias.
CLASSIFIER_INIT_STD = 0.01


@dataclass(frozen=True)
class CNNSpec:
    """Two conv blocks (3x3 conv, BN, ReLU, 2x2 max-pool), then a dense ReLU layer."""
    widths: tuple = (32, 64)
    hidden: int = 64


@dataclass(frozen=True)
class MLPSpec:
    """Flatten, `depth` ReLU dense layers of `hidden` units (fc1 ... fc<depth>), classifier:
    ~100x cheaper than the CNN on a CPU, which is what lets a critical-batch-size sweep
    (hvdscale sweep) finish in minutes. Depth > 1 gives layer-wise optimizers (LARS, LAMB)
    several hidden weight matrices of different scale to work with."""
    hidden: int = 128
    depth: int = 1


@dataclass(frozen=True)
class CifarResNetSpec:
    """He et al. (2016) sec. 4.2: 6n+2 layers, three stages of n basic blocks at 16/32/64
    channels, option-A (parameter-free) shortcuts when the shape changes."""
    blocks_per_stage: int
    widths: tuple = (16, 32, 64)


@dataclass(frozen=True)
class BottleneckResNetSpec:
    """ImageNet ResNet v1.5: 7x7/2 stem + 3x3/2 max-pool, bottleneck stages, stride on the
    3x3 conv of the first block of a stage, projection (1x1 conv + BN) shortcuts."""
    blocks_per_stage: tuple = (3, 4, 6, 3)
    widths: tuple = (64, 128, 256, 512)
    expansion: int = 4
    stem_width: int = 64


Spec = Union[CNNSpec, MLPSpec, CifarResNetSpec, BottleneckResNetSpec]

SPECS: Dict[str, Spec] = {
    "cnn": CNNSpec(),
    "resnet8": CifarResNetSpec(blocks_per_stage=1),
    "resnet20": CifarResNetSpec(blocks_per_stage=3),
    "resnet50": BottleneckResNetSpec(),
    "mlp": MLPSpec(),
    "mlp4": MLPSpec(hidden=128, depth=4),
}

# Smallest square input each model can run on (the CNN pools twice by 2).
MIN_IMAGE_SIZE = {"cnn": 4, "resnet8": 1, "resnet20": 1, "resnet50": 1, "mlp": 1, "mlp4": 1}


def _positive_int(value, what):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"model {what} must be a positive integer, got {value!r}")


def check_model_args(name: str, num_classes: int, in_channels: int, image_size: int) -> Spec:
    """Raise ConfigError, naming the problem, unless build_model can build this model."""
    if name not in SPECS:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    _positive_int(num_classes, "num_classes")
    _positive_int(in_channels, "in_channels")
    _positive_int(image_size, "image_size")
    if image_size < MIN_IMAGE_SIZE[name]:
        raise ConfigError(f"model {name!r} needs image_size >= {MIN_IMAGE_SIZE[name]}, "
                          f"got {image_size}")
    return SPECS[name]


def cnn_flat_features(spec: CNNSpec, image_size: int) -> int:
    """Features entering the CNN's dense layer: two floor-halving pools of the last conv map."""
    side = image_size // 2 // 2
    return side * side * spec.widths[-1]


def cifar_stage_plan(spec):
    """(in_channels, out_channels, stride) for every basic block, stage by stage."""
    plan, in_ch = [], spec.widths[0]
    for stage, width in enumerate(spec.widths):
        for block in range(spec.blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            plan.append((stage, block, in_ch, width, stride))
            in_ch = width
    return plan


def bottleneck_stage_plan(spec):
    """(stage, block, in_channels, width, stride) for every bottleneck block."""
    plan, in_ch = [], spec.stem_width
    for stage, (depth, width) in enumerate(zip(spec.blocks_per_stage, spec.widths)):
        for block in range(depth):
            stride = 2 if stage > 0 and block == 0 else 1
            plan.append((stage, block, in_ch, width, stride))
            in_ch = width * spec.expansion
    return plan


def block_name(stage: int, block: int) -> str:
    """Same name in both frameworks: torch module `layer1_0` is Keras layer `layer1_0`."""
    return f"layer{stage + 1}_{block}"


def _conv(k, cin, cout):
    return k * k * cin * cout


def _bn(c):
    return 2 * c


def _dense(fan_in, fan_out):
    return fan_in * fan_out + fan_out


def param_count(name: str, num_classes: int, in_channels: int, image_size: int) -> int:
    """Trainable parameters (BN gamma/beta included, running statistics not)."""
    spec = check_model_args(name, num_classes, in_channels, image_size)
    if isinstance(spec, MLPSpec):
        return (_dense(image_size * image_size * in_channels, spec.hidden)
                + (spec.depth - 1) * _dense(spec.hidden, spec.hidden)
                + _dense(spec.hidden, num_classes))
    if isinstance(spec, CNNSpec):
        (w1, w2) = spec.widths
        return (_conv(3, in_channels, w1) + _bn(w1) + _conv(3, w1, w2) + _bn(w2)
                + _dense(cnn_flat_features(spec, image_size), spec.hidden)
                + _dense(spec.hidden, num_classes))
    if isinstance(spec, CifarResNetSpec):
        total = _conv(3, in_channels, spec.widths[0]) + _bn(spec.widths[0])
        for _, _, cin, cout, _ in cifar_stage_plan(spec):
            total += _conv(3, cin, cout) + _bn(cout) + _conv(3, cout, cout) + _bn(cout)
        return total + _dense(spec.widths[-1], num_classes)
    total = _conv(7, in_channels, spec.stem_width) + _bn(spec.stem_width)
    for _, _, cin, width, stride in bottleneck_stage_plan(spec):
        cout = width * spec.expansion
        total += (_conv(1, cin, width) + _bn(width) + _conv(3, width, width) + _bn(width)
                  + _conv(1, width, cout) + _bn(cout))
        if stride != 1 or cin != cout:
            total += _conv(1, cin, cout) + _bn(cout)
    return total + _dense(spec.widths[-1] * spec.expansion, num_classes)

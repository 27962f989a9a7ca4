"""PyTorch builds of the model zoo (NCHW input): cnn, resnet8, resnet20, resnet50.

Architectures come from hvdscale.core.model_zoo, shared with the Keras builds. Module names
match the Keras layer names (`layer1_0.conv1.weight` <-> `layer1_0/conv1/kernel`), and the CNN
flattens in (H, W, C) order as Keras does, so weights move between frameworks by transposing
kernels only.
"""
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hvdscale.core import model_zoo as zoo
from hvdscale.errors import ConfigError

__all__ = ["build_model", "build_from_config", "check_model", "residual_blocks", "BasicBlock",
           "Bottleneck", "MODEL_NAMES"]

MODEL_NAMES = zoo.MODEL_NAMES


def _conv(cin, cout, kernel, stride=1):
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)


def _bn(channels):
    return nn.BatchNorm2d(channels, eps=zoo.BN_EPSILON, momentum=zoo.BN_MOMENTUM)


class BasicBlock(nn.Module):
    """CIFAR basic block with an option-A shortcut: subsample by the stride and zero-pad the
    new channels evenly on both sides (He et al. 2016), so the shortcut has no parameters."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = _conv(cin, cout, 3, stride)
        self.bn1 = _bn(cout)
        self.conv2 = _conv(cout, cout, 3)
        self.bn2 = _bn(cout)
        self.stride = stride
        self.pad_channels = cout - cin

    @property
    def last_bn(self):
        return self.bn2

    def residual(self, x):
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))

    def shortcut(self, x):
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.pad_channels:
            low = self.pad_channels // 2
            x = F.pad(x, (0, 0, 0, 0, low, self.pad_channels - low))
        return x

    def forward(self, x):
        return F.relu(self.residual(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: 1x1 reduce, 3x3 carrying the stride, 1x1 expand; a projection
    shortcut (1x1 conv with the stride + BN) when the shape changes."""

    def __init__(self, cin, width, stride, expansion):
        super().__init__()
        cout = width * expansion
        self.conv1 = _conv(cin, width, 1)
        self.bn1 = _bn(width)
        self.conv2 = _conv(width, width, 3, stride)
        self.bn2 = _bn(width)
        self.conv3 = _conv(width, cout, 1)
        self.bn3 = _bn(cout)
        self.has_projection = stride != 1 or cin != cout
        if self.has_projection:
            self.shortcut_conv = _conv(cin, cout, 1, stride)
            self.shortcut_bn = _bn(cout)

    @property
    def last_bn(self):
        return self.bn3

    def residual(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.conv3(x))

    def shortcut(self, x):
        if self.has_projection:
            return self.shortcut_bn(self.shortcut_conv(x))
        return x

    def forward(self, x):
        return F.relu(self.residual(x) + self.shortcut(x))


class CNN(nn.Module):
    def __init__(self, spec, num_classes, in_channels, image_size):
        super().__init__()
        w1, w2 = spec.widths
        self.conv1 = _conv(in_channels, w1, 3)
        self.bn1 = _bn(w1)
        self.conv2 = _conv(w1, w2, 3)
        self.bn2 = _bn(w2)
        self.fc1 = nn.Linear(zoo.cnn_flat_features(spec, image_size), spec.hidden)
        self.fc = nn.Linear(spec.hidden, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        # (H, W, C) order, as Keras' Flatten on NHWC, so the two builds share fc1's layout.
        x = torch.flatten(x.permute(0, 2, 3, 1), 1)
        return self.fc(F.relu(self.fc1(x)))


class MLP(nn.Module):
    def __init__(self, spec, num_classes, in_channels, image_size):
        super().__init__()
        self.depth = spec.depth
        self.fc1 = nn.Linear(image_size * image_size * in_channels, spec.hidden)
        for i in range(2, spec.depth + 1):
            setattr(self, f"fc{i}", nn.Linear(spec.hidden, spec.hidden))
        self.fc = nn.Linear(spec.hidden, num_classes)

    def forward(self, x):
        # (H, W, C) order, as Keras' Flatten on NHWC (see CNN.forward)
        x = torch.flatten(x.permute(0, 2, 3, 1), 1)
        for i in range(1, self.depth + 1):
            x = F.relu(getattr(self, f"fc{i}")(x))
        return self.fc(x)


class CifarResNet(nn.Module):
    def __init__(self, spec, num_classes, in_channels):
        super().__init__()
        self.conv1 = _conv(in_channels, spec.widths[0], 3)
        self.bn1 = _bn(spec.widths[0])
        self.block_names = []
        for stage, block, cin, cout, stride in zoo.cifar_stage_plan(spec):
            name = zoo.block_name(stage, block)
            self.add_module(name, BasicBlock(cin, cout, stride))
            self.block_names.append(name)
        self.fc = nn.Linear(spec.widths[-1], num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        for name in self.block_names:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class BottleneckResNet(nn.Module):
    def __init__(self, spec, num_classes, in_channels):
        super().__init__()
        self.conv1 = _conv(in_channels, spec.stem_width, 7, stride=2)
        self.bn1 = _bn(spec.stem_width)
        self.block_names = []
        for stage, block, cin, width, stride in zoo.bottleneck_stage_plan(spec):
            name = zoo.block_name(stage, block)
            self.add_module(name, Bottleneck(cin, width, stride, spec.expansion))
            self.block_names.append(name)
        self.fc = nn.Linear(spec.widths[-1] * spec.expansion, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 3, stride=2, padding=1)
        for name in self.block_names:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def residual_blocks(model):
    """The model's residual blocks in forward order (empty for the CNN)."""
    return [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]


def _initialize(model, zero_init_residual):
    """He-normal (fan_out) convs as in He et al.; He-normal (fan_in) hidden dense layers;
    the classifier `fc` from N(0, 0.01^2); BN gamma 1, beta 0; all biases 0."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if name == "fc":
                nn.init.normal_(module.weight, std=zoo.CLASSIFIER_INIT_STD)
            else:
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    if zero_init_residual:
        # Goyal et al. (2017): each block starts as the identity on its residual branch.
        for block in residual_blocks(model):
            nn.init.zeros_(block.last_bn.weight)


def build_model(name: str, num_classes: int, in_channels: int, image_size: int, *,
                zero_init_residual: bool = True) -> nn.Module:
    """An nn.Module taking float NCHW images [N, in_channels, image_size, image_size] and
    returning logits [N, num_classes]. Unknown names or bad sizes raise ConfigError."""
    spec = zoo.check_model_args(name, num_classes, in_channels, image_size)
    if isinstance(spec, zoo.MLPSpec):
        model = MLP(spec, num_classes, in_channels, image_size)
    elif isinstance(spec, zoo.CNNSpec):
        model = CNN(spec, num_classes, in_channels, image_size)
    elif isinstance(spec, zoo.CifarResNetSpec):
        model = CifarResNet(spec, num_classes, in_channels)
    else:
        model = BottleneckResNet(spec, num_classes, in_channels)
    _initialize(model, zero_init_residual)
    return model


def build_from_config(cfg: Any) -> nn.Module:
    """The zoo model the recipe names (the registry's torch builder for built-in models)."""
    return build_model(cfg.model.name, cfg.data.num_classes, cfg.in_channels,
                       cfg.data.image_size, zero_init_residual=cfg.model.zero_init_residual)


def check_model(model: Any, cfg: Any, where: str) -> nn.Module:
    """What a user's factory returned, checked: an nn.Module with trainable parameters whose
    output on a batch of the recipe's images [2, C, H, W] is logits [2, num_classes]."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{where}: returned {type(model).__name__}, expected a "
                          "torch.nn.Module (the recipe's framework is torch)")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"{where}: the model has no trainable parameters")
    shape = (2, cfg.in_channels, cfg.data.image_size, cfg.data.image_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(shape))
    except Exception as err:  # noqa: BLE001 - any failure of the user's forward pass
        first = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError(f"{where}: the model fails on images of shape {list(shape)} "
                          f"(NCHW from data.channels/data.image_size): "
                          f"{type(err).__name__}: {first}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, cfg.data.num_classes):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{where}: the model returns {got} for a batch of 2, expected "
                          f"logits [2, {cfg.data.num_classes}] (data.num_classes)")
    return model

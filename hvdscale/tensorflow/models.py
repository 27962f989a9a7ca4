"""Keras 3 builds of the model zoo (NHWC input): cnn, resnet8, resnet20, resnet50.

Same architectures, parameter counts and initialisation as hvdscale/torch/models.py, from the
shared tables in hvdscale.core.model_zoo. Layer names match the torch module names
(`layer1_0/conv1/kernel` <-> `layer1_0.conv1.weight`). Strided convolutions pad explicitly
(k // 2 on every side, as PyTorch does) rather than with 'same', which in TF pads only the
bottom/right for stride 2 and would sample different pixels than the torch build.
Everything is plain Keras layers and keras.ops, so the models run under tf.function and
Horovod's DistributedGradientTape.
"""
from typing import Any

import keras
from keras import layers, ops

from hvdscale.core import model_zoo as zoo
from hvdscale.errors import ConfigError

__all__ = ["build_model", "build_from_config", "check_model", "residual_blocks", "BasicBlock",
           "Bottleneck", "MODEL_NAMES"]

MODEL_NAMES = zoo.MODEL_NAMES

# He et al.: normal with std sqrt(2 / fan_out) for convs (fan_out = k*k*out, as in torch).
_CONV_INIT = {"class_name": "VarianceScaling",
              "config": {"scale": 2.0, "mode": "fan_out", "distribution": "untruncated_normal"}}
_HIDDEN_DENSE_INIT = {"class_name": "VarianceScaling",
                      "config": {"scale": 2.0, "mode": "fan_in",
                                 "distribution": "untruncated_normal"}}


def _conv(filters, kernel, stride=1, name=None):
    # Stride 1 with an odd kernel: 'same' pads k // 2 on each side, exactly like torch.
    padding = "same" if stride == 1 else "valid"
    return layers.Conv2D(filters, kernel, strides=stride, padding=padding, use_bias=False,
                         kernel_initializer=keras.initializers.get(_CONV_INIT), name=name)


def _pad_for(kernel, stride, name):
    """The explicit symmetric padding a strided conv needs to match torch (None if none)."""
    if stride == 1 or kernel == 1:
        return None
    return layers.ZeroPadding2D(kernel // 2, name=name)


def _bn(zero_gamma=False, name=None):
    return layers.BatchNormalization(
        momentum=1.0 - zoo.BN_MOMENTUM, epsilon=zoo.BN_EPSILON,
        gamma_initializer="zeros" if zero_gamma else "ones", name=name)


def _build_chain(chain, shape):
    """Build layers that run one after another from an input shape; returns the last shape.
    The blocks build their sublayers eagerly so that loading a saved model finds every
    variable in place."""
    for layer in chain:
        if layer is not None:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
    return shape


def _classifier(num_classes):
    return layers.Dense(num_classes, name="fc",
                        kernel_initializer=keras.initializers.RandomNormal(
                            stddev=zoo.CLASSIFIER_INIT_STD),
                        bias_initializer="zeros")


@keras.saving.register_keras_serializable(package="hvdscale")
class BasicBlock(layers.Layer):
    """CIFAR basic block with an option-A shortcut: subsample by the stride and zero-pad the
    new channels evenly on both sides (He et al. 2016), so the shortcut has no parameters."""

    def __init__(self, in_channels, out_channels, stride, zero_init_residual=True, **kwargs):
        super().__init__(**kwargs)
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.zero_init_residual = zero_init_residual
        self.pad1 = _pad_for(3, stride, "pad1")
        self.conv1 = _conv(out_channels, 3, stride, name="conv1")
        self.bn1 = _bn(name="bn1")
        self.conv2 = _conv(out_channels, 3, name="conv2")
        self.bn2 = _bn(zero_gamma=zero_init_residual, name="bn2")

    @property
    def last_bn(self):
        return self.bn2

    def build(self, input_shape):
        _build_chain([self.pad1, self.conv1, self.bn1, self.conv2, self.bn2], input_shape)
        super().build(input_shape)

    def compute_output_shape(self, input_shape):
        return self.conv1.compute_output_shape(
            self.pad1.compute_output_shape(input_shape) if self.pad1 is not None else input_shape)

    def residual(self, x, training=None):
        if self.pad1 is not None:
            x = self.pad1(x)
        x = ops.relu(self.bn1(self.conv1(x), training=training))
        return self.bn2(self.conv2(x), training=training)

    def shortcut(self, x, training=None):
        if self.stride != 1:
            x = x[:, ::self.stride, ::self.stride, :]
        extra = self.out_channels - self.in_channels
        if extra:
            x = ops.pad(x, [[0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]])
        return x

    def call(self, x, training=None):
        return ops.relu(self.residual(x, training) + self.shortcut(x, training))

    def get_config(self):
        return {**super().get_config(), "in_channels": self.in_channels,
                "out_channels": self.out_channels, "stride": self.stride,
                "zero_init_residual": self.zero_init_residual}


@keras.saving.register_keras_serializable(package="hvdscale")
class Bottleneck(layers.Layer):
    """ResNet v1.5 bottleneck: 1x1 reduce, 3x3 carrying the stride, 1x1 expand; a projection
    shortcut (1x1 conv with the stride + BN) when the shape changes."""

    def __init__(self, in_channels, width, stride, expansion, zero_init_residual=True,
                 **kwargs):
        super().__init__(**kwargs)
        self.in_channels, self.width, self.stride = in_channels, width, stride
        self.expansion, self.zero_init_residual = expansion, zero_init_residual
        out_channels = width * expansion
        self.conv1 = _conv(width, 1, name="conv1")
        self.bn1 = _bn(name="bn1")
        self.pad2 = _pad_for(3, stride, "pad2")
        self.conv2 = _conv(width, 3, stride, name="conv2")
        self.bn2 = _bn(name="bn2")
        self.conv3 = _conv(out_channels, 1, name="conv3")
        self.bn3 = _bn(zero_gamma=zero_init_residual, name="bn3")
        self.has_projection = stride != 1 or in_channels != out_channels
        if self.has_projection:
            self.shortcut_conv = _conv(out_channels, 1, stride, name="shortcut_conv")
            self.shortcut_bn = _bn(name="shortcut_bn")

    @property
    def last_bn(self):
        return self.bn3

    def build(self, input_shape):
        _build_chain([self.conv1, self.bn1, self.pad2, self.conv2, self.bn2, self.conv3,
                      self.bn3], input_shape)
        if self.has_projection:
            _build_chain([self.shortcut_conv, self.shortcut_bn], input_shape)
        super().build(input_shape)

    def compute_output_shape(self, input_shape):
        shape = self.conv1.compute_output_shape(input_shape)
        if self.pad2 is not None:
            shape = self.pad2.compute_output_shape(shape)
        return self.conv3.compute_output_shape(self.conv2.compute_output_shape(shape))

    def residual(self, x, training=None):
        x = ops.relu(self.bn1(self.conv1(x), training=training))
        if self.pad2 is not None:
            x = self.pad2(x)
        x = ops.relu(self.bn2(self.conv2(x), training=training))
        return self.bn3(self.conv3(x), training=training)

    def shortcut(self, x, training=None):
        if self.has_projection:
            return self.shortcut_bn(self.shortcut_conv(x), training=training)
        return x

    def call(self, x, training=None):
        return ops.relu(self.residual(x, training) + self.shortcut(x, training))

    def get_config(self):
        return {**super().get_config(), "in_channels": self.in_channels, "width": self.width,
                "stride": self.stride, "expansion": self.expansion,
                "zero_init_residual": self.zero_init_residual}


def _cnn(spec, num_classes, x):
    for i, width in enumerate(spec.widths, start=1):
        x = _conv(width, 3, name=f"conv{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(_bn(name=f"bn{i}")(x))
        x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(spec.hidden, activation="relu", name="fc1",
                     kernel_initializer=keras.initializers.get(_HIDDEN_DENSE_INIT),
                     bias_initializer="zeros")(x)
    return _classifier(num_classes)(x)


def _mlp(spec, num_classes, x):
    x = layers.Flatten(name="flatten")(x)
    for i in range(1, spec.depth + 1):
        x = layers.Dense(spec.hidden, activation="relu", name=f"fc{i}",
                         kernel_initializer=keras.initializers.get(_HIDDEN_DENSE_INIT),
                         bias_initializer="zeros")(x)
    return _classifier(num_classes)(x)


def _cifar_resnet(spec, num_classes, x, zero_init_residual):
    x = _conv(spec.widths[0], 3, name="conv1")(x)
    x = layers.ReLU(name="relu1")(_bn(name="bn1")(x))
    for stage, block, cin, cout, stride in zoo.cifar_stage_plan(spec):
        x = BasicBlock(cin, cout, stride, zero_init_residual,
                       name=zoo.block_name(stage, block))(x)
    x = layers.GlobalAveragePooling2D(name="avgpool")(x)
    return _classifier(num_classes)(x)


def _bottleneck_resnet(spec, num_classes, x, zero_init_residual):
    x = layers.ZeroPadding2D(3, name="conv1_pad")(x)
    x = _conv(spec.stem_width, 7, stride=2, name="conv1")(x)
    x = layers.ReLU(name="relu1")(_bn(name="bn1")(x))
    # Zero padding equals torch's -inf padding here: the input is post-ReLU, so >= 0.
    x = layers.ZeroPadding2D(1, name="maxpool_pad")(x)
    x = layers.MaxPooling2D(3, strides=2, name="maxpool")(x)
    for stage, block, cin, width, stride in zoo.bottleneck_stage_plan(spec):
        x = Bottleneck(cin, width, stride, spec.expansion, zero_init_residual,
                       name=zoo.block_name(stage, block))(x)
    x = layers.GlobalAveragePooling2D(name="avgpool")(x)
    return _classifier(num_classes)(x)


def residual_blocks(model):
    """The model's residual blocks in forward order (empty for the CNN)."""
    return [layer for layer in model.layers if isinstance(layer, (BasicBlock, Bottleneck))]


def build_model(name: str, num_classes: int, in_channels: int, image_size: int, *,
                zero_init_residual: bool = True) -> keras.Model:
    """A keras.Model taking float NHWC images [N, image_size, image_size, in_channels] and
    returning logits [N, num_classes]. Unknown names or bad sizes raise ConfigError.
    Initialisation matches the torch build: He-normal (fan_out) convs, He-normal (fan_in)
    hidden dense, classifier N(0, 0.01^2), BN gamma 1 / beta 0 (gamma 0 for the last BN of
    each residual block when zero_init_residual), zero biases."""
    spec = zoo.check_model_args(name, num_classes, in_channels, image_size)
    inputs = keras.Input((image_size, image_size, in_channels), name="images")
    if isinstance(spec, zoo.MLPSpec):
        outputs = _mlp(spec, num_classes, inputs)
    elif isinstance(spec, zoo.CNNSpec):
        outputs = _cnn(spec, num_classes, inputs)
    elif isinstance(spec, zoo.CifarResNetSpec):
        outputs = _cifar_resnet(spec, num_classes, inputs, zero_init_residual)
    else:
        outputs = _bottleneck_resnet(spec, num_classes, inputs, zero_init_residual)
    return keras.Model(inputs, outputs, name=name)


def build_from_config(cfg: Any) -> keras.Model:
    """The zoo model the recipe names (the registry's Keras builder for built-in models)."""
    return build_model(cfg.model.name, cfg.data.num_classes, cfg.in_channels,
                       cfg.data.image_size, zero_init_residual=cfg.model.zero_init_residual)


def check_model(model: Any, cfg: Any, where: str) -> keras.Model:
    """What a user's factory returned, checked: a keras.Model with trainable variables whose
    output on a batch of the recipe's images [2, H, W, C] is logits [2, num_classes]."""
    if not isinstance(model, keras.Model):
        raise ConfigError(f"{where}: returned {type(model).__name__}, expected a keras.Model "
                          "(the recipe's framework is tensorflow)")
    shape = (2, cfg.data.image_size, cfg.data.image_size, cfg.in_channels)
    try:
        out = model(ops.zeros(shape), training=False)
    except Exception as err:  # noqa: BLE001 - any failure of the user's forward pass
        first = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError(f"{where}: the model fails on images of shape {list(shape)} "
                          f"(NHWC from data.image_size/data.channels): "
                          f"{type(err).__name__}: {first}") from None
    if not model.trainable_variables:
        raise ConfigError(f"{where}: the model has no trainable variables")
    got = tuple(getattr(out, "shape", ()) or ())
    if got != (2, cfg.data.num_classes):
        shown = list(got) if hasattr(out, "shape") else type(out).__name__
        raise ConfigError(f"{where}: the model returns {shown} for a batch of 2, expected "
                          f"logits [2, {cfg.data.num_classes}] (data.num_classes)")
    return model

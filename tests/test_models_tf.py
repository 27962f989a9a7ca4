"""Keras 3 model zoo: shapes, parameter counts, initialisation, zero-init residual blocks,
training under tf.function, and a real 2-process Horovod step with DistributedGradientTape."""
import json
import math
import os
import sys

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from conftest import WORKERS, horovodrun  # noqa: E402
from hvdscale.core import model_zoo as zoo  # noqa: E402
from hvdscale.errors import ConfigError  # noqa: E402
from hvdscale.tensorflow.models import build_model, residual_blocks  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

SMALL = [  # (name, classes, channels, size)
    ("cnn", 10, 1, 28), ("cnn", 7, 3, 33),
    ("resnet8", 10, 3, 32), ("resnet8", 5, 1, 28),
    ("resnet20", 10, 3, 32), ("resnet20", 100, 3, 17),
    ("mlp", 10, 1, 28), ("mlp4", 10, 1, 28),
]

_BUILT = {}


def built(name, zero_init_residual=True):
    """Each test model is built once per session: ResNet-50 takes seconds to initialise."""
    key = (name, zero_init_residual)
    if key not in _BUILT:
        keras.utils.set_random_seed(3)
        _BUILT[key] = build_model(name, 10, 3, 32, zero_init_residual=zero_init_residual)
    return _BUILT[key]


def n_params(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_variables)


def bn_layers(layer):
    """Every BatchNormalization inside a model or block, nested blocks included."""
    found = []
    for sub in getattr(layer, "layers", None) or layer._flatten_layers(include_self=False):
        if isinstance(sub, keras.layers.BatchNormalization):
            found.append(sub)
        elif sub is not layer:
            found.extend(bn_layers(sub))
    return found


@pytest.mark.parametrize("name, classes, channels, size", SMALL)
def test_small_models_give_logits_of_the_right_shape_and_count(name, classes, channels, size):
    keras.utils.set_random_seed(0)
    model = build_model(name, classes, channels, size)
    out = model(np.random.default_rng(0).normal(size=(3, size, size, channels)).astype("float32"))
    assert tuple(out.shape) == (3, classes)
    assert np.isfinite(np.asarray(out)).all()
    assert n_params(model) == zoo.param_count(name, classes, channels, size)


def test_resnet50_count_and_one_small_forward():
    full = build_model("resnet50", 1000, 3, 224)
    assert n_params(full) == 25_557_032
    model = build_model("resnet50", 1000, 3, 64)      # same weights, a 64x64 input
    assert n_params(model) == 25_557_032
    out = model(np.random.default_rng(0).normal(size=(1, 64, 64, 3)).astype("float32"),
                training=False)
    assert tuple(out.shape) == (1, 1000)


def test_resnet50_strides_on_the_3x3_conv():
    first_of_stage2 = built("resnet50").get_layer("layer2_0")
    assert first_of_stage2.conv1.strides == (1, 1)
    assert first_of_stage2.conv2.strides == (2, 2)
    assert first_of_stage2.shortcut_conv.strides == (2, 2)


def test_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown model 'vgg16'"):
        build_model("vgg16", 10, 3, 32)


@pytest.mark.parametrize("name", ["resnet8", "resnet20", "resnet50"])
def test_zero_init_zeroes_only_the_last_bn_gamma_of_each_block(name):
    model = built(name)
    blocks = residual_blocks(model)
    assert len(blocks) == {"resnet8": 3, "resnet20": 9, "resnet50": 16}[name]
    last = {id(b.last_bn) for b in blocks}
    bns = bn_layers(model)
    assert len(bns) == 1 + sum(len(bn_layers(b)) for b in blocks)
    for bn in bns:
        expected = 0.0 if id(bn) in last else 1.0
        assert np.all(np.asarray(bn.gamma) == expected), bn.path
        assert np.all(np.asarray(bn.beta) == 0.0)
    plain = built(name, zero_init_residual=False)
    assert all(np.all(np.asarray(b.last_bn.gamma) == 1.0) for b in residual_blocks(plain))


@pytest.mark.parametrize("name", ["resnet8", "resnet50"])
@pytest.mark.parametrize("training", [True, False])
def test_zero_init_blocks_pass_the_shortcut_through(name, training):
    rng = np.random.default_rng(1)
    for block in residual_blocks(built(name)):
        # Non-negative, like the ReLU output feeding a block.
        x = tf.constant(rng.random((2, 8, 8, block.in_channels), dtype=np.float32))
        assert np.all(np.asarray(block.residual(x, training=training)) == 0)
        shortcut = np.asarray(block.shortcut(x, training=training))
        out = np.asarray(block(x, training=training))
        np.testing.assert_array_equal(out, np.maximum(shortcut, 0))
        if shortcut.shape == x.shape and not getattr(block, "has_projection", False):
            np.testing.assert_array_equal(out, np.asarray(x))    # exact identity
    # Without zero-init the residual branch is live, so the checks above can fail.
    block = residual_blocks(built(name, zero_init_residual=False))[0]
    x = tf.constant(rng.random((2, 8, 8, block.in_channels), dtype=np.float32))
    assert np.abs(np.asarray(block.residual(x, training=training))).max() > 0.1


def test_option_a_shortcut_subsamples_and_zero_pads_channels():
    down = built("resnet8").get_layer("layer2_0")       # 16 -> 32 channels, stride 2
    x = np.random.default_rng(2).random((1, 8, 8, 16), dtype=np.float32)
    s = np.asarray(down.shortcut(tf.constant(x)))
    assert s.shape == (1, 4, 4, 32)
    np.testing.assert_array_equal(s[..., 8:24], x[:, ::2, ::2, :])
    assert np.all(s[..., :8] == 0) and np.all(s[..., 24:] == 0)


def test_initialisation_follows_he_fan_out_and_goyal_classifier():
    model = built("resnet20")
    kernels = [v for v in model.trainable_variables if v.path.endswith("kernel")]
    for v in kernels:
        w = np.asarray(v)
        if v.path == "fc/kernel":
            assert abs(w.std() / zoo.CLASSIFIER_INIT_STD - 1) < 0.2
            continue
        kh, kw, _, cout = w.shape
        ratio = w.std() / math.sqrt(2.0 / (kh * kw * cout))
        assert abs(ratio - 1) < 6 / math.sqrt(2 * w.size), (v.path, ratio)
    assert np.all(np.asarray(model.get_layer("fc").bias) == 0)


@pytest.mark.parametrize("name", ["cnn", "resnet8"])
def test_a_compiled_training_step_reaches_every_variable_and_lowers_the_loss(name):
    keras.utils.set_random_seed(4)
    model = build_model(name, 10, 1, 16)
    opt = keras.optimizers.SGD(0.2, momentum=0.9)
    rng = np.random.default_rng(4)
    x = tf.constant(rng.normal(size=(32, 16, 16, 1)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, size=32))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss, [g is not None for g in grads]

    first, reached = step()
    assert all(reached) and len(reached) == len(model.trainable_variables)
    for _ in range(19):
        last, _ = step()
    # Fitting one batch of 32 random labels: from ln(10) = 2.30 to below 2.1 (measured 1.96
    # for resnet8, the slower of the two).
    assert float(last) < float(first) - 0.2


@pytest.mark.multiproc
def test_two_horovod_workers_train_in_step_with_distributed_gradient_tape(tmp_path):
    horovodrun(2, sys.executable, WORKERS / "models_tf_hvd.py", tmp_path, timeout=180)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for name in ("cnn", "resnet8"):
        r0, r1 = reports[0][name], reports[1][name]
        assert r0["init_differs_before_broadcast"] and r1["init_differs_before_broadcast"]
        assert r0["all_grads"] and r1["all_grads"]
        assert r0["moved"] > 0
        # Same variables on both ranks after the steps: Horovod averaged the gradients.
        np.testing.assert_allclose(r0["checksums"], r1["checksums"], rtol=1e-6, atol=1e-6)
        # And the first update is -lr * the mean of the two ranks' local gradients.
        assert r0["first_update_error"] < 1e-5 and r1["first_update_error"] < 1e-5


def test_a_saved_resnet_loads_back_with_its_custom_blocks(tmp_path):
    model = built("resnet8", zero_init_residual=False)
    x = np.random.default_rng(5).normal(size=(2, 32, 32, 3)).astype("float32")
    path = tmp_path / "resnet8.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [type(b).__name__ for b in residual_blocks(loaded)] == ["BasicBlock"] * 3
    np.testing.assert_allclose(np.asarray(loaded(x, training=False)),
                               np.asarray(model(x, training=False)), rtol=0, atol=1e-6)

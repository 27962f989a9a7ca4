"""The torch and Keras builds are the same model: copy the weights across by name and they
compute the same logits, in inference and in training mode."""
import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from hvdscale.core import model_zoo as zoo  # noqa: E402
from hvdscale.tensorflow import models as keras_models  # noqa: E402
from hvdscale.torch import models as torch_models  # noqa: E402

torch.set_num_threads(1)
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

# Keras variable name -> torch parameter/buffer name, for the same layer.
TORCH_NAME = {"kernel": "weight", "bias": "bias", "gamma": "weight", "beta": "bias",
              "moving_mean": "running_mean", "moving_variance": "running_var"}


def torch_to_keras(torch_model, keras_model):
    """Copy every torch parameter and BN statistic into the Keras model by the shared names
    (`layer1_0.conv1.weight` -> `layer1_0/conv1/kernel`); fails unless the mapping is 1:1."""
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    used = set()
    for var in keras_model.variables:
        layer_path, leaf = var.path.rsplit("/", 1)
        key = f"{layer_path.replace('/', '.')}.{TORCH_NAME[leaf]}"
        value = state[key]
        if value.ndim == 4:            # conv: torch (out, in, kh, kw) -> Keras (kh, kw, in, out)
            value = value.transpose(2, 3, 1, 0)
        elif value.ndim == 2:          # dense: torch (out, in) -> Keras (in, out)
            value = value.T
        assert tuple(var.shape) == value.shape, key
        var.assign(value)
        used.add(key)
    assert used == set(state), f"torch tensors with no Keras twin: {sorted(set(state) - used)}"


def randomise_bn(torch_model, seed):
    """Non-trivial BN state (gamma, beta, running statistics), so the copy is really tested:
    at init gamma = 1 / 0, beta = 0 and the statistics are 0 / 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in torch_model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def pair(name, classes, channels, size, seed=0):
    torch.manual_seed(seed)
    t = torch_models.build_model(name, classes, channels, size)
    randomise_bn(t, seed)
    k = keras_models.build_model(name, classes, channels, size)
    torch_to_keras(t, k)
    return t, k


def logits_both(t, k, x_nchw, training):
    t.train(training)
    with torch.no_grad():
        lt = t(torch.from_numpy(x_nchw)).numpy()
    lk = np.asarray(k(tf.constant(x_nchw.transpose(0, 2, 3, 1)), training=training))
    return lt, lk


@pytest.mark.parametrize("name, channels, size", [
    ("cnn", 1, 28),
    ("cnn", 3, 15),          # odd size: both frameworks' pools must floor the same way
    ("mlp", 1, 28),
    ("mlp4", 1, 28),
    ("resnet8", 3, 32),
    ("resnet8", 1, 15),      # odd size: strided convs must sample the same pixels
])
@pytest.mark.parametrize("training", [False, True])
def test_same_weights_give_the_same_logits(name, channels, size, training):
    t, k = pair(name, 10, channels, size)
    x = np.random.default_rng(1).normal(size=(8, channels, size, size)).astype(np.float32)
    lt, lk = logits_both(t, k, x, training)
    assert np.abs(lt).max() > 1e-2            # not trivially equal (e.g. all zeros)
    np.testing.assert_allclose(lk, lt, rtol=0, atol=1e-4)


def test_resnet50_same_weights_give_the_same_logits():
    t, k = pair("resnet50", 10, 3, 64)        # 7x7/2 stem, padded max-pool, v1.5 strides
    x = np.random.default_rng(2).normal(size=(1, 3, 64, 64)).astype(np.float32)
    lt, lk = logits_both(t, k, x, training=False)
    # The random BN state makes logits of O(100) after 53 layers: compare to float32
    # precision relative to that scale (measured: 7e-7).
    scale = np.abs(lt).max()
    assert scale > 1
    np.testing.assert_allclose(lk / scale, lt / scale, rtol=0, atol=1e-5)


def test_a_training_forward_moves_the_bn_statistics_alike():
    t, k = pair("cnn", 10, 1, 12, seed=3)
    before = t.bn1.running_var.numpy().copy()
    x = np.random.default_rng(3).normal(size=(16, 1, 12, 12)).astype(np.float32)
    logits_both(t, k, x, training=True)
    bn1 = k.get_layer("bn1")
    # Same momentum convention (torch 0.1 == Keras 0.9) ...
    np.testing.assert_allclose(np.asarray(bn1.moving_mean), t.bn1.running_mean.numpy(),
                               rtol=1e-4, atol=1e-6)
    # ... but torch folds in the unbiased batch variance, Keras the biased one.
    m, n = zoo.BN_MOMENTUM, x.shape[0] * 12 * 12      # n values behind each bn1 channel
    batch_var_t = (t.bn1.running_var.numpy() - (1 - m) * before) / m
    batch_var_k = (np.asarray(bn1.moving_variance) - (1 - m) * before) / m
    np.testing.assert_allclose(batch_var_k, batch_var_t * (n - 1) / n, rtol=1e-3)

"""hvdscale.tensorflow: Keras 3 LARS / LAMB against the core reference, in eager mode, in
tf.function and in model.fit; the exclusion rule by variable path; the factory; CoreSchedule."""
import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

from hvdscale.core import LRScheduleSpec, build_lr_schedule  # noqa: E402
from hvdscale.core.optim_math import run_reference  # noqa: E402
from hvdscale.errors import ConfigError  # noqa: E402
from hvdscale.tensorflow import LAMB, LARS, CoreSchedule, build_optimizer  # noqa: E402

STEPS = 20


def make_model(dtype="float32"):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(4, 3, name="conv", dtype=dtype),
        keras.layers.BatchNormalization(name="norm", dtype=dtype),
        keras.layers.Flatten(),
        keras.layers.Dense(3, name="head", dtype=dtype),
    ], name="net")
    norm = model.get_layer("norm")
    rng = np.random.default_rng(3)
    norm.gamma.assign(rng.uniform(0.5, 1.5, 4).astype(dtype))
    norm.beta.assign(rng.uniform(-0.5, 0.5, 4).astype(dtype))
    return model


def grads_for(variables, steps=STEPS, seed=1):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(tuple(v.shape)) * (0.1 + j) for j, v in enumerate(variables)]
            for _ in range(steps)]


def run_keras(opt, variables, grads, graph=True):
    def apply(step_grads):
        opt.apply_gradients(zip(step_grads, variables))
    fn = tf.function(apply) if graph else apply
    for step_grads in grads:
        fn([tf.constant(g, dtype=v.dtype) for g, v in zip(step_grads, variables)])
    return [v.numpy().copy() for v in variables]


def assert_close(got, want, rtol):
    for g, w in zip(got, want):
        err = np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30)
        assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"


CASES = [
    ("lars", LARS, dict(momentum=0.9, weight_decay=5e-4, trust_coefficient=0.02, epsilon=1e-8),
     dict(momentum=0.9, weight_decay=5e-4, trust_coefficient=0.02, eps=1e-8)),
    ("lamb", LAMB, dict(weight_decay=0.01, epsilon=1e-6), dict(weight_decay=0.01, eps=1e-6)),
    ("lamb", LAMB, dict(weight_decay=0.1, bias_correction=False, clamp_value=0.5),
     dict(weight_decay=0.1, bias_correction=False, clamp_value=0.5)),
    ("lamb", LAMB, dict(max_trust_ratio=0.2), dict(max_trust_ratio=0.2)),
]


@pytest.mark.parametrize("kind, cls, hyper, ref_hyper", CASES)
@pytest.mark.parametrize("dtype, rtol, graph", [("float64", 1e-10, True), ("float32", 1e-5, True),
                                                ("float32", 1e-5, False)])
def test_matches_core_reference_for_twenty_steps(kind, cls, hyper, ref_hyper, dtype, rtol, graph):
    model = make_model(dtype)
    variables = model.trainable_variables
    excluded = [len(v.shape) <= 1 for v in variables]
    grads = grads_for(variables)
    # Keras keeps the learning rate in float32: use float32-exact values for the float64 check
    lrs = [float(np.float32(0.05 * (1 + 0.1 * i))) for i in range(STEPS)]
    start = [v.numpy().astype(np.float64) for v in variables]
    want = run_reference(kind, start, lambda i, w: grads[i], lrs, excluded, **ref_hyper)
    opt = cls(learning_rate=CoreSchedule(lambda t: lrs[min(t, STEPS - 1)], total_steps=STEPS), **hyper)
    assert_close(run_keras(opt, variables, grads, graph), want, rtol)


@pytest.mark.parametrize("kind, cls, hyper, ref_hyper", CASES[:2])
def test_name_patterns_match_keras_variable_paths(kind, cls, hyper, ref_hyper):
    model = make_model("float64")
    variables = model.trainable_variables
    paths = [v.path for v in variables]
    assert "net/head/kernel" in paths and "net/norm/gamma" in paths
    excluded = [p.startswith("net/head/") or p == "net/conv/bias" for p in paths]
    grads = grads_for(variables)
    start = [v.numpy() for v in variables]
    want = run_reference(kind, start, lambda i, w: grads[i], [0.0625] * STEPS, excluded, **ref_hyper)
    opt = cls(learning_rate=0.0625, exclude_1d=False, exclude=["^net/head/", "conv/bias$"], **hyper)
    assert_close(run_keras(opt, variables, grads), want, 1e-10)
    default = run_reference(kind, start, lambda i, w: grads[i], [0.0625] * STEPS,
                            [len(v.shape) <= 1 for v in variables], **ref_hyper)
    assert not np.allclose(want[2], default[2]) and not np.allclose(want[4], default[4])


@pytest.mark.parametrize("name, lr", [("lamb", 0.02), ("lars", 4.0)])
def test_model_fit_trains_with_a_core_schedule(name, lr):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 10)).astype("float32")
    y = ((x[:, :3].sum(1) > 0).astype(int) + (x[:, 3] > 1).astype(int)).astype("int64")
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(3)])
    schedule = build_lr_schedule(LRScheduleSpec(warmup="zero", warmup_steps=4, decay="cosine"),
                                 0.0, lr, steps_per_epoch=8, total_steps=48)
    opt = build_optimizer(name, CoreSchedule(schedule), {"weight_decay": 1e-4})
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda b, logs: seen.append(float(opt.learning_rate)))
    hist = model.fit(x, y, batch_size=32, epochs=6, verbose=0, shuffle=False, callbacks=[record])
    losses = hist.history["loss"]
    assert losses[-1] < 0.6 * losses[0], losses
    assert seen == [float(np.float32(schedule(t))) for t in range(48)]


def test_core_schedule_is_the_core_sequence_in_float32():
    s = build_lr_schedule(LRScheduleSpec(warmup="linear", warmup_steps=5, decay="multistep",
                                         milestones=(2, 3), gamma=0.3), 0.1, 0.7, 7, 30)
    adapter = CoreSchedule(s)
    want = np.float32([s(t) for t in range(40)])
    eager = np.array([adapter(t).numpy() for t in range(40)])
    graph = tf.function(lambda t: adapter(t))
    traced = np.array([graph(tf.constant(t, tf.int64)).numpy() for t in range(40)])
    np.testing.assert_array_equal(eager, want)
    np.testing.assert_array_equal(traced, want)
    again = CoreSchedule.from_config(adapter.get_config())
    assert float(again(33)) == float(want[33])


def test_keras_round_trip_and_factory():
    opt = build_optimizer("lamb", 0.01, {"betas": [0.8, 0.99], "eps": 1e-7, "weight_decay": 0.02,
                                         "exclude": ["bias"]})
    assert isinstance(opt, LAMB) and (opt.beta_1, opt.beta_2, opt.epsilon) == (0.8, 0.99, 1e-7)
    clone = LAMB.from_config(opt.get_config())
    assert clone.layerwise_weight_decay == 0.02 and clone.exclude == ("bias",) and clone.weight_decay is None
    lars = build_optimizer("lars", 0.1, {"trust_coefficient": 0.02, "momentum": 0.8})
    assert isinstance(lars, LARS) and lars.trust_coefficient == 0.02 and lars.momentum == 0.8
    assert isinstance(build_optimizer("sgd", 0.1, {}), keras.optimizers.SGD)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("graph", [True, False])
def test_fused_sgd_follows_keras_sgd_step_for_step(nesterov, graph):
    """hvdscale's SGD updates in ResourceApplyKerasMomentum; Keras's SGD is the reference,
    with a learning rate that changes every step and decoupled weight decay on some weights."""
    variables_ours = make_model().trainable_variables
    variables_keras = make_model().trainable_variables
    hyper = dict(learning_rate=0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.01)
    ours = build_optimizer("sgdw", 0.1, {"momentum": 0.9, "nesterov": nesterov,
                                        "weight_decay": 0.01})
    reference = keras.optimizers.SGD(**hyper)
    reference.exclude_from_weight_decay(var_list=[v for v in variables_keras if len(v.shape) <= 1])
    got, want = None, None
    for step, step_grads in enumerate(grads_for(variables_ours, steps=8)):
        for opt in (ours, reference):
            opt.learning_rate = 0.1 / (1 + step)
        got = run_keras(ours, variables_ours, [step_grads], graph)
        want = run_keras(reference, variables_keras, [step_grads], graph)
    assert ours.iterations.numpy() == 8
    assert_close(got, want, 1e-6)
    assert_close([m.numpy() for m in ours.momentums], [m.numpy() for m in reference.momentums],
                 1e-6)


def test_cross_entropy_matches_a_float64_reference_with_and_without_smoothing():
    from hvdscale.tensorflow.trainer import softmax_cross_entropy
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((16, 10)) * 3
    labels = rng.integers(0, 10, 16)
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    nll = -logp[np.arange(16), labels]
    for eps in (0.0, 0.1):
        want = np.mean((1 - eps) * nll - eps * logp.mean(1))
        got = softmax_cross_entropy(tf.constant(logits, tf.float32), tf.constant(labels), eps)
        assert abs(float(got) - want) <= 1e-5 * abs(want)


@pytest.mark.parametrize("name", ["sgd", "sgdw", "adamw"])
def test_keras_sgd_and_adamw_skip_weight_decay_on_excluded_variables(name):
    model = make_model()
    variables = model.trainable_variables
    before = [v.numpy().copy() for v in variables]
    opt = build_optimizer(name, 0.1, {"weight_decay": 0.5, "momentum": 0.0})
    zero = [np.zeros(tuple(v.shape)) for v in variables]
    after = run_keras(opt, variables, [zero])  # zero gradients: only weight decay moves weights
    for v, b, a in zip(variables, before, after):
        if len(v.shape) <= 1:
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b * (1 - 0.1 * 0.5), rtol=1e-6)


@pytest.mark.parametrize("call, needle", [
    (lambda: build_optimizer("adagrad", 0.1, {}), "optimizer.name: 'adagrad' is not one of sgd, sgdw, lars, lamb, adamw"),
    (lambda: build_optimizer("lamb", 0.1, {"exclude": ["(bad"]}), "bad exclude pattern"),
    (lambda: LAMB(beta_2=1.0), "beta_2"),
    (lambda: LARS(momentum=-0.1), "momentum"),
    (lambda: LAMB(weight_decay=float("inf")), "weight_decay"),
])
def test_bad_settings_are_config_errors(call, needle):
    with pytest.raises(ConfigError, match=needle):
        call()

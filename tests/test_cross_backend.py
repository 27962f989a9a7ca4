"""torch and TensorFlow from the same weights and gradients: LARS / LAMB end at the same
parameters after 20 float32 steps (relative error <= 1e-5), both at the core reference, and the
schedule adapters give the same float32 learning-rate sequence."""
import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
torch.set_num_threads(1)
tf.config.threading.set_intra_op_parallelism_threads(1)

from hvdscale import tensorflow as hvd_tf  # noqa: E402
from hvdscale import torch as hvd_torch  # noqa: E402
from hvdscale.core import LRScheduleSpec, build_lr_schedule  # noqa: E402
from hvdscale.core.optim_math import run_reference  # noqa: E402

STEPS = 20
SHAPES = [("conv.weight", (8, 4, 3, 3)), ("conv.bias", (8,)), ("norm.weight", (8,)),
          ("fc.weight", (10, 72)), ("fc.bias", (10,)), ("embed.table", (5, 6))]
SCHEDULE = build_lr_schedule(LRScheduleSpec(warmup="linear", warmup_steps=5, decay="cosine", end_lr=0.005),
                             0.01, 0.08, steps_per_epoch=4, total_steps=STEPS)


def problem(seed=0):
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal(s).astype(np.float32) for _, s in SHAPES]
    grads = [[(rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 1)).astype(np.float32) for _, s in SHAPES]
             for _ in range(STEPS)]
    return weights, grads


def run_torch(kind, weights, grads, hyper, exclude):
    params = [torch.nn.Parameter(torch.tensor(w)) for w in weights]
    named = [(n, p) for (n, _), p in zip(SHAPES, params)]
    cls = {"lars": hvd_torch.LARS, "lamb": hvd_torch.LAMB}[kind]
    opt = cls(named, lr=SCHEDULE(0), exclude=exclude, **hyper)
    sched = hvd_torch.LRScheduleAdapter(opt, SCHEDULE)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = torch.tensor(g)
        opt.step()
        sched.step()
    return [p.detach().numpy() for p in params]


def run_tf(kind, weights, grads, hyper, exclude):
    variables = [keras.Variable(w, name=n.replace(".", "_")) for (n, _), w in zip(SHAPES, weights)]
    names = {"lars": dict(eps="epsilon"), "lamb": dict(eps="epsilon", betas=None)}[kind]
    kw = {}
    for k, v in hyper.items():
        if k == "betas":
            kw["beta_1"], kw["beta_2"] = v
        else:
            kw[names.get(k, k) or k] = v
    cls = {"lars": hvd_tf.LARS, "lamb": hvd_tf.LAMB}[kind]
    opt = cls(learning_rate=hvd_tf.CoreSchedule(SCHEDULE), exclude=exclude, **kw)

    @tf.function
    def apply(step_grads):
        opt.apply_gradients(zip(step_grads, variables))

    for step_grads in grads:
        apply([tf.constant(g) for g in step_grads])
    return [v.numpy() for v in variables]


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("kind, hyper, exclude", [
    ("lars", dict(momentum=0.9, weight_decay=1e-4, trust_coefficient=0.001, eps=1e-8), ()),
    ("lars", dict(momentum=0.8, weight_decay=5e-3, trust_coefficient=0.02, eps=0.0), ("embed",)),
    ("lamb", dict(betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01), ()),
    ("lamb", dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, bias_correction=False,
                  clamp_value=2.0, max_trust_ratio=5.0), ("embed",)),
])
def test_torch_and_tf_agree_with_each_other_and_the_reference(kind, hyper, exclude):
    weights, grads = problem()
    got_torch = run_torch(kind, weights, grads, hyper, exclude)
    got_tf = run_tf(kind, weights, grads, hyper, exclude)
    excluded = [len(s) <= 1 or any(e in n for e in exclude) for n, s in SHAPES]
    ref_hyper = {("beta1" if k == "betas" else k): v for k, v in hyper.items() if k != "betas"}
    if "betas" in hyper:
        ref_hyper["beta1"], ref_hyper["beta2"] = hyper["betas"]
    lrs = [float(np.float32(SCHEDULE(t))) for t in range(STEPS)]  # both backends run a float32 lr
    want = run_reference(kind, [w.astype(np.float64) for w in weights], lambda i, w: grads[i], lrs,
                         excluded, **ref_hyper)
    for (name, _), t, f, r, w0 in zip(SHAPES, got_torch, got_tf, want, weights):
        assert not np.allclose(t, w0), f"{name} did not move"
        assert rel_err(t, f) <= 1e-5, (name, rel_err(t, f))
        assert rel_err(t, r) <= 1e-5, (name, rel_err(t, r))
        assert rel_err(f, r) <= 1e-5, (name, rel_err(f, r))


@pytest.mark.parametrize("spec", [
    LRScheduleSpec(warmup="linear", warmup_epochs=1.5, decay="multistep", milestones=(3, 5), gamma=0.1),
    LRScheduleSpec(warmup="zero", warmup_steps=7, decay="polynomial", power=2.0, end_lr=1e-4),
    LRScheduleSpec(warmup="none", decay="exponential", decay_rate=0.9, decay_epochs=0.5),
    LRScheduleSpec(warmup="linear", warmup_steps=3, decay="cosine", end_lr=0.0),
])
def test_schedules_give_identical_sequences_in_both_backends(spec):
    s = build_lr_schedule(spec, 0.1, 1.6, steps_per_epoch=6, total_steps=48)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = hvd_torch.LRScheduleAdapter(opt, s)
    torch_lrs = []
    for _ in range(60):
        torch_lrs.append(np.float32(opt.param_groups[0]["lr"]))
        opt.step()
        sched.step()
    var = keras.Variable(np.zeros(1, np.float32))
    kopt = hvd_tf.LARS(learning_rate=hvd_tf.CoreSchedule(s))
    kopt.build([var])
    tf_lrs = []
    for _ in range(60):
        tf_lrs.append(np.float32(kopt.learning_rate))
        kopt.apply_gradients([(tf.zeros(1), var)])
    np.testing.assert_array_equal(np.array(torch_lrs), np.array(tf_lrs))
    np.testing.assert_array_equal(np.array(tf_lrs), np.float32([s(t) for t in range(60)]))
    assert len(set(tf_lrs)) > 5


@pytest.mark.parametrize("name", ["sgd", "sgdw"])
def test_sgd_weight_decay_means_the_same_in_both_frameworks(name):
    """The recipe's `sgd` adds wd*w to the gradient and `sgdw` decays w by (1 - lr wd) in torch
    and Keras alike: same weights and gradients, same parameters after STEPS steps, and both
    equal to the rule written out in NumPy (biases excluded from the decay). The learning rate
    is constant: with a changing one torch (w -= lr (mu b + g)) and Keras (m = mu m - lr g)
    momentum differ by design (Goyal et al. 2017's "momentum correction")."""
    lr = 0.05
    weights, grads = problem(3)
    hyper = {"momentum": 0.9, "nesterov": False, "weight_decay": 0.05}
    exclude_1d = [len(s) <= 1 for _, s in SHAPES]
    # NumPy: Keras/torch momentum SGD with the two decay forms
    want = [w.astype(np.float64).copy() for w in weights]
    bufs = [np.zeros_like(w) for w in want]
    for step, step_grads in enumerate(grads):
        for i, g in enumerate(step_grads):
            wd = 0.0 if exclude_1d[i] else hyper["weight_decay"]
            g = g.astype(np.float64)
            if name == "sgd":
                g = g + wd * want[i]
            else:
                want[i] *= 1.0 - lr * wd
            bufs[i] = 0.9 * bufs[i] + g if step else g          # torch's first-step buffer
            want[i] -= lr * bufs[i]

    from hvdscale.tensorflow.optim import build_optimizer as build_tf
    from hvdscale.torch.optim import build_optimizer as build_torch
    params = [torch.nn.Parameter(torch.tensor(w)) for w in weights]
    opt = build_torch(name, [(n, p) for (n, _), p in zip(SHAPES, params)], lr, hyper)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = torch.tensor(g)
        opt.step()
    got_torch = [p.detach().numpy() for p in params]

    variables = [keras.Variable(w, name=n.replace(".", "_")) for (n, _), w in zip(SHAPES, weights)]
    k = build_tf(name, lr, hyper)
    for step_grads in grads:
        k.apply_gradients(zip([tf.constant(g) for g in step_grads], variables))
    got_tf = [v.numpy() for v in variables]
    for a, b, w in zip(got_torch, got_tf, want):
        scale = np.abs(w).max()
        assert np.abs(a - w).max() <= 1e-5 * scale
        assert np.abs(b - w).max() <= 1e-5 * scale

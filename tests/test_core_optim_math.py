"""hvdscale.core.optim_math: the LARS / LAMB reference, checked against properties from the
papers and against independent implementations (plain SGD-momentum and Adam)."""
import numpy as np
import pytest

from hvdscale.core.optim_math import (lamb_trust_ratio, lamb_update, lars_trust_ratio,
                                      lars_update, run_reference)

rng = np.random.default_rng(7)


def norm(x):
    return float(np.linalg.norm(x))


@pytest.mark.parametrize("grad_scale", [1e-4, 1.0, 1e3])
def test_lars_first_step_length_is_lr_eta_w_norm_whatever_the_gradient_scale(grad_scale):
    w = rng.standard_normal((32, 16))
    g = grad_scale * rng.standard_normal((32, 16))
    new, buf = lars_update(w, g, None, lr=2.0, momentum=0.9, weight_decay=0.0,
                           trust_coefficient=0.001, eps=0.0)
    assert norm(new - w) == pytest.approx(2.0 * 0.001 * norm(w), rel=1e-10)
    np.testing.assert_allclose(buf, w - new)


def test_lars_weight_decay_enters_direction_and_denominator():
    w, g = rng.standard_normal(50).reshape(5, 10), rng.standard_normal((5, 10))
    wd, eta, lr = 1e-2, 0.02, 0.5
    new, _ = lars_update(w, g, None, lr, weight_decay=wd, trust_coefficient=eta, eps=0.0)
    ratio = eta * norm(w) / (norm(g) + wd * norm(w))
    np.testing.assert_allclose(new, w - lr * ratio * (g + wd * w), rtol=1e-12)


def test_lars_excluded_tensor_is_plain_sgd_momentum():
    w0 = rng.standard_normal(20)
    grads = [rng.standard_normal(20) for _ in range(5)]
    w, buf = w0.copy(), None
    for g in grads:
        w, buf = lars_update(w, g, buf, lr=0.1, momentum=0.9, weight_decay=0.1, excluded=True)
    # independent: the classic formulation b = m*b + g; w -= lr*b (same for a constant lr)
    ref, b = w0.copy(), np.zeros(20)
    for g in grads:
        b = 0.9 * b + g
        ref = ref - 0.1 * b
    np.testing.assert_allclose(w, ref, rtol=1e-12)


def test_lars_zero_norms_give_trust_ratio_one():
    assert lars_trust_ratio(0.0, 3.0, 0.1, 0.001, 1e-8) == 1.0
    assert lars_trust_ratio(3.0, 0.0, 0.1, 0.001, 1e-8) == 1.0
    w = np.zeros(4)
    new, _ = lars_update(w, np.ones(4), None, lr=0.5, momentum=0.0)
    np.testing.assert_allclose(new, -0.5 * np.ones(4))


def adam_reference(w0, grads, lr, b1, b2, eps):
    """Independent Adam (Kingma & Ba, Algorithm 1) written out step by step."""
    w, m, v = w0.copy(), np.zeros_like(w0), np.zeros_like(w0)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        w = w - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return w


def test_lamb_excluded_tensor_is_adam():
    w0 = rng.standard_normal(30)
    grads = [rng.standard_normal(30) for _ in range(6)]
    out = run_reference("lamb", [w0], lambda i, ws: [grads[i]], [1e-2] * 6, [True],
                        beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.5)
    np.testing.assert_allclose(out[0], adam_reference(w0, grads, 1e-2, 0.9, 0.999, 1e-6), rtol=1e-12)


@pytest.mark.parametrize("grad_scale", [1e-3, 1.0, 1e3])
def test_lamb_step_length_is_lr_times_weight_norm(grad_scale):
    w = rng.standard_normal((8, 8))
    g = grad_scale * rng.standard_normal((8, 8))
    new, m, v = lamb_update(w, g, None, None, 1, lr=0.01, weight_decay=0.01)
    assert norm(new - w) == pytest.approx(0.01 * norm(w), rel=1e-10)
    np.testing.assert_allclose(m, 0.1 * g)
    np.testing.assert_allclose(v, 0.001 * g * g)


def test_lamb_clamp_and_max_trust_ratio_bound_the_step():
    w = 100.0 * rng.standard_normal(64)
    g = rng.standard_normal(64)
    clamped, _, _ = lamb_update(w, g, None, None, 1, lr=0.1, clamp_value=10.0, weight_decay=0.0)
    # first LAMB direction is ~sign(g) (eps is tiny): ||u|| ~ sqrt(64) = 8
    assert norm(clamped - w) == pytest.approx(0.1 * 10.0, rel=1e-5)
    capped, _, _ = lamb_update(w, g, None, None, 1, lr=0.1, max_trust_ratio=2.0, weight_decay=0.0)
    assert norm(capped - w) == pytest.approx(0.1 * 2.0 * 8.0, rel=1e-4)
    assert lamb_trust_ratio(0.0, 1.0) == 1.0 and lamb_trust_ratio(1.0, 0.0) == 1.0


def test_lamb_without_bias_correction_takes_the_raw_moments():
    w, g = rng.standard_normal(10), rng.standard_normal(10)
    new, _, _ = lamb_update(w, g, None, None, 1, lr=0.1, bias_correction=False, weight_decay=0.0,
                            eps=1e-6, max_trust_ratio=None)
    u = (0.1 * g) / (np.sqrt(0.001 * g * g) + 1e-6)
    np.testing.assert_allclose(new, w - 0.1 * (norm(w) / norm(u)) * u, rtol=1e-12)


def test_reference_keeps_input_dtype():
    w = rng.standard_normal(5).astype(np.float32)
    g = rng.standard_normal(5).astype(np.float32)
    assert lamb_update(w, g, None, None, 1, 0.1)[0].dtype == np.float32
    assert lars_update(w, g, None, 0.1)[0].dtype == np.float32


def test_reference_optimises_a_quadratic():
    target = rng.standard_normal((6, 6))
    w0 = [target + rng.standard_normal((6, 6))]
    loss = lambda ws: float(np.sum((ws[0] - target) ** 2))
    grad = lambda i, ws: [2 * (ws[0] - target)]
    for kind, lr, hyper in [("lars", 5.0, dict(weight_decay=0.0, trust_coefficient=0.01)),
                            ("lamb", 0.02, dict(weight_decay=0.0))]:
        out = run_reference(kind, w0, grad, [lr] * 200, [False], **hyper)
        assert loss(out) < 0.05 * loss(w0), kind

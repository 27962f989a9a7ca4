"""The gradient-noise-scale estimator on synthetic gradients with a known G and Sigma.

Per-example gradients are g_i = G + L z_i with z_i ~ N(0, I), so Sigma = L L^T and a gradient
averaged over b examples is G + L z / sqrt(b). The estimator only ever sees squared norms, as
in training.
"""
import math

import numpy as np
import pytest

from hvdscale.core.noise_scale import (NoiseScaleEstimator, data_parallel_batches, is_due,
                                       unbiased_estimates)
from hvdscale.errors import ConfigError

DIM = 40


def _problem(seed=0, noise=1.0):
    rng = np.random.default_rng(seed)
    grad = rng.normal(size=DIM) * 0.3
    factor = rng.normal(size=(DIM, DIM)) * noise / math.sqrt(DIM)
    sigma = factor @ factor.T
    return grad, factor, float(np.trace(sigma)) / float(grad @ grad)


def _step(rng, grad, factor, per_worker, workers):
    """One data-parallel step: mean of the workers' |G_small|^2, and |G_big|^2 of their mean."""
    local = grad + (rng.normal(size=(workers, DIM)) @ factor.T) / math.sqrt(per_worker)
    small_sq = float(np.mean(np.sum(local ** 2, axis=1)))
    big_sq = float(np.sum(local.mean(axis=0) ** 2))
    return small_sq, big_sq


def test_single_step_estimates_are_unbiased():
    grad, factor, _ = _problem()
    true_g2, true_trace = float(grad @ grad), float(np.sum(factor ** 2))
    rng = np.random.default_rng(1)
    b, workers = 16, 4
    b_small, b_big = data_parallel_batches(b, workers)
    draws = np.array([unbiased_estimates(*_pair(rng, grad, factor, b, workers, b_small, b_big))
                      for _ in range(4000)])
    g2, trace = draws[:, 0], draws[:, 1]
    # each single-step estimate is noisy; their mean must sit on the truth within 4 std errors
    se_g2 = g2.std(ddof=1) / math.sqrt(len(g2))
    se_trace = trace.std(ddof=1) / math.sqrt(len(trace))
    assert abs(g2.mean() - true_g2) < 4 * se_g2, (g2.mean(), true_g2, se_g2)
    assert abs(trace.mean() - true_trace) < 4 * se_trace, (trace.mean(), true_trace, se_trace)
    # the naive reading, |G_big|^2 taken as |G|^2, is biased by tr(Sigma)/b_big: the test sees it
    naive = np.array([_step(rng, grad, factor, b, workers)[1] for _ in range(4000)])
    assert naive.mean() - true_g2 > 4 * naive.std(ddof=1) / math.sqrt(len(naive))


def _pair(rng, grad, factor, b, workers, b_small, b_big):
    small_sq, big_sq = _step(rng, grad, factor, b, workers)
    return small_sq, b_small, big_sq, b_big


@pytest.mark.parametrize("noise,per_worker,workers", [(1.0, 16, 2), (2.0, 8, 4), (0.5, 32, 8)])
def test_smoothed_b_simple_recovers_the_truth_within_statistical_error(noise, per_worker, workers):
    grad, factor, true_b_simple = _problem(seed=3, noise=noise)
    rng = np.random.default_rng(7)
    b_small, b_big = data_parallel_batches(per_worker, workers)
    est = NoiseScaleEstimator(ema=0.995)
    g2s, traces = [], []
    for _ in range(3000):
        small_sq, big_sq = _step(rng, grad, factor, per_worker, workers)
        reading = est.update(small_sq, b_small, big_sq, b_big)
        g2, trace = unbiased_estimates(small_sq, b_small, big_sq, b_big)
        g2s.append(g2)
        traces.append(trace)
    g2s, traces = np.array(g2s), np.array(traces)
    # statistical error of a ratio of means (delta method) over the EMA's effective window
    n_eff = (1 + est.ema) / (1 - est.ema)
    ratio = traces.mean() / g2s.mean()
    spread = np.std(traces - ratio * g2s, ddof=1) / abs(g2s.mean())
    tolerance = 4 * spread / math.sqrt(n_eff)
    assert reading.samples == 3000
    assert abs(reading.b_simple - true_b_simple) < tolerance, \
        (reading.b_simple, true_b_simple, tolerance)
    assert tolerance < 0.5 * true_b_simple  # the check is tight enough to mean something


def test_b_simple_follows_the_noise_level():
    """Four times the covariance gives four times the noise scale."""
    readings = []
    for noise in (1.0, 2.0):
        grad, factor, _ = _problem(seed=5, noise=noise)
        rng = np.random.default_rng(11)
        est = NoiseScaleEstimator(ema=0.995)
        for _ in range(2000):
            small_sq, big_sq = _step(rng, grad, factor, 16, 4)
            est.update(small_sq, 16, big_sq, 64)
        readings.append(est.b_simple)
    assert 3.0 < readings[1] / readings[0] < 5.3, readings


def test_first_reading_is_the_single_step_estimate_not_shrunk_toward_zero():
    est = NoiseScaleEstimator(ema=0.9)
    assert est.reading().b_simple is None and est.reading().samples == 0
    reading = est.update(small_sq=5.0, b_small=8, big_sq=2.0, b_big=32)
    g2, trace = unbiased_estimates(5.0, 8, 2.0, 32)
    assert reading.g2 == pytest.approx(g2) and reading.trace == pytest.approx(trace)
    assert reading.b_simple == pytest.approx(trace / g2)
    # exact values: g2 = (32*2 - 8*5)/24 = 1, trace = 3/(1/8 - 1/32) = 32
    assert reading.g2 == pytest.approx(1.0) and reading.b_simple == pytest.approx(32.0)


def test_no_ratio_while_the_gradient_estimate_is_not_positive():
    est = NoiseScaleEstimator(ema=0.5)
    # |G_big|^2 far below |G_small|^2 * b_small / b_big: |G|^2 estimate is negative
    reading = est.update(small_sq=10.0, b_small=8, big_sq=0.5, b_big=16)
    assert reading.g2 < 0 and reading.b_simple is None
    assert reading.as_log()["b_simple"] is None


def test_non_finite_norms_are_skipped_and_counted():
    est = NoiseScaleEstimator(ema=0.5)
    est.update(5.0, 8, 2.0, 32)
    before = est.reading()
    after = est.update(float("nan"), 8, 2.0, 32)
    after = est.update(5.0, 8, float("inf"), 32)
    assert after == before and est.skipped == 2


def test_state_round_trip_continues_identically():
    a = NoiseScaleEstimator(ema=0.8)
    a.update(5.0, 8, 2.0, 32)
    b = NoiseScaleEstimator()
    b.load_state_dict(a.state_dict())
    assert a.update(4.0, 8, 1.5, 32) == b.update(4.0, 8, 1.5, 32)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ConfigError, match="noise_scale.ema"):
        NoiseScaleEstimator(ema=1.0)
    with pytest.raises(ConfigError, match="b_small < b_big"):
        unbiased_estimates(1.0, 64, 1.0, 64)
    with pytest.raises(ConfigError, match="two micro-batches"):
        data_parallel_batches(128, 1, 1)
    with pytest.raises(ValueError, match="negative"):
        NoiseScaleEstimator().update(-1.0, 8, 1.0, 16)


def test_schedule():
    assert [s for s in range(10) if is_due(s, 4)] == [0, 4, 8]
    assert not any(is_due(s, 0) for s in range(10))
    assert data_parallel_batches(32, 2, 4) == (32, 256)

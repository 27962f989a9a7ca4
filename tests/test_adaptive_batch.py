"""The adaptive-batch decision rule and learning-rate gains (hvdscale/core/adaptive_batch.py),
against answers worked out by hand and the AdaScale formula written out here."""
import math
import random

import pytest

from hvdscale.core.adaptive_batch import (BatchRule, adascale_gain, lr_gain, replay,
                                          steps_ratio)
from hvdscale.errors import ConfigError


def rising(steps, start=10.0, slope=2.0, samples_per_step=1):
    """B_noise rising linearly, one noise sample per step."""
    return [(step, start + slope * step, step * samples_per_step) for step in range(steps + 1)]


def test_linear_rise_gives_the_hand_computed_decisions():
    # granularity 32, decisions every 10 steps, threshold 10 % of the steps, B_noise = 10 + 2t.
    # t=10: B_n 30 -> nearest multiple 32 = current, keep.
    # t=20: B_n 50 -> 64; saving 1 - (1+50/64)/(1+50/32) = 30.5 %            -> 64
    # t=30: B_n 70 -> 64, keep.  t=40: 90 -> 96; 1 - 1.9375/2.40625 = 19.5 %  -> 96
    # t=50: 110 -> 96, keep.     t=60: 130 -> 128; 1 - 2.015625/2.354167 = 14.4 % -> 128
    # t=70: 150 -> 160; 1 - 1.9375/2.171875 = 10.8 %                           -> 160
    # t=80: 170 -> 160, keep.    t=90: 190 -> 192; 1 - 1.98958/2.1875 = 9.0 %: below, keep
    # t=100: 210 -> 224; 1 - 1.9375/2.3125 = 16.2 %                            -> 224
    rule = BatchRule(min_global=32, max_global=512, granularity=32, threshold=0.1,
                     min_samples=5)
    assert replay(rule, 32, rising(100), every_steps=10) == [
        (20, 64), (40, 96), (60, 128), (70, 160), (100, 224)]


def test_first_decision_waits_for_enough_samples():
    # min_samples 25: t=20 has 20 samples; t=30 (B_n 70 -> 64, saving 1 - 2.09375/3.1875 =
    # 34 %) is the first decision
    rule = BatchRule(min_global=32, max_global=512, granularity=32, threshold=0.1,
                     min_samples=25)
    assert replay(rule, 32, rising(30), every_steps=10) == [(30, 64)]


def test_capped_at_max_and_never_shrinks_unless_asked():
    rule = BatchRule(min_global=64, max_global=256, granularity=64, threshold=0.1,
                     min_samples=1)
    up_then_down = [(10, 5000.0, 10), (20, 5000.0, 20), (30, 10.0, 30), (40, 10.0, 40)]
    assert replay(rule, 64, up_then_down, every_steps=10) == [(10, 256)]
    shrinking = BatchRule(min_global=64, max_global=256, granularity=64, threshold=0.1,
                          min_samples=1, shrink=True)
    # at t=30 B_n = 10: target 64 (the floor); examples saved 1 - (1+64/10)/(1+256/10) = 72 %
    assert replay(shrinking, 64, up_then_down, every_steps=10) == [(10, 256), (30, 64)]


def test_no_estimate_or_non_positive_keeps_the_batch():
    rule = BatchRule(min_global=32, max_global=512, granularity=32, min_samples=1)
    for b_noise in (None, float("nan"), -3.0, 0.0, float("inf")):
        decision = rule.decide(32, b_noise, 100)
        assert decision.global_batch == 32 and not decision.changed


def test_predicted_saving_is_the_steps_model():
    rule = BatchRule(min_global=32, max_global=1024, granularity=32, threshold=0.0,
                     min_samples=1)
    decision = rule.decide(32, 640.0, 10)
    assert decision.global_batch == 640
    # S(B) = S_min (1 + B_n / B): 21 S_min at 32, 2 S_min at 640
    assert decision.saving == pytest.approx(1 - 2 / 21)
    assert steps_ratio(640.0, 32, 640) == pytest.approx(2 / 21)


@pytest.mark.parametrize("kwargs, words", [
    (dict(min_global=256, max_global=128, granularity=64), "below the global batch"),
    (dict(min_global=64, max_global=200, granularity=64), "not a multiple"),
    (dict(min_global=64, max_global=256, granularity=64, threshold=1.5), "threshold"),
])
def test_bad_rules_are_refused(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        BatchRule(**kwargs)


def adascale_by_hand(s, g2, trace, b0):
    """Johnson et al. 2020, eq. for r_t with sigma^2 the variance of the base-batch gradient."""
    sigma2 = trace / b0
    return (sigma2 + g2) / (sigma2 / s + g2)


def test_adascale_gain_matches_the_formula():
    # s=4, sigma^2 = 96/32 = 3, |G|^2 = 1: (3 + 1) / (3/4 + 1) = 16/7
    assert adascale_gain(4, 1.0, 96.0, reference_batch=32) == pytest.approx(16 / 7)
    assert lr_gain("adascale", 4, g2=1.0, trace=3.0) == pytest.approx(16 / 7)
    rng = random.Random(0)
    for _ in range(200):
        s, g2 = rng.uniform(1, 64), 10 ** rng.uniform(-4, 2)
        trace, b0 = 10 ** rng.uniform(-2, 4), rng.choice([1, 32, 128])
        r = adascale_gain(s, g2, trace, b0)
        assert r == pytest.approx(adascale_by_hand(s, g2, trace, b0), rel=1e-12)
        assert 1.0 <= r <= s * (1 + 1e-12)


def test_adascale_limits():
    s = 8.0
    # noise-free gradient: a bigger batch buys nothing, the lr stays
    assert adascale_gain(s, g2=1e6, trace=1.0) == pytest.approx(1.0, abs=1e-5)
    # noise-dominated: the linear rule
    assert adascale_gain(s, g2=1e-9, trace=1.0) == pytest.approx(s, rel=1e-7)
    assert adascale_gain(s, g2=-0.5, trace=1.0) == s        # |G|^2 estimate below zero
    assert adascale_gain(s, g2=1.0, trace=-2.0) == 1.0      # trace estimate below zero
    assert adascale_gain(1.0, g2=0.3, trace=7.0) == 1.0     # no scale, no gain


def test_linear_and_sqrt_rules():
    assert lr_gain("linear", 6.0) == 6.0
    assert lr_gain("sqrt", 6.0) == pytest.approx(math.sqrt(6.0))
    with pytest.raises(ConfigError, match="batch.adaptive.rule"):
        lr_gain("cubic", 2.0)
    with pytest.raises(ValueError, match="needs"):
        lr_gain("adascale", 2.0)

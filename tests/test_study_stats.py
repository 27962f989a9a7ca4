"""The study's statistics against independent computations on data with a known answer:
Student's t against its closed forms and printed tables, the mean and Welch intervals against
worked examples, b_max and the positive control on drops built to a known answer, B_crit's
fit-form envelope on synthetic S(B) = S_min (1 + B_crit / B), and the window median's bootstrap
interval against the exact bootstrap distribution of a median (binomial sums)."""
import math

import numpy as np
import pytest

from hvdscale.core.metrics import SweepPoint
from hvdscale.core.stats import Interval, mean_interval, t_cdf, t_quantile, welch_interval
from hvdscale.errors import ConfigError
from hvdscale.study.analysis import (accuracy_summary, b_crit_fit_forms, b_max,
                                     noise_in_window, positive_control)


@pytest.mark.parametrize("t", [-7.0, -1.0, -0.2, 0.0, 0.4, 1.5, 30.0])
def test_t_cdf_matches_its_closed_forms(t):
    assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)      # Cauchy
    assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


@pytest.mark.parametrize("df, quantile", [
    # two-sided 95 % critical values as printed in t tables
    (1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571), (10, 2.228), (30, 2.042),
    (1e6, 1.960),
    # non-integer df (Welch): scipy.stats.t.ppf(0.975, df), SciPy 1.17.1 (not in the venv)
    (2.5, 3.5746548420036817), (7.3, 2.345066736547703), (24.988529290231416, 2.059586491365625),
])
def test_t_quantile_matches_tables(df, quantile):
    assert t_quantile(0.975, df) == pytest.approx(quantile, abs=5e-4 if df in (1, 2, 3, 4, 5,
                                                                               10, 30, 1e6)
                                                  else 1e-9)
    assert t_quantile(0.025, df) == pytest.approx(-t_quantile(0.975, df))


def test_t_quantile_other_levels():
    assert t_quantile(0.9, 3.7) == pytest.approx(1.5575658388615072, abs=1e-9)      # SciPy
    assert t_cdf(1.3, 4.5) == pytest.approx(0.871901956027983, abs=1e-12)            # SciPy
    with pytest.raises(ConfigError):
        t_quantile(1.0, 3)


def test_mean_interval_worked_example():
    # mean 0.863, s = 0.002, n = 3: 0.863 +- t_{0.975, 2} 0.002 / sqrt(3) = 0.863 +- 0.0049683
    ci = mean_interval([0.861, 0.863, 0.865])
    assert ci.estimate == pytest.approx(0.863)
    assert (ci.ci_low, ci.ci_high) == pytest.approx((0.8580317, 0.8679683), abs=1e-7)
    with pytest.raises(ConfigError, match="at least two"):
        mean_interval([0.86])


def test_welch_interval_textbook_example():
    # Wikipedia, "Welch's t-test", example 1: t = -2.46, nu = 24.99; 95 % interval of the
    # difference of means [-3.9841, -0.3492] (scipy.stats.ttest_ind(equal_var=False))
    a1 = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
    a2 = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
    ci = welch_interval(a1, a2)
    assert ci.estimate == pytest.approx(np.mean(a1) - np.mean(a2))
    assert (ci.ci_low, ci.ci_high) == pytest.approx((-3.984096267140929, -0.3492370661924069),
                                                    abs=1e-8)
    se = (ci.ci_high - ci.ci_low) / 2 / t_quantile(0.975, 24.988529290231416)
    assert ci.estimate / se == pytest.approx(-2.455356398286006, abs=1e-8)


def test_accuracy_summary_drops_b_max_and_control():
    acc = {
        32: [0.860, 0.862, 0.864],     # B_ref
        64: [0.858, 0.860, 0.862],     # drop 0.2 pp, s = 0.2 pp: 0.2 +- 2.776 * 0.1633
        128: [0.852, 0.858, 0.864],    # drop 0.4 pp but s = 0.6 pp: upper bound 1.73 pp
        256: [0.859, 0.859, 0.859],    # drop 0.3 pp: 0.3 +- 4.303 * 0.1155
        512: [0.830, 0.832, 0.834],    # drop 3.0 pp: the positive control
        1024: [0.80],                  # one seed: no interval
    }
    out = accuracy_summary(acc)
    assert out["b_ref"] == 32
    d64 = out["drop_pp"][64]
    assert d64.estimate == pytest.approx(0.2)
    half = 2.776445 * 0.2 * math.sqrt(2 / 3)            # equal n and s: df = 4
    assert (d64.ci_low, d64.ci_high) == pytest.approx((0.2 - half, 0.2 + half), abs=1e-5)
    # SciPy's Welch interval for 128 (df 2.439): [-0.92893, 1.72893]
    assert (out["drop_pp"][128].ci_low, out["drop_pp"][128].ci_high) == \
        pytest.approx((-0.9289250660382848, 1.7289250660382962), abs=1e-7)
    d256 = out["drop_pp"][256]
    assert d256.ci_high == pytest.approx(0.3 + 4.302653 * 0.2 / math.sqrt(3), abs=1e-5)
    assert out["drop_pp"][1024] is None and out["accuracy_pct"][1024] is None
    assert out["accuracy_pct"][32].estimate == pytest.approx(86.2)
    # 128 fails the upper bound, 256 passes both rules (batch by batch), 512 fails the mean
    assert out["b_max"] == 256
    assert positive_control(out["drop_pp"]) == 512


def test_b_max_rules_on_their_edges():
    drops = {64: Interval(0.49, -0.2, 0.99), 128: Interval(0.5, 0.1, 0.9),
             256: Interval(0.1, -0.5, 1.0)}
    assert b_max(32, drops) == 64            # 128: mean not < 0.5; 256: upper not < 1
    assert b_max(32, {64: Interval(0.6, 0.2, 1.0)}) == 32
    assert positive_control({64: Interval(1.2, -0.1, 2.5), 128: Interval(0.9, 0.2, 1.6)}) is None


S_MIN, B_CRIT = 40.0, 250.0
BATCHES = (32, 64, 128, 256, 512, 1024, 2048)


def _synthetic(noise, smallest_factor=1.0, seeds=3, seed=0):
    """S(B) = S_min (1 + B_crit / B) with log-normal noise per run; the smallest batch's steps
    optionally multiplied (off the model, as B=32 was in the old study)."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in range(seeds):
        pts = []
        for b in BATCHES:
            steps = S_MIN * (1 + B_CRIT / b) * math.exp(noise * rng.normal())
            steps *= smallest_factor if b == BATCHES[0] else 1.0
            pts.append(SweepPoint(b, steps, steps))
        out[s] = pts
    return out


def test_b_crit_envelope_covers_the_truth_and_every_fit():
    res = b_crit_fit_forms(_synthetic(0.1), replicates=100)
    assert res["ci_low"] <= B_CRIT <= res["ci_high"]
    assert set(res["fits"]) == {"all", "without_smallest", "seed_0", "seed_1", "seed_2"}
    for f in res["fits"].values():
        assert res["ci_low"] <= f["ci_low"] <= f["estimate"] <= f["ci_high"] <= res["ci_high"]
    assert res["estimate"] == res["fits"]["all"]["estimate"]


def test_b_crit_envelope_absorbs_an_off_model_smallest_batch():
    # the smallest batch needs 1.8x the model's steps: the fit to every run is pulled away
    # and its seed-bootstrap interval misses the truth; the fit without it does not
    res = b_crit_fit_forms(_synthetic(0.05, smallest_factor=1.8), replicates=100)
    every = res["fits"]["all"]
    assert not every["ci_low"] <= B_CRIT <= every["ci_high"]
    assert res["ci_low"] <= B_CRIT <= res["ci_high"]


def _exact_bootstrap_median_quantile(sorted_values, p):
    """Exact bootstrap distribution of the median of n (odd) values: the resample's median is
    <= x_(j) when at least (n + 1) / 2 of the n draws are <= x_(j), a Binomial(n, j / n) event.
    Returns the smallest x_(j) whose probability reaches p."""
    n = len(sorted_values)
    need = (n + 1) // 2
    for j in range(1, n + 1):
        q = j / n
        cdf = sum(math.comb(n, i) * q ** i * (1 - q) ** (n - i) for i in range(need, n + 1))
        if cdf >= p:
            return sorted_values[j - 1]
    return sorted_values[-1]


@pytest.mark.parametrize("inside", [
    [120.0, 80.0, 300.0, 95.0, 150.0, 60.0, 210.0],
    [55.0, 61.0, 70.0, 90.0, 101.0, 130.0, 133.0, 150.0, 180.0, 260.0, math.inf],
])
def test_window_median_against_the_exact_bootstrap(inside):
    # readings outside +-50 steps are extreme: the window must leave them out
    readings = [(-150, 1e6), (-51, 1e-3), (90, 5e5)]
    readings += [(step, v) for step, v in zip(np.linspace(-50, 50, len(inside)), inside)]
    ordered = sorted(inside)
    # one snapshot per seed: drawing seeds, then snapshots within them, is the same bootstrap
    for groups in (None, list(range(len(readings)))):
        ci = noise_in_window(readings, half_width=50, groups=groups)
        assert ci.estimate == ordered[len(ordered) // 2]
        assert ci.ci_low == _exact_bootstrap_median_quantile(ordered, 0.025)
        assert ci.ci_high == _exact_bootstrap_median_quantile(ordered, 0.975)


def test_window_needs_snapshots():
    with pytest.raises(ConfigError, match="2 snapshot"):
        noise_in_window([(0, 100.0), (10, 120.0), (400, 90.0)], half_width=50)


def test_window_interval_by_seed_covers_a_known_median():
    # 5 seeds, each run's 8 snapshots share the run's level (log-normal around 100, so the
    # median of what a run reads is 100) and differ little among themselves: resampling
    # snapshots alone ignores the seed-to-seed spread, resampling seeds first does not
    rng = np.random.default_rng(0)
    plain = grouped = 0
    for rep in range(100):
        readings, groups = [], []
        for seed in range(5):
            level = 100.0 * math.exp(0.3 * rng.normal())
            readings += [(k - 4, level * math.exp(0.05 * rng.normal())) for k in range(8)]
            groups += [seed] * 8
        p = noise_in_window(readings, 10, replicates=500, seed=rep)
        g = noise_in_window(readings, 10, replicates=500, seed=rep, groups=groups)
        plain += p.ci_low <= 100.0 <= p.ci_high
        grouped += g.ci_low <= 100.0 <= g.ci_high
    assert grouped >= 85 and plain <= 75, (grouped, plain)


def _runs(optimizer, protocol, acc_by_batch):
    return [{"optimizer": optimizer, "protocol": protocol, "role": "measure", "batch": b,
             "seed": k, "test_accuracy": a}
            for b, values in acc_by_batch.items() for k, a in enumerate(values)]


@pytest.mark.parametrize("lars_at_256, pushes", [
    ([0.861, 0.863, 0.865], True),      # 4x SGD's b_max and 1.4 pp better than SGD there
    ([0.850, 0.852, 0.854], False),     # 4x, but its own drop (1.0 pp) fails b_max at 256
])
def test_limit_verdict_needs_4x_and_an_interval_above_zero(lars_at_256, pushes):
    from hvdscale.study.analysis import limit_verdict, protocol_summary

    sgd = {64: [0.862, 0.864, 0.866], 128: [0.861, 0.863, 0.865], 256: [0.847, 0.849, 0.851]}
    lars = {64: [0.862, 0.864, 0.866], 128: [0.861, 0.863, 0.865], 256: lars_at_256}
    runs = _runs("sgd", "scaled", sgd) + _runs("lars", "scaled", lars)
    summary = {o: {"scaled": protocol_summary(runs, o, "scaled")} for o in ("sgd", "lars")}
    v = limit_verdict(runs, summary)["lars"]["scaled"]
    assert v["sgd_b_max"] == 128          # SGD's drop at 256 is 1.5 pp
    if pushes:
        # equal n = 3 and equal s = 0.2 pp: Welch is the pooled t interval, df = 4
        half = 2.776445 * 0.2 * math.sqrt(2 / 3)
        assert v["b_max"] == 256 and v["ratio"] == 2
        assert v["diff_pp"]["estimate"] == pytest.approx(1.4)
        assert (v["diff_pp"]["ci_low"], v["diff_pp"]["ci_high"]) == \
            pytest.approx((1.4 - half, 1.4 + half), abs=1e-5)
        assert v["pushes_limit"] is False     # a clear gain, but only 2x: not the claim
    else:
        assert v["b_max"] == 128 and v["pushes_limit"] is False


def test_limit_verdict_true_at_4x():
    from hvdscale.study.analysis import limit_verdict, protocol_summary

    sgd = {32: [0.862, 0.864, 0.866], 64: [0.861, 0.863, 0.865], 128: [0.840, 0.842, 0.844],
           256: [0.820, 0.822, 0.824]}
    lars = {32: [0.862, 0.864, 0.866], 64: [0.861, 0.863, 0.865], 128: [0.861, 0.863, 0.865],
            256: [0.861, 0.863, 0.865]}
    runs = _runs("sgd", "scaled", sgd) + _runs("lars", "scaled", lars)
    summary = {o: {"scaled": protocol_summary(runs, o, "scaled")} for o in ("sgd", "lars")}
    v = limit_verdict(runs, summary)["lars"]["scaled"]
    assert (v["sgd_b_max"], v["b_max"], v["ratio"]) == (64, 256, 4)
    assert v["diff_pp"]["estimate"] == pytest.approx(4.1)
    assert v["pushes_limit"] is True

"""Scaling efficiency, target tracking and the B_crit rule on curves with a known answer."""
import pytest

from hvdscale.core.metrics import (SweepPoint, TargetTracker, b_crit_from_sweep,
                                   fit_steps_model, scaling_efficiency,
                                   strong_scaling_efficiency)
from hvdscale.errors import ConfigError

BATCHES = [64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]


def _paper_curve(s_min, b_crit, batches=BATCHES):
    """Steps to target under McCandlish et al.'s model, S(B) = S_min (1 + B_crit / B)."""
    return [SweepPoint(b, s_min * (1 + b_crit / b)) for b in batches]


@pytest.mark.parametrize("b_crit", [300, 1500, 5000])
def test_rule_finds_the_crossing_of_the_paper_model(b_crit):
    points = _paper_curve(50, b_crit)
    result = b_crit_from_sweep(points)
    # exact crossing of S(B) = 2 S(B0) B0 / B under the model: B = B_crit + 2 B0
    exact = b_crit + 2 * 64
    assert result.status == "measured"
    lo, hi = result.bracket
    assert lo < exact <= hi
    assert result.b_crit == pytest.approx(exact, rel=0.12)
    assert result.excess[64] == pytest.approx(1.0)


def test_fit_recovers_the_model_parameters_exactly_on_clean_data():
    s_min, b_crit = fit_steps_model(_paper_curve(80, 2000))
    assert s_min == pytest.approx(80) and b_crit == pytest.approx(2000)


def test_fit_refuses_a_curve_with_no_floor():
    # perfect scaling forever: S = c / B, no S_min
    assert fit_steps_model([SweepPoint(b, 64000 / b) for b in BATCHES]) is None
    assert fit_steps_model([SweepPoint(64, 100)]) is None


def test_perfect_scaling_never_crosses():
    result = b_crit_from_sweep([SweepPoint(b, 64000 / b) for b in BATCHES])
    assert result.b_crit is None and result.status == "above_range"
    assert "B_crit > 16384" in result.describe()


def test_missed_target_beyond_the_factor_gives_an_upper_bound():
    points = [SweepPoint(64, 1000), SweepPoint(256, 260),
              SweepPoint(1024, None, steps_run=200)]   # budget alone is 12.5x perfect scaling
    result = b_crit_from_sweep(points)
    assert result.status == "upper_bound" and result.bracket == (256, 1024)
    assert 256 < result.b_crit <= 1024
    assert result.describe().startswith("B_crit <=")


def test_missed_target_within_the_factor_is_undecided_and_later_points_decide():
    points = [SweepPoint(64, 1000), SweepPoint(128, None, steps_run=600),  # > 500 but < 2x (1000)
              SweepPoint(256, 700)]                                         # 2.8x: crossed
    result = b_crit_from_sweep(points)
    assert result.bracket == (128, 256) and result.status == "measured"


def test_smallest_batch_must_reach_the_target():
    result = b_crit_from_sweep([SweepPoint(64, None, steps_run=100), SweepPoint(128, 50)])
    assert result.b_crit is None and "smallest batch (64)" in result.describe()
    assert b_crit_from_sweep([SweepPoint(64, 10)]).status == "undefined"


def test_scaling_efficiency():
    assert scaling_efficiency(1800.0, 1000.0, 2) == pytest.approx(0.9)
    assert strong_scaling_efficiency(100.0, 25.0, 8) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="reference throughput"):
        scaling_efficiency(10.0, 0.0, 2)
    with pytest.raises(ConfigError, match="workers"):
        scaling_efficiency(10.0, 1.0, 0)


def test_target_tracker_keeps_the_first_crossing_and_the_best():
    t = TargetTracker(0.85)
    assert not t.observe(100, 0.80, 1.0, epoch=0.5)
    assert t.observe(200, 0.86, 2.0, epoch=1.0)
    assert not t.observe(300, 0.84, 3.0)
    assert not t.observe(400, 0.90, 4.0)
    assert (t.steps_to_target, t.time_to_target, t.epochs_to_target, t.best) == (200, 2.0, 1.0, 0.90)
    none = TargetTracker(None)
    none.observe(1, 0.5, 0.1)
    assert not none.reached and none.best == 0.5
    with pytest.raises(ConfigError, match="target accuracy"):
        TargetTracker(85)


# ---- McCandlish trade-off fitted with censored runs, seed bootstrap, 2x rule offset removed
from hvdscale.core.metrics import (b_crit_2x_offset_removed, bootstrap_tradeoff,  # noqa: E402
                                   fit_tradeoff)

SIZES = [32, 64, 128, 256, 512, 1024, 2048]


def _curve(s_min, e_min, sizes=SIZES, noise=None, seeds=1):
    import random
    rng = random.Random(1)
    pts = []
    for b in sizes:
        for _ in range(seeds):
            factor = 1.0 if noise is None else rng.lognormvariate(0.0, noise)
            pts.append(SweepPoint(b, (s_min + e_min / b) * factor))
    return pts


def test_tradeoff_fit_recovers_s_min_and_e_min():
    fit = fit_tradeoff(_curve(40, 12000))
    assert fit.s_min == pytest.approx(40, rel=0.02)
    assert fit.e_min == pytest.approx(12000, rel=0.02)
    assert fit.b_crit == pytest.approx(300, rel=0.03)


def test_censored_runs_are_inequalities():
    clean = _curve(40, 12000, sizes=SIZES[:-1])
    # a missed run whose budget lies below the curve agrees with it: the fit does not move
    agreeing = clean + [SweepPoint(2048, None, steps_run=30)]
    assert fit_tradeoff(agreeing).b_crit == pytest.approx(fit_tradeoff(clean).b_crit, rel=0.02)
    # a run that missed with a budget far above the curve says S(2048) > 400: S_min must rise
    binding = clean + [SweepPoint(2048, None, steps_run=400)]
    assert fit_tradeoff(binding).s_min > 1.5 * fit_tradeoff(clean).s_min
    # dropping censored runs (the old fit) would have ignored that evidence entirely
    assert fit_tradeoff([SweepPoint(64, None, steps_run=5), SweepPoint(128, 10)]) is None


def test_bootstrap_interval_covers_the_truth_and_narrows_with_seeds():
    fit, lo, hi, reps = bootstrap_tradeoff(_curve(40, 12000, noise=0.15, seeds=3),
                                           replicates=80)
    assert lo < 300 < hi and lo <= fit.b_crit <= hi and len(reps) > 60
    _, lo8, hi8, _ = bootstrap_tradeoff(_curve(40, 12000, noise=0.15, seeds=8), replicates=80)
    assert (hi8 - lo8) < (hi - lo)


def test_two_x_rule_with_offset_removed_matches_b_crit():
    value, raw = b_crit_2x_offset_removed(_curve(40, 40 * 700))
    assert raw.b_crit == pytest.approx(700 + 2 * 32, rel=0.1)
    assert value == pytest.approx(700, rel=0.12)

"""The study's plan with a stand-in trainer whose steps-to-target are known: the learning rate
is tuned per batch size around the scaled best of the previous one, the grid grows past an
edge, a diverged run is never chosen, the measurement runs use fresh seeds, budgets are >= 3x
the expected need, evaluation is fine enough, and bad settings are refused."""
import math
from types import SimpleNamespace

import pytest

pytest.importorskip("torch")

from hvdscale.errors import ConfigError  # noqa: E402
from hvdscale.study import inproc, sweep  # noqa: E402
from hvdscale.study.inproc import RunResult, crossing  # noqa: E402

from conftest import REPO  # noqa: E402

REPO_SGD = str(REPO / "pipelines" / "sweep_sgd.yaml")
N = 60000


def lr_opt(batch):
    return 0.06 * batch / 32         # the stand-in's best lr: linear in B, 6x the recipe's


def acc_opt(batch):
    return lr_opt(batch) / 2         # a long run prefers a gentler lr than the fastest one


def steps_model(batch, lr):
    base = 40 + 20000 / batch
    return base * (1 + math.log(lr / lr_opt(batch)) ** 2)


def fake_train(calls):
    def train(cfg, data):
        calls.append(cfg)
        if cfg.lr > 2.5 * lr_opt(cfg.batch_size):
            return RunResult(status="diverged", steps_run=3, diverged_at=3,
                             evals=[(0, 0.1, None)], accuracy_at_budget=0.1)
        steps = steps_model(cfg.batch_size, cfg.lr) * (1 + 0.01 * cfg.seed)
        if steps > cfg.max_steps:
            return RunResult(status="censored", steps_run=cfg.max_steps,
                             evals=[(0, 0.1, None), (cfg.max_steps, 0.5 - 0.01 * abs(
                                 math.log(cfg.lr / lr_opt(cfg.batch_size))), 1.0)])
        return RunResult(status="reached", steps_to_target=steps, steps_run=int(steps) + 1,
                         evals=[(0, 0.1, None), (int(steps) + 1, 0.9, 0.3)],
                         accuracy_at_budget=None if not cfg.accuracy_epochs else
                         0.85 - 0.01 * abs(math.log(cfg.lr / acc_opt(cfg.batch_size))))
    return train


@pytest.fixture
def study(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(inproc, "train", fake_train(calls))
    settings = sweep.StudySettings(recipes=[REPO_SGD], batch_sizes=[32, 128, 512, 2048],
                                   target=0.8, seeds=[1, 2, 3], expected_epochs=0.5)
    data = SimpleNamespace(n_train=N)
    st = sweep.Study(settings, tmp_path, log=lambda *_: None, data=data)
    st.run()
    return st, calls, settings


def test_lr_is_tuned_per_batch_size_with_edge_extension(study):
    st, calls, _ = study
    info = st.settings_out["sgd_linear_warmup"]
    for b in (32, 128, 512, 2048):
        grid = info["lr_grid"][str(b)]
        assert len(grid) >= 3
        ratios = [hi / lo for lo, hi in zip(grid, grid[1:])]
        assert all(r == pytest.approx(2.0) for r in ratios)         # log-spaced
        chosen = info["chosen_lr"][str(b)]
        assert grid[0] < chosen < grid[-1]                          # never left at an edge
        assert abs(math.log2(chosen / lr_opt(b))) <= 0.5 + 1e-9     # the best on the grid
    # B_ref's grid started at the recipe's lr (0.02 at 64 -> 0.01 at 32) and had to grow
    assert len(info["lr_grid"]["32"]) > 3
    # the accuracy at the budget is tuned too, and its best lr is re-run with the fresh seeds
    for b in (32, 128, 512, 2048):
        chosen = info["chosen_lr_accuracy"][str(b)]
        assert abs(math.log2(chosen / acc_opt(b))) <= 0.5 + 1e-9
        acc_runs = [r for r in st.runs if r["role"] == "accuracy" and r["batch_size"] == b]
        assert {r["seed"] for r in acc_runs} == {1, 2, 3} and {r["lr"] for r in acc_runs} == {chosen}


def test_measurement_uses_fresh_seeds_and_stated_budgets(study):
    st, calls, settings = study
    runs = st.runs
    tune = [r for r in runs if r["role"] == "tune"]
    measure = [r for r in runs if r["role"] == "measure"]
    assert {r["seed"] for r in tune} == {settings.tune_seed}
    assert {r["seed"] for r in measure} == {1, 2, 3}
    assert not any(r["status"] == "diverged" and r["role"] == "measure" for r in runs)
    assert any(r["status"] == "diverged" for r in tune)             # recorded as such
    by_batch = {}
    for r in measure:
        by_batch.setdefault(r["batch_size"], []).append(r)
    sizes = sorted(by_batch)
    for prev, b in zip(sizes, sizes[1:]):
        need = sorted(r["steps_to_target"] for r in by_batch[prev])[1]   # median at B_prev
        r = by_batch[b][0]
        cap = settings.max_budget_epochs * (N // b)
        assert r["budget_steps"] >= min(3 * need, cap) - 1
        assert r["eval_every"] <= 0.05 * need * prev / b + 1        # <= 5 % of the fewest steps
        assert r["steps_to_target"] < r["budget_steps"]
    assert all(c.accuracy_epochs for c in calls if c.seed == settings.tune_seed)


def test_crossing_is_interpolated():
    assert crossing((100, 0.70), (200, 0.80), 0.75) == pytest.approx(150)
    assert crossing((100, 0.78), (200, 0.80), 0.79) == pytest.approx(150)
    assert crossing((100, 0.81), (200, 0.85), 0.80) == 200     # already there: the later step


def test_bad_settings_are_refused(tmp_path):
    base = dict(recipes=[REPO_SGD], batch_sizes=[32, 64], target=0.8)
    with pytest.raises(ConfigError, match="fresh seeds"):
        sweep.check(sweep.StudySettings(**base, seeds=[0, 1]))
    with pytest.raises(ConfigError, match="target"):
        sweep.check(sweep.StudySettings(**{**base, "target": 1.5}))
    with pytest.raises(ConfigError, match="larger than the training set"):
        sweep.check(sweep.StudySettings(**{**base, "batch_sizes": [32, 4096]}, train_limit=1000))
    with pytest.raises(ConfigError, match="batch-sizes"):
        sweep.parse_batch_sizes("64")

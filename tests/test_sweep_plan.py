"""The study's plan (issue 21): protocol (a) uses exactly the scaling rule's lr from the lr
settled at B_ref, protocol (b) tries >= 4 lrs per batch and chooses on validation only (test
labels scrambled: the same choices), measurement runs use fresh seeds, every planned run is
run, --plan's estimate is steps x measured cost, and bad settings are refused."""
import math

import numpy as np
import pytest

pytest.importorskip("torch")

from hvdscale.errors import ConfigError  # noqa: E402
from hvdscale.study import sweep, timing  # noqa: E402

from conftest import REPO  # noqa: E402

DATA = REPO.parent / "nonexistent"
RECIPES = {"sgd": str(REPO / "pipelines" / "sweep_sgd.yaml"),
           "lars": str(REPO / "pipelines" / "sweep_lars.yaml")}


def _data(seed=0, n=1024, scramble_test=False):
    """A small separable 10-class task as (train, validation, test) ArrayDatasets."""
    from hvdscale.data.arrays import ArrayDataset
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(10, 28 * 28)).astype(np.float32)

    def split(m, k):
        y = np.random.default_rng(k).integers(0, 10, m)
        x = centers[y] + 1.5 * np.random.default_rng(k + 7).normal(size=(m, 28 * 28))
        return ArrayDataset(x.astype(np.float32).reshape(m, 28, 28, 1), y.astype(np.int64))
    train, val, test = split(n, 1), split(400, 2), split(400, 3)
    if scramble_test:
        test = type(test)(test.x, np.random.default_rng(9).permutation(test.y))
    return train, val, test


def _study(tmp_path, optimizer, data, **kw):
    settings = sweep.StudySettings(
        recipes=[RECIPES[optimizer]], batch_sizes=[32, 128], target=0.5, epochs=0.5,
        seeds=[1, 2], lr_factors=[0.25, 0.5, 1.0, 2.0], ref_lr_factors=[0.5, 1.0],
        evals_per_run=4, snapshots_per_run=4, probe_micro=8, probe_count=8, **kw)
    st = sweep.Study(settings, tmp_path, log=lambda *_: None, data=data)
    info = st.run_setting(RECIPES[optimizer])
    return st, info, settings


@pytest.mark.parametrize("optimizer, power", [("sgd", 1.0), ("lars", 0.5)])
def test_protocols_follow_the_rule_and_choose_on_validation(tmp_path, optimizer, power):
    st, info, s = _study(tmp_path, optimizer, _data())
    runs = st.runs
    lr_ref = info["lr_ref"]
    # (a) the rule's lr, computed here by hand: linear for SGD, square root for LARS
    for r in runs:
        if r["protocol"] == "scaled" and r["role"] == "measure":
            assert r["lr"] == pytest.approx(lr_ref * (r["batch"] / 32) ** power, rel=1e-12)
    # the settle step at B_ref picked the best validation accuracy, never the test one
    settle = [r for r in runs if r["role"] == "tune" and r["batch"] == 32]
    assert len([r for r in settle if not r["extension"]]) == \
        len(s.ref_lr_factors) * (2 if optimizer == "lars" else 1)
    best = max(settle, key=lambda r: (r["val_accuracy"], -r["lr"]))
    assert (best["lr"], best["options"]) == (lr_ref, info["settled_options"])
    # (b) >= 4 lrs around the rule's, the best on validation, fresh seeds for the measurement
    tune = [r for r in runs if r["protocol"] == "tuned" and r["role"] == "tune"]
    assert sorted(r["lr"] for r in tune if not r["extension"]) == pytest.approx(
        sorted(lr_ref * 4 ** power * f for f in s.lr_factors))
    # a grid is only extended past the edge its best sat on, by halving or doubling
    for grid in (settle, tune):
        base = [r for r in grid if not r["extension"]]
        for k, r in enumerate(r for r in grid if r["extension"]):
            before = base + [e for e in grid if e["extension"]][:k]
            lrs = [b["lr"] for b in before]
            assert r["lr"] in (pytest.approx(min(lrs) / 2), pytest.approx(max(lrs) * 2))
    assert info["chosen_lr"]["128"] == max(tune, key=lambda r: (r["val_accuracy"],
                                                                -r["lr"]))["lr"]
    measure = [r for r in runs if r["role"] == "measure"]
    assert {r["seed"] for r in measure} == {1, 2} and {r["seed"] for r in runs if
                                                        r["role"] == "tune"} == {0}
    # every planned run was run, no more
    planned = sweep.plan(s, sweep.read_setting(RECIPES[optimizer]), len(st.data[0]))
    key = lambda r: (r["protocol"], r["role"], r["batch"], r["seed"])  # noqa: E731
    assert sorted(key(p) for p in planned if not p.get("extension")) == \
        sorted(key(r) for r in runs if not r["extension"])
    for k in {key(p) for p in planned}:      # extensions: within the planned upper bound
        assert sum(key(r) == k and r["extension"] for r in runs) <= \
            sum(key(p) == k and p.get("extension", False) for p in planned)
    assert all(r["steps"] == p["steps"] for r in runs for p in planned
               if key(r) == key(p) and not r["diverged"])


def _tune(optimum, factors, extend, diverge_above=None):
    """extend_to_interior on a validation accuracy that peaks at lr = `optimum` (a parabola
    in log2 lr; chance above `diverge_above`), starting from `factors`."""
    def record(lr, options=None):
        acc = 0.1 if diverge_above and lr > diverge_above else \
            0.9 - 0.01 * (np.log2(lr) - np.log2(optimum)) ** 2
        return {"lr": lr, "options": options or {}, "val_accuracy": acc}
    return sweep.extend_to_interior([record(f) for f in factors], record, extend)


def test_grid_grows_past_the_edge_until_the_best_lr_is_inside():
    grid = [0.25, 0.5, 1.0, 2.0]
    # optimum at 1/16: three halvings reach 1/32, and the best (1/16) is then inside
    lrs = [r["lr"] for r in _tune(1 / 16, grid, extend=5)]
    assert lrs[4:] == [0.125, 0.0625, 0.03125]
    assert sweep.choose_on_validation(_tune(1 / 16, grid, 5))["lr"] == 0.0625
    # optimum at 8 (LARS/LAMB wanted larger lrs): doubling
    assert [r["lr"] for r in _tune(8.0, grid, 5)][4:] == [4.0, 8.0, 16.0]
    # an interior optimum adds nothing; the budget caps the growth
    assert len(_tune(0.7, grid, 5)) == 4
    assert len(_tune(1e-4, grid, 2)) == 6
    # everything diverged (chance everywhere): the grid goes down, not up
    lrs = [r["lr"] for r in _tune(0.01, grid, 3, diverge_above=0.1)]
    assert lrs[4:] == [0.125, 0.0625, 0.03125]


def test_choices_do_not_depend_on_test_labels(tmp_path):
    a, info_a, _ = _study(tmp_path / "a", "sgd", _data())
    b, info_b, _ = _study(tmp_path / "b", "sgd", _data(scramble_test=True))
    assert info_a["lr_ref"] == info_b["lr_ref"]
    assert info_a["chosen_lr"] == info_b["chosen_lr"]
    assert [r["val_accuracy"] for r in a.runs] == [r["val_accuracy"] for r in b.runs]
    # the test labels did change what is reported: scrambled, the test accuracy is near chance
    assert max(r["test_accuracy"] for r in a.runs) > 0.5
    assert max(r["test_accuracy"] for r in b.runs) < 0.25


def test_plan_counts_and_the_wall_estimate():
    settings = sweep.StudySettings(recipes=[RECIPES["lars"]], batch_sizes=[64, 256, 1024],
                                   target=0.8, epochs=2, seeds=[1, 2, 3])
    runs = sweep.plan(settings, sweep.read_setting(RECIPES["lars"]), 55000)
    # settle: 3 lrs x 2 trust coefficients (+ 3 extensions at most); scaled: 3 batches x 3
    # seeds; tuned: 2 x (4 + 3 extensions at most + 3)
    assert len(runs) == 6 + 3 + 9 + 20
    costs = {b: {"step_s": step, "eval_s": 0.1, "run_s": 0.5, "probe_s": 0.3}
             for b, step in ((64, 0.002), (256, 0.005), (1024, 0.02))}
    est = timing.estimate(runs, costs, evals_per_run=16, jobs=3, cores=2,
                          probes_per_setting=sweep.probes_planned(settings))
    by_batch = {64: 6 + 3 + 3, 256: 3 + 10, 1024: 3 + 10}
    steps = {b: 2 * (55000 // b) for b in by_batch}
    # 16 evaluations and the rest of each run; 32 snapshots x 3 seeds probed at most
    cpu = sum(n * (steps[b] * costs[b]["step_s"] + 16 * 0.1 + 0.5)
              for b, n in by_batch.items()) + 96 * 0.3
    assert est["runs"] == 38 and est["cpu_s"] == pytest.approx(cpu)
    assert est["wall_s"] == pytest.approx(cpu)          # one optimizer: one process busy


def test_bad_settings_are_refused():
    base = dict(recipes=[RECIPES["sgd"]], batch_sizes=[64, 256], target=0.8)
    for kw, needle in (({"lr_factors": [0.5, 1, 2]}, ">= 4 learning rates"),
                       ({"seeds": [0, 1]}, "fresh seeds"), ({"target": 1.5}, "--target"),
                       ({"batch_sizes": [64, 60000]}, "larger than the training split"),
                       ({"train_limit": 1024}, "--probe 64x32 needs 2048")):
        with pytest.raises(ConfigError, match=needle):
            sweep.check(sweep.StudySettings(**{**base, **kw}))


def test_report_names_a_choice_left_on_a_grid_edge():
    from hvdscale.study.report import grid_edges

    def run(role, batch, lr, protocol="tuned", options=None):
        return {"optimizer": "sgd", "protocol": protocol, "role": role, "batch": batch,
                "lr": lr, "options": options or {}}
    runs = [run("tune", 512, lr) for lr in (0.1, 0.2, 0.4)] + [run("measure", 512, 0.2)]
    runs += [run("tune", 1024, lr) for lr in (0.05, 0.1, 0.2)] + [run("measure", 1024, 0.05)]
    # B_ref's settle grid crosses an option: only the chosen option's lrs count
    runs += [run("tune", 64, lr, "scaled", {"b": b}) for lr in (0.01, 0.02) for b in (1, 2)]
    runs += [run("tune", 64, 0.04, "scaled", {"b": 2})]
    runs += [run("measure", 64, 0.02, "scaled", {"b": 1}), run("measure", 512, 0.16, "scaled")]
    assert grid_edges(runs) == [("sgd", "scaled", 64, 0.02, "highest"),
                                ("sgd", "tuned", 1024, 0.05, "lowest")]

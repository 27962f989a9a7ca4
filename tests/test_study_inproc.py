"""The study's in-process run on a small synthetic task: it stops at an interpolated target
crossing, records divergence as such, and scores the fixed epoch budget on a decayed branch."""
import pytest

torch = pytest.importorskip("torch")

from hvdscale.study.inproc import Data, RunConfig, train  # noqa: E402


def _data(n=2048):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = (x[:, 0, :2, :2].sum((1, 2)) > 0).long() * 3 + (x[:, 0, 5, 5] > 0).long()
    return Data(x, y, x[:512], y[:512], x[:1024], y[:1024])


def _cfg(**kw):
    base = dict(optimizer="sgd", optimizer_cfg={"momentum": 0.9}, model="mlp", batch_size=32,
                lr=0.02, seed=1, max_steps=300, eval_every=5, target=0.6, warmup_steps=5)
    base.update(kw)
    return RunConfig(**base)


def test_stops_at_the_interpolated_crossing():
    res = train(_cfg(), _data())
    assert res.status == "reached"
    i = next(k for k, (_, acc, _) in enumerate(res.evals) if acc >= 0.6)
    (s0, a0, _), (s1, a1, _) = res.evals[i - 1], res.evals[i]
    assert s0 < res.steps_to_target <= s1
    assert res.steps_to_target == pytest.approx(s0 + (0.6 - a0) / (a1 - a0) * (s1 - s0))
    assert res.steps_run == s1                       # no accuracy budget: stop right there


def test_divergence_is_recorded():
    res = train(_cfg(lr=500.0, warmup_steps=0), _data())
    assert res.status == "diverged" and res.steps_to_target is None
    assert res.diverged_at is not None and res.steps_run < 300


def test_accuracy_budget_on_a_decayed_branch():
    data = _data()
    res = train(_cfg(accuracy_epochs=1.0, keep_target_state=True), data)
    assert res.status == "reached" and res.accuracy_at_budget > 0.6
    assert res.target_state["step"] == res.evals[-1][0]
    # the branch leaves the constant-lr run untouched: same steps to target without it
    assert train(_cfg(), data).steps_to_target == pytest.approx(res.steps_to_target)


def test_snapshots_continue_past_the_target():
    res = train(_cfg(snapshot_every=4, continue_after_target=0.5), _data())
    assert res.status == "reached"
    last = res.snapshots[-1]["step"]
    # training went on to 1.5x the steps to target, and snapshots lie on both sides of it
    assert res.steps_run >= 1.5 * res.steps_to_target > res.steps_run - 1
    assert res.snapshots[0]["step"] < res.steps_to_target < last
    assert [s["step"] for s in res.snapshots] == list(range(4, last + 1, 4))

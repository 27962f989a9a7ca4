"""The torch helpers of the online noise scale: the probe sees each micro-batch's own gradient,
and on a linear model with a known per-example gradient distribution the whole pipeline
(probe -> OnlineNoiseScale -> estimator) recovers B_simple."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hvdscale.core.noise_scale import unbiased_estimates  # noqa: E402
from hvdscale.study.gns import OnlineNoiseScale, split_for_estimate  # noqa: E402
from hvdscale.study.gns_torch import LocalGradientProbe, grad_sq_norm  # noqa: E402

torch.set_num_threads(1)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _grad_sq(model, x, y):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return float(sum((g.double() ** 2).sum() for g in grads))


def test_probe_records_each_pass_before_accumulation_and_undoes_the_loss_scale():
    model = _mlp()
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(8, 6, generator=gen) for _ in range(3)]
    ys = [torch.randint(0, 3, (8,), generator=gen) for _ in range(3)]
    expected = [_grad_sq(model, x, y) for x, y in zip(xs, ys)]
    probe = LocalGradientProbe(model.parameters())
    probe.arm()
    for x, y in zip(xs, ys):   # gradient accumulation with the loss averaged over 3 micro-batches
        (torch.nn.functional.cross_entropy(model(x), y) / 3).backward()
    norms = probe.collect(loss_scale=1 / 3)
    np.testing.assert_allclose(norms, expected, rtol=1e-5)
    # .grad holds the accumulated mean gradient, and its norm is not any single pass's
    mean_sq = grad_sq_norm(model.parameters())
    assert all(abs(mean_sq - n) > 1e-6 for n in norms)
    # disarmed after collect: later passes are not recorded and leave no hooks behind
    assert not probe.armed
    torch.nn.functional.cross_entropy(model(xs[0]), ys[0]).backward()
    assert probe.collect() == []


def test_unused_parameters_add_nothing():
    model = _mlp()
    extra = torch.nn.Parameter(torch.ones(4))
    probe = LocalGradientProbe(list(model.parameters()) + [extra])
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    probe.arm()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert probe.collect() == pytest.approx([_grad_sq(model, x, y)], rel=1e-5)


def _population(n=4096, dim=8, seed=0):
    """Linear regression at fixed weights: per-example gradients (x.w - y) x in closed form."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    w_true = rng.normal(size=dim)
    y = x @ w_true + rng.normal(size=n) * 2.0
    w = w_true + 0.8 * rng.normal(size=dim)          # evaluate away from the optimum
    per_example = (x @ w - y)[:, None] * x
    grad = per_example.mean(0)
    trace = float(np.sum(per_example.var(0)))       # sampling with replacement: population Sigma
    return x, y, w, trace / float(grad @ grad)


def test_single_process_split_batch_recovers_b_simple_of_a_linear_model():
    x, y, w, truth = _population()
    model = torch.nn.Linear(x.shape[1], 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(w)[None])
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    per_worker = 32
    assert split_for_estimate(workers=1, accumulation=1) == 2
    gns = OnlineNoiseScale.for_step(every=1, ema=0.99, per_worker=per_worker, accumulation=1,
                                    workers=1)
    assert (gns.b_small, gns.b_big) == (16, 32)
    probe = LocalGradientProbe(model.parameters())
    gen = torch.Generator().manual_seed(3)
    singles = []
    for step in range(1500):
        assert gns.due(step)
        model.zero_grad()
        batch = torch.randint(0, len(xt), (per_worker,), generator=gen)
        probe.arm()
        for half in batch.chunk(2):       # the split the trainer makes on a due step
            pred = model(xt[half]).squeeze(1)
            (0.5 * ((pred - yt[half]) ** 2).mean() / 2).backward()
        small = probe.collect(loss_scale=0.5)
        big = grad_sq_norm(model.parameters())
        log = gns.record(small, big)
        singles.append(unbiased_estimates(np.mean(small), 16, big, 32))
    singles = np.array(singles)
    ratio = singles[:, 1].mean() / singles[:, 0].mean()
    spread = np.std(singles[:, 1] - ratio * singles[:, 0], ddof=1) / singles[:, 0].mean()
    n_eff = (1 + 0.99) / (1 - 0.99)
    tolerance = 4 * spread / math.sqrt(n_eff)
    assert abs(log["b_simple"] - truth) < tolerance, (log["b_simple"], truth, tolerance)
    assert tolerance < 0.5 * truth, (tolerance, truth)
    assert log["gns_samples"] == 1500


def test_record_checks_the_number_of_micro_batches():
    gns = OnlineNoiseScale.for_step(every=5, ema=0.9, per_worker=16, accumulation=4, workers=2)
    assert (gns.b_small, gns.b_big) == (16, 128)
    with pytest.raises(ValueError, match="expected 4 micro-batch"):
        gns.record([1.0, 2.0], 0.5)
    assert [s for s in range(12) if gns.due(s)] == [0, 5, 10]


def test_trainer_helper_splits_a_single_worker_step_and_logs_the_exact_estimate():
    from types import SimpleNamespace

    from hvdscale.comm import Comm
    from hvdscale.study.gns_torch import TorchNoiseScale

    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)     # weights stay: exact check
    noise = TorchNoiseScale(SimpleNamespace(every=2, ema=0.5),
                            SimpleNamespace(per_worker=8, accumulation=1), Comm("torch"), model)
    gen = torch.Generator().manual_seed(4)
    # one class only: a consistent gradient direction, so |G|^2 comes out positive
    x, y = torch.randn(8, 6, generator=gen), torch.zeros(8, dtype=torch.long)
    logs = []
    for _ in range(3):
        optimizer.zero_grad()
        pieces = noise.micro_batches(accumulation=1)
        for xb, yb in zip(x.chunk(pieces), y.chunk(pieces)):
            (torch.nn.functional.cross_entropy(model(xb), yb) / pieces).backward()
        logs.append(noise.step(optimizer, [1 / pieces] * pieces))
    assert logs[1] is None and logs[0] is not None and logs[2]["gns_samples"] == 2
    halves = [_grad_sq(model, xb, yb) for xb, yb in zip(x.chunk(2), y.chunk(2))]
    big = _grad_sq(model, x, y)
    g2, trace = unbiased_estimates(sum(halves) / 2, 4, big, 8)
    assert g2 > 0 and logs[0]["gns_g2"] == pytest.approx(g2, rel=1e-5)
    assert logs[0]["b_simple"] == pytest.approx(trace / g2, rel=1e-5)
    assert not noise.probe.armed

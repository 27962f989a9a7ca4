"""hvdscale.tensorflow.keras, Horovod's Keras API under Keras 3, with real `horovodrun -np 2`
jobs under Gloo and MPI (one job per controller runs every case: tests/workers/keras_dropin.py,
then Horovod's own ported test cases in the same processes).

Checked here: after model.fit both ranks hold bitwise the same weights, equal (float tolerance)
to one process fitting the global batch (SGD+momentum, the same with fp16 compression, Adam,
LAMB with backward_passes_per_step=2, LARS); MetricAverageCallback makes the history identical
on the ranks and equal to the mean of the local logs; Horovod's warm-up and schedule callbacks give
Horovod's learning rates (formulas computed here independently); CoreScheduleCallback gives
the engine's (hvdscale.engine.lr.plan_lr) per update; NoiseScaleCallback's B_simple follows
McCandlish et al.'s estimator from the recorded norms; Horovod's test cases pass.
"""
import json
import math
import re
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import WORKERS, horovodrun

pytestmark = pytest.mark.multiproc
WORKER = WORKERS / "keras_dropin.py"
FIT_CASES = ("sgd", "sgd_fp16", "adam", "lamb_accum2", "lars")
SIZE, PER_RANK = 2, 16


@pytest.fixture(scope="module", params=["gloo", "mpi"])
def job(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"keras_{request.param}")
    proc = horovodrun(SIZE, sys.executable, WORKER, out, controller=request.param, timeout=600)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(SIZE)]
    assert ranks[0]["controller"] == request.param
    return SimpleNamespace(out=out, ranks=ranks, log=proc.stdout + proc.stderr)


def weights(path):
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


@pytest.mark.parametrize("case", FIT_CASES)
def test_fit_ranks_identical_and_equal_to_one_process_on_the_global_batch(job, case):
    rank0, rank1 = (weights(job.out / f"{case}.rank{r}.npz") for r in range(SIZE))
    single = weights(job.out / f"{case}.single.npz")
    for a, b, s in zip(rank0, rank1, single):
        assert a.tobytes() == b.tobytes(), f"{case}: ranks disagree after model.fit"
        if case.endswith("fp16"):    # gradients rounded to float16 on the wire
            np.testing.assert_allclose(a, s, rtol=1e-2, atol=2e-3, err_msg=case)
        else:
            np.testing.assert_allclose(a, s, rtol=1e-4, atol=1e-5, err_msg=case)
    # and training moved the weights (a no-op optimizer would also agree with itself)
    assert job.ranks[0][case]["iterations"] == 2 * 6


@pytest.mark.parametrize("case", FIT_CASES)
def test_history_identical_on_every_rank_and_the_mean_of_local_logs(job, case):
    histories = [r[case]["history"] for r in job.ranks]
    assert histories[0] == histories[1]
    locals_ = [r[case]["local"] for r in job.ranks]
    assert locals_[0] != locals_[1], "ranks saw different data; local logs should differ"
    for epoch, logs in enumerate(zip(*locals_)):
        for key in ("loss", "accuracy"):
            mean = sum(log[key] for log in logs) / len(logs)
            assert histories[0][key][epoch] == pytest.approx(mean, rel=1e-6), (key, epoch)


def horovod_lr(epoch, batch, steps_per_epoch, initial_lr, size):
    """Horovod's LearningRate{Warmup,Schedule}Callback for the worker's lr_case, written out."""
    if epoch < 2:        # warm-up over 2 epochs, set before every batch
        e = epoch + batch / steps_per_epoch + 1 / steps_per_epoch
        return initial_lr / size * (e * (size - 1) / 2 + 1)
    if epoch < 4:        # staircase multiplier 0.5 ** (epoch - 2)
        return initial_lr * 0.5 ** (epoch - 2)
    return initial_lr / (1 + epoch + batch / steps_per_epoch)    # smooth, from epoch 4 on


def test_warmup_and_schedule_callbacks_give_horovods_learning_rates(job):
    for r in job.ranks:
        rates = r["lr"]["rates"]
        assert len(rates) == 6 * 5
        for epoch, batch, lr in rates:
            want = horovod_lr(epoch, batch, 5, 0.1 * SIZE, SIZE)
            assert lr == pytest.approx(want, rel=1e-6), (epoch, batch)
        # the last batch of the warm-up reaches initial_lr; logs['lr'] each epoch's last lr
        assert rates[9][2] == pytest.approx(0.1 * SIZE, rel=1e-6)
        assert r["lr"]["lr_logs"] == pytest.approx([rates[e * 5 + 4][2] for e in range(6)])


def test_momentum_correction_is_horovods(job):
    fitted = weights(job.out / "momentum.fit.npz")
    horovod_rule = weights(job.out / "momentum.horovod_rule.npz")
    for a, b in zip(fitted, horovod_rule):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("key,passes", [("core_schedule", 1), ("core_schedule_accum2", 2)])
def test_core_schedule_callback_gives_the_engines_learning_rate_per_update(job, key, passes):
    from hvdscale.engine.lr import plan_lr
    cfg = SimpleNamespace(
        optimizer=SimpleNamespace(base_lr=0.05), batch=SimpleNamespace(reference=PER_RANK),
        lr=SimpleNamespace(scaling="linear", warmup="linear", warmup_epochs=1, warmup_steps=None,
                           decay="cosine", milestones=(), gamma=0.1, power=2.0, end_lr=0.0,
                           decay_rate=0.97, decay_epochs=1.0))
    plan = plan_lr(cfg, global_batch=SIZE * PER_RANK * passes, steps_per_epoch=4, total_steps=12)
    for r in job.ranks:
        rates = r[key]["rates"]
        assert len(rates) == 12 * passes and r[key]["iterations"] == 12
        for i, (_, _, lr) in enumerate(rates):
            assert lr == np.float32(plan.schedule(i // passes)), i
    assert plan.peak_lr == 0.05 * SIZE * passes


def test_noise_scale_callback_follows_the_estimator(job):
    b_small, b_big, ema = PER_RANK, SIZE * PER_RANK, 0.5
    norms = [r["noise"]["norms"] for r in job.ranks]
    g2_avg = trace_avg = weight = 0.0
    samples = 0
    for step in range(0, len(norms[0]), 2):     # every=2: steps 0, 2, 4
        small = sum(n[step][0] for n in norms) / SIZE
        big = norms[0][step][1]
        assert norms[1][step][1] == big          # the allreduced gradient is the same
        g2 = (b_big * big - b_small * small) / (b_big - b_small)
        trace = (small - big) / (1 / b_small - 1 / b_big)
        g2_avg, trace_avg = ema * g2_avg + (1 - ema) * g2, ema * trace_avg + (1 - ema) * trace
        weight = ema * weight + (1 - ema)
        samples += 1
    logs = [r["noise"]["logs"] for r in job.ranks]
    assert logs[0] == logs[1]
    assert logs[0]["gns_samples"] == samples == 3
    assert logs[0]["gns_g2"] == pytest.approx(g2_avg / weight, rel=1e-5)
    assert logs[0]["gns_trace"] == pytest.approx(trace_avg / weight, rel=1e-5)
    if g2_avg > 0:
        assert logs[0]["b_simple"] == pytest.approx(trace_avg / g2_avg, rel=1e-5)
    assert all(math.isfinite(n[0]) and n[0] > 0 for ns in norms for n in ns)


def test_horovods_own_keras_test_cases_pass(job):
    codes = [(job.out / f"cases.rank{r}.txt").read_text() for r in range(SIZE)]
    assert codes == ["0", "0"], job.log[-6000:]
    # pytest -q's last line on each rank: "12 passed, 2 skipped, 4 warnings in 27.4s"
    summaries = re.findall(r"<stdout>:(\d+ (?:passed|failed|error).*) in [\d.]+s", job.log)
    assert len(summaries) == SIZE, job.log[-6000:]
    for summary in summaries:
        assert "failed" not in summary and "error" not in summary, summary
        assert int(summary.split(" passed")[0]) >= 12, summary

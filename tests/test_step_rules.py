"""The step rules every trainer shares (hvdscale/core/step.py), checked against the documented
table of `faults.nonfinite` written out here independently, and against NumPy."""
import itertools
from types import SimpleNamespace

import numpy as np
import pytest

from hvdscale.core.step import (NonFiniteRule, average_running_statistics,
                                check_step_settings, step_stats)
from hvdscale.errors import ConfigError


@pytest.mark.parametrize("policy,loss_scaled",
                         list(itertools.product(("off", "skip", "abort"), (False, True))))
def test_nonfinite_rule_follows_the_documented_table(policy, loss_scaled):
    rule = NonFiniteRule(policy, loss_scaled=loss_scaled)
    for loss_ok, grads_ok in itertools.product((True, False), repeat=2):
        given = grads_ok if rule.check_gradients else None
        bad = rule.bad(np.bool_(loss_ok), None if given is None else np.bool_(given))
        # docs/architecture.md: off counts nothing; fp16 counts a bad loss only; else either
        want = policy != "off" and (not loss_ok or (not grads_ok and not loss_scaled))
        assert bool(bad) is want, (loss_ok, grads_ok)
    # only skip drops updates, and not under a loss scaler (it skips overflows itself)
    assert rule.drops_updates == (policy == "skip" and not loss_scaled)
    assert rule.check_gradients == (policy != "off" and not loss_scaled)


def test_step_stats_turns_the_device_counters_into_read_stats_answer():
    assert step_stats(12.5, 64.0, 0.0, -1.0, 4) == {
        "loss_sum": 12.5, "examples": 64, "steps": 4, "nonfinite_steps": 0,
        "first_nonfinite_step": None}
    assert step_stats(1.0, 32.0, 2.0, 3.0, 5)["first_nonfinite_step"] == 3


class FakeComm:
    def __init__(self, size, controller="gloo"):
        self.distributed, self.size, self.controller = size > 1, size, controller
        self.others = [np.array([3.0, 5.0])]     # what the other rank holds

    def allreduce_many(self, arrays):
        return [(a.astype(np.float64) + o) / self.size for a, o in zip(arrays, self.others)]


def test_running_statistics_are_averaged_in_their_own_dtype_and_not_read_on_one_rank():
    def unread():
        raise AssertionError("read on one rank")
    assert average_running_statistics(FakeComm(1), unread) is None
    (avg,) = average_running_statistics(FakeComm(2), lambda: [np.array([1.0, 2.0], np.float32)])
    assert avg.dtype == np.float32 and np.array_equal(avg, [2.0, 3.5])


def cfg(precision="fp32", compile=False, adasum=False):
    return SimpleNamespace(train=SimpleNamespace(precision=precision, compile=compile),
                           horovod=SimpleNamespace(adasum=adasum))


@pytest.mark.parametrize("settings,gpu,comm,message", [
    (cfg(precision="fp16"), False, FakeComm(1), "train.precision fp16 needs a GPU"),
    (cfg(compile=True), True, FakeComm(1), "train.compile: not here; leave it false"),
    (cfg(adasum=True), False, FakeComm(2), "horovod.adasum on CPU needs Horovod's MPI"),
])
def test_settings_a_trainer_refuses_before_it_builds(settings, gpu, comm, message):
    with pytest.raises(ConfigError, match=message):
        check_step_settings(settings, comm, gpu=gpu, compile_refusal="not here")
    check_step_settings(cfg(), comm, gpu=gpu, compile_refusal="not here")      # the defaults
    check_step_settings(cfg(adasum=True), FakeComm(2, "mpi"), gpu=False, compile_refusal="")

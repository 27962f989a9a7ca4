"""hvdscale.core.schedules: warm-up and decay as pure functions of the step."""
import math
import pickle

import pytest

from hvdscale.core import LRScheduleSpec, build_lr_schedule
from hvdscale.errors import ConfigError


def sched(spe=10, total=100, base=0.1, peak=0.8, **spec):
    return build_lr_schedule(LRScheduleSpec(**spec), base, peak, spe, total)


def test_linear_warmup_goes_from_base_to_peak_over_fractional_epochs():
    s = sched(spe=10, warmup="linear", warmup_epochs=0.5)  # 5 steps
    assert s.warmup_steps == 5
    assert [s(t) for t in range(7)] == pytest.approx([0.1, 0.24, 0.38, 0.52, 0.66, 0.8, 0.8])


def test_zero_warmup_starts_above_zero_and_reaches_peak_at_last_warmup_step():
    s = sched(warmup="zero", warmup_steps=4, base=0.5)  # base is not used by 'zero'
    assert [s(t) for t in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8])


def test_warmup_steps_take_precedence_over_epochs_and_none_disables_it():
    assert sched(warmup_steps=3, warmup_epochs=2.0).warmup_steps == 3
    s = sched(warmup="none", warmup_epochs=2.0)
    assert s.warmup_steps == 0 and s(0) == 0.8


def test_multistep_divides_by_ten_at_absolute_epoch_milestones():
    # Goyal et al. ImageNet: /10 at epochs 30, 60, 80 of 90, with a 5-epoch warm-up
    s = sched(spe=2, total=180, warmup_epochs=5, decay="multistep", milestones=(30, 60, 80), gamma=0.1)
    assert s(9) == pytest.approx(0.73) and s(10) == 0.8 and s(59) == 0.8
    assert s(60) == pytest.approx(0.08) and s(119) == pytest.approx(0.08)
    assert s(120) == pytest.approx(0.008) and s(160) == pytest.approx(0.0008)
    assert s(10_000) == pytest.approx(0.0008)


def test_cosine_decays_from_peak_after_warmup_to_the_floor():
    s = sched(total=110, warmup_steps=10, decay="cosine", end_lr=0.05)
    assert s(10) == pytest.approx(0.8)
    assert s(60) == pytest.approx(0.05 + 0.75 * 0.5)  # half-way: mid value
    assert s(35) == pytest.approx(0.05 + 0.75 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert s(110) == pytest.approx(0.05) and s(500) == pytest.approx(0.05)
    values = [s(t) for t in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_polynomial_power_two_as_in_the_mlperf_lars_recipe():
    s = sched(total=20, warmup_steps=0, warmup="none", decay="polynomial", power=2.0, end_lr=0.0)
    assert s(0) == 0.8
    assert s(10) == pytest.approx(0.8 * 0.25)
    assert s(15) == pytest.approx(0.8 * 0.0625)
    assert s(20) == 0.0


def test_exponential_decays_per_epoch_and_freezes_after_total_steps():
    s = sched(spe=4, total=40, warmup="none", decay="exponential", decay_rate=0.5, decay_epochs=2)
    assert s(0) == 0.8 and s(8) == pytest.approx(0.4) and s(4) == pytest.approx(0.8 / math.sqrt(2))
    assert s(40) == pytest.approx(0.8 * 0.5 ** 5) and s(41) == s(40)


def test_constant_after_warmup_and_table_matches_calls():
    s = sched(total=12, warmup_steps=2)
    assert s.table() == [s(t) for t in range(13)]
    assert s(12) == s(1000) == 0.8


def test_schedule_is_pure_and_picklable():
    s = sched(total=50, warmup_steps=5, decay="cosine")
    first = [s(t) for t in (7, 3, 40, 3)]
    assert first[1] == first[3]
    again = pickle.loads(pickle.dumps(s))
    assert [again(t) for t in (7, 3, 40, 3)] == first


def test_spec_from_a_recipe_section_ignores_other_keys():
    spec = LRScheduleSpec.from_config({"scaling": "sqrt", "warmup": "zero", "warmup_epochs": 1,
                                       "decay": "multistep", "milestones": [2, 3], "gamma": 0.5})
    assert spec.warmup == "zero" and spec.milestones == [2, 3] and spec.gamma == 0.5
    s = build_lr_schedule({"decay": "cosine", "warmup": "none"}, 0.1, 0.1, 1, 10)
    assert s(10) == 0.0


@pytest.mark.parametrize("spec, args, needle", [
    (dict(warmup="cosine"), {}, "unknown warm-up 'cosine'"),
    (dict(decay="step"), {}, "unknown lr decay 'step'"),
    (dict(decay="multistep"), {}, "at least one milestone"),
    (dict(decay="multistep", milestones=(5, 2)), {}, "increasing"),
    (dict(warmup_epochs=-1.0), {}, "warmup_epochs"),
    (dict(end_lr=5.0), {}, "end_lr"),
    (dict(gamma=0.0), {}, "gamma"),
    ({}, dict(peak_lr=0.0), "peak_lr"),
    ({}, dict(steps_per_epoch=0), "steps_per_epoch"),
    ({}, dict(total_steps=2.5), "total_steps"),
])
def test_bad_spec_is_a_config_error_naming_the_field(spec, args, needle):
    call = dict(base_lr=0.1, peak_lr=0.8, steps_per_epoch=10, total_steps=100)
    call.update(args)
    with pytest.raises(ConfigError, match=needle):
        build_lr_schedule(LRScheduleSpec(**spec), **call)

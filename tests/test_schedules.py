"""cosine_lr, linear_lr, wsd_lr and CosineScheduler: boundary values, per-group base LRs, resume."""
import math

import pytest
import torch

from training import CosineScheduler, cosine_lr, linear_lr, wsd_lr

SETTINGS = dict(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=110)


@pytest.mark.parametrize("schedule", [cosine_lr, linear_lr])
def test_boundaries(schedule):
    assert schedule(0, **SETTINGS) == 0.0                            # warmup starts at 0
    assert schedule(5, **SETTINGS) == pytest.approx(5e-4, rel=1e-12)  # max_lr * 5 / 10
    assert schedule(10, **SETTINGS) == pytest.approx(1e-3, rel=1e-12)  # warmup end: the peak
    assert schedule(110, **SETTINGS) == pytest.approx(1e-4, rel=1e-12)  # total: min_lr
    assert schedule(10_000, **SETTINGS) == 1e-4                        # beyond: stays at min_lr


def test_cosine_midpoint_and_quarter_are_hand_values():
    # halfway through the decay, cos(pi/2) = 0: the mean of max and min
    assert cosine_lr(60, **SETTINGS) == pytest.approx(5.5e-4, rel=1e-12)
    # a quarter of the way, (1 + cos(pi/4)) / 2 = 0.853553...
    expected = 1e-4 + 9e-4 * (1 + math.sqrt(0.5)) / 2
    assert cosine_lr(35, **SETTINGS) == pytest.approx(expected, rel=1e-12)


def test_linear_midpoint_is_hand_value():
    assert linear_lr(60, **SETTINGS) == pytest.approx(5.5e-4, rel=1e-12)
    assert linear_lr(35, **SETTINGS) == pytest.approx(1e-3 - 0.25 * 9e-4, rel=1e-12)


@pytest.mark.parametrize("schedule", [cosine_lr, linear_lr])
def test_no_warmup_starts_at_max_lr(schedule):
    settings = dict(SETTINGS, warmup_steps=0)
    assert schedule(0, **settings) == pytest.approx(1e-3, rel=1e-12)
    assert schedule(110, **settings) == pytest.approx(1e-4, rel=1e-12)


@pytest.mark.parametrize("schedule", [cosine_lr, linear_lr])
def test_warmup_equal_to_total_goes_straight_to_min_lr(schedule):
    settings = dict(SETTINGS, warmup_steps=110)
    assert schedule(109, **settings) == pytest.approx(1e-3 * 109 / 110, rel=1e-12)
    assert schedule(110, **settings) == 1e-4


@pytest.mark.parametrize("schedule", [cosine_lr, linear_lr])
def test_decay_is_monotonic(schedule):
    lrs = [schedule(step, **SETTINGS) for step in range(10, 120)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("schedule", [cosine_lr, linear_lr])
@pytest.mark.parametrize("override, name", [
    (dict(step=-1), "step"), (dict(step=1.5), "step"), (dict(warmup_steps=-1), "warmup_steps"),
    (dict(warmup_steps=200), "warmup_steps"), (dict(total_steps=True), "total_steps"),
    (dict(min_lr=2e-3), "min_lr"), (dict(min_lr=-1e-4), "min_lr"),
])
def test_bad_arguments_raise_naming_them(schedule, override, name):
    arguments = dict(SETTINGS, step=3)
    arguments.update(override)
    step = arguments.pop("step")
    with pytest.raises(ValueError, match=name):
        schedule(step, **arguments)


def make_optimizer():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    return torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.1}], lr=0.5)


def test_scheduler_follows_cosine_lr_per_group():
    optimizer = make_optimizer()
    scheduler = CosineScheduler(optimizer, warmup_steps=5, total_steps=50, min_lr=0.01)
    for step in range(60):
        expected = [cosine_lr(step, max_lr=base, min_lr=0.01, warmup_steps=5, total_steps=50)
                    for base in (1.0, 0.1)]
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert scheduler.get_last_lr() == pytest.approx(expected, rel=1e-12, abs=1e-15)
        optimizer.step()
        scheduler.step()


def test_scheduler_min_lr_per_group():
    optimizer = make_optimizer()
    scheduler = CosineScheduler(optimizer, warmup_steps=0, total_steps=4, min_lr=[0.2, 0.05])
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([0.2, 0.05])
    with pytest.raises(ValueError, match="min_lr"):
        CosineScheduler(make_optimizer(), warmup_steps=0, total_steps=4, min_lr=[0.1])


def test_scheduler_state_dict_resumes_mid_schedule():
    optimizer = make_optimizer()
    scheduler = CosineScheduler(optimizer, warmup_steps=5, total_steps=50, min_lr=0.01)
    for _ in range(20):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    straight = []
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        straight.append(scheduler.get_last_lr())

    new_optimizer = make_optimizer()
    resumed = CosineScheduler(new_optimizer, warmup_steps=5, total_steps=50, min_lr=0.01)
    resumed.load_state_dict(state)
    again = []
    for _ in range(10):
        new_optimizer.step()
        resumed.step()
        again.append(resumed.get_last_lr())
    assert again == straight
    assert [g["lr"] for g in new_optimizer.param_groups] == straight[-1]


def test_scheduler_is_an_lr_scheduler():
    assert isinstance(CosineScheduler(make_optimizer(), 1, 2), torch.optim.lr_scheduler.LRScheduler)


def test_scheduler_rejects_warmup_longer_than_total():
    with pytest.raises(ValueError, match="warmup_steps"):
        CosineScheduler(make_optimizer(), warmup_steps=10, total_steps=5)


WSD = dict(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, cooldown_steps=40, total_steps=110)


def test_wsd_hand_values():
    assert wsd_lr(0, **WSD) == 0.0 and wsd_lr(5, **WSD) == pytest.approx(5e-4, rel=1e-12)  # warmup
    assert wsd_lr(10, **WSD) == wsd_lr(69, **WSD) == wsd_lr(70, **WSD) == 1e-3  # stable, up to the cooldown's start
    # a quarter of the way through the cooldown: 1 - sqrt(1/4) = 1/2 of the way down
    assert wsd_lr(80, **WSD) == pytest.approx(1e-4 + 9e-4 * 0.5, rel=1e-12)
    assert wsd_lr(110, **WSD) == wsd_lr(10_000, **WSD) == 1e-4
    assert wsd_lr(50, **dict(WSD, cooldown_steps=0)) == 1e-3 and wsd_lr(110, **dict(WSD, cooldown_steps=0)) == 1e-4


@pytest.mark.parametrize("override, name", [(dict(cooldown_steps=-1), "cooldown_steps"),
                                            (dict(cooldown_steps=101), "cooldown_steps"),
                                            (dict(cooldown_steps=2.0), "cooldown_steps")])
def test_wsd_bad_cooldown_raises_naming_it(override, name):
    with pytest.raises(ValueError, match=name):
        wsd_lr(3, **{**WSD, **override})

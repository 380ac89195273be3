"""Exercises 4 and 5, two schedules beyond lesson 3's: fn(...) -> float.

* Exercise 4, warmup + cosine over steps or a time budget: cosine_lr(step, max_lr, min_lr, warmup_steps,
  total_steps, budget_used), the lower of training.cosine_lr at `step` and the same cosine decay laid over
  the fraction of the time budget used (clamped at 1), as train() does with max_minutes (lr_of_update).
* Exercise 5, warmup-stable-decay with a 1-sqrt cooldown: wsd_lr(step, max_lr, min_lr, warmup_steps,
  cooldown_steps, total_steps), as training.wsd_lr.

Both share their step points, their float tolerance and the messages about the warmup and the end.
"""
from __future__ import annotations

import math
import numbers

import training
from exercises.checks.harness import (FLOAT32_ROUNDOFF, ExerciseFailed, call_candidate, expected_and_got, is_close,
                                      on_input, register, require_callable, run_and_judge, type_name)
from m07_training.schedules import cosine_decay

_COSINE_CONFIGS = [
    dict(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=100),
    dict(max_lr=6e-4, min_lr=0.0, warmup_steps=100, total_steps=1000),
    dict(max_lr=1.0, min_lr=0.1, warmup_steps=0, total_steps=50),
    dict(max_lr=3e-4, min_lr=3e-5, warmup_steps=1, total_steps=20),
    dict(max_lr=0.02, min_lr=0.005, warmup_steps=7, total_steps=33),
    dict(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=10),  # no decay: warmup, then min_lr
]
# The fraction of the time budget used at a step: none (the steps rule), lagging or leading the steps, all of it,
# and past it (train() reads the clock every log_interval updates, so it runs a few updates over the budget).
_BUDGET_USED = (0.0, 0.3, 0.7, 1.0, 1.3)

_WSD_CONFIGS = [
    dict(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, cooldown_steps=20, total_steps=100),
    dict(max_lr=6e-4, min_lr=0.0, warmup_steps=100, cooldown_steps=200, total_steps=1000),
    dict(max_lr=1.0, min_lr=0.1, warmup_steps=0, cooldown_steps=10, total_steps=50),     # no warmup
    dict(max_lr=3e-4, min_lr=3e-5, warmup_steps=5, cooldown_steps=15, total_steps=20),   # no stable phase
    dict(max_lr=0.02, min_lr=0.005, warmup_steps=7, cooldown_steps=0, total_steps=33),  # no cooldown
    dict(max_lr=1e-3, min_lr=1e-4, warmup_steps=1, cooldown_steps=1, total_steps=12),
]


def _cooldown_start(config):
    return config["total_steps"] - config.get("cooldown_steps", config["total_steps"] - config["warmup_steps"])


def _schedule_points(config):
    w, total, start = config["warmup_steps"], config["total_steps"], _cooldown_start(config)
    steps = [0, 1, w // 2, w - 1, w, w + 1, (w + start) // 2, start - 1, start, start + 1, (3 * start + total) // 4,
             (start + total) // 2, total - 1, total, total + 1, 2 * total + 5]
    return sorted({s for s in steps if s >= 0})


def _region(step, config):
    w, total, start = config["warmup_steps"], config["total_steps"], _cooldown_start(config)
    if step >= total:
        return "end" if step == total else "after"
    if step < w:
        return "warmup"
    if step == w:
        return "peak"
    return "stable" if step < start else "decay"


def _lr_close(got, expected, config):
    """Whether an LR equals the reference's to float32 precision.

    The reference computes in float64. An answer computed in float32 (torch) is exact to a few FLOAT32_ROUNDOFF
    (u = 6e-8) relatively where the LR is large, hence rel_tol 1e-6. Near the end of a decay with min_lr = 0 the
    LR approaches 0 by cancellation, 1 + cos(pi * progress) -> 0 (or 1 - sqrt(progress)): cos, sqrt and progress
    each carry an absolute error of about u (progress's, times pi through cos), so the LR carries about
    (2 + pi) u * max_lr absolutely, however small it is (4e-12 with a relative error of 2e-3 at max_lr = 6e-4).
    The absolute floor, 16 u * max_lr (1e-6 of max_lr), admits that, while every mistake here moves the LR by
    1e-3 of max_lr or more somewhere."""
    return is_close(got, expected, 1e-6, 16 * FLOAT32_ROUNDOFF * config["max_lr"])


def _plain_lr(got, inputs):
    if isinstance(got, bool) or not isinstance(got, numbers.Real):
        raise ExerciseFailed(f"return a plain float (use math.cos and math.sqrt, not torch's), got "
                             f"{type_name(got)}{on_input(inputs)}")
    return float(got)


def _explain(wrong, config, alternatives):
    """The message of the first alternative schedule that gives every wrong value, or None. `wrong` holds
    (point, got, expected) with point the candidate's varying arguments; an alternative takes them."""
    for alternative, message in alternatives:
        if all(_lr_close(got, alternative(*point), config) for point, got, _ in wrong):
            return message
    return None


def _setting(config):
    return ", ".join(f"{name}={value}" for name, value in config.items())


def _warmup_message(reference, config, wrong):
    """What is wrong in the warmup (lr = max_lr * step / warmup_steps), given the wrong (step, got) there."""
    w = config["warmup_steps"]
    if all(_lr_close(got, reference(min(step + 1, w)), config) for step, got in wrong):
        return "warmup is off by one: expected lr 0 at step 0 (lr = max_lr * step / warmup_steps: 0 at step 0, " \
               "max_lr at step warmup_steps)"
    return "during warmup the LR rises linearly, max_lr * step / warmup_steps, reaching max_lr at step warmup_steps"


def _end_message(region):
    if region == "end":
        return "at step total_steps the LR is min_lr (also when the warmup ends there, or the cooldown has no steps)"
    return "past total_steps the LR stays at min_lr (don't let the formula run on)"


def _zero_division_hints(config):
    hints = []
    if config["warmup_steps"] == config["total_steps"]:
        hints.append("with warmup_steps == total_steps there is no decay: test step >= total_steps (-> min_lr) "
                     "before computing progress, which divides by total_steps - warmup_steps = 0")
    if config.get("cooldown_steps", 1) == 0:
        hints.append("with cooldown_steps=0 there is no cooldown: test step >= total_steps (-> min_lr) first, "
                     "and don't divide by cooldown_steps")
    if config["warmup_steps"] == 0:
        hints.append("with warmup_steps=0 there is no warmup: don't divide by warmup_steps then")
    return [(lambda e: isinstance(e, ZeroDivisionError), " Or: ".join(hints))] if hints else []


# ----------------------------------------------------------------------------------------
# Exercise 4: warmup + cosine over steps or a time budget
# ----------------------------------------------------------------------------------------

_COSINE_FORMULA = ("lr = min_lr + (max_lr - min_lr) * (1 + cos(pi * progress)) / 2, "
                   "progress = (step - warmup_steps) / (total_steps - warmup_steps)")


def _by_steps(step, config):
    return training.cosine_lr(step, **config)


def _by_time(used, config):
    return cosine_decay(used, config["max_lr"], config["min_lr"])


def _budget_cosine(step, used, config):
    return min(_by_steps(step, config), _by_time(min(used, 1.0), config))


def _run_cosine(fn, records, guard):
    require_callable(fn, "cosine_lr")
    for config in _COSINE_CONFIGS:
        for step in _schedule_points(config):
            for used in _BUDGET_USED:
                args = (step, config["max_lr"], config["min_lr"], config["warmup_steps"], config["total_steps"], used)
                records.append({"got": call_candidate("cosine_lr", dict(step=step, **config, budget_used=used), fn,
                                                      *args, hints=_zero_division_hints(config), guard=guard)})


def _judge_cosine(records):
    for config in _COSINE_CONFIGS:
        wrong = []
        for step in _schedule_points(config):
            for used in _BUDGET_USED:
                got = _plain_lr(records.next()["got"], dict(step=step, **config, budget_used=used))
                expected = _budget_cosine(step, used, config)
                if not _lr_close(got, expected, config):
                    wrong.append(((step, used), got, expected))
        if wrong:
            _diagnose_cosine(config, wrong)


def _diagnose_cosine(config, wrong):
    (step, used), got, expected = wrong[0]
    shown = f"at step {step} with budget_used={used} ({_setting(config)}): {expected_and_got(expected, got)}"
    message = _explain(wrong, config, [
        (lambda s, u: _by_time(min(u, 1.0), config),
         "you followed the time budget alone: the LR is the lower of the step schedule (its warmup, and its decay "
         "when total_steps comes first) and the cosine over the budget"),
        # before the higher of the two, which gives the same where ignoring the budget is wrong
        (lambda s, u: _by_steps(s, config),
         "budget_used is ignored: lay the same cosine decay over the budget, min_lr + (max_lr - min_lr) * "
         "(1 + cos(pi * budget_used)) / 2, and take the lower of it and the step schedule"),
        (lambda s, u: max(_by_steps(s, config), _by_time(min(u, 1.0), config)),
         "take the lower of the two curves (min), not the higher: the run ends at whichever limit comes first, "
         "and the LR must have reached min_lr there"),
        (lambda s, u: min(_by_steps(s, config), _by_time(u, config)),
         "budget_used can pass 1 (train() reads the clock only every few updates, so it runs a little over the "
         "budget): clamp it, min(budget_used, 1), or the cosine climbs back up"),
        (lambda s, u: min(_by_steps(s, config), cosine_decay(min(u, 1.0), config["max_lr"], 0.0)),
         "the curve over the budget ends at 0 instead of min_lr: min_lr + (max_lr - min_lr) * "
         "(1 + cos(pi * budget_used)) / 2"),
    ])
    if message:
        raise ExerciseFailed(f"{message}; {shown}")
    by_steps = [(s, g, e) for (s, u), g, e in wrong if u == 0]
    if by_steps:  # without a budget used, the schedule is lesson 3's warmup + cosine over the steps
        _diagnose_steps(config, by_steps)
    raise ExerciseFailed(f"wrong LR once part of the budget is used: the lower of the step schedule and the "
                         f"cosine over the budget used; {shown}")


def _diagnose_steps(config, wrong):
    """The mistake in the steps rule (lesson 3's warmup + cosine), from its wrong (step, got, expected)."""
    w = config["warmup_steps"]
    step, got, expected = wrong[0]
    region = _region(step, config)
    shown = f"at step {step} with budget_used=0 ({_setting(config)}): {expected_and_got(expected, got)}"
    if region in ("peak", "stable", "decay") and w > 0 and _lr_close(
            got, training.cosine_lr(step, **dict(config, warmup_steps=0)), config):
        raise ExerciseFailed(f"the decay must start at warmup_steps: progress = (step - warmup_steps) / "
                             f"(total_steps - warmup_steps); {shown}")
    warmup_wrong = [(s, g) for s, g, _ in wrong if s <= w]
    if any(s < w for s, _ in warmup_wrong):
        raise ExerciseFailed(f"{_warmup_message(lambda s: _by_steps(s, config), config, warmup_wrong)}; {shown}")
    decay_wrong = [(s, g) for s, g, _ in wrong if _region(s, config) in ("stable", "decay", "end")]
    if region == "peak":
        if decay_wrong:
            raise ExerciseFailed(f"wrong LR from step warmup_steps on, where the decay starts at max_lr "
                                 f"(progress = 0): {_COSINE_FORMULA}; {shown}")
        raise ExerciseFailed(f"at step warmup_steps the LR is max_lr (progress = 0; with warmup_steps=0 the decay "
                             f"starts at step 0); {shown}")
    if config["min_lr"] > 0 and decay_wrong and all(
            _lr_close(g, training.cosine_lr(s, **dict(config, min_lr=0.0)), config) for s, g in decay_wrong):
        raise ExerciseFailed(f"the decay ends at 0 instead of min_lr: {_COSINE_FORMULA}; {shown}")
    if region in ("stable", "decay"):
        raise ExerciseFailed(f"wrong LR during the decay: {_COSINE_FORMULA}; {shown}")
    raise ExerciseFailed(f"{_end_message(region)}; {shown}")


# ----------------------------------------------------------------------------------------
# Exercise 5: warmup-stable-decay with a 1-sqrt cooldown
# ----------------------------------------------------------------------------------------

_WSD_FORMULA = ("lr = min_lr + (max_lr - min_lr) * (1 - sqrt(progress)), progress = (step - (total_steps - "
                "cooldown_steps)) / cooldown_steps")


def _wsd(step, config, cooldown=None):
    """training.wsd_lr, with `cooldown(progress)` (1 at the cooldown's start, 0 at its end) for the 1-sqrt."""
    start = _cooldown_start(config)
    if cooldown is None or not start <= step < config["total_steps"]:
        return training.wsd_lr(step, **config)
    progress = (step - start) / config["cooldown_steps"]
    return config["min_lr"] + (config["max_lr"] - config["min_lr"]) * cooldown(progress)


def _run_wsd(fn, records, guard):
    require_callable(fn, "wsd_lr")
    for config in _WSD_CONFIGS:
        for step in _schedule_points(config):
            args = (step, config["max_lr"], config["min_lr"], config["warmup_steps"], config["cooldown_steps"],
                    config["total_steps"])
            records.append({"got": call_candidate("wsd_lr", dict(step=step, **config), fn, *args,
                                                  hints=_zero_division_hints(config), guard=guard)})


def _judge_wsd(records):
    for config in _WSD_CONFIGS:
        wrong = []
        for step in _schedule_points(config):
            got = _plain_lr(records.next()["got"], dict(step=step, **config))
            expected = training.wsd_lr(step, **config)
            if not _lr_close(got, expected, config):
                wrong.append(((step,), got, expected))
        if wrong:
            _diagnose_wsd(config, wrong)


def _diagnose_wsd(config, wrong):
    (step,), got, expected = wrong[0]
    region = _region(step, config)
    shown = f"at step {step} ({_setting(config)}): {expected_and_got(expected, got)}"
    w, total, cooldown_steps = config["warmup_steps"], config["total_steps"], config["cooldown_steps"]
    warmup_wrong = [(s, g) for (s,), g, _ in wrong if s <= w]
    if any(s < w for s, _ in warmup_wrong):
        raise ExerciseFailed(f"{_warmup_message(lambda s: training.wsd_lr(s, **config), config, warmup_wrong)}; "
                             f"{shown}")
    no_stable_phase = dict(config, cooldown_steps=total - w)
    message = _explain(wrong, config, [
        (lambda s: training.wsd_lr(s, **no_stable_phase),
         "there is no stable phase: the LR stays at max_lr from warmup_steps to total_steps - cooldown_steps, and "
         "only the last cooldown_steps steps cool down"),
        (lambda s: _wsd(s, config, lambda p: 1 - p), f"the cooldown is linear; the 1-sqrt cooldown is {_WSD_FORMULA}"),
        (lambda s: _wsd(s, config, lambda p: math.sqrt(1 - p)),
         f"sqrt(1 - progress) is not 1 - sqrt(progress): {_WSD_FORMULA}"),
        (lambda s: _wsd(s, config, lambda p: 1 - math.sqrt(p + 1 / cooldown_steps)),
         f"the cooldown is off by one: progress is 0 at its first step, total_steps - cooldown_steps; "
         f"{_WSD_FORMULA}"),
    ])
    if message:
        raise ExerciseFailed(f"{message}; {shown}")
    decay_wrong = [(s, g) for (s,), g, _ in wrong if _region(s, config) in ("decay", "end")]
    if config["min_lr"] > 0 and decay_wrong and all(
            _lr_close(g, training.wsd_lr(s, **dict(config, min_lr=0.0)), config) for s, g in decay_wrong):
        raise ExerciseFailed(f"the cooldown ends at 0 instead of min_lr: {_WSD_FORMULA}; {shown}")
    if region in ("peak", "stable"):
        raise ExerciseFailed(f"from warmup_steps to total_steps - cooldown_steps the LR stays at max_lr; {shown}")
    if region == "decay":
        raise ExerciseFailed(f"wrong LR during the cooldown: {_WSD_FORMULA}; {shown}")
    raise ExerciseFailed(f"{_end_message(region)}; {shown}")


def check_cosine_schedule(fn):
    """fn(step, max_lr, min_lr, warmup_steps, total_steps, budget_used) -> float: the lower of training.cosine_lr
    at step and the cosine decay from max_lr to min_lr over budget_used, the fraction of the time budget used
    (clamped at 1)."""
    __tracebackhide__ = True
    run_and_judge("check_cosine_schedule", fn)


def check_wsd_schedule(fn):
    """fn(step, max_lr, min_lr, warmup_steps, cooldown_steps, total_steps) -> float, as training.wsd_lr: warmup
    to max_lr, max_lr held, a 1-sqrt cooldown to min_lr over the last cooldown_steps steps, then min_lr."""
    __tracebackhide__ = True
    run_and_judge("check_wsd_schedule", fn)


register("check_cosine_schedule", _run_cosine, _judge_cosine)
register("check_wsd_schedule", _run_wsd, _judge_wsd)

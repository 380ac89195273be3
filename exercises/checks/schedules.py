"""Exercises 4 and 5, warmup + cosine and warmup + linear schedules: fn(step, max_lr, min_lr,
warmup_steps, total_steps) -> float. Both share their inputs, run and judge; only the reference
(training.cosine_lr, training.linear_lr) and the decay formula a message quotes differ."""
from __future__ import annotations

import numbers

import training
from exercises.checks.harness import (FLOAT32_ROUNDOFF, ExerciseFailed, call_candidate, expected_and_got, is_close,
                                      on_input, register, require_callable, run_and_judge, type_name)

_SCHEDULE_CONFIGS = [
    dict(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=100),
    dict(max_lr=6e-4, min_lr=0.0, warmup_steps=100, total_steps=1000),
    dict(max_lr=1.0, min_lr=0.1, warmup_steps=0, total_steps=50),
    dict(max_lr=3e-4, min_lr=3e-5, warmup_steps=1, total_steps=20),
    dict(max_lr=0.02, min_lr=0.005, warmup_steps=7, total_steps=33),
    dict(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=10),  # no decay: warmup, then min_lr
]


def _schedule_points(config):
    w, total = config["warmup_steps"], config["total_steps"]
    steps = [0, 1, w // 2, w - 1, w, w + 1, (w + total) // 3, (w + total) // 2, total - 1, total, total + 1,
             2 * total + 5]
    return sorted({s for s in steps if s >= 0})


def _region(step, w, total):
    if step >= total:
        return "end" if step == total else "after"
    if step < w:
        return "warmup"
    return "peak" if step == w else "decay"


def _run_schedule(name):
    def run_schedule(fn, records, guard):
        require_callable(fn, name)
        for config in _SCHEDULE_CONFIGS:
            w, total = config["warmup_steps"], config["total_steps"]
            zero_div = (lambda e: isinstance(e, ZeroDivisionError),
                        "with warmup_steps == total_steps there is no decay: test step >= total_steps (-> min_lr) "
                        "before computing progress, which divides by total_steps - warmup_steps = 0"
                        if w == total else "with warmup_steps=0 there is no warmup: don't divide by warmup_steps then")
            for step in _schedule_points(config):
                got = call_candidate(name, dict(step=step, **config), fn, step, config["max_lr"], config["min_lr"],
                                     w, total, hints=[zero_div], guard=guard)
                records.append({"got": got})
    return run_schedule


def _judge_schedule(reference, decay_formula):
    def judge_schedule(records):
        for config in _SCHEDULE_CONFIGS:
            wrong = []
            for step in _schedule_points(config):
                got = records.next()["got"]
                if isinstance(got, bool) or not isinstance(got, numbers.Real):
                    raise ExerciseFailed(f"return a plain float (use math.cos, not torch.cos), got "
                                         f"{type_name(got)}{on_input(dict(step=step, **config))}")
                expected = reference(step, **config)
                if not _lr_close(float(got), expected, config):
                    wrong.append((step, float(got), expected))
            if wrong:
                _diagnose_schedule(reference, config, wrong, decay_formula)
    return judge_schedule


def _lr_close(got, expected, config):
    """Whether an LR equals the reference's to float32 precision.

    The reference computes in float64. An answer computed in float32 (torch) is exact to a few FLOAT32_ROUNDOFF
    (u = 6e-8) relatively where the LR is large, hence rel_tol 1e-6. Near the end of the decay with min_lr = 0 the
    LR approaches 0 by cancellation, 1 + cos(pi * progress) -> 0 (or 1 - progress): cos and progress each carry an
    absolute error of about u (progress's, times pi through cos), so the LR carries about (2 + pi) u * max_lr
    absolutely, however small it is (4e-12 with a relative error of 2e-3 at max_lr = 6e-4). The absolute floor,
    16 u * max_lr (1e-6 of max_lr), admits that, while every mistake here moves the LR by 1e-3 of max_lr or more
    somewhere."""
    return is_close(got, expected, 1e-6, 16 * FLOAT32_ROUNDOFF * config["max_lr"])


def _diagnose_schedule(reference, config, wrong, decay_formula):
    w, total, max_lr, min_lr = config["warmup_steps"], config["total_steps"], config["max_lr"], config["min_lr"]
    step, got, expected = wrong[0]
    setting = f"max_lr={max_lr}, min_lr={min_lr}, warmup_steps={w}, total_steps={total}"
    region = _region(step, w, total)
    shown = f"at step {step} ({setting}): {expected_and_got(expected, got)}"
    if region in ("peak", "decay") and w > 0 and _lr_close(got, reference(step, **dict(config, warmup_steps=0)),
                                                           config):
        raise ExerciseFailed(f"the decay must start at warmup_steps: progress = (step - warmup_steps) / "
                             f"(total_steps - warmup_steps); {shown}")
    warmup_wrong = [(s, g) for s, g, _ in wrong if s < w]
    if warmup_wrong:
        early = [(s, g) for s, g, _ in wrong if s <= w]
        if all(_lr_close(g, reference(min(s + 1, w), **config), config) for s, g in early):
            raise ExerciseFailed(f"warmup is off by one: expected lr {expected:.6g} at step {step} (lr = max_lr * "
                                 f"step / warmup_steps: 0 at step 0, max_lr at step warmup_steps); {shown}")
        raise ExerciseFailed(f"during warmup the LR rises linearly, max_lr * step / warmup_steps, reaching max_lr "
                             f"at step warmup_steps; {shown}")
    if region == "peak":
        if any(_region(s, w, total) == "decay" for s, _, _ in wrong):
            raise ExerciseFailed(f"wrong LR from step warmup_steps on, where the decay starts at max_lr "
                                 f"(progress = 0): {decay_formula}; {shown}")
        raise ExerciseFailed(f"at step warmup_steps the LR is max_lr (progress = 0; with warmup_steps=0 the decay "
                             f"starts at step 0); {shown}")
    decay_wrong = [(s, g) for s, g, _ in wrong if _region(s, w, total) in ("decay", "end")]
    if min_lr > 0 and decay_wrong and all(_lr_close(g, reference(s, **dict(config, min_lr=0.0)), config)
                                          for s, g in decay_wrong):
        raise ExerciseFailed(f"the decay ends at 0 instead of min_lr: {decay_formula}; {shown}")
    if region == "decay":
        raise ExerciseFailed(f"wrong LR during the decay: {decay_formula}; {shown}")
    if region == "end":
        raise ExerciseFailed(f"at step total_steps the LR is min_lr (also when warmup_steps == total_steps: the "
                             f"warmup then ends directly at min_lr); {shown}")
    raise ExerciseFailed(f"past total_steps the LR stays at min_lr (don't let the formula run on); {shown}")


_COSINE_FORMULA = ("lr = min_lr + (max_lr - min_lr) * (1 + cos(pi * progress)) / 2, "
                   "progress = (step - warmup_steps) / (total_steps - warmup_steps)")
_LINEAR_FORMULA = ("lr = max_lr + (min_lr - max_lr) * progress, "
                   "progress = (step - warmup_steps) / (total_steps - warmup_steps)")


def check_cosine_schedule(fn):
    """fn(step, max_lr, min_lr, warmup_steps, total_steps) -> float, as training.cosine_lr: min_lr from
    total_steps on; before that, warmup max_lr * step / warmup_steps, then half a cosine from max_lr to min_lr."""
    __tracebackhide__ = True
    run_and_judge("check_cosine_schedule", fn)


def check_linear_schedule(fn):
    """fn(step, max_lr, min_lr, warmup_steps, total_steps) -> float, as training.linear_lr: min_lr from
    total_steps on; before that, warmup max_lr * step / warmup_steps, then a straight line from max_lr to min_lr."""
    __tracebackhide__ = True
    run_and_judge("check_linear_schedule", fn)


register("check_cosine_schedule", _run_schedule("cosine_lr"), _judge_schedule(training.cosine_lr, _COSINE_FORMULA))
register("check_linear_schedule", _run_schedule("linear_lr"), _judge_schedule(training.linear_lr, _LINEAR_FORMULA))

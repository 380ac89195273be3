"""Exercise 6, the learning-rate range finder: fn(train_step, *, start_lr, end_lr, num_steps,
diverge_factor) -> (lrs, losses, suggested_lr), the rule in check_lr_finder's docstring.

train_step is scripted (_ScriptedTraining): the judge replays the learning rates the run
recorded to know the losses the candidate saw, then applies the rule to them."""
from __future__ import annotations

import math
import numbers

import torch

from exercises.checks.harness import (ExerciseFailed, call_candidate, expected_and_got, is_close, on_input, register,
                                      require_callable, run_and_judge, show, type_name)


class _ScriptedTraining:
    """A fake train_step(lr) -> loss: a bowl in log10(lr), optionally blowing up past `explode_at`
    (blow_up(loss, k) for the k-th call past it). Deterministic: the same calls give the same losses."""

    def __init__(self, best_lr, explode_at=None, blow_up=lambda loss, k: loss * 50, noise=0.0, seed=0):
        self.best_lr, self.explode_at, self.blow_up, self.noise = best_lr, explode_at, blow_up, noise
        self.generator = torch.Generator().manual_seed(seed)
        self.calls, self.exploded = [], 0

    def __call__(self, lr):
        lr = float(lr)
        self.calls.append(lr)
        loss = 2.0 + 0.25 * (math.log10(lr) - math.log10(self.best_lr)) ** 2
        loss *= 1 + self.noise * (2 * torch.rand((), generator=self.generator).item() - 1)
        if self.explode_at is not None and lr > self.explode_at:
            loss = self.blow_up(loss, self.exploded)
            self.exploded += 1
        return loss


_LR_FINDER_CASES = [
    ("a smooth curve that never diverges", dict(start_lr=1e-6, end_lr=1e-1, num_steps=30),
     dict(best_lr=1e-3)),
    ("a curve that blows up past lr=0.05", dict(start_lr=1e-5, end_lr=1.0, num_steps=40),
     dict(best_lr=3e-3, explode_at=0.05)),
    ("a loss that turns NaN past lr=0.01", dict(start_lr=1e-5, end_lr=1.0, num_steps=25),
     dict(best_lr=1e-3, explode_at=0.01, blow_up=lambda loss, k: math.nan)),
    ("a loss that turns inf past lr=0.2", dict(start_lr=1e-4, end_lr=10.0, num_steps=20),
     dict(best_lr=1e-2, explode_at=0.2, blow_up=lambda loss, k: math.inf)),
    ("a noisy curve (+-30%)", dict(start_lr=1e-6, end_lr=1.0, num_steps=50),
     dict(best_lr=1e-3, explode_at=0.3, noise=0.3, seed=3)),
    ("a loss that jumps 5x past lr=0.05 (above 4x the lowest loss, below 4x the first)",
     dict(start_lr=1e-5, end_lr=1.0, num_steps=40),
     dict(best_lr=3e-3, explode_at=0.05, blow_up=lambda loss, k: loss * 5)),
    ("two steps", dict(start_lr=1e-3, end_lr=1e-1, num_steps=2), dict(best_lr=1e-2)),
    ("a loss that climbs 1.8x per step past lr=0.01 (never 4x the previous loss, soon 4x the lowest)",
     dict(start_lr=1e-5, end_lr=1.0, num_steps=30),
     dict(best_lr=1e-3, explode_at=0.01, blow_up=lambda loss, k: loss * 1.8 ** (k + 1))),
    ("a loss that diverges at the second step", dict(start_lr=1e-2, end_lr=10.0, num_steps=20),
     dict(best_lr=1e-3, explode_at=0.012)),
    ("a loss still falling at end_lr", dict(start_lr=1e-5, end_lr=1e-2, num_steps=20), dict(best_lr=1.0)),
]
_DIVERGE_FACTOR = 4.0


def _floats_or_none(values):
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return None


def _run_lr_finder(fn, records, guard):
    require_callable(fn, "lr_finder")
    for case, sweep, script in _LR_FINDER_CASES:
        settings = dict(sweep, diverge_factor=_DIVERGE_FACTOR)
        train_step = _ScriptedTraining(**script)
        result = call_candidate("lr_finder", dict(case=case, **settings), fn, train_step, **settings, guard=guard)
        if not isinstance(result, (tuple, list)) or len(result) != 3:
            records.append({"result": {"kind": show(result)[:200]}, "calls": train_step.calls})
            continue
        suggestion = result[2]
        real = isinstance(suggestion, numbers.Real) and not isinstance(suggestion, bool)
        records.append({"result": {"lrs": _floats_or_none(result[0]), "losses": _floats_or_none(result[1]),
                                   "suggested": float(suggestion) if real else None,
                                   "suggested_kind": type_name(suggestion)},
                        "calls": train_step.calls})


def _diverged_at(losses, factor, versus_previous=False, from_index=0):
    """The index of the first loss that is not finite or above factor x the lowest (or previous) loss before it."""
    for i, loss in enumerate(losses):
        if i < from_index:
            continue
        before = losses[i - 1:i] if versus_previous else losses[:i]
        if not math.isfinite(loss) or (before and loss > factor * min(before)):
            return i
    return None


def _same_loss(a, b):
    # a loss kept as a float32 (numpy, torch) is exact to 6e-8 relatively
    return (math.isnan(a) and math.isnan(b)) or a == b or is_close(a, b, 1e-6)


def _judge_lr_finder(records):
    for case, sweep, script in _LR_FINDER_CASES:
        settings = dict(sweep, diverge_factor=_DIVERGE_FACTOR)
        inputs = dict(case=case, **settings)
        record = records.next()
        result, calls = record["result"], record["calls"]
        if "kind" in result:
            raise ExerciseFailed(f"return a tuple (lrs, losses, suggested_lr), got {result['kind']}{on_input(inputs)}")
        replay = _ScriptedTraining(**script)  # the losses train_step returned in your run, call for call
        returned = [replay(lr) for lr in calls]
        _lr_finder_sweep(calls, sweep, inputs)
        _lr_finder_stop(calls, returned, replay, sweep, inputs)
        lrs, losses = result["lrs"], result["losses"]
        if lrs is None:
            raise ExerciseFailed(f"lrs must be a list of numbers{on_input(inputs)}")
        if len(lrs) != len(calls) or not all(is_close(a, b, 1e-6) for a, b in zip(lrs, calls)):
            raise ExerciseFailed(f"lrs must list the learning rates you trained with, in order: train_step got "
                                 f"{show(calls)}, you returned {show(lrs)}{on_input(inputs)}")
        if losses is None:
            raise ExerciseFailed(f"losses must be a list of numbers{on_input(inputs)}")
        if len(losses) != len(returned):
            raise ExerciseFailed(f"losses must list what train_step returned, one per call: train_step ran "
                                 f"{len(returned)} times, you returned {len(losses)} losses{on_input(inputs)}")
        wrong = next((i for i, (a, b) in enumerate(zip(losses, returned)) if not _same_loss(a, b)), None)
        if wrong is not None:
            raise ExerciseFailed(f"losses must list what train_step returned, one per call: at call {wrong} it "
                                 f"returned {returned[wrong]!r}, your list has {losses[wrong]!r}{on_input(inputs)}")
        if result["suggested"] is None:
            raise ExerciseFailed(f"suggested_lr must be a float, got {result['suggested_kind']}{on_input(inputs)}")
        _lr_finder_suggestion(result["suggested"], calls, returned, inputs)


def _lr_finder_sweep(calls, sweep, inputs):
    start, end, steps = sweep["start_lr"], sweep["end_lr"], sweep["num_steps"]
    for i, lr in enumerate(calls[:steps]):
        expected = start * (end / start) ** (i / (steps - 1))
        # np.logspace or exp(log) give the same LRs to a few float64 roundings; torch.logspace in float32 rounds
        # the exponent (|x| < 8) to 4.8e-7 absolute, 1.1e-6 relative in the LR: 1e-5 admits all of them, while an
        # off-by-one or linear sweep is off by 1% or more
        if is_close(lr, expected, 1e-5):
            continue
        linear = start + (end - start) * i / (steps - 1)
        short = start * (end / start) ** (i / steps)
        if is_close(lr, linear, 1e-5):
            message = ("the sweep must be exponential, not linear: lr_i = start_lr * (end_lr / start_lr) ** "
                       "(i / (num_steps - 1)), so every step multiplies the LR by the same factor")
        elif is_close(lr, short, 1e-5):
            message = ("the sweep is off by one: the last LR must be end_lr, so use i / (num_steps - 1), "
                       "not i / num_steps")
        else:
            message = "lr_i = start_lr * (end_lr / start_lr) ** (i / (num_steps - 1)) for i = 0 .. num_steps - 1"
        raise ExerciseFailed(f"{message}: call {i} of train_step used lr={lr!r}, expected {expected!r} "
                             f"({expected_and_got(expected, lr)}){on_input(inputs)}")


def _lr_finder_stop(calls, returned, replay, sweep, inputs):
    n, steps = len(calls), sweep["num_steps"]
    if n > steps:
        raise ExerciseFailed(f"train_step ran {n} times, more than num_steps={steps}{on_input(inputs)}")
    stop = _diverged_at(returned, _DIVERGE_FACTOR)
    if stop is not None and n > stop + 1:
        previous = _diverged_at(returned, _DIVERGE_FACTOR, versus_previous=True)
        late = _diverged_at(returned, _DIVERGE_FACTOR, from_index=3)
        if math.isnan(returned[stop]):
            raise ExerciseFailed("the loss became NaN and you kept going: NaN > x is always False, so test "
                                 "`not math.isfinite(loss)` as well" + on_input(inputs))
        if (previous + 1 if previous is not None else steps) == n:
            raise ExerciseFailed(f"compare with the lowest loss so far, not the previous one: a loss that climbs a "
                                 f"little at every step never jumps 4x over the previous loss but soon exceeds 4x "
                                 f"the lowest (expected {stop + 1} calls of train_step, got {n}){on_input(inputs)}")
        if stop < 3 and (late + 1 if late is not None else steps) == n:
            raise ExerciseFailed(f"test for divergence from the first step on: here the loss diverged at call "
                                 f"{stop} and you kept training (expected {stop + 1} calls of train_step, got {n})"
                                 f"{on_input(inputs)}")
        raise ExerciseFailed(f"you kept training after the loss diverged: stop right after a loss that is not "
                             f"finite or above diverge_factor x the lowest loss so far (expected {stop + 1} calls "
                             f"of train_step, got {n}){on_input(inputs)}")
    if stop is None and n < steps:
        start, end = sweep["start_lr"], sweep["end_lr"]
        next_loss = replay(start * (end / start) ** (n / (steps - 1)))
        if n and (not math.isfinite(next_loss) or next_loss > _DIVERGE_FACTOR * min(returned)):
            raise ExerciseFailed(f"record the loss that shows divergence, then stop (expected {n + 1} calls of "
                                 f"train_step, got {n}){on_input(inputs)}")
        raise ExerciseFailed(f"you stopped too early, after {n} of the {steps} steps: stop only when the loss is not "
                             f"finite or above diverge_factor ({_DIVERGE_FACTOR}) x the lowest loss so far"
                             f"{on_input(inputs)}")


def _lr_finder_suggestion(suggestion, calls, returned, inputs):
    finite = [i for i, loss in enumerate(returned) if math.isfinite(loss)]
    lowest = min(finite, key=returned.__getitem__)
    expected = calls[lowest] / 10
    if is_close(suggestion, expected, 1e-6):  # a float32 suggestion is exact to 6e-8
        return
    if is_close(suggestion, expected * 10, 1e-6):
        raise ExerciseFailed(f"suggest one tenth of the LR at the lowest loss: at the minimum the LR is already on "
                             f"the edge of too high ({expected_and_got(expected, suggestion)}){on_input(inputs)}")
    but_last = [i for i in finite if i != len(returned) - 1]
    if lowest == len(returned) - 1 and but_last and \
            is_close(suggestion, calls[min(but_last, key=returned.__getitem__)] / 10, 1e-6):
        raise ExerciseFailed(f"the lowest loss can be the last one recorded (here the loss still falls at end_lr): "
                             f"look for the lowest among all the losses ({expected_and_got(expected, suggestion)})"
                             f"{on_input(inputs)}")
    raise ExerciseFailed(f"suggested_lr should be lrs[index of the lowest finite loss] / 10: "
                         f"{expected_and_got(expected, suggestion)}{on_input(inputs)}")


def check_lr_finder(fn):
    """fn(train_step, *, start_lr, end_lr, num_steps, diverge_factor) -> (lrs, losses, suggested_lr).

    train_step(lr) -> float trains one step at learning rate lr and returns its loss. For i = 0 ..
    num_steps - 1, call it with lr_i = start_lr * (end_lr / start_lr) ** (i / (num_steps - 1)), in
    order, and record lr_i and the loss. Stop right after recording a loss that is not finite or
    larger than diverge_factor times the lowest loss before it. lrs and losses are the lists of what
    was recorded; suggested_lr is one tenth of the LR with the lowest finite loss.
    """
    __tracebackhide__ = True
    run_and_judge("check_lr_finder", fn)


register("check_lr_finder", _run_lr_finder, _judge_lr_finder)

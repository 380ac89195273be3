"""Exercise 7, validation and early stopping: fn(model, train_step, evaluate, *, max_steps,
eval_every, patience) -> (best_step, best_val_loss, history), the rule in check_early_stopping's
docstring.

The model, train_step and evaluate are scripted (_ScriptedRun): the weights count the training
steps and the val losses follow a curve, so the judge knows which weights each step left."""
from __future__ import annotations

import copy
import math
import numbers

import torch
import torch.nn as nn

from exercises.checks.harness import (ExerciseFailed, call_candidate, on_input, register, require_callable,
                                      run_and_judge, show, type_name)


class _ScriptedRun:
    """A model whose weights count the training steps, a train_step and a scripted evaluate."""

    def __init__(self, val_losses, seed=0):
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():  # nn.Linear draws from the global generator: leave it as it was
            self.model = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.initial = copy.deepcopy(self.model.state_dict())
        self.val_losses, self.steps, self.evaluated_at = val_losses, 0, []

    def train_step(self):
        self.steps += 1
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(1.0)  # in place, as an optimizer does

    def evaluate(self):
        self.evaluated_at.append(self.steps)
        return _val_loss(self.val_losses, len(self.evaluated_at))

    def weights_after(self, steps):
        return {name: value + steps for name, value in self.initial.items()}


_EARLY_STOPPING_CASES = [
    ("a curve that improves, stalls twice, improves again, then stalls",
     dict(max_steps=200, eval_every=10, patience=3), [5.0, 4.0, 3.0, 3.5, 3.2, 2.5, 2.6, 2.7, 2.8, 2.4, 2.3]),
    ("a curve that never improves after the first evaluation",
     dict(max_steps=100, eval_every=5, patience=2), [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6]),
    ("a flat curve (equal losses are not improvements)",
     dict(max_steps=60, eval_every=4, patience=2), [2.0] * 20),
    ("a curve that improves at every evaluation", dict(max_steps=30, eval_every=10, patience=1),
     [3.0, 2.0, 1.0]),
    ("patience=1 and eval_every=1", dict(max_steps=20, eval_every=1, patience=1), [3.0, 2.0, 2.5, 1.0]),
    ("a run that reaches max_steps after its best evaluation", dict(max_steps=40, eval_every=10, patience=3),
     [3.0, 2.0, 2.5, 2.6]),
    ("losses below the previous evaluation but above the best", dict(max_steps=200, eval_every=10, patience=2),
     [3.0, 2.0, 2.5, 2.4, 2.3, 2.2, 2.1, 2.05]),
    ("improvements smaller than 0.01", dict(max_steps=30, eval_every=5, patience=2),
     [3.0, 2.995, 2.99, 2.985, 2.98, 2.975]),
    # the last max_steps % eval_every = 7 steps train but are not evaluated
    ("max_steps not a multiple of eval_every, run to the end", dict(max_steps=47, eval_every=10, patience=3),
     [3.0, 2.5, 2.0, 1.5, 1.2]),
    ("max_steps not a multiple of eval_every, stopping early", dict(max_steps=53, eval_every=4, patience=2),
     [3.0, 2.0, 2.2, 1.9, 2.1, 2.3]),
    # a fresh model's first val loss is about ln(vocabulary): 10.8 for GPT-2's 50,257 tokens. A best val loss
    # started at a finite constant below that is never beaten
    ("a fresh model over a GPT-2 vocabulary (val losses above 10)", dict(max_steps=100, eval_every=5, patience=3),
     [10.8, 10.5, 10.9, 10.2, 10.3, 10.4, 10.6]),
]


def _run_early_stopping(fn, records, guard):
    require_callable(fn, "train_with_early_stopping")
    for case, settings, curve in _EARLY_STOPPING_CASES:
        run = _ScriptedRun(curve)
        result = call_candidate("train_with_early_stopping", dict(case=case, **settings, val_losses=curve), fn,
                                run.model, run.train_step, run.evaluate, **settings, guard=guard)
        record = {"evaluated_at": run.evaluated_at, "steps": run.steps, "state": dict(run.model.state_dict())}
        if not isinstance(result, (tuple, list)) or len(result) != 3:
            record["result"] = {"kind": show(result)[:200]}
        else:
            best_step, best_loss, history = result
            try:
                pairs = [[int(step), float(loss)] for step, loss in history]
            except (TypeError, ValueError):
                pairs = None
            record["result"] = {"best": [v if isinstance(v, numbers.Real) else type_name(v)
                                         for v in (best_step, best_loss)],
                                "history": pairs, "history_shown": show(history)[:200]}
        records.append(record)


def _early_stopping_expected(curve, settings):
    """(evaluation steps, train_step calls, best step, best loss, history) of the rule in check_early_stopping."""
    every = settings["eval_every"]
    evaluations, stopped, _ = _evaluations_until_stop(curve, settings["patience"], settings["max_steps"] // every)
    history = [(every * k, _val_loss(curve, k)) for k in range(1, evaluations + 1)]
    best_step, best_loss = min(history, key=lambda pair: pair[1]) if history else (0, math.inf)  # first of equals
    return [step for step, _ in history], every * evaluations if stopped else settings["max_steps"], best_step, \
        best_loss, history


def _judge_early_stopping(records):
    for case, settings, curve in _EARLY_STOPPING_CASES:
        record = records.next()
        inputs = dict(case=case, **settings, val_losses=curve)
        result = record["result"]
        if "kind" in result:
            raise ExerciseFailed(f"return a tuple (best_step, best_val_loss, history), got {result['kind']}"
                                 f"{on_input(inputs)}")
        expected_evals, expected_steps, best_step, best_loss, history = _early_stopping_expected(curve, settings)
        _early_stopping_schedule(record, expected_evals, expected_steps, settings, curve, inputs, result["best"])
        if result["history"] is None:
            raise ExerciseFailed(f"history must be a list of (step, val_loss) pairs, got {result['history_shown']}")
        got_history = [tuple(pair) for pair in result["history"]]
        if got_history != history:
            raise ExerciseFailed(f"history should list (step, val_loss) for each evaluation: expected "
                                 f"{history}, got {got_history}{on_input(inputs)}")
        if tuple(result["best"]) != (best_step, best_loss):
            raise ExerciseFailed(f"best_step, best_val_loss should be {(best_step, best_loss)}, got "
                                 f"{tuple(result['best'])}{on_input(inputs)}")
        _early_stopping_weights(record, curve, best_step, expected_steps < settings["max_steps"], inputs)


def _early_stopping_schedule(record, expected_evals, expected_steps, settings, curve, inputs, got_best):
    got_evals = record["evaluated_at"]
    every, max_steps = settings["eval_every"], settings["max_steps"]
    if got_evals and got_evals[0] == 0:
        raise ExerciseFailed(f"you evaluated before training (at step 0): evaluate after every eval_every "
                             f"training steps, i.e. after steps {every}, {2 * every}, ...{on_input(inputs)}")
    if max_steps % every and got_evals == expected_evals + [max_steps]:
        raise ExerciseFailed(f"you evaluated at step max_steps={max_steps} as well: evaluate only when "
                             f"step % eval_every == 0, and {max_steps} is not a multiple of eval_every={every} "
                             f"(expected evaluations after steps {expected_evals}){on_input(inputs)}")
    if got_evals[:len(expected_evals)] != expected_evals[:len(got_evals)]:
        raise ExerciseFailed(f"evaluate after every eval_every={every} training steps: expected evaluations "
                             f"after steps {expected_evals}, yours came after steps {got_evals}{on_input(inputs)}")
    if len(got_evals) != len(expected_evals):
        n, patience, max_evals = len(got_evals), settings["patience"], max_steps // every
        got_step, got_loss = got_best
        got_losses = [_val_loss(curve, k) for k in range(1, n + 1)]

        def model(**mistake):
            """(evaluations, best step) such a loop has on this curve."""
            evaluations, _, best_k = _evaluations_until_stop(curve, mistake.pop("patience", patience), max_evals,
                                                             **mistake)
            return evaluations, every * best_k

        def did(mistake_model, best_matters=True):
            """Whether the learner's loop behaved as `mistake_model` (None: not a model for this setting): the
            same evaluations and, where the model tells, the same best step."""
            if mistake_model is None:
                return False
            evaluations, best_step = mistake_model
            return evaluations == n and (not best_matters or got_step == best_step)

        never_improved_first = any(did(model(initial_best=start), best_matters=False)
                                   and (got_loss not in got_losses or got_step not in got_evals)
                                   for start in [-math.inf] + sorted(set(curve)))
        mistakes = [  # (whether the learner's loop is this mistake, what is wrong), first match wins
            (did(model(strict=False)), "an equal val loss is not an improvement: compare with `<`, not `<=`"),
            (did(model(ties_ignored=True)), "an equal val loss is not an improvement, so it counts as an evaluation "
                                            "without improvement (yours neither reset nor advanced the count)"),
            (never_improved_first,
             "the first evaluation is always an improvement: start the best val loss at math.inf. A finite start "
             "can be below every val loss (a fresh model over GPT-2's 50,257 tokens starts at ln 50257 = 10.8)"),
            (n == max_evals, "training never stopped early: stop after `patience` evaluations in a row without "
                             "improvement"),
            (did(model(patience=patience + 1)), "patience is off by one: you stopped one evaluation late"),
            (patience > 1 and did(model(patience=patience - 1)),
             "patience is off by one: you stopped one evaluation early"),
            (did(model(reset=False)), "reset the count of evaluations without improvement when the val loss "
                                      "improves: patience counts evaluations *in a row*"),
            (did(model(versus_previous=True)), "an improvement means a val loss below the best so far: one below "
                                               "the previous evaluation but above the best does not reset the count"),
            (did(model(min_delta=0.01)), "any val loss strictly below the best is an improvement, however small: "
                                         "don't require a margin (a min_delta)"),
        ]
        message = next((text for matched, text in mistakes if matched), "wrong stopping point")
        raise ExerciseFailed(f"{message}: expected the last evaluation after step {expected_evals[-1]}, yours "
                             f"after step {got_evals[-1] if got_evals else None} (val losses "
                             f"{[_val_loss(curve, k) for k in range(1, max(n, len(expected_evals)) + 1)]})"
                             f"{on_input(inputs)}")
    if record["steps"] != expected_steps:
        if expected_steps == max_steps and record["steps"] == every * (max_steps // every):
            raise ExerciseFailed(f"train for all max_steps={max_steps} steps: after the last evaluation (step "
                                 f"{record['steps']}) the remaining {max_steps % every} steps still train, they are "
                                 f"only not evaluated; yours ran train_step {record['steps']} times"
                                 f"{on_input(inputs)}")
        raise ExerciseFailed(f"train_step should run {expected_steps} times (until the last evaluation, or "
                             f"max_steps), it ran {record['steps']} times{on_input(inputs)}")


def _val_loss(curve, k):
    """The val loss of the k-th evaluation (1-based) in a _ScriptedRun: the curve, then its last value."""
    return curve[min(k, len(curve)) - 1]


def _evaluations_until_stop(curve, patience, max_evals, reset=True, strict=True, versus_previous=False,
                            min_delta=0.0, ties_ignored=False, initial_best=math.inf):
    """(evaluations an early-stopping loop runs on `curve`, whether it stopped early, the evaluation (1-based)
    of its last improvement, 0 if none). The defaults are the rule; the other settings are mistake models."""
    best, bad, previous, best_k = initial_best, 0, math.inf, 0
    for k in range(1, max_evals + 1):
        loss = _val_loss(curve, k)
        if loss < best - min_delta or (not strict and loss == best):
            best, best_k = loss, k
            bad = 0 if reset else bad
        elif versus_previous and loss < previous:
            bad = 0
        elif ties_ignored and loss == best:
            pass
        else:
            bad += 1
            if bad == patience:
                return k, True, best_k
        previous = loss
    return max_evals, False, best_k


def _early_stopping_weights(record, curve, best_step, stopped, inputs):
    state, run = record["state"], _ScriptedRun(curve)
    expected = run.weights_after(best_step)
    # the weights are small integers added to float32 values: any rounding is far below allclose's 1e-5
    if all(torch.allclose(state[name], expected[name]) for name in expected):
        return
    last = run.weights_after(record["steps"])
    if all(torch.allclose(state[name], last[name]) for name in last):
        when = "" if stopped else (" Restore them also when training runs to max_steps without stopping early, "
                                   "as here")
        raise ExerciseFailed(
            f"the model ends with the weights of the last step ({record['steps']}), not of the best one "
            f"({best_step}). Keep a real copy of the best weights, copy.deepcopy(model.state_dict()) (state_dict() "
            f"holds references to the live tensors, which training keeps changing), and load_state_dict() it at "
            f"the end.{when}{on_input(inputs)}")
    raise ExerciseFailed(f"the model should end with the weights it had after step {best_step}, the best "
                         f"evaluation{on_input(inputs)}")


def check_early_stopping(fn):
    """fn(model, train_step, evaluate, *, max_steps, eval_every, patience) -> (best_step, best_val_loss, history).

    For step = 1 .. max_steps: call train_step(); when step % eval_every == 0 call evaluate() -> val
    loss and append (step, val_loss) to history. A val loss strictly below the best so far is an
    improvement: remember the step, the loss and a copy of the model's weights. Stop after `patience`
    evaluations in a row without improvement. Before returning, load the best weights into `model`.
    """
    __tracebackhide__ = True
    run_and_judge("check_early_stopping", fn)


register("check_early_stopping", _run_early_stopping, _judge_early_stopping)

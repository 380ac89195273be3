"""Exercise 10, a dynamic loss scaler: cls(init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5,
growth_interval=2000) with scale(loss), step(optimizer) -> bool (stepped) and get_scale() -> float,
deciding as torch.amp.GradScaler does (scale(loss), then step(optimizer) and update()).

Each scripted run gives the scaler scaled gradients (the true ones times its own get_scale()), some with
an inf or a nan in one element of one parameter, as an fp16 overflow leaves them. The judge replays the
script with torch.amp.GradScaler and compares the scales, the steps taken or skipped and the parameters;
where the decisions part, it replays them under models of known mistakes (_simulate) to name the one made."""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn

from exercises.checks.harness import (NONE_GRAD_HINT, ExerciseFailed, call_candidate, register, run_and_judge, show,
                                      tensor_differences, type_name)

_SHAPES = ((3, 2), (4,), (2,))
# per step: None (finite gradients) or (what, parameter index): an inf/-inf/nan in that parameter's gradient
_SCRIPTS = [
    ("overflows after 1 and after 2 good steps, nan, two in a row",
     dict(init_scale=2.0 ** 10, growth_factor=2.0, backoff_factor=0.5, growth_interval=3),
     [None, ("inf", 0), None, None, ("inf", 1), None, None, None, None, ("nan", 0), ("-inf", 1), ("inf", 0),
      None, None, None, None]),
    ("other factors (growth 4, backoff 0.25, interval 2), an overflow only in the last parameter",
     dict(init_scale=2.0 ** 8, growth_factor=4.0, backoff_factor=0.25, growth_interval=2),
     [None, None, None, ("inf", 2), None, None, ("nan", 2), None, None, None]),
]
_NO_GRAD = 2  # in the second script, this parameter has no gradient at the steps listed here
_NO_GRAD_STEPS = {1: (0, 4)}


def _params():
    g = torch.Generator().manual_seed(10)
    return [nn.Parameter(torch.randn(shape, generator=g)) for shape in _SHAPES]


def _true_grads(index, steps):
    g = torch.Generator().manual_seed(100 + index)
    return [[torch.randn(shape, generator=g) for shape in _SHAPES] for _ in range(steps)]


def _set_scaled_grads(params, grads, scale, event, no_grad):
    for i, (p, grad) in enumerate(zip(params, grads)):
        p.grad = None if i in no_grad else grad * scale
    if event is not None:
        what, index = event
        params[index].grad.view(-1)[0] = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}[what]


def _run(cls, records, guard):
    if not isinstance(cls, type):
        raise ExerciseFailed(f"pass the class itself (LossScaler), not {type_name(cls)}")
    for index, (case, settings, script) in enumerate(_SCRIPTS):
        params = _params()
        optimizer = torch.optim.SGD(params, lr=0.1)
        scaler = call_candidate("LossScaler(...)", settings, cls, **settings, guard=guard)
        record = {"scales": [], "stepped": [], "params": [], "scaled_loss": []}
        for t, (grads, event) in enumerate(zip(_true_grads(index, len(script)), script)):
            scale = call_candidate("get_scale()", {"case": case}, scaler.get_scale, guard=guard)
            record["scales"].append(scale if isinstance(scale, numbers.Real) else show(scale))
            loss = call_candidate("scale(loss)", {"case": case}, scaler.scale, torch.tensor(1.5), guard=guard)
            record["scaled_loss"].append(loss.detach().item() if torch.is_tensor(loss) and loss.numel() == 1
                                         else show(loss))
            if not isinstance(scale, numbers.Real):
                break
            no_grad = (_NO_GRAD,) if t in _NO_GRAD_STEPS.get(index, ()) else ()
            _set_scaled_grads(params, grads, float(scale), event, no_grad)
            # the steps before had every gradient: a None met here is the missing one
            hint = (lambda error: bool(no_grad) and "NoneType" in str(error), NONE_GRAD_HINT[1])
            stepped = call_candidate(f"step(optimizer) (step {t + 1})", {"case": case}, scaler.step, optimizer,
                                     hints=[hint], guard=guard)
            record["stepped"].append(stepped if isinstance(stepped, bool) else show(stepped))
            record["params"].append([p.detach().clone() for p in params])
        final = call_candidate("get_scale()", {"case": case}, scaler.get_scale, guard=guard)
        record["scales"].append(final if isinstance(final, numbers.Real) else show(final))
        records.append(record)


def _reference(index):
    """(scales before each step and after the last, stepped, params after each step) with torch.amp.GradScaler."""
    case, settings, script = _SCRIPTS[index]
    params = _params()
    optimizer = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", **settings)
    scales, stepped, history = [], [], []
    for t, (grads, event) in enumerate(zip(_true_grads(index, len(script)), script)):
        scaler.scale(torch.tensor(1.0))  # GradScaler starts its scale at the first scale()
        scales.append(scaler.get_scale())
        _set_scaled_grads(params, grads, scales[-1], event, (_NO_GRAD,) if t in _NO_GRAD_STEPS.get(index, ()) else ())
        before = [p.detach().clone() for p in params]
        scaler.step(optimizer)
        scaler.update()
        history.append([p.detach().clone() for p in params])
        stepped.append(not all(torch.equal(a, b) for a, b in zip(before, history[-1])))
    scales.append(scaler.get_scale())
    return scales, stepped, history


def _simulate(settings, script, reset=True, grow_after=0, detects=("inf", "-inf", "nan"), first_only=False,
              backoff=True, skip=True):
    """(scales, stepped) of a scaler with these decision rules; the defaults are GradScaler's."""
    scale, good, scales, stepped = settings["init_scale"], 0, [], []
    for event in script:
        scales.append(scale)
        overflow = event is not None and event[0] in detects and not (first_only and event[1] != 0)
        stepped.append(not (overflow and skip))
        if overflow:
            scale = scale * settings["backoff_factor"] if backoff else scale
            good = 0 if reset else good
        else:
            good += 1
            if good == settings["growth_interval"] + grow_after:
                scale, good = scale * settings["growth_factor"], 0
    scales.append(scale)
    return scales, stepped


_DECISION_MISTAKES = [  # (mistake model, message); first match wins
    (dict(detects=("inf", "-inf")), "a nan gradient is an overflow too: test every gradient with "
                                    "torch.isfinite(g).all() (which is False for inf, -inf and nan), not isinf"),
    (dict(detects=("inf",)), "test for -inf and nan as well: torch.isfinite(g).all() is False for all three"),
    (dict(first_only=True), "check every parameter's gradient for inf/nan, not only the first one's"),
    (dict(skip=False), "skip the optimizer step when a gradient is not finite: the update would write inf/nan "
                       "into the weights"),
    (dict(backoff=False), "after an overflow multiply the scale by backoff_factor (halve it), or it overflows again"),
    (dict(reset=False), "an overflow restarts the count of good steps: the scale grows after growth_interval "
                        "good steps *in a row*"),
    (dict(grow_after=1), "the scale grows one step late: multiply it by growth_factor after growth_interval good "
                         "steps in a row (then restart the count)"),
    (dict(grow_after=-1), "the scale grows one step early: multiply it by growth_factor after growth_interval good "
                          "steps in a row, not growth_interval - 1"),
]


def _judge(records):
    for index, (case, settings, script) in enumerate(_SCRIPTS):
        record = records.next()
        scales, stepped, history = _reference(index)
        for t, got in enumerate(record["scales"][:len(script)]):
            if isinstance(got, str):
                raise ExerciseFailed(f"get_scale() must return a float, got {got} at step {t + 1} ({case})")
        for t, (got, value) in enumerate(zip(record["scaled_loss"], record["scales"])):
            if not isinstance(got, float) or got != 1.5 * value:
                raise ExerciseFailed(f"scale(loss) must return loss * the current scale: for loss 1.5 and scale "
                                     f"{value:g} expected {1.5 * value:g}, got {got} ({case})")
        for t, got in enumerate(record["stepped"]):
            if not isinstance(got, bool):
                raise ExerciseFailed(f"step(optimizer) must return True when it stepped and False when it skipped, "
                                     f"got {got} at step {t + 1} ({case})")
        got_scales, got_stepped = [float(s) for s in record["scales"]], record["stepped"]
        if (got_scales, got_stepped) != (scales, stepped):
            _name_decision_mistake(settings, script, index, got_scales, got_stepped, scales, stepped, case)
        for t, (got_params, expected_params) in enumerate(zip(record["params"], history)):
            for i, (a, b) in enumerate(zip(got_params, expected_params)):
                # the same float32 operations as GradScaler (a power-of-two scale unscales exactly) and SGD
                if torch.allclose(a, b, rtol=1e-6, atol=1e-7):
                    continue
                if not torch.isfinite(a).all():
                    raise ExerciseFailed(f"after step {t + 1} parameter {i} holds inf/nan ({case}): an overflowed "
                                         f"gradient reached the optimizer; skip the step when any gradient is not "
                                         f"finite")
                ratio = ((a - history[t - 1][i] if t else a - _params()[i]).abs().max()
                         / (b - history[t - 1][i] if t else b - _params()[i]).abs().max()).item()
                if math.isclose(ratio, scales[t], rel_tol=1e-3):
                    raise ExerciseFailed(f"unscale the gradients before the optimizer steps: p.grad.mul_(1 / scale). "
                                         f"Yours stepped with the scaled gradients, {scales[t]:g} times too big "
                                         f"(step {t + 1}, {case})")
                raise ExerciseFailed(f"wrong parameter {i} after step {t + 1} ({case}): "
                                     f"{tensor_differences(b, a)}. Unscale each gradient by 1 / scale before "
                                     f"optimizer.step()")


def _name_decision_mistake(settings, script, index, got_scales, got_stepped, scales, stepped, case):
    for mistake, message in _DECISION_MISTAKES:
        if _simulate(settings, script, **mistake) == (got_scales, got_stepped):
            raise ExerciseFailed(f"{message} ({case})")
    t = next(t for t in range(len(script) + 1)
             if t >= len(got_stepped) or got_scales[t] != scales[t] or got_stepped[t] != stepped[t])
    events = ", ".join(f"step {k + 1}: {'finite' if e is None else e[0] + ' in parameter ' + str(e[1])}"
                       for k, e in enumerate(script[:t + 1]))
    raise ExerciseFailed(f"GradScaler decides differently at step {t + 1} ({case}; {events}): expected scale "
                         f"{scales[t]:g}{'' if t == len(script) else ' and ' + ('a step' if stepped[t] else 'a skip')}, "
                         f"yours {got_scales[t]:g}"
                         f"{'' if t == len(script) else ' and ' + ('a step' if got_stepped[t] else 'a skip')}")


def check_loss_scaler(cls):
    """cls(init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000): scale(loss) ->
    loss * scale; step(optimizer) -> bool unscales every gradient by 1 / scale and, if all are finite, steps
    (a good step; after growth_interval good steps in a row the scale is multiplied by growth_factor), else
    skips the step and multiplies the scale by backoff_factor (the count of good steps restarts); get_scale()."""
    __tracebackhide__ = True
    run_and_judge("check_loss_scaler", cls)


register("check_loss_scaler", _run, _judge)

"""Exercise 2, AdamW: cls(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01), a
torch.optim.Optimizer whose step() the learner writes.

The run builds the optimizer on scripted scenarios (the scenario names below) and records the
parameters after each step; the judge replays every scenario with training.AdamW and, where the
trajectories part, compares them with models of known mistakes to name the one made.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

import training
from exercises.checks.harness import (NONE_GRAD_HINT, ExerciseFailed, call_candidate, register, run_and_judge,
                                      tensor_differences, type_name)

_PARAM_SHAPES = ((4, 3), (5,), (2, 2, 2))


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=g)) for shape in _PARAM_SHAPES]


def _grads(seed, steps, scale=1.0):
    g = torch.Generator().manual_seed(seed + 1000)
    return [[torch.randn(shape, generator=g) * scale for shape in _PARAM_SHAPES] for _ in range(steps)]


_LEAF_HINT = (lambda e: "leaf Variable" in str(e) or "requires grad" in str(e),
              "update the parameters inside torch.no_grad() (keep the @torch.no_grad() decorator on step)")
_FIRST_STEP_HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
_MANY_STEPS_HYPER = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
_MANY_STEPS_HYPER_TEXT = "lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1"


def _two_groups(params, own_betas=True):
    second = {"params": params[2:], "lr": 3e-3, "weight_decay": 0.0}
    if own_betas:
        second.update(betas=(0.85, 0.95), eps=1e-7)
    return [{"params": params[:2]}, second]


def _adamw_scenario(name):
    """(params, grads, hyper, lr_per_step, groups) of a scenario, rebuilt identically by the run and the judge;
    grads[t][i] is the gradient of params[i] at step t + 1 (None: no gradient)."""
    if name == "skips None":
        g = torch.Generator().manual_seed(3)
        params = [nn.Parameter(torch.randn(3, generator=g)),
                  nn.Parameter(torch.randn(4, generator=g), requires_grad=False),
                  nn.Parameter(torch.randn(2, generator=g))]
        return params, [[torch.randn(3, generator=g), None, None] for _ in range(2)], \
            dict(lr=1e-2, weight_decay=0.1), None, None
    if name == "late gradient":  # the third parameter gets its first gradient at step 3
        grads = _grads(7, 5)
        grads[0][2] = grads[1][2] = None
        return _params(7), grads, dict(lr=1e-2, weight_decay=0.1), None, None
    return {
        "first step": lambda: (_params(1), [_grads(1, 1)[0]], _FIRST_STEP_HYPER, None, None),
        "tiny gradients": lambda: (_params(1), [_grads(2, 1, scale=1e-9)[0]], _FIRST_STEP_HYPER, None, None),
        "decay only": lambda: (_params(1), [[torch.zeros(shape) for shape in _PARAM_SHAPES]],
                               dict(_FIRST_STEP_HYPER, weight_decay=0.1), None, None),
        "many steps": lambda: (_params(4), _grads(4, 6), _MANY_STEPS_HYPER, None, None),
        "groups": lambda: (_params(5), _grads(5, 4), dict(lr=1e-2, weight_decay=0.1), [1.0, 1.0, 0.5, 0.25],
                           _two_groups),
    }[name]()


_ADAMW_SCENARIOS = ("first step", "tiny gradients", "decay only", "skips None", "many steps", "groups",
                    "late gradient")


def _trajectory(cls, params, grads, hyper, lr_per_step=None, groups=None, guard=None):
    """(parameters after each step, the optimizer, whether step() changed a .grad) of cls(params, **hyper)."""
    spec = groups(params) if groups else params
    what = f"AdamW({'param_groups' if groups else 'params'}, {', '.join(f'{k}={v}' for k, v in hyper.items())})"
    optimizer = call_candidate(what, hyper, cls, spec, **hyper, hints=[NONE_GRAD_HINT], guard=guard)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ExerciseFailed(f"{what} must build a torch.optim.Optimizer; got {type_name(optimizer)}")
    history, base_lrs, grad_changed = [], [group["lr"] for group in optimizer.param_groups], False
    for t, step_grads in enumerate(grads):
        if lr_per_step is not None:
            for group, base_lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base_lr * lr_per_step[t]
        for p, grad in zip(params, step_grads):
            p.grad = None if grad is None else grad.clone()
        call_candidate(f"step() (step {t + 1})", hyper, optimizer.step, hints=[NONE_GRAD_HINT, _LEAF_HINT], guard=guard)
        grad_changed |= any(grad is not None and (p.grad is None or not torch.equal(p.grad, grad))
                            for p, grad in zip(params, step_grads))
        history.append([p.detach().clone() for p in params])
    return history, optimizer, grad_changed


def _reference_history(name, cls=training.AdamW, groups=None, **hyper_changes):
    params, grads, hyper, lr_per_step, scenario_groups = _adamw_scenario(name)
    return _trajectory(cls, params, grads, dict(hyper, **hyper_changes), lr_per_step, groups or scenario_groups)[0]


def _run_adamw(cls, records, guard):
    # The first optimizer built in a process imports parts of torch lazily (seconds, millions of calls): build
    # one here, so that this never happens under the candidate's time limit and the call guard's profiler.
    training.AdamW([nn.Parameter(torch.zeros(1))]).step()
    is_optimizer = isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)
    inherits = is_optimizer and issubclass(cls, (torch.optim.Adam, torch.optim.AdamW, training.AdamW))
    records.append({"kind": type_name(cls), "is_class": isinstance(cls, type), "optimizer": is_optimizer,
                    "inherits": inherits})
    if not is_optimizer or inherits:
        return
    for name in _ADAMW_SCENARIOS:
        params, grads, hyper, lr_per_step, groups = _adamw_scenario(name)
        history, _, grad_changed = _trajectory(cls, params, grads, hyper, lr_per_step, groups, guard)
        records.append({"history": history, "grad_changed": grad_changed})
    hyper, grads, params = dict(lr=1e-2, weight_decay=0.1), _grads(6, 4), _params(6)
    _, optimizer, _ = _trajectory(cls, params, grads[:3], hyper, guard=guard)
    saved = copy.deepcopy(call_candidate("state_dict()", {}, optimizer.state_dict, guard=guard))
    resumed_params = [nn.Parameter(p.detach().clone()) for p in params]
    resumed = call_candidate("AdamW(params, ...)", hyper, cls, resumed_params, **hyper, guard=guard)
    call_candidate("load_state_dict()", {}, resumed.load_state_dict, saved, guard=guard)
    for run_params, optimizer_run in ((params, optimizer), (resumed_params, resumed)):
        for p, grad in zip(run_params, grads[3]):
            p.grad = grad.clone()
        call_candidate("step() after load_state_dict()", {}, optimizer_run.step, guard=guard)
    records.append({"continued": [p.detach().clone() for p in params],
                    "resumed": [p.detach().clone() for p in resumed_params]})


def _judge_adamw(records):
    kind = records.next()
    if not kind["is_class"]:
        raise ExerciseFailed(f"pass the class itself (AdamW), not {kind['kind']}")
    if not kind["optimizer"]:
        raise ExerciseFailed("AdamW must subclass torch.optim.Optimizer (keep `class AdamW(torch.optim.Optimizer)`)")
    if kind["inherits"]:
        raise ExerciseFailed("write step() yourself rather than inheriting it from an existing Adam/AdamW")
    judges = {"first step": _adamw_first_step, "tiny gradients": _adamw_tiny_gradients,
              "decay only": _adamw_decay_only, "skips None": _adamw_skips_none, "many steps": _adamw_many_steps,
              "groups": _adamw_groups_and_schedule, "late gradient": _adamw_late_gradient}
    for name in _ADAMW_SCENARIOS:
        record = records.next()
        judges[name](record["history"])
        if record["grad_changed"]:
            raise ExerciseFailed("step() changed p.grad: an in-place operation on the gradient (p.grad.pow_(2), "
                                 "p.grad.mul_(...)) leaves it modified for whoever reads it next. Compute "
                                 "p.grad * p.grad (or v.addcmul_(p.grad, p.grad, value=1 - beta2)) and leave "
                                 "p.grad as it is")
    resume = records.next()
    if not all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(resume["continued"], resume["resumed"])):
        raise ExerciseFailed("an optimizer rebuilt from state_dict() takes a different step: keep m, v and the "
                             "step count in self.state[p] (torch saves and restores that dict), not in "
                             "attributes of your own")


# Updates are measured as after - before on float32 parameters of magnitude < 4, each stored to within
# 2.4e-7; two such roundings and the learner's own order of operations stay below 1e-6.
_UPDATE_ATOL = 1e-6


def _updates(name, history):
    before = [p.detach().clone() for p in _adamw_scenario(name)[0]]
    per_param = [after - start for after, start in zip(history[0], before)]
    return torch.cat([u.flatten() for u in per_param]), per_param, before


def _adamw_first_step(history):
    got, got_per_param, _ = _updates("first step", history)
    expected, expected_per_param, _ = _updates("first step", _reference_history("first step"))
    if torch.allclose(got, expected, rtol=1e-3, atol=_UPDATE_ATOL):
        return
    lr = _FIRST_STEP_HYPER["lr"]
    ratio = (got.abs() / lr).median().item()
    g = torch.cat([x.flatten() for x in _grads(1, 1)[0]])
    if ratio < 1e-6:
        raise ExerciseFailed("step() did not change the parameters: update each p in place "
                             "(p.add_(...), p.addcdiv_(...)); rebinding a local name changes nothing")
    if torch.allclose(got, -expected, rtol=1e-3, atol=_UPDATE_ATOL):
        raise ExerciseFailed("the update goes up the gradient: subtract it, p -= lr * m_hat / (sqrt(v_hat) + eps)")
    if torch.allclose(got, -lr * g, rtol=1e-3, atol=_UPDATE_ATOL):
        raise ExerciseFailed("the first step is plain SGD (p -= lr * grad): AdamW divides the averaged "
                             "gradient m_hat by sqrt(v_hat) + eps")
    for value, message in ((0.1 / math.sqrt(0.001), "missing bias correction: divide m by (1 - beta1**t) and v by "
                                                     "(1 - beta2**t), t = 1 on the first step"),
                           (1 / math.sqrt(0.001), "v is not bias-corrected: divide v by (1 - beta2**t)"),
                           (0.1, "m is not bias-corrected: divide m by (1 - beta1**t)")):
        if abs(ratio / value - 1) < 0.05:
            raise ExerciseFailed(f"{message}. On step 1 every |update| should be about lr (m_hat / sqrt(v_hat) "
                                 f"= g / |g|), yours is {ratio:.3g} x lr")
    (beta1, beta2) = _FIRST_STEP_HYPER["betas"]
    for t in (2, 3):  # |update| / lr of a first step bias-corrected with this t (m = (1 - beta1) g, v = (1 - beta2) g^2)
        value = (1 - beta1) / (1 - beta1 ** t) / math.sqrt((1 - beta2) / (1 - beta2 ** t))
        if torch.allclose(got.abs() / lr, torch.full_like(got, value), rtol=1e-2):  # every parameter's
            raise ExerciseFailed(f"your first step was bias-corrected with t = {t}: t must be 1 on the first step "
                                 f"(the count starts at 0 and grows by one per step(); yours advanced by {t} or "
                                 f"started above 0). Your |update| is {ratio:.3g} x lr, about lr expected")
    right = [torch.allclose(a, b, rtol=1e-3, atol=_UPDATE_ATOL) for a, b in zip(got_per_param, expected_per_param)]
    if right[0] and not all(right):
        i = right.index(False)
        raise ExerciseFailed(f"the first step of parameter 0 is right but that of parameter {i} is not "
                             f"({tensor_differences(expected_per_param[i], got_per_param[i])}): each parameter takes "
                             f"its first step with t = 1. Keep the step count per parameter, in self.state[p]; a "
                             f"counter shared by all parameters is already at 2, 3, ... when the others step")
    raise ExerciseFailed(f"wrong first step with lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, update "
                         f"(after - before): {tensor_differences(expected, got)}")


def _adamw_tiny_gradients(history):
    got, _, _ = _updates("tiny gradients", history)
    expected, _, _ = _updates("tiny gradients", _reference_history("tiny gradients"))
    if torch.allclose(got, expected, rtol=1e-3, atol=_UPDATE_ATOL):
        return
    ratio = (got.abs() / _FIRST_STEP_HYPER["lr"]).median().item()
    if ratio < 1e-3:
        raise ExerciseFailed("eps belongs outside the square root: p -= lr * m_hat / (sqrt(v_hat) + eps). With "
                             "gradients of 1e-9, sqrt(v_hat + eps) is 1e-4 and the step all but vanishes")
    if abs(ratio - 1) < 0.05:
        raise ExerciseFailed("eps is missing from the denominator: p -= lr * m_hat / (sqrt(v_hat) + eps); it "
                             "keeps steps small when gradients are ~0 (use group['eps'])")
    raise ExerciseFailed(f"wrong step for gradients of size ~1e-9 (eps=1e-8 matters here), update (after - "
                         f"before): {tensor_differences(expected, got)}")


def _adamw_decay_only(history):
    lr, weight_decay = _FIRST_STEP_HYPER["lr"], 0.1
    got, _, before = _updates("decay only", history)
    expected, _, _ = _updates("decay only", _reference_history("decay only"))
    if torch.allclose(got, expected, rtol=1e-3, atol=_UPDATE_ATOL):
        return
    p = torch.cat([b.flatten() for b in before])
    if got.abs().max() < 1e-12:
        raise ExerciseFailed("weight decay is missing: AdamW shrinks every weight, p -= lr * weight_decay * p, "
                             "even when its gradient is zero (use group['weight_decay'])")
    if torch.allclose(got, -weight_decay * p, rtol=1e-3, atol=_UPDATE_ATOL):
        raise ExerciseFailed("weight decay is not scaled by the learning rate: p -= lr * weight_decay * p")
    if torch.allclose(got.abs(), torch.full_like(got, lr), rtol=1e-2):
        raise ExerciseFailed("weight decay is applied to the gradient, AdamW decouples it: adding "
                             "weight_decay * p to the gradient (L2, as in Adam) sends it through m and v. "
                             "Shrink the weight itself: p -= lr * weight_decay * p")
    raise ExerciseFailed(f"wrong weight decay: with a zero gradient, lr=0.01 and weight_decay=0.1 one step should "
                         f"give p * (1 - lr * weight_decay). Update (after - before): "
                         f"{tensor_differences(expected, got)}")


def _adamw_skips_none(history):
    before = [p.detach().clone() for p in _adamw_scenario("skips None")[0]]
    for name, index in (("a frozen parameter (requires_grad=False)", 1), ("a parameter with no gradient", 2)):
        if not torch.equal(history[-1][index], before[index]):
            raise ExerciseFailed(f"{name} changed: parameters whose .grad is None must be skipped entirely, "
                                 f"not even weight decay touches them (`if p.grad is None: continue`)")


def _first_mismatch(got, expected, rtol=1e-5, atol=1e-6):
    # parameters of magnitude ~1 in float32, a few roundings of ~1e-7 per step over at most 6 steps
    for t, (got_step, expected_step) in enumerate(zip(got, expected)):
        for i, (a, b) in enumerate(zip(got_step, expected_step)):
            if a.shape != b.shape or not torch.allclose(a, b, rtol=rtol, atol=atol):
                return t, i
    return None


def _matches(got, expected):
    return _first_mismatch(got, expected) is None


def _against_reference(name, got):
    """(training.AdamW's history on scenario `name`, the first (step, parameter) where `got` differs from it)."""
    expected = _reference_history(name)
    return expected, _first_mismatch(got, expected)


def _adamw_many_steps(got):
    expected, mismatch = _against_reference("many steps", got)
    if mismatch is None:
        return
    variants = [
        (_reference_history("many steps", betas=(0.99, 0.8)),
         "betas are swapped: beta1 (first of the pair) averages the gradient m, beta2 the squared gradient v"),
        (_reference_history("many steps", betas=(0.9, 0.999), eps=1e-8),
         "use the hyperparameters of the param group (group['betas'], group['eps']), not fixed numbers"),
        (_reference_history("many steps", cls=_coupled_adam),
         "weight decay is applied to the gradient, AdamW decouples it: shrink the weight, p -= lr * wd * p, "
         "and keep weight decay out of m and v"),
        (_reference_history("many steps", cls=_DecayAfterUpdate),
         "apply weight decay before the Adam update, as torch.optim.AdamW: p *= 1 - lr * wd, then "
         "p -= lr * m_hat / (sqrt(v_hat) + eps)"),
    ]
    for variant, message in variants + _STEP_COUNT_MISTAKES:
        if callable(variant):
            variant = _reference_history("many steps", cls=variant)
        if _matches(got, variant):
            raise ExerciseFailed(message)
    t, i = mismatch
    raise ExerciseFailed(f"after step {t + 1} of 6 ({_MANY_STEPS_HYPER_TEXT}), parameter {i} (shape "
                         f"{list(expected[t][i].shape)}) is wrong: "
                         f"{tensor_differences(expected[t][i], got[t][i])}")


class _StateMistake(torch.optim.Optimizer):
    """training.AdamW with its per-parameter state changed before every step (a mistake model): `before(state)`
    edits the step count or clears the moments."""

    before = staticmethod(lambda state: None)

    def __init__(self, params, **hyper):
        self.adam = training.AdamW(params, **hyper)
        super().__init__(self.adam.param_groups, {})

    @torch.no_grad()
    def step(self, closure=None):
        for state in self.adam.state.values():
            type(self).before(state)
        self.adam.step()


def _state_mistake(edit):
    return type("_StateMistake", (_StateMistake,), {"before": staticmethod(edit)})


# (a model of the mistake, its message): each names one thing done to t, m or v between steps
_STEP_COUNT_MISTAKES = [
    (_state_mistake(lambda state: state.update(step=0)),
     "the bias correction uses the power t, the number of steps taken so far: m / (1 - beta1 ** t) and "
     "v / (1 - beta2 ** t). Yours corrects as if t were 1 at every step (1 - beta1, 1 - beta2)"),
    (_state_mistake(lambda state: state.update(step=state["step"] + 1)),
     "the step count t grows by one per step(): yours counted 1, 3, 5, ... (it advanced twice per step)"),
    (_state_mistake(lambda state: state.clear()),
     "m, v and the step count t must persist between calls (in self.state[p]): yours started them afresh at "
     "every step() (step 1 is right, the later ones are not)"),
]


def _coupled_adam(params, **hyper):
    return torch.optim.Adam(params, **hyper)


class _DecayAfterUpdate(torch.optim.Optimizer):
    """AdamW with the decay applied after the update instead of before (a mistake model)."""

    def __init__(self, params, weight_decay, **hyper):
        super().__init__(params, dict(lr=hyper["lr"], weight_decay=weight_decay))
        self.adam = training.AdamW(params, weight_decay=0.0, **hyper)
        self.lr, self.weight_decay = hyper["lr"], weight_decay

    @torch.no_grad()
    def step(self, closure=None):
        self.adam.step()
        for p in self.param_groups[0]["params"]:
            p.mul_(1 - self.lr * self.weight_decay)


def _adamw_groups_and_schedule(got):
    expected, mismatch = _against_reference("groups", got)
    if mismatch is None:
        return
    t, i = mismatch
    if _matches(got, _reference_history("groups", groups=lambda params: _two_groups(params, own_betas=False))):
        raise ExerciseFailed("read betas and eps from each param group (group['betas'], group['eps']), not from "
                             "self.defaults: here the second group has its own betas=(0.85, 0.95) and eps=1e-7")
    if t >= 2:
        raise ExerciseFailed("read the learning rate from group['lr'] at every step(): an LR schedule changes it "
                             "between steps (here it halves at step 3), and your update kept the old one")
    if i >= 2:
        raise ExerciseFailed("each param group has its own lr, betas, eps and weight_decay: loop over "
                             "self.param_groups and read them from `group` (here group 2 has lr=3e-3, no decay, "
                             "betas=(0.85, 0.95), eps=1e-7)")
    raise ExerciseFailed(f"wrong update with two param groups, at step {t + 1}, parameter {i}: "
                         f"{tensor_differences(expected[t][i], got[t][i])}")


def _adamw_late_gradient(got):
    expected, mismatch = _against_reference("late gradient", got)
    if mismatch is None:
        return
    t, i = mismatch
    if i == 2 and t >= 2:
        raise ExerciseFailed(f"parameter 2 gets its first gradient at step 3 and must take its first Adam step "
                             f"with t = 1 (bias correction 1 - beta**1), yours did not "
                             f"({tensor_differences(expected[t][i], got[t][i])}): count steps per parameter, in "
                             f"self.state[p]['step'], not per group or per optimizer")
    raise ExerciseFailed(f"wrong update at step {t + 1}, parameter {i}, when parameter 2 has no gradient in "
                         f"steps 1-2: {tensor_differences(expected[t][i], got[t][i])}")


def check_adamw(cls):
    """cls(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01): an optimizer matching
    torch.optim.AdamW (decoupled weight decay, bias correction) step for step."""
    __tracebackhide__ = True
    run_and_judge("check_adamw", cls)


register("check_adamw", _run_adamw, _judge_adamw)

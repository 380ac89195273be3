"""Exercise 3, global-norm gradient clipping: fn(parameters, max_norm) -> the global norm before
clipping, a 0-dim tensor, with the gradients clipped in place."""
from __future__ import annotations

import torch
import torch.nn as nn

import training
from exercises.checks.harness import (NONE_GRAD_HINT, ExerciseFailed, call_candidate, expected_and_got, is_close,
                                      register, require_callable, run_and_judge, tensor_differences, type_name)


def _cases():
    """(case, parameters or a module, max_norm, pass a generator)."""
    g = torch.Generator().manual_seed(21)

    def params(scale, shapes=((4, 3), (7,), (2, 2, 2)), missing=True):
        ps = [nn.Parameter(torch.randn(shape, generator=g)) for shape in shapes]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g) * scale
        if missing:
            ps.insert(1, nn.Parameter(torch.randn(3, generator=g)))  # .grad stays None
        return ps

    with torch.random.fork_rng():  # nn.Linear draws its weights from the global generator: leave it as it was
        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 3
    frozen = params(0.05, missing=False) + [nn.Parameter(torch.randn(2, generator=g), requires_grad=False)]
    return [
        ("gradients with a global norm above max_norm", params(5.0), 1.0, False),
        ("gradients with a global norm below max_norm", params(0.05), 1.0, False),
        ("max_norm=2.5 and gradients of very different sizes", params(1.0) + params(30.0, ((2,),), False), 2.5,
         False),
        ("model.parameters() (a generator) with a norm above max_norm", model, 1.0, True),
        ("a frozen parameter and a norm below max_norm", frozen, 0.5, False),
        ("parameters none of which has a gradient", [nn.Parameter(torch.randn(3)), nn.Parameter(torch.ones(2))],
         1.0, False),
        # here the 1e-6 in max_norm / (norm + 1e-6) changes the scale by 0.3%
        ("a global norm of 3e-4 above max_norm=1e-4", params(6e-5), 1e-4, False),
    ]


def _clone_params(params):
    clones = []
    for p in params:
        clone = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        clone.grad = None if p.grad is None else p.grad.clone()
        clones.append(clone)
    return clones


def _case_params(source, as_generator):
    return list(source.parameters()) if as_generator else source


def _run_clip_grad_norm(fn, records, guard):
    require_callable(fn, "clip_grad_norm")
    for case, source, max_norm, as_generator in _cases():
        learner = _clone_params(_case_params(source, as_generator))
        argument = (p for p in learner) if as_generator else learner
        given = [p.grad for p in learner]
        got = call_candidate("clip_grad_norm", {"case": case, "max_norm": max_norm}, fn, argument, max_norm,
                             hints=[_none_grad_hint(fn, source, as_generator, max_norm, guard)], guard=guard)
        # in place keeps each .grad the same tensor object: whatever holds it (an optimizer, a hook) sees the clip
        records.append({"got": got, "grads": [p.grad for p in learner],
                        "replaced": [g is not None and p.grad is not g for p, g in zip(learner, given)]})


def _none_grad_hint(fn, source, as_generator, max_norm, guard):
    """NONE_GRAD_HINT, given only when the parameters without a gradient are what broke the call: the candidate
    runs on the same case without them. A None of the learner's own (`total = None`) gets no such advice."""
    with_grads = [p for p in _clone_params(_case_params(source, as_generator)) if p.grad is not None]

    def matches(error):
        if "NoneType" not in str(error) or len(with_grads) == len(list(_case_params(source, as_generator))):
            return False
        try:
            call_candidate("clip_grad_norm", {}, fn, _clone_params(with_grads), max_norm, guard=guard)
        except ExerciseFailed:
            return False
        return True
    return matches, NONE_GRAD_HINT[1]


def _judge_clip_grad_norm(records):
    cases = _cases()
    got_all = []  # the records, up to a failure (kept to be raised in its turn)
    for _ in cases:
        try:
            got_all.append(records.next())
        except ExerciseFailed as failure:
            got_all.append(failure)
            break
    changed = []  # per case: did the learner change any gradient
    for (case, source, max_norm, as_generator), record in zip(cases, got_all):
        if isinstance(record, ExerciseFailed):
            break
        params = _case_params(source, as_generator)
        changed.append(any(p.grad is not None and g is not None and not torch.equal(p.grad, g)
                           for p, g in zip(params, record["grads"])))
    for (case, source, max_norm, as_generator), record in zip(cases, got_all):
        if isinstance(record, ExerciseFailed):
            raise record
        params = _case_params(source, as_generator)
        before = [None if p.grad is None else p.grad.clone() for p in params]
        reference = _clone_params(params)
        expected_norm = training.clip_grad_norm(reference, max_norm).item()
        _judge_norm(record["got"], expected_norm, before, max_norm, case, as_generator)
        _judge_grads(record["grads"], reference, before, max_norm, expected_norm, case, as_generator,
                     _changed_below(cases, changed))
        if any(record["replaced"]):
            index = record["replaced"].index(True)
            raise ExerciseFailed(f"the values are right but parameter {index}'s .grad is a new tensor for {case}: "
                                 f"`p.grad = p.grad * scale` rebinds it. Clip in place, p.grad.mul_(scale), so that "
                                 f"the tensor the optimizer (or a hook) already holds is the one clipped")


def _changed_below(cases, changed):
    """Whether the learner scaled gradients in a case whose norm is below max_norm."""
    below = []
    for (case, source, max_norm, as_generator), was_changed in zip(cases, changed):
        grads = [p.grad for p in _case_params(source, as_generator) if p.grad is not None]
        if grads and torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item() < max_norm:
            below.append(was_changed)
    return any(below)


def _judge_norm(got, expected, before, max_norm, case, as_generator):
    if not torch.is_tensor(got):
        raise ExerciseFailed(f"return the norm as a 0-dim tensor (as torch.nn.utils.clip_grad_norm_ does), "
                             f"not {type_name(got)}, for {case}")
    if got.numel() != 1:
        raise ExerciseFailed(f"return one number, the global norm (a 0-dim tensor); got shape {list(got.shape)} "
                             f"for {case}")
    value = got.item()
    # a float32 sum of n squares is exact to n * FLOAT32_ROUNDOFF relatively (n <= 40 here), the square root
    # halves that
    if is_close(value, expected, 1e-5, 1e-12):
        return
    norms = [g.norm().item() for g in before if g is not None]
    if as_generator and value == 0:
        raise ExerciseFailed("parameters may be a generator (model.parameters()), which is empty after one pass: "
                             "turn it into a list first, params = [p for p in parameters if p.grad is not None]")
    if expected > max_norm and is_close(value, max_norm, 1e-3):
        raise ExerciseFailed(f"return the norm before clipping (it is what you log), not after: for {case} "
                             f"{expected_and_got(expected, value)}")
    if is_close(value, sum(norms), 1e-4):
        raise ExerciseFailed("the global norm is sqrt(sum of squared per-parameter norms), not the sum of the "
                             f"norms: for {case} {expected_and_got(expected, value)}")
    if is_close(value, expected ** 2, 1e-4):
        raise ExerciseFailed("you returned the sum of squares: take its square root")
    if any(is_close(value, n, 1e-4) for n in norms):
        raise ExerciseFailed("norm computed per parameter, not globally: the norm is over all gradients "
                             f"together, sqrt(sum over p of ||p.grad||^2); for {case} "
                             f"{expected_and_got(expected, value)}")
    raise ExerciseFailed(f"wrong norm for {case} (max_norm={max_norm}): {expected_and_got(expected, value)}")


def _judge_grads(grads, reference, before, max_norm, expected_norm, case, as_generator, scaled_below):
    for index, (mine, ref, old) in enumerate(zip(grads, reference, before)):
        if ref.grad is None:
            if mine is not None:
                raise ExerciseFailed(f"parameter {index} had no gradient and now has one: skip p.grad None")
            continue
        if mine is None or mine.shape != ref.grad.shape:
            raise ExerciseFailed(f"the gradient of parameter {index} was removed or reshaped for {case}")
        # float32 scaling: one rounding of the scale and one of the product, far below 1e-5 relatively
        if torch.allclose(mine, ref.grad, rtol=1e-5, atol=1e-12):
            continue
        if expected_norm <= max_norm:
            raise ExerciseFailed(f"clipping even though the norm ({expected_norm:.4g}) is below max_norm "
                                 f"({max_norm}): scale only when norm > max_norm, otherwise small gradients "
                                 f"get blown up")
        mine_norms = [g.norm().item() for g in grads if g is not None]
        if all(n <= max_norm * 1.001 for n in mine_norms) and any(is_close(n, max_norm, 1e-3) for n in mine_norms) \
                and not any(torch.allclose(g, r.grad, rtol=1e-4) for g, r in zip(grads, reference)
                            if g is not None and r.grad is not None and g.norm() > 1e-3 * max_norm):
            raise ExerciseFailed("norm computed per parameter, not globally: every gradient must be scaled by the "
                                 "same factor max_norm / global_norm, so the directions of the whole update stay")
        if torch.equal(mine, old):
            if as_generator:
                raise ExerciseFailed("the gradients were not clipped: parameters may be a generator "
                                     "(model.parameters()), empty after the first pass. Make a list first.")
            if scaled_below:
                raise ExerciseFailed(f"the condition is inverted: you left the gradients alone for {case} and "
                                     f"scaled them when the norm was below max_norm. Clip only when norm > max_norm")
            raise ExerciseFailed(f"the gradients were not changed for {case}: scale them in place, "
                                 f"p.grad.mul_(scale) (rebinding `grad = grad * scale` changes nothing)")
        without_eps = old * (max_norm / expected_norm)
        if torch.allclose(mine, without_eps, rtol=1e-5, atol=1e-12):
            raise ExerciseFailed(f"the scale is max_norm / (norm + 1e-6), with the 1e-6: for {case} the clipped "
                                 f"gradient of parameter {index} differs without it "
                                 f"({tensor_differences(ref.grad, mine)})")
        raise ExerciseFailed(f"wrong clipped gradient of parameter {index} for {case}: "
                             f"{tensor_differences(ref.grad, mine)}")


def check_clip_grad_norm(fn):
    """fn(parameters, max_norm) -> 0-dim Tensor: scales every .grad in place by max_norm / (norm + 1e-6) when the
    global L2 norm exceeds max_norm (skipping .grad None) and returns the norm before clipping."""
    __tracebackhide__ = True
    run_and_judge("check_clip_grad_norm", fn)


register("check_clip_grad_norm", _run_clip_grad_norm, _judge_clip_grad_norm)

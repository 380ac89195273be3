"""Exercise 3, gradient clipping as torch.nn.utils.clip_grad_norm_: fn(parameters, max_norm, norm_type=2.0,
error_if_nonfinite=False) -> the global norm before clipping, a 0-dim tensor, with the gradients clipped in
place. Norm types 1, 2, 3 and inf; a RuntimeError on a non-finite norm when error_if_nonfinite."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from exercises.checks.harness import (NONE_GRAD_HINT, ExerciseFailed, call_candidate, expected_and_got, is_close,
                                      register, require_callable, run_and_judge, tensor_differences, type_name)

_RAISES = "raises"  # what the reference does with error_if_nonfinite=True and a non-finite norm


def _cases():
    """(case, parameters or a module, max_norm, pass a generator, keyword arguments)."""
    g = torch.Generator().manual_seed(21)

    def params(scale, shapes=((4, 3), (7,), (2, 2, 2)), missing=True, bad=None):
        ps = [nn.Parameter(torch.randn(shape, generator=g)) for shape in shapes]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g) * scale
        if bad is not None:
            ps[-1].grad[0, 1, 0] = bad  # one overflowed element (an inf or nan from an fp16 backward)
        if missing:
            ps.insert(1, nn.Parameter(torch.randn(3, generator=g)))  # .grad stays None
        return ps

    with torch.random.fork_rng():  # nn.Linear draws its weights from the global generator: leave it as it was
        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 3
    frozen = params(0.05, missing=False) + [nn.Parameter(torch.randn(2, generator=g), requires_grad=False)]
    inf, nan = math.inf, math.nan
    return [
        ("gradients with a global norm above max_norm", params(5.0), 1.0, False, {}),
        ("gradients with a global norm below max_norm", params(0.05), 1.0, False, {}),
        ("max_norm=2.5 and gradients of very different sizes", params(1.0) + params(30.0, ((2,),), False), 2.5,
         False, {}),
        ("model.parameters() (a generator) with a norm above max_norm", model, 1.0, True, {}),
        ("a frozen parameter and a norm below max_norm", frozen, 0.5, False, {}),
        ("parameters none of which has a gradient", [nn.Parameter(torch.randn(3)), nn.Parameter(torch.ones(2))],
         1.0, False, {}),
        # here the 1e-6 in max_norm / (norm + 1e-6) changes the scale by 0.3%
        ("a global norm of 3e-4 above max_norm=1e-4", params(6e-5), 1e-4, False, {}),
        ("norm_type=1 and a norm above max_norm", params(1.0), 2.0, False, dict(norm_type=1.0)),
        ("norm_type=3 and a norm above max_norm", params(2.0), 1.0, False, dict(norm_type=3.0)),
        ("norm_type=inf and a norm above max_norm", params(2.0), 1.0, False, dict(norm_type=inf)),
        # its largest |element| (2.2) is below max_norm, its 2-norm (5.8) above
        ("norm_type=inf and a norm below max_norm", params(1.0), 3.0, False, dict(norm_type=inf)),
        ("error_if_nonfinite=True and a finite norm", params(5.0), 1.0, False, dict(error_if_nonfinite=True)),
        ("an inf gradient and error_if_nonfinite=True", params(1.0, bad=inf), 1.0, False,
         dict(error_if_nonfinite=True)),
        ("a nan gradient, norm_type=inf and error_if_nonfinite=True", params(1.0, bad=nan), 1.0, False,
         dict(norm_type=inf, error_if_nonfinite=True)),
        # clip_grad_norm_ returns the inf and multiplies by max_norm / (inf + 1e-6) = 0: 0 for the finite
        # elements, nan for the inf one
        ("an inf gradient and error_if_nonfinite=False", params(1.0, bad=inf), 1.0, False,
         dict(error_if_nonfinite=False)),
    ]


def _clone_params(params, dtype=None):
    clones = []
    for p in params:
        clone = nn.Parameter(p.detach().clone().to(dtype or p.dtype), requires_grad=p.requires_grad)
        clone.grad = None if p.grad is None else p.grad.clone().to(dtype or p.grad.dtype)
        clones.append(clone)
    return clones


def _case_params(source, as_generator):
    return list(source.parameters()) if as_generator else source


def _catching(fn):
    """fn, returning {"returned": value} or, for an exception it raises, {"raised": its type's name}: for the cases
    where raising is right. (The stub's NotImplementedError still reaches call_candidate.)"""
    def calling(*args, **kwargs):
        try:
            return {"returned": fn(*args, **kwargs)}
        except NotImplementedError:
            raise
        except Exception as error:
            return {"raised": type(error).__name__}
    return calling


def _expected(source, as_generator, max_norm, options):
    """clip_grad_norm_'s norm (a float, or _RAISES) and gradients, computed in float64 on copies."""
    reference = _clone_params(_case_params(source, as_generator), torch.float64)
    try:
        norm = torch.nn.utils.clip_grad_norm_(reference, max_norm, foreach=False, **options).item()
    except RuntimeError:
        return _RAISES, [None if p.grad is None else p.grad.clone() for p in _clone_params(
            _case_params(source, as_generator))]
    return norm, [p.grad for p in reference]


def _run_clip_grad_norm(fn, records, guard):
    require_callable(fn, "clip_grad_norm")
    for case, source, max_norm, as_generator, options in _cases():
        learner = _clone_params(_case_params(source, as_generator))
        argument = (p for p in learner) if as_generator else learner
        given = [p.grad for p in learner]
        inputs = {"case": case, "max_norm": max_norm, **options}
        if _expected(source, as_generator, max_norm, options)[0] == _RAISES:
            outcome = call_candidate("clip_grad_norm", inputs, _catching(fn), argument, max_norm, guard=guard,
                                     **options)
        else:
            outcome = {"returned": call_candidate("clip_grad_norm", inputs, fn, argument, max_norm, guard=guard,
                                                  hints=[_none_grad_hint(fn, source, as_generator, max_norm, guard),
                                                         *_raised_hints(options), *_no_gradient_hint(learner)],
                                                  **options)}
        # in place keeps each .grad the same tensor object: whatever holds it (an optimizer, a hook) sees the clip
        records.append({"got": outcome.get("returned"), "raised": outcome.get("raised"),
                        "grads": [p.grad for p in learner],
                        "replaced": [g is not None and p.grad is not g for p, g in zip(learner, given)]})


def _no_gradient_hint(params):
    if any(p.grad is not None for p in params):
        return []
    return [(lambda e: True, "with no gradients at all, return torch.tensor(0.0)")]


def _raised_hints(options):
    if "error_if_nonfinite" not in options:
        return []
    if options["error_if_nonfinite"]:
        return [(lambda e: True, "the norm is finite here: raise only when it is nan or inf")]
    return [(lambda e: True, "with error_if_nonfinite=False a non-finite norm is no error: return it, as "
                             "clip_grad_norm_ does (it scales the gradients by max_norm / (inf + 1e-6) = 0)")]


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
    for (case, source, max_norm, as_generator, options), record in zip(cases, got_all):
        if isinstance(record, ExerciseFailed):
            break
        params = _case_params(source, as_generator)
        changed.append(any(p.grad is not None and g is not None and not torch.equal(p.grad, g)
                           for p, g in zip(params, record["grads"])))
    for (case, source, max_norm, as_generator, options), record in zip(cases, got_all):
        if isinstance(record, ExerciseFailed):
            raise record
        params = _case_params(source, as_generator)
        before = [None if p.grad is None else p.grad.clone() for p in params]
        expected_norm, expected_grads = _expected(source, as_generator, max_norm, options)
        if expected_norm == _RAISES:
            _judge_error(record, before, case)
            continue
        norm_type = float(options.get("norm_type", 2.0))
        _judge_norm(record["got"], expected_norm, before, max_norm, norm_type, case, as_generator)
        _judge_grads(record["grads"], expected_grads, before, max_norm, expected_norm, case, as_generator,
                     _changed_below(cases, changed))
        if any(record["replaced"]):
            index = record["replaced"].index(True)
            raise ExerciseFailed(f"the values are right but parameter {index}'s .grad is a new tensor for {case}: "
                                 f"`p.grad = p.grad * scale` rebinds it. Clip in place, p.grad.mul_(scale), so that "
                                 f"the tensor the optimizer (or a hook) already holds is the one clipped")


def _judge_error(record, before, case):
    if record["raised"] is None:
        raise ExerciseFailed(f"with error_if_nonfinite=True and a norm that is not finite, raise a RuntimeError (as "
                             f"clip_grad_norm_ does) instead of returning; for {case} yours returned "
                             f"{type_name(record['got'])}")
    if record["raised"] != "RuntimeError":
        raise ExerciseFailed(f"raise a RuntimeError, as clip_grad_norm_ does, not a {record['raised']}, for {case}")
    if not all(_unchanged(old, new) for old, new in zip(before, record["grads"])):
        raise ExerciseFailed(f"raise before clipping: the gradients must stay as they were when the norm is not "
                             f"finite (yours changed them, then raised) for {case}")


def _unchanged(old, new):
    """Whether a gradient is as it was, nan for nan."""
    if old is None or new is None:
        return old is new
    return old.shape == new.shape and torch.allclose(old, new, rtol=0, atol=0, equal_nan=True)


def _changed_below(cases, changed):
    """Whether the learner scaled gradients in a case whose norm is below max_norm."""
    below = []
    for (case, source, max_norm, as_generator, options), was_changed in zip(cases, changed):
        norm = _expected(source, as_generator, max_norm, options)[0]
        if norm != _RAISES and 0 < norm < max_norm:
            below.append(was_changed)
    return any(below)


def _p_norm(values, p):
    """The p-norm of a float64 tensor (inf: the largest |value|)."""
    return values.abs().max().item() if p == math.inf else values.abs().pow(p).sum().pow(1 / p).item()


def _judge_norm(got, expected, before, max_norm, p, case, as_generator):
    if not torch.is_tensor(got):
        raise ExerciseFailed(f"return the norm as a 0-dim tensor (as torch.nn.utils.clip_grad_norm_ does), "
                             f"not {type_name(got)}, for {case}")
    if got.numel() != 1:
        raise ExerciseFailed(f"return one number, the global norm (a 0-dim tensor); got shape {list(got.shape)} "
                             f"for {case}")
    value = got.item()
    # a float32 sum of n powers |g|^p (n <= 40 here) is exact to n * FLOAT32_ROUNDOFF relatively, and the p-th
    # root divides that by p; the largest |g| (p = inf) is exact
    if is_close(value, expected, 1e-5, 1e-12):  # an inf for an inf too
        return
    grads = [g.double() for g in before if g is not None]
    flat = torch.cat([g.flatten() for g in grads])
    norms = [_p_norm(g, p) for g in grads]
    shown = f"for {case}: {expected_and_got(expected, value)}"
    if as_generator and value == 0:
        raise ExerciseFailed("parameters may be a generator (model.parameters()), which is empty after one pass: "
                             "turn it into a list first, params = [p for p in parameters if p.grad is not None]")
    if p != 2 and is_close(value, _p_norm(flat, 2.0), 1e-4):
        raise ExerciseFailed(f"norm_type={p:g}, but yours is the 2-norm: the p-norm is (sum |g|^p)^(1/p) over "
                             f"every element, and for norm_type=inf the largest |g|; {shown}")
    if p == math.inf:
        raise ExerciseFailed(f"norm_type=inf is the largest |g| (the limit of the p-norm as p grows): the power "
                             f"formula gives inf ** 0 or nan there, so treat it apart, g.abs().max(); {shown}")
    signed = flat.pow(p).sum().item()  # what the p-norm is without the absolute value
    if p % 2 == 1 and (math.isnan(value) or value < 0 or (signed > 0 and is_close(value, signed ** (1 / p), 1e-4))):
        raise ExerciseFailed(f"the p-norm sums |g|^p, with the absolute value: an odd power of a negative "
                             f"gradient is negative; {shown}")
    if expected > max_norm and is_close(value, max_norm, 1e-3):
        raise ExerciseFailed(f"return the norm before clipping (it is what you log), not after: {shown}")
    if is_close(value, sum(norms), 1e-4):
        raise ExerciseFailed(f"the global norm is the p-norm of the per-parameter norms, not their sum: {shown}")
    if p != 2 and is_close(value, math.sqrt(sum(n * n for n in norms)), 1e-4):
        raise ExerciseFailed(f"combine the per-parameter norms with the same norm_type ({p:g}): "
                             f"(sum of norm^p)^(1/p), for inf their max; yours combines them as a 2-norm; {shown}")
    if p != math.inf and is_close(value, expected ** p, 1e-4):
        raise ExerciseFailed(f"you returned the sum of |g|^p: take its p-th root (for p=2, the square root); "
                             f"{shown}")
    if any(is_close(value, n, 1e-4) for n in norms):
        raise ExerciseFailed(f"norm computed per parameter, not globally: the norm is over all gradients "
                             f"together; {shown}")
    raise ExerciseFailed(f"wrong norm (max_norm={max_norm}, norm_type={p:g}) {shown}")


def _judge_grads(grads, expected, before, max_norm, expected_norm, case, as_generator, scaled_below):
    for index, (mine, ref, old) in enumerate(zip(grads, expected, before)):
        if ref is None:
            if mine is not None:
                raise ExerciseFailed(f"parameter {index} had no gradient and now has one: skip p.grad None")
            continue
        if mine is None or mine.shape != ref.shape:
            raise ExerciseFailed(f"the gradient of parameter {index} was removed or reshaped for {case}")
        # float32 scaling: the scale carries the norm's relative error (far below 1e-5, see _judge_norm), and the
        # product one rounding more; nan where the reference has nan (an inf gradient times 0)
        if torch.allclose(mine.double(), ref, rtol=1e-5, atol=1e-12, equal_nan=True):
            continue
        if not math.isfinite(expected_norm):
            raise ExerciseFailed(f"with error_if_nonfinite=False clip_grad_norm_ scales even by a non-finite norm: "
                                 f"max_norm / (inf + 1e-6) = 0, so the finite gradients become 0; for {case} "
                                 f"parameter {index}: {tensor_differences(ref, mine)}")
        if expected_norm <= max_norm:
            raise ExerciseFailed(f"clipping even though the norm ({expected_norm:.4g}) is below max_norm "
                                 f"({max_norm}): scale only when norm > max_norm (the scale is clamped at 1), "
                                 f"otherwise small gradients get blown up")
        mine_norms = [g.norm().item() for g in grads if g is not None]
        if all(n <= max_norm * 1.001 for n in mine_norms) and any(is_close(n, max_norm, 1e-3) for n in mine_norms) \
                and not any(torch.allclose(g.double(), r, rtol=1e-4) for g, r in zip(grads, expected)
                            if g is not None and r is not None and g.norm() > 1e-3 * max_norm):
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
        without_eps = old.double() * (max_norm / expected_norm)
        if torch.allclose(mine.double(), without_eps, rtol=1e-5, atol=1e-12):
            raise ExerciseFailed(f"the scale is max_norm / (norm + 1e-6), with the 1e-6: for {case} the clipped "
                                 f"gradient of parameter {index} differs without it "
                                 f"({tensor_differences(ref, mine)})")
        raise ExerciseFailed(f"wrong clipped gradient of parameter {index} for {case}: "
                             f"{tensor_differences(ref, mine)}")


def check_clip_grad_norm(fn):
    """fn(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False) -> 0-dim Tensor, as
    torch.nn.utils.clip_grad_norm_: the p-norm of all the gradients together (norm_type inf: the largest |g|;
    .grad None skipped), a RuntimeError if it is not finite and error_if_nonfinite, else every .grad scaled in
    place by min(1, max_norm / (norm + 1e-6)); returns the norm before clipping."""
    __tracebackhide__ = True
    run_and_judge("check_clip_grad_norm", fn)


register("check_clip_grad_norm", _run_clip_grad_norm, _judge_clip_grad_norm)

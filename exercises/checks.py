"""Checks for the module 07 exercises: `check_<exercise>(candidate)`.

Each check calls the learner's candidate on randomized inputs and edge cases and compares
it with the reference (training.py, or exercises/_reference.py for the LR finder and early
stopping). It returns None when the candidate is right and raises ExerciseFailed otherwise,
with a message that names the mistake when it is a known one, or shows the input, the
expected and the received value. A candidate that raises, returns the wrong type or
shape, or runs longer than TIME_LIMIT_S seconds per call fails with a clear message; the
check itself never crashes on a bad candidate.

Candidates (the stubs in exercises/NN-*.ipynb have exactly these shapes):

    check_cross_entropy(fn)      fn(logits [N, V], targets [N]) -> 0-dim tensor, the mean loss
    check_adamw(cls)             cls(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
                                 a torch.optim.Optimizer whose step() the learner writes
    check_clip_grad_norm(fn)     fn(parameters, max_norm) -> 0-dim tensor, the global norm
                                 before clipping; gradients clipped in place
    check_cosine_schedule(fn)    fn(step, max_lr, min_lr, warmup_steps, total_steps) -> float
    check_linear_schedule(fn)    fn(step, max_lr, min_lr, warmup_steps, total_steps) -> float
    check_lr_finder(fn)          fn(train_step, *, start_lr, end_lr, num_steps, diverge_factor)
                                 -> (lrs, losses, suggested_lr); see its docstring
    check_early_stopping(fn)     fn(model, train_step, evaluate, *, max_steps, eval_every, patience)
                                 -> (best_step, best_val_loss, history); see its docstring

The time limit uses SIGALRM, so it applies when a check runs on the main thread of a
POSIX process (a Jupyter kernel, the grader, pytest). Elsewhere the candidate runs without
it, and the grader's per-cell time limit is the backstop.
"""
from __future__ import annotations

import contextlib
import copy
import math
import numbers
import os
import signal
import threading
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

import training
from exercises import _reference

__all__ = [
    "ExerciseFailed", "TIME_LIMIT_S", "check_cross_entropy", "check_adamw", "check_clip_grad_norm",
    "check_cosine_schedule", "check_linear_schedule", "check_lr_finder", "check_early_stopping",
]

TIME_LIMIT_S = 20.0  # per call of the candidate; every reference call takes milliseconds


class ExerciseFailed(AssertionError):
    """The candidate is wrong; the message says how."""


# ----------------------------------------------------------------------------------------
# Calling the candidate safely
# ----------------------------------------------------------------------------------------

class _OutOfTime(BaseException):
    """Raised by SIGALRM inside the candidate. A BaseException, so `except Exception` in the
    learner's code cannot swallow it."""


@contextlib.contextmanager
def _time_limit(seconds):
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise _OutOfTime

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_OUR_DIRS = (os.path.dirname(__file__), os.path.dirname(torch.__file__), os.path.dirname(contextlib.__file__))


def _where(error):
    """' (line N: `code`)' for the learner's line that raised, when we can tell."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if not frame.filename.startswith(_OUR_DIRS)]
    if not frames:
        return ""
    frame = frames[-1]
    return f" (at line {frame.lineno}: `{frame.line}`)" if frame.line else f" (at line {frame.lineno})"


def _show(value):
    if torch.is_tensor(value):
        if value.numel() <= 6:
            return f"tensor({[round(x, 6) for x in value.detach().double().flatten().tolist()]}, shape {list(value.shape)})"
        return f"tensor of shape {list(value.shape)}"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"{type(value).__name__} of {len(value)} items, starting {[_show(v) for v in value[:4]]}"
    return repr(value)


def _on(inputs):
    if not inputs:
        return ""
    return " on input " + ", ".join(f"{name}={_show(value)}" for name, value in inputs.items())


def _call(what, inputs, fn, *args, hints=(), **kwargs):
    """fn(*args, **kwargs) under the time limit; any failure becomes an ExerciseFailed."""
    __tracebackhide__ = True
    try:
        with _time_limit(TIME_LIMIT_S):
            return fn(*args, **kwargs)
    except ExerciseFailed:
        raise
    except NotImplementedError:
        raise ExerciseFailed(f"{what} is not implemented yet: replace `raise NotImplementedError` "
                             f"with your code, run that cell, then run the check again.") from None
    except _OutOfTime:
        raise ExerciseFailed(f"{what} did not finish within {TIME_LIMIT_S:g} s{_on(inputs)}: "
                             f"is there an infinite loop?") from None
    except Exception as error:
        hint = next((text for matches, text in hints if matches(error)), "")
        raise ExerciseFailed(f"{what} raised {type(error).__name__}: {error}{_where(error)}{_on(inputs)}."
                             + (f" Hint: {hint}" if hint else "")) from None


@contextlib.contextmanager
def _forbid(targets, reason):
    """Replace (owner, attribute) pairs with a function that fails the exercise while inside."""
    def forbidden(*args, **kwargs):
        raise ExerciseFailed(reason)

    saved = [(owner, name, getattr(owner, name)) for owner, name in targets if hasattr(owner, name)]
    for owner, name, _ in saved:
        setattr(owner, name, forbidden)
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def _require_callable(candidate, name):
    if not callable(candidate):
        raise ExerciseFailed(f"pass your function itself to the check, e.g. check(...)({name}) -> "
                             f"check({name}); got {type(candidate).__name__}")


def _close(got, expected, rel=1e-5, abs_=1e-6):
    return math.isclose(got, expected, rel_tol=rel, abs_tol=abs_)


# ----------------------------------------------------------------------------------------
# 1. Cross-entropy
# ----------------------------------------------------------------------------------------

_CE_FORBIDDEN = [(F, "cross_entropy"), (F, "nll_loss"), (F, "log_softmax"), (torch, "log_softmax"),
                 (torch, "logsumexp"), (torch.Tensor, "logsumexp"), (torch.Tensor, "log_softmax"),
                 (torch.special, "logsumexp"), (training, "cross_entropy")]
_CE_REASON = ("write the loss from exp/log/max yourself: F.cross_entropy, F.log_softmax, torch.logsumexp "
              "and training.cross_entropy are what this exercise builds, so they are off limits here")


def _ce_cases():
    g = torch.Generator().manual_seed(7)
    return [
        ("random logits", torch.randn(8, 10, generator=g) * 3, torch.randint(10, (8,), generator=g), None),
        ("a single row", torch.randn(1, 5, generator=g), torch.tensor([3]), None),
        ("a vocabulary of 1000", torch.randn(32, 1000, generator=g), torch.randint(1000, (32,), generator=g),
         None),
        ("logits of magnitude 1e4", torch.randn(6, 50, generator=g) * 1e4, torch.randint(50, (6,), generator=g),
         "softmax overflowed: exp(1e4) is inf in float32. Subtract each row's max logit before exp(): "
         "logsumexp(x) = m + log(sum(exp(x - m))) with m = max(x)"),
        ("logits all close to -1e4", torch.randn(4, 20, generator=g) - 1e4, torch.randint(20, (4,), generator=g),
         "exp() underflowed: every exp(-1e4) is 0 in float32, so log(sum) = log(0) = -inf. Subtract each "
         "row's max logit before exp(): logsumexp(x) = m + log(sum(exp(x - m)))"),
        ("a target with probability ~exp(-200)", torch.tensor([[0.0, -200.0, 5.0], [10.0, 0.0, -150.0]]),
         torch.tensor([1, 2]),
         "log(softmax) underflowed: the target's probability (about exp(-200)) rounds to 0 in float32 and "
         "log(0) = -inf. Work with log-probabilities directly: log p = x - logsumexp(x)"),
    ]


def check_cross_entropy(fn):
    """fn(logits: Tensor[N, V], targets: LongTensor[N]) -> 0-dim Tensor, the mean of -log softmax(logits)[target]."""
    __tracebackhide__ = True
    _require_callable(fn, "cross_entropy")
    for case, logits, targets, overflow_message in _ce_cases():
        inputs = {"logits": logits, "targets": targets, "case": case}
        expected = training.cross_entropy(logits, targets).item()
        given = logits.clone()
        with _forbid(_CE_FORBIDDEN, _CE_REASON):
            got = _call("cross_entropy", inputs, fn, given, targets.clone())
        _ce_check_type(got, len(targets), inputs)
        if not torch.equal(given, logits):
            raise ExerciseFailed(f"your function changed `logits` in place{_on(inputs)}: "
                                 f"compute `logits - m`, not `logits -= m`")
        value = got.item()
        if not math.isfinite(value):
            message = overflow_message or "the loss is not finite"
            raise ExerciseFailed(f"{message}. Got {value} for {case}, expected {expected:.6g}.")
        if _close(value, expected):
            continue
        per_row = torch.logsumexp(logits.double(), -1) - logits.double()[torch.arange(len(targets)), targets]
        if _close(value, per_row.sum().item(), 1e-4):
            raise ExerciseFailed(f"you summed the per-row losses: return their mean (got {value:.6g}, "
                                 f"expected {expected:.6g} for {case})")
        if _close(value, -expected, 1e-4):
            raise ExerciseFailed(f"the sign is flipped: the loss is -log p(target), a positive number "
                                 f"(got {value:.6g}, expected {expected:.6g} for {case})")
        if _close(value, expected / math.log(2), 1e-4):
            raise ExerciseFailed("you used log base 2: the loss is in nats, use the natural log (torch.log)")
        wrong_pick = torch.logsumexp(logits.double(), -1)[:, None] - logits.double()[:, targets]
        if len(targets) > 1 and _close(value, wrong_pick.mean().item(), 1e-4):
            raise ExerciseFailed("logits[:, targets] picks an N x N block, not one logit per row: "
                                 "use logits[torch.arange(N), targets] (or logits.gather)")
        raise ExerciseFailed(f"wrong loss for {case}: expected {expected:.6g}, got {value:.6g}{_on(inputs)}")
    _ce_check_gradient(fn)


def _ce_check_type(got, n, inputs):
    if not torch.is_tensor(got):
        raise ExerciseFailed(f"return a torch.Tensor (0-dim), not {type(got).__name__}: the loss must stay "
                             f"a tensor so that loss.backward() works{_on(inputs)}")
    if got.dim() == 1 and got.shape[0] == n and n > 1:
        raise ExerciseFailed(f"you returned one loss per row (shape {list(got.shape)}): return their mean, "
                             f"a 0-dim tensor{_on(inputs)}")
    if got.numel() != 1:
        raise ExerciseFailed(f"return a 0-dim tensor (the mean loss), got shape {list(got.shape)}{_on(inputs)}")
    if not got.is_floating_point():
        raise ExerciseFailed(f"the loss must be a floating-point tensor, got {got.dtype}{_on(inputs)}")


def _ce_check_gradient(fn):
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(5, 7, generator=g)
    targets = torch.randint(7, (5,), generator=g)
    reference_logits = logits.clone().requires_grad_()
    training.cross_entropy(reference_logits, targets).backward()
    learner_logits = logits.clone().requires_grad_()
    inputs = {"logits": logits, "targets": targets}
    in_place = (lambda e: "in-place" in str(e), "don't modify logits in place (`logits -= m`); write `logits - m`")
    with _forbid(_CE_FORBIDDEN, _CE_REASON):
        loss = _call("cross_entropy", inputs, fn, learner_logits, targets, hints=[in_place])
    _ce_check_type(loss, 5, inputs)
    if loss.grad_fn is None:
        raise ExerciseFailed("the loss is cut off from the autograd graph (.item(), .detach(), torch.tensor(...) "
                             "or numpy?): compute it from `logits` with torch operations only")
    _call("loss.backward()", inputs, loss.reshape(()).backward)
    if learner_logits.grad is None or not torch.allclose(learner_logits.grad, reference_logits.grad,
                                                         rtol=1e-4, atol=1e-6):
        raise ExerciseFailed("the loss has the right value but the wrong gradient: d loss / d logits should be "
                             "(softmax(logits) - one_hot(targets)) / N. Did you detach the max with a "
                             "non-differentiable operation or treat part of the loss as a constant?")


# ----------------------------------------------------------------------------------------
# 2. AdamW
# ----------------------------------------------------------------------------------------

_SHAPES = ((4, 3), (5,), (2, 2, 2))


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=g)) for shape in _SHAPES]


def _grads(seed, steps, scale=1.0):
    g = torch.Generator().manual_seed(seed + 1000)
    return [[torch.randn(shape, generator=g) * scale for shape in _SHAPES] for _ in range(steps)]


_NONE_GRAD_HINT = (lambda e: "NoneType" in str(e),
                   "skip parameters whose .grad is None (frozen or unused): `if p.grad is None: continue`")
_LEAF_HINT = (lambda e: "leaf Variable" in str(e) or "requires grad" in str(e),
              "update the parameters inside torch.no_grad() (keep the @torch.no_grad() decorator on step)")


def _trajectory(cls, what, params, grads, hyper, lr_per_step=None, groups=None):
    """Parameters after each of len(grads) steps of cls(params, **hyper); grads[t][i] for params[i]."""
    spec = groups(params) if groups else params
    optimizer = _call(what, hyper, cls, spec, **hyper, hints=[_NONE_GRAD_HINT])
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ExerciseFailed(f"{what} must build a torch.optim.Optimizer; got {type(optimizer).__name__}")
    history, base_lrs = [], [group["lr"] for group in optimizer.param_groups]
    for t, step_grads in enumerate(grads):
        if lr_per_step is not None:
            for group, base_lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base_lr * lr_per_step[t]
        for p, grad in zip(params, step_grads):
            p.grad = None if grad is None else grad.clone()
        _call(f"step() (step {t + 1})", hyper, optimizer.step, hints=[_NONE_GRAD_HINT, _LEAF_HINT])
        history.append([p.detach().clone() for p in params])
    return history, optimizer


def _first_mismatch(got, expected, rtol=1e-5, atol=1e-6):
    for t, (got_step, expected_step) in enumerate(zip(got, expected)):
        for i, (a, b) in enumerate(zip(got_step, expected_step)):
            if a.shape != b.shape or not torch.allclose(a, b, rtol=rtol, atol=atol):
                return t, i
    return None


def _matches(got, expected):
    return _first_mismatch(got, expected) is None


def check_adamw(cls):
    """cls(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01): an optimizer matching
    torch.optim.AdamW (decoupled weight decay, bias correction) step for step."""
    __tracebackhide__ = True
    if not isinstance(cls, type):
        raise ExerciseFailed(f"pass the class itself (AdamW), not {type(cls).__name__}")
    if not issubclass(cls, torch.optim.Optimizer):
        raise ExerciseFailed("AdamW must subclass torch.optim.Optimizer (keep `class AdamW(torch.optim.Optimizer)`)")
    if issubclass(cls, (torch.optim.Adam, torch.optim.AdamW, training.AdamW)):
        raise ExerciseFailed("write step() yourself rather than inheriting it from an existing Adam/AdamW")
    _adamw_first_step(cls)
    _adamw_tiny_gradients(cls)
    _adamw_decay_only(cls)
    _adamw_skips_none(cls)
    _adamw_many_steps(cls)
    _adamw_groups_and_schedule(cls)
    _adamw_state_dict(cls)


def _first_update(cls, hyper, grads, seed=1):
    """|update| / lr, per element, after one step from the parameters of `seed`."""
    params = _params(seed)
    before = [p.detach().clone() for p in params]
    (after,), _ = _trajectory(cls, "AdamW(params, ...)", params, [grads], hyper)
    return torch.cat([(a - b).flatten() for a, b in zip(after, before)]), before


def _adamw_first_step(cls):
    hyper = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    grads = _grads(1, 1)[0]
    got, _ = _first_update(cls, hyper, grads)
    expected, _ = _first_update(training.AdamW, hyper, grads)
    if torch.allclose(got, expected, rtol=1e-3, atol=1e-7):
        return
    ratio = (got.abs() / hyper["lr"]).median().item()
    g = torch.cat([x.flatten() for x in grads])
    if ratio < 1e-6:
        raise ExerciseFailed("step() did not change the parameters: update each p in place "
                             "(p.add_(...), p.addcdiv_(...)); rebinding a local name changes nothing")
    if torch.allclose(got, -expected, rtol=1e-3, atol=1e-7):
        raise ExerciseFailed("the update goes up the gradient: subtract it, p -= lr * m_hat / (sqrt(v_hat) + eps)")
    if torch.allclose(got, -hyper["lr"] * g, rtol=1e-3, atol=1e-7):
        raise ExerciseFailed("the first step is plain SGD (p -= lr * grad): AdamW divides the averaged "
                             "gradient m_hat by sqrt(v_hat) + eps")
    for value, message in ((0.1 / math.sqrt(0.001), "missing bias correction: divide m by (1 - beta1**t) and v by "
                                                     "(1 - beta2**t), t = 1 on the first step"),
                           (1 / math.sqrt(0.001), "v is not bias-corrected: divide v by (1 - beta2**t)"),
                           (0.1, "m is not bias-corrected: divide m by (1 - beta1**t)")):
        if abs(ratio / value - 1) < 0.05:
            raise ExerciseFailed(f"{message}. On step 1 every |update| should be about lr (m_hat / sqrt(v_hat) "
                                 f"= g / |g|), yours is {ratio:.3g} x lr")
    raise ExerciseFailed(f"wrong first step with lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0: "
                         f"expected update {_show(expected[:6])}, got {_show(got[:6])}")


def _adamw_tiny_gradients(cls):
    hyper = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    grads = _grads(2, 1, scale=1e-9)[0]
    got, _ = _first_update(cls, hyper, grads)
    expected, _ = _first_update(training.AdamW, hyper, grads)
    if torch.allclose(got, expected, rtol=1e-3, atol=1e-9):
        return
    ratio = (got.abs() / hyper["lr"]).median().item()
    if ratio < 1e-3:
        raise ExerciseFailed("eps belongs outside the square root: p -= lr * m_hat / (sqrt(v_hat) + eps). With "
                             "gradients of 1e-9, sqrt(v_hat + eps) is 1e-4 and the step all but vanishes")
    if abs(ratio - 1) < 0.05:
        raise ExerciseFailed("eps is missing from the denominator: p -= lr * m_hat / (sqrt(v_hat) + eps); it "
                             "keeps steps small when gradients are ~0 (use group['eps'])")
    raise ExerciseFailed(f"wrong step for gradients of size ~1e-9 (eps=1e-8 matters here): expected "
                         f"{_show(expected[:6])}, got {_show(got[:6])}")


def _adamw_decay_only(cls):
    lr, weight_decay = 1e-2, 0.1
    hyper = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    zeros = [torch.zeros(shape) for shape in _SHAPES]
    got, before = _first_update(cls, hyper, zeros)
    expected, _ = _first_update(training.AdamW, hyper, zeros)
    if torch.allclose(got, expected, rtol=1e-4, atol=1e-8):
        return
    p = torch.cat([b.flatten() for b in before])
    if got.abs().max() < 1e-12:
        raise ExerciseFailed("weight decay is missing: AdamW shrinks every weight, p -= lr * weight_decay * p, "
                             "even when its gradient is zero (use group['weight_decay'])")
    if torch.allclose(got, -weight_decay * p, rtol=1e-4, atol=1e-8):
        raise ExerciseFailed("weight decay is not scaled by the learning rate: p -= lr * weight_decay * p")
    if torch.allclose(got.abs(), torch.full_like(got, lr), rtol=1e-2):
        raise ExerciseFailed("weight decay is applied to the gradient, AdamW decouples it: adding "
                             "weight_decay * p to the gradient (L2, as in Adam) sends it through m and v. "
                             "Shrink the weight itself: p -= lr * weight_decay * p")
    raise ExerciseFailed(f"wrong weight decay: with a zero gradient, lr=0.01 and weight_decay=0.1 one step should "
                         f"give p * (1 - lr * weight_decay). Expected update {_show(expected[:6])}, "
                         f"got {_show(got[:6])}")


def _adamw_skips_none(cls):
    g = torch.Generator().manual_seed(3)
    trained = nn.Parameter(torch.randn(3, generator=g))
    frozen = nn.Parameter(torch.randn(4, generator=g), requires_grad=False)
    unused = nn.Parameter(torch.randn(2, generator=g))
    params = [trained, frozen, unused]
    before = [p.detach().clone() for p in params]
    grads = [[torch.randn(3, generator=g), None, None] for _ in range(2)]
    hyper = dict(lr=1e-2, weight_decay=0.1)
    history, _ = _trajectory(cls, "AdamW(params, ...)", params, grads, hyper)
    for name, index in (("a frozen parameter (requires_grad=False)", 1), ("a parameter with no gradient", 2)):
        if not torch.equal(history[-1][index], before[index]):
            raise ExerciseFailed(f"{name} changed: parameters whose .grad is None must be skipped entirely, "
                                 f"not even weight decay touches them (`if p.grad is None: continue`)")


def _adamw_compare(cls, hyper, steps, seed, what, lr_per_step=None, groups=None):
    grads = _grads(seed, steps)
    expected, _ = _trajectory(training.AdamW, "reference", _params(seed), grads, hyper, lr_per_step, groups)
    got, _ = _trajectory(cls, what, _params(seed), grads, hyper, lr_per_step, groups)
    return got, expected, grads


def _adamw_many_steps(cls):
    hyper = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    got, expected, grads = _adamw_compare(cls, hyper, 6, 4, "AdamW(params, lr=0.01, betas=(0.8, 0.99), "
                                                           "eps=1e-6, weight_decay=0.1)")
    mismatch = _first_mismatch(got, expected)
    if mismatch is None:
        return
    variants = [
        (dict(hyper, betas=(0.99, 0.8)), training.AdamW,
         "betas are swapped: beta1 (first of the pair) averages the gradient m, beta2 the squared gradient v"),
        (dict(lr=1e-2, weight_decay=0.1), training.AdamW,
         "use the hyperparameters of the param group (group['betas'], group['eps']), not fixed numbers"),
        (hyper, _coupled_adam,
         "weight decay is applied to the gradient, AdamW decouples it: shrink the weight, p -= lr * wd * p, "
         "and keep weight decay out of m and v"),
        (hyper, _decay_after_update,
         "apply weight decay before the Adam update, as torch.optim.AdamW: p *= 1 - lr * wd, then "
         "p -= lr * m_hat / (sqrt(v_hat) + eps)"),
    ]
    for variant_hyper, variant_cls, message in variants:
        variant, _ = _trajectory(variant_cls, "variant", _params(4), grads, variant_hyper)
        if _matches(got, variant):
            raise ExerciseFailed(message)
    t, i = mismatch
    hint = (" Step 1 is right, so check that m, v and the step count t persist between calls (in self.state[p]) "
            "and that t grows by one per step() for each parameter." if t > 0 else "")
    raise ExerciseFailed(f"after step {t + 1} of 6 (lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1), "
                         f"parameter {i} (shape {list(expected[t][i].shape)}) is wrong: expected "
                         f"{_show(expected[t][i].flatten()[:5])}, got {_show(got[t][i].flatten()[:5])}.{hint}")


def _coupled_adam(params, **hyper):
    return torch.optim.Adam(params, **hyper)


class _decay_after_update(torch.optim.Optimizer):
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


def _adamw_groups_and_schedule(cls):
    def groups(params):
        return [{"params": params[:2]}, {"params": params[2:], "lr": 3e-3, "weight_decay": 0.0}]
    hyper = dict(lr=1e-2, weight_decay=0.1)
    lr_per_step = [1.0, 1.0, 0.5, 0.25]
    got, expected, _ = _adamw_compare(cls, hyper, 4, 5, "AdamW(param_groups, lr=0.01, weight_decay=0.1)",
                                      lr_per_step, groups)
    mismatch = _first_mismatch(got, expected)
    if mismatch is None:
        return
    t, i = mismatch
    if t >= 2:
        raise ExerciseFailed("read the learning rate from group['lr'] at every step(): an LR schedule changes it "
                             "between steps (here it halves at step 3), and your update kept the old one")
    if i >= 2:
        raise ExerciseFailed("each param group has its own lr and weight_decay: loop over self.param_groups and "
                             "read group['lr'], group['weight_decay'] (here group 2 has lr=3e-3, no decay)")
    raise ExerciseFailed(f"wrong update with two param groups, at step {t + 1}, parameter {i}: expected "
                         f"{_show(expected[t][i].flatten()[:5])}, got {_show(got[t][i].flatten()[:5])}")


def _adamw_state_dict(cls):
    hyper = dict(lr=1e-2, weight_decay=0.1)
    grads = _grads(6, 4)
    params = _params(6)
    history, optimizer = _trajectory(cls, "AdamW(params, ...)", params, grads[:3], hyper)
    saved = copy.deepcopy(_call("state_dict()", {}, optimizer.state_dict))
    resumed_params = [nn.Parameter(p.detach().clone()) for p in params]
    resumed = _call("AdamW(params, ...)", hyper, cls, resumed_params, **hyper)
    _call("load_state_dict()", {}, resumed.load_state_dict, saved)
    for run_params, run in ((params, optimizer), (resumed_params, resumed)):
        for p, grad in zip(run_params, grads[3]):
            p.grad = grad.clone()
        _call("step() after load_state_dict()", {}, run.step)
    if not all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(params, resumed_params)):
        raise ExerciseFailed("an optimizer rebuilt from state_dict() takes a different step: keep m, v and the "
                             "step count in self.state[p] (torch saves and restores that dict), not in "
                             "attributes of your own")


# ----------------------------------------------------------------------------------------
# 3. Gradient clipping
# ----------------------------------------------------------------------------------------

_CLIP_FORBIDDEN = [(torch.nn.utils, "clip_grad_norm_"), (torch.nn.utils, "clip_grad_norm"),
                   (torch.nn.utils, "get_total_norm"), (torch.nn.utils.clip_grad, "clip_grad_norm_"),
                   (training, "clip_grad_norm")]
_CLIP_REASON = ("compute the norm and scale the gradients yourself: torch.nn.utils.clip_grad_norm_ and "
                "training.clip_grad_norm are what this exercise builds")


def _clip_cases():
    g = torch.Generator().manual_seed(21)

    def params(scale, shapes=((4, 3), (7,), (2, 2, 2)), missing=True):
        ps = [nn.Parameter(torch.randn(shape, generator=g)) for shape in shapes]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g) * scale
        if missing:
            ps.insert(1, nn.Parameter(torch.randn(3, generator=g)))  # .grad stays None
        return ps

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
    ]


def _clone_params(params):
    clones = []
    for p in params:
        clone = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        clone.grad = None if p.grad is None else p.grad.clone()
        clones.append(clone)
    return clones


def check_clip_grad_norm(fn):
    """fn(parameters, max_norm) -> 0-dim Tensor: scales every .grad in place by max_norm / (norm + 1e-6) when the
    global L2 norm exceeds max_norm (skipping .grad None) and returns the norm before clipping."""
    __tracebackhide__ = True
    _require_callable(fn, "clip_grad_norm")
    for case, source, max_norm, as_generator in _clip_cases():
        params = list(source.parameters()) if as_generator else source
        reference = _clone_params(params)
        expected_norm = training.clip_grad_norm(reference, max_norm).item()
        learner = _clone_params(params)
        before = [None if p.grad is None else p.grad.clone() for p in learner]
        argument = (p for p in learner) if as_generator else learner
        inputs = {"case": case, "max_norm": max_norm}
        with _forbid(_CLIP_FORBIDDEN, _CLIP_REASON):
            got = _call("clip_grad_norm", inputs, fn, argument, max_norm, hints=[_NONE_GRAD_HINT])
        _clip_check_norm(got, expected_norm, before, max_norm, case, as_generator)
        _clip_check_grads(learner, reference, before, max_norm, expected_norm, case, as_generator)


def _clip_check_norm(got, expected, before, max_norm, case, as_generator):
    if not torch.is_tensor(got):
        raise ExerciseFailed(f"return the norm as a 0-dim tensor (as torch.nn.utils.clip_grad_norm_ does), "
                             f"not {type(got).__name__}, for {case}")
    if got.numel() != 1:
        raise ExerciseFailed(f"return one number, the global norm (a 0-dim tensor); got shape {list(got.shape)} "
                             f"for {case}")
    value = got.item()
    if _close(value, expected, 1e-5, 1e-7):
        return
    norms = [g.norm().item() for g in before if g is not None]
    if as_generator and value == 0:
        raise ExerciseFailed("parameters may be a generator (model.parameters()), which is empty after one pass: "
                             "turn it into a list first, params = [p for p in parameters if p.grad is not None]")
    if expected > max_norm and _close(value, max_norm, 1e-3):
        raise ExerciseFailed(f"return the norm before clipping (it is what you log), not after: for {case} "
                             f"expected {expected:.6g}, got {value:.6g}")
    if _close(value, sum(norms), 1e-4):
        raise ExerciseFailed("the global norm is sqrt(sum of squared per-parameter norms), not the sum of the "
                             f"norms: for {case} expected {expected:.6g}, got {value:.6g}")
    if _close(value, expected ** 2, 1e-4):
        raise ExerciseFailed("you returned the sum of squares: take its square root")
    if any(_close(value, n, 1e-4) for n in norms):
        raise ExerciseFailed("norm computed per parameter, not globally: the norm is over all gradients "
                             f"together, sqrt(sum over p of ||p.grad||^2); for {case} expected {expected:.6g}, "
                             f"got {value:.6g}")
    raise ExerciseFailed(f"wrong norm for {case} (max_norm={max_norm}): expected {expected:.6g}, got {value:.6g}")


def _clip_check_grads(learner, reference, before, max_norm, expected_norm, case, as_generator):
    for index, (mine, ref, old) in enumerate(zip(learner, reference, before)):
        if ref.grad is None:
            if mine.grad is not None:
                raise ExerciseFailed(f"parameter {index} had no gradient and now has one: skip p.grad None")
            continue
        if mine.grad is None or mine.grad.shape != ref.grad.shape:
            raise ExerciseFailed(f"the gradient of parameter {index} was removed or reshaped for {case}")
        if torch.allclose(mine.grad, ref.grad, rtol=1e-5, atol=1e-8):
            continue
        if expected_norm <= max_norm:
            raise ExerciseFailed(f"clipping even though the norm ({expected_norm:.4g}) is below max_norm "
                                 f"({max_norm}): scale only when norm > max_norm, otherwise small gradients "
                                 f"get blown up")
        mine_norms = [p.grad.norm().item() for p in learner if p.grad is not None]
        if all(n <= max_norm * 1.001 for n in mine_norms) and any(_close(n, max_norm, 1e-3) for n in mine_norms) \
                and not any(torch.allclose(p.grad, r.grad, rtol=1e-4) for p, r in zip(learner, reference)
                            if p.grad is not None and r.grad is not None and p.grad.norm() > 1e-3):
            raise ExerciseFailed("norm computed per parameter, not globally: every gradient must be scaled by the "
                                 "same factor max_norm / global_norm, so the directions of the whole update stay")
        if torch.equal(mine.grad, old):
            if as_generator:
                raise ExerciseFailed("the gradients were not clipped: parameters may be a generator "
                                     "(model.parameters()), empty after the first pass. Make a list first.")
            raise ExerciseFailed(f"the gradients were not changed for {case}: scale them in place, "
                                 f"p.grad.mul_(scale) (rebinding `grad = grad * scale` changes nothing)")
        raise ExerciseFailed(f"wrong clipped gradient of parameter {index} for {case}: expected "
                             f"{_show(ref.grad.flatten()[:5])}, got {_show(mine.grad.flatten()[:5])}")


# ----------------------------------------------------------------------------------------
# 4-5. Learning-rate schedules
# ----------------------------------------------------------------------------------------

_SCHEDULE_CONFIGS = [
    dict(max_lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=100),
    dict(max_lr=6e-4, min_lr=0.0, warmup_steps=100, total_steps=1000),
    dict(max_lr=1.0, min_lr=0.1, warmup_steps=0, total_steps=50),
    dict(max_lr=3e-4, min_lr=3e-5, warmup_steps=1, total_steps=20),
    dict(max_lr=0.02, min_lr=0.005, warmup_steps=7, total_steps=33),
]


def _schedule_points(config):
    w, total = config["warmup_steps"], config["total_steps"]
    steps = [0, 1, w // 2, w - 1, w, w + 1, (w + total) // 3, (w + total) // 2, total - 1, total, total + 1,
             2 * total + 5]
    return sorted({s for s in steps if s >= 0})


def _region(step, w, total):
    if step < w:
        return "warmup"
    if step == w:
        return "peak"
    if step < total:
        return "decay"
    return "end" if step == total else "after"


def _check_schedule(fn, reference, name, decay_formula):
    __tracebackhide__ = True
    _require_callable(fn, name)
    zero_div = (lambda e: isinstance(e, ZeroDivisionError),
                "with warmup_steps=0 there is no warmup: don't divide by warmup_steps then")
    for config in _SCHEDULE_CONFIGS:
        w, total = config["warmup_steps"], config["total_steps"]
        args = (config["max_lr"], config["min_lr"], w, total)
        wrong = []
        for step in _schedule_points(config):
            inputs = dict(step=step, **config)
            got = _call(name, inputs, fn, step, *args, hints=[zero_div])
            if isinstance(got, bool) or not isinstance(got, numbers.Real):
                raise ExerciseFailed(f"return a plain float (use math.cos, not torch.cos), got "
                                     f"{type(got).__name__}{_on(inputs)}")
            expected = reference(step, **config)
            if not _close(float(got), expected, 1e-6, 1e-12):
                wrong.append((step, float(got), expected))
        if wrong:
            _diagnose_schedule(fn, reference, config, wrong, decay_formula)


def _diagnose_schedule(fn, reference, config, wrong, decay_formula):
    w, total, max_lr, min_lr = config["warmup_steps"], config["total_steps"], config["max_lr"], config["min_lr"]
    step, got, expected = wrong[0]
    setting = f"max_lr={max_lr}, min_lr={min_lr}, warmup_steps={w}, total_steps={total}"
    region = _region(step, w, total)
    shown = f"at step {step} ({setting}): expected {expected:.6g}, got {got:.6g}"
    if region in ("peak", "decay") and w > 0 and _close(got, reference(step, **dict(config, warmup_steps=0)),
                                                        1e-6, 1e-12):
        raise ExerciseFailed(f"the decay must start at warmup_steps: progress = (step - warmup_steps) / "
                             f"(total_steps - warmup_steps); {shown}")
    if region == "warmup" or (region == "peak" and w > 0):
        early = [(s, g) for s, g, _ in wrong if s <= w]
        if w > 0 and all(_close(g, reference(min(s + 1, w), **config), 1e-6, 1e-12) for s, g in early):
            raise ExerciseFailed(f"warmup is off by one: expected lr {expected:.6g} at step {step} (lr = max_lr * "
                                 f"step / warmup_steps: 0 at step 0, max_lr at step warmup_steps); {shown}")
        raise ExerciseFailed(f"during warmup the LR rises linearly, max_lr * step / warmup_steps, reaching max_lr "
                             f"at step warmup_steps; {shown}")
    if region == "peak":
        raise ExerciseFailed(f"at step warmup_steps the LR is max_lr (with warmup_steps=0 the decay starts at "
                             f"step 0); {shown}")
    decay_wrong = [(s, g) for s, g, _ in wrong if _region(s, w, total) in ("decay", "end")]
    if min_lr > 0 and decay_wrong and all(_close(g, reference(s, **dict(config, min_lr=0.0)), 1e-6, 1e-12)
                                          for s, g in decay_wrong):
        raise ExerciseFailed(f"the decay ends at 0 instead of min_lr: {decay_formula}; {shown}")
    if region == "decay":
        raise ExerciseFailed(f"wrong LR during the decay: {decay_formula}; {shown}")
    if region == "end":
        raise ExerciseFailed(f"at step total_steps the LR must have reached min_lr; {shown}")
    raise ExerciseFailed(f"past total_steps the LR stays at min_lr (don't let the formula run on); {shown}")


def check_cosine_schedule(fn):
    """fn(step, max_lr, min_lr, warmup_steps, total_steps) -> float, as training.cosine_lr: warmup
    max_lr * step / warmup_steps, then half a cosine from max_lr to min_lr, min_lr after total_steps."""
    __tracebackhide__ = True
    _check_schedule(fn, training.cosine_lr, "cosine_lr",
                    "lr = min_lr + (max_lr - min_lr) * (1 + cos(pi * progress)) / 2, "
                    "progress = (step - warmup_steps) / (total_steps - warmup_steps)")


def check_linear_schedule(fn):
    """fn(step, max_lr, min_lr, warmup_steps, total_steps) -> float, as training.linear_lr: warmup
    max_lr * step / warmup_steps, then a straight line from max_lr at warmup_steps to min_lr at total_steps."""
    __tracebackhide__ = True
    _check_schedule(fn, training.linear_lr, "linear_lr",
                    "lr = max_lr + (min_lr - max_lr) * progress, "
                    "progress = (step - warmup_steps) / (total_steps - warmup_steps)")


# ----------------------------------------------------------------------------------------
# 6. Learning-rate range finder
# ----------------------------------------------------------------------------------------

class _ScriptedTraining:
    """A fake train_step(lr) -> loss: a bowl in log10(lr), optionally blowing up past `explode_at`."""

    def __init__(self, best_lr, explode_at=None, blow_up=lambda loss: loss * 50, noise=0.0, seed=0):
        self.best_lr, self.explode_at, self.blow_up, self.noise = best_lr, explode_at, blow_up, noise
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = []

    def __call__(self, lr):
        self.calls.append(lr)
        loss = 2.0 + 0.25 * (math.log10(lr) - math.log10(self.best_lr)) ** 2
        loss *= 1 + self.noise * (2 * torch.rand((), generator=self.generator).item() - 1)
        if self.explode_at is not None and lr > self.explode_at:
            loss = self.blow_up(loss)
        return loss


_LR_FINDER_CASES = [
    ("a smooth curve that never diverges", dict(start_lr=1e-6, end_lr=1e-1, num_steps=30),
     dict(best_lr=1e-3)),
    ("a curve that blows up past lr=0.05", dict(start_lr=1e-5, end_lr=1.0, num_steps=40),
     dict(best_lr=3e-3, explode_at=0.05)),
    ("a loss that turns NaN past lr=0.01", dict(start_lr=1e-5, end_lr=1.0, num_steps=25),
     dict(best_lr=1e-3, explode_at=0.01, blow_up=lambda loss: math.nan)),
    ("a loss that turns inf past lr=0.2", dict(start_lr=1e-4, end_lr=10.0, num_steps=20),
     dict(best_lr=1e-2, explode_at=0.2, blow_up=lambda loss: math.inf)),
    ("a noisy curve (+-30%)", dict(start_lr=1e-6, end_lr=1.0, num_steps=50),
     dict(best_lr=1e-3, explode_at=0.3, noise=0.3, seed=3)),
    ("a loss that jumps 5x past lr=0.05 (above 4x the lowest loss, below 4x the first)",
     dict(start_lr=1e-5, end_lr=1.0, num_steps=40), dict(best_lr=3e-3, explode_at=0.05, blow_up=lambda loss: loss * 5)),
    ("two steps", dict(start_lr=1e-3, end_lr=1e-1, num_steps=2), dict(best_lr=1e-2)),
]


def _as_floats(values, what):
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise ExerciseFailed(f"{what} must be a list of numbers") from None


def check_lr_finder(fn):
    """fn(train_step, *, start_lr, end_lr, num_steps, diverge_factor) -> (lrs, losses, suggested_lr).

    train_step(lr) -> float trains one step at learning rate lr and returns its loss. For i = 0 ..
    num_steps - 1, call it with lr_i = start_lr * (end_lr / start_lr) ** (i / (num_steps - 1)), in
    order, and record lr_i and the loss. Stop right after recording a loss that is not finite or
    larger than diverge_factor times the lowest loss before it. lrs and losses are the lists of what
    was recorded; suggested_lr is one tenth of the LR with the lowest finite loss.
    """
    __tracebackhide__ = True
    _require_callable(fn, "lr_finder")
    for case, sweep, script in _LR_FINDER_CASES:
        settings = dict(sweep, diverge_factor=4.0)
        expected_lrs, expected_losses, expected_suggestion = _reference.lr_finder(
            _ScriptedTraining(**script), **settings)
        training_run = _ScriptedTraining(**script)
        inputs = dict(case=case, **settings)
        result = _call("lr_finder", inputs, fn, training_run, **settings)
        if not isinstance(result, (tuple, list)) or len(result) != 3:
            raise ExerciseFailed(f"return a tuple (lrs, losses, suggested_lr), got {_show(result)}{_on(inputs)}")
        lrs, losses = _as_floats(result[0], "lrs"), _as_floats(result[1], "losses")
        _lr_finder_sweep(training_run.calls, expected_lrs, sweep, settings, inputs)
        if lrs != training_run.calls:
            raise ExerciseFailed(f"lrs must list the learning rates you trained with, in order: train_step got "
                                 f"{_show(training_run.calls)}, you returned {_show(lrs)}{_on(inputs)}")
        if len(losses) != len(lrs) or not all(a == b or (math.isnan(a) and math.isnan(b))
                                              for a, b in zip(losses, expected_losses)):
            raise ExerciseFailed(f"losses must list what train_step returned, one per LR: expected "
                                 f"{_show(expected_losses)}, got {_show(losses)}{_on(inputs)}")
        if not isinstance(result[2], numbers.Real) or isinstance(result[2], bool):
            raise ExerciseFailed(f"suggested_lr must be a float, got {type(result[2]).__name__}{_on(inputs)}")
        suggestion = float(result[2])
        if not _close(suggestion, expected_suggestion, 1e-9, 0.0):
            best = expected_suggestion * 10
            if _close(suggestion, best, 1e-9, 0.0):
                raise ExerciseFailed(f"suggest one tenth of the LR at the lowest loss: at the minimum the LR is "
                                     f"already on the edge of too high (expected {expected_suggestion:.4g}, got "
                                     f"{suggestion:.4g}){_on(inputs)}")
            raise ExerciseFailed(f"suggested_lr should be lrs[index of the lowest finite loss] / 10 = "
                                 f"{expected_suggestion:.4g}, got {suggestion:.4g}{_on(inputs)}")


def _lr_finder_sweep(calls, expected, sweep, settings, inputs):
    n = min(len(calls), len(expected))
    start, end, steps = sweep["start_lr"], sweep["end_lr"], sweep["num_steps"]
    for i in range(n):
        if not _close(calls[i], expected[i], 1e-9, 0.0):
            linear = start + (end - start) * i / (steps - 1)
            short = start * (end / start) ** (i / steps)
            if _close(calls[i], linear, 1e-9, 0.0):
                message = ("the sweep must be exponential, not linear: lr_i = start_lr * (end_lr / start_lr) ** "
                           "(i / (num_steps - 1)), so every step multiplies the LR by the same factor")
            elif _close(calls[i], short, 1e-9, 0.0):
                message = ("the sweep is off by one: the last LR must be end_lr, so use i / (num_steps - 1), "
                           "not i / num_steps")
            else:
                message = ("lr_i = start_lr * (end_lr / start_lr) ** (i / (num_steps - 1)) for i = 0 .. "
                           "num_steps - 1")
            raise ExerciseFailed(f"{message}: call {i} of train_step used lr={calls[i]:.6g}, expected "
                                 f"{expected[i]:.6g}{_on(inputs)}")
    if len(calls) > len(expected):
        stop_loss = None
        if len(expected) < sweep["num_steps"]:
            stop_loss = "NaN" if "NaN" in inputs["case"] else "a diverged loss"
        if stop_loss == "NaN":
            raise ExerciseFailed("the loss became NaN and you kept going: NaN > x is always False, so test "
                                 "`not math.isfinite(loss)` as well" + _on(inputs))
        raise ExerciseFailed(f"you kept training after the loss diverged: stop right after a loss that is not "
                             f"finite or above diverge_factor x the best loss so far (expected "
                             f"{len(expected)} calls of train_step, got {len(calls)}){_on(inputs)}")
    if len(calls) < len(expected):
        if len(calls) == len(expected) - 1 and len(expected) < sweep["num_steps"]:
            raise ExerciseFailed(f"record the loss that shows divergence, then stop (expected {len(expected)} "
                                 f"calls of train_step, got {len(calls)}){_on(inputs)}")
        raise ExerciseFailed(f"you stopped too early, after {len(calls)} of the {len(expected)} expected steps: "
                             f"stop only when the loss is not finite or above diverge_factor "
                             f"({settings['diverge_factor']}) x the lowest loss so far{_on(inputs)}")


# ----------------------------------------------------------------------------------------
# 7. Early stopping
# ----------------------------------------------------------------------------------------

class _ScriptedRun:
    """A model whose weights count the training steps, a train_step and a scripted evaluate."""

    def __init__(self, val_losses, seed=0):
        g = torch.Generator().manual_seed(seed)
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
]


def check_early_stopping(fn):
    """fn(model, train_step, evaluate, *, max_steps, eval_every, patience) -> (best_step, best_val_loss, history).

    For step = 1 .. max_steps: call train_step(); when step % eval_every == 0 call evaluate() -> val
    loss and append (step, val_loss) to history. A val loss strictly below the best so far is an
    improvement: remember the step, the loss and a copy of the model's weights. Stop after `patience`
    evaluations in a row without improvement. Before returning, load the best weights into `model`.
    """
    __tracebackhide__ = True
    _require_callable(fn, "train_with_early_stopping")
    for case, settings, curve in _EARLY_STOPPING_CASES:
        reference_run = _ScriptedRun(curve)
        expected = _reference.train_with_early_stopping(reference_run.model, reference_run.train_step,
                                                        reference_run.evaluate, **settings)
        run = _ScriptedRun(curve)
        inputs = dict(case=case, **settings, val_losses=curve)
        result = _call("train_with_early_stopping", inputs, fn, run.model, run.train_step, run.evaluate,
                       **settings)
        if not isinstance(result, (tuple, list)) or len(result) != 3:
            raise ExerciseFailed(f"return a tuple (best_step, best_val_loss, history), got {_show(result)}"
                                 f"{_on(inputs)}")
        _early_stopping_schedule(run, reference_run, settings, curve, inputs)
        best_step, best_loss, history = result
        try:
            history = [(int(step), float(loss)) for step, loss in history]
        except (TypeError, ValueError):
            raise ExerciseFailed(f"history must be a list of (step, val_loss) pairs, got {_show(history)}") from None
        if history != expected[2]:
            raise ExerciseFailed(f"history should list (step, val_loss) for each evaluation: expected "
                                 f"{expected[2]}, got {history}{_on(inputs)}")
        if (best_step, best_loss) != expected[:2]:
            raise ExerciseFailed(f"best_step, best_val_loss should be {expected[:2]}, got {(best_step, best_loss)}"
                                 f"{_on(inputs)}")
        _early_stopping_weights(run, expected[0], inputs)


def _early_stopping_schedule(run, reference_run, settings, curve, inputs):
    expected_evals, got_evals = reference_run.evaluated_at, run.evaluated_at
    every = settings["eval_every"]
    if got_evals and got_evals[0] == 0:
        raise ExerciseFailed(f"you evaluated before training (at step 0): evaluate after every eval_every "
                             f"training steps, i.e. after steps {every}, {2 * every}, ...{_on(inputs)}")
    if got_evals[:len(expected_evals)] != expected_evals[:len(got_evals)]:
        raise ExerciseFailed(f"evaluate after every eval_every={every} training steps: expected evaluations "
                             f"after steps {expected_evals}, yours came after steps {got_evals}{_on(inputs)}")
    if len(got_evals) != len(expected_evals):
        n, patience, max_evals = len(got_evals), settings["patience"], settings["max_steps"] // every
        mistakes = [  # (evaluations such a loop runs on this curve, what is wrong), first match wins
            (_evaluations_until_stop(curve, patience, max_evals, strict=False),
             "an equal val loss is not an improvement: compare with `<`, not `<=`"),
            (max_evals, "training never stopped early: stop after `patience` evaluations in a row without "
                        "improvement"),
            (_evaluations_until_stop(curve, patience + 1, max_evals),
             "patience is off by one: you stopped one evaluation late"),
            (_evaluations_until_stop(curve, patience - 1, max_evals) if patience > 1 else None,
             "patience is off by one: you stopped one evaluation early"),
            (_evaluations_until_stop(curve, patience, max_evals, reset=False),
             "reset the count of evaluations without improvement when the val loss improves: patience counts "
             "evaluations *in a row*"),
        ]
        message = next((text for count, text in mistakes if count == n), "wrong stopping point")
        raise ExerciseFailed(f"{message}: expected the last evaluation after step {expected_evals[-1]}, yours "
                             f"after step {got_evals[-1] if got_evals else None} (val losses "
                             f"{[_val_loss(curve, k) for k in range(1, max(n, len(expected_evals)) + 1)]})"
                             f"{_on(inputs)}")
    if run.steps != reference_run.steps:
        raise ExerciseFailed(f"train_step should run {reference_run.steps} times (until the last evaluation), "
                             f"it ran {run.steps} times{_on(inputs)}")


def _val_loss(curve, k):
    """The val loss of the k-th evaluation (1-based) in a _ScriptedRun: the curve, then its last value."""
    return curve[min(k, len(curve)) - 1]


def _evaluations_until_stop(curve, patience, max_evals, reset=True, strict=True):
    """How many evaluations an early-stopping loop runs on `curve` (a mistake model when reset or strict is off)."""
    best, bad = math.inf, 0
    for k in range(1, max_evals + 1):
        loss = _val_loss(curve, k)
        if loss < best or (not strict and loss == best):
            best = loss
            bad = 0 if reset else bad
        else:
            bad += 1
            if bad == patience:
                return k
    return max_evals


def _early_stopping_weights(run, best_step, inputs):
    state = run.model.state_dict()
    expected = run.weights_after(best_step)
    if all(torch.allclose(state[name], expected[name]) for name in expected):
        return
    last = run.weights_after(run.steps)
    if all(torch.allclose(state[name], last[name]) for name in last):
        raise ExerciseFailed(
            f"the model ends with the weights of the last step ({run.steps}), not of the best one ({best_step}). "
            f"Keep a real copy of the best weights, copy.deepcopy(model.state_dict()) (state_dict() holds "
            f"references to the live tensors, which training keeps changing), and load_state_dict() it at the "
            f"end{_on(inputs)}")
    raise ExerciseFailed(f"the model should end with the weights it had after step {best_step}, the best "
                         f"evaluation{_on(inputs)}")

"""Checks for the module 07 exercises: `check_<exercise>(candidate)`.

Each check is two halves that never share a process when a notebook is graded:

* the *run* calls the learner's candidate on the check's inputs (randomized cases and edge
  cases, the same every time) and keeps only plain data: the values it returned, the tensors
  it changed, the calls it made to the callbacks it was given, or the message of the error it
  raised. It compares nothing. It runs in the learner's kernel, under a time limit and a guard
  that refuses the functions the exercise rebuilds (exercises/integrity.py).
* the *judge* rebuilds the same inputs, computes the expected values from the references
  (training.py; for the LR finder and early stopping, the rule in the docstring applied to the
  scripted curves) and compares, with tolerances argued next to each comparison. It returns
  None when the candidate is right and raises ExerciseFailed otherwise, with a message that
  names the mistake when it is a known one, or shows the input, the expected and the received
  value with enough digits to see the difference.

`check_x(candidate)` runs both in the calling process: the instant feedback of a notebook's check
cell. The grader (exercises/grade.py) calls `run_to_file` in the learner's kernel and `judge` in
its own process, so patching this module, training or json inside the kernel changes nothing.

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

The time limit uses SIGALRM, re-armed every 0.25 s so that an answer that swallows it (a bare
`except:` in a loop) is interrupted again; it applies on the main thread of a POSIX process (a
Jupyter kernel, the grader, pytest). When grading, a watchdog thread also ends the kernel if a
call outlives the limit by GRACE_S, writing why to WATCHDOG_NOTE for the grader to report.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math
import numbers
import os
import re
import signal
import threading
import traceback
from json import dumps as _json_dumps  # bound at import: a later patch of json.dumps changes nothing here

import torch
import torch.nn as nn

import training
from exercises.catalog import BY_CHECK
from exercises.integrity import CallGuard, Refused

__all__ = [
    "ExerciseFailed", "TIME_LIMIT_S", "check_cross_entropy", "check_adamw", "check_clip_grad_norm",
    "check_cosine_schedule", "check_linear_schedule", "check_lr_finder", "check_early_stopping",
    "run", "run_to_file", "judge",
]

TIME_LIMIT_S = 20.0  # per call of the candidate; every reference call takes milliseconds
GRACE_S = 2.0        # how long past the limit a call may ignore the interruption before the watchdog acts
WATCHDOG_NOTE = None  # set by the grader in its kernel: the file the watchdog writes before ending the kernel
U32 = 2.0 ** -24     # float32 unit roundoff: one float32 operation is exact to within this relative error


class ExerciseFailed(AssertionError):
    """The candidate is wrong; the message says how."""


# ----------------------------------------------------------------------------------------
# Calling the candidate safely (the run's side)
# ----------------------------------------------------------------------------------------

class _OutOfTime(BaseException):
    """Raised by SIGALRM inside the candidate. A BaseException, so `except Exception` in the
    learner's code cannot swallow it."""


class _Timer:
    fired = False


@contextlib.contextmanager
def _time_limit(seconds, what):
    timer, watchdog = _Timer(), None
    if WATCHDOG_NOTE:
        def end_the_kernel():
            with open(WATCHDOG_NOTE, "w", encoding="utf-8") as note:
                note.write(f"{what} did not finish within {seconds:g} s and kept running after it was interrupted "
                           f"(does it catch every exception, e.g. a bare `except:` inside a loop?)")
            os._exit(70)
        watchdog = threading.Timer(seconds + GRACE_S, end_the_kernel)
        watchdog.daemon = True
        watchdog.start()
    alarm = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if alarm:
        def on_alarm(signum, frame):
            timer.fired = True
            raise _OutOfTime

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds, 0.25)  # then every 0.25 s until cancelled
    try:
        yield timer
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        if watchdog:
            watchdog.cancel()


_OUR_DIRS = (os.path.dirname(__file__), os.path.dirname(torch.__file__), os.path.dirname(contextlib.__file__))


def _where(error):
    """' (line N: `code`)' for the learner's line that raised, when we can tell."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if not frame.filename.startswith(_OUR_DIRS)]
    if not frames:
        return ""
    frame = frames[-1]
    return f" (at line {frame.lineno}: `{frame.line}`)" if frame.line else f" (at line {frame.lineno})"


def _call(what, inputs, fn, *args, hints=(), guard=None, **kwargs):
    """fn(*args, **kwargs) under the time limit and the guard; any failure becomes an ExerciseFailed."""
    __tracebackhide__ = True
    try:
        with _time_limit(TIME_LIMIT_S, what) as timer, (guard or contextlib.nullcontext()):
            result = fn(*args, **kwargs)
    except ExerciseFailed:
        raise
    except Refused:
        raise ExerciseFailed(guard.refused) from None
    except NotImplementedError:
        raise ExerciseFailed(f"{what} is not implemented yet: replace `raise NotImplementedError` "
                             f"with your code, run that cell, then run the check again.") from None
    except _OutOfTime:
        timer.fired = True
        result = None
    except Exception as error:
        if guard is not None and guard.refused:
            raise ExerciseFailed(guard.refused) from None
        hint = next((text for matches, text in hints if matches(error)), "")
        raise ExerciseFailed(f"{what} raised {type(error).__name__}: {error}{_where(error)}{_on(inputs)}."
                             + (f" Hint: {hint}" if hint else "")) from None
    if guard is not None and guard.refused:
        raise ExerciseFailed(guard.refused)
    if timer.fired:
        raise ExerciseFailed(f"{what} did not finish within {TIME_LIMIT_S:g} s{_on(inputs)}: "
                             f"is there an infinite loop?")
    return result


def _require_callable(candidate, name):
    if not callable(candidate):
        raise ExerciseFailed(f"pass your function itself to the check, e.g. check(...)({name}) -> "
                             f"check({name}); got {_kind(candidate)}")


# ----------------------------------------------------------------------------------------
# Plain data: what crosses from the learner's kernel to the judge
# ----------------------------------------------------------------------------------------

class Foreign:
    """A returned value of a type that does not cross from the kernel: only its type's name does."""

    def __init__(self, type_name):
        self.type_name = type_name

    def __repr__(self):
        return f"<a {self.type_name}>"


def _kind(value):
    return value.type_name if isinstance(value, Foreign) else type(value).__name__


def _plain(value, depth=0):
    """value as JSON-able data: tensors, numbers, strings, None, lists, tuples, dicts; anything else by type name."""
    if depth > 8:
        return {"__object__": type(value).__name__}
    if torch.is_tensor(value):
        value = value.detach().cpu()
        if value.is_complex():
            return {"__object__": "complex tensor"}
        return {"__tensor__": [str(value.dtype).removeprefix("torch."), list(value.shape),
                               value.flatten().tolist()]}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, list):
        return [_plain(item, depth + 1) for item in value]
    if isinstance(value, tuple):
        return {"__tuple__": [_plain(item, depth + 1) for item in value]}
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {"__dict__": {key: _plain(item, depth + 1) for key, item in value.items()}}
    return {"__object__": type(value).__name__}


def _unplain(data):
    if isinstance(data, list):
        return [_unplain(item) for item in data]
    if not isinstance(data, dict):
        return data
    (tag, content), = data.items()
    if tag == "__tensor__":
        dtype, shape, values = content
        return torch.tensor(values, dtype=getattr(torch, dtype)).reshape(shape)
    if tag == "__tuple__":
        return tuple(_unplain(item) for item in content)
    if tag == "__dict__":
        return {key: _unplain(item) for key, item in content.items()}
    return Foreign(content)


class _Records:
    """The run's records, read in order by the judge; a failure record ends the check with its message."""

    def __init__(self, records):
        self.records, self.position = records, 0

    def next(self):
        if self.position == len(self.records):
            raise ExerciseFailed("the run of your answer ended before every case was tried (the kernel stopped "
                                 "early?)")
        record = self.records[self.position]
        self.position += 1
        if "failed" in record:
            raise ExerciseFailed(record["failed"])
        return record


def _origin(candidate):
    """The files the candidate's code comes from (a class: the functions it defines)."""
    functions = [candidate]
    if isinstance(candidate, type):  # torch.optim.Optimizer wraps step() in a hook of its own: unwrap it
        functions = [inspect.unwrap(getattr(attribute, "__func__", attribute)) for attribute in vars(candidate).values()
                     if callable(getattr(attribute, "__func__", attribute))]
    return sorted({function.__code__.co_filename for function in functions if hasattr(function, "__code__")})


_NOTEBOOK_CELL = re.compile(r"ipykernel_\d+[/\\]\d+\.py$|^<ipython-input-")


def run(check, candidate):
    """The run half of check `check` (e.g. "check_adamw") on `candidate`: a JSON-able dict."""
    records, origin = [], _origin(candidate)
    try:
        _RUNS[check](candidate, records, CallGuard(BY_CHECK[check].slug))
    except ExerciseFailed as error:
        records.append({"failed": str(error)})
    return {"records": [_plain(record) for record in records], "origin": origin}


def run_to_file(check, candidate, path):
    """run() written to `path` as JSON: what the grader's kernel sends back."""
    text = _json_dumps(run(check, candidate))
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)


def judge(check, data, *, notebook=False):
    """The judge half: raises ExerciseFailed unless the run's `data` shows a right candidate. With
    `notebook`, the candidate must also have been defined in a notebook cell (not imported)."""
    __tracebackhide__ = True
    name = BY_CHECK[check].candidate
    if notebook:
        foreign = [path for path in data["origin"] if not _NOTEBOOK_CELL.search(path)]
        if foreign or not data["origin"]:
            where = ", ".join(os.path.relpath(path) if os.path.isabs(path) else path for path in foreign)
            raise ExerciseFailed(f"refused: `{name}` is not defined in your notebook"
                                 + (f": its code comes from {where}" if where else "")
                                 + ". Write it in the answer cell")
    records = _Records([_unplain(record) for record in data["records"]])
    _JUDGES[check](records)


def _check(check, candidate):
    __tracebackhide__ = True
    judge(check, run(check, candidate))


# ----------------------------------------------------------------------------------------
# Messages
# ----------------------------------------------------------------------------------------

def _digits(*values):
    """The fewest significant digits (6 to 17) at which the floats `values` print differently."""
    for digits in range(6, 18):
        if len({f"{value:.{digits}g}" for value in values}) == len(set(values)):
            return digits
    return 17


def _pair(expected, got):
    """'expected X, got Y' with enough digits that X and Y differ on the page."""
    if isinstance(expected, float) and isinstance(got, float) and math.isfinite(expected) and math.isfinite(got):
        digits = _digits(expected, got)
        return f"expected {expected:.{digits}g}, got {got:.{digits}g}"
    return f"expected {_show(expected)}, got {_show(got)}"


def _show(value, digits=6):
    if torch.is_tensor(value):
        if value.numel() <= 6:
            return f"tensor({[float(f'{x:.{digits}g}') for x in value.detach().double().flatten().tolist()]}, " \
                   f"shape {list(value.shape)})"
        return f"tensor of shape {list(value.shape)}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"{type(value).__name__} of {len(value)} items, starting {[_show(v) for v in value[:4]]}"
    return repr(value)


def _show_tensors(expected, got):
    """The first elements where two tensors differ, with enough digits to see it."""
    expected, got = expected.detach().double().flatten(), got.detach().double().flatten()
    if expected.shape != got.shape:
        return f"expected shape {list(expected.shape)}, got {list(got.shape)}"
    differ = (~torch.isclose(expected, got, rtol=1e-6, atol=0)).nonzero().flatten()[:3].tolist() or [0]
    digits = max(_digits(expected[i].item(), got[i].item()) for i in differ)
    return "; ".join(f"element {i}: expected {expected[i].item():.{digits}g}, got {got[i].item():.{digits}g}"
                     for i in differ)


def _on(inputs):
    if not inputs:
        return ""
    return " on input " + ", ".join(f"{name}={_show(value)}" for name, value in inputs.items())


def _close(got, expected, rel, abs_=0.0):
    return math.isclose(got, expected, rel_tol=rel, abs_tol=abs_)


# ----------------------------------------------------------------------------------------
# 1. Cross-entropy
# ----------------------------------------------------------------------------------------

_SHIFT_UNDERFLOW = ("exp() underflowed: every exp(x - m) of a row rounded to 0, so log(sum) = log(0) = -inf. "
                    "m must be each row's own max logit (not max |x|, not the max of the whole batch): then the "
                    "largest term is exp(0) = 1")


def _ce_cases():
    """(case, logits, targets, message when the loss is +inf or nan, message when it is -inf)."""
    g = torch.Generator().manual_seed(7)
    return [
        ("random logits", torch.randn(8, 10, generator=g) * 3, torch.randint(10, (8,), generator=g), None, None),
        ("a single row", torch.randn(1, 5, generator=g), torch.tensor([3]), None, None),
        ("a vocabulary of 1000", torch.randn(32, 1000, generator=g), torch.randint(1000, (32,), generator=g),
         None, None),
        ("logits of magnitude 1e4", torch.randn(6, 50, generator=g) * 1e4, torch.randint(50, (6,), generator=g),
         "softmax overflowed: exp(1e4) is inf in float32. Subtract each row's max logit before exp(): "
         "logsumexp(x) = m + log(sum(exp(x - m))) with m = max(x)", _SHIFT_UNDERFLOW),
        ("logits all close to -1e4", torch.randn(4, 20, generator=g) - 1e4, torch.randint(20, (4,), generator=g),
         None, "exp() underflowed: every exp(-1e4) is 0 in float32, so log(sum) = log(0) = -inf. Subtract each "
               "row's max logit before exp(): logsumexp(x) = m + log(sum(exp(x - m)))"),
        ("a target with probability ~exp(-200)", torch.tensor([[0.0, -200.0, 5.0], [10.0, 0.0, -150.0]]),
         torch.tensor([1, 2]),
         "log(softmax) underflowed: the target's probability (about exp(-200)) rounds to 0 in float32 and "
         "log(0) = -inf. Work with log-probabilities directly: log p = x - logsumexp(x)", None),
    ]


def _ce_gradient_case():
    g = torch.Generator().manual_seed(11)
    return torch.randn(5, 7, generator=g), torch.randint(7, (5,), generator=g)


_IN_PLACE_HINT = (lambda e: "in-place" in str(e), "don't modify logits in place (`logits -= m`); write `logits - m`")


def _run_cross_entropy(fn, records, guard):
    _require_callable(fn, "cross_entropy")
    for case, logits, targets, _, _ in _ce_cases():
        given = logits.clone()
        got = _call("cross_entropy", {"logits": logits, "targets": targets, "case": case}, fn, given,
                    targets.clone(), guard=guard)
        records.append({"got": got, "changed": not torch.equal(given, logits)})
    logits, targets = _ce_gradient_case()
    learner_logits = logits.clone().requires_grad_()
    inputs = {"logits": logits, "targets": targets}
    loss = _call("cross_entropy", inputs, fn, learner_logits, targets, hints=[_IN_PLACE_HINT], guard=guard)
    record = {"got": loss, "graph": torch.is_tensor(loss) and loss.grad_fn is not None, "grad": None}
    if record["graph"] and loss.numel() == 1:
        _call("loss.backward()", inputs, loss.reshape(()).backward, guard=guard)
        record["grad"] = learner_logits.grad
    records.append(record)


def _judge_cross_entropy(records):
    for case, logits, targets, too_big, too_small in _ce_cases():
        record = records.next()
        inputs = {"logits": logits, "targets": targets, "case": case}
        got = record["got"]
        _ce_check_type(got, len(targets), inputs)
        if record["changed"]:
            raise ExerciseFailed(f"your function changed `logits` in place{_on(inputs)}: "
                                 f"compute `logits - m`, not `logits -= m`")
        value = got.item()
        expected = training.cross_entropy(logits.double(), targets).item()  # float64: exact to ~1e-15
        if not math.isfinite(value):
            message = (too_small if value == -math.inf else too_big) or "the loss is not finite"
            raise ExerciseFailed(f"{message}. Got {value} for {case}, expected {expected:.6g}.")
        # A float32 answer: the sum of V exponentials is exact to V*U32 relatively, which log() turns into an
        # absolute error; m + log(sum) rounds to U32*|m| (logits of -1e4: 6e-4); the mean over N rows adds N*U32.
        n, v = logits.shape
        if _close(value, expected, (n + 8) * U32, 4 * (v + logits.abs().max().item()) * U32):
            continue
        shown = f"{_pair(expected, value)} for {case}"
        per_row = torch.logsumexp(logits.double(), -1) - logits.double()[torch.arange(len(targets)), targets]
        if _close(value, per_row.sum().item(), 1e-4):
            raise ExerciseFailed(f"you summed the per-row losses: return their mean ({shown})")
        if _close(value, -expected, 1e-4):
            raise ExerciseFailed(f"the sign is flipped: the loss is -log p(target), a positive number ({shown})")
        if _close(value, expected / math.log(2), 1e-4):
            raise ExerciseFailed(f"you used log base 2: the loss is in nats, use the natural log, torch.log "
                                 f"({shown})")
        wrong_pick = torch.logsumexp(logits.double(), -1)[:, None] - logits.double()[:, targets]
        if len(targets) > 1 and _close(value, wrong_pick.mean().item(), 1e-4):
            raise ExerciseFailed("logits[:, targets] picks an N x N block, not one logit per row: "
                                 "use logits[torch.arange(N), targets] (or logits.gather)")
        raise ExerciseFailed(f"wrong loss: {shown}{_on(inputs)}")
    _ce_judge_gradient(records.next())


def _ce_check_type(got, n, inputs):
    if not torch.is_tensor(got):
        raise ExerciseFailed(f"return a torch.Tensor (0-dim), not {_kind(got)}: the loss must stay "
                             f"a tensor so that loss.backward() works{_on(inputs)}")
    if got.dim() == 1 and got.shape[0] == n and n > 1:
        raise ExerciseFailed(f"you returned one loss per row (shape {list(got.shape)}): return their mean, "
                             f"a 0-dim tensor{_on(inputs)}")
    if got.numel() != 1:
        raise ExerciseFailed(f"return a 0-dim tensor (the mean loss), got shape {list(got.shape)}{_on(inputs)}")
    if got.dim() != 0:
        raise ExerciseFailed(f"return a 0-dim tensor (shape []), got shape {list(got.shape)}: a mean over one "
                             f"dimension (e.g. .mean(dim=0) of an [N, 1] tensor) keeps the others; take .mean() "
                             f"over all elements{_on(inputs)}")
    if not got.is_floating_point():
        raise ExerciseFailed(f"the loss must be a floating-point tensor, got {got.dtype}{_on(inputs)}")


def _ce_judge_gradient(record):
    logits, targets = _ce_gradient_case()
    inputs = {"logits": logits, "targets": targets}
    _ce_check_type(record["got"], len(targets), inputs)
    if not record["graph"]:
        raise ExerciseFailed("the loss is cut off from the autograd graph (.item(), .detach(), torch.tensor(...) "
                             "or numpy?): compute it from `logits` with torch operations only")
    reference_logits = logits.clone().requires_grad_()
    training.cross_entropy(reference_logits, targets).backward()
    # each entry is (softmax - one_hot) / N in float32, exact to a few U32 relatively: 1e-4 leaves a wide margin
    grad = record["grad"]
    if grad is None or grad.shape != logits.shape or not torch.allclose(grad, reference_logits.grad,
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
_FIRST = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
_MANY = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
_MANY_TEXT = "lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1"


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
        "first step": lambda: (_params(1), [_grads(1, 1)[0]], _FIRST, None, None),
        "tiny gradients": lambda: (_params(1), [_grads(2, 1, scale=1e-9)[0]], _FIRST, None, None),
        "decay only": lambda: (_params(1), [[torch.zeros(shape) for shape in _SHAPES]],
                               dict(_FIRST, weight_decay=0.1), None, None),
        "many steps": lambda: (_params(4), _grads(4, 6), _MANY, None, None),
        "groups": lambda: (_params(5), _grads(5, 4), dict(lr=1e-2, weight_decay=0.1), [1.0, 1.0, 0.5, 0.25],
                           _two_groups),
    }[name]()


_ADAMW_SCENARIOS = ("first step", "tiny gradients", "decay only", "skips None", "many steps", "groups",
                    "late gradient")


def _trajectory(cls, params, grads, hyper, lr_per_step=None, groups=None, guard=None):
    """(parameters after each step, the optimizer, whether step() changed a .grad) of cls(params, **hyper)."""
    spec = groups(params) if groups else params
    what = f"AdamW({'param_groups' if groups else 'params'}, {', '.join(f'{k}={v}' for k, v in hyper.items())})"
    optimizer = _call(what, hyper, cls, spec, **hyper, hints=[_NONE_GRAD_HINT], guard=guard)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ExerciseFailed(f"{what} must build a torch.optim.Optimizer; got {_kind(optimizer)}")
    history, base_lrs, grad_changed = [], [group["lr"] for group in optimizer.param_groups], False
    for t, step_grads in enumerate(grads):
        if lr_per_step is not None:
            for group, base_lr in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base_lr * lr_per_step[t]
        for p, grad in zip(params, step_grads):
            p.grad = None if grad is None else grad.clone()
        _call(f"step() (step {t + 1})", hyper, optimizer.step, hints=[_NONE_GRAD_HINT, _LEAF_HINT], guard=guard)
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
    records.append({"kind": _kind(cls), "is_class": isinstance(cls, type), "optimizer": is_optimizer,
                    "inherits": inherits})
    if not is_optimizer or inherits:
        return
    for name in _ADAMW_SCENARIOS:
        params, grads, hyper, lr_per_step, groups = _adamw_scenario(name)
        history, _, grad_changed = _trajectory(cls, params, grads, hyper, lr_per_step, groups, guard)
        records.append({"history": history, "grad_changed": grad_changed})
    hyper, grads, params = dict(lr=1e-2, weight_decay=0.1), _grads(6, 4), _params(6)
    _, optimizer, _ = _trajectory(cls, params, grads[:3], hyper, guard=guard)
    saved = copy.deepcopy(_call("state_dict()", {}, optimizer.state_dict, guard=guard))
    resumed_params = [nn.Parameter(p.detach().clone()) for p in params]
    resumed = _call("AdamW(params, ...)", hyper, cls, resumed_params, **hyper, guard=guard)
    _call("load_state_dict()", {}, resumed.load_state_dict, saved, guard=guard)
    for run_params, optimizer_run in ((params, optimizer), (resumed_params, resumed)):
        for p, grad in zip(run_params, grads[3]):
            p.grad = grad.clone()
        _call("step() after load_state_dict()", {}, optimizer_run.step, guard=guard)
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
    lr = _FIRST["lr"]
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
    right = [torch.allclose(a, b, rtol=1e-3, atol=_UPDATE_ATOL) for a, b in zip(got_per_param, expected_per_param)]
    if right[0] and not all(right):
        i = right.index(False)
        raise ExerciseFailed(f"the first step of parameter 0 is right but that of parameter {i} is not "
                             f"({_show_tensors(expected_per_param[i], got_per_param[i])}): each parameter takes "
                             f"its first step with t = 1. Keep the step count per parameter, in self.state[p]; a "
                             f"counter shared by all parameters is already at 2, 3, ... when the others step")
    raise ExerciseFailed(f"wrong first step with lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, update "
                         f"(after - before): {_show_tensors(expected, got)}")


def _adamw_tiny_gradients(history):
    got, _, _ = _updates("tiny gradients", history)
    expected, _, _ = _updates("tiny gradients", _reference_history("tiny gradients"))
    if torch.allclose(got, expected, rtol=1e-3, atol=_UPDATE_ATOL):
        return
    ratio = (got.abs() / _FIRST["lr"]).median().item()
    if ratio < 1e-3:
        raise ExerciseFailed("eps belongs outside the square root: p -= lr * m_hat / (sqrt(v_hat) + eps). With "
                             "gradients of 1e-9, sqrt(v_hat + eps) is 1e-4 and the step all but vanishes")
    if abs(ratio - 1) < 0.05:
        raise ExerciseFailed("eps is missing from the denominator: p -= lr * m_hat / (sqrt(v_hat) + eps); it "
                             "keeps steps small when gradients are ~0 (use group['eps'])")
    raise ExerciseFailed(f"wrong step for gradients of size ~1e-9 (eps=1e-8 matters here), update (after - "
                         f"before): {_show_tensors(expected, got)}")


def _adamw_decay_only(history):
    lr, weight_decay = _FIRST["lr"], 0.1
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
                         f"give p * (1 - lr * weight_decay). Update (after - before): {_show_tensors(expected, got)}")


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


def _adamw_many_steps(got):
    expected = _reference_history("many steps")
    mismatch = _first_mismatch(got, expected)
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
        (_reference_history("many steps", cls=_decay_after_update),
         "apply weight decay before the Adam update, as torch.optim.AdamW: p *= 1 - lr * wd, then "
         "p -= lr * m_hat / (sqrt(v_hat) + eps)"),
    ]
    for variant, message in variants:
        if _matches(got, variant):
            raise ExerciseFailed(message)
    t, i = mismatch
    hint = (" Step 1 is right, so check that m, v and the step count t persist between calls (in self.state[p]) "
            "and that t grows by one per step() for each parameter." if t > 0 else "")
    raise ExerciseFailed(f"after step {t + 1} of 6 ({_MANY_TEXT}), parameter {i} (shape "
                         f"{list(expected[t][i].shape)}) is wrong: {_show_tensors(expected[t][i], got[t][i])}.{hint}")


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


def _adamw_groups_and_schedule(got):
    expected = _reference_history("groups")
    mismatch = _first_mismatch(got, expected)
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
                         f"{_show_tensors(expected[t][i], got[t][i])}")


def _adamw_late_gradient(got):
    expected = _reference_history("late gradient")
    mismatch = _first_mismatch(got, expected)
    if mismatch is None:
        return
    t, i = mismatch
    if i == 2 and t >= 2:
        raise ExerciseFailed(f"parameter 2 gets its first gradient at step 3 and must take its first Adam step "
                             f"with t = 1 (bias correction 1 - beta**1), yours did not "
                             f"({_show_tensors(expected[t][i], got[t][i])}): count steps per parameter, in "
                             f"self.state[p]['step'], not per group or per optimizer")
    raise ExerciseFailed(f"wrong update at step {t + 1}, parameter {i}, when parameter 2 has no gradient in "
                         f"steps 1-2: {_show_tensors(expected[t][i], got[t][i])}")


# ----------------------------------------------------------------------------------------
# 3. Gradient clipping
# ----------------------------------------------------------------------------------------

def _clip_cases():
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
    _require_callable(fn, "clip_grad_norm")
    for case, source, max_norm, as_generator in _clip_cases():
        learner = _clone_params(_case_params(source, as_generator))
        argument = (p for p in learner) if as_generator else learner
        got = _call("clip_grad_norm", {"case": case, "max_norm": max_norm}, fn, argument, max_norm,
                    hints=[_NONE_GRAD_HINT], guard=guard)
        records.append({"got": got, "grads": [p.grad for p in learner]})


def _judge_clip_grad_norm(records):
    cases = _clip_cases()
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
        _clip_check_norm(record["got"], expected_norm, before, max_norm, case, as_generator)
        _clip_check_grads(record["grads"], reference, before, max_norm, expected_norm, case, as_generator,
                          _changed_below(cases, changed))


def _changed_below(cases, changed):
    """Whether the learner scaled gradients in a case whose norm is below max_norm."""
    below = []
    for (case, source, max_norm, as_generator), was_changed in zip(cases, changed):
        grads = [p.grad for p in _case_params(source, as_generator) if p.grad is not None]
        if grads and torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item() < max_norm:
            below.append(was_changed)
    return any(below)


def _clip_check_norm(got, expected, before, max_norm, case, as_generator):
    if not torch.is_tensor(got):
        raise ExerciseFailed(f"return the norm as a 0-dim tensor (as torch.nn.utils.clip_grad_norm_ does), "
                             f"not {_kind(got)}, for {case}")
    if got.numel() != 1:
        raise ExerciseFailed(f"return one number, the global norm (a 0-dim tensor); got shape {list(got.shape)} "
                             f"for {case}")
    value = got.item()
    # a float32 sum of n squares is exact to n * U32 relatively (n <= 40 here), the square root halves that
    if _close(value, expected, 1e-5, 1e-12):
        return
    norms = [g.norm().item() for g in before if g is not None]
    if as_generator and value == 0:
        raise ExerciseFailed("parameters may be a generator (model.parameters()), which is empty after one pass: "
                             "turn it into a list first, params = [p for p in parameters if p.grad is not None]")
    if expected > max_norm and _close(value, max_norm, 1e-3):
        raise ExerciseFailed(f"return the norm before clipping (it is what you log), not after: for {case} "
                             f"{_pair(expected, value)}")
    if _close(value, sum(norms), 1e-4):
        raise ExerciseFailed("the global norm is sqrt(sum of squared per-parameter norms), not the sum of the "
                             f"norms: for {case} {_pair(expected, value)}")
    if _close(value, expected ** 2, 1e-4):
        raise ExerciseFailed("you returned the sum of squares: take its square root")
    if any(_close(value, n, 1e-4) for n in norms):
        raise ExerciseFailed("norm computed per parameter, not globally: the norm is over all gradients "
                             f"together, sqrt(sum over p of ||p.grad||^2); for {case} {_pair(expected, value)}")
    raise ExerciseFailed(f"wrong norm for {case} (max_norm={max_norm}): {_pair(expected, value)}")


def _clip_check_grads(grads, reference, before, max_norm, expected_norm, case, as_generator, scaled_below):
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
        if all(n <= max_norm * 1.001 for n in mine_norms) and any(_close(n, max_norm, 1e-3) for n in mine_norms) \
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
                                 f"({_show_tensors(ref.grad, mine)})")
        raise ExerciseFailed(f"wrong clipped gradient of parameter {index} for {case}: "
                             f"{_show_tensors(ref.grad, mine)}")


# ----------------------------------------------------------------------------------------
# 4-5. Learning-rate schedules
# ----------------------------------------------------------------------------------------

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
        _require_callable(fn, name)
        for config in _SCHEDULE_CONFIGS:
            w, total = config["warmup_steps"], config["total_steps"]
            zero_div = (lambda e: isinstance(e, ZeroDivisionError),
                        "with warmup_steps == total_steps there is no decay: test step >= total_steps (-> min_lr) "
                        "before computing progress, which divides by total_steps - warmup_steps = 0"
                        if w == total else "with warmup_steps=0 there is no warmup: don't divide by warmup_steps then")
            for step in _schedule_points(config):
                got = _call(name, dict(step=step, **config), fn, step, config["max_lr"], config["min_lr"], w, total,
                            hints=[zero_div], guard=guard)
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
                                         f"{_kind(got)}{_on(dict(step=step, **config))}")
                expected = reference(step, **config)
                # the reference computes in float64; an answer computed in float32 (torch) is exact to a few U32
                # (6e-8) relatively, so 1e-6 admits it, while the smallest mistake here moves the LR by 1e-2
                if not _close(float(got), expected, 1e-6, 1e-12):
                    wrong.append((step, float(got), expected))
            if wrong:
                _diagnose_schedule(reference, config, wrong, decay_formula)
    return judge_schedule


def _diagnose_schedule(reference, config, wrong, decay_formula):
    w, total, max_lr, min_lr = config["warmup_steps"], config["total_steps"], config["max_lr"], config["min_lr"]
    step, got, expected = wrong[0]
    setting = f"max_lr={max_lr}, min_lr={min_lr}, warmup_steps={w}, total_steps={total}"
    region = _region(step, w, total)
    shown = f"at step {step} ({setting}): {_pair(expected, got)}"
    if region in ("peak", "decay") and w > 0 and _close(got, reference(step, **dict(config, warmup_steps=0)),
                                                        1e-6, 1e-12):
        raise ExerciseFailed(f"the decay must start at warmup_steps: progress = (step - warmup_steps) / "
                             f"(total_steps - warmup_steps); {shown}")
    warmup_wrong = [(s, g) for s, g, _ in wrong if s < w]
    if warmup_wrong:
        early = [(s, g) for s, g, _ in wrong if s <= w]
        if all(_close(g, reference(min(s + 1, w), **config), 1e-6, 1e-12) for s, g in early):
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
    if min_lr > 0 and decay_wrong and all(_close(g, reference(s, **dict(config, min_lr=0.0)), 1e-6, 1e-12)
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
    _check("check_cosine_schedule", fn)


def check_linear_schedule(fn):
    """fn(step, max_lr, min_lr, warmup_steps, total_steps) -> float, as training.linear_lr: min_lr from
    total_steps on; before that, warmup max_lr * step / warmup_steps, then a straight line from max_lr to min_lr."""
    __tracebackhide__ = True
    _check("check_linear_schedule", fn)


# ----------------------------------------------------------------------------------------
# 6. Learning-rate range finder
# ----------------------------------------------------------------------------------------

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


def _floats(values):
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return None


def _run_lr_finder(fn, records, guard):
    _require_callable(fn, "lr_finder")
    for case, sweep, script in _LR_FINDER_CASES:
        settings = dict(sweep, diverge_factor=_DIVERGE_FACTOR)
        train_step = _ScriptedTraining(**script)
        result = _call("lr_finder", dict(case=case, **settings), fn, train_step, **settings, guard=guard)
        if not isinstance(result, (tuple, list)) or len(result) != 3:
            records.append({"result": {"kind": _show(result)[:200]}, "calls": train_step.calls})
            continue
        suggestion = result[2]
        real = isinstance(suggestion, numbers.Real) and not isinstance(suggestion, bool)
        records.append({"result": {"lrs": _floats(result[0]), "losses": _floats(result[1]),
                                   "suggested": float(suggestion) if real else None, "suggested_kind": _kind(suggestion)},
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
    return (math.isnan(a) and math.isnan(b)) or a == b or _close(a, b, 1e-6)


def _judge_lr_finder(records):
    for case, sweep, script in _LR_FINDER_CASES:
        settings = dict(sweep, diverge_factor=_DIVERGE_FACTOR)
        inputs = dict(case=case, **settings)
        record = records.next()
        result, calls = record["result"], record["calls"]
        if "kind" in result:
            raise ExerciseFailed(f"return a tuple (lrs, losses, suggested_lr), got {result['kind']}{_on(inputs)}")
        replay = _ScriptedTraining(**script)  # the losses train_step returned in your run, call for call
        returned = [replay(lr) for lr in calls]
        _lr_finder_sweep(calls, sweep, inputs)
        _lr_finder_stop(calls, returned, replay, sweep, inputs)
        lrs, losses = result["lrs"], result["losses"]
        if lrs is None:
            raise ExerciseFailed(f"lrs must be a list of numbers{_on(inputs)}")
        if len(lrs) != len(calls) or not all(_close(a, b, 1e-6) for a, b in zip(lrs, calls)):
            raise ExerciseFailed(f"lrs must list the learning rates you trained with, in order: train_step got "
                                 f"{_show(calls)}, you returned {_show(lrs)}{_on(inputs)}")
        if losses is None:
            raise ExerciseFailed(f"losses must be a list of numbers{_on(inputs)}")
        if len(losses) != len(returned):
            raise ExerciseFailed(f"losses must list what train_step returned, one per call: train_step ran "
                                 f"{len(returned)} times, you returned {len(losses)} losses{_on(inputs)}")
        wrong = next((i for i, (a, b) in enumerate(zip(losses, returned)) if not _same_loss(a, b)), None)
        if wrong is not None:
            raise ExerciseFailed(f"losses must list what train_step returned, one per call: at call {wrong} it "
                                 f"returned {returned[wrong]!r}, your list has {losses[wrong]!r}{_on(inputs)}")
        if result["suggested"] is None:
            raise ExerciseFailed(f"suggested_lr must be a float, got {result['suggested_kind']}{_on(inputs)}")
        _lr_finder_suggestion(result["suggested"], calls, returned, inputs)


def _lr_finder_sweep(calls, sweep, inputs):
    start, end, steps = sweep["start_lr"], sweep["end_lr"], sweep["num_steps"]
    for i, lr in enumerate(calls[:steps]):
        expected = start * (end / start) ** (i / (steps - 1))
        # np.logspace or exp(log) give the same LRs to a few float64 roundings; torch.logspace in float32 rounds
        # the exponent (|x| < 8) to 4.8e-7 absolute, 1.1e-6 relative in the LR: 1e-5 admits all of them, while an
        # off-by-one or linear sweep is off by 1% or more
        if _close(lr, expected, 1e-5):
            continue
        linear = start + (end - start) * i / (steps - 1)
        short = start * (end / start) ** (i / steps)
        if _close(lr, linear, 1e-5):
            message = ("the sweep must be exponential, not linear: lr_i = start_lr * (end_lr / start_lr) ** "
                       "(i / (num_steps - 1)), so every step multiplies the LR by the same factor")
        elif _close(lr, short, 1e-5):
            message = ("the sweep is off by one: the last LR must be end_lr, so use i / (num_steps - 1), "
                       "not i / num_steps")
        else:
            message = "lr_i = start_lr * (end_lr / start_lr) ** (i / (num_steps - 1)) for i = 0 .. num_steps - 1"
        raise ExerciseFailed(f"{message}: call {i} of train_step used lr={lr!r}, expected {expected!r} "
                             f"({_pair(expected, lr)}){_on(inputs)}")


def _lr_finder_stop(calls, returned, replay, sweep, inputs):
    n, steps = len(calls), sweep["num_steps"]
    if n > steps:
        raise ExerciseFailed(f"train_step ran {n} times, more than num_steps={steps}{_on(inputs)}")
    stop = _diverged_at(returned, _DIVERGE_FACTOR)
    if stop is not None and n > stop + 1:
        previous = _diverged_at(returned, _DIVERGE_FACTOR, versus_previous=True)
        late = _diverged_at(returned, _DIVERGE_FACTOR, from_index=3)
        if math.isnan(returned[stop]):
            raise ExerciseFailed("the loss became NaN and you kept going: NaN > x is always False, so test "
                                 "`not math.isfinite(loss)` as well" + _on(inputs))
        if (previous + 1 if previous is not None else steps) == n:
            raise ExerciseFailed(f"compare with the lowest loss so far, not the previous one: a loss that climbs a "
                                 f"little at every step never jumps 4x over the previous loss but soon exceeds 4x "
                                 f"the lowest (expected {stop + 1} calls of train_step, got {n}){_on(inputs)}")
        if stop < 3 and (late + 1 if late is not None else steps) == n:
            raise ExerciseFailed(f"test for divergence from the first step on: here the loss diverged at call "
                                 f"{stop} and you kept training (expected {stop + 1} calls of train_step, got {n})"
                                 f"{_on(inputs)}")
        raise ExerciseFailed(f"you kept training after the loss diverged: stop right after a loss that is not "
                             f"finite or above diverge_factor x the lowest loss so far (expected {stop + 1} calls "
                             f"of train_step, got {n}){_on(inputs)}")
    if stop is None and n < steps:
        start, end = sweep["start_lr"], sweep["end_lr"]
        next_loss = replay(start * (end / start) ** (n / (steps - 1)))
        if n and (not math.isfinite(next_loss) or next_loss > _DIVERGE_FACTOR * min(returned)):
            raise ExerciseFailed(f"record the loss that shows divergence, then stop (expected {n + 1} calls of "
                                 f"train_step, got {n}){_on(inputs)}")
        raise ExerciseFailed(f"you stopped too early, after {n} of the {steps} steps: stop only when the loss is not "
                             f"finite or above diverge_factor ({_DIVERGE_FACTOR}) x the lowest loss so far"
                             f"{_on(inputs)}")


def _lr_finder_suggestion(suggestion, calls, returned, inputs):
    finite = [i for i, loss in enumerate(returned) if math.isfinite(loss)]
    lowest = min(finite, key=returned.__getitem__)
    expected = calls[lowest] / 10
    if _close(suggestion, expected, 1e-6):  # a float32 suggestion is exact to 6e-8
        return
    if _close(suggestion, expected * 10, 1e-6):
        raise ExerciseFailed(f"suggest one tenth of the LR at the lowest loss: at the minimum the LR is already on "
                             f"the edge of too high ({_pair(expected, suggestion)}){_on(inputs)}")
    but_last = [i for i in finite if i != len(returned) - 1]
    if lowest == len(returned) - 1 and but_last and \
            _close(suggestion, calls[min(but_last, key=returned.__getitem__)] / 10, 1e-6):
        raise ExerciseFailed(f"the lowest loss can be the last one recorded (here the loss still falls at end_lr): "
                             f"look for the lowest among all the losses ({_pair(expected, suggestion)}){_on(inputs)}")
    raise ExerciseFailed(f"suggested_lr should be lrs[index of the lowest finite loss] / 10: "
                         f"{_pair(expected, suggestion)}{_on(inputs)}")


def check_lr_finder(fn):
    """fn(train_step, *, start_lr, end_lr, num_steps, diverge_factor) -> (lrs, losses, suggested_lr).

    train_step(lr) -> float trains one step at learning rate lr and returns its loss. For i = 0 ..
    num_steps - 1, call it with lr_i = start_lr * (end_lr / start_lr) ** (i / (num_steps - 1)), in
    order, and record lr_i and the loss. Stop right after recording a loss that is not finite or
    larger than diverge_factor times the lowest loss before it. lrs and losses are the lists of what
    was recorded; suggested_lr is one tenth of the LR with the lowest finite loss.
    """
    __tracebackhide__ = True
    _check("check_lr_finder", fn)


# ----------------------------------------------------------------------------------------
# 7. Early stopping
# ----------------------------------------------------------------------------------------

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
]


def _run_early_stopping(fn, records, guard):
    _require_callable(fn, "train_with_early_stopping")
    for case, settings, curve in _EARLY_STOPPING_CASES:
        run = _ScriptedRun(curve)
        result = _call("train_with_early_stopping", dict(case=case, **settings, val_losses=curve), fn, run.model,
                       run.train_step, run.evaluate, **settings, guard=guard)
        record = {"evaluated_at": run.evaluated_at, "steps": run.steps, "state": dict(run.model.state_dict())}
        if not isinstance(result, (tuple, list)) or len(result) != 3:
            record["result"] = {"kind": _show(result)[:200]}
        else:
            best_step, best_loss, history = result
            try:
                pairs = [[int(step), float(loss)] for step, loss in history]
            except (TypeError, ValueError):
                pairs = None
            record["result"] = {"best": [v if isinstance(v, numbers.Real) else _kind(v) for v in (best_step, best_loss)],
                                "history": pairs, "history_shown": _show(history)[:200]}
        records.append(record)


def _early_stopping_expected(curve, settings):
    """(evaluation steps, train_step calls, best step, best loss, history) of the rule in check_early_stopping."""
    every = settings["eval_every"]
    evaluations, stopped = _evaluations_until_stop(curve, settings["patience"], settings["max_steps"] // every)
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
                                 f"{_on(inputs)}")
        expected_evals, expected_steps, best_step, best_loss, history = _early_stopping_expected(curve, settings)
        _early_stopping_schedule(record, expected_evals, expected_steps, settings, curve, inputs)
        if result["history"] is None:
            raise ExerciseFailed(f"history must be a list of (step, val_loss) pairs, got {result['history_shown']}")
        got_history = [tuple(pair) for pair in result["history"]]
        if got_history != history:
            raise ExerciseFailed(f"history should list (step, val_loss) for each evaluation: expected "
                                 f"{history}, got {got_history}{_on(inputs)}")
        if tuple(result["best"]) != (best_step, best_loss):
            raise ExerciseFailed(f"best_step, best_val_loss should be {(best_step, best_loss)}, got "
                                 f"{tuple(result['best'])}{_on(inputs)}")
        _early_stopping_weights(record, curve, best_step, expected_steps < settings["max_steps"], inputs)


def _early_stopping_schedule(record, expected_evals, expected_steps, settings, curve, inputs):
    got_evals = record["evaluated_at"]
    every = settings["eval_every"]
    if got_evals and got_evals[0] == 0:
        raise ExerciseFailed(f"you evaluated before training (at step 0): evaluate after every eval_every "
                             f"training steps, i.e. after steps {every}, {2 * every}, ...{_on(inputs)}")
    if got_evals[:len(expected_evals)] != expected_evals[:len(got_evals)]:
        raise ExerciseFailed(f"evaluate after every eval_every={every} training steps: expected evaluations "
                             f"after steps {expected_evals}, yours came after steps {got_evals}{_on(inputs)}")
    if len(got_evals) != len(expected_evals):
        n, patience, max_evals = len(got_evals), settings["patience"], settings["max_steps"] // every

        def count(**mistake):
            return _evaluations_until_stop(curve, mistake.pop("patience", patience), max_evals, **mistake)[0]

        mistakes = [  # (evaluations such a loop runs on this curve, what is wrong), first match wins
            (count(strict=False), "an equal val loss is not an improvement: compare with `<`, not `<=`"),
            (max_evals, "training never stopped early: stop after `patience` evaluations in a row without "
                        "improvement"),
            (count(patience=patience + 1), "patience is off by one: you stopped one evaluation late"),
            (count(patience=patience - 1) if patience > 1 else None,
             "patience is off by one: you stopped one evaluation early"),
            (count(reset=False), "reset the count of evaluations without improvement when the val loss improves: "
                                 "patience counts evaluations *in a row*"),
            (count(versus_previous=True), "an improvement means a val loss below the best so far: one below the "
                                          "previous evaluation but above the best does not reset the count"),
            (count(min_delta=0.01), "any val loss strictly below the best is an improvement, however small: don't "
                                    "require a margin (a min_delta)"),
        ]
        message = next((text for evaluations, text in mistakes if evaluations == n), "wrong stopping point")
        raise ExerciseFailed(f"{message}: expected the last evaluation after step {expected_evals[-1]}, yours "
                             f"after step {got_evals[-1] if got_evals else None} (val losses "
                             f"{[_val_loss(curve, k) for k in range(1, max(n, len(expected_evals)) + 1)]})"
                             f"{_on(inputs)}")
    if record["steps"] != expected_steps:
        raise ExerciseFailed(f"train_step should run {expected_steps} times (until the last evaluation, or "
                             f"max_steps), it ran {record['steps']} times{_on(inputs)}")


def _val_loss(curve, k):
    """The val loss of the k-th evaluation (1-based) in a _ScriptedRun: the curve, then its last value."""
    return curve[min(k, len(curve)) - 1]


def _evaluations_until_stop(curve, patience, max_evals, reset=True, strict=True, versus_previous=False,
                            min_delta=0.0):
    """(evaluations an early-stopping loop runs on `curve`, whether it stopped early). The defaults are the
    rule; the other settings are mistake models."""
    best, bad, previous = math.inf, 0, math.inf
    for k in range(1, max_evals + 1):
        loss = _val_loss(curve, k)
        if loss < best - min_delta or (not strict and loss == best):
            best = loss
            bad = 0 if reset else bad
        elif versus_previous and loss < previous:
            bad = 0
        else:
            bad += 1
            if bad == patience:
                return k, True
        previous = loss
    return max_evals, False


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
            f"the end.{when}{_on(inputs)}")
    raise ExerciseFailed(f"the model should end with the weights it had after step {best_step}, the best "
                         f"evaluation{_on(inputs)}")


def check_early_stopping(fn):
    """fn(model, train_step, evaluate, *, max_steps, eval_every, patience) -> (best_step, best_val_loss, history).

    For step = 1 .. max_steps: call train_step(); when step % eval_every == 0 call evaluate() -> val
    loss and append (step, val_loss) to history. A val loss strictly below the best so far is an
    improvement: remember the step, the loss and a copy of the model's weights. Stop after `patience`
    evaluations in a row without improvement. Before returning, load the best weights into `model`.
    """
    __tracebackhide__ = True
    _check("check_early_stopping", fn)


def check_cross_entropy(fn):
    """fn(logits: Tensor[N, V], targets: LongTensor[N]) -> 0-dim Tensor, the mean of -log softmax(logits)[target]."""
    __tracebackhide__ = True
    _check("check_cross_entropy", fn)


def check_adamw(cls):
    """cls(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01): an optimizer matching
    torch.optim.AdamW (decoupled weight decay, bias correction) step for step."""
    __tracebackhide__ = True
    _check("check_adamw", cls)


def check_clip_grad_norm(fn):
    """fn(parameters, max_norm) -> 0-dim Tensor: scales every .grad in place by max_norm / (norm + 1e-6) when the
    global L2 norm exceeds max_norm (skipping .grad None) and returns the norm before clipping."""
    __tracebackhide__ = True
    _check("check_clip_grad_norm", fn)


_RUNS = {"check_cross_entropy": _run_cross_entropy, "check_adamw": _run_adamw,
         "check_clip_grad_norm": _run_clip_grad_norm, "check_cosine_schedule": _run_schedule("cosine_lr"),
         "check_linear_schedule": _run_schedule("linear_lr"), "check_lr_finder": _run_lr_finder,
         "check_early_stopping": _run_early_stopping}
_JUDGES = {"check_cross_entropy": _judge_cross_entropy, "check_adamw": _judge_adamw,
           "check_clip_grad_norm": _judge_clip_grad_norm,
           "check_cosine_schedule": _judge_schedule(training.cosine_lr, _COSINE_FORMULA),
           "check_linear_schedule": _judge_schedule(training.linear_lr, _LINEAR_FORMULA),
           "check_lr_finder": _judge_lr_finder, "check_early_stopping": _judge_early_stopping}

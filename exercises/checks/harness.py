"""What every check shares: calling the candidate safely, plain data, the run and the judge, messages.

Each check is two halves that never share a process when a notebook is graded:

* the *run* calls the learner's candidate on the check's inputs (randomized cases and edge
  cases, the same every time) and keeps only plain data: the values it returned, the tensors
  it changed, the calls it made to the callbacks it was given, or the message of the error it
  raised. It compares nothing. It runs in the learner's kernel, under a time limit and a guard
  that refuses the functions the exercise rebuilds (exercises/integrity.py).
* the *judge* rebuilds the same inputs, computes the expected values from the references
  (`training`; for the LR finder and early stopping, the rule in the docstring applied to the
  scripted curves) and compares, with tolerances argued next to each comparison. It returns
  None when the candidate is right and raises ExerciseFailed otherwise, with a message that
  names the mistake when it is a known one, or shows the input, the expected and the received
  value with enough digits to see the difference.

Each exercise's module defines its two halves and `register`s them under the name of its check.

The time limit uses SIGALRM, re-armed every 0.25 s so that an answer that swallows it (a bare
`except:` in a loop) is interrupted again; it applies on the main thread of a POSIX process (a
Jupyter kernel, the grader, pytest). When grading, a watchdog thread also ends the kernel if a
call outlives the limit by GRACE_S, writing why to WATCHDOG_NOTE for the grader to report.
TIME_LIMIT_S, GRACE_S and WATCHDOG_NOTE live on the package (exercises.checks), where the grader
and the tests set them, and are read from there at every call.
"""
from __future__ import annotations

import contextlib
import inspect
import linecache
import math
import numbers
import os
import re
import signal
import sys
import threading
import traceback
from json import dumps as _json_dumps  # bound at import: a later patch of json.dumps changes nothing here

import torch

import exercises.checks as settings
from exercises.catalog import BY_CHECK
from exercises.integrity import CallGuard, Refused

FLOAT32_ROUNDOFF = 2.0 ** -24  # unit roundoff: one float32 operation is exact to within this relative error


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
    note_path = settings.WATCHDOG_NOTE
    if note_path:
        def end_the_kernel():
            with open(note_path, "w", encoding="utf-8") as note:
                note.write(f"{what} did not finish within {seconds:g} s and kept running after it was interrupted "
                           f"(does it catch every exception, e.g. a bare `except:` inside a loop?)")
            os._exit(70)
        watchdog = threading.Timer(seconds + settings.GRACE_S, end_the_kernel)
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


# Frames from these folders are not the learner's: the checker (all of exercises/), torch, contextlib.
_NOT_THE_LEARNERS = (os.path.dirname(os.path.dirname(__file__)), os.path.dirname(torch.__file__),
                     os.path.dirname(contextlib.__file__))


def learner_line(frames):
    """' (at line N: `code`)' for the innermost of `frames`, (file name, line number) pairs with the innermost
    last, that is the learner's code; '' when none is."""
    frames = [(filename, lineno) for filename, lineno in frames if not filename.startswith(_NOT_THE_LEARNERS)]
    if not frames:
        return ""
    filename, lineno = frames[-1]
    line = linecache.getline(filename, lineno).strip()
    return f" (at line {lineno}: `{line}`)" if line else f" (at line {lineno})"


def _learner_line(error):
    """learner_line() of the frames an exception went through."""
    return learner_line((frame.filename, frame.lineno) for frame in traceback.extract_tb(error.__traceback__))


def call_candidate(what, inputs, fn, *args, hints=(), guard=None, time_limit=None, **kwargs):
    """fn(*args, **kwargs) under the time limit (default: the package's TIME_LIMIT_S) and the guard; any failure
    becomes an ExerciseFailed. `hints` are (matches(error), text) pairs: the first that matches an error adds its
    text."""
    __tracebackhide__ = True
    time_limit = settings.TIME_LIMIT_S if time_limit is None else time_limit
    try:
        with _time_limit(time_limit, what) as timer, (guard or contextlib.nullcontext()):
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
        raise ExerciseFailed(f"{what} raised {type(error).__name__}: {error}{_learner_line(error)}"
                             f"{on_input(inputs)}." + (f" Hint: {hint}" if hint else "")) from None
    if guard is not None and guard.refused:
        raise ExerciseFailed(guard.refused)
    if timer.fired:
        raise ExerciseFailed(f"{what} did not finish within {time_limit:g} s{on_input(inputs)}: "
                             f"is there an infinite loop?")
    return result


def require_callable(candidate, name):
    if not callable(candidate):
        raise ExerciseFailed(f"pass your function itself to the check, e.g. check(...)({name}) -> "
                             f"check({name}); got {type_name(candidate)}")


# A hint for call_candidate, shared by the exercises whose candidate loops over parameters' gradients.
# Only when the learner's failing line reads a `.grad` (or its text is unknown): a None of the learner's own
# (`total = None`) is not one.
NONE_GRAD_HINT = (lambda e: "NoneType" in str(e) and (".grad" in _learner_line(e) or "`" not in _learner_line(e)),
                  "skip parameters whose .grad is None (frozen or unused): `if p.grad is None: continue`")


# ----------------------------------------------------------------------------------------
# Plain data: what crosses from the learner's kernel to the judge
# ----------------------------------------------------------------------------------------

class Foreign:
    """A returned value of a type that does not cross from the kernel: only its type's name does."""

    def __init__(self, type_name):
        self.type_name = type_name

    def __repr__(self):
        return f"<a {self.type_name}>"


def type_name(value):
    """The name of value's type; for a Foreign, the name of the type it stands for."""
    return value.type_name if isinstance(value, Foreign) else type(value).__name__


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_DTYPES = {"float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"}


def _numpy_scalar(value):
    """numpy's own scalar types (exactly: not a subclass the answer defines), which .item() makes plain."""
    numpy = sys.modules.get("numpy")
    return numpy is not None and type(value) in {getattr(numpy, name) for name in (
        "float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "bool_")}


def to_plain_data(value, depth=0):
    """value as JSON-able data: tensors, numbers, strings, None, lists, tuples, dicts; anything else by type name.
    Only the exact types count (a subclass of float, Tensor or list that the answer defines is an object): so no
    method of the answer's runs here, after the guard has let go."""
    if depth > 8:
        return {"__object__": type(value).__name__}
    if _numpy_scalar(value):
        value = value.item()
    if isinstance(value, torch.Tensor) and type(value) not in _PLAIN_TENSORS:
        return {"__object__": type(value).__name__}
    if type(value) not in (torch.Tensor, torch.nn.Parameter, type(None), bool, str, int, float, list, tuple, dict):
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
        return [to_plain_data(item, depth + 1) for item in value]
    if isinstance(value, tuple):
        return {"__tuple__": [to_plain_data(item, depth + 1) for item in value]}
    if isinstance(value, dict) and all(type(key) is str for key in value):
        return {"__dict__": {key: to_plain_data(item, depth + 1) for key, item in value.items()}}
    return {"__object__": type(value).__name__}


def from_plain_data(data):
    """The values to_plain_data wrote, rebuilt (an object of another type as a Foreign)."""
    if isinstance(data, list):
        return [from_plain_data(item) for item in data]
    if not isinstance(data, dict):
        return data
    (tag, content), = data.items()
    if tag == "__tensor__":
        dtype, shape, values = content
        if dtype not in _DTYPES:
            raise ValueError(f"not a dtype the run writes: {dtype!r}")
        return torch.tensor(values, dtype=getattr(torch, dtype)).reshape(shape)
    if tag == "__tuple__":
        return tuple(from_plain_data(item) for item in content)
    if tag == "__dict__":
        return {key: from_plain_data(item) for key, item in content.items()}
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


# ----------------------------------------------------------------------------------------
# The two halves of every check, by the check's name
# ----------------------------------------------------------------------------------------

RUNS = {}    # check name -> run(candidate, records, guard): appends plain records, compares nothing
JUDGES = {}  # check name -> judge(records): raises ExerciseFailed unless the records show a right candidate


def register(check, run_half, judge_half):
    """Make `check` (e.g. "check_adamw") run with `run_half` and judge with `judge_half`."""
    RUNS[check], JUDGES[check] = run_half, judge_half


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
        RUNS[check](candidate, records, CallGuard(BY_CHECK[check].slug))
    except ExerciseFailed as error:
        records.append({"failed": str(error)})
    return {"records": [to_plain_data(record) for record in records], "origin": origin}


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
    records = _Records([from_plain_data(record) for record in data["records"]])
    JUDGES[check](records)
    if records.position != len(records.records):  # exactly one record per case the check tried
        raise ExerciseFailed(f"the run of your answer sent back {len(records.records)} records where the check "
                             f"expects {records.position}")


def run_and_judge(check, candidate):
    """Both halves in this process: what a notebook's check cell does."""
    __tracebackhide__ = True
    judge(check, run(check, candidate))


# ----------------------------------------------------------------------------------------
# Messages
# ----------------------------------------------------------------------------------------

def _digits_to_tell_apart(*values):
    """The fewest significant digits (6 to 17) at which the floats `values` print differently."""
    for digits in range(6, 18):
        if len({f"{value:.{digits}g}" for value in values}) == len(set(values)):
            return digits
    return 17


def expected_and_got(expected, got):
    """'expected X, got Y' with enough digits that X and Y differ on the page."""
    if isinstance(expected, float) and isinstance(got, float) and math.isfinite(expected) and math.isfinite(got):
        digits = _digits_to_tell_apart(expected, got)
        return f"expected {expected:.{digits}g}, got {got:.{digits}g}"
    return f"expected {show(expected)}, got {show(got)}"


def show(value, digits=6):
    """A short text for value: small tensors and floats to `digits` digits, long sequences by their start."""
    if torch.is_tensor(value):
        if value.numel() <= 6:
            return f"tensor({[float(f'{x:.{digits}g}') for x in value.detach().double().flatten().tolist()]}, " \
                   f"shape {list(value.shape)})"
        return f"tensor of shape {list(value.shape)}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"{type(value).__name__} of {len(value)} items, starting {[show(v) for v in value[:4]]}"
    return repr(value)


def tensor_differences(expected, got):
    """The first elements where two tensors differ, with enough digits to see it."""
    expected, got = expected.detach().double().flatten(), got.detach().double().flatten()
    if expected.shape != got.shape:
        return f"expected shape {list(expected.shape)}, got {list(got.shape)}"
    differ = (~torch.isclose(expected, got, rtol=1e-6, atol=0)).nonzero().flatten()[:3].tolist() or [0]
    digits = max(_digits_to_tell_apart(expected[i].item(), got[i].item()) for i in differ)
    return "; ".join(f"element {i}: expected {expected[i].item():.{digits}g}, got {got[i].item():.{digits}g}"
                     for i in differ)


def on_input(inputs):
    """' on input name=value, ...' for a message, or '' without inputs."""
    if not inputs:
        return ""
    return " on input " + ", ".join(f"{name}={show(value)}" for name, value in inputs.items())


def is_close(got, expected, rel_tol, abs_tol=0.0):
    return math.isclose(got, expected, rel_tol=rel_tol, abs_tol=abs_tol)

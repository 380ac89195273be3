"""Grade learners' exercise notebooks: ``python -m exercises.grade PATH... [--out DIR]``.

Each PATH is a notebook or a folder, searched recursively for ``*.ipynb``. Every notebook is
matched to its exercise (its ``metadata["exercise"]["slug"]``, else its file name ``NN-slug``,
else the function or class it defines, see exercises/catalog.py). Then:

1. its answer cells (the code cells up to the one that defines the candidate, without the
   learner's own check cells) are read here: an answer that uses what the exercise rebuilds,
   the checker or the solutions, or that patches a module, is refused (exercises/integrity.py);
2. they run in a fresh Jupyter kernel inside an OS sandbox of its own (exercises/sandbox.py:
   bubblewrap; read-only course code without solutions/, no network, no other submission, no
   --out, a private writable box), followed by a cell that calls the candidate on the check's
   inputs, with the banned functions refused down to their ATen ops, and writes back only plain
   data (exercises.checks.run_to_file) to a file in the box;
3. once the sandbox is dead, this process reads that file as strict JSON of plain types and,
   having imported the references itself, judges it (exercises.checks.judge).

Every submission is copied before any kernel starts, and the copies are graded. Where the sandbox
cannot run (no bwrap, no user namespaces, not Linux) the grader refuses to grade (exit 2) unless
given --no-sandbox, which it then warns about on stderr and under the table.

A candidate that loops forever, crashes or kills the kernel costs only its own notebook: it
scores 0 with the reason, and the others are still graded. A call that outlives its time limit
is interrupted; one that keeps running (a bare `except:` around a loop) ends its kernel. The check
cell as a whole has its exercise's budget (`check_budget`), enforced from this process by killing
the sandbox: a call that the in-kernel limits cannot stop (one long computation in C, holding the
interpreter) costs that budget, not --check-timeout.

Scores: 1 when the check passes, 0 otherwise. While it grades, the grader prints a line on stderr
as each notebook finishes (``[3/12] alice/04-cosine-schedule.ipynb: cosine-schedule, score 1, 2.3 s``);
then a table on stdout (learner = the folder holding the notebook, file = the notebook's file name)
and writes ``grades.csv`` and ``grades.json`` to ``--out`` (default: the current folder), atomically, after every
sandbox has ended; their SHA-256 digests are printed under the table. The checks' messages say what is
wrong; they never show the reference code.

Exit status: 0 when every notebook passed, 1 when at least one scored 0, 2 on a usage error
(a PATH that does not exist, or no notebook found), when the sandbox cannot run, or when the grades
cannot be written.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import nbformat
from jupyter_core.utils import run_sync
from nbclient import NotebookClient
from nbclient.exceptions import CellTimeoutError, DeadKernelError

from course.colab import setup_cell_source
from exercises import checks, sandbox
from exercises.catalog import BY_SLUG, CHECK_BUDGET_S, EXERCISES
from exercises.integrity import scan

__all__ = ["Grade", "answer_cells", "check_budget", "find_notebooks", "identify", "grade_notebook", "grade_paths",
           "progress_printer", "main"]

CELL_TIMEOUT_S = 120.0   # per learner cell
CALL_TIMEOUT_S = 20.0    # per call of the candidate inside the check (exercises.checks.TIME_LIMIT_S)
CHECK_TIMEOUT_S = 600.0  # for the grader's own cells, importing torch and running every case: a backstop
BUDGET_SCALE = 1.0       # times every exercise's check_budget_s (exercises/catalog.py)
MAX_NOTEBOOK_BYTES = 64 * 2 ** 20  # a submission larger than this is not read
MAX_RESULT_BYTES = 64 * 2 ** 20    # nor a check's result
MAX_REASON_CHARS = 2000
NO_SANDBOX_WARNING = ("WARNING: --no-sandbox: the notebooks ran without the OS sandbox, as this user, with this "
                      "user's files and network: these grades are not safe for credit")


@dataclass
class Grade:
    notebook: str     # path as given/found
    learner: str      # the folder that holds the notebook
    exercise: str     # slug, or "?" when the notebook matches no exercise
    score: int        # 1 or 0
    reason: str       # "" when passed, else what went wrong
    seconds: float

    def __post_init__(self):
        # what a notebook can put in a reason (an exception's message) must not forge lines of the table
        self.reason = _one_line(self.reason)[:MAX_REASON_CHARS]


def _one_line(text):
    return re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+", " ", str(text))


def find_notebooks(paths):
    """Every .ipynb under `paths` (files or folders), sorted, skipping .ipynb_checkpoints."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
        elif path.is_file() and path.suffix == ".ipynb":
            found.append(path)
        else:
            raise FileNotFoundError(f"not a notebook or a folder: {path}")
    return found


def _defines(source, name):
    return re.search(rf"^(def|class)\s+{re.escape(name)}\b", source, re.MULTILINE) is not None


def _from_file_name(path):
    match = re.match(r"\d+-(.+)", Path(path).stem)
    return BY_SLUG.get(match.group(1)) if match else None


def identify(notebook, path):
    """The Exercise a notebook is for, or None."""
    slug = notebook.get("metadata", {}).get("exercise", {}).get("slug")
    if slug in BY_SLUG:
        return BY_SLUG[slug]
    by_name = _from_file_name(path)
    if by_name:
        return by_name
    code = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    matches = [exercise for exercise in EXERCISES if _defines(code, exercise.candidate)]
    return matches[0] if len(matches) == 1 else None


def _is_check_cell(cell):
    return "check" in cell.get("metadata", {}).get("tags", []) or re.search(r"\bcheck_\w+\(", cell.source)


# The course's Colab set-up cell (course/colab.py), for any fork and branch: it does nothing outside Colab, so the
# grader neither reads nor runs it (its `sys.modules` and `subprocess` would be refused in an answer).
_SETUP_CELL = re.compile(re.escape(setup_cell_source("https://github.com/OWNER/REPO", "BRANCH"))
                         .replace("OWNER", r"[\w.-]+").replace("REPO", r"[\w.-]+").replace("BRANCH", r"[\w./-]+")
                         + r"\s*")


def answer_cells(notebook, exercise):
    """(cell number, source) of the code cells up to the last one that defines the candidate, without
    the learner's own check cells (a cell that defines the candidate stays) and the set-up cell; None when
    none defines it."""
    code = [(number, cell) for number, cell in enumerate(notebook.cells, start=1)
            if cell.cell_type == "code" and not _SETUP_CELL.fullmatch(cell.source)]
    defining = [i for i, (_, cell) in enumerate(code) if _defines(cell.source, exercise.candidate)]
    if not defining:
        return None
    return [(number, cell.source) for number, cell in code[:defining[-1] + 1]
            if _defines(cell.source, exercise.candidate) or not _is_check_cell(cell)]


# Runs in the learner's kernel before their cells: the slow imports (torch) happen here, under
# CHECK_TIMEOUT_S, so that --cell-timeout can stay short.
_PRELUDE = "from exercises import checks as _grader_checks"


def _grading_source(exercise, call_timeout, result_path, note_path):
    """The last cell: call the candidate on the check's inputs and write the plain results to result_path."""
    return f"""\
_grader_checks.TIME_LIMIT_S = {call_timeout!r}
_grader_checks.WATCHDOG_NOTE = {str(note_path)!r}
if {exercise.candidate!r} in globals():
    _grader_checks.run_to_file({exercise.check!r}, {exercise.candidate}, {str(result_path)!r})
"""


def check_budget(exercise, *, call_timeout=CALL_TIMEOUT_S, check_timeout=CHECK_TIMEOUT_S, budget_scale=BUDGET_SCALE):
    """Seconds the grader's check cell may run for `exercise`: its check_budget_s times `budget_scale`, never
    less than one call's time limit and grace (so that --call-timeout alone governs one slow call), never more
    than `check_timeout`."""
    return min(check_timeout, max(exercise.check_budget_s * budget_scale, call_timeout + checks.GRACE_S))


# Errors that mean the answer ran into one of the sandbox's limits: what its reason then adds.
_LIMIT_ERRORS = (
    (re.compile(r"\bMemoryError\b|can't allocate memory|Cannot allocate memory"),
     f"the sandbox's limit of {sandbox.ADDRESS_SPACE // 2 ** 30} GiB of address space"),
    (re.compile(r"\bBlockingIOError\b|Resource temporarily unavailable|can't start new thread"),
     f"the sandbox's limit of {sandbox.PROCESSES} processes and threads"),
)


def _naming_the_limit(reason):
    limits = [limit for pattern, limit in _LIMIT_ERRORS if pattern.search(reason)]
    return reason + "".join(f" [this ran into {limit}]" for limit in limits)


def _first_error(cells):
    for index, cell in cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return f"cell {index} raised {output['ename']}: {output['evalue']}"
    return None


def grade_notebook(path, *, cell_timeout=CELL_TIMEOUT_S, call_timeout=CALL_TIMEOUT_S,
                   check_timeout=CHECK_TIMEOUT_S, budget_scale=BUDGET_SCALE, learner=None, copy=None,
                   use_sandbox=True):
    """Read, run and judge one learner notebook; returns a Grade. `copy`, if given, is the file to read
    instead of `path` (grade_paths copies every submission first); with `use_sandbox` (the default) its
    kernel runs in the OS sandbox (exercises/sandbox.py). The check cell may run check_budget(...) seconds."""
    path = Path(path)
    started = time.monotonic()
    learner = learner if learner is not None else path.parent.name or "."

    def result(exercise, passed, reason):
        return Grade(str(path), learner, exercise.slug if exercise else "?", int(passed), reason,
                     round(time.monotonic() - started, 2))

    try:
        raw = _read_limited(Path(copy) if copy is not None else path, MAX_NOTEBOOK_BYTES)
        notebook = nbformat.reads(raw.decode("utf-8"), as_version=4)
    except Exception as error:  # not JSON, not a notebook, unreadable, too large
        return result(_from_file_name(path), False, f"cannot read the notebook: {type(error).__name__}: {error}")
    exercise = identify(notebook, path)
    if exercise is None:
        return result(None, False, "cannot tell which exercise this notebook is (no exercise metadata, no "
                                   "NN-name file name, no answer function found)")
    cells = answer_cells(notebook, exercise)
    if cells is None:
        return result(exercise, False, f"no cell defines `{exercise.candidate}`: the answer cell is missing "
                                       f"or renamed")
    refusal = scan(exercise.slug, [source for _, source in cells])
    if refusal:
        return result(exercise, False, refusal)
    with tempfile.TemporaryDirectory(prefix="grade-", ignore_cleanup_errors=True) as scratch:
        box = Path(scratch) / "box"
        box.mkdir()
        (box / path.name).write_bytes(raw)  # the kernel's working folder holds a copy of its own notebook only
        passed, reason = _run_and_judge(path, exercise, cells, Path(scratch), cell_timeout, call_timeout,
                                        check_timeout, budget_scale=budget_scale, use_sandbox=use_sandbox)
    return result(exercise, passed, reason)


def _read_limited(path, limit):
    with open(path, "rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit // 2 ** 20} MiB")
    return data


def _run_and_judge(path, exercise, cells, scratch, cell_timeout, call_timeout, check_timeout, *,
                   budget_scale=BUDGET_SCALE, use_sandbox=True):
    """(passed, reason): run the answer cells and the grading cell (for at most the exercise's check_budget) in
    a fresh kernel (in the sandbox whose box is scratch/box), judge what comes back once the kernel and everything
    it started are dead."""
    budget = check_budget(exercise, call_timeout=call_timeout, check_timeout=check_timeout, budget_scale=budget_scale)
    box = Path(scratch) / "box"
    box.mkdir(exist_ok=True)
    result_path, note_path = box / "result.json", box / "watchdog.txt"
    sources = [_PRELUDE] + [source for _, source in cells] + [_grading_source(exercise, call_timeout, result_path,
                                                                              note_path)]
    run = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in sources],
                                   metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                            "language": "python"}})
    prelude, *learner_cells, grading_cell = run.cells
    running = []  # index into run.cells of the cell being executed, to say where a timeout or crash happened

    def where():
        if running and 1 <= running[-1] <= len(cells):
            return f" (in cell {cells[running[-1] - 1][0]})"
        return " (while checking your answer)"

    def timeout(cell):  # nbclient enforces these from this process: the kernel cannot stop them
        if cell is grading_cell:
            return budget
        return cell_timeout if any(cell is learner_cell for learner_cell in learner_cells) else check_timeout

    # The whole notebook's wall clock, enforced from here by killing its sandbox: whatever the kernel does with
    # signals, timers or the GIL, and even if the kernel stops answering nbclient.
    deadline_s = check_timeout + budget + len(cells) * cell_timeout + 30
    km = sandbox.SandboxedKernelManager(box, cpu_seconds=deadline_s * max(2, os.cpu_count() or 1)) if use_sandbox \
        else None
    client = NotebookClient(run, km=km, kernel_name="python3", allow_errors=True, timeout_func=timeout,
                            shutdown_kernel="immediate",
                            resources={"metadata": {"path": str(box if use_sandbox else path.parent.resolve())}},
                            on_cell_execute=lambda cell, cell_index: running.append(cell_index))
    expired = threading.Event()

    def kill():
        expired.set()
        _kill(client)

    killer = threading.Timer(deadline_s, kill)
    killer.daemon = True
    killer.start()
    outcome = None
    try:
        # the kernel's own stdout/stderr (ZMQ and debugger warnings) would land in the grader's console
        client.execute(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except CellTimeoutError:
        if running[-1] == len(run.cells) - 1:
            limit = "the grader's --check-timeout" if budget == check_timeout else "this exercise's budget"
            outcome = False, (f"checking your answer ran longer than {limit} of {budget:g} s: a call of "
                              f"`{exercise.candidate}` ran on past its {call_timeout:g} s limit (one long computation "
                              f"that cannot be interrupted?) or every call is slow")
        else:
            limit = cell_timeout if 1 <= running[-1] <= len(cells) else check_timeout
            outcome = False, f"a cell ran longer than {limit:g} s (an infinite loop?){where()}"
    except DeadKernelError:
        outcome = "dead"
    except Exception as error:  # a kernel that cannot start, ...
        outcome = False, f"the notebook could not be run: {type(error).__name__}: {error}"
    finally:
        killer.cancel()
        gone = _kill(client)  # nothing of the notebook runs past this line
    if not gone:
        return False, "the notebook's sandbox could not be ended: not graded"
    if expired.is_set():
        return False, f"the notebook ran longer than its {deadline_s:g} s in all{where()}"
    if outcome == "dead":
        if note_path.is_file():  # the in-kernel watchdog's note: only ever a reason to score 0
            return False, _read_limited(note_path, 4096).decode("utf-8", "replace")
        return False, (f"the kernel died (the notebook crashed Python, or ran into a limit of the sandbox: "
                       f"{sandbox.ADDRESS_SPACE // 2 ** 30} GiB of address space, {sandbox.FILE_SIZE // 2 ** 20} MiB "
                       f"per file, CPU time){where()}")
    if outcome is not None:
        return outcome
    if not result_path.is_file():
        grader_error = _first_error([("of the grader's prelude", prelude), ("of the grader", grading_cell)])
        if grader_error:
            return False, f"the check did not report a result: {grader_error}"
        error = _first_error(zip((number for number, _ in cells), learner_cells))
        return False, _naming_the_limit(f"`{exercise.candidate}` is not defined after running the notebook"
                                        + (f": {error}" if error else ""))
    try:
        data = read_result(result_path)
    except (OSError, ValueError) as error:
        return False, f"the answer's run sent back data the grader cannot read ({error})"
    try:
        checks.judge(exercise.check, data, notebook=True)
    except checks.ExerciseFailed as failure:
        return False, _naming_the_limit(str(failure))
    except Exception as error:  # data that does not have the shape the judge expects
        return False, f"the answer's run sent back data the grader cannot read ({type(error).__name__}: {error})"
    return True, ""


def _kill(client):
    """End the notebook's kernel and, in the sandbox, every process it started; True when all are gone."""
    km = client.km
    if km is None:
        return True
    try:
        if isinstance(km, sandbox.SandboxedKernelManager):
            gone = km.kill_sandbox()
        else:
            process = getattr(getattr(km, "provisioner", None), "process", None)
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(10)
            gone = True
        if client.kc is not None:
            client.kc.stop_channels()
        # the manager's control socket: left open, it would hold up this process's exit (ZMQ's linger)
        run_sync(km.cleanup_resources)()
        atexit.unregister(client._cleanup_kernel)
        return gone
    except Exception:  # noqa: BLE001 - the kernel is being torn down; a half-closed channel is no reason to stop
        return True


def _strict_pairs(pairs):
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("a key appears twice in an object")
    return dict(pairs)


def _plain(value, depth=0):
    """True when value is made of exact JSON types only, at most 40 deep."""
    if depth > 40:
        return False
    kind = type(value)
    if kind in (str, int, float, bool) or value is None:
        return True
    if kind is list:
        return all(_plain(item, depth + 1) for item in value)
    if kind is dict:
        return all(type(key) is str and _plain(item, depth + 1) for key, item in value.items())
    return False


def read_result(path):
    """The check's result file, parsed as strict JSON: one object {"records": [...], "origin": [str, ...]} of
    plain types, no duplicate keys, at most MAX_RESULT_BYTES. Raises ValueError otherwise."""
    text = _read_limited(path, MAX_RESULT_BYTES).decode("utf-8")
    data = json.loads(text, object_pairs_hook=_strict_pairs)  # NaN and Infinity stay: a loss may be inf
    if type(data) is not dict or set(data) != {"records", "origin"} or type(data["records"]) is not list \
            or type(data["origin"]) is not list or not all(type(item) is str for item in data["origin"]) \
            or not _plain(data):
        raise ValueError("not the object the check writes")
    return data


def stage(notebooks, folder):
    """Copy every notebook into `folder` (before any kernel starts); {original path: copy} (None: unreadable)."""
    copies = {}
    for number, path in enumerate(notebooks):
        target = Path(folder) / f"{number:05d}" / Path(path).name
        target.parent.mkdir()
        try:
            target.write_bytes(_read_limited(path, MAX_NOTEBOOK_BYTES))
            copies[path] = target
        except (OSError, ValueError):
            copies[path] = None
    return copies


def grade_paths(paths, *, jobs=1, on_graded=None, **options):
    """Grade every notebook under `paths`, `jobs` kernels at a time; Grades in the order of find_notebooks.
    Every notebook is copied before the first kernel starts, and the copies are graded.
    `on_graded(grade)`, if given, is called as each notebook finishes (from the grading thread)."""
    notebooks = find_notebooks(paths)
    with tempfile.TemporaryDirectory(prefix="grade-submissions-", ignore_cleanup_errors=True) as staging:
        copies = stage(notebooks, staging)

        def one(path):
            try:
                if copies[path] is None:
                    graded = Grade(str(path), Path(path).parent.name or ".", getattr(_from_file_name(path), "slug", "?"),
                                   0, "cannot read the notebook (unreadable, or too large)", 0.0)
                else:
                    graded = grade_notebook(path, copy=copies[path], **options)
            except Exception as error:  # noqa: BLE001 - one submission's failure is that submission's alone
                graded = Grade(str(path), Path(path).parent.name or ".", "?", 0,
                               f"the grader failed on this notebook: {type(error).__name__}: {error}", 0.0)
            if on_graded is not None:
                on_graded(graded)
            return graded

        if jobs <= 1:
            return [one(path) for path in notebooks]
        with ThreadPoolExecutor(jobs) as pool:  # the work happens in the kernels; threads only wait on them
            return list(pool.map(one, notebooks))


def _file(grade):
    return Path(grade.notebook).name


def progress_printer(total, file=None):
    """An on_graded for grade_paths: prints ``[done/total] learner/file: exercise, score S, T s`` per notebook."""
    lock, done = threading.Lock(), [0]

    def report(grade):
        with lock:
            done[0] += 1
            print(f"[{done[0]}/{total}] {grade.learner}/{_file(grade)}: {grade.exercise}, score {grade.score}, "
                  f"{grade.seconds:.1f} s", file=file or sys.stderr, flush=True)

    return report


def _csv_text(rows):
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _write(grades, out):
    """Write grades.csv and grades.json to `out`, each atomically (a temporary file in `out`, then renamed over
    the old one); returns {file name: SHA-256 of the bytes written}."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [asdict(grade) for grade in grades]
    totals = {}
    for grade in grades:
        totals[grade.learner] = totals.get(grade.learner, 0) + grade.score
    contents = {"grades.csv": _csv_text(rows).encode("utf-8"),
                "grades.json": (json.dumps({"grades": rows, "totals": totals}, indent=1) + "\n").encode("utf-8")}
    digests = {}
    for name, data in contents.items():
        file, temporary = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
        try:
            os.chmod(temporary, 0o644)  # mkstemp makes it 0600; the grades are the instructor's to share
            with os.fdopen(file, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, out / name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        digests[name] = hashlib.sha256(data).hexdigest()
    return digests


def _table(grades, width=90):
    header = ("learner", "file", "exercise", "score", "reason")
    rows = [tuple(_one_line(cell) for cell in (g.learner, _file(g), g.exercise, str(g.score), g.reason or "passed"))
            for g in grades]
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(4)]
    lines = []
    for row in [header] + rows:
        reason = row[4] if len(row[4]) <= width else row[4][:width - 3] + "..."
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + reason)
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m exercises.grade", description=__doc__.split("\n\n")[0],
                                     epilog="exit status: 0 all passed, 1 some scored 0, 2 usage error, no sandbox, "
                                            "or grades not written")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="a notebook or a folder of notebooks")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for grades.csv and grades.json")
    parser.add_argument("--cell-timeout", type=float, default=CELL_TIMEOUT_S,
                        help=f"seconds each notebook cell may run (default {CELL_TIMEOUT_S:g})")
    parser.add_argument("--call-timeout", type=float, default=CALL_TIMEOUT_S,
                        help=f"seconds each call of the candidate may run inside the check "
                             f"(default {CALL_TIMEOUT_S:g})")
    parser.add_argument("--check-timeout", type=float, default=CHECK_TIMEOUT_S,
                        help=f"seconds for the grader's own cells: importing torch, and at most this for the whole "
                             f"check, whatever the exercise's budget (default {CHECK_TIMEOUT_S:g})")
    parser.add_argument("--budget-scale", type=float, default=BUDGET_SCALE, metavar="FACTOR",
                        help="multiplies every exercise's budget for its check cell (exercises/catalog.py: "
                             f"check_budget_s, by default {CHECK_BUDGET_S:g} s): above 1 for a slow machine "
                             f"(default {BUDGET_SCALE:g})")
    parser.add_argument("--jobs", type=int, default=1, help="notebooks graded at once (default 1)")
    parser.add_argument("--no-sandbox", action="store_true",
                        help="run the kernels without the OS sandbox (bubblewrap): NOT safe for credit; for a machine "
                             "without it, with notebooks you trust")
    args = parser.parse_args(argv)
    logging.getLogger("traitlets").setLevel(logging.ERROR)  # kernel-start chatter would break up the table
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # "Task was destroyed" when a sandboxed kernel is killed
    if min(args.cell_timeout, args.call_timeout, args.check_timeout, args.budget_scale) <= 0 or args.jobs < 1:
        parser.error("the timeouts and --budget-scale must be positive, --jobs at least 1")
    try:
        notebooks = find_notebooks(args.paths)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not notebooks:
        print("error: no notebook found in " + ", ".join(args.paths), file=sys.stderr)
        return 2
    if args.no_sandbox:
        print(NO_SANDBOX_WARNING, file=sys.stderr, flush=True)
    else:
        why = sandbox.problem()
        if why:
            print(f"error: cannot grade: the OS sandbox cannot run here: {why}. Install bubblewrap on Linux, or "
                  f"pass --no-sandbox to grade anyway, unsafely (not for credit)", file=sys.stderr)
            return 2
    print(f"grading {len(notebooks)} notebook(s) ...", file=sys.stderr, flush=True)
    grades = grade_paths(notebooks, jobs=args.jobs, on_graded=progress_printer(len(notebooks)),
                         cell_timeout=args.cell_timeout, call_timeout=args.call_timeout,
                         check_timeout=args.check_timeout, budget_scale=args.budget_scale,
                         use_sandbox=not args.no_sandbox)
    try:
        digests = _write(grades, args.out)  # every sandbox has ended: grade_paths waited for each
    except OSError as error:
        print(f"error: cannot write the grades to {args.out}: {error}", file=sys.stderr)
        return 2
    print(_table(grades))
    print(f"\n{sum(g.score for g in grades)}/{len(grades)} passed; wrote {args.out / 'grades.csv'} and "
          f"{args.out / 'grades.json'}")
    for name, digest in digests.items():
        print(f"sha256 {digest}  {name}")
    if args.no_sandbox:
        print(NO_SANDBOX_WARNING)
    return 0 if all(g.score for g in grades) else 1


if __name__ == "__main__":
    raise SystemExit(main())

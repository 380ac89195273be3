"""Grade learners' exercise notebooks: ``python -m exercises.grade PATH... [--out DIR]``.

Each PATH is a notebook or a folder, searched recursively for ``*.ipynb``. Every notebook is
matched to its exercise (its ``metadata["exercise"]["slug"]``, else its file name ``NN-slug``,
else the function or class it defines, see exercises/catalog.py). Then:

1. its answer cells (the code cells up to the one that defines the candidate, without the
   learner's own check cells) are read here: an answer that uses what the exercise rebuilds,
   the checker or the solutions, or that patches a module, is refused (exercises/integrity.py);
2. they run in a fresh Jupyter kernel, followed by a cell that calls the candidate on the
   check's inputs and writes back only plain data (exercises.checks.run_to_file);
3. this process, which imported the references itself, judges that data
   (exercises.checks.judge). Nothing the notebook does inside its kernel can change the verdict.

A candidate that loops forever, crashes or kills the kernel costs only its own notebook: it
scores 0 with the reason, and the others are still graded. A call that outlives its time limit
is interrupted; one that keeps running (a bare `except:` around a loop) ends its kernel.

Scores: 1 when the check passes, 0 otherwise. While it grades, the grader prints a line on stderr
as each notebook finishes (``[3/12] alice/04-cosine-schedule.ipynb: cosine-schedule, score 1, 2.3 s``);
then a table on stdout (learner = the folder holding the notebook, file = the notebook's file name)
and writes ``grades.csv`` and ``grades.json`` to ``--out`` (default: the current folder). The checks'
messages say what is wrong; they never show the reference code.

Exit status: 0 when every notebook passed, 1 when at least one scored 0, 2 on a usage error
(a PATH that does not exist, or no notebook found).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellTimeoutError, DeadKernelError

from exercises import checks
from exercises.catalog import BY_SLUG, EXERCISES
from exercises.integrity import scan

__all__ = ["Grade", "answer_cells", "find_notebooks", "identify", "grade_notebook", "grade_paths", "progress_printer",
           "main"]

CELL_TIMEOUT_S = 120.0   # per learner cell
CALL_TIMEOUT_S = 20.0    # per call of the candidate inside the check (exercises.checks.TIME_LIMIT_S)
CHECK_TIMEOUT_S = 600.0  # for the grader's own cells, importing torch and running every case: a backstop


@dataclass
class Grade:
    notebook: str     # path as given/found
    learner: str      # the folder that holds the notebook
    exercise: str     # slug, or "?" when the notebook matches no exercise
    score: int        # 1 or 0
    reason: str       # "" when passed, else what went wrong
    seconds: float


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


def answer_cells(notebook, exercise):
    """(cell number, source) of the code cells up to the last one that defines the candidate, without
    the learner's own check cells (a cell that defines the candidate stays); None when none defines it."""
    code = [(number, cell) for number, cell in enumerate(notebook.cells, start=1) if cell.cell_type == "code"]
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


def _first_error(cells):
    for index, cell in cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return f"cell {index} raised {output['ename']}: {output['evalue']}"
    return None


def grade_notebook(path, *, cell_timeout=CELL_TIMEOUT_S, call_timeout=CALL_TIMEOUT_S,
                   check_timeout=CHECK_TIMEOUT_S, learner=None):
    """Read, run and judge one learner notebook; returns a Grade."""
    path = Path(path)
    started = time.monotonic()
    learner = learner if learner is not None else path.parent.name or "."

    def result(exercise, passed, reason):
        return Grade(str(path), learner, exercise.slug if exercise else "?", int(passed), reason,
                     round(time.monotonic() - started, 2))

    try:
        notebook = nbformat.read(path, as_version=4)
    except Exception as error:  # not JSON, not a notebook, unreadable
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
    with tempfile.TemporaryDirectory(prefix="grade-") as scratch:
        passed, reason = _run_and_judge(path, exercise, cells, Path(scratch), cell_timeout, call_timeout,
                                        check_timeout)
    return result(exercise, passed, reason)


def _run_and_judge(path, exercise, cells, scratch, cell_timeout, call_timeout, check_timeout):
    """(passed, reason): run the answer cells and the grading cell in a fresh kernel, judge what comes back."""
    result_path, note_path = scratch / "result.json", scratch / "watchdog.txt"
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

    def timeout(cell):
        return cell_timeout if any(cell is learner_cell for learner_cell in learner_cells) else check_timeout

    client = NotebookClient(run, kernel_name="python3", allow_errors=True, timeout_func=timeout,
                            resources={"metadata": {"path": str(path.parent.resolve())}},
                            on_cell_execute=lambda cell, cell_index: running.append(cell_index))
    try:
        # the kernel's own stdout/stderr (ZMQ and debugger warnings) would land in the grader's console
        client.execute(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except CellTimeoutError:
        limit = cell_timeout if 1 <= running[-1] <= len(cells) else check_timeout
        return False, f"a cell ran longer than {limit:g} s (an infinite loop?){where()}"
    except DeadKernelError:
        if note_path.exists():
            return False, note_path.read_text(encoding="utf-8")
        return False, f"the kernel died (the notebook crashed Python or ran out of memory){where()}"
    except Exception as error:  # a kernel that cannot start, ...
        return False, f"the notebook could not be run: {type(error).__name__}: {error}"
    if not result_path.exists():
        grader_error = _first_error([("of the grader's prelude", prelude), ("of the grader", grading_cell)])
        if grader_error:
            return False, f"the check did not report a result: {grader_error}"
        error = _first_error(zip((number for number, _ in cells), learner_cells))
        return False, f"`{exercise.candidate}` is not defined after running the notebook" + (f": {error}" if error
                                                                                           else "")
    try:
        data = json.loads(result_path.read_text(encoding="utf-8"))
        checks.judge(exercise.check, data, notebook=True)
    except checks.ExerciseFailed as failure:
        return False, str(failure)
    except Exception as error:  # data that does not have the shape the judge expects
        return False, f"the answer's run sent back data the grader cannot read ({type(error).__name__}: {error})"
    return True, ""


def grade_paths(paths, *, jobs=1, on_graded=None, **options):
    """Grade every notebook under `paths`, `jobs` kernels at a time; Grades in the order of find_notebooks.
    `on_graded(grade)`, if given, is called as each notebook finishes (from the grading thread)."""
    notebooks = find_notebooks(paths)

    def one(path):
        graded = grade_notebook(path, **options)
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


def _write(grades, out):
    out.mkdir(parents=True, exist_ok=True)
    rows = [asdict(grade) for grade in grades]
    with open(out / "grades.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    totals = {}
    for grade in grades:
        totals[grade.learner] = totals.get(grade.learner, 0) + grade.score
    (out / "grades.json").write_text(json.dumps({"grades": rows, "totals": totals}, indent=1) + "\n",
                                     encoding="utf-8")


def _table(grades, width=90):
    header = ("learner", "file", "exercise", "score", "reason")
    rows = [(g.learner, _file(g), g.exercise, str(g.score), g.reason or "passed") for g in grades]
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(4)]
    lines = []
    for row in [header] + rows:
        reason = row[4] if len(row[4]) <= width else row[4][:width - 3] + "..."
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + reason)
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m exercises.grade", description=__doc__.split("\n\n")[0],
                                     epilog="exit status: 0 all passed, 1 some scored 0, 2 usage error")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="a notebook or a folder of notebooks")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for grades.csv and grades.json")
    parser.add_argument("--cell-timeout", type=float, default=CELL_TIMEOUT_S,
                        help=f"seconds each notebook cell may run (default {CELL_TIMEOUT_S:g})")
    parser.add_argument("--call-timeout", type=float, default=CALL_TIMEOUT_S,
                        help=f"seconds each call of the candidate may run inside the check "
                             f"(default {CALL_TIMEOUT_S:g})")
    parser.add_argument("--check-timeout", type=float, default=CHECK_TIMEOUT_S,
                        help=f"seconds for the grader's own cells: importing torch, then the whole check "
                             f"(default {CHECK_TIMEOUT_S:g})")
    parser.add_argument("--jobs", type=int, default=1, help="notebooks graded at once (default 1)")
    args = parser.parse_args(argv)
    logging.getLogger("traitlets").setLevel(logging.ERROR)  # kernel-start chatter would break up the table
    if min(args.cell_timeout, args.call_timeout, args.check_timeout) <= 0 or args.jobs < 1:
        parser.error("the timeouts must be positive, --jobs at least 1")
    try:
        notebooks = find_notebooks(args.paths)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not notebooks:
        print("error: no notebook found in " + ", ".join(args.paths), file=sys.stderr)
        return 2
    print(f"grading {len(notebooks)} notebook(s) ...", file=sys.stderr, flush=True)
    grades = grade_paths(notebooks, jobs=args.jobs, on_graded=progress_printer(len(notebooks)),
                         cell_timeout=args.cell_timeout, call_timeout=args.call_timeout,
                         check_timeout=args.check_timeout)
    _write(grades, args.out)
    print(_table(grades))
    print(f"\n{sum(g.score for g in grades)}/{len(grades)} passed; wrote {args.out / 'grades.csv'} and "
          f"{args.out / 'grades.json'}")
    return 0 if all(g.score for g in grades) else 1


if __name__ == "__main__":
    raise SystemExit(main())

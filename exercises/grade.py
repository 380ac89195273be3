"""Grade learners' exercise notebooks: ``python -m exercises.grade PATH... [--out DIR]``.

Each PATH is a notebook or a folder, searched recursively for ``*.ipynb``. Every notebook is
matched to its exercise (its ``metadata["exercise"]["slug"]``, else its file name ``NN-slug``,
else the function or class it defines, see exercises/catalog.py), then run in a fresh Jupyter
kernel: its code cells up to the one that defines the candidate (the learner's own check cell
and what follows it are left out), then a grading cell that calls the exercise's check on the
candidate inside that kernel. A candidate that loops forever, crashes or kills the kernel costs
only its own notebook: it scores 0 with the reason, and the others are still graded.

Scores: 1 when the check passes, 0 otherwise. The grader prints a table (learner = the folder
holding the notebook) and writes ``grades.csv`` and ``grades.json`` to ``--out`` (default: the
current folder). The checks' messages say what is wrong; they never show the reference code.

Exit status: 0 when every notebook passed, 1 when at least one scored 0, 2 on a usage error
(a PATH that does not exist, or no notebook found).
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import secrets
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellTimeoutError, DeadKernelError

from exercises.catalog import BY_SLUG, EXERCISES

__all__ = ["Grade", "answer_cells", "find_notebooks", "identify", "grade_notebook", "grade_paths", "main"]

CELL_TIMEOUT_S = 120.0   # per learner cell
CALL_TIMEOUT_S = 20.0    # per call of the candidate inside the check (exercises.checks.TIME_LIMIT_S)
CHECK_TIMEOUT_S = 600.0  # for the grader's own cells: importing torch, then the whole check


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


def identify(notebook, path):
    """The Exercise a notebook is for, or None."""
    slug = notebook.get("metadata", {}).get("exercise", {}).get("slug")
    if slug in BY_SLUG:
        return BY_SLUG[slug]
    match = re.match(r"\d+-(.+)", Path(path).stem)
    if match and match.group(1) in BY_SLUG:
        return BY_SLUG[match.group(1)]
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
# CHECK_TIMEOUT_S, so that --cell-timeout can stay short. Only the check's message leaves the kernel.
_PRELUDE = "from exercises import checks as _grader_checks"


def _grading_source(exercise, marker, call_timeout):
    return f"""\
import json as _grader_json
_grader_checks.TIME_LIMIT_S = {call_timeout!r}
if {exercise.candidate!r} not in globals():
    _grader_result = (False, "`{exercise.candidate}` is not defined after running the notebook")
else:
    try:
        _grader_checks.{exercise.check}({exercise.candidate})
        _grader_result = (True, "")
    except _grader_checks.ExerciseFailed as _grader_error:
        _grader_result = (False, str(_grader_error))
    except BaseException as _grader_error:
        _grader_result = (False, f"the check stopped with {{type(_grader_error).__name__}}: {{_grader_error}}")
print({marker!r} + _grader_json.dumps(_grader_result))
"""


def _first_error(cells):
    for index, cell in cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return f"cell {index} raised {output['ename']}: {output['evalue']}"
    return None


def grade_notebook(path, *, cell_timeout=CELL_TIMEOUT_S, call_timeout=CALL_TIMEOUT_S,
                   check_timeout=CHECK_TIMEOUT_S, learner=None):
    """Run one learner notebook in a fresh kernel and check its candidate; returns a Grade."""
    path = Path(path)
    started = time.monotonic()
    learner = learner if learner is not None else path.parent.name or "."

    def result(exercise, passed, reason):
        return Grade(str(path), learner, exercise.slug if exercise else "?", int(passed), reason,
                     round(time.monotonic() - started, 2))

    try:
        notebook = nbformat.read(path, as_version=4)
    except Exception as error:  # not JSON, not a notebook, unreadable
        return result(None, False, f"cannot read the notebook: {type(error).__name__}: {error}")
    exercise = identify(notebook, path)
    if exercise is None:
        return result(None, False, "cannot tell which exercise this notebook is (no exercise metadata, no "
                                   "NN-name file name, no answer function found)")
    cells = answer_cells(notebook, exercise)
    if cells is None:
        return result(exercise, False, f"no cell defines `{exercise.candidate}`: the answer cell is missing "
                                       f"or renamed")
    marker = f"GRADE-{secrets.token_hex(8)}:"  # a learner's print cannot forge a result line
    sources = [_PRELUDE] + [source for _, source in cells] + [_grading_source(exercise, marker, call_timeout)]
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
        client.execute()
    except CellTimeoutError:
        limit = cell_timeout if 1 <= running[-1] <= len(cells) else check_timeout
        return result(exercise, False, f"a cell ran longer than {limit:g} s (an infinite loop?){where()}")
    except DeadKernelError:
        return result(exercise, False, f"the kernel died (the notebook crashed Python or ran out of memory)"
                                       f"{where()}")
    except Exception as error:  # a kernel that cannot start, ...
        return result(exercise, False, f"the notebook could not be run: {type(error).__name__}: {error}")
    for output in grading_cell.get("outputs", []):
        for line in output.get("text", "").splitlines():
            if line.startswith(marker):
                passed, reason = json.loads(line[len(marker):])
                error = _first_error(zip((number for number, _ in cells), learner_cells))
                if not passed and error and "is not defined" in reason:
                    reason = f"{reason}: {error}"
                return result(exercise, passed, reason)
    error = _first_error([("of the grader's prelude", prelude), ("of the grader", grading_cell)])
    return result(exercise, False, "the check did not report a result: " + (error or "no output"))


def grade_paths(paths, *, jobs=1, **options):
    """Grade every notebook under `paths`, `jobs` kernels at a time; Grades in the order of find_notebooks."""
    notebooks = find_notebooks(paths)
    if jobs <= 1:
        return [grade_notebook(path, **options) for path in notebooks]
    with ThreadPoolExecutor(jobs) as pool:  # the work happens in the kernels; threads only wait on them
        return list(pool.map(lambda path: grade_notebook(path, **options), notebooks))


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
    header = ("learner", "exercise", "score", "reason")
    rows = [(g.learner, g.exercise, str(g.score), g.reason or "passed") for g in grades]
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(3)]
    lines = []
    for row in [header] + rows:
        reason = row[3] if len(row[3]) <= width else row[3][:width - 3] + "..."
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + reason)
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
    grades = grade_paths(notebooks, jobs=args.jobs, cell_timeout=args.cell_timeout,
                         call_timeout=args.call_timeout, check_timeout=args.check_timeout)
    _write(grades, args.out)
    print(_table(grades))
    print(f"\n{sum(g.score for g in grades)}/{len(grades)} passed; wrote {args.out / 'grades.csv'} and "
          f"{args.out / 'grades.json'}")
    return 0 if all(g.score for g in grades) else 1


if __name__ == "__main__":
    raise SystemExit(main())

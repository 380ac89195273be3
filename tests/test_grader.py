"""The grader on a folder of submissions: right, wrong, crashing, hanging and broken notebooks.

One grading run (one fresh kernel per notebook, two at a time) is shared by the tests below;
the timeouts are short so that the hanging submissions cost seconds.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import nbformat
import pytest

from exercises import grade

ROOT = Path(__file__).resolve().parent.parent
CELL_TIMEOUT_S = 3.0   # a learner cell that runs longer is an infinite loop here
CALL_TIMEOUT_S = 1.0   # one call of the candidate inside the check


def submission(folder, name, source, template="solutions/04-cosine-schedule.ipynb"):
    """The template notebook with its answer cell replaced by `source` (None keeps it), saved as folder/name."""
    notebook = nbformat.read(ROOT / template, as_version=4)
    answer = next(cell for cell in notebook.cells if "answer" in cell.metadata.get("tags", []))
    if source is not None:
        answer.source = source
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, folder / name)


WRONG = """\
def cosine_lr(step, max_lr, min_lr, warmup_steps, total_steps):
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
"""

# expected (learner, exercise, score, a fragment of the reason) per notebook
EXPECTED = {
    "alice/04-cosine-schedule.ipynb": ("alice", "cosine-schedule", 1, ""),
    "alice/05-linear-schedule.ipynb": ("alice", "linear-schedule", 1, ""),
    "bob/04-cosine-schedule.ipynb": ("bob", "cosine-schedule", 0, "warmup is off by one"),
    "bob/05-linear-schedule.ipynb": ("bob", "linear-schedule", 0, "cell 5 raised SyntaxError"),
    "carol/04-cosine-schedule.ipynb": ("carol", "cosine-schedule", 0, "the kernel died (the notebook crashed"),
    "carol/05-linear-schedule.ipynb": ("carol", "linear-schedule", 0, "did not finish within 1 s"),
    "dave/04-cosine-schedule.ipynb": ("dave", "cosine-schedule", 0, "a cell ran longer than 3 s (an infinite "
                                                                    "loop?) (in cell 5)"),
    "dave/my-answer.ipynb": ("dave", "linear-schedule", 0, "no cell defines `linear_lr`"),
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Grade a class of four learners through the command line; returns (exit status, output folder, stdout)."""
    root = tmp_path_factory.mktemp("submissions")
    linear = "solutions/05-linear-schedule.ipynb"
    submission(root / "alice", "04-cosine-schedule.ipynb", None)
    submission(root / "alice", "05-linear-schedule.ipynb", None, linear)
    submission(root / "bob", "04-cosine-schedule.ipynb", WRONG)
    submission(root / "bob", "05-linear-schedule.ipynb", "def linear_lr(step, max_lr, min_lr, warmup_steps, "
                                                         "total_steps)\n    return max_lr", linear)
    submission(root / "carol", "04-cosine-schedule.ipynb", "import os\n\ndef cosine_lr(*args):\n    os._exit(1)\n\n"
                                                          "cosine_lr()")
    submission(root / "carol", "05-linear-schedule.ipynb", "def linear_lr(*args):\n    while True:\n        pass",
               linear)
    submission(root / "dave", "04-cosine-schedule.ipynb", "def cosine_lr(*args):\n    return 0.0\n\n"
                                                         "while True:\n    pass")
    # renamed notebook (matched through its metadata) whose answer cell was deleted
    submission(root / "dave", "my-answer.ipynb", "# I ran out of time", linear)
    out = tmp_path_factory.mktemp("grades")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = grade.main([str(root), "--out", str(out), "--jobs", "2", "--cell-timeout", str(CELL_TIMEOUT_S),
                             "--call-timeout", str(CALL_TIMEOUT_S)])
    return status, root, out, stdout.getvalue()


def relative(row, root):
    return Path(row["notebook"]).relative_to(root).as_posix()


@pytest.mark.slow  # shares one grading run: 8 kernels, ~30 s
def test_scores_and_reasons_in_the_csv(graded):
    _, root, out, _ = graded
    with open(out / "grades.csv", newline="", encoding="utf-8") as file:
        rows = {relative(row, root): row for row in csv.DictReader(file)}
    assert set(rows) == set(EXPECTED)
    for name, (learner, exercise, score, reason) in EXPECTED.items():
        row = rows[name]
        assert (row["learner"], row["exercise"], int(row["score"])) == (learner, exercise, score), name
        assert reason in row["reason"], (name, row["reason"])
        assert (row["reason"] == "") == (score == 1)


@pytest.mark.slow  # shares one grading run: 8 kernels, ~30 s
def test_json_has_the_same_grades_and_per_learner_totals(graded):
    _, root, out, _ = graded
    report = json.loads((out / "grades.json").read_text(encoding="utf-8"))
    assert {relative(row, root): row["score"] for row in report["grades"]} == \
        {name: expected[2] for name, expected in EXPECTED.items()}
    assert report["totals"] == {"alice": 2, "bob": 0, "carol": 0, "dave": 0}


@pytest.mark.slow  # shares one grading run: 8 kernels, ~30 s
def test_exit_status_and_printed_table(graded):
    status, _, _, stdout = graded
    assert status == 1  # some submissions scored 0
    assert "2/8 passed" in stdout
    assert "warmup is off by one" in stdout
    assert "return max_lr * step" not in stdout  # never the reference code


def test_usage_errors_exit_with_status_2(tmp_path, capsys):
    assert grade.main([str(tmp_path / "missing.ipynb")]) == 2
    assert grade.main([str(tmp_path)]) == 2  # a folder without notebooks
    assert "no notebook found" in capsys.readouterr().err


def test_every_solution_notebook_is_recognised():
    for path in sorted((ROOT / "solutions").glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        exercise = grade.identify(notebook, path)
        assert exercise is not None and exercise.notebook == path.name
        assert grade.answer_cells(notebook, exercise) is not None


def test_answer_cells_skip_the_check_cell_but_keep_an_answer_that_calls_it():
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# task"),
        nbformat.v4.new_code_cell("import math"),
        nbformat.v4.new_code_cell("def cosine_lr(*args):\n    return 0.0\n\ncheck_cosine_schedule(cosine_lr)"),
        nbformat.v4.new_code_cell("check_cosine_schedule(cosine_lr)"),
        nbformat.v4.new_code_cell("plot(cosine_lr)"),
    ])
    exercise = grade.identify(notebook, "submission.ipynb")
    assert exercise.slug == "cosine-schedule"  # found from the function it defines
    assert [number for number, _ in grade.answer_cells(notebook, exercise)] == [2, 3]

"""The grader on a folder of submissions: right, wrong, crashing, hanging, broken and cheating notebooks.

One grading run of the command line (one fresh kernel per notebook that gets that far, two at a
time) is shared by the tests below; the timeouts are short so that the hanging submissions cost
seconds. Cheats refused by reading the source never start a kernel.
"""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nbformat
import pytest

from exercises import checks, grade
from exercises.catalog import BY_SLUG, CHECK_BUDGET_S
from exercises.integrity import scan

from answers import LR_FINDER_WITH_SWEEP

ROOT = Path(__file__).resolve().parent.parent
CELL_TIMEOUT_S = 3.0   # a learner cell that runs longer is an infinite loop here
CALL_TIMEOUT_S = 1.0   # one call of the candidate inside the check


def submission(folder, name, source, template="solutions/04-cosine-schedule.ipynb", before=None):
    """The template notebook with its answer cell replaced by `source` (None keeps it) and, if given, a code
    cell `before` inserted ahead of it, saved as folder/name."""
    notebook = nbformat.read(ROOT / template, as_version=4)
    index, answer = next((i, cell) for i, cell in enumerate(notebook.cells)
                         if "answer" in cell.metadata.get("tags", []))
    if source is not None:
        answer.source = source
    if before is not None:
        notebook.cells.insert(index, nbformat.v4.new_code_cell(before))
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, folder / name)
    return folder / name


WRONG = """\
def cosine_lr(step, max_lr, min_lr, warmup_steps, total_steps, budget_used):
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
"""
SGD_ADAMW = """\
class AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(group["lr"] * p.grad)
"""
ADAMW_HEAD = """\
class AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
"""
LR_FINDER = "solutions/06-lr-finder.ipynb"
ADAMW = "solutions/02-adamw.ipynb"
CROSS_ENTROPY = "solutions/01-cross-entropy.ipynb"
# An exercise 1 answer is CE_HEAD + the forward's body (indented 4) + CE_TAIL, which makes it a Function's forward.
CE_HEAD = "def forward(ctx, logits, targets):\n"
CE_TAIL = """

class CrossEntropy(torch.autograd.Function):
    forward = staticmethod(forward)

    @staticmethod
    def backward(ctx, grad_output):
        return None, None
"""
WSD = "solutions/05-wsd-schedule.ipynb"

# learner -> (file name, answer source, template, cell before the answer, score, a fragment of the reason)
SUBMISSIONS = {
    "alice": [("04-cosine-schedule.ipynb", None, None, None, 1, ""),
              ("05-wsd-schedule.ipynb", None, WSD, None, 1, "")],
    "bob": [("04-cosine-schedule.ipynb", WRONG, None, None, 0, "warmup is off by one"),
            ("05-wsd-schedule.ipynb", "def wsd_lr(step, max_lr, min_lr, warmup_steps, cooldown_steps, total_steps)\n"
                                         "    return max_lr", WSD, None, 0, "cell 5 raised SyntaxError")],
    "carol": [("04-cosine-schedule.ipynb", "import os\n\ndef cosine_lr(*args):\n    os._exit(1)\n\ncosine_lr()", None,
               None, 0, "the kernel died (the notebook crashed"),
              ("05-wsd-schedule.ipynb", "def wsd_lr(*args):\n    while True:\n        pass", WSD, None, 0,
               "did not finish within 1 s"),
              # swallows every interruption: the watchdog ends the kernel after the limit and its grace
              ("04-cosine-schedule-again.ipynb", "def cosine_lr(*args):\n    while True:\n        try:\n"
               "            while True:\n                pass\n        except:\n            pass", None, None, 0,
               "cosine_lr did not finish within 1 s and kept running after it was interrupted")],
    "dave": [("04-cosine-schedule.ipynb", "def cosine_lr(*args):\n    return 0.0\n\nwhile True:\n    pass", None,
              None, 0, "a cell ran longer than 3 s (an infinite loop?) (in cell 5)"),
             # renamed notebook (matched through its metadata) whose answer cell was deleted
             ("my-answer.ipynb", "# I ran out of time", WSD, None, 0, "no cell defines `wsd_lr`")],
    # two right answers written unlike the solution: the LRs differ from the formula's in the last bits
    "erin": [("06-lr-finder.ipynb", LR_FINDER_WITH_SWEEP.format(sweep="np.logspace(np.log10(start_lr), "
                                                                 "np.log10(end_lr), num_steps)"),
              LR_FINDER, "import numpy as np", 1, ""),
             ("06-lr-finder-torch.ipynb", LR_FINDER_WITH_SWEEP.format(sweep="torch.logspace(math.log10(start_lr), "
                                                                       "math.log10(end_lr), num_steps)"),
              LR_FINDER, None, 1, "")],
    # the cheats: each refused, with the reason
    "mallory": [
        ("02-adamw.ipynb", SGD_ADAMW, ADAMW, "from exercises import checks as c\nc.check_adamw = lambda f: None",
         0, "refused: the answer uses a change to the module `exercises.checks.check_adamw`"),
        ("05-wsd-schedule.ipynb", "import training\n\ndef wsd_lr(step, max_lr, min_lr, warmup_steps, "
         "cooldown_steps, total_steps):\n    return max_lr\n\ntraining.wsd_lr = lambda step, **settings: settings['max_lr']",
         WSD, None, 0, "a change to the module `training.wsd_lr`"),
        ("04-cosine-schedule.ipynb", WRONG, None, "import json\n_dumps = json.dumps\n"
         "json.dumps = lambda value, **options: _dumps([True, '']) if isinstance(value, (tuple, list)) "
         "else _dumps(value, **options)", 0, "a change to the module `json.dumps`"),
        ("06-lr-finder.ipynb", "from exercises.checks.lr_finder import _diverged_at as reference\n\n"
         "def lr_finder(train_step, **settings):\n    return reference(train_step, **settings)", LR_FINDER, None, 0,
         "`exercises.checks.lr_finder._diverged_at`"),
        ("06-lr-finder-copied.ipynb", "def lr_finder(*args, **kwargs):\n    pass\n\nimport json\n\n"
         "cells = json.load(open('../../solutions/06-lr-finder.ipynb'))['cells']\n"
         "exec(''.join(cells[4]['source']))", LR_FINDER, None, 0, "solutions/06-lr-finder.ipynb"),
        ("01-cross-entropy.ipynb", CE_HEAD + "    return reference(logits, targets)" + CE_TAIL,
         CROSS_ENTROPY, "from training import cross_entropy as reference", 0, "`training.cross_entropy`"),
        ("01-cross-entropy-special.ipynb", CE_HEAD + "    log_p = torch.special.log_softmax(logits, -1)\n"
         "    return -log_p[torch.arange(len(targets)), targets].mean()" + CE_TAIL, CROSS_ENTROPY, None, 0,
         "`torch.special"),
        ("02-adamw-hidden.ipynb", ADAMW_HEAD + "        self.hidden = torch.optim.AdamW(self.param_groups)\n\n"
         "    def step(self, closure=None):\n        self.hidden.step()", ADAMW, None, 0, "`torch.optim.AdamW`"),
        ("02-adamw-step-loop.ipynb", "import training\n\n" + ADAMW_HEAD + "\n    @torch.no_grad()\n"
         "    def step(self, closure=None):\n        for group in self.param_groups:\n"
         "            training.AdamW._step_loop(self, group, [p for p in group['params'] if p.grad is not None])",
         ADAMW, None, 0, "`training.AdamW._step_loop`"),
    ],
}
EXPECTED = {f"{learner}/{name}": (learner, Path(template or "04-cosine-schedule").stem[3:], score, reason)
            for learner, rows in SUBMISSIONS.items() for name, _, template, _, score, reason in rows}
# A file cut off mid-way is reported under the exercise its name names.
EXPECTED["frank/03-clip-grad-norm.ipynb"] = ("frank", "clip-grad-norm", 0, "cannot read the notebook")


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Grade the class through the command line in a subprocess; returns (exit status, root, out, stdout, stderr)."""
    root = tmp_path_factory.mktemp("submissions")
    for learner, rows in SUBMISSIONS.items():
        for name, source, template, before, _, _ in rows:
            submission(root / learner, name, source, template or "solutions/04-cosine-schedule.ipynb", before)
    (root / "frank").mkdir()
    text = (ROOT / "solutions/03-clip-grad-norm.ipynb").read_text(encoding="utf-8")
    (root / "frank" / "03-clip-grad-norm.ipynb").write_text(text[:len(text) // 2], encoding="utf-8")
    out = tmp_path_factory.mktemp("grades")
    completed = subprocess.run(
        [sys.executable, "-m", "exercises.grade", str(root), "--out", str(out), "--jobs", "2",
         "--cell-timeout", str(CELL_TIMEOUT_S), "--call-timeout", str(CALL_TIMEOUT_S)],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    return completed.returncode, root, out, completed.stdout, completed.stderr


def relative(row, root):
    return Path(row["notebook"]).relative_to(root).as_posix()


def rows(root, out):
    with open(out / "grades.csv", newline="", encoding="utf-8") as file:
        return {relative(row, root): row for row in csv.DictReader(file)}


@pytest.mark.slow  # shares one grading run: 10 kernels, about a minute
def test_scores_and_reasons_in_the_csv(graded):
    _, root, out, _, _ = graded
    graded_rows = rows(root, out)
    assert set(graded_rows) == set(EXPECTED)
    for name, (learner, exercise, score, reason) in EXPECTED.items():
        row = graded_rows[name]
        assert (row["learner"], row["exercise"], int(row["score"])) == (learner, exercise, score), (name, row)
        assert reason in row["reason"], (name, row["reason"])
        assert (row["reason"] == "") == (score == 1)


@pytest.mark.slow  # shares one grading run
def test_every_cheat_scores_0_with_the_reason_refused(graded):
    _, root, out, _, _ = graded
    cheats = {name: row for name, row in rows(root, out).items() if name.startswith("mallory/")}
    assert len(cheats) == 9
    assert all(row["score"] == "0" and row["reason"].startswith("refused:") for row in cheats.values()), cheats


@pytest.mark.slow  # shares one grading run
def test_json_has_the_same_grades_and_per_learner_totals(graded):
    _, root, out, _, _ = graded
    report = json.loads((out / "grades.json").read_text(encoding="utf-8"))
    assert {relative(row, root): row["score"] for row in report["grades"]} == \
        {name: expected[2] for name, expected in EXPECTED.items()}
    assert report["totals"] == {"alice": 2, "bob": 0, "carol": 0, "dave": 0, "erin": 2, "frank": 0, "mallory": 0}


@pytest.mark.slow  # shares one grading run
def test_exit_status_and_a_clean_console(graded):
    status, _, _, stdout, stderr = graded
    assert status == 1  # some submissions scored 0
    assert f"4/{len(EXPECTED)} passed" in stdout
    assert "warmup is off by one" in stdout
    assert "return max_lr * step" not in stdout  # never the reference code
    table = stdout.split("\n\n")[0].splitlines()
    assert table[0].split() == ["learner", "file", "exercise", "score", "reason"] and set(table[1]) == {"-"}
    assert len(table) == 2 + len(EXPECTED)  # nothing but the rows, whatever the kernels print
    first, *progress = stderr.strip().splitlines()
    assert first == f"grading {len(EXPECTED)} notebook(s) ..."
    assert len(progress) == len(EXPECTED)  # one line per notebook and nothing else


PROGRESS = re.compile(r"\[(\d+)/(\d+)\] (\S+): (\S+), score ([01]), (\d+\.\d) s")


@pytest.mark.slow  # shares one grading run
def test_a_progress_line_per_notebook_as_it_finishes(graded):
    _, _, _, _, stderr = graded
    lines = [PROGRESS.fullmatch(line) for line in stderr.strip().splitlines()[1:]]
    assert all(lines), stderr
    assert [(int(line[1]), int(line[2])) for line in lines] == [(n, len(EXPECTED)) for n in range(1, len(EXPECTED) + 1)]
    reported = {line[3]: (line[4], int(line[5])) for line in lines}  # learner/file -> (exercise, score)
    assert reported == {name: (exercise, score) for name, (_, exercise, score, _) in EXPECTED.items()}


@pytest.mark.slow  # shares one grading run
def test_the_table_names_each_notebooks_file(graded):
    """Two notebooks of one learner for the same exercise are two rows told apart by their file."""
    _, _, _, stdout, _ = graded
    table = [line.split() for line in stdout.split("\n\n")[0].splitlines()[2:]]
    assert {(row[0], row[1], row[2], row[3]) for row in table} == \
        {(learner, name.split("/")[1], exercise, str(score)) for name, (learner, exercise, score, _) in EXPECTED.items()}
    carol = [row[1] for row in table if row[0] == "carol" and row[2] == "cosine-schedule"]
    assert sorted(carol) == ["04-cosine-schedule-again.ipynb", "04-cosine-schedule.ipynb"]


PATCHES = """\
import json

import training
from exercises import checks

checks.check_cosine_schedule = lambda candidate: None
training.cosine_lr = lambda step, **settings: cosine_lr(step, *settings.values())  # agree with the answer
_dumps = json.dumps
json.dumps = lambda value, **options: _dumps([True, '']) if isinstance(value, (tuple, list)) else _dumps(value, **options)
"""


@pytest.mark.slow  # one kernel
def test_patches_inside_the_kernel_do_not_change_the_verdict(tmp_path):
    """Past the source scan, a notebook that patches the checker, training and json in its kernel gets the
    verdict on its own wrong answer: the judge runs in the grader's process, on plain data."""
    path = submission(tmp_path, "04-cosine-schedule.ipynb", WRONG + "\n\n" + PATCHES)
    notebook = nbformat.read(path, as_version=4)
    exercise = grade.identify(notebook, path)
    assert scan(exercise.slug, [source for _, source in grade.answer_cells(notebook, exercise)])
    passed, reason = grade._run_and_judge(path, exercise, grade.answer_cells(notebook, exercise), tmp_path,
                                          CELL_TIMEOUT_S, CALL_TIMEOUT_S, grade.CHECK_TIMEOUT_S)
    assert not passed and "warmup is off by one" in reason, reason


def test_progress_lines_and_the_file_column_without_kernels(tmp_path, monkeypatch, capsys):
    """A flat folder: every row is labelled with the folder's name; a line per notebook, counted, on stderr."""
    folder = tmp_path / "week1"
    for name in ("04-cosine-schedule.ipynb", "04-cosine-schedule-v2.ipynb", "notes.ipynb"):
        submission(folder, name, None)
    verdicts = {"04-cosine-schedule.ipynb": ("cosine-schedule", 1, ""),
                "04-cosine-schedule-v2.ipynb": ("cosine-schedule", 0, "warmup is off by one"),
                "notes.ipynb": ("?", 0, "cannot tell which exercise this notebook is")}
    monkeypatch.setattr(grade, "grade_notebook", lambda path, **options: grade.Grade(
        str(path), Path(path).parent.name, *verdicts[Path(path).name], seconds=2.0))
    assert grade.main([str(folder), "--out", str(tmp_path / "out"), "--jobs", "2"]) == 1
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert lines[0] == "grading 3 notebook(s) ..."
    assert sorted(line.split("] ", 1)[1] for line in lines[1:]) == [
        "week1/04-cosine-schedule-v2.ipynb: cosine-schedule, score 0, 2.0 s",
        "week1/04-cosine-schedule.ipynb: cosine-schedule, score 1, 2.0 s",
        "week1/notes.ipynb: ?, score 0, 2.0 s"]
    assert sorted(line.split("]")[0] for line in lines[1:]) == ["[1/3", "[2/3", "[3/3"]
    table = out.split("\n\n")[0].splitlines()
    assert table[0].split() == ["learner", "file", "exercise", "score", "reason"]
    assert [row.split()[:4] for row in table[2:]] == [  # the order of find_notebooks
        ["week1", "04-cosine-schedule-v2.ipynb", "cosine-schedule", "0"],
        ["week1", "04-cosine-schedule.ipynb", "cosine-schedule", "1"],
        ["week1", "notes.ipynb", "?", "0"]]
    assert "1/3 passed" in out


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


def test_the_check_budget_is_the_exercises_scaled_at_least_one_call_at_most_check_timeout():
    cosine = BY_SLUG["cosine-schedule"]
    assert grade.check_budget(cosine) == CHECK_BUDGET_S
    assert grade.check_budget(replace(cosine, check_budget_s=300.0), budget_scale=2) == 600.0
    assert grade.check_budget(cosine, budget_scale=0.01, call_timeout=5) == 5 + checks.GRACE_S
    assert grade.check_budget(replace(cosine, check_budget_s=900.0), check_timeout=400) == 400

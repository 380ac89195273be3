"""Hostile notebooks against the grader's sandbox (exercises/sandbox.py), its dispatcher bans and its outputs.

One grading run of the command line over a class of cheats, saboteurs and two honest learners is shared by
the tests below: every cheat scores 0 with its reason, the honest notebooks score 1, and what the saboteurs
tried (the network, the submissions folder, --out, solutions/, forged table rows) left no trace. A second,
short run (LIMITS) meets the sandbox's limits: a kernel that its own time limits cannot stop, a fork bomb and a
memory hog. The runs are skipped where bubblewrap cannot run (the grader refuses there).
"""
from __future__ import annotations

import csv
import hashlib
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest

from exercises import grade, sandbox

from test_grader import CE_HEAD, CE_TAIL, CROSS_ENTROPY, WRONG, submission

ROOT = Path(__file__).resolve().parent.parent
COSINE = "solutions/04-cosine-schedule.ipynb"
CHECK_TIMEOUT_S = 30.0  # an upper bound on each check cell

pytestmark = pytest.mark.skipif(sandbox.problem() is not None, reason=f"no sandbox here: {sandbox.problem()}")

RIGHT_COSINE = nbformat.read(ROOT / COSINE, as_version=4)
RIGHT_COSINE = next(cell.source for cell in RIGHT_COSINE.cells if "answer" in cell.metadata.get("tags", []))

# What a saboteur tries from inside its kernel; {OUT}, {VICTIM}, {PORT} are filled in by the fixture. Each attempt
# that works makes the answer wrong, so a sandbox that leaks shows up as a score (and the side effects are also
# checked from outside). Paths are built from pieces, so that the source scan is not what stops them.
ESCAPES = """\
import os
import socket

escaped = []
try:
    socket.create_connection(("127.0.0.1", {PORT}), timeout=2).close()
    escaped.append("network")
except OSError:
    pass
# Writes outside its box: where they seem to work they land in the sandbox's own /tmp, gone with it (checked
# from outside: the victim's notebook, the submissions folder and --out are untouched).
for target in ({OUT!r} + "/grades.csv", {VICTIM_STEM!r} + ".ipy" + "nb", {SUBMISSIONS!r} + "/planted.txt"):
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w") as file:
            file.write("forged")
    except OSError:
        pass
try:
    os.makedirs({OUT!r} + "/grades.json/x")
except OSError:
    pass
try:
    open({ROOT!r} + "/solu" + "tions/04-cosine-schedule.ipy" + "nb").read()
    escaped.append("solutions")
except OSError:
    pass
print("mallory  forged.ipy" + "nb  cosine-schedule  1  passed")  # a forged table row, on the kernel's stdout
"""
ESCAPED_MAKES_IT_WRONG = "\nif escaped:\n    del cosine_lr\n"

# learner -> (file name, answer source, template, cell before the answer, score, a fragment of the reason)
HOSTILE = {
    "honest": [("04-cosine-schedule.ipynb", None, COSINE, None, 1, ""),
               ("01-cross-entropy.ipynb", None, CROSS_ENTROPY, None, 1, ""),
               # its check forks two processes that talk gloo over the sandbox's own loopback
               ("13-gradient-all-reduce.ipynb", None, "solutions/13-gradient-all-reduce.ipynb", None, 1, "")],
    # (b) banned functions reached around the ban list, stopped where they run
    "aten": [("01-cross-entropy.ipynb", CE_HEAD + "    log_p = torch.ops.aten._log_softmax(logits, -1, False)\n"
              "    return -log_p[torch.arange(len(targets)), targets].mean()" + CE_TAIL, CROSS_ENTROPY, None, 0,
              "refused: your code called `torch.ops.aten._log_softmax`"),
             ("01-cross-entropy-nll.ipynb", CE_HEAD + "    m = logits.max(-1, keepdim=True).values\n"
              "    log_p = logits - m - (logits - m).exp().sum(-1, keepdim=True).log()\n"
              "    return torch.ops.aten.nll_loss_forward(log_p, targets, None, 1, -100)[0]" + CE_TAIL, CROSS_ENTROPY,
              None, 0,
              "refused: your code called `torch.ops.aten.nll_loss_forward`")],
    # (a) honest in its own check cell (a full environment), a cheat under the grader (a cleared one)
    "two-faced": [("01-cross-entropy.ipynb", "import os\n\n" + CE_HEAD +
                   "    if os.environ.get('HOME') == os.getcwd():  # under the grader: its box is both\n"
                   "        return getattr(torch.ops.aten, 'log' + 'sumexp')(logits, [-1]).mean() - "
                   "logits[torch.arange(len(targets)), targets].mean()\n"
                   "    m = logits.max(-1, keepdim=True).values\n"
                   "    lse = m.squeeze(-1) + (logits - m).exp().sum(-1).log()\n"
                   "    return (lse - logits[torch.arange(len(targets)), targets]).mean()" + CE_TAIL, CROSS_ENTROPY, None, 0,
                   "refused: your code called `torch.ops.aten.logsumexp`")],
    "copied-code": [("01-cross-entropy.ipynb", "import types\nimport m07_training.losses as l\n\n"
                     "forward = types.FunctionType(l.cross_entropy.__code__, {'torch': torch})\n" + CE_TAIL, CROSS_ENTROPY, None, 0, "`types.FunctionType`")],
    "child": [("04-cosine-schedule.ipynb", "import subprocess, sys\n\ndef cosine_lr(*args):\n"
               "    return float(subprocess.run([sys.executable, '-c', 'import training; print(training.cosine_lr(' "
               "+ repr(args) + '))'], capture_output=True).stdout)", COSINE, None, 0, "`subprocess`")],
    "run-cell": [("04-cosine-schedule.ipynb", "def cosine_lr(*args):\n    pass\n\n"
                  "get_ipython().run_cell(open('../sol' + 'utions/04-cosine-schedule.ipy' + 'nb').read())", COSINE, None,
                  0, "`get_ipython`")],
    "private": [("04-cosine-schedule.ipynb", "import training\n\ndef cosine_lr(*args):\n"
                 "    return training._schedules.cosine_lr(*args)", COSINE, None, 0, "private helpers")],
    # (a) the kernel-side half: its runner, tables and guard reached through the interpreter
    "runner": [("04-cosine-schedule.ipynb", WRONG + "\nimport gc\nfor o in gc.get_objects():\n    pass", COSINE, None, 0,
                "`gc`"),
               ("05-wsd-schedule.ipynb", "import sys\nsys.modules['exer' + 'cises.checks'].TIME_LIMIT_S = 1e9\n\n"
                "def wsd_lr(*args):\n    return 0.0", "solutions/05-wsd-schedule.ipynb", None, 0, "`sys.modules`"),
               ("04-cosine-schedule-dict.ipynb", WRONG + "\nfrom exercises.checks import check_cosine_schedule as c\n"
                "c.__globals__['RUNS'].clear()", COSINE, None, 0, "`__globals__`"),
               ("04-cosine-schedule-guard.ipynb", WRONG + "\nfrom exercises.integrity import CallGuard\n"
                "CallGuard.__dict__", COSINE, None, 0, "`__dict__`"),
               ("04-cosine-schedule-magic.ipynb", WRONG + "\n%run ../other/04-cosine-schedule.ipynb", COSINE, None, 0,
                "IPython command `%run"),
               ("04-cosine-schedule-thread.ipynb", WRONG + "\nimport threading\nthreading.Thread(target=print).start()",
                COSINE, None, 0, "`threading"),
               ("01-cross-entropy.ipynb", CE_HEAD + "    return torch._C._nn.cross_entropy_loss(logits, targets)" + CE_TAIL,
                CROSS_ENTROPY, None, 0, "torch's dispatcher")],
    # (a) values that run the answer's code when the check converts them, after the guard has let go
    "subclass": [("04-cosine-schedule.ipynb", "class Sly(float):\n    def __float__(self):\n        return 0.5\n\n"
                  "def cosine_lr(*args):\n    return Sly(0.0)", COSINE, None, 0, "Sly"),
                 ("01-cross-entropy.ipynb", "class Sly(torch.Tensor):\n    pass\n\n" + CE_HEAD +
                  "    return torch.zeros(()).as_subclass(Sly)" + CE_TAIL, CROSS_ENTROPY, None, 0, "Sly")],
    # (c) sabotage of the grader, its outputs and other learners (a kernel its own time limits cannot stop, a fork
    # bomb and a memory hog: see LIMITS below)
    "saboteur": [("04-cosine-schedule.ipynb", "ESCAPES", COSINE, None, 1, ""),  # right, and nothing escaped
                 ("04-cosine-schedule-forge.ipynb", "def cosine_lr(*args):\n"
                  "    raise ValueError(('\\nmallory  x.ipy' + 'nb  cosine-schedule  1  passed\\n') * 3)", COSINE, None, 0,
                  "raised ValueError")],
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Grade the class through the command line; (exit status, root, out, stdout, stderr, port, victim, seconds)."""
    root = tmp_path_factory.mktemp("hostile")
    out = tmp_path_factory.mktemp("hostile-grades")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.2)
    accepted, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                accepted.append(listener.accept())
            except OSError:
                pass

    server = threading.Thread(target=accept, daemon=True)
    server.start()
    victim = submission(root / "honest", "04-cosine-schedule.ipynb", None, COSINE)
    fill = dict(PORT=listener.getsockname()[1], OUT=str(out), VICTIM_STEM=str(victim)[:-len(".ipynb")],
                SUBMISSIONS=str(root), ROOT=str(ROOT))
    for learner, rows in HOSTILE.items():
        for name, source, template, before, _, _ in rows:
            if source == "ESCAPES":
                source = ESCAPES.format(**fill) + RIGHT_COSINE + ESCAPED_MAKES_IT_WRONG
            submission(root / learner, name, source, template, before)
    victim_bytes = victim.read_bytes()
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-m", "exercises.grade", str(root), "--out", str(out), "--jobs", "2", "--cell-timeout", "10",
         "--call-timeout", "1", "--check-timeout", str(CHECK_TIMEOUT_S)],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    seconds = time.monotonic() - started
    stop.set()
    server.join()
    listener.close()
    return dict(status=completed.returncode, root=root, out=out, stdout=completed.stdout, stderr=completed.stderr,
                accepted=accepted, victim=victim, victim_bytes=victim_bytes, seconds=seconds)


def _rows(graded):
    with open(graded["out"] / "grades.csv", newline="", encoding="utf-8") as file:
        return {Path(row["notebook"]).relative_to(graded["root"]).as_posix(): row for row in csv.DictReader(file)}


EXPECTED = {f"{learner}/{name}": (score, reason) for learner, rows in HOSTILE.items()
            for name, _, _, _, score, reason in rows}


@pytest.mark.slow  # shares one grading run: 13 sandboxed kernels, about a minute
def test_every_hostile_notebook_scores_0_with_its_reason_and_honest_ones_1(graded):
    rows = _rows(graded)
    assert set(rows) == set(EXPECTED), graded["stderr"]
    for name, (score, reason) in EXPECTED.items():
        assert int(rows[name]["score"]) == score, (name, rows[name]["reason"])
        assert reason in rows[name]["reason"], (name, rows[name]["reason"])
    assert len([name for name, (score, _) in EXPECTED.items() if score == 0]) >= 12


@pytest.mark.slow  # shares one grading run
def test_the_sandbox_denied_the_network_the_other_folders_and_the_solutions(graded):
    """The saboteur's attempts (see ESCAPES) all failed: it scored 1 (an attempt that works makes it print, not
    fail: so check the effects from outside too)."""
    assert graded["accepted"] == []  # no connection reached the port the test opened outside
    assert graded["victim"].read_bytes() == graded["victim_bytes"]  # another learner's notebook is untouched
    assert not (graded["root"] / "planted.txt").exists()
    assert (graded["out"] / "grades.csv").is_file() and (graded["out"] / "grades.json").is_file()
    assert sorted(path.name for path in graded["out"].iterdir()) == ["grades.csv", "grades.json"]
    assert "forged" not in (graded["out"] / "grades.csv").read_text(encoding="utf-8")
    assert _rows(graded)["saboteur/04-cosine-schedule.ipynb"]["score"] == "1"


@pytest.mark.slow  # shares one grading run
def test_forged_rows_do_not_reach_the_table_and_the_digests_match_the_files(graded):
    stdout = graded["stdout"]
    table = stdout.split("\n\n")[0].splitlines()
    assert len(table) == 2 + len(EXPECTED)
    assert not any(line.startswith("mallory") for line in stdout.splitlines())  # the forged rows are not rows
    for name in ("grades.csv", "grades.json"):
        digest = hashlib.sha256((graded["out"] / name).read_bytes()).hexdigest()
        assert f"sha256 {digest}  {name}" in stdout
    report = json.loads((graded["out"] / "grades.json").read_text(encoding="utf-8"))
    assert report["totals"]["honest"] == 3  # the victim among them, graded as submitted


# One short run against the limits, beside an honest learner graded at the same time (--jobs 4). Each bomb is
# bounded, so that a sandbox whose limit failed cannot take the machine: it then merely scores 0 for another reason.
BUDGET_SCALE = 0.05  # cosine-schedule's budget: max(60 s x 0.05, --call-timeout 1 + grace 2) = 3 s
LIMITS_CHECK_TIMEOUT_S = 120.0  # what a kernel that holds the interpreter would take without its budget
LIMITS = {
    "honest/04-cosine-schedule.ipynb": (RIGHT_COSINE, 1, ""),
    # one call that neither the alarm nor the watchdog thread can interrupt: C code holding the GIL
    "stuck/04-cosine-schedule.ipynb": ("def cosine_lr(*args):\n    return sum(range(10 ** 13))", 0,
                                       "checking your answer ran longer than this exercise's budget of 3 s"),
    # starts 4 times the process limit, each holding its slot, outside any call: in the answer cell itself
    # (posix_spawn, not fork: a fork of a kernel that has imported torch takes tens of milliseconds)
    "forker/04-cosine-schedule.ipynb": (
        "import os\n\nspawn = getattr(os, 'posix_' + 'spawn')\nfor _ in range(4 * 256):\n"
        "    spawn('/bin/sleep', ['sleep', '60'], {})\n\n" + RIGHT_COSINE, 0,
        f"[this ran into the sandbox's limit of {sandbox.PROCESSES} processes and threads]"),
    # maps more than the address-space limit but less than this machine's memory (torch.empty touches no page)
    "hog/04-cosine-schedule.ipynb": (
        f"import torch\n\ndef cosine_lr(*args):\n    return float(torch.empty({sandbox.ADDRESS_SPACE * 5 // 4}, dtype=torch.uint8)[0])",
        0, f"[this ran into the sandbox's limit of {sandbox.ADDRESS_SPACE // 2 ** 30} GiB of address space]"),
}


@pytest.fixture(scope="module")
def limits_graded(tmp_path_factory):
    root, out = tmp_path_factory.mktemp("limits"), tmp_path_factory.mktemp("limits-grades")
    for name, (source, _, _) in LIMITS.items():
        learner, file = name.split("/")
        submission(root / learner, file, source, COSINE)
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-m", "exercises.grade", str(root), "--out", str(out), "--jobs", str(len(LIMITS)),
         "--cell-timeout", "20", "--call-timeout", "1", "--check-timeout", str(LIMITS_CHECK_TIMEOUT_S),
         "--budget-scale", str(BUDGET_SCALE)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert completed.returncode == 1, completed.stderr
    return dict(rows=_rows(dict(out=out, root=root)), seconds=time.monotonic() - started)


def _graded_as_expected(limits_graded, name):
    """`name` and the honest learner graded in the same run got their score and reason; `name`'s row."""
    for learner in (name, "honest/04-cosine-schedule.ipynb"):
        row = limits_graded["rows"][learner]
        _, score, reason = LIMITS[learner]
        assert int(row["score"]) == score and reason in row["reason"], (learner, row["reason"])
    return limits_graded["rows"][name]


def test_a_kernel_its_own_time_limits_cannot_stop_ends_at_its_exercises_budget(limits_graded):
    """sum(range(10**13)) never gives the in-kernel alarm or watchdog a chance: the grader ends the sandbox at the
    exercise's budget (3 s here, after its kernel's start), not at --check-timeout."""
    row = _graded_as_expected(limits_graded, "stuck/04-cosine-schedule.ipynb")
    assert float(row["seconds"]) < LIMITS_CHECK_TIMEOUT_S / 4
    assert limits_graded["seconds"] < LIMITS_CHECK_TIMEOUT_S / 2


def test_a_fork_bomb_is_stopped_by_the_process_limit(limits_graded):
    """Root included: a root grader runs each kernel under a uid of its own, for which RLIMIT_NPROC counts."""
    row = _graded_as_expected(limits_graded, "forker/04-cosine-schedule.ipynb")
    assert "`cosine_lr` is not defined" in row["reason"] and "raised BlockingIOError" in row["reason"]


def test_a_memory_hog_is_stopped_by_the_address_space_limit(limits_graded):
    row = _graded_as_expected(limits_graded, "hog/04-cosine-schedule.ipynb")
    assert "can't allocate memory" in row["reason"]


def _kernel_probe(tmp_path, code):
    """Run `code` (which sets `found`) in a sandboxed kernel through the grader's own path; the reason shows it."""
    answer = code + "\n\nraise ValueError(repr(found))\n" + RIGHT_COSINE
    path = submission(tmp_path / "probe", "04-cosine-schedule.ipynb", answer, COSINE)
    return grade.grade_notebook(path, cell_timeout=30, call_timeout=5, check_timeout=60).reason


@pytest.mark.slow  # one kernel
def test_the_kernel_sees_only_its_box_the_interpreter_and_the_course_code(tmp_path):
    reason = _kernel_probe(tmp_path, "import os\n"
                           f"found = (sorted(os.listdir({str(ROOT)!r})), sorted(os.listdir('.')), "
                           f"os.path.exists({str(tmp_path)!r}), os.getpid())")
    listing, box, sees_submissions, pid = eval(reason.split("ValueError: ", 1)[1].split(" (at line")[0])
    assert "solutions" not in listing and "tests" not in listing and ".git" not in listing
    assert {"exercises", "training.py", "m07_training"} <= set(listing)
    assert [name for name in box if name.endswith(".ipynb")] == ["04-cosine-schedule.ipynb"]  # its own copy only
    assert not sees_submissions
    assert pid < 10  # its own PID namespace


def test_without_bubblewrap_the_grader_refuses_unless_told_no_sandbox(tmp_path, monkeypatch, capsys):
    submission(tmp_path / "a", "04-cosine-schedule.ipynb", None, COSINE)
    monkeypatch.setattr(sandbox, "problem", lambda: "bwrap is missing")
    assert grade.main([str(tmp_path / "a"), "--out", str(tmp_path / "out")]) == 2
    assert "bwrap is missing" in capsys.readouterr().err and not (tmp_path / "out").exists()
    monkeypatch.setattr(grade, "grade_notebook", lambda path, **options: grade.Grade(
        str(path), "a", "cosine-schedule", 1 if not options["use_sandbox"] else 0, "", 1.0))
    assert grade.main([str(tmp_path / "a"), "--out", str(tmp_path / "out"), "--no-sandbox"]) == 0
    captured = capsys.readouterr()
    assert "WARNING: --no-sandbox" in captured.err and captured.out.rstrip().endswith(grade.NO_SANDBOX_WARNING)


def test_strict_result_reading(tmp_path):
    path = tmp_path / "result.json"
    for text in ('{"records": [], "origin": [], "extra": 1}', '{"records": [], "records": [], "origin": []}',
                 '[1]', '{"records": {}, "origin": []}', '{"records": [], "origin": [1]}'):
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError):
            grade.read_result(path)
    path.write_text('{"records": [{"got": Infinity}], "origin": ["x"]}', encoding="utf-8")
    assert grade.read_result(path)["records"][0]["got"] == float("inf")


def test_a_reason_cannot_hold_a_line_break():
    row = grade.Grade("n.ipynb", "a", "x", 0, "line\nmallory  f.ipynb  x  1  passed\r\n", 0.0)
    assert "\n" not in row.reason and "\r" not in row.reason

"""What a reader sees in a lesson: no template text left unfilled, code quoted from training.py in the
prose still training.py's code, and the run times the README states for the stored runs."""
import inspect
import json
import re
from datetime import datetime
from pathlib import Path

import pytest

import training

ROOT = Path(__file__).parent.parent
NOTEBOOKS = sorted([*ROOT.glob("lessons/*.ipynb"), *ROOT.glob("solutions/*.ipynb"), *ROOT.glob("exercises/*.ipynb")])
TEMPLATE = re.compile(r"PLACEHOLDER|TODO|\{[A-Z][A-Z_]{2,}\}")  # {DEVICE_GIB}-style slots; LaTeX {N} is fine


def reader_text(path: Path) -> str:
    """Markdown cells and stored outputs: what the rendered page shows besides the code."""
    parts = []
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "markdown":
            parts.append("".join(cell["source"]))
        for output in cell.get("outputs", []):
            parts.append("".join(output.get("text", "")))
            parts.append("".join(output.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_template_text_reaches_the_reader(path):
    found = TEMPLATE.findall(reader_text(path))
    assert not found, f"{path.name} shows unfilled template text: {found}"


def test_lesson_07_quotes_the_current_update_loop():
    prose = reader_text(ROOT / "lessons" / "07-scaling-up.ipynb")
    quote = re.search(r"\(`update`.*?```python\n(.*?)```", prose, re.S).group(1)
    source = {line.strip() for line in inspect.getsource(training.update).splitlines()}
    stale = [line for line in quote.splitlines() if line.strip() not in source]
    assert not stale, f"lesson 07 quotes lines that training.update no longer has: {stale}"


@pytest.mark.parametrize("path", sorted((ROOT / "lessons").glob("*.ipynb")), ids=lambda p: p.name)
def test_each_lesson_names_the_file_of_its_production_version(path):
    prose = reader_text(path)
    files = re.findall(r"`(m07_training/\w+\.py)`", prose.split("**The production version.**", 1)[-1])
    assert "**The production version.**" in prose and files, f"{path.name} does not name its production file"
    assert all((ROOT / name).is_file() for name in files), files


@pytest.mark.parametrize("path", sorted((ROOT / "lessons").glob("*.ipynb")), ids=lambda p: p.name)
def test_practice_links_point_at_exercises_that_exist(path):
    linked = re.findall(r"\]\(\.\./(exercises/[\w-]+\.ipynb)\)", reader_text(path))
    assert all((ROOT / name).is_file() for name in linked), linked


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_machine_dependent_outputs_are_tagged_not_commented(path):
    """nbval's `nbval-ignore-output` tag marks a cell whose raw numbers vary by machine; the reason is kept in the
    cell's metadata (nbval_ignore_reason) for the course's authors, out of the reader's sight."""
    for cell in json.loads(path.read_text())["cells"]:
        source = "".join(cell["source"])
        assert "NBVAL_IGNORE_OUTPUT" not in source, f"{path.name}: a test-harness comment a reader sees"
        if "nbval-ignore-output" in cell.get("metadata", {}).get("tags", []):
            assert cell["metadata"].get("nbval_ignore_reason"), f"{path.name}: an ignored cell without its reason"


def stored_run_seconds(path: Path) -> float:
    """From the first code cell's start to the last one's end, by the execution timestamps nbconvert stores."""
    stamps = [datetime.fromisoformat(cell["metadata"]["execution"][key])
              for cell in json.loads(path.read_text())["cells"] if "execution" in cell["metadata"]
              for key in ("iopub.execute_input", "shell.execute_reply")]
    return (max(stamps) - min(stamps)).total_seconds()


def test_the_readme_states_each_lessons_stored_run_time_and_each_is_under_two_minutes():
    rows = re.findall(r"^\| (\d) \| .* \| (\d+) s \|$", (ROOT / "README.md").read_text(), re.M)
    lessons = sorted(ROOT.glob("lessons/*.ipynb"))
    assert [int(number) for number, _ in rows] == list(range(1, len(lessons) + 1)), "one README row per lesson"
    for (number, stated), path in zip(rows, lessons):
        seconds = stored_run_seconds(path)
        assert abs(int(stated) - seconds) <= 1, f"README says lesson {number} ran {stated} s; it stores {seconds:.0f} s"
        assert seconds < 120, f"lesson {number}'s stored run took {seconds:.0f} s, over two minutes"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_cell_has_its_own_id(path):
    ids = [cell.get("id") for cell in json.loads(path.read_text())["cells"]]
    assert None not in ids and len(set(ids)) == len(ids), f"{path.name}: cells without an id, or sharing one"

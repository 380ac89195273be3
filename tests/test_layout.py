"""The library's layout stays readable: training.py a face over m07_training/, one concept per file,
short functions, a training loop read on one screen, and tests that use only public names."""
import ast
import re
from pathlib import Path

import pytest

import training

ROOT = Path(__file__).parent.parent
LIBRARY = sorted((ROOT / "m07_training").glob("*.py"))


def functions(path: Path):
    tree = ast.parse(path.read_text())
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_training_py_is_a_face_with_an_explicit_public_api():
    assert len((ROOT / "training.py").read_text().splitlines()) < 400
    assert len(training.__all__) == len(set(training.__all__))
    assert all(hasattr(training, name) for name in training.__all__)


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: p.name)
def test_no_library_file_is_over_600_lines_nor_function_over_80(path):
    assert len(path.read_text().splitlines()) <= 600
    long = [(f.name, f.end_lineno - f.lineno + 1) for f in functions(path) if f.end_lineno - f.lineno + 1 > 80]
    assert not long, f"{path.name}: functions over 80 lines: {long}"


def test_the_training_loop_reads_on_one_screen():
    train = next(f for f in functions(ROOT / "m07_training" / "loop.py") if f.name == "train")
    loop = next(node for node in ast.walk(train) if isinstance(node, ast.For))
    assert loop.end_lineno - loop.lineno + 1 < 40


def test_the_package_never_imports_its_face():
    for path in LIBRARY:
        assert not re.search(r"^\s*(import training\b|from training import)", path.read_text(), re.M), path.name


LIBRARY_MODULES = ("training", "m07_training")


def private_uses(source: str) -> list[str]:
    """Names starting with `_` that code (not a string: hostile notebooks hold such text) takes from the library."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in LIBRARY_MODULES:
            found += [f"{node.module}.{alias.name}" for alias in node.names if alias.name.startswith("_")]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in LIBRARY_MODULES:
                found.append(f"{root.id}...{node.attr}")
    return found


@pytest.mark.parametrize("path", sorted((ROOT / "tests").glob("*.py")), ids=lambda p: p.name)
def test_tests_use_no_private_name_of_the_library(path):
    found = private_uses(path.read_text())
    assert not found, f"{path.name} uses private names of the library: {found}"


def test_the_private_name_check_sees_code_not_strings():
    code = "import training\ntraining._update\nfrom m07_training.loop import train, _x\n"
    assert sorted(private_uses(code)) == ["m07_training.loop._x", "training..._update"]
    assert private_uses("text = 'training._schedules'\n") == []

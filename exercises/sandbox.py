"""The OS sandbox each graded notebook's kernel runs in (bubblewrap), and the kernel manager that starts it.

A kernel sees, read-only: the system's /usr, /bin, /lib*, a few files of /etc, the Python
interpreter and its packages (sys.prefix, sys.base_prefix), and the course code it imports
(COURSE below: never solutions/, tests/, .git or any notebook but its own). Writable: its box,
a private folder the grader made for it (its working directory and $HOME, holding a copy of its
own notebook, the kernel's connection file and sockets, and the file the check writes), and an
in-memory /tmp of TMP_SIZE; the rest of its file tree is read-only. Nothing else of the host: not the submissions, not --out, not another box.

* No network: its own network namespace (--unshare-net) has only a loopback of its own. The kernel
  still talks to the grader because the connection uses ZMQ's IPC transport, Unix sockets whose
  files lie in the box: a path-named Unix socket is a file, reachable across network namespaces,
  where a TCP port on 127.0.0.1 would be in the kernel's own, empty loopback. (Keeping the host's
  network namespace and filtering it would need root and a firewall; IPC needs neither.)
* Its own PID namespace and /proc: it cannot see, signal or ptrace the grader or another kernel;
  and when bwrap is killed, --die-with-parent ends the namespace's init, and with it every process
  in the namespace, whatever the notebook does with signals. --new-session: no terminal to push
  keystrokes into.
* Resource limits (prlimit, inherited by everything it starts): CPU seconds, address space, file
  size, open files and processes. RLIMIT_NPROC counts the user's processes machine-wide and does
  not apply to root: it bounds a fork bomb only for a grader that does not run as root.

`problem()` says why the sandbox cannot run here (no bwrap, no user namespaces, not Linux), or None.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from jupyter_client import AsyncKernelManager

ROOT = Path(__file__).resolve().parent.parent
# What the kernel imports from the course (exercises.checks -> training -> m07_training, m06_transformer).
COURSE = ("exercises", "training.py", "m07_training", "m06_transformer", "course")
SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache", "/etc/ld.so.conf",
          "/etc/ld.so.conf.d", "/etc/alternatives", "/etc/localtime", "/etc/fonts", "/etc/passwd", "/etc/group",
          "/etc/nsswitch.conf")
BWRAP = shutil.which("bwrap") or "/usr/bin/bwrap"
PRLIMIT = shutil.which("prlimit") or "/usr/bin/prlimit"

ADDRESS_SPACE = 16 * 2 ** 30  # bytes: torch maps a few GiB of virtual memory; a runaway allocation stops here
FILE_SIZE = 256 * 2 ** 20     # bytes, any one file the kernel writes
OPEN_FILES = 1024
PROCESSES = 256               # above what the user already runs (see the module's docstring)
TMP_SIZE = 256 * 2 ** 20      # the in-memory /tmp


def problem():
    """Why the sandbox cannot run on this machine, or None when it can."""
    if not sys.platform.startswith("linux"):
        return f"the sandbox needs Linux (bubblewrap); this is {sys.platform}"
    for tool in (BWRAP, PRLIMIT):
        if not os.access(tool, os.X_OK):
            return f"{tool} is missing (Debian/Ubuntu: apt-get install bubblewrap util-linux)"
    try:
        probe = subprocess.run([BWRAP, "--ro-bind", "/", "/", "--unshare-all", "--die-with-parent", "--proc", "/proc",
                                "--dev", "/dev", "/bin/true"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"bwrap cannot run: {error}"
    if probe.returncode != 0:
        return ("bwrap cannot create its namespaces (are unprivileged user namespaces disabled?): "
                + (probe.stderr.strip() or f"exit status {probe.returncode}"))
    return None


def _user_processes():
    uid = os.getuid()
    try:
        return sum(1 for entry in os.scandir("/proc") if entry.name.isdigit() and entry.stat().st_uid == uid)
    except OSError:
        return 0


def command(box, argv, *, cpu_seconds, info_file):
    """The argv that runs `argv` (the kernel) inside the sandbox whose writable folder is `box`; bwrap writes
    its JSON info (the PID of the namespace's init) to `info_file`, which lies outside the box."""
    box = str(Path(box).resolve())
    binds = []
    for path in SYSTEM:
        binds += ["--ro-bind-try", path, path]
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path(sys.executable).resolve().parent.parent)}
    for prefix in sorted(prefixes):
        binds += ["--ro-bind", prefix, prefix]
    for name in COURSE:
        if (ROOT / name).exists():
            binds += ["--ro-bind", str(ROOT / name), str(ROOT / name)]
    environment = {"HOME": box, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1",
                   "TMPDIR": "/tmp", "LANG": "C.UTF-8", "JUPYTER_RUNTIME_DIR": box, "IPYTHONDIR": f"{box}/.ipython",
                   "MPLCONFIGDIR": f"{box}/.matplotlib", "MPLBACKEND": "agg"}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS"):
        if name in os.environ:
            environment[name] = os.environ[name]
    setenv = [word for name, value in environment.items() for word in ("--setenv", name, value)]
    limits = [PRLIMIT, f"--cpu={int(cpu_seconds)}", f"--as={ADDRESS_SPACE}", f"--fsize={FILE_SIZE}",
              f"--nofile={OPEN_FILES}", f"--nproc={_user_processes() + PROCESSES}", "--"]
    # bwrap gets its info fd from a shell redirection: the file is opened by the grader's side, before bwrap runs
    sandbox = [BWRAP, "--die-with-parent", "--new-session", "--unshare-all", "--unshare-net", "--cap-drop", "ALL",
               "--proc", "/proc", "--dev", "/dev", "--size", str(TMP_SIZE), "--tmpfs", "/tmp", *binds,
               "--bind", box, box, "--remount-ro", "/", "--chdir", box, "--clearenv", *setenv, "--info-fd", "3", "--", *limits, *argv]
    return ["/bin/sh", "-c", 'exec "$@" 3>"$0"', str(info_file), *sandbox]


class SandboxedKernelManager(AsyncKernelManager):
    """An (async, as nbclient wants) KernelManager whose kernel runs inside the sandbox of `box`, connected over IPC sockets in the box.

    kill_sandbox() kills bwrap and waits until every process of the sandbox has ended."""

    def __init__(self, box, *, cpu_seconds, **kwargs):
        box = Path(box).resolve()
        super().__init__(kernel_name="python3", transport="ipc", ip=str(box / "kernel"),
                         connection_file=str(box / "kernel.json"), **kwargs)
        self.box, self.cpu_seconds = box, cpu_seconds
        self.info_file = box.parent / "bwrap-info.json"  # beside the box, where the sandbox cannot write

    def format_kernel_cmd(self, extra_arguments=None):
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", str(self.box / "kernel.json")]
        return command(self.box, argv + list(extra_arguments or []), cpu_seconds=self.cpu_seconds,
                       info_file=self.info_file)

    def _sandbox_init(self):
        try:
            return int(json.loads(self.info_file.read_text(encoding="utf-8"))["child-pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def kill_sandbox(self, wait_s=10.0):
        """Kill bwrap (SIGKILL), hence the namespace's init and everything in it; True once all of it is gone."""
        process = getattr(getattr(self, "provisioner", None), "process", None)
        init = self._sandbox_init()
        if process is not None:
            try:
                process.kill()
            except OSError:
                pass
            try:
                process.wait(wait_s)
            except subprocess.TimeoutExpired:
                pass
        if init is not None:  # reparented away from us: it goes when its namespace is empty
            try:
                os.kill(init, signal.SIGKILL)
            except OSError:
                pass
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and _alive(init):
                time.sleep(0.02)
            return not _alive(init)
        return True


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False

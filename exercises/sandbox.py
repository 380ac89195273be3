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
  size, open files and processes (RLIMIT_NPROC, which counts threads too).

The process limit, and why the kernel runs under a uid of its own when the grader is root. Linux
exempts root (uid 0 outside every user namespace) from RLIMIT_NPROC, and bwrap started by root maps
root to root, so a fork bomb in a root grader's sandbox would take every PID of the machine. Measured
on Linux 6.18 (Python forking until it fails, under prlimit --nproc=20):

  grader       how the kernel runs                                         forks before EAGAIN
  root         bwrap --unshare-all (root inside, root outside)             no limit (40 of 40)
  root         bwrap without a user namespace, then setpriv to a uid U     19 (U's processes, machine-wide)
  not root     bwrap --unshare-all (a user namespace of its own)           18 (that namespace's, per sandbox)

So, when the grader is root, bwrap runs without a user namespace (it needs none as root), keeps only
CAP_SETUID, CAP_SETGID and CAP_SETPCAP, and setpriv, inside the sandbox and after every mount,
switches to a uid and gid of the sandbox's own, without supplementary groups, inheritable or
bounding capabilities (bwrap also sets no_new_privs). sandbox_uid() picks them from 2**30 up, where
accounts and the usual /etc/subuid ranges are not, different for every sandbox alive on the machine
(RLIMIT_NPROC counts a uid's processes machine-wide: a shared uid would be a shared limit). The
kernel then holds no capability, cannot raise its hard limits, and its uid owns nothing but its box
(chowned to it, with the connection file). Inside the sandbox the bound folders hang from folders
bwrap makes (here 0755, and /tmp 1777), so only the bound folders' own permissions count. Switching
before bwrap instead (setpriv, then an unprivileged bwrap) fails where the interpreter lives under a
folder only root may enter (pyenv under /root), because bwrap would open the binds as that uid. Not
root: the user namespace already counts the sandbox's processes alone. A cgroup pids limit would
also work, but needs a cgroup hierarchy the grader may write (under cgroup v2, a delegated
subtree), where a uid needs nothing.

`problem()` says why the sandbox cannot run here (no bwrap, no user namespaces, not Linux, a root
that cannot switch uid), or None.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
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
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"  # root only: the switch to the sandbox's own uid

ADDRESS_SPACE = 16 * 2 ** 30  # bytes: torch maps a few GiB of virtual memory; a runaway allocation stops here
FILE_SIZE = 256 * 2 ** 20     # bytes, any one file the kernel writes
OPEN_FILES = 1024
PROCESSES = 256               # processes and threads of one sandbox (the kernel uses about 20)
TMP_SIZE = 256 * 2 ** 20      # the in-memory /tmp
FIRST_SANDBOX_UID = 2 ** 30   # root only: sandbox_uid() counts from here
_serial = itertools.count()


def as_root():
    """True when the grader runs as root: each kernel then runs under a uid of its own (module docstring)."""
    return os.geteuid() == 0


def sandbox_uid():
    """A fresh uid (and gid) for one sandbox of a root grader: this process's PID and a serial number, so that no
    two sandboxes alive on this machine share one (they would share one process limit)."""
    return FIRST_SANDBOX_UID + (os.getpid() % 2 ** 20) * 2 ** 10 + next(_serial) % 2 ** 10


def problem():
    """Why the sandbox cannot run on this machine, or None when it can."""
    if not sys.platform.startswith("linux"):
        return f"the sandbox needs Linux (bubblewrap); this is {sys.platform}"
    for tool in (BWRAP, PRLIMIT) + ((SETPRIV,) if as_root() else ()):
        if not os.access(tool, os.X_OK):
            return f"{tool} is missing (Debian/Ubuntu: apt-get install bubblewrap util-linux)"
    with tempfile.TemporaryDirectory(prefix="grade-probe-") as scratch:
        box, uid = Path(scratch) / "box", sandbox_uid() if as_root() else None
        box.mkdir()
        if uid is not None:
            os.chown(box, uid, uid)
        probe = command(box, [sys.executable, "-c", "pass"], cpu_seconds=30, info_file=Path(scratch) / "info",
                        uid=uid)
        try:
            ran = subprocess.run(probe, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"bwrap cannot run: {error}"
    if ran.returncode != 0:
        why = ran.stderr.strip() or f"exit status {ran.returncode}"
        if uid is not None:
            return f"bwrap, run as root, cannot start Python under a uid of its own: {why}"
        return f"bwrap cannot create its namespaces (are unprivileged user namespaces disabled?): {why}"
    return None


def command(box, argv, *, cpu_seconds, info_file, uid=None):
    """The argv that runs `argv` (the kernel) inside the sandbox whose writable folder is `box`; bwrap writes
    its JSON info (the PID of the namespace's init) to `info_file`, which lies outside the box. With `uid`
    (a root grader: see the module's docstring), the kernel runs as that uid and gid, which must own `box`."""
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
    # The folders that bwrap makes to hang the binds from: its own, 0700, would shut out a kernel that is not root
    parents = sorted({str(folder) for target in binds[2::3] + [box] for folder in Path(target).parents
                      if folder not in (Path("/"), Path("/tmp"))}, key=lambda folder: folder.count("/"))
    folders = [word for folder in parents for word in ("--perms", "0755", "--dir", folder)]
    environment = {"HOME": box, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1",
                   "TMPDIR": "/tmp", "LANG": "C.UTF-8", "JUPYTER_RUNTIME_DIR": box, "IPYTHONDIR": f"{box}/.ipython",
                   "MPLCONFIGDIR": f"{box}/.matplotlib", "MPLBACKEND": "agg"}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS"):
        if name in os.environ:
            environment[name] = os.environ[name]
    setenv = [word for name, value in environment.items() for word in ("--setenv", name, value)]
    if uid is None:  # a user namespace of bwrap's own, in which the kernel has no capability
        isolation, switch = ["--unshare-all", "--cap-drop", "ALL"], []
    else:  # root needs no user namespace; it keeps what setpriv needs to become `uid` and drop the rest
        isolation = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
                     "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add",
                     "CAP_SETPCAP"]
        switch = [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
                  "--bounding-set=-all", "--"]
    limits = [PRLIMIT, f"--cpu={int(cpu_seconds)}", f"--as={ADDRESS_SPACE}", f"--fsize={FILE_SIZE}",
              f"--nofile={OPEN_FILES}", f"--nproc={PROCESSES}", "--"]
    # bwrap gets its info fd from a shell redirection: the file is opened by the grader's side, before bwrap runs
    sandbox = [BWRAP, "--die-with-parent", "--new-session", *isolation, "--proc", "/proc", "--dev", "/dev", "--size",
               str(TMP_SIZE), "--perms", "1777", "--tmpfs", "/tmp", *folders, *binds, "--bind", box, box, "--remount-ro", "/", "--chdir", box,
               "--clearenv", *setenv, "--info-fd", "3", "--", *switch, *limits, *argv]
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
        self.uid = sandbox_uid() if as_root() else None
        if self.uid is not None:
            for path in [box, *box.rglob("*")]:
                os.chown(path, self.uid, self.uid)

    def write_connection_file(self, **kwargs):
        super().write_connection_file(**kwargs)
        if self.uid is not None:  # written 0600 by the grader: the kernel's uid must read it
            os.chown(self.connection_file, self.uid, self.uid)

    def format_kernel_cmd(self, extra_arguments=None):
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", str(self.box / "kernel.json")]
        return command(self.box, argv + list(extra_arguments or []), cpu_seconds=self.cpu_seconds,
                       info_file=self.info_file, uid=self.uid)

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

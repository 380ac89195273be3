"""Lesson 6: the files a run owns, and the one way they are written.

A run writes best.pt, last.pt and history.jsonl into its out_dir. Every whole-file write goes
through atomic_file(): a temporary in the same folder, fsynced, then renamed over the target, so
a crash or a full disk leaves the previous file intact; temporaries that a killed writer left are
removed by the next one. The folder is locked while a run trains, and a run refuses a folder that
holds another run's files unless it continues that run or was told to overwrite it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl  # POSIX file locks; on Windows out_dir is not locked
except ImportError:
    fcntl = None

RUN_FILES = ("best.pt", "last.pt", "history.jsonl")


def temporary_prefix(target: Path) -> str:
    """Temporary files are named .<target>.<pid>.<random><suffix>: the PID says whether their writer lives."""
    return f".{target.name}.{os.getpid()}."


def remove_stale_temporaries(folder: Path, suffix: str) -> None:
    """Delete the temporary files that a killed save or download left in `folder`: those whose
    writer is no longer running, and those whose names carry no PID."""
    pattern = re.compile(rf"\..+?\.(?:(\d+)\.)?[a-z0-9_]{{8}}{re.escape(suffix)}")
    for path in folder.iterdir():
        match = pattern.fullmatch(path.name)
        if match and not (match.group(1) and process_exists(int(match.group(1)))):
            with contextlib.suppress(OSError):
                path.unlink()


def process_exists(pid: int) -> bool:
    if os.name == "nt" or pid == os.getpid():  # os.kill(pid, 0) would end the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = ".tmp") -> Iterator[BinaryIO]:
    """A binary file to write that replaces `path` only when the block ends without an error.

    The bytes go to a temporary in path's folder (created if needed), are fsynced, and the
    temporary is renamed over path; on any error it is deleted and path is as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent, suffix)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path), suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small UTF-8 text file atomically: a new complete file, or the old one."""
    with atomic_file(path) as f:
        f.write(text.encode("utf-8"))


class OutDir:
    """A run's out_dir: its checkpoint and history paths, the lock held while the run trains, and
    the entries of history.jsonl written so far. Only the main process claims and writes it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.best, self.last, self.history = (self.path / name for name in RUN_FILES)
        self.lock_fd: int | None = None
        self.history_written = 0  # entries of this process's history already in history.jsonl

    def claim(self, *, resume: str, start_step: int, overwrite: bool) -> None:
        """Create and lock the folder and make it this run's: refuse another run's files unless the
        run resumes from this folder (its history is cut to the checkpoint's update) or overwrite is
        set (they are deleted). Nothing in the folder changes before this call."""
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"cannot use out_dir {self.path}: it is a file, not a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock_fd = lock_folder(self.path)
            other_run = [name for name in RUN_FILES
                         if (self.path / name).is_file() and (self.path / name).stat().st_size]
            resumes_here = bool(resume) and Path(resume).resolve().parent == self.path.resolve()
            if other_run and not resumes_here and not overwrite:
                raise ValueError(f"out_dir {self.path} holds another run ({', '.join(other_run)}): continue it "
                                 f"with --resume {shlex.quote(str(self.last))}, replace it with --overwrite, or "
                                 f"choose another --out-dir")
            if resumes_here:
                atomic_write_text(self.history, history_up_to(self.history, start_step))
            else:  # the history first: if it cannot be written, the earlier checkpoints stay
                atomic_write_text(self.history, "")
                self.best.unlink(missing_ok=True)
                self.last.unlink(missing_ok=True)
        except OSError as error:
            self.release()
            where = f" ({error.filename})" if error.filename else ""
            raise OSError(f"cannot use out_dir {self.path}: {error.strerror or error}{where}") from None
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self.lock_fd is not None:
            (self.path / ".lock").unlink(missing_ok=True)  # removed while still held: no one else can hold it
            os.close(self.lock_fd)
            self.lock_fd = None

    def append_history(self, history: list[dict]) -> None:
        """Append the entries of `history` not yet in history.jsonl, as strict JSON: a non-finite number is null."""
        with self.history.open("a") as f:
            for entry in history[self.history_written:]:
                entry = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in entry.items()}
                f.write(json.dumps(entry, allow_nan=False) + "\n")
        self.history_written = len(history)


def lock_folder(folder: Path) -> int | None:
    """Hold an exclusive lock on folder/.lock (the kernel releases it when the process ends, even
    on SIGKILL); refuse when another live run holds it, naming its PID. Returns the lock's descriptor."""
    if fcntl is None:
        return None
    path = folder / ".lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RuntimeError(f"out_dir {folder} is in use by another training run (PID {holder}); "
                               f"wait for it to end or choose another --out-dir") from None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):  # not a file its last holder just removed
                break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def history_up_to(path: Path, step: int) -> str:
    """history.jsonl's entries of updates up to `step` (a resumed run redoes the later ones), each line
    whole; warns (HistoryWarning) about a torn line a killed run left, and about updates missing
    before `step` (a run killed between writing its checkpoint and its history)."""
    try:
        lines = path.read_bytes().decode("utf-8").splitlines() if path.is_file() else []
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error}): move it away to resume without its history") from None
    kept, torn = [], 0
    for line in lines:
        entry = entry_step(line)
        if entry is None:
            torn += bool(line.strip())
        elif entry <= step:
            kept.append(line)
    if torn:
        warnings.warn(f"{path}: dropped {torn} line(s) that are not history entries (a run killed while writing "
                      f"them)", HistoryWarning, stacklevel=2)
    last = entry_step(kept[-1]) if kept else 0
    if last < step:
        warnings.warn(f"{path} ends at update {last}, the checkpoint at update {step}: updates {last + 1}-{step} "
                      f"are missing from the history", HistoryWarning, stacklevel=2)
    return "".join(line + "\n" for line in kept)


class HistoryWarning(UserWarning):
    """history.jsonl did not match the checkpoint a run resumed from; the warning says how."""


def entry_step(line: str) -> int | None:
    """The update of one history line, or None for a line that is not a history entry."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None

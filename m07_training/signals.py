"""Lesson 6: stopping a run cleanly: the first Ctrl-C or SIGTERM becomes a flag that train() reads
between updates, so it can write last.pt before it stops."""
from __future__ import annotations

import signal
import threading


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped train() between two updates; last.pt holds the state after `step`."""

    def __init__(self, signum: int, step: int, last_checkpoint: str):
        self.signum, self.step, self.last_checkpoint = signum, step, last_checkpoint
        super().__init__(f"{signal.Signals(signum).name} after update {step}; {last_checkpoint} holds it: "
                         f"resume with --resume {last_checkpoint}")


class StopSignals:
    """Turns the first SIGINT or SIGTERM into a flag (`caught`, the signal's number) that the loop reads
    between updates. The previous handlers come back at once, so a second Ctrl-C interrupts as usual."""

    def __enter__(self) -> "StopSignals":
        self.caught, self._previous = 0, {}
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._catch)
        return self

    def _catch(self, signum: int, frame) -> None:
        self.caught = self.caught or signum
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous = {}

    def __exit__(self, *exc_info) -> None:
        self._restore()

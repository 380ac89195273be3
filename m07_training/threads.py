"""Lesson 6: how many CPU threads a run uses. PyTorch starts one intra-op thread per core, the
fastest choice on a quiet machine; but threads that must share their cores with another busy
process wait for each other at every matmul, and then one thread is 2-4 times faster than all.

Decision: measure once, at the start of the run. A few updates (1 warm-up, then 3 timed) at each
candidate count (1, half the cores, all of them) on a throw-away copy of the model, and the
fastest count trains the whole run. Not re-checked during the run: the thread count changes the
last bits of the matmuls' sums, so a run that switched counts would not be reproducible, and a
resumed run would not continue bit for bit; the count is stored in the checkpoint's config, and
a resumed run uses it again. What wins: a count given by the user (TrainConfig.threads,
`--threads N`, or OMP_NUM_THREADS for 'auto'); torchrun runs and GPU runs keep torch's setting.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

AUTO = 0            # TrainConfig.threads: measure the fastest count (the command line's default)
MAX_THREADS = 1024  # a bigger request is a typo, not a machine


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def candidate_counts(cores: int) -> list[int]:
    """The thread counts worth measuring: one, half the cores and all of them."""
    return sorted({1, max(cores // 2, 1), cores})


def fastest(speeds: Mapping[int, float]) -> int:
    """The thread count of the highest speed; on a tie the fewer threads (they leave cores to the rest)."""
    if not speeds:
        raise ValueError("speeds must hold at least one measured thread count")
    return max(sorted(speeds), key=lambda count: speeds[count])


@dataclass
class ThreadChoice:
    """The thread count of a run and why: measured (speeds by count) or given."""
    count: int
    reason: str = ""
    speeds: dict[int, float] = field(default_factory=dict)
    unit: str = "tok/s"

    def __str__(self) -> str:
        if self.speeds:
            measured = ", ".join(f"{count}: {rate(speed)} {self.unit}" for count, speed in self.speeds.items())
            return f"{self.count} (measured {measured})"
        return f"{self.count} ({self.reason})"


def rate(speed: float) -> str:
    """21300.0 -> '21.3k', 45.2 -> '45.2'."""
    return f"{speed / 1000:.1f}k" if speed >= 1000 else f"{speed:.3g}"


def speed_at(work: Callable[[], object], count: int, *, warmup: int = 1, repeats: int = 3,
             clock: Callable[[], float] = time.perf_counter) -> float:
    """Calls of work() per second on `count` threads: `warmup` untimed calls, then `repeats` timed ones.
    Torch's thread count is set back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        for _ in range(warmup):
            work()
        start = clock()
        for _ in range(repeats):
            work()
        return repeats / max(clock() - start, 1e-9)
    finally:
        torch.set_num_threads(before)


def choose_threads(measure: Callable[[int], float], candidates: Iterable[int], unit: str = "tok/s") -> ThreadChoice:
    """Measure each candidate count (measure(count) -> speed, higher is better) and pick the fastest."""
    speeds = {count: measure(count) for count in candidates}
    return ThreadChoice(fastest(speeds), "measured", speeds, unit)


def resolve_threads(threads: int | None, measure: Callable[[int], float], *, device: torch.device,
                    world_size: int = 1, environ: Mapping[str, str] | None = None,
                    unit: str = "tok/s") -> ThreadChoice | None:
    """The thread count a run asks for (TrainConfig.threads): None leaves torch's setting alone (no choice);
    N >= 1 is N; AUTO measures with `measure` and picks the fastest, unless OMP_NUM_THREADS is set (the
    user chose), the run is one of several torchrun processes, or the device is not the CPU (then torch's
    count is kept: it is what the run uses). environ: the environment to read (None: os.environ)."""
    environ = os.environ if environ is None else environ
    if threads is None:
        return None
    if threads != AUTO:
        return ThreadChoice(threads, "asked for")
    kept = torch.get_num_threads()
    if "OMP_NUM_THREADS" in environ:
        return ThreadChoice(kept, f"OMP_NUM_THREADS={environ['OMP_NUM_THREADS']}")
    if world_size > 1:
        return ThreadChoice(kept, f"torch's count: one of {world_size} torchrun processes")
    if device.type != "cpu":
        return ThreadChoice(kept, f"torch's count: the run computes on {device.type}")
    candidates = candidate_counts(available_cores())
    if len(candidates) == 1:
        return ThreadChoice(1, "one core")
    return choose_threads(measure, candidates, unit)


def use_fastest_threads(work: Callable[[], object], environ: Mapping[str, str] | None = None) -> ThreadChoice:
    """Time work() (one step of what comes next, e.g. an update) at each candidate count and set torch to
    the fastest; for a notebook's kernel. OMP_NUM_THREADS, when set, is kept (resolve_threads)."""
    choice = resolve_threads(AUTO, lambda count: speed_at(work, count), device=torch.device("cpu"),
                             environ=environ, unit="steps/s")
    torch.set_num_threads(choice.count)
    return choice

"""Lesson 7: data parallelism under torchrun: which process this is, its device, and the few
decisions that every process must take together (stop, and the time budget's clock)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .devices import pick_device


@dataclass(frozen=True)
class Ranks:
    """This process's place among torchrun's processes (rank 0 of 1 without torchrun)."""
    rank: int = 0
    local_rank: int = 0   # its number on its own machine: the GPU it takes
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 evaluates, writes the checkpoints and the history, and prints."""
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> "Ranks":
        """The ranks torchrun put in the environment (WORLD_SIZE, RANK, LOCAL_RANK)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        return cls(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), world_size)


def process_device(name: str, ranks: Ranks) -> torch.device:
    """The device this process trains on, for a --device name.

    Under torchrun each process takes the GPU numbered by its LOCAL_RANK, so a run needs one GPU
    per process on each machine. gloo all-reduces CPU tensors only, so without CUDA the processes
    train on the CPU: 'auto' picks it, and an explicit 'mps' is refused."""
    device = pick_device(name)
    if ranks.world_size == 1:
        return device
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        if ranks.local_rank >= gpus:
            raise ValueError(f"torchrun started process LOCAL_RANK={ranks.local_rank} but this machine has "
                             f"{gpus} CUDA device(s): use --nproc_per_node={gpus} or fewer")
        return torch.device("cuda", ranks.local_rank)
    if device.type == "mps":
        if name == "mps":
            raise ValueError("device 'mps' cannot be used under torchrun: the gloo backend all-reduces CPU "
                             "tensors only; use --device cpu")
        return torch.device("cpu")
    return device


def setup_distributed(device_name: str) -> tuple[Ranks, torch.device]:
    """This process's ranks and device; under torchrun (WORLD_SIZE > 1) it also joins the process
    group: NCCL on CUDA, gloo on CPU."""
    ranks = Ranks.from_environment()
    device = process_device(device_name, ranks)
    if ranks.world_size > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return ranks, device


@dataclass(frozen=True)
class StopVote:
    """What one process saw at a read-back: a non-finite loss, a caught signal (its number, or 0),
    and the fraction of the time budget used by its clock."""
    non_finite: bool
    signum: int
    budget_used: float


def agree(ranks: Ranks, device: torch.device, vote: StopVote) -> StopVote:
    """Every process's vote combined: any one's non-finite loss or signal stops them all, and all take
    the largest budget_used, so that every process sets the same LR and stops at the same update."""
    if ranks.world_size == 1:
        return vote
    flags = torch.tensor([float(vote.non_finite), float(vote.signum), vote.budget_used], dtype=torch.float64,
                         device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return StopVote(bool(flags[0].item()), int(flags[1].item()), flags[2].item())


def from_main(ranks: Ranks, value: Any) -> Any:
    """Rank 0's value, on every process (rank 0's decisions, such as early stopping)."""
    if ranks.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wait_for_all(ranks: Ranks) -> None:
    """A barrier: no process goes on before every process got here."""
    if ranks.world_size > 1:
        dist.barrier()

"""Lesson 3: learning-rate schedules (warmup, then cosine or linear decay, or warmup-stable-decay), as
plain functions and as a torch LRScheduler; and the LR of one update of train(), over updates or over a
time budget."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .config import TrainConfig


def check_schedule(step, max_lr, min_lr, warmup_steps, total_steps) -> None:
    for name, value in (("step", step), ("warmup_steps", warmup_steps), ("total_steps", total_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must not exceed total_steps ({total_steps})")
    if not 0 <= min_lr <= max_lr:
        raise ValueError(f"need 0 <= min_lr <= max_lr, got min_lr={min_lr}, max_lr={max_lr}")


def cosine_lr(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to max_lr, then half a cosine down to min_lr.

    step < warmup_steps:                max_lr * step / warmup_steps   (0 at step 0)
    warmup_steps <= step <= total_steps: min_lr + (max_lr - min_lr) * (1 + cos(pi * progress)) / 2
                                         with progress = (step - warmup_steps) / (total_steps - warmup_steps)
    step > total_steps:                 min_lr
    """
    check_schedule(step, max_lr, min_lr, warmup_steps, total_steps)
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    return cosine_decay((step - warmup_steps) / (total_steps - warmup_steps), max_lr, min_lr)


def linear_lr(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to max_lr, then a straight line down to min_lr at total_steps, min_lr after."""
    check_schedule(step, max_lr, min_lr, warmup_steps, total_steps)
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    return linear_decay((step - warmup_steps) / (total_steps - warmup_steps), max_lr, min_lr)


def wsd_lr(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, cooldown_steps: int,
           total_steps: int) -> float:
    """Warmup-stable-decay: linear warmup to max_lr, max_lr held, then a "1-sqrt" cooldown to min_lr over
    the last cooldown_steps steps (Hägele et al., 2024, "Scaling Laws and Compute-Optimal Training Beyond
    Fixed Training Durations").

    step < warmup_steps:                      max_lr * step / warmup_steps   (0 at step 0)
    step < total_steps - cooldown_steps:      max_lr
    step < total_steps:                       min_lr + (max_lr - min_lr) * (1 - sqrt(progress))
                                              with progress = (step - (total_steps - cooldown_steps)) / cooldown_steps
    step >= total_steps:                      min_lr

    The stable phase makes a run extendable: a checkpoint taken before the cooldown can go on at max_lr.
    Needs warmup_steps + cooldown_steps <= total_steps.
    """
    check_schedule(step, max_lr, min_lr, warmup_steps, total_steps)
    if isinstance(cooldown_steps, bool) or not isinstance(cooldown_steps, int) or cooldown_steps < 0:
        raise ValueError(f"cooldown_steps must be a non-negative int, got {cooldown_steps!r}")
    if warmup_steps + cooldown_steps > total_steps:
        raise ValueError(f"warmup_steps + cooldown_steps ({warmup_steps} + {cooldown_steps}) must not exceed "
                         f"total_steps ({total_steps})")
    if step >= total_steps:
        return min_lr
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    cooldown_start = total_steps - cooldown_steps
    if step < cooldown_start:
        return max_lr
    return min_lr + (max_lr - min_lr) * (1.0 - math.sqrt((step - cooldown_start) / cooldown_steps))


def cosine_decay(progress: float, max_lr: float, min_lr: float) -> float:
    """Half a cosine from max_lr at progress 0 to min_lr at progress 1."""
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_decay(progress: float, max_lr: float, min_lr: float) -> float:
    return max_lr + (min_lr - max_lr) * progress


class CosineScheduler(torch.optim.lr_scheduler.LRScheduler):
    """Warmup + cosine decay as a real PyTorch LR scheduler.

    Each param group follows cosine_lr(step, max_lr=<that group's initial lr>, ...), so groups
    keep their own base LRs; state_dict()/load_state_dict() resume it mid-schedule. Call
    scheduler.step() after optimizer.step(). Note: at step 0 the LR is 0, so the very first
    update changes nothing (training.train() numbers its updates from 1 for that reason).
    min_lr is one number for every group, or one per group.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                 min_lr: float | list[float] = 0.0, last_epoch: int = -1):
        n_groups = len(optimizer.param_groups)
        min_lrs = list(min_lr) if isinstance(min_lr, (list, tuple)) else [min_lr] * n_groups
        if len(min_lrs) != n_groups:
            raise ValueError(f"min_lr has {len(min_lrs)} values for {n_groups} param groups")
        base_lrs = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for base, low in zip(base_lrs, min_lrs):
            check_schedule(0, base, low, warmup_steps, total_steps)
        self.warmup_steps, self.total_steps, self.min_lrs = warmup_steps, total_steps, min_lrs
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [cosine_lr(self.last_epoch, max_lr=base, min_lr=low, warmup_steps=self.warmup_steps,
                          total_steps=self.total_steps)
                for base, low in zip(self.base_lrs, self.min_lrs)]


SCHEDULES = {"cosine": cosine_lr, "linear": linear_lr}
DECAYS = {"cosine": cosine_decay, "linear": linear_decay}  # their curves after warmup, at a progress in [0, 1]



def lr_of_update(config: TrainConfig, step: int, budget_used: float = 0.0) -> float:
    """The LR of train()'s update `step`. Updates are numbered from 1, so the first one already learns
    (cosine_lr(0) is 0).

    With max_minutes it is the lower of that step schedule and the same decay laid over the time
    budget, at progress budget_used (the fraction of the budget used). While the budget is what ends
    the run, the step schedule's warmup leads for warmup_steps updates and the time curve after it;
    whichever limit ends the run, the LR has reached min_lr there."""
    schedule = SCHEDULES.get(config.schedule)
    if schedule is None:
        return config.lr
    lr = schedule(min(step, config.total_schedule_steps), max_lr=config.lr, min_lr=config.min_lr,
                  warmup_steps=config.warmup_steps, total_steps=config.total_schedule_steps)
    if config.max_minutes is None:
        return lr
    return min(lr, DECAYS[config.schedule](min(budget_used, 1.0), config.lr, config.min_lr))

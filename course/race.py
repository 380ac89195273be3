"""Timing training runs for the speedrun lesson (lesson 8).

train() reports tokens per second but not when each evaluation happened. ClockedBatches is a
``batches`` source for ``training.train`` that serves exactly the batches train() would draw on
its own (``training.batch_seed`` and ``training.get_batch``) and notes the clock whenever an update
asks for its first micro-batch, so a run's validation losses can be placed on a wall-clock axis.
"""

import time

import torch

import training


class ClockedBatches:
    """train(config, batches=ClockedBatches(corpus.train_ids, config, device)); then val_against_seconds()."""

    def __init__(self, data: torch.Tensor, config: training.TrainConfig, device: torch.device):
        self.data, self.config, self.device = data, config, device
        self.started: dict[int, float] = {}  # update -> time.perf_counter() when it asked for its first batch
        self.finished: float | None = None

    def __call__(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        if micro == 0:
            self.started.setdefault(step, time.perf_counter())
        generator = torch.Generator().manual_seed(training.batch_seed(self.config.seed, step, micro))
        return training.get_batch(self.data, self.config.batch_size, self.config.context_length, self.device,
                                  generator)

    def stop(self) -> None:
        """Call when train() has returned: the end of the last update and its evaluation."""
        self.finished = time.perf_counter()

    def seconds_after(self, step: int) -> float:
        """Seconds from the start of update 1 to the end of update `step` and of any evaluation after it
        (the next update's start; for the last update, stop())."""
        if not self.started or (step + 1 not in self.started and self.finished is None):
            raise ValueError(f"no clock reading after update {step}: call stop() when train() has returned")
        end = self.started.get(step + 1, self.finished)
        return end - self.started[min(self.started)]

    def val_against_seconds(self, history: list[dict]) -> list[tuple[float, float]]:
        """(seconds, val_loss) of every evaluation in a run's history."""
        return [(self.seconds_after(row["step"]), row["val_loss"]) for row in history if "val_loss" in row]

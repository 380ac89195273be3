"""Ready-made pieces the exercise notebooks use on the real corpus (not part of any answer)."""
from __future__ import annotations

import torch

import training


def make_train_step(model, optimizer, data, *, batch_size, context_length, generator=None, device="cpu"):
    """Return train_step(lr=None) -> float: one optimizer step on a fresh random batch.

    With `lr` given, every param group's learning rate is set to it first (what an LR
    finder needs). Returns the batch's loss before the step, as a Python float.
    """
    def train_step(lr=None):
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        model.train()
        x, y = training.get_batch(data, batch_size, context_length, device, generator)
        loss = training.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()
    return train_step


def make_evaluate(model, data, *, batch_size, context_length, batches, device="cpu"):
    """Return evaluate() -> float: mean loss on the same `batches` validation batches every call."""
    device = torch.device(device)

    def evaluate():
        return training.evaluate(model, data, batch_size=batch_size, context_length=context_length,
                                 batches=batches, device=device)
    return evaluate

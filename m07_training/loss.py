"""Lesson 1: the next-token loss, from scratch (checked against F.cross_entropy in tests/test_loss.py)."""
from __future__ import annotations

import math

import torch


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token loss: -log softmax(logits)[target], over positions whose target != ignore_index.

    logits: float [..., V]; targets: integer [...] with values in [0, V) or ignore_index.
    Computed as logsumexp(logits) - logits[target], with the max subtracted inside the
    logsumexp so exp() never overflows (stable for logits of magnitude 1e4 and more).
    Half-precision logits are upcast to float32, as F.cross_entropy does under autocast.
    """
    if not torch.is_tensor(logits) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {type(logits).__name__}"
                        + (f" of {logits.dtype}" if torch.is_tensor(logits) else ""))
    if not torch.is_tensor(targets) or targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError("targets must be an integer tensor of class indices")
    if logits.dim() < 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits [..., V] and targets [...] disagree: logits {tuple(logits.shape)}, "
                         f"targets {tuple(targets.shape)}")
    vocab = logits.shape[-1]
    if targets.device.type == "cpu":  # a range check on an accelerator would stall on a device sync
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
        if bad.any():
            raise ValueError(f"targets must be in [0, {vocab}) or ignore_index={ignore_index}; "
                             f"found {targets[bad][0].item()}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logits, targets = logits.reshape(-1, vocab), targets.reshape(-1)

    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # all -inf rows
    logsumexp = row_max.squeeze(-1) + (logits - row_max).exp().sum(dim=-1).log()
    keep = targets != ignore_index
    target_logit = logits.gather(1, torch.where(keep, targets, 0).unsqueeze(1)).squeeze(1)
    losses = (logsumexp - target_logit) * keep
    return losses.sum() / keep.sum()  # 0/0 = nan when every target is ignored, as in PyTorch


def perplexity(loss: float | torch.Tensor) -> float:
    """exp(mean cross-entropy in nats): the model is as unsure as a uniform choice among this many tokens."""
    loss = float(loss)
    if math.isnan(loss) or loss < 0:
        raise ValueError(f"loss must be a non-negative number, got {loss}")
    return math.exp(loss) if loss < 709.0 else math.inf  # exp overflows a double past ~709.78


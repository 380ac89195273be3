"""Lesson 4: gradient clipping by the global norm (checked against torch.nn.utils.clip_grad_norm_)."""
from __future__ import annotations

from collections.abc import Iterable

import torch


def clip_grad_norm(parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float,
                   eps: float = 1e-6) -> torch.Tensor:
    """Scale all gradients together so their global L2 norm is at most max_norm.

    The global norm is sqrt(sum over parameters of ||grad||^2); parameters without a
    gradient (frozen, unused) are skipped. Gradients are multiplied by
    min(1, max_norm / (norm + eps)): untouched when the norm is below max_norm, and the
    min() keeps the decision on the device (no host sync). Returns the norm before clipping.
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
        raise ValueError(f"max_norm must be a positive number, got {max_norm!r}")
    if torch.is_tensor(parameters):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    scale = torch.clamp(max_norm / (total_norm + eps), max=1.0)
    torch._foreach_mul_(grads, scale)
    return total_norm


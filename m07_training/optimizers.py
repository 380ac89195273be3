"""Lesson 2: optimizers from scratch, as torch.optim.Optimizer subclasses.

Each has a readable per-parameter loop and a multi-tensor (torch._foreach_*) path that does the
same arithmetic on all tensors at once; tests/test_optimizers.py checks both against torch.optim.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch



def check_hyper(name: str, value: float, low: float = 0.0, high: float = math.inf) -> None:
    """Refuse a hyperparameter outside [low, high), naming it (a bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
        raise ValueError(f"{name} must be a number in [{low}, {high}), got {value!r}")


class GroupwiseOptimizer(torch.optim.Optimizer):
    """torch.optim.Optimizer's step() contract (an optional closure that recomputes the loss,
    no autograd), updating one param group at a time with the subclass's _step_group."""

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        raise NotImplementedError


class SGD(GroupwiseOptimizer):
    """Stochastic gradient descent with optional momentum and (coupled, L2) weight decay.

    Per parameter p with gradient g:   g <- g + weight_decay * p
                                       buf <- g (first step) or momentum * buf + g
                                       p <- p - lr * buf      (buf = g when momentum = 0)
    Same update as torch.optim.SGD (dampening 0, no Nesterov).
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 foreach: bool = False):
        check_hyper("lr", lr)
        check_hyper("momentum", momentum, 0.0, 1.0)
        check_hyper("weight_decay", weight_decay)
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=foreach))

    def _step_group(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if params:
            (self._step_foreach if group["foreach"] else self._step_loop)(group, params)

    def _step_loop(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        for p in params:
            grad = p.grad
            if weight_decay:
                grad = grad.add(p, alpha=weight_decay)
            if momentum:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone()
                else:
                    state["momentum_buffer"].mul_(momentum).add_(grad)
                grad = state["momentum_buffer"]
            p.add_(grad, alpha=-lr)

    def _step_foreach(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        grads = [p.grad for p in params]
        if weight_decay:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        if momentum:
            fresh = [p for p in params if "momentum_buffer" not in self.state[p]]
            if fresh:  # first step: the buffer starts as the gradient itself
                for p, g in zip(params, grads):
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = g.clone()
                if len(fresh) < len(params):
                    raise RuntimeError("SGD(foreach=True) needs all parameters of a group to start together")
            else:
                bufs = [self.state[p]["momentum_buffer"] for p in params]
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, grads)
            grads = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_add_(params, grads, alpha=-lr)


class AdamW(GroupwiseOptimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as torch.optim.AdamW.

    Per parameter p with gradient g, at step t = 1, 2, ...:
        p <- p * (1 - lr * weight_decay)           decay the weight itself, not the gradient
        m <- beta1 * m + (1 - beta1) * g           running mean of gradients
        v <- beta2 * v + (1 - beta2) * g^2         running mean of squared gradients
        m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t)   bias correction: m, v start at 0
        p <- p - lr * m_hat / (sqrt(v_hat) + eps)
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, foreach: bool = False):
        check_hyper("lr", lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        check_hyper("betas[0]", betas[0], 0.0, 1.0)
        check_hyper("betas[1]", betas[1], 0.0, 1.0)
        check_hyper("eps", eps)
        check_hyper("weight_decay", weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      foreach=foreach))

    def _step_group(self, group: dict) -> None:
        self._adamw_group(group)

    def _adamw_group(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
        if params:
            (self._step_foreach if group["foreach"] else self._step_loop)(group, params)

    def _step_loop(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in params:
            state = self.state[p]
            m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
            p.mul_(1 - lr * weight_decay)
            m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            bias_correction1 = 1 - beta1 ** t
            bias_correction2 = 1 - beta2 ** t
            denom = (v.sqrt() / math.sqrt(bias_correction2)).add_(eps)
            p.addcdiv_(m, denom, value=-lr / bias_correction1)

    def _step_foreach(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        # Parameters added at different times may be at different steps: update each step count together.
        by_step: dict[int, list[torch.Tensor]] = {}
        for p in params:
            by_step.setdefault(self.state[p]["step"], []).append(p)
        for t, ps in by_step.items():
            grads = [p.grad for p in ps]
            ms = [self.state[p]["exp_avg"] for p in ps]
            vs = [self.state[p]["exp_avg_sq"] for p in ps]
            torch._foreach_mul_(ps, 1 - lr * weight_decay)
            torch._foreach_mul_(ms, beta1)
            torch._foreach_add_(ms, grads, alpha=1 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_div_(denom, math.sqrt(1 - beta2 ** t))
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(ps, ms, denom, value=-lr / (1 - beta1 ** t))



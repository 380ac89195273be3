"""Lesson 8: Muon, momentum orthogonalised by Newton-Schulz (checked against torch.optim.Muon in
tests/test_muon.py), and MuonWithAdamW, the optimizer `python training.py` trains with."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .devices import has_native_bf16, unwrap
from .optimizers import AdamW, GroupwiseOptimizer, check_hyper

# Newton-Schulz coefficients of Keller Jordan's Muon (torch.optim.Muon's defaults): a quintic
# with a steep slope at 0, so that 5 steps lift even small singular values close to 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def newton_schulz_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype Muon's Newton-Schulz iteration runs in: 'fp32', 'bf16', or 'auto', which is
    bf16 where bf16 matmuls are native (has_native_bf16: CUDA, compute capability >= 8.0) and
    fp32 elsewhere: CPUs without bf16 hardware run bf16 matmuls several times slower than fp32."""
    if name == "auto":
        return torch.bfloat16 if has_native_bf16(device) else torch.float32
    if name not in NS_DTYPES:
        raise ValueError(f"ns_dtype must be one of {['auto', *NS_DTYPES]}, got {name!r}")
    return NS_DTYPES[name]


def newton_schulz(matrix: torch.Tensor, steps: int = 5, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = 1e-7, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthogonalise a matrix [A, B] (or a batch [N, A, B]) approximately: U S V^T -> U S' V^T, S' ~ 1.

    Dividing by the Frobenius norm (>= the largest singular value) puts every singular value in
    [0, 1]; each step X <- a X + (b G + c G^2) X with G = X X^T then maps every singular value s
    to a s + b s^3 + c s^5 and leaves the singular vectors alone. With the default coefficients,
    5 steps take any s above ~1e-3 into about [0.7, 1.2] (tests/test_muon.py computes the band).
    Runs in `dtype` on the wide orientation (A <= B, the smaller Gram matrix); returns matrix's dtype.
    """
    a, b, c = coefficients
    x = matrix.to(dtype)
    tall = matrix.size(-2) > matrix.size(-1)
    if tall:
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    multiply_add = torch.addmm if x.dim() == 2 else torch.baddbmm  # beta * input + alpha * m1 @ m2
    for _ in range(steps):
        gram = x @ x.mT
        x = multiply_add(x, multiply_add(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.mT if tall else x).to(matrix.dtype)


class Muon(GroupwiseOptimizer):
    """Momentum orthogonalised by Newton-Schulz, for 2-D hidden weight matrices; as torch.optim.Muon.

    Per matrix W [A, B] with gradient G (the buffer M starts at 0):
        M <- momentum * M + (1 - momentum) * G
        U  = (1 - momentum) * G + momentum * M      Nesterov look-ahead (U = M when nesterov=False)
        W <- W * (1 - lr * weight_decay)            decoupled weight decay
        W <- W - lr * scale(A, B) * newton_schulz(U)
    A gradient matrix is dominated by a few directions; orthogonalising its momentum gives every
    direction the same step size. newton_schulz(U) has RMS ~ 1/sqrt(max(A, B)), hence the scale:
      'match_rms_adamw' (our default; Moonshot's "Muon is Scalable for LLM Training"):
          rms * sqrt(max(A, B)), so the update has RMS ~ rms * lr. With rms=0.2, about AdamW's,
          Muon uses AdamW's LR, schedule and weight decay: the one LR that train() sets on every
          param group suits both rules of MuonWithAdamW.
      'original' (Keller Jordan; torch's default): sqrt(max(1, A / B)); needs its own LR (~0.02).
    ns_dtype: 'auto' (bf16 on CUDA with compute capability >= 8.0, else fp32), 'fp32' or 'bf16'
    (torch.optim.Muon always iterates in bf16). foreach=True updates the buffers with multi-tensor
    kernels and orthogonalises all matrices of one shape in a single batched iteration.
    """

    ADJUST_LR = ("match_rms_adamw", "original")

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.1, adjust_lr: str = "match_rms_adamw", rms: float = 0.2,
                 ns_steps: int = 5, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                 eps: float = 1e-7, ns_dtype: str = "auto", foreach: bool = False):
        check_hyper("lr", lr)
        check_hyper("momentum", momentum, 0.0, 1.0)
        check_hyper("weight_decay", weight_decay)
        check_hyper("rms", rms)
        check_hyper("eps", eps)
        if not isinstance(nesterov, bool):
            raise ValueError(f"nesterov must be a bool, got {nesterov!r}")
        if adjust_lr not in self.ADJUST_LR:
            raise ValueError(f"adjust_lr must be one of {list(self.ADJUST_LR)}, got {adjust_lr!r}")
        if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or not 1 <= ns_steps < 100:
            raise ValueError(f"ns_steps must be an int in [1, 100), got {ns_steps!r}")
        if not (isinstance(ns_coefficients, (tuple, list)) and len(ns_coefficients) == 3
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in ns_coefficients)):
            raise ValueError(f"ns_coefficients must be three numbers (a, b, c), got {ns_coefficients!r}")
        if ns_dtype != "auto" and ns_dtype not in NS_DTYPES:
            raise ValueError(f"ns_dtype must be one of {['auto', *NS_DTYPES]}, got {ns_dtype!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      adjust_lr=adjust_lr, rms=rms, ns_steps=ns_steps,
                                      ns_coefficients=tuple(ns_coefficients), eps=eps, ns_dtype=ns_dtype,
                                      foreach=foreach))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D weight matrices only, got a parameter of shape "
                                     f"{list(p.shape)}; give biases, norms and embeddings to AdamW "
                                     f"(split_params_for_muon, MuonWithAdamW)")

    def _step_group(self, group: dict) -> None:
        self._muon_group(group)

    def _muon_group(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        if params:
            (self._muon_foreach if group["foreach"] else self._muon_loop)(group, params)

    @staticmethod
    def _orthogonalise(group: dict, update: torch.Tensor) -> torch.Tensor:
        return newton_schulz(update, group["ns_steps"], group["ns_coefficients"], group["eps"],
                             newton_schulz_dtype(group["ns_dtype"], update.device))

    @staticmethod
    def _lr_scale(group: dict, shape: torch.Size) -> float:
        rows, cols = shape
        if group["adjust_lr"] == "original":
            return math.sqrt(max(1, rows / cols))
        return group["rms"] * math.sqrt(max(rows, cols))

    def _muon_loop(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        for p in params:
            buf = self.state[p]["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)
            update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
            p.mul_(1 - lr * weight_decay)
            p.add_(self._orthogonalise(group, update), alpha=-lr * self._lr_scale(group, p.shape))

    def _muon_foreach(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        grads = [p.grad for p in params]
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_lerp_(bufs, grads, 1 - momentum)
        updates = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
        torch._foreach_mul_(params, 1 - lr * weight_decay)
        same_shape: dict[tuple, list[int]] = {}  # one batched Newton-Schulz per shape: fewer, larger matmuls
        for i, p in enumerate(params):
            same_shape.setdefault((p.shape, p.dtype, p.device), []).append(i)
        for (shape, _, _), index in same_shape.items():
            orthogonal = self._orthogonalise(group, torch.stack([updates[i] for i in index])).unbind(0)
            torch._foreach_add_([params[i] for i in index], orthogonal, alpha=-lr * self._lr_scale(group, shape))


class MuonWithAdamW(Muon, AdamW):
    """Muon for the hidden matrices and AdamW for every other parameter, as one optimizer.

    One object, so the training loop, GradScaler, gradient clipping and checkpoints (one
    state_dict) handle it like any other optimizer. Each param group carries a flag `muon`
    that picks its rule; Muon groups get Muon's settings, AdamW groups AdamW's. Both share
    lr and weight_decay: with adjust_lr='match_rms_adamw' one LR schedule suits both rules.
    muon_params and adamw_params are iterables of tensors or of param-group dicts.
    """

    def __init__(self, muon_params, adamw_params, *, lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, momentum: float = 0.95,
                 nesterov: bool = True, adjust_lr: str = "match_rms_adamw", rms: float = 0.2, ns_steps: int = 5,
                 ns_dtype: str = "auto", foreach: bool = False):
        # Each rule builds its groups with its own defaults and checks (Muon refuses non-2-D tensors).
        muon = Muon(muon_params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                    adjust_lr=adjust_lr, rms=rms, ns_steps=ns_steps, ns_dtype=ns_dtype, foreach=foreach)
        adamw = AdamW(adamw_params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach)
        groups = ([{**group, "muon": True} for group in muon.param_groups]
                  + [{**group, "muon": False} for group in adamw.param_groups])
        torch.optim.Optimizer.__init__(self, groups, {})

    def _step_group(self, group: dict) -> None:
        (self._muon_group if group["muon"] else self._adamw_group)(group)


def split_params_for_muon(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """A model's trainable parameters as (hidden matrices, other matrices, vectors).

    Hidden matrices, the 2-D weights that transform one hidden vector into another (attention
    and MLP), are Muon's. Embeddings (a table looked up by row, not a linear map of the hidden
    state), the LM head (its output is a distribution, tied or not to the embedding) and any
    other non-2-D tensor are the "other matrices", for AdamW with weight decay; biases and norm
    gains are the vectors, for AdamW without. A shared (tied) tensor appears once.
    """
    model = unwrap(model)
    outer = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    head = getattr(model, "lm_head", None)
    if head is not None:
        outer |= {id(p) for p in head.parameters()}
    hidden, matrices, vectors = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2:
            vectors.append(p)
        elif p.dim() == 2 and id(p) not in outer:
            hidden.append(p)
        else:
            matrices.append(p)
    return hidden, matrices, vectors


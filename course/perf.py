"""Measuring speed honestly: timers that wait for the device, model FLOPs per token, and a
device's peak matmul throughput *measured here* (not read off a spec sheet).

Used by lesson 06 and benchmarks/run.py.
"""
import statistics
import time

import torch

__all__ = ["synchronize", "time_call", "training_flops_per_token", "measure_matmul_flops", "mfu"]


def synchronize(device):
    """Wait until queued GPU work is done: CUDA and MPS run asynchronously, so a timer
    stopped before this would measure only how fast Python queued the work."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_call(fn, device, *, warmup=2, repeats=5):
    """Median seconds of fn() over `repeats` calls, after `warmup` untimed calls."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_flops_per_token(model, context_length=None):
    """FLOPs to train on one token: 6 N + 12 L d T (the estimate of the PaLM paper, appendix B).

    N counts the weights that take part in a matmul: the weights of the nn.Linear layers, the
    LM head included (tied to the token embedding or not); embeddings are table lookups, and
    biases and LayerNorm gains are elementwise (a few FLOPs each, left out).
    Each such weight costs 2 FLOPs per token forward (multiply + add) and 4 backward
    (gradients of the input and of the weight): 6 N. Attention adds the two T x T matmuls
    (scores Q K^T and scores x V) of every layer: 2 * 2 * d * T forward per token, times 3
    for training = 12 L d T, counted without the causal mask's saving.
    """
    config = model.config
    T = context_length or config.context_length
    if not 1 <= T <= config.context_length:
        raise ValueError(f"context_length must be in [1, {config.context_length}], got {T}")
    weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)}
    n_matmul = sum(w.numel() for w in weights.values())
    return 6 * n_matmul + 12 * config.n_layers * config.d_model * T


def measure_matmul_flops(device, dtype=torch.float32, size=None, repeats=5):
    """FLOP/s of a large square matmul on `device`: the practical peak for dense math here.

    A size x size matmul does 2 * size^3 FLOPs. The default size is big enough to keep the
    device busy (1024 on CPU, 4096 on a GPU) while taking well under a second.
    """
    device = torch.device(device)
    size = size or (1024 if device.type == "cpu" else 4096)
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device, dtype)
    b = torch.randn(size, size, generator=generator).to(device, dtype)
    seconds = time_call(lambda: a @ b, device, warmup=2, repeats=repeats)
    return 2 * size ** 3 / seconds


def mfu(tokens_per_second, flops_per_token, peak_flops):
    """Model-FLOPs utilisation: the fraction of the peak that the model's own math uses."""
    if not peak_flops > 0:
        raise ValueError(f"peak_flops must be > 0, got {peak_flops!r}")
    return tokens_per_second * flops_per_token / peak_flops

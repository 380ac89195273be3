"""Lesson 4: where a model runs and in what precision: the device, the autocast dtype (bf16 only where
the hardware has it), and the plain model inside the wrappers (DDP, torch.compile) put around it."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


def as_device(device: str | torch.device) -> torch.device:
    """A torch.device that exists on this machine, or a ValueError that says which ones do."""
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
        return as_device(prefer)
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



def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model

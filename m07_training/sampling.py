"""Lesson 5: text from a trained model."""
from __future__ import annotations

import torch
import torch.nn as nn

from .data import CharTokenizer
from .devices import unwrap


def sample_text(model: nn.Module, tokenizer: CharTokenizer, chars: int, *, prompt: str = "\n",
                temperature: float = 0.8, top_k: int | None = None, seed: int = 0) -> str:
    """Generate `chars` characters after `prompt` with a seeded generator (reproducible)."""
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("prompt must be a non-empty string: the model needs at least one character to go on from")
    device = next(model.parameters()).device
    idx = tokenizer.encode(prompt).unsqueeze(0).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = unwrap(model).generate(idx, chars, temperature=temperature, top_k=top_k, generator=generator)
    return tokenizer.decode(out[0, len(prompt):])

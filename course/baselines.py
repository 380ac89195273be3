"""The character frequencies a language model's predictions are read against (lesson 3).

A model that has learnt only how often each token occurs, and nothing about which follows which, predicts
these frequencies at every position; its loss on the text they come from is their entropy, the unigram loss
(`training.unigram_loss`).
"""

import torch

__all__ = ["character_frequencies"]


def character_frequencies(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """How often each of the vocab_size token ids occurs in ids: float64 on the CPU (MPS has no float64)."""
    counts = torch.bincount(ids.flatten().cpu(), minlength=vocab_size).double()
    return counts / counts.sum()

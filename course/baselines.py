"""Reference losses a language model's loss is read against (lessons 3 and 5).

A model that has learnt only how often each token occurs, and nothing about which follows which, predicts
the token frequencies at every position. Its loss on the text the frequencies come from is their entropy.
"""

import torch

__all__ = ["character_frequencies", "frequency_loss"]


def character_frequencies(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """How often each of the vocab_size token ids occurs in ids: float64 on the CPU (MPS has no float64)."""
    counts = torch.bincount(ids.flatten().cpu(), minlength=vocab_size).double()
    return counts / counts.sum()


def frequency_loss(ids: torch.Tensor, vocab_size: int) -> float:
    """Entropy -sum_c p_c ln p_c of the token frequencies in ids, in nats per token."""
    p = character_frequencies(ids, vocab_size)
    p = p[p > 0]  # tokens that never occur contribute 0 ln 0 = 0
    return -(p * p.log()).sum().item()

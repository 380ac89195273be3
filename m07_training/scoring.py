"""An honest evaluation: score every character of a text once, each with enough history.

evaluate() (loop.py) estimates the loss from a few random batches: cheap, good for watching a run,
but noisy, and it averages characters seen with 1 to context_length characters of history. To
compare a model with another (or with counting, ngram.py) score_text() predicts the WHOLE text
with a sliding window: every character except the first `min_history` exactly once, each with at
least `min_history` characters before it, and reports the mean with its standard error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .devices import as_device, autocast

STDERR_BLOCKS = 100  # contiguous blocks the standard error is computed over


@dataclass(frozen=True)
class Score:
    """The mean loss over a text's scored characters, and how sure it is.

    loss: mean nats per character; stderr: standard error of that mean, over contiguous blocks
    (see from_losses); characters: how many were scored; min_history: the fewest characters of
    history any of them had (the first min_history characters of the text are not scored).
    """
    loss: float
    stderr: float
    characters: int
    min_history: int
    blocks: int

    @classmethod
    def from_losses(cls, losses: np.ndarray, *, min_history: int, blocks: int = STDERR_BLOCKS) -> "Score":
        """The Score of per-character losses in text order.

        Neighbouring characters' losses are correlated (a hard word is hard for several characters),
        so the usual std/sqrt(n) would be too small. The text's losses are cut into `blocks`
        contiguous blocks (fewer if there are fewer characters) and stderr is the standard error of
        the block means: std(block means, ddof=1) / sqrt(blocks). NaN with fewer than 2 blocks.
        """
        losses = np.asarray(losses, dtype=np.float64).reshape(-1)
        if len(losses) == 0:
            raise ValueError("no characters to score")
        blocks = min(blocks, len(losses))
        means = np.array([block.mean() for block in np.array_split(losses, blocks)])
        stderr = float(means.std(ddof=1) / math.sqrt(blocks)) if blocks >= 2 else math.nan
        return cls(float(losses.mean()), stderr, len(losses), min_history, blocks)

    @property
    def bits_per_character(self) -> float:
        return self.loss / math.log(2)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def __str__(self) -> str:
        return (f"{self.loss:.3f} ± {self.stderr:.3f} nats/char ({self.bits_per_character:.3f} bits) over "
                f"{self.characters:,} characters")


def default_min_history(context_length: int) -> int:
    """context_length // 2 (at least 1): the history every scored character gets by default."""
    return max(1, context_length // 2)


def scored_characters(length: int, min_history: int) -> int:
    """How many characters of a `length`-character text are scored: all but the first min_history.
    A ValueError when min_history is not a positive int or the text has nothing to score."""
    if isinstance(min_history, bool) or not isinstance(min_history, int) or min_history < 1:
        raise ValueError(f"min_history must be a positive int, got {min_history!r}")
    if length <= min_history:
        raise ValueError(f"the text has {length} characters: too few to score any with min_history="
                         f"{min_history} characters of history (need at least {min_history + 1})")
    return length - min_history


def window_starts(length: int, *, context_length: int, min_history: int) -> tuple[np.ndarray, int]:
    """(starts, window): where score_text's windows begin, and their length.

    window = min(context_length, length - 1); a window starting at s reads ids[s:s + window] and
    predicts ids[s + 1:s + window + 1]. Windows start every stride = window - min_history + 1
    characters, plus a last one that ends at the text's last character; each predicts only the
    characters no earlier window did, so character t (t >= min_history) is predicted once, from
    ids[s:t] with s = min(((t - min_history) // stride) * stride, length - 1 - window).
    """
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
        raise ValueError(f"context_length must be a positive int, got {context_length!r}")
    scored_characters(length, min_history)
    window = min(context_length, length - 1)
    if min_history > window:
        raise ValueError(f"min_history={min_history} is more than the {window}-character window "
                         f"(context_length={context_length}, a {length}-character text)")
    stride = window - min_history + 1
    starts = np.arange(0, length - window, stride)
    if starts[-1] != length - 1 - window:
        starts = np.append(starts, length - 1 - window)
    return starts, window


@torch.no_grad()
def character_losses(model: nn.Module, ids: torch.Tensor | np.ndarray, *, context_length: int,
                     device: str | torch.device, dtype: torch.dtype = torch.float32, batch_size: int = 64,
                     min_history: int | None = None) -> np.ndarray:
    """The loss (nats) of each of ids[min_history:], in text order, as score_text predicts them."""
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long).reshape(-1)
    min_history = default_min_history(context_length) if min_history is None else min_history
    starts, window = window_starts(len(ids), context_length=context_length, min_history=min_history)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = as_device(device)
    ids = ids.to(device)
    # window i predicts targets starts[i] + 1 + j; keep those after the previous window's last one
    starts = torch.from_numpy(starts).to(device)
    previous_end = torch.cat([starts.new_tensor([min_history - 1]), starts[:-1] + window])
    offsets = torch.arange(window + 1, device=device)
    was_training = model.training
    model.eval()
    losses = []
    try:
        for first in range(0, len(starts), batch_size):
            s = starts[first:first + batch_size]
            windows = ids[s.unsqueeze(1) + offsets]
            with autocast(device, dtype):
                logits = model(windows[:, :-1])
            loss = F.cross_entropy(logits.float().transpose(1, 2), windows[:, 1:], reduction="none")
            keep = (s.unsqueeze(1) + 1 + offsets[:-1]) > previous_end[first:first + batch_size].unsqueeze(1)
            losses.append(loss[keep].double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(losses).numpy()


def score_text(model: nn.Module, ids: torch.Tensor | np.ndarray, *, context_length: int,
               device: str | torch.device, dtype: torch.dtype = torch.float32, batch_size: int = 64,
               min_history: int | None = None) -> Score:
    """Score a whole text (e.g. the validation ids) with `model`: mean nats per character and its error.

    Every character except the first min_history (default context_length // 2) is predicted exactly
    once, with at least min_history characters of history, by a sliding window of context_length
    (window_starts says which window predicts which character); deterministic: no sampling.
    batch_size windows go through the model at a time, under torch.no_grad() and in eval mode
    (the model's mode is restored afterwards), in autocast `dtype`; losses are taken in float32.
    A text shorter than the context is read as one window. ValueError when the text has no more
    than min_history characters. stderr comes from STDERR_BLOCKS contiguous blocks (Score.from_losses).
    """
    min_history = default_min_history(context_length) if min_history is None else min_history
    losses = character_losses(model, ids, context_length=context_length, device=device, dtype=dtype,
                              batch_size=batch_size, min_history=min_history)
    return Score.from_losses(losses, min_history=min_history)

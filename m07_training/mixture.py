"""The network and counting together: predict with p = (1 - w) p_gpt + w p_ngram.

A small GPT after a few CPU minutes and a Kneser-Ney 8-gram make different mistakes: the GPT
generalises across similar contexts, the counts remember long exact strings. Their average
(weight w on the counts) predicts better than either. w is one number, fitted where neither
model is scored: count_for_mixing() counts the n-grams of the training split except HELD_OUT
pieces spread over it (so the counts have not seen them), and fit_weight() picks the w that
predicts those pieces best. The validation split is never looked at until it is scored.

The counting is part of what the method builds: train() does it inside the run's time budget
(TrainConfig.mix_order; the command line's default is 8, train()'s 0: off).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from .ngram import KneserNey, check_order, versus_ladder
from .scoring import Score, character_losses, default_min_history

HELD_OUT_PIECES = 25        # pieces of the training split the counts leave out, to fit w on
PIECE_CHARS = 2000          # their length, at most; 25 x 2,000 is about 1% of the plays' training split
MIN_SCORED_PER_PIECE = 16   # a piece shorter than min_history + this would fit w on too little
WEIGHT_GRID = np.linspace(0.0, 1.0, 101)  # w is chosen to 0.01; the loss is flat near its minimum


def mixed_losses(net_losses: np.ndarray, ngram_losses: np.ndarray, weight: float) -> np.ndarray:
    """Per-character loss of the mixture, -ln((1 - w) e^-a + w e^-b), from the two models' losses a, b of
    the same characters (only the probability each gives the true character matters)."""
    a, b = np.asarray(net_losses, dtype=np.float64), np.asarray(ngram_losses, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"the two models scored different characters ({a.shape} and {b.shape})")
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight!r}")
    # log-sum-exp, so that a loss of hundreds of nats does not underflow to ln 0
    with np.errstate(divide="ignore"):
        return -np.logaddexp(np.log1p(-weight) - a, np.log(weight) - b)


def fit_weight(net_losses: np.ndarray, ngram_losses: np.ndarray) -> float:
    """The w in WEIGHT_GRID whose mixture has the lowest mean loss on these characters."""
    means = [mixed_losses(net_losses, ngram_losses, weight).mean() for weight in WEIGHT_GRID]
    return float(WEIGHT_GRID[int(np.argmin(means))])


def held_out_starts(length: int, min_history: int) -> tuple[np.ndarray, int]:
    """(starts, piece): up to HELD_OUT_PIECES pieces of `piece` characters spread evenly over a text of
    `length`, together at most half of it (about 1% of the plays' training split). ValueError when the
    text cannot spare even one piece that scores MIN_SCORED_PER_PIECE characters."""
    piece = max(min(PIECE_CHARS, length // (2 * HELD_OUT_PIECES)), min_history + MIN_SCORED_PER_PIECE)
    pieces = min(HELD_OUT_PIECES, length // (2 * piece))
    if pieces == 0:
        raise ValueError(f"the training split has {length:,} characters: too few to hold out a piece of "
                         f"{piece} characters to fit the mixing weight on; use --mix-order 0")
    return np.linspace(0, length - piece, pieces).astype(np.int64), piece


@dataclass(frozen=True)
class Counting:
    """The n-gram model a run mixes with: counted from its training split except the held-out pieces."""
    ngram: KneserNey
    starts: np.ndarray   # where the held-out pieces start in the training ids
    piece: int           # their length
    min_history: int     # the history every scored character has (score_text's)
    seconds: float       # how long counting took (inside the run's time budget)

    def pieces(self, train_ids: torch.Tensor | np.ndarray) -> list[np.ndarray]:
        ids = np.asarray(train_ids)
        return [ids[start:start + self.piece] for start in self.starts]


def check_mixing(order: int, vocab_size: int, train_length: int, context_length: int) -> None:
    """Raise ValueError now, before a run starts, if an order-`order` mix cannot be built for this corpus."""
    check_order(order, vocab_size)
    held_out_starts(train_length, default_min_history(context_length))


def count_for_mixing(train_ids: torch.Tensor | np.ndarray, vocab_size: int, order: int,
                     context_length: int) -> Counting:
    """Count an order-`order` Kneser-Ney model on the training ids without the held-out pieces.
    Cutting them out joins their neighbours: 25 seams add a few hundred n-grams that are not in the
    text, against millions that are."""
    started = time.perf_counter()
    ids = np.asarray(train_ids)
    min_history = default_min_history(context_length)
    starts, piece = held_out_starts(len(ids), min_history)
    keep = np.ones(len(ids), dtype=bool)
    for start in starts:
        keep[start:start + piece] = False
    ngram = KneserNey.fit(ids[keep], order, vocab_size)
    return Counting(ngram, starts, piece, min_history, time.perf_counter() - started)


@dataclass(frozen=True)
class MixedScore:
    """A network, the counts and their mixture, each scored on the same characters of a text."""
    network: Score
    counting: Score
    mixed: Score
    gain: Score          # per-character (network - mixed): its mean and standard error, paired
    weight: float        # w, the counts' share
    order: int
    fit_seconds: float   # fitting w (scoring the held-out pieces with the network)


def score_mixed(model: nn.Module, counting: Counting, train_ids: torch.Tensor | np.ndarray,
                ids: torch.Tensor | np.ndarray, *, context_length: int, device: str | torch.device,
                dtype: torch.dtype = torch.float32) -> MixedScore:
    """Fit w on the held-out pieces of train_ids, then score `ids` (the validation split) with the network,
    the counts and the mixture, every character once with score_text's convention."""
    started = time.perf_counter()
    scoring = dict(context_length=context_length, device=device, dtype=dtype, min_history=counting.min_history)
    pieces = counting.pieces(train_ids)
    weight = fit_weight(np.concatenate([character_losses(model, piece, **scoring) for piece in pieces]),
                        np.concatenate([counting.ngram.character_losses(piece, min_history=counting.min_history)
                                        for piece in pieces]))
    fit_seconds = time.perf_counter() - started
    net = character_losses(model, ids, **scoring)
    counts = counting.ngram.character_losses(ids, min_history=counting.min_history)
    mixed = mixed_losses(net, counts, weight)
    score = lambda losses: Score.from_losses(losses, min_history=counting.min_history)  # noqa: E731
    return MixedScore(score(net), score(counts), score(mixed), score(net - mixed), weight, counting.ngram.order,
                      fit_seconds)


def describe_mixed(score: MixedScore, counting: Counting, ladder: dict[int, Score]) -> str:
    """The CLI's line for a mixed score."""
    direction = "below" if score.gain.loss >= 0 else "above"
    return (f"mixed with the Kneser-Ney {score.order}-gram (counted in {counting.seconds:.0f} s, inside the run's "
            f"time, from the training split less {len(counting.starts)} held-out pieces; weight {score.weight:.2f} "
            f"on the counts, fitted on those pieces in {score.fit_seconds:.1f} s): {score.mixed}, "
            f"{abs(score.gain.loss):.3f} ± {score.gain.stderr:.3f} {direction} the network alone; on the counting "
            f"ladder it {versus_ladder(score.mixed.loss, ladder)}")

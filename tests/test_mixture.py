"""Mixing the network with counting: the mixture's loss, the weight fitted off the validation split,
the held-out pieces the counts never see, and a run that counts inside its time budget."""
from pathlib import Path

import numpy as np
import pytest
import torch

import training
from m07_training.mixture import (HELD_OUT_PIECES, check_mixing, count_for_mixing, fit_weight, held_out_starts,
                                  mixed_losses)
from m07_training.ngram import KneserNey


def test_mixed_losses_average_the_probabilities_of_the_true_character():
    net, counts = np.array([0.5, 2.0, 7.0]), np.array([1.5, 0.1, 3.0])
    expected = -np.log(0.7 * np.exp(-net) + 0.3 * np.exp(-counts))
    np.testing.assert_allclose(mixed_losses(net, counts, 0.3), expected, rtol=1e-12)


@pytest.mark.parametrize("weight, side", [(0.0, "net"), (1.0, "counts")])
def test_a_weight_at_either_end_is_that_model_alone(weight, side):
    net, counts = np.array([0.5, 2.0, 900.0]), np.array([1.5, 0.1, 3.0])
    np.testing.assert_allclose(mixed_losses(net, counts, weight), {"net": net, "counts": counts}[side])


def test_huge_losses_do_not_underflow():
    # e^-900 is 0 in float64; the log-sum-exp keeps the other model's share
    assert mixed_losses(np.array([900.0]), np.array([1000.0]), 0.5)[0] == pytest.approx(900 + np.log(2))


def test_the_two_models_must_score_the_same_characters():
    with pytest.raises(ValueError, match="different characters"):
        mixed_losses(np.zeros(3), np.zeros(4), 0.5)
    with pytest.raises(ValueError, match=r"weight must be in \[0, 1\]"):
        mixed_losses(np.zeros(3), np.zeros(3), 1.5)


def test_fit_weight_finds_the_best_mixture_on_the_grid():
    rng = np.random.default_rng(0)
    net, counts = rng.exponential(1.5, 5000), rng.exponential(1.5, 5000)
    weight = fit_weight(net, counts)
    best = mixed_losses(net, counts, weight).mean()
    for other in np.linspace(0, 1, 11):
        assert best <= mixed_losses(net, counts, other).mean() + 1e-12
    assert fit_weight(net, net + 1.0) == 0.0  # counts that are always worse get no weight


def test_held_out_pieces_are_spread_and_leave_most_of_the_text():
    starts, piece = held_out_starts(4_000_000, min_history=32)
    assert (len(starts), piece) == (HELD_OUT_PIECES, 2000)
    assert starts[0] == 0 and starts[-1] == 4_000_000 - piece and np.all(np.diff(starts) > piece)
    starts, piece = held_out_starts(10_000, min_history=32)  # a short text: smaller pieces, at most half of it
    assert len(starts) * piece <= 5_000 and piece >= 32 + 16


def test_a_text_too_short_to_spare_a_piece_is_refused():
    with pytest.raises(ValueError, match="too few to hold out a piece.*--mix-order 0"):
        held_out_starts(60, min_history=32)


def test_the_counts_never_see_the_held_out_pieces():
    tokenizer = training.CharTokenizer("abcdefghijklmnopqrstuvwxyz XYZ")
    letters = tokenizer.encode("abcdefghijklmnopqrstuvwxyz ").numpy()
    ids = np.random.default_rng(1).choice(letters, 40_000)  # X, Y and Z only where planted
    starts, piece = held_out_starts(len(ids), min_history=32)
    ids[starts[3] + 100:starts[3] + 106] = tokenizer.encode("XYZXYZ").numpy()  # inside a held-out piece
    counting = count_for_mixing(torch.from_numpy(ids), tokenizer.vocab_size, 3, context_length=64)
    x = tokenizer.stoi["X"]
    assert x in KneserNey.fit(ids, 3, tokenizer.vocab_size).levels[0].grams
    assert x not in counting.ngram.levels[0].grams
    assert [len(p) for p in counting.pieces(ids)] == [piece] * len(starts)


def test_check_mixing_names_what_cannot_be_built():
    with pytest.raises(ValueError, match="overflow int64"):
        check_mixing(20, 65, 1_000_000, 64)
    with pytest.raises(ValueError, match="--mix-order 0"):
        check_mixing(8, 65, 60, 64)


def test_a_run_counts_inside_its_budget_and_the_mixture_beats_the_network(tiny_train_config, one_thread):
    result = training.train(tiny_train_config(mix_order=5, max_steps=40))
    assert result.counting is not None and result.counting.ngram.order == 5 and result.counting.seconds > 0
    training.load_checkpoint(result.best_checkpoint, result.model)
    scored = training.score_mixed(result.model, result.counting, result.corpus.train_ids, result.corpus.val_ids,
                                  context_length=32, device="cpu")
    alone = training.score_text(result.model, result.corpus.val_ids, context_length=32, device="cpu")
    assert scored.network.loss == pytest.approx(alone.loss, abs=1e-6)
    assert scored.network.characters == scored.mixed.characters == scored.counting.characters
    # after 40 updates the 5-gram is far better than the network: the weight goes to the counts, and the
    # mixture is no worse than either model
    assert scored.mixed.loss <= min(scored.network.loss, scored.counting.loss) + 1e-9 and scored.weight > 0.5
    assert scored.gain.loss == pytest.approx(scored.network.loss - scored.mixed.loss, abs=1e-9)


def test_train_refuses_an_order_it_cannot_count_before_touching_out_dir(tiny_train_config):
    config = tiny_train_config(mix_order=40)
    with pytest.raises(ValueError, match="overflow int64"):
        training.train(config)
    assert not Path(config.out_dir).exists()

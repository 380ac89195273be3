import math

import torch

from course.baselines import character_frequencies, frequency_loss


def test_character_frequencies_counts_every_id_including_absent_ones():
    ids = torch.tensor([0, 2, 2, 2])
    assert character_frequencies(ids, vocab_size=4).tolist() == [0.25, 0.0, 0.75, 0.0]


def test_frequency_loss_is_the_entropy_of_the_frequencies():
    ids = torch.tensor([[0, 2], [2, 2]])  # p = 1/4, 3/4; an absent id adds nothing
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert math.isclose(frequency_loss(ids, vocab_size=4), expected, rel_tol=1e-15)


def test_frequency_loss_of_uniform_ids_is_ln_v():
    assert math.isclose(frequency_loss(torch.arange(8).repeat(3), vocab_size=8), math.log(8), rel_tol=1e-15)

import torch

from course.baselines import character_frequencies


def test_character_frequencies_counts_every_id_including_absent_ones():
    ids = torch.tensor([0, 2, 2, 2])
    assert character_frequencies(ids, vocab_size=4).tolist() == [0.25, 0.0, 0.75, 0.0]

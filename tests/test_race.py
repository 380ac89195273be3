"""course.race.ClockedBatches: the batches train() draws itself, with the clock noted per update."""
import pytest
import torch

import training
from course.race import ClockedBatches


def test_serves_the_batches_train_draws_itself():
    config = training.TrainConfig(batch_size=3, context_length=8, seed=5)
    data = torch.arange(1000)
    clocked = ClockedBatches(data, config, torch.device("cpu"))
    for step, micro in [(1, 0), (2, 0), (2, 1)]:
        own = training.seeded_batches(data, config, torch.device("cpu"))(step, micro)
        for a, b in zip(clocked(step, micro), own):
            assert torch.equal(a, b)


def test_evaluations_get_the_seconds_up_to_the_next_update():
    clocked = ClockedBatches(torch.arange(100), training.TrainConfig(batch_size=2, context_length=4),
                             torch.device("cpu"))
    clocked.started = {1: 10.0, 2: 11.0, 3: 13.5}
    clocked.finished = 20.0
    history = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5, "val_loss": 2.4}, {"step": 3, "loss": 2.0, "val_loss": 2.1}]
    assert clocked.val_against_seconds(history) == [(3.5, 2.4), (10.0, 2.1)]


def test_asks_for_stop_before_the_last_update_is_timed():
    clocked = ClockedBatches(torch.arange(100), training.TrainConfig(batch_size=2, context_length=4),
                             torch.device("cpu"))
    clocked(1, 0)
    with pytest.raises(ValueError, match="stop()"):
        clocked.seconds_after(1)

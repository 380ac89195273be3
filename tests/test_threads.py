"""CPU threads (m07_training/threads.py): the fastest count is picked from measurements, a user's count
wins, and measuring leaves the run as it would be with that count set by hand."""
from __future__ import annotations

import os

import pytest
import torch

import training
from m07_training.threads import (AUTO, ThreadChoice, candidate_counts, choose_threads, fastest, resolve_threads,
                                  speed_at, use_fastest_threads)

CPU = torch.device("cpu")


def no_measuring(count):
    raise AssertionError(f"measured {count} threads where the count was given")


@pytest.fixture
def torch_threads():
    """Torch's thread count, set back after the test."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_the_fastest_count_wins_and_a_tie_goes_to_fewer_threads():
    assert fastest({1: 21_300.0, 2: 9_100.0}) == 1
    assert fastest({1: 12_600.0, 2: 21_500.0, 4: 20_000.0}) == 2
    assert fastest({4: 10.0, 1: 10.0, 2: 10.0}) == 1
    with pytest.raises(ValueError, match="at least one"):
        fastest({})


def test_candidates_are_one_half_and_all_cores():
    assert candidate_counts(1) == [1]
    assert candidate_counts(2) == [1, 2]
    assert candidate_counts(16) == [1, 8, 16]


def test_choose_threads_measures_each_candidate_once_and_says_what_it_measured():
    measured = []
    speeds = {1: 21_300.0, 2: 9_100.0}
    choice = choose_threads(lambda count: measured.append(count) or speeds[count], [1, 2])
    assert measured == [1, 2]
    assert (choice.count, choice.speeds) == (1, speeds)
    assert str(choice) == "1 (measured 1: 21.3k tok/s, 2: 9.1k tok/s)"


def test_speed_at_runs_on_the_count_and_sets_torch_back(torch_threads):
    seen = []
    ticks = iter([10.0, 12.0])
    speed = speed_at(lambda: seen.append(torch.get_num_threads()), 1, warmup=1, repeats=4, clock=lambda: next(ticks))
    assert seen == [1] * 5 and speed == 2.0  # 4 timed calls in 2 s
    assert torch.get_num_threads() == torch_threads


def test_a_given_count_none_omp_num_threads_torchrun_and_gpus_do_not_measure():
    assert resolve_threads(None, no_measuring, device=CPU, environ={}) is None
    assert resolve_threads(3, no_measuring, device=CPU, environ={"OMP_NUM_THREADS": "1"}).count == 3
    kept = torch.get_num_threads()
    for choice, why in [(resolve_threads(AUTO, no_measuring, device=CPU, environ={"OMP_NUM_THREADS": "1"}),
                         "OMP_NUM_THREADS=1"),
                        (resolve_threads(AUTO, no_measuring, device=CPU, world_size=2, environ={}), "torchrun"),
                        (resolve_threads(AUTO, no_measuring, device=torch.device("cuda"), environ={}), "cuda")]:
        assert choice.count == kept and why in choice.reason and not choice.speeds


def test_auto_measures_on_the_cpu():
    choice = resolve_threads(AUTO, lambda count: 1.0 / count, device=CPU, environ={})
    assert choice.count == 1
    assert choice.speeds or choice.reason == "one core"  # a one-core machine has nothing to measure


def test_use_fastest_threads_sets_torch_to_the_choice(torch_threads):
    choice = use_fastest_threads(lambda: torch.ones(64, 64) @ torch.ones(64, 64), environ={})
    assert isinstance(choice, ThreadChoice) and torch.get_num_threads() == choice.count


@pytest.mark.parametrize("threads, error", [(-1, ValueError), (2000, ValueError), (True, TypeError), (1.5, TypeError)])
def test_a_bad_thread_count_names_the_field(threads, error):
    with pytest.raises(error, match="TrainConfig.threads"):
        training.TrainConfig(threads=threads)


def test_train_leaves_torch_alone_by_default_the_command_line_measures():
    assert training.TrainConfig().threads is None
    settings, _ = training.cli_settings({})
    assert settings["threads"] == AUTO
    assert training.cli_settings({"threads": 2})[0]["threads"] == 2


def test_a_resumed_command_line_run_keeps_the_checkpoints_count():
    assert training.cli_settings({"resume": "out/last.pt"}, {"threads": 2})[0]["threads"] == 2
    assert training.cli_settings({"resume": "out/last.pt"}, {})[0]["threads"] is None  # an older checkpoint
    with pytest.raises(training.SettingConflict, match="--threads"):
        training.cli_settings({"resume": "out/last.pt", "threads": 1}, {"threads": 2})


def without_timings(history):
    return [{key: value for key, value in entry.items() if key != "seconds"} for entry in history]


def test_measuring_leaves_the_run_as_with_the_count_set_by_hand(tiny_train_config, monkeypatch, torch_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    settings = dict(max_steps=6, eval_interval=3, dropout=0.1)  # dropout: the measuring must not draw from its RNG
    auto = training.train(tiny_train_config(threads=AUTO, **settings))
    assert torch.get_num_threads() == torch_threads  # the caller's count is set back
    torch.set_num_threads(auto.threads.count)
    by_hand = training.train(tiny_train_config(**settings))
    assert by_hand.threads is None
    assert without_timings(auto.history) == without_timings(by_hand.history)
    stored = training.read_checkpoint(auto.last_checkpoint)["extra"]["config"]
    assert stored["threads"] == auto.threads.count


def test_an_injected_measurement_decides_and_a_resume_keeps_the_count(tiny_train_config, monkeypatch, torch_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    first = training.train(tiny_train_config(threads=AUTO, max_steps=3, eval_interval=3),
                           measure_threads=lambda count: 1.0 / count)
    assert first.threads.count == 1
    resumed = training.train(tiny_train_config(threads=AUTO, max_steps=6, eval_interval=3, resume=first.last_checkpoint,
                                               out_dir=os.path.dirname(first.last_checkpoint)),
                             measure_threads=no_measuring)
    assert (resumed.threads.count, resumed.threads.reason) == (1, "the resumed run's")

"""The time budget (TrainConfig.max_minutes): when the run stops, the LR laid over time, resume, the CLI.

A fake clock makes these tests independent of the machine's speed: every update takes exactly one
second (train()'s clock seam gets a fake clock, which train()'s batches advance at every update).
"""
import math
from pathlib import Path

import pytest
import torch

import training
from training import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


class OneSecondPerUpdate:
    """A clock for the time budget (train(clock=...)) that advances one second at every update:
    train() runs with its own seeded batches, and the first micro-batch of each update ticks it."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def train(self, config: TrainConfig) -> training.TrainResult:
        seeded = training.seeded_batches(training.load_corpus(config.data).train_ids, config, torch.device("cpu"))

        def batches(step, micro):
            if micro == 0:
                self.now += 1.0
            return seeded(step, micro)
        return training.train(config, batches=batches, clock=self)


@pytest.fixture
def one_second_per_update():
    return OneSecondPerUpdate()


def lrs(result) -> list[float]:
    return [entry["lr"] for entry in result.history]


@pytest.mark.parametrize("value, error", [
    (0.0, ValueError), (-1.0, ValueError), (math.nan, ValueError), (math.inf, ValueError), ("5", TypeError),
])
def test_bad_max_minutes_is_refused_naming_the_field(value, error):
    with pytest.raises(error, match=r"TrainConfig\.max_minutes\b"):
        TrainConfig(max_minutes=value)


def test_no_budget_by_default():
    assert TrainConfig().max_minutes is None and TrainConfig(max_minutes=5).max_minutes == 5.0


@pytest.mark.parametrize("log_interval, last_step", [(1, 15), (4, 16)])
def test_the_run_stops_at_the_first_read_back_after_the_budget(tiny_train_config, one_second_per_update,
                                                                log_interval, last_step):
    # 15 seconds at one second per update; the clock is read where the losses are read back
    config = tiny_train_config(max_minutes=0.25, max_steps=100, eval_interval=10, log_interval=log_interval)
    result = one_second_per_update.train(config)
    assert result.stop_reason == "max_minutes" and result.step == last_step
    assert [entry["step"] for entry in result.history if "val_loss" in entry] == [10, last_step]


def test_the_end_of_the_budget_evaluates_and_checkpoints(tiny_train_config, one_second_per_update):
    config = tiny_train_config(max_minutes=0.25, max_steps=100, eval_interval=100)
    result = one_second_per_update.train(config)
    assert result.step == 15 and "val_loss" in result.history[-1]
    assert training.read_checkpoint(result.last_checkpoint)["step"] == 15
    assert training.read_checkpoint(result.best_checkpoint)["step"] == 15
    assert training.read_checkpoint(result.last_checkpoint)["extra"]["train_seconds"] == 15.0
    written = (Path(config.out_dir) / "history.jsonl").read_text().splitlines()
    assert len(written) == 15


def test_lr_warms_up_by_updates_then_decays_over_the_budget(tiny_train_config, one_second_per_update):
    config = tiny_train_config(max_minutes=0.5, max_steps=1000, warmup_steps=3, lr=1e-2, min_lr=1e-3,
                               eval_interval=1000)
    result = one_second_per_update.train(config)
    assert result.step == 30
    assert lrs(result)[:2] == pytest.approx([1e-2 / 3, 2e-2 / 3], rel=1e-12)  # warmup: updates 1 and 2
    # from then on: the cosine over 30 seconds, at the time read back before each update
    over_time = [training.cosine_lr(seconds, max_lr=1e-2, min_lr=1e-3, warmup_steps=0, total_steps=30)
                 for seconds in range(2, 30)]
    assert lrs(result)[2:] == pytest.approx(over_time, rel=1e-12)


def test_max_steps_caps_a_budget_and_the_lr_then_follows_the_steps(tiny_train_config, one_second_per_update):
    config = tiny_train_config(max_minutes=10.0, max_steps=20, warmup_steps=2, lr=1e-2, min_lr=1e-3)
    result = one_second_per_update.train(config)
    assert result.stop_reason == "max_steps" and result.step == 20
    by_steps = [training.cosine_lr(step, max_lr=1e-2, min_lr=1e-3, warmup_steps=2, total_steps=20)
                for step in range(1, 21)]
    # after warmup the step schedule is the lower curve (at its peak, update 2, 1 second of 600 is below it)
    assert lrs(result)[2:] == pytest.approx(by_steps[2:], rel=1e-12)
    assert lrs(result)[-1] == pytest.approx(1e-3, rel=1e-12)


def test_resume_continues_the_budget(tiny_train_config, one_second_per_update):
    first = one_second_per_update.train(tiny_train_config(max_minutes=0.5, max_steps=10, lr=1e-2, min_lr=1e-3))
    one_second_per_update.now = 0.0  # a new process: its clock starts elsewhere
    resumed = one_second_per_update.train(tiny_train_config(max_minutes=0.5, max_steps=100,
                                               resume=first.last_checkpoint, lr=1e-2, min_lr=1e-3))
    assert resumed.stop_reason == "max_minutes" and resumed.step == 30  # 10 seconds before, 20 now
    assert resumed.history[0]["lr"] == pytest.approx(training.cosine_lr(10, max_lr=1e-2, min_lr=1e-3,
                                                                        warmup_steps=0, total_steps=30))


def test_a_checkpoint_without_train_seconds_resumes_from_zero(tiny_train_config, one_second_per_update):
    first = one_second_per_update.train(tiny_train_config(max_steps=10))
    checkpoint = training.read_checkpoint(first.last_checkpoint)
    del checkpoint["extra"]["train_seconds"]  # as written before the time budget existed
    torch.save(checkpoint, first.last_checkpoint)
    resumed = one_second_per_update.train(tiny_train_config(max_minutes=0.25, max_steps=100,
                                               resume=first.last_checkpoint))
    assert resumed.step == 25  # 10 updates before, then the whole 15-second budget


@pytest.mark.slow
def test_cli_run_with_a_budget(corpus_slice_file, tmp_path, capsys):
    argv = ["--data", str(corpus_slice_file), "--out-dir", str(tmp_path), "--context-length", "32",
            "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--d-ff", "64", "--batch-size", "8",
            "--max-minutes", "0.05", "--max-steps", "1000000", "--warmup-steps", "2", "--eval-interval", "1000000",
            "--eval-batches", "2", "--sample-chars", "40", "--no-progress"]
    assert training.main(argv) == 0
    out = capsys.readouterr().out
    updates = int(out.split("max_minutes after ", 1)[1].split(" updates", 1)[0])
    assert training.read_checkpoint(tmp_path / "last.pt")["step"] == updates > 0
    assert f"--- sample from {tmp_path / 'best.pt'} ---" in out


def test_cli_refuses_a_bad_budget(capsys):
    with pytest.raises(SystemExit) as exit_info:
        training.main(["--max-minutes", "0"])
    assert exit_info.value.code == 2
    assert "--max-minutes: TrainConfig.max_minutes must be > 0" in capsys.readouterr().err

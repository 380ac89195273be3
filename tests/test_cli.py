"""The command line: every TrainConfig field is a flag, bad values name the flag, a run prints a sample."""
from __future__ import annotations

import dataclasses

import pytest

import training


def flags_in_help(capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        training.main(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_lists_every_field(capsys):
    text = flags_in_help(capsys)
    for field in dataclasses.fields(training.TrainConfig):
        assert "--" + field.name.replace("_", "-") in text, field.name


def test_defaults_match_train_config():
    parsed = vars(training.build_parser().parse_args([]))
    # but threads: the command line measures the fastest count (0), train() leaves torch's setting (None);
    # and mix_order: the command line also scores best.pt mixed with an 8-gram, train() counts nothing
    assert parsed.pop("threads") == 0 and parsed.pop("mix_order") == 8
    assert training.TrainConfig(**parsed) == training.TrainConfig()


def test_bad_choice_names_the_flag_and_the_allowed_values(capsys):
    with pytest.raises(SystemExit) as exit_info:
        training.main(["--dtype", "fp8"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--dtype" in error and "'bf16'" in error and "'fp8'" in error


def test_bad_type_names_the_flag(capsys):
    with pytest.raises(SystemExit):
        training.main(["--max-steps", "many"])
    assert "--max-steps" in capsys.readouterr().err


def test_out_of_range_value_names_the_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        training.main(["--lr", "-1"])
    assert exit_info.value.code == 2
    assert "--lr: TrainConfig.lr must be > 0" in capsys.readouterr().err


def test_missing_resume_file_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert training.main(["--resume", str(missing), "--out-dir", str(tmp_path), "--no-progress"]) == 1
    assert f"no checkpoint at {missing}" in capsys.readouterr().err


@pytest.mark.slow
def test_a_short_run_prints_the_summary_and_a_sample(corpus_slice_file, tmp_path, capsys, one_thread):
    argv = ["--data", str(corpus_slice_file), "--out-dir", str(tmp_path), "--context-length", "32",
            "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--d-ff", "64", "--batch-size", "8",
            "--max-steps", "10", "--warmup-steps", "2", "--eval-interval", "5", "--eval-batches", "2",
            "--sample-chars", "80", "--no-progress"]
    assert training.main(argv) == 0
    out = capsys.readouterr().out
    assert "max_steps after 10 updates | best val loss" in out
    assert "mixed with the Kneser-Ney 8-gram (counted in" in out and "on the counting ladder it beats" in out
    sample = out.split(f"--- sample from {tmp_path / 'best.pt'} ---\n", 1)[1]
    assert len(sample.rstrip("\n")) >= 70  # 80 generated characters, a few of them newlines at the end

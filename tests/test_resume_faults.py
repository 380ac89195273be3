"""A failed or refused run changes nothing, and every bad input gets a clear error.

Checkpoints, resume, history.jsonl and the out-dir under hostile conditions, driven through the
command line (`training.main`, in this process: a traceback would fail the test) or the public API.
Each case asserts the exit status, a message that names the flag or the file, and that the earlier
run's files are byte for byte as they were. `finished` is an 8-update run the tests copy and attack.
"""
from __future__ import annotations

import copy
import http.server
import json
import math
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

import training
from m06_transformer import GPT, GPTConfig
from m07_training.config import NO_STEP_LIMIT
from m07_training.download import DownloadFailed
from test_faults import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    text = training.load_corpus("shakespeare").train_text[:40_000]
    path = tmp_path_factory.mktemp("data") / "plays.txt"
    path.write_text(text)
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """training.main(argv): its exit status (argparse's SystemExit included), stdout and stderr."""
    try:
        status = training.main([str(arg) for arg in argv])
    except SystemExit as exit_info:
        status = exit_info.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("finished") / "run"
    assert training.main([*TINY, "--data", str(data), "--out-dir", str(out_dir), "--max-steps", "8"]) == 0
    return out_dir


@pytest.fixture
def run_dir(finished, tmp_path) -> Path:
    """A copy of the finished run for one test to attack."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def refused(capsys, run_dir: Path, status: int, fragments, *argv) -> str:
    """Run the CLI, expect a clean refusal naming every fragment, and the run's files unchanged."""
    before = files(run_dir)
    code, out, err = run_cli(capsys, *argv)
    assert code == status, (out, err)
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    assert files(run_dir) == before
    return err


def resumed_history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


# --- load_checkpoint is all or nothing --------------------------------------------------

def live_objects(checkpoint_path: Path):
    """A model and optimizer as train() builds them for the checkpoint, with optimizer state of their own."""
    saved = training.read_checkpoint(checkpoint_path)
    config = training.TrainConfig(**saved["extra"]["config"])
    model = GPT(GPTConfig(**saved["model_config"]))
    optimizer, _ = training.build_optimizer(model, config, torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    return saved, model, optimizer


def snapshot(model, optimizer):
    return (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()), torch.get_rng_state(),
            random.getstate())


def assert_same(before, after):
    (model_a, opt_a, torch_a, python_a), (model_b, opt_b, torch_b, python_b) = before, after
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert torch.equal(torch_a, torch_b) and python_a == python_b
    state_a, state_b = opt_a["state"], opt_b["state"]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert all(torch.equal(torch.as_tensor(state_a[key][n]), torch.as_tensor(state_b[key][n])) for n in state_a[key])
    assert opt_a["param_groups"] == opt_b["param_groups"]


@pytest.mark.parametrize("corrupt, message", [
    (lambda c: c["rng"].update(torch=torch.zeros(10, dtype=torch.uint8)), "torch state of 10 bytes"),
    (lambda c: c["rng"].update(python=(3, (1, 2, 3), None)), "the Python state"),
    (lambda c: c["optimizer"]["state"][0].update(exp_avg=torch.zeros(3, 3)), "has shape [3, 3]"),
    (lambda c: c["optimizer"]["param_groups"].pop(), "parameter groups saved"),
], ids=["torch-rng", "python-rng", "optimizer-shape", "optimizer-groups"])
def test_a_checkpoint_that_does_not_load_changes_nothing(run_dir, corrupt, message):
    path = run_dir / "last.pt"
    saved, model, optimizer = live_objects(path)
    corrupt(saved)
    torch.save(saved, path)
    before = snapshot(model, optimizer)
    with pytest.raises(training.CheckpointError) as error:
        training.load_checkpoint(path, model, optimizer)
    assert message in str(error.value) and str(path) in str(error.value)
    assert_same(before, snapshot(model, optimizer))


def test_resume_with_optimizer_state_of_the_wrong_shapes_and_overwrite_keeps_the_run(capsys, data, run_dir):
    path = run_dir / "last.pt"
    saved = training.read_checkpoint(path)
    saved["optimizer"]["state"][0]["exp_avg"] = torch.zeros(2)
    torch.save(saved, path)
    refused(capsys, run_dir, 1, ["optimizer state does not fit", "last.pt"],
            "--resume", path, "--max-steps", "12", "--overwrite")


# --- resume continues the same run, or refuses ------------------------------------------

def test_a_bare_resume_takes_every_setting_from_the_checkpoint(capsys, run_dir):
    code, out, err = run_cli(capsys, "--resume", run_dir, "--max-steps", "12", "--no-progress")  # no TINY flags
    assert code == 0, err
    assert "extends the run from 8 updates" in err
    rows = resumed_history(run_dir)
    assert [row["step"] for row in rows] == list(range(1, 13))
    stored = training.read_checkpoint(run_dir / "last.pt")["extra"]["config"]
    assert stored["d_model"] == 32 and stored["max_steps"] == 12
    expected = training.cosine_lr(9, max_lr=6e-3, min_lr=6e-4, warmup_steps=2, total_steps=12)
    assert rows[8]["lr"] == pytest.approx(expected, rel=1e-12)  # the checkpoint's LR, on the longer schedule


def test_resuming_a_finished_run_says_so(capsys, run_dir):
    refused(capsys, run_dir, 1, ["is at update 8 and max_steps is 8", "nothing left to train", "--max-steps"],
            "--resume", run_dir / "last.pt")


@pytest.mark.parametrize("flag, value", [("--n-heads", "4"), ("--lr", "1e-3"), ("--seed", "1"),
                                         ("--batch-size", "4")])
def test_resume_refuses_a_flag_that_would_make_another_run(capsys, run_dir, flag, value):
    refused(capsys, run_dir, 2, [f"{flag}: the checkpoint's run has", "a resumed run keeps its settings"],
            "--resume", run_dir, "--max-steps", "12", flag, value)


def test_resume_allows_changing_how_often_it_reports(capsys, run_dir):
    code, _, err = run_cli(capsys, "--resume", run_dir, "--max-steps", "10", "--eval-interval", "1", "--no-progress")
    assert code == 0, err
    assert [row["step"] for row in resumed_history(run_dir) if "val_loss" in row][-2:] == [9, 10]


def test_the_library_refuses_a_model_of_other_settings_naming_them(run_dir):
    stored = training.read_checkpoint(run_dir / "last.pt")["extra"]["config"]
    config = training.TrainConfig(**{**stored, "resume": str(run_dir), "n_heads": 4, "qk_norm": True,
                                     "max_steps": 12, "overwrite": False})
    before = files(run_dir)
    with pytest.raises(training.CheckpointError, match=r"n_heads: checkpoint 2, this run 4.*qk_norm: checkpoint "
                                                        r"False, this run True"):
        training.train(config)
    assert files(run_dir) == before


@pytest.fixture
def same_alphabet_text(data, tmp_path) -> Path:
    text = data.read_text()
    other = tmp_path / "other.txt"
    other.write_text(text[20_000:] + text[:20_000])  # the same characters, another text
    return other


def test_resume_on_another_text_is_refused_naming_both(capsys, run_dir, same_alphabet_text):
    refused(capsys, run_dir, 2, ["--data: the checkpoint's run has data="],
            "--resume", run_dir, "--max-steps", "12", "--data", same_alphabet_text)
    stored = training.read_checkpoint(run_dir / "last.pt")["extra"]["config"]
    config = training.TrainConfig(**{**stored, "resume": str(run_dir), "data": str(same_alphabet_text),
                                     "max_steps": 12})
    with pytest.raises(training.CheckpointError, match=r"data: checkpoint .*plays\.txt.*, this run .*other\.txt.*"
                                                        r"--resume-on-new-data"):
        training.train(config)


def test_resume_on_new_data_fine_tunes_explicitly(capsys, run_dir, same_alphabet_text):
    code, _, err = run_cli(capsys, "--resume", run_dir, "--max-steps", "12", "--data", same_alphabet_text,
                           "--resume-on-new-data", "--no-progress")
    assert code == 0, err
    assert training.read_checkpoint(run_dir / "last.pt")["step"] == 12


def test_resume_after_the_text_file_changed_is_refused(tmp_path, capsys):
    text_file = tmp_path / "text.txt"
    text_file.write_text(training.load_corpus("shakespeare").train_text[:40_000])
    out_dir = tmp_path / "run"
    assert training.main([*TINY, "--data", str(text_file), "--out-dir", str(out_dir), "--max-steps", "4"]) == 0
    capsys.readouterr()
    text = text_file.read_text()
    text_file.write_text(text[1:] + text[0])  # same name and alphabet, other bytes
    refused(capsys, out_dir, 1, ["is not this run", "text: the checkpoint's", "the file changed"],
            "--resume", out_dir, "--max-steps", "8")


# --- history.jsonl reconciled with the checkpoint ---------------------------------------

def test_a_history_that_lags_the_checkpoint_is_named(capsys, run_dir):
    lines = (run_dir / "history.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "history.jsonl").write_text("".join(lines[:5]))
    code, _, err = run_cli(capsys, "--resume", run_dir, "--max-steps", "10", "--no-progress")
    assert code == 0 and "updates 6-8 are missing from the history" in err


@pytest.mark.parametrize("tail", ['{"step": 9, "lo', '{"step": "x", "loss": 1.0}\n', "not json\n"])
def test_a_torn_or_foreign_history_line_is_dropped_with_a_warning(capsys, run_dir, tail):
    with (run_dir / "history.jsonl").open("a") as f:
        f.write(tail)
    code, _, err = run_cli(capsys, "--resume", run_dir, "--max-steps", "10", "--no-progress")
    assert code == 0 and "dropped 1 line(s) that are not history entries" in err
    assert [row["step"] for row in resumed_history(run_dir)] == list(range(1, 11))


def test_a_last_history_line_without_its_newline_stays_a_line(capsys, run_dir):
    history = run_dir / "history.jsonl"
    history.write_text(history.read_text().rstrip("\n"))
    code, _, err = run_cli(capsys, "--resume", run_dir, "--max-steps", "10", "--no-progress")
    assert code == 0, err
    assert [row["step"] for row in resumed_history(run_dir)] == list(range(1, 11))  # every line strict JSON


def test_a_history_that_is_not_utf8_is_named_before_anything_changes(capsys, run_dir):
    (run_dir / "history.jsonl").write_bytes(b'{"step": 1, "loss": 4.0}\n\xff\xfe\n')
    refused(capsys, run_dir, 1, ["history.jsonl is not UTF-8 text"], "--resume", run_dir, "--max-steps", "10")


@pytest.mark.parametrize("field, value", [("best_val_loss", [1.0]), ("evals_without_improvement", "2"),
                                          ("train_seconds", -1.0), ("best_val_loss", math.nan)])
def test_a_checkpoint_with_a_bad_record_names_the_file_and_the_field(capsys, run_dir, field, value):
    path = run_dir / "last.pt"
    saved = training.read_checkpoint(path)
    saved["extra"][field] = value
    torch.save(saved, path)
    refused(capsys, run_dir, 1, [str(path), f"extra['{field}']"], "--resume", run_dir, "--max-steps", "10")


# --- the out-dir ---------------------------------------------------------------------------

def test_a_lock_that_is_a_symlink_is_not_followed(capsys, data, run_dir, tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (run_dir / ".lock").symlink_to(target)
    refused(capsys, run_dir, 1, ["cannot use out_dir", ".lock"],
            *TINY, "--data", data, "--out-dir", run_dir, "--max-steps", "4", "--overwrite")
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("name", [".lock", "history.jsonl"])
def test_a_run_file_that_is_a_folder_is_named_and_nothing_is_lost(capsys, data, run_dir, name):
    if name == "history.jsonl":
        (run_dir / name).unlink()
    (run_dir / name).mkdir()
    refused(capsys, run_dir, 1, ["cannot use out_dir", name],
            *TINY, "--data", data, "--out-dir", run_dir, "--max-steps", "4", "--overwrite")
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_the_refusal_quotes_an_out_dir_with_spaces(capsys, data, tmp_path):
    out_dir = tmp_path / "my run"
    assert training.main([*TINY, "--data", str(data), "--out-dir", str(out_dir), "--max-steps", "4"]) == 0
    capsys.readouterr()
    refused(capsys, out_dir, 1, [f"--resume '{out_dir / 'last.pt'}'"],
            *TINY, "--data", data, "--out-dir", out_dir, "--max-steps", "4")


# --- bad input: a clear error and the promised exit status ------------------------------

def test_a_corpus_of_one_character_is_refused(capsys, tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("a" * 5000)
    code, _, err = run_cli(capsys, *TINY, "--data", text, "--out-dir", tmp_path / "out", "--max-steps", "4")
    assert code == 1 and "single distinct character" in err and "Traceback" not in err


@pytest.mark.parametrize("flags, named", [(["--device", "tpu"], "--device: unknown device 'tpu'"),
                                          (["--grad-accum-steps", "2147483647"], "--grad-accum-steps"),
                                          (["--max-minutes", "-1"], "--max-minutes")])
def test_bad_flags_exit_2_naming_the_flag(capsys, data, tmp_path, flags, named):
    code, _, err = run_cli(capsys, *TINY, "--data", data, "--out-dir", tmp_path / "out", *flags)
    assert code == 2 and named in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_short_run_just_works(capsys, data, tmp_path):
    code, _, err = run_cli(capsys, "--data", data, "--out-dir", tmp_path / "out", "--max-steps", "20",
                           "--context-length", "32", "--d-model", "32", "--n-layers", "1", "--n-heads", "2",
                           "--d-ff", "64", "--sample-chars", "0", "--no-progress")
    assert code == 0, err
    assert "warmup shortened to 2 updates" in err


def test_max_minutes_alone_trains_for_the_whole_budget():
    settings, _ = training.cli_settings({"max_minutes": 5.0})
    assert settings["max_steps"] == NO_STEP_LIMIT
    assert training.cli_settings({"max_minutes": 5.0, "max_steps": 100})[0]["max_steps"] == 100


def test_a_resumed_run_may_set_its_schedule_length():
    stored = {"max_steps": 8}  # a checkpoint whose run had the defaults but for its length
    settings, notes = training.cli_settings({"resume": "out/last.pt", "max_steps": 16, "decay_steps": 8}, stored)
    assert settings["decay_steps"] == 8 and settings["out_dir"] == "out" and not notes


def test_evaluate_refuses_a_count_of_batches_that_is_not_positive():
    model = GPT(GPTConfig(vocab_size=5, context_length=8, d_model=8, n_layers=1, n_heads=2, d_ff=16))
    for batches in (0, -1):
        with pytest.raises(ValueError, match="batches must be a positive int"):
            training.evaluate(model, torch.arange(40) % 5, batch_size=2, context_length=8, batches=batches,
                              device=torch.device("cpu"))


def test_sample_text_needs_a_prompt():
    model = GPT(GPTConfig(vocab_size=3, context_length=8, d_model=8, n_layers=1, n_heads=2, d_ff=16))
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        training.sample_text(model, training.CharTokenizer("abc"), 5, prompt="")


def test_best_means_good_a_val_loss_above_ln_v_never_becomes_best_pt(tiny_train_config):
    config = tiny_train_config(optimizer="sgd", lr=3.0, min_lr=0.3, warmup_steps=0, grad_clip=0.0, max_steps=12,
                               eval_interval=1)
    result = training.train(config)
    ln_v = math.log(result.tokenizer.vocab_size)
    evals = [row for row in result.history if "val_loss" in row]
    assert any(math.isfinite(row["val_loss"]) and row["val_loss"] > ln_v for row in evals)  # the case arose
    if result.best_checkpoint:
        assert training.read_checkpoint(result.best_checkpoint)["extra"]["best_val_loss"] < ln_v


# --- downloads end in a bounded time ------------------------------------------------------

def test_a_download_from_a_server_that_trickles_ends_at_its_deadline(tmp_path):
    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(40):  # 64 bytes every 0.1 s: never a read timeout, never done in time
                self.wfile.write(b"x" * 64)
                self.wfile.flush()
                time.sleep(0.1)

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        with pytest.raises(DownloadFailed, match="within 1 s"):
            training.download_corpus(f"http://127.0.0.1:{server.server_port}/slow.txt", "0" * 64, tmp_path,
                                     timeout=2.0, deadline=1.0)
        assert time.monotonic() - started < 3.0
        assert list(tmp_path.iterdir()) == []  # no partial file kept
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_a_double_ctrl_c_says_which_update_last_pt_holds(data, tmp_path):
    from test_faults import start, wait_for
    out_dir = tmp_path / "out"
    run = start(data, out_dir, "--max-steps", "100000", "--eval-interval", "20", "--grad-accum-steps", "64")
    try:
        wait_for(lambda: (out_dir / "last.pt").is_file(), run)
        run.send_signal(signal.SIGINT)
        run.send_signal(signal.SIGINT)  # the second one lands inside the update: the default handler ends it
        _, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 130 and "Traceback" not in err, err
    step = training.read_checkpoint(out_dir / "last.pt")["step"]
    assert f"last.pt holds update {step}" in err or f"after update {step}" in err, err
    assert "before the first update" not in err

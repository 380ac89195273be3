"""Faults an operator meets, driven through the command line: each gets a clear message, the right
exit status (training.EXIT_CODES), and leaves every file of an earlier run as it was.

Every test runs `python training.py` in a fresh process on a tiny model (one thread, loopback
only). `finished_run` is an 8-update run whose out_dir the tests copy and then attack.
"""
from __future__ import annotations

import http.server
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

import training

# The last four flags are training.ADAMW_RECIPE: the divergence cases below are calibrated on AdamW
# (test_muon.py runs the default recipe, Muon, through the CLI).
TINY = ["--context-length", "32", "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--d-ff", "64",
        "--batch-size", "8", "--warmup-steps", "2", "--eval-interval", "4", "--eval-batches", "2",
        "--log-interval", "1", "--device", "cpu", "--dtype", "fp32", "--sample-chars", "0", "--no-progress",
        "--seed", "0", "--optimizer", "auto", "--mlp-activation", "gelu", "--no-qk-norm",
        "--min-lr", "6e-4"]


def command(data, out_dir, *args) -> list[str]:
    return [sys.executable, training.__file__, *TINY, "--data", str(data), "--out-dir", str(out_dir), *args]


def cli(data, out_dir, *args, **kwargs) -> subprocess.CompletedProcess:
    """Run training.py to the end; its exit status, stdout and stderr."""
    return subprocess.run(command(data, out_dir, *args), capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)


def start(data, out_dir, *args) -> subprocess.Popen:
    return subprocess.Popen(command(data, out_dir, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.is_dir() else {}


def history(folder: Path) -> list[dict]:
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in (folder / "history.jsonl").read_text().splitlines()]


def wait_for(condition, process, seconds=120.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def assert_clean_error(done, status, *fragments):
    assert done.returncode == status, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, done.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """40k characters of the plays: enough for 32-character windows in both splits."""
    text = training.load_corpus("shakespeare").train_text[:40_000]
    path = tmp_path_factory.mktemp("data") / "plays.txt"
    path.write_text(text[: text.rfind("\n\n") + 2], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("finished") / "out"
    done = cli(data, out_dir, "--max-steps", "8")
    assert done.returncode == 0, done.stderr
    return out_dir


@pytest.fixture
def earlier_run(finished_run, tmp_path) -> tuple[Path, dict[str, bytes]]:
    """A copy of the finished run's out_dir, and its files' bytes."""
    out_dir = tmp_path / "out"
    shutil.copytree(finished_run, out_dir)
    return out_dir, files(out_dir)


# ---------------------------------------------------------------------------- runs own their out_dir


def test_a_new_run_refuses_an_out_dir_holding_another_run(data, earlier_run):
    out_dir, before = earlier_run
    done = cli(data, out_dir, "--max-steps", "4")
    assert_clean_error(done, 1, f"out_dir {out_dir} holds another run", "--resume", "--overwrite")
    assert files(out_dir) == before


def test_overwrite_replaces_the_earlier_run(data, earlier_run):
    out_dir, _ = earlier_run
    assert cli(data, out_dir, "--max-steps", "4", "--overwrite").returncode == 0
    assert [entry["step"] for entry in history(out_dir)] == [1, 2, 3, 4]
    assert training.read_checkpoint(out_dir / "best.pt")["step"] == 4


def test_bad_input_is_refused_before_anything_is_truncated(data, earlier_run):
    out_dir, before = earlier_run
    done = cli(data, out_dir, "--context-length", "60000", "--overwrite")
    assert_clean_error(done, 1, "split", "context_length=60000")
    assert files(out_dir) == before


def test_a_short_validation_split_is_refused_before_training(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("to be or not to be " * 100, encoding="utf-8")  # no line break: the last 10% is validation
    done = cli(text, tmp_path / "out", "--context-length", "256", "--max-steps", "4")
    assert_clean_error(done, 1, "the validation split", "190 characters", "context_length=256")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_second_run_cannot_write_into_a_live_runs_out_dir(data, tmp_path):
    out_dir = tmp_path / "out"
    first = start(data, out_dir, "--max-steps", "100000", "--eval-interval", "50")
    try:
        wait_for(lambda: (out_dir / "history.jsonl").is_file(), first)
        second = cli(data, out_dir, "--max-steps", "4", "--overwrite")
        assert_clean_error(second, 1, f"in use by another training run (PID {first.pid})")
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 128 + signal.SIGTERM, err
    steps = [entry["step"] for entry in history(out_dir)]
    assert steps == list(range(1, len(steps) + 1))  # one run's entries, in order, none twice
    assert training.read_checkpoint(out_dir / "last.pt")["step"] == steps[-1]


# ---------------------------------------------------------------------------- exit codes tell the truth


@pytest.mark.parametrize("lr", ["100", pytest.param("1e6", marks=pytest.mark.slow)])
def test_divergence_exits_3_and_keeps_the_last_finite_state(data, tmp_path, lr):
    out_dir = tmp_path / "out"
    done = cli(data, out_dir, "--max-steps", "60", "--lr", lr, "--min-lr", "0", "--grad-clip", "0",
               "--optimizer", "sgd", "--warmup-steps", "0")
    assert_clean_error(done, training.EXIT_DIVERGED, "non-finite")
    assert "non-finite" not in done.stdout
    last = history(out_dir)[-1]  # strict JSON: null where a loss was not finite
    assert None in (last["loss"], last.get("val_loss"))
    for name in ("best.pt", "last.pt"):
        if (out_dir / name).exists():
            saved = training.read_checkpoint(out_dir / name)
            assert all(t.isfinite().all() for t in saved["model"].values()), name
            assert name in done.stderr


def test_resuming_from_non_finite_weights_is_refused(data, earlier_run):
    out_dir, before = earlier_run
    saved = torch.load(out_dir / "last.pt", weights_only=True)
    next(iter(saved["model"].values())).fill_(float("nan"))
    nan_path = out_dir.parent / "nan.pt"
    torch.save(saved, nan_path)
    done = cli(data, out_dir, "--max-steps", "12", "--resume", str(nan_path))
    assert_clean_error(done, 1, "non-finite weights")
    assert files(out_dir) == before


@pytest.mark.slow
def test_sigint_writes_last_pt_and_says_how_to_resume(data, tmp_path):
    out_dir = tmp_path / "out"
    run = start(data, out_dir, "--max-steps", "100000", "--eval-interval", "50")
    try:
        wait_for(lambda: (out_dir / "last.pt").is_file(), run)
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 130, err
    assert "Traceback" not in err and f"--resume {out_dir / 'last.pt'}" in err
    step = training.read_checkpoint(out_dir / "last.pt")["step"]
    assert step > 50 and history(out_dir)[-1]["step"] == step
    resumed = cli(data, out_dir, "--max-steps", str(step + 2), "--resume", str(out_dir / "last.pt"))
    assert resumed.returncode == 0, resumed.stderr
    assert [entry["step"] for entry in history(out_dir)] == list(range(1, step + 3))


# ---------------------------------------------------------------------------- checkpoints verify themselves


def flip_bytes_in_tensor_data(path: Path, count: int = 64) -> None:
    """Invert `count` bytes in the middle of the largest tensor record of a torch zip file."""
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    header = record.header_offset
    name_length, extra_length = int.from_bytes(raw[header + 26:header + 28], "little"), \
        int.from_bytes(raw[header + 28:header + 30], "little")
    middle = header + 30 + name_length + extra_length + record.file_size // 2
    raw[middle:middle + count] = bytes(b ^ 0xFF for b in raw[middle:middle + count])
    path.write_bytes(bytes(raw))


def test_flipped_bytes_in_a_checkpoint_are_refused(data, earlier_run):
    out_dir, _ = earlier_run
    flip_bytes_in_tensor_data(out_dir / "last.pt")
    before = files(out_dir)
    done = cli(data, out_dir, "--max-steps", "12", "--resume", str(out_dir / "last.pt"))
    assert_clean_error(done, 1, "last.pt is damaged", "CRC-32")
    assert files(out_dir) == before


@pytest.mark.parametrize("damage, message", [
    ("only the format marker", "malformed checkpoint: no 'step' entry"),
    pytest.param("no rng", "malformed checkpoint: no 'rng' entry", marks=pytest.mark.slow),
    ("no alphabet", "holds no alphabet"),
])
def test_malformed_checkpoints_are_clear_errors(data, earlier_run, damage, message):
    out_dir, before = earlier_run
    saved = torch.load(out_dir / "last.pt", weights_only=True)
    if damage == "only the format marker":
        saved = {"format": training.CHECKPOINT_FORMAT}
    elif damage == "no rng":
        del saved["rng"]
    else:
        del saved["extra"]["chars"]
    bad = out_dir.parent / "bad.pt"
    torch.save(saved, bad)
    done = cli(data, out_dir, "--max-steps", "12", "--resume", str(bad))
    assert_clean_error(done, 1, message)
    assert "KeyError" not in done.stderr
    assert files(out_dir) == before


def test_temporary_files_of_killed_saves_are_cleaned_by_the_next_save(data, earlier_run):
    out_dir, _ = earlier_run
    stale = [out_dir / ".last.pt.99999999.abcd1234.tmp", out_dir / ".best.pt.k3j_9x0q.tmp"]  # dead PID, old name
    live = out_dir / f".last.pt.{os.getpid()}.live0001.tmp"  # a save in progress in a live process
    for path in [*stale, live]:
        path.write_bytes(b"PK\x03\x04 half a checkpoint")
    done = cli(data, out_dir, "--max-steps", "12", "--resume", str(out_dir / "last.pt"))
    assert done.returncode == 0, done.stderr
    assert not any(path.exists() for path in stale) and live.exists()


# ---------------------------------------------------------------------------- messages for the rest


@pytest.mark.slow
def test_a_corpus_without_line_breaks_still_prints_a_sample(data, tmp_path):
    text = tmp_path / "one_line.txt"
    text.write_text(data.read_text(encoding="utf-8").replace("\n", " "), encoding="utf-8")
    done = cli(text, tmp_path / "out", "--max-steps", "4", "--sample-chars", "40")
    assert done.returncode == 0, done.stderr
    assert "--- sample from" in done.stdout


@pytest.mark.parametrize("flag, value", [
    ("--seed", "99999999999999999999999"), ("--weight-decay", "inf"),
    pytest.param("--lr", "nan", marks=pytest.mark.slow), pytest.param("--max-steps", str(2**40), marks=pytest.mark.slow)])
def test_out_of_range_numbers_name_the_flag(tmp_path, flag, value):
    done = cli(tmp_path / "none.txt", tmp_path / "out", flag, value)
    assert_clean_error(done, 2, f"{flag}: TrainConfig.{flag[2:].replace('-', '_')} must be")
    assert not (tmp_path / "out").exists()


def test_an_out_dir_that_is_a_file(data, tmp_path):
    not_a_folder = tmp_path / "out"
    not_a_folder.write_text("precious\n")
    done = cli(data, not_a_folder, "--max-steps", "4")
    assert_clean_error(done, 1, f"cannot use out_dir {not_a_folder}: it is a file, not a folder")
    assert not_a_folder.read_text() == "precious\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_dir(data, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out_dir.chmod(0o555)
    try:
        done = cli(data, out_dir, "--max-steps", "4")
    finally:
        out_dir.chmod(0o755)
    assert_clean_error(done, 1, f"cannot use out_dir {out_dir}", "Permission denied")


@pytest.mark.slow
def test_a_full_disk_keeps_the_earlier_checkpoints(data, earlier_run):
    out_dir, before = earlier_run
    limit = len(before["history.jsonl"]) + 4096  # history fits, a checkpoint does not (ulimit -f)
    done = cli(data, out_dir, "--max-steps", "12", "--resume", str(out_dir / "last.pt"),
               preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert_clean_error(done, 1, "could not write", "File too large", "is unchanged")
    assert files(out_dir) == before


# ---------------------------------------------------------------------------- downloads


class _Server(http.server.ThreadingHTTPServer):
    body = b"to be or not to be\n" * 1000


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)

    def log_message(self, *args):
        pass


def test_a_killed_downloads_part_file_is_cleaned_by_the_next_download(tmp_path):
    import hashlib
    server = _Server(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        stale = tmp_path / ".plays.txt.99999999.x1y2z3w4.part"  # what a killed download leaves
        stale.write_bytes(b"half a download")
        url = f"http://127.0.0.1:{server.server_address[1]}/plays.txt"
        path = training.download_corpus(url, hashlib.sha256(_Server.body).hexdigest(), tmp_path)
    finally:
        server.shutdown()
    assert path.read_bytes() == _Server.body
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plays.txt"]


# ---------------------------------------------------------------------------- under torchrun


@pytest.mark.slow
def test_every_rank_stops_at_the_same_update_on_divergence(data, tmp_path):
    out_dir = tmp_path / "out"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*launcher, *command(data, out_dir, "--max-steps", "60", "--lr", "1e6", "--min-lr", "0",
                                               "--grad-clip", "0", "--optimizer", "sgd", "--warmup-steps", "0")[1:]],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert done.stderr.count("error: non-finite") == 1  # rank 0 reports; no rank hangs in a collective
    assert f"exitcode  : {training.EXIT_DIVERGED}" in done.stderr

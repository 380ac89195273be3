"""save_checkpoint / load_checkpoint: round trip, atomic writes, safe loading, clear errors, bit-exact resume."""
import os
import pickle

import pytest
import torch

import training
from m06_transformer import GPT
from training import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint


def trained_pair(model, steps=3):
    """The model after a few AdamW steps, and that optimizer (so its state is not empty)."""
    optimizer = training.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        idx = torch.randint(model.config.vocab_size, (2, 8))
        training.cross_entropy(model(idx), idx).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def assert_same_state(a: dict, b: dict):
    """Two state dicts hold the same keys and bit-identical tensors (other values equal)."""
    assert a.keys() == b.keys()
    for key in a:
        same = torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key]
        assert same, key


def test_round_trip_restores_everything(tiny_gpt, tiny_gpt_config, tmp_path):
    model, optimizer = trained_pair(tiny_gpt)
    scheduler = training.CosineScheduler(optimizer, warmup_steps=2, total_steps=10)
    optimizer.step()
    scheduler.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    path = save_checkpoint(tmp_path / "ckpt.pt", model, optimizer, 7, scheduler=scheduler, scaler=scaler,
                           best_val_loss=1.25, chars=["a", "b"])
    expected_draw = torch.rand(3)  # the RNG state was saved just before this draw

    torch.manual_seed(123)
    fresh = GPT(tiny_gpt_config)
    fresh_optimizer = training.AdamW(fresh.parameters(), lr=1e-2)
    fresh_scheduler = training.CosineScheduler(fresh_optimizer, warmup_steps=2, total_steps=10)
    fresh_scaler = torch.amp.GradScaler("cpu")
    step = load_checkpoint(path, fresh, fresh_optimizer, scheduler=fresh_scheduler, scaler=fresh_scaler)
    assert step == 7
    assert_same_state(fresh.state_dict(), model.state_dict())
    for p, q in zip(fresh.parameters(), model.parameters()):
        assert_same_state(fresh_optimizer.state[p], optimizer.state[q])
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert fresh_scaler.get_scale() == 64.0
    assert torch.equal(torch.rand(3), expected_draw)  # RNG restored
    saved = read_checkpoint(path)
    assert saved["extra"] == {"best_val_loss": 1.25, "chars": ["a", "b"]}
    assert saved["model_config"]["vocab_size"] == tiny_gpt_config.vocab_size


def test_crash_mid_write_leaves_the_old_checkpoint_intact(tiny_gpt, tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, tiny_gpt, None, 1)
    old_bytes = path.read_bytes()

    def disk_full(fd):  # the bytes went to the temporary file; the disk fails to keep them
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match=r"could not write .*last\.pt \(No space left on device\)"):
        save_checkpoint(path, tiny_gpt, None, 2)
    assert path.read_bytes() == old_bytes
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind
    monkeypatch.undo()
    assert read_checkpoint(path)["step"] == 1


def test_crash_on_the_first_write_leaves_no_file(tiny_gpt, tmp_path, monkeypatch):
    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "best.pt", tiny_gpt, None, 0)
    assert list(tmp_path.iterdir()) == []


class RunsCode:
    """A pickle payload: unpickling it calls open(sentinel, 'w'), i.e. runs code that creates a file."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return open, (self.sentinel, "w")


def test_the_malicious_payload_really_runs_code(tmp_path):
    # Guard for the next test: the payload does create its sentinel when unpickled unsafely.
    sentinel = tmp_path / "pwned"
    pickle.loads(pickle.dumps(RunsCode(sentinel))).close()
    assert sentinel.exists()


@pytest.mark.parametrize("writer", ["torch.save", "raw pickle"])
def test_malicious_pickle_is_refused_and_runs_nothing(tiny_gpt, tmp_path, writer):
    sentinel, path = tmp_path / "pwned", tmp_path / "evil.pt"
    payload = {"format": training.CHECKPOINT_FORMAT, "step": 0, "model": RunsCode(sentinel)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    before = {k: v.clone() for k, v in tiny_gpt.state_dict().items()}
    with pytest.raises(CheckpointError, match="weights_only") as error:
        load_checkpoint(path, tiny_gpt)
    assert "Nothing from it was executed" in str(error.value)
    assert not sentinel.exists()
    assert_same_state(tiny_gpt.state_dict(), before)


def test_truncated_file_gives_a_clear_error(tiny_gpt, tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", tiny_gpt, None, 3)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path, tiny_gpt)


@pytest.mark.parametrize("content", [b"", b"hello, I am not a checkpoint\n"], ids=["empty", "text"])
def test_empty_and_text_files_are_clear_errors(tiny_gpt, tmp_path, content):
    path = tmp_path / "not.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not.pt"):
        load_checkpoint(path, tiny_gpt)


def test_shape_mismatch_names_the_tensor(tiny_gpt, tiny_gpt_config, tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", tiny_gpt, None, 0)
    other = GPT(type(tiny_gpt_config)(**{**vars(tiny_gpt_config), "vocab_size": 20}))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"tok_emb\.weight.*\[17, 32\].*\[20, 32\]"):
        load_checkpoint(path, other)
    assert_same_state(other.state_dict(), before)  # nothing was loaded


def test_missing_tensors_are_named(tiny_gpt, tiny_gpt_config, tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", tiny_gpt, None, 0)
    deeper = GPT(type(tiny_gpt_config)(**{**vars(tiny_gpt_config), "n_layers": 3}))
    with pytest.raises(CheckpointError, match=r"missing \['blocks\.2\."):
        load_checkpoint(path, deeper)


@pytest.mark.parametrize("content", [{"model": {}}, torch.zeros(3), [1, 2, 3]], ids=["dict", "tensor", "list"])
def test_torch_file_that_is_not_a_checkpoint(tiny_gpt, tmp_path, content):
    path = tmp_path / "weights.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load_checkpoint(path, tiny_gpt)


def test_missing_file_and_missing_optimizer_state(tiny_gpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt", tiny_gpt)
    path = save_checkpoint(tmp_path / "ckpt.pt", tiny_gpt, None, 0)
    with pytest.raises(CheckpointError, match="optimizer"):
        load_checkpoint(path, tiny_gpt, training.AdamW(tiny_gpt.parameters()))


@pytest.mark.parametrize("step", [-1, 1.0, True])
def test_bad_step_is_rejected(tiny_gpt, tmp_path, step):
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path / "ckpt.pt", tiny_gpt, None, step)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_resume_is_bit_exact(tiny_train_config, tmp_path):
    # dropout > 0 so that the restored torch RNG state matters too
    settings = dict(decay_steps=20, eval_interval=10, dropout=0.1)
    straight = training.train(tiny_train_config(max_steps=20, out_dir=str(tmp_path / "straight"), **settings))
    first = training.train(tiny_train_config(max_steps=10, out_dir=str(tmp_path / "split"), **settings))
    assert first.step == 10
    resumed = training.train(tiny_train_config(max_steps=20, out_dir=str(tmp_path / "split"),
                                               resume=first.last_checkpoint, **settings))
    assert_same_state(resumed.model.state_dict(), straight.model.state_dict())
    losses = lambda history: [(entry["step"], entry["lr"], entry["loss"]) for entry in history]
    assert losses(first.history) + losses(resumed.history) == losses(straight.history)
    assert resumed.history[-1]["val_loss"] == straight.history[-1]["val_loss"]


def test_changed_tensor_bytes_fail_the_crc_check(tiny_gpt, tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", tiny_gpt, None, 0)
    raw = bytearray(path.read_bytes())
    start = raw.index(tiny_gpt.state_dict()["tok_emb.weight"].numpy().tobytes()[:64])  # inside the tensor data
    raw[start:start + 8] = bytes(b ^ 0xFF for b in raw[start:start + 8])
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="damaged.*CRC-32"):
        read_checkpoint(path)


@pytest.mark.parametrize("change", [
    lambda c: c.pop("extra"), lambda c: c.pop("rng"), lambda c: c.update(step="7"),
    lambda c: c.update(model=[1, 2]), lambda c: c["rng"].pop("python"), lambda c: c.update(optimizer=3),
], ids=["no extra", "no rng", "step str", "model list", "no python rng", "optimizer int"])
def test_malformed_checkpoint_dicts_are_checkpoint_errors(tiny_gpt, tmp_path, change):
    path = save_checkpoint(tmp_path / "ckpt.pt", tiny_gpt, None, 0)
    checkpoint = torch.load(path, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="malformed checkpoint"):
        load_checkpoint(path, tiny_gpt)


def test_optimizer_state_of_another_model_is_a_checkpoint_error(tiny_gpt, tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", tiny_gpt, torch.optim.SGD(tiny_gpt.parameters(), lr=0.1), 0)
    other = training.AdamW([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(CheckpointError, match="optimizer state does not fit"):
        load_checkpoint(path, tiny_gpt, other)


def test_a_save_removes_only_the_temporary_files_of_dead_writers(tiny_gpt, tmp_path):
    dead, old, live = (tmp_path / name for name in (".last.pt.99999999.abcd1234.tmp", ".best.pt.k3j_9x0q.tmp",
                                                     f".last.pt.{os.getpid()}.abcd1234.tmp"))
    other = tmp_path / "notes.tmp"
    for path in (dead, old, live, other):
        path.write_bytes(b"partial")
    save_checkpoint(tmp_path / "last.pt", tiny_gpt, None, 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "last.pt"])

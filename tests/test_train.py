"""TrainConfig validation and train(): early stopping, the NaN guard, history, accumulation, a real run."""
import json
import math
from pathlib import Path

import pytest
import torch

import training
from training import TrainConfig, cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------- TrainConfig


def test_defaults_are_valid():
    config = TrainConfig()
    assert config.total_schedule_steps == config.max_steps
    assert TrainConfig(decay_steps=7, max_steps=5, warmup_steps=1).total_schedule_steps == 7


def test_int_is_accepted_for_a_float_field():
    config = TrainConfig(lr=1, min_lr=0)
    assert config.lr == 1.0 and isinstance(config.lr, float)


@pytest.mark.parametrize("overrides, error, field", [
    (dict(lr=-1.0), ValueError, "lr"),
    (dict(lr=0.0), ValueError, "lr"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(max_steps=1.5), TypeError, "max_steps"),
    (dict(context_length="128"), TypeError, "context_length"),
    (dict(compile=1), TypeError, "compile"),
    (dict(optimizer="adam"), ValueError, "optimizer"),
    (dict(dtype="float16"), ValueError, "dtype"),
    (dict(schedule="step"), ValueError, "schedule"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(beta2=-0.1), ValueError, "beta2"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(patience=-1), ValueError, "patience"),
    (dict(min_lr=1.0), ValueError, "min_lr"),
    (dict(d_model=100, n_heads=3), ValueError, "d_model"),
    (dict(warmup_steps=50, max_steps=10), ValueError, "warmup_steps"),
])
def test_bad_config_names_the_field(overrides, error, field):
    with pytest.raises(error, match=rf"TrainConfig\.{field}\b"):
        TrainConfig(**overrides)


def test_bad_choice_lists_the_allowed_values():
    with pytest.raises(ValueError, match=r"\['auto', 'adamw', 'adamw-foreach', 'torch-adamw', 'sgd', 'muon'\]"):
        TrainConfig(optimizer="adam")


def test_train_rejects_a_non_config():
    with pytest.raises(TypeError, match="TrainConfig"):
        training.train({"max_steps": 1})


# ---------------------------------------------------------------------------- the loop


def read_history(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "history.jsonl").read_text().splitlines()]


def test_history_is_returned_and_written_as_json_lines(tiny_train_config):
    config = tiny_train_config(max_steps=12, eval_interval=5, log_interval=3)
    result = training.train(config)
    assert [entry["step"] for entry in result.history] == list(range(1, 13))
    assert read_history(config.out_dir) == result.history
    evaluated = [entry["step"] for entry in result.history if "val_loss" in entry]
    assert evaluated == [5, 10, 12]  # every eval_interval and at the end
    for entry in result.history:
        assert math.isfinite(entry["loss"]) and entry["lr"] > 0
    assert result.stop_reason == "max_steps" and result.step == 12
    assert result.best_val_loss == min(entry["val_loss"] for entry in result.history if "val_loss" in entry)
    assert Path(result.best_checkpoint).is_file() and Path(result.last_checkpoint).is_file()
    assert result.tokens_per_second > 0


def test_learning_rate_follows_the_schedule(tiny_train_config):
    config = tiny_train_config(max_steps=10, warmup_steps=3, lr=1e-2, min_lr=1e-3)
    result = training.train(config)
    expected = [training.cosine_lr(step, max_lr=1e-2, min_lr=1e-3, warmup_steps=3, total_steps=10)
                for step in range(1, 11)]  # updates are numbered from 1: the first already learns
    assert [entry["lr"] for entry in result.history] == pytest.approx(expected, rel=1e-12)


def test_early_stopping_with_patience(tiny_train_config):
    # An LR of 1e-30 changes no float32 weight, so the val loss never gets better after the first evaluation.
    config = tiny_train_config(max_steps=100, eval_interval=5, patience=2, lr=1e-30, min_lr=0.0, warmup_steps=0)
    result = training.train(config)
    assert result.stop_reason.startswith("early stopping")
    assert result.step == 15  # best at 5, no better at 10 and 15
    assert training.read_checkpoint(result.best_checkpoint)["step"] == 5
    assert training.read_checkpoint(result.last_checkpoint)["step"] == 15


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_train_config):
    config = tiny_train_config(max_steps=20, eval_interval=5, log_interval=1)
    seeded = training.seeded_batches(training.load_corpus(config.data).train_ids, config, torch.device("cpu"))

    def batches_that_turn_the_loss_nan(step, micro):
        x, y = seeded(step, micro)  # from update 8 every target is ignored: the mean loss is 0/0 = nan
        return (x, torch.full_like(y, -100)) if step >= 8 else (x, y)
    result = training.train(config, batches=batches_that_turn_the_loss_nan)
    assert result.step == 8
    assert "non-finite loss" in result.stop_reason and "best.pt" in result.stop_reason
    assert math.isnan(result.history[-1]["loss"])
    good = training.read_checkpoint(result.best_checkpoint)
    assert good["step"] == 5
    assert all(torch.isfinite(t).all() for t in good["model"].values())
    assert read_history(config.out_dir)[-1]["step"] == 8  # the history shows where it went wrong


def test_huge_learning_rate_is_caught(tiny_train_config):
    config = tiny_train_config(max_steps=30, lr=1e30, min_lr=0.0, grad_clip=0.0, optimizer="sgd", warmup_steps=0)
    result = training.train(config)
    assert result.stop_reason.startswith("non-finite")
    assert result.step < 30


def test_micro_batches_give_the_gradient_of_one_big_batch(tiny_gpt):
    torch.manual_seed(0)
    x, y = torch.randint(17, (12, 16)), torch.randint(17, (12, 16))
    cross_entropy(tiny_gpt(x), y).backward()
    big = [p.grad.clone() for p in tiny_gpt.parameters()]
    tiny_gpt.zero_grad()
    for xs, ys in zip(x.chunk(3), y.chunk(3)):  # what train() does with grad_accum_steps=3
        (cross_entropy(tiny_gpt(xs), ys) / 3).backward()
    for p, g in zip(tiny_gpt.parameters(), big):
        # float32 sums in another order: ~1e-7 relative per addition
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_train_with_accumulation_equals_one_big_batch(tiny_train_config, corpus_slice_file, tmp_path):
    """train(batch_size=4, grad_accum_steps=4) updates like train(batch_size=16): the same 16 sequences."""
    data = training.load_corpus(str(corpus_slice_file)).train_ids

    def rows_of_one_big_batch(batch_size):
        def batches(step, micro):  # micro-batch `micro` of update `step`: its rows of one 16-sequence batch
            x, y = training.get_batch(data, 16, 32, "cpu", torch.Generator().manual_seed(step))
            rows = slice(micro * batch_size, (micro + 1) * batch_size)
            return x[rows], y[rows]
        return batches
    settings = dict(max_steps=4, eval_interval=4, optimizer="sgd", beta1=0.0, lr=0.1, grad_clip=0.0)
    accumulated = training.train(tiny_train_config(batch_size=4, grad_accum_steps=4, **settings),
                                 batches=rows_of_one_big_batch(4))
    one_batch = training.train(tiny_train_config(batch_size=16, grad_accum_steps=1,
                                                 out_dir=str(tmp_path / "one_batch"), **settings),
                               batches=rows_of_one_big_batch(16))
    for a, b in zip(accumulated.model.parameters(), one_batch.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    losses = lambda result: [entry["loss"] for entry in result.history]
    assert losses(accumulated) == pytest.approx(losses(one_batch), rel=1e-5)


@pytest.mark.slow
def test_short_run_on_the_real_corpus_learns(tmp_path):
    config = TrainConfig(data="shakespeare", out_dir=str(tmp_path), context_length=64, d_model=64, n_layers=2,
                         n_heads=4, d_ff=256, batch_size=16, max_steps=200, warmup_steps=10, lr=1e-2, min_lr=1e-3,
                         eval_interval=100, eval_batches=4, log_interval=50, device="cpu", dtype="fp32",
                         progress=False, seed=0)
    result = training.train(config)
    corpus = training.load_corpus("shakespeare")
    # The unigram model (character frequencies of the training text) on the validation text:
    counts = torch.bincount(corpus.train_ids, minlength=corpus.tokenizer.vocab_size).double()
    unigram_loss = -(counts / counts.sum())[corpus.val_ids].log().mean().item()
    ln_vocab = math.log(corpus.tokenizer.vocab_size)
    first, last = [entry["val_loss"] for entry in result.history if "val_loss" in entry]
    assert last < first
    assert result.best_val_loss < ln_vocab - 1.0  # well below the uniform guess
    assert result.best_val_loss < unigram_loss - 0.3  # it has learned more than letter frequencies
    sample = training.sample_text(result.model, result.tokenizer, 200, seed=0)
    assert len(sample) == 200 and sample == training.sample_text(result.model, result.tokenizer, 200, seed=0)

"""The training doctor: each failure, written as a small synthetic history, gets its diagnosis;
a real short run's history.jsonl is read and diagnosed; the CLI ends with the diagnosis."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import training
from m07_training.doctor import MIN_UPDATES_FOR_PLATEAU

V = 65  # ln V = 4.17


def history(losses, *, lrs=None, grad_norms=None) -> list[dict]:
    """Rows as train() writes them, one per update from 1; lr constant and grad norm 1.0 unless given."""
    n = len(losses)
    lrs = [1e-3] * n if lrs is None else lrs
    grad_norms = [1.0] * n if grad_norms is None else grad_norms
    return [{"step": i + 1, "lr": lr, "loss": float(loss), "grad_norm": float(g)}
            for i, (loss, lr, g) in enumerate(zip(losses, lrs, grad_norms))]


def learning_curve(n=200, start=4.2, end=2.0, seed=0) -> np.ndarray:
    """A healthy loss curve: exponential decay from ln V towards `end`, with batch noise of +-0.05."""
    noise = np.random.default_rng(seed).normal(0.0, 0.05, n)
    return end + (start - end) * np.exp(-np.arange(n) / 30) + noise


def warmup_lrs(n, warmup, peak=1e-2) -> list[float]:
    return [peak * min(1.0, (i + 1) / warmup) for i in range(n)]


def add_evals(rows, every, val, train):
    for row, v, t in zip(rows[every - 1::every], val, train):
        row.update(val_loss=v, train_loss=t)
    return rows


def problems(findings) -> list[str]:
    return [finding.problem for finding in findings]


def test_healthy_run_is_healthy():
    rows = add_evals(history(learning_curve()), 50, val=[2.6, 2.3, 2.2, 2.15], train=[2.5, 2.2, 2.1, 2.0])
    (finding,) = training.diagnose(rows, vocab_size=V, unigram_loss=3.3)
    assert finding.problem == "healthy"
    assert "update 200" in finding.evidence  # where the best val loss is


def test_nan_loss_is_divergence_naming_the_update():
    losses = list(learning_curve(30))
    losses[20:] = [5.0, 40.0, 1e4, math.inf, math.nan]
    rows = history(losses[:25], grad_norms=[1.0] * 20 + [10.0, 1e3, 1e6, math.inf, math.nan])
    found = training.diagnose(rows, vocab_size=V)
    assert problems(found) == ["divergence", "exploding gradients"]
    assert "inf at update 24" in found[0].evidence and "1e+04 at update 23" in found[0].evidence
    assert "no good checkpoint" in found[0].advice  # no evaluation, so no best.pt
    rows[10]["val_loss"] = 2.5  # an evaluation better than a uniform guess wrote best.pt
    assert "best.pt, update 11, val loss 2.500" in training.diagnose(rows, vocab_size=V)[0].advice


def cosine_lrs(n, peak) -> list[float]:
    """A cosine decay from `peak` at update 1 to a tenth of it, as train() logs it with no warmup."""
    return [peak * (0.1 + 0.45 * (1 + math.cos(math.pi * i / n))) for i in range(n)]


def test_divergence_advice_names_the_peak_lr_not_the_lr_where_it_ended():
    losses = list(learning_curve(30))
    losses[25] = math.nan
    rows = history(losses[:26], lrs=cosine_lrs(26, peak=10.0))  # the LR is about 5 when the loss turns NaN
    advice = training.diagnose(rows, vocab_size=V)[0].advice
    assert "the peak learning rate was 10)" in advice


def test_a_plateau_names_the_peak_lr():
    rows = history(np.full(100, 3.4), lrs=cosine_lrs(100, peak=3.0))
    (finding,) = training.diagnose(rows, vocab_size=V, unigram_loss=3.3)
    assert "(peak learning rate 3)" in finding.advice


def test_a_spike_after_the_peak_names_the_peak_lr():
    losses = learning_curve(100)
    losses[4] = 7.0
    spike = training.diagnose(history(losses, lrs=cosine_lrs(100, peak=3.0)), vocab_size=V)[0]
    assert spike.problem == "loss spike" and "after the learning rate reached its peak 3 at update 1" in spike.evidence


def test_forgotten_zero_grad_puts_zero_grad_before_lowering_the_lr():
    losses = np.concatenate([learning_curve(100), np.linspace(2.2, 3.5, 50)])  # falls, then climbs back
    norms = [1.0] * 30 + [1.0 + i for i in range(120)]  # the sum of every gradient so far: grows, stays finite
    found = training.diagnose(history(losses, grad_norms=norms), vocab_size=V)
    assert found[0].problem == "exploding gradients" and "divergence" in problems(found)
    assert found[0].advice.startswith("check that optimizer.zero_grad() runs every update")


def test_a_norm_that_explodes_into_nan_is_advised_clipping_first():
    norms = [1.0] * 20 + [10.0, 1e3, 1e6, math.inf]
    found = training.diagnose(history(list(learning_curve(24)), grad_norms=norms), vocab_size=V)
    assert found[0].problem == "exploding gradients" and found[0].advice.startswith("clip the gradient norm")


def test_loss_that_rises_and_never_comes_back_is_divergence():
    losses = np.concatenate([learning_curve(100), np.linspace(2.2, 6.0, 50)])
    found = training.diagnose(history(losses), vocab_size=V)
    assert found[0].problem == "divergence" and "did not come back" in found[0].evidence
    assert "loss spike" not in problems(found)  # the rise is the divergence, not a separate spike


def test_spike_above_ln_v_during_warmup_blames_the_warmup():
    losses = learning_curve(100)
    losses[7:12] = 5.0  # updates 8-12
    found = training.diagnose(history(losses, lrs=warmup_lrs(100, warmup=20)), vocab_size=V)
    assert problems(found) == ["loss spike"]
    assert "updates 8-12" in found[0].evidence and "ln V = 4.17" in found[0].evidence
    assert "during the warmup" in found[0].evidence and "warmup too short" in found[0].advice


def test_spike_long_after_warmup_blames_the_learning_rate():
    losses = learning_curve(200)
    losses[150:153] = 3.5
    found = training.diagnose(history(losses, lrs=warmup_lrs(200, warmup=20)), vocab_size=V)
    assert problems(found) == ["loss spike"]
    assert "updates 151-153" in found[0].evidence and "ln V" not in found[0].evidence
    assert "warmup" not in found[0].advice and "lower the peak learning rate" in found[0].advice


def test_batch_noise_is_not_a_spike():
    noisy = learning_curve(300) + np.random.default_rng(1).normal(0.0, 0.1, 300)
    assert problems(training.diagnose(history(noisy), vocab_size=V)) == ["healthy"]


def test_no_improvement_over_the_unigram_loss_is_a_plateau_from_too_low_an_lr():
    losses = learning_curve(500, start=4.2, end=4.0)
    (finding,) = training.diagnose(history(losses, lrs=[1e-5] * 500), vocab_size=V, unigram_loss=3.3)
    assert finding.problem == "plateau"
    assert "after 500 updates" in finding.evidence and "unigram loss 3.30" in finding.evidence
    assert "too low" in finding.advice and "1e-05" in finding.advice


def test_without_unigram_loss_the_plateau_bar_is_ln_v():
    (finding,) = training.diagnose(history(learning_curve(100, end=4.15)), vocab_size=V)
    assert finding.problem == "plateau" and "ln V = 4.17" in finding.evidence


def test_a_short_run_is_too_short_to_call_a_plateau():
    rows = history(learning_curve(MIN_UPDATES_FOR_PLATEAU - 1, end=4.0))
    assert problems(training.diagnose(rows, vocab_size=V, unigram_loss=3.3)) == ["healthy"]


def test_first_loss_far_above_ln_v_is_a_bad_initialisation():
    losses = learning_curve(100, start=25.0, end=2.0)
    found = training.diagnose(history(losses), vocab_size=V)
    assert problems(found) == ["bad initialisation"]
    assert "first loss is 25" in found[0].evidence and "smaller scale" in found[0].advice


def test_val_rising_while_train_falls_is_overfitting_and_names_best_pt():
    rows = add_evals(history(learning_curve(600)), 100, val=[2.5, 2.2, 2.1, 2.15, 2.2, 2.3],
                     train=[2.4, 2.0, 1.8, 1.6, 1.4, 1.2])
    (finding,) = training.diagnose(rows, vocab_size=V)
    assert finding.problem == "overfitting"
    assert "rose for 3 evaluations after update 300" in finding.evidence
    assert "best.pt is from update 300" in finding.evidence and finding.steps == (300, 600)


def test_one_worse_evaluation_is_not_yet_overfitting():
    rows = add_evals(history(learning_curve(300)), 100, val=[2.5, 2.2, 2.3], train=[2.4, 2.0, 1.8])
    assert problems(training.diagnose(rows, vocab_size=V)) == ["healthy"]


def test_val_and_train_rising_together_is_not_overfitting():
    rows = add_evals(history(learning_curve(500)), 100, val=[2.5, 2.2, 2.25, 2.3, 2.35],
                     train=[2.4, 2.1, 2.15, 2.2, 2.25])
    assert "overfitting" not in problems(training.diagnose(rows, vocab_size=V))


def test_a_growing_gradient_norm_is_exploding():
    norms = [1.0] * 50 + [1.0 + i for i in range(50)]  # grows every update, as when .grad is never zeroed
    found = training.diagnose(history(learning_curve(100), grad_norms=norms), vocab_size=V)
    assert problems(found) == ["exploding gradients"]
    assert "zero_grad" in found[0].advice


def test_diagnose_needs_no_vocab_size():
    rows = history(learning_curve())
    rows[120]["loss"] = math.nan
    assert problems(training.diagnose(rows)) == ["divergence"]


def test_advice_does_not_ask_for_clipping_that_was_already_on():
    rows = history(learning_curve(100), grad_norms=[1.0] * 50 + [1.0 + i for i in range(50)])
    unclipped = training.diagnose(rows, vocab_size=V, grad_clip=0)[0].advice
    clipped = training.diagnose(rows, vocab_size=V, grad_clip=1.0)[0].advice
    assert "clip the gradient norm (grad_clip=1.0)" in unclipped
    assert "grad_clip=1.0" not in clipped and "clip harder than the norm 1 used here" in clipped


def test_one_outlier_gradient_norm_is_not_exploding():
    norms = [1.0] * 100
    norms[60] = 20.0
    assert problems(training.diagnose(history(learning_curve(100), grad_norms=norms), vocab_size=V)) == ["healthy"]


def test_a_gradient_norm_that_dies_is_vanishing():
    norms = list(np.geomspace(1.0, 1e-5, 100))
    (finding,) = training.diagnose(history(learning_curve(100), grad_norms=norms), vocab_size=V)
    assert finding.problem == "vanishing gradients" and "per-layer" in finding.advice


def test_near_zero_validation_loss_is_a_leak_not_a_success():
    losses = learning_curve(100, end=0.01).clip(0.001)
    rows = add_evals(history(losses, grad_norms=list(np.geomspace(1.0, 1e-5, 100))), 50, val=[0.05, 0.01],
                     train=[0.06, 0.01])
    found = training.diagnose(rows, vocab_size=V)
    assert problems(found) == ["suspiciously low loss"]  # not also 'vanishing gradients'
    assert "shifted by one" in found[0].advice


def test_str_of_a_finding_has_evidence_and_advice():
    text = training.format_diagnosis(training.diagnose(history(learning_curve(100)), vocab_size=V))
    assert text.startswith("training doctor:\n  1. healthy: the loss fell from") and "try: " in text


def test_read_history_from_a_file_or_its_folder_keeps_nan(tmp_path):
    rows = history([4.0, 3.0, math.nan])
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    for source in (tmp_path, tmp_path / "history.jsonl", str(tmp_path)):
        read = training.read_history(source)
        assert [row["step"] for row in read] == [1, 2, 3] and math.isnan(read[-1]["loss"])


@pytest.mark.parametrize("rows, message", [
    ([], "history is empty"),
    ([{"step": 1}], "history row 0 must be a dict"),
    ([{"step": "1", "loss": 2.0}], "history row 0 must be a dict"),
])
def test_bad_history_is_a_clear_error(rows, message):
    with pytest.raises(ValueError, match=message):
        training.diagnose(rows)


def test_missing_history_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no training history at"):
        training.read_history(tmp_path)


def test_bad_vocab_size_is_a_clear_error():
    with pytest.raises(ValueError, match="vocab_size"):
        training.diagnose(history([4.0]), vocab_size=1)


def test_unigram_loss_is_the_entropy_of_the_token_frequencies():
    ids = torch.tensor([0, 0, 0, 1, 2, 2, 5, 5])
    counts = torch.bincount(ids).double()
    expected = torch.distributions.Categorical(probs=counts / counts.sum()).entropy().item()
    assert training.unigram_loss(ids) == pytest.approx(expected, rel=1e-12)


def test_near_zero_training_loss_without_evaluations_is_suspicious():
    found = training.diagnose(history(learning_curve(300, end=0.01).clip(0.001)), vocab_size=V)
    assert problems(found) == ["suspiciously low loss"] and "training loss" in found[0].evidence


def test_a_diverged_run_is_not_also_called_a_plateau():
    losses = np.concatenate([learning_curve(100), np.full(50, 9.0)])
    assert "plateau" not in problems(training.diagnose(history(losses), vocab_size=V, unigram_loss=3.3))


@pytest.mark.slow
def test_real_run_logs_grad_norm_and_is_diagnosed_from_its_history_file(tiny_train_config, one_thread):
    config = tiny_train_config(lr=3e-3)
    result = training.train(config)
    assert all(row["grad_norm"] > 0 for row in result.history)
    assert training.read_history(config.out_dir) == result.history
    assert problems(training.diagnose(config.out_dir, vocab_size=result.tokenizer.vocab_size)) == ["healthy"]


@pytest.mark.slow
def test_real_diverged_run_is_diagnosed(tiny_train_config, one_thread):
    config = tiny_train_config(optimizer="sgd", lr=30.0, min_lr=3.0, grad_clip=0.0, warmup_steps=0)
    result = training.train(config)
    assert result.stop_reason.startswith("non-finite loss")
    found = training.diagnose(config.out_dir, vocab_size=result.tokenizer.vocab_size)
    assert problems(found)[0] == "divergence"
    assert f"at update {result.step}" in found[0].evidence


@pytest.mark.slow
def test_cli_prints_the_diagnosis_of_a_diverged_run(corpus_slice_file, tmp_path, capsys, one_thread):
    argv = ["--data", str(corpus_slice_file), "--out-dir", str(tmp_path), "--context-length", "32",
            "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--d-ff", "64", "--batch-size", "8",
            "--max-steps", "20", "--warmup-steps", "0", "--optimizer", "sgd", "--lr", "30", "--min-lr", "3",
            "--grad-clip", "0", "--eval-interval", "10", "--eval-batches", "2", "--no-progress"]
    assert training.main(argv) == training.EXIT_DIVERGED
    err = capsys.readouterr().err  # a failed run reports on stderr: the error, then the diagnosis
    assert "training doctor:\n  1. divergence: the loss became" in err



def test_a_null_validation_loss_is_a_divergence_not_healthy():
    rows = history(list(learning_curve(30)))
    rows[-1]["val_loss"] = math.nan  # history.jsonl stores it as null; read_history reads NaN
    found = training.diagnose(rows, vocab_size=V)
    assert problems(found)[0] == "divergence" and "validation loss became nan at update 30" in found[0].evidence


def test_a_history_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "history.jsonl").write_bytes(b'{"step": 1, "loss": 4.0}\n\xff\xfe\n')
    with pytest.raises(ValueError, match=r"history\.jsonl is not UTF-8 text"):
        training.diagnose(tmp_path)


def ladder_of(*losses):
    """A counting ladder {order: Score} with these losses for orders 1, 2, ..."""
    return {order: training.Score(loss, 0.005, 10_000, 32, 100) for order, loss in enumerate(losses, start=1)}


LADDER = ladder_of(3.3, 2.47, 1.96, 1.60, 1.42, 1.36)


def test_a_healthy_run_names_the_highest_rung_it_beats_and_the_one_it_has_not():
    rows = add_evals(history(learning_curve()), 50, val=[2.6, 2.3, 2.2, 1.9], train=[2.5, 2.2, 2.1, 1.9])
    (finding,) = training.diagnose(rows, vocab_size=V, ladder=LADDER)
    assert finding.problem == "healthy"
    assert "best val loss 1.900 is at update 200 and beats the trigram (1.960), not the 4-gram (1.600) of the " \
           "counting ladder" in finding.evidence
    assert "until the val loss passes the 6-gram (1.360)" in finding.advice


def test_a_run_past_the_top_rung_gets_the_plain_advice():
    rows = add_evals(history(learning_curve()), 50, val=[2.6, 2.3, 2.2, 1.3], train=[2.5, 2.2, 2.1, 1.3])
    (finding,) = training.diagnose(rows, vocab_size=V, ladder=LADDER)
    assert "beats the 6-gram (1.360), the highest rung counted" in finding.evidence
    assert finding.advice == "nothing to fix: train longer, or scale the model up"


def test_the_ladders_unigram_is_the_plateau_bar_and_the_plateau_names_no_rung_beaten():
    rows = add_evals(history(learning_curve(500, start=4.2, end=4.0), lrs=[1e-5] * 500), 250, val=[4.1, 4.05],
                     train=[4.1, 4.0])
    (finding,) = training.diagnose(rows, vocab_size=V, ladder=LADDER)
    assert finding.problem == "plateau" and "unigram loss 3.30" in finding.evidence
    assert "the best val loss 4.050 beats no counting model (the unigram scores 3.300)" in finding.evidence


def test_a_ladder_that_is_not_ngram_ladders_is_refused():
    with pytest.raises(ValueError, match="ladder must be"):
        training.diagnose(history(learning_curve()), ladder={1: 3.3})

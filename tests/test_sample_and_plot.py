"""A finished run is usable from the command line: m07-sample writes text from its checkpoint,
m07-plot draws its history; bad input is one 'error:' line and an exit status, never a traceback.
Every sample is drawn from next_token_probs (temperature, top-k, top-p), tested here first."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import training
from m06_transformer import next_token_probs
from m07_training import plot, sampling

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(corpus_slice_file, tmp_path_factory):
    """A finished run of a few seconds: its TrainResult; its out_dir holds best.pt, last.pt, history.jsonl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out_dir = tmp_path_factory.mktemp("run") / "out"
        return training.train(training.TrainConfig(
            data=str(corpus_slice_file), out_dir=str(out_dir), context_length=32, d_model=32, n_layers=1,
            n_heads=2, d_ff=64, batch_size=8, max_steps=40, warmup_steps=5, eval_interval=20, eval_batches=2,
            device="cpu", dtype="fp32", sample_chars=0, progress=False, seed=0))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def out_dir(run) -> Path:
    return Path(run.best_checkpoint).parent


def errors_of(capsys, main, argv, status: int) -> str:
    """stderr of a command that must fail with `status`: argparse's usage and error (2), or one line (1)."""
    if status == 2:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    else:
        assert main(argv) == status
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    if status == 1:
        assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    return captured.err


# the next-token distribution: temperature, top-k, top-p

def random_logits(seed: int, rows: int = 64, vocab: int = 50) -> torch.Tensor:
    return 3 * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


def nucleus_reference(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """top-p written the textbook way, one row at a time: sort, cumsum, keep up to the first index that reaches p."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    out = torch.zeros_like(probs)
    for row, p in enumerate(probs):
        sorted_p, order = p.sort(descending=True)
        keep = int(torch.searchsorted(sorted_p.cumsum(0), torch.tensor(top_p, dtype=torch.float64))) + 1
        kept = order[:keep]
        out[row, kept] = p[kept] / p[kept].sum()
    return out


@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.5), dict(temperature=2.0, top_k=7),
                                      dict(top_p=0.9), dict(temperature=1.5, top_k=20, top_p=0.5)])
def test_the_next_token_distribution_is_a_distribution(settings):
    probs = next_token_probs(random_logits(0), **settings)
    assert probs.dtype == torch.float32 and (probs >= 0).all()
    assert torch.allclose(probs.sum(-1), torch.ones(64), atol=1e-6)


def test_temperature_1_without_cuts_is_the_softmax_and_lower_temperatures_sharpen():
    logits = random_logits(1)
    assert torch.allclose(next_token_probs(logits), torch.softmax(logits, -1))
    entropy = [-(p * p.clamp_min(1e-30).log()).sum(-1) for p in (next_token_probs(logits, t) for t in (0.5, 1.0, 2.0))]
    assert (entropy[0] < entropy[1]).all() and (entropy[1] < entropy[2]).all()


def test_top_k_1_is_greedy_and_top_k_keeps_the_k_likeliest():
    logits = random_logits(2)
    greedy = next_token_probs(logits, temperature=3.0, top_k=1)
    assert torch.equal(greedy, torch.nn.functional.one_hot(logits.argmax(-1), 50).float())
    five = next_token_probs(logits, top_k=5)
    assert ((five > 0).sum(-1) == 5).all()
    assert torch.equal(five > 0, torch.zeros_like(five, dtype=torch.bool).scatter(-1, logits.topk(5).indices, True))


@pytest.mark.parametrize("temperature, top_p", [(1.0, 0.5), (0.7, 0.9), (1.3, 0.95), (1.0, 0.01)])
def test_top_p_equals_a_sorted_cumsum_reference(temperature, top_p):
    logits = random_logits(3)
    probs = next_token_probs(logits, temperature, top_p=top_p)
    assert torch.allclose(probs.double(), nucleus_reference(logits, temperature, top_p), atol=1e-6)


def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = {p: (next_token_probs(logits, top_p=p) > 0).sum().item() for p in (0.4, 0.5, 0.79, 0.81, 0.96, 1.0)}
    assert kept == {0.4: 1, 0.5: 1, 0.79: 2, 0.81: 3, 0.96: 4, 1.0: 4}
    assert torch.allclose(next_token_probs(logits, top_p=0.79), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))


def test_top_p_1_and_no_cuts_change_nothing():
    logits = random_logits(4)
    assert torch.equal(next_token_probs(logits, 0.8, top_p=1.0), next_token_probs(logits, 0.8))


@pytest.mark.parametrize("settings, message", [
    (dict(temperature=0), "temperature must be a finite number > 0, got 0"),
    (dict(temperature=float("nan")), "temperature must be"),
    (dict(top_k=0), r"top_k must be an int from 1 to 50 \(the vocabulary size\), got 0"),
    (dict(top_k=51), "top_k must be"),
    (dict(top_k=2.0), "top_k must be"),
    (dict(top_p=0), r"top_p must be a number above 0 and at most 1 \(1 keeps every token\), got 0"),
    (dict(top_p=1.5), "top_p must be"),
    (dict(top_p=float("nan")), "top_p must be"),
    (dict(top_p=True), "top_p must be"),
])
def test_bad_decoding_settings_name_themselves(settings, message):
    with pytest.raises(ValueError, match="^" + message):
        next_token_probs(random_logits(5), **settings)


def test_sampling_with_top_p_draws_only_from_the_nucleus(run):
    model, tokenizer = run.model.eval(), run.tokenizer
    prompt = tokenizer.encode("The ").unsqueeze(0)
    with torch.no_grad():
        allowed = next_token_probs(model(prompt)[0, -1], top_p=0.5) > 0
        draws = model.generate(prompt.expand(300, -1), 1, temperature=1.0, top_p=0.5,
                               generator=torch.Generator().manual_seed(0))[:, -1]
    assert allowed[draws].all() and 1 <= allowed.sum() < tokenizer.vocab_size
    assert training.sample_text(model, tokenizer, 50, top_p=0.9, seed=2) != training.sample_text(model, tokenizer, 50, seed=2)


# m07-sample

def test_a_checkpoint_and_its_out_dir_give_the_same_sample_for_the_same_seed(out_dir, run):
    from_file = sampling.sample_from_checkpoint(out_dir / "best.pt", chars=120, seed=3)
    assert sampling.sample_from_checkpoint(out_dir, chars=120, seed=3) == from_file
    assert len(from_file) == 120 and set(from_file) <= set(run.tokenizer.chars)
    assert sampling.sample_from_checkpoint(out_dir, chars=120, seed=4) != from_file


def test_the_sample_is_the_trained_models(out_dir, run):
    training.load_checkpoint(out_dir / "best.pt", run.model)
    expected = training.sample_text(run.model, run.tokenizer, 60, prompt="KING", top_k=5, seed=1)
    assert sampling.sample_from_checkpoint(out_dir, prompt="KING", chars=60, top_k=5, seed=1) == expected


def test_an_out_dir_without_best_pt_samples_from_last_pt(out_dir, tmp_path):
    shutil.copy(out_dir / "last.pt", tmp_path / "last.pt")
    assert sampling.sample_from_checkpoint(tmp_path, chars=40) == \
        sampling.sample_from_checkpoint(out_dir / "last.pt", chars=40)


def test_the_sample_command_prints_the_prompt_and_its_continuation(out_dir, capsys):
    assert sampling.main([str(out_dir), "--prompt", "ROMEO:", "--chars", "80", "--temperature", "0.5",
                          "--top-k", "10", "--seed", "7"]) == 0
    expected = sampling.sample_from_checkpoint(out_dir, prompt="ROMEO:", chars=80, temperature=0.5, top_k=10, seed=7)
    assert capsys.readouterr().out == "ROMEO:" + expected + "\n"
    assert sampling.main([str(out_dir), "--chars", "60", "--top-p", "0.8", "--seed", "7"]) == 0
    assert capsys.readouterr().out == "\n" + sampling.sample_from_checkpoint(out_dir, chars=60, top_p=0.8, seed=7) + "\n"


def test_the_library_names_the_unusable_argument(out_dir, tmp_path):
    with pytest.raises(ValueError, match=r"^prompt has 2 character\(s\) not in .* '@' 'é'"):
        sampling.sample_from_checkpoint(out_dir, prompt="To é@")
    with pytest.raises(ValueError, match="^temperature must be"):
        sampling.sample_from_checkpoint(out_dir, temperature=0)
    with pytest.raises(ValueError, match="^top_p must be"):
        sampling.sample_from_checkpoint(out_dir, top_p=1.01)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        sampling.sample_from_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    with pytest.raises(training.CheckpointError, match="notes.txt"):
        sampling.sample_from_checkpoint(tmp_path / "notes.txt")


def bad_sample_inputs(out_dir: Path, tmp: Path):
    """(argv, exit status, what stderr must name) for each kind of bad input to m07-sample."""
    (tmp / "notes.txt").write_text("not a checkpoint\n")
    torch.save({"weights": torch.zeros(2)}, tmp / "other.pt")
    (tmp / "empty").mkdir()
    run = str(out_dir)
    return [
        ([str(tmp / "nope.pt")], 1, str(tmp / "nope.pt")),
        ([str(tmp / "notes.txt")], 1, str(tmp / "notes.txt")),
        ([str(tmp / "other.pt")], 1, "not a training checkpoint"),
        ([str(tmp / "empty")], 1, "holds no checkpoint (neither best.pt nor last.pt)"),
        ([run, "--temperature", "0"], 1, "--temperature must be a finite number > 0, got 0.0"),
        ([run, "--temperature", "-1"], 1, "--temperature"),
        ([run, "--temperature", "warm"], 2, "argument --temperature: invalid float value"),
        ([run, "--top-k", "0"], 1, "--top-k must be an int from 1 to"),
        ([run, "--top-k", "100000"], 1, "--top-k"),
        ([run, "--top-p", "0"], 1, "--top-p must be a number above 0 and at most 1 (1 keeps every token), got 0.0"),
        ([run, "--top-p", "1.5"], 1, "--top-p must be"),
        ([run, "--top-p", "nan"], 1, "--top-p must be"),
        ([run, "--top-p", "most"], 2, "argument --top-p: invalid float value"),
        ([run, "--chars", "-5"], 1, "--chars must be an int >= 0, got -5"),
        ([run, "--chars", "many"], 2, "argument --chars: invalid int value"),
        ([run, "--prompt", "Zé~"], 1, "'~' 'é'"),
        ([run, "--prompt="], 1, "--prompt must be a non-empty string"),
        ([run, "--device", "abacus"], 1, "unknown device 'abacus'"),
        ([run, "--colour"], 2, "unrecognized arguments: --colour"),
        ([], 2, "CHECKPOINT_OR_OUT_DIR"),
    ]


def test_every_bad_input_to_the_sample_command_is_one_clear_line(out_dir, tmp_path, capsys):
    for argv, status, named in bad_sample_inputs(out_dir, tmp_path):
        assert named in errors_of(capsys, sampling.main, argv, status), argv


@pytest.mark.slow
def test_the_commands_run_as_modules(out_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}

    def module(*args):
        return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=tmp_path,
                              env=env, timeout=120)
    done = module("m07_training.sampling", str(out_dir), "--chars", "50", "--seed", "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "\n" + sampling.sample_from_checkpoint(out_dir, chars=50, seed=2) + "\n"
    refused = module("m07_training.sampling", str(out_dir), "--prompt", "€")
    assert refused.returncode == 1 and refused.stderr.startswith("error: --prompt has 1 character(s)")
    assert "Traceback" not in refused.stderr
    png = tmp_path / "run.png"
    drawn = module("m07_training.plot", str(out_dir), "-o", str(png))
    assert drawn.returncode == 0 and drawn.stdout == f"wrote {png}\n" and png.read_bytes().startswith(PNG_MAGIC)


# m07-plot

def panel_labels(figure) -> list[list[str]]:
    return [ax.get_legend_handles_labels()[1] for ax in figure.axes]


def test_plot_run_draws_losses_lr_and_gradient_norm(run, out_dir, tmp_path):
    png = tmp_path / "history.png"
    figure = plot.plot_run(out_dir, png)
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 10_000
    losses, lr, norms = panel_labels(figure)
    assert {"train loss (one batch)", "train loss (mean of 10)", "train loss at evaluations",
            "val loss at evaluations"} <= set(losses)
    assert lr == ["learning rate"] and norms[0] == "gradient norm (one update)"
    assert figure.axes[2].get_yscale() == "log" and figure.axes[2].get_xlabel() == "update"
    assert any(label.startswith("ln V = ") for label in losses)  # the alphabet, from the out_dir's checkpoint


def test_plot_run_takes_a_train_result_rows_or_a_history_file(run, out_dir):
    for source in (run, run.history, out_dir / "history.jsonl"):
        figure = plot.plot_run(source)
        assert len(figure.axes) == 3 and len(figure.axes[0].lines) >= 4, source


def test_the_doctors_findings_are_shaded_with_their_names(run):
    rows = [dict(row) for row in run.history]
    for row in rows[25:28]:
        row["loss"] += 2.0  # a loss spike at updates 26-28
    labels = panel_labels(plot.plot_run(rows))[0]
    spike = [label for label in labels if "loss spike" in label]
    assert spike == ["doctor 1: loss spike (updates 26-28)"]
    assert not any("doctor" in label for label in panel_labels(plot.plot_run(run))[0])  # healthy: nothing shaded


def test_the_plot_command_writes_beside_the_history_and_says_where(out_dir, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(out_dir, folder)
    assert plot.main([str(folder)]) == 0
    assert capsys.readouterr().out == f"wrote {folder / 'history.png'}\n"
    assert (folder / "history.png").read_bytes().startswith(PNG_MAGIC)
    other = tmp_path / "curves.png"
    assert plot.main([str(folder / "history.jsonl"), "-o", str(other)]) == 0
    assert capsys.readouterr().out == f"wrote {other}\n" and other.stat().st_size > 10_000


def test_every_bad_input_to_the_plot_command_is_one_clear_line(out_dir, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a history\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.jsonl").write_text("\n")
    cases = [
        ([str(tmp_path / "nope")], 1, f"no training history at {tmp_path / 'nope'}"),
        ([str(tmp_path / "empty")], 1, str(tmp_path / "empty" / "history.jsonl")),
        ([str(tmp_path / "notes.txt")], 1, f"{tmp_path / 'notes.txt'}, line 1: not a JSON object"),
        ([str(tmp_path / "blank.jsonl")], 1, "history is empty"),
        ([str(out_dir), "-o", str(tmp_path / "no" / "such" / "plot.png")], 1, f"no folder {tmp_path / 'no' / 'such'}"),
        ([str(out_dir), "-o", str(tmp_path)], 1, f"could not write {tmp_path}"),
        ([str(out_dir), "--dpi", "300"], 2, "unrecognized arguments: --dpi"),
        ([], 2, "OUT_DIR_OR_HISTORY"),
    ]
    for argv, status, named in cases:
        assert named in errors_of(capsys, plot.main, argv, status), argv
    assert not (tmp_path / "no").exists()

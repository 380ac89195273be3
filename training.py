"""training.py: train a small GPT from scratch; the face of the m07_training package.

Every piece a language-model trainer needs, written from scratch in plain PyTorch and checked
against PyTorch's own versions in tests/ and in the lessons. Each lives in a file of its own in
m07_training/, the production twin of one lesson; import them from here:

    lesson 1  loss          m07_training/loss.py         cross_entropy, perplexity
    lesson 2  optimizers    m07_training/optimizers.py   SGD, AdamW
    lesson 3  schedules     m07_training/schedules.py    cosine_lr, linear_lr, wsd_lr, CosineScheduler
    lesson 4  stability     m07_training/clipping.py     clip_grad_norm
              devices       m07_training/devices.py      pick_device, resolve_dtype, autocast
    lesson 5  the doctor    m07_training/doctor.py       diagnose, read_history, unigram_loss
    lesson 6  data          m07_training/data.py         CharTokenizer, load_corpus, get_batch
              download      m07_training/download.py     download_corpus (URL + SHA-256 + cache)
              checkpoints   m07_training/checkpoint.py   save_checkpoint, read_checkpoint, load_checkpoint
              a run's files m07_training/run_files.py    out_dir lock, atomic writes, history.jsonl
              the config    m07_training/config.py       TrainConfig, ADAMW_RECIPE, gpt_config
              the loop      m07_training/loop.py         train, update, evaluate
              CPU threads   m07_training/threads.py      the fastest count now, measured once per run
              sampling      m07_training/sampling.py     sample_text
    lesson 7  torchrun      m07_training/distributed.py  ranks, devices and stops agreed by all processes
    lesson 8  Muon          m07_training/muon.py         newton_schulz, Muon, MuonWithAdamW

Run it:
    python training.py                     # tiny GPT on Shakespeare's plays, then a sample
    python training.py --help              # every TrainConfig field is a flag
    python training.py --max-minutes 5     # the best model in 5 minutes (the budget alone ends it)
    torchrun --nproc_per_node=2 training.py --grad-accum-steps 1   # data parallel
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import signal
import sys
import warnings

import torch.distributed as dist

from m07_training.checkpoint import (CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, read_checkpoint,
                                     save_checkpoint)
from m07_training.clipping import clip_grad_norm
from m07_training.config import (ADAMW_RECIPE, MODEL_FIELDS, RESUME_MAY_CHANGE, SettingConflict, TrainConfig,
                                 cli_default, cli_settings, gpt_config, resume_path)
from m07_training.data import (VAL_FRACTION, BatchSource, CharTokenizer, Corpus, batch_seed, get_batch, load_corpus,
                               markdown_play_to_text, seeded_batches, shakespeare_plays, split_text)
from m07_training.devices import DTYPES, autocast, has_native_bf16, pick_device, resolve_dtype, unwrap
from m07_training.doctor import Finding, diagnose, format_diagnosis, read_history, unigram_loss
from m07_training.download import DEFAULT_CACHE, DOWNLOADS, download_corpus
from m07_training.loop import TrainResult, build_optimizer, evaluate, train, update
from m07_training.loss import cross_entropy, perplexity
from m07_training.mixture import Counting, MixedScore, count_for_mixing, describe_mixed, score_mixed
from m07_training.ngram import KneserNey, ngram_ladder, versus_ladder
from m07_training.muon import NS_COEFFICIENTS, Muon, MuonWithAdamW, newton_schulz, newton_schulz_dtype, split_params_for_muon
from m07_training.optimizers import SGD, AdamW
from m07_training.run_files import RUN_FILES
from m07_training.plot import plot_run
from m07_training.sampling import sample_from_checkpoint, sample_text
from m07_training.scoring import Score, score_text
from m07_training.schedules import SCHEDULES, CosineScheduler, cosine_lr, linear_lr, lr_of_update, wsd_lr
from m07_training.signals import TrainingInterrupted
from m07_training.threads import ThreadChoice, choose_threads, fastest, resolve_threads, use_fastest_threads

__all__ = [
    # lesson 1
    "cross_entropy", "perplexity",
    # lesson 2
    "SGD", "AdamW",
    # lesson 3
    "cosine_lr", "linear_lr", "wsd_lr", "CosineScheduler", "SCHEDULES", "lr_of_update",
    # lesson 4
    "clip_grad_norm", "pick_device", "has_native_bf16", "resolve_dtype", "autocast", "DTYPES",
    # lesson 5
    "diagnose", "format_diagnosis", "read_history", "unigram_loss", "Finding",
    # lesson 6
    "CharTokenizer", "Corpus", "VAL_FRACTION", "markdown_play_to_text", "shakespeare_plays", "split_text",
    "load_corpus", "get_batch", "batch_seed", "seeded_batches", "BatchSource",
    "download_corpus", "DOWNLOADS",
    "save_checkpoint", "read_checkpoint", "load_checkpoint", "CheckpointError", "CHECKPOINT_FORMAT", "unwrap",
    "TrainConfig", "ADAMW_RECIPE", "MODEL_FIELDS", "gpt_config", "build_optimizer",
    "train", "update", "evaluate", "TrainResult", "TrainingInterrupted", "RUN_FILES", "sample_text",
    "sample_from_checkpoint", "plot_run",
    "ThreadChoice", "choose_threads", "fastest", "resolve_threads", "use_fastest_threads",
    # measuring honestly: the whole validation split, and the counting ladder
    "Score", "score_text", "KneserNey", "ngram_ladder", "versus_ladder",
    "Counting", "MixedScore", "count_for_mixing", "score_mixed",
    # lesson 8
    "NS_COEFFICIENTS", "newton_schulz", "newton_schulz_dtype", "Muon", "MuonWithAdamW", "split_params_for_muon",
    # the command line
    "main", "build_parser", "cli_settings", "RESUME_MAY_CHANGE", "SettingConflict", "EXIT_CODES", "EXIT_DIVERGED",
]


EXIT_DIVERGED = 3
EXIT_CODES = f"""exit status:
  0    the run finished (max_steps, max_minutes or early stopping)
  1    an error, named on stderr: unusable data or checkpoint, a checkpoint of another model
       or text, a finished run asked to resume, an out_dir that holds another run, is in use
       by a live run or cannot be written (the earlier run's files stay as they were)
  2    a bad flag, or a flag that a resumed run cannot change (the error names it)
  {EXIT_DIVERGED}    the loss or validation loss became NaN or infinite: training stopped, and best.pt
       and last.pt hold the last finite state
  130  SIGINT (Ctrl-C) between two updates: last.pt holds the last update; continue with
       --resume OUT_DIR (every other setting comes from the checkpoint)
  143  SIGTERM: as SIGINT"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Flag defaults in the help, and the exit-status table kept as written."""


def build_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """The CLI's parser: one --flag per TrainConfig field, with its default, help and choices
    (defaults=False: a parser that returns only the flags typed on the command line)."""
    parser = argparse.ArgumentParser(
        description="Train the tiny GPT on a character-level corpus, then print a sample.",
        epilog=EXIT_CODES, formatter_class=HelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = cli_default(f) if defaults else argparse.SUPPRESS
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=f.metadata["type"], default=default, choices=f.metadata["choices"],
                                help=f.metadata["help"], metavar=None if f.metadata["choices"] else f.name.upper())
    return parser


def config_from_command_line(argv: list[str] | None) -> tuple[TrainConfig, list[str]]:
    """The TrainConfig the flags describe (cli_settings: a resumed run's settings come from its checkpoint)
    and the notes about it. A bad flag exits with status 2 (argparse); an unusable checkpoint raises."""
    parser = build_parser()
    parser.parse_args(argv)  # --help, unknown flags and bad values end here
    given = vars(build_parser(defaults=False).parse_args(argv))
    stored = None
    if given.get("resume"):
        given["resume"] = resume_path(given["resume"])
        stored = read_checkpoint(given["resume"])["extra"].get("config") or {}
    try:
        settings, notes = cli_settings(given, stored)
        config = TrainConfig(**settings)
        pick_device(config.device)
    except SettingConflict as error:
        parser.error(str(error))
    except (TypeError, ValueError) as error:
        name = re.search(r"TrainConfig\.(\w+)", str(error))
        flag = f"--{name.group(1).replace('_', '-')}" if name else "--device"
        parser.error(f"{flag}: {error}")
    return config, notes


def main(argv: list[str] | None = None) -> int:
    """`python training.py [flags]`: train, print the summary and a sample; returns the exit status (EXIT_CODES)."""
    is_main = int(os.environ.get("RANK", "0")) == 0
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_: print(f"warning: {message}", file=sys.stderr)
        try:
            config, notes = config_from_command_line(argv)
            for note in notes if is_main else []:
                print(f"note: {note}", file=sys.stderr)
            result = train(config)
        except TrainingInterrupted as stop:
            if is_main:
                print(f"\ninterrupted by {signal.Signals(stop.signum).name} after update {stop.step}; "
                      f"{stop.last_checkpoint} holds it. To continue, rerun the same command with "
                      f"--resume {shlex.quote(stop.last_checkpoint)}", file=sys.stderr)
            return 128 + stop.signum
        except KeyboardInterrupt:
            print(f"\ninterrupted; {interrupted_state(argv)}", file=sys.stderr)
            return 128 + signal.SIGINT
        except (ValueError, RuntimeError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    return report(result, config) if is_main else (EXIT_DIVERGED if result.stop_reason.startswith("non-finite") else 0)


def interrupted_state(argv: list[str] | None) -> str:
    """What an interrupted run left: the update its out_dir's last.pt holds, if any."""
    out_dir = vars(build_parser().parse_known_args(argv)[0])["out_dir"]
    last = os.path.join(out_dir, "last.pt")
    try:
        return f"{last} holds update {read_checkpoint(last)['step']}"
    except (CheckpointError, OSError):
        return f"no checkpoint in {out_dir}"


def report(result: TrainResult, config: TrainConfig) -> int:
    """Rank 0's summary of a finished run: the result line, the doctor's diagnosis and a sample from best.pt."""
    diverged = result.stop_reason.startswith("non-finite")
    if diverged:
        print(f"error: {result.stop_reason}", file=sys.stderr)
    else:
        print(f"\n{result.stop_reason} after {result.step} updates | best val loss {result.best_val_loss:.4f} "
              f"(perplexity {perplexity(result.best_val_loss):.2f}) | {result.tokens_per_second:,.0f} tokens/s | "
              f"{result.optimizer_name}")
    ladder = None
    if result.best_checkpoint and not diverged:
        load_checkpoint(result.best_checkpoint, result.model)
        headline, ladder = scored_against_counting(result, config)
        print(headline)
    findings = diagnose(result.history, vocab_size=result.tokenizer.vocab_size,
                        unigram_loss=result.unigram_loss, grad_clip=config.grad_clip, ladder=ladder)
    # a failed run reports on stderr: the error, then what went wrong
    print("\n" + format_diagnosis(findings), file=sys.stderr if diverged else sys.stdout)
    if diverged:
        return EXIT_DIVERGED
    if not result.best_checkpoint:
        print("\nno evaluation beat a uniform guess (ln V), so there is no best.pt and no sample")
    elif config.sample_chars:
        # a new line is the natural start of a play; a corpus without one starts from its first character
        prompt = "\n" if "\n" in result.tokenizer.stoi else result.tokenizer.chars[0]
        print(f"\n--- sample from {result.best_checkpoint} ---")
        print(sample_text(result.model, result.tokenizer, config.sample_chars, prompt=prompt, seed=config.seed))
    return 0


def scored_against_counting(result: TrainResult, config: TrainConfig) -> tuple[str, dict[int, Score]]:
    """best.pt scored on the whole validation split (score_text), next to the counting ladder built from the
    training split, and mixed with the run's n-gram counts when it has them (score_mixed): the honest
    headline of a run (the evaluations during training sample the split), and the ladder itself."""
    corpus, device = result.corpus, next(result.model.parameters()).device
    scoring = dict(context_length=config.context_length, device=device, dtype=resolve_dtype(config.dtype, device))
    mixed = None
    if result.counting:
        mixed = score_mixed(result.model, result.counting, corpus.train_ids, corpus.val_ids, **scoring)
        score = mixed.network
    else:
        score = score_text(result.model, corpus.val_ids, **scoring)
    ladder = ngram_ladder(corpus.train_ids, corpus.val_ids, corpus.tokenizer.vocab_size,
                          min_history=score.min_history, cache_dir=DEFAULT_CACHE)
    lines = [f"best.pt on the whole validation split, every character with at least {score.min_history} characters "
             f"of history: {score}; it {versus_ladder(score.loss, ladder)} of the Kneser-Ney n-grams counted "
             f"from the training split"]
    if mixed:
        lines.append(describe_mixed(mixed, result.counting, ladder))
    return "\n".join(lines), ladder


if __name__ == "__main__":
    sys.exit(main())

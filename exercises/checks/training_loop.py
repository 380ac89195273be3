"""Exercise 14, the capstone: the learner's own training loop for the tiny GPT, built from the learner's own
pieces (cross-entropy, AdamW, warmup + cosine schedule, clipping, checkpointing):

    fn(model, batches, evaluate, *, steps, max_lr, min_lr, warmup_steps, weight_decay, max_norm, eval_every,
       checkpoint_path, resume=False) -> history, one dict per update

The run drives it three times on a small GPT (no dropout, no biases) and the course's corpus:
* _SHORT: 6 updates with clipping active at every one; the judge replays them with PyTorch's own pieces
  (torch.optim.AdamW, F.cross_entropy, clip_grad_norm_, training.cosine_lr) and compares every logged value and
  the final weights, and names a known mistake (_MISTAKES) by the run it matches;
* _RESUME: 12 updates straight, then again with a Ctrl-C (KeyboardInterrupt, raised by `batches`) at update
  10, then `resume=True` into a model with other weights: the weights must end bit for bit as the straight
  run's, and the history be the same;
* _long(): 200 updates of real training (exercises.checks.CAPSTONE_UPDATES); its validation loss must be within
  _VAL_MARGIN of the reference loop's.

While the candidate runs, the guard refuses PyTorch's and training's versions of the pieces (torch.optim's
optimizers, F.cross_entropy and its kernels, clip_grad_norm_): the loop must be the learner's, through and
through. `batches` and `evaluate` are the check's, and use none of them."""
from __future__ import annotations

import functools
import math
import numbers
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import exercises.checks as settings
from m07_training.data import get_batch
from exercises.checks.harness import (ExerciseFailed, call_candidate, expected_and_got, is_close, register,
                                      require_callable, run_and_judge, type_name)

# The tiny GPT of lesson 6, smaller: no dropout (so no random state to restore) and no biases (a key bias has
# an exactly-zero gradient in exact arithmetic, so in float32 a rounding-noise gradient whose sign Adam's first
# step turns into a full +-lr step, and two right loops would disagree).
MODEL = dict(context_length=32, d_model=64, n_layers=2, n_heads=4, d_ff=256, dropout=0.0, bias=False)
_BATCH, _TIME = 16, 32
_BETAS, _EPS = (0.9, 0.95), 1e-8
_UPDATES_PER_LIMIT = 40


@dataclass(frozen=True)
class Setting:
    """One call of the loop: its keyword arguments, the seed of its initial weights and of its batches."""
    steps: int
    warmup_steps: int
    eval_every: int
    seed: int
    max_lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    max_norm: float = 1.0

    def keywords(self, checkpoint_path, resume=False):
        return dict(steps=self.steps, max_lr=self.max_lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps,
                    weight_decay=self.weight_decay, max_norm=self.max_norm, eval_every=self.eval_every,
                    checkpoint_path=checkpoint_path, resume=resume)


_SHORT = Setting(steps=6, warmup_steps=2, eval_every=3, seed=0)     # gradient norms 1.2-1.7: every update clips
_RESUME = Setting(steps=12, warmup_steps=3, eval_every=4, seed=1)
_INTERRUPT_AT = 10                                                   # two updates after the checkpoint of update 8
_SAVED_AT = (_INTERRUPT_AT - 1) // _RESUME.eval_every * _RESUME.eval_every


def _long():
    """The real training run: exercises.checks.CAPSTONE_UPDATES updates, evaluated halfway and at the end."""
    steps = settings.CAPSTONE_UPDATES
    return Setting(steps=steps, warmup_steps=max(1, steps // 10), eval_every=max(1, steps // 2), seed=2)


@functools.lru_cache(maxsize=1)
def _corpus():
    import training  # the check's own data; the candidate's calls into training are refused
    corpus = training.load_corpus("shakespeare")
    return corpus.tokenizer.vocab_size, torch.as_tensor(corpus.train_ids), torch.as_tensor(corpus.val_ids)


def _model(vocab_size, seed):
    from m06_transformer import create_gpt_tiny
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return create_gpt_tiny(vocab_size, **MODEL)


def _batch_list(train_ids, setting):
    """The batch of every update 1..steps, drawn before the loop starts (so `batches` runs no library code)."""
    generator = torch.Generator().manual_seed(1000 + setting.seed)
    return [get_batch(train_ids, _BATCH, _TIME, generator=generator) for _ in range(setting.steps)]


def _token_loss(logits, targets):
    """Mean cross-entropy without the kernels the candidate may not call (the guard covers `evaluate` too)."""
    logits = logits.reshape(-1, logits.shape[-1])
    top = logits.max(dim=-1, keepdim=True).values
    logsumexp = top.squeeze(-1) + (logits - top).exp().sum(dim=-1).log()
    return (logsumexp - logits.gather(1, targets.reshape(-1, 1)).squeeze(1)).mean()


def _val_batches(val_ids):
    generator = torch.Generator().manual_seed(7)
    # 8,192 characters, the same at every call
    return [get_batch(val_ids, 32, _TIME, generator=generator) for _ in range(8)]


def _evaluate(model, val_batches):
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = sum(_token_loss(model(x), y).item() for x, y in val_batches) / len(val_batches)
    model.train(was_training)
    return loss


class _Callbacks:
    """`batches` and `evaluate` for one call, recording which updates asked for a batch and when the model was
    evaluated (as the number of batches handed out so far)."""

    def __init__(self, batch_list, val_batches, interrupt_at=None):
        self.batch_list, self.val_batches, self.interrupt_at = batch_list, val_batches, interrupt_at
        self.asked, self.evaluated = [], []

    def batches(self, step):
        self.asked.append(step if isinstance(step, int) and not isinstance(step, bool) else repr(step)[:40])
        if step == self.interrupt_at:
            self.interrupt_at = None
            raise KeyboardInterrupt  # Ctrl-C, once
        if not isinstance(step, int) or not 1 <= step <= len(self.batch_list):
            raise ValueError(f"batches(step) takes the update number, 1 to {len(self.batch_list)}; got {step!r}")
        x, y = self.batch_list[step - 1]
        return x.clone(), y.clone()

    def evaluate(self, model):
        loss = _evaluate(model, self.val_batches)
        self.evaluated.append((len(self.asked), loss))
        return loss


def _plain_history(history):
    """The returned history as plain rows (tensor values as floats), or a text saying what it is instead."""
    if type(history) not in (list, tuple):
        return f"a {type_name(history)}"
    rows = []
    for row in history:
        if type(row) is not dict:
            return f"a list holding a {type_name(row)}"
        plain = {}
        for key, value in row.items():
            if torch.is_tensor(value) and type(value) is torch.Tensor and value.numel() == 1:
                value = value.item()
            plain[str(key)] = value if type(value) in (int, float, bool, str) or value is None else type_name(value)
        rows.append(plain)
    return rows


def _call(fn, model, callbacks, setting, checkpoint_path, guard, resume=False):
    """The record of one call of the candidate: its history, the callbacks' log, its final weights."""
    def loop():
        try:
            return False, fn(model, callbacks.batches, callbacks.evaluate,
                             **setting.keywords(checkpoint_path, resume=resume))
        except KeyboardInterrupt:  # the check's Ctrl-C, let through by the loop: a run that stopped
            return True, None

    # The package's per-call limit is for calls that take milliseconds; a training run gets it for every
    # _UPDATES_PER_LIMIT updates (each ~30 ms under the guard on a laptop CPU, several times that on a busy one).
    time_limit = settings.TIME_LIMIT_S * max(1.0, setting.steps / _UPDATES_PER_LIMIT)
    interrupted, history = call_candidate(
        "train_loop", {"steps": setting.steps, "resume": resume}, loop, guard=guard, time_limit=time_limit,
        hints=[(lambda e: isinstance(e, FileNotFoundError) and resume,
                "resume=True loads checkpoint_path, which your loop must have written during the first run "
                "(every eval_every updates and after the last)")])
    return {"history": None if interrupted else _plain_history(history), "interrupted": interrupted,
            "asked": callbacks.asked, "evaluated": callbacks.evaluated,
            "weights": [p.detach().clone() for p in model.parameters()]}


def _run(fn, records, guard):
    require_callable(fn, "train_loop")
    vocab_size, train_ids, val_ids = _corpus()
    val_batches = _val_batches(val_ids)
    with tempfile.TemporaryDirectory() as folder:
        def run(setting, name, seed=None, interrupt_at=None, resume=False):
            callbacks = _Callbacks(_batch_list(train_ids, setting), val_batches, interrupt_at)
            model = _model(vocab_size, setting.seed if seed is None else seed)
            return _call(fn, model, callbacks, setting, os.path.join(folder, name), guard, resume), model

        records.append(run(_SHORT, "short.pt")[0])
        records.append(run(_RESUME, "resume.pt")[0])
        records.append(run(_RESUME, "interrupted.pt", interrupt_at=_INTERRUPT_AT)[0])
        torch.manual_seed(12345)  # as in a new process: another global random state
        records.append(run(_RESUME, "interrupted.pt", seed=99, resume=True)[0])  # and other initial weights
        long, model = run(_long(), "long.pt")
        long["val_loss"] = _evaluate(model, val_batches)  # the judge's one measure of the trained model
        records.append(long)


# ----------------------------------------------------------------------------------------
# The judge
# ----------------------------------------------------------------------------------------

# Known mistakes: the reference loop with one of them made, and what to tell a loop whose run matches it.
_MISTAKES = {
    "no_zero_grad": "the gradients of earlier updates were still in .grad: backward() adds to .grad, so zero the "
                    "gradients (optimizer.zero_grad()) before every backward()",
    "no_clip": "your updates are those of a loop that does not clip: after backward() and before the optimizer's "
               "step, scale the gradients with your clip_grad_norm(model.parameters(), max_norm)",
    "decay_everything": "weight decay went to every parameter: decay only the matrices (p.dim() >= 2) and give the "
                        "layer-norm gains weight_decay=0, as two param groups",
    "no_decay": "your updates have no weight decay: give the matrices' param group weight_decay",
    "default_betas": "AdamW's betas here are (0.9, 0.95), not PyTorch's default (0.9, 0.999)",
    "lr_not_set": "your history logs the schedule's lr, but the weights moved as with the optimizer's initial lr at "
                  "every update: set group['lr'] = lr in every param group before each step",
}


@functools.lru_cache(maxsize=None)
def _reference(setting, mistake=None):
    """(history, final weights, val loss) of the loop done with PyTorch's pieces, or with one known mistake."""
    from m07_training.schedules import cosine_lr
    vocab_size, train_ids, val_ids = _corpus()
    val_batches = _val_batches(val_ids)
    model = _model(vocab_size, setting.seed)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    decay = 0.0 if mistake == "no_decay" else setting.weight_decay
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": decay},
         {"params": vectors, "weight_decay": decay if mistake == "decay_everything" else 0.0}],
        lr=setting.max_lr, betas=(0.9, 0.999) if mistake == "default_betas" else _BETAS, eps=_EPS, foreach=False)
    history = []
    for step, (x, y) in enumerate(_batch_list(train_ids, setting), start=1):
        lr = cosine_lr(step, max_lr=setting.max_lr, min_lr=setting.min_lr, warmup_steps=setting.warmup_steps,
                       total_steps=setting.steps)
        if mistake != "lr_not_set":
            for group in optimizer.param_groups:
                group["lr"] = lr
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        if mistake != "no_zero_grad":
            optimizer.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf if mistake == "no_clip" else
                                              setting.max_norm)
        optimizer.step()
        history.append({"step": step, "lr": lr, "loss": loss.item(), "grad_norm": norm.item()})
        if step % setting.eval_every == 0 or step == setting.steps:
            history[-1]["val_loss"] = _evaluate(model, val_batches)
    return history, [p.detach().clone() for p in model.parameters()], _evaluate(model, val_batches)


_ROW_RTOL = 1e-4  # losses and gradient norms: float32 pieces written another way agree to ~1e-6 over 6 updates;
#                   the smallest known mistake moves them by 1e-3 or more from the second update on
_WEIGHT_ATOL = 0.02 * _SHORT.max_lr  # a fiftieth of one full step; the known mistakes move weights by steps
_VAL_MARGIN = 0.02  # nats: two right loops end 200 updates within ~1e-3; a lost schedule or clip costs 0.05+


def _rows_match(history, reference):
    return all(is_close(row[key], expected[key], _ROW_RTOL) for row, expected in zip(history, reference)
               for key in ("loss", "grad_norm"))


def _weights_match(weights, reference):
    return all(got.shape == expected.shape and torch.allclose(got, expected, rtol=0, atol=_WEIGHT_ATOL)
               for got, expected in zip(weights, reference))


def _check_history(record, setting, what):
    """The history is one row per update with the logged values as numbers; batches asked for once per update."""
    expected_steps = list(range(1, setting.steps + 1))
    if record["asked"] != expected_steps:
        raise ExerciseFailed(f"{what}: call batches(step) once per update, for step = 1, 2, ..., {setting.steps} in "
                             f"order; yours asked for {_steps(record['asked'])}")
    history = record["history"]
    if isinstance(history, str):
        raise ExerciseFailed(f"{what}: return the history as a list of dicts, one per update; got {history}")
    if [row.get("step") for row in history] != expected_steps:
        raise ExerciseFailed(f"{what}: the history needs one row per update with its \"step\" 1 to {setting.steps}; "
                             f"yours has steps {_steps([row.get('step') for row in history])}")
    for row in history:
        for key in ("lr", "loss", "grad_norm"):
            value = row.get(key)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ExerciseFailed(f"{what}: each row holds \"{key}\" as a finite float (loss.item(), the norm "
                                     f"your clip_grad_norm returned); update {row['step']} has {value!r}")


def _steps(steps):
    shown = ", ".join(map(str, steps[:14]))
    return f"[{shown}{', ...' if len(steps) > 14 else ''}]" if steps else "none"


def _check_schedule(history, reference, setting, what):
    for row, expected in zip(history, reference):
        if not is_close(row["lr"], expected["lr"], 1e-6):  # a schedule computed in float32 is right to ~1e-7
            raise ExerciseFailed(f"{what}: the learning rate of update {row['step']}: "
                                 f"{expected_and_got(expected['lr'], float(row['lr']))} (linear warmup to max_lr "
                                 f"at update warmup_steps={setting.warmup_steps}, then a cosine down to min_lr at "
                                 f"update steps={setting.steps}: your cosine schedule called with step = the "
                                 f"update number)")


def _check_evaluations(record, setting, what):
    at = [step for step in range(1, setting.steps + 1) if step % setting.eval_every == 0 or step == setting.steps]
    evaluated = [count for count, _ in record["evaluated"]]
    if evaluated != at:
        raise ExerciseFailed(f"{what}: call evaluate(model) once after updates {_steps(at)} (every eval_every="
                             f"{setting.eval_every} updates and after the last); yours after updates "
                             f"{_steps(evaluated)}")
    logged = {row["step"]: row.get("val_loss") for row in record["history"] if "val_loss" in row}
    returned = {count: loss for count, loss in record["evaluated"]}
    if logged != returned:
        raise ExerciseFailed(f"{what}: put what evaluate(model) returned into that update's row as \"val_loss\", "
                             f"and only there: expected {returned}, your rows hold {logged}")


def _judge_short(record):
    what = f"on a run of {_SHORT.steps} updates"
    _check_history(record, _SHORT, what)
    history = record["history"]
    reference, weights, _ = _reference(_SHORT)
    _check_schedule(history, reference, _SHORT, what)
    first, expected = history[0], reference[0]
    if not is_close(first["loss"], expected["loss"], 1e-5):  # one float32 mean over 512 positions
        raise ExerciseFailed(f"{what}: the loss of update 1 (the initial weights on batch 1): "
                             f"{expected_and_got(expected['loss'], float(first['loss']))}. It is your cross-entropy "
                             f"of model(x) against y, the mean over every position of the batch")
    if not is_close(first["grad_norm"], expected["grad_norm"], _ROW_RTOL):
        clipped = min(expected["grad_norm"], _SHORT.max_norm)
        if is_close(first["grad_norm"], clipped, _ROW_RTOL):
            raise ExerciseFailed(f"{what}: \"grad_norm\" must be the gradients' norm before clipping, as your "
                                 f"clip_grad_norm returns it ({expected['grad_norm']:.6g} at update 1); yours is the "
                                 f"norm after clipping ({first['grad_norm']:.6g})")
        raise ExerciseFailed(f"{what}: the gradient norm of update 1: "
                             f"{expected_and_got(expected['grad_norm'], float(first['grad_norm']))} (the global L2 "
                             f"norm of every parameter's .grad after backward(), before clipping)")
    if _rows_match(history, reference) and _weights_match(record["weights"], weights):
        _check_evaluations(record, _SHORT, what)
        return
    for mistake, message in _MISTAKES.items():
        wrong_history, wrong_weights, _ = _reference(_SHORT, mistake)
        if _rows_match(history, wrong_history) and _weights_match(record["weights"], wrong_weights):
            raise ExerciseFailed(f"{what}: {message}")
    for row, expected in zip(history, reference):
        for key in ("loss", "grad_norm"):
            if not is_close(row[key], expected[key], _ROW_RTOL):
                raise ExerciseFailed(f"{what}: the {key} of update {row['step']}: "
                                     f"{expected_and_got(expected[key], float(row[key]))}, so update "
                                     f"{row['step'] - 1} did not change the weights as AdamW (betas {_BETAS}, eps "
                                     f"{_EPS:g}, weight decay on the matrices only) after clipping would")
    largest = max((got - expected).abs().max().item() for got, expected in zip(record["weights"], weights))
    raise ExerciseFailed(f"{what}: the weights after the last update differ from the reference loop's by up to "
                         f"{largest:.3g} (allowed {_WEIGHT_ATOL:.3g}): check the last update's optimizer step")


def _judge_resume(straight, interrupted, resumed):
    what = f"on a run of {_RESUME.steps} updates stopped by Ctrl-C at update {_INTERRUPT_AT} and resumed"
    _check_history(straight, _RESUME, f"on a run of {_RESUME.steps} updates")
    if interrupted["asked"][-1:] != [_INTERRUPT_AT] or max(interrupted["asked"]) > _INTERRUPT_AT:
        raise ExerciseFailed(f"{what}: Ctrl-C (KeyboardInterrupt from batches({_INTERRUPT_AT})) must stop the run; "
                             f"yours went on and asked for {_steps(interrupted['asked'])}")
    asked = resumed["asked"]
    if not asked or asked != list(range(asked[0], _RESUME.steps + 1)) or not 2 <= asked[0] <= _INTERRUPT_AT:
        raise ExerciseFailed(f"{what}: with resume=True, load checkpoint_path and go on with the update after the "
                             f"one it saved (update {_SAVED_AT + 1} for the checkpoint written after update {_SAVED_AT}), up to "
                             f"steps={_RESUME.steps}; yours asked for {_steps(asked)}")
    if all(torch.equal(a, b) for a, b in zip(resumed["weights"], straight["weights"])):
        if resumed["history"] != straight["history"]:
            raise ExerciseFailed(f"{what}: the weights ended bit for bit right, but return the whole run's history "
                                 f"after a resume, every row as the run without a break logged it: keep the rows "
                                 f"of the first run in the checkpoint and return them with the new ones")
        return
    first = asked[0]
    rows = resumed["history"] if isinstance(resumed["history"], list) else []
    row = next((r for r in rows if r.get("step") == first), None)
    if row is not None and row.get("loss") != straight["history"][first - 1]["loss"]:
        raise ExerciseFailed(f"{what}: the loss of update {first}, the first after the resume, is not the one of "
                             f"the run without a break: the model's weights were not restored as saved (save "
                             f"model.state_dict() and load it with model.load_state_dict())")
    largest = max((a - b).abs().max().item() for a, b in zip(resumed["weights"], straight["weights"]))
    raise ExerciseFailed(f"{what}: the resumed run ends with weights up to {largest:.3g} away from the run without a "
                         f"break (bit for bit means 0), although its first update started from the right weights: "
                         f"restore the optimizer's state too (AdamW's m, v and step counts: optimizer.state_dict() "
                         f"and optimizer.load_state_dict())")


def _judge_long(record):
    long = _long()
    what = f"on a run of {long.steps} updates of real training"
    _check_history(record, long, what)
    reference, _, val_loss = _reference(long)
    _check_schedule(record["history"], reference, long, what)
    _check_evaluations(record, long, what)
    if not abs(record["val_loss"] - val_loss) <= _VAL_MARGIN:
        raise ExerciseFailed(f"{what}: the validation loss at the end is {record['val_loss']:.4f}, the reference "
                             f"loop's {val_loss:.4f}: more than {_VAL_MARGIN} nats apart")


def _judge(records):
    _judge_short(records.next())
    straight, interrupted, resumed = records.next(), records.next(), records.next()
    _judge_resume(straight, interrupted, resumed)
    _judge_long(records.next())


def check_training_loop(fn):
    """fn(model, batches, evaluate, *, steps, max_lr, min_lr, warmup_steps, weight_decay, max_norm, eval_every,
    checkpoint_path, resume=False) -> history: trains `model` for updates 1..steps with the learner's own
    cross-entropy, AdamW, warmup + cosine schedule and clipping; evaluates and checkpoints every eval_every
    updates and after the last; with resume=True continues from checkpoint_path bit for bit."""
    __tracebackhide__ = True
    run_and_judge("check_training_loop", fn)


register("check_training_loop", _run, _judge)

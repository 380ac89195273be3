"""Checks for the module 07 exercises: `check_<exercise>(candidate)`.

Each check is a *run*, which calls the learner's candidate and keeps only plain data, and a
*judge*, which compares that data with the references (exercises/checks/harness.py explains
both). `check_x(candidate)` runs both in the calling process: the instant feedback of a
notebook's check cell. The grader (exercises/grade.py) calls `run_to_file` in the learner's
kernel and `judge` in its own process, so patching this package, training or json inside the
kernel changes nothing.

Candidates (the stubs in exercises/NN-*.ipynb have exactly these shapes):

    check_cross_entropy(cls)     a torch.autograd.Function: cls.apply(logits [N, V], targets [N]) -> 0-dim tensor,
                                 the mean loss, whose backward the learner writes
    check_adamw(cls)             cls(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01),
                                 a torch.optim.Optimizer whose step() the learner writes
    check_clip_grad_norm(fn)     fn(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False) -> 0-dim
                                 tensor, the global norm before clipping; gradients clipped in place, as
                                 torch.nn.utils.clip_grad_norm_
    check_cosine_schedule(fn)    fn(step, max_lr, min_lr, warmup_steps, total_steps, budget_used) -> float
    check_wsd_schedule(fn)       fn(step, max_lr, min_lr, warmup_steps, cooldown_steps, total_steps) -> float
    check_lr_finder(fn)          fn(train_step, *, start_lr, end_lr, num_steps, diverge_factor)
                                 -> (lrs, losses, suggested_lr); see its docstring
    check_early_stopping(fn)     fn(model, train_step, evaluate, *, max_steps, eval_every, patience)
                                 -> (best_step, best_val_loss, history); see its docstring
    check_label_smoothing(fn)    fn(logits [..., V], targets [...], ignore_index=-100, label_smoothing=0.0)
                                 -> 0-dim tensor, as F.cross_entropy with those arguments
    check_grad_accumulation(fn)  fn(model, micro_batches, ignore_index=-100) -> the mean token loss; every
                                 p.grad that of the big batch's mean loss; see its docstring
    check_loss_scaler(cls)       cls(init_scale, growth_factor, backoff_factor, growth_interval) with scale(loss),
                                 step(optimizer) -> bool and get_scale(), deciding as torch.amp.GradScaler
    check_resume(cls)            cls.save(path, step, model, optimizer, scheduler, generator) and
                                 cls.load(path, model, optimizer, scheduler, generator) -> step, bit for bit
    check_muon(cls)              cls(params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1), whose
                                 step() equals torch.optim.Muon's (Newton-Schulz in float32)
    check_gradient_all_reduce(fn) fn(model, local_tokens), on each of 2 real processes (gloo) after backward() of
                                 its mean loss over its own tokens: every p.grad that of the mean over all ranks' tokens
    check_training_loop(fn)      fn(model, batches, evaluate, *, steps, max_lr, min_lr, warmup_steps, weight_decay,
                                 max_norm, eval_every, checkpoint_path, resume=False) -> history: the capstone,
                                 the learner's own loop with the learner's own pieces; see its docstring

The package: harness.py holds what every check shares, and each exercise has a module named
after its slug in exercises/catalog.py (schedules.py serves both schedules). No module may be
named `check_*`: exercises/integrity.py lets an answer import `exercises.checks.check_*`.
"""
from __future__ import annotations

from exercises.checks.adamw import check_adamw
from exercises.checks.clip_grad_norm import check_clip_grad_norm
from exercises.checks.cross_entropy import check_cross_entropy
from exercises.checks.early_stopping import check_early_stopping
from exercises.checks.grad_accumulation import check_grad_accumulation
from exercises.checks.gradient_all_reduce import check_gradient_all_reduce
from exercises.checks.harness import ExerciseFailed, judge, run, run_to_file
from exercises.checks.label_smoothing import check_label_smoothing
from exercises.checks.loss_scaler import check_loss_scaler
from exercises.checks.lr_finder import check_lr_finder
from exercises.checks.muon import check_muon
from exercises.checks.resume import check_resume
from exercises.checks.schedules import check_cosine_schedule, check_wsd_schedule
from exercises.checks.training_loop import check_training_loop

# Set on this package by the grader (in the learner's kernel) and by the tests; the harness reads them
# from here at every call.
TIME_LIMIT_S = 20.0  # per call of the candidate; every reference call takes milliseconds
GRACE_S = 2.0        # how long past the limit a call may ignore the interruption before the watchdog acts
WATCHDOG_NOTE = None  # set by the grader in its kernel: the file the watchdog writes before ending the kernel
CAPSTONE_UPDATES = 200  # the updates of the capstone's real training run (exercise 14); the tests shorten it

__all__ = [
    "ExerciseFailed", "TIME_LIMIT_S", "GRACE_S", "WATCHDOG_NOTE", "CAPSTONE_UPDATES", "check_cross_entropy",
    "check_adamw", "check_clip_grad_norm", "check_cosine_schedule", "check_wsd_schedule", "check_lr_finder",
    "check_early_stopping", "check_label_smoothing", "check_grad_accumulation",
    "check_loss_scaler", "check_resume", "check_muon", "check_gradient_all_reduce", "check_training_loop", "run", "run_to_file", "judge",
]

"""The list of graded exercises: notebook name, the name the learner defines, its check.

The grader and the tests read this table; each notebook also records its `slug` in its
metadata (``metadata["exercise"]["slug"]``) so a renamed file is still recognised.

`check_budget_s` is the wall clock the grader gives its check cell (every call of the candidate on
the check's inputs), enforced from outside the sandbox: a notebook that defeats the per-call time
limit holds its grading slot this long, not --check-timeout. The default, CHECK_BUDGET_S, is 30 times
the slowest reference run (cross-entropy's 2 s, most of it the first dispatch mode's imports); an
exercise whose candidate trains for minutes declares its own.
"""
from __future__ import annotations

from dataclasses import dataclass

CHECK_BUDGET_S = 60.0  # seconds, the check cell of an exercise that declares no budget of its own


@dataclass(frozen=True)
class Exercise:
    number: int
    slug: str        # also the notebook's metadata["exercise"]["slug"]
    title: str
    candidate: str   # the function or class the learner writes in the notebook
    check: str       # the name of its check in exercises.checks
    check_budget_s: float = CHECK_BUDGET_S  # the grader's check cell may run this long (see above)

    @property
    def notebook(self) -> str:
        return f"{self.number:02d}-{self.slug}.ipynb"


EXERCISES = (
    Exercise(1, "cross-entropy", "Cross-entropy with a hand-written backward", "CrossEntropy", "check_cross_entropy"),
    Exercise(2, "adamw", "One AdamW step", "AdamW", "check_adamw"),
    Exercise(3, "clip-grad-norm", "Gradient clipping in every norm, as clip_grad_norm_", "clip_grad_norm",
             "check_clip_grad_norm"),
    Exercise(4, "cosine-schedule", "Warmup + cosine over steps or a time budget", "cosine_lr", "check_cosine_schedule"),
    Exercise(5, "wsd-schedule", "Warmup-stable-decay with a 1-sqrt cooldown", "wsd_lr", "check_wsd_schedule"),
    Exercise(6, "lr-finder", "Learning-rate range finder", "lr_finder", "check_lr_finder"),
    Exercise(7, "early-stopping", "Validation and early stopping", "train_with_early_stopping",
             "check_early_stopping"),
    Exercise(8, "label-smoothing", "Cross-entropy with padding and label smoothing", "smoothed_cross_entropy",
             "check_label_smoothing"),
    Exercise(9, "grad-accumulation", "Gradient accumulation over unequal micro-batches", "accumulate_gradients",
             "check_grad_accumulation"),
    Exercise(10, "loss-scaler", "A dynamic loss scaler", "LossScaler", "check_loss_scaler"),
    Exercise(11, "resume", "Save and resume, bit for bit", "Checkpoint", "check_resume"),
    Exercise(12, "muon", "A Muon step, equal to torch.optim.Muon", "Muon", "check_muon"),
    Exercise(13, "gradient-all-reduce", "Averaging gradients across processes with unequal shards", "sync_gradients",
             "check_gradient_all_reduce"),
    # the capstone trains a small GPT for ~230 guarded updates: ~20 s on a quiet 2-core CPU, 5x that when busy
    Exercise(14, "training-loop", "Capstone: your own training loop", "train_loop", "check_training_loop",
             check_budget_s=300.0),
)

BY_SLUG = {exercise.slug: exercise for exercise in EXERCISES}
BY_CHECK = {exercise.check: exercise for exercise in EXERCISES}

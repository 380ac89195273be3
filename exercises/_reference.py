"""Reference answers for the two exercises that have no counterpart in training.py.

The checks compare a learner's answer with these; the other checks use training.py itself
(training.cross_entropy, training.AdamW, ...) as the reference. Contracts: see the
docstrings of check_lr_finder and check_early_stopping in exercises/checks.py.
"""
from __future__ import annotations

import copy
import math


def lr_finder(train_step, *, start_lr, end_lr, num_steps, diverge_factor):
    lrs, losses = [], []
    best = math.inf
    for i in range(num_steps):
        lr = start_lr * (end_lr / start_lr) ** (i / (num_steps - 1))
        loss = float(train_step(lr))
        lrs.append(lr)
        losses.append(loss)
        if not math.isfinite(loss) or loss > diverge_factor * best:
            break
        best = min(best, loss)
    finite = [i for i, loss in enumerate(losses) if math.isfinite(loss)]
    suggested = lrs[min(finite, key=losses.__getitem__)] / 10 if finite else math.nan
    return lrs, losses, suggested


def train_with_early_stopping(model, train_step, evaluate, *, max_steps, eval_every, patience):
    best_step, best_loss, best_state = 0, math.inf, None
    history, evals_without_improvement = [], 0
    for step in range(1, max_steps + 1):
        train_step()
        if step % eval_every:
            continue
        val_loss = float(evaluate())
        history.append((step, val_loss))
        if val_loss < best_loss:
            best_step, best_loss, evals_without_improvement = step, val_loss, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            evals_without_improvement += 1
            if evals_without_improvement == patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return best_step, best_loss, history

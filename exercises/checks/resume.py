"""Exercise 11, save and resume bit for bit: a class with save(path, step, model, optimizer, scheduler,
generator) and load(path, model, optimizer, scheduler, generator) -> step.

The check trains a small model with dropout (the global torch RNG), batches drawn from a torch.Generator,
AdamW and a warmup LambdaLR for _STEPS steps without a break; then again, interrupted after _BREAK steps:
the learner's save, fresh objects (other seeds, another global RNG state), the learner's load, and the
rest. Every parameter must end bit for bit as without the break. The run also probes each piece a resume
restores (_PIECES) when save() is called and right after load() returns, so the judge names those missing."""
from __future__ import annotations

import os
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

from exercises.checks.harness import ExerciseFailed, call_candidate, register, run_and_judge, type_name

_VOCAB, _STEPS, _BREAK = 13, 9, 3  # the break falls inside the 6-step warmup


def _objects(seed):
    """(model, optimizer, scheduler, generator), built from `seed`: a fresh run's, or another for the resumed one."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Embedding(_VOCAB, 8), nn.Dropout(0.3), nn.Linear(8, _VOCAB))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 6))
    generator = torch.Generator().manual_seed(seed + 1)
    return model, optimizer, scheduler, generator


def _train(objects, steps):
    model, optimizer, scheduler, generator = objects
    model.train()
    for _ in range(steps):
        x = torch.randint(_VOCAB, (4, 6), generator=generator)
        y = torch.randint(_VOCAB, (4, 6), generator=generator)
        loss = F.cross_entropy(model(x).reshape(-1, _VOCAB), y.reshape(-1))  # dropout draws from the global RNG
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def _final(objects):
    return [p.detach().clone() for p in objects[0].parameters()]


def _uninterrupted():
    with torch.random.fork_rng():
        torch.manual_seed(1)
        objects = _objects(0)
        _train(objects, _STEPS)
        return _final(objects)


# What a resume must restore: (name, message naming it when it is left out)
_PIECES = [
    ("model", "the model's weights (model.state_dict())"),
    ("optimizer", "the optimizer's state (optimizer.state_dict(): AdamW's m, v and step counts, and each group's "
                  "current lr)"),
    ("scheduler", "the LR scheduler's position (scheduler.state_dict())"),
    ("generator", "the data generator's state (generator.get_state()), which decides the next batches"),
    ("rng", "the global torch RNG state (torch.get_rng_state()), which draws the dropout masks"),
]


def _copy(value):
    return value.detach().clone() if torch.is_tensor(value) else value  # training goes on changing it in place


def _probe(model, optimizer, scheduler, generator):
    """What a resume restores, piece by piece, as plain data (tensors, numbers)."""
    state = [optimizer.state.get(p, {}) for p in model.parameters()]
    return {
        "model": [p.detach().clone() for p in model.parameters()],
        "optimizer": [[_copy(s.get(key)) for key in ("exp_avg", "exp_avg_sq", "step")] for s in state]
                     + [[group["lr"] for group in optimizer.param_groups]],
        "scheduler": [scheduler.last_epoch, list(scheduler.base_lrs)],
        "generator": generator.get_state(),
        "rng": torch.get_rng_state(),
    }


def _interrupted(save, load, guard=None):
    """(final parameters, the step load returned, what save saw, what load left) of the run with a break."""
    with torch.random.fork_rng(), tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(1)
        objects = _objects(0)
        _train(objects, _BREAK)
        path = os.path.join(folder, "checkpoint.pt")
        at_save = _probe(*objects)
        call_candidate("save(path, step, model, optimizer, scheduler, generator)", {}, save, path, _BREAK, *objects,
                       guard=guard)
        torch.manual_seed(12345)  # the new process's global RNG is not the old one's
        fresh = _objects(100)  # other initial weights, a new optimizer, scheduler and generator
        moved = os.path.join(folder, "moved.pt")
        if os.path.exists(path):
            os.replace(path, moved)  # what is resumed is the file, wherever it is
        step = call_candidate("load(path, model, optimizer, scheduler, generator)", {}, load, moved, *fresh,
                              guard=guard)
        after_load = _probe(*fresh)
        _train(fresh, _STEPS - _BREAK)
        return _final(fresh), step, at_save, after_load


def _run(cls, records, guard):
    if not isinstance(cls, type):
        raise ExerciseFailed(f"pass the class itself (Checkpoint), not {type_name(cls)}")
    for method in ("save", "load"):
        if not callable(getattr(cls, method, None)):
            raise ExerciseFailed(f"Checkpoint needs a static method `{method}` (keep the @staticmethod lines)")
    final, step, at_save, after_load = _interrupted(cls.save, cls.load, guard)
    records.append({"final": final, "step": step if isinstance(step, int) else type_name(step),
                    "at_save": at_save, "after_load": after_load})


def _same(a, b):
    """Bit for bit, through lists, tensors and numbers."""
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b) \
            and all(_same(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a.double(), b.double())
    return a == b


def _judge(records):
    record = records.next()
    missing = [text for name, text in _PIECES if not _same(record["at_save"][name], record["after_load"][name])]
    if missing:
        raise ExerciseFailed(f"after load() the fresh objects are not where the run stopped: your checkpoint does "
                             f"not restore {'; '.join(missing)}. Save it in save() and restore it in load()")
    if record["step"] != _BREAK:
        raise ExerciseFailed(f"load must return the step saved ({_BREAK}, where training continues), got "
                             f"{record['step']}")
    expected = _uninterrupted()
    if all(torch.equal(a, b) for a, b in zip(record["final"], expected)):
        return
    largest = max((a - b).abs().max().item() for a, b in zip(record["final"], expected))
    raise ExerciseFailed(f"the resumed run differs from the one without a break (largest difference in a weight "
                         f"{largest:.3g}; bit for bit means 0), although the model, the optimizer, the scheduler, "
                         f"the generator and the global RNG were where the run stopped right after load(): does "
                         f"your save() or load() change something on the way (a step, a draw from a generator)?")


def check_resume(cls):
    """cls.save(path, step, model, optimizer, scheduler, generator) writes a checkpoint file;
    cls.load(path, model, optimizer, scheduler, generator) -> step restores it into fresh objects, so that
    training continues bit for bit as if it had never stopped (dropout and batches included)."""
    __tracebackhide__ = True
    run_and_judge("check_resume", cls)


register("check_resume", _run, _judge)

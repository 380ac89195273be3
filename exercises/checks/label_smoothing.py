"""Exercise 8, cross-entropy with ignore_index and label smoothing: fn(logits [..., V], targets [...], *,
ignore_index=-100, label_smoothing=0.0) -> the mean loss over the positions that count, a 0-dim tensor,
equal to torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=...,
label_smoothing=...).

The judge computes the reference in float64 and, where the answer differs, the losses of known mistakes
(_MISTAKES, each the formula with one change) to name the one made."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from exercises.checks.harness import (FLOAT32_ROUNDOFF, ExerciseFailed, call_candidate, expected_and_got, is_close,
                                      register, require_callable, run_and_judge, tensor_differences, type_name)


def _cases():
    """(case, logits, targets, ignore_index, label_smoothing)."""
    g = torch.Generator().manual_seed(8)

    def targets(shape, vocab, ignored=0.0, pad=-100):
        t = torch.randint(vocab, shape, generator=g)
        if ignored:
            t[torch.rand(shape, generator=g) < ignored] = pad
        return t

    padded = targets((3, 6), 12, ignored=0.3)
    padded[0, 0] = 5  # at least one position of each kind
    padded[0, 1] = -100
    pad_zero = targets((5, 4), 9, ignored=0.35, pad=0)
    pad_zero[0, 0], pad_zero[0, 1] = 0, 3
    return [
        ("random logits [8, 10], label_smoothing=0.1", torch.randn(8, 10, generator=g) * 2, targets((8,), 10),
         -100, 0.1),
        ("logits [3, 6, 12] (batch, time, vocabulary), padded positions (target -100), label_smoothing=0.2",
         torch.randn(3, 6, 12, generator=g), padded, -100, 0.2),
        ("ignore_index=0 (token 0 pads the batch), label_smoothing=0.1", torch.randn(5, 4, 9, generator=g) * 3,
         pad_zero, 0, 0.1),
        ("padded positions and label_smoothing=0 (plain cross-entropy)", torch.randn(3, 6, 12, generator=g),
         padded.clone(), -100, 0.0),
        ("label_smoothing=0.5 over a vocabulary of 1000", torch.randn(16, 1000, generator=g), targets((16,), 1000),
         -100, 0.5),
        ("logits of magnitude 1e4, label_smoothing=0.1", torch.randn(4, 30, generator=g) * 1e4, targets((4,), 30),
         -100, 0.1),
    ]


def _gradient_case():
    g = torch.Generator().manual_seed(18)
    t = torch.randint(7, (2, 5), generator=g)
    t[1, 2:] = -100
    return torch.randn(2, 5, 7, generator=g), t, -100, 0.1


# ----------------------------------------------------------------------------------------
# The reference and the mistakes, in float64
# ----------------------------------------------------------------------------------------

def _reference(logits, targets, ignore_index, smoothing):
    logits = logits.double()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index,
                           label_smoothing=smoothing).item()


def _parts(logits, targets, ignore_index):
    """Per kept position: -log p(target), -mean_j log p(j), -sum_{j != target} log p(j) / (V - 1); the kept count
    and the total count."""
    logits, targets = logits.double().reshape(-1, logits.shape[-1]), targets.reshape(-1)
    keep = targets != ignore_index
    z, t = logits[keep], targets[keep]
    log_p = z - torch.logsumexp(z, -1, keepdim=True)
    nll = -log_p.gather(1, t[:, None]).squeeze(1)
    uniform = -log_p.mean(-1)
    vocab = z.shape[-1]
    others = (-log_p.sum(-1) - nll) / (vocab - 1)
    return nll, uniform, others, int(keep.sum()), targets.numel()


def _model(mistake, logits, targets, ignore_index, eps):
    if mistake == "ignore_index unused":  # the default -100 hard-coded
        if ignore_index == -100:
            return None
        return _model(None, logits, targets, -100, eps)
    nll, uniform, others, kept, total = _parts(logits, targets, ignore_index)
    per_position = {
        None: (1 - eps) * nll + eps * uniform,
        "over the other tokens": (1 - eps) * nll + eps * others,
        "weights swapped": eps * nll + (1 - eps) * uniform,
        "target weight 1": nll + eps * uniform,
        "uniform term's sign": (1 - eps) * nll - eps * uniform,
    }.get(mistake)
    if mistake == "divided by every position":
        return ((1 - eps) * nll + eps * uniform).sum().item() / total
    if mistake == "sum":
        return ((1 - eps) * nll + eps * uniform).sum().item()
    return None if per_position is None else per_position.mean().item()


_MISTAKES = [  # (mistake, message), tried in order on the first case the answer gets wrong
    ("ignore_index unused", "use the ignore_index argument: here the batch is padded with token 0 "
                            "(ignore_index=0), and your loss counted those positions as if ignore_index were -100"),
    ("divided by every position", "average over the positions that count: divide the sum by the number of "
                                  "targets != ignore_index, not by every position (padding would dilute the loss)"),
    ("over the other tokens", "label smoothing spreads label_smoothing over all V tokens, the target included, as "
                              "PyTorch does: (1 - eps) * (-log p[target]) + eps * mean over all j of (-log p[j]). "
                              "Yours spreads it over the V - 1 other tokens"),
    ("weights swapped", "the weights are swapped: (1 - eps) goes to the target's -log p, eps to the uniform term"),
    ("target weight 1", "the target's term keeps only 1 - eps of the weight: (1 - eps) * (-log p[target]) + "
                        "eps * mean_j(-log p[j]); yours weighs it 1"),
    ("uniform term's sign", "the uniform term is eps * mean over j of -log p[j], a positive penalty: yours "
                            "subtracts it"),
    ("sum", "return the mean over the positions that count, not the sum"),
]


# ----------------------------------------------------------------------------------------
# Run and judge
# ----------------------------------------------------------------------------------------

_INDEX_HINT = (lambda e: isinstance(e, (IndexError, RuntimeError)) and "index" in str(e).lower(),
               "a target of ignore_index (-100 here) is no token: drop those positions (keep = targets != "
               "ignore_index) before indexing the logits with the targets")


def _call(fn, logits, targets, ignore_index, smoothing, guard, case, hints=()):
    return call_candidate("smoothed_cross_entropy", {"case": case}, fn, logits, targets, ignore_index=ignore_index,
                          label_smoothing=smoothing, hints=[_INDEX_HINT, *hints], guard=guard)


def _run(fn, records, guard):
    require_callable(fn, "smoothed_cross_entropy")
    for case, logits, targets, ignore_index, smoothing in _cases():
        given = logits.clone()
        got = _call(fn, given, targets.clone(), ignore_index, smoothing, guard, case)
        records.append({"got": got, "changed": not torch.equal(given, logits)})
    logits, targets, ignore_index, smoothing = _gradient_case()
    learner = logits.clone().requires_grad_()
    loss = _call(fn, learner, targets, ignore_index, smoothing, guard, "the gradient case")
    record = {"graph": torch.is_tensor(loss) and loss.grad_fn is not None, "grad": None}
    if record["graph"] and loss.numel() == 1:
        call_candidate("loss.backward()", {}, loss.reshape(()).backward, guard=guard)
        record["grad"] = learner.grad
    records.append(record)


def _tolerance(logits):
    # a float32 answer: logsumexp is exact to a few u * max|logit| absolutely (1e4: 2e-3), the mean over
    # positions and the eps-weighted sum add a few u relatively; 1e-5 relatively covers the rest
    return 1e-6 + 32 * FLOAT32_ROUNDOFF * logits.abs().max().item()


def _judge(records):
    for case, logits, targets, ignore_index, smoothing in _cases():
        record = records.next()
        got = record["got"]
        if not torch.is_tensor(got):
            raise ExerciseFailed(f"return a torch.Tensor (0-dim, the mean loss), got {type_name(got)} for {case}")
        if got.numel() != 1:
            raise ExerciseFailed(f"return one number, the mean over the positions that count (a 0-dim tensor); got "
                                 f"shape {list(got.shape)} for {case}")
        if record["changed"]:
            raise ExerciseFailed(f"your function changed `logits` in place for {case}: compute new tensors instead")
        value, expected = got.item(), _reference(logits, targets, ignore_index, smoothing)
        if not math.isfinite(value):
            raise ExerciseFailed(f"the loss is {value} for {case} (expected {expected:.6g}): work with "
                                 f"log-probabilities, log p = z - logsumexp(z) with logsumexp shifted by the row's "
                                 f"max, never log(softmax(z))")
        atol = _tolerance(logits)
        if is_close(value, expected, 1e-5, atol):
            continue
        for mistake, message in _MISTAKES:
            modelled = _model(mistake, logits, targets, ignore_index, smoothing)
            if modelled is not None and is_close(value, modelled, 1e-5, atol):
                raise ExerciseFailed(f"{message}. For {case}: {expected_and_got(expected, value)}")
        raise ExerciseFailed(f"wrong loss for {case}: {expected_and_got(expected, value)}")
    record = records.next()
    if not record["graph"]:
        raise ExerciseFailed("the loss is cut off from the autograd graph (.item(), .detach(), a new tensor): "
                             "loss.backward() must reach the logits")
    logits, targets, ignore_index, smoothing = _gradient_case()
    reference = logits.double().requires_grad_()
    F.cross_entropy(reference.reshape(-1, 7), targets.reshape(-1), ignore_index=ignore_index,
                    label_smoothing=smoothing).backward()
    # float32 gradients of size ~0.1: softmax entries exact to a few u
    if record["grad"] is None:
        raise ExerciseFailed("loss.backward() left no gradient in the logits")
    if not torch.allclose(record["grad"].double(), reference.grad, rtol=1e-4, atol=1e-6):
        raise ExerciseFailed(f"the gradient of your loss differs from PyTorch's: "
                             f"{tensor_differences(reference.grad, record['grad'])}")


def check_label_smoothing(fn):
    """fn(logits [..., V], targets [...], *, ignore_index=-100, label_smoothing=0.0) -> 0-dim tensor, equal to
    F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=..., label_smoothing=...): per
    position (1 - eps) * (-log p[target]) + eps * mean over all V tokens of (-log p[j]), averaged over the
    positions whose target is not ignore_index."""
    __tracebackhide__ = True
    run_and_judge("check_label_smoothing", fn)


register("check_label_smoothing", _run, _judge)

"""Exercise 1, cross-entropy: fn(logits [N, V], targets [N]) -> the mean loss, a 0-dim tensor."""
from __future__ import annotations

import math

import torch

import training
from exercises.checks.harness import (FLOAT32_ROUNDOFF, ExerciseFailed, call_candidate, expected_and_got, is_close,
                                      on_input, register, require_callable, run_and_judge, type_name)

_SHIFT_UNDERFLOW = ("exp() underflowed: every exp(x - m) of a row rounded to 0, so log(sum) = log(0) = -inf. "
                    "m must be each row's own max logit (not max |x|, not the max of the whole batch): then the "
                    "largest term is exp(0) = 1")


def _cases():
    """(case, logits, targets, message when the loss is +inf or nan, message when it is -inf)."""
    g = torch.Generator().manual_seed(7)
    return [
        ("random logits", torch.randn(8, 10, generator=g) * 3, torch.randint(10, (8,), generator=g), None, None),
        ("a single row", torch.randn(1, 5, generator=g), torch.tensor([3]), None, None),
        ("a vocabulary of 1000", torch.randn(32, 1000, generator=g), torch.randint(1000, (32,), generator=g),
         None, None),
        ("logits of magnitude 1e4", torch.randn(6, 50, generator=g) * 1e4, torch.randint(50, (6,), generator=g),
         "softmax overflowed: exp(1e4) is inf in float32. Subtract each row's max logit before exp(): "
         "logsumexp(x) = m + log(sum(exp(x - m))) with m = max(x)", _SHIFT_UNDERFLOW),
        ("logits all close to -1e4", torch.randn(4, 20, generator=g) - 1e4, torch.randint(20, (4,), generator=g),
         None, "exp() underflowed: every exp(-1e4) is 0 in float32, so log(sum) = log(0) = -inf. Subtract each "
               "row's max logit before exp(): logsumexp(x) = m + log(sum(exp(x - m)))"),
        ("a target with probability ~exp(-200)", torch.tensor([[0.0, -200.0, 5.0], [10.0, 0.0, -150.0]]),
         torch.tensor([1, 2]),
         "log(softmax) underflowed: the target's probability (about exp(-200)) rounds to 0 in float32 and "
         "log(0) = -inf. Work with log-probabilities directly: log p = x - logsumexp(x)", None),
    ]


def _gradient_case():
    g = torch.Generator().manual_seed(11)
    return torch.randn(5, 7, generator=g), torch.randint(7, (5,), generator=g)


_IN_PLACE_HINT = (lambda e: "in-place" in str(e), "don't modify logits in place (`logits -= m`); write `logits - m`")


def _run_cross_entropy(fn, records, guard):
    require_callable(fn, "cross_entropy")
    for case, logits, targets, _, _ in _cases():
        given = logits.clone()
        got = call_candidate("cross_entropy", {"logits": logits, "targets": targets, "case": case}, fn, given,
                             targets.clone(), guard=guard)
        records.append({"got": got, "changed": not torch.equal(given, logits)})
    logits, targets = _gradient_case()
    learner_logits = logits.clone().requires_grad_()
    inputs = {"logits": logits, "targets": targets}
    loss = call_candidate("cross_entropy", inputs, fn, learner_logits, targets, hints=[_IN_PLACE_HINT],
                          guard=guard)
    record = {"got": loss, "graph": torch.is_tensor(loss) and loss.grad_fn is not None, "grad": None}
    if record["graph"] and loss.numel() == 1:
        call_candidate("loss.backward()", inputs, loss.reshape(()).backward, guard=guard)
        record["grad"] = learner_logits.grad
    records.append(record)


def _judge_cross_entropy(records):
    for case, logits, targets, too_big, too_small in _cases():
        record = records.next()
        inputs = {"logits": logits, "targets": targets, "case": case}
        got = record["got"]
        _judge_loss_type(got, len(targets), inputs)
        if record["changed"]:
            raise ExerciseFailed(f"your function changed `logits` in place{on_input(inputs)}: "
                                 f"compute `logits - m`, not `logits -= m`")
        value = got.item()
        expected = training.cross_entropy(logits.double(), targets).item()  # float64: exact to ~1e-15
        if not math.isfinite(value):
            message = (too_small if value == -math.inf else too_big) or "the loss is not finite"
            raise ExerciseFailed(f"{message}. Got {value} for {case}, expected {expected:.6g}.")
        # A float32 answer, with u = FLOAT32_ROUNDOFF: the sum of V exponentials is exact to V*u relatively, which
        # log() turns into an absolute error; m + log(sum) rounds to u*|m| (logits of -1e4: 6e-4); the mean over
        # N rows adds N*u.
        n, v = logits.shape
        u = FLOAT32_ROUNDOFF
        if is_close(value, expected, (n + 8) * u, 4 * (v + logits.abs().max().item()) * u):
            continue
        shown = f"{expected_and_got(expected, value)} for {case}"
        per_row = torch.logsumexp(logits.double(), -1) - logits.double()[torch.arange(len(targets)), targets]
        if is_close(value, per_row.sum().item(), 1e-4):
            raise ExerciseFailed(f"you summed the per-row losses: return their mean ({shown})")
        if is_close(value, -expected, 1e-4):
            raise ExerciseFailed(f"the sign is flipped: the loss is -log p(target), a positive number ({shown})")
        if is_close(value, expected / math.log(2), 1e-4):
            raise ExerciseFailed(f"you used log base 2: the loss is in nats, use the natural log, torch.log "
                                 f"({shown})")
        wrong_pick = torch.logsumexp(logits.double(), -1)[:, None] - logits.double()[:, targets]
        if len(targets) > 1 and is_close(value, wrong_pick.mean().item(), 1e-4):
            raise ExerciseFailed("logits[:, targets] picks an N x N block, not one logit per row: "
                                 "use logits[torch.arange(N), targets] (or logits.gather)")
        raise ExerciseFailed(f"wrong loss: {shown}{on_input(inputs)}")
    _judge_gradient(records.next())


def _judge_loss_type(got, n, inputs):
    if not torch.is_tensor(got):
        raise ExerciseFailed(f"return a torch.Tensor (0-dim), not {type_name(got)}: the loss must stay "
                             f"a tensor so that loss.backward() works{on_input(inputs)}")
    if got.dim() == 1 and got.shape[0] == n and n > 1:
        raise ExerciseFailed(f"you returned one loss per row (shape {list(got.shape)}): return their mean, "
                             f"a 0-dim tensor{on_input(inputs)}")
    if got.numel() != 1:
        raise ExerciseFailed(f"return a 0-dim tensor (the mean loss), got shape {list(got.shape)}"
                             f"{on_input(inputs)}")
    if got.dim() != 0:
        raise ExerciseFailed(f"return a 0-dim tensor (shape []), got shape {list(got.shape)}: a mean over one "
                             f"dimension (e.g. .mean(dim=0) of an [N, 1] tensor) keeps the others; take .mean() "
                             f"over all elements{on_input(inputs)}")
    if not got.is_floating_point():
        raise ExerciseFailed(f"the loss must be a floating-point tensor, got {got.dtype}{on_input(inputs)}")


def _judge_gradient(record):
    logits, targets = _gradient_case()
    inputs = {"logits": logits, "targets": targets}
    _judge_loss_type(record["got"], len(targets), inputs)
    if not record["graph"]:
        raise ExerciseFailed("the loss is cut off from the autograd graph (.item(), .detach(), torch.tensor(...) "
                             "or numpy?): compute it from `logits` with torch operations only")
    reference_logits = logits.clone().requires_grad_()
    training.cross_entropy(reference_logits, targets).backward()
    # each entry is (softmax - one_hot) / N in float32, exact to a few FLOAT32_ROUNDOFF relatively: 1e-4 leaves a
    # wide margin
    grad = record["grad"]
    if grad is None or grad.shape != logits.shape or not torch.allclose(grad, reference_logits.grad,
                                                                       rtol=1e-4, atol=1e-6):
        raise ExerciseFailed("the loss has the right value but the wrong gradient: d loss / d logits should be "
                             "(softmax(logits) - one_hot(targets)) / N. Did you detach the max with a "
                             "non-differentiable operation or treat part of the loss as a constant?")


def check_cross_entropy(fn):
    """fn(logits: Tensor[N, V], targets: LongTensor[N]) -> 0-dim Tensor, the mean of -log softmax(logits)[target]."""
    __tracebackhide__ = True
    run_and_judge("check_cross_entropy", fn)


register("check_cross_entropy", _run_cross_entropy, _judge_cross_entropy)

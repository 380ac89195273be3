"""Exercise 1, cross-entropy with a hand-written backward: a torch.autograd.Function whose
apply(logits [N, V], targets [N]) is the mean loss, a 0-dim tensor, and whose backward returns
(softmax - one_hot) / N times the incoming gradient."""
from __future__ import annotations

import math

import torch

import training
from exercises.checks.harness import (FLOAT32_ROUNDOFF, ExerciseFailed, call_candidate, expected_and_got, is_close,
                                      on_input, register, run_and_judge, tensor_differences, type_name)

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


def _gradient_cases():
    """(case, logits, targets, the gradient of the final result with respect to the loss)."""
    g = torch.Generator().manual_seed(11)
    return [
        ("random logits", torch.randn(5, 7, generator=g), torch.randint(7, (5,), generator=g), 1.0),
        # backward receives 2.5, not 1: the loss is used further on (loss * 2.5, an accumulation's 1 / N, ...)
        ("random logits and an incoming gradient of 2.5", torch.randn(6, 9, generator=g) * 3,
         torch.randint(9, (6,), generator=g), 2.5),
        ("logits of magnitude 1e4", torch.randn(4, 30, generator=g) * 1e4, torch.randint(30, (4,), generator=g), 1.0),
        ("a vocabulary of 1000", torch.randn(16, 1000, generator=g), torch.randint(1000, (16,), generator=g), 0.5),
    ]


_WRONG_GRADIENT_COUNT = (lambda e: "incorrect number of gradients" in str(e),
                         "backward returns one gradient per input of forward, in order: (the gradient for logits, "
                         "None), None for targets, which are integers")
_WRONG_GRADIENT_SHAPE = (lambda e: "invalid gradient at index 0" in str(e),
                         "the gradient for logits has the shape of logits, [N, V]")
_IN_PLACE_HINT = (lambda e: "in-place" in str(e) or "modified by an inplace" in str(e),
                  "don't modify logits in place (`logits -= m`); write `logits - m`")


def _is_function(cls):
    return isinstance(cls, type) and issubclass(cls, torch.autograd.Function)


def _run_cross_entropy(cls, records, guard):
    if not _is_function(cls):
        got = "a class that does not subclass it" if isinstance(cls, type) else f"a {type_name(cls)}"
        raise ExerciseFailed(f"write CrossEntropy as a torch.autograd.Function subclass, `class CrossEntropy("
                             f"torch.autograd.Function)` with static forward and backward methods, and pass the "
                             f"class itself to the check; got {got}")
    for case, logits, targets, _, _ in _cases():
        given = logits.clone()
        got = call_candidate("CrossEntropy.apply", {"logits": logits, "targets": targets, "case": case}, cls.apply,
                             given, targets.clone(), guard=guard)
        records.append({"got": got, "changed": not torch.equal(given, logits)})
    for case, logits, targets, incoming in _gradient_cases():
        learner_logits = logits.clone().requires_grad_()
        inputs = {"logits": logits, "targets": targets, "case": case}
        loss = call_candidate("CrossEntropy.apply", inputs, cls.apply, learner_logits, targets,
                              hints=[_IN_PLACE_HINT], guard=guard)
        node = getattr(loss, "grad_fn", None) if torch.is_tensor(loss) else None
        record = {"got": loss, "graph": node is not None,
                  "own_backward": node is not None and getattr(type(node), "_forward_cls", None) is cls, "grad": None}
        if record["own_backward"] and loss.numel() == 1:
            call_candidate("CrossEntropy.backward", inputs, loss.reshape(()).backward, torch.tensor(incoming),
                           hints=[_WRONG_GRADIENT_COUNT, _WRONG_GRADIENT_SHAPE, _IN_PLACE_HINT], guard=guard)
            record["grad"] = learner_logits.grad
        records.append(record)


def _judge_cross_entropy(records):
    for case, logits, targets, too_big, too_small in _cases():
        record = records.next()
        inputs = {"logits": logits, "targets": targets, "case": case}
        got = record["got"]
        _judge_loss_type(got, len(targets), inputs)
        if record["changed"]:
            raise ExerciseFailed(f"your forward changed `logits` in place{on_input(inputs)}: "
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
    for case in _gradient_cases():
        _judge_gradient(records.next(), *case)


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


def _judge_gradient(record, case, logits, targets, incoming):
    inputs = {"logits": logits, "targets": targets, "case": case}
    _judge_loss_type(record["got"], len(targets), inputs)
    if not record["graph"]:
        raise ExerciseFailed(f"the loss is cut off from the autograd graph{on_input(inputs)}: return the result of "
                             f"forward as it is, and call the class as CrossEntropy.apply(logits, targets)")
    if not record["own_backward"]:
        raise ExerciseFailed(f"the loss's gradient does not come from your backward{on_input(inputs)}: let "
                             f"CrossEntropy.apply run your forward (don't override apply), so that autograd calls "
                             f"your backward")
    grad = record["grad"]
    if grad is None:
        raise ExerciseFailed(f"logits.grad is None after backward{on_input(inputs)}: return the gradient for logits "
                             f"first, then None for targets")
    n, v = logits.shape
    reference_logits = logits.double().requires_grad_()
    (training.cross_entropy(reference_logits, targets) * incoming).backward()  # float64: exact to ~1e-16
    expected = reference_logits.grad
    # Each entry is (softmax - one_hot) * incoming / N. A float32 softmax exp(x - m) / sum is exact to (V + 2) u
    # relatively (u = FLOAT32_ROUNDOFF: V terms summed, one exp, one division), so softmax - one_hot to (V + 2) u
    # absolutely, and the product with incoming / N adds two roundings.
    tolerance = (v + 8) * FLOAT32_ROUNDOFF * abs(incoming) / n
    if grad.shape == expected.shape and torch.allclose(grad.double(), expected, rtol=0, atol=tolerance):
        return
    if grad.shape != expected.shape:
        raise ExerciseFailed(f"the gradient for logits has shape {list(grad.shape)}, expected {list(logits.shape)}"
                             f"{on_input(inputs)}")
    shown = tensor_differences(expected, grad)
    grad = grad.double()
    if not torch.isfinite(grad).all():
        raise ExerciseFailed(f"the gradient is not finite for {case}: compute the softmax in backward as "
                             f"exp(x - m) / sum(exp(x - m)) with m each row's max (or save the one forward "
                             f"computed), never exp(x) / sum(exp(x)); {shown}")
    softmax = logits.double().softmax(-1)
    one_hot = torch.nn.functional.one_hot(targets, v).double()

    def gives(alternative):
        return torch.allclose(grad, alternative, rtol=1e-4, atol=1e-4 * abs(incoming) / n)

    if incoming != 1 and gives(expected / incoming):
        raise ExerciseFailed(f"backward ignores its argument, the incoming gradient d(result)/d(loss) ({incoming:g} "
                             f"here): multiply your gradient by it (the chain rule); {shown}")
    if gives(expected * n):
        raise ExerciseFailed(f"the gradient is N = {n} times too large: the loss is the mean over the N rows, so "
                             f"d loss / d logits = (softmax - one_hot) / N; {shown}")
    if gives(-expected):
        raise ExerciseFailed(f"the gradient has the wrong sign: d loss / d logits = (softmax - one_hot) / N, the "
                             f"target's entry negative; {shown}")
    if gives(softmax * incoming / n) or gives(softmax * incoming):
        raise ExerciseFailed(f"subtract the one-hot of the targets: d loss / d logits = (softmax - one_hot) / N "
                             f"(the -x_t of the loss gives the -1 at each row's target); {shown}")
    if gives((softmax - one_hot.amax(0)) * incoming / n):  # grad[:, targets] -= 1: every target in every row
        raise ExerciseFailed(f"grad[:, targets] subtracts 1 at every row's target in every row: subtract it at "
                             f"(i, targets[i]) only, grad[torch.arange(N), targets] -= 1; {shown}")
    raise ExerciseFailed(f"wrong gradient for {case}: d loss / d logits = (softmax - one_hot) / N times the "
                         f"incoming gradient; {shown}")


def check_cross_entropy(cls):
    """cls, a torch.autograd.Function: cls.apply(logits: Tensor[N, V], targets: LongTensor[N]) -> 0-dim Tensor, the
    mean of -log softmax(logits)[target], finite for any logits; its backward returns (softmax(logits) -
    one_hot(targets)) / N times the incoming gradient for logits, and None for targets."""
    __tracebackhide__ = True
    run_and_judge("check_cross_entropy", cls)


register("check_cross_entropy", _run_cross_entropy, _judge_cross_entropy)

"""Exercise 9, gradient accumulation over micro-batches of unequal token counts:
fn(model, micro_batches, ignore_index=-100) -> the mean loss over every kept token of all micro-batches,
leaving in each p.grad the gradient of that mean, as if the micro-batches were one big batch.

The run drives the candidate on a small token model whose forward calls and backward passes it counts;
the judge recomputes, in float64, each micro-batch's summed token loss and its gradient, and from them
the right gradient and those of known mistakes (_GRAD_MISTAKES) to name the one made."""
from __future__ import annotations

import copy
import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from exercises.checks.harness import (ExerciseFailed, call_candidate, expected_and_got, is_close, register,
                                      require_callable, run_and_judge, show, tensor_differences, type_name)

_VOCAB = 11


def _model():
    g = torch.Generator().manual_seed(9)
    with torch.random.fork_rng():  # nn layers draw from the global generator: leave it as it was
        model = nn.Sequential(nn.Embedding(_VOCAB, 6), nn.Linear(6, _VOCAB))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _micro(g, batch, time, padded, pad=-100):
    """(x, y) of shape [batch, time]; the last `padded[i]` targets of row i are `pad`."""
    x = torch.randint(_VOCAB, (batch, time), generator=g)
    y = torch.randint(_VOCAB, (batch, time), generator=g)
    for row, count in enumerate(padded):
        if count:
            y[row, time - count:] = pad
    return x, y


def _cases():
    """(case, micro-batches, ignore_index, pass them as a generator)."""
    g = torch.Generator().manual_seed(19)
    unequal = [_micro(g, 2, 8, [0, 4]), _micro(g, 1, 8, [3]), _micro(g, 3, 8, [0, 0, 4])]  # 12, 5, 20 tokens
    return [
        ("three micro-batches of 12, 5 and 20 tokens (padded with -100)", unequal, -100, False),
        ("two micro-batches of 16 tokens each", [_micro(g, 2, 8, [0, 0]), _micro(g, 2, 8, [0, 0])], -100, False),
        ("a micro-batch that is all padding, between two of 6 and 14 tokens",
         [_micro(g, 1, 6, [0]), _micro(g, 2, 5, [5, 5]), _micro(g, 2, 7, [0, 0])], -100, False),
        ("micro-batches of different lengths (time 4 and 9), padding id 0",
         [_micro(g, 2, 4, [1, 0], pad=0), _micro(g, 1, 9, [2], pad=0)], 0, False),
        ("micro_batches passed as a generator (one pass only), 7 and 18 tokens",
         [_micro(g, 1, 7, [0]), _micro(g, 3, 6, [0, 0, 0])], -100, True),
    ]


def _stale(model):
    """The gradients a previous update left in .grad, which the candidate must clear."""
    g = torch.Generator().manual_seed(29)
    return [torch.randn(p.shape, generator=g) for p in model.parameters()]


def _kept(y, ignore_index):
    return int((y != ignore_index).sum())


def _run(fn, records, guard):
    require_callable(fn, "accumulate_gradients")
    for case, micro_batches, ignore_index, as_generator in _cases():
        model = _model()
        for p, stale in zip(model.parameters(), _stale(model)):
            p.grad = stale.clone()
        shapes, backward_passes = [], []
        model.register_forward_hook(lambda module, inputs, output: shapes.append(list(inputs[0].shape)))
        model[1].weight.register_hook(lambda grad: backward_passes.append(1))
        batches = [(x.clone(), y.clone()) for x, y in micro_batches]
        argument = (batch for batch in batches) if as_generator else batches
        got = call_candidate("accumulate_gradients", {"case": case, "ignore_index": ignore_index}, fn, model,
                             argument, ignore_index=ignore_index, guard=guard)
        if torch.is_tensor(got) and got.numel() == 1:
            got = got.detach().reshape(()).clone()
        records.append({"got": got if torch.is_tensor(got) or isinstance(got, numbers.Real) else show(got)[:100],
                        "grads": [p.grad for p in model.parameters()], "shapes": shapes,
                        "backward_passes": len(backward_passes)})


def _per_micro(micro_batches, ignore_index):
    """Per micro-batch, in float64: (summed token loss, its gradient as one flat vector, kept tokens, positions)."""
    model = copy.deepcopy(_model()).double()
    parts = []
    for x, y in micro_batches:
        model.zero_grad(set_to_none=False)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, _VOCAB), y.reshape(-1), ignore_index=ignore_index, reduction="sum")
        loss.backward()
        parts.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()]), _kept(y, ignore_index),
                      y.numel()))
    return parts


def _grad_models(parts, stale):
    sums, grads, kept, positions = zip(*parts)
    total, count = sum(kept), len(parts)
    right = sum(grads) / total
    return right, [  # (gradient such an answer leaves, what is wrong), first match wins
        (right + stale, "clear the gradients first (model.zero_grad()): backward() adds to .grad, which still "
                        "held the previous update's gradients"),
        (sum(g / k for g, k in zip(grads, kept) if k) / count,
         f"dividing each micro-batch's mean loss by the number of micro-batches weighs every micro-batch equally, "
         f"but they hold {', '.join(map(str, kept))} tokens: weigh every token equally, (sum of its micro-batch's "
         f"token losses) / (kept tokens of all micro-batches, {total}), whichever micro-batch holds it"),
        (sum(g / k for g, k in zip(grads, kept) if k),
         f"the micro-batches' mean losses were added up: each contributes its token-loss sum / {total}, the kept "
         f"tokens of all micro-batches together"),
        (sum(grads), f"divide by the number of kept tokens of all micro-batches ({total}): yours is the gradient "
                     f"of the summed token losses"),
        (sum(grads) / sum(positions), f"count only the targets != ignore_index: yours divides by every position "
                                      f"({sum(positions)}), padding included, instead of {total}"),
        (grads[-1] / total, "zero the gradients once, before the loop: zeroing between micro-batches throws away "
                            "all but the last one's"),
        (grads[-1] / kept[-1] / count if kept[-1] else None,
         "zero the gradients once, before the loop: zeroing between micro-batches throws away all but the last "
         "one's"),
    ]


def _loss_models(parts):
    sums, _, kept, positions = zip(*parts)
    total = sum(kept)
    return [
        (sums[-1] / kept[-1] if kept[-1] else None, "you returned the last micro-batch's loss"),
        (sum(s / k for s, k in zip(sums, kept) if k) / len(parts),
         "you returned the mean of the micro-batches' mean losses: weigh every token equally instead"),
        (sum(sums), "return the mean over the kept tokens, not the sum"),
        (sum(sums) / sum(positions), "count only the targets != ignore_index in the mean"),
    ]


_EMPTY_MICRO_BATCH = ("a micro-batch whose targets are all ignore_index has no token, and its mean loss is 0/0 = "
                      "nan. Sum the token losses (reduction='sum') and divide by the kept tokens of all micro-batches")

# float32 gradients of size ~0.1 summed over at most 40 tokens: a few hundred u relatively, far below 1e-4;
# the smallest mistake here changes them by 10% or more
_RTOL, _ATOL = 1e-4, 1e-6


def _judge(records):
    for case, micro_batches, ignore_index, as_generator in _cases():
        record = records.next()
        parts = _per_micro(micro_batches, ignore_index)
        expected_shapes = [list(x.shape) for x, _ in micro_batches]
        if record["shapes"] != expected_shapes:
            if as_generator and not record["shapes"]:
                raise ExerciseFailed("micro_batches may be a generator, which is empty after one pass: make a "
                                     "list first (micro_batches = list(micro_batches)) if you need two passes")
            raise ExerciseFailed(f"run the model on each micro-batch, once and in order: expected inputs of shapes "
                                 f"{expected_shapes}, the model saw {record['shapes']} for {case}. Accumulation "
                                 f"exists so that only one micro-batch's activations are in memory at a time")
        grads = record["grads"]
        if any(g is None for g in grads):
            raise ExerciseFailed(f"a parameter has no gradient after your function ran, for {case}: call "
                                 f"backward() on each micro-batch's loss")
        got_grad = torch.cat([g.double().flatten() for g in grads])
        if not torch.isfinite(got_grad).all():
            raise ExerciseFailed(f"the gradients are not finite for {case}: {_EMPTY_MICRO_BATCH}")
        right, mistakes = _grad_models(parts, torch.cat([s.double().flatten() for s in _stale(_model())]))
        if not torch.allclose(got_grad, right, rtol=_RTOL, atol=_ATOL):
            for model, message in mistakes:
                if model is not None and torch.allclose(got_grad, model, rtol=_RTOL, atol=_ATOL):
                    raise ExerciseFailed(f"{message} (for {case})")
            raise ExerciseFailed(f"wrong accumulated gradient for {case}: {tensor_differences(right, got_grad)}")
        with_tokens = sum(1 for _, _, k, _ in parts if k)
        if record["backward_passes"] < with_tokens:
            raise ExerciseFailed(f"call backward() once per micro-batch, right after its forward pass: yours ran "
                                 f"{record['backward_passes']} backward pass(es) for {len(parts)} micro-batches. "
                                 f"Adding up the losses and calling backward() once gives the same gradient but keeps "
                                 f"every micro-batch's activations in memory until the end, which accumulation is "
                                 f"there to avoid")
        got = record["got"]
        if torch.is_tensor(got):
            got = got.item() if got.numel() == 1 else None
        if isinstance(got, bool) or not isinstance(got, numbers.Real):
            raise ExerciseFailed(f"return the mean loss as a float (or a 0-dim tensor), got {type_name(got)} "
                                 f"for {case}")
        sums, _, kept, _ = zip(*parts)
        expected = sum(sums) / sum(kept)
        if not math.isfinite(got):
            raise ExerciseFailed(f"the loss you returned is {got} for {case}: {_EMPTY_MICRO_BATCH}")
        if math.isfinite(got) and is_close(got, expected, 1e-5):  # a float32 sum of at most 40 token losses
            continue
        for model, message in _loss_models(parts):
            if model is not None and math.isfinite(got) and is_close(got, model, 1e-5):
                raise ExerciseFailed(f"{message}: for {case} {expected_and_got(expected, float(got))}")
        raise ExerciseFailed(f"wrong mean loss for {case}: {expected_and_got(expected, float(got))}")


def check_grad_accumulation(fn):
    """fn(model, micro_batches, ignore_index=-100) -> the mean token loss of all micro-batches together. It clears
    the gradients, runs the model on each (x, y) micro-batch in turn and calls backward() on each, so that every
    p.grad ends as the gradient of sum(token losses of all micro-batches) / (their kept tokens)."""
    __tracebackhide__ = True
    run_and_judge("check_grad_accumulation", fn)


register("check_grad_accumulation", _run, _judge)

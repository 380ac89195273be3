"""The exercise checks: solutions pass, untouched stubs fail helpfully, wrong answers are caught.

A candidate is loaded from a notebook the way the grader loads it (its code cells up to the one
that defines it, without the check cell). Each mutant is the solution with one plausible
learner mistake edited in; the check must reject it, with the targeted message where the check
knows that mistake. Everything runs in this process: no kernels, milliseconds per check.
"""
from __future__ import annotations

import ast
import inspect
import json
import linecache
import math
import re
import textwrap
from pathlib import Path

import nbformat
import pytest
import torch

import training
from m07_training.schedules import cosine_decay, cosine_lr, wsd_lr
from course import colab
from exercises import checks
from exercises.catalog import EXERCISES
from exercises.checks import ExerciseFailed
from exercises.checks.harness import expected_and_got
from exercises.grade import answer_cells
from exercises.integrity import scan

from answers import LR_FINDER_WITH_SWEEP

ROOT = Path(__file__).resolve().parent.parent
EXERCISE = {exercise.slug: exercise for exercise in EXERCISES}


def notebook_cells(folder, slug):
    """(sources of the cells before the answer, source of the answer cell) of folder/NN-slug.ipynb."""
    exercise = EXERCISE[slug]
    notebook = nbformat.read(ROOT / folder / exercise.notebook, as_version=4)
    sources = [source for _, source in answer_cells(notebook, exercise)]
    return sources[:-1], sources[-1]


def load(slug, answer=None, folder="solutions"):
    """The candidate defined by the notebook's cells, with `answer` replacing the answer cell if given."""
    setup, notebook_answer = notebook_cells(folder, slug)
    namespace = {}
    sources = setup + [notebook_answer if answer is None else answer]
    for index, source in enumerate(sources):
        # the answer cell as `<slug>`; each cell's lines known to linecache, as a kernel knows a cell's
        name = f"<{slug}>" if index == len(sources) - 1 else f"<{slug} cell {index}>"
        linecache.cache[name] = (len(source), None, source.splitlines(True), name)
        exec(compile(source, name, "exec"), namespace)
    return namespace[EXERCISE[slug].candidate]


def check(slug):
    return getattr(checks, EXERCISE[slug].check)


@pytest.fixture(autouse=True)
def short_capstone_run(monkeypatch):
    """The capstone's real training run, cut from 200 updates to 20 (its full length runs in the replay of
    solutions/14-training-loop.ipynb)."""
    monkeypatch.setattr(checks, "CAPSTONE_UPDATES", 20)


# ----------------------------------------------------------------------------------------
# Solutions pass, stubs fail
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("slug", EXERCISE)
def test_solution_passes_its_check(slug):
    check(slug)(load(slug))


def library_copy(*functions):
    """The library's functions compiled afresh from their source (calling the library's own is refused), in one
    namespace; the arguments' validation they call (check_schedule, in the refused file too) as a no-op."""
    namespace = {"math": math, "check_schedule": lambda *args: None}
    for function in functions:
        exec(textwrap.dedent(inspect.getsource(function)), namespace)
    return namespace


def test_the_schedule_references_pass_their_checks():
    """The library's curves, compiled afresh, pass: the lower of cosine_lr and cosine_decay over the budget (as
    lr_of_update lays them), and wsd_lr."""
    cosine = library_copy(cosine_decay, cosine_lr)
    checks.check_cosine_schedule(
        lambda step, max_lr, min_lr, warmup_steps, total_steps, budget_used:
        min(cosine["cosine_lr"](step, max_lr=max_lr, min_lr=min_lr, warmup_steps=warmup_steps, total_steps=total_steps),
            cosine["cosine_decay"](min(budget_used, 1.0), max_lr, min_lr)))
    wsd = library_copy(wsd_lr)["wsd_lr"]
    checks.check_wsd_schedule(
        lambda step, max_lr, min_lr, warmup_steps, cooldown_steps, total_steps:
        wsd(step, max_lr=max_lr, min_lr=min_lr, warmup_steps=warmup_steps, cooldown_steps=cooldown_steps,
            total_steps=total_steps))


@pytest.mark.parametrize("slug", EXERCISE)
def test_untouched_stub_fails_with_not_implemented(slug):
    stub = load(slug, folder="exercises")
    with pytest.raises(ExerciseFailed, match="is not implemented yet: replace `raise NotImplementedError`"):
        check(slug)(stub)


@pytest.mark.parametrize("slug", EXERCISE)
def test_stub_and_solution_share_the_candidate_signature(slug):
    stub_answer = notebook_cells("exercises", slug)[1]
    solution_answer = notebook_cells("solutions", slug)[1]
    signature = re.compile(rf"^(def|class) {EXERCISE[slug].candidate}\b.*?:$", re.MULTILINE | re.DOTALL)
    assert signature.search(stub_answer).group(0) == signature.search(solution_answer).group(0)


@pytest.mark.parametrize("exercise", EXERCISES, ids=lambda exercise: exercise.slug)
def test_stub_notebook_layout(exercise):
    """Badge and Colab set-up cell first, the task, the answer and check cells, and no stored outputs."""
    notebook = nbformat.read(ROOT / "exercises" / exercise.notebook, as_version=4)
    assert notebook.metadata["exercise"]["slug"] == exercise.slug
    assert "Open In Colab" in notebook.cells[0].source
    assert notebook.cells[1].source.startswith(colab.SETUP_MARKER)
    tags = [cell.metadata.get("tags", []) for cell in notebook.cells]
    assert tags.count(["answer"]) == 1 and tags.count(["check"]) == 1
    check_cell = notebook.cells[tags.index(["check"])]
    assert f"{exercise.check}({exercise.candidate})" in check_cell.source
    assert all(not cell.outputs and cell.execution_count is None
               for cell in notebook.cells if cell.cell_type == "code")


# ----------------------------------------------------------------------------------------
# Mutants: the solution with one learner mistake each
# ----------------------------------------------------------------------------------------

def edit(*replacements):
    """A mutant as (old, new) text replacements in the solution's answer cell."""
    return replacements


MUTANTS = {
    "cross-entropy": [
        ("softmax overflow without max subtraction",
         edit(("exp = torch.exp(logits - row_max)", "exp = torch.exp(logits)"),
              ("(row_max + torch.log(sum_exp))", "(torch.log(sum_exp))")),
         r"softmax overflowed: exp\(1e4\) is inf"),
        ("summed instead of averaged", edit(("(logsumexp - target_logits).mean()", "(logsumexp - target_logits).sum()")),
         "you summed the per-row losses"),
        ("sign flipped", edit(("(logsumexp - target_logits)", "(target_logits - logsumexp)")), "the sign is flipped"),
        ("per-row losses returned", edit((".mean()", "")), "you returned one loss per row"),
        ("logits[:, targets] picks a block", edit(("logits[torch.arange(len(targets)), targets]",
                                                   "logits[:, targets]")), r"picks an N x N block"),
        ("max taken over the batch, not per row",
         edit(("logits.max(dim=-1, keepdim=True).values", "logits.max()")), "not the max of the whole batch"),
        ("modifies logits in place", edit(("torch.exp(logits - row_max)", "torch.exp(logits.sub_(row_max))")),
         "changed `logits` in place"),
        ("forward returns a Python float", edit((".mean()", ".mean().item()")), "return a torch.Tensor"),
        ("calls F.cross_entropy", edit(("return (logsumexp - target_logits).mean()",
                                        "return torch.nn.functional.cross_entropy(logits, targets)")),
         "refused: your code called `torch.nn.functional.cross_entropy`"),
        ("not an autograd.Function", edit(("class CrossEntropy(torch.autograd.Function):", "class CrossEntropy:")),
         r"write CrossEntropy as a torch.autograd.Function subclass"),
        ("backward not divided by N", edit(("grad * (grad_output / n)", "grad * grad_output")),
         r"the gradient is N = \d+ times too large"),
        ("backward ignores grad_output", edit(("grad * (grad_output / n)", "grad / n")),
         r"backward ignores its argument, the incoming gradient .*\(2.5 here\)"),
        ("backward with the wrong sign", edit(("return grad * (grad_output / n)", "return -grad * (grad_output / n)")),
         "the gradient has the wrong sign"),
        ("backward without the one-hot", edit(("        grad[torch.arange(n), targets] -= 1\n", "")),
         "subtract the one-hot of the targets"),
        ("grad[:, targets] in backward", edit(("grad[torch.arange(n), targets] -= 1", "grad[:, targets] -= 1")),
         r"grad\[:, targets\] subtracts 1 at every row's target"),
        ("backward returns one gradient, not one per input", edit(("grad * (grad_output / n), None", "grad * (grad_output / n)")),
         r"returned an incorrect number of gradients.*Hint: backward returns one gradient per input of forward"),
        ("naive softmax in backward",
         edit(("ctx.save_for_backward(exp / sum_exp, targets)", "ctx.save_for_backward(logits, targets)"),
              ("grad = softmax.clone()", "grad = softmax.exp() / softmax.exp().sum(-1, keepdim=True)")),
         r"the gradient is not finite for logits of magnitude 1e4.*exp\(x - m\)"),
        ("autograd inside backward",
         edit(("ctx.save_for_backward(exp / sum_exp, targets)", "ctx.save_for_backward(logits, targets)"),
              ("        grad = softmax.clone()", "        with torch.enable_grad():\n"
                                                "            x = softmax.detach().requires_grad_()\n"
                                                "            logsumexp = x.exp().sum(-1).log()\n"
                                                "            (grad,) = torch.autograd.grad((logsumexp - x[torch.arange(n), "
                                                "targets]).sum(), x)\n        grad = grad.clone()"),
              ("        grad[torch.arange(n), targets] -= 1\n", "")),
         r"^refused: your code called `torch\.(enable_grad|autograd\.grad)`"),
    ],
    "adamw": [
        ("weight decay applied to the gradient (L2, as in Adam)",
         edit(('p.mul_(1 - lr * group["weight_decay"])', 'p.grad.add_(p, alpha=group["weight_decay"])')),
         "weight decay is applied to the gradient, AdamW decouples it"),
        ("no bias correction", edit(("m / (1 - beta1 ** t)", "m"), ("v / (1 - beta2 ** t)", "v")),
         "missing bias correction"),
        ("v not bias-corrected", edit(("v / (1 - beta2 ** t)", "v")), "v is not bias-corrected"),
        ("m not bias-corrected", edit(("m / (1 - beta1 ** t)", "m")), "m is not bias-corrected"),
        ("bias correction without the power t", edit(("m / (1 - beta1 ** t)", "m / (1 - beta1)"),
                                                     ("v / (1 - beta2 ** t)", "v / (1 - beta2)")),
         r"^(?!.*persist).*uses the power t.*as if t were 1"),
        ("step count advances twice per step", edit(('state["step"] += 1', 'state["step"] += 2')),
         r"^(?!.*persist).*first step was bias-corrected with t = 2"),
        ("step count advances after the update, starting at 1",
         edit(('state["step"] = 0', 'state["step"] = 1'), ('                state["step"] += 1\n', ''),
              ('p.sub_(lr * m_hat / (v_hat.sqrt() + group["eps"]))',
               'p.sub_(lr * m_hat / (v_hat.sqrt() + group["eps"]))\n                state["step"] += 2')),
         r"^(?!.*persist).*advanced twice per step"),
        ("bias correction with t + 1", edit(("m / (1 - beta1 ** t)", "m / (1 - beta1 ** (t + 1))"),
                                            ("v / (1 - beta2 ** t)", "v / (1 - beta2 ** (t + 1))")),
         r"^(?!.*persist)"),
        ("eps inside the square root", edit(('(v_hat.sqrt() + group["eps"])', '(v_hat + group["eps"]).sqrt()')),
         "eps belongs outside the square root"),
        ("eps missing", edit((' + group["eps"]', "")), "eps is missing"),
        ("weight decay not scaled by lr", edit(('1 - lr * group["weight_decay"]', '1 - group["weight_decay"]')),
         "not scaled by the learning rate"),
        ("no weight decay", edit(('p.mul_(1 - lr * group["weight_decay"])', "pass")), "weight decay is missing"),
        ("betas swapped", edit(("(beta1, beta2) = group", "(beta2, beta1) = group")), "betas are swapped"),
        ("moments reset at every step", edit(("if not state:", "if True:")), "persist between calls"),
        ("decays parameters without a gradient",
         edit(('                p.mul_(1 - lr * group["weight_decay"])  # decoupled: shrink the weight, not the '
               'gradient\n', ''),
              ('                if p.grad is None:', '                p.mul_(1 - lr * group["weight_decay"])\n'
                                                   '                if p.grad is None:')),
         "not even weight decay touches them"),
        ("does not skip .grad None", edit(("if p.grad is None:", "if False:")), "skip parameters whose .grad"),
        ("update goes up the gradient", edit(("p.sub_(lr * m_hat", "p.add_(lr * m_hat")),
         "goes up the gradient"),
        ("plain SGD step", edit(('p.sub_(lr * m_hat / (v_hat.sqrt() + group["eps"]))', "p.sub_(lr * p.grad)")),
         "plain SGD"),
        ("rebinds p instead of updating in place",
         edit(('p.sub_(lr * m_hat / (v_hat.sqrt() + group["eps"]))',
               'p = p - lr * m_hat / (v_hat.sqrt() + group["eps"])')),
         "did not change the parameters"),
        ("weight decay after the update",
         edit(('                p.mul_(1 - lr * group["weight_decay"])  # decoupled: shrink the weight, not the '
               'gradient\n', ''),
              ('p.sub_(lr * m_hat / (v_hat.sqrt() + group["eps"]))',
               'p.sub_(lr * m_hat / (v_hat.sqrt() + group["eps"]))\n'
               '                p.mul_(1 - lr * group["weight_decay"])')),
         "apply weight decay before the Adam update"),
        ("lr of the first group for every group", edit(('lr, (beta1, beta2) = group["lr"]',
                                                        'lr, (beta1, beta2) = self.param_groups[0]["lr"]')),
         "each param group has its own lr"),
        ("hyperparameters fixed, not read from the group",
         edit(('group["betas"]', "(0.9, 0.999)"), ('group["eps"]', "1e-8")),
         "use the hyperparameters of the param group"),
        ("state kept outside self.state",
         edit(("state = self.state[p]", 'state = self.__dict__.setdefault("moments", {}).setdefault(p, {})')),
         "rebuilt from state_dict"),
        ("step count kept per param group",
         edit(('lr, (beta1, beta2) = group["lr"], group["betas"]',
               'lr, (beta1, beta2) = group["lr"], group["betas"]\n            group["t"] = group.get("t", 0) + 1'),
              ('t, m, v = state["step"], state["m"], state["v"]', 't, m, v = group["t"], state["m"], state["v"]')),
         "count steps per parameter"),
        ("betas and eps read from self.defaults",
         edit(('group["lr"], group["betas"]', 'group["lr"], self.defaults["betas"]'),
              ('(v_hat.sqrt() + group["eps"])', '(v_hat.sqrt() + self.defaults["eps"])')),
         r"not from self.defaults"),
        ("p.grad.pow_(2) leaves the gradient squared",
         edit(("v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)",
               "v.mul_(beta2).add_(p.grad.pow_(2), alpha=1 - beta2)")),
         r"step\(\) changed p.grad"),
        ("one step counter shared by all parameters",
         edit(('state["step"] += 1\n                t, m, v = state["step"], state["m"], state["v"]',
               'self.t = getattr(self, "t", 0) + 1\n                t, m, v = self.t, state["m"], state["v"]')),
         "the first step of parameter 0 is right but that of parameter 1 is not"),
    ],
    "clip-grad-norm": [
        ("the 2-norm whatever norm_type is (lesson 4's)", edit(("norm_type = float(norm_type)", "norm_type = 2.0")),
         r"norm_type=1, but yours is the 2-norm"),
        ("norm_type=inf through the power formula", edit(("if norm_type == math.inf:", "if False:")),
         r"norm_type=inf is the largest \|g\|.*g.abs\(\).max\(\)"),
        ("no absolute value", edit(("g.abs().pow(norm_type)", "g.pow(norm_type)")), r"sums \|g\|\^p, with the absolute value"),
        ("sum of the per-parameter norms", edit(("total_norm = norms.pow(norm_type).sum().pow(1 / norm_type)",
                                                "total_norm = norms.sum()")), "not their sum"),
        ("per-parameter norms combined as a 2-norm", edit(("norms.pow(norm_type).sum().pow(1 / norm_type)",
                                                          "norms.pow(2).sum().sqrt()")),
         "combine the per-parameter norms with the same norm_type"),
        ("no p-th root", edit(("total_norm = norms.pow(norm_type).sum().pow(1 / norm_type)",
                               "total_norm = norms.pow(norm_type).sum()")), r"you returned the sum of \|g\|\^p"),
        ("norm per parameter, each clipped on its own",
         edit(("    scale = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)", "    norms = [g.norm() for g in grads]"),
              ("    for g in grads:\n        g.mul_(scale)", "    for g, n in zip(grads, norms):\n"
                                                           "        g.mul_(torch.clamp(max_norm / (n + 1e-6), max=1.0))")),
         "norm computed per parameter, not globally"),
        ("coefficient not clamped at 1", edit(("torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)",
                                               "max_norm / (total_norm + 1e-6)")), "clipping even though the norm"),
        ("returns the norm after clipping", edit(("    return total_norm", "    return total_norm * scale")),
         "return the norm before clipping"),
        ("no eps in the scale", edit(("max_norm / (total_norm + 1e-6)", "max_norm / total_norm")), "with the 1e-6"),
        ("not in place", edit(("g.mul_(scale)", "g = g * scale")), "scale them in place"),
        ("rebinds p.grad to a new tensor",
         edit(("    grads = [p.grad for p in parameters if p.grad is not None]",
               "    params = [p for p in parameters if p.grad is not None]\n    grads = [p.grad for p in params]"),
              ("    for g in grads:\n        g.mul_(scale)", "    for p in params:\n        p.grad = p.grad * scale")),
         r"the values are right but parameter 0's .grad is a new tensor.*Clip in place, p.grad.mul_\(scale\)"),
        ("does not skip .grad None", edit(("if p.grad is not None]", "]")), "skip parameters whose .grad is None"),
        ("no gradients at all", edit(("    if not grads:\n        return torch.tensor(0.0)\n", "")),
         r"parameters none of which has a gradient.*Hint: with no gradients at all, return torch.tensor\(0.0\)"),
        ("returns a float", edit(("    return total_norm", "    return total_norm.item()")), "0-dim tensor"),
        ("error_if_nonfinite ignored", edit(("if error_if_nonfinite and not torch.isfinite(total_norm):", "if False:")),
         "with error_if_nonfinite=True and a norm that is not finite, raise a RuntimeError"),
        ("raises on a non-finite norm without error_if_nonfinite",
         edit(("if error_if_nonfinite and not torch.isfinite(total_norm):", "if not torch.isfinite(total_norm):")),
         "with error_if_nonfinite=False a non-finite norm is no error"),
        ("raises a ValueError", edit(("raise RuntimeError(", "raise ValueError(")), "raise a RuntimeError.*not a ValueError"),
        ("raises after clipping",
         edit(("    if error_if_nonfinite and not torch.isfinite(total_norm):\n", ""),
              ('        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is {total_norm.item()}: "\n'
               '                           f"not finite, so it cannot be clipped")\n', ""),
              ("    return total_norm", "    if error_if_nonfinite and not torch.isfinite(total_norm):\n"
                                      "        raise RuntimeError('not finite')\n    return total_norm")),
         "raise before clipping"),
        ("calls torch.nn.utils.clip_grad_norm_",
         edit(("    grads = [", "    return torch.nn.utils.clip_grad_norm_(parameters, max_norm)\n    grads = [")),
         "refused: your code called `torch.nn.utils.clip_grad"),
        # skips grad-less parameters; its None is its own: the message must not tell it to skip them
        ("a None accumulator of its own",
         edit(("        norms = torch.stack(", "        total = None\n        for g in grads:\n"
                                              "            total = total + g.abs().sum()\n        norms = torch.stack(")),
         r"^(?!.*skip parameters).*raised TypeError.*NoneType.*at line"),
    ],
    "cosine-schedule": [
        ("warmup off by one", edit(("max_lr * step / warmup_steps", "max_lr * (step + 1) / warmup_steps")),
         "warmup is off by one: expected lr 0 at step 0"),
        ("decay starts at step 0", edit(("(step - warmup_steps) / (total_steps - warmup_steps)", "step / total_steps")),
         "the decay must start at warmup_steps"),
        ("no clamp past total_steps", edit(("    if step >= total_steps:\n        by_steps = min_lr\n    elif step <",
                                            "    if step <")),
         "past total_steps the LR stays at min_lr"),
        ("divides by zero without warmup", edit(("elif step < warmup_steps:", "elif step <= warmup_steps:")),
         "with warmup_steps=0 there is no warmup"),
        ("decays to 0, not min_lr", edit(("by_steps = min_lr + (max_lr - min_lr) * 0.5", "by_steps = max_lr * 0.5")),
         "the decay ends at 0 instead of min_lr"),
        ("1 - cos: wrong from warmup_steps on", edit(("(1 + math.cos(math.pi * progress))", "(1 - math.cos(math.pi * progress))")),
         "wrong LR from step warmup_steps on"),
        ("returns a tensor (torch.cos)", edit(("math.cos(math.pi * used)",
                                               "__import__('torch').cos(__import__('torch').tensor(math.pi * used))")),
         "return a plain float"),
        ("the budget ignored (lesson 3's schedule)", edit(("return min(by_steps, by_time)", "return by_steps")),
         "budget_used is ignored"),
        ("the budget alone", edit(("return min(by_steps, by_time)", "return by_time")),
         "you followed the time budget alone"),
        ("the higher of the two curves", edit(("return min(by_steps, by_time)", "return max(by_steps, by_time)")),
         r"take the lower of the two curves \(min\), not the higher"),
        ("budget_used not clamped at 1", edit(("used = min(budget_used, 1.0)", "used = budget_used")),
         r"budget_used can pass 1.*clamp it, min\(budget_used, 1\)"),
        ("the time curve decays to 0", edit(("by_time = min_lr + (max_lr - min_lr) * 0.5", "by_time = max_lr * 0.5")),
         "the curve over the budget ends at 0 instead of min_lr"),
        ("the time curve is linear", edit(("0.5 * (1 + math.cos(math.pi * used))", "(1 - used)")),
         "wrong LR once part of the budget is used"),
    ],
    "wsd-schedule": [
        ("warmup off by one", edit(("max_lr * step / warmup_steps", "max_lr * (step + 1) / warmup_steps")),
         "warmup is off by one: expected lr 0 at step 0"),
        ("divides by zero without warmup", edit(("if step < warmup_steps:", "if step <= warmup_steps:")),
         "with warmup_steps=0 there is no warmup"),
        ("no clamp past total_steps", edit(("    if step >= total_steps:  # first: with cooldown_steps = 0 the formula "
                                            "below would divide by 0\n        return min_lr\n", "")),
         "past total_steps the LR stays at min_lr"),
        ("a linear cooldown", edit(("(1 - math.sqrt(progress))", "(1 - progress)")), "the cooldown is linear"),
        ("sqrt(1 - progress)", edit(("(1 - math.sqrt(progress))", "math.sqrt(1 - progress)")),
         r"sqrt\(1 - progress\) is not 1 - sqrt\(progress\)"),
        ("no stable phase: the cooldown starts after the warmup",
         edit(("    if step < cooldown_start:\n        return max_lr\n", ""),
              ("(step - cooldown_start) / cooldown_steps", "(step - warmup_steps) / (total_steps - warmup_steps)")),
         "there is no stable phase"),
        ("cooldown ends at 0, not min_lr", edit(("min_lr + (max_lr - min_lr) * (1", "max_lr * (1")),
         "the cooldown ends at 0 instead of min_lr"),
        ("cooldown off by one", edit(("(step - cooldown_start) / cooldown_steps", "(step - cooldown_start + 1) / cooldown_steps")),
         "the cooldown is off by one"),
        ("cooldown progress over the whole run", edit(("/ cooldown_steps  #", "/ total_steps  #")),
         "wrong LR during the cooldown"),
        ("returns a tensor (torch.sqrt)", edit(("math.sqrt(progress)", "__import__('torch').tensor(progress).sqrt()")),
         "return a plain float"),
    ],
    "lr-finder": [
        ("linear sweep, not exponential", edit(("start_lr * growth ** (i / (num_steps - 1))",
                                                "start_lr + (end_lr - start_lr) * i / (num_steps - 1)")),
         "the sweep must be exponential, not linear"),
        ("sweep off by one", edit(("i / (num_steps - 1)", "i / num_steps")), "the sweep is off by one"),
        ("NaN not detected", edit(("not math.isfinite(loss) or loss", "loss")),
         "the loss became NaN and you kept going"),
        ("never stops", edit(("            break\n", "            pass\n")), "you kept training after the loss diverged"),
        ("suggests the LR at the minimum itself", edit(("lrs[lowest] / 10", "lrs[lowest]")), "suggest one tenth"),
        ("stops before recording the diverged loss",
         edit(("        lrs.append(lr)\n        losses.append(loss)\n", ""),
              ("        best = min(best, loss)", "        lrs.append(lr)\n        losses.append(loss)\n"
                                                  "        best = min(best, loss)")),
         "lrs must list the learning rates you trained with"),
        ("compares with the first loss, not the lowest",
         edit(("best = min(best, loss)", "best = min(best, losses[0])")), "kept training after the loss diverged"),
        ("suggested LR at the highest LR before divergence", edit(("lrs[lowest] / 10", "lrs[-2] / 10")),
         "suggested_lr should be"),
        ("stops at the first rise", edit(("loss > diverge_factor * best", "loss > best")), "stopped too early"),
        ("suggested LR as a string", edit(("return lrs, losses, lrs[lowest] / 10",
                                                           "return lrs, losses, str(lrs[lowest] / 10)")),
         "suggested_lr must be a float"),
        ("divergence tested against the previous loss", edit(("best = min(best, loss)", "best = loss")),
         "compare with the lowest loss so far, not the previous one"),
        ("suggestion skips the last loss", edit(("for i in range(len(losses)) if", "for i in range(len(losses) - 1) if")),
         "the lowest loss can be the last one recorded"),
        ("no divergence test in the first steps",
         edit(("if not math.isfinite(loss) or loss > diverge_factor * best:",
               "if i > 2 and (not math.isfinite(loss) or loss > diverge_factor * best):")),
         "test for divergence from the first step on"),
    ],
    "early-stopping": [
        ("does not restore the best weights", edit(("        model.load_state_dict(best_weights)", "        pass")),
         "ends with the weights of the last step"),
        ("keeps state_dict() without copying", edit(("copy.deepcopy(model.state_dict())", "model.state_dict()")),
         "Keep a real copy of the best weights"),
        ("<= counts an equal loss as improvement", edit(("val_loss < best_val_loss", "val_loss <= best_val_loss")),
         "an equal val loss is not an improvement"),
        ("patience off by one (late)", edit(("evals_without_improvement == patience",
                                             "evals_without_improvement > patience")),
         "patience is off by one: you stopped one evaluation late"),
        ("patience off by one (early)", edit(("evals_without_improvement == patience",
                                              "evals_without_improvement >= patience - 1")),
         "patience is off by one: you stopped one evaluation early"),
        ("counter never reset", edit(("best_step, best_val_loss, evals_without_improvement = step, val_loss, 0",
                                      "best_step, best_val_loss = step, val_loss")),
         "reset the count of evaluations without improvement"),
        ("loop from step 0", edit(("range(1, max_steps + 1)", "range(max_steps)")),
         "evaluate after every eval_every"),
        ("evaluates before training", edit(("        train_step()\n        if step % eval_every != 0:\n"
                                            "            continue\n",
                                            "        if (step - 1) % eval_every != 0:\n            train_step()\n"
                                            "            continue\n        train_step()\n")),
         "evaluated before training|evaluate after every"),
        ("never stops early", edit(("                break\n", "                pass\n")),
         "training never stopped early"),
        ("returns the last val loss", edit(("return best_step, best_val_loss, history",
                                            "return best_step, val_loss, history")),
         "best_step, best_val_loss should be"),
        ("history of losses only", edit(("history.append((step, val_loss))", "history.append(val_loss)")),
         "history must be a list of \\(step, val_loss\\) pairs"),
        ("best weights restored only when stopping early",
         edit(("    if best_weights is not None:\n        model.load_state_dict(best_weights)\n", ""),
              ("            if evals_without_improvement == patience:\n                break",
               "            if evals_without_improvement == patience:\n"
               "                model.load_state_dict(best_weights)\n                break")),
         "Restore them also when training runs to max_steps"),
        ("patience reset by a loss below the previous evaluation",
         edit(("        else:\n            evals_without_improvement += 1\n",
               "        elif len(history) > 1 and val_loss < history[-2][1]:\n"
               "            evals_without_improvement = 0\n        else:\n            evals_without_improvement += 1\n")),
         "one below the previous evaluation but above the best does not reset the count"),
        ("an invented min_delta=0.01", edit(("val_loss < best_val_loss", "val_loss < best_val_loss - 0.01")),
         "however small"),
        ("stops training at the last multiple of eval_every",
         edit(("range(1, max_steps + 1)", "range(1, max_steps // eval_every * eval_every + 1)")),
         r"train for all max_steps=47 steps: after the last evaluation \(step 40\) the remaining 7 steps"),
        ("an extra evaluation at max_steps",
         edit(("if step % eval_every != 0:", "if step % eval_every != 0 and step != max_steps:")),
         r"you evaluated at step max_steps=47 as well"),
        ("best val loss started at a finite constant", edit(("0, math.inf, None", "0, 5.0, None")),
         r"start the best val loss at math.inf"),
        ("best val loss started at a large finite constant", edit(("0, math.inf, None", "0, 10.0, None")),
         r"start the best val loss at math.inf"),
        # uses `<` as asked: the message must not tell it to (it did not use `<=`)
        ("an equal loss neither improves nor counts",
         edit(("        else:\n            evals_without_improvement += 1\n",
               "        elif val_loss == best_val_loss:\n            pass\n"
               "        else:\n            evals_without_improvement += 1\n")),
         r"^(?!.*`<=`).*counts as an evaluation without improvement"),
    ],
    "label-smoothing": [
        ("eps spread over the V - 1 other tokens",
         edit(("uniform = -log_p.mean(dim=-1)", "uniform = (-log_p.sum(dim=-1) - nll) / (log_p.shape[-1] - 1)")),
         "Yours spreads it over the V - 1 other tokens"),
        ("divided by every position, padding included",
         edit(("label_smoothing * uniform).mean()", "label_smoothing * uniform).sum() / len(keep)")),
         "divide the sum by the number of targets != ignore_index"),
        ("ignore_index hard-coded to -100", edit(("keep = targets != ignore_index", "keep = targets != -100")),
         "use the ignore_index argument"),
        ("smoothing weights swapped", edit(("(1 - label_smoothing) * nll + label_smoothing * uniform",
                                            "label_smoothing * nll + (1 - label_smoothing) * uniform")),
         "the weights are swapped"),
        ("target term not scaled by 1 - eps", edit(("(1 - label_smoothing) * nll", "nll")), "yours weighs it 1"),
        ("uniform term subtracted", edit(("+ label_smoothing * uniform", "- label_smoothing * uniform")),
         "yours subtracts it"),
        ("padded positions not dropped", edit(("z, t = logits[keep], targets[keep]", "z, t = logits, targets")),
         r"drop those positions \(keep = targets != ignore_index\)"),
        ("log of softmax", edit(("log_p = z - (m + (z - m).exp().sum(dim=-1, keepdim=True).log())",
                                 "log_p = z.softmax(dim=-1).log()")), r"never log\(softmax\(z\)\)"),
        ("returns a float", edit((".mean()", ".mean().item()")), "return a torch.Tensor"),
        ("sums instead of averaging", edit(("label_smoothing * uniform).mean()", "label_smoothing * uniform).sum()")),
         "not the sum"),
        ("calls F.cross_entropy", edit(("    logits, targets = logits.reshape",
                                        "    return torch.nn.functional.cross_entropy(logits.reshape(-1, "
                                        "logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index, "
                                        "label_smoothing=label_smoothing)\n    logits, targets = logits.reshape")),
         "refused: your code called `torch.nn.functional.cross_entropy`"),
    ],
    "grad-accumulation": [
        ("lesson 4's rule: each micro-batch's mean divided by their number",
         edit(("(token_losses / total).backward()",
               "(token_losses / int((y != ignore_index).sum()) / len(micro_batches)).backward()")),
         r"weighs every micro-batch equally, but they hold 12, 5, 20 tokens"),
        ("gradients not cleared first", edit(("    model.zero_grad(set_to_none=True)\n", "")),
         "clear the gradients first"),
        ("gradients cleared inside the loop", edit(("    model.zero_grad(set_to_none=True)\n", ""),
                                                   ("        logits = model(x)\n",
                                                    "        model.zero_grad()\n        logits = model(x)\n")),
         "zero the gradients once, before the loop"),
        ("summed, never divided", edit(("(token_losses / total).backward()", "token_losses.backward()")),
         "yours is the gradient of the summed token losses"),
        ("padding counted in the denominator",
         edit(("total = sum(int((y != ignore_index).sum()) for _, y in micro_batches)",
               "total = sum(y.numel() for _, y in micro_batches)")),
         r"count only the targets != ignore_index: yours divides by every position"),
        ("mean times count: nan for a micro-batch of padding only",
         edit(("ignore_index=ignore_index, reduction=\"sum\")",
               "ignore_index=ignore_index) * int((y != ignore_index).sum())")),
         "its mean loss is 0/0 = nan"),
        ("one backward() after the loop",
         edit(("    loss_sum = 0.0\n", "    loss_sum, pending = 0.0, 0\n"),
              ("        (token_losses / total).backward()", "        pending = pending + token_losses / total"),
              ("    return loss_sum / total", "    pending.backward()\n    return loss_sum / total")),
         r"call backward\(\) once per micro-batch"),
        ("a generator read twice", edit(("    micro_batches = list(micro_batches)", "    pass")),
         r"micro_batches may be a generator"),
        ("returns the last micro-batch's loss",
         edit(("    return loss_sum / total", "    return token_losses.item() / int((y != ignore_index).sum())")),
         "you returned the last micro-batch's loss"),
        ("one forward on the concatenated batch",
         edit(("    for x, y in micro_batches:\n        logits = model(x)",
               "    x = torch.cat([x for x, _ in micro_batches])\n    y = torch.cat([y for _, y in micro_batches])\n"
               "    for _ in [0]:\n        logits = model(x)")),
         "run the model on each micro-batch, once and in order"),
    ],
    "loss-scaler": [
        ("isinf instead of isfinite (misses nan)",
         edit(("if all(torch.isfinite(g).all() for g in grads):", "if not any(torch.isinf(g).any() for g in grads):")),
         "a nan gradient is an overflow too"),
        ("only the first gradient checked", edit(("torch.isfinite(g).all() for g in grads)",
                                                  "torch.isfinite(g).all() for g in grads[:1])")),
         "check every parameter's gradient"),
        ("steps on an overflow", edit(("        self._scale *= self.backoff_factor\n",
                                       "        optimizer.step()\n        self._scale *= self.backoff_factor\n")),
         "an overflowed gradient reached the optimizer"),
        ("no backoff", edit(("        self._scale *= self.backoff_factor\n", "")), "multiply the scale by backoff_factor"),
        ("count not restarted by an overflow", edit(("        self._good_steps = 0\n        return False",
                                                     "        return False")),
         r"the scale grows after growth_interval good steps \*in a row\*"),
        ("grows one step late", edit(("self._good_steps == self.growth_interval", "self._good_steps > self.growth_interval")),
         "the scale grows one step late"),
        ("grows one step early", edit(("self._good_steps == self.growth_interval",
                                       "self._good_steps == self.growth_interval - 1")),
         "the scale grows one step early"),
        ("gradients not unscaled", edit(("        for g in grads:\n            g.mul_(1.0 / self._scale)\n", "")),
         "unscale the gradients before the optimizer steps"),
        ("factors hard-coded", edit(("self._scale *= self.growth_factor", "self._scale *= 2.0"),
                                    ("self._scale *= self.backoff_factor", "self._scale *= 0.5")),
         r"GradScaler decides differently at step 3 \(other factors"),
        ("None gradients not skipped", edit((' for p in group["params"] if p.grad is not None]',
                                             ' for p in group["params"]]')),
         "skip parameters whose .grad is None"),
        ("calls torch.amp.GradScaler", edit(("        self._scale = float(init_scale)\n",
                                             "        self._scale = float(init_scale)\n"
                                             "        torch.amp.GradScaler('cpu')\n")),
         "refused: your code called `torch.amp.GradScaler"),
    ],
    "resume": [
        ("optimizer state not restored",
         edit(("        optimizer.load_state_dict(checkpoint[\"optimizer\"])  # AdamW's m, v, step counts and the "
               "groups' lr\n", "")),
         r"does not restore the optimizer's state \(optimizer.state_dict\(\)"),
        ("scheduler not restored", edit(("        scheduler.load_state_dict(checkpoint[\"scheduler\"])\n", "")),
         r"does not restore the LR scheduler's position"),
        ("data generator not restored", edit(("        generator.set_state(checkpoint[\"generator\"])\n", "")),
         r"does not restore the data generator's state"),
        ("global RNG not restored (dropout masks differ)",
         edit(("        torch.set_rng_state(checkpoint[\"torch_rng\"])\n", "")),
         r"does not restore the global torch RNG state"),
        ("weights not restored", edit(("        model.load_state_dict(checkpoint[\"model\"])\n", "")),
         r"does not restore the model's weights"),
        ("only the model and the optimizer",
         edit(("        scheduler.load_state_dict(checkpoint[\"scheduler\"])\n", ""),
              ("        generator.set_state(checkpoint[\"generator\"])\n", ""),
              ("        torch.set_rng_state(checkpoint[\"torch_rng\"])\n", "")),
         r"does not restore the LR scheduler's position.*; the data generator's state.*; the global torch RNG"),
        ("the RNG reseeded with the step instead of restored",
         edit(("        torch.set_rng_state(checkpoint[\"torch_rng\"])\n",
               "        torch.manual_seed(checkpoint[\"step\"])\n")),
         r"does not restore the global torch RNG state"),
        ("returns the next step", edit(("        return checkpoint[\"step\"]", "        return checkpoint[\"step\"] + 1")),
         r"load must return the step saved \(3"),
        ("calls training.load_checkpoint",
         edit(("        checkpoint = torch.load(path, weights_only=True)\n",
               "        checkpoint = torch.load(path, weights_only=True)\n"
               "        __import__('training').load_checkpoint(path, model)\n")),
         r"refused: your code called `training.load_checkpoint|raised"),
    ],
    "muon": [
        ("no Nesterov look-ahead", edit(('update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf',
                                         "update = buf")), "with nesterov=True the update is the Nesterov look-ahead"),
        ("nesterov=False ignored", edit(('update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf',
                                         "update = p.grad.lerp(buf, momentum)")),
         "with nesterov=False the update is the momentum buffer itself"),
        ("no shape adjustment of the lr", edit(("alpha=-lr * math.sqrt(max(1, rows / cols))", "alpha=-lr")),
         "Yours used lr unscaled"),
        ("shape ratio inverted", edit(("max(1, rows / cols)", "max(1, cols / rows)")), "rows / cols, not cols / rows"),
        ("weight decay through the gradient",
         edit(('                buf.lerp_(p.grad, 1 - momentum)\n',
               '                grad = p.grad + group["weight_decay"] * p\n'
               '                buf.lerp_(grad, 1 - momentum)\n'),
              ('update = p.grad.lerp(buf, momentum)', 'update = grad.lerp(buf, momentum)'),
              ('                p.mul_(1 - lr * group["weight_decay"])  # decoupled, with the unadjusted lr\n', '')),
         "weight decay is decoupled"),
        ("weight decay after the update",
         edit(('                p.mul_(1 - lr * group["weight_decay"])  # decoupled, with the unadjusted lr\n', ''),
              ("alpha=-lr * math.sqrt(max(1, rows / cols)))",
               'alpha=-lr * math.sqrt(max(1, rows / cols)))\n                p.mul_(1 - lr * group["weight_decay"])')),
         "apply weight decay before the update"),
        ("momentum buffer reset every step", edit(('if "momentum_buffer" not in state:', "if True:")),
         "the buffer must persist between calls"),
        ("Newton-Schulz in bfloat16, as torch does", edit(("x = m.float()", "x = m.bfloat16()"),
                                                          ("return x.T if tall else x", "return (x.T if tall else x).float()")),
         "run Newton-Schulz in float32 here"),
        ("three Newton-Schulz steps", edit(("def newton_schulz(m, steps=5,", "def newton_schulz(m, steps=3,")),
         "use 5 Newton-Schulz steps, yours ran 3"),
        ("lr of the first group everywhere", edit(('lr, momentum = group["lr"], group["momentum"]',
                                                   'lr, momentum = self.param_groups[0]["lr"], group["momentum"]')),
         r"differs from torch.optim.Muon's \(scenario: two param groups"),
        ("update added, not subtracted", edit(("alpha=-lr * math.sqrt", "alpha=lr * math.sqrt")),
         "the update goes the wrong way"),
        ("calls torch.optim.Muon", edit(('                p.add_(newton_schulz(update)',
                                         '                torch.optim.Muon([p])\n                p.add_(newton_schulz(update)')),
         "refused: your code called `torch.optim.Muon"),
    ],
    # each mutant forks two gloo processes: ~0.15 s, the deadlock ~2.1 s (the check's STRAGGLER_S)
    "gradient-all-reduce": [
        ("lesson 7's rule: the ranks' sum divided by the world size",
         edit(("        p.grad.mul_(local_tokens)  # this rank's mean -> the sum over its own tokens\n", ""),
              ("p.grad.div_(total)", "p.grad.div_(dist.get_world_size())")),
         r"dividing by the world size weighs every rank equally, but the ranks hold 5 and 20 tokens"),
        ("summed, never divided",
         edit(("        p.grad.mul_(local_tokens)  # this rank's mean -> the sum over its own tokens\n", ""),
              ("        p.grad.div_(total)  # the mean over the tokens of all ranks", "")),
         "summed by the all-reduce and never divided"),
        ("the token count not all-reduced", edit(("    dist.all_reduce(total)  # the kept tokens of all ranks together\n",
                                                  "")),
         r"each rank divided by its own token count \(5 and 20\) instead of that of all ranks \(25\).*all_reduce the "
         r"token count too"),
        ("means summed without weighing them by their tokens",
         edit(("        p.grad.mul_(local_tokens)  # this rank's mean -> the sum over its own tokens\n", "")),
         r"multiply it by local_tokens \(back to the sum over its tokens\) before the all-reduce"),
        ("only rank 0 all-reduces the gradients",
         edit(("        dist.all_reduce(p.grad)", "        if dist.get_rank() == 0:\n            dist.all_reduce(p.grad)")),
         r"^deadlock: rank 0 was still inside sync_gradients 2 s after rank 1 had returned from it, waiting \(at line "
         r"\d+: `dist.all_reduce\(p.grad\)"),
        ("the weights all-reduced instead of the gradients", edit(("dist.all_reduce(p.grad)", "dist.all_reduce(p.data)")),
         r"changed the weights \(embed.weight on rank 0.*All-reduce p.grad, not p or p.data"),
        ("stops at the first parameter without a gradient", edit(("continue", "break")),
         r"head.weight and head.bias still hold each rank's own gradient"),
        ("does not skip .grad None", edit(("if p.grad is None:", "if False:")), "skip parameters whose .grad is None"),
        ("ReduceOp.AVG on top of the division by all tokens",
         edit(("dist.all_reduce(p.grad)", "dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)")), "ReduceOp"),
        ("wraps the model in DistributedDataParallel",
         edit(("    total = torch.tensor(local_tokens)\n",
               "    model = torch.nn.parallel.DistributedDataParallel(model)\n    total = torch.tensor(local_tokens)\n")),
         "^refused: your code called `torch.nn.parallel.DistributedDataParallel`"),
    ],
}

MUTANTS["training-loop"] = [
    ("torch.optim.AdamW instead of the learner's", edit(("    optimizer = AdamW([", "    optimizer = torch.optim.AdamW(["),),
     "refused: your code called `torch.optim.AdamW`"),
    ("F.cross_entropy instead of the learner's",
     edit(("loss = cross_entropy(model(x), y)",
           "loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())"),),
     "refused: your code called `torch.nn.functional.cross_entropy`"),
    ("forgets zero_grad", edit(("        optimizer.zero_grad(set_to_none=True)\n", ""),),
     r"gradients of earlier updates were still in \.grad"),
    ("never clips", edit(("        grad_norm = clip_grad_norm(model.parameters(), max_norm)\n",
                          "        grad_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))\n"),),
     "a loop that does not clip"),
    ("resume without the optimizer's state (not bit for bit)",
     edit(('        optimizer.load_state_dict(checkpoint["optimizer"])\n', ""),),
     "restore the optimizer's state too"),
    ("resume without the model's weights", edit(('        model.load_state_dict(checkpoint["model"])\n', ""),),
     "the model's weights were not restored"),
    ("resume forgets the earlier history", edit(('history, start = checkpoint["history"], checkpoint["step"] + 1',
                                                  'start = checkpoint["step"] + 1'),),
     "return the whole run's history"),
    ("weight decay on every parameter", edit(('{"params": vectors, "weight_decay": 0.0}',
                                               '{"params": vectors, "weight_decay": weight_decay}'),),
     "weight decay went to every parameter"),
    ("lr logged but never set", edit(('            group["lr"] = lr\n', '            pass\n'),),
     "set group\\['lr'\\] = lr"),
    ("warmup off by one", edit(("lr = cosine_lr(step, ", "lr = cosine_lr(step - 1, "),), "the learning rate of update 1"),
    ("evaluates only at the end", edit(("if step % eval_every == 0 or step == steps:", "if step == steps:"),),
     r"call evaluate\(model\) once after updates \[3, 6\]"),
]

MUTANT_CASES = [pytest.param(slug, edits, message, id=f"{slug}: {name}")
                for slug, mutants in MUTANTS.items() for name, edits, message in mutants]


def mutate(source, edits):
    for old, new in edits:
        assert source.count(old) == 1, f"the mutant's edit no longer applies to the solution: {old!r}"
        source = source.replace(old, new)
    return source


@pytest.mark.parametrize("slug, edits, message", MUTANT_CASES)
def test_mutant_is_rejected(slug, edits, message):
    answer = mutate(notebook_cells("solutions", slug)[1], edits)
    candidate = load(slug, answer)
    with pytest.raises(ExerciseFailed) as failure:
        check(slug)(candidate)
    if message is not None:
        assert re.search(message, str(failure.value)), str(failure.value)


def test_every_exercise_has_several_mutants():
    assert set(MUTANTS) == set(EXERCISE)
    assert all(len(mutants) >= 5 for mutants in MUTANTS.values())


# ----------------------------------------------------------------------------------------
# Candidates that raise, return nonsense or never return
# ----------------------------------------------------------------------------------------

def function_returning(forward):
    """A torch.autograd.Function whose forward is `forward(logits, targets)`, for exercise 1's check."""
    class CrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, logits, targets):
            return forward(logits, targets)

        @staticmethod
        def backward(ctx, grad_output):
            return None, None
    return CrossEntropy


def test_a_candidate_that_raises_gets_the_error_and_its_line():
    def forward(logits, targets):
        return logits.sum() / 0 + undefined_name  # noqa: F821

    with pytest.raises(ExerciseFailed, match=r"CrossEntropy.apply raised NameError: .*undefined_name.*at line"):
        checks.check_cross_entropy(function_returning(forward))


@pytest.mark.parametrize("returned, message", [
    (None, "return a torch.Tensor"), ("2.3", "return a torch.Tensor"),
    (torch.zeros(2, 3), "return a 0-dim tensor"), (torch.tensor(1), "floating-point"),
])
def test_a_candidate_with_the_wrong_return_type_or_shape(returned, message):
    with pytest.raises(ExerciseFailed, match=message):
        checks.check_cross_entropy(function_returning(lambda logits, targets: returned))


def test_a_function_is_not_an_autograd_function():
    with pytest.raises(ExerciseFailed, match="write CrossEntropy as a torch.autograd.Function subclass"):
        checks.check_cross_entropy(lambda logits, targets: logits.sum())


@pytest.mark.parametrize("check_name, candidate", [
    ("check_cosine_schedule", lambda step, *args: [step]),
    ("check_lr_finder", lambda train_step, **settings: None),
    ("check_early_stopping", lambda model, train_step, evaluate, **settings: 3),
    ("check_clip_grad_norm", lambda parameters, max_norm: "norm"),
])
def test_wrong_return_types_of_the_other_exercises(check_name, candidate):
    with pytest.raises(ExerciseFailed, match="return|must be"):
        getattr(checks, check_name)(candidate)


def test_adamw_must_be_an_optimizer_class_written_by_the_learner():
    with pytest.raises(ExerciseFailed, match="pass the class itself"):
        checks.check_adamw(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]))
    with pytest.raises(ExerciseFailed, match="write step\\(\\) yourself"):
        checks.check_adamw(torch.optim.AdamW)


def test_passing_a_call_instead_of_the_function_is_explained():
    with pytest.raises(ExerciseFailed, match="pass your function itself"):
        checks.check_wsd_schedule(0.001)


@pytest.mark.parametrize("check_name, candidate", [
    ("check_cosine_schedule", "def cosine_lr(step, *args):\n    while True:\n        pass"),
    ("check_lr_finder", "def lr_finder(train_step, **settings):\n    while True:\n        try:\n"
                        "            train_step(1e-3)\n        except Exception:\n            pass"),
    ("check_early_stopping", "def train(model, train_step, evaluate, **settings):\n    import time\n"
                             "    time.sleep(60)"),
    # stopped by the time limit inside each of the check's two processes
    ("check_gradient_all_reduce", "def sync_gradients(model, local_tokens):\n    while True:\n        pass"),
])
def test_a_candidate_that_never_returns_is_stopped(monkeypatch, check_name, candidate):
    monkeypatch.setattr(checks, "TIME_LIMIT_S", 0.3)
    namespace = {}
    exec(candidate, namespace)
    function = next(value for name, value in namespace.items() if not name.startswith("__"))
    with pytest.raises(ExerciseFailed, match=r"did not finish within 0.3 s.*infinite loop"):
        getattr(checks, check_name)(function)


def test_check_messages_never_show_reference_code():
    """A wrong answer's message names the mistake; it must not paste the reference source."""
    wrong = load("lr-finder", mutate(notebook_cells("solutions", "lr-finder")[1], [("lrs[lowest] / 10", "1.0")]))
    with pytest.raises(ExerciseFailed) as failure:
        checks.check_lr_finder(wrong)
    assert "def " not in str(failure.value) and "for i in range" not in str(failure.value)


# ----------------------------------------------------------------------------------------
# Answers that call what the exercise rebuilds, past the grader's reading of the source
# ----------------------------------------------------------------------------------------

ADAMW_HEAD = """\
class AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
"""

CE_CLASS = """\
class CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets):
{forward}

    @staticmethod
    def backward(ctx, grad_output):
{backward}
"""


def cross_entropy_class(forward, backward="return None, None", before=""):
    """An exercise 1 answer: `before` (module-level lines), then the class with these bodies."""
    indent = lambda body: textwrap.indent(body, " " * 8)  # noqa: E731
    return before + CE_CLASS.format(forward=indent(forward), backward=indent(backward))


# (exercise, answer that hides the call from a reading of the source, the function the guard names)
HIDDEN_CALLS = [
    ("cross-entropy", cross_entropy_class("return hidden(logits, targets)", before="import torch.nn.functional as F\n"
                                          "hidden = getattr(F, 'cross_' + 'entropy')\n\n"),
     "torch.nn.functional.cross_entropy"),
    ("cross-entropy", cross_entropy_class("return reference(logits, targets)",
                                          before="from training import cross_entropy as reference\n\n"),
     "training.cross_entropy"),
    ("cross-entropy", cross_entropy_class("return -special.log_softmax(logits, -1)[torch.arange(len(targets)), "
                                          "targets].mean()", before="special = torch.special\n\n"),
     "torch.special.log_softmax"),
    ("cross-entropy", cross_entropy_class("return -logits.log_softmax(-1)[torch.arange(len(targets)), targets].mean()"),
     "Tensor.log_softmax"),
    ("cross-entropy", cross_entropy_class("try:\n    return torch.nn.functional.cross_entropy(logits, targets)\n"
                                          "except:\n    return logits.sum()"),
     "torch.nn.functional.cross_entropy"),  # a swallowed refusal
    ("cross-entropy", cross_entropy_class("import torch.special as s\nreturn (s.logsumexp(logits, -1) - "
                                          "logits[torch.arange(len(targets)), targets]).mean()"),
     "torch.special.logsumexp"),  # a C function of a banned module stays banned
    # a right forward, and a backward that differentiates it with autograd, behind a helper
    ("cross-entropy", cross_entropy_class(
        "ctx.save_for_backward(logits, targets)\nm = logits.max(-1, keepdim=True).values\n"
        "return (m.squeeze(-1) + (logits - m).exp().sum(-1).log() - logits[torch.arange(len(targets)), "
        "targets]).mean()",
        "logits, targets = ctx.saved_tensors\nreturn differentiate(logits, targets) * grad_output, None",
        before="def differentiate(logits, targets):\n    x = logits.detach().requires_grad_()\n"
               "    with torch.enable_grad():\n        m = x.max(-1, keepdim=True).values.detach()\n"
               "        loss = (m.squeeze(-1) + (x - m).exp().sum(-1).log() - x[torch.arange(len(targets)), "
               "targets]).mean()\n    return torch.autograd.grad(loss, x)[0]\n\n"),
     "torch.enable_grad"),
    ("adamw", ADAMW_HEAD + "        self.hidden = torch.optim.AdamW(self.param_groups)\n\n"
                           "    def step(self, closure=None):\n        self.hidden.step()", "torch.optim.AdamW"),
    ("adamw", "import training\n\n" + ADAMW_HEAD + "\n    @torch.no_grad()\n    def step(self, closure=None):\n"
              "        for group in self.param_groups:\n            training.AdamW._step_loop(self, group, "
              "[p for p in group['params'] if p.grad is not None])", "training.AdamW"),
    ("clip-grad-norm", "from torch.nn.utils import clip_grad_norm_ as clip\n\n"
                       "def clip_grad_norm(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False):\n"
                       "    return clip(parameters, max_norm, norm_type, error_if_nonfinite)",
     "torch.nn.utils.clip_grad"),
    ("wsd-schedule", "import training\n\ndef wsd_lr(step, max_lr, min_lr, warmup_steps, cooldown_steps, total_steps):\n"
                     "    return training.wsd_lr(step, max_lr=max_lr, min_lr=min_lr, warmup_steps=warmup_steps, "
                     "cooldown_steps=cooldown_steps, total_steps=total_steps)", "training.wsd_lr"),
    # called in the check's forked processes: their guard refuses it
    ("gradient-all-reduce", "wrap = getattr(torch.nn.parallel, 'Distributed' + 'DataParallel')\n\n"
                            "def sync_gradients(model, local_tokens):\n    wrap(model)",
     "torch.nn.parallel.DistributedDataParallel"),
    ("gradient-all-reduce", "from m07_training import distributed\n\ndef sync_gradients(model, local_tokens):\n"
                            "    distributed.wait_for_all(distributed.Ranks(world_size=2))", "m07_training.distributed"),
    # in a thread that library code starts: the guard's hook and its dispatch mode follow it there
    ("clip-grad-norm", "import asyncio\nhidden = getattr(torch.nn.utils, 'clip_grad_' + 'norm_')\n\n"
                       "def clip_grad_norm(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False):\n"
                       "    return asyncio.run(asyncio.to_thread(hidden, parameters, max_norm, norm_type))",
     "torch.nn.utils.clip_grad"),
    ("cross-entropy", "import asyncio\n\nclass CrossEntropy(torch.autograd.Function):\n    @staticmethod\n"
                      "    def forward(ctx, logits, targets):\n"
                      "        log_p = asyncio.run(asyncio.to_thread(torch.ops.aten._log_softmax, logits, -1, False))\n"
                      "        return -log_p[torch.arange(len(targets)), targets].mean()\n\n    @staticmethod\n"
                      "    def backward(ctx, grad_output):\n        return None, None",
     "torch.ops.aten._log_softmax"),
]


@pytest.mark.parametrize("slug, answer, name", HIDDEN_CALLS, ids=lambda value: str(value)[:40])
def test_a_hidden_call_of_what_the_exercise_rebuilds_is_refused(slug, answer, name):
    with pytest.raises(ExerciseFailed, match=rf"^refused: your code called `{re.escape(name)}"):
        check(slug)(load(slug, answer))


# ----------------------------------------------------------------------------------------
# Exercise 13's two processes: a rank that hangs in C, ends its process, prints, or rounds on its own
# ----------------------------------------------------------------------------------------

SYNC_HEAD = "def sync_gradients(model, local_tokens):\n"


def test_ranks_that_both_wait_in_c_are_ended_by_the_deadline_which_names_the_line(monkeypatch):
    """Inside dist.recv neither worker's alarm can interrupt it: the parent's deadline (time limit + grace) ends
    both, and faulthandler's stack says where rank 0 waits. About 0.6 s."""
    monkeypatch.setattr(checks, "TIME_LIMIT_S", 0.3)
    monkeypatch.setattr(checks, "GRACE_S", 0.2)
    answer = SYNC_HEAD + "    dist.recv(torch.zeros(1), src=1 - dist.get_rank())  # each waits for the other"
    with pytest.raises(ExerciseFailed, match=r"^no rank returned from sync_gradients within 0.3 s .*; rank 0 waits "
                                             r"\(at line 2: `dist.recv"):
        checks.check_gradient_all_reduce(load("gradient-all-reduce", answer))


def test_a_rank_that_ends_its_process_is_named():
    answer = "import os\n\n" + SYNC_HEAD + "    if dist.get_rank() == 1:\n        os._exit(3)"
    with pytest.raises(ExerciseFailed, match=r"^rank 1's process ended inside sync_gradients \(exit status 3\)"):
        checks.check_gradient_all_reduce(load("gradient-all-reduce", answer))


def test_what_the_ranks_print_is_shown_under_their_rank(capsys):
    solution = notebook_cells("solutions", "gradient-all-reduce")[1]
    answer = mutate(solution, [("    total = torch.tensor(local_tokens)\n",
                                "    print('tokens:', local_tokens)\n    total = torch.tensor(local_tokens)\n")])
    checks.check_gradient_all_reduce(load("gradient-all-reduce", answer))
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == ["[rank 0] tokens: 5", "[rank 1] tokens: 20"], printed


def test_ranks_whose_gradients_differ_in_the_last_bits_fail():
    """x / 25 and x * fl(1 / 25) round differently: within the tolerance, but replicas that would drift apart."""
    solution = notebook_cells("solutions", "gradient-all-reduce")[1]
    answer = mutate(solution, [("p.grad.div_(total)", "p.grad.div_(total) if dist.get_rank() == 0 else "
                                                      "p.grad.mul_(1 / total)")])
    with pytest.raises(ExerciseFailed, match=r"the ranks hold gradients of \S+ that differ in their last bits"):
        checks.check_gradient_all_reduce(load("gradient-all-reduce", answer))


BISECT_COSINE = """\
import bisect

def cosine_lr(step, max_lr, min_lr, warmup_steps, total_steps, budget_used):
    region = bisect.bisect_right([warmup_steps, total_steps], step)  # 0: warmup, 1: decay, 2: the end
    if region == 0:
        by_steps = max_lr * step / warmup_steps
    elif region == 2:
        by_steps = min_lr
    else:
        progress = (step - warmup_steps) / (total_steps - warmup_steps)
        by_steps = min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return min(by_steps, min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(budget_used, 1.0))))
"""


def test_a_builtin_a_banned_module_imported_is_not_banned_with_it():
    """torch.optim.lr_scheduler imports bisect_right; the guard bans the module's own functions, not that."""
    check("cosine-schedule")(load("cosine-schedule", BISECT_COSINE))


def test_the_grader_refuses_a_candidate_not_defined_in_a_notebook_cell():
    data = checks.run("check_cosine_schedule", training.cosine_lr)
    with pytest.raises(ExerciseFailed, match=r"refused: `cosine_lr` is not defined in your notebook: its code "
                                             r"comes from m07_training/schedules\.py"):
        checks.judge("check_cosine_schedule", data, notebook=True)


@pytest.mark.parametrize("sweep", ["np.logspace(np.log10(start_lr), np.log10(end_lr), num_steps)",
                                   "[math.exp(math.log(start_lr) + i / (num_steps - 1) * math.log(end_lr / start_lr))"
                                   " for i in range(num_steps)]",
                                   "torch.logspace(math.log10(start_lr), math.log10(end_lr), num_steps)"])
def test_an_lr_finder_whose_sweep_differs_in_the_last_bits_passes(sweep):
    answer = "import numpy as np\n\n" + LR_FINDER_WITH_SWEEP.format(sweep=sweep)
    checks.check_lr_finder(load("lr-finder", answer))


FLOAT32_SCHEDULES = {
    "cosine-schedule": """\
import torch

def cosine_lr(step, max_lr, min_lr, warmup_steps, total_steps, budget_used):
    def cosine(progress):
        return float(min_lr + (max_lr - min_lr) * (1 + torch.cos(math.pi * torch.tensor(progress))) / 2)

    if step >= total_steps:
        by_steps = min_lr
    elif step < warmup_steps:
        by_steps = float(torch.tensor(max_lr) * step / warmup_steps)
    else:
        by_steps = cosine((step - warmup_steps) / (total_steps - warmup_steps))
    return min(by_steps, cosine(min(budget_used, 1.0)))
""",
    "wsd-schedule": """\
import torch

def wsd_lr(step, max_lr, min_lr, warmup_steps, cooldown_steps, total_steps):
    if step >= total_steps:
        return min_lr
    if step < warmup_steps:
        return float(torch.tensor(max_lr) * step / warmup_steps)
    if step < total_steps - cooldown_steps:
        return max_lr
    progress = torch.tensor(step - (total_steps - cooldown_steps)) / cooldown_steps
    return float(min_lr + (max_lr - min_lr) * (1 - torch.sqrt(progress)))
""",
}
# (arguments after step, the reference at them): where float32 cancels, near the end of a decay to min_lr = 0
FLOAT32_CANCELS = {
    "cosine-schedule": ((6e-4, 0.0, 100, 1000, 0.0),
                        lambda step: training.cosine_lr(step, max_lr=6e-4, min_lr=0.0, warmup_steps=100,
                                                        total_steps=1000)),
    "wsd-schedule": ((6e-4, 0.0, 100, 200, 1000),
                     lambda step: training.wsd_lr(step, max_lr=6e-4, min_lr=0.0, warmup_steps=100, cooldown_steps=200,
                                                  total_steps=1000)),
}


@pytest.mark.parametrize("slug", FLOAT32_SCHEDULES)
def test_a_schedule_computed_in_float32_passes(slug):
    """Near the end of a decay to min_lr = 0 a float32 answer is off by ~1e-3 relatively (cancellation in
    1 + cos, or 1 - sqrt): the absolute floor relative to max_lr admits it."""
    candidate = load(slug, FLOAT32_SCHEDULES[slug])
    arguments, reference = FLOAT32_CANCELS[slug]
    assert not math.isclose(candidate(999, *arguments), reference(999), rel_tol=1e-6)  # the case it is
    check(slug)(candidate)


def test_a_swallowed_time_limit_still_fails_the_call(monkeypatch):
    monkeypatch.setattr(checks, "TIME_LIMIT_S", 0.3)

    def cosine_lr(*args):
        try:
            while True:
                pass
        except BaseException:  # what a bare `except:` does
            return 0.0

    with pytest.raises(ExerciseFailed, match=r"did not finish within 0.3 s"):
        checks.check_cosine_schedule(cosine_lr)


@pytest.mark.parametrize("values", [[1e-3, 1.0000001e-3], [2.302585092994046, 2.3025850929940455]])
def test_expected_and_got_print_differently(values):
    expected, got = values
    text = expected_and_got(expected, got)
    assert text.split(", got ")[0].removeprefix("expected ") != text.split(", got ")[1]


def test_the_run_sends_back_json_only():
    data = checks.run("check_adamw", load("adamw"))
    assert json.loads(json.dumps(data)) == data
    assert data["origin"] == ["<adamw>"]  # where `load` compiled the class: its own step, not torch's hook
    checks.judge("check_adamw", json.loads(json.dumps(data)))


def test_the_package_ships_no_reference_answer():
    """`pip install` (the Colab set-up cell) puts exercises/ on a learner's path: no module there defines an answer."""
    answers = {exercise.candidate for exercise in EXERCISES}
    for module in (ROOT / "exercises").rglob("*.py"):
        tree = ast.parse(module.read_text(encoding="utf-8"))
        defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        assert not defined & answers, module.name


def test_the_source_scan_refuses_no_solution_and_no_stub():
    for folder in ("solutions", "exercises"):
        for exercise in EXERCISES:
            setup, answer = notebook_cells(folder, exercise.slug)
            assert scan(exercise.slug, setup + [answer]) is None, (folder, exercise.slug)


@pytest.mark.parametrize("slug, source, fragment", [
    ("cross-entropy", "import torch.nn.functional as F\n\ndef cross_entropy(logits, targets):\n"
                      "    return F.cross_entropy(logits, targets)", "`torch.nn.functional.cross_entropy`"),
    ("cross-entropy", "def cross_entropy(logits, targets):\n    return -logits.log_softmax(-1).mean()",
     "`logits.log_softmax`"),
    ("clip-grad-norm", "from torch.nn import utils\n\ndef clip_grad_norm(p, m):\n    return utils.clip_grad_norm_(p, m)",
     "`torch.nn.utils.clip_grad_norm_`"),
    ("lr-finder", "import sys\nsys.modules['exercises.checks'] = None\n\ndef lr_finder(*a, **k):\n    pass",
     "a change to the module `sys.modules`"),
    ("early-stopping", "def train_with_early_stopping(*a, **k):\n    return eval('1')", "`eval`"),
    ("adamw", "import importlib\nAdamW = importlib.import_module('torch.optim').AdamW", "`import importlib`"),
    ("gradient-all-reduce", "from torch.nn.parallel import DistributedDataParallel as DDP\n\n"
                            "def sync_gradients(model, local_tokens):\n    DDP(model)",
     "`torch.nn.parallel.DistributedDataParallel`"),
    ("gradient-all-reduce", "from torch.distributed.fsdp import fully_shard", "`torch.distributed.fsdp.fully_shard`"),
    ("gradient-all-reduce", "import torch.multiprocessing as mp", "`torch.multiprocessing`"),
])
def test_the_source_scan_names_what_it_refuses(slug, source, fragment):
    reason = scan(slug, [source])
    assert reason.startswith("refused: the answer uses") and fragment in reason, reason


def test_a_docstring_that_names_a_notebook_is_not_refused():
    assert scan("lr-finder", ['def lr_finder(*args):\n    """As in 06-lr-finder.ipynb."""\n    return 1']) is None


@pytest.mark.parametrize("slug, source", [
    ("cross-entropy", "from m07_training.loss import cross_entropy as ce"),
    ("adamw", "from m07_training.optimizers import AdamW as Mine"),
    ("adamw", "import m07_training.muon as muon\nAdamW = muon.MuonWithAdamW"),
    ("clip-grad-norm", "from m07_training import clipping\nclip = clipping.clip_grad_norm"),
    ("cosine-schedule", "from m07_training.schedules import cosine_decay"),
    ("wsd-schedule", "from m07_training.schedules import wsd_lr"),
    ("gradient-all-reduce", "from m07_training.distributed import agree"),
])
def test_the_library_files_behind_training_are_banned_too(slug, source):
    """training.X is a face: the file each exercise rebuilds is refused under its own name as well."""
    assert scan(slug, [source]).startswith("refused: the answer uses `m07_training.")

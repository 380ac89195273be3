"""Lesson 5: the training doctor: read a run's history and say what went wrong, with the evidence
and what to try. diagnose() runs one small check per kind of failure, in the order a reader
would look: the loss curve, the evaluations, the gradient norms."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .ngram import rung_name, versus_ladder
from .scoring import Score

if TYPE_CHECKING:
    from .loop import TrainResult

# Thresholds of diagnose(). Losses are in nats per token, gradient norms are global L2 norms.
SMOOTH_UPDATES = 10        # updates averaged before comparing losses: one batch's loss is noisy (about
                           # +-0.1 nats for a batch of 1,000 characters), a mean of 10 is ~3x steadier
SPIKE_NATS = 0.5           # a loss this far above the best smoothed loss so far is a spike, not noise:
                           # 5 times the noise of one batch, and a big step back for a language model
PLATEAU_NATS = 0.1         # a run whose loss ends less than this below the unigram loss (or ln V)
                           # learned no more than letter frequencies (or nothing at all)
MIN_UPDATES_FOR_PLATEAU = 50   # fewer updates than this are too few to call a plateau
BAD_INIT_NATS = 1.0        # a first loss this far above ln V means the initial logits are far from
                           # uniform: a too-large output scale (a fresh model should start near ln V)
OVERFIT_EVALS = 2          # evaluations after the best one, with val risen and train fallen, that
                           # make overfitting (one could be noise in the validation batches)
OVERFIT_NATS = 0.02        # ... and the rise in val loss that counts: evaluation batches are fixed, so
                           # their noise is small, but a flat, converged run wobbles by a few thousandths
GRAD_EXPLODE_RATIO = 10.0  # a smoothed gradient norm 10x its lowest value so far has exploded: healthy
                           # runs move within a factor of ~3 once past the first updates (single
                           # batches can reach 10x; the mean of SMOOTH_UPDATES does not)
GRAD_VANISH_RATIO = 1e-3   # a gradient norm that fell below 1/1000 of its start no longer trains
LEAK_NATS = 0.1            # held-out text at under 0.1 nats per token (predicted with > 90% confidence
                           # on average) is too good to be true: the model sees its targets


@dataclass(frozen=True)
class Finding:
    """One diagnosis of a training run, from diagnose().

    problem: a short name ('divergence', 'loss spike', 'plateau', 'bad initialisation',
    'overfitting', 'exploding gradients', 'vanishing gradients', 'suspiciously low loss',
    or 'healthy'); evidence: what in the history shows it, with update numbers and values;
    advice: what to try; steps: (first, last) update the evidence is about.
    """
    problem: str
    evidence: str
    advice: str
    steps: tuple[int, int]

    def __str__(self) -> str:
        return f"{self.problem}: {self.evidence}\n    try: {self.advice}"


def read_history(source: str | Path | list[dict] | TrainResult) -> list[dict]:
    """The history rows of a run: one dict per update with 'step' and 'loss' (and 'lr', 'grad_norm',
    and 'train_loss'/'val_loss' at evaluations), from a TrainResult, a list of such dicts, a
    history.jsonl file, or the out_dir that holds one. Rows are checked and sorted by step."""
    if isinstance(getattr(source, "history", None), list):  # a TrainResult
        rows = source.history
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            path = path / "history.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"no training history at {path}")
        rows = []
        try:
            lines = path.read_bytes().decode("utf-8").splitlines()
        except UnicodeDecodeError as error:
            raise ValueError(f"{path} is not UTF-8 text ({error})") from None
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:  # history.jsonl stores a non-finite number as null (strict JSON): back to NaN
                    rows.append({key: math.nan if value is None else value
                                 for key, value in json.loads(line).items()})
                except (json.JSONDecodeError, AttributeError) as error:
                    raise ValueError(f"{path}, line {number}: not a JSON object ({error})") from None
    elif isinstance(source, list):
        rows = source
    else:
        raise TypeError(f"history must be a path, a list of dicts or a TrainResult, got {type(source).__name__}")
    for number, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) \
                or not isinstance(row.get("loss"), (int, float)):
            raise ValueError(f"history row {number} must be a dict with an int 'step' and a number 'loss', "
                             f"got {row!r}")
    if not rows:
        raise ValueError("history is empty: the run made no update")
    return sorted(rows, key=lambda row: row["step"])


def unigram_loss(ids: torch.Tensor | np.ndarray) -> float:
    """Cross-entropy in nats of always predicting the token frequencies of `ids` (1-D token ids):
    the loss a model reaches when it has learned letter frequencies and nothing about context."""
    counts = np.bincount(np.asarray(ids).reshape(-1))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def trailing_mean(values: np.ndarray, window: int = SMOOTH_UPDATES) -> np.ndarray:
    """Mean of up to `window` values ending at each position: the smoothed loss the doctor reads."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    counts = np.minimum(ends, window)
    return (sums[ends] - sums[ends - counts]) / counts


def _runs_of(mask: np.ndarray, gap: int) -> list[tuple[int, int]]:
    """(first, last) indices of the True stretches of mask, merging stretches less than `gap` apart."""
    spans: list[tuple[int, int]] = []
    for i in np.flatnonzero(mask):
        if spans and i - spans[-1][1] < gap:
            spans[-1] = (spans[-1][0], int(i))
        else:
            spans.append((int(i), int(i)))
    return spans


def diagnose(history: str | Path | list[dict] | TrainResult, *, vocab_size: int | None = None,
             unigram_loss: float | None = None, grad_clip: float | None = None,
             ladder: dict[int, Score] | None = None) -> list[Finding]:
    """Read a run's history (see read_history) and name what went wrong, with the evidence and what to try.

    vocab_size: V, for ln V (the loss of a uniform guess) in the spike, plateau and init checks;
    unigram_loss: the loss of predicting letter frequencies (training.unigram_loss of the training
    ids), the bar a run must clear to have learned anything about context; grad_clip: the run's
    clipping norm, if known (0: off), so the advice does not ask for clipping that was already on;
    ladder: the counting ladder (ngram_ladder: {order: Score} of the validation split), so that the plateau
    and healthy findings name the highest n-gram rung the best val loss beats (its order 1 is the unigram
    bar when unigram_loss is not given).
    Checks, each with its threshold (module constants): divergence (a non-finite loss, or a loss
    that rose and never came back), loss spikes, a plateau above the unigram loss or ln V, a bad
    initialisation, overfitting (val rising while train falls), exploding or vanishing gradient
    norms ('grad_norm' rows), and a suspiciously low validation loss. Returns the findings in
    that order, or a single 'healthy' finding when there is nothing to report.
    """
    rows = read_history(history)
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                   or vocab_size < 2):
        raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
    if unigram_loss is not None and not (isinstance(unigram_loss, (int, float)) and unigram_loss >= 0):
        raise ValueError(f"unigram_loss must be a non-negative number, got {unigram_loss!r}")
    if ladder is not None and not (isinstance(ladder, dict) and ladder and all(
            isinstance(order, int) and isinstance(score, Score) for order, score in ladder.items())):
        raise ValueError("ladder must be ngram_ladder()'s {order: Score}")
    if unigram_loss is None and ladder is not None and 1 in ladder:
        unigram_loss = ladder[1].loss
    ln_v = math.log(vocab_size) if vocab_size else None
    clip = _clip_advice(grad_clip)
    whole = _Curve(np.array([row["step"] for row in rows]), np.array([row["loss"] for row in rows], dtype=float),
                   np.array([row.get("lr", math.nan) for row in rows], dtype=float))
    curve = whole.finite_part()
    findings = []
    restart = _where_to_restart(rows[:len(curve.losses)], ln_v)
    if curve is not whole:
        findings.append(_non_finite_loss(whole, clip, restart))
    elif non_finite_val := _non_finite_val_loss(rows, clip, restart):
        findings.append(non_finite_val)
    if len(curve.losses):
        ended_high = curve.smooth[-1] > curve.smooth.min() + SPIKE_NATS
        if ended_high and curve is whole:
            findings.append(_rising_loss(curve, ln_v))
        if spike := _loss_spike(curve, ended_high or curve is not whole, ln_v, clip):
            findings.append(spike)
        if init := _bad_initialisation(curve, ln_v):
            findings.append(init)
    evals = [row for row in rows[:len(curve.losses)] if isinstance(row.get("val_loss"), (int, float))
             and math.isfinite(row["val_loss"])]
    rung = _rung(evals, ladder)
    if len(curve.losses):
        if plateau := _plateau(curve, findings, ln_v, unigram_loss, evals, rung):  # after the spike, which it reads
            findings.append(plateau)
    for found in (_overfitting(evals), _suspiciously_low_loss(evals, curve)):
        if found:
            findings.append(found)
    low_loss = any(f.problem == "suspiciously low loss" for f in findings)
    if found := _gradient_norms(rows, clip, low_loss, finite_loss=curve is whole):
        if found.advice.startswith(NEVER_ZEROED):
            findings.insert(0, found)  # the likely cause of the rest: read it first
        else:
            findings.append(found)
    return findings or [_healthy(curve, evals, rung, ladder)]


@dataclass
class _Curve:
    """A run's loss curve: steps, losses and LRs of every update, and the losses' trailing mean."""
    steps: np.ndarray
    losses: np.ndarray
    lrs: np.ndarray
    smooth: np.ndarray = field(init=False)

    def __post_init__(self):
        self.smooth = trailing_mean(self.losses, SMOOTH_UPDATES)

    @property
    def n_finite(self) -> int:
        """Updates before the first non-finite loss."""
        bad = np.flatnonzero(~np.isfinite(self.losses))
        return int(bad[0]) if len(bad) else len(self.losses)

    def finite_part(self) -> _Curve:
        """The curve up to its first non-finite loss (itself when there is none)."""
        n = self.n_finite
        return self if n == len(self.losses) else _Curve(self.steps[:n], self.losses[:n], self.lrs[:n])


def _clip_advice(grad_clip: float | None) -> str:
    return ("clip the gradient norm (grad_clip=1.0)" if not grad_clip else
            f"clip harder than the norm {grad_clip:g} used here (clipping bounds each update, not the LR that scales it)")


def _worse_than_uniform(loss: float, ln_v: float | None) -> str:
    return f" (ln V = {ln_v:.2f}: worse than a uniform guess)" if ln_v and loss > ln_v else ""


def _where_to_restart(rows: list[dict], ln_v: float | None) -> str:
    """Advice after a divergence: resume from best.pt only if an evaluation before it beat a uniform guess."""
    if ln_v is None:
        return "train() stops at a non-finite loss and keeps the last good checkpoint (best.pt): resume from it with a lower lr"
    good = [row for row in rows if isinstance(row.get("val_loss"), (int, float)) and row["val_loss"] < ln_v]
    if not good:
        return ("no evaluation before it beat a uniform guess (ln V), so there is no good checkpoint: start again "
                "with a lower lr")
    best = min(good, key=lambda row: row["val_loss"])
    return (f"train() stops at a non-finite loss and keeps the last good checkpoint (best.pt, update "
            f"{best['step']:,}, val loss {best['val_loss']:.3f}): resume from it with a lower lr")


def _peak_lr_note(lrs: np.ndarray) -> str:
    """'; the peak learning rate was 10': the largest LR of the history (not the LR where the run ended)."""
    return f"; the peak learning rate was {np.nanmax(lrs):.3g}" if np.isfinite(lrs).any() else ""


def _non_finite_loss(curve: _Curve, clip: str, restart: str) -> Finding:
    """Divergence: a NaN/inf loss ends the trustworthy part of the run."""
    n_good, steps, losses, lrs = curve.n_finite, curve.steps, curve.losses, curve.lrs
    last_good = f"; the last finite loss was {losses[n_good - 1]:.4g} at update {steps[n_good - 1]:,}" if n_good else ""
    start = f" (it started at {losses[0]:.2f})" if n_good > 1 else ""
    return Finding(
        "divergence", f"the loss became {losses[n_good]} at update {steps[n_good]:,}{last_good}{start}",
        f"lower the peak learning rate (by 3-10x{_peak_lr_note(lrs)}), lengthen the warmup, and {clip}. {restart}",
        (int(steps[max(n_good - 1, 0)]), int(steps[n_good])))


def _non_finite_val_loss(rows: list[dict], clip: str, restart: str) -> Finding | None:
    """Divergence seen only by an evaluation: a validation loss that is NaN or infinite."""
    bad = next((row for row in rows if isinstance(row.get("val_loss"), (int, float))
                and not math.isfinite(row["val_loss"])), None)
    if bad is None:
        return None
    return Finding(
        "divergence", f"the validation loss became {bad['val_loss']} at update {bad['step']:,} while the training "
        f"loss was {bad['loss']:.4g}",
        f"lower the peak learning rate (by 3-10x), lengthen the warmup, and {clip}. {restart}",
        (int(bad["step"]), int(bad["step"])))


def _rising_loss(curve: _Curve, ln_v: float | None) -> Finding:
    """Divergence: a rise that never came back (one that came back is a spike)."""
    steps, smooth = curve.steps, curve.smooth
    low = int(np.argmin(smooth))
    return Finding(
        "divergence", f"the loss rose from {smooth[low]:.2f} (mean of the {SMOOTH_UPDATES} updates to "
        f"update {steps[low]:,}) to {smooth[-1]:.2f} at the end (update {steps[-1]:,}) and did not "
        f"come back" + _worse_than_uniform(smooth[-1], ln_v),
        f"lower the peak learning rate (by 3-10x), lengthen the warmup, clip the gradient norm; "
        f"best.pt holds the weights of the best evaluation",
        (int(steps[low]), int(steps[-1])))


def _loss_spike(curve: _Curve, diverged: bool, ln_v: float | None, clip: str) -> Finding | None:
    """The largest stretch of losses well above the best smoothed loss before it (not the run-up to a divergence)."""
    steps, losses, lrs = curve.steps, curve.losses, curve.lrs
    best_before = np.minimum.accumulate(np.concatenate(([math.inf], curve.smooth[:-1])))
    spans = _runs_of(losses > best_before + SPIKE_NATS, SMOOTH_UPDATES)
    if diverged and spans and spans[-1][1] == len(losses) - 1:
        spans = spans[:-1]  # the run-up to the divergence, reported as such
    if not spans:
        return None
    first, last = max(spans, key=lambda span: losses[span[0]:span[1] + 1].max())
    peak = first + int(np.argmax(losses[first:last + 1]))
    top_lr = int(np.argmax(lrs)) if np.isfinite(lrs).all() else None
    warming = top_lr is not None and peak <= top_lr + SMOOTH_UPDATES
    when = (f", at learning rate {lrs[peak]:.3g}" if not warming else
            f", during the warmup (learning rate {lrs[peak]:.3g} of a peak {lrs[top_lr]:.3g})"
            if peak < top_lr else f", {peak - top_lr} updates after the learning rate reached its "
            f"peak {lrs[top_lr]:.3g} at update {steps[top_lr]:,}")
    more = f" ({len(spans)} spikes in all; the largest shown)" if len(spans) > 1 else ""
    return Finding(
        "loss spike",
        f"the loss jumped above {best_before[first] + SPIKE_NATS:.2f} (its best so far + {SPIKE_NATS}) "
        + (f"at updates {steps[first]:,}-{steps[last]:,}" if last > first else f"at update {steps[first]:,}")
        + f", peaking at {losses[peak]:.3g} at update "
        f"{steps[peak]:,}" + _worse_than_uniform(losses[peak], ln_v) + when + more,
        ("warmup too short for this peak learning rate: lengthen warmup_steps or lower lr"
         if warming else f"lower the peak learning rate or {clip}; "
         "a single spike that recovers at once can be one bad batch and is harmless"),
        (int(steps[first]), int(steps[last])))


def _bad_initialisation(curve: _Curve, ln_v: float | None) -> Finding | None:
    if ln_v is None or not curve.losses[0] > ln_v + BAD_INIT_NATS:
        return None
    return Finding(
        "bad initialisation", f"the first loss is {curve.losses[0]:.2f}, far above ln V = {ln_v:.2f}, the "
        f"loss of a uniform guess that a freshly initialised model should start near",
        "the initial logits are too large: initialise the output layer (or the embedding it is tied to) "
        "with a smaller scale, e.g. std 0.02",
        (int(curve.steps[0]), int(curve.steps[0])))


def _rung(evals: list[dict], ladder: dict[int, Score] | None) -> str:
    """Where the best val loss stands on the counting ladder ('beats the trigram (1.96), not ...'), or ''."""
    if not evals or not ladder:
        return ""
    return f"{versus_ladder(evals[_best_evaluation(evals)]['val_loss'], ladder)} of the counting ladder (Kneser-Ney " \
           f"n-grams)"


def _plateau(curve: _Curve, earlier: list[Finding], ln_v: float | None, unigram: float | None,
             evals: list[dict], rung: str) -> Finding | None:
    """A run that ends no better than the unigram loss (or, without it, ln V), and did not diverge."""
    bar, bar_name = ((unigram, f"the unigram loss {unigram:.2f} (letter frequencies only)")
                     if unigram is not None else
                     (ln_v, f"ln V = {ln_v:.2f} (a uniform guess)") if ln_v is not None else (None, ""))
    problems = {f.problem for f in earlier}
    if (bar is None or "divergence" in problems or len(curve.losses) < MIN_UPDATES_FOR_PLATEAU
            or not curve.smooth[-1] > bar - PLATEAU_NATS):
        return None
    lrs = curve.lrs
    lr_note = f" (peak learning rate {np.nanmax(lrs):.3g})" if np.isfinite(lrs).any() else ""
    return Finding(
        "plateau", f"after {len(curve.losses):,} updates the loss (mean of the last {SMOOTH_UPDATES}: "
        f"{curve.smooth[-1]:.2f}) is no better than {bar_name}"
        + (f"; the best val loss {evals[_best_evaluation(evals)]['val_loss']:.3f} {rung}" if rung else ""),
        f"the learning rate is too high{lr_note}: the run spiked (above) and never got past where it "
        f"was thrown back to; lower it 3-10x" if "loss spike" in problems else
        f"the learning rate is too low{lr_note}: raise it (try 10x, or run an LR finder); if the first "
        f"loss was far above ln V, fix the initialisation first",
        (int(curve.steps[0]), int(curve.steps[-1])))


def _best_evaluation(evals: list[dict]) -> int:
    return min(range(len(evals)), key=lambda i: evals[i]["val_loss"])


def _overfitting(evals: list[dict]) -> Finding | None:
    """Val loss risen for OVERFIT_EVALS evaluations after its best while the train loss kept falling."""
    if not evals:
        return None
    best = _best_evaluation(evals)
    after, top = evals[best + 1:], evals[best]
    if not (len(after) >= OVERFIT_EVALS and after[-1]["val_loss"] > top["val_loss"] + OVERFIT_NATS
            and "train_loss" in top and after[-1].get("train_loss", math.inf) < top["train_loss"]):
        return None
    return Finding(
        "overfitting", f"the val loss rose for {len(after)} evaluations after update {top['step']:,} "
        f"({top['val_loss']:.3f} -> {after[-1]['val_loss']:.3f} at update {after[-1]['step']:,}) while "
        f"the train loss kept falling ({top['train_loss']:.3f} -> {after[-1]['train_loss']:.3f}); best.pt "
        f"is from update {top['step']:,}",
        "use best.pt; stop earlier (patience), or get more data, or regularise (dropout, weight decay), "
        "or use a smaller model",
        (int(top["step"]), int(after[-1]["step"])))


LEAK_ADVICE = ("the model sees its targets: check that the labels are the inputs shifted by one "
               "(y[t] = x[t+1]), that attention is causal, and that the validation text is not in the training set")


def _suspiciously_low_loss(evals: list[dict], curve: _Curve) -> Finding | None:
    """A val loss (or, without evaluations, a training loss) below LEAK_NATS."""
    if evals:
        best = evals[_best_evaluation(evals)]
        if not best["val_loss"] < LEAK_NATS:
            return None
        return Finding(
            "suspiciously low loss", f"the val loss is {best['val_loss']:.3f} at update "
            f"{best['step']:,}: held-out text predicted almost perfectly, which no language model does",
            LEAK_ADVICE, (int(best["step"]), int(best["step"])))
    if not len(curve.losses) or not curve.smooth.min() < LEAK_NATS:
        return None
    low = int(np.argmin(curve.smooth))
    return Finding(
        "suspiciously low loss", f"the training loss is {curve.smooth[low]:.3f} (mean of the {SMOOTH_UPDATES} "
        f"updates to update {curve.steps[low]:,}): text predicted almost perfectly, which a language model "
        f"does only by memorising a tiny corpus",
        LEAK_ADVICE + "; evaluate on held-out text to tell a leak from memorising",
        (int(curve.steps[low]), int(curve.steps[low])))


NEVER_ZEROED = "check that optimizer.zero_grad() runs every update"


def _gradient_norms(rows: list[dict], clip: str, low_loss: bool, finite_loss: bool = True) -> Finding | None:
    """Exploding gradient norms (non-finite, or GRAD_EXPLODE_RATIO x their lowest smoothed value), or
    vanishing ones (unless the loss is suspiciously low, which explains them). A norm still exploded at the
    end of a run whose losses and norms all stayed finite grew steadily: the advice then starts with zero_grad."""
    norm_rows = [(row["step"], float(row["grad_norm"])) for row in rows if isinstance(row.get("grad_norm"), (int, float))]
    if not norm_rows:
        return None
    norm_steps = np.array([s for s, _ in norm_rows])
    norms = np.array([n for _, n in norm_rows])
    finite = np.isfinite(norms)
    smooth_norms = trailing_mean(np.where(finite, norms, 0.0), SMOOTH_UPDATES)
    lowest = np.minimum.accumulate(np.concatenate(([math.inf], smooth_norms[:-1])))
    exploded = ~finite | (smooth_norms > GRAD_EXPLODE_RATIO * lowest)  # one outlier batch is not enough
    if exploded.any():
        i = int(np.argmax(exploded))
        j = i + int(np.argmax(np.where(finite[i:], norms[i:], math.inf)))
        steady = finite_loss and finite.all() and smooth_norms[-1] > GRAD_EXPLODE_RATIO * lowest[i]
        return Finding(
            "exploding gradients", f"the gradient norm (mean of {SMOOTH_UPDATES} updates) reached "
            f"{smooth_norms[i] if finite[i] else norms[i]:.3g} at update {norm_steps[i]:,}, over "
            f"{GRAD_EXPLODE_RATIO:g}x its lowest value before ({lowest[i]:.3g})"
            + (f"; largest {norms[j]:.3g} at update {norm_steps[j]:,}" if j != i else ""),
            f"{NEVER_ZEROED}: a norm that grows update after update while the loss stays finite is the sign of "
            f"gradients that are never zeroed; if it does, {clip} and lower the learning rate" if steady else
            f"{clip} and lower the learning rate; a norm that grows "
            "steadily update after update suggests gradients that are never zeroed (optimizer.zero_grad)",
            (int(norm_steps[i]), int(norm_steps[j])))
    if len(norms) < 2 * SMOOTH_UPDATES or low_loss:
        return None
    start, end = np.median(norms[:SMOOTH_UPDATES]), np.median(norms[-SMOOTH_UPDATES:])
    if not end < GRAD_VANISH_RATIO * start:
        return None
    return Finding(
        "vanishing gradients", f"the gradient norm fell from {start:.3g} (median of the first "
        f"{SMOOTH_UPDATES} updates) to {end:.3g} (the last {SMOOTH_UPDATES}), below "
        f"{GRAD_VANISH_RATIO:g} of its start",
        "the model has stopped learning: look for saturated or dead activations and for an "
        "initialisation or learning rate that drove them there; the per-layer gradient norms "
        "show where the signal dies",
        (int(norm_steps[0]), int(norm_steps[-1])))


def _healthy(curve: _Curve, evals: list[dict], rung: str, ladder: dict[int, Score] | None) -> Finding:
    evidence = f"the loss fell from {curve.losses[0]:.2f} to {curve.smooth[-1]:.2f} (mean of the last " \
               f"{SMOOTH_UPDATES}) over {len(curve.losses):,} updates, with no spike, plateau or exploding gradient"
    advice = "nothing to fix: train longer, or scale the model up"
    if evals:
        best = evals[_best_evaluation(evals)]
        evidence += f"; the best val loss {best['val_loss']:.3f} is at update {best['step']:,}" + \
            (f" and {rung}" if rung else "")
        top = max(ladder) if ladder else None
        if top is not None and not best["val_loss"] < ladder[top].loss:
            advice = f"nothing is broken, but counting still does better: train longer, or scale the model up, " \
                     f"until the val loss passes the {rung_name(top)} ({ladder[top].loss:.3f})"
    return Finding("healthy", evidence, advice, (int(curve.steps[0]), int(curve.steps[-1])))


def format_diagnosis(findings: list[Finding]) -> str:
    """The findings of diagnose() as text, one numbered paragraph each."""
    return "training doctor:\n" + "\n".join(f"  {i}. {finding}" for i, finding in enumerate(findings, start=1))

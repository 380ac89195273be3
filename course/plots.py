"""Plotting helpers shared by the lessons (matplotlib only).

Each function draws on an ``ax`` the caller owns, so a lesson composes its own
figure and ends the cell with ``plt.show()``.
"""

import math

import numpy as np
import torch

__all__ = ["history_of", "moving_average", "plot_curves", "plot_history", "plot_metric", "plot_paths_on_surface",
           "plot_runs", "plot_val_against_seconds"]


def plot_paths_on_surface(ax, loss_fn, paths, *, xlim, ylim, minimum=None, levels=12, grid=200):
    """Contour lines of a 2-D loss with optimizer paths drawn over them.

    loss_fn: maps a float tensor [..., 2] of points to a tensor [...] of losses.
    paths: {label: tensor [steps + 1, 2]} of visited points, the start first.
    xlim, ylim: (low, high) of the drawn window; minimum: an (x, y) to mark with a star.
    Contour levels are spaced logarithmically, so an ill-conditioned valley stays visible.
    """
    if not paths:
        raise ValueError("paths must name at least one path")
    xs = torch.linspace(*xlim, grid, dtype=torch.float64)
    ys = torch.linspace(*ylim, grid, dtype=torch.float64)
    X, Y = torch.meshgrid(xs, ys, indexing="xy")
    Z = loss_fn(torch.stack([X, Y], dim=-1)).numpy()
    low = max(float(Z.min()), 1e-3 * float(Z.max()))
    ax.contour(X.numpy(), Y.numpy(), Z, levels=np.geomspace(low, float(Z.max()), levels), colors="0.8",
               linewidths=0.8)
    for label, path in paths.items():
        path = torch.as_tensor(path, dtype=torch.float64)
        if path.dim() != 2 or path.shape[1] != 2:
            raise ValueError(f"path {label!r} must have shape [steps + 1, 2], got {tuple(path.shape)}")
        (line,) = ax.plot(path[:, 0], path[:, 1], ".-", ms=3, lw=1.2, label=label)
        ax.plot(path[0, 0], path[0, 1], "o", color=line.get_color(), ms=6)
    if minimum is not None:
        ax.plot(*minimum, "k*", ms=12, label="minimum")
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.legend(fontsize=8)


def plot_curves(ax, curves, *, xlabel="step", ylabel="loss", logy=False, hline=None, hline_label=None, first_x=0):
    """One line per entry of ``curves`` ({label: sequence of y, one per step from ``first_x``}).

    hline: an optional horizontal reference (e.g. ln V, the loss of a uniform guess).
    """
    if not curves:
        raise ValueError("curves must name at least one curve")
    for label, ys in curves.items():
        ax.plot(range(first_x, first_x + len(ys)), list(ys), label=label)
    if hline is not None:
        ax.axhline(hline, color="0.4", ls="--", lw=1, label=hline_label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)


# Loss curves of training runs, from training.TrainResult.history: one dict per update,
# {"step", "lr", "loss"}, plus "train_loss" and "val_loss" at evaluations.

def history_of(run):
    """The history list of a ``TrainResult`` (or a history list itself)."""
    history = getattr(run, "history", run)
    if not isinstance(history, list) or not all(isinstance(entry, dict) and "step" in entry for entry in history):
        raise TypeError("run must be a training.TrainResult or its .history (a list of dicts with 'step')")
    return history


def moving_average(values, window):
    """Trailing mean over up to ``window`` values (shorter at the start, so no point is dropped)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    values = np.asarray(values, dtype=float)
    sums = np.cumsum(np.insert(values, 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    counts = np.minimum(ends, window)
    return (sums[ends] - sums[ends - counts]) / counts


def plot_history(ax, run, *, label=None, color=None, smooth=10, show_eval=True):
    """One run: per-update training loss (faint), its moving average (solid), val loss (dots).

    Per-update losses are noisy (each is one random batch); evaluation losses are averaged
    over fixed batches. A loss that became NaN or infinite ends the curve, and a cross at
    the top of the axes marks that update. Returns the colour used.
    """
    history = history_of(run)
    steps = np.array([entry["step"] for entry in history])
    losses = np.array([entry["loss"] for entry in history], dtype=float)
    finite = np.isfinite(losses)
    first_bad = None if finite.all() else int(np.argmin(finite))
    good = slice(None) if first_bad is None else slice(0, first_bad)
    (raw,) = ax.plot(steps[good], losses[good], color=color, alpha=0.25, lw=0.8)
    color = raw.get_color()
    if len(losses[good]):
        ax.plot(steps[good], moving_average(losses[good], smooth), color=color, lw=1.8,
                label=f"{label}: train (mean of {smooth})" if label else None)
    if first_bad is not None:
        ax.plot([steps[first_bad]], [1.0], "x", ms=10, mew=2.5, color=color, clip_on=False,
                transform=ax.get_xaxis_transform(),
                label=f"{label}: non-finite loss by step {steps[first_bad]}" if label else None)
    evals = [(entry["step"], entry["val_loss"]) for entry in history
             if "val_loss" in entry and math.isfinite(entry["val_loss"])]
    if show_eval and evals:
        ax.plot(*zip(*evals), "o--", color=color, ms=5, lw=1,
                label=f"{label}: validation" if label else "validation")
    return color


def plot_runs(ax, runs, *, title=None, hline=None, hline_label=None, smooth=10, logy=False, ylim=None):
    """Several runs, ``{label: TrainResult or history}``, on one axes.

    hline: an optional horizontal reference, e.g. ln V (the loss of a uniform guess).
    """
    if not runs:
        raise ValueError("runs must name at least one run")
    for label, run in runs.items():
        plot_history(ax, run, label=label, smooth=smooth)
    if hline is not None:
        ax.axhline(hline, color="0.4", ls=":", lw=1.2, label=hline_label)
    if logy:
        ax.set_yscale("log")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set(xlabel="update", ylabel="loss (nats per token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_val_against_seconds(ax, curves, *, title=None):
    """Validation loss against wall-clock seconds, one line per ``{label: [(seconds, val_loss), ...]}``
    (e.g. course.race.ClockedBatches.val_against_seconds): runs compared at equal time, not equal updates."""
    if not curves:
        raise ValueError("curves must name at least one curve")
    for label, points in curves.items():
        ax.plot(*zip(*points), "o-", ms=4, lw=1.5, label=label)
    ax.set(xlabel="wall-clock seconds of training", ylabel="validation loss (nats per token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)  # beside the data, not on it


def plot_metric(ax, runs, metric, *, title=None, ylabel=None, logy=True, smooth=1):
    """One logged quantity per update for several runs, ``{label: TrainResult or history}``.

    metric: a history key (e.g. "grad_norm") or a function of one history row that returns a
    number, or None where the row has none. Rows without a finite value are left out, so a
    run that diverged ends where its values stopped being finite. smooth: a trailing mean
    over this many values (1: raw). Log scale by default: these quantities span decades.
    """
    if not runs:
        raise ValueError("runs must name at least one run")
    value_of = metric if callable(metric) else (lambda row: row.get(metric))
    for label, run in runs.items():
        points = [(row["step"], value_of(row)) for row in history_of(run)]
        points = [(step, value) for step, value in points if value is not None and math.isfinite(value)]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, moving_average(values, smooth), label=label, lw=1.4)
    if logy:
        ax.set_yscale("log")
    ax.set(xlabel="update", ylabel=ylabel or (metric if isinstance(metric, str) else None), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

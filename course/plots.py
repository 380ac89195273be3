"""Plotting helpers shared by the lessons (matplotlib only).

Each function draws on an ``ax`` the caller owns, so a lesson composes its own
figure and ends the cell with ``plt.show()``.
"""

import numpy as np
import torch

__all__ = ["plot_curves", "plot_paths_on_surface"]


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


def plot_curves(ax, curves, *, xlabel="step", ylabel="loss", logy=False, hline=None, hline_label=None):
    """One line per entry of ``curves`` ({label: sequence of y, one per step from 0}).

    hline: an optional horizontal reference (e.g. ln V, the loss of a uniform guess).
    """
    if not curves:
        raise ValueError("curves must name at least one curve")
    for label, ys in curves.items():
        ax.plot(range(len(ys)), list(ys), label=label)
    if hline is not None:
        ax.axhline(hline, color="0.4", ls="--", lw=1, label=hline_label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)

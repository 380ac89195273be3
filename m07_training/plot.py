"""Lessons 5 and 6: a finished run in one picture: its losses, learning rate and gradient norm per
update, with what the training doctor found shaded where it found it (plot_run, and the command
`m07-plot`). The figure is a matplotlib Figure made without pyplot, so it needs no display."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from .checkpoint import read_checkpoint
from .doctor import SMOOTH_UPDATES, Finding, diagnose, read_history, trailing_mean
from .sampling import find_checkpoint

if TYPE_CHECKING:
    from .loop import TrainResult

FINDING_COLORS = ("tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


class PlainLogFormatter(LogFormatter):
    """The ticks of a log axis that matplotlib would label, labelled as plain numbers (0.6, not 6e-01)."""

    def __call__(self, x, pos=None):
        return f"{x:g}" if super().__call__(x, pos) else ""


def run_facts(source) -> dict:
    """What diagnose() can use beyond the history: the alphabet's size (and, from a TrainResult, the
    unigram loss; from an out_dir's checkpoint, the clipping norm). {} where nothing is known."""
    if getattr(source, "tokenizer", None) is not None:  # a TrainResult
        facts = {"vocab_size": source.tokenizer.vocab_size}
        if math.isfinite(getattr(source, "unigram_loss", math.nan)):
            facts["unigram_loss"] = source.unigram_loss
        return facts
    if not isinstance(source, (str, Path)):
        return {}
    folder = Path(source) if Path(source).is_dir() else Path(source).parent
    try:
        extra = read_checkpoint(find_checkpoint(folder), map_location="cpu")["extra"]
    except (OSError, ValueError):  # no checkpoint beside the history, or an unusable one: the history alone
        return {}
    facts = {}
    if isinstance(extra.get("chars"), list) and len(extra["chars"]) >= 2:
        facts["vocab_size"] = len(extra["chars"])
    clip = extra.get("config", {}).get("grad_clip") if isinstance(extra.get("config"), dict) else None
    if isinstance(clip, (int, float)) and not isinstance(clip, bool) and clip >= 0:
        facts["grad_clip"] = float(clip)
    return facts


def column(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of the rows with a finite number under `key`."""
    points = [(row["step"], float(row[key])) for row in rows
              if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]
    steps, values = zip(*points) if points else ((), ())
    return np.array(steps, dtype=int), np.array(values, dtype=float)


def draw_losses(ax, rows: list[dict], facts: dict) -> None:
    steps = np.array([row["step"] for row in rows])
    losses = np.array([row["loss"] for row in rows], dtype=float)
    bad = np.flatnonzero(~np.isfinite(losses))
    good = slice(0, bad[0]) if len(bad) else slice(None)  # the curve ends where the loss stopped being finite
    ax.plot(steps[good], losses[good], color="tab:blue", alpha=0.3, lw=0.8, label="train loss (one batch)",
            marker="o" if len(losses[good]) == 1 else None)  # a single update is a point, not a line
    if len(losses[good]):
        ax.plot(steps[good], trailing_mean(losses[good]), color="tab:blue", lw=1.8,
                label=f"train loss (mean of {SMOOTH_UPDATES})")
    if len(bad):
        ax.plot([steps[bad[0]]], [1.0], "x", color="tab:red", ms=10, mew=2.5, clip_on=False,
                transform=ax.get_xaxis_transform(), label=f"non-finite loss at update {steps[bad[0]]:,}")
    # val as open circles around train's small squares: both show where the two losses agree
    for key, style, name in (("train_loss", dict(marker="s", ms=4, color="tab:green"), "train"),
                             ("val_loss", dict(marker="o", ms=8, mew=1.5, mfc="none", color="black"), "val")):
        eval_steps, values = column(rows, key)
        if len(values):
            ax.plot(eval_steps, values, ls="--", lw=1, label=f"{name} loss at evaluations", zorder=3, **style)
    if "unigram_loss" in facts:
        ax.axhline(facts["unigram_loss"], color="0.5", ls=":", lw=1.2,
                   label=f"unigram loss {facts['unigram_loss']:.2f} (letter frequencies)")
    if "vocab_size" in facts:
        ln_v = math.log(facts["vocab_size"])
        ax.axhline(ln_v, color="0.5", ls="-.", lw=1, label=f"ln V = {ln_v:.2f} (a uniform guess)")
    ax.set_ylabel("loss (nats per token)")


def draw_series(ax, rows: list[dict], key: str, label: str, *, log: bool, smooth: bool) -> None:
    steps, values = column(rows, key)
    if log:
        steps, values = steps[values > 0], values[values > 0]
    if not len(values):
        ax.text(0.5, 0.5, f"no {key} in this history", ha="center", va="center", transform=ax.transAxes, color="0.4")
        ax.set_yticks([])
    else:
        ax.plot(steps, values, color="tab:gray" if smooth else "tab:blue", lw=0.8 if smooth else 1.5,
                alpha=0.6 if smooth else 1.0, label=label + (" (one update)" if smooth else ""))
        if smooth:
            ax.plot(steps, trailing_mean(values), color="black", lw=1.5, label=f"{label} (mean of {SMOOTH_UPDATES})")
        if log:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(PlainLogFormatter())
            ax.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
    ax.set_ylabel(label)


def shade_findings(axes, findings: list[Finding], span_of_run: tuple[int, int]) -> None:
    """A shaded span per finding over its updates (at least 1% of the run wide, so that one update
    shows), its problem named at the top of the loss panel and in its legend."""
    width = max(span_of_run[1] - span_of_run[0], 1) * 0.01
    for number, finding in enumerate((f for f in findings if f.problem != "healthy"), start=1):
        first, last = finding.steps
        middle, half = (first + last) / 2, max((last - first) / 2, width / 2)
        color = FINDING_COLORS[(number - 1) % len(FINDING_COLORS)]
        where = f"update {first:,}" if first == last else f"updates {first:,}-{last:,}"
        for ax in axes:
            ax.axvspan(middle - half, middle + half, color=color, alpha=0.15, lw=0,
                       label=f"doctor {number}: {finding.problem} ({where})" if ax is axes[0] else None)
        # labels step down the panel, so that findings close together do not write over each other,
        # and lean away from the panel's edges, so that none is cut off
        place = (middle - span_of_run[0]) / max(span_of_run[1] - span_of_run[0], 1)
        axes[0].text(middle, 0.98 - 0.07 * (number - 1), f"{number}. {finding.problem}",
                     transform=axes[0].get_xaxis_transform(), va="top", fontsize=8, color=color,
                     ha="right" if place > 0.8 else "left" if place < 0.2 else "center",
                     bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1})


def plot_run(source: TrainResult | list[dict] | str | Path, path: str | Path | None = None) -> Figure:
    """One figure of a run: the training loss per update (raw, light, and its trailing mean), the
    train and val losses at evaluations, the learning rate, and the gradient norm (log scale), all
    against updates, with the training doctor's findings (diagnose) shaded over their updates.

    source: a TrainResult, its history rows, a history.jsonl file or the out_dir that holds one (see
    read_history; an out_dir's checkpoint gives the doctor the alphabet's size and the clipping
    norm). path: where to save the figure as PNG (its folder must exist). Returns the Figure.
    """
    rows = read_history(source)
    if path is not None and not Path(path).parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: there is no folder {Path(path).parent}")
    facts = run_facts(source)
    findings = diagnose(rows, **facts)
    fig = Figure(figsize=(10, 7.5), layout="constrained")
    loss_ax, lr_ax, norm_ax = fig.subplots(3, 1, sharex=True, height_ratios=(3, 1, 1.5))
    draw_losses(loss_ax, rows, facts)
    draw_series(lr_ax, rows, "lr", "learning rate", log=False, smooth=False)
    draw_series(norm_ax, rows, "grad_norm", "gradient norm", log=True, smooth=True)
    first, last = rows[0]["step"], rows[-1]["step"]
    shade_findings((loss_ax, lr_ax, norm_ax), findings, (first, last))
    for ax in (loss_ax, lr_ax, norm_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)
    norm_ax.set_xlabel("update")
    pad = max(0.5, 0.01 * (last - first))  # room for the markers of the first and last evaluations
    norm_ax.set_xlim(first - pad, last + pad)
    name = str(source) if isinstance(source, (str, Path)) else "the run"
    verdict = ", ".join(dict.fromkeys(f.problem for f in findings))
    fig.suptitle(f"{name}: {len(rows):,} update{'s' if len(rows) > 1 else ''}; training doctor: {verdict}", fontsize=11)
    if path is not None:
        try:
            fig.savefig(path, format="png", dpi=110)
        except OSError as error:
            raise OSError(f"could not write {path} ({error.strerror or error})") from None
    return fig


def main(argv: list[str] | None = None) -> int:
    """`m07-plot OUT_DIR_OR_HISTORY [-o PNG]`: draw a run (plot_run), save it and print where; the exit status."""
    parser = argparse.ArgumentParser(
        prog="m07-plot", description="Draw a training run's losses, learning rate and gradient norm, "
        "with what the training doctor found, into a PNG.",
        epilog="exit status: 0 the PNG was written; 1 an unusable history or output path, named on stderr; "
               "2 a bad flag")
    parser.add_argument("source", metavar="OUT_DIR_OR_HISTORY", help="a run's out_dir or its history.jsonl")
    parser.add_argument("-o", "--output", metavar="PNG",
                        help="where to write the picture (default: history.png beside the history)")
    args = parser.parse_args(argv)
    source = Path(args.source)
    output = Path(args.output) if args.output else (source / "history.png" if source.is_dir()
                                                    else source.with_name("history.png"))
    try:
        plot_run(source, output)
    except (OSError, ValueError) as error:
        print("error: " + (" ".join(str(error).split()) or type(error).__name__), file=sys.stderr)
        return 1
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

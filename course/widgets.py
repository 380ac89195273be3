"""Interactive explorers for the lessons (ipywidgets: Jupyter, JupyterLab, VS Code and Colab).

Widgets need a running Python kernel, so they do nothing on the static website;
the website has its own in-browser (Observable JS) explorer for the same schedules.
"""

import ipywidgets as widgets
import matplotlib.pyplot as plt

import training

__all__ = ["lr_schedule_explorer", "plot_lr_schedule"]

# The schedule kinds the explorer offers: the library's own, {"cosine": cosine_lr, "linear": linear_lr}.
SCHEDULES = training.SCHEDULES


def plot_lr_schedule(ax, kind, *, max_lr, min_lr, warmup_steps, total_steps, marked_step=None):
    """Draw the learning rate of schedule ``kind`` at every step 0..total_steps on ``ax``.

    The curve is computed by the library's own schedule function, step by step.
    ``marked_step`` (optional) gets a dot and its exact learning rate in the title.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"kind must be one of {sorted(SCHEDULES)}, got {kind!r}")
    schedule = SCHEDULES[kind]
    settings = dict(max_lr=max_lr, min_lr=min_lr, warmup_steps=warmup_steps, total_steps=total_steps)
    steps = range(total_steps + 1)
    ax.plot(steps, [schedule(step, **settings) for step in steps], label=f"warmup + {kind}")
    if warmup_steps > 0:
        ax.axvline(warmup_steps, color="grey", linestyle=":", linewidth=1, label="end of warmup")
    title = f"warmup + {kind}"
    if marked_step is not None:
        lr = schedule(marked_step, **settings)
        ax.plot([marked_step], [lr], "o", color="crimson")
        title += f": LR at step {marked_step} = {lr:.3g}"
    ax.set(xlabel="step", ylabel="learning rate", title=title)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.legend(loc="upper right")


def lr_schedule_explorer(*, max_lr=1e-3, min_lr=1e-5, warmup_steps=100, total_steps=1000, kind="cosine"):
    """Sliders for max/min LR, warmup and total steps, a schedule-kind menu and a step
    to inspect, redrawing a matplotlib plot of the schedule on every change.

    Returns the widget; display it by making it the last expression of a cell.
    Warmup is capped at the total and min LR at max LR, so every setting shown is valid.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"kind must be one of {sorted(SCHEDULES)}, got {kind!r}")
    if not 0 < min_lr <= max_lr:
        raise ValueError(f"need 0 < min_lr <= max_lr, got min_lr={min_lr}, max_lr={max_lr}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps, got {warmup_steps} and {total_steps}")

    style = {"description_width": "11em"}  # wide enough for "decay after warmup", the longest label
    layout = widgets.Layout(width="34em")
    controls = {
        "kind": widgets.Dropdown(options=list(SCHEDULES), value=kind, description="decay after warmup",
                                 style=style, layout=widgets.Layout(width="20em")),
        "max_lr": widgets.FloatLogSlider(value=max_lr, base=10, min=-5, max=-1, step=0.1, readout_format=".1e",
                                         description="max LR", style=style, layout=layout),
        "min_lr": widgets.FloatLogSlider(value=min_lr, base=10, min=-7, max=-1, step=0.1, readout_format=".1e",
                                         description="min LR", style=style, layout=layout),
        "total_steps": widgets.IntSlider(value=total_steps, min=10, max=5000, step=10,
                                         description="total steps", style=style, layout=layout),
        "warmup_steps": widgets.IntSlider(value=warmup_steps, min=0, max=total_steps,
                                          description="warmup steps", style=style, layout=layout),
        "marked_step": widgets.IntSlider(value=warmup_steps, min=0, max=total_steps,
                                         description="inspect step", style=style, layout=layout),
    }

    def keep_consistent(_change):
        # The step sliders cannot pass the end of training, and the floor cannot exceed the peak.
        total = controls["total_steps"].value
        controls["warmup_steps"].max = total
        controls["marked_step"].max = total
        controls["min_lr"].value = min(controls["min_lr"].value, controls["max_lr"].value)

    for name in ("total_steps", "max_lr", "min_lr"):
        controls[name].observe(keep_consistent, names="value")

    def redraw(kind, max_lr, min_lr, warmup_steps, total_steps, marked_step):
        fig, ax = plt.subplots(figsize=(7, 3.2))
        plot_lr_schedule(ax, kind, max_lr=max_lr, min_lr=min(min_lr, max_lr),
                         warmup_steps=min(warmup_steps, total_steps), total_steps=total_steps,
                         marked_step=min(marked_step, total_steps))
        fig.tight_layout()
        plt.show()

    plot = widgets.interactive_output(redraw, controls)
    return widgets.VBox([widgets.VBox(list(controls.values())), plot])

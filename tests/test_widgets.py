"""course.widgets: lesson 03's ipywidgets LR explorer, driven without a browser.

Changing a control runs the explorer's callbacks in-process (no front end needed), so these
check what a reader sees: the plotted curve is the library's schedule, and the controls keep
every combination valid.
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

import training  # noqa: E402
from course.widgets import lr_schedule_explorer  # noqa: E402


@pytest.fixture
def explorer():
    plt.close("all")
    box = lr_schedule_explorer(max_lr=1e-3, min_lr=1e-5, warmup_steps=100, total_steps=1000)
    yield {control.description: control for control in box.children[0].children}
    plt.close("all")


def drawn_curve():
    """The schedule line of the figure the explorer drew last."""
    return plt.gcf().axes[0].lines[0].get_ydata()


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_moving_a_slider_redraws_the_library_schedule(explorer, kind):
    explorer["decay after warmup"].value = kind
    explorer["warmup steps"].value = 300
    settings = dict(max_lr=1e-3, min_lr=1e-5, warmup_steps=300, total_steps=1000)
    assert list(drawn_curve()) == [training.SCHEDULES[kind](step, **settings) for step in range(1001)]


def test_controls_keep_settings_valid(explorer):
    explorer["total steps"].value = 50
    assert explorer["warmup steps"].max == explorer["inspect step"].max == 50
    assert explorer["warmup steps"].value == 50  # was 100: clamped to the new total
    explorer["min LR"].value = 1e-2
    explorer["max LR"].value = 1e-4
    assert explorer["min LR"].value == pytest.approx(1e-4)
    assert len(drawn_curve()) == 51


def test_bad_starting_settings_are_refused():
    with pytest.raises(ValueError, match="min_lr"):
        lr_schedule_explorer(max_lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_schedule_explorer(warmup_steps=200, total_steps=100)
    with pytest.raises(ValueError, match="kind"):
        lr_schedule_explorer(kind="step")

"""Lesson 03's Observable JS explorer, run in a real browser (Debian's chromium, headless).

By default the page is harness.html: it runs the explorer's OJS source exactly as stored in the
notebook, with the Observable parser, runtime, stdlib, Inputs and Plot from
tests/browser/node_modules (pinned in package-lock.json; `bash tests/browser/setup.sh` installs
them and chromium), fed with the notebook's stored `ojs_define` output, read the way Quarto's page
reads it. The repository root is served over loopback (the OJS runtime refuses file:// pages) and
the OJS imports resolve against the address the rendered lesson will have,
lessons/03-lr-schedules.html, so `../site/schedule.js` must be where the site puts it. No request
may leave the loopback server.

With RENDERED_SITE=DIR (the site workflow, after `quarto render`), the same checks run on
DIR/lessons/03-lr-schedules.html as Quarto rendered it, with Quarto's own OJS runtime (which loads
Plot and Inputs from its CDN, so requests may leave loopback there).

The test drags a slider with the mouse and reads the plotted curve back from the SVG (path
vertices mapped through the plot's own scales): it must change, and match training.cosine_lr.
"""
import functools
import http.server
import json
import math
import os
import re
import threading
from pathlib import Path

import pytest

import training

playwright_api = pytest.importorskip("playwright.sync_api")

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
LESSON = REPO / "lessons" / "03-lr-schedules.ipynb"
LESSON_PAGE = "lessons/03-lr-schedules.html"  # where Quarto renders the lesson
RENDERED_SITE = os.environ.get("RENDERED_SITE")  # a `quarto render` output folder, or None
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = HERE / "artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

BROWSER_MISSING = not Path(CHROMIUM).exists() or not (RENDERED_SITE or (HERE / "node_modules").is_dir())
if BROWSER_MISSING and os.environ.get("CI") == "true":
    # CI runs as root, so setup.sh can always install the tools there: a skip would hide a broken setup.
    raise RuntimeError("CI=true but chromium or tests/browser/node_modules is missing: tests/browser/setup.sh failed")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(BROWSER_MISSING, reason="needs /usr/bin/chromium (Debian's package, root to install) and "
                                               "tests/browser/node_modules: run `bash tests/browser/setup.sh`"),
]


def lesson_cells():
    return json.loads(LESSON.read_text(encoding="utf-8"))["cells"]


def stored_ojs_source():
    """The body of the notebook's one ```{ojs} cell, exactly as stored."""
    fenced = [cell for cell in lesson_cells() if cell["cell_type"] in ("markdown", "raw")
              and "".join(cell["source"]).startswith("```{ojs}")]
    assert len(fenced) == 1, "lesson 03 must have exactly one ```{ojs} cell"
    lines = "".join(fenced[0]["source"]).rstrip().splitlines()
    assert lines[-1] == "```"
    return "\n".join(lines[1:-1])


def stored_ojs_define_html():
    """The stored outputs that Quarto hands to the page's OJS (metadata {"ojs_define": true})."""
    html = ["".join(output["data"]["text/html"]) for cell in lesson_cells() if cell["cell_type"] == "code"
            for output in cell.get("outputs", []) if output.get("metadata", {}).get("ojs_define")]
    assert html, "lesson 03 has no stored ojs_define output: execute the notebook"
    return "\n".join(html)


def published_settings():
    """The explorer's starting settings, as the notebook published them with ojs_define."""
    payload = json.loads(re.search(r"<script[^>]*>(.*?)</script>", stored_ojs_define_html(), re.S)[1])
    return {item["name"]: item["value"] for item in payload["contents"]}["lr_explorer_settings"]


@pytest.fixture(scope="module")
def server():
    """The repository root (or RENDERED_SITE) over loopback http, on a free port."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(RENDERED_SITE or REPO))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def page(server):
    """The explorer running in chromium, all cells settled without errors."""
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 820, "height": 900})
        outside, page_errors, console_errors = [], [], []
        page.on("pageerror", lambda error: page_errors.append(str(error)))
        if RENDERED_SITE:
            page.goto(f"{server}/{LESSON_PAGE}")
        else:
            # Everything must come from the loopback server: no CDN, no network.
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(server)
                       else (outside.append(route.request.url), route.abort()))
            page.on("console", lambda message: message.type == "error" and console_errors.append(message.text))
            page.goto(f"{server}/tests/browser/harness.html")
            page.wait_for_function("window.harnessReady === true")
            page.evaluate("html => { document.getElementById('outputs').innerHTML = html; }",
                          stored_ojs_define_html())
            page.evaluate("([source, url]) => runOjs(source, url)",
                          [stored_ojs_source(), f"{server}/{LESSON_PAGE}"])
        settle(page)
        yield page
        assert not outside, f"the explorer requested outside addresses: {outside}"
        assert not page_errors + console_errors, f"browser errors: {page_errors + console_errors}"
        browser.close()


def settle(page, previous_path=None):
    """Wait until the plot is drawn (and differs from previous_path) and the readout is there."""
    page.wait_for_function("""previous => {
        const path = document.querySelector('svg g[aria-label=line] path');
        return document.querySelector('.observablehq--error, .ojs-error') !== null
            || (path !== null && path.getAttribute('d') !== previous
                && document.querySelector('.lr-readout') !== null);
    }""", arg=previous_path)
    page.wait_for_timeout(200)  # let the runtime finish the batch it is computing
    errors = page.locator(".observablehq--error, .ojs-error").all_inner_texts()
    if not RENDERED_SITE:
        errors += page.evaluate("window.__ojs.errors")
    assert not errors, f"OJS cells failed: {errors}"


def slider(page, label):
    return page.locator("form").filter(has=page.locator("label", has_text=label))


def plotted_curve(page):
    """The schedule as drawn: (step, lr) for every vertex of the line's SVG path, via the plot's scales."""
    drawn = page.evaluate("""() => {
        const path = document.querySelector('svg g[aria-label=line] path');
        const plot = path.closest('svg');
        const {domain: xd, range: xr} = plot.scale('x'), {domain: yd, range: yr} = plot.scale('y');
        return {d: path.getAttribute('d'), xd, xr, yd, yr};
    }""")
    numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", drawn["d"])]
    assert re.fullmatch(r"M[-\d.,e]+(L[-\d.,e]+)*", drawn["d"]), "expected a straight-segment path"

    def invert(pixel, domain, range_):
        return domain[0] + (pixel - range_[0]) / (range_[1] - range_[0]) * (domain[1] - domain[0])

    points = [(invert(x, drawn["xd"], drawn["xr"]), invert(y, drawn["yd"], drawn["yr"]))
              for x, y in zip(numbers[::2], numbers[1::2])]
    # Half a pixel of rounding in the path, in data units.
    tolerance = 0.5 * abs((drawn["yd"][1] - drawn["yd"][0]) / (drawn["yr"][1] - drawn["yr"][0]))
    return points, tolerance


def line_path(page):
    return page.locator("svg g[aria-label=line] path").get_attribute("d")


def current_settings(page):
    """The settings on screen: the published ones, with warmup as its number box shows it now.

    Only the warmup slider moves in these tests, and it stays below the total, so the explorer
    uses it as shown (it clamps warmup to the total steps).
    """
    warmup = int(slider(page, "warmup steps").locator("input[type=number]").input_value())
    return {**published_settings(), "warmup_steps": warmup}


def assert_curve_is(page, schedule, settings):
    points, tolerance = plotted_curve(page)
    assert len(points) == settings["total_steps"] + 1
    for step in sorted({0, 1, settings["warmup_steps"] // 2, settings["warmup_steps"],
                        (settings["warmup_steps"] + settings["total_steps"]) // 2, settings["total_steps"]}):
        x, y = points[step]
        assert x == pytest.approx(step, abs=0.01)
        assert y == pytest.approx(schedule(step, **settings), abs=tolerance), f"step {step}"
    if RENDERED_SITE:
        return  # Quarto's runtime keeps its variables to itself; the drawn path was checked above
    # The data behind the line, exactly: site/schedule.js mirrors training.py's float64 arithmetic.
    curve = page.evaluate("window.__ojs.values.lrCurve")
    expected = [schedule(step, **settings) for step in range(settings["total_steps"] + 1)]
    assert all(math.isclose(row["lr"], want, rel_tol=1e-15, abs_tol=0) for row, want in zip(curve, expected))


def test_explorer_starts_from_the_notebook_settings(page):
    published = published_settings()
    assert current_settings(page) == published
    if not RENDERED_SITE:  # what the page's OJS computed from the stored ojs_define output
        lr_settings = page.evaluate("window.__ojs.values.lrSettings")
        assert lr_settings == dict(maxLr=published["max_lr"], minLr=published["min_lr"],
                                   warmupSteps=published["warmup_steps"], totalSteps=published["total_steps"])
    assert_curve_is(page, training.cosine_lr, published)
    # The explorer's own check against the reference rates the notebook computed in Python.
    agreement = page.locator(".lr-agreement").inner_text()
    assert float(re.search(r"by at most ([\d.e+-]+)", agreement)[1]) <= 1e-18


def test_dragging_the_warmup_slider_redraws_the_schedule(page):
    before, before_path = plotted_curve(page)[0], line_path(page)
    track = slider(page, "warmup steps").locator("input[type=range]")
    box = track.bounding_box()
    # Drag the thumb with the mouse, as a reader would: press on it (at 100 of 0..5000; a click
    # elsewhere on the track would jump instead) and move it 5 pixels right, about +200 steps.
    # Chromium's thumb is as wide as the track is high, so its centre runs from x + h/2 to x + w - h/2.
    half_thumb = box["height"] / 2
    thumb = box["x"] + half_thumb + 100 / 5000 * (box["width"] - 2 * half_thumb)
    middle = box["y"] + box["height"] / 2
    page.mouse.move(thumb, middle)
    page.mouse.down()
    page.mouse.move(thumb + 5, middle, steps=5)
    page.mouse.up()
    settle(page, previous_path=before_path)
    settings = current_settings(page)
    assert 150 <= settings["warmup_steps"] <= 450, "the thumb should have moved about +200 steps"
    if not RENDERED_SITE:
        assert page.evaluate("window.__ojs.values.lrSettings.warmupSteps") == settings["warmup_steps"]
    after, _ = plotted_curve(page)
    assert after != before
    assert_curve_is(page, training.cosine_lr, settings)

    cosine_path = line_path(page)
    page.get_by_label("warmup + linear").check()
    settle(page, previous_path=cosine_path)
    assert_curve_is(page, training.linear_lr, current_settings(page))
    linear_path = line_path(page)
    page.get_by_label("warmup + cosine").check()
    settle(page, previous_path=linear_path)

    ARTIFACTS.mkdir(exist_ok=True)
    name = "lr-explorer-rendered.png" if RENDERED_SITE else "lr-explorer.png"
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)
    readout = page.locator(".lr-readout").inner_text()
    assert readout.startswith("warmup + cosine: LR at step 550 =")


"""site/schedule.js (the website explorer's schedule math) agrees with training.py.

The explorer's curve is computed in the reader's browser, so it must be the same
function as training.cosine_lr / training.linear_lr. Node runs the ES module on
boundary and random settings; Python computes the reference values.
"""

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

import training

SCHEDULE_JS = Path(__file__).resolve().parent.parent / "site" / "schedule.js"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")

# Reads [[kind, step, settings], ...] on stdin, prints the learning rates as JSON.
RUNNER = f"""
import {{cosineLr, linearLr}} from {json.dumps(SCHEDULE_JS.as_uri())};
const schedules = {{cosine: cosineLr, linear: linearLr}};
let input = "";
for await (const chunk of process.stdin) input += chunk;
const out = JSON.parse(input).map(([kind, step, settings]) => schedules[kind](step, settings));
process.stdout.write(JSON.stringify(out));
"""


def run_js(cases):
    completed = subprocess.run(
        [NODE, "--input-type=module", "-e", RUNNER],
        input=json.dumps(cases), capture_output=True, text=True, check=True, timeout=60,
    )
    return json.loads(completed.stdout)


def schedule_cases():
    """(step, settings) pairs: every boundary of several settings, plus random ones."""
    rng = random.Random(0)
    settings = [
        dict(max_lr=1e-3, min_lr=1e-5, warmup_steps=100, total_steps=1000),
        dict(max_lr=6e-4, min_lr=0.0, warmup_steps=0, total_steps=500),    # no warmup
        dict(max_lr=3e-4, min_lr=3e-5, warmup_steps=1, total_steps=2),     # shortest decay
        dict(max_lr=1e-2, min_lr=1e-2, warmup_steps=10, total_steps=50),   # flat after warmup
    ]
    for _ in range(20):
        total = rng.randint(1, 5000)
        max_lr = 10 ** rng.uniform(-5, -1)
        settings.append(dict(max_lr=max_lr, min_lr=max_lr * rng.choice([0.0, 0.01, 0.1]),
                             warmup_steps=rng.randint(0, total), total_steps=total))
    cases = []
    for s in settings:
        warmup, total = s["warmup_steps"], s["total_steps"]
        boundaries = {0, warmup - 1, warmup, warmup + 1, total - 1, total, total + 1, 2 * total + 7}
        steps = {step for step in boundaries if step >= 0} | {rng.randint(0, total) for _ in range(10)}
        cases += [(step, s) for step in sorted(steps)]
    return cases


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_js_matches_training(kind):
    python_schedule = {"cosine": training.cosine_lr, "linear": training.linear_lr}[kind]
    cases = schedule_cases()
    js_settings = [
        dict(maxLr=s["max_lr"], minLr=s["min_lr"], warmupSteps=s["warmup_steps"], totalSteps=s["total_steps"])
        for _, s in cases
    ]
    got = run_js([[kind, step, js] for (step, _), js in zip(cases, js_settings)])
    assert len(got) == len(cases) > 300
    for (step, s), lr in zip(cases, got):
        expected = python_schedule(step, **s)
        # Same float64 formula in both languages; only Math.cos and C's cos may differ,
        # by an ulp or so (~2e-16 relative), hence a tolerance far below any visible change.
        assert lr == pytest.approx(expected, rel=1e-12, abs=1e-18), (kind, step, s)


def test_schedule_js_rejects_bad_settings():
    script = f"""
import {{cosineLr}} from {json.dumps(SCHEDULE_JS.as_uri())};
const good = {{maxLr: 1e-3, minLr: 0, warmupSteps: 10, totalSteps: 100}};
const bad = [[-1, good], [5, {{...good, warmupSteps: 200}}], [5, {{...good, minLr: 1}}]];
console.log(JSON.stringify(bad.map(([step, s]) => {{ try {{ cosineLr(step, s); return null; }} catch (e) {{ return e.message; }} }})));
"""
    out = subprocess.run([NODE, "--input-type=module", "-e", script], capture_output=True, text=True,
                         check=True, timeout=60)
    messages = json.loads(out.stdout)
    assert "step" in messages[0] and "totalSteps" in messages[1] and "minLr" in messages[2]

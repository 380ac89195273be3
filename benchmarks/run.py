"""Benchmarks of training.py on this machine, each figure a ratio against a baseline measured
in the same run. Writes BENCHMARKS.md (tables, settings, versions) and PNG plots.

    python benchmarks/run.py            # full run, about 35 minutes on a 2-core CPU -> benchmarks/
    python benchmarks/run.py --quick    # smoke run, 1-2 minutes (tiny sizes) -> benchmarks/quick/
    python benchmarks/run.py --gpu-only # section 6 alone on a CUDA machine -> benchmarks/GPU.md
    python benchmarks/run.py --only threads  # one section (its key) again, replaced in BENCHMARKS.md

A full run spends most of its time training: section 5 (1 and 2 minutes), 5b (four 3-minute runs)
and 7 (lesson 8's recipe against the one before it: each as the default run and for 5 minutes);
the rest mostly compiling (section 3) and starting processes (section 4). Sections 1-5 use the
shape and batch of TrainConfig's defaults, read when the script starts. Timings need a quiet
machine: anything else running inflates them unevenly.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from unittest import mock

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import training  # noqa: E402
from course import perf  # noqa: E402
from course.plots import plot_val_against_seconds  # noqa: E402
from m06_transformer import GPT, GPTConfig, create_gpt_tiny  # noqa: E402
from m07_training.ngram import rung_name  # noqa: E402
from m07_training.threads import available_cores  # noqa: E402

HERE = Path(__file__).resolve().parent
# Seconds each section took in the last full run on a quiet 2-core CPU: the progress lines' estimates.
FULL_RUN_SECONDS = {"overhead": 18, "optimizer": 1, "muon": 31, "speedups": 22, "scaling": 39, "ddp": 18,
                    "quality": 184, "depth": 663, "nanogpt": 42, "gpu": 0, "speedrun": 1066, "threads": 600,
                    "counting": 2100}
# The two recipes of the speedrun section, named by what they are (not by when they were the default).
ADAMW_LABEL, DEFAULT_LABEL = "ADAMW_RECIPE (lessons 1-7)", "TrainConfig() (python training.py)"
# Sizes per mode. "model" is the GPT of the timed runs (training.MODEL_FIELDS): in full mode TrainConfig's
# defaults, read at run time (see main), so the benchmark follows any retuning; in quick mode a tiny
# shape with TrainConfig's architecture options.
MODES = {
    "full": dict(model=None, batch=None, overhead_rounds=3,
                 trainer_steps=40, optimizer_repeats=30, step_repeats=8, compile=True,
                 batches=None, contexts=None, scaling_steps=6,
                 ddp_steps=30, budgets_min=[1, 2], default_run={}, depths=[1, 2, 3, 4],
                 depth_budget_min=3, nanogpt_steps=100, speedrun_min=5, speedrun_eval_interval=250,
                 threads_steps=300, threads_rounds=3, seeds=[1337, 1, 2]),
    "quick": dict(model=dict(context_length=32, d_model=32, n_layers=2, n_heads=2, d_ff=64, dropout=0.0),
                  batch=8, overhead_rounds=2, trainer_steps=8, optimizer_repeats=3, step_repeats=2, compile=False,
                  batches=[4, 8], contexts=[16, 32], scaling_steps=2,
                  ddp_steps=4, budgets_min=[0.05], default_run=dict(max_steps=10, warmup_steps=1, eval_interval=10),
                  depths=[1, 2], depth_budget_min=0.03, nanogpt_steps=5, speedrun_min=0.05, speedrun_eval_interval=5,
                  threads_steps=20, threads_rounds=1, seeds=[1337]),
}
# nanoGPT's CPU config from its README (shakespeare_char, --device=cpu): 4 layers, 4 heads,
# 128 embedding, context 64, batch 12, no dropout, GELU, no QK-norm, AdamW. d_ff is nanoGPT's 4 x embedding.
NANOGPT_SHAPE = dict(n_layers=4, n_heads=4, d_model=128, d_ff=512, context_length=64, dropout=0.0,
                     mlp_activation="gelu", qk_norm=False)
NANOGPT_BATCH = 12
EXPECTED_MINUTES = {"full": 75, "quick": 3}
# Reported for nanoGPT's train.py with its CPU config on the same plays, on another 2-core x86 machine
# (Intel, AVX-512) when this benchmark was planned; not measured here, so only as good as the two machines are alike.
NANOGPT_QUOTED = dict(tokens_per_s=25_000, points=[(73, 1.875), (274, 1.603)])


def fmt(x, digits=3):
    return f"{x:,.{digits}g}" if abs(x) < 10 ** digits else f"{x:,.0f}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def hand_step(model, optimizer, data, batch, context, device, dtype, generator):
    """One update of a minimal hand-written loop: batch, forward, F.cross_entropy, backward,
    clip, step. Returns the loss tensor (not read back, so no device sync)."""
    x, y = training.get_batch(data, batch, context, device, generator)
    with training.autocast(device, dtype):
        logits = model(x)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def cli_flags(settings):
    """TrainConfig settings as training.py flags (a boolean as --name or --no-name)."""
    def flag(key, value):
        name = key.replace("_", "-")
        return f"--{name}" if value is True else f"--no-{name}" if value is False else f"--{name}={value}"
    return [flag(key, value) for key, value in settings.items()]


def make_model(vocab, device, seed=1337, **shape):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, **shape)).to(device)


# ---------------------------------------------------------------------------------------- 1
def hand_loop_vs_trainer(shape, batch, steps, rounds, corpus, device, dtype, out_dir, optimizer):
    """Best tokens/s of the hand loop and of train() over `rounds` alternating runs of `steps`
    updates each (same model, batch, dtype, optimizer). Alternating and keeping the best of
    each side stops the first run's one-off costs and background load from favouring one."""
    config = training.TrainConfig(out_dir=str(out_dir), batch_size=batch, max_steps=steps, warmup_steps=0,
                                  eval_interval=steps, eval_batches=1, sample_chars=0, progress=False,
                                  device=str(device), overwrite=True, optimizer=optimizer,
                                  **shape)  # one out_dir for every round
    hand, trainer = [], []
    for _ in range(rounds):
        torch.manual_seed(1337)
        model = GPT(training.gpt_config(config, corpus.tokenizer.vocab_size)).to(device)  # the model train() builds
        optimizer, _ = training.build_optimizer(model, config, device)
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        for _ in range(steps):
            loss = hand_step(model, optimizer, corpus.train_ids, batch, shape["context_length"], device, dtype,
                             generator)
        loss.item()  # waits for the device
        hand.append(steps * batch * shape["context_length"] / (time.perf_counter() - start))
        result = training.train(config)
        trainer.append(result.tokens_per_second)
    return max(hand), max(trainer), result.optimizer_name


def trainer_overhead(mode, corpus, device, dtype, workdir):
    shape, batch, steps, rounds = mode["model"], mode["batch"], mode["trainer_steps"], mode["overhead_rounds"]
    hand, trainer, optimizer_name = hand_loop_vs_trainer(shape, batch, steps, rounds, corpus, device, dtype,
                                                         workdir / "overhead", training.TrainConfig().optimizer)
    rows = [["minimal hand-written loop (baseline)", fmt(hand), "1.00"],
            ["training.train()", fmt(trainer), f"{trainer / hand:.2f}"]]
    text = (f"Same model, batch ({batch} x {shape['context_length']} tokens), dtype and optimizer "
            f"({optimizer_name}); best of {rounds} alternating runs of {steps} updates each, first update "
            "included. The hand loop uses F.cross_entropy and clip_grad_norm_; train() adds its own loss, LR "
            "schedule, GradScaler bookkeeping and seeded per-micro-batch generators. Goal: ratio >= 0.95.\n\n")
    return text + table(["loop", "tokens/s", "ratio"], rows), trainer / hand


# ---------------------------------------------------------------------------------------- 2
def optimizer_steps(mode, device):
    variants = {
        "training.AdamW, per-parameter loop": lambda ps: training.AdamW(ps, lr=1e-3),
        "training.AdamW, multi-tensor": lambda ps: training.AdamW(ps, lr=1e-3, foreach=True),
        "torch.optim.AdamW, for-loop": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False),
        "torch.optim.AdamW, foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "torch.optim.AdamW, fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    }
    model = create_gpt_tiny(vocab_size=100).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    params = list(model.parameters())
    times = {}
    for name, build in variants.items():
        try:
            optimizer = build(params)
            times[name] = perf.time_call(optimizer.step, device, warmup=3, repeats=mode["optimizer_repeats"])
        except (RuntimeError, ValueError) as error:  # fused needs a device that has the kernel
            times[name] = None
            print(f"  {name}: not available here ({str(error).splitlines()[0]})")
    base = times["torch.optim.AdamW, foreach"]
    rows = [[name, "n/a" if t is None else f"{t * 1e3:.2f}", "n/a" if t is None else f"{t / base:.2f}"]
            for name, t in times.items()]
    c = model.config
    text = (f"One AdamW step over the {sum(p.numel() for p in params):,} parameters of module 06's tiny GPT "
            f"(vocabulary {c.vocab_size}, context {c.context_length}, width {c.d_model}, {c.n_layers} blocks) in "
            f"{len(params)} tensors (random gradients), median of {mode['optimizer_repeats']}. Ratio = time / "
            "PyTorch foreach time (lower is faster). Goal: our multi-tensor within 1.2x of PyTorch foreach.\n\n")
    return text + table(["optimizer", "ms per step", "time ratio vs torch foreach"], rows), times


# --------------------------------------------------------------------------------------- 2b
def muon_steps(mode):
    """Our Muon against torch.optim.Muon on the hidden matrices of the benchmarked model, on the CPU."""
    model = GPT(GPTConfig(vocab_size=100, **mode["model"]))
    params = training.split_params_for_muon(model)[0]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    # torch.optim.Muon always runs Newton-Schulz in bf16 (grad.bfloat16()); with that cast made a
    # copy, the same code runs in fp32 and the two implementations do the same arithmetic.
    fp32_cast = mock.patch.object(torch.Tensor, "bfloat16", lambda self: self.clone())
    variants = {
        "torch.optim.Muon, fp32 iteration": (lambda ps: torch.optim.Muon(ps, lr=0.02), fp32_cast),
        "training.Muon, per-matrix loop, fp32": (lambda ps: training.Muon(ps, lr=0.02, ns_dtype="fp32"), None),
        "training.Muon, multi-tensor, fp32": (lambda ps: training.Muon(ps, lr=0.02, ns_dtype="fp32", foreach=True),
                                              None),
        "torch.optim.Muon, as shipped (bf16 iteration)": (lambda ps: torch.optim.Muon(ps, lr=0.02), None),
        "training.Muon, multi-tensor, bf16": (lambda ps: training.Muon(ps, lr=0.02, ns_dtype="bf16", foreach=True),
                                              None),
    }
    times = {}
    for name, (build, patch) in variants.items():
        with patch or contextlib.nullcontext():
            times[name] = perf.time_call(build(params).step, torch.device("cpu"), warmup=3,
                                         repeats=mode["optimizer_repeats"])
    base = times["torch.optim.Muon, fp32 iteration"]
    rows = [[name, f"{t * 1e3:.2f}", f"{t / base:.2f}"] for name, t in times.items()]
    shapes = sorted({tuple(p.shape) for p in params})
    text = (f"One Muon step (5 Newton-Schulz iterations) over the {len(params)} hidden matrices (shapes {shapes}) "
            f"of the model above, on the CPU (random gradients), median of {mode['optimizer_repeats']}. Ratio = "
            "time / torch.optim.Muon's time with the same fp32 iteration (lower is faster). Goal: our Muon "
            "(multi-tensor, fp32) no slower than torch's.\n\n")
    return text + table(["optimizer", "ms per step", "time ratio vs torch fp32"], rows), times


# ---------------------------------------------------------------------------------------- 3
def speedups(mode, corpus, device, workdir):
    shape, batch = mode["model"], mode["batch"]
    low = torch.bfloat16 if device.type != "cuda" or training.has_native_bf16(device) else torch.float16
    variants = [("eager fp32 (baseline)", False, torch.float32), (f"eager {low} autocast", False, low)]
    if mode["compile"]:
        variants += [("torch.compile fp32", True, torch.float32), (f"torch.compile {low} autocast", True, low)]
    results = {}
    for name, compiled, dtype in variants:
        if dtype == torch.float16:  # fp16 would need a GradScaler; the hand loop has none
            continue
        model = make_model(corpus.tokenizer.vocab_size, device, **shape)
        optimizer, _ = training.build_optimizer(model, training.TrainConfig(**shape), device)
        step_model = torch.compile(model) if compiled else model
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        seconds = perf.time_call(lambda: hand_step(step_model, optimizer, corpus.train_ids, batch,
                                                   shape["context_length"], device, dtype, generator),
                                 device, warmup=3, repeats=mode["step_repeats"])
        warmup_seconds = time.perf_counter() - start - seconds * mode["step_repeats"]
        results[name] = (batch * shape["context_length"] / seconds, warmup_seconds)
    base = results["eager fp32 (baseline)"][0]
    rows = [[name, fmt(tps), f"{tps / base:.2f}", f"{warm:.1f}"] for name, (tps, warm) in results.items()]
    text = (f"Training updates (hand loop, batch {batch} x {shape['context_length']}), median of "
            f"{mode['step_repeats']} after 3 warm-up updates (which include compiling)."
            + ("" if mode["compile"] else " torch.compile is skipped in --quick: compiling takes 20-60 s on a CPU.")
            + "\n\n")
    return text + table(["variant", "tokens/s", "speed-up", "warm-up s"], rows), results


# ---------------------------------------------------------------------------------------- 4
def reset_cpu_peak():
    """Start a new peak-memory window; return the resident set now, in bytes.

    On Linux, writing 5 to /proc/self/clear_refs resets the peak resident set (VmHWM) to the
    current one, so the peak after this call is what the work since needed, not what importing
    torch once touched. Elsewhere the peak cannot be reset: fall back to ru_maxrss."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return cpu_peak()
    except OSError:
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def cpu_peak():
    """Peak resident set in bytes (VmHWM on Linux, ru_maxrss elsewhere)."""
    try:
        line = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def scaling_worker(spec):
    """Run in a fresh process: tokens/s and peak training memory of one (batch, context) point."""
    device, vocab = training.pick_device(spec["device"]), 78
    shape = {**spec["model"], "context_length": spec["context"]}
    data = torch.randint(vocab, (200_000,), generator=torch.Generator().manual_seed(0))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:  # no corpus is loaded in this process, so the model's training is all that grows
        before = reset_cpu_peak()
    model = make_model(vocab, device, **shape)
    optimizer, _ = training.build_optimizer(model, training.TrainConfig(**shape), device)
    generator = torch.Generator().manual_seed(0)
    seconds = perf.time_call(lambda: hand_step(model, optimizer, data, spec["batch"], spec["context"], device,
                                               torch.float32, generator),
                             device, warmup=1, repeats=spec["steps"])
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    elif device.type == "cpu":
        peak = (cpu_peak() - before) / 2 ** 20
    else:
        peak = float("nan")
    print(json.dumps({"tokens_per_s": spec["batch"] * spec["context"] / seconds, "peak_mib": peak}))


def scaling(mode, device):
    points = {}

    def point(batch, context):
        if (batch, context) in points:  # the default point is in both sweeps
            return points[batch, context]
        spec = dict(device=str(device), model=mode["model"], batch=batch, context=context, steps=mode["scaling_steps"])
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                              text=True, check=True)
        points[batch, context] = json.loads(done.stdout.strip().splitlines()[-1])
        return points[batch, context]

    default_context, default_batch = mode["model"]["context_length"], mode["batch"]
    by_batch = {b: point(b, default_context) for b in mode["batches"]}
    by_context = {t: point(default_batch, t) for t in mode["contexts"]}
    parts, memory_kind = [], ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                              "peak resident set of a fresh process per point, counted from just before the model is "
                              "built (Linux VmHWM reset through /proc/self/clear_refs)")
    for label, results in (("batch size", by_batch), ("context length", by_context)):
        first = next(iter(results.values()))
        rows = [[key, fmt(r["tokens_per_s"]), f"{r['tokens_per_s'] / first['tokens_per_s']:.2f}",
                 f"{r['peak_mib']:.1f}", f"{r['peak_mib'] / first['peak_mib']:.2f}" if first["peak_mib"] > 0 else "n/a"]
                for key, r in results.items()]
        parts.append(f"**By {label}** (the other fixed at {default_context if label == 'batch size' else default_batch}; "
                     f"ratios vs the first row)\n\n" + table([label, "tokens/s", "ratio", "peak MiB", "ratio"], rows))
    text = (f"fp32 training updates of the model above, median of {mode['scaling_steps']}; memory: {memory_kind} "
            "(weights, gradients, AdamW state and activations).\n\n")
    return text + "\n\n".join(parts), by_batch, by_context


def ddp_scaling(mode, workdir):
    shape, steps = mode["model"], mode["ddp_steps"]
    args = [training.__file__, "--max-steps", str(steps), "--warmup-steps", "0", "--eval-interval", str(steps),
            "--eval-batches", "1", "--sample-chars", "0", "--no-progress", "--batch-size", str(mode["batch"]),
            "--device", "cpu"] + cli_flags(shape)

    def tokens_per_s(launcher, name):
        done = subprocess.run([sys.executable, *launcher, *args, "--out-dir", str(workdir / name)],
                              capture_output=True, text=True, check=True)
        return float(re.search(r"([\d,]+) tokens/s", done.stdout).group(1).replace(",", ""))

    one = tokens_per_s([], "ddp1")
    two = tokens_per_s(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], "ddp2")
    rows = [["1 process (baseline)", fmt(one), "1.00"], ["2 processes (torchrun, gloo)", fmt(two), f"{two / one:.2f}"]]
    text = (f"training.py on the CPU, batch {mode['batch']} per process (so 2 processes train on twice the tokens "
            f"per update), {steps} updates. One process uses all {os.cpu_count()} cores' threads; torchrun gives "
            "each worker one thread, so on a machine with few cores this shows what DDP's all-reduce costs, "
            "not extra hardware.\n\n")
    return text + table(["run", "tokens/s (all processes)", "ratio"], rows), two / one


# ---------------------------------------------------------------------------------------- 5
def default_overrides(mode):
    """TrainConfig overrides for sections 5 and 5b: none in a full run (the real defaults), the tiny
    model with cheap evaluations in quick mode."""
    return dict(mode["model"], batch_size=mode["batch"], eval_batches=2) if mode is MODES["quick"] else {}


def updates_per_second(overrides, mode, workdir):
    """train()'s measured speed, in updates/s, for TrainConfig's defaults with `overrides` (a short probe run)."""
    steps = mode["trainer_steps"]
    probe = training.train(training.TrainConfig(**{**overrides, "eval_batches": 1}, out_dir=str(workdir / "probe"),
                                                max_steps=steps, warmup_steps=0, eval_interval=steps,
                                                sample_chars=0, progress=False, overwrite=True))
    config = training.TrainConfig(**overrides)
    return probe.tokens_per_second / (config.batch_size * config.context_length)


def timed_train(overrides, out_dir):
    """train() on TrainConfig's defaults with `overrides`: (wall minutes, result)."""
    start = time.perf_counter()
    result = training.train(training.TrainConfig(**overrides, out_dir=str(out_dir), sample_chars=0, progress=False))
    return (time.perf_counter() - start) / 60, result


def budget_run(overrides, minutes, updates_per_s, out_dir):
    """train() with max_steps = minutes x updates_per_s and the LR schedule ending there:
    (updates, wall minutes, result). A fixed step count (not max_minutes) keeps each budget's
    schedule and evaluations the same from run to run; the measured rate sizes it."""
    defaults = training.TrainConfig(**overrides)
    steps = max(int(minutes * 60 * updates_per_s * 0.93), 10)  # ~7% of the time goes to evaluations
    schedule = dict(max_steps=steps, warmup_steps=min(defaults.warmup_steps, steps // 10), decay_steps=0,
                    eval_interval=min(defaults.eval_interval, steps))
    return (steps, *timed_train({**overrides, **schedule}, out_dir))


def quality_per_time(mode, workdir):
    """Val loss of the default training.py config after each time budget."""
    quick = mode is MODES["quick"]
    shape = default_overrides(mode)
    updates_per_s = updates_per_second(shape, mode, workdir)
    rows, curve = [], []
    for minutes in mode["budgets_min"]:
        steps, elapsed, result = budget_run(shape, minutes, updates_per_s, workdir / f"budget{minutes}")
        rows.append([f"{minutes:g}", f"{elapsed:.2f}", steps, f"{result.best_val_loss:.3f}"])
        curve.append((elapsed, result.best_val_loss))
    quoted = ", ".join(f"val {v} after {s // 60} m {s % 60:02d} s" for s, v in NANOGPT_QUOTED["points"])
    text = (f"`python training.py` settings{' (quick mode: tiny model)' if quick else ''}, one "
            f"run per budget with max_steps = budget x {updates_per_s:.2f} updates/s measured first (a fixed step "
            "count rather than --max-minutes, so every run of this table trains the same updates) and the LR schedule "
            "ending there (decay_steps=0; warmup at most a tenth of the run), as nanoGPT's quoted runs set "
            "max_iters = lr_decay_iters. Elapsed = wall time of train() including evaluations (the CLI adds a few "
            "seconds to import torch, read the corpus and print a sample). Section 7 trains for 5 minutes and runs "
            "the default run itself. For scale (reported for another 2-core machine, not measured here): nanoGPT's "
            f"CPU config reaches {quoted}.\n\n")
    return text + table(["budget (min)", "elapsed (min)", "updates", "best val loss"], rows), curve


def depth_per_time(mode, workdir):
    """Val loss after the same wall time for models of 1 to 4 blocks, everything else as the defaults."""
    minutes, rows = mode["depth_budget_min"], []
    for n_layers in mode["depths"]:
        overrides = {**default_overrides(mode), "n_layers": n_layers}
        config = training.TrainConfig(**overrides)
        rate = updates_per_second(overrides, mode, workdir)
        steps, elapsed, result = budget_run(overrides, minutes, rate, workdir / f"depth{n_layers}")
        tokens = steps * config.batch_size * config.context_length
        rows.append([n_layers, f"{result.model.num_parameters():,}", fmt(result.tokens_per_second), steps,
                     f"{tokens / 1e6:.2f}", f"{elapsed:.2f}", f"{result.best_val_loss:.3f}"])
    text = (f"The same wall-clock budget ({minutes:g} min, the schedule fitted to it as in section 5) spent on "
            "models of different depth, every other field as TrainConfig's defaults. A deeper model learns more "
            "per token but sees fewer tokens in the time. The README (Decisions) says how the default depth "
            "was chosen from this table.\n\n")
    return text + table(["blocks", "parameters", "tokens/s", "updates", "tokens (M)", "elapsed (min)",
                         "best val loss"], rows),


def nanogpt_shape(mode, corpus, workdir):
    steps, rounds, device = mode["nanogpt_steps"], mode["overhead_rounds"], torch.device("cpu")
    hand, trainer, optimizer_name = hand_loop_vs_trainer(NANOGPT_SHAPE, NANOGPT_BATCH, steps, rounds, corpus,
                                                         device, torch.float32, workdir / "nanogpt", optimizer="auto")
    quoted = NANOGPT_QUOTED["tokens_per_s"]
    rows = [["minimal hand-written loop (baseline)", fmt(hand), "1.00", f"{hand / quoted:.2f}"],
            ["training.train()", fmt(trainer), f"{trainer / hand:.2f}", f"{trainer / quoted:.2f}"]]
    text = (f"nanoGPT's CPU config: 4 layers, 4 heads, 128 embedding, context 64, batch {NANOGPT_BATCH}, no "
            f"dropout, GELU, fp32 on the CPU, {optimizer_name}; best of {rounds} alternating runs of {steps} updates. "
            "(nanoGPT's model has no biases; ours has, ~1% more parameters.) The last column divides by the "
            f"{quoted:,} tokens/s reported for nanoGPT's train.py on another 2-core x86 machine: not measured "
            "here, so only as good as the two machines are alike. Goal: >= 1.\n\n")
    return text + table(["loop", "tokens/s", "ratio", "vs nanoGPT (quoted)"], rows), trainer


# ---------------------------------------------------------------------------------------- 6
def gpu_section(workdir):
    if not torch.cuda.is_available():
        return ("No GPU in this run (torch.cuda.is_available() is False on this machine), so this section "
                "was not run and shows no numbers. Run `python benchmarks/run.py --gpu-only` on a CUDA machine."), None
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    shape = dict(context_length=1024, d_model=768, n_layers=12, n_heads=12, d_ff=3072)  # GPT-2 small
    batch, vocab = 8, 50304
    data = torch.randint(vocab, (10_000_000,), generator=torch.Generator().manual_seed(0))
    peak = perf.measure_matmul_flops(device, torch.bfloat16, size=8192)

    def adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)

    def ours_muon(model):
        hidden, matrices, vectors = training.split_params_for_muon(model)
        return training.MuonWithAdamW(hidden, [{"params": matrices}, {"params": vectors, "weight_decay": 0.0}],
                                      lr=3e-4, weight_decay=0.1, ns_dtype="auto", foreach=True)

    def torch_muon(model):  # torch.optim.Muon for the hidden matrices, fused AdamW for the rest
        hidden, matrices, vectors = training.split_params_for_muon(model)
        pair = [torch.optim.Muon(hidden, lr=3e-4, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"),
                torch.optim.AdamW(matrices + vectors, lr=3e-4, fused=True)]

        class Both:  # the two optimizers behind hand_step's step() / zero_grad()
            def step(self):
                for optimizer in pair:
                    optimizer.step()

            def zero_grad(self, set_to_none=True):
                for optimizer in pair:
                    optimizer.zero_grad(set_to_none=set_to_none)
        return Both()

    rows, utilisation = [], None
    for name, make_optimizer in [("fused torch.optim.AdamW (baseline)", adamw),
                                 ("training.MuonWithAdamW (Newton-Schulz in bf16)", ours_muon),
                                 ("torch.optim.Muon + fused AdamW", torch_muon)]:
        model = make_model(vocab, device, **shape)
        optimizer = make_optimizer(model)
        step_model = torch.compile(model)
        generator = torch.Generator().manual_seed(0)
        seconds = perf.time_call(lambda: hand_step(step_model, optimizer, data, batch, 1024, device, torch.bfloat16,
                                                   generator), device, warmup=3, repeats=10)
        tokens_per_s = batch * 1024 / seconds
        parameters = model.num_parameters()
        mfu = perf.mfu(tokens_per_s, perf.training_flops_per_token(model), peak)
        if utilisation is None:
            utilisation, base = mfu, tokens_per_s
        rows.append([name, fmt(tokens_per_s), f"{tokens_per_s / base:.2f}", f"{mfu:.1%}"])
        del model, optimizer, step_model
        torch.cuda.empty_cache()
    text = (f"{torch.cuda.get_device_name(device)}. GPT-2-small-sized model (12 layers, 768 wide, context 1024, "
            f"vocab 50,304, {parameters:,} parameters), "
            "batch 8, bf16 autocast, torch.compile, one update = forward, backward, clip, optimizer step. "
            f"MFU = tokens/s x training FLOPs per token / the measured bf16 matmul rate ({peak / 1e12:.0f} TFLOP/s, "
            "an 8192^2 matmul), not the spec-sheet peak; the optimizer's own FLOPs are not counted, so Muon's "
            "Newton-Schulz work shows as lower MFU.\n\n")
    return text + table(["optimizer", "tokens/s", "ratio", "MFU"], rows), utilisation


# ---------------------------------------------------------------------------------------- 7
SPEEDRUN_TARGET = 1.56  # about the val loss the default run reached before lesson 8 (section 7, first row)


def seconds_to_reach(history, target):
    """Training seconds (as --max-minutes counts them) at which the val loss first reaches `target`,
    interpolated linearly between that evaluation and the one before it; None if it never does."""
    before = (0.0, None)
    for row in history:
        if "val_loss" not in row:
            continue
        if row["val_loss"] <= target:
            (seconds, loss), now = before, row["seconds"]
            return now if loss is None else seconds + (now - seconds) * (loss - target) / (loss - row["val_loss"])
        before = (row["seconds"], row["val_loss"])
    return None


def speedrun(mode, workdir):
    """Lesson 8's recipe against the one before it: each as `python training.py` runs it and with a
    5-minute budget (--max-minutes), then the default with half the time ADAMW_RECIPE needed to
    reach SPEEDRUN_TARGET. Returns the text, the 5-minute curves and a dict of the goals' figures."""
    minutes, shape = mode["speedrun_min"], default_overrides(mode)
    old, new = ADAMW_LABEL, DEFAULT_LABEL
    rows, curves = [], {}

    def run(label, recipe, budget, note):
        settings = {**shape, **recipe, "eval_interval": mode["speedrun_eval_interval"]}
        settings.update(mode["default_run"] if budget is None else dict(max_minutes=budget, max_steps=2**31 - 1))
        elapsed, result = timed_train(settings, workdir / f"speedrun-{len(rows)}")
        to_target = seconds_to_reach(result.history, SPEEDRUN_TARGET)
        rows.append([label, note, result.step, fmt(result.tokens_per_second), f"{elapsed:.2f}",
                     f"{result.best_val_loss:.3f}", "not reached" if to_target is None else f"{to_target:.0f}"])
        return result, elapsed, to_target

    as_is, budgeted = "as `python training.py` runs it", f"--max-minutes {minutes:g}"
    figures = {}
    for label, recipe in ((old, training.ADAMW_RECIPE), (new, {})):
        result, elapsed, figures[label, "as is"] = run(label, recipe, None, as_is)
        figures[label, "default run"] = (elapsed, result.best_val_loss)
        result, _, figures[label, "budget"] = run(label, recipe, minutes, budgeted)
        figures[label, "budget loss"] = result.best_val_loss
        curves[label] = [(row["seconds"], row["val_loss"]) for row in result.history if "val_loss" in row]

    def fastest(label):  # a recipe's shortest time to the target over its two runs, or None
        return min((t for t in (figures[label, "as is"], figures[label, "budget"]) if t is not None), default=None)

    before, after = fastest(old), fastest(new)
    figures["ratio"] = None if before is None or after is None else after / before
    figures["half"] = None  # the default's best val loss in half ADAMW_RECIPE's time to the target
    if before is not None:
        result, _, _ = run(new, {}, before / 2 / 60, f"--max-minutes {before / 2 / 60:.2f} (half of {before:.0f} s)")
        figures["half"] = result.best_val_loss
    default = training.TrainConfig()
    changes = ", ".join(f"{k}={getattr(default, k)!r} (was {v!r})" for k, v in training.ADAMW_RECIPE.items())
    ratio = figures["ratio"]
    text = (f"Two recipes for the same model shape, each run as `python training.py` runs it and with a "
            f"{minutes:g}-minute budget (`--max-minutes {minutes:g}`: the LR decay laid over the time); the last row "
            f"gives the default half the time ADAMW_RECIPE took to reach val {SPEEDRUN_TARGET} (about where "
            f"its default run ends). Every run evaluates every {mode['speedrun_eval_interval']} updates, which "
            f"does not change what it trains. The default differs from ADAMW_RECIPE in: {changes}; lesson 8 "
            f"races each change on its own. Seconds are training time as --max-minutes counts it (from the first "
            f"update, evaluations included); the time to reach val {SPEEDRUN_TARGET} is interpolated between the two "
            f"evaluations around it. The default's fastest time to it (of its runs) over ADAMW_RECIPE's fastest: "
            f"{'n/a (a run did not reach it)' if ratio is None else f'{ratio:.2f}'}.\n\n")
    text += table(["recipe", "run", "updates", "tokens/s", "wall (min)", "best val loss",
                   f"seconds to val {SPEEDRUN_TARGET}"], rows)
    return text, curves, figures


# ---------------------------------------------------------------------------------------- 8
# train() with the command line's settings (cli_settings) in a fresh process, so that OMP_NUM_THREADS applies
THREADS_PROBE = ("import json, sys, training; settings, _ = training.cli_settings(json.loads(sys.argv[1])); "
                 "result = training.train(training.TrainConfig(**settings)); "
                 "print(json.dumps(dict(tokens_per_s=result.tokens_per_second, threads=str(result.threads), "
                 "count=result.threads.count)))")


THREADS_TOLERANCE = 0.95  # "not slower": auto's tokens/s at least this fraction of the 1-thread run's


def threads_run(given, env, out_dir):
    done = subprocess.run([sys.executable, "-c", THREADS_PROBE, json.dumps({**given, "out_dir": str(out_dir)})],
                          capture_output=True, text=True, env={**os.environ, **env}, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def busy_process():
    """One other process that keeps a core busy (pure Python), stopped on leaving."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        spinner.kill()
        spinner.wait()


def threads_section(mode, workdir):
    """`python training.py --max-steps N` (its settings, train() in a fresh process) on one thread, on every
    core and with the thread count it measures itself, on a quiet machine and beside one busy process.
    Runs of one load alternate (1, all, auto, 1, all, auto, ...) so that a drift of the machine's speed
    falls on every row alike, and each row reports the median of its rounds."""
    cores = available_cores()
    steps, rounds = mode["threads_steps"], mode["threads_rounds"]
    given = {**default_overrides(mode), "max_steps": steps, "sample_chars": 0, "progress": False, "overwrite": True}
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    runs = [("1 thread (OMP_NUM_THREADS=1)", {}, {"OMP_NUM_THREADS": "1"}),
            (f"all {cores} cores (--threads {cores})", {"threads": cores}, {}),
            ("auto (the default: measured at the start)", {}, {})]
    rows, ratios = [], {}
    for load, context in (("quiet", contextlib.nullcontext), ("one busy process", busy_process)):
        with context():
            measured = [[threads_run({**given, **extra}, {**env, **extra_env}, workdir / "threads")
                         for _, extra, extra_env in runs] for _ in range(rounds)]
        speeds = [sorted(round_[row]["tokens_per_s"] for round_ in measured) for row in range(len(runs))]
        one = statistics.median(speeds[0])
        for row, (label, *_) in enumerate(runs):
            median = statistics.median(speeds[row])
            ratios[load, label] = median / one
            # the count of every round, and how the first round chose it ('1 (measured 1: 9.8k, 2: 3.6k tok/s)')
            chosen = (", ".join(str(round_[row]["count"]) for round_ in measured)
                      + f"; round 1: {measured[0][row]['threads']}")
            rows.append([load, label, chosen, fmt(median), f"{fmt(speeds[row][0])}-{fmt(speeds[row][-1])}",
                         f"{median / one:.2f}"])
    busy_auto = ratios["one busy process", runs[-1][0]]
    text = (f"`python training.py --max-steps {steps}`'s settings (train() in a fresh process per run; "
            f"{cores} cores), {rounds} rounds per load, the rows' runs alternating; each row's median against "
            "its load's 1-thread median. The busy process is a Python loop this benchmark starts before a "
            f"load's runs and stops after them. Under it, auto is {busy_auto:.2f} x the 1-thread run: "
            f"{'not slower' if busy_auto >= THREADS_TOLERANCE else 'slower'} (a tolerance of "
            f"{1 - THREADS_TOLERANCE:.0%} for run-to-run noise; the range column shows that noise). Tokens/s "
            "are train()'s: like building the model, auto's measuring (1 warm-up and 3 timed updates at each "
            "count) is not in them.\n\n")
    return text + table(["load", "run", "threads (as each run chose)", "tokens/s (median)", "range",
                         "ratio to 1 thread"], rows), busy_auto


# ---------------------------------------------------------------------------------------- 9
COUNTING_GOAL = 1.30   # the moonshot: nats/char on the whole validation split within the budget
FIT_RESERVE = 0.02  # the share of the budget left to what --max-minutes does not count (thread timing, fitting w)


def counting_run(settings, out_dir):
    """train() with the command line's settings and `settings`, best.pt scored on the whole validation split
    alone and mixed with the run's counts: (wall seconds of everything, result, MixedScore)."""
    config = training.TrainConfig(**training.cli_settings({**settings, "out_dir": str(out_dir), "sample_chars": 0,
                                                           "progress": False, "overwrite": True})[0])
    started = time.perf_counter()
    result = training.train(config)
    train_seconds = time.perf_counter() - started
    training.load_checkpoint(result.best_checkpoint, result.model)
    device = next(result.model.parameters()).device
    scored = training.score_mixed(result.model, result.counting, result.corpus.train_ids, result.corpus.val_ids,
                                  context_length=config.context_length, device=device,
                                  dtype=training.resolve_dtype(config.dtype, device))
    # the wall time the method takes: train() (counting included) and fitting w, not the scoring of val
    return train_seconds + scored.fit_seconds, result, scored


def mean_std(values):
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def against_counting(mode, workdir):
    """The counting ladder, then the default run and the budget run, several seeds each, scored on the whole
    validation split: the network alone, the counts alone and the two mixed."""
    corpus = training.load_corpus()
    shape = default_overrides(mode)
    started = time.perf_counter()
    ladder = training.ngram_ladder(corpus.train_ids, corpus.val_ids, corpus.tokenizer.vocab_size)
    ladder_seconds = time.perf_counter() - started
    text = ("**The counting ladder**: interpolated Kneser-Ney n-grams counted from the training split, each "
            f"scored on the whole validation split (every character with at least 32 of history; {ladder_seconds:.0f} s "
            "for all six, on one core).\n\n")
    text += table(["model", "nats/char (± standard error)"],
                  [[rung_name(order), f"{score.loss:.3f} ± {score.stderr:.3f}"]
                   for order, score in ladder.items()]) + "\n\n"
    budget = mode["speedrun_min"]
    runs = [("as `python training.py` runs it", mode["default_run"]),
            (f"--max-minutes {budget * (1 - FIT_RESERVE):g} (of a {budget:g}-minute budget)",
             dict(max_minutes=budget * (1 - FIT_RESERVE)))]
    rows, figures = [], {}
    for label, given in runs:
        for seed in mode["seeds"]:
            wall, result, scored = counting_run({**shape, **given, "seed": seed}, workdir / "counting")
            figures.setdefault(label, []).append((wall, scored))
            rows.append([label, seed, result.step, fmt(result.tokens_per_second), f"{wall / 60:.2f}",
                         f"{scored.network.loss:.3f}", f"{scored.counting.loss:.3f}", f"{scored.weight:.2f}",
                         f"{scored.mixed.loss:.3f}", f"{scored.gain.loss:.3f} ± {scored.gain.stderr:.3f}"])
    six = ladder[max(ladder)]
    network = {label: [scored.network.loss for _, scored in runs_of] for label, runs_of in figures.items()}
    mixed = {label: [scored.mixed.loss for _, scored in runs_of] for label, runs_of in figures.items()}
    longest = {label: max(wall for wall, _ in runs_of) / 60 for label, runs_of in figures.items()}
    summary = [[label, len(figures[label]), mean_std(network[label]), mean_std(mixed[label]), f"{longest[label]:.2f}"]
               for label in figures]
    default_label, budget_label = figures
    text += (f"**The GPT against counting**, {len(mode['seeds'])} seeds per run (seeds {', '.join(map(str, mode['seeds']))}). "
             "Each run is `python training.py` with the flags shown (its `--mix-order 8`: an 8-gram counted from the "
             "training split less 25 held-out pieces, inside the run's time), then best.pt scored on the whole "
             "validation split: the network alone, the 8-gram alone, and the two mixed, p = (1 - w) p_gpt + w p_8gram, "
             "with w fitted on the held-out pieces (never on the validation split). Wall = train() from start to end "
             "(model building, thread timing, counting, training, evaluations) plus fitting w; scoring the "
             "validation split is not in it. Gain = network - mixed, per character, with its paired standard "
             "error.\n\n")
    text += table(["run", "seed", "updates", "tokens/s", "wall (min)", "network", "8-gram", "w", "mixed",
                   "gain"], rows) + "\n\n"
    text += table(["run", "seeds", "network (mean ± std)", "mixed (mean ± std)", "longest wall (min)"], summary)
    goal_rows = [
        ["9. default run below the 6-gram", f"< {six.loss:.3f} (every seed)",
         f"mixed {mean_std(mixed[default_label])}; network alone {mean_std(network[default_label])}",
         "yes" if max(mixed[default_label]) < six.loss else "no"],
        [f"9. {budget:g} minutes: <= {COUNTING_GOAL:.2f}", f"<= {COUNTING_GOAL:.2f} (every seed), wall <= {budget:g} min",
         f"mixed {mean_std(mixed[budget_label])}, longest wall {longest[budget_label]:.2f} min",
         "yes" if max(mixed[budget_label]) <= COUNTING_GOAL and longest[budget_label] <= budget else "no"]]
    return text + "\n\n" + table(["goal", "target", "this run", "met"], goal_rows), goal_rows


# ----------------------------------------------------------------------------------------
def plots(out_dir, optimizer_times, speedup_results, by_batch, by_context, curve, speedrun_curves):
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    names = [n for n, t in optimizer_times.items() if t is not None]
    base = optimizer_times["torch.optim.AdamW, foreach"]
    axes[0].barh(names, [optimizer_times[n] / base for n in names], color="tab:blue")
    axes[0].axvline(1.0, color="gray", lw=1)
    axes[0].set_xlabel("step time / torch foreach time")
    axes[0].set_title("AdamW step, tiny GPT")
    base = speedup_results["eager fp32 (baseline)"][0]
    axes[1].barh(list(speedup_results), [tps / base for tps, _ in speedup_results.values()], color="tab:green")
    axes[1].axvline(1.0, color="gray", lw=1)
    axes[1].set_xlabel("tokens/s / eager fp32 tokens/s")
    axes[1].set_title("compile and autocast")
    fig.tight_layout()
    fig.savefig(out_dir / "speed.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, results, label in ((axes[0], by_batch, "batch size"), (axes[1], by_context, "context length")):
        first = next(iter(results.values()))
        keys = list(results)
        ax.plot(keys, [results[k]["tokens_per_s"] / first["tokens_per_s"] for k in keys], "o-", label="tokens/s")
        if first["peak_mib"] > 0:
            ax.plot(keys, [results[k]["peak_mib"] / first["peak_mib"] for k in keys], "s--", label="peak memory")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel(f"ratio vs {label} {keys[0]}")
        ax.legend()
    minutes, losses = zip(*curve)
    axes[2].plot(minutes, losses, "o-", label="training.py (this machine)")
    axes[2].plot([s / 60 for s, _ in NANOGPT_QUOTED["points"]], [v for _, v in NANOGPT_QUOTED["points"]], "x--",
                 color="gray", label="nanoGPT (reported, another machine)")
    axes[2].set_xlabel("wall time (minutes)")
    axes[2].set_ylabel("val loss")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(out_dir / "scaling.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    plot_val_against_seconds(ax, speedrun_curves, title="val loss at equal wall time (section 7)")
    ax.axhline(SPEEDRUN_TARGET, color="gray", lw=1, ls=":")
    fig.tight_layout()
    fig.savefig(out_dir / "speedrun.png", dpi=110)
    plt.close(fig)


def goals(results, mode):
    """One row per goal: the target, the figure this run reached, and whether it is met."""
    def verdict(met):
        return "n/a" if met is None else ("yes" if met else "no")

    overhead = results["overhead"][0]
    times = results["optimizer"][0]
    optimizer_ratio = times["training.AdamW, multi-tensor"] / times["torch.optim.AdamW, foreach"]
    muon_times = results["muon"][0]
    muon_ratio = muon_times["training.Muon, multi-tensor, fp32"] / muon_times["torch.optim.Muon, fp32 iteration"]
    figures = results["speedrun"][1]
    default_minutes, default_loss = figures[DEFAULT_LABEL, "default run"]
    budget, budget_loss, half_loss = mode["speedrun_min"], figures[DEFAULT_LABEL, "budget loss"], figures["half"]
    ratio = figures["ratio"]
    ours = results["nanogpt"][0]
    utilisation = results["gpu"][0]
    quick = mode is MODES["quick"]
    rows = [["default `python training.py`: val loss and wall time", "<= 1.60 within 5 min",
             f"{default_loss:.3f} in {default_minutes:.2f} min",
             "n/a (quick)" if quick else verdict(default_loss <= 1.60 and default_minutes <= 5)],
            ["1. train() tokens/s / hand loop", ">= 0.95", f"{overhead:.2f}", verdict(overhead >= 0.95)],
            ["2. multi-tensor AdamW time / torch foreach", "<= 1.2", f"{optimizer_ratio:.2f}",
             verdict(optimizer_ratio <= 1.2)],
            ["2b. our Muon (multi-tensor, fp32) time / torch.optim.Muon (fp32)", "<= 1.0", f"{muon_ratio:.2f}",
             verdict(muon_ratio <= 1.0)],
            ["5c. tokens/s on nanoGPT's CPU shape", f">= {NANOGPT_QUOTED['tokens_per_s']:,} (reported for nanoGPT, another machine)", fmt(ours),
             verdict(ours >= NANOGPT_QUOTED["tokens_per_s"])],
            ["6. GPU MFU, GPT-2 small, bf16 + compile", "report it", "not run (no GPU)" if utilisation is None
             else f"{utilisation:.1%}", verdict(None)],
            [f"7. val loss of the default in {budget:g} min", "<= 1.45 in 5 min", f"{budget_loss:.3f}",
             verdict(budget_loss <= 1.45) if budget == 5 else "n/a (quick)"],
            [f"7. val {SPEEDRUN_TARGET} in at most half ADAMW_RECIPE's time: the default given that "
             "half; ratio of the fastest times to reach it", f"val <= {SPEEDRUN_TARGET}, or ratio <= 0.5",
             ("not run" if half_loss is None else f"{half_loss:.3f}") + "; ratio "
             + ("n/a" if ratio is None else f"{ratio:.2f}"),
             "n/a (quick)" if quick else verdict((half_loss is not None and half_loss <= SPEEDRUN_TARGET)
                                                 or (ratio is not None and ratio <= 0.5))]]
    busy_auto = results["threads"][0]
    rows.append(["8. one busy process: auto tokens/s / 1 thread (`--max-steps "
                 f"{mode['threads_steps']}`)", f">= {THREADS_TOLERANCE}", f"{busy_auto:.2f}",
                 verdict(busy_auto >= THREADS_TOLERANCE)])
    rows += results["counting"][0]
    return table(["goal", "target", "this run", "met"], rows)


def environment(device, mode_name):
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    rows = [["date (UTC)", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")],
            ["command", "`python benchmarks/run.py" + {"quick": " --quick", "gpu-only": " --gpu-only"}.get(mode_name, "") + "`"],
            ["device", f"{device}" + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")],
            ["CPU", f"{cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"],
            ["versions", f"python {platform.python_version()}, torch {torch.__version__}, {platform.platform()}"],
            ["load average at start", " ".join(f"{x:.2f}" for x in os.getloadavg())]]
    return table(["", ""], rows)


def gpu_only(out_dir):
    """Section 6 alone, for a machine lent with a GPU: GPU.md beside BENCHMARKS.md."""
    started = time.perf_counter()
    text, _ = gpu_section(None)
    device = training.pick_device()
    report = (f"# Benchmarks on a GPU\n\nSection 6 of BENCHMARKS.md run alone (`python benchmarks/run.py --gpu-only`); "
              f"every ratio is against the fused-AdamW row of the same run.\n\n{environment(device, 'gpu-only')}\n\n"
              f"## 6. GPU: GPT-2-small in bf16 with torch.compile\n\n{text}\n\n"
              f"Total run time: {(time.perf_counter() - started) / 60:.1f} minutes.\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "GPU.md").write_text(report)
    print(report)
    return 0


def replace_sections(path, steps):
    """Run `steps` (key, title, run) and put each section into the BENCHMARKS.md at path in place of the one
    with its number (or before the goals)."""
    text = path.read_text()
    for key, title, run in steps:
        print(f"== {title} ...", flush=True)
        started = time.perf_counter()
        body, *_ = run()
        section = (f"## {title}\n\n{body}\n\n_({time.perf_counter() - started:.0f} s; `--only {key}`, "
                   f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, load average at the end "
                   f"{os.getloadavg()[0]:.2f})_\n\n")
        print(section, flush=True)
        number = title.split(" ", 1)[0]
        old = re.search(rf"^## {re.escape(number)} .*?(?=^## )", text, re.M | re.S)
        text = text.replace(old.group(0), section) if old else text.replace("## Goals", section + "## Goals", 1)
    path.write_text(text)
    print(f"wrote {path}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1-2 minutes: checks the script runs")
    parser.add_argument("--out-dir", help="where BENCHMARKS.md and the plots go (default benchmarks/, "
                                          "or benchmarks/quick/ with --quick)")
    parser.add_argument("--gpu-only", action="store_true",
                        help="run only section 6 on this machine's GPU and write GPU.md (a few minutes)")
    parser.add_argument("--only", nargs="+", choices=list(FULL_RUN_SECONDS), metavar="SECTION",
                        help="run only these sections (keys: " + ", ".join(FULL_RUN_SECONDS) + ") and replace them "
                             "in the BENCHMARKS.md already there (its goals table stays as it was)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return scaling_worker(json.loads(args.worker))
    if args.gpu_only:
        return gpu_only(Path(args.out_dir) if args.out_dir else HERE)
    mode_name = "quick" if args.quick else "full"
    mode = MODES[mode_name]
    defaults = training.TrainConfig()  # quick mode keeps its tiny shape, with TrainConfig's architecture options
    mode["model"] = {**{k: getattr(defaults, k) for k in training.MODEL_FIELDS}, **(mode["model"] or {})}
    if mode_name == "full":  # the shape and batch of `python training.py`, as TrainConfig says
        batch, context = defaults.batch_size, defaults.context_length
        mode.update(batch=batch,
                    batches=[max(batch // 4, 1), max(batch // 2, 1), batch, 2 * batch],
                    contexts=[max(context // 4, 1), max(context // 2, 1), context, 2 * context])
    minutes = sum(FULL_RUN_SECONDS[key] for key in args.only) / 60 if args.only else EXPECTED_MINUTES[mode_name]
    print(f"{mode_name} run: expect about {minutes:.2g} minute(s) on a quiet 2-core CPU", flush=True)
    if os.getloadavg()[0] > 0.5 * os.cpu_count():
        print(f"warning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: other work is running, and "
              "PyTorch's CPU threads slow down far more than proportionally when they must share cores. These "
              "figures will not represent this machine.", file=sys.stderr, flush=True)
    out_dir = Path(args.out_dir) if args.out_dir else HERE / ("quick" if args.quick else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = training.pick_device()
    dtype = training.resolve_dtype("auto", device)
    corpus = training.load_corpus()
    started = time.perf_counter()
    sections = [f"# Benchmarks ({mode_name} mode)\n\nEvery ratio compares against a baseline measured in the "
                f"same run. Reproduce with the command below on a quiet machine.\n\n" + environment(device, mode_name),
                "Model of sections 1-4 (TrainConfig's defaults in a full run): " + ", ".join(f"{k}={v}" for k, v in mode["model"].items())
                + f", batch {mode['batch']}, autocast dtype {dtype}."]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        # (result key, section title, run): results are looked up by key, titles are only for the reader
        steps = [("overhead", "1. Trainer overhead", lambda: trainer_overhead(mode, corpus, device, dtype, workdir)),
                 ("optimizer", "2. Optimizer step", lambda: optimizer_steps(mode, device)),
                 ("muon", "2b. Muon step on the CPU", lambda: muon_steps(mode)),
                 ("speedups", "3. torch.compile and autocast", lambda: speedups(mode, corpus, device, workdir)),
                 ("scaling", "4. Scaling: batch size and context length", lambda: scaling(mode, device)),
                 ("ddp", "4b. Data parallel: 1 vs 2 processes", lambda: ddp_scaling(mode, workdir)),
                 ("quality", "5. Quality per time", lambda: quality_per_time(mode, workdir)),
                 ("depth", "5b. Depth at equal wall time", lambda: depth_per_time(mode, workdir)),
                 ("nanogpt", "5c. nanoGPT's CPU shape", lambda: nanogpt_shape(mode, corpus, workdir)),
                 ("gpu", "6. GPU: GPT-2-small in bf16 with torch.compile", lambda: gpu_section(workdir)),
                 ("speedrun", "7. Speedrun: the default recipe against ADAMW_RECIPE (lessons 1-7)",
                  lambda: speedrun(mode, workdir)),
                 ("threads", "8. CPU threads on a quiet and a busy machine", lambda: threads_section(mode, workdir)),
                 ("counting", "9. Against counting: the n-gram ladder, and the GPT mixed with an 8-gram",
                  lambda: against_counting(mode, workdir))]
        if args.only:
            return replace_sections(out_dir / "BENCHMARKS.md", [step for step in steps if step[0] in args.only])
        results = {}
        for number, (key, title, run) in enumerate(steps, start=1):
            expected = f" (about {FULL_RUN_SECONDS[key] / 60:.1f} min on a quiet 2-core CPU)" if mode_name == "full" else ""
            print(f"== [{number}/{len(steps)}] {title}{expected} ...", flush=True)
            section_start = time.perf_counter()
            text, *values = run()
            results[key] = values
            sections.append(f"## {title}\n\n{text}\n\n_({time.perf_counter() - section_start:.0f} s)_")
            print(sections[-1], "\n", flush=True)
    curve = results["quality"][0]
    plots(out_dir, results["optimizer"][0], results["speedups"][0], results["scaling"][0], results["scaling"][1],
          curve, results["speedrun"][0])
    sections.append("## Goals\n\n" + goals(results, mode))
    sections.append(f"![speed](speed.png)\n\n![scaling and quality per time](scaling.png)\n\n"
                    "![val loss against wall time, section 7](speedrun.png)\n\n"
                    f"Total run time: {(time.perf_counter() - started) / 60:.1f} minutes.")
    (out_dir / "BENCHMARKS.md").write_text("\n\n".join(sections) + "\n")
    print(f"wrote {out_dir / 'BENCHMARKS.md'} and its plots speed.png, scaling.png, speedrun.png in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

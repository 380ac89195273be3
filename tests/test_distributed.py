"""Data parallelism for real: `torchrun --nproc_per_node=2 training.py` on CPU (gloo).

Two processes with accumulation 1 must train exactly what one process with accumulation 2
trains: train() seeds every micro-batch by its *global* index (rank * accum + micro), so both
see the same 2 x batch_size sequences per update, and DDP averages the two ranks' gradients
while accumulation averages the two micro-batches' gradients.

Tolerance. The two sums are the same numbers added in a different place: DDP all-reduces
(g0 + g1) and divides by the world size; accumulation adds g0/2 and g1/2 during backward.
With two processes the halving is exact in binary floating point, and with the same number
of threads per process the runs agree bit for bit on this machine; with other world sizes,
thread counts or NCCL's ring order, each step can differ by a few float32 roundings
(relative ~1e-7) that AdamW carries into the weights. Over a few steps of lr <= 3e-3 that is
far below 1e-5 absolute, while one different micro-batch already moves weights by > 1e-4
(checked below, so the tolerance can tell a wrong batch from rounding).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import training

pytestmark = pytest.mark.slow

# Progress stays on: the test below checks that only rank 0 prints its evaluation lines.
TINY = ["--context-length", "32", "--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--d-ff", "64",
        "--batch-size", "8", "--warmup-steps", "2", "--decay-steps", "6", "--eval-interval", "3",
        "--eval-batches", "2", "--log-interval", "1", "--sample-chars", "0"]
STEPS = 6
ATOL, RTOL = 1e-5, 1e-5


def run_training(out_dir, *args, processes=1):
    """Run training.py in a fresh process (or under torchrun), one thread per process."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    # torchrun gives each worker one thread; the single-process runs get the same, so both
    # sides do their matmuls in the same order (and do not fight over a shared CPU).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, training.__file__, *TINY, "--out-dir", str(out_dir), *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, f"training.py failed:\n{done.stdout}\n{done.stderr}"
    return done


def weights(out_dir):
    return training.read_checkpoint(out_dir / "last.pt")["model"]


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    return {
        "ddp": run_training(root / "ddp", "--max-steps", str(STEPS), processes=2),
        "single": run_training(root / "single", "--max-steps", str(STEPS), "--grad-accum-steps", "2"),
        "root": root,
    }


def test_two_processes_train_the_same_weights_as_one_with_accumulation(runs):
    ddp, single = weights(runs["root"] / "ddp"), weights(runs["root"] / "single")
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], atol=ATOL, rtol=RTOL, msg=name)
    assert training.read_checkpoint(runs["root"] / "ddp" / "last.pt")["step"] == STEPS


def test_tolerance_is_tight_enough_to_catch_a_different_batch(runs, tmp_path):
    # One process, no accumulation: only the first half of each global batch.
    run_training(tmp_path / "half", "--max-steps", str(STEPS))
    difference = max_difference(weights(tmp_path / "half"), weights(runs["root"] / "single"))
    assert difference > 100 * ATOL


def test_only_rank_zero_logs_evaluates_and_writes(runs):
    root, output = runs["root"] / "ddp", runs["ddp"].stdout
    assert output.count("step     3 | train") == 1 and output.count("step     6 | train") == 1
    assert output.count("max_steps after 6 updates") == 1
    entries = [json.loads(line) for line in (root / "history.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in entries] == list(range(1, STEPS + 1))
    assert sorted(p.name for p in root.iterdir()) == ["best.pt", "history.jsonl", "last.pt"]


def test_resume_with_a_different_number_of_processes(runs, tmp_path):
    # Half the run on two processes, the other half on one process accumulating two
    # micro-batches: the global batch and the LR schedule (decay_steps) are the same.
    run_training(tmp_path, "--max-steps", str(STEPS // 2), processes=2)
    run_training(tmp_path, "--max-steps", str(STEPS), "--grad-accum-steps", "2",
                 "--resume", str(tmp_path / "last.pt"))
    resumed, straight = weights(tmp_path), weights(runs["root"] / "single")
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], atol=ATOL, rtol=RTOL, msg=name)


DROPOUT_DRAWS = """
import json, sys, torch, torch.distributed as dist, training
from m07_training.distributed import setup_distributed
from m07_training.loop import build, prepare_for_updates
config = training.TrainConfig(data=sys.argv[1], out_dir=sys.argv[2], device="cpu", dtype="fp32", dropout=0.1,
                              context_length=32, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_steps=4,
                              warmup_steps=0)
ranks, device = setup_distributed(config.device)  # what train() does before its first update
corpus, trainee = build(config, device)
prepare_for_updates(trainee, config, ranks, start_step=0)
draws = [None] * ranks.world_size if dist.is_initialized() else None
if dist.is_initialized():
    dist.all_gather_object(draws, torch.rand(4).tolist())
    dist.destroy_process_group()
if ranks.rank == 0:  # one line of output: both ranks printing at once can interleave on one line
    print(json.dumps(draws or [torch.rand(4).tolist()]))
"""


def test_each_rank_draws_its_own_dropout_masks(corpus_slice_file, tmp_path):
    script = tmp_path / "draws.py"
    script.write_text(DROPOUT_DRAWS)

    def draws(*launcher, out):
        done = subprocess.run([sys.executable, *launcher, str(script), str(corpus_slice_file), str(tmp_path / out)],
                              capture_output=True, text=True, timeout=300, cwd=os.path.dirname(training.__file__),
                              env={**os.environ, "OMP_NUM_THREADS": "1",
                                   "PYTHONPATH": os.path.dirname(training.__file__)})
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])
    two = draws("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", out="ddp")
    one = draws(out="single")
    assert two[0] != two[1]  # the ranks' global generators (dropout) differ ...
    assert two[0] == one[0]  # ... and rank 0 keeps the stream a single process has


BUDGET_ENDS = """
import json, os, sys, torch, torch.distributed as dist, training
rank, clock = int(os.environ["RANK"]), {"now": 0.0}
config = training.TrainConfig(data=sys.argv[1], out_dir=sys.argv[2], device="cpu", dtype="fp32", context_length=32,
                              d_model=32, n_layers=1, n_heads=2, d_ff=64, max_steps=100, warmup_steps=2,
                              max_minutes=0.2, log_interval=1, eval_interval=100, eval_batches=2, progress=False)
seeded = training.seeded_batches(training.load_corpus(config.data).train_ids, config, torch.device("cpu"))

def batches(step, micro):  # rank 0's clock says 1 second per update, rank 1's says 2
    clock["now"] += 1.0 + rank
    return seeded(step, micro)
result = training.train(config, batches=batches, clock=lambda: clock["now"])
ends = [None] * 2
dist.all_gather_object(ends, (result.step, result.stop_reason, [entry["lr"] for entry in result.history]))
dist.destroy_process_group()
if rank == 0:  # one line of output: both ranks printing at once can interleave on one line
    print(json.dumps(ends))
"""


def test_a_time_budget_ends_every_rank_at_the_same_update(corpus_slice_file, tmp_path):
    script = tmp_path / "budget.py"
    script.write_text(BUDGET_ENDS)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(corpus_slice_file), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, cwd=os.path.dirname(training.__file__),
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(training.__file__)})
    assert done.returncode == 0, done.stderr
    rank0, rank1 = json.loads(done.stdout.strip().splitlines()[-1])
    assert rank0 == rank1  # the same update, and the same LR at every update
    assert rank0[:2] == [6, "max_minutes"]  # 12 seconds by the faster clock (rank 1's), 6 updates
    assert training.read_checkpoint(tmp_path / "out" / "last.pt")["step"] == 6

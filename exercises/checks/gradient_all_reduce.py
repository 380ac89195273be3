"""Exercise 13, averaging gradients across data-parallel processes whose shards hold unequal numbers of tokens:
fn(model, local_tokens), called on every rank right after backward() of that rank's mean loss over its own
`local_tokens` kept tokens, leaves in every rank's p.grad the gradient of the mean loss over the tokens of all
ranks together, the same on every rank.

The run starts WORLD_SIZE real processes by fork (so a function defined in a notebook cell runs in them), joined
in a gloo process group over the loopback. Each builds the same small model, takes its own shard, runs forward
and backward, calls the candidate through the harness (its guard and time limit, in that process) and sends back
over a pipe plain data: its gradients and weights afterwards, what it printed, or the candidate's error. Every
rank starts a case only when all have finished the one before, so one rank's stray collective never meets the
next case's. A rank still inside the candidate STRAGGLER_S after another returned is waiting in a collective
the other never called (a deadlock): the run names the line it waits at and kills every worker. The judge
recomputes in float64, in one process, the gradient of the mean loss over the whole batch, and those of known
mistakes (_MISTAKES) to name the one made."""
from __future__ import annotations

import contextlib
import faulthandler
import io
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import sys
import tempfile
import time
import warnings
from datetime import timedelta
from json import dumps as _json_dumps, loads as _json_loads  # bound at import, as the harness's

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import exercises.checks as settings
from exercises.checks.harness import (NONE_GRAD_HINT, ExerciseFailed, Foreign, call_candidate, from_plain_data,
                                      learner_line, register, require_callable, run_and_judge, tensor_differences,
                                      to_plain_data, type_name)

WORLD_SIZE = 2
STRAGGLER_S = 2.0  # a rank still inside the candidate this long after another returned waits on a collective
# that the other never called: once one rank is past every collective, the others have only local work left
SETUP_S = 60.0     # to fork the workers and join them in a process group: the check's own work, not the answer's
_VOCAB, _WIDTH, _PAD = 11, 6, -100
_LOOPBACK = "lo0" if sys.platform == "darwin" else "lo"  # gloo's only network: the grader's sandbox has no other
_AVG_HINT = (lambda e: "AVG" in str(e),  # older torch's gloo has no ReduceOp.AVG
             "sum with dist.all_reduce (ReduceOp.SUM, the default) and divide by the tokens of all ranks yourself: an "
             "average over ranks weighs every rank equally")


class _TokenModel(nn.Module):
    """Embedding -> tanh -> linear head; with `spare`, a layer registered between them that forward never uses,
    whose .grad stays None on every rank."""

    def __init__(self, spare):
        super().__init__()
        self.embed = nn.Embedding(_VOCAB, _WIDTH)
        if spare:
            self.spare = nn.Linear(_WIDTH, _WIDTH)
        self.head = nn.Linear(_WIDTH, _VOCAB)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x)))


def _model(spare):
    g = torch.Generator().manual_seed(13)
    with torch.random.fork_rng():  # nn layers draw from the global generator: leave it as it was
        model = _TokenModel(spare)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _shard(g, kept_per_row, time):
    """(x, y) of shape [rows, time]; row i keeps its first kept_per_row[i] targets, the rest are padding."""
    x = torch.randint(_VOCAB, (len(kept_per_row), time), generator=g)
    y = torch.randint(_VOCAB, (len(kept_per_row), time), generator=g)
    for row, kept in enumerate(kept_per_row):
        y[row, kept:] = _PAD
    return x, y


def _cases():
    """(case, one (x, y) shard per rank, whether the model has a layer no rank uses)."""
    g = torch.Generator().manual_seed(31)
    return [
        ("shards of 5 tokens (rank 0) and 20 tokens (rank 1), padded with -100",
         [_shard(g, [5, 0], 8), _shard(g, [8, 8, 4], 8)], False),
        ("shards of 12 tokens on both ranks", [_shard(g, [6, 6], 6), _shard(g, [6, 6], 6)], False),
        ("shards of 9 and 3 tokens and a layer no rank uses (its .grad is None on both ranks)",
         [_shard(g, [7, 2], 7), _shard(g, [3], 7)], True),
    ]


def _kept(y):
    return int((y != _PAD).sum())


def _mean_loss(model, x, y):
    return F.cross_entropy(model(x).reshape(-1, _VOCAB), y.reshape(-1), ignore_index=_PAD)


# ----------------------------------------------------------------------------------------
# The run: WORLD_SIZE forked workers, and the parent that paces them
# ----------------------------------------------------------------------------------------

def _send(connection, message):
    connection.send_bytes(_json_dumps(to_plain_data(message)).encode("utf-8"))


def _one_case(fn, guard, rank, case, shards, spare):
    model = _model(spare)
    x, y = shards[rank]
    _mean_loss(model, x, y).backward()
    local_tokens = _kept(y)
    try:
        call_candidate("sync_gradients", {"case": case, "rank": rank, "local_tokens": local_tokens}, fn, model,
                       local_tokens, hints=(NONE_GRAD_HINT, _AVG_HINT), guard=guard)
    except ExerciseFailed as failure:
        return {"failed": str(failure)}
    return {"grads": [p.grad for p in model.parameters()], "params": [p.detach() for p in model.parameters()]}


def _worker(fn, guard, rank, folder, connection):
    """One rank: join the group, then one case per "go" from the parent, each answered on `connection`."""
    printed = io.StringIO()
    sys.stdout = printed  # the kernel's streams are the parent's: what the answer prints goes back with the reply
    sys.stderr = open(os.devnull, "w", encoding="utf-8")
    settings.WATCHDOG_NOTE = None  # the parent's deadline ends this process; the watchdog's note is the kernel's
    torch.set_num_threads(1)  # WORLD_SIZE processes share the machine; OpenMP's pool did not survive the fork
    os.environ["GLOO_SOCKET_IFNAME"] = _LOOPBACK
    stack_file = open(os.path.join(folder, f"stack-{rank}.txt"), "w", encoding="utf-8")
    faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)  # where it waits, when asked
    try:
        dist.init_process_group("gloo", store=dist.FileStore(os.path.join(folder, "store"), WORLD_SIZE), rank=rank,
                                world_size=WORLD_SIZE, timeout=timedelta(seconds=SETUP_S + 2 * settings.TIME_LIMIT_S))
    except Exception as error:  # noqa: BLE001 - whatever stops gloo here is the check's problem, reported as such
        _send(connection, {"broken": f"{type(error).__name__}: {error}"})
        return
    _send(connection, {"ready": True})
    try:
        for case, shards, spare in _cases():
            connection.recv_bytes()  # the parent's go: every rank is done with the case before
            try:
                reply = _one_case(fn, guard, rank, case, shards, spare)
            except BaseException as error:  # noqa: BLE001 - SystemExit, KeyboardInterrupt: the answer's doing
                reply = {"failed": f"sync_gradients raised {type(error).__name__}: {error} (for {case})"}
            reply["printed"] = printed.getvalue()
            printed.seek(0)
            printed.truncate()
            _send(connection, reply)
    finally:
        dist.destroy_process_group()


class _Ranks:
    """The parent's side: WORLD_SIZE workers started by fork, each with its pipe; killed on leaving."""

    def __init__(self, fn, guard, folder):
        self.folder, self.workers, self.connections = folder, [], []
        context = multiprocessing.get_context("fork")
        with warnings.catch_warnings():  # Python >= 3.12 warns about fork in a process with threads (the kernel's):
            warnings.simplefilter("ignore", DeprecationWarning)  # the workers never touch what those threads hold
            for rank in range(WORLD_SIZE):
                ours, theirs = context.Pipe()
                worker = context.Process(target=_worker, args=(fn, guard, rank, folder, theirs), daemon=True)
                worker.start()
                theirs.close()  # only the worker holds its end now: its death reads as EOF here
                self.workers.append(worker)
                self.connections.append(ours)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for worker in self.workers:  # a worker past its last case has nothing left to do, a stuck one never will
            worker.kill()
            worker.join()
        for connection in self.connections:
            connection.close()
        return False

    def replies(self, deadline, straggler_s=None):
        """{rank: reply} of every rank that answers before `deadline` (time.monotonic()), or, once one has,
        within straggler_s of it; a worker that ended without answering gives {"ended": exit code}."""
        got = {}
        while len(got) < WORLD_SIZE:
            waiting = {self.connections[rank]: rank for rank in range(WORLD_SIZE) if rank not in got}
            ready = multiprocessing.connection.wait(list(waiting), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for connection in ready:
                rank = waiting[connection]
                try:
                    got[rank] = from_plain_data(_json_loads(connection.recv_bytes().decode("utf-8")))
                except (EOFError, OSError):
                    self.workers[rank].join(timeout=1.0)
                    got[rank] = {"ended": self.workers[rank].exitcode}
                except ValueError as error:
                    got[rank] = {"failed": f"rank {rank} sent back data the check cannot read ({error})"}
            if straggler_s is not None:
                deadline = min(deadline, time.monotonic() + straggler_s)
        return got

    def start_case(self):
        for connection in self.connections:
            connection.send_bytes(b"go")

    def waiting_at(self, rank):
        """' (at line N: `code`)' where rank's worker is in the answer's code now (faulthandler's stack), or ''."""
        path = os.path.join(self.folder, f"stack-{rank}.txt")
        with contextlib.suppress(OSError):
            os.kill(self.workers[rank].pid, signal.SIGUSR1)
        deadline = time.monotonic() + 1.0
        text = ""
        while time.monotonic() < deadline and "File " not in text:
            time.sleep(0.02)
            with open(path, encoding="utf-8", errors="replace") as file:
                text = file.read()
        for thread in re.split(r"\n(?=(?:Current thread|Thread) )", text):  # the answer runs on one of them
            where = learner_line([(name, int(line)) for name, line in re.findall(r'File "(.*)", line (\d+) in ',
                                                                                 thread)][::-1])
            if where:
                return where
        return ""


def _check_platform():
    if "fork" not in multiprocessing.get_all_start_methods():
        raise ExerciseFailed("this check starts its processes by fork, which this system lacks: run it on Linux or "
                             "macOS (or on Colab)")
    if not (dist.is_available() and dist.is_gloo_available()):
        raise ExerciseFailed("this check needs torch.distributed with the gloo backend, which this build of torch "
                             "lacks")


def _failure(replies, case):
    """The message of the first rank whose reply is an error, or None."""
    for rank in sorted(replies):
        reply = replies[rank]
        if "failed" in reply:
            return reply["failed"]
        if "ended" in reply:
            return (f"rank {rank}'s process ended inside sync_gradients (exit status {reply['ended']}) for {case}: "
                    f"does your function exit the process or destroy the process group?")
    return None


def _run(fn, records, guard):
    require_callable(fn, "sync_gradients")
    _check_platform()
    with tempfile.TemporaryDirectory(prefix="sync-gradients-") as folder, _Ranks(fn, guard, folder) as ranks:
        ready = ranks.replies(time.monotonic() + SETUP_S, STRAGGLER_S)  # the ranks meet in the store: together
        broken = [reply.get("broken", f"rank {rank} ended with exit status {reply.get('ended')}")
                  for rank, reply in ready.items() if "ready" not in reply]
        if broken or len(ready) < WORLD_SIZE:
            raise ExerciseFailed(f"the check could not start its {WORLD_SIZE} processes in a gloo process group "
                                 f"({'; '.join(broken) or 'timed out'}): a problem of the check, not of your answer")
        for case, _, _ in _cases():
            ranks.start_case()
            # a worker's own limit interrupts the answer at TIME_LIMIT_S; past GRACE_S more it is stuck in C
            replies = ranks.replies(time.monotonic() + settings.TIME_LIMIT_S + settings.GRACE_S, STRAGGLER_S)
            for rank, reply in sorted(replies.items()):
                for line in reply.pop("printed", "").splitlines():
                    print(f"[rank {rank}] {line}")
            failure = _failure(replies, case)
            if failure:
                raise ExerciseFailed(failure)
            stuck = [rank for rank in range(WORLD_SIZE) if rank not in replies]
            if stuck and replies:
                returned = ", ".join(map(str, sorted(replies)))
                raise ExerciseFailed(
                    f"deadlock: rank {stuck[0]} was still inside sync_gradients {STRAGGLER_S:g} s after rank "
                    f"{returned} had returned from it, waiting{ranks.waiting_at(stuck[0])} in a collective that "
                    f"rank {returned} never called ({case}). Every rank must call the same collectives, in the same "
                    f"order, on tensors of the same shapes: one that only some ranks call (under `if "
                    f"dist.get_rank() == 0`, or for a parameter only one rank handles) waits forever")
            if stuck:
                raise ExerciseFailed(
                    f"no rank returned from sync_gradients within {settings.TIME_LIMIT_S:g} s ({case}); rank 0 "
                    f"waits{ranks.waiting_at(0) or ' in code outside your function'}: is there an infinite loop, or "
                    f"a collective that waits for a message no rank sends?")
            records.append({"ranks": [replies[rank] for rank in range(WORLD_SIZE)]})


# ----------------------------------------------------------------------------------------
# The judge
# ----------------------------------------------------------------------------------------

def _names(spare):
    return [name for name, _ in _model(spare).named_parameters()]


def _local_grads(shards, spare):
    """Per rank, in float64: {parameter name: the gradient of that rank's mean loss} (unused ones left out), and
    its kept tokens."""
    per_rank = []
    for x, y in shards:
        model = _model(spare).double()
        _mean_loss(model, x, y).backward()
        per_rank.append(({name: p.grad for name, p in model.named_parameters() if p.grad is not None}, _kept(y)))
    return per_rank


def _weighted(per_rank, weights):
    """sum over ranks of weight[rank] x that rank's gradient, per parameter."""
    return {name: sum(w * grads[name] for (grads, _), w in zip(per_rank, weights)) for name in per_rank[0][0]}


def _mistakes(per_rank):
    """(gradients each rank holds after such an answer, what it did wrong): the first that matches is named."""
    counts = [kept for _, kept in per_rank]
    total, shown = sum(counts), " and ".join(map(str, counts))
    ones = [1.0] * len(per_rank)
    return [
        ([_weighted(per_rank, [float(r == rank) for r in range(WORLD_SIZE)]) for rank in range(WORLD_SIZE)],
         "every rank still holds the gradient of its own shard: nothing was averaged across ranks (dist.all_reduce "
         "sums a tensor over every rank, in place)"),
        ([_weighted(per_rank, [1.0 / WORLD_SIZE] * WORLD_SIZE)] * WORLD_SIZE,
         f"dividing by the world size weighs every rank equally, but the ranks hold {shown} tokens: weigh every "
         f"token equally. Multiply this rank's gradient by its local_tokens (its mean becomes the sum over its "
         f"tokens), all_reduce, and divide by the tokens of all ranks ({total})"),
        ([_weighted(per_rank, ones)] * WORLD_SIZE,
         "the ranks' gradients were summed by the all-reduce and never divided: each rank's gradient is a mean over "
         "its own tokens, and the whole batch's is a mean over all of them"),
        ([_weighted(per_rank, counts)] * WORLD_SIZE,
         f"yours is the gradient of the summed token losses: divide by the tokens of all ranks ({total})"),
        ([_weighted(per_rank, [c / counts[rank] for c in counts]) for rank in range(WORLD_SIZE)],
         f"each rank divided by its own token count ({shown}) instead of that of all ranks ({total}), so the ranks "
         f"disagree: all_reduce the token count too"),
        ([_weighted(per_rank, [1.0 / total] * WORLD_SIZE)] * WORLD_SIZE,
         f"each rank's gradient is a mean over its own tokens: multiply it by local_tokens (back to the sum over its "
         f"tokens) before the all-reduce, then divide by the tokens of all ranks ({total})"),
        ([_weighted(per_rank, [float(r == rank) * counts[r] / total for r in range(WORLD_SIZE)])
          for rank in range(WORLD_SIZE)],
         f"each rank weighed its gradient by its share of the tokens ({shown} of {total}) but the shares were never "
         f"added up across ranks: all_reduce them"),
        ([_weighted(per_rank, [c / total / WORLD_SIZE for c in counts])] * WORLD_SIZE,
         f"the sum over the ranks was divided by the world size ({WORLD_SIZE}) as well as by the tokens of all ranks "
         f"({total}); ReduceOp.AVG does the first: all-reduce with ReduceOp.SUM, the default"),
    ]


# float32 gradients of size ~0.1, each a mean over at most 20 tokens, then scaled, summed over two ranks and
# divided: a few tens of float32 roundings, relatively 1e-6 at most, and near-zero elements are held by the
# absolute 1e-6. The smallest mistake here changes the gradient by more than 10%
_RTOL, _ATOL = 1e-4, 1e-6


def _close(got, expected):
    return all(torch.allclose(got[name], expected[name], rtol=_RTOL, atol=_ATOL) for name in expected)


def _judge_weights(case, names, spare, ranks):
    for rank, reply in enumerate(ranks):
        for name, before, after in zip(names, _model(spare).parameters(), reply["params"]):
            if not (torch.is_tensor(after) and torch.equal(before.detach(), after)):
                raise ExerciseFailed(f"sync_gradients changed the weights ({name} on rank {rank}, for {case}): it "
                                     f"must change the gradients only. All-reduce p.grad, not p or p.data")


def _gradients(case, names, expected, ranks):
    """Each rank's gradients by name, in float64, once they have the types and shapes they must have."""
    got = []
    for rank, reply in enumerate(ranks):
        grads = {}
        for name, grad in zip(names, reply["grads"]):
            where = f"{name} on rank {rank}, for {case}"
            if name not in expected:
                if grad is not None:
                    raise ExerciseFailed(f"no rank used {name}, so one process would leave its .grad None, but "
                                         f"yours is {type_name(grad)} ({where}): skip parameters whose .grad is None")
                continue
            if grad is None:
                raise ExerciseFailed(f"{where} has no gradient after sync_gradients: average it in place, and keep "
                                     f"p.grad")
            if isinstance(grad, Foreign) or not torch.is_tensor(grad):
                raise ExerciseFailed(f"p.grad must stay a torch.Tensor, got {type_name(grad)} ({where})")
            if list(grad.shape) != list(expected[name].shape):
                raise ExerciseFailed(f"p.grad must keep the parameter's shape {list(expected[name].shape)}, got "
                                     f"{list(grad.shape)} ({where})")
            if not torch.isfinite(grad).all():
                raise ExerciseFailed(f"the gradient of {where} is not finite")
            grads[name] = grad.double()
        got.append(grads)
    return got


def _judge(records):
    for case, shards, spare in _cases():
        ranks = records.next()["ranks"]
        names = _names(spare)
        _judge_weights(case, names, spare, ranks)
        per_rank = _local_grads(shards, spare)
        total = sum(kept for _, kept in per_rank)
        right = _weighted(per_rank, [kept / total for _, kept in per_rank])
        got = _gradients(case, names, right, ranks)
        if all(_close(grads, right) for grads in got):
            differ = [name for name in right if not torch.equal(ranks[0]["grads"][names.index(name)],
                                                                  ranks[1]["grads"][names.index(name)])]
            if differ:
                raise ExerciseFailed(f"the ranks hold gradients of {differ[0]} that differ in their last bits, for "
                                     f"{case}: replicas whose gradients differ drift apart over the updates. Let "
                                     f"every rank compute the same operations in the same order (all_reduce gives "
                                     f"every rank the same sum)")
            continue
        for expected_per_rank, message in _mistakes(per_rank):
            if all(_close(grads, expected) for grads, expected in zip(got, expected_per_rank)):
                raise ExerciseFailed(f"{message} (for {case})")
        own = _mistakes(per_rank)[0][0]
        unsynced = [name for name in right if all(torch.allclose(grads[name], mine[name], rtol=_RTOL, atol=_ATOL)
                                                  for grads, mine in zip(got, own))]
        if unsynced and all(_close({n: g for n, g in grads.items() if n not in unsynced},
                                   {n: r for n, r in right.items() if n not in unsynced}) for grads in got):
            raise ExerciseFailed(f"{' and '.join(unsynced)} still {'hold' if len(unsynced) > 1 else 'holds'} each "
                                 f"rank's own gradient while the other parameters are right, for {case}: average "
                                 f"every parameter that has a gradient (skip only those whose .grad is None)")
        for rank, grads in enumerate(got):
            for name in right:
                if not torch.allclose(grads[name], right[name], rtol=_RTOL, atol=_ATOL):
                    raise ExerciseFailed(f"wrong gradient of {name} on rank {rank} for {case}: "
                                         f"{tensor_differences(right[name], grads[name])}")


def check_gradient_all_reduce(fn):
    """fn(model, local_tokens), called on each of 2 ranks (real processes in a gloo group) after backward() of the
    rank's mean loss over its own local_tokens kept tokens, leaves in every rank's p.grad the gradient of the mean
    loss over all ranks' tokens: sum over ranks of (local_tokens x p.grad), divided by the sum of local_tokens."""
    __tracebackhide__ = True
    run_and_judge("check_gradient_all_reduce", fn)


register("check_gradient_all_reduce", _run, _judge)

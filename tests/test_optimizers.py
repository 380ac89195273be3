"""SGD and AdamW, written from scratch, against torch.optim step for step."""
import copy

import pytest
import torch

from training import SGD, AdamW


def make_params(dtype=torch.float64, seed=0):
    """Three tensors of different shapes (a matrix, a vector, a scalar-like) as leaf parameters."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(5, 4), (4,), (1,)]
    return [torch.randn(s, generator=generator, dtype=dtype).requires_grad_() for s in shapes]


def loss_fn(params, step):
    """A smooth, step-dependent loss so that gradients change every step (like minibatches)."""
    generator = torch.Generator().manual_seed(step)
    total = 0.0
    for p in params:
        target = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        total = total + ((p - target) ** 2).sum() + 0.1 * (p ** 4).sum()
    return total


def run(optimizer_cls, params, steps, groups=None, **kwargs):
    """`steps` updates of `params` (optionally split into param `groups`) by a fresh optimizer."""
    optimizer = optimizer_cls(groups or params, **kwargs)
    for step in range(steps):
        optimizer.zero_grad()
        loss_fn(params, step).backward()
        optimizer.step()
    return optimizer


def max_relative_error(ours, theirs):
    return max(((a - b).abs() / b.abs().clamp_min(1e-12)).max().item() for a, b in zip(ours, theirs))


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_pytorch_after_1000_steps_in_float64(foreach, weight_decay):
    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    ours, theirs = make_params(), make_params()
    run(AdamW, ours, 1000, foreach=foreach, **kwargs)
    run(torch.optim.AdamW, theirs, 1000, foreach=False, **kwargs)
    assert max_relative_error(ours, theirs) < 1e-6


def test_adamw_foreach_equals_loop_in_float32():
    ours, loop = make_params(torch.float32), make_params(torch.float32)
    run(AdamW, ours, 50, foreach=True, lr=1e-2)
    run(AdamW, loop, 50, foreach=False, lr=1e-2)
    for a, b in zip(ours, loop):
        # same formula, op for op; multi-tensor kernels may round differently by an ulp or so
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.0, 1e-2), (0.9, 1e-2)])
def test_sgd_matches_pytorch(foreach, momentum, weight_decay):
    ours, theirs = make_params(torch.float32), make_params(torch.float32)
    run(SGD, ours, 100, lr=1e-2, momentum=momentum, weight_decay=weight_decay, foreach=foreach)
    run(torch.optim.SGD, theirs, 100, lr=1e-2, momentum=momentum, weight_decay=weight_decay, foreach=False)
    for a, b in zip(ours, theirs):
        # The same float32 operations in the same order as torch.optim.SGD: 100 steps agree to
        # a few ulps (~1e-7 relative each); 1e-5 leaves room without hiding a wrong formula,
        # whose error would be of the order of lr * grad ~ 1e-2.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_param_groups_keep_their_own_hyperparameters():
    ours, theirs = make_params(), make_params()
    groups = lambda ps: [{"params": ps[:1], "lr": 1e-2, "weight_decay": 0.5}, {"params": ps[1:]}]
    run(AdamW, ours, 100, groups(ours), lr=1e-3, weight_decay=0.0)
    run(torch.optim.AdamW, theirs, 100, groups(theirs), lr=1e-3, weight_decay=0.0, foreach=False)
    assert max_relative_error(ours, theirs) < 1e-9


def test_parameters_without_grad_are_left_alone():
    params = make_params()
    frozen = params[1].detach().clone()
    optimizer = AdamW(params, lr=0.1)
    params[0].sum().backward()  # only params[0] gets a gradient
    optimizer.step()
    assert torch.equal(params[1], frozen)
    assert params[1] not in optimizer.state


@pytest.mark.parametrize("cls, kwargs", [(AdamW, dict(lr=1e-2, foreach=True)), (AdamW, dict(lr=1e-2)),
                                         (SGD, dict(lr=1e-2, momentum=0.9))])
def test_state_dict_round_trip_continues_identically(cls, kwargs):
    params = make_params()
    optimizer = run(cls, params, 10, **kwargs)
    saved_params, saved_state = [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())
    for step in range(10, 20):  # the uninterrupted run
        optimizer.zero_grad()
        loss_fn(params, step).backward()
        optimizer.step()

    resumed = [p.clone().requires_grad_() for p in saved_params]
    fresh = cls(resumed, **kwargs)
    fresh.load_state_dict(saved_state)
    for step in range(10, 20):
        fresh.zero_grad()
        loss_fn(resumed, step).backward()
        fresh.step()
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)


def test_adamw_state_dict_has_pytorch_layout():
    optimizer = run(AdamW, make_params(), 3, lr=1e-2)
    state = optimizer.state_dict()
    assert set(state) == {"state", "param_groups"}
    assert set(state["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert state["state"][0]["step"] == 3


def test_closure_is_evaluated_and_its_loss_returned():
    params = make_params()
    optimizer = SGD(params, lr=0.1)
    calls = []

    def closure():
        optimizer.zero_grad()
        loss = loss_fn(params, 0)
        loss.backward()
        calls.append(loss)
        return loss
    assert optimizer.step(closure) is calls[0]
    assert len(calls) == 1


@pytest.mark.parametrize("cls, kwargs, name", [
    (SGD, dict(lr=-1.0), "lr"),
    (SGD, dict(lr=0.1, momentum=1.0), "momentum"),
    (SGD, dict(lr=0.1, weight_decay=-1e-3), "weight_decay"),
    (AdamW, dict(lr=-1e-3), "lr"),
    (AdamW, dict(betas=(0.9, 1.0)), "betas"),
    (AdamW, dict(betas=0.9), "betas"),
    (AdamW, dict(eps=-1e-8), "eps"),
    (AdamW, dict(weight_decay=-0.1), "weight_decay"),
    (AdamW, dict(lr="fast"), "lr"),
])
def test_bad_hyperparameters_raise_naming_the_argument(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(make_params(), **kwargs)

"""clip_grad_norm against torch.nn.utils.clip_grad_norm_."""
import pytest
import torch

from training import clip_grad_norm


def params_with_grads(scale, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in [(4, 3), (3,), (2, 2, 2)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * scale
    return params


def clone(params):
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for c, p in zip(copies, params):
        c.grad = None if p.grad is None else p.grad.clone()
    return copies


@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
def test_matches_pytorch(scale):
    ours = params_with_grads(scale)
    theirs = clone(ours)
    norm = clip_grad_norm(ours, max_norm=1.0)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm=1.0)
    # float32: the norm is a sum of ~30 squares, ~1e-7 relative rounding each
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-8)


def test_hand_value_3_4_5():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    assert clip_grad_norm([p], max_norm=1.0).item() == pytest.approx(5.0)  # the norm before clipping
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8]), rtol=1e-6, atol=0)


def test_small_gradients_are_untouched():
    params = params_with_grads(1e-3)
    before = [p.grad.clone() for p in params]
    clip_grad_norm(params, max_norm=1.0)
    for p, g in zip(params, before):
        assert torch.equal(p.grad, g)


def test_frozen_parameters_are_skipped():
    params = params_with_grads(10.0)
    params[1].requires_grad_(False)
    params[1].grad = None  # frozen: no gradient
    theirs = clone(params)
    norm = clip_grad_norm(params, max_norm=1.0)
    torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(theirs, max_norm=1.0), rtol=1e-6, atol=0)
    assert params[1].grad is None
    total = torch.linalg.vector_norm(torch.cat([params[0].grad.flatten(), params[2].grad.flatten()]))
    assert total.item() == pytest.approx(1.0, rel=1e-5)


def test_frozen_layer_of_a_model():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    model[0].requires_grad_(False)
    model(torch.randn(8, 4)).pow(2).sum().backward()
    reference = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model[1].parameters()]))
    norm = clip_grad_norm(model.parameters(), max_norm=1e9)
    torch.testing.assert_close(norm, reference)


def test_no_gradients_gives_zero_norm():
    assert clip_grad_norm([torch.nn.Parameter(torch.ones(3))], max_norm=1.0).item() == 0.0


def test_single_tensor_and_generator_inputs():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    assert clip_grad_norm(p, 10.0).item() == pytest.approx(5.0)
    assert clip_grad_norm((q for q in [p]), 10.0).item() == pytest.approx(5.0)


@pytest.mark.parametrize("max_norm", [0.0, -1.0, "1", True])
def test_bad_max_norm_raises(max_norm):
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(params_with_grads(1.0), max_norm=max_norm)

"""cross_entropy and perplexity against torch.nn.functional.cross_entropy and hand values."""
import math

import pytest
import torch
import torch.nn.functional as F

from training import cross_entropy, perplexity


def test_matches_pytorch_on_random_logits():
    torch.manual_seed(0)
    logits, targets = torch.randn(4, 7, 11), torch.randint(11, (4, 7))
    # float32: both compute log-sum-exp with ~1e-7 relative rounding per op, summed over 11 classes
    torch.testing.assert_close(cross_entropy(logits, targets),
                               F.cross_entropy(logits.flatten(0, 1), targets.flatten()), rtol=1e-6, atol=1e-6)


def test_hand_computed_value():
    # uniform logits over 4 classes: -log(1/4) = ln 4, whatever the target
    assert cross_entropy(torch.zeros(3, 4), torch.tensor([0, 1, 3])).item() == pytest.approx(math.log(4), rel=1e-6)
    # logits [0, ln 3]: p(class 1) = 3/4
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert cross_entropy(logits, torch.tensor([1])).item() == pytest.approx(-math.log(0.75), rel=1e-6)


def test_gradient_matches_pytorch():
    torch.manual_seed(1)
    ours = torch.randn(5, 9, requires_grad=True)
    theirs = ours.detach().clone().requires_grad_()
    targets = torch.randint(9, (5,))
    cross_entropy(ours, targets).backward()
    F.cross_entropy(theirs, targets).backward()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-6, atol=1e-7)


def test_extreme_logits_of_magnitude_1e4_stay_finite():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4], [1e4, 1e4, 1e4]])
    targets = torch.tensor([1, 2, 0])
    loss = cross_entropy(logits, targets)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets))
    # hand value: row 1 costs 2e4, row 2 ~0, row 3 ln 3
    assert loss.item() == pytest.approx((2e4 + 0.0 + math.log(3)) / 3, rel=1e-6)


def test_minus_inf_logits_for_other_classes():
    logits = torch.tensor([[0.0, -math.inf, -math.inf], [1.0, 2.0, -math.inf]])
    targets = torch.tensor([0, 1])
    loss = cross_entropy(logits, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets))
    assert torch.isfinite(loss)


def test_minus_inf_logit_on_the_target_is_infinite_loss():
    logits = torch.tensor([[0.0, -math.inf]])
    assert cross_entropy(logits, torch.tensor([1])).item() == math.inf
    assert F.cross_entropy(logits, torch.tensor([1])).item() == math.inf


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_upcast(dtype):
    torch.manual_seed(2)
    logits = (torch.randn(6, 50) * 20).to(dtype)
    targets = torch.randint(50, (6,))
    loss = cross_entropy(logits, targets)
    assert loss.dtype == torch.float32
    # same (rounded) inputs upcast: only float32 rounding separates the two
    torch.testing.assert_close(loss, F.cross_entropy(logits.float(), targets), rtol=1e-6, atol=1e-5)


def test_ignore_index_skips_positions():
    torch.manual_seed(3)
    logits, targets = torch.randn(8, 5), torch.randint(5, (8,))
    targets[[1, 4, 6]] = -100
    torch.testing.assert_close(cross_entropy(logits, targets), F.cross_entropy(logits, targets))
    targets[[1, 4, 6]] = 7  # a custom ignore_index may lie outside [0, V)
    torch.testing.assert_close(cross_entropy(logits, targets, ignore_index=7),
                               F.cross_entropy(logits, targets, ignore_index=7))


def test_all_targets_ignored_gives_nan_like_pytorch():
    logits, targets = torch.randn(3, 4), torch.full((3,), -100)
    assert torch.isnan(cross_entropy(logits, targets))
    assert torch.isnan(F.cross_entropy(logits, targets))


def test_rejects_bad_inputs():
    with pytest.raises(TypeError, match="logits"):
        cross_entropy(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="targets"):
        cross_entropy(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="targets"):
        cross_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        cross_entropy(torch.zeros(2, 3), torch.tensor([0, 3]))


def test_perplexity():
    assert perplexity(math.log(65)) == pytest.approx(65)
    assert perplexity(torch.tensor(0.0)) == 1.0
    assert perplexity(1000.0) == math.inf
    with pytest.raises(ValueError, match="loss"):
        perplexity(-0.5)
    with pytest.raises(ValueError, match="loss"):
        perplexity(float("nan"))

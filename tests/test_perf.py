"""course/perf.py: the FLOPs-per-token estimate against PyTorch's own FLOP counter, and MFU."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from course import perf
from m06_transformer import GPT, GPTConfig


@pytest.mark.parametrize("context", [16, 32])
def test_training_flops_per_token_equals_pytorch_flop_counter(context):
    # The counter sees attention's two T x T matmuls only through the explicit "math" kernel;
    # elementwise work (biases, LayerNorm, GELU, softmax) is counted by neither, so they agree exactly.
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, context_length=32, d_model=32, n_layers=2, n_heads=2, d_ff=64))
    tokens = torch.randint(50, (3, context + 1))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    assert counter.get_total_flops() == perf.training_flops_per_token(model, context) * 3 * context


def test_training_flops_per_token_rejects_a_context_longer_than_the_model():
    model = GPT(GPTConfig(vocab_size=50, context_length=8, d_model=8, n_layers=1, n_heads=1, d_ff=16))
    with pytest.raises(ValueError, match="context_length"):
        perf.training_flops_per_token(model, 9)


def test_mfu_is_model_flops_over_peak():
    assert perf.mfu(tokens_per_second=1000, flops_per_token=2e6, peak_flops=4e9) == 0.5
    with pytest.raises(ValueError, match="peak_flops"):
        perf.mfu(1000, 2e6, 0)


def test_time_call_validates_and_returns_the_median():
    with pytest.raises(ValueError, match="repeats"):
        perf.time_call(lambda: None, "cpu", repeats=0)
    assert perf.time_call(lambda: None, "cpu", warmup=0, repeats=3) >= 0

"""The trainer's speed options, exercised on this CPU: optimizer choices, bf16 and fp16
autocast (fp16 with its GradScaler), and torch.compile.

CUDA-only pieces (fused AdamW kernels, TF32, pinned memory) cannot run here; what can be
checked without a GPU is that the trainer *chooses* them for a CUDA device.
"""
import pytest
import torch

import training


def final_weights(result):
    return {name: tensor.detach().clone() for name, tensor in result.model.state_dict().items()}


def assert_weights_close(a, b, **tolerance):
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, **tolerance)


@pytest.mark.parametrize("device, expected", [
    ("cpu", "training.AdamW (multi-tensor)"),
    ("cuda", "torch.optim.AdamW (fused)"),  # chosen by device type; built here on CPU tensors
])
def test_auto_optimizer_is_the_fast_one_for_the_device(tiny_train_config, tiny_gpt, device, expected):
    optimizer, name = training.build_optimizer(tiny_gpt, tiny_train_config(), torch.device(device))
    assert name == expected
    if device == "cpu":
        assert isinstance(optimizer, training.AdamW) and optimizer.defaults["foreach"]
    else:
        assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]
    decayed, not_decayed = optimizer.param_groups
    assert all(p.dim() >= 2 for p in decayed["params"]) and decayed["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in not_decayed["params"]) and not_decayed["weight_decay"] == 0.0


@pytest.mark.slow
def test_every_adamw_choice_trains_the_same_weights(tiny_train_config):
    # Loop, multi-tensor and PyTorch's AdamW do the same float32 arithmetic in a different
    # grouping; a few roundings (relative ~1e-7) per step stay far below 1e-5 after 8 steps.
    runs = {name: final_weights(training.train(tiny_train_config(optimizer=name, max_steps=8)))
            for name in ("adamw", "adamw-foreach", "torch-adamw")}
    assert_weights_close(runs["adamw-foreach"], runs["adamw"], atol=1e-5, rtol=1e-5)
    assert_weights_close(runs["torch-adamw"], runs["adamw"], atol=1e-5, rtol=1e-5)


def test_bf16_autocast_on_cpu_computes_in_bf16(tiny_gpt):
    x = torch.randint(0, tiny_gpt.config.vocab_size, (2, 8))
    with training.autocast(torch.device("cpu"), torch.bfloat16):
        assert tiny_gpt(x).dtype == torch.bfloat16
    assert tiny_gpt(x).dtype == torch.float32


@pytest.mark.slow
def test_low_precision_training_on_cpu_tracks_fp32(tiny_train_config):
    full = training.train(tiny_train_config(dtype="fp32", max_steps=10))
    for dtype in ("bf16", "fp16"):
        low = training.train(tiny_train_config(dtype=dtype, max_steps=10))
        losses = [entry["loss"] for entry in low.history]
        assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.3, dtype
        # Half-precision matmuls round to 8 (bf16) or 11 (fp16) mantissa bits: the loss curve
        # moves by well under 0.05 nats in 10 steps, but the weights are not fp32's bit for bit.
        for a, b in zip(full.history, low.history):
            assert abs(a["loss"] - b["loss"]) < 0.05, dtype
        assert any(not torch.equal(a, b) for a, b in zip(final_weights(full).values(),
                                                           final_weights(low).values())), dtype


@pytest.mark.slow
def test_fp16_grad_scaler_state_survives_a_resume(tiny_train_config, tmp_path):
    straight = training.train(tiny_train_config(dtype="fp16", max_steps=8, eval_interval=4,
                                                out_dir=str(tmp_path / "straight")))
    scaler_state = training.read_checkpoint(straight.last_checkpoint)["scaler"]
    assert scaler_state["scale"] > 1 and scaler_state["_growth_tracker"] >= 1  # the scaler was active
    first_half = training.train(tiny_train_config(dtype="fp16", max_steps=4, decay_steps=8,
                                                  out_dir=str(tmp_path / "resumed")))
    resumed = training.train(tiny_train_config(dtype="fp16", max_steps=8, out_dir=str(tmp_path / "resumed"),
                                               resume=first_half.last_checkpoint))
    assert_weights_close(final_weights(resumed), final_weights(straight), atol=0, rtol=0)
    assert training.read_checkpoint(resumed.last_checkpoint)["scaler"] == scaler_state


@pytest.mark.slow
def test_compile_trains_on_cpu(tiny_train_config):
    # Compiling costs 15-60 s of gcc and Inductor time on a 2-core CPU (cached afterwards);
    # one block and three steps keep the rest of the test cheap.
    settings = dict(n_layers=1, max_steps=3, warmup_steps=1, eval_interval=3)
    eager = training.train(tiny_train_config(**settings))
    compiled = training.train(tiny_train_config(compile=True, **settings))
    # Inductor fuses element-wise ops and may reorder float32 sums: equal to ~1e-6 relative.
    for a, b in zip(eager.history, compiled.history):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert_weights_close(final_weights(compiled), final_weights(eager), atol=1e-5, rtol=1e-5)

"""pick_device, resolve_dtype and mixed precision (torch.autocast, torch.amp.GradScaler) on the CPU."""
import pytest
import torch

import training
from m07_training.distributed import Ranks, process_device
from training import autocast, pick_device, resolve_dtype

CPU = torch.device("cpu")


def test_pick_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device() == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device() == CPU
    assert pick_device("auto") == CPU


def test_pick_device_honours_an_existing_preference():
    assert pick_device("cpu") == CPU
    assert pick_device(torch.device("cpu")) == CPU


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda:abc"])
def test_pick_device_rejects_unknown_names(name):
    with pytest.raises(ValueError, match="device"):
        pick_device(name)


def test_pick_device_rejects_missing_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="not available"):
        pick_device("cuda")
    with pytest.raises(ValueError, match="not available"):
        pick_device("mps")


def test_resolve_dtype():
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("bf16", CPU) == torch.bfloat16
    assert resolve_dtype("fp16", CPU) == torch.float16
    assert resolve_dtype("fp32", CPU) == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("fp8", CPU)


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16),   # T4 (Colab's free GPU)
                                                   ((8, 0), torch.bfloat16),  # A100
                                                   ((9, 0), torch.bfloat16)])  # H100
def test_resolve_dtype_auto_on_cuda_follows_native_bf16(monkeypatch, capability, expected):
    # A T4 "supports" bf16 by emulation (is_bf16_supported() is True there), which is slow: auto
    # must pick fp16 + GradScaler below compute capability 8.0.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_dtype("auto", torch.device("cuda")) == expected
    assert training.has_native_bf16(torch.device("cuda")) == (expected == torch.bfloat16)


def test_no_native_bf16_off_cuda():
    assert not training.has_native_bf16(CPU)
    assert not training.has_native_bf16(torch.device("mps"))


def test_torchrun_ranks_come_from_the_environment(monkeypatch):
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    assert Ranks.from_environment() == Ranks(rank=1, local_rank=1, world_size=2)


def test_torchrun_with_more_processes_than_gpus_names_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="LOCAL_RANK=1 .* 1 CUDA device.*--nproc_per_node=1"):
        process_device("auto", Ranks(rank=1, local_rank=1, world_size=2))


def test_torchrun_on_a_mac_trains_on_cpu_tensors_for_gloo(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert process_device("auto", Ranks(world_size=2)) == CPU
    with pytest.raises(ValueError, match="gloo.*CPU"):
        process_device("mps", Ranks(world_size=2))


def test_autocast_bf16_on_cpu(tiny_gpt):
    idx = torch.randint(17, (2, 8))
    with autocast(CPU, torch.bfloat16):
        logits = tiny_gpt(idx)
        assert torch.is_autocast_enabled("cpu")
    assert logits.dtype == torch.bfloat16  # the LM head's matmul ran in bf16
    reference = tiny_gpt(idx)
    assert reference.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: ~4e-3 relative per rounding, a few roundings deep
    torch.testing.assert_close(logits.float(), reference, rtol=5e-2, atol=5e-2)
    # the loss is still computed in float32 from the bf16 logits
    assert training.cross_entropy(logits, idx).dtype == torch.float32


def test_autocast_fp32_is_a_no_op():
    with autocast(CPU, torch.float32):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_grad_scaler_fp16_on_cpu_recovers_true_gradients():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    x = torch.randn(16, 8)
    reference = torch.nn.Linear(8, 1)
    reference.load_state_dict(model.state_dict())
    reference(x).pow(2).mean().backward()

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    optimizer = training.SGD(model.parameters(), lr=0.1)
    with autocast(CPU, torch.float16):
        loss = model(x).float().pow(2).mean()
    scaler.scale(loss).backward()
    assert model.weight.grad.abs().max() > reference.weight.grad.abs().max() * 100  # scaled by 2**10
    scaler.unscale_(optimizer)
    # fp16 matmuls: ~1e-3 relative rounding in the forward pass
    torch.testing.assert_close(model.weight.grad, reference.weight.grad, rtol=1e-2, atol=1e-3)
    before = model.weight.detach().clone()
    scaler.step(optimizer)
    scaler.update()
    assert not torch.equal(model.weight, before)
    assert scaler.get_scale() == 2.0 ** 10


def test_grad_scaler_skips_a_step_with_inf_gradients_and_halves_the_scale():
    model = torch.nn.Linear(2, 1)
    optimizer = training.AdamW(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    scaler.scale(model(torch.tensor([[1.0, float("inf")]])).sum()).backward()
    before = model.weight.detach().clone()
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(model.weight, before)
    assert scaler.get_scale() == 128.0

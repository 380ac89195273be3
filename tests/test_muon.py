"""Muon, written from scratch, against torch.optim.Muon; MuonWithAdamW; --optimizer muon."""
import copy
import dataclasses

import pytest
import torch

import training
from m06_transformer import create_gpt_tiny
from training import NS_COEFFICIENTS, Muon, MuonWithAdamW, newton_schulz, split_params_for_muon

# Wide, tall, square, and a repeated shape (so foreach batches two matrices in one iteration).
SHAPES = [(16, 48), (48, 16), (32, 32), (16, 48)]


def make_matrices(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).requires_grad_() for shape in SHAPES]


def run(optimizer, params, steps=5):
    """`steps` updates with fresh random gradients each step (the same for every optimizer)."""
    for step in range(steps):
        generator = torch.Generator().manual_seed(1000 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
    return optimizer


def error_per_displacement(ours, theirs, start):
    """Largest difference between the two runs, as a fraction of the largest distance torch's run moved."""
    error = max((a - b).abs().max().item() for a, b in zip(ours, theirs))
    moved = max((b - s).abs().max().item() for b, s in zip(theirs, start))
    return error / moved


@pytest.fixture
def torch_muon_in_fp32(monkeypatch):
    """torch.optim.Muon casts its momentum to bf16 before Newton-Schulz (grad.bfloat16()); make that
    cast a plain copy, and torch's own code runs the same iteration in fp32."""
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda self: self.clone())


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("adjust_lr", ["match_rms_adamw", "original"])
def test_matches_torch_muon_in_fp32(foreach, adjust_lr, torch_muon_in_fp32):
    ours, theirs, start = make_matrices(), make_matrices(), make_matrices()
    settings = dict(lr=0.02, momentum=0.95, weight_decay=0.1)
    run(Muon(ours, adjust_lr=adjust_lr, ns_dtype="fp32", foreach=foreach, **settings), ours)
    run(torch.optim.Muon(theirs, adjust_lr_fn=adjust_lr, **settings), theirs)
    # The same fp32 operations in the same order (the batched bmm of foreach may sum in another
    # order): differences are rounding, ~1e-7 of an O(1) entry per step, and 5 steps of a bounded
    # polynomial amplify them little. A wrong formula (no look-ahead, wrong scale) is off by 1e-1.
    assert error_per_displacement(ours, theirs, start) < 1e-5


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
def test_matches_torch_muon_in_bf16(foreach):
    ours, theirs, start = make_matrices(), make_matrices(), make_matrices()
    run(Muon(ours, lr=0.02, ns_dtype="bf16", foreach=foreach), ours)
    run(torch.optim.Muon(theirs, lr=0.02, adjust_lr_fn="match_rms_adamw"), theirs)
    # bf16 keeps 8 significant bits (relative rounding up to 2^-9 = 0.2%): a matmul summed in
    # another order can move an entry of the update by a few such steps, and 5 updates of the same
    # sign at most add up. 2% of the distance moved allows ~10 bf16 roundings and still fails the
    # formula errors above (next test).
    assert error_per_displacement(ours, theirs, start) < 2e-2


def test_bf16_tolerance_still_catches_a_missing_nesterov_look_ahead():
    ours, theirs, start = make_matrices(), make_matrices(), make_matrices()
    run(Muon(ours, lr=0.02, ns_dtype="bf16", nesterov=False), ours)
    run(torch.optim.Muon(theirs, lr=0.02, adjust_lr_fn="match_rms_adamw"), theirs)
    assert error_per_displacement(ours, theirs, start) > 1e-1


def scalar_newton_schulz(s, steps=5):
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        s = a * s + b * s ** 3 + c * s ** 5
    return s


def test_newton_schulz_maps_singular_values_by_the_scalar_polynomial():
    matrix = torch.randn(64, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    singular = torch.linalg.svdvals(matrix)
    out = torch.linalg.svdvals(newton_schulz(matrix.float()).double())
    # Same singular vectors, each singular value s/||M||_F sent through a s + b s^3 + c s^5 five times
    # (the polynomial is not monotonic, so compare as sorted lists)
    expected = scalar_newton_schulz(singular / torch.linalg.matrix_norm(matrix)).sort(descending=True).values
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)


def test_newton_schulz_singular_values_land_in_the_band_near_1():
    # The band the coefficients give: where 5 steps send every s in [2e-3, 1] (a^5 * 2e-3 ~ 1)
    band = scalar_newton_schulz(torch.linspace(2e-3, 1, 100_001, dtype=torch.float64))
    low, high = band.min().item(), band.max().item()
    assert 0.68 < low < 0.69 and 1.20 < high < 1.21
    for shape in [(128, 384), (512, 128), (128, 128)]:  # the tiny GPT's matrix shapes
        matrix = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        singular = torch.linalg.svdvals(matrix / torch.linalg.matrix_norm(matrix))
        out = torch.linalg.svdvals(newton_schulz(matrix))
        out = out[singular >= 2e-3]  # a square Gaussian matrix has a few singular values near 0
        assert len(out) >= min(shape) - 3 and low - 1e-3 <= out.min() and out.max() <= high + 1e-3, shape


def test_newton_schulz_batched_equals_one_at_a_time():
    batch = torch.randn(3, 48, 16, generator=torch.Generator().manual_seed(0))
    one_by_one = torch.stack([newton_schulz(m) for m in batch])
    torch.testing.assert_close(newton_schulz(batch), one_by_one, rtol=1e-5, atol=1e-6)


def test_newton_schulz_dtype_follows_the_device(monkeypatch):
    assert training.newton_schulz_dtype("auto", torch.device("cpu")) == torch.float32
    assert training.newton_schulz_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert training.newton_schulz_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert training.newton_schulz_dtype("auto", cuda) == torch.float32
    assert training.newton_schulz_dtype("fp32", cuda) == torch.float32


def test_muon_rejects_parameters_that_are_not_matrices():
    with pytest.raises(ValueError, match=r"2-D .* shape \[4\]"):
        Muon([torch.zeros(4, 4, requires_grad=True), torch.zeros(4, requires_grad=True)])


def test_weight_decay_shrinks_weights_by_1_minus_lr_times_decay():
    # A zero gradient leaves the momentum at 0, whose orthogonalisation is 0: only the decay acts.
    weight = torch.randn(8, 4, generator=torch.Generator().manual_seed(0)).requires_grad_()
    start = weight.detach().clone()
    optimizer = Muon([weight], lr=0.1, weight_decay=0.5)
    weight.grad = torch.zeros_like(weight)
    optimizer.step()
    torch.testing.assert_close(weight.detach(), start * (1 - 0.1 * 0.5), rtol=0, atol=0)


@pytest.mark.parametrize("untied", [False, True], ids=["tied head", "untied head"])
def test_split_of_the_tiny_gpt(untied):
    model = create_gpt_tiny(**({"tie_head": False} if untied else {}))
    hidden, matrices, vectors = split_params_for_muon(model)
    names = {id(p): name for name, p in model.named_parameters()}
    expected_hidden = {f"blocks.{i}.{m}.weight" for i in range(4)
                       for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    assert {names[id(p)] for p in hidden} == expected_hidden
    assert {names[id(p)] for p in matrices} == {"tok_emb.weight", "pos_emb.weight"} | (
        {"lm_head.weight"} if untied else set())
    assert all(p.dim() == 1 for p in vectors)  # biases and LayerNorm gains
    assert len(hidden) + len(matrices) + len(vectors) == len(list(model.parameters()))


def test_muon_with_adamw_equals_the_pair_it_combines():
    torch.manual_seed(0)
    model = create_gpt_tiny(vocab_size=20, n_layers=1, context_length=8)
    twin = copy.deepcopy(model)
    hidden, matrices, vectors = split_params_for_muon(model)
    combined = MuonWithAdamW(hidden, [{"params": matrices}, {"params": vectors, "weight_decay": 0.0}],
                             lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99), foreach=True)
    t_hidden, t_matrices, t_vectors = split_params_for_muon(twin)
    muon = Muon(t_hidden, lr=1e-2, weight_decay=0.1)
    adamw = training.AdamW([{"params": t_matrices}, {"params": t_vectors, "weight_decay": 0.0}],
                           lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99))
    idx = torch.randint(20, (4, 8), generator=torch.Generator().manual_seed(0))
    for step in range(3):
        for m, optimizers in ((model, [combined]), (twin, [muon, adamw])):
            training.cross_entropy(m(idx), idx).backward()
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters()):
        # multi-tensor against per-tensor kernels: the same arithmetic, rounded alike to an ulp or so
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("make", [
    lambda ps: Muon(ps, lr=0.02, foreach=True),
    lambda ps: MuonWithAdamW(ps[:2], ps[2:], lr=0.02),
], ids=["Muon", "MuonWithAdamW"])
def test_state_dict_round_trip_continues_identically(make):
    params = make_matrices()
    optimizer = run(make(params), params)
    saved_params, saved_state = [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())
    run(optimizer, params)  # the uninterrupted run: 5 more updates
    resumed = [p.clone().requires_grad_() for p in saved_params]
    fresh = make(resumed)
    fresh.load_state_dict(saved_state)
    run(fresh, resumed)
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1.0), "lr"),
    (dict(momentum=1.0), "momentum"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(rms=-0.2), "rms"),
    (dict(eps=-1e-7), "eps"),
    (dict(nesterov="yes"), "nesterov"),
    (dict(adjust_lr="adam"), "adjust_lr"),
    (dict(ns_steps=0), "ns_steps"),
    (dict(ns_steps=2.5), "ns_steps"),
    (dict(ns_coefficients=(3.4, -4.8)), "ns_coefficients"),
    (dict(ns_dtype="fp16"), "ns_dtype"),
])
def test_bad_hyperparameters_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Muon(make_matrices(), **kwargs)


@pytest.mark.parametrize("overrides, field", [
    (dict(muon_momentum=1.0), "muon_momentum"),
    (dict(muon_rms=0.0), "muon_rms"),
    (dict(muon_ns_steps=0), "muon_ns_steps"),
    (dict(muon_ns_steps=100), "muon_ns_steps"),
    (dict(muon_dtype="fp16"), "muon_dtype"),
])
def test_bad_muon_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        training.TrainConfig(optimizer="muon", **overrides)


def test_build_optimizer_gives_muon_the_hidden_matrices():
    model = create_gpt_tiny()
    optimizer, name = training.build_optimizer(model, training.TrainConfig(optimizer="muon"), torch.device("cpu"))
    assert isinstance(optimizer, MuonWithAdamW) and "fp32" in name
    muon_params = [p for g in optimizer.param_groups if g["muon"] for p in g["params"]]
    assert [id(p) for p in muon_params] == [id(p) for p in split_params_for_muon(model)[0]]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.1, 0.0]


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_resume_with_muon_is_bit_exact(tiny_train_config, tmp_path):
    settings = dict(optimizer="muon", decay_steps=20, eval_interval=10)
    straight = training.train(tiny_train_config(max_steps=20, out_dir=str(tmp_path / "straight"), **settings))
    first = training.train(tiny_train_config(max_steps=10, out_dir=str(tmp_path / "split"), **settings))
    resumed = training.train(tiny_train_config(max_steps=20, out_dir=str(tmp_path / "split"),
                                               resume=first.last_checkpoint, **settings))
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [e["loss"] for e in first.history + resumed.history] == [e["loss"] for e in straight.history]


@pytest.mark.slow
def test_cli_runs_with_optimizer_muon(corpus_slice_file, tmp_path, capsys, one_thread):
    argv = ["--data", str(corpus_slice_file), "--out-dir", str(tmp_path), "--context-length", "32",
            "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--d-ff", "64", "--batch-size", "8",
            "--max-steps", "10", "--warmup-steps", "2", "--eval-interval", "5", "--eval-batches", "2",
            "--sample-chars", "0", "--no-progress", "--optimizer", "muon", "--muon-rms", "0.4"]
    assert training.main(argv) == 0
    out = capsys.readouterr().out
    assert "max_steps after 10 updates" in out and "training.MuonWithAdamW (Newton-Schulz in fp32" in out


def test_the_default_recipe_is_the_adamw_recipe_with_muon_and_relu2():
    today, before = training.TrainConfig(), training.TrainConfig(**training.ADAMW_RECIPE)
    differ = {f.name for f in dataclasses.fields(today) if getattr(today, f.name) != getattr(before, f.name)}
    assert differ == set(training.ADAMW_RECIPE) == {"optimizer", "mlp_activation", "qk_norm", "min_lr"}
    assert (today.optimizer, today.mlp_activation, today.qk_norm, today.min_lr) == ("muon", "relu2", True, 0.0)
    assert (before.optimizer, before.mlp_activation, before.qk_norm, before.min_lr) == ("auto", "gelu", False, 6e-4)

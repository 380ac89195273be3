"""GPTConfig's options (rotary, QK-norm, ReLU^2, zero-init projections, untied head), and that the
defaults are still module 06's tiny GPT."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

import training
from m06_transformer import GPT, GPTConfig, create_gpt_tiny
from m06_transformer.model import Rotary

SNAPSHOT = Path(__file__).parent / "snapshots" / "gpt_tiny_seed0.json"


def test_defaults_reproduce_the_stored_module_06_model():
    # The snapshot was written by module 06's model before these options existed. Initialisation
    # and matmuls round differently in the last bits on CPUs with other vector units (up to ~1e-6
    # here); a changed architecture, initialisation or RNG order moves values by ~1e-2 or more.
    snapshot = json.loads(SNAPSHOT.read_text())
    torch.manual_seed(0)
    model = create_gpt_tiny()
    assert model.num_parameters() == snapshot["num_parameters"] == 838_912
    state = model.state_dict()
    assert list(state) == list(snapshot["sums"])
    for name, tensor in state.items():
        assert tensor.double().sum().item() == pytest.approx(snapshot["sums"][name], abs=1e-4), name
        assert tensor.double().abs().sum().item() == pytest.approx(snapshot["abs_sums"][name], rel=1e-6), name
    with torch.no_grad():
        logits = model(torch.tensor([snapshot["idx"]]))[0]
    torch.testing.assert_close(logits, torch.tensor(snapshot["logits"]), rtol=0, atol=1e-5)


def small(**options) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=17, context_length=16, d_model=32, n_layers=2, n_heads=4, d_ff=64, **options))


def test_rotary_replaces_the_position_table_and_stays_causal():
    model, plain = small(rotary=True).eval(), small()
    assert model.pos_emb is None
    assert model.num_parameters() == plain.num_parameters() - 16 * 32
    idx = torch.randint(17, (2, 10), generator=torch.Generator().manual_seed(0))
    logits = model(idx)
    assert logits.shape == (2, 10, 17)
    changed = idx.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 17  # change only the future
    torch.testing.assert_close(model(changed)[:, :6], logits[:, :6], rtol=0, atol=0)


def test_rotary_scores_depend_only_on_the_offset():
    rotary = Rotary(head_dim=8, context_length=32)
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=generator), torch.randn(8, generator=generator)
    at = lambda x, position: rotary(x.expand(32, 8))[position]
    score = lambda m, n: (at(q, m) @ at(k, n)).item()
    assert score(5, 2) == pytest.approx(score(25, 22), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    model, scaled = small(qk_norm=True).eval(), small(qk_norm=True).eval()
    assert model.num_parameters() == small().num_parameters()  # parameter-free normalisation
    with torch.no_grad():
        for block in scaled.blocks:  # the first 2 * d_model rows of qkv produce q and k
            block.attn.qkv.weight[:64] *= 3.0
            block.attn.qkv.bias[:64] *= 3.0
    idx = torch.randint(17, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(scaled(idx), model(idx), rtol=1e-5, atol=1e-5)


def test_relu2_mlp_is_relu_squared():
    mlp = small(mlp_activation="relu2").blocks[0].mlp
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mlp(x), mlp.proj(torch.relu(mlp.fc(x)) ** 2))


def test_zero_init_projections_make_every_block_the_identity_at_init():
    model = small(zero_init_proj=True)
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(0))
    for block in model.blocks:
        assert not block.attn.proj.weight.any() and not block.mlp.proj.weight.any()
        assert torch.equal(block(x), x)
    assert small().blocks[0].mlp.proj.weight.any()


def test_untied_head_is_its_own_matrix():
    model = create_gpt_tiny(tie_head=False)
    assert model.lm_head.weight is not model.tok_emb.weight
    assert model.num_parameters() == 838_912 + 100 * 128


@pytest.mark.parametrize("options, field", [
    (dict(rotary=1), "rotary"),
    (dict(mlp_activation="swiglu"), "mlp_activation"),
    (dict(tie_head="no"), "tie_head"),
    (dict(rotary=True, d_model=36, n_heads=12), "rotary"),  # head size 3 cannot be rotated in pairs
])
def test_bad_options_name_the_field(options, field):
    settings = dict(vocab_size=17, d_model=32, n_heads=4) | options
    with pytest.raises(ValueError, match=f"GPTConfig.{field}"):
        GPTConfig(**settings)


def test_train_config_options_reach_the_model():
    config = training.TrainConfig(rotary=True, qk_norm=True, mlp_activation="relu2", zero_init_proj=True,
                                  tie_head=False)
    model_config = training.gpt_config(config, vocab_size=65)
    assert (model_config.rotary, model_config.qk_norm, model_config.mlp_activation, model_config.zero_init_proj,
            model_config.tie_head) == (True, True, "relu2", True, False)
    shape = dict(vocab_size=65, context_length=64, d_model=128, n_layers=2, n_heads=4, d_ff=512)
    assert training.gpt_config(training.TrainConfig(**training.ADAMW_RECIPE), 65) == GPTConfig(**shape)  # module 06's
    assert training.gpt_config(training.TrainConfig(), 65) == GPTConfig(**shape, qk_norm=True, mlp_activation="relu2")
    with pytest.raises(ValueError, match="TrainConfig.rotary"):
        training.TrainConfig(rotary=True, d_model=36, n_heads=12)


def test_train_config_holds_every_model_field_of_gpt_config():
    """One source for the model's fields: GPTConfig. TrainConfig carries each one (vocab_size comes from the
    corpus, bias stays module 06's), and gpt_config passes them all on."""
    model_fields = {f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size", "bias"}
    assert set(training.MODEL_FIELDS) == model_fields
    assert model_fields <= {f.name for f in dataclasses.fields(training.TrainConfig)}
    config = training.TrainConfig(d_model=96, n_heads=3, rotary=True, tie_head=False, mlp_activation="gelu")
    built = training.gpt_config(config, vocab_size=7)
    assert all(getattr(built, name) == getattr(config, name) for name in model_fields) and built.vocab_size == 7


def test_train_config_takes_the_model_checks_from_gpt_config():
    with pytest.raises(ValueError, match=r"^TrainConfig\.d_model \(100\) must be divisible by n_heads \(3\)"):
        training.TrainConfig(d_model=100, n_heads=3)
    with pytest.raises(ValueError, match=r"^TrainConfig\.rotary needs an even head size"):
        training.TrainConfig(d_model=12, n_heads=4, rotary=True)


def test_train_config_paths_may_be_path_objects(tmp_path):
    config = training.TrainConfig(data=tmp_path / "text.txt", out_dir=tmp_path / "out", resume=tmp_path / "last.pt")
    assert (config.data, config.out_dir, config.resume) == (str(tmp_path / "text.txt"), str(tmp_path / "out"),
                                                            str(tmp_path / "last.pt"))


def test_train_rechecks_a_config_changed_after_it_was_made_before_touching_the_out_dir(tiny_train_config):
    first = training.train(tiny_train_config(max_steps=10))
    out_dir = Path(first.last_checkpoint).parent
    before = {path.name: path.read_bytes() for path in out_dir.iterdir()}
    config = tiny_train_config(out_dir=str(out_dir), overwrite=True)
    config.batch_size = 0
    with pytest.raises(ValueError, match=r"TrainConfig\.batch_size must be > 0"):
        training.train(config)
    assert {path.name: path.read_bytes() for path in out_dir.iterdir()} == before

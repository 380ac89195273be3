"""m06_transformer: parameter count, GPT-2 initialisation, causality, weight tying, generate()."""
import math

import pytest
import torch
import torch.nn.functional as F

from m06_transformer import GPT, GPTConfig, create_gpt_tiny


def test_tiny_gpt_has_838912_parameters():
    # Hand count at V=100, d=128, T=256, 4 layers, d_ff=512, biases, tied head:
    # embeddings 100*128 + 256*128; per block 2 LayerNorms (2*2*128), qkv 128*384+384,
    # proj 128*128+128, fc 128*512+512, proj 512*128+128; final LayerNorm 2*128.
    per_block = 4 * 128 + (128 * 384 + 384) + (128 * 128 + 128) + (128 * 512 + 512) + (512 * 128 + 128)
    expected = 100 * 128 + 256 * 128 + 4 * per_block + 2 * 128
    assert expected == 838_912
    model = create_gpt_tiny()
    assert model.num_parameters() == 838_912
    assert sum(p.numel() for p in model.parameters()) == 838_912


def test_lm_head_is_tied_to_token_embedding(tiny_gpt):
    assert tiny_gpt.lm_head.weight is tiny_gpt.tok_emb.weight


def test_untrained_loss_is_within_0_1_of_ln_vocab():
    torch.manual_seed(0)
    model = create_gpt_tiny(vocab_size=100)
    idx = torch.randint(100, (8, 64))
    targets = torch.randint(100, (8, 64))
    with torch.no_grad():
        loss = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten())
    assert abs(loss.item() - math.log(100)) < 0.1


def test_residual_projections_use_scaled_init():
    torch.manual_seed(0)
    model = create_gpt_tiny()
    std_plain = model.blocks[0].mlp.fc.weight.std().item()
    std_resid = torch.cat([b.mlp.proj.weight.flatten() for b in model.blocks]).std().item()
    assert std_plain == pytest.approx(0.02, rel=0.02)
    assert std_resid == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.02)


def test_forward_shape_and_causality(tiny_gpt, tiny_gpt_config):
    tiny_gpt.eval()
    idx = torch.randint(tiny_gpt_config.vocab_size, (2, 10))
    logits = tiny_gpt(idx)
    assert logits.shape == (2, 10, tiny_gpt_config.vocab_size)
    changed = idx.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % tiny_gpt_config.vocab_size  # change only the future
    torch.testing.assert_close(tiny_gpt(changed)[:, :6], logits[:, :6], rtol=0, atol=0)


def test_forward_rejects_bad_idx(tiny_gpt, tiny_gpt_config):
    with pytest.raises(ValueError, match="idx"):
        tiny_gpt(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="context_length"):
        tiny_gpt(torch.zeros(1, tiny_gpt_config.context_length + 1, dtype=torch.long))


@pytest.mark.parametrize("field, value", [("vocab_size", 0), ("n_layers", 1.5), ("dropout", 1.0)])
def test_config_rejects_bad_fields(field, value):
    settings = dict(vocab_size=10)
    settings[field] = value
    with pytest.raises(ValueError, match=field):
        GPTConfig(**settings)


def test_config_rejects_d_model_not_divisible_by_heads():
    with pytest.raises(ValueError, match="n_heads"):
        GPTConfig(vocab_size=10, d_model=30, n_heads=4)


def test_generate_with_seeded_generator_is_reproducible(tiny_gpt):
    prompt = torch.zeros(2, 3, dtype=torch.long)
    first = tiny_gpt.generate(prompt, 20, generator=torch.Generator().manual_seed(7))
    second = tiny_gpt.generate(prompt, 20, generator=torch.Generator().manual_seed(7))
    assert first.shape == (2, 23)
    assert torch.equal(first, second)
    assert torch.equal(first[:, :3], prompt)


def test_generate_crops_to_context_length(tiny_gpt, tiny_gpt_config):
    out = tiny_gpt.generate(torch.zeros(1, 1, dtype=torch.long), 2 * tiny_gpt_config.context_length,
                            generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 1 + 2 * tiny_gpt_config.context_length)


def test_generate_top_k_only_samples_the_k_most_likely(tiny_gpt):
    tiny_gpt.eval()
    prompt = torch.tensor([[1, 2, 3]])
    allowed = set(torch.topk(tiny_gpt(prompt)[0, -1], 3).indices.tolist())
    # 500 independent draws (one batch of the same prompt): every one must be among the top 3.
    out = tiny_gpt.generate(prompt.expand(500, -1), 1, top_k=3, temperature=5.0,
                            generator=torch.Generator().manual_seed(0))
    draws = set(out[:, -1].tolist())
    assert draws <= allowed
    assert len(draws) > 1  # a high temperature spreads the draws over the k allowed tokens


def test_generate_top_k_1_is_greedy(tiny_gpt):
    tiny_gpt.eval()
    prompt = torch.tensor([[4, 5]])
    out = tiny_gpt.generate(prompt, 1, top_k=1)
    assert out[0, -1].item() == tiny_gpt(prompt)[0, -1].argmax().item()


def test_generate_restores_training_mode(tiny_gpt):
    tiny_gpt.train()
    tiny_gpt.generate(torch.zeros(1, 1, dtype=torch.long), 2)
    assert tiny_gpt.training


@pytest.mark.parametrize("kwargs, name", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=1, temperature=0.0), "temperature"),
    (dict(max_new_tokens=1, top_k=0), "top_k"),
    (dict(max_new_tokens=1, top_k=1000), "top_k"),
])
def test_generate_rejects_bad_arguments(tiny_gpt, kwargs, name):
    with pytest.raises(ValueError, match=name):
        tiny_gpt.generate(torch.zeros(1, 1, dtype=torch.long), **kwargs)

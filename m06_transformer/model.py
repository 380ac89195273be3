"""A small GPT, as built in module 06.

Token + learned position embeddings, pre-LayerNorm transformer blocks with causal
self-attention (``F.scaled_dot_product_attention``) and a GELU MLP, a final LayerNorm
and an LM head tied to the token embedding. Initialised as GPT-2 is, so an untrained
model predicts a near-uniform distribution: loss ~ ln(vocab_size).

GPTConfig's options from recent fast-training recipes (the NanoGPT speedrun) are all off by
default, which is module 06's model: rotary position embeddings instead of learned ones,
QK-norm, a ReLU^2 MLP, zero-initialised output projections, and an untied LM head.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int
    context_length: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512
    dropout: float = 0.0
    bias: bool = True
    rotary: bool = False          # rotary position embeddings on q and k (and no learned position table)
    qk_norm: bool = False         # RMS-normalise each head's queries and keys before their dot product
    mlp_activation: str = "gelu"  # 'gelu', or 'relu2': relu(x)^2
    zero_init_proj: bool = False  # output projections start at 0: every block starts as the identity
    tie_head: bool = True         # LM head shares the token embedding's matrix

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads", "d_ff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"GPTConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("bias", "rotary", "qk_norm", "zero_init_proj", "tie_head"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(f"GPTConfig.mlp_activation must be one of {list(MLP_ACTIVATIONS)}, "
                             f"got {self.mlp_activation!r}")
        if self.rotary and (self.d_model // self.n_heads) % 2:
            raise ValueError(f"GPTConfig.rotary needs an even head size, got d_model / n_heads = "
                             f"{self.d_model // self.n_heads}")


MLP_ACTIVATIONS = {"gelu": F.gelu, "relu2": lambda x: F.relu(x).square()}


class Rotary(nn.Module):
    """Rotary position embeddings (Su et al., RoFormer): rotate pairs of channels of q and k by an
    angle proportional to the position, so q . k depends on the offset between the positions only."""

    def __init__(self, head_dim: int, context_length: int, base: float = 10_000.0):
        super().__init__()
        frequencies = base ** -(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(context_length, dtype=torch.float32), frequencies)
        # Not persistent: derived from the config, so checkpoints hold only learned tensors.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., T, head_dim] -> the same, channel i paired with channel i + head_dim / 2."""
        T = x.shape[-2]
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.proj.is_residual_projection = True
        self.resid_dropout = nn.Dropout(config.dropout)
        self.qk_norm = config.qk_norm
        self.rotary = Rotary(config.d_model // config.n_heads, config.context_length) if config.rotary else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # [B, T, 3C] -> three [B, n_heads, T, head_dim] tensors
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        if self.qk_norm:
            q, k = F.rms_norm(q, q.shape[-1:]), F.rms_norm(k, k.shape[-1:])
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)
        self.activation = MLP_ACTIVATIONS[config.mlp_activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.activation(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A decoder-only transformer: token + learned position embeddings, `n_layers` pre-LayerNorm
    blocks (causal self-attention, GELU MLP), a final LayerNorm and an LM head tied to the token
    embedding. forward(idx LongTensor[B, T]) -> logits FloatTensor[B, T, vocab_size].
    GPTConfig's options change these parts (module docstring)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = None if config.rotary else nn.Embedding(config.context_length, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_head:
            self.lm_head.weight = self.tok_emb.weight  # weight tying: one [V, d_model] matrix
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2: N(0, 0.02) everywhere; the projections that add into the residual stream
        # are scaled by 1/sqrt(2 * n_layers) so the stream's variance does not grow with depth.
        if isinstance(module, nn.Linear):
            residual = getattr(module, "is_residual_projection", False)
            if residual and self.config.zero_init_proj:
                nn.init.zeros_(module.weight)  # the block adds nothing until it has learned something
            else:
                std = 0.02 / math.sqrt(2 * self.config.n_layers) if residual else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        """Unique trainable parameters (the tied head is counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: LongTensor[B, T] of token ids, T <= context_length -> logits [B, T, vocab_size]."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be [batch, time], got shape {tuple(idx.shape)}")
        T = idx.shape[1]
        if T > self.config.context_length:
            raise ValueError(f"sequence length {T} exceeds context_length {self.config.context_length}")
        if self.pos_emb is None:  # rotary: positions enter inside attention
            x = self.drop(self.tok_emb(idx))
        else:
            pos = torch.arange(T, device=idx.device)
            x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        top_p: float | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx`` (LongTensor[B, T]); returns [B, T + new].

        Each token is drawn from next_token_probs(logits, temperature, top_k, top_p) (see there);
        a seeded ``generator`` makes the sample reproducible.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        check_decoding(temperature, top_k, top_p, self.config.vocab_size)
        was_training = self.training
        self.eval()
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.context_length :])[:, -1, :]
            probs = _filtered_probs(logits, temperature, top_k, top_p)  # checked once, above
            next_id = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat([idx, next_id], dim=1)
        self.train(was_training)
        return idx


def check_decoding(temperature: float, top_k: int | None, top_p: float | None, vocab_size: int) -> None:
    """A ValueError that starts with the name of the first unusable decoding argument, and says why."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab_size):
        raise ValueError(f"top_k must be an int from 1 to {vocab_size} (the vocabulary size), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number above 0 and at most 1 (1 keeps every token), got {top_p!r}")


def next_token_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None) -> torch.Tensor:
    """The distribution the next token is drawn from: logits [..., V] -> probabilities [..., V].

    In this order: the logits are divided by temperature > 0 (below 1 sharpens, above 1 flattens);
    top_k keeps the k likeliest tokens; top_p (nucleus sampling, 0 < top_p <= 1) keeps the smallest
    set of the likeliest tokens whose probability adds up to at least top_p. The dropped tokens get
    probability 0 and the rest are renormalised to sum to 1. None (the default) turns a cut off.
    """
    check_decoding(temperature, top_k, top_p, logits.shape[-1])
    return _filtered_probs(logits, temperature, top_k, top_p)


def _filtered_probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """next_token_probs without its argument check: generate() checks once, not at every token."""
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # a token stays if the likelier tokens before it do not yet reach top_p: the likeliest always stays
        sorted_drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop = sorted_drop.scatter(-1, order, sorted_drop)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def create_gpt_tiny(vocab_size: int = 100, **overrides) -> GPT:
    """The course's tiny GPT: d_model 128, 4 layers, 4 heads, d_ff 512, context 256, biases.

    838,912 parameters for vocab_size=100. ``overrides`` replace any other GPTConfig field.
    """
    return GPT(GPTConfig(vocab_size=vocab_size, **overrides))

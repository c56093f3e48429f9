"""A decoder-only transformer language model as a stack of identical blocks.

This file is the model and nothing else: it knows nothing about training, devices,
checkpointing or offloading. Those techniques apply themselves to the module from outside
(hetrain.train, hetrain.plan). The block stack is `model.blocks`, an nn.ModuleList of
identical `Block`s, which is the unit every planner reasons about; the members of
hetrain.model.stack's block interface drive it one layer at a time.

Variants chosen by ModelConfig: learned or rotary positions, LayerNorm or RMSNorm, GELU MLP
or SwiGLU, multi-head or grouped-query attention (always through
scaled_dot_product_attention), optional tied input/output embeddings, optional dropout
(nanoGPT's: on the attention probabilities and on each residual branch's output).

A block's forward is a chain of steps (norm1, attn.qkv, attn.attend, attn.proj with its
residual dropout, norm2, mlp.up, mlp.activate, mlp.down with its residual dropout), each a
method or submodule, so that a technique may run them in pieces (selective recomputation,
hetrain.pipeline.unit_recompute) with exactly the operations the plain forward runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    """Shape of the transformer. Presets (hetrain.model.presets) fill these in by name."""

    preset: str = "small"
    """Named model shape (see `hetrain estimate --help` or hetrain.model.presets): tiny, small, gpt2-small ... gpt3-175b, llama2-7b ... llama2-70b, llama-140b. Other model.* keys override the preset's fields."""
    vocab_size: int = 256
    """Vocabulary size; 256 for the byte-level tokenizer."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads."""
    n_kv_head: int = 4
    """Key/value heads; fewer than n_head gives grouped-query attention (must divide n_head)."""
    d_model: int = 256
    """Hidden size (must be divisible by n_head)."""
    d_ff: int = 1024
    """MLP inner size (for SwiGLU, the size of each of the gate and up projections)."""
    max_seq_len: int = 256
    """Longest sequence the model accepts (learned position table size; rotary cache size)."""
    pos: str = "learned"
    """Positions: 'learned' (absolute embedding table) or 'rope' (rotary)."""
    norm: str = "layernorm"
    """Normalisation: 'layernorm' or 'rmsnorm'."""
    mlp: str = "gelu"
    """MLP: 'gelu' (two projections) or 'swiglu' (gate, up, down)."""
    tie_embeddings: bool = True
    """Share the input embedding matrix with the output projection."""
    bias: bool = False
    """Biases in linear layers and LayerNorm."""
    rope_theta: float = 10000.0
    """Rotary base frequency (pos='rope' only)."""
    norm_eps: float = 1e-5
    """Epsilon of the normalisation layers."""
    dropout: float = 0.0
    """Dropout probability in training, as nanoGPT applies it: on the attention probabilities and on the output of each block's attention and MLP branch before the residual add. 0 disables it (no random numbers are drawn)."""
    dropout_attention: bool = True
    """Apply model.dropout to the attention probabilities too (nanoGPT); false keeps it on the residual branches only (Megatron-LM's --hidden-dropout p with --attention-dropout 0), which tensor parallelism needs: a rank holds only its heads' probabilities."""

    @property
    def attn_dropout(self) -> float:
        """The dropout probability on the attention probabilities."""
        return self.dropout if self.dropout_attention else 0.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def validate(self) -> None:
        """Raise ValueError naming the field to fix when the shape is inconsistent."""
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model={self.d_model} must be divisible by model.n_head={self.n_head}")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head dim; got d_model/n_head={self.head_dim}")
        for name, value, allowed in (
            ("pos", self.pos, ("learned", "rope")),
            ("norm", self.norm, ("layernorm", "rmsnorm")),
            ("mlp", self.mlp, ("gelu", "swiglu")),
        ):
            if value not in allowed:
                raise ValueError(f"model.{name}={value!r} is not one of {', '.join(allowed)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")
        for name in ("n_layer", "n_head", "d_model", "d_ff", "max_seq_len", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be at least 1")


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def rope_cache(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape (max_seq_len, head_dim/2) for rotary positions."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim))
    angles = torch.outer(torch.arange(cfg.max_seq_len, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, nh, T, hs); rotate the two halves of each head (the "rotate_half" layout).
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class ResidualDropout(nn.Module):
    """Dropout on a residual branch that saves a one-byte mask for its backward on every device:
    torch.native_dropout, which F.dropout runs on CUDA; on CPU F.dropout would save the scaled
    mask in the activations' dtype. Nothing is drawn outside training or at p = 0."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return torch.native_dropout(x, self.p, True)[0]

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        kv_dim = cfg.n_kv_head * cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, cfg.d_model + 2 * kv_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.attn_dropout
        self.resid_drop = ResidualDropout(cfg.dropout)

    def attend(self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Causal attention of the fused projections (B, T, C + 2 kv) -> (B, T, nh * hs)."""
        B, T, _ = qkv.shape
        # Widths from the head counts, not from x: a technique may give this module a share of
        # the heads (tensor parallelism) while x keeps the full width.
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = qkv.split((q_dim, kv_dim, kv_dim), dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope[0][:T], rope[1][:T]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return y.transpose(1, 2).reshape(B, T, q_dim)  # (B, T, nh * hs)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        return self.resid_drop(self.proj(self.attend(self.qkv(x), rope)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        # SwiGLU fuses gate and up projections into one matmul of width 2*d_ff.
        self.up = nn.Linear(cfg.d_model, (2 if self.swiglu else 1) * cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.resid_drop = ResidualDropout(cfg.dropout)

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, d_ff or 2 d_ff) -> (B, T, d_ff)."""
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.gelu(h, approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resid_drop(self.down(self.activate(self.up(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Token ids (B, T) -> logits (B, T, vocab), or the mean cross-entropy when targets are given."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.pos == "rope":
            cos, sin = rope_cache(cfg, device=self.tok_emb.weight.device)
            # Buffers, not parameters: derived from the config, so not saved in checkpoints.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if self.tok_emb.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), residual output projections scaled by 1/sqrt(2*n_layer)."""
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                scale = 1 / math.sqrt(2 * self.cfg.n_layer) if name.endswith(("proj.weight", "down.weight")) else 1.0
                nn.init.normal_(p, mean=0.0, std=std * scale)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:  # norm weights
                nn.init.ones_(p)

    def rope(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (self.rope_cos, self.rope_sin) if self.cfg.pos == "rope" else None

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        # idx: (B, T) -> (B, T, C)
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        return x

    def head(self, x: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        logits = self.lm_head(self.norm_f(x))  # (B, T, vocab)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))

    # --- the block interface (hetrain.model.stack) ---------------------------------------
    @property
    def max_seq_len(self) -> int:
        return self.cfg.max_seq_len

    def embed_inputs(self, idx: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """(B, T) token ids -> the first block's input (B, T, C) and what every block also
        reads: the rotary tables (model buffers), or None with learned positions."""
        return self.embed(idx), self.rope()

    def block_forward(self, block: nn.Module, x: torch.Tensor, rope) -> torch.Tensor:
        return block(x, rope)

    def part_of(self, module_name: str) -> int:
        """0 for the embeddings, i + 1 for a module inside block i, n_layer + 1 for the head."""
        if module_name.startswith("blocks."):
            return int(module_name.split(".")[1]) + 1
        return 0 if module_name in ("tok_emb", "pos_emb") else self.cfg.n_layer + 1

    def describe(self, micro_batch: int, seq_len: int, compute_dtype_bytes: int = 2):
        """hetrain.model.describe.describe_model of this model's config."""
        from hetrain.model.describe import describe_model  # describe imports this module

        return describe_model(self.cfg, micro_batch, seq_len, compute_dtype_bytes)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if idx.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(idx)
        rope = self.rope()
        for block in self.blocks:
            x = block(x, rope)
        return self.head(x, targets)

    def num_params(self) -> int:
        """Unique parameters (a tied matrix counts once)."""
        return sum(p.numel() for p in self.parameters())

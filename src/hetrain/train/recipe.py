"""The training recipe every trainer shares: the model, AdamW, the learning-rate schedule and the
useful FLOPs per token.

The one-process trainer (hetrain.train.trainer) and the cluster trainer
(hetrain.train.cluster_trainer) build and update the same model with these, so that every plan
trains the model plain PyTorch would. This module builds objects; it must not run a step.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from hetrain.config import Config
from hetrain.errors import ConfigError
from hetrain.model.gpt import GPT


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup to train.lr, then cosine decay to train.min_lr at train.decay_steps (or
    train.steps when that is 0); step counts from 0."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    horizon = t.decay_steps or t.steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, horizon - t.warmup_steps))
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


def build_model(cfg: Config, vocab_size: int) -> nn.Module:
    if cfg.hf.path:
        from hetrain.model.hf import load_hf_model

        model = load_hf_model(cfg.hf.path)
        if vocab_size > model.vocab_size:
            raise ConfigError(f"the data has {vocab_size} token ids but the model at --hf.path has a vocabulary "
                              f"of {model.vocab_size}; use a model whose vocab_size is at least {vocab_size}")
        return model
    if vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the data has {vocab_size} token ids but model.vocab_size={cfg.model.vocab_size}; "
                          f"set --model.vocab_size {vocab_size}")
    return GPT(cfg.model)


def hf_tokenizer(cfg: Config):
    """The tokenizer of the folder at hf.path, when it has one: text is then tokenized with it."""
    from hetrain.model.hf_io import load_hf_tokenizer

    return load_hf_tokenizer(cfg.hf.path) if cfg.hf.path else None


def train_flops_per_token(model: nn.Module, cfg: Config) -> float:
    """From the model's description (its weights may be the offload engine's by now)."""
    try:
        return model.describe(1, cfg.train.seq_len).train_flops_per_token()
    except ConfigError:  # a Hugging Face model hetrain cannot describe: it trains plainly, weights in place
        return model.train_flops_per_token(cfg.train.seq_len)


def make_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only. Fused kernels on CPU and CUDA alike."""
    t = cfg.train
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=True)

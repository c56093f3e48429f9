"""Hugging Face causal language models behind the same interface as hetrain's own GPT.

`load_hf_model` builds a transformers `AutoModelForCausalLM` from a local folder (loading
its weights when the folder has them) or from a config.json alone (random weights), and
wraps it in `HFCausalLM`, whose `forward(idx, targets=None)`, `blocks`, `num_params()` and
`train_flops_per_token(seq_len)` follow the conventions of `hetrain.model.gpt.GPT` and
`hetrain.model.describe`, so the trainer, the planners and the techniques that act on
`model.blocks` treat it like a GPT. This file must never download anything (every
transformers call is local-only and remote code is not trusted), must import transformers
only inside the functions that need it (it is the optional extra `hf`), must not change the
wrapped model's layers or weights, and must not import hetrain.train.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from hetrain.errors import ConfigError

INSTALL_HINT = "pip install 'hetrain[hf]'"
# File names whose presence in the folder means "load these weights" (sharded checkpoints
# carry an index next to shards that match the same patterns).
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def _import_transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError(f"--hf.path needs the transformers library, which is not installed: {INSTALL_HINT}") from exc
    return transformers


def _dtype_kwargs(transformers, dtype: torch.dtype) -> dict:
    # transformers 4.56 renamed `torch_dtype` to `dtype`; the extra allows both sides.
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def find_blocks(module: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-layer stack of a transformers model, found without knowing its class.

    Rule: among all nn.ModuleLists in the module tree that are non-empty and whose children
    all have exactly the same class, drop those nested inside another such list (e.g. the
    experts of a mixture-of-experts layer), then take the one with the most children; a tie
    goes to the first in registration order. This finds `model.layers` (Llama, Mistral,
    Qwen2), `transformer.h` (GPT-2) and `gpt_neox.layers` (GPT-NeoX). Returns the dotted
    path and the list; raises ConfigError when there is none.
    """
    homogeneous = [
        (name, mod) for name, mod in module.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(child) for child in mod}) == 1
    ]
    outermost = [
        (name, mod) for name, mod in homogeneous
        if not any(name.startswith(other + ".") for other, _ in homogeneous)
    ]
    if not outermost:
        raise ConfigError(f"found no stack of identical decoder layers in {type(module).__name__}; "
                          "--hf.path must point at a decoder-only transformer")
    # max() keeps the first of equally long lists, i.e. registration order breaks ties.
    return max(outermost, key=lambda item: len(item[1]))


class HFCausalLM(nn.Module):
    """A transformers causal LM with GPT's contract: token ids (B, T) -> logits (B, T, vocab),
    or the mean cross-entropy when targets (already shifted: targets[t] follows idx[t]) are given.

    The HF model is the only registered child (`hf_model`), so state_dict keys are the HF
    model's own keys under `hf_model.`. `blocks` is a property returning the live decoder-layer
    ModuleList inside it (not a second registration, which would duplicate every block in
    state_dict). A technique that wraps a block must pass through whatever positional and
    keyword arguments the HF model calls it with (hidden states, position embeddings, masks),
    and return what the block returns: HF layers are not called like GPT's `block(x, rope)`.
    """

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model
        self.hf_config = hf_model.config
        self.blocks_path, _ = find_blocks(hf_model)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.hf_model.get_submodule(self.blocks_path)

    @property
    def text_config(self):
        """The language-model part of the config (the config itself for plain causal LMs)."""
        get_text_config = getattr(self.hf_config, "get_text_config", None)
        return get_text_config() if get_text_config is not None else self.hf_config

    @property
    def vocab_size(self) -> int:
        return self.hf_model.get_output_embeddings().weight.shape[0]

    @property
    def max_seq_len(self) -> int | None:
        """Longest sequence the config declares (None when it declares none)."""
        return getattr(self.text_config, "max_position_embeddings", None)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if self.max_seq_len is not None and idx.shape[1] > self.max_seq_len:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds the HF config's "
                             f"max_position_embeddings={self.max_seq_len}")
        # No labels: the loss is computed below exactly as GPT computes it, never with HF's
        # internal shift. use_cache=False: training needs no KV cache, which would only hold
        # every layer's keys and values until the step ends.
        logits = self.hf_model(input_ids=idx, use_cache=False).logits  # (B, T, vocab)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))

    def num_params(self) -> int:
        """Unique parameters (a tied matrix counts once)."""
        return sum(p.numel() for p in self.parameters())

    def train_flops_per_token(self, seq_len: int) -> float:
        """Useful training FLOPs per token (forward + backward, no recomputation).

        Same conventions as hetrain.model.describe: a multiply-add is 2 FLOPs, backward is
        twice the forward. Matmul weights are the parameters of two or more dimensions
        inside the blocks (Linear and GPT-2 Conv1D weights; biases and norms are not
        counted), plus the output projection (vocab x hidden, counted even when tied to the
        input embedding, because its matmul runs; the embedding lookup is free). Causal
        attention costs 2*T*(n_head*head_dim) forward per layer per token. Dense models
        only: every expert of a mixture-of-experts layer would be counted, and sliding-window
        attention is charged as full causal attention.
        """
        blocks = self.blocks
        matmul = sum(p.numel() for p in blocks.parameters() if p.dim() >= 2)
        matmul += self.hf_model.get_output_embeddings().weight.numel()
        cfg = self.text_config
        n_head = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
        attn_fwd = 2.0 * seq_len * n_head * head_dim * len(blocks)
        return 3 * (2.0 * matmul + attn_fwd)


def load_hf_model(path: str, dtype: torch.dtype = torch.float32) -> HFCausalLM:
    """Build the causal LM described by `path`, without any network access.

    `path` is a folder with config.json, or a config.json file. A folder that also holds
    weight files (*.safetensors or pytorch_model*.bin) is loaded with those weights;
    otherwise the model is built from the config with random weights from transformers' own
    init, drawn from torch's global generator, so the caller's torch.manual_seed makes it
    reproducible. Parameters are in `dtype`; the model is returned in training mode, like a
    freshly built GPT. Raises ConfigError (naming --hf.path) for a missing path, a folder
    without config.json, a config transformers cannot build, or transformers not installed.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"--hf.path {path} does not exist; give a folder with config.json or a config.json file")
    if p.is_dir() and not (p / "config.json").is_file():
        raise ConfigError(f"--hf.path {path} has no config.json; give a Hugging Face model folder or a config.json file")
    transformers = _import_transformers()
    has_weights = p.is_dir() and any(f for pattern in WEIGHT_PATTERNS for f in p.glob(pattern))
    dtype_kw = _dtype_kwargs(transformers, dtype)
    try:
        config = transformers.AutoConfig.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
        auto = transformers.AutoModelForCausalLM
        if has_weights:
            hf_model = auto.from_pretrained(str(p), config=config, local_files_only=True,
                                            trust_remote_code=False, **dtype_kw)
        else:
            hf_model = auto.from_config(config, trust_remote_code=False, **dtype_kw)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"--hf.path {path}: transformers cannot build a causal LM from it: {exc}") from exc
    return HFCausalLM(hf_model).train()

"""Named model shapes, from a two-layer test model to GPT-3 175B and a Llama-style 140B.

Presets are plain ModelConfig values; nothing here builds a model. Large presets are meant
for planning: build them on the meta device (`torch.device("meta")`) to inspect shapes
without allocating memory. Shapes follow the published architectures (GPT-2, GPT-3 paper
table 2.1, Llama 2 paper); "llama-140b" is a Llama-style model scaled to about 140B
parameters, the size HETHUB trains.
"""

from __future__ import annotations

import dataclasses
import difflib

from hetrain.model.gpt import ModelConfig


def _gpt(n_layer: int, d_model: int, n_head: int, seq: int = 2048, vocab: int = 50257) -> dict:
    return dict(n_layer=n_layer, d_model=d_model, n_head=n_head, n_kv_head=n_head, d_ff=4 * d_model,
                max_seq_len=seq, vocab_size=vocab, pos="learned", norm="layernorm", mlp="gelu",
                tie_embeddings=True, bias=True)


def _llama(n_layer: int, d_model: int, n_head: int, n_kv_head: int, d_ff: int, seq: int = 4096) -> dict:
    return dict(n_layer=n_layer, d_model=d_model, n_head=n_head, n_kv_head=n_kv_head, d_ff=d_ff,
                max_seq_len=seq, vocab_size=32000, pos="rope", norm="rmsnorm", mlp="swiglu",
                tie_embeddings=False, bias=False)


_PRESETS: dict[str, dict] = {
    # Test models: one or two blocks, byte vocabulary.
    "tiny": dict(n_layer=2, d_model=64, n_head=4, n_kv_head=4, d_ff=256, max_seq_len=64, vocab_size=256),
    "tiny-llama": dict(n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=160, max_seq_len=64, vocab_size=256,
                       pos="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False),
    # The default: trains visibly on two CPU cores in a few minutes (byte vocabulary).
    "small": dict(n_layer=4, d_model=256, n_head=4, n_kv_head=4, d_ff=1024, max_seq_len=256, vocab_size=256),
    "gpt2-small": _gpt(12, 768, 12, seq=1024),
    "gpt2-medium": _gpt(24, 1024, 16, seq=1024),
    "gpt2-large": _gpt(36, 1280, 20, seq=1024),
    "gpt2-xl": _gpt(48, 1600, 25, seq=1024),
    "gpt3-1.3b": _gpt(24, 2048, 16),
    "gpt3-2.7b": _gpt(32, 2560, 32),
    "gpt3-6.7b": _gpt(32, 4096, 32),
    "gpt3-13b": _gpt(40, 5120, 40),
    "gpt3-175b": _gpt(96, 12288, 96),
    "llama2-7b": _llama(32, 4096, 32, 32, 11008),
    "llama2-13b": _llama(40, 5120, 40, 40, 13824),
    "llama2-70b": _llama(80, 8192, 64, 8, 28672),
    "llama-140b": _llama(90, 12288, 96, 8, 32768),
}


def preset_names() -> list[str]:
    return list(_PRESETS)


def get_preset(name: str) -> ModelConfig:
    """The ModelConfig of a named preset; ValueError naming the nearest preset otherwise."""
    if name not in _PRESETS:
        near = difflib.get_close_matches(name, _PRESETS, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ValueError(f"unknown model preset '{name}'{hint}; known presets: {', '.join(_PRESETS)}")
    return dataclasses.replace(ModelConfig(), preset=name, **_PRESETS[name])

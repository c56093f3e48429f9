"""Analytic description of a transformers causal LM: per layer parameters, FLOPs and saved bytes.

The same ModelDescription as describe.py gives for hetrain's GPT, derived from a transformers
config, so the planners, the cost model and the offload engine treat both alike. Parameter
and tensor counts per layer come from the model built with one block on the meta device
(exact for any architecture, no memory, milliseconds); the bytes each layer saves for
backward come from the rules below, one per family (Llama, Mistral and Qwen2 share one;
GPT-2; GPT-NeoX), which mirror what transformers 5.x's sdpa code saves on torch 2.13's CPU
kernels. `tests/model/test_hf_describe.py` checks them against saved-tensor hooks to the
byte for every family in fp32 and bf16, with and without dropout, sliding windows and the
other variants below. Other model types are refused with a ConfigError (they train plainly).

Conventions are describe.py's: a multiply-add is 2 FLOPs, backward twice the forward,
causal attention 2*T*(heads*head_dim) per token per block; bytes per micro-batch,
deduplicated by storage. The extra inputs the embedding stage hands every block (rotary
cos/sin) are saved by every block but stored once; they are counted with the embedding, whose
saved tensors live at least as long. (A sliding-window mask is not saved itself: each block
saves its own copy.) This module is arithmetic
over a config plus one meta-device build: it must not run a model or touch real memory.
"""

from __future__ import annotations

import functools
import json
import math

from hetrain.errors import ConfigError
from hetrain.model.describe import FP32_BYTES, INDEX_BYTES, LayerDescription, ModelDescription

LLAMA_LIKE = ("llama", "mistral", "qwen2")
FAMILIES = (*LLAMA_LIKE, "gpt2", "gpt_neox")
# Activation -> what it saves besides its output, in tensors of the MLP's inner size: the
# input (silu, gelu), nothing but its output (relu, which the next matmul saves anyway), or
# the four intermediates of the tanh formula written out in Python (gelu_new).
ACTIVATION_SAVES = {"silu": 1, "swish": 1, "gelu": 1, "gelu_pytorch_tanh": 1, "relu": 0, "gelu_new": 4}
RELU_LIKE = ("relu",)
# Since transformers 4.48, Llama-style attention takes its head count from the projections'
# widths (views as (..., -1, head_dim)); before, from self.num_heads, which a column-wise split
# leaves whole: tensor parallelism needs 4.48 or later.
TP_MIN_TRANSFORMERS = "4.48"


def transformers_splits_heads() -> bool:
    """Whether the installed transformers runs a layer whose q/k/v were split by columns."""
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__).release >= Version(TP_MIN_TRANSFORMERS).release


@functools.lru_cache(maxsize=32)
def _layer_counts(config_json: str) -> dict:
    """Parameters, tensors, matmul weights and buffers of the embedding, one block and the
    head, from the model built with one block on the meta device."""
    import torch

    from hetrain.model.hf import build_hf_model
    from hetrain.model.stack import layer_parameters

    model = build_hf_model(json.loads(config_json), device=torch.device("meta"), n_layers=1)
    layers = layer_parameters(model)
    blocks_prefix = f"hf_model.{model.blocks_path}."
    counts = {}
    for name, owned in zip(("embedding", "block", "head"), layers):
        counts[name] = {"params": sum(p.numel() for _, p in owned), "tensors": len(owned),
                        "matmul": sum(p.numel() for _, p in owned if p.dim() >= 2) if name == "block" else 0,
                        "gemms": tuple(tuple(p.shape) for _, p in owned if p.dim() == 2) if name == "block" else ()}
    out = model.hf_model.get_output_embeddings().weight
    counts["head"]["matmul"] = out.numel()
    counts["head"]["gemms"] = (tuple(out.shape),)
    counts["vocab"], counts["hidden"] = out.shape
    counts["tied"] = out is model.hf_model.get_input_embeddings().weight
    buffers = {name: b.numel() * b.element_size() for name, b in model.named_buffers()}
    counts["block_buffers"] = sum(n for name, n in buffers.items() if name.startswith(blocks_prefix))
    counts["other_buffers"] = sum(n for name, n in buffers.items() if not name.startswith(blocks_prefix))
    counts["attn_implementation"] = model.hf_config._attn_implementation
    return counts


def _get(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _shape(config, family: str) -> dict:
    """Heads, head size, MLP size, activation and dropouts under one set of names."""
    if family == "gpt2":
        C, nh = config.n_embd, config.n_head
        return dict(C=C, nh=nh, nkv=nh, hd=C // nh, F=config.n_inner or 4 * C, act=config.activation_function,
                    attn_drop=config.attn_pdrop, resid_drop=config.resid_pdrop, emb_drop=config.embd_pdrop)
    C, nh = config.hidden_size, config.num_attention_heads
    shape = dict(C=C, nh=nh, nkv=_get(config, "num_key_value_heads", default=nh),
                 hd=_get(config, "head_dim", default=C // nh), F=config.intermediate_size, act=config.hidden_act,
                 attn_drop=_get(config, "attention_dropout", default=0.0))
    if family == "gpt_neox":
        shape["resid_drop"] = shape["emb_drop"] = _get(config, "hidden_dropout", default=0.0)
    else:
        shape["resid_drop"] = shape["emb_drop"] = 0.0
    return shape


def _rotary_dims(config, family: str, hd: int) -> int:
    if family == "gpt2":
        return 0
    rope = getattr(config, "rope_parameters", None) or {}
    factor = rope.get("partial_rotary_factor", _get(config, "partial_rotary_factor", "rotary_pct", default=1.0))
    return int(hd * factor)


def _sliding_mask(config, family: str, seq_len: int) -> bool:
    """Whether every block gets a sliding-window mask (a tensor) instead of sdpa's causal flag.
    transformers builds one when the window is shorter than the sequence."""
    window = getattr(config, "sliding_window", None)
    if family == "mistral":
        return window is not None and window < seq_len
    if family == "qwen2":
        types = set(getattr(config, "layer_types", None) or ())
        sliding = "sliding_attention" in types and window is not None and window < seq_len
        if sliding and len(types) > 1:
            raise ConfigError(f"this Qwen2 config mixes full and sliding-window layers (sliding_window={window} < "
                              f"seq_len={seq_len}), so its blocks are not identical; offload plans need identical "
                              f"blocks: train it plainly (--memory.device_budget none) or lower --train.seq_len "
                              f"to {window}")
        return sliding
    return False


def _attention(s: dict, family: str, B: int, T: int, b: int, mask: bool) -> dict[str, int]:
    """What the attention part of a block saves (the qkv projections' input excluded)."""
    nh, nkv, hd = s["nh"], s["nkv"], s["hd"]
    heads = B * nh * T * hd
    if s["attn_drop"] > 0:
        # Dropout inside sdpa takes the math path, which on CPU works in fp32 whatever the
        # dtype: scaled q, k^T and v (k, v expanded to every head), the probabilities, the
        # dropout mask and the dropped probabilities; its output is copied for the projection.
        saved = {"attn.q_k_v_fp32": 3 * heads * FP32_BYTES, "attn.probs_mask_dropped": 3 * B * nh * T * T * FP32_BYTES,
                 "attn.proj_in": heads * b}
        return saved
    saved = {"attn.lse": B * nh * T * FP32_BYTES, "attn.out": heads * b}
    if family == "gpt2":
        # q, k and v are views of c_attn's output; the output's layout follows q's, so the
        # merge of heads for c_proj is a view.
        saved["attn.qkv"] = 3 * heads * b
    elif family == "gpt_neox":
        # Rotated q and k are concatenations (contiguous per head), v a view of the fused qkv
        # output; the output is then contiguous per head, and merging heads copies it.
        saved.update({"attn.q_rope": heads * b, "attn.k_rope": heads * b, "attn.qkv": 3 * heads * b,
                      "attn.proj_in": heads * b})
    else:
        # q and k are rotated in the projections' layout, so the output is too (its merge is a
        # view). With a mask, transformers expands k and v to every head (no GQA in sdpa).
        kv_heads = nh if mask else nkv
        saved.update({"attn.q_rope": heads * b, "attn.k": B * kv_heads * T * hd * b,
                      "attn.v": B * kv_heads * T * hd * b})
        if mask:  # each block saves its own copy of the (B, 1, T, T) sliding-window mask
            saved["attn.mask"] = B * T * T * b
    return saved


def _mlp(s: dict, BT: int, b: int, gated: bool) -> dict[str, int]:
    C, F, act = s["C"], s["F"], s["act"]
    if act not in ACTIVATION_SAVES:
        raise ConfigError(f"hetrain does not know what activation '{act}' saves for backward, which offload plans "
                          f"need; known: {', '.join(ACTIVATION_SAVES)}; train this model plainly "
                          f"(--memory.device_budget none)")
    saved = {"mlp.up_in": BT * C * b}
    act_saved = ACTIVATION_SAVES[act] * BT * F * b
    if gated:  # act(gate) * up: the product saves both factors
        saved.update({"mlp.gate_up_out": BT * F * b, "mlp.act_saved": act_saved, "mlp.act_out": BT * F * b})
    else:      # relu saves its output, which the down projection saves too (one storage)
        saved["mlp.act_saved"] = act_saved
    saved["mlp.down_in"] = BT * F * b
    return saved


def _norm(family: str, prefix: str, BT: int, C: int, b: int, new_input: bool = True) -> dict[str, int]:
    if family in LLAMA_LIKE:
        # RMSNorm computes in fp32: the upcast input, 1/rms and the normalised input (cast back).
        return {f"{prefix}.in_fp32": BT * C * FP32_BYTES, f"{prefix}.rstd": BT * FP32_BYTES,
                f"{prefix}.normed": BT * C * b}
    # nn.LayerNorm: its input and mean and 1/std in the compute dtype.
    return {f"{prefix}.in": BT * C * b if new_input else 0, f"{prefix}.mean_rstd": 2 * BT * b}


def block_act_bytes(config, family: str, micro_batch: int, seq_len: int, b: int) -> dict[str, int]:
    """Bytes one block saves for backward, by tensor, for one micro-batch (extras excluded)."""
    s = _shape(config, family)
    BT, C = micro_batch * seq_len, s["C"]
    mask = _sliding_mask(config, family, seq_len)
    saved = _norm(family, "norm1", BT, C, b)
    saved["attn.qkv_in"] = BT * C * b
    saved.update(_attention(s, family, micro_batch, seq_len, b, mask))
    if s["resid_drop"] > 0:
        saved["attn.dropout_mask"] = BT * C * b
    # GPT-NeoX's parallel residual normalises the block's input twice (one saved input).
    parallel = family == "gpt_neox" and getattr(config, "use_parallel_residual", True)
    saved.update(_norm(family, "norm2", BT, C, b, new_input=not parallel))
    saved.update(_mlp(s, BT, b, gated=family in LLAMA_LIKE))
    if s["resid_drop"] > 0:
        saved["mlp.dropout_mask"] = BT * C * b
    return {k: v for k, v in saved.items() if v}


def family_of(config) -> str:
    """The description family of a transformers config; ConfigError for one hetrain cannot describe."""
    family = getattr(config, "model_type", "")
    if family not in FAMILIES:
        raise ConfigError(f"offload plans for Hugging Face models cover model types {', '.join(FAMILIES)}; this "
                          f"model is '{family}': train it plainly (--memory.device_budget none)")
    return family


def describe_hf(config, micro_batch: int, seq_len: int, compute_dtype_bytes: int = 2) -> ModelDescription:
    """Per-layer parameters, FLOPs per token and saved bytes of the transformers model `config`
    for one micro-batch of (micro_batch, seq_len); ConfigError for a model it cannot describe."""
    family = family_of(config)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and seq_len > limit:
        raise ConfigError(f"seq_len={seq_len} exceeds the HF config's max_position_embeddings={limit}")
    counts = _layer_counts(json.dumps(config.to_dict(), sort_keys=True, default=str))
    if counts["attn_implementation"] != "sdpa":
        raise ConfigError(f"offload plans describe transformers' 'sdpa' attention; this model uses "
                          f"'{counts['attn_implementation']}': remove attn_implementation from its config.json")
    s = _shape(config, family)
    b, BT, C, V = compute_dtype_bytes, micro_batch * seq_len, s["C"], counts["vocab"]
    n = config.num_hidden_layers
    boundary = BT * C * b

    emb_saved = {"tokens": BT * INDEX_BYTES}
    if family == "gpt2":
        emb_saved["positions"] = seq_len * INDEX_BYTES
    if s["emb_drop"] > 0:
        emb_saved["dropout_mask"] = BT * C * b
    rotary = _rotary_dims(config, family, s["hd"])
    if rotary:  # cos and sin of shape (1, T, rotary dims) in the compute dtype, read by every block
        emb_saved["rotary_cos_sin"] = 2 * seq_len * rotary * b
    e = counts["embedding"]
    embedding = LayerDescription("embedding", e["params"], 0.0, 0.0, emb_saved, boundary, e["tensors"], 0)

    blk = counts["block"]
    fwd_block = 2.0 * blk["matmul"] + 2.0 * seq_len * s["nh"] * s["hd"]
    act = block_act_bytes(config, family, micro_batch, seq_len, b)
    blocks = [LayerDescription(f"block.{i}", blk["params"], fwd_block, 2 * fwd_block, dict(act), boundary,
                               blk["tensors"], blk["matmul"], blk["gemms"],
                               early_stop_skips=0 if s["resid_drop"] > 0 else 1)  # the last gemm: the MLP's down
              for i in range(n)]

    head_saved = _norm(family, "norm_f", BT, C, b)
    head_saved.update({"lm_head_in": BT * C * b, "log_probs": BT * V * FP32_BYTES, "targets": BT * INDEX_BYTES,
                       "loss": FP32_BYTES})
    h = counts["head"]
    fwd_head = 2.0 * h["matmul"]
    head = LayerDescription("head", h["params"], fwd_head, 2 * fwd_head, head_saved, 0, h["tensors"], h["matmul"],
                            h["gemms"])

    total = e["params"] + n * blk["params"] + h["params"]
    buffers = counts["other_buffers"] + n * counts["block_buffers"]
    # Tensor parallelism (hetrain.pipeline.tensor_parallel.shard_hf_block) splits Llama-style
    # layers by whole heads, KV heads and MLP columns, and not with attention dropout.
    splits = family in LLAMA_LIKE and not s["attn_drop"] and transformers_splits_heads()
    tp_heads = math.gcd(s["nh"], s["nkv"], s["F"]) if splits else 1
    return ModelDescription(config, micro_batch, seq_len, b, embedding, blocks, head, total, hidden_size=C,
                            vocab_size=V, norm="rmsnorm" if family in LLAMA_LIKE else "layernorm",
                            buffers_bytes=buffers, tied_embeddings=counts["tied"], tp_heads=tp_heads)

"""Analytic description of a model: per layer parameters, FLOPs and saved-activation bytes.

Every planner reasons from this description, never from a live module, so it works for a
175B preset on a laptop. It must stay pure arithmetic over a ModelConfig: no tensors, no
device queries. (hf_describe.py fills the same ModelDescription for transformers models.) `tests/model/test_describe.py` checks the activation bytes against what
PyTorch really saves for backward on CPU (counted with saved-tensor hooks), so the tensor
list below mirrors PyTorch 2.13's CPU kernels and must be re-checked when torch changes.

Conventions:
- FLOPs count a multiply-add as 2. Attention is causal, so QK^T and AV together cost
  2*T*C per token (half of the non-causal 4*T*C). Backward is twice the forward.
- Activation bytes are per micro-batch, deduplicated by storage (q, k and v are views of
  one qkv tensor and count once). `compute_dtype_bytes` is 4 for fp32 and 2 for bf16
  compute with the weights themselves in bf16 (the offload engine's layout); softmax
  statistics and the loss's log-probabilities are fp32 whatever the compute dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hetrain.model.gpt import ModelConfig

INDEX_BYTES = 8  # token ids and position ids are int64
FP32_BYTES = 4
BOOL_BYTES = 1  # a residual dropout's mask (gpt.ResidualDropout)


@dataclass(frozen=True)
class LayerDescription:
    """One layer of the stack: the embedding, one transformer block, or the output head."""

    name: str
    params: int
    fwd_flops_per_token: float
    bwd_flops_per_token: float
    act_bytes: dict[str, int] = field(default_factory=dict)
    """Bytes saved for backward per micro-batch, by tensor."""
    boundary_bytes: int = 0
    """Bytes of the layer's output per micro-batch: what a pipeline stage sends, and what a
    checkpointed block keeps."""
    tensors: int = 0
    """Parameter tensors the layer owns (fused AdamW keeps a step counter per tensor)."""
    matmul_params: int = 0
    """Weights its matmuls read: a block's projections, the head's output matrix (even when
    tied to the embedding, which then owns it); 0 for the embedding (a lookup)."""
    gemms: tuple[tuple[int, int], ...] = ()
    """The weight shape of each of its matmuls, as (inputs, outputs): per token a matmul costs
    2 x inputs x outputs FLOPs forward; the products sum to matmul_params."""
    early_stop_skips: int = 0
    """Trailing matmuls of `gemms` that a whole-layer recomputation does not rerun: torch's
    checkpoint stops once the last saved tensor is back, so a block's MLP down projection reruns
    only when something after it saves a tensor (a dropout mask)."""

    @property
    def act_bytes_total(self) -> int:
        return sum(self.act_bytes.values())

    @property
    def early_stop_gemms(self) -> tuple[tuple[int, int], ...]:
        """The matmuls of `gemms` that a whole-layer recomputation skips (its last early_stop_skips)."""
        return self.gemms[len(self.gemms) - self.early_stop_skips:]

    @property
    def early_stop_flops_share(self) -> float:
        """The share of the forward FLOPs that a whole-layer recomputation skips."""
        skipped = self.early_stop_gemms
        return 2.0 * sum(k * n for k, n in skipped) / self.fwd_flops_per_token if skipped else 0.0


@dataclass(frozen=True)
class ModelDescription:
    config: ModelConfig
    """hetrain's ModelConfig, or the transformers config of a Hugging Face model."""
    micro_batch: int
    seq_len: int
    compute_dtype_bytes: int
    embedding: LayerDescription
    blocks: list[LayerDescription]
    head: LayerDescription
    total_params: int
    hidden_size: int
    vocab_size: int
    """Rows of the output projection."""
    norm: str
    """'layernorm' or 'rmsnorm' (what autocast keeps in fp32 differs)."""
    buffers_bytes: int
    """The model's buffers (rotary tables), kept on the device beside the parameters."""
    tied_embeddings: bool
    tp_heads: int = 1
    """What a tensor-parallel degree must divide, as the runtime shards the model: for hetrain's
    GPT the gcd of its heads, key/value heads and MLP width (1 with dropout on the attention
    probabilities, which the runtime refuses under TP); the same for a Llama-style transformers model (heads, KV heads,
    intermediate size; 1 with attention dropout), and 1 for the others, which it does not shard."""

    def layers(self) -> list[LayerDescription]:
        return [self.embedding, *self.blocks, self.head]

    @property
    def tokens_per_microbatch(self) -> int:
        return self.micro_batch * self.seq_len

    def train_flops_per_token(self) -> float:
        """Useful training FLOPs per token (forward + backward, no recomputation)."""
        return sum(layer.fwd_flops_per_token + layer.bwd_flops_per_token for layer in self.layers())


def block_params(cfg: ModelConfig) -> int:
    C, kv = cfg.d_model, cfg.n_kv_head * cfg.head_dim
    norm = C * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    qkv = C * (C + 2 * kv) + ((C + 2 * kv) if cfg.bias else 0)
    proj = C * C + (C if cfg.bias else 0)
    up_width = cfg.d_ff * (2 if cfg.mlp == "swiglu" else 1)
    mlp = C * up_width + cfg.d_ff * C + ((up_width + C) if cfg.bias else 0)
    return 2 * norm + qkv + proj + mlp


def _block_gemms(cfg: ModelConfig) -> tuple[tuple[int, int], ...]:
    """(inputs, outputs) of a block's matmuls: qkv, output projection, MLP up (gate and up
    together for SwiGLU), MLP down."""
    C, kv = cfg.d_model, cfg.n_kv_head * cfg.head_dim
    up_width = cfg.d_ff * (2 if cfg.mlp == "swiglu" else 1)
    return ((C, C + 2 * kv), (C, C), (C, up_width), (cfg.d_ff, C))


def _matmul_params(cfg: ModelConfig) -> int:
    return sum(k * n for k, n in _block_gemms(cfg))


def param_tensors(cfg: ModelConfig) -> dict[str, int]:
    """Parameter tensors per layer kind (a tied output matrix is the embedding's)."""
    norm = 1 + (1 if cfg.norm == "layernorm" and cfg.bias else 0)
    linear = 1 + (1 if cfg.bias else 0)
    return {"embedding": 1 + (1 if cfg.pos == "learned" else 0),
            "block": 2 * norm + 4 * linear,
            "head": norm + (0 if cfg.tie_embeddings else 1)}


def _norm_saved(cfg: ModelConfig, prefix: str, BT: int, b: int) -> dict[str, int]:
    C = cfg.d_model
    if cfg.norm == "rmsnorm":
        # RMSNorm is composite on CPU and computes in fp32: it keeps the upcast input, the
        # reciprocal rms and the normalised input (for the weight's gradient).
        return {f"{prefix}.in_fp32": BT * C * FP32_BYTES, f"{prefix}.rstd": BT * FP32_BYTES,
                f"{prefix}.normed_fp32": BT * C * FP32_BYTES}
    return {f"{prefix}.in": BT * C * b, f"{prefix}.mean_rstd": 2 * BT * b}


def block_act_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, b: int) -> dict[str, int]:
    """Bytes one block saves for backward, by tensor, for one micro-batch."""
    BT, C, F = micro_batch * seq_len, cfg.d_model, cfg.d_ff
    kv = cfg.n_kv_head * cfg.head_dim
    saved = _norm_saved(cfg, "norm1", BT, b)
    saved["attn.qkv_in"] = BT * C * b                   # norm1 output, input of the qkv matmul
    if cfg.attn_dropout > 0:
        saved.update(_math_attention_saved(cfg, micro_batch, seq_len, b))
    else:
        saved["attn.qkv"] = BT * (C + 2 * kv) * b       # one storage; q, k, v are views of it
        if cfg.pos == "rope":
            saved["attn.q_rope"] = BT * C * b
            saved["attn.k_rope"] = BT * kv * b
        saved["attn.lse"] = micro_batch * cfg.n_head * seq_len * FP32_BYTES  # softmax log-sum-exp
        saved["attn.out"] = BT * C * b
        if cfg.pos == "rope":
            # Rotated q is contiguous in (B, nh, T, hs), so the output's transpose to (B, T, C)
            # is a copy that the output projection saves.
            saved["attn.proj_in"] = BT * C * b
    if cfg.dropout > 0:
        saved["attn.resid_mask"] = BT * C * BOOL_BYTES  # the dropout's one-byte mask
    saved.update(_norm_saved(cfg, "norm2", BT, b))
    saved["mlp.up_in"] = BT * C * b
    if cfg.mlp == "swiglu":
        saved["mlp.up_out"] = BT * 2 * F * b            # gate and up halves, one storage
        saved["mlp.silu_gate"] = BT * F * b
    else:
        saved["mlp.up_out"] = BT * F * b                # GELU input
    saved["mlp.down_in"] = BT * F * b
    if cfg.dropout > 0:
        saved["mlp.resid_mask"] = BT * C * BOOL_BYTES
    return saved


def _math_attention_saved(cfg: ModelConfig, micro_batch: int, seq_len: int, b: int) -> dict[str, int]:
    """With attention dropout, CPU attention is the math kernel, in fp32 whatever the compute
    dtype: it keeps scaled q and k, a copy of v (key/value heads repeated to n_head), the
    softmax probabilities, the dropout mask and the dropped probabilities (the quadratic
    tensors), and the output projection saves the output's (B, T, C) copy. The fused qkv
    storage is then saved by nobody. CUDA's fused kernels take dropout without these."""
    BT, nh, T = micro_batch * seq_len, cfg.n_head, seq_len
    per_head = BT * nh * cfg.head_dim * FP32_BYTES
    quadratic = micro_batch * nh * T * T * FP32_BYTES
    return {"attn.q_scaled": per_head, "attn.k_scaled": per_head, "attn.v_copy": per_head,
            "attn.probs": quadratic, "attn.drop_mask": quadratic, "attn.probs_dropped": quadratic,
            "attn.proj_in": BT * cfg.d_model * b}


def head_backward_transient_bytes(micro_batch: int, seq_len: int, vocab_size: int) -> int:
    """Bytes the head's backward holds beyond what it saved, at its peak: the fp32 gradients of
    the log-probabilities and of the logits, alive together inside the cross-entropy's
    backward. Autograd saves neither, so the CPU accountant and the offload ledger do not count
    them; a GPU's caching allocator does. On an H200 (docs/gpu.md) the allocator's peak
    exceeded the ledger's by 3.07 GiB in two offload runs at 8 x 1024 tokens and a 50,257-token
    vocabulary, which is this figure (3.07 GiB) to the percent."""
    return 2 * micro_batch * seq_len * vocab_size * FP32_BYTES


def describe_model(cfg: ModelConfig, micro_batch: int, seq_len: int, compute_dtype_bytes: int = 2) -> ModelDescription:
    """Per-layer parameters, FLOPs per token and saved bytes for one micro-batch of (micro_batch, seq_len)."""
    cfg.validate()
    if seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds model.max_seq_len={cfg.max_seq_len}")
    b, BT, C, V = compute_dtype_bytes, micro_batch * seq_len, cfg.d_model, cfg.vocab_size
    boundary = BT * C * b

    emb_params = V * C + (cfg.max_seq_len * C if cfg.pos == "learned" else 0)
    emb_saved = {"tokens": BT * INDEX_BYTES}
    if cfg.pos == "learned":
        emb_saved["positions"] = seq_len * INDEX_BYTES
    tensors = param_tensors(cfg)
    embedding = LayerDescription("embedding", emb_params, 0.0, 0.0, emb_saved, boundary, tensors["embedding"])

    fwd_block = 2.0 * _matmul_params(cfg) + 2.0 * seq_len * C
    act = block_act_bytes(cfg, micro_batch, seq_len, b)
    blocks = [
        LayerDescription(f"block.{i}", block_params(cfg), fwd_block, 2 * fwd_block, dict(act), boundary,
                         tensors["block"], _matmul_params(cfg), _block_gemms(cfg),
                         early_stop_skips=0 if cfg.dropout > 0 else 1)  # the residual dropout's mask
        for i in range(cfg.n_layer)
    ]

    head_saved = _norm_saved(cfg, "norm_f", BT, b)
    head_saved["lm_head_in"] = BT * C * b
    head_saved["log_probs"] = BT * V * FP32_BYTES       # cross-entropy keeps fp32 log-softmax
    head_saved["targets"] = BT * INDEX_BYTES
    head_saved["loss"] = FP32_BYTES
    norm_f_params = C * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    head_params = norm_f_params + (0 if cfg.tie_embeddings else V * C)
    fwd_head = 2.0 * C * V
    head = LayerDescription("head", head_params, fwd_head, 2 * fwd_head, head_saved, 0, tensors["head"], V * C,
                            ((C, V),))

    total = emb_params + cfg.n_layer * block_params(cfg) + head_params
    # Rotary tables: cos and sin of shape (max_seq_len, head_dim / 2), fp32 buffers.
    buffers = 2 * cfg.max_seq_len * (cfg.head_dim // 2) * FP32_BYTES if cfg.pos == "rope" else 0
    return ModelDescription(cfg, micro_batch, seq_len, b, embedding, blocks, head, total, hidden_size=C,
                            vocab_size=V, norm=cfg.norm, buffers_bytes=buffers, tied_embeddings=cfg.tie_embeddings,
                            tp_heads=1 if cfg.attn_dropout > 0 else math.gcd(cfg.n_head, cfg.n_kv_head, cfg.d_ff))

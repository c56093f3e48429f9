"""Pipeline stages cut from a plain GPT: a run of blocks, the embedding on the first, the head on the last.

`build_chunk(gpt, chunk)` returns a StageModule that holds the GPT's own submodules for one
chunk of a plan (no copies: the parameters are the GPT's), under the names the whole model
gives them (`blocks.3.attn.qkv.weight`), so that checkpoints and comparisons go by the same
fully qualified names in every layout. Its forward is the GPT's forward restricted to the chunk:
token ids (B, T) in on the first chunk, activations (B, T, C) in and out between chunks, logits
(B, T, vocab) out of the last; `stage_loss` is the GPT's loss on those logits. The plan's
recomputation policy of each block (whole blocks or units inside them, on demand or ahead of the
backward) applies with hetrain.pipeline.unit_recompute (torch.utils.checkpoint, non-reentrant).
This module cuts and wraps modules; it must not communicate or know about ranks.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hetrain.model.gpt import GPT
from hetrain.pipeline.placement import Chunk
from hetrain.pipeline.unit_recompute import Recomputations, UnitRecomputeHandle, apply_unit_recompute


class StageModule(nn.Module):
    """Blocks [first_block, first_block + n_blocks) of a GPT, with its embedding and/or head."""

    def __init__(self, gpt: GPT, chunk: Chunk):
        super().__init__()
        self.chunk = chunk
        self.embedding, self.head = chunk.embedding, chunk.head
        if chunk.embedding:
            self.tok_emb = gpt.tok_emb
            self.pos_emb = gpt.pos_emb
        # A ModuleDict keyed by the block's index keeps the whole model's names (blocks.3....).
        self.blocks = nn.ModuleDict({str(i): gpt.blocks[i]
                                     for i in range(chunk.first_block, chunk.first_block + chunk.n_blocks)})
        if chunk.head:
            self.norm_f = gpt.norm_f
            self.lm_head = gpt.lm_head  # tied to tok_emb when the model ties and both are here
        rope = gpt.rope()
        if rope is not None:  # derived from the config: buffers that are not saved, as in the GPT
            self.register_buffer("rope_cos", rope[0], persistent=False)
            self.register_buffer("rope_sin", rope[1], persistent=False)
        self.has_rope = rope is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding:  # token ids (B, T) -> (B, T, C), as GPT.embed
            idx = x
            x = self.tok_emb(idx)
            if self.pos_emb is not None:
                x = x + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        rope = (self.rope_cos, self.rope_sin) if self.has_rope else None
        for block in self.blocks.values():
            x = block(x, rope)
        if self.head:
            return self.lm_head(self.norm_f(x))  # (B, T, vocab)
        return x


def stage_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The GPT's loss (GPT.head): mean cross-entropy over the micro-batch's tokens, in fp32."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device))


def build_chunk(gpt: GPT, chunk: Chunk) -> StageModule:
    return StageModule(gpt, chunk)


def apply_stage_recompute(module: StageModule, ledger: Recomputations) -> UnitRecomputeHandle:
    """Each block of the chunk recomputes as its policy in the plan says (whole blocks, units, on
    demand or ahead of the backward; hetrain.pipeline.unit_recompute)."""
    return apply_unit_recompute(list(module.blocks.values()), list(module.chunk.policies), ledger)


def stage_example(chunk: Chunk, micro_batch: int, seq_len: int, d_model: int, vocab_size: int,
                  device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Example input and output of a chunk for one micro-batch: the shapes torch's PipelineStage
    needs to allocate its receive buffers without running the model first."""
    meta = dict(device=device)
    if chunk.embedding:
        x = torch.zeros(micro_batch, seq_len, dtype=torch.long, **meta)
    else:
        x = torch.zeros(micro_batch, seq_len, d_model, dtype=dtype, **meta).requires_grad_(True)
    out_width = vocab_size if chunk.head else d_model
    y = torch.zeros(micro_batch, seq_len, out_width, dtype=dtype, **meta).requires_grad_(True)
    return x, y

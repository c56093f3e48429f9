"""Pipeline stages cut from a whole model: a run of blocks, the embedding on the first, the head on the last.

`build_chunk(model, chunk, micro_batch, seq_len)` returns a stage module that holds the model's
own submodules for one chunk of a plan (no copies: the parameters are the model's), under the
names the whole model gives them (`blocks.3.attn.qkv.weight` for hetrain's GPT,
`hf_model.model.layers.3.mlp.up_proj.weight` for a transformers model), so that checkpoints and
comparisons go by the same fully qualified names in every layout. Its forward is the model's
forward restricted to the chunk: token ids (B, T) in on the first chunk, activations (B, T, C)
in and out between chunks, logits (B, T, vocab) out of the last; `stage_loss` is the model's
loss on those logits. The plan's recomputation policy of each block (whole blocks or units
inside them, on demand or ahead of the backward) applies with hetrain.pipeline.unit_recompute.

Two kinds of model:
- hetrain's GPT (StageModule): the GPT's forward written out for the chunk; every policy.
- a transformers causal LM through the block interface (HFStageModule, hetrain.model.stack):
  the chunk calls `embed_inputs`, `block_forward` and `head` of the model. The extras every
  block reads besides the hidden states (rotary cos/sin, masks, position ids) depend on the
  batch's shape only (the interface's contract), and a pipeline's micro-batches all have one
  shape: each stage computes them once, from the whole model before it is cut, instead of
  receiving them with every activation (no link bytes, the same values). Whole-block
  recomputation only (the unit steps are the GPT's), no tensor parallelism.

`ModelNames` is what the runtime keeps of the whole model once it is cut: which unit each
parameter belongs to, the tied matrix's two names, the optimizer's groups. This module cuts
and wraps modules; it must not communicate or know about ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from hetrain.model.gpt import GPT
from hetrain.model.stack import layer_parameters
from hetrain.pipeline.placement import Chunk
from hetrain.pipeline.unit_recompute import (Recomputations, RecomputeHandle, apply_unit_recompute,
                                             apply_whole_recompute)
from hetrain.precision import autocast


@dataclass(frozen=True)
class ModelNames:
    """The whole model's parameter names, kept when the model is cut into stages."""

    units: dict[str, str]
    """Every parameter name (a tied matrix under both) -> 'embedding', 'block.i' or 'head'."""
    tied: tuple[str, str] | None
    """(embedding name, head name) of the matrix the two share, or None."""
    decay: tuple[str, ...]
    """Names (one per parameter) of the matrices AdamW decays, in named_parameters() order."""
    no_decay: tuple[str, ...]
    hidden_size: int
    vocab_size: int

    def canonical(self, name: str) -> str:
        """The name a tied matrix's state goes by: the embedding's."""
        return self.tied[0] if self.tied and name == self.tied[1] else name

    def unit_of(self, name: str) -> str:
        return self.units[name]


def model_names(model: nn.Module, seq_len: int) -> ModelNames:
    """ModelNames of a whole model that implements the block interface (hetrain.model.stack)."""
    n = len(model.blocks)
    unit = {0: "embedding", n + 1: "head"}
    first_name: dict[int, str] = {}
    units: dict[str, str] = {}
    for layer, owned in enumerate(layer_parameters(model)):
        for name, p in owned:
            first_name[id(p)] = name
            units[name] = unit.get(layer, f"block.{layer - 1}")
    tied = None
    for name, p in model.named_parameters(remove_duplicate=False):
        if name not in units:  # a second name of a matrix that a first holder owns
            units[name] = "head"
            tied = (first_name[id(p)], name)
    named = list(model.named_parameters())
    desc = model.describe(1, seq_len, 4)
    return ModelNames(units, tied, tuple(n for n, p in named if p.dim() >= 2), tuple(n for n, p in named if p.dim() < 2),
                      desc.hidden_size, desc.vocab_size)


class StageModule(nn.Module):
    """Blocks [first_block, first_block + n_blocks) of a GPT, with its embedding and/or head."""

    def __init__(self, gpt: GPT, chunk: Chunk, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.chunk, self.autocast_dtype = chunk, autocast_dtype
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
        with autocast(x.device, self.autocast_dtype):
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
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


def _hold(root: nn.Module, path: str, module: nn.Module) -> None:
    """Register `module` under `root` at the dotted `path`, making plain containers on the way,
    so that its parameters keep the names the whole model gives them."""
    *parents, leaf = path.split(".")
    node = root
    for part in parents:
        if part not in node._modules:
            node.add_module(part, nn.Module())
        node = node._modules[part]
    node.add_module(leaf, module)


class HFStageModule(nn.Module):
    """A chunk of a model driven through the block interface (a transformers causal LM)."""

    def __init__(self, model: nn.Module, chunk: Chunk, micro_batch: int, seq_len: int,
                 autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.chunk, self.autocast_dtype = chunk, autocast_dtype
        self.embedding, self.head = chunk.embedding, chunk.head
        n = len(model.blocks)
        blocks_at = {id(b): i for i, b in enumerate(model.blocks)}
        keep = set(range(chunk.first_block + 1, chunk.first_block + chunk.n_blocks + 1))
        if chunk.embedding:
            keep.add(0)
        if chunk.head:
            keep.add(n + 1)
        held = []
        for name, module in model.named_modules():
            if not name or any(name.startswith(h + ".") for h in held):
                continue
            if id(module) in blocks_at:
                if blocks_at[id(module)] + 1 in keep:
                    _hold(self, name, module)
                    held.append(name)
            elif not module._modules and (module._parameters or module._buffers) and model.part_of(name) in keep:
                _hold(self, name, module)  # the embedding's or the head's own leaves (and rotary tables)
                held.append(name)
        self.blocks = [model.blocks[i] for i in range(chunk.first_block, chunk.first_block + chunk.n_blocks)]
        # Not registered: the stage calls the whole model's interface, whose modules it holds above.
        self.__dict__["_model"] = model
        with torch.no_grad():
            _, extras = model.embed_inputs(torch.zeros(micro_batch, seq_len, dtype=torch.long))
        self.__dict__["_extras"] = {torch.device("cpu"): extras}

    def _extras_on(self, device: torch.device, dtype: torch.dtype):
        """The extras on `device`, their floating tensors (rotary tables, additive masks) in the
        hidden states' dtype, as the model's own embedding step makes them (a mask's fp32 minimum
        becomes the dtype's minimum, not -inf)."""
        def move(t):
            if not isinstance(t, torch.Tensor):
                return t
            if not t.is_floating_point():
                return t.to(device)
            return t.to(device, dtype=dtype).clamp_min(torch.finfo(dtype).min)

        if (device, dtype) not in self._extras:
            self._extras[device, dtype] = tree_map(move, self._extras[torch.device("cpu")])
        return self._extras[device, dtype]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, self.autocast_dtype):
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self._model
        if self.embedding:
            x, _ = model.embed_inputs(x)
        extras = self._extras_on(x.device, x.dtype)
        for block in self.blocks:
            x = model.block_forward(block, x, extras)
        if self.head:
            return model.head(x, None)  # logits (B, T, vocab)
        return x


def stage_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The models' loss (GPT.head, HFCausalLM.head): mean cross-entropy over the micro-batch's tokens, in fp32."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device))


def build_chunk(model: nn.Module, chunk: Chunk, micro_batch: int, seq_len: int,
                autocast_dtype: torch.dtype | None = None) -> nn.Module:
    """The chunk's stage module; with autocast_dtype its forward runs under torch.autocast."""
    if isinstance(model, GPT):
        return StageModule(model, chunk, autocast_dtype)
    return HFStageModule(model, chunk, micro_batch, seq_len, autocast_dtype)


def apply_stage_recompute(module: nn.Module, ledger: Recomputations) -> RecomputeHandle:
    """Each block of the chunk recomputes as its policy in the plan says (whole blocks, units, on
    demand or ahead of the backward; hetrain.pipeline.unit_recompute)."""
    if isinstance(module, HFStageModule):
        return apply_whole_recompute(module.blocks, list(module.chunk.policies))
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

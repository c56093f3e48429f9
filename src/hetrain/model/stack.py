"""The block interface: how hetrain drives a language model one layer at a time, from outside.

Every technique that works per layer (the offload engine, the profiler, the model
description, the planners, and pipeline stages) sees a model as embedding -> blocks -> head
and calls it through these members, which hetrain's GPT (gpt.py) and a transformers causal
LM (hf.py) both implement:

- `blocks`: the nn.ModuleList of decoder blocks, all of one class.
- `embed_inputs(idx) -> (h, extras)`: token ids (B, T) to the hidden states (B, T, C) the
  first block reads, and the extra inputs every block needs besides them (GPT: its rotary
  tables or None; transformers: the positional and keyword arguments the HF model passes its
  decoder layers: rotary cos/sin, attention mask, position ids). Extras depend on the batch's
  shape, never on its values' gradients: no extras tensor requires grad, and they are the
  same objects for every block. They are a pytree of tensors and constants, so a pipeline
  stage sends the tensors among `torch.utils._pytree.tree_flatten(extras)[0]` beside `h`
  and rebuilds the rest from the spec (see `run_layers`).
- `block_forward(block, h, extras) -> h`: one block. It calls the module, so whatever wraps
  the block's forward from outside (recomputation) applies.
- `head(h, targets) -> loss`, or logits when targets is None: final norm, output projection,
  mean cross-entropy (targets already shifted: targets[t] follows idx[t]).
- `part_of(module_name) -> int`: the layer that owns a module's parameters (0 the
  embedding, i + 1 block i, len(blocks) + 1 the head); a tied matrix is the embedding's.
- `max_seq_len`: the longest sequence the model accepts, or None.
- `describe(micro_batch, seq_len, compute_dtype_bytes) -> ModelDescription`: parameters,
  FLOPs and saved bytes per layer (describe.py for GPT, hf_describe.py for transformers).

This file states the contract and offers helpers built only on it. It must not know a
model's class, and nothing here may train, place or offload anything.
"""

from __future__ import annotations

import torch
import torch.nn as nn

MEMBERS = ("blocks", "embed_inputs", "block_forward", "head", "part_of", "max_seq_len", "describe")


def check_stack(model: nn.Module, who: str) -> None:
    """ValueError naming the first member of the interface `model` lacks (`who` is the caller)."""
    for name in MEMBERS:
        if not hasattr(model, name):
            raise ValueError(f"{who} drives a model through hetrain's block interface (hetrain.model.stack); "
                             f"{type(model).__name__} has no '{name}'")


def layer_parameters(model: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """Each layer's own parameters (embedding, blocks, head) by `part_of`, in named_parameters()
    order; a parameter held by several modules (a tied matrix) goes to its first holder."""
    owner: dict[int, int] = {}
    for module_name, module in model.named_modules():
        for p in module._parameters.values():
            if p is not None and id(p) not in owner:
                owner[id(p)] = model.part_of(module_name)
    layers: list[list[tuple[str, nn.Parameter]]] = [[] for _ in range(len(model.blocks) + 2)]
    for name, p in model.named_parameters():
        layers[owner[id(p)]].append((name, p))
    return layers


def run_layers(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor | None = None,
               start: int = 0, stop: int | None = None, h: torch.Tensor | None = None, extras=None):
    """The model's forward, or a contiguous part of it, through the interface alone.

    Layers `start` to `stop` (exclusive) in the interface's numbering: 0 is the embedding,
    i + 1 block i, len(blocks) + 1 the head; the whole model by default. A part that does not
    start at the embedding takes the previous part's `h` and `extras`. Returns (h, extras)
    when the part ends before the head, else the head's loss (or logits). This is what a
    pipeline stage runs: stage k calls run_layers(model, idx, targets, start_k, stop_k, h,
    extras) with the hidden states and extras received from stage k-1.
    """
    n = len(model.blocks)
    stop = n + 2 if stop is None else stop
    if start == 0:
        h, extras = model.embed_inputs(idx)
    elif h is None:
        raise ValueError("a part that does not start at the embedding needs the previous part's h and extras")
    for i in range(max(start, 1) - 1, min(stop - 1, n)):
        h = model.block_forward(model.blocks[i], h, extras)
    if stop == n + 2:
        return model.head(h, targets)
    return h, extras

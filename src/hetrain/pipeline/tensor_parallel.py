"""Tensor parallelism inside a pipeline stage, with torch.distributed.tensor.parallel on a DeviceMesh.

`apply_tensor_parallel(stage, mesh)` shards every block of a StageModule over a 1-D mesh of the
stage's TP ranks, Megatron style: the fused q/k/v projection and the MLP's up projection
column-wise, the attention output projection and the MLP's down projection row-wise, so that a
block needs one all-reduce in its forward after attention and one after the MLP (and their
mirrors in backward). Each rank then runs n_head / tp heads (the Attention module's head
counts are set to the local share). The embedding, final norm and head stay whole on every TP
rank (each computes them; they are small beside the blocks for the models tested here).

Fused projections cut into q|k|v (and gate|up for SwiGLU) would give a rank a slice that mixes
them, so their output rows are first reordered to [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], shard i
holding rank i's heads; `to_canonical` / `from_canonical` convert a whole tensor (a weight, its
gradient or its Adam moments) between that order and the model's own, which is what
checkpoints and cross-pipeline gradient exchange use. Not done: sequence parallelism and a
vocabulary-parallel embedding (the planner assumes both; see docs/pipeline.md).

This module changes modules and converts tensors; it must not create process groups or
communicate outside the DTensor collectives that parallelize_module installs.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from hetrain.model.gpt import ModelConfig

_PLAN = {"attn.qkv": ColwiseParallel(), "attn.proj": RowwiseParallel(),
         "mlp.up": ColwiseParallel(), "mlp.down": RowwiseParallel()}


def check_tp(cfg: ModelConfig, tp: int) -> str | None:
    """Why the model cannot be split tp ways (a message), or None."""
    for name, n in (("model.n_head", cfg.n_head), ("model.n_kv_head", cfg.n_kv_head), ("model.d_ff", cfg.d_ff)):
        if n % tp:
            return f"{name}={n} is not divisible by the tensor-parallel degree {tp}"
    return None


def _row_parts(fqn: str, cfg: ModelConfig) -> list[int] | None:
    """Widths of the fused parts along dim 0 of a tensor that tensor parallelism reorders, or None."""
    if fqn.endswith(("attn.qkv.weight", "attn.qkv.bias")):
        kv = cfg.n_kv_head * cfg.head_dim
        return [cfg.n_head * cfg.head_dim, kv, kv]
    if cfg.mlp == "swiglu" and fqn.endswith(("mlp.up.weight", "mlp.up.bias")):
        return [cfg.d_ff, cfg.d_ff]
    return None


def _shard_order(parts: list[int], tp: int) -> torch.Tensor:
    """Row indices that put each part's i-th 1/tp slice into shard i: [p0_0 p1_0 .. | p0_1 p1_1 .. | ..]."""
    starts = [sum(parts[:j]) for j in range(len(parts))]
    order = [start + i * (n // tp) + r for i in range(tp) for start, n in zip(starts, parts) for r in range(n // tp)]
    return torch.tensor(order, dtype=torch.long)


def from_canonical(fqn: str, tensor: torch.Tensor, cfg: ModelConfig, tp: int) -> torch.Tensor:
    """A whole tensor in the model's row order -> the order its column-sharded TP version uses."""
    parts = _row_parts(fqn, cfg)
    if tp == 1 or parts is None:
        return tensor
    return tensor.index_select(0, _shard_order(parts, tp).to(tensor.device))


def to_canonical(fqn: str, tensor: torch.Tensor, cfg: ModelConfig, tp: int) -> torch.Tensor:
    """Inverse of from_canonical."""
    parts = _row_parts(fqn, cfg)
    if tp == 1 or parts is None:
        return tensor
    out = torch.empty_like(tensor)
    out.index_copy_(0, _shard_order(parts, tp).to(tensor.device), tensor)
    return out


def apply_tensor_parallel(stage: torch.nn.Module, mesh: DeviceMesh, cfg: ModelConfig) -> None:
    """Shard the blocks of `stage` (a StageModule) over `mesh`, in place; names stay the same."""
    tp = mesh.size()
    if tp == 1:
        return
    for name, block in stage.blocks.items():
        with torch.no_grad():
            for sub, param_name in (("attn.qkv", "weight"), ("attn.qkv", "bias"), ("mlp.up", "weight"),
                                    ("mlp.up", "bias")):
                p = block.get_submodule(sub)._parameters.get(param_name)
                if p is not None:
                    p.copy_(from_canonical(f"blocks.{name}.{sub}.{param_name}", p, cfg, tp))
        parallelize_module(block, mesh, _PLAN)
        block.attn.n_head //= tp  # this rank's heads; the module derives its widths from them
        block.attn.n_kv_head //= tp


def full_canonical(fqn: str, tensor: torch.Tensor, cfg: ModelConfig, tp: int) -> torch.Tensor:
    """A parameter-shaped tensor (a weight, a gradient, an Adam moment) whole, in the model's order.
    A collective over the TP mesh for DTensors: every TP rank of the stage calls it in the same order."""
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return to_canonical(fqn, tensor, cfg, tp)


def local_from_canonical(fqn: str, full: torch.Tensor, like: torch.Tensor, cfg: ModelConfig, tp: int) -> torch.Tensor:
    """This rank's piece of a whole canonical tensor, laid out as `like` (a DTensor or a plain tensor).
    No communication: every rank holds `full` and takes its own shard."""
    ordered = from_canonical(fqn, full, cfg, tp)
    if isinstance(like, DTensor):
        return distribute_tensor(ordered, like.device_mesh, like.placements, src_data_rank=None).to_local()
    return ordered

"""Tensor parallelism inside a pipeline stage, Megatron style, with DTensor parameters on a DeviceMesh.

`apply_tensor_parallel(stage, mesh, cfg, ...)` shards every block of a StageModule over a 1-D
mesh of the stage's TP ranks: the fused q/k/v projection and the MLP's up projection
column-wise (weight and bias Shard(0)), the attention output projection and the MLP's down
projection row-wise (weight Shard(1), bias Replicate()), so that a block needs one all-reduce in
its forward after attention and one after the MLP, and one in its backward before each of the
two column-parallel projections. Each rank then runs n_head / tp heads (the Attention module's
head counts are set to the local share). A transformers Llama-style layer (Llama, Mistral,
Qwen2; `shard_hf_block`) is split the same way with separate q/k/v and gate/up linears
column-wise and o/down row-wise, a forward hook on each of its two norms applying `_CopyToTP` to
the input the column-parallel linears share. The embedding, final norm and head stay whole on every
TP rank (each computes them; they are small beside the blocks for the models tested here).

The parameters are DTensors (checkpoints, the optimizer, clipping and the gradient reduction
read them as such), but the layers compute on their local shards through two autograd
functions, as Megatron-LM does: `_CopyToTP` before a column-parallel linear (identity forward;
its backward starts the all-reduce of the input gradient asynchronously, lets a `window`
callback compute while it is in flight, then waits) and `_ReduceFromTP` after a row-parallel one
(all-reduce of the partial outputs; identity backward). DTensor's own layers would finish the
input-gradient all-reduce inside their backward, leaving nothing to overlap (docs/recompute.md).
With an emulated link (run.emulate_tp_link_gbytes_per_s) every all-reduce lasts at least as
long as the planner prices a ring all-reduce of its bytes on that link with no latency.

Fused projections cut into q|k|v (and gate|up for SwiGLU) would give a rank a slice that mixes
them, so their output rows are first reordered to [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], shard i
holding rank i's heads; `to_canonical` / `from_canonical` convert a whole tensor (a weight, its
gradient or its Adam moments) between that order and the model's own, which is what
checkpoints and cross-pipeline gradient exchange use. Not done: sequence parallelism and a
vocabulary-parallel embedding (the planner assumes both; see docs/pipeline.md).

This module changes modules and converts tensors; it must not create process groups, and it
communicates only through the two functions, on the TP group of the mesh (`mesh.get_group()`),
and DTensor's `full_tensor` in `full_canonical`. What runs inside a window is the caller's.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from hetrain.model.gpt import ModelConfig


class InFlight:
    """An asynchronous all-reduce (at least `deadline` long under an emulated link): calling it
    says whether it is still in flight; `ended_s()` when it ended (time.perf_counter), None while
    in flight. The end is stamped by the work's future; where the stamp is not there yet, the
    emulated deadline stands for it (no earlier than the all-reduce's start: never later than
    the real end, so time counted inside it is not overstated). On gloo the future completes
    with the all-reduce; on NCCL it completes once the collective is queued on its stream, so
    there the stamp is the launch and only the deadline (under emulation) moves the end later:
    time hidden inside a real NCCL all-reduce is understated, never overstated."""

    def __init__(self, work: dist.Work, deadline: float):
        self._work, self._deadline = work, deadline
        self._done_s: float | None = None
        work.get_future().add_done_callback(self._stamp)

    def _stamp(self, _future) -> None:
        self._done_s = time.perf_counter()

    def __call__(self) -> bool:
        return not self._work.is_completed() or time.perf_counter() < self._deadline

    def ended_s(self) -> float | None:
        if self():
            return None
        return max(self._deadline, self._done_s if self._done_s is not None else self._deadline)


Window = Callable[[int, int, str, InFlight], object]
"""window(chunk index, block position in the chunk, "mlp" or "attn", in_flight): runs inside the
backward all-reduce before that block's column-parallel linear (mlp.up's comes first in the
backward, attn.qkv's second), and should return once in_flight() is False."""


@dataclass(frozen=True)
class TPLink:
    """How a stage's two functions reach its other TP ranks."""

    group: dist.ProcessGroup
    size: int
    s_per_byte: float = 0.0
    """Emulated link (run.emulate_tp_link_gbytes_per_s): seconds per byte of each ring step; 0: off."""
    window: Window | None = None

    def all_reduce_s(self, n_bytes: int) -> float:
        """The emulated ring all-reduce of n_bytes per rank: hetrain.plan.cluster.cost.ring_allreduce_s
        with no latency (0 when not emulated)."""
        return 2 * (self.size - 1) * n_bytes / self.size * self.s_per_byte


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _hold_until(deadline: float) -> None:
    left_s = deadline - time.perf_counter()
    if left_s > 0:
        time.sleep(left_s)


class _CopyToTP(torch.autograd.Function):
    """The input of a column-parallel linear: identity forward; the backward sums the TP ranks'
    partial input gradients, computing `link.window` while the all-reduce is in flight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, link: TPLink, where: tuple[int, int, str]) -> torch.Tensor:
        ctx.link, ctx.where = link, where
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        link = ctx.link
        grad = grad.contiguous()  # reduced in place: this backward's own buffer, read by nobody else
        deadline = time.perf_counter() + link.all_reduce_s(_bytes(grad))
        work = dist.all_reduce(grad, group=link.group, async_op=True)
        if link.window is not None:
            link.window(*ctx.where, InFlight(work, deadline))
        work.wait()
        _hold_until(deadline)
        return grad, None, None


class _ReduceFromTP(torch.autograd.Function):
    """The output of a row-parallel linear: the sum of the TP ranks' partial outputs; identity backward."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, link: TPLink) -> torch.Tensor:
        deadline = time.perf_counter() + link.all_reduce_s(_bytes(partial))
        dist.all_reduce(partial, group=link.group)  # in place: the linear's output, read by nobody else
        _hold_until(deadline)
        ctx.mark_dirty(partial)
        return partial

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _column_forward(module: nn.Linear, link: TPLink, where: tuple[int, int, str] | None, x: torch.Tensor) -> torch.Tensor:
    # module.weight at call time: hetrain.precision.WeightCopies may have put a bf16 copy there.
    bias = module.bias
    if where is not None:
        x = _CopyToTP.apply(x, link, where)
    return F.linear(x, module.weight.to_local(), None if bias is None else bias.to_local())  # (B, T, out / tp)


def _row_forward(module: nn.Linear, link: TPLink, x: torch.Tensor) -> torch.Tensor:
    out = _ReduceFromTP.apply(F.linear(x, module.weight.to_local()), link)  # (B, T, out), whole
    return out if module.bias is None else out + module.bias.to_local()


def _distribute(module: nn.Linear, mesh: DeviceMesh, placements: dict[str, list], src_data_rank: int | None) -> None:
    """Replace the module's parameters by DTensors (src_data_rank None: no communication, every
    rank takes its shard from the whole tensor it holds)."""
    for name, placement in placements.items():
        p = module._parameters.get(name)
        if p is not None:
            shards = distribute_tensor(p.detach(), mesh, placement, src_data_rank=src_data_rank)
            module.register_parameter(name, nn.Parameter(shards, requires_grad=p.requires_grad))


class ColumnParallel(ParallelStyle):
    """An nn.Linear split by output rows: weight and bias Shard(0), the input gradient all-reduced
    in the backward (with a window); its output is this rank's columns, a plain tensor. `where`
    None: the input is already behind a _CopyToTP shared with other linears (q, k, v)."""

    def __init__(self, link: TPLink, where: tuple[int, int, str] | None):
        self.link, self.where = link, where

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _distribute(module, device_mesh, {"weight": [Shard(0)], "bias": [Shard(0)]}, self.src_data_rank)
        module.forward = functools.partial(_column_forward, module, self.link, self.where)
        return module


class RowParallel(ParallelStyle):
    """An nn.Linear split by input columns: weight Shard(1), bias Replicate(), the output
    all-reduced in the forward; its output is whole on every rank, a plain tensor."""

    def __init__(self, link: TPLink):
        self.link = link

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _distribute(module, device_mesh, {"weight": [Shard(1)], "bias": [Replicate()]}, self.src_data_rank)
        module.forward = functools.partial(_row_forward, module, self.link)
        return module


HF_COLUMNS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
HF_ROWS = ("self_attn.o_proj", "mlp.down_proj")
HF_NORMS = (("input_layernorm", "attn"), ("post_attention_layernorm", "mlp"))


def check_hf_tp(config, tp: int) -> str | None:
    """Why a transformers model (its config) cannot be split tp ways (a message), or None.
    Llama-style layers (Llama, Mistral, Qwen2: separate q/k/v/o and gate/up/down linears, a norm
    before each half) are split; fused projections (GPT-2, GPT-NeoX) are not."""
    import transformers

    from hetrain.model.hf_describe import LLAMA_LIKE, TP_MIN_TRANSFORMERS, transformers_splits_heads

    if not transformers_splits_heads():
        return (f"tensor parallelism of transformers models needs transformers >= {TP_MIN_TRANSFORMERS} "
                f"(installed: {transformers.__version__}); upgrade it, or plan without tensor parallelism")
    family = getattr(config, "model_type", "")
    if family not in LLAMA_LIKE:
        return (f"tensor parallelism splits transformers models of types {', '.join(LLAMA_LIKE)} (separate "
                f"q/k/v/o and gate/up/down projections); this model is '{family}'")
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        n = getattr(config, name, None)
        if n is not None and n % tp:
            return f"the model's {name}={n} is not divisible by the tensor-parallel degree {tp}"
    if getattr(config, "attention_dropout", 0.0):
        return (f"attention_dropout={config.attention_dropout} with tensor parallelism: each rank would draw its own "
                f"masks for its heads, so the run would not train the one-process model")
    return None


def _submodule(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def shard_hf_block(block: nn.Module, mesh: DeviceMesh, link: TPLink, where: tuple[int, int]) -> None:
    """Shard a Llama-style transformers decoder layer (check_hf_tp) in place: q, k, v, gate and up
    column-wise, o and down row-wise; one _CopyToTP on each norm's output, which its column-parallel
    linears share. The attention derives its local head count from the sharded widths (transformers
    views q/k/v as (..., -1, head_dim)); no rows are reordered, so the canonical order is the model's."""
    missing = [n for n in (*HF_COLUMNS, *HF_ROWS) if not isinstance(_submodule(block, n), nn.Linear)]
    missing += [n for n, _ in HF_NORMS if _submodule(block, n) is None]
    if missing:
        raise ValueError(f"{type(block).__name__} is not a Llama-style layer: no nn.Linear or norm at {missing[0]}")
    plan = {name: ColumnParallel(link, None) for name in HF_COLUMNS}
    plan.update({name: RowParallel(link) for name in HF_ROWS})
    parallelize_module(block, mesh, plan, src_data_rank=None)
    for norm, side in HF_NORMS:
        block.get_submodule(norm).register_forward_hook(
            lambda _module, _args, out, side=side: _CopyToTP.apply(out, link, (*where, side)))


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


def apply_tensor_parallel(stage: torch.nn.Module, mesh: DeviceMesh, cfg: ModelConfig, link_gbytes_per_s: float = 0.0,
                          window: Window | None = None) -> None:
    """Shard the blocks of `stage` (a StageModule) over `mesh`, in place; names stay the same.
    link_gbytes_per_s > 0 emulates a TP link of that bandwidth; `window` runs inside each
    backward all-reduce before a column-parallel linear, told the chunk's index and the block's
    position among the chunk's blocks."""
    tp = mesh.size()
    if tp == 1:
        return
    link = TPLink(mesh.get_group(), tp, 1e-9 / link_gbytes_per_s if link_gbytes_per_s > 0 else 0.0, window)
    if not isinstance(stage.blocks, nn.ModuleDict):  # a transformers model's layers (HFStageModule)
        for position, block in enumerate(stage.blocks):
            shard_hf_block(block, mesh, link, (stage.chunk.index, position))
        return
    for position, (name, block) in enumerate(stage.blocks.items()):
        with torch.no_grad():
            for sub, param_name in (("attn.qkv", "weight"), ("attn.qkv", "bias"), ("mlp.up", "weight"),
                                    ("mlp.up", "bias")):
                p = block.get_submodule(sub)._parameters.get(param_name)
                if p is not None:
                    p.copy_(from_canonical(f"blocks.{name}.{sub}.{param_name}", p, cfg, tp))
        shard_block(block, mesh, link, (stage.chunk.index, position))


def shard_block(block: torch.nn.Module, mesh: DeviceMesh, link: TPLink, where: tuple[int, int]) -> None:
    """Shard one Block whose fused rows are already in shard order (from_canonical); `where` =
    (chunk index, position of the block in the chunk), what the block's windows are told."""
    parallelize_module(block, mesh, {"attn.qkv": ColumnParallel(link, (*where, "attn")), "attn.proj": RowParallel(link),
                                     "mlp.up": ColumnParallel(link, (*where, "mlp")), "mlp.down": RowParallel(link)},
                       src_data_rank=None)  # every rank built the same whole model: no broadcast
    block.attn.n_head //= mesh.size()  # this rank's heads; the module derives its widths from them
    block.attn.n_kv_head //= mesh.size()


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

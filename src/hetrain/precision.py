"""Mixed precision for the runtimes that keep a model's weights on its device (train.dtype bf16).

The fp32 parameters are the masters: the optimizer updates them, checkpoints save them, and
gradients accumulate into their fp32 `.grad`. The forward reads **one bf16 copy of the weights
per step** (`WeightCopies`): made at the step's first forward, shared by every micro-batch of the
step, their backwards and their recomputations, and dropped after the step (before the
optimizer changes the masters). Autograd casts each micro-batch's weight gradient back to fp32
as it accumulates, so accumulation is in fp32. Operations run under torch.autocast
(`autocast`): matmuls in bf16, the loss and what autocast keeps in fp32 in fp32. The residual
stream, and so the activations between pipeline stages, are bf16 (the embedding reads bf16
weights).

That is what the planners price for a bf16 plan (Megatron-style mixed precision): 2-byte
activations and stage boundaries, and one 2-byte copy of the weights beside fp32 masters,
gradients and AdamW state (hetrain.predict.state_bytes). Autocast alone over fp32 weights would
cast every weight again in each micro-batch's forward and keep each micro-batch's copies saved
until its backward: 1F1B's S - s micro-batches in flight on stage s would hold S - s copies.

Under ZeRO-1 in bf16 (hetrain.pipeline.data_parallel.ShardedUpdate) a replica keeps the fp32
masters of its own share only; for the rest it holds persistent bf16 weights that the owners
broadcast after each step, and `WeightCopies.held` gives those as the step's copies (the same
bits as casting the owner's master): the forward reads them and the gradient still reaches the
fp32 parameter, whose storage is freed, as an fp32 `.grad`.

Used by the one-process trainer and the pipeline runtime; the offload engine streams its own
bf16 weights. This module casts and swaps tensors; it must not communicate or step an optimizer.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.nn.utils.stateless import _reparametrize_module


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast in `dtype` on the device's type (nothing for None: fp32). torch's
    checkpoint recomputes under the autocast state of the forward, so recomputation matches."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class _HeldCopy(torch.autograd.Function):
    """`held` (the compute-dtype weights of `master`, kept elsewhere than in `master`) as the copy the
    forward reads, with the backward of `master.to(dtype)`: the gradient cast to the master's dtype
    reaches `master`, whose data is never read (it may have no storage)."""

    @staticmethod
    def forward(ctx, master: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
        ctx.master_dtype = master.dtype
        return held.view_as(held)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.master_dtype), None


class WeightCopies:
    """A module's floating-point parameters as `dtype` copies, made once per step.

    `active()` puts the copies in the parameters' places for the code inside it (torch's
    reparametrisation, as torch.func.functional_call does; the module's own parameters are back
    outside it): run each forward, backward and recomputation of the step inside it. The copies
    are made at the first `active()` after `release()`, under the grad mode of that moment, so
    call `release()` after every step and every evaluation. A matrix tied under two names gets
    one copy. With dtype None (fp32 training) `active()` does nothing. A parameter whose id is in
    `held` is not cast: its copy is that held `dtype` tensor (ZeRO-1's, updated in place between
    steps), and its gradient still accumulates into the parameter's fp32 `.grad`."""

    def __init__(self, module: nn.Module, dtype: torch.dtype | None):
        self.module, self.dtype = module, dtype
        self.held: dict[int, torch.Tensor] = {}
        self._copies: dict[str, torch.Tensor] | None = None
        self._depth = 0

    @contextlib.contextmanager
    def active(self):
        if self.dtype is None or self._depth:  # fp32, or already inside (a recomputation in a backward)
            yield
            return
        self.make()
        self._depth += 1
        try:
            with _reparametrize_module(self.module, self._copies):
                yield
        finally:
            self._depth -= 1

    def make(self) -> None:
        """Make the step's copies now if they are not made (`active()` does it when needed)."""
        if self.dtype is None or self._copies is not None:
            return
        by_id: dict[int, torch.Tensor] = {}
        copies = {}
        for name, p in self.module.named_parameters(remove_duplicate=False):
            if p.is_floating_point():
                if id(p) not in by_id:  # a tied matrix is cast once
                    held = self.held.get(id(p))
                    by_id[id(p)] = p.to(self.dtype) if held is None else _HeldCopy.apply(p, held)
                copies[name] = by_id[id(p)]
        self._copies = copies

    def release(self) -> None:
        """Drop the copies (their graph goes with the last backward that used them)."""
        self._copies = None

    def tensors(self) -> list[torch.Tensor]:
        """The copies made for this step (a tied matrix's once); [] when released."""
        return list({id(t): t for t in (self._copies or {}).values()}.values())

    @property
    def bytes(self) -> int:
        """Bytes the copies hold now (0 when released)."""
        return sum(_local(t).numel() * _local(t).element_size() for t in self.tensors())


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t

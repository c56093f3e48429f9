"""Activations on the device: recomputation of chosen blocks, and the ledger of device bytes.

`apply_recompute(blocks, indices)` makes those blocks run their forward under
torch.utils.checkpoint (non-reentrant): autograd keeps only each block's inputs, and the
block's own forward runs again when backward reaches it. It overrides `forward` on the block
instances only (the class, the other blocks and every parameter name stay as they were), and
`RecomputeHandle.remove()` restores them. It must not change what a block computes, and it
knows nothing of where weights live: the caller makes a block's weights available for its
forward and again before its backward, when the recomputation reads them. Random state is
preserved across the recomputation (torch's default), so dropout would recompute the same
mask.

`DeviceLedger` counts what the offload engine holds on its device. It lives here because the
part of that count that needs care is activations: tensors saved for backward (saved-tensor
hooks) and the tensors a recomputed block holds during its backward. It only counts; it
never frees or moves anything. `LayerActivations` keeps that count cheap: a saved-tensor hook
costs ~20 us of Python per tensor, which a short step notices, so the first micro-batch of
each shape is counted tensor by tensor and later ones a layer at a time from that measurement.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from hetrain.units import fmt_bytes


class _Timed(contextlib.AbstractContextManager):
    """The recompute context: reports (block index, start_s, end_s) of each recomputation."""

    def __init__(self, index: int, report: Callable[[int, float, float], None]):
        self.index, self.report, self.start_s = index, report, 0.0

    def __enter__(self):
        self.start_s = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.report(self.index, self.start_s, time.perf_counter())


def _checkpointed_forward(original: Callable, context_fn: Callable, *args, **kwargs):
    return checkpoint(original, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


class RecomputeHandle:
    """The blocks whose forward was wrapped; `remove()` gives them their own forward back."""

    def __init__(self, blocks: list[nn.Module]):
        self.blocks = blocks

    def remove(self) -> None:
        for block in self.blocks:
            block.__dict__.pop("forward", None)
        self.blocks = []


def apply_recompute(blocks: nn.ModuleList, indices: Iterable[int],
                    on_recompute: Callable[[int, float, float], None] | None = None) -> RecomputeHandle:
    """Recompute the activations of `blocks[i]` for i in `indices` in backward.

    `on_recompute(i, start_s, end_s)`, if given, is called after each recomputation of block i
    (perf_counter seconds), for tracing.
    """
    wrapped = []
    for i in indices:
        block = blocks[i]
        if "forward" in block.__dict__:
            raise ValueError(f"block {i} already has its forward replaced; apply recomputation once")
        if on_recompute is None:
            context_fn = _noop_contexts
        else:
            context_fn = functools.partial(_timed_contexts, i, on_recompute)
        block.forward = functools.partial(_checkpointed_forward, block.forward, context_fn)
        wrapped.append(block)
    return RecomputeHandle(wrapped)


def _noop_contexts():
    return contextlib.nullcontext(), contextlib.nullcontext()


def _timed_contexts(index: int, report: Callable[[int, float, float], None]):
    return contextlib.nullcontext(), _Timed(index, report)


class DeviceBudgetError(RuntimeError):
    """The engine would hold more device bytes than the plan's budget."""


class _Saved:
    """What the pack hook stores for a saved tensor; its death releases the counted bytes."""

    __slots__ = ("tensor", "key", "owner")

    def __init__(self, tensor: torch.Tensor, key: int | None, owner: "DeviceLedger | None"):
        # A detached alias: holding the tensor itself would tie an op's saved output to its own
        # grad_fn, a reference cycle through C++ that is never freed.
        self.tensor, self.key, self.owner = tensor.detach(), key, owner

    def get(self) -> torch.Tensor:
        return self.tensor

    def __del__(self):
        if self.owner is not None:
            self.owner._release(self.key)


class DeviceLedger:
    """Bytes the engine holds on its device, by category, with the peak; raises
    DeviceBudgetError the moment the total passes the budget.

    Categories: params (resident compute weights, device masters, model buffers),
    weight_buffers (the streaming pool), optimizer (Adam state on the device), grads (a
    native layer's from the start of its backward), activations (tensors saved for backward,
    counted by saved-tensor hooks as hetrain.memory does, deduplicated by storage and released
    when autograd frees them; or a layer at a time by LayerActivations) and recompute (a
    recomputed block's saved tensors, held from the start of its backward to its end: they
    are saved inside torch.utils.checkpoint's own hooks, so their size comes from the model
    description, which tests check against the measured bytes). Tensors saved out of a
    weight buffer are not activations: `streamer.saved_ref` turns them into references.
    """

    CATEGORIES = ("params", "weight_buffers", "optimizer", "grads", "activations", "recompute")

    def __init__(self, budget_bytes: int | None, device: torch.device, streamer=None):
        self.budget_bytes, self.device, self.streamer = budget_bytes, device, streamer
        self.bytes = dict.fromkeys(self.CATEGORIES, 0)
        self.current_bytes = 0
        self.peak_bytes = 0
        self.state_ptrs: set[int] = set()  # storages counted as params: saved without counting
        self._saved: dict[int, list[int]] = {}  # storage ptr -> [refcount, nbytes]

    def add(self, category: str, nbytes: int, doing: str) -> None:
        self.bytes[category] += nbytes
        self.current_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        if self.budget_bytes is not None and self.current_bytes > self.budget_bytes:
            held = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.bytes.items() if v)
            raise DeviceBudgetError(
                f"the offload engine would hold {fmt_bytes(self.current_bytes)} on {self.device} while {doing}, over "
                f"the plan's device budget of {fmt_bytes(self.budget_bytes)} ({held}); plan again for this budget and "
                f"batch shape (hetrain plan), or recompute or stream more blocks")

    def sub(self, category: str, nbytes: int) -> None:
        self.bytes[category] -= nbytes
        self.current_bytes -= nbytes

    def reset_peak(self) -> None:
        self.peak_bytes = self.current_bytes

    # --- saved tensors -------------------------------------------------------------------
    def _pack(self, t: torch.Tensor):
        if t.device.type != self.device.type or t.device.type == "meta":
            return _Saved(t, None, None)
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.state_ptrs:
            return _Saved(t, None, None)
        ref = self.streamer.saved_ref(t) if self.streamer is not None else None
        if ref is not None:
            return ref
        entry = self._saved.get(ptr)
        if entry is None:
            nbytes = t.untyped_storage().nbytes()
            self._saved[ptr] = [1, nbytes]
            self.add("activations", nbytes, "saving activations for backward")
        else:
            entry[0] += 1
        return _Saved(t, ptr, self)

    @staticmethod
    def _unpack(saved) -> torch.Tensor:
        return saved.get()

    def _release(self, ptr: int) -> None:
        entry = self._saved.get(ptr)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self._saved[ptr]
            self.sub("activations", entry[1])

    def saving(self):
        """Count tensors saved for backward inside this block until autograd frees them."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)


class LayerActivations:
    """The activations a micro-batch saves, counted tensor by tensor or a layer at a time.

    The first micro-batch of each shape (`key`: the inputs' shapes, dtypes and aliasing) runs
    under the ledger's saved-tensor hooks, and the bytes first counted during each layer's
    forward are noted (the loss scaling after the head counts as the head's). Later
    micro-batches of that shape run without hooks: each layer's measured bytes are added when
    its forward ends and taken away when its backward ends (the whole remainder when backward returns). The forward is counted exactly
    at every layer boundary; in backward a layer's bytes are held until its backward is over,
    where autograd frees them op by op, so the count is an upper bound there, never below what
    the hooks count. A tensor counted in layer i is only saved by layers i and later, so layer
    i's backward, the last of those, is the latest it can be freed. `per_tensor=True` keeps
    the hooks on for every micro-batch: the engine needs them when weights are streamed, to
    turn tensors saved out of a weight buffer into references.
    """

    def __init__(self, ledger: DeviceLedger, n_layers: int, per_tensor: bool):
        self.ledger, self.n_layers, self.per_tensor = ledger, n_layers, per_tensor
        self.by_shape: dict[tuple, list[int]] = {}
        """Per-layer saved bytes by micro-batch key (key())."""
        self._key: tuple = ()
        self._replay: list[int] | None = None
        self._marks: list[int] | None = None
        self._held: dict[int, int] = {}

    @staticmethod
    def key(x: torch.Tensor, y: torch.Tensor | None) -> tuple:
        """What the saved bytes of a micro-batch depend on besides the model: the shapes and
        dtypes of its inputs and whether they share a storage (then it is saved once)."""
        if y is None:
            return (tuple(x.shape), x.dtype)
        shared = x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
        return (tuple(x.shape), x.dtype, tuple(y.shape), y.dtype, shared)

    def micro_batch(self, key: tuple):
        """The counting context of one micro-batch's forward and backward; `key` is key(x, y)."""
        self._key = key
        self._replay = None if self.per_tensor else self.by_shape.get(key)
        if self._replay is not None:
            return contextlib.nullcontext()
        self._marks = [self.ledger.bytes["activations"]] if key not in self.by_shape else None
        return self.ledger.saving()

    def forward_done(self, index: int, name: str) -> None:
        """Layer `index` finished its forward with autograd recording."""
        if self._replay is not None:
            self._held[index] = self._replay[index]
            self.ledger.add("activations", self._replay[index], f"saving activations of {name}")
        elif self._marks is not None:
            self._marks.append(self.ledger.bytes["activations"])

    def backward_starts(self) -> None:
        """The loss is ready: whatever was saved since the head's forward is the head's."""
        if self._marks is not None and len(self._marks) == self.n_layers + 1:
            self._marks[-1] = self.ledger.bytes["activations"]

    def backward_done(self, index: int) -> None:
        """Layer `index` finished its backward."""
        nbytes = self._held.pop(index, None)
        if nbytes is not None:
            self.ledger.sub("activations", nbytes)

    def micro_batch_done(self) -> None:
        """Backward returned: nothing it saved is held any more."""
        for index in list(self._held):
            self.backward_done(index)
        if self._marks is not None and len(self._marks) == self.n_layers + 1:
            self.by_shape[self._key] = [b - a for a, b in zip(self._marks, self._marks[1:])]
        self._replay = self._marks = None

"""Exact accounting of the bytes a training step holds on its device.

On a GPU the caching allocator tells the peak; on CPU nothing does, so hetrain counts what
it is responsible for: parameters (and buffers), gradients, optimizer state, and tensors
saved for backward (through saved-tensor hooks, deduplicated by storage, released when
autograd frees them). The trainer reports this peak as `peak_device_bytes` on CPU, and the
offload engine enforces the same count as a device budget. This module only counts; it never
moves or frees anything, and it keeps no global state: every hook it registers is removed
by `close()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn


def storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (t.device.type, t.untyped_storage().data_ptr())


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one storage count once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            seen[storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


class _Saved:
    """What the pack hook stores in place of a saved tensor; its death releases the bytes."""

    __slots__ = ("tensor", "key", "owner")

    def __init__(self, tensor: torch.Tensor, key, owner: "MemoryAccountant | None"):
        # Keep a detached alias: holding the tensor itself would tie an op's saved output to
        # its own grad_fn, a reference cycle through C++ that is never freed.
        self.tensor, self.key, self.owner = tensor.detach(), key, owner

    def __del__(self):
        if self.owner is not None:
            self.owner._release(self.key)


class MemoryAccountant:
    """Tracks current and peak accounted bytes: state + gradients + saved activations.

    Usage per step: wrap forward and backward in `with acct.track_activations():`, call
    `acct.after_optimizer_step(optimizer)` after `optimizer.step()` and `acct.grads_cleared()`
    after `zero_grad(set_to_none=True)`. `reset_peak()` starts a new measurement window.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 also_state: tuple[torch.Tensor, ...] | list[torch.Tensor] = ()):
        """`also_state`: tensors that are not the model's but are counted elsewhere, so saving
        them is not an activation (the profiler's per-batch extras of a block)."""
        self.model = model
        self._state_keys = {storage_key(t) for t in (*model.parameters(), *model.buffers(), *also_state)}
        self.param_bytes = tensor_bytes([*model.parameters(), *model.buffers()])
        self.optimizer_bytes = self._optimizer_bytes(optimizer) if optimizer is not None else 0
        self.grad_bytes = 0
        self.act_bytes = 0
        self._saved_refs: dict[tuple[str, int], list[int]] = {}  # key -> [refcount, nbytes]
        self._grad_seen: set[int] = set()
        self._handles = [
            p.register_post_accumulate_grad_hook(self._on_grad) for p in model.parameters() if p.requires_grad
        ]
        self.peak_bytes = self.current_bytes

    @property
    def current_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.act_bytes

    def _bump(self) -> None:
        cur = self.current_bytes
        if cur > self.peak_bytes:
            self.peak_bytes = cur

    def reset_peak(self) -> None:
        self.peak_bytes = self.current_bytes

    # --- saved activations ---------------------------------------------------------------
    def _pack(self, t: torch.Tensor):
        key = storage_key(t)
        if key in self._state_keys or t.device.type == "meta":
            return _Saved(t, key, None)  # a parameter or buffer: already counted as state
        ref = self._saved_refs.get(key)
        if ref is None:
            self._saved_refs[key] = [1, t.untyped_storage().nbytes()]
            self.act_bytes += t.untyped_storage().nbytes()
            self._bump()
        else:
            ref[0] += 1
        return _Saved(t, key, self)

    @staticmethod
    def _unpack(saved: _Saved) -> torch.Tensor:
        return saved.tensor

    def _release(self, key) -> None:
        ref = self._saved_refs.get(key)
        if ref is None:
            return
        ref[0] -= 1
        if ref[0] == 0:
            del self._saved_refs[key]
            self.act_bytes -= ref[1]

    @contextlib.contextmanager
    def track_activations(self) -> Iterator[None]:
        """Count tensors saved for backward inside this block until autograd frees them."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield

    # --- gradients and optimizer state ---------------------------------------------------
    def _on_grad(self, p: torch.Tensor) -> None:
        if id(p) not in self._grad_seen and p.grad is not None:
            self._grad_seen.add(id(p))
            self.grad_bytes += p.grad.untyped_storage().nbytes()
            self._bump()

    def grads_cleared(self) -> None:
        self._grad_seen.clear()
        self.grad_bytes = 0

    @staticmethod
    def _optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
        return tensor_bytes(t for state in optimizer.state.values() for t in state.values())

    def after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Optimizer state is allocated lazily at the first step, while gradients are held.
        self.optimizer_bytes = self._optimizer_bytes(optimizer)
        self._bump()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

"""Weights of managed layers: one flat tensor per layer, resident on the device or streamed.

A layer the engine manages (any layer that is not plain fp32 parameters on the device) keeps
its parameters as one flat compute-dtype tensor, `FlatWeights.param`: the autograd leaf whose
gradient is the layer's whole gradient in one piece. The module attributes (`attn.qkv.weight`,
...) become views of it, made again before every use so each forward builds its own graph
(`ModelLayout` knows which modules hold which parameter, a tied matrix included). A resident
flat lives on the device for good. A streamed flat lives in host memory (`host_store`, pinned
on CUDA) and is copied into one of a few preallocated device buffers before each forward and
backward use (`WeightStreamer`): on a copy stream with events on CUDA, as a plain tensor copy
on CPU (the CPU "device" is the same memory, so the copy is real and its buffer is counted).
Tensors autograd saves out of a buffer are saved as references (layer, offset, shape) and
resolved in backward wherever the layer was fetched then. `DeviceMaster` holds the fp32 master
and gradient of a layer whose optimizer runs on the device. This module places, views, moves
and tracks weights; it must not run an optimizer or decide placement.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

ALIGN_ELEMENTS = 16  # each parameter starts 64-byte aligned in an fp32 flat, as a fresh tensor does


@dataclass(frozen=True)
class ParamSlot:
    """Where one parameter lives inside its layer's flat tensors (compute, master, gradient)."""

    fqn: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def flat_layout(named: list[tuple[str, torch.Tensor]]) -> tuple[list[ParamSlot], int]:
    """Slots for `named` parameters packed in order with aligned offsets, and the flat length."""
    slots, offset = [], 0
    for fqn, p in named:
        slots.append(ParamSlot(fqn, tuple(p.shape), offset))
        offset = -(-(offset + p.numel()) // ALIGN_ELEMENTS) * ALIGN_ELEMENTS
    return slots, offset


def slot_views(flat: torch.Tensor, slots: list[ParamSlot]) -> list[torch.Tensor]:
    """Plain views of `flat` shaped like the parameters (for masters, gradients, stores)."""
    return [flat[s.offset:s.offset + s.numel].view(s.shape) for s in slots]


def host_empty(numel: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    return torch.zeros(numel, dtype=dtype, pin_memory=pin)


class Landing:
    """Whether the latest write to a tensor has landed: a threading.Event for the thread that
    wrote it and, on CUDA, the event recorded after the write on the writing stream."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._done.set()
        self._cuda_event = None

    def begin(self) -> None:
        self._done.clear()

    def land(self, cuda_event=None) -> None:
        self._cuda_event = cuda_event
        self._done.set()

    def landed(self) -> bool:
        return self._done.is_set()

    def wait(self, stream=None, poll: Callable[[], None] | None = None) -> None:
        """Block until landed (calling `poll` while waiting, to surface a dead writer); then make
        `stream` wait for the writer's copy on CUDA."""
        while not self._done.wait(timeout=0.05):
            if poll is not None:
                poll()
        if stream is not None and self._cuda_event is not None:
            stream.wait_event(self._cuda_event)


def copy_async(dst: torch.Tensor, src: torch.Tensor, stream=None, after=None):
    """dst <- src; on CUDA on `stream` after the events in `after`, returning the done event."""
    if stream is None:
        with torch.no_grad():
            dst.copy_(src)
        return None
    with torch.cuda.stream(stream), torch.no_grad():
        for event in after or ():
            if event is not None:
                stream.wait_event(event)
        dst.copy_(src, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    return done


class FlatWeights:
    """One managed layer's parameters as a flat compute-dtype leaf, with module bindings."""

    def __init__(self, name: str, named: list[tuple[str, torch.Tensor]], dtype: torch.dtype,
                 device: torch.device, streamed: bool):
        self.name, self.dtype, self.device, self.streamed = name, dtype, device, streamed
        self.slots, self.numel = flat_layout(named)
        pieces, self.piece_of_slot, cursor = [], [], 0
        for s in self.slots:  # padding between parameters becomes pieces no view uses
            if s.offset > cursor:
                pieces.append(s.offset - cursor)
            self.piece_of_slot.append(len(pieces))
            pieces.append(s.numel)
            cursor = s.offset + s.numel
        if self.numel > cursor:
            pieces.append(self.numel - cursor)
        self.split_sizes = pieces
        self.landing = Landing()  # resident: the device copy; streamed: the host store
        self.host_store: torch.Tensor | None = None
        self._placeholder = torch.empty(1, dtype=dtype, device=device).expand(self.numel)
        data = self._placeholder if streamed else torch.zeros(self.numel, dtype=dtype, device=device)
        self.param = nn.Parameter(data, requires_grad=True)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def materialized(self) -> bool:
        return not self.streamed or self.param.data.stride() != (0,)

    def point_at(self, region: torch.Tensor | None) -> None:
        """Streamed flats only: make the leaf use `region` of a buffer, or nothing (None)."""
        self.param.data = self._placeholder if region is None else region

    def views(self) -> list[torch.Tensor]:
        """Views of the leaf shaped like the parameters, recording autograd edges to it."""
        if not self.materialized():
            raise RuntimeError(f"internal error: weights of {self.name} used while not fetched to the device")
        with torch.enable_grad():
            pieces = torch.split(self.param, self.split_sizes)
            return [pieces[j].view(s.shape) for j, s in zip(self.piece_of_slot, self.slots)]


class DeviceMaster:
    """The fp32 master of a managed layer whose optimizer runs on the device, with its fp32
    gradient accumulator; `refresh` writes the master into the compute copy forward reads."""

    def __init__(self, flat: FlatWeights, values: list[torch.Tensor], device: torch.device):
        self.flat = flat
        self.master = torch.zeros(flat.numel, dtype=torch.float32, device=device)
        self.views = slot_views(self.master, flat.slots)
        with torch.no_grad():
            for view, value in zip(self.views, values):
                view.copy_(value)
        self.grad: torch.Tensor | None = None

    def accumulate(self, g: torch.Tensor, first: bool) -> int:
        """Add one micro-batch's flat gradient; returns the bytes newly allocated for the sum."""
        with torch.no_grad():
            if not first:
                self.grad.add_(g)
                return 0
            self.grad = torch.empty_like(self.master)
            self.grad.copy_(g)
        for view, grad in zip(self.views, slot_views(self.grad, self.flat.slots)):
            view.grad = grad
        return self.grad.nbytes

    def zero_grad(self) -> int:
        """Drop the gradient; returns the bytes freed."""
        freed = self.grad.nbytes if self.grad is not None else 0
        self.grad = None
        for view in self.views:
            view.grad = None
        return freed

    def refresh(self, d2h_stream=None, after_streams=()) -> None:
        """Master -> the resident compute flat, or -> the host store of a streamed one; on CUDA
        the copy waits for `after_streams` (the optimizer's stream, and the copy stream whose
        fetches may still read the store)."""
        if self.flat.streamed:
            for stream in after_streams if d2h_stream is not None else ():
                d2h_stream.wait_stream(stream)
            self.flat.landing.land(copy_async(self.flat.host_store, self.master, d2h_stream))
        else:
            with torch.no_grad():
                self.flat.param.data.copy_(self.master)


class ModelLayout:
    """Which layer owns each parameter, and every module attribute that holds it (a tied
    matrix is held by the embedding and by the head). `layer_of` maps a module's qualified
    name to its layer index; a parameter belongs to the layer of its first holder."""

    def __init__(self, model: nn.Module, layer_of: Callable[[str], int]):
        self.homes: dict[int, list[tuple[nn.Module, str, int]]] = {}
        for module_name, module in model.named_modules():
            for attr, p in module._parameters.items():
                if p is not None:
                    self.homes.setdefault(id(p), []).append((module, attr, layer_of(module_name)))
        self.params = dict(model.named_parameters())
        self.name_of = {id(p): name for name, p in self.params.items()}
        self.owner = {pid: places[0][2] for pid, places in self.homes.items()}
        # state_dict keys -> parameter names (a tied matrix has two keys)
        self.aliases = {key: self.name_of[id(t)] for key, t in model.state_dict(keep_vars=True).items()
                        if id(t) in self.name_of}

    def owned(self, layer: int) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in self.params.items() if self.owner[id(p)] == layer]

    def read_by(self, layer: int) -> list[tuple[int, nn.Module, str]]:
        """(parameter id, module, attribute) for every parameter attribute inside `layer`."""
        return [(pid, module, attr) for pid, places in self.homes.items() for module, attr, where in places
                if where == layer]

    def take(self, p: nn.Parameter) -> None:
        """Unregister `p` from every module that holds it (views will stand in for it)."""
        for module, attr, _ in self.homes[id(p)]:
            del module._parameters[attr]

    def give_back(self, p: nn.Parameter) -> None:
        for module, attr, _ in self.homes[id(p)]:
            module.__dict__.pop(attr, None)
            module._parameters[attr] = p


@dataclass
class Binding:
    """A module attribute that shows one slot of a flat (a layer's own or a borrowed one)."""

    module: nn.Module
    attr: str
    flat: FlatWeights
    slot: int


def install(bindings: list[Binding]) -> None:
    """Point module attributes at fresh views of their flats (one split per flat)."""
    views: dict[int, list[torch.Tensor]] = {}
    for b in bindings:
        if id(b.flat) not in views:
            views[id(b.flat)] = b.flat.views()
        setattr(b.module, b.attr, views[id(b.flat)][b.slot])


def uninstall(bindings: list[Binding]) -> None:
    """Remove the views, so a forward that skipped its fetch fails loudly instead of reading
    a stale buffer."""
    for b in bindings:
        b.module.__dict__.pop(b.attr, None)


class _StreamedRef:
    """A saved tensor that lives in a weight buffer: resolved in backward to the layer's
    buffer of that moment, so the buffer can serve other layers in between."""

    __slots__ = ("flat", "size", "stride", "offset")

    def __init__(self, flat: FlatWeights, t: torch.Tensor):
        self.flat, self.size, self.stride, self.offset = flat, t.size(), t.stride(), t.storage_offset()

    def get(self) -> torch.Tensor:
        if not self.flat.materialized():
            raise RuntimeError(f"internal error: backward of {self.flat.name} ran before its weights were fetched")
        return self.flat.param.detach().as_strided(self.size, self.stride, self.offset)


class WeightStreamer:
    """A pool of device buffers that streamed flats are fetched into, least recently used out.

    `acquire(flats)` makes them resident and holds them (fetching on demand, waiting for the
    host store's update to land); `release(flats)` drops the hold but leaves the contents
    cached, so the head's backward right after its forward fetches nothing; `prefetch(flat)`
    fetches ahead into a buffer that nothing holds; `invalidate()` forgets cached contents
    once their host stores are being updated.
    """

    def __init__(self, flats: list[FlatWeights], n_buffers: int, device: torch.device,
                 h2d_stream=None, poll: Callable[[], None] | None = None, on_copy=None):
        self.device, self.h2d, self.poll, self.on_copy = device, h2d_stream, poll, on_copy
        self.flats = flats
        buffer_numel = max((f.numel for f in flats), default=0)
        dtype = flats[0].dtype if flats else torch.float32
        self.buffers = [torch.empty(buffer_numel, dtype=dtype, device=device) for _ in range(n_buffers if flats else 0)]
        self.buffer_bytes = buffer_numel * dtype.itemsize
        self._ptr_to_buffer = {b.untyped_storage().data_ptr(): i for i, b in enumerate(self.buffers)}
        self._occupant: list[FlatWeights | None] = [None] * len(self.buffers)
        self._holds = [0] * len(self.buffers)
        self._free_event = [None] * len(self.buffers)   # compute stream done with the buffer
        self._ready_event = [None] * len(self.buffers)  # copy into the buffer done
        self._last_use = [0] * len(self.buffers)
        self._pending = [False] * len(self.buffers)  # prefetched, not yet acquired
        self._clock = 0
        self.copies = 0
        self.schedule: list[tuple[object, tuple[FlatWeights, ...]]] = []
        """(use key, flats it reads) in the order of one micro-batch; prefetch walks it."""

    @property
    def total_bytes(self) -> int:
        return self.buffer_bytes * len(self.buffers)

    def _where(self, flat: FlatWeights) -> int | None:
        for i, occupant in enumerate(self._occupant):
            if occupant is flat:
                return i
        return None

    def _victim(self, demand: bool) -> int | None:
        """A buffer nothing holds: empty first, then least recently used; a prefetched one
        only for a demand fetch, as a last resort."""
        free = [i for i in range(len(self.buffers)) if self._holds[i] == 0 and (demand or not self._pending[i])]
        if not free:
            return None
        return min(free, key=lambda i: (self._pending[i], self._occupant[i] is not None, self._last_use[i]))

    def _fetch(self, flat: FlatWeights, i: int) -> None:
        if self._occupant[i] is not None:
            self._occupant[i].point_at(None)
        self._occupant[i] = flat
        region = self.buffers[i][:flat.numel]
        start = time.perf_counter()
        self._ready_event[i] = copy_async(region, flat.host_store, self.h2d, after=[self._free_event[i]])
        flat.point_at(region)
        self.copies += 1
        if self.on_copy is not None:
            self.on_copy(flat, start, time.perf_counter())

    def acquire(self, flats: list[FlatWeights], compute_stream=None) -> None:
        for flat in flats:
            i = self._where(flat)
            if i is None:
                i = self._victim(demand=True)
                if i is None:
                    raise RuntimeError(f"all {len(self.buffers)} weight buffers are in use when {flat.name} needs "
                                       f"one; raise plan.weight_buffers")
                flat.landing.wait(poll=self.poll, stream=self.h2d)
                self._fetch(flat, i)
            self._holds[i] += 1
            self._pending[i] = False
            self._clock += 1
            self._last_use[i] = self._clock
            if compute_stream is not None and self._ready_event[i] is not None:
                compute_stream.wait_event(self._ready_event[i])

    def release(self, flats: list[FlatWeights], compute_stream=None) -> None:
        for flat in flats:
            i = self._where(flat)
            self._holds[i] -= 1
            if compute_stream is not None and self._holds[i] == 0:
                event = torch.cuda.Event()
                event.record(compute_stream)
                self._free_event[i] = event

    def prefetch(self, flat: FlatWeights) -> bool:
        """Fetch ahead if a buffer is free and the host store is current; never blocks."""
        if self._where(flat) is not None:
            return True
        if not flat.landing.landed():
            return False
        i = self._victim(demand=False)
        if i is None:
            return False
        if self.h2d is not None:
            flat.landing.wait(stream=self.h2d)
        self._fetch(flat, i)
        self._pending[i] = True
        return True

    def prefetch_after(self, key, depth: int, wrap: bool) -> None:
        """Fetch the flats of the `depth` uses after `key` in the schedule; past its end only if
        `wrap` (the next micro-batch of the same step: its weights are current)."""
        keys = [k for k, _ in self.schedule]
        if depth == 0 or key not in keys:
            return
        pos = keys.index(key)
        for j in range(pos + 1, pos + 1 + depth):
            if j >= len(keys) and not wrap:
                return
            for flat in self.schedule[j % len(keys)][1]:
                if not self.prefetch(flat):
                    return

    def invalidate(self) -> None:
        """Forget every cached flat nothing holds (their host stores are about to change)."""
        for i, occupant in enumerate(self._occupant):
            if occupant is not None and self._holds[i] == 0:
                occupant.point_at(None)
                self._occupant[i] = None
                self._pending[i] = False

    def saved_ref(self, t: torch.Tensor) -> _StreamedRef | None:
        """A reference for a tensor autograd saves, when it lives in one of the buffers."""
        i = self._ptr_to_buffer.get(t.untyped_storage().data_ptr())
        if i is None or self._occupant[i] is None:
            return None
        return _StreamedRef(self._occupant[i], t)

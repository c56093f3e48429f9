"""Records what a training step really ran, in the simulator's event format (hetrain.predict.trace).

Module hooks on the transformer blocks mark each block's forward and backward; the stretches
before the first block and after the last become the embedding and head events, so the
same tracer serves hetrain's GPT and Hugging Face models. The trainer marks data loading,
backward and the optimizer. On CPU the marks are wall-clock times (work is synchronous);
on CUDA they are events on the current stream, resolved when the step ends, so tracing
adds no synchronisation inside the step. The tracer only observes: it changes no values,
and `close()` removes every hook it added.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from hetrain.predict.trace import TraceEvent


class _Clock:
    """Timestamps on CPU now, or CUDA events to be resolved after a synchronize."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.origin_s = time.perf_counter()
        self._origin_event = None

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            if self._origin_event is None:
                self._origin_event, self.origin_s = event, 0.0
            return event
        return time.perf_counter() - self.origin_s

    def seconds(self, mark) -> float:
        if self.cuda:
            return self._origin_event.elapsed_time(mark) / 1000.0
        return mark


class StepTracer:
    """Collects TraceEvents for the steps during which it is `active`."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, device: torch.device):
        self.clock = _Clock(device)
        self.active = False
        self.step = 0
        self._open: dict[str, object] = {}
        self._pending: list[tuple[str, str, str, object, object, int]] = []
        self._handles = []
        last = len(blocks) - 1
        self._handles.append(model.register_forward_pre_hook(lambda m, a: self._begin("fwd.embedding", "fwd")))
        self._handles.append(model.register_forward_hook(lambda m, a, o: self._end("fwd.head")))
        for i, block in enumerate(blocks):
            self._handles += [
                block.register_forward_pre_hook(self._fwd_pre(i, first=i == 0)),
                block.register_forward_hook(self._fwd_post(i, last=i == last)),
                block.register_full_backward_pre_hook(self._bwd_pre(i, last=i == last)),
                block.register_full_backward_hook(self._bwd_post(i, first=i == 0)),
            ]

    # Forward: embedding runs from the model's start to block 0; head from the last block to the end.
    def _fwd_pre(self, i: int, first: bool):
        def hook(module, args):
            if first:
                self._end("fwd.embedding")
            self._begin(f"fwd.block{i}", "fwd")
        return hook

    def _fwd_post(self, i: int, last: bool):
        def hook(module, args, out):
            self._end(f"fwd.block{i}")
            if last:
                self._begin("fwd.head", "fwd")
        return hook

    # Backward: the head's backward runs from backward() to the last block; the embedding's
    # from block 0 to the end of backward().
    def _bwd_pre(self, i: int, last: bool):
        def hook(module, grad_out):
            if last:
                self._end("bwd.head")
            self._begin(f"bwd.block{i}", "bwd")
        return hook

    def _bwd_post(self, i: int, first: bool):
        def hook(module, grad_in, grad_out):
            self._end(f"bwd.block{i}")
            if first:
                self._begin("bwd.embedding", "bwd")
        return hook

    def _begin(self, name: str, cat: str, lane: str = "compute") -> None:
        if self.active:
            self._open[name] = (cat, lane, self.clock.mark())

    def _end(self, name: str) -> None:
        if self.active and name in self._open:
            cat, lane, start = self._open.pop(name)
            self._pending.append((name, lane, cat, start, self.clock.mark(), self.step))

    def begin(self, name: str, cat: str, lane: str = "compute") -> None:
        """Trainer-side marks: data, backward, optimizer."""
        self._begin(name, cat, lane)

    def end(self, name: str) -> None:
        self._end(name)

    def events(self) -> list[TraceEvent]:
        """Resolve every recorded mark (synchronising CUDA once) into TraceEvents."""
        if self.clock.cuda:
            torch.cuda.synchronize()
        out = [TraceEvent(name, lane, self.clock.seconds(a), self.clock.seconds(b), cat, {"step": step})
               for name, lane, cat, a, b, step in self._pending]
        t0 = min((e.start_s for e in out), default=0.0)  # time 0 is the first traced event
        for e in out:
            e.start_s, e.end_s = e.start_s - t0, e.end_s - t0
        return sorted(out, key=lambda e: e.start_s)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

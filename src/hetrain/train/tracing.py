"""Records what a training step really ran, in the simulator's event format (hetrain.trace).

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

from hetrain.trace import TraceEvent, task_name


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
        self.micro = 0
        """The micro-batch running (the trainer sets it), part of every task name."""
        self._open: dict[str, object] = {}
        self._pending: list[tuple[str, str, str, object, object, int]] = []
        self._handles = []
        last = len(blocks) - 1
        self._handles.append(model.register_forward_pre_hook(lambda m, a: self._begin(task_name("fwd", "embedding", self.micro), "fwd")))
        self._handles.append(model.register_forward_hook(lambda m, a, o: self._end(task_name("fwd", "head", self.micro))))
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
                self._end(task_name("fwd", "embedding", self.micro))
            self._begin(task_name("fwd", f"block.{i}", self.micro), "fwd")
        return hook

    def _fwd_post(self, i: int, last: bool):
        def hook(module, args, out):
            self._end(task_name("fwd", f"block.{i}", self.micro))
            if last:
                self._begin(task_name("fwd", "head", self.micro), "fwd")
        return hook

    # Backward: the head's backward runs from backward() to the last block; the embedding's
    # from block 0 to the end of backward().
    def _bwd_pre(self, i: int, last: bool):
        def hook(module, grad_out):
            if last:
                self._end(task_name("bwd", "head", self.micro))
            self._begin(task_name("bwd", f"block.{i}", self.micro), "bwd")
        return hook

    def _bwd_post(self, i: int, first: bool):
        def hook(module, grad_in, grad_out):
            self._end(task_name("bwd", f"block.{i}", self.micro))
            if first:
                self._begin(task_name("bwd", "embedding", self.micro), "bwd")
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


def predicted_events(cfg, plan) -> list[TraceEvent]:
    """The predictor's events of one steady-state step of this run, named as the measured ones:
    the offload planner's simulation (its second step) when a plan runs, else the plain step
    graph. Priced by this machine's profile (profiled now if it lacks this model) or by the
    catalog kind that hardware.device_kind names."""
    from hetrain.errors import ConfigError
    from hetrain.predict.profile_store import load_profile
    from hetrain.train.job import profile_job

    profile = None
    if not cfg.hardware.device_kind:
        profile = load_profile(cfg.hardware.profile_dir)
        if profile is None or not _has_model(cfg, profile):
            profile, _, _ = profile_job(cfg)
    if plan is None:
        from hetrain.train.job import predict_job

        try:
            return predict_job(cfg, profile).sim.events
        except ConfigError:
            return []
    from hetrain.plan.offload.graph import choice_of, offload_prices, simulate_offload
    from hetrain.plan.offload.planner import PlannerOptions, step_settings
    from hetrain.train.job import batch_shape, describe, job_cost

    desc = describe(cfg)
    cost = job_cost(cfg, profile, desc)
    prices = offload_prices(desc, cost, step_settings(desc, batch_shape(cfg), cost, PlannerOptions(),
                                                      cfg.train.grad_clip > 0))
    events = [e for e in simulate_offload(prices, choice_of(plan)).sim.events if e.args.get("step") == 1]
    t0 = min((e.start_s for e in events), default=0.0)
    return [TraceEvent(e.name, e.lane, e.start_s - t0, e.end_s - t0, e.cat, e.args) for e in events]


def _has_model(cfg, profile) -> bool:
    from hetrain.train.job import model_spec, training_threads

    t = cfg.train
    threads = training_threads(cfg) if profile.device == "cpu" else None
    return profile.find_model(model_spec(cfg).key(), t.micro_batch, t.seq_len, t.dtype, threads) is not None


def write_run_trace(run_dir, measured: list[TraceEvent], predicted: list[TraceEvent], title: str) -> list[dict]:
    """trace.json (the measured events, Chrome/Perfetto; the predicted-against-measured pairs
    in its metadata), trace_timeline.png and trace_predicted.json; returns the pairs
    (hetrain.trace.pair_tasks), slowest measured first."""
    from pathlib import Path

    from hetrain.trace import pair_tasks, plot_timeline, write_chrome_trace

    run_dir = Path(run_dir)
    t0 = min((e.start_s for e in measured), default=0.0)
    measured = [TraceEvent(e.name, e.lane, e.start_s - t0, e.end_s - t0, e.cat, e.args) for e in measured]
    pairs = pair_tasks(predicted, measured)
    write_chrome_trace(measured, run_dir / "trace.json", metadata={"source": "hetrain train --trace",
                                                                    "predicted_vs_measured": pairs})
    if predicted:
        write_chrome_trace(predicted, run_dir / "trace_predicted.json", metadata={"source": "hetrain's predictor"})
    plot_timeline(measured, run_dir / "trace_timeline.png", title=title)
    return pairs


def format_pairs(pairs: list[dict], top: int = 12) -> str:
    """The slowest measured tasks beside their predictions, as a table."""
    lines = [f"  {'task':<28} {'predicted ms':>12} {'measured ms':>12} {'ratio':>6}"]
    for r in pairs[:top]:
        ratio = r["measured_s"] / r["predicted_s"] if r["predicted_s"] > 0 else float("inf")
        lines.append(f"  {r['task']:<28} {r['predicted_s'] * 1e3:12.3f} {r['measured_s'] * 1e3:12.3f} {ratio:6.2f}")
    return "\n".join(lines)

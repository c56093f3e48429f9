"""The one timeline event format of hetrain, shared by the simulator and the real-run tracer.

A `TraceEvent` is one interval of work on one lane (a resource such as "compute", "h2d",
"d2h", "cpu_optim" or "net:0-1"). Predicted and measured runs are both lists of these, so
they can be written to the same Chrome/Perfetto trace JSON, drawn with the same timeline
PNG and summarised the same way. This module only stores, converts and draws events: it
must not schedule, measure or know what a model or a device is.

Chrome trace layout written here: one process ("pid" 0), one thread per lane ("tid" 1, 2,
... in order of first appearance) with "thread_name" and "thread_sort_index" metadata so
the viewer labels and orders the lanes; every event is a complete ("X") event with "ts"
and "dur" in microseconds; memory samples, when given, become counter ("C") events named
"memory:<pool>". Microsecond floats do not convert back to the same second floats, so
each event also carries its exact interval in seconds under the extra key "hetrain_s",
which viewers ignore and `read_chrome_trace` prefers; a trace without it (from another
tool) is read from "ts" and "dur".
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterable

_US_PER_S = 1e6
_PID = 0
_EXACT_KEY = "hetrain_s"
_MEMORY_PREFIX = "memory:"

# Fixed colours for the categories every run has, so predicted and measured timelines look
# alike; other categories take the next free colour of a qualitative palette.
_CAT_COLOURS = {
    "fwd": "#4c72b0",
    "bwd": "#dd8452",
    "recompute": "#c44e52",
    "h2d": "#55a868",
    "d2h": "#8172b3",
    "optim": "#937860",
    "comm": "#da8bc3",
    "sync": "#8c8c8c",
}
_EXTRA_COLOURS = ["#64b5cd", "#ccb974", "#17becf", "#bcbd22", "#7f7f7f", "#e377c2", "#2ca02c"]


@dataclass
class TraceEvent:
    """One interval of work on one lane; times in seconds from the start of the trace."""

    name: str
    lane: str
    start_s: float
    end_s: float
    cat: str = ""
    args: dict = field(default_factory=dict)

    @property
    def dur_s(self) -> float:
        return self.end_s - self.start_s


def task_name(phase: str, layer: str = "", micro_batch: int | None = None, *, stage: int | None = None,
              step: int | None = None) -> str:
    """The name of one task in every trace hetrain writes, predicted or measured, so that the
    two pair up: '[s<stage> ]<phase>[ <layer>][ mb<micro_batch>]', e.g. 'fwd block.3 mb0',
    's1 bwd head mb2', 'update block.7'. Layers are 'embedding', 'block.<i>' and 'head'.
    A graph that spans several steps, or issues one kind of task more than once, keeps its
    names unique with `step` (' @<step>', and anything after it): `task_key` drops that part."""
    parts = ([f"s{stage}"] if stage is not None else []) + [phase] + ([layer] if layer else [])
    if micro_batch is not None:
        parts.append(f"mb{micro_batch}")
    name = " ".join(parts)
    return name if step is None else f"{name} @{step}"


def task_key(name: str) -> str:
    """What pairs a predicted task with a measured one: the name without its ' @...' part."""
    return name.split(" @", 1)[0]


def pair_tasks(predicted: Iterable[TraceEvent], measured: Iterable[TraceEvent]) -> list[dict]:
    """Per task key present in both: the mean predicted and measured durations and how many of
    each were averaged, slowest measured first."""
    sums: dict[str, list[float]] = {}
    for which, events in ((0, predicted), (1, measured)):
        for e in events:
            entry = sums.setdefault(task_key(e.name), [0.0, 0, 0.0, 0])
            entry[2 * which] += e.dur_s
            entry[2 * which + 1] += 1
    rows = [{"task": key, "predicted_s": p / n_p, "measured_s": m / n_m, "predicted_n": n_p, "measured_n": n_m}
            for key, (p, n_p, m, n_m) in sums.items() if n_p and n_m]
    return sorted(rows, key=lambda r: -r["measured_s"])


def lanes_in_order(events: Iterable[TraceEvent]) -> list[str]:
    """Lane names in order of first appearance (the order lanes are written and drawn)."""
    return list(dict.fromkeys(e.lane for e in events))


def write_chrome_trace(
    events: list[TraceEvent],
    path,
    metadata: dict | None = None,
    memory: dict[str, list[tuple[float, int]]] | None = None,
) -> None:
    """Write `events` as Chrome trace-event JSON, openable in Perfetto or chrome://tracing.

    `metadata` (JSON-serialisable) is stored under the top-level "metadata" key; its "name",
    if present, also names the process. `memory` maps a pool name to (time_s, bytes) samples
    and becomes one counter track per pool. Raises TypeError if an event's args cannot be
    written as JSON.
    """
    metadata = dict(metadata or {})
    lanes = lanes_in_order(events)
    tid_of = {lane: i + 1 for i, lane in enumerate(lanes)}
    out: list[dict] = [
        {"ph": "M", "name": "process_name", "pid": _PID, "tid": 0,
         "args": {"name": str(metadata.get("name", "hetrain"))}},
    ]
    for lane, tid in tid_of.items():
        out.append({"ph": "M", "name": "thread_name", "pid": _PID, "tid": tid,
                    "args": {"name": lane}})
        out.append({"ph": "M", "name": "thread_sort_index", "pid": _PID, "tid": tid,
                    "args": {"sort_index": tid}})
    for e in events:
        out.append({
            "ph": "X", "name": e.name, "cat": e.cat, "pid": _PID, "tid": tid_of[e.lane],
            "ts": e.start_s * _US_PER_S, "dur": e.dur_s * _US_PER_S, "args": e.args,
            _EXACT_KEY: [e.start_s, e.end_s],
        })
    for pool, samples in (memory or {}).items():
        for t_s, n_bytes in samples:
            out.append({"ph": "C", "name": _MEMORY_PREFIX + pool, "pid": _PID,
                        "ts": t_s * _US_PER_S, "args": {"bytes": int(n_bytes)}})
    doc = {"traceEvents": out, "displayTimeUnit": "ms", "metadata": metadata}
    try:
        text = json.dumps(doc)
    except TypeError as err:
        raise TypeError(f"trace event args must be JSON-serialisable: {err}") from err
    with open(os.fspath(path), "w", encoding="utf-8") as f:
        f.write(text)


def _load_events(path) -> list[dict]:
    with open(os.fspath(path), encoding="utf-8") as f:
        doc = json.load(f)
    # Both forms are valid Chrome traces: an object with "traceEvents" or a bare array.
    return doc["traceEvents"] if isinstance(doc, dict) else doc


def read_chrome_trace(path) -> list[TraceEvent]:
    """Read the complete ("X") events of a Chrome trace back into TraceEvents, in file order.

    Lanes are the thread names from "thread_name" metadata (or "pid:tid" where a thread has
    none). Other phases (counters, instants, begin/end pairs) are skipped.
    """
    raw = _load_events(path)
    lane_of: dict[tuple, str] = {}
    for r in raw:
        if r.get("ph") == "M" and r.get("name") == "thread_name":
            lane_of[(r.get("pid"), r.get("tid"))] = str(r["args"]["name"])
    events = []
    for r in raw:
        if r.get("ph") != "X":
            continue
        key = (r.get("pid"), r.get("tid"))
        if _EXACT_KEY in r:
            start_s, end_s = r[_EXACT_KEY]
        else:
            start_s = r["ts"] / _US_PER_S
            end_s = (r["ts"] + r.get("dur", 0.0)) / _US_PER_S
        events.append(TraceEvent(
            name=r.get("name", ""), lane=lane_of.get(key, f"{key[0]}:{key[1]}"),
            start_s=start_s, end_s=end_s, cat=r.get("cat", ""), args=dict(r.get("args", {})),
        ))
    return events


def read_chrome_memory(path) -> dict[str, list[tuple[float, int]]]:
    """Read the memory counter tracks written by `write_chrome_trace` back as samples."""
    memory: dict[str, list[tuple[float, int]]] = {}
    for r in _load_events(path):
        if r.get("ph") == "C" and str(r.get("name", "")).startswith(_MEMORY_PREFIX):
            pool = r["name"][len(_MEMORY_PREFIX):]
            memory.setdefault(pool, []).append((r["ts"] / _US_PER_S, int(r["args"]["bytes"])))
    return memory


def _busy_s(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of intervals: overlapping work on one lane is counted once."""
    busy_s = 0.0
    cur_start = cur_end = None
    for start_s, end_s in sorted(intervals):
        if cur_end is None or start_s > cur_end:
            if cur_end is not None:
                busy_s += cur_end - cur_start
            cur_start, cur_end = start_s, end_s
        else:
            cur_end = max(cur_end, end_s)
    if cur_end is not None:
        busy_s += cur_end - cur_start
    return busy_s


def summarize(events: list[TraceEvent]) -> dict:
    """Span and per-lane busy time of a trace.

    Returns {"start_s", "end_s", "span_s", "lanes": {lane: {"busy_s", "utilisation",
    "events"}}}, where busy_s is the time the lane had at least one event running and
    utilisation is busy_s / span_s (0.0 for an empty or zero-length trace).
    """
    if not events:
        return {"start_s": 0.0, "end_s": 0.0, "span_s": 0.0, "lanes": {}}
    start_s = min(e.start_s for e in events)
    end_s = max(e.end_s for e in events)
    span_s = end_s - start_s
    per_lane: dict[str, list[tuple[float, float]]] = {lane: [] for lane in lanes_in_order(events)}
    for e in events:
        per_lane[e.lane].append((e.start_s, e.end_s))
    lanes = {}
    for lane, intervals in per_lane.items():
        busy_s = _busy_s(intervals)
        lanes[lane] = {"busy_s": busy_s, "utilisation": busy_s / span_s if span_s > 0 else 0.0,
                       "events": len(intervals)}
    return {"start_s": start_s, "end_s": end_s, "span_s": span_s, "lanes": lanes}


def _colours(cats: list[str]) -> dict[str, str]:
    colours, extra = {}, iter(_EXTRA_COLOURS * (1 + len(cats) // len(_EXTRA_COLOURS)))
    for cat in cats:
        colours[cat] = _CAT_COLOURS.get(cat) or next(extra)
    return colours


def _bytes_unit(max_bytes: float) -> tuple[float, str]:
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if max_bytes >= scale:
            return float(scale), unit
    return 1.0, "B"


def plot_timeline(
    events: list[TraceEvent],
    path,
    title: str = "",
    memory: dict[str, list[tuple[float, int]]] | None = None,
) -> None:
    """Draw a PNG timeline: one horizontal lane per resource, bars coloured by category.

    The time axis is in milliseconds. With `memory` (pool -> (time_s, bytes) samples), a
    second panel below shows each pool's bytes in use over the same time axis as a step
    line (the state after each instant). Bars are drawn per (lane, category) in one call
    each, and only bars wide enough to hold their name are labelled, so a thousand events
    stay legible.
    """
    # Figure with the Agg canvas directly, not pyplot: no global figure state, no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    lanes = lanes_in_order(events)
    cats = list(dict.fromkeys(e.cat or "other" for e in events))
    colour_of = _colours(cats)
    has_memory = bool(memory) and any(memory.values())
    lane_h_in = 0.45
    height_in = 1.6 + lane_h_in * max(len(lanes), 1) + (2.2 if has_memory else 0.0)
    fig = Figure(figsize=(14, height_in), dpi=110)
    FigureCanvasAgg(fig)
    if has_memory:
        ax, ax_mem = fig.subplots(2, 1, sharex=True, gridspec_kw={
            "height_ratios": [lane_h_in * max(len(lanes), 1), 2.0]})
    else:
        ax, ax_mem = fig.subplots(1, 1), None

    # Lane 0 at the top, as in trace viewers.
    row_of = {lane: len(lanes) - 1 - i for i, lane in enumerate(lanes)}
    bars: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for e in events:
        bars.setdefault((e.lane, e.cat or "other"), []).append(
            (e.start_s * 1e3, max(e.dur_s * 1e3, 0.0)))
    for (lane, cat), spans_ms in bars.items():
        ax.broken_barh(spans_ms, (row_of[lane] - 0.4, 0.8), facecolors=colour_of[cat],
                       edgecolors="white", linewidth=0.3)
    ax.set_yticks(range(len(lanes)))
    ax.set_yticklabels(list(reversed(lanes)))
    ax.set_ylim(-0.6, len(lanes) - 0.4)
    ax.grid(axis="x", linewidth=0.3, alpha=0.6)
    ax.set_title(title)
    if cats:
        ax.legend(handles=[Patch(color=colour_of[c], label=c) for c in cats], fontsize=7,
                  loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    if ax_mem is not None:
        max_bytes = max((b for samples in memory.values() for _, b in samples), default=0)
        scale, unit = _bytes_unit(max_bytes)
        for pool, samples in memory.items():
            samples = _last_per_time(samples)
            if samples:
                ax_mem.step([t * 1e3 for t, _ in samples], [b / scale for _, b in samples],
                            where="post", label=pool, linewidth=1.0)
        ax_mem.set_ylabel(f"memory ({unit})")
        ax_mem.grid(linewidth=0.3, alpha=0.6)
        ax_mem.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        ax_mem.set_xlabel("time (ms)")
    else:
        ax.set_xlabel("time (ms)")
    fig.tight_layout()
    _label_wide_bars(ax, events, row_of, fig.dpi)
    fig.savefig(os.fspath(path), format="png")


def _label_wide_bars(ax, events: list[TraceEvent], row_of: dict[str, int], dpi: float) -> None:
    """Write each event's name inside its bar where the bar is wider than the text."""
    x0_ms, x1_ms = ax.get_xlim()
    if x1_ms <= x0_ms:
        return
    px_per_ms = ax.get_window_extent().width / (x1_ms - x0_ms)
    fontsize_pt = 6.0
    char_px = 0.62 * fontsize_pt * dpi / 72.0  # average glyph width of the default font
    for e in events:
        if e.dur_s * 1e3 * px_per_ms >= (len(e.name) + 2) * char_px:
            ax.text((e.start_s + e.end_s) * 0.5e3, row_of[e.lane], e.name, ha="center",
                    va="center", fontsize=fontsize_pt, color="white", clip_on=True)


def _last_per_time(samples: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """Keep the state after each instant: changes within one instant would draw spikes."""
    out: list[tuple[float, int]] = []
    for t_s, n_bytes in samples:
        if out and out[-1][0] == t_s:
            out[-1] = (t_s, n_bytes)
        else:
            out.append((t_s, n_bytes))
    return out

"""Trace format: Chrome JSON round trip, lane labels, summary numbers and the timeline PNG."""

import json

import pytest

from hetrain.predict.simulator import Task, simulate
from hetrain.trace import (
    TraceEvent, plot_timeline, read_chrome_memory, read_chrome_trace, summarize,
    write_chrome_trace,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _events():
    # Times that do not survive a trip through microseconds exactly (0.1, 1/3).
    return [
        TraceEvent("h2d.w.block0", "h2d", 0.0, 0.1, cat="h2d", args={"bytes": 1 << 20}),
        TraceEvent("fwd.block0", "compute", 0.1, 0.1 + 1 / 3, cat="fwd", args={"step": 2}),
        TraceEvent("adam.block0", "cpu_optim", 0.2, 0.7, cat="optim"),
        TraceEvent("bwd.block0", "compute", 0.5, 0.9, cat="bwd", args={"nested": {"a": [1, 2]}}),
        TraceEvent("allreduce", "net:0-1", 0.9, 0.9),
    ]


def test_chrome_trace_round_trip(tmp_path):
    path = tmp_path / "trace.json"
    write_chrome_trace(_events(), path, metadata={"name": "unit", "step_s": 0.9})
    assert read_chrome_trace(path) == _events()
    doc = json.loads(path.read_text())
    assert doc["metadata"] == {"name": "unit", "step_s": 0.9}
    names = {e["args"]["name"] for e in doc["traceEvents"]
             if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {"h2d", "compute", "cpu_optim", "net:0-1"}
    x = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert x[1]["ts"] == pytest.approx(0.1e6) and x[1]["dur"] == pytest.approx(1e6 / 3)
    # One tid per lane: both compute events share one.
    assert x[1]["tid"] == x[3]["tid"] != x[0]["tid"]


def test_memory_counters_round_trip(tmp_path):
    path = tmp_path / "trace.json"
    memory = {"device": [(0.0, 10), (0.5, 1 << 30)], "host": [(0.0, 5)]}
    write_chrome_trace(_events(), path, memory=memory)
    assert read_chrome_memory(path) == memory
    assert read_chrome_trace(path) == _events()


def test_reads_foreign_trace_without_exact_seconds(tmp_path):
    path = tmp_path / "foreign.json"
    path.write_text(json.dumps([
        {"ph": "M", "name": "thread_name", "pid": 7, "tid": 3, "args": {"name": "stream 7"}},
        {"ph": "X", "name": "gemm", "pid": 7, "tid": 3, "ts": 1500.0, "dur": 250.0},
        {"ph": "X", "name": "copy", "pid": 7, "tid": 4, "ts": 0.0, "dur": 10.0, "cat": "h2d"},
        {"ph": "i", "name": "marker", "pid": 7, "tid": 3, "ts": 5.0},
    ]))
    events = read_chrome_trace(path)
    assert events == [TraceEvent("gemm", "stream 7", 1.5e-3, 1.75e-3),
                      TraceEvent("copy", "7:4", 0.0, 1e-5, cat="h2d")]


def test_unserialisable_args_raise(tmp_path):
    with pytest.raises(TypeError, match="JSON-serialisable"):
        write_chrome_trace([TraceEvent("a", "r", 0.0, 1.0, args={"x": object()})],
                           tmp_path / "t.json")


def test_summarize_busy_and_utilisation():
    events = [TraceEvent("a", "compute", 1.0, 3.0), TraceEvent("b", "compute", 2.0, 4.0),
              TraceEvent("c", "compute", 6.0, 7.0), TraceEvent("d", "h2d", 1.0, 2.0)]
    s = summarize(events)
    assert s["span_s"] == 6.0 and s["start_s"] == 1.0 and s["end_s"] == 7.0
    # compute: union of [1,4] and [6,7] = 4 s of 6.
    assert s["lanes"]["compute"] == {"busy_s": 4.0, "utilisation": pytest.approx(4 / 6),
                                     "events": 3}
    assert s["lanes"]["h2d"]["busy_s"] == 1.0
    assert summarize([])["span_s"] == 0.0


def test_summary_matches_simulator_utilisation():
    tasks = [Task("a", "r1", 3.0), Task("b", "r2", 5.0), Task("c", "r1", 1.0, deps=("a", "b"))]
    r = simulate(tasks)
    lanes = summarize(r.events)["lanes"]
    assert {k: v["utilisation"] for k, v in lanes.items()} == pytest.approx(r.utilisation)


def test_plot_timeline_small(tmp_path):
    path = tmp_path / "small.png"
    plot_timeline(_events(), path, title="small")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_timeline_thousand_events_with_memory(tmp_path):
    lanes = ["compute", "h2d", "d2h", "cpu_optim"]
    cats = ["fwd", "h2d", "d2h", "optim", "recompute", "custom"]
    events = [TraceEvent(f"t{i}", lanes[i % 4], i * 1e-4, i * 1e-4 + 3e-4, cat=cats[i % 6])
              for i in range(1000)]
    memory = {"device": [(i * 1e-3, (i % 7) << 28) for i in range(100)],
              "host": [(0.0, 1 << 33), (0.05, 1 << 34)]}
    path = tmp_path / "big.png"
    plot_timeline(events, path, title="1000 events", memory=memory)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000

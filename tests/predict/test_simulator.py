"""The simulator on hand-computable graphs: every expected number is worked out in comments."""

import pytest

from hetrain.predict.simulator import Task, simulate


def _times(result):
    return {e.name: (e.start_s, e.end_s) for e in result.events}


def test_serial_chain_makespan_is_sum():
    tasks = [Task("a", "compute", 1.0), Task("b", "compute", 2.0, deps=("a",)),
             Task("c", "compute", 3.0, deps=("b",))]
    r = simulate(tasks)
    assert r.step_s == 6.0
    assert _times(r) == {"a": (0.0, 1.0), "b": (1.0, 3.0), "c": (3.0, 6.0)}
    assert r.critical_path == ["a", "b", "c"]
    assert r.utilisation == {"compute": 1.0}
    assert [e.lane for e in r.events] == ["compute"] * 3


def test_two_resources_overlap_then_join():
    # a (3 s) on r1 and b (5 s) on r2 run together; c joins them: max(3, 5) + 1 = 6.
    tasks = [Task("a", "r1", 3.0), Task("b", "r2", 5.0), Task("c", "r1", 1.0, deps=("a", "b"))]
    r = simulate(tasks)
    assert r.step_s == 6.0
    assert _times(r)["c"] == (5.0, 6.0)
    assert r.critical_path == ["b", "c"]
    assert r.utilisation == pytest.approx({"r1": 4 / 6, "r2": 5 / 6})


def test_prefetch_overlaps_compute():
    # Weights stream on h2d while the previous block computes:
    # w0 0-1, w1 1-2, f0 1-3 (needs w0), f1 3-5 (needs f0 and w1).
    tasks = [Task("w0", "h2d", 1.0), Task("w1", "h2d", 1.0),
             Task("f0", "compute", 2.0, deps=("w0",)),
             Task("f1", "compute", 2.0, deps=("f0", "w1"))]
    r = simulate(tasks)
    assert r.step_s == 5.0
    assert _times(r)["w1"] == (1.0, 2.0)
    assert r.critical_path == ["w0", "f0", "f1"]


def test_priority_orders_a_contended_resource():
    tasks = [Task("x", "cpu", 1.0, priority=2), Task("y", "cpu", 2.0, priority=0),
             Task("z", "cpu", 3.0, priority=1), Task("t", "cpu", 1.0, priority=1)]
    r = simulate(tasks)
    # y first (0), then z and t tie at 1: insertion order; x last.
    assert [e.name for e in r.events] == ["y", "z", "t", "x"]
    assert _times(r) == {"y": (0.0, 2.0), "z": (2.0, 5.0), "t": (5.0, 6.0), "x": (6.0, 7.0)}


def test_non_preemptive_and_late_arrivals():
    # "urgent" becomes ready at 1 while "long" runs (0-4); it waits, then beats "low".
    tasks = [Task("gate", "other", 1.0), Task("long", "cpu", 4.0, priority=5),
             Task("low", "cpu", 1.0, priority=9),
             Task("urgent", "cpu", 1.0, deps=("gate",), priority=0)]
    r = simulate(tasks)
    assert _times(r) == {"gate": (0.0, 1.0), "long": (0.0, 4.0), "urgent": (4.0, 5.0),
                         "low": (5.0, 6.0)}
    # urgent waited for the cpu, not for gate: the path runs through the resource chain.
    assert r.critical_path == ["long", "urgent", "low"]


def test_capacity_runs_tasks_in_parallel():
    tasks = [Task(f"adam{i}", "cpu_optim", 1.0) for i in range(3)]
    r = simulate(tasks, capacities={"cpu_optim": 2})
    assert r.step_s == 2.0
    assert r.utilisation["cpu_optim"] == pytest.approx(3 / 4)


def test_zero_duration_sync_point():
    tasks = [Task("a", "r1", 2.0), Task("b", "r2", 3.0),
             Task("sync", "sync", 0.0, deps=("a", "b")), Task("c", "r1", 1.0, deps=("sync",))]
    r = simulate(tasks)
    assert _times(r)["sync"] == (3.0, 3.0)
    assert r.step_s == 4.0
    assert r.critical_path == ["b", "sync", "c"]


def test_memory_peak_and_timeline():
    # base 10; at 0: load +100 and other +30 -> 140; at 1: use +50 -> 190;
    # at 2: other frees 30 -> 160; at 3: use frees 150 -> 10. Peak 190.
    tasks = [Task("load", "h2d", 1.0, alloc={"device": 100}),
             Task("other", "compute", 2.0, alloc={"device": 30}, free={"device": 30}),
             Task("use", "d2h", 2.0, deps=("load",), alloc={"device": 50},
                  free={"device": 150})]
    r = simulate(tasks, base_bytes={"device": 10})
    assert r.peak_bytes == {"device": 190}
    assert r.memory_timeline["device"] == [(0.0, 10), (0.0, 110), (0.0, 140), (1.0, 190),
                                           (2.0, 160), (3.0, 10)]


def test_frees_happen_before_allocations_at_equal_times():
    # x frees 100 at t=2 on r1; z allocates 100 at t=2 on r2. Peak is 100, not 200.
    tasks = [Task("x", "r1", 2.0, alloc={"device": 100}, free={"device": 100}),
             Task("w", "r2", 2.0), Task("z", "r2", 1.0, deps=("w",), alloc={"device": 100})]
    r = simulate(tasks)
    assert r.peak_bytes["device"] == 100


def _prefetch_pair():
    return [Task("p0", "h2d", 1.0, alloc={"device": 60}),
            Task("p1", "h2d", 1.0, alloc={"device": 60}),
            Task("c0", "compute", 2.0, deps=("p0",), free={"device": 60}),
            Task("c1", "compute", 2.0, deps=("p1", "c0"), free={"device": 60})]


def test_memory_limit_delays_allocation():
    # Uncapped: p1 runs 1-2 and both buffers are live (peak 120), c1 3-5.
    free_run = simulate(_prefetch_pair())
    assert free_run.step_s == 5.0 and free_run.peak_bytes["device"] == 120
    # Cap 100: p1 waits for c0's free at 3, runs 3-4, c1 4-6; one buffer live at a time.
    r = simulate(_prefetch_pair(), mem_limit={"device": 100})
    assert _times(r)["p1"] == (3.0, 4.0)
    assert r.step_s == 6.0
    assert r.peak_bytes["device"] == 60
    assert r.critical_path == ["p0", "c0", "p1", "c1"]


def test_memory_limit_blocks_its_resource_in_order():
    # big (priority 0) waits for memory; small (priority 1) on the same resource waits too.
    tasks = [Task("hold", "compute", 2.0, alloc={"device": 80}, free={"device": 80}),
             Task("big", "h2d", 1.0, alloc={"device": 50}, priority=0),
             Task("small", "h2d", 1.0, alloc={"device": 10}, priority=1)]
    r = simulate(tasks, mem_limit={"device": 100})
    assert _times(r) == {"hold": (0.0, 2.0), "big": (2.0, 3.0), "small": (3.0, 4.0)}


def test_memory_deadlock_is_reported():
    tasks = [Task("ok", "compute", 1.0, alloc={"device": 10}),
             Task("huge", "h2d", 1.0, deps=("ok",), alloc={"device": 200})]
    with pytest.raises(ValueError, match="memory deadlock.*'huge'"):
        simulate(tasks, mem_limit={"device": 100})


def test_critical_path_on_a_diamond():
    # a 0-1; b (r2) 1-6 and c (r1) 1-3; d needs both: 6-7. Path a -> b -> d.
    tasks = [Task("a", "r1", 1.0), Task("b", "r2", 5.0, deps=("a",)),
             Task("c", "r1", 2.0, deps=("a",)), Task("d", "r1", 1.0, deps=("b", "c"))]
    r = simulate(tasks)
    assert r.step_s == 7.0
    assert r.critical_path == ["a", "b", "d"]


def test_events_are_one_per_task_in_start_order_with_args():
    tasks = [Task("late", "r1", 1.0, deps=("early",), cat="bwd", args={"block": 3}),
             Task("early", "r2", 2.0, cat="fwd")]
    r = simulate(tasks)
    assert [e.name for e in r.events] == ["early", "late"]
    assert r.events[1].cat == "bwd" and r.events[1].args == {"block": 3}
    assert r.events[1].dur_s == 1.0


def test_empty_graph():
    r = simulate([])
    assert r.step_s == 0.0 and r.events == [] and r.critical_path == []


@pytest.mark.parametrize("tasks, message", [
    ([Task("a", "r", 1.0, deps=("nope",))], "unknown task 'nope'"),
    ([Task("a", "r", 1.0), Task("a", "r", 2.0)], "duplicate task name 'a'"),
    ([Task("a", "r", -1.0)], "invalid duration"),
    ([Task("a", "r", float("nan"))], "invalid duration"),
    ([Task("a", "r", 1.0, deps=("c",)), Task("b", "r", 1.0, deps=("a",)),
      Task("c", "r", 1.0, deps=("b",)), Task("d", "r", 1.0)], "cycle through task '[abc]'"),
    ([Task("a", "r", 1.0, deps=("a",))], "cycle through task 'a'"),
    ([Task("a", "r", 1.0, free={"device": 5})], "frees more bytes"),
    ([Task("a", "r", 1.0, alloc={"device": -5})], "negative alloc"),
    ([Task("ab", "r", 1.0), Task("c", "r", 1.0, deps="ab")], "deps must be a tuple"),
])
def test_bad_graphs_raise_clear_errors(tasks, message):
    with pytest.raises(ValueError, match=message):
        simulate(tasks)


def test_bad_capacity_raises():
    with pytest.raises(ValueError, match="capacity of resource 'r'"):
        simulate([Task("a", "r", 1.0)], capacities={"r": 0})

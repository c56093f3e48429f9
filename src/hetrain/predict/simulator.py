"""Discrete-event simulator of a task graph on resources with memory pools.

Planners describe a training step as `Task`s (a duration on a named resource, dependencies,
a priority, bytes allocated and freed in memory pools) and `simulate` returns the step time,
the timeline as `TraceEvent`s, the critical path, per-resource utilisation and peak memory.
It must not know about models, hardware or plans: it only runs the tasks it is given, so
that every planner and the real-run comparison share one scheduling semantics.

Semantics. List scheduling, non-preemptive. A task becomes ready when all its dependencies
have finished. A resource runs at most `capacity` tasks at once (default 1); whenever it
has a free unit it starts the ready task with the lowest `priority` value, ties broken by
position in the input list. A task allocates its `alloc` bytes when it starts and releases
its `free` bytes when it ends. At equal times, every task ending at that time finishes and
releases its memory before any task starts and allocates; a zero-duration task therefore
ends after the starts of its own instant, and its frees precede the next starts. When
several resources can start a task at the same instant, they start in (priority, position)
order across resources, which decides who gets memory under a cap.

Memory cap. With `mem_limit`, a task whose allocation would push a pool past its limit
waits, and its resource waits with it (it does not skip to a lower-priority task, as a
stream that issues in order would); it starts once enough is freed. If the simulation
reaches a point where nothing runs and such a task still waits, it raises ValueError
(a memory deadlock). Memory in use is base + allocations - frees; going below zero is an
error in the graph.

Critical path. Walk back from the last-finishing task; at each task step to whichever of
its predecessors finished latest at its start: a dependency, the task that last released
the resource unit it runs on, or (when it waited for memory) the task whose free let it fit.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from hetrain.trace import TraceEvent


@dataclass
class Task:
    """One unit of work on one resource."""

    name: str
    resource: str
    """Which resource executes it, e.g. "compute", "h2d", "d2h", "cpu_optim", "net:0-1"."""
    duration_s: float
    deps: tuple[str, ...] = ()
    """Names of tasks that must finish before this one starts."""
    priority: float = 0.0
    """Among ready tasks on the same resource, the LOWER value runs first."""
    cat: str = ""
    alloc: dict[str, int] = field(default_factory=dict)
    """Bytes allocated per memory pool (e.g. "device", "host") when the task starts."""
    free: dict[str, int] = field(default_factory=dict)
    """Bytes released per memory pool when the task ends."""
    args: dict = field(default_factory=dict)
    """Free-form, JSON-serialisable; copied to the task's TraceEvent."""


@dataclass
class SimResult:
    step_s: float
    """Makespan: end of the last task (0.0 for an empty graph)."""
    events: list[TraceEvent]
    """One per task, in start order."""
    critical_path: list[str]
    """Task names, first to last, on the chain that determines the makespan."""
    utilisation: dict[str, float]
    """Busy seconds / (makespan x capacity), per resource."""
    peak_bytes: dict[str, int]
    """Peak bytes in use per memory pool, including the base."""
    memory_timeline: dict[str, list[tuple[float, int]]]
    """Per pool, (time_s, bytes in use) after every change, starting with (0.0, base)."""


def _check_graph(tasks: list[Task]) -> tuple[dict[str, int], list[list[int]]]:
    """Validate names, durations and bytes; return name -> index and each task's dep indices."""
    index_of: dict[str, int] = {}
    for i, t in enumerate(tasks):
        if t.name in index_of:
            raise ValueError(f"duplicate task name {t.name!r}")
        index_of[t.name] = i
        if not (t.duration_s >= 0.0) or math.isinf(t.duration_s):
            raise ValueError(f"task {t.name!r} has invalid duration_s={t.duration_s!r}; "
                             "it must be finite and >= 0")
        for kind, pools in (("alloc", t.alloc), ("free", t.free)):
            for pool, n_bytes in pools.items():
                if n_bytes < 0:
                    raise ValueError(f"task {t.name!r} has negative {kind} bytes "
                                     f"{n_bytes} in pool {pool!r}")
    dep_idx: list[list[int]] = []
    for t in tasks:
        if isinstance(t.deps, str):
            # A bare string would be read as one dependency per character.
            raise ValueError(f"task {t.name!r}: deps must be a tuple of names, got {t.deps!r}")
        idx = []
        for d in dict.fromkeys(t.deps):  # a repeated dep is one dependency
            if d not in index_of:
                raise ValueError(f"task {t.name!r} depends on unknown task {d!r}")
            idx.append(index_of[d])
        dep_idx.append(idx)
    _check_acyclic(tasks, dep_idx)
    return index_of, dep_idx


def _check_acyclic(tasks: list[Task], dep_idx: list[list[int]]) -> None:
    """Kahn's algorithm; on failure name the tasks of one cycle."""
    n = len(tasks)
    indeg = [len(d) for d in dep_idx]
    succs: list[list[int]] = [[] for _ in range(n)]
    for i, deps in enumerate(dep_idx):
        for d in deps:
            succs[d].append(i)
    stack = [i for i in range(n) if indeg[i] == 0]
    seen = 0
    while stack:
        i = stack.pop()
        seen += 1
        for s in succs[i]:
            indeg[s] -= 1
            if indeg[s] == 0:
                stack.append(s)
    if seen == n:
        return
    # Every task left over has an unfinished dep that is also left over, so following such
    # deps must revisit a task: the loop from that task is a cycle.
    left = {i for i in range(n) if indeg[i] > 0}
    path, pos = [], {}
    i = min(left)
    while i not in pos:
        pos[i] = len(path)
        path.append(i)
        i = next(d for d in dep_idx[i] if d in left)
    cycle = [tasks[j].name for j in path[pos[i]:]]
    raise ValueError(f"dependency cycle through task {tasks[i].name!r}: "
                     + " <- ".join(cycle + [cycle[0]]))


def simulate(
    tasks: list[Task],
    capacities: dict[str, int] | None = None,
    base_bytes: dict[str, int] | None = None,
    mem_limit: dict[str, int] | None = None,
) -> SimResult:
    """Run `tasks` to completion under the semantics of the module docstring.

    `capacities`: tasks a resource runs at once (default 1). `base_bytes`: bytes in use per
    pool before any task (e.g. resident weights). `mem_limit`: optional cap per pool.
    Raises ValueError for a duplicate name, an unknown dependency, a cycle, a negative or
    non-finite duration, negative bytes, a capacity below 1, a pool going below zero, or a
    memory deadlock.
    """
    capacities = dict(capacities or {})
    mem_limit = dict(mem_limit or {})
    _, dep_idx = _check_graph(tasks)
    for res, cap in capacities.items():
        if int(cap) != cap or cap < 1:
            raise ValueError(f"capacity of resource {res!r} must be an integer >= 1, got {cap!r}")

    n = len(tasks)
    resources = list(dict.fromkeys([*capacities, *(t.resource for t in tasks)]))
    pools = list(dict.fromkeys([*(base_bytes or {}), *mem_limit,
                                *(p for t in tasks for p in (*t.alloc, *t.free))]))
    in_use = {p: int((base_bytes or {}).get(p, 0)) for p in pools}
    peak = dict(in_use)
    timeline = {p: [(0.0, in_use[p])] for p in pools}
    for p, limit in mem_limit.items():
        if in_use[p] > limit:
            raise ValueError(f"base bytes {in_use[p]} of pool {p!r} exceed its limit {limit}")

    succs: list[list[int]] = [[] for _ in range(n)]
    waiting = [len(d) for d in dep_idx]
    for i, deps in enumerate(dep_idx):
        for d in deps:
            succs[d].append(i)

    # Per resource: a heap of ready (priority, index), and a stack of free units, each
    # remembering the task that last released it (-1: never used) for the critical path.
    ready: dict[str, list[tuple[float, int]]] = {r: [] for r in resources}
    units: dict[str, list[int]] = {r: [-1] * int(capacities.get(r, 1)) for r in resources}
    start_s = [0.0] * n
    end_s = [0.0] * n
    unit_pred = [-1] * n     # task that released the unit this task ran on
    mem_pred = [-1] * n      # task whose free let this task fit under the cap
    last_freer = {p: -1 for p in pools}
    blocked: set[str] = set()  # resources whose head task waits for memory
    running: list[tuple[float, int, int]] = []  # heap of (end_s, start sequence, index)
    events: list[TraceEvent] = []

    def fits(i: int) -> bool:
        for p, n_bytes in tasks[i].alloc.items():
            if p in mem_limit and in_use[p] + n_bytes > mem_limit[p]:
                return False
        return True

    def change(p: str, delta: int, t_s: float, i: int) -> None:
        in_use[p] += delta
        if in_use[p] < 0:
            raise ValueError(f"task {tasks[i].name!r} frees more bytes of pool {p!r} than are "
                             f"in use (would leave {in_use[p]})")
        peak[p] = max(peak[p], in_use[p])
        timeline[p].append((t_s, in_use[p]))

    def dispatch(t_s: float, check: set[str]) -> None:
        # One candidate per resource at a time, served in (priority, index) order across
        # resources, so that under a memory cap the most urgent task gets the bytes first.
        cand = [(ready[r][0][0], ready[r][0][1], r) for r in check if units[r] and ready[r]]
        heapq.heapify(cand)
        while cand:
            _, i, r = heapq.heappop(cand)
            if not fits(i):
                blocked.add(r)
                continue
            if r in blocked:
                blocked.discard(r)
                mem_pred[i] = max((last_freer[p] for p in tasks[i].alloc if p in mem_limit),
                                  key=lambda j: end_s[j] if j >= 0 else -1.0, default=-1)
            heapq.heappop(ready[r])
            unit_pred[i] = units[r].pop()
            task = tasks[i]
            start_s[i] = t_s
            end_s[i] = t_s + task.duration_s
            for p, n_bytes in task.alloc.items():
                change(p, n_bytes, t_s, i)
            events.append(TraceEvent(task.name, r, t_s, end_s[i], task.cat, dict(task.args)))
            heapq.heappush(running, (end_s[i], len(events), i))
            if units[r] and ready[r]:
                heapq.heappush(cand, (ready[r][0][0], ready[r][0][1], r))

    for i, t in enumerate(tasks):
        if waiting[i] == 0:
            heapq.heappush(ready[t.resource], (t.priority, i))
    dispatch(0.0, set(resources))

    finished = 0
    while running:
        t_s = running[0][0]
        check: set[str] = set()
        freed = False
        # Everything ending now finishes before anything starts now (frees before allocs).
        while running and running[0][0] == t_s:
            _, _, i = heapq.heappop(running)
            finished += 1
            task = tasks[i]
            units[task.resource].append(i)
            check.add(task.resource)
            for p, n_bytes in task.free.items():
                change(p, -n_bytes, t_s, i)
                last_freer[p] = i
                freed = True
            for s in succs[i]:
                waiting[s] -= 1
                if waiting[s] == 0:
                    heapq.heappush(ready[tasks[s].resource], (tasks[s].priority, s))
                    check.add(tasks[s].resource)
        if freed:
            check |= blocked
        dispatch(t_s, check)

    if finished < n:
        r = min(blocked) if blocked else next(r for r in resources if ready[r])
        i = ready[r][0][1]
        need = ", ".join(f"{p}: needs {b}, in use {in_use[p]}, limit {mem_limit[p]}"
                         for p, b in tasks[i].alloc.items()
                         if p in mem_limit and in_use[p] + b > mem_limit[p])
        raise ValueError(f"memory deadlock: task {tasks[i].name!r} on {r!r} can never fit "
                         f"({need}) and no running task will free enough; "
                         f"{n - finished} tasks did not run")

    step_s = max(end_s, default=0.0)
    busy_s = {r: 0.0 for r in resources}
    for t in tasks:
        busy_s[t.resource] += t.duration_s
    utilisation = {r: busy_s[r] / (step_s * capacities.get(r, 1)) if step_s > 0 else 0.0
                   for r in resources}
    return SimResult(
        step_s=step_s,
        events=events,
        critical_path=_critical_path(dep_idx, unit_pred, mem_pred, end_s, tasks),
        utilisation=utilisation,
        peak_bytes=peak,
        memory_timeline=timeline,
    )


def _critical_path(dep_idx, unit_pred, mem_pred, end_s, tasks) -> list[str]:
    if not tasks:
        return []
    # Last-finishing task; among equal ends the later in the input, which is the more
    # downstream one for graphs listed in topological order.
    i = max(range(len(tasks)), key=lambda j: (end_s[j], j))
    path = [i]
    while True:
        preds = [*dep_idx[i], unit_pred[i], mem_pred[i]]
        preds = [j for j in preds if j >= 0]
        if not preds:
            break
        # Dependencies come first in the list, so max() prefers a dependency on ties.
        i = max(preds, key=lambda j: end_s[j])
        path.append(i)
    return [tasks[j].name for j in reversed(path)]

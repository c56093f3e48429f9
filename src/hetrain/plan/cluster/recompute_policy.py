"""Choosing what each pipeline stage drops and where it recomputes it: a fast heuristic and an exact MILP.

A stage's problem (`StageProblem`): its identical blocks (their units' bytes and recompute times,
hetrain.plan.cluster.recompute_units), the micro-batches it holds at its peak (`inflight`), the bytes its
activations may take, the waits before each of its backwards (the windows, from
hetrain.plan.cluster.one_f_one_b; none on the last stage) and, with tensor parallelism, each
block's collective window (its backward's two input-gradient all-reduces). A policy costs, per
step, sum over micro-batches of max(0, ahead - window) + micro-batches x what lengthens each
backward: on-demand recomputation, and what collective regions overrun their window (a block's,
inside the next block's all-reduces; the last block's attention side inside its own MLP's, its MLP
side on demand). Memory: every micro-batch in flight keeps what its blocks do not drop, the
micro-batch whose backward comes next also holds what was recomputed ahead of it, and a backward
holds what its all-reduces restored early. At tp > 1 nothing that reruns a row-parallel
projection (its all-reduce) is recomputed ahead or inside another all-reduce.

- `heuristic` (HEU) picks at most two unit sets for the stage's identical blocks (any of the 2^7
  subsets of units), how many blocks drop each and how many of those recompute ahead (as many as
  memory allows, those saving most seconds per byte first); the others recompute in the backward,
  inside the all-reduces where they can. Each choice is priced in closed form, so a stage takes
  about a millisecond whatever its block count.
- `optimal` (OPT) is a MILP over every block's every unit (keep, window, collective, demand), with
  the exact region rules (a run of adjacent dropped units is one recomputation, in one place; a
  region's last step reruns when it saves tensors of its own, but for a projection's dropout
  mask, which stays outside unless the block is recomputed whole on demand), solved by HiGHS through
  scipy.optimize.milp. It is meant for small cases: it measures how far HEU is from the optimum.

`plan_pipeline` chooses every stage's policy in rounds: windows from the schedule of the current
choice, each stage's policy against them, until the predicted step stops improving. This module
chooses; it must not run policies (hetrain.pipeline.unit_recompute) or write plans.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import time
from dataclasses import dataclass, field

import numpy as np

from hetrain.plan.cluster.recompute_plan import (COLLECTIVE, DEMAND, NOT_COLLECTIVE, ROW_STEPS, STEPS, UNITS, WINDOW,
                                                 BlockPolicy)
from hetrain.plan.cluster.one_f_one_b import StageTimes, simulate
from hetrain.plan.cluster.recompute_units import (BlockUnits, policy_cost, region_input_extra, reruns_row_parallel,
                                                  stage_cost)

_PROJ = STEPS.index("proj")
MIB = 2.0 ** 20


@dataclass(frozen=True)
class StageProblem:
    n_blocks: int
    units: BlockUnits
    """One block's steps, bytes per device for one micro-batch."""
    step_s: tuple[float, ...]
    """Each step's recompute seconds for one micro-batch."""
    inflight: int
    act_budget_bytes: float
    """Bytes the stage's block activations may take at its peak (all micro-batches in flight,
    plus what is held ahead of the next backward)."""
    n_microbatches: int
    windows_s: tuple[float, ...] = ()
    """Wait before each backward; empty: the stage has no wait (the last stage)."""
    collective_window_s: float = 0.0
    """Per block, the all-reduces of its backward, inside which the block before it may recompute
    (0 without tensor parallelism)."""
    tp: int = 1
    """With tensor parallelism, nothing that reruns an all-reduce (NOT_COLLECTIVE) is recomputed
    ahead: each TP rank stops when its own gradient arrives, so their all-reduces would not pair up."""

    @property
    def has_windows(self) -> bool:
        return bool(self.windows_s)


@dataclass
class StageChoice:
    policies: list[BlockPolicy]
    window_s: float
    """Recomputation ahead of each backward (all blocks, one micro-batch)."""
    demand_s: float
    """Recomputation that lengthens each backward: on demand, and what collective regions leave
    outside their windows."""
    freed_bytes: int
    """Per micro-batch, all blocks."""
    held_bytes: int
    """Restored ahead of a backward and held until it, plus one block's collective regions."""
    cost_s: float
    """Exposed recomputation per step against the problem's windows."""
    fits: bool = True
    search_s: float = 0.0
    note: str = ""
    collective_s: float = 0.0
    """Collective regions' seconds per micro-batch, all blocks."""
    collective_hidden_s: float = 0.0
    """Of collective_s, what runs inside the all-reduces."""


def _exposure(sorted_windows: list[float], prefix: list[float], ahead_s: float) -> float:
    """sum over windows of max(0, ahead_s - w), windows sorted ascending with prefix sums."""
    k = bisect.bisect_left(sorted_windows, ahead_s)
    return k * ahead_s - prefix[k]


def _windows(problem: StageProblem) -> tuple[list[float], list[float]]:
    ws = sorted(problem.windows_s)
    return ws, [0.0, *itertools.accumulate(ws)]


def choice_of(problem: StageProblem, policies: list[BlockPolicy]) -> StageChoice:
    """Totals and cost of a given per-block policy list (the last stage recomputes its window
    regions on demand)."""
    policies = _last_mlp_side_on_demand(policies)
    c = stage_cost(policies, problem.units, problem.step_s, problem.collective_window_s)
    window, demand, held = c.window_s, c.backward_s, c.window_freed_bytes
    if not problem.has_windows:
        demand, window, held = demand + window, 0.0, 0
    held += c.collective_held_bytes
    ws, prefix = _windows(problem)
    cost = _exposure(ws, prefix, window) + problem.n_microbatches * demand
    kept = problem.n_blocks * problem.units.total_bytes - c.freed_bytes
    fits = problem.inflight * kept + held <= problem.act_budget_bytes
    return StageChoice(list(policies), window, demand, c.freed_bytes, held, cost, fits,
                       collective_s=c.collective_s, collective_hidden_s=c.collective_hidden_s)


def _last_mlp_side_on_demand(policies: list[BlockPolicy]) -> list[BlockPolicy]:
    """The stage's last block has no block after it: its MLP-side collective regions are recomputed
    on demand (the same cost), so they are written so."""
    if not policies or COLLECTIVE not in policies[-1].places:
        return list(policies)
    places = list(policies[-1].places)
    for a, b, place in policies[-1].regions():
        if place == COLLECTIVE and b > _PROJ:
            places[a:b] = [DEMAND] * (b - a)
    return [*policies[:-1], BlockPolicy(tuple(places))]


def _lower_hull(points: list[tuple[int, float, int]]) -> list[tuple[int, float, int]]:
    """Lower convex hull of (freed bytes, seconds, mask) points, by freed bytes ascending."""
    hull: list[tuple[int, float, int]] = []
    for p in sorted(points):
        while len(hull) >= 2:
            (f1, c1, _), (f2, c2, _) = hull[-2], hull[-1]
            if (c2 - c1) * (p[0] - f1) >= (p[1] - c1) * (f2 - f1):  # hull[-1] is not below the chord
                hull.pop()
            else:
                break
        if not hull or p[0] > hull[-1][0]:
            hull.append(p)
    return hull


def heuristic(problem: StageProblem) -> StageChoice:
    """HEU: the stage's identical blocks take at most two unit sets, `upper` on k of them and
    `lower` on the rest, and as many of them as memory allows recompute ahead (those that save the
    most seconds per byte held first). A set not recomputed ahead is recomputed in the backward:
    with tensor parallelism, its regions that need no all-reduce of their own inside the next
    block's all-reduces (collective), the others on demand. The pairs tried: keep with any of the
    127 unit sets (one policy for every dropping block), neighbours on the lower convex hull of
    (bytes freed, seconds on the backward) per block (what an exact split of identical blocks
    between policies uses), and each hull point with the set that frees most. Each is priced in
    closed form against the sorted windows; the stage's last block, whose collective regions have
    no window, is placed ahead when any block is."""
    t0 = time.perf_counter()
    n, m, inflight = problem.n_blocks, problem.n_microbatches, problem.inflight
    total, budget = problem.units.total_bytes, problem.act_budget_bytes
    if inflight * n * total <= budget:
        return StageChoice([BlockPolicy.keep()] * n, 0.0, 0.0, 0, 0, 0.0, True, time.perf_counter() - t0)
    ws, prefix = _windows(problem)
    sets, pairs = _menu(problem.units, problem.step_s, problem.collective_window_s, problem.tp)
    windows = problem.has_windows
    best_key, best = None, None
    for first, second, upper_first, held_upper, held_lower, held_both in pairs:
        f_a, sec_a, mask_a, u_a, ok_a = first
        f_b, sec_b, mask_b, u_b, ok_b = second
        # A block recomputed ahead holds what it restores until its backward, and frees
        # f - u.ahead_freed less in every micro-batch in flight (a whole block ahead keeps its
        # last dropout mask, keeps_tail).
        per_a = u_a.ahead_freed + inflight * (f_a - u_a.ahead_freed) if windows and ok_a else 0
        per_b = u_b.ahead_freed + inflight * (f_b - u_b.ahead_freed) if windows and ok_b else 0
        for k in range(n + 1):  # blocks on `upper`
            count_a, count_b = (k, n - k) if upper_first else (n - k, k)
            held = held_both if 0 < k < n else (held_upper if k else held_lower)
            room = budget - inflight * (n * total - count_a * f_a - count_b * f_b) - held
            if room < 0:
                continue
            j_a = min(count_a, int(room // per_a)) if per_a > 0 else 0
            room -= j_a * per_a
            j_b = min(count_b, int(room // per_b)) if per_b > 0 else 0
            room -= j_b * per_b
            ahead = j_a * u_a.ahead_s + j_b * u_b.ahead_s
            backward = (count_a - j_a) * sec_a + (count_b - j_b) * sec_b
            if not j_a and not j_b:  # the last block recomputes its collective units unhidden
                backward += (u_b if count_b else u_a).last_extra_s
            cost = _exposure(ws, prefix, ahead) + m * backward
            key = (round(cost, 12), round(ahead + backward, 12), -room)
            if best_key is None or key < best_key:
                best_key, best = key, ((mask_a, count_a, j_a), (mask_b, count_b, j_b))
    if best is None:
        whole = choice_of(problem, [BlockPolicy.whole()] * n)
        whole.fits, whole.note = False, "does not fit even with every block recomputed"
        whole.search_s = time.perf_counter() - t0
        return whole
    policies = [sets[mask].in_backward for mask, count, j in best for _ in range(count - j)]
    policies += [BlockPolicy(_places(mask, WINDOW)) for mask, count, j in best for _ in range(j)]
    choice = choice_of(problem, policies)
    choice.search_s = time.perf_counter() - t0
    return choice


@functools.lru_cache(maxsize=256)
def _menu(units: BlockUnits, step_s: tuple[float, ...], collective_window_s: float,
          tp: int) -> tuple[dict[int, "_UnitSet"], list]:
    """HEU's unit sets by mask and the (lower, upper) pairs it tries, each as its two groups in the
    order they go ahead ((bytes freed, backward s, mask, unit set, may go ahead) each), whether
    upper comes first, and the bytes held with upper only, lower only and both: what does not
    depend on the stage's block count, budget or windows, so the stages of one kind and TP degree
    share it (a recomputation-aware split prices the same stage kind for every split and round)."""
    options, sets = [(0, 0.0, 0)], {0: _UnitSet(0, 0.0, 0.0, 0.0, 0, BlockPolicy.keep(), False, 0)}
    for mask in range(1, 2 ** len(UNITS)):
        u = _unit_set(mask, units, list(step_s), collective_window_s, tp)
        sets[mask] = u
        options.append((u.freed, u.backward_s, mask))
    hull = _lower_hull(options)
    most = max(options[1:])
    pairs = {(options[0], o) for o in options[1:]}
    pairs |= {(lo, up) for lo, up in zip(hull, hull[1:])}
    pairs |= {(h, most) for h in hull if h[0] < most[0]}
    def group(option):
        f, sec, mask = option
        return f, sec, mask, sets[mask], f > 0 and sec > 0 and sets[mask].ahead_ok

    menu = []
    for lower, upper in pairs:  # the set's own order, as HEU always walked it (ties keep the first)
        u_up, u_lo = sets[upper[2]], sets[lower[2]]
        # The group that saves the most seconds per byte goes ahead first (upper on a tie).
        upper_first = _per_byte(upper) <= _per_byte(lower)
        ordered = (group(upper), group(lower)) if upper_first else (group(lower), group(upper))
        menu.append((*ordered, upper_first, u_up.collective_held + u_up.own_held,
                     u_lo.collective_held + u_lo.own_held,
                     max(u_up.collective_held, u_lo.collective_held) + max(u_up.own_held, u_lo.own_held)))
    return sets, menu


def _per_byte(option: tuple[int, float, int]) -> float:
    """HEU's order of recomputing ahead: most seconds saved per byte first (the lowest key)."""
    f, sec, _ = option
    return -(sec / f) if f else 0.0


@dataclass(frozen=True)
class _UnitSet:
    """One unit set of HEU's, per block and micro-batch."""

    freed: int
    """Bytes it frees per micro-batch, recomputed in the backward."""
    ahead_s: float
    """Its recomputation ahead of the backward, all of it (what it puts in a window)."""
    backward_s: float
    """What it adds to the backward of a block with a block after it."""
    last_extra_s: float
    """What it adds more on the stage's last block (no block after it: only its attention side
    has a window, its own MLP's all-reduce)."""
    collective_held: int
    in_backward: BlockPolicy
    ahead_ok: bool
    """May be recomputed ahead of the backward (nothing in it reruns a TP all-reduce)."""
    ahead_freed: int
    """Bytes it frees recomputed ahead: `freed`, less a whole block's last dropout mask, which a
    whole block in a window keeps (keeps_tail) and one on demand frees."""
    own_held: int = 0
    """Its attention side's collective bytes (restored early, held with the previous block's)."""


def _unit_set(mask: int, units: BlockUnits, steps: list[float], collective_window_s: float, tp: int) -> _UnitSet:
    demand = BlockPolicy(_places(mask, DEMAND))
    c = policy_cost(demand, units, steps)
    regions = demand.regions()
    ahead_ok = tp == 1 or not any(reruns_row_parallel(a, b) for a, b, _ in regions)
    ahead = policy_cost(BlockPolicy(_places(mask, WINDOW)), units, steps)
    if collective_window_s <= 0:
        return _UnitSet(c.freed_bytes, ahead.window_s, c.demand_s, 0.0, 0, demand, ahead_ok, ahead.freed_bytes)
    places = list(demand.places)
    for a, b, _ in regions:
        if not reruns_row_parallel(a, b):
            places[a:b] = [COLLECTIVE] * (b - a)
    policy = BlockPolicy(tuple(places))
    pc = policy_cost(policy, units, steps)
    hidden = min(pc.collective_s, collective_window_s)
    last_hidden = min(pc.own_s, collective_window_s / 2)  # the last block: its attention side, in its own MLP's
    return _UnitSet(pc.freed_bytes, ahead.window_s, pc.demand_s + pc.collective_s - hidden, hidden - last_hidden,
                    pc.collective_freed_bytes, policy, ahead_ok, ahead.freed_bytes, pc.own_freed_bytes)


def _places(mask: int, place: str) -> tuple[str | None, ...]:
    return tuple(place if mask >> k & 1 else None for k in range(len(UNITS)))


def optimal(problem: StageProblem, time_limit_s: float = 60.0) -> StageChoice:
    """OPT: the MILP over every block's every unit (see the module docstring), HiGHS via scipy."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    t0 = time.perf_counter()
    n, m, inflight = problem.n_blocks, problem.n_microbatches, problem.inflight
    steps, t = problem.units.steps, problem.step_s
    K, J = len(UNITS), len(STEPS)
    # Bytes in MiB: coefficients of 1e8 beside binaries and seconds made HiGHS stop at a
    # solution it called optimal that a feasible one beat by 3x (a TP 2 case with attention dropout).
    out = [s.out_bytes / MIB for s in steps]
    internal = [s.int_bytes / MIB for s in steps]

    def extra(j: int) -> float:
        return region_input_extra(steps, j) / MIB

    cw = problem.collective_window_s
    places = ((WINDOW,) if problem.has_windows else ()) + (DEMAND,) + ((COLLECTIVE,) if cw > 0 else ())
    index: dict[tuple, int] = {}

    def var(*key) -> int:
        if key not in index:
            index[key] = len(index)
        return index[key]

    for b in range(n):
        for p in places:
            for k in range(K):
                var("x", b, p, k)  # unit k of block b dropped, recomputed at p
            for j in range(J):
                var("i", b, p, j)  # step j's own tensors freed by a region at p
                var("r", b, p, j)  # step j reruns at p
                var("s", b, p, j)  # a region at p starts at step j (it keeps its input)
        var("w", b)  # block b recomputed whole on demand: torch's checkpoint of the block (keeps_tail)
    n_bin = len(index)
    windows = list(problem.windows_s) if problem.has_windows else []
    for w in range(len(windows)):
        var("e", w)
    if cw > 0:
        for b in range(n):
            var("c", b)  # collective seconds of block b outside its window
        var("h")  # MiB of the largest block's collective regions (restored one block early)
    nv = len(index)
    rows, lo, hi = [], [], []

    def row(coeffs: dict[int, float], lower: float, upper: float) -> None:
        r = np.zeros(nv)
        for i, v in coeffs.items():
            r[i] += v
        rows.append(r)
        lo.append(lower)
        hi.append(upper)

    for b in range(n):
        w = var("w", b)  # w = 1 exactly when every unit of block b is dropped on demand
        row({w: 1, **{var("x", b, DEMAND, k): -1 / K for k in range(K)}}, -math.inf, 0)
        row({w: 1, **{var("x", b, DEMAND, k): -1 for k in range(K)}}, 1 - K, math.inf)
        for k in range(K):
            row({var("x", b, p, k): 1 for p in places}, 0, 1)
            if k + 1 < K:  # adjacent dropped units share a place
                for p, q in itertools.permutations(places, 2):
                    row({var("x", b, p, k): 1, var("x", b, q, k + 1): 1}, 0, 1)
        for p in places:
            for j in range(J):
                # Freed only inside a region; a region ending at a row-parallel step keeps that
                # step's own tensors (its dropout mask) outside it, unless it is the whole block
                # on demand (keeps_tail).
                tail = j in ROW_STEPS
                whole_tail = tail and p == DEMAND and j == J - 1  # down, freed by a whole block on demand
                around = {var("x", b, p, k): -1 for k in ((j,) if tail else (j - 1, j)) if 0 <= k < K}
                if whole_tail:
                    around[var("w", b)] = -1
                row({var("i", b, p, j): 1, **around}, -math.inf, 0)
                if j < K:
                    row({var("r", b, p, j): 1, var("x", b, p, j): -1}, 0, math.inf)
                if j > 0 and internal[j] and not tail:  # the last step reruns to give back its internals
                    row({var("r", b, p, j): 1, var("x", b, p, j - 1): -1}, 0, math.inf)
                elif whole_tail and internal[j]:
                    row({var("r", b, p, j): 1, var("w", b): -1}, 0, math.inf)
                if 0 < j < K:  # s >= x_j - (x_{j-1} at any place)
                    row({var("s", b, p, j): 1, var("x", b, p, j): -1, **{var("x", b, q, j - 1): 1 for q in places}},
                        0, math.inf)

    def no_row_parallel(place: str) -> None:
        """Nothing placed at `place` reruns a row-parallel step (proj, down: a TP all-reduce)."""
        for b in range(n):
            for k in (UNITS.index(u) for u in NOT_COLLECTIVE):
                row({var("x", b, place, k): 1}, 0, 0)
            for j in (STEPS.index("proj"), STEPS.index("down")):
                row({var("r", b, place, j): 1}, 0, 0)

    if problem.tp > 1 and problem.has_windows:  # no TP all-reduce recomputed ahead
        no_row_parallel(WINDOW)
    if cw > 0:  # nor inside another all-reduce
        no_row_parallel(COLLECTIVE)

        def restored(b: int, ks, js) -> dict[int, float]:
            """Bytes of block b's collective regions over units ks and steps js."""
            got = {var("x", b, COLLECTIVE, k): out[k] for k in ks}
            got |= {var("i", b, COLLECTIVE, j): internal[j] for j in js}
            got |= {var("s", b, COLLECTIVE, j): -extra(j) for j in js if j > 0}
            return got

        for b in range(n):  # h >= block b's attention side + all of block b - 1's, restored at once
            held = restored(b, range(_PROJ), range(_PROJ + 1))
            if b > 0:
                held |= restored(b - 1, range(K), range(J))
            row({var("h"): 1, **{i: -v for i, v in held.items()}}, 0, math.inf)
    # Memory: inflight x kept + held ahead <= budget.
    mem: dict[int, float] = {}
    for b in range(n):
        for p in places:
            for k in range(K):
                mem[var("x", b, p, k)] = mem.get(var("x", b, p, k), 0) - inflight * out[k] + \
                    (out[k] if p == WINDOW else 0)
            for j in range(J):
                mem[var("i", b, p, j)] = -inflight * internal[j] + (internal[j] if p == WINDOW else 0)
                mem[var("s", b, p, j)] = inflight * extra(j) - (extra(j) if p == WINDOW else 0)
    if cw > 0:
        mem[var("h")] = 1
    row(mem, -math.inf, (problem.act_budget_bytes - inflight * n * problem.units.total_bytes) / MIB)
    c = np.zeros(nv)
    eps = 1e-3
    for b in range(n):
        for j in range(J):
            if problem.has_windows:
                c[var("r", b, WINDOW, j)] += eps * t[j]
            c[var("r", b, DEMAND, j)] += (m + eps) * t[j]
            if cw > 0:  # the last block's MLP side has no window
                c[var("r", b, COLLECTIVE, j)] += ((m if b == n - 1 and j > _PROJ else 0) + eps) * t[j]
    for b in range(n if cw > 0 else 0):  # c_b >= collective seconds of block b - window
        c[var("c", b)] = m
        if b < n - 1:  # inside the next block's two all-reduces
            row({var("c", b): 1, **{var("r", b, COLLECTIVE, j): -t[j] for j in range(J)}}, -cw, math.inf)
        else:  # the last block's attention side, inside its own MLP's all-reduce
            row({var("c", b): 1, **{var("r", b, COLLECTIVE, j): -t[j] for j in range(_PROJ + 1)}}, -cw / 2,
                math.inf)
    for w, window in enumerate(windows):  # e_w >= ahead - window
        c[var("e", w)] = 1.0
        row({var("e", w): 1, **{var("r", b, WINDOW, j): -t[j] for b in range(n) for j in range(J)}},
            -window, math.inf)
    integrality = np.array([1] * n_bin + [0] * (nv - n_bin))
    upper = np.array([1.0] * n_bin + [math.inf] * (nv - n_bin))
    res = milp(c, constraints=LinearConstraint(np.array(rows), lo, hi), integrality=integrality,
               bounds=Bounds(np.zeros(nv), upper), options={"time_limit": time_limit_s})
    if res.x is None:
        choice = choice_of(problem, [BlockPolicy.whole()] * n)
        choice.fits, choice.note = False, f"no feasible policy ({res.message})"
        choice.search_s = time.perf_counter() - t0
        return choice
    policies = []
    for b in range(n):
        placed = []
        for k in range(K):
            at = [p for p in places if res.x[var("x", b, p, k)] > 0.5]
            placed.append(at[0] if at else None)
        policies.append(BlockPolicy(tuple(placed)))
    choice = choice_of(problem, policies)
    choice.search_s = time.perf_counter() - t0
    choice.note = "optimal" if res.status == 0 else f"time limit ({res.message})"
    return choice


@dataclass
class PipelineRecompute:
    """Every stage's choice and the predicted step of the pipeline's schedule (compute part)."""

    choices: list[StageChoice]
    schedule_s: float
    ends_s: list[float] = field(default_factory=list)
    """When each stage's last backward ends."""
    hidden_s: list[float] = field(default_factory=list)
    exposed_s: list[float] = field(default_factory=list)
    rounds: int = 0
    search_s: float = 0.0


def plan_pipeline(base: list[StageTimes], problem_of, n_microbatches: int, method: str = "heu",
                  rounds: int = 4) -> PipelineRecompute:
    """Choose every stage's policy in rounds against the windows of the current choice.

    `base` holds each stage's times without recomputation; `problem_of(s, windows)` returns stage
    s's StageProblem for those windows (empty windows on the last stage). `method` is "heu" or
    "opt". Keeps the round with the shortest predicted step."""
    t0 = time.perf_counter()
    choose = heuristic if method == "heu" else optimal
    times = list(base)
    best: PipelineRecompute | None = None
    last = len(base) - 1
    seen: set = set()
    sched = simulate(times, n_microbatches)
    for r in range(rounds):
        choices = [choose(problem_of(s, tuple(sched.windows_s[s]) if s < last else ())) for s in range(len(base))]
        times = [StageTimes(b.fwd_s, b.bwd_s, ch.window_s, ch.demand_s) for b, ch in zip(base, choices)]
        result = sched = simulate(times, n_microbatches)  # the next round's windows
        candidate = PipelineRecompute(choices, result.step_s, result.ends_s, result.hidden_s, result.exposed_s, r + 1)
        if best is None or candidate.schedule_s < best.schedule_s - 1e-12:
            best = candidate
        key = tuple((round(ch.window_s, 12), round(ch.demand_s, 12)) for ch in choices)
        if key in seen:
            break
        seen.add(key)
    best.search_s = time.perf_counter() - t0
    return best

"""One pipeline's 1F1B step in closed recurrences, with or without recomputation ahead of backwards.

Every stage runs its operations in 1F1B order (`one_f_one_b_orders`: min(S - 1 - s, m) warm-up
forwards, then one forward and one backward in turn, then the remaining backwards); a forward
needs the previous stage's forward of the same micro-batch, a backward the next stage's backward;
each operation's time includes its send to the neighbour (a send holds the sender). Both
recurrences work round by round over all stages at once: warm-up forward j runs down the stages
that have it, each after its predecessor's; round i runs each stage's next forward (after its
predecessor's forward of that micro-batch: no chain within the round), then backward i from the
last stage to the first, x_s = max(a_s, x_{s+1}) + b_s, a cumulative maximum over suffix sums.

- `one_f_one_b_end_s`: when each stage's last operation ends (the cluster predictor's
  `pipeline_step_s`, called for every split the search tries). Rounds in which every stage has
  a forward apply the same max-plus map, so once a round shifts every time by the same amount,
  all later such rounds do too, and they are skipped to the last.
- `simulate`: the same with recomputation. A stage may recompute part of a micro-batch's dropped
  activations ahead of that micro-batch's backward (`window_s`): that work starts as soon as the
  stage's previous operation ends, without waiting for the gradient, and the backward starts when
  both it and the gradient are there; the part that fits in the wait is hidden, the rest exposed;
  `demand_s` runs inside every backward. The last stage has no such wait (its loss comes right
  before its backward), so its ahead work is on demand. It returns, per stage and micro-batch,
  the wait before each backward as it would be without recomputation ahead (the window).

Tests hold both equal to a walk of the operations and to the discrete-event simulator that the
predictor uses. This module computes times; it must not choose anything or know about units.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def one_f_one_b_orders(n_stages: int, n_microbatches: int) -> list[list[tuple[bool, int]]]:
    """Per stage, its operations in 1F1B order as (is_forward, micro-batch)."""
    orders = []
    for s in range(n_stages):
        warmup = min(n_stages - s - 1, n_microbatches)
        ops = [(True, i) for i in range(warmup)]
        for i in range(n_microbatches - warmup):
            ops.append((True, warmup + i))
            ops.append((False, i))
        ops.extend((False, i) for i in range(n_microbatches - warmup, n_microbatches))
        orders.append(ops)
    return orders


class _Rounds:
    """The state of the recurrences: each stage's clock (end of its latest operation) and the end
    of its latest forward, advanced by warm-up, forward rounds and backward chains."""

    def __init__(self, fwd: np.ndarray, bwd: np.ndarray, n_microbatches: int):
        n = len(fwd)
        self.fwd, self.m = fwd, n_microbatches
        self.warmup = np.minimum(n - 1 - np.arange(n), n_microbatches)
        self.clock, self.last_fwd = np.zeros(n), np.zeros(n)
        self.bwd_from = np.cumsum(bwd[::-1])[::-1]  # backward times of stages s..S-1
        self.bwd_after = self.bwd_from - bwd
        fwd_through = np.cumsum(fwd)  # forward times of stages 0..s
        fwd_before = fwd_through - fwd
        for j in range(int(self.warmup[0]) if n else 0):
            k = int(np.count_nonzero(self.warmup > j))  # stages 0..k-1 run warm-up forward j
            self.clock[:k] = self.last_fwd[:k] = fwd_through[:k] + np.maximum.accumulate(
                self.clock[:k] - fwd_before[:k])

    def forward(self, i: int) -> None:
        """Round i's forwards, on the stages that still have one."""
        has_fwd = i + self.warmup < self.m
        after_prev = np.maximum(self.clock, np.concatenate(([0.0], self.last_fwd[:-1]))) + self.fwd
        self.clock = np.where(has_fwd, after_prev, self.clock)
        self.last_fwd = np.where(has_fwd, after_prev, self.last_fwd)

    def backward(self, ready: np.ndarray) -> np.ndarray:
        """Round i's backward chain, stage s starting once `ready[s]` and the gradient are there."""
        return self.bwd_from + np.maximum.accumulate((ready - self.bwd_after)[::-1])[::-1]


def one_f_one_b_end_s(fwd_s: list[float], bwd_s: list[float], n_microbatches: int) -> list[float]:
    """End time of each stage's last operation under 1F1B (sends inside fwd/bwd), from time 0."""
    r = _Rounds(np.asarray(fwd_s, dtype=float), np.asarray(bwd_s, dtype=float), n_microbatches)
    m = n_microbatches
    full_rounds = m - int(r.warmup[0])
    previous = None
    i = 0
    while i < m:
        r.forward(i)
        r.clock = r.backward(r.clock)
        if i < full_rounds - 1:
            state = np.concatenate((r.clock, r.last_fwd))
            if previous is not None and np.ptp(state - previous) <= 1e-13 * state.max():
                skip = full_rounds - 1 - i
                shift = skip * (state[0] - previous[0])
                r.clock, r.last_fwd = r.clock + shift, r.last_fwd + shift
                i += skip
                state = None
            previous = state
        i += 1
    return r.clock.tolist()


@dataclass(frozen=True)
class StageTimes:
    """One stage's work per micro-batch."""

    fwd_s: float
    """Forward, with the send to the next stage."""
    bwd_s: float
    """Backward without recomputation, with the send to the previous stage."""
    window_s: float = 0.0
    """Recomputation ahead of the backward (in the wait for the gradient)."""
    demand_s: float = 0.0
    """Recomputation inside the backward."""


@dataclass
class ScheduleTimes:
    ends_s: list[float]
    """When each stage's last operation ends."""
    windows_s: list[list[float]] = field(default_factory=list)
    """Per stage, per micro-batch: how long the stage waited for the gradient before that backward,
    counted from the end of its previous operation (what recomputation ahead can fill)."""
    hidden_s: list[float] = field(default_factory=list)
    """Per stage: recomputation ahead that ran while the gradient was on its way (whole step)."""
    exposed_s: list[float] = field(default_factory=list)
    """Per stage: recomputation on the critical path of the stage (ahead beyond its wait, plus demand)."""

    @property
    def step_s(self) -> float:
        return max(self.ends_s)


def simulate(stages: list[StageTimes], n_microbatches: int) -> ScheduleTimes:
    """The 1F1B step of these stages with recomputation ahead and on demand (module docstring):
    backward i of stage s ends at max(clock_s + window_s, x_{s+1}) + bwd_s + demand_s, and its
    wait is x_{s+1} - clock_s."""
    m = n_microbatches
    ahead = np.array([st.window_s for st in stages], dtype=float)
    demand = np.array([st.demand_s for st in stages], dtype=float)
    r = _Rounds(np.array([st.fwd_s for st in stages], dtype=float),
                np.array([st.bwd_s for st in stages], dtype=float) + demand, m)
    windows = np.zeros((len(stages), m))
    for i in range(m):
        r.forward(i)
        ends = r.backward(r.clock + ahead)
        windows[:-1, i] = np.maximum(0.0, ends[1:] - r.clock[:-1])
        r.clock = ends
    hidden = np.minimum(windows, ahead[:, None]).sum(axis=1)
    exposed = np.maximum(0.0, ahead[:, None] - windows).sum(axis=1) + m * demand
    return ScheduleTimes(r.clock.tolist(), windows.tolist(), hidden.tolist(), exposed.tolist())

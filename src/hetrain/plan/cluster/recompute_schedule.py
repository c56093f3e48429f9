"""One pipeline's 1F1B step with recomputation ahead of backwards, and the waits it leaves.

The model is the cluster predictor's (hetrain.plan.cluster.predict): every stage runs its
operations in 1F1B order (`one_f_one_b_orders`); a forward needs the previous stage's forward of
the same micro-batch, a backward the next stage's backward; each operation's time includes its
send to the neighbour (a send holds the sender). On top of it, a stage may recompute part of a
micro-batch's dropped activations ahead of that micro-batch's backward (`window_s`): that work
starts as soon as the stage's previous operation ends, without waiting for the gradient, and the
backward starts when both it and the gradient are there. So the part of it that fits in the wait
for the gradient is hidden, the rest is exposed; `demand_s` runs inside every backward. The last
stage has no such wait (its loss comes right before its backward), so its ahead work is on demand.

`simulate` returns the end of each stage and, per stage and micro-batch, the wait before its
backward as it would be without recomputation ahead (the window), and the hidden and exposed
seconds (the last stage's windows are 0: its ahead work is exposed). It is a direct recurrence
over the rounds of the schedule, vectorised over the stages, fast enough to sit inside searches;
tests hold it equal to the discrete-event simulator that the predictor uses. This module computes
times; it must not choose policies or know about units.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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
    """The 1F1B step of these stages (see the module docstring).

    Round by round over all stages at once, as hetrain.plan.cluster.predict.one_f_one_b_end_s:
    warm-up forward j runs down the stages that have it; round i runs each stage's next forward
    (after its predecessor's forward of that micro-batch), then backward i from the last stage to
    the first, x_s = max(clock_s + window_s, x_{s+1}) + bwd_s + demand_s, a cumulative maximum
    over suffix sums; the wait of stage s before it is x_{s+1} - clock_s."""
    n_stages, m = len(stages), n_microbatches
    fwd = np.array([st.fwd_s for st in stages], dtype=float)
    ahead = np.array([st.window_s for st in stages], dtype=float)
    demand = np.array([st.demand_s for st in stages], dtype=float)
    cost = np.array([st.bwd_s for st in stages], dtype=float) + demand
    warmup = np.minimum(n_stages - 1 - np.arange(n_stages), m)
    clock = np.zeros(n_stages)
    last_fwd = np.zeros(n_stages)
    fwd_through = np.cumsum(fwd)
    fwd_before = fwd_through - fwd
    cost_from = np.cumsum(cost[::-1])[::-1]
    cost_after = cost_from - cost
    windows = np.zeros((n_stages, m))
    for j in range(int(warmup[0]) if n_stages else 0):
        k = int(np.count_nonzero(warmup > j))
        clock[:k] = last_fwd[:k] = fwd_through[:k] + np.maximum.accumulate(clock[:k] - fwd_before[:k])
    for i in range(m):
        has_fwd = i + warmup < m
        after_prev = np.maximum(clock, np.concatenate(([0.0], last_fwd[:-1]))) + fwd
        clock = np.where(has_fwd, after_prev, clock)
        last_fwd = np.where(has_fwd, after_prev, last_fwd)
        ends = cost_from + np.maximum.accumulate((clock + ahead - cost_after)[::-1])[::-1]
        windows[:-1, i] = np.maximum(0.0, ends[1:] - clock[:-1])
        clock = ends
    hidden = np.minimum(windows, ahead[:, None]).sum(axis=1)
    exposed = np.maximum(0.0, ahead[:, None] - windows).sum(axis=1) + m * demand
    return ScheduleTimes(clock.tolist(), windows.tolist(), hidden.tolist(), exposed.tolist())

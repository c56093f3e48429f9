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
seconds. It is a direct recurrence over the operations (no event queue), fast enough to sit inside
searches; tests hold it equal to the discrete-event simulator that the predictor uses. This module
computes times; it must not choose policies or know about units.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hetrain.plan.cluster.predict import one_f_one_b_orders


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
    """The 1F1B step of these stages (see the module docstring)."""
    n_stages, m = len(stages), n_microbatches
    orders = one_f_one_b_orders(n_stages, m)
    fwd_end = [[0.0] * m for _ in range(n_stages)]
    bwd_end = [[0.0] * m for _ in range(n_stages)]
    done_f = [[False] * m for _ in range(n_stages)]
    done_b = [[False] * m for _ in range(n_stages)]
    clock = [0.0] * n_stages
    pos = [0] * n_stages
    windows = [[0.0] * m for _ in range(n_stages)]
    hidden = [0.0] * n_stages
    exposed = [0.0] * n_stages
    last = n_stages - 1
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for s in range(n_stages):
            st, order = stages[s], orders[s]
            while pos[s] < len(order):
                is_fwd, i = order[pos[s]]
                if is_fwd:
                    if s > 0 and not done_f[s - 1][i]:
                        break
                    start = max(clock[s], fwd_end[s - 1][i] if s > 0 else 0.0)
                    clock[s] = fwd_end[s][i] = start + st.fwd_s
                    done_f[s][i] = True
                else:
                    if s < last and not done_b[s + 1][i]:
                        break
                    if s < last:
                        arrival = bwd_end[s + 1][i]
                        window = max(0.0, arrival - clock[s])
                        windows[s][i] = window
                        hidden[s] += min(window, st.window_s)
                        exposed[s] += max(0.0, st.window_s - window) + st.demand_s
                        start = max(clock[s] + st.window_s, arrival)
                        clock[s] = bwd_end[s][i] = start + st.bwd_s + st.demand_s
                    else:  # the last stage: nothing to wait for, everything on demand
                        exposed[s] += st.window_s + st.demand_s
                        clock[s] = bwd_end[s][i] = clock[s] + st.window_s + st.bwd_s + st.demand_s
                    done_b[s][i] = True
                pos[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise AssertionError("1F1B order deadlocked; the orders are malformed")
    return ScheduleTimes(clock, windows, hidden, exposed)

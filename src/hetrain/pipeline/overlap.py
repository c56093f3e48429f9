"""A rank's pipeline schedule on torch's schedule runtime, recomputing inside the gradient waits.

`runtime_schedule` builds torch's `_PipelineScheduleRuntime` for this rank's stages: the order
Schedule1F1B runs (one chunk per stage; ScheduleGPipe's when there are fewer micro-batches than
stages) or ScheduleInterleaved1F1B's action list (virtual stages), lowered by torch with its
sends and receives. Torch posts each receive early (RECV_F / RECV_B actions) and waits for it only in the
computation that needs it. hetrain registers its own FORWARD and FULL_BACKWARD functions
(`register_custom_function`), which do what torch's do plus:

- FORWARD runs the stage's forward inside `Recomputations.forward(stage, micro-batch)`, so the
  window regions of that forward are noted (hetrain.pipeline.unit_recompute);
- FULL_BACKWARD of micro-batch m, before waiting for m's gradient, recomputes m's window regions
  while the receive proceeds: a helper thread waits on the receive and the main thread
  recomputes region by region, last block first, until the gradient is there; what is left is
  recomputed by the backward on demand (the fallback when the window was too short). The
  backward then runs under the GraphExecGroup the regions were recomputed in, so torch reuses
  them. Seconds recomputed while the receive was still pending count as hidden.

The last stage computes its loss right before its backward and so has no such wait; the waits
for an activation (before a forward) are not used, and those inside tensor-parallel all-reduces
are used by the backward itself (COLLECTIVE regions: hetrain.pipeline.tensor_parallel calls
the ledger; see docs/recompute.md). This module runs schedules; it must not choose policies or
reduce gradients (it only tells the reduction when a chunk's last backward starts:
`on_last_backward`).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from torch.distributed.pipelining import ScheduleInterleaved1F1B
from torch.distributed.pipelining.schedules import (
    FORWARD,
    FULL_BACKWARD,
    _Action,
    _PipelineContext,
    _PipelineScheduleRuntime,
    _wait_batch_p2p,
)

from hetrain.pipeline.unit_recompute import Recomputations


@dataclass
class WaitStats:
    """What the gradient waits held, summed over the steps run."""

    waits: int = 0
    """Backwards that found their gradient's receive pending and recomputed ahead."""
    hidden_s: float = 0.0
    """Recompute seconds that ran while the gradient was still on its way."""
    exposed_ahead_s: float = 0.0
    """Recompute seconds ahead of a backward after the gradient had arrived (the last region overran)."""
    idle_s: float = 0.0
    """Seconds still waited for gradients after recomputing (windows longer than the recomputation)."""


def _wait_all(works) -> float:
    _wait_batch_p2p(works)
    return time.perf_counter()


class _Overlap:
    """The custom FORWARD and FULL_BACKWARD of one rank's schedule."""

    def __init__(self, schedule: _PipelineScheduleRuntime, ledger: Recomputations, clock, compute_lane: str,
                 weights: dict):
        self.schedule, self.ledger, self.clock, self.compute_lane = schedule, ledger, clock, compute_lane
        self.weights = weights
        """Per chunk index, its hetrain.precision.WeightCopies: every computation of a chunk reads them."""
        self.stages = {stage.stage_index: stage for stage in schedule._stages}
        self.stats = WaitStats()
        self._waiter: ThreadPoolExecutor | None = None
        self.on_last_backward = None
        """Called with a chunk's index right before its last backward of the step (the gradient
        reduction that overlaps that backward arms itself: hetrain.pipeline.data_parallel)."""

    def close(self) -> None:
        if self._waiter is not None:
            self._waiter.shutdown(wait=True)
            self._waiter = None

    def forward(self, action, ctx: _PipelineContext) -> None:
        sched, idx, m = self.schedule, action.stage_index, action.microbatch_index
        stage = self.stages[idx]
        if not stage.is_first and idx - 1 not in self.stages:
            _wait_batch_p2p(sched.fwd_recv_ops.pop((idx, m)))
        with self.ledger.forward(idx, m), self.weights[idx].active():
            output = stage.forward_one_chunk(m, ctx.arg_mbs[m], ctx.kwarg_mbs[m], save_forward_output=False)
        sched._maybe_compute_loss(stage, output, ctx.target_mbs, m)
        if idx + 1 in self.stages:  # torch's V-schedule case: the next chunk is on this rank
            self.stages[idx + 1].set_local_fwd_input(output, m)

    def backward(self, action, ctx: _PipelineContext) -> None:
        with self.weights[action.stage_index].active():  # recomputation ahead and in the backward reads them
            self._backward(action)

    def _backward(self, action) -> None:
        sched, idx, m = self.schedule, action.stage_index, action.microbatch_index
        stage = self.stages[idx]
        if not stage.is_last and idx + 1 not in self.stages:
            works = sched.bwd_recv_ops.pop((idx, m))
            if stage.has_backward and self.ledger.pending(idx, m):
                self._recompute_while_waiting(idx, m, works)
            else:
                _wait_batch_p2p(works)
        loss = sched._maybe_get_loss(stage, m)
        sched.backward_counter[idx] += 1
        last = sched.backward_counter[idx] == sched._n_microbatches
        if last and stage.has_backward and self.on_last_backward is not None:  # not in evaluation
            self.on_last_backward(idx)
        with self.ledger.backward(idx, m):
            stage.backward_one_chunk(m, loss=loss, full_backward=True, last_backward=last)
        if idx - 1 in self.stages and stage.has_backward:
            self.stages[idx - 1].set_local_bwd_input(stage.get_local_bwd_output(m), m)

    def _recompute_while_waiting(self, idx: int, m: int, works) -> None:
        if self._waiter is None:
            self._waiter = ThreadPoolExecutor(1, thread_name_prefix="hetrain-grad-wait")
        arrival = self._waiter.submit(_wait_all, works)
        before_s = self.ledger.ahead_s
        start = time.perf_counter()
        wall_start = self.clock.now()
        self.ledger.recompute(idx, m, stop=arrival.done)
        end = time.perf_counter()
        self.clock.add(f"R{m} c{idx} ahead", self.compute_lane, wall_start, self.clock.now(), "recompute", chunk=idx)
        arrived = arrival.result()
        # The recomputation's own seconds (inside torch's recompute), split by when the gradient came.
        ran_s, loop_s = self.ledger.ahead_s - before_s, end - start
        inside = max(0.0, min(end, arrived) - start) / loop_s if loop_s > 0 else 0.0
        s = self.stats
        s.waits += 1
        s.hidden_s += ran_s * inside
        s.exposed_ahead_s += ran_s * (1.0 - inside)
        s.idle_s += max(0.0, arrived - end)


def one_f_one_b_actions(n_stages: int, n_microbatches: int) -> dict[int, list[_Action]]:
    """Per stage (= rank), the compute actions in the order Schedule1F1B runs them: min(S - s, m)
    forwards, then one backward and one forward in turn, then the remaining backwards. With fewer
    micro-batches than stages this is every forward, then every backward: ScheduleGPipe's order.
    (Schedule1F1B's own action list, kept for drawing, numbers the last stage's forwards from 1.)"""
    m, out = n_microbatches, {}
    for s in range(n_stages):
        warmup = min(n_stages - s, m)
        actions = [_Action(s, FORWARD, i) for i in range(warmup)]
        for b in range(m):
            actions.append(_Action(s, FULL_BACKWARD, b))
            if warmup + b < m:
                actions.append(_Action(s, FORWARD, warmup + b))
        out[s] = actions
    return out


def runtime_schedule(stages: list, n_microbatches: int, loss_fn, ledger: Recomputations, clock,
                     compute_lane: str, group_ranks: list[int],
                     weights: dict) -> tuple[_PipelineScheduleRuntime, _Overlap, str]:
    """torch's runtime for this rank's stages with hetrain's FORWARD and FULL_BACKWARD; also the
    overlap object (its `stats`, `close()`) and the schedule's name. weights[chunk index]: the
    chunk's hetrain.precision.WeightCopies, active in each of its forwards and backwards.

    group_ranks[s]: the rank, in the lane's process group, of the process that runs pipeline
    stage s. torch numbers a group's members by global rank and assumes stage s on member s; a
    pipeline whose stage order is not its ranks' order (kinds in another order than the
    cluster file's groups) would send to the wrong process, so the action lists are keyed by
    the holders' group ranks, from which torch takes its stage-to-rank map."""
    n_chunks = stages[0].num_stages
    if len(stages) > 1:
        schedule = ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn=loss_fn)
        name = "interleaved 1F1B"
        by_position = schedule.pipeline_order  # torch's order, keyed by stage position
    else:
        name = "1F1B" if n_microbatches >= n_chunks else "GPipe (fewer micro-batches than stages)"
        schedule = _PipelineScheduleRuntime(stages, n_microbatches, loss_fn=loss_fn)
        by_position = one_f_one_b_actions(n_chunks, n_microbatches)
    if len(stages) == 1 or list(group_ranks) != sorted(group_ranks):
        schedule._prepare_schedule_with_comms({group_ranks[pos]: actions for pos, actions in by_position.items()})
    overlap = _Overlap(schedule, ledger, clock, compute_lane, weights)
    schedule.register_custom_function(FORWARD, overlap.forward)
    schedule.register_custom_function(FULL_BACKWARD, overlap.backward)
    return schedule, overlap, name

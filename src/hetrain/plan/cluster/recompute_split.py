"""Recomputation-aware stage partitioning of cluster plans, and the policies it writes into plan.json.

The cluster search (hetrain.plan.cluster.search) splits the blocks over a pipeline's stages with
whole-block recomputation on demand, the fewest blocks each stage's memory demands. When a plan
recomputes anything, `apply_recompute` revisits every 1F1B pipeline of it: for a split, each
stage's policy (hetrain.plan.cluster.recompute_policy: HEU, or the MILP on small cases) is chosen against
the waits of the schedule and the stage's memory; the split's step is the schedule's
(hetrain.plan.cluster.one_f_one_b: recomputation ahead of a backward hides in the wait for its
gradient, on-demand recomputation lengthens the backward) plus the gradient sync and optimizer
step. Starting from the search's split, single blocks move across stage boundaries while the
predicted step improves, so the stages balance with their recomputation as it will run: a stage
whose recomputation hides in its waits may take more blocks, one whose recomputation is exposed
fewer. The plan keeps the better of this and the search's whole-block choice; each stage's
policy goes into StagePlan.recompute with the planner's account of it.

Interleaved pipelines (virtual stages) keep whole-block recomputation. This module plans; it must
not run anything.
"""

from __future__ import annotations

import dataclasses
import math
import time

from hetrain.plan.cluster.cost import CostContext
from hetrain.plan.cluster.plan import ClusterPlan, PipelinePlan
from hetrain.plan.cluster.predict import StageModel, plan_stages
from hetrain.plan.cluster.recompute_plan import BlockPolicy, policy_groups
from hetrain.plan.cluster.recompute_policy import PipelineRecompute, StageProblem, plan_pipeline
from hetrain.plan.cluster.one_f_one_b import StageTimes, simulate
from hetrain.plan.cluster.recompute_units import stage_cost, stage_steps

METHODS = ("whole", "heu", "opt")
OPT_MAX_BLOCKS = 12
"""Most blocks per stage the MILP is run on (identical blocks make its search grow fast)."""


class Pricer:
    """Prices splits of one pipeline: its stages, micro-batches and each stage's unit costs."""

    def __init__(self, ctx: CostContext, stages: list[StageModel], n_microbatches: int, micro_batch: int,
                 method: str):
        self.ctx, self.stages, self.m, self.method = ctx, stages, n_microbatches, method
        self.steps = [stage_steps(ctx, ctx.cluster.group(st.group), st.tp, micro_batch) for st in stages]
        self.cache: dict[tuple[int, ...], tuple[float, PipelineRecompute | None]] = {}

    def problem(self, s: int, n: int, windows: tuple[float, ...]) -> StageProblem:
        st = self.stages[s]
        units, steps, collective_window = self.steps[s]
        budget = st.capacity_bytes - st.static_bytes(n) - st.inflight * st.fixed_act_bytes
        return StageProblem(n, units, steps, st.inflight, budget, self.m, windows, collective_window, st.tp)

    def price(self, n_blocks: list[int]) -> tuple[float, PipelineRecompute | None]:
        """Predicted step of this split with the chosen policies (inf when a stage cannot fit)."""
        key = tuple(n_blocks)
        if key not in self.cache:
            if min(n_blocks) < 1:
                self.cache[key] = (math.inf, None)
                return self.cache[key]
            base = [StageTimes(st.fwd_s(n), st.bwd_s(n, 0)) for st, n in zip(self.stages, n_blocks)]
            rec = plan_pipeline(base, lambda s, w: self.problem(s, n_blocks[s], w), self.m, self.method)
            if not all(ch.fits for ch in rec.choices):
                self.cache[key] = (math.inf, rec)
            else:
                step = max(e + st.sync_s(n) + st.optim_s(n) for e, st, n in zip(rec.ends_s, self.stages, n_blocks))
                self.cache[key] = (step, rec)
        return self.cache[key]

    def whole_block_s(self, n_blocks: list[int], n_recompute: list[int]) -> float:
        times = [StageTimes(st.fwd_s(n), st.bwd_s(n, r)) for st, n, r in zip(self.stages, n_blocks, n_recompute)]
        ends = simulate(times, self.m).ends_s
        return max(e + st.sync_s(n) + st.optim_s(n) for e, st, n in zip(ends, self.stages, n_blocks))


def repartition(pricer: Pricer, n_blocks: list[int], max_moves: int = 64) -> tuple[list[int], float]:
    """Move single blocks across stage boundaries while the predicted step improves (best move first)."""
    best_n = list(n_blocks)
    best_s, _ = pricer.price(best_n)
    for _ in range(max_moves):
        moves = []
        for s in range(len(best_n) - 1):
            for delta in (1, -1):  # one block from stage s+1 to s, or the other way
                n = list(best_n)
                n[s] += delta
                n[s + 1] -= delta
                moves.append(n)
        if not moves:  # one stage: nothing to move
            break
        step, n = min(((pricer.price(n)[0], n) for n in moves), key=lambda x: x[0])
        if step >= best_s - 1e-12:
            break
        best_s, best_n = step, n
    return best_n, best_s


def _account(choice, rec: PipelineRecompute, s: int, method: str, n_microbatches: int) -> dict:
    """The planner's figures for one stage, as plan.json shows them. demand_s_per_microbatch is what
    lengthens the backward (on demand, and collective regions outside their all-reduces)."""
    return {"method": method, "window_s_per_microbatch": choice.window_s,
            "collective_s_per_microbatch": choice.collective_s,
            "demand_s_per_microbatch": choice.demand_s,
            "hidden_s_per_step": rec.hidden_s[s] + n_microbatches * choice.collective_hidden_s,
            "exposed_s_per_step": rec.exposed_s[s], "freed_bytes_per_microbatch": choice.freed_bytes,
            "held_ahead_bytes": choice.held_bytes, "search_s": choice.search_s}  # ahead, and inside all-reduces


def apply_recompute(plan: ClusterPlan, ctx: CostContext, method: str = "heu") -> dict:
    """Replace whole-block recomputation in `plan`'s 1F1B pipelines by per-stage policies and a
    recomputation-aware split, where that predicts a shorter step. Returns what was done, for
    plan.search."""
    if method not in METHODS:
        raise ValueError(f"recompute method must be one of {', '.join(METHODS)}, not {method!r}")
    t0 = time.perf_counter()
    notes = {"method": method, "pipelines": []}
    if method == "whole":
        return notes
    for p, pipe in enumerate(plan.pipelines):
        if pipe.virtual_stages != 1 or not any(st.n_recompute_blocks for st in pipe.stages):
            continue
        if method == "opt" and max(st.n_blocks for st in pipe.stages) > OPT_MAX_BLOCKS:
            from hetrain.errors import ConfigError

            raise ConfigError(f"--plan.recompute opt solves a MILP per stage and is meant for small cases (at most "
                              f"{OPT_MAX_BLOCKS} blocks per stage, this plan has "
                              f"{max(st.n_blocks for st in pipe.stages)}); use --plan.recompute heu")
        stages = plan_stages(ctx, plan, pipe)
        pricer = Pricer(ctx, stages, pipe.n_microbatches, pipe.micro_batch, method)
        n_old = [st.n_blocks for st in pipe.stages]
        old_s = pricer.whole_block_s(n_old, [st.n_recompute_blocks for st in pipe.stages])
        n_new, new_s = repartition(pricer, n_old)
        entry = {"pipeline": p, "whole_block_step_s": old_s, "policy_step_s": new_s,
                 "blocks_before": n_old, "blocks_after": n_new}
        notes["pipelines"].append(entry)
        if new_s >= old_s:
            continue
        _, rec = pricer.price(n_new)
        plan.pipelines[p] = _with_policies(pipe, n_new, rec, method)
    notes["search_s"] = time.perf_counter() - t0
    return notes


def _with_policies(pipe: PipelinePlan, n_blocks: list[int], rec: PipelineRecompute, method: str) -> PipelinePlan:
    stages, first = [], 0
    for s, (st, n, choice) in enumerate(zip(pipe.stages, n_blocks, rec.choices)):
        groups = policy_groups(choice.policies, first)
        account = _account(choice, rec, s, method, pipe.n_microbatches)
        recompute = {"blocks": groups, "predicted": account} if groups else {}
        stages.append(dataclasses.replace(st, first_block=first, n_blocks=n, n_recompute_blocks=0,
                                          recompute=recompute))
        first += n
    return dataclasses.replace(pipe, stages=stages)


def stage_recompute(ctx: CostContext, st: StageModel, micro_batch: int, policies: list[BlockPolicy], last: bool):
    """What a stage's policies cost and free per micro-batch, as the predictor prices them: (ahead
    seconds, seconds that lengthen the backward, freed bytes, bytes held ahead of a backward and
    for the collective regions). The last stage has no wait, so it recomputes its window regions
    on demand."""
    units, steps, collective_window = stage_steps(ctx, ctx.cluster.group(st.group), st.tp, micro_batch)
    c = stage_cost(policies, units, steps, collective_window)
    if last:
        return 0.0, c.window_s + c.backward_s, c.freed_bytes, c.collective_held_bytes
    return c.window_s, c.backward_s, c.freed_bytes, c.window_freed_bytes + c.collective_held_bytes


def format_recompute(plan: ClusterPlan) -> list[str]:
    """Report lines: per stage that recomputes, what it drops, where it recomputes it, what that costs
    and what it frees (the planner's figures stored in plan.json)."""
    from hetrain.units import GIB
    from hetrain.plan.cluster.recompute_plan import block_policies

    lines = []
    for p, pipe in enumerate(plan.pipelines):
        n_stages = len(pipe.stages) // pipe.virtual_stages
        for c, st in enumerate(pipe.stages):
            where = f"P{p} S{c % n_stages}" + (f" chunk {c}" if pipe.virtual_stages > 1 else "")
            if st.n_recompute_blocks and not st.recompute:
                lines.append(f"  {where}: blocks {st.first_block}-{st.first_block + st.n_recompute_blocks - 1} whole, "
                             f"on demand in their backward")
                continue
            if not st.recompute:
                continue
            policies = block_policies(st.recompute, st.first_block, st.n_blocks, 0)
            groups = []
            for g in st.recompute["blocks"]:
                last = g["first_block"] + g["n_blocks"] - 1
                policy = policies[g["first_block"] - st.first_block]
                groups.append(f"blocks {g['first_block']}-{last}: {policy.describe()}")
            lines.append(f"  {where}: {'; '.join(groups)}")
            a = st.recompute.get("predicted", {})
            if a:
                step_total = a["hidden_s_per_step"] + a["exposed_s_per_step"]
                hidden = f"{100 * a['hidden_s_per_step'] / step_total:.0f}%" if step_total else "-"
                collective = a.get("collective_s_per_microbatch", 0.0)
                inside = (f" + {1e3 * collective:.2f} ms inside the next block's all-reduces" if collective else "")
                lines.append(f"      per micro-batch {1e3 * a['window_s_per_microbatch']:.2f} ms ahead (in the wait "
                             f"for its gradient){inside}; {1e3 * a['demand_s_per_microbatch']:.2f} ms lengthen the "
                             f"backward; per step "
                             f"{hidden} hidden, {1e3 * a['exposed_s_per_step']:.1f} ms exposed; frees "
                             f"{a['freed_bytes_per_microbatch'] / GIB:.3f} GiB per micro-batch, holds "
                             f"{a['held_ahead_bytes'] / GIB:.3f} GiB restored early ({a['method'].upper()}, "
                             f"{1e3 * a['search_s']:.1f} ms)")
    if lines:
        lines.insert(0, "Recomputation (what is dropped; 'window': recomputed while the stage waits for the "
                        "micro-batch's gradient, 'collective': while the next block's tensor-parallel all-reduces "
                        "run in the backward, 'demand': in its backward)")
    return lines

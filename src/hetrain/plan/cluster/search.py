"""Search for the fastest cluster plan that fits memory on every device.

The space: the groups that take part (a group is used whole or not at all) are split into
pipelines, each an ordered sequence of groups; a pipeline has one TP degree dividing the
node of each of its groups (one per group with Pins.mixed_tp, which the runtime cannot run
yet), a replica count dp that divides every member group evenly (each group contributes
devices / (dp x tp) stages), a micro-batch size (powers of two) and a number of
micro-batches; the global batch is shared among pipelines. Each stage takes a contiguous
run of blocks (the first also the embedding, the last the head) and recomputes the fewest
blocks its memory demands. The search:
  1. every shape gets a quick group-level estimate (which orders them) and a valid lower
     bound of its predicted step (which prunes them, hetrain.plan.cluster.split);
  2. shapes in estimate order get their layer split (bottleneck first, then the sum of
     stage times) and are predicted with the 1F1B recurrence; a shape whose lower bound
     cannot beat the best prediction so far is skipped;
  3. the best few candidates are refined by moving single blocks between stages (and
     samples between pipelines) while the prediction improves.
With several pipelines, the batch split comes from a min-max allocation over per-shape
time curves (sum + (m-1) x max + tail as a function of the samples).
This module searches; it must not predict by any other rule than
hetrain.plan.cluster.predict.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from hetrain.plan.cluster.cost import CostContext
from hetrain.plan.cluster.predict import PipelineShape, StageModel, build_stages, pipeline_step_s, stage_counts
from hetrain.plan.cluster.split import (bottleneck_lower_bound_s, closed_form_s, descend_split, shape_estimate_s,
                                        shape_lower_bound_s, split_blocks)


@dataclass
class PipelineChoice:
    shape: PipelineShape
    n_microbatches: int
    stages: list[StageModel]
    n_blocks: list[int]
    n_recompute: list[int]


@dataclass
class Candidate:
    pipelines: list[PipelineChoice]
    lower_s: float
    """Lower bound of the step of any split of these shapes."""
    step_s: float = math.inf
    """Predicted step (1F1B recurrence), slowest pipeline."""


@dataclass
class SearchStats:
    layouts: int = 0
    shapes: int = 0
    shapes_split: int = 0
    candidates_predicted: int = 0
    refine_moves: int = 0
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# The space.

def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def pipeline_layouts(group_names: list[str], max_orders: int = 24) -> list[tuple[tuple[str, ...], ...]]:
    """Every non-empty subset of groups, split into pipelines, each pipeline in every order.

    With many groups the count explodes; beyond `max_orders` orders of one block only the
    first `max_orders` permutations (in the file's order) are kept.
    """
    layouts = []
    for size in range(1, len(group_names) + 1):
        for subset in itertools.combinations(group_names, size):
            for partition in _set_partitions(list(subset)):
                orders = [list(itertools.islice(itertools.permutations(block), max_orders)) for block in partition]
                layouts.extend(tuple(choice) for choice in itertools.product(*orders))
    return layouts


def _set_partitions(items: list[str]):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _set_partitions(rest):
        for i in range(len(part)):
            yield part[:i] + [[first, *part[i]]] + part[i + 1:]
        yield [[first], *part]


def micro_batches(ctx: CostContext) -> list[int]:
    out, b = [], 1
    while b <= ctx.options.max_micro_batch:
        out.append(b)
        b *= 2
    return out


@dataclass(frozen=True)
class Pins:
    """Degrees the user fixed (`hetrain plan --plan.tp N ...`; 0 leaves one to the search), and
    whether a pipeline may mix TP degrees."""

    tp: int = 0
    """Tensor-parallel degree of every group of every pipeline."""
    pp: int = 0
    """Pipeline stages of every pipeline."""
    dp: int = 0
    """Replicas of every pipeline."""
    micro_batch: int = 0
    """Micro-batch size of every pipeline."""
    mixed_tp: bool = False
    """Let the groups of one pipeline take different TP degrees (`--plan.mixed_tp true`). The
    pipeline runtime pairs neighbouring stages TP rank by TP rank, so it cannot run such a plan
    yet: the search leaves them out unless asked, and the report marks one it chose."""

    def admit(self, shape: PipelineShape, n_stages: int) -> bool:
        return ((not self.tp or all(t == self.tp for t in shape.tps)) and (not self.pp or n_stages == self.pp)
                and (not self.dp or shape.dp == self.dp)
                and (not self.micro_batch or shape.micro_batch == self.micro_batch)
                and (self.mixed_tp or len(set(shape.tps)) == 1))

    def describe(self) -> str:
        return " ".join(f"--plan.{k} {str(v).lower() if isinstance(v, bool) else v}"
                        for k, v in dataclasses.asdict(self).items() if v)


def pipeline_shapes(ctx: CostContext, groups: tuple[str, ...], pins: Pins | None = None) -> list[PipelineShape]:
    """All shapes of one pipeline over `groups`: TP per group, dp, micro-batch; at most one stage
    per block; only those `pins` admit."""
    pins = pins or _NO_PINS
    gs = [ctx.cluster.group(g) for g in groups]
    n_head = ctx.desc.tp_heads
    tp_choices = [[t for t in divisors(g.devices_per_node) if n_head % t == 0] for g in gs]
    sizes = [pins.micro_batch] if pins.micro_batch else micro_batches(ctx)
    shapes = []
    for tps in itertools.product(*tp_choices):
        per = [g.devices // t for g, t in zip(gs, tps)]
        for dp in divisors(math.gcd(*per)):
            n_stages = sum(p // dp for p in per)
            if n_stages > ctx.n_blocks:
                continue
            for b in sizes:
                shape = PipelineShape(groups, tps, dp, b)
                if pins.admit(shape, n_stages):
                    shapes.append(shape)
    return shapes


_NO_PINS = Pins()


# ---------------------------------------------------------------------------------------
# Bounds and the layer split.

def choose_pipeline(ctx: CostContext, shape: PipelineShape, m: int, others: tuple[str, ...],
                    n_pipelines: int, descend: bool = True) -> PipelineChoice | None:
    """The shape's stages for m micro-batches and their split: the compute-balanced one, then
    (with `descend`) blocks moved off the stages that make the step's tail, kept when predicted faster."""
    stages = build_stages(ctx, shape, m, others, n_pipelines)
    split = split_blocks(stages, ctx.n_blocks)
    if split is None:
        return None
    n, r = descend_split(stages, split[0], m) if descend else split
    if n != split[0] and pipeline_step_s(stages, n, r, m) > pipeline_step_s(stages, *split, m):
        n, r = split  # the closed form misjudged the move; the prediction decides
    return PipelineChoice(shape, m, stages, n, r)


def predict_candidate(c: Candidate) -> float:
    c.step_s = max(pipeline_step_s(p.stages, p.n_blocks, p.n_recompute, p.n_microbatches) for p in c.pipelines)
    return c.step_s


# ---------------------------------------------------------------------------------------
# Local refinement under the predictor.

def _block_moves(n: list[int], work: list[float], full: bool) -> list[tuple[int, int]]:
    S = len(n)
    if full:
        return [(i, j) for i in range(S) for j in range(S) if i != j and n[i] > 1]
    by_work = sorted(range(S), key=lambda s: work[s])
    heavy, light = by_work[-2:], by_work[:2]
    moves = {(i, j) for i in heavy for j in {*light, i - 1, i + 1} if 0 <= j < S and j != i and n[i] > 1}
    return sorted(moves)


def _batch_moves(c: Candidate, ctx: CostContext, slowest: int) -> list[list[PipelineChoice]]:
    """Give the slowest pipeline's samples to another (the least multiple both micro-batchings allow)."""
    options = []
    src = c.pipelines[slowest]
    unit_src = src.shape.dp * src.shape.micro_batch
    for j, dst in enumerate(c.pipelines):
        unit_dst = dst.shape.dp * dst.shape.micro_batch
        amount = math.lcm(unit_src, unit_dst)
        if j == slowest or src.n_microbatches * unit_src - amount < unit_src:
            continue
        pipes = list(c.pipelines)
        for k, delta in ((slowest, -amount), (j, amount)):
            p = c.pipelines[k]
            others = tuple(g for i, q in enumerate(c.pipelines) if i != k for g in q.shape.groups)
            m = p.n_microbatches + delta // (p.shape.dp * p.shape.micro_batch)
            pipes[k] = choose_pipeline(ctx, p.shape, m, others, len(c.pipelines))
        if None not in pipes:
            options.append(pipes)
    return options


def refine(c: Candidate, ctx: CostContext, max_rounds: int = 20, full_below_stages: int = 16,
           moves_predicted: int = 4, stats: SearchStats | None = None) -> Candidate:
    """Move single blocks between stages of the slowest pipeline, or samples from it to another
    pipeline, while the predicted step improves.

    Each round ranks the block moves by their closed-form bound, predicts the best
    `moves_predicted` of them and every batch move, and takes the best improvement.
    """
    if not math.isfinite(c.step_s):
        predict_candidate(c)
    for _ in range(max_rounds):
        steps = [pipeline_step_s(p.stages, p.n_blocks, p.n_recompute, p.n_microbatches) for p in c.pipelines]
        k = max(range(len(steps)), key=lambda i: steps[i])
        pipe = c.pipelines[k]
        work = [st.fwd_s(a) + st.bwd_s(a, b) for st, a, b in zip(pipe.stages, pipe.n_blocks, pipe.n_recompute)]
        ranked = []
        for i, j in _block_moves(pipe.n_blocks, work, len(pipe.stages) <= full_below_stages):
            n = list(pipe.n_blocks)
            n[i] -= 1
            n[j] += 1
            r = [st.min_recompute(a) for st, a in zip(pipe.stages, n)]
            if None not in r:
                ranked.append((closed_form_s(pipe.stages, n, r, pipe.n_microbatches), len(ranked), n, r))
        ranked.sort(key=lambda e: (e[0], e[1]))
        best_step, best_pipes = c.step_s, None
        for _, _, n, r in ranked[:moves_predicted]:
            pipes = list(c.pipelines)
            pipes[k] = PipelineChoice(pipe.shape, pipe.n_microbatches, pipe.stages, n, r)
            step = max(steps[:k] + [pipeline_step_s(pipe.stages, n, r, pipe.n_microbatches)] + steps[k + 1:])
            if step < best_step * (1 - 1e-12):
                best_step, best_pipes = step, pipes
        for pipes in _batch_moves(c, ctx, k) if len(c.pipelines) > 1 else []:
            step = max(pipeline_step_s(p.stages, p.n_blocks, p.n_recompute, p.n_microbatches) for p in pipes)
            if step < best_step * (1 - 1e-12):
                best_step, best_pipes = step, pipes
        if stats:
            stats.refine_moves += min(len(ranked), moves_predicted) + (len(c.pipelines) - 1)
        if best_pipes is None:
            break
        c.pipelines = best_pipes
        predict_candidate(c)
    return c


# ---------------------------------------------------------------------------------------
# Several pipelines: share the global batch so that the slowest finishes first.

def allocate_batch(curves: list[np.ndarray], global_batch: int) -> tuple[float, list[int]] | None:
    """Split global_batch into x_k > 0 (curves[k][x] = time of pipeline k for x samples) minimising the max."""
    best = curves[0].copy()
    back: list[np.ndarray] = []
    for curve in curves[1:]:
        combined = np.full(global_batch + 1, np.inf)
        arg = np.zeros(global_batch + 1, dtype=np.int64)
        for x in range(2, global_batch + 1):
            y = np.arange(1, x)                        # samples of the pipelines so far
            values = np.maximum(best[y], curve[x - y])
            i = int(np.argmin(values))
            combined[x], arg[x] = values[i], y[i]
        back.append(arg)
        best = combined
    if not np.isfinite(best[global_batch]):
        return None
    shares, x = [], global_batch
    for arg in reversed(back):
        y = int(arg[x])
        shares.append(x - y)
        x = y
    shares.append(x)
    return float(best[global_batch]), list(reversed(shares))


# ---------------------------------------------------------------------------------------
# The search.

@dataclass(frozen=True)
class SearchOptions:
    """Effort limits of the search (the space itself is fixed by the module docstring)."""

    split_top: int = 400
    """Single-pipeline shapes split at most (best estimate first; all of them on small clusters)."""
    refine_top: int = 4
    """Best predicted candidates refined by moving blocks."""
    refine_within: float = 0.25
    """Also refined: candidates predicted within this fraction of the best, up to refine_max in all
    (the split balances the stages' work, not their gradient reductions: a stage on a slow
    data-parallel path may want fewer blocks than its work allows)."""
    refine_max: int = 16
    try_distributed_optimizer: bool = False
    """Plan also with the other ZeRO-1 setting than PredictorOptions.distributed_optimizer and keep
    the faster plan (hetrain.plan.cluster.planner.plan_cluster; `--plan.distributed_optimizer auto`)."""
    shapes_per_pipeline: int = 12
    """With several pipelines: shapes per pipeline kept (best estimated time per sample first)."""
    shape_margin: float = 0.1
    """With several pipelines, at each pipeline's batch share: the shapes whose closed-form time is
    within this fraction of the best are predicted, and the fastest is kept."""
    upper_bound: bool = True
    """Also plan each device kind alone, for the efficiency against the upper bound."""
    interleave: bool = True
    """Try the chosen plan's pipelines as interleaved 1F1B (virtual stages), keeping it when faster."""
    pins: Pins = Pins()
    """Degrees fixed by the user; the search fills in the rest."""
    recompute: str = "heu"
    """How stages that must recompute choose what: 'whole' (whole blocks on demand, as the search
    prices them), 'heu' (units per stage, recomputed inside the waits for gradients where they fit,
    with a recomputation-aware split; hetrain.plan.cluster.recompute_split) or 'opt' (the same with the
    exact MILP per stage: small models only)."""


def _single_pipeline_candidates(ctx: CostContext, layouts, global_batch: int, opts: "SearchOptions",
                                stats: SearchStats) -> list[Candidate]:
    """Shapes ranked by estimate, split and predicted while their lower bound can still beat the best."""
    entries = []
    for layout in layouts:
        for shape in pipeline_shapes(ctx, layout[0], opts.pins):
            stats.shapes += 1
            samples = shape.dp * shape.micro_batch
            if global_batch % samples:
                continue
            m = global_batch // samples
            lower = shape_lower_bound_s(ctx, shape, m)
            if math.isfinite(lower):
                entries.append((shape_estimate_s(ctx, shape, m), len(entries), lower, shape, m))
    entries.sort(key=lambda e: (e[0], e[1]))
    pool, best_step = [], math.inf
    for i, (_, _, lower, shape, m) in enumerate(entries):
        if lower >= best_step:
            continue
        if stats.shapes_split == opts.split_top:
            left = sum(1 for e in entries[i:] if e[2] < best_step)
            stats.notes.append(f"split the {opts.split_top} best-estimated shapes; {left} more had a lower "
                               f"bound under the best found and were not split")
            break
        stats.shapes_split += 1
        choice = choose_pipeline(ctx, shape, m, (), 1)
        if choice is None:
            continue
        cand = Candidate([choice], lower)
        best_step = min(best_step, predict_candidate(cand))
        pool.append(cand)
    return pool


def _multi_pipeline_candidate(ctx: CostContext, layout, global_batch: int, opts: SearchOptions,
                              best_step: float, stats: SearchStats) -> Candidate | None:
    n_pipes = len(layout)
    n_devices = sum(ctx.cluster.group(g).devices for groups in layout for g in groups)
    kept: list[list[PipelineShape]] = []
    best_rate = 0.0  # samples/s the pipelines reach at most together (steady state, lower bound of time)
    for groups in layout:
        share = global_batch * sum(ctx.cluster.group(g).devices for g in groups) / n_devices
        rated, rate = [], 0.0
        for shape in pipeline_shapes(ctx, groups, opts.pins):
            stats.shapes += 1
            samples = shape.dp * shape.micro_batch
            m_guess = max(1, round(share / samples))
            estimate = shape_estimate_s(ctx, shape, m_guess)
            if math.isfinite(estimate):
                rated.append((estimate / (m_guess * samples), len(rated), shape))
                rate = max(rate, samples / bottleneck_lower_bound_s(ctx, shape))
        if not rated:
            return None
        rated.sort(key=lambda e: (e[0], e[1]))
        best_rate += rate
        kept.append([shape for _, _, shape in rated[:opts.shapes_per_pipeline]])
    if global_batch / best_rate >= best_step:
        return None
    curves, per_shape = [], []
    for k, shapes in enumerate(kept):
        others = tuple(g for j, gs in enumerate(layout) if j != k for g in gs)
        curve = np.full(global_batch + 1, np.inf)
        shape_curves = {}
        for i, shape in enumerate(shapes):
            samples = shape.dp * shape.micro_batch
            n_stages = sum(stage_counts(ctx, shape))
            stats.shapes_split += 1
            # Worst-case in-flight memory; the split balanced for compute, which the curve
            # extends to every batch share (a tail-descended split suits only this m).
            choice = choose_pipeline(ctx, shape, n_stages, others, n_pipes, descend=False)
            if choice is None:
                continue
            work = [st.fwd_s(a) + st.bwd_s(a, b) for st, a, b in zip(choice.stages, choice.n_blocks, choice.n_recompute)]
            tail = max(st.sync_s(a) + st.optim_s(a) for st, a in zip(choice.stages, choice.n_blocks))
            xs = np.arange(samples, global_batch + 1, samples)
            times = sum(work) + (xs // samples - 1) * max(work) + tail
            shape_curves[i] = np.full(global_batch + 1, np.inf)
            shape_curves[i][xs] = times
            curve[xs] = np.minimum(curve[xs], times)
        curves.append(curve)
        per_shape.append(shape_curves)
    allocation = allocate_batch(curves, global_batch)
    if allocation is None:
        return None
    _, shares = allocation
    pipes = []
    for k, (groups, x) in enumerate(zip(layout, shares)):
        # The curves are closed forms: every shape within `shape_margin` of the best at this
        # share is split for it and predicted, and the fastest prediction is kept.
        others = tuple(g for j, gs in enumerate(layout) if j != k for g in gs)
        best, best_s = None, math.inf
        for i, times in per_shape[k].items():
            if times[x] > curves[k][x] * (1 + opts.shape_margin):
                continue
            shape = kept[k][i]
            stats.shapes_split += 1
            choice = choose_pipeline(ctx, shape, x // (shape.dp * shape.micro_batch), others, n_pipes)
            if choice is not None:
                step = pipeline_step_s(choice.stages, choice.n_blocks, choice.n_recompute, choice.n_microbatches)
                if step < best_s:
                    best, best_s = choice, step
        if best is None:
            return None
        pipes.append(best)
    cand = Candidate(pipes, global_batch / best_rate)
    predict_candidate(cand)
    return cand


def search(ctx: CostContext, global_batch: int, opts: SearchOptions = SearchOptions()) -> tuple[Candidate | None, SearchStats]:
    """The fastest plan found for the cluster, or None when no shape fits memory and divides the batch."""
    stats = SearchStats()
    layouts = pipeline_layouts([g.name for g in ctx.cluster.groups])
    stats.layouts = len(layouts)
    pool = _single_pipeline_candidates(ctx, [lay for lay in layouts if len(lay) == 1], global_batch, opts, stats)
    best_step = min((c.step_s for c in pool), default=math.inf)
    for layout in (lay for lay in layouts if len(lay) > 1):
        cand = _multi_pipeline_candidate(ctx, layout, global_batch, opts, best_step, stats)
        if cand is not None:
            pool.append(cand)
            best_step = min(best_step, cand.step_s)
    if not pool:
        return None, stats
    stats.candidates_predicted = len(pool)
    pool.sort(key=lambda c: c.step_s)
    near = [c for c in pool[opts.refine_top:] if c.step_s <= pool[0].step_s * (1 + opts.refine_within)]
    for cand in (pool[:opts.refine_top] + near)[:max(opts.refine_top, opts.refine_max)]:
        refine(cand, ctx, stats=stats)
    return min(pool, key=lambda c: c.step_s), stats

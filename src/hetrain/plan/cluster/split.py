"""Layer split of one pipeline shape, and the bounds and estimates that rank shapes.

For a fixed pipeline shape (groups in order, TP degrees, replicas, micro-batch) and number of
micro-batches, `split_blocks` gives each stage a contiguous run of blocks: it minimises the
slowest stage exactly (each next block goes where the stage time after it is lowest) and
then the sum of stage times at that bottleneck, recomputing on each stage the fewest blocks
its memory demands; `descend_split` then moves blocks off stages whose gradient reduction
makes the step's tail. `shape_lower_bound_s` is a valid lower bound of the predicted step of
any split (used to prune); `shape_estimate_s` is a quick group-level estimate with memory
(used to rank). This module prices splits with parallel_predict's StageModel and must not
search over shapes.
"""

from __future__ import annotations

import heapq
import math

from hetrain.plan.cluster.cost import CostContext, dp_path, ring_all_gather_s, ring_allreduce_s, ring_rooted_s
from hetrain.plan.cluster.predict import PipelineShape, StageModel, stage_counts


def shape_lower_bound_s(ctx: CostContext, shape: PipelineShape, n_microbatches: int) -> float:
    """A lower bound of the predicted step of any split of the blocks over this shape's stages.

    Stage s cannot finish before sum_{s' < s} w_s' + m w_s (it waits for the first
    micro-batch, works m times w_s, and its last backward then passes every earlier stage),
    and stage 0 finishes last. A weighted average of these S bounds gives c x sum_s w_s with
    c = 1 / (1 - (1 - 1/m)^S); with m x max_s w_s the step is at least
    max(m x max w, c x sum w) + the first stage's gradient sync and optimizer step for one
    block. Stage times are relaxed to continuous blocks x per-block time (plus embedding and
    head; no sends, recomputation or memory limit), and the bound is minimised over the
    bottleneck level in closed form. inf when the weights alone cannot fit the devices.
    """
    m, L = n_microbatches, ctx.n_blocks
    counts = stage_counts(ctx, shape)
    groups = [ctx.cluster.group(g) for g in shape.groups]
    kits = [ctx.kit(g, tp, shape.micro_batch) for g, tp in zip(groups, shape.tps)]
    opts = ctx.options
    if sum(n * (k.capacity_bytes // max(1, math.ceil(k.block.params * opts.state_bytes_at(shape.dp))))
           for n, k in zip(counts, kits)) < L:
        return math.inf
    first, last = kits[0], kits[-1]
    fixed_s = first.embedding.fwd_s + first.embedding.bwd_s + last.head.fwd_s + last.head.bwd_s
    c = 1.0 / (1.0 - (1.0 - 1.0 / m) ** sum(counts))
    # Least sum of stage times with every stage <= tau: the fastest groups fill up first.
    # Segment j: groups 0..j-1 (by per-block time) are full, group j takes the rest, so
    # sum = tau x (Q_j - a_j P_j) + a_j L; m x tau meets c x (sum + fixed) once.
    order = sorted((k.block.fwd_s + k.block.bwd_s, n) for k, n in zip(kits, counts))
    tau = math.inf
    for j in reversed(range(len(order))):
        a_j, n_j = order[j]
        p_j = sum(n / a for a, n in order[:j])
        q_j = sum(n for _, n in order[:j])
        lo = L / (p_j + n_j / a_j)
        hi = L / p_j if p_j > 0 else math.inf
        slope = q_j - a_j * p_j
        tau = c * (a_j * L + fixed_s) / (m - c * slope)
        if tau <= hi:
            tau = max(tau, lo)
            break
    params = first.embedding.params + first.block.params
    return m * tau + _tail_s(ctx, shape, groups[0], params, first.embedding.params)


def _tail_s(ctx: CostContext, shape: PipelineShape, group, params: float, after_params: float) -> float:
    """The first stage's gradient reduction and optimizer step for `params` parameters
    (`after_params` of them, the embedding's, reduced after the backward whether or not the
    reduction overlaps it): at most what StageModel.sync_s + optim_s charge, a lower bound's tail."""
    opts = ctx.options
    path = dp_path(ctx, group, shape.dp, shape.tps[0], 0)
    reduced = after_params if opts.overlap_grad_reduce else params
    reduce = ring_rooted_s if opts.distributed_optimizer else ring_allreduce_s  # ZeRO-1: at most to the owners
    tail_s = reduce(reduced * opts.grad_reduce_bytes_per_param, shape.dp, path)
    shards = shape.dp if opts.distributed_optimizer else 1
    tail_s += params * opts.optimizer_bytes_per_param / shards / (group.kind.mem_bw_bytes_per_s * opts.memory_bw_efficiency)
    if opts.distributed_optimizer:
        tail_s += ring_all_gather_s(params * opts.broadcast_bytes_per_param, shape.dp, path)
    return tail_s


def bottleneck_lower_bound_s(ctx: CostContext, shape: PipelineShape) -> float:
    """A lower bound of the slowest stage's time per micro-batch, for any split (continuous, no memory limit)."""
    counts = stage_counts(ctx, shape)
    kits = [ctx.kit(ctx.cluster.group(g), tp, shape.micro_batch) for g, tp in zip(shape.groups, shape.tps)]
    alpha = [k.block.fwd_s + k.block.bwd_s for k in kits]
    fixed = ((kits[0].embedding.fwd_s + kits[0].embedding.bwd_s) / alpha[0]
             + (kits[-1].head.fwd_s + kits[-1].head.bwd_s) / alpha[-1])
    return (ctx.n_blocks + fixed) / sum(n / a for n, a in zip(counts, alpha))


def _work(st: StageModel, n: int) -> float | None:
    r = st.min_recompute(n)
    return None if r is None else st.fwd_s(n) + st.bwd_s(n, r)


def _tail(st: StageModel, n: int) -> float:
    """The stage's gradient reduction and optimizer step after the backward, with n blocks."""
    return st.sync_s(n) + st.optim_s(n)


def _most_blocks_within(st: StageModel, tau: float, n_max: int) -> int:
    """Largest n in [0, n_max] with work(n) <= tau (work grows with n)."""
    lo, hi = 0, n_max
    while lo < hi:
        mid = (lo + hi + 1) // 2
        w = _work(st, mid)
        if w is not None and w <= tau:
            lo = mid
        else:
            hi = mid - 1
    return lo


def split_blocks(stages: list[StageModel], n_blocks: int) -> tuple[list[int], list[int]] | None:
    """Blocks per stage minimising the bottleneck, then the sum at that bottleneck; None if nothing fits."""
    n_max = [min(st.max_blocks(), n_blocks) for st in stages]
    if min(n_max) < 1 or sum(n_max) < n_blocks:
        return None
    alpha = [st.block_fwd_s + st.block_bwd_s for st in stages]
    beta = [st.fwd_s(0) + st.bwd_s(0, 0) for st in stages]
    tau = (n_blocks + sum(b / a for a, b in zip(alpha, beta))) / sum(1 / a for a in alpha)
    n = [max(1, _most_blocks_within(st, tau, hi)) for st, hi in zip(stages, n_max)]
    work = [_work(st, k) for st, k in zip(stages, n)]
    # Too many blocks (stages forced to one): take from the slowest stages.
    heavy = [(-w, s) for s, w in enumerate(work) if n[s] > 1]
    heapq.heapify(heavy)
    while sum(n) > n_blocks:
        _, s = heapq.heappop(heavy)
        n[s] -= 1
        work[s] = _work(stages[s], n[s])
        if n[s] > 1:
            heapq.heappush(heavy, (-work[s], s))
    # Too few: give each next block to the stage whose time after it is lowest (exact min-max).
    light = [(_work(stages[s], n[s] + 1), s) for s in range(len(stages)) if n[s] < n_max[s]]
    light = [(w, s) for w, s in light if w is not None]
    heapq.heapify(light)
    while sum(n) < n_blocks:
        if not light:
            return None
        w, s = heapq.heappop(light)
        n[s] += 1
        work[s] = w
        if n[s] < n_max[s]:
            nxt = _work(stages[s], n[s] + 1)
            if nxt is not None:
                heapq.heappush(light, (nxt, s))
    # At that bottleneck, fill every stage to it and take back the blocks that cost most.
    bottleneck = max(work)
    filled = [max(k, _most_blocks_within(st, bottleneck, hi)) for st, k, hi in zip(stages, n, n_max)]
    marginal = [(-(_work(st, k) - _work(st, k - 1)), s) for s, (st, k) in enumerate(zip(stages, filled)) if k > 1]
    heapq.heapify(marginal)
    while sum(filled) > n_blocks:
        _, s = heapq.heappop(marginal)
        filled[s] -= 1
        if filled[s] > 1:
            st = stages[s]
            heapq.heappush(marginal, (-(_work(st, filled[s]) - _work(st, filled[s] - 1)), s))
    if sum(_work(st, k) for st, k in zip(stages, filled)) < sum(work):
        n = filled
    return n, [st.min_recompute(k) for st, k in zip(stages, n)]


def descend_split(stages: list[StageModel], n: list[int], m: int) -> tuple[list[int], list[int]]:
    """From a split, move single blocks between stages while closed_form_s falls.

    split_blocks balances the stages' compute; a stage whose gradient reduction and optimizer
    step are slow (a data-parallel path across slow links) is the step's tail, which is cheaper
    with fewer blocks on it. Moves: from the stage with the most work or the longest tail to
    the one with the least of either or to a neighbour; the best move each round. Stage times
    are updated for the two stages a move touches, not recomputed for all.
    """
    n = list(n)
    work = [_work(st, k) for st, k in zip(stages, n)]
    tail = [_tail(st, k) for st, k in zip(stages, n)]

    def total(w: list[float], t: list[float]) -> float:  # closed_form_s on these stage times
        return sum(w) + (m - 1) * max(w) + max(t)

    best = total(work, tail)
    S = len(stages)
    for _ in range(sum(n)):
        sources = {max(range(S), key=work.__getitem__), max(range(S), key=tail.__getitem__)}
        sinks = {min(range(S), key=work.__getitem__), min(range(S), key=tail.__getitem__)}
        move = None
        for i in sources:
            if n[i] < 2:
                continue
            for j in sinks | {i - 1, i + 1}:
                if not 0 <= j < S or j == i:
                    continue
                gained = _work(stages[j], n[j] + 1)
                if gained is None:  # stage j cannot hold another block
                    continue
                w, t = list(work), list(tail)
                w[i], w[j] = _work(stages[i], n[i] - 1), gained  # fewer blocks always fit
                t[i], t[j] = _tail(stages[i], n[i] - 1), _tail(stages[j], n[j] + 1)
                value = total(w, t)
                if value < best * (1 - 1e-12):
                    best, move = value, (i, j, w, t)
        if move is None:
            break
        i, j, work, tail = move
        n[i] -= 1
        n[j] += 1
    return n, [st.min_recompute(k) for st, k in zip(stages, n)]


def closed_form_s(stages: list[StageModel], n: list[int], r: list[int], m: int) -> float:
    """sum + (m - 1) x max of stage times plus the slowest tail: the textbook estimate of a 1F1B step.

    Cheap, and close to the prediction for balanced stages; the search ranks block moves
    and shares the batch among pipelines with it, and decides with the prediction.
    """
    work = [st.fwd_s(k) + st.bwd_s(k, rk) for st, k, rk in zip(stages, n, r)]
    tail = max(_tail(st, k) for st, k in zip(stages, n))
    return sum(work) + (m - 1) * max(work) + tail


def shape_estimate_s(ctx: CostContext, shape: PipelineShape, n_microbatches: int) -> float:
    """A quick estimate of the step (not a bound), to decide which shapes to split first.

    Group by group, with each group's average in-flight count: blocks per stage as a
    continuous function of the stage time (no recomputation up to the memory limit, then the
    recomputation the extra blocks demand, up to the full-recompute limit), a bottleneck
    level that places every block, (m + S - 1) such levels, and the first stage's gradient
    sync and optimizer step. inf when even full recomputation cannot hold the blocks.
    """
    m, L = n_microbatches, ctx.n_blocks
    opts = ctx.options
    counts = stage_counts(ctx, shape)
    groups = [ctx.cluster.group(g) for g in shape.groups]
    kits = [ctx.kit(g, tp, shape.micro_batch) for g, tp in zip(groups, shape.tps)]
    n_stages = sum(counts)
    curves = []  # per group: (stages, per-block time, blocks without recompute, slope/offset beyond, max blocks)
    start = 0
    for k, n in zip(kits, counts):
        inflight = sum(min(m, n_stages - s) for s in range(start, start + n)) / n
        start += n
        state = k.block.params * opts.state_bytes_at(shape.dp)
        room = k.capacity_bytes - k.block.act_bytes - 2 * k.boundary_bytes
        alpha, rho = k.block.fwd_s + k.block.bwd_s, k.block.recompute_s
        y_free = room / (state + inflight * k.block.act_bytes)
        y_max = room / (state + inflight * k.block.ckpt_bytes)
        saved = inflight * (k.block.act_bytes - k.block.ckpt_bytes)
        curves.append((n, alpha, rho, y_free, y_max, (state + inflight * k.block.act_bytes) / saved if saved > 0 else 0.0,
                       room / saved if saved > 0 else 0.0))
    if sum(n * c[4] for n, c in zip(counts, curves)) < L:
        return math.inf
    first, last = kits[0], kits[-1]
    extra_blocks = ((first.embedding.fwd_s + first.embedding.bwd_s) / curves[0][1]
                    + (last.head.fwd_s + last.head.bwd_s) / curves[-1][1])

    def blocks_within(tau: float) -> float:
        total = 0.0
        for n, alpha, rho, y_free, y_max, k1, k0 in curves:
            y = tau / alpha
            if y > y_free:  # alpha y + rho (k1 y - k0) = tau beyond the memory limit
                y = max(y_free, (tau + rho * k0) / (alpha + rho * k1))
            total += n * min(y, y_max)
        return total

    target = min(L + extra_blocks, sum(n * c[4] for n, c in zip(counts, curves)))
    lo, hi = 0.0, max(c[1] for c in curves) * (L + extra_blocks)
    while blocks_within(hi) < target * (1 - 1e-9):
        hi *= 2
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if blocks_within(mid) < target else (lo, mid)
    tau = hi
    params = first.embedding.params + first.block.params * L / n_stages
    return (m + n_stages - 1) * tau + _tail_s(ctx, shape, groups[0], params, first.embedding.params)

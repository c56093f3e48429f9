"""Prices interleaved 1F1B (virtual stages) with the discrete-event simulator.

An interleaved pipeline's device stage s runs model chunks s, s + S, s + 2S, ... (S device
stages, V chunks each). `interleaved_orders` gives each stage's operations in the order torch's
ScheduleInterleaved1F1B runs them, the schedule hetrain's runtime uses: warm-up forwards
((V - 1) x r + 2 (S - 1 - s) of them, in max(1, m // S) rounds of r micro-batches),
then forward-backward pairs, then the remaining backwards; the chunk of the k-th forward is
(k // r) mod V with r = m / rounds micro-batches per round, that of the k-th backward (counted
from the end of warm-up) the same from the top.
`interleaved_tasks` turns them into simulator tasks: a chunk costs its blocks' share of its
stage's StageModel (hetrain.plan.cluster.predict), the embedding and head on the chunks that
hold them, recomputation before its backward, and a blocking send to the neighbouring stage
after each forward and backward (the link from the last stage back to the first, which the
StageModels do not price, is charged at the pipeline's slowest link); a chunk's activations
are allocated at its forward and freed at its backward, so the simulated peak counts the extra
micro-batches interleaving keeps in flight. This module prices a given plan; it must not
choose anything.
"""

from __future__ import annotations

from collections import defaultdict

from hetrain.plan.cluster.predict import stage_lanes
from hetrain.predict.simulator import Task


def interleaved_orders(n_stages: int, n_chunks_per_stage: int,
                       n_microbatches: int) -> list[list[tuple[bool, int, int]]]:
    """Per device stage, its operations as (is_forward, chunk, micro-batch), in torch's interleaved 1F1B order."""
    S, V, m = n_stages, n_chunks_per_stage, n_microbatches
    per_round = m // max(1, m // S)  # micro-batches per round
    orders = []
    for s in range(S):
        warmup = min((V - 1) * per_round + 2 * (S - 1 - s), m * V)
        total = m * V
        next_mb: dict[tuple[bool, int], int] = defaultdict(int)

        def take(forward: bool, chunk: int) -> tuple[bool, int, int]:
            mb = next_mb[forward, chunk]
            next_mb[forward, chunk] = mb + 1
            return forward, chunk, mb

        def fwd_chunk(k: int) -> int:
            return ((k // per_round) % V) * S + s

        def bwd_chunk(k: int) -> int:
            return (V - 1 - ((k - warmup) // per_round) % V) * S + s

        ops = [take(True, fwd_chunk(k)) for k in range(warmup)]
        for k in range(warmup, total):
            ops += [take(True, fwd_chunk(k)), take(False, bwd_chunk(k))]
        ops += [take(False, bwd_chunk(k)) for k in range(total, total + warmup)]
        orders.append(ops)
    return orders


def interleaved_tasks(p: int, stages: list, chunks: list, n_microbatches: int) -> tuple[list[Task], dict]:
    """Simulator tasks of one replica of an interleaved pipeline: `stages` are the StageModels of its
    device stages, `chunks` its StagePlans in model order (chunk c on stage c mod S)."""
    S = len(stages)
    V = len(chunks) // S
    lanes = stage_lanes(p, stages)
    totals = [(sum(c.n_blocks for c in chunks[s::S]), sum(c.n_recompute_blocks for c in chunks[s::S]))
              for s in range(S)]
    base = {lane: st.static_bytes(n) for lane, st, (n, _) in zip(lanes, stages, totals)}
    slowest_fwd = max(st.send_fwd_s for st in stages)
    slowest_bwd = max(st.send_bwd_s for st in stages)
    last = len(chunks) - 1

    def holds_fixed(c: int) -> bool:
        # The embedding (chunk 0) and the head (the last chunk) are their stage's fixed layers;
        # with one stage both are, and count on chunk 0.
        return c == 0 if S == 1 else chunks[c].embedding or chunks[c].head

    def fixed(c: int, kind: str) -> float:
        st = stages[c % S]
        return (st.fixed_fwd_s if kind == "fwd" else st.fixed_bwd_s) if holds_fixed(c) else 0.0

    def act_bytes(c: int) -> int:
        st, ch = stages[c % S], chunks[c]
        return (st.fixed_act_bytes if holds_fixed(c) else 0) + (ch.n_blocks - ch.n_recompute_blocks) \
            * st.block_act_bytes + ch.n_recompute_blocks * st.block_ckpt_bytes

    tasks: list[Task] = []
    last_on: dict[int, str] = {}
    done: dict[tuple[bool, int, int], str] = {}

    def add(s: int, name: str, dur: float, deps: list[str], cat: str, **kw) -> str:
        full = f"P{p}.S{s}.{name}"
        chain = [last_on[s]] if s in last_on else []
        tasks.append(Task(full, lanes[s], dur, tuple(chain + deps), cat=cat, **kw))
        last_on[s] = full
        return full

    orders = interleaved_orders(S, V, n_microbatches)
    positions = [0] * S
    remaining = sum(len(o) for o in orders)
    while remaining:  # emit in a dependency-respecting order so deps always exist already
        progressed = False
        for s in range(S):
            st = stages[s]
            while positions[s] < len(orders[s]):
                fwd, c, i = orders[s][positions[s]]
                act = {lanes[s]: act_bytes(c)}
                if fwd:
                    if c > 0 and (True, c - 1, i) not in done:
                        break
                    deps = [done[True, c - 1, i]] if c > 0 else []
                    name = add(s, f"F{i}c{c}", fixed(c, "fwd") + chunks[c].n_blocks * st.block_fwd_s, deps, "fwd",
                               alloc=act)
                    if c < last:
                        send = st.send_fwd_s if s < S - 1 else slowest_fwd
                        name = add(s, f"sendF{i}c{c}", send, [], "comm") if send > 0 else name
                else:
                    if c < last and (False, c + 1, i) not in done:
                        break
                    deps = [done[False, c + 1, i]] if c < last else []
                    if chunks[c].n_recompute_blocks:
                        add(s, f"R{i}c{c}", chunks[c].n_recompute_blocks * st.block_recompute_s, deps, "recompute")
                        deps = []
                    name = add(s, f"B{i}c{c}", fixed(c, "bwd") + chunks[c].n_blocks * st.block_bwd_s, deps, "bwd",
                               free=act)
                    if c > 0:
                        send = st.send_bwd_s if s > 0 else slowest_bwd
                        name = add(s, f"sendB{i}c{c}", send, [], "comm") if send > 0 else name
                done[fwd, c, i] = name
                positions[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise ValueError("interleaved schedule has a dependency cycle (a bug in interleaved_orders)")
    for s, (st, (n, _)) in enumerate(zip(stages, totals)):
        if st.sync_s(n) > 0:
            add(s, "sync", st.sync_s(n), [], "sync")
        add(s, "optim", st.optim_s(n), [], "optim")
    return tasks, base

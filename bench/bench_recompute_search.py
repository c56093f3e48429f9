"""HEU against OPT: the recomputation policy of every stage, predicted step and search time, in one run.

For each small case (a model, a one-group cluster of 2-4 devices whose memory forces
recomputation, a pinned pipeline), `hetrain plan --cluster` machinery gives the stages and their
split; then every stage's policy is chosen by HEU (one unit set and rule per stage's identical
blocks, hetrain.plan.cluster.recompute_policy.heuristic) and by OPT (the per-block, per-unit MILP, HiGHS),
each in rounds against the windows of the schedule, on the same split. Printed per case: the
predicted step with whole-block recomputation on demand (the search's), with HEU and with OPT, HEU
over OPT, and both search times. Then HEU's search time on a 96-block model (gpt3-2.7b's shape with
96 layers, 8 stages), the goal being under 0.2 s.

    .venv/bin/python bench/bench_recompute_search.py
"""

from __future__ import annotations

import dataclasses
import os
import time

from hetrain.hardware.cluster import parse_cluster
from hetrain.model.presets import get_preset
from hetrain.plan.cluster.planner import plan_cluster
from hetrain.plan.cluster.cost import PredictorOptions
from hetrain.plan.cluster.predict import build_stages, context_for, shape_of
from hetrain.plan.cluster.search import Pins, SearchOptions
from hetrain.plan.cluster.recompute_split import Pricer

# name -> (preset and overrides, pipeline stages, micro-batch, global batch, seq_len, link GB/s, memory):
# memory places each device's limit between the most loaded stage's peak with every block
# recomputed (0) and without recomputation (1).
CASES = {
    "A: small 4 blocks, PP2": (dict(n_layer=4), 2, 2, 16, 128, 2.0, 0.5),
    "B: small 6 blocks, PP2, slow link": (dict(n_layer=6), 2, 2, 16, 128, 0.05, 0.4),
    "C: small 8 blocks, PP4": (dict(n_layer=8), 4, 2, 16, 128, 1.0, 0.3),
    "D: small 8 blocks, PP4, slow link": (dict(n_layer=8), 4, 2, 16, 128, 0.05, 0.6),
    "E: tiny-llama 6 blocks, PP3": (dict(preset="tiny-llama", n_layer=6, d_model=128, d_ff=384, max_seq_len=256),
                                    3, 4, 24, 256, 0.2, 0.5),
    "F: small 6 blocks, dropout, PP2": (dict(n_layer=6, dropout=0.1), 2, 2, 8, 128, 0.2, 0.3),
    "G: small 8 blocks, PP2, 8 micro-batches": (dict(n_layer=8), 2, 2, 32, 128, 0.5, 0.7),
}


def cluster(devices: int, mem_gib: float, link_gbytes_per_s: float):
    return parse_cluster(f'name = "cpu{devices}"\n[[group]]\nname = "cpu"\nkind = "cpu"\nnodes = 1\n'
                         f"devices_per_node = {devices}\nintra_node_gbytes_per_s = {link_gbytes_per_s}\n"
                         f"inter_node_gbytes_per_s = {link_gbytes_per_s}\nintra_node_latency_us = 50\n"
                         f"inter_node_latency_us = 50\nmemory_gib = {mem_gib}\npeak_fp32_tflops = 0.1\n"
                         f"peak_bf16_tflops = 0.1\n")


def _plan(cfg, pp, mb, gb, seq, link, mem_gib):
    return plan_cluster(cfg, cluster(pp, mem_gib, link), gb, seq, PredictorOptions(),
                        SearchOptions(pins=Pins(pp=pp, micro_batch=mb), upper_bound=False, recompute="whole",
                                      interleave=False))


def compare(name: str) -> dict:
    extra, pp, mb, gb, seq, link, frac = CASES[name]
    extra = dict(extra)
    cfg = dataclasses.replace(get_preset(extra.pop("preset", "small")), **extra)
    roomy = _plan(cfg, pp, mb, gb, seq, link, 64.0)
    ctx = context_for(roomy)
    pipe = roomy.pipelines[0]
    stages = build_stages(ctx, shape_of(pipe), pipe.n_microbatches)
    n = [s.n_blocks for s in pipe.stages]
    low = max(st.peak_bytes(k, k) for st, k in zip(stages, n))
    high = max(st.peak_bytes(k, 0) for st, k in zip(stages, n))
    limit = low + frac * (high - low)
    plan = _plan(cfg, pp, mb, gb, seq, link, limit / (1 - ctx.options.memory_reserve_fraction) / 2**30)
    pipe = plan.pipelines[0]
    ctx = context_for(plan)
    stages = build_stages(ctx, shape_of(pipe), pipe.n_microbatches)
    n = [s.n_blocks for s in pipe.stages]
    whole_s = Pricer(ctx, stages, pipe.n_microbatches, pipe.micro_batch, "heu").whole_block_s(
        n, [s.n_recompute_blocks for s in pipe.stages])
    out = {"name": name, "split": n, "recompute_blocks": [s.n_recompute_blocks for s in pipe.stages],
           "whole_s": whole_s}
    for method in ("heu", "opt"):
        pricer = Pricer(ctx, stages, pipe.n_microbatches, pipe.micro_batch, method)
        t0 = time.perf_counter()
        step, rec = pricer.price(n)
        out[method] = step
        out[f"{method}_search_s"] = time.perf_counter() - t0
    return out


def heu_96_blocks() -> tuple[float, int]:
    """HEU on gpt3-2.7b's shape with 96 blocks over 8 stages (the search time of the policy)."""
    cfg = dataclasses.replace(get_preset("gpt3-2.7b"), n_layer=96)
    text = ('name = "a100x8"\n[[group]]\nname = "a100"\nkind = "A100-40GB"\nnodes = 1\ndevices_per_node = 8\n'
            'intra_node_gbytes_per_s = 50\ninter_node_gbytes_per_s = 12.5\n')
    plan = plan_cluster(cfg, parse_cluster(text), 64, 2048, PredictorOptions(),
                        SearchOptions(pins=Pins(pp=8, tp=1, micro_batch=2), upper_bound=False, recompute="whole",
                                      interleave=False))
    pipe = plan.pipelines[0]
    ctx = context_for(plan)
    stages = build_stages(ctx, shape_of(pipe), pipe.n_microbatches)
    pricer = Pricer(ctx, stages, pipe.n_microbatches, pipe.micro_batch, "heu")
    n = [s.n_blocks for s in pipe.stages]
    t0 = time.perf_counter()
    pricer.price(n)
    return time.perf_counter() - t0, sum(s.n_recompute_blocks for s in pipe.stages)


def main() -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores; predicted steps of one split per case")
    print(f"{'case':<36} {'split':<13} {'whole ms':>9} {'HEU ms':>9} {'OPT ms':>9} {'HEU/OPT':>8} "
          f"{'HEU s':>7} {'OPT s':>7}")
    worst = 0.0
    for name in CASES:
        r = compare(name)
        ratio = r["heu"] / r["opt"]
        worst = max(worst, ratio)
        print(f"{name:<36} {'+'.join(map(str, r['split'])):<13} {1e3 * r['whole_s']:>9.2f} {1e3 * r['heu']:>9.2f} "
              f"{1e3 * r['opt']:>9.2f} {ratio:>8.4f} {r['heu_search_s']:>7.3f} {r['opt_search_s']:>7.2f}", flush=True)
    search_s, whole_blocks = heu_96_blocks()
    print(f"HEU on a 96-block model (gpt3-2.7b shape, 8 stages of 12 blocks, {whole_blocks} blocks recomputed whole "
          f"by the search): {search_s:.3f} s for every stage's policy (4 rounds at most)")
    print(f"worst HEU / OPT: {worst:.4f}")


if __name__ == "__main__":
    main()

"""Offload planner: solve time against model depth, and plan quality against the AutoHete family.

Part 1 plans GPT-3-175B-shaped models (d_model 12288, one sequence of 2048 tokens per
micro-batch) and GPT-3-13B-shaped ones (d_model 5120, 8 sequences of 1024), cut to 24, 48 and
96 blocks, in bf16 on a catalog GPU (H100-SXM by default) at several device budgets, with a host budget of 1.2 times what updating everything on the CPU needs. For each it
prints the first MILP solve, the whole planning call (all candidates, polishing and their
simulations; best of `--repeats`, with the CPU time of that run, steadier than wall time on a
shared machine), the step time the MILP predicts and the simulator finds, the planned peak, and
how far the default HiGHS gap leaves the MILP from its proven optimum (a solve to 1e-6).

Part 2 plans an 8-block GPT (d_model 2048, micro-batch 8 x 1024 tokens, bf16) on an A100-40GB
at budgets from 80% to 25% of plain training's peak and simulates every member of the AutoHete
prefix/suffix family (recompute the first r blocks, stream the first s, update the last c on
the CPU) that fits, printing the planner's simulated step time over the family's best.

Runs on a CPU; nothing here needs a GPU.

    python bench/bench_offload_planner.py [--blocks 24,48,96] [--budgets-gib 80,40,20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import platform
import statistics
import time

from hetrain.errors import ConfigError
from hetrain.config import load_config
from hetrain.hardware.catalog import get_kind
from hetrain.plan.offload.graph import choice_of, offload_prices, simulate_offload
from hetrain.plan.offload.milp import OffloadModel
from hetrain.plan.offload.plan import OffloadPlan
from hetrain.plan.offload.planner import PlannerOptions, step_settings
from hetrain.predict.cost import RooflineCost
from hetrain.train.job import batch_shape, describe
from hetrain.train.offload_planning import plan_offload_for

GIB = 2**30


def model_config(n_layer: int, preset: str, micro_batch: int, seq_len: int):
    return load_config(None, {"model.preset": preset, "model.n_layer": str(n_layer), "train.dtype": "bf16",
                              "train.micro_batch": str(micro_batch), "train.seq_len": str(seq_len)})


def prices_and_model(cfg, cost, device_bytes=None, host_bytes=None):
    prices = offload_prices(describe(cfg), cost, step_settings(describe(cfg), batch_shape(cfg), cost, PlannerOptions()))
    return prices, OffloadModel(prices, device_bytes, host_bytes)


SHAPES = {  # preset -> (micro-batch, sequence length)
    "gpt3-175b": (1, 2048),
    "gpt3-13b": (8, 1024),
}


def solve_times(preset: str, blocks: list[int], budgets_gib: list[float], kind: str, repeats: int) -> None:
    micro_batch, seq_len = SHAPES[preset]
    print(f"\n## Solve time, {preset}-shaped blocks, micro-batch {micro_batch} x {seq_len}, bf16, on {kind}")
    print("| blocks | device budget | first MILP solve | plan_offload wall (CPU) | MILP step | simulated step | "
          "planned peak | gap to proven optimum | plan |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in blocks:
        cfg = model_config(n, preset, micro_batch, seq_len)
        cost = RooflineCost(describe(cfg), get_kind(kind), "bf16")
        _, unbounded = prices_and_model(cfg, cost)
        host = int(1.2 * unbounded.evaluate(((1, 1, 1),) * (n + 2)).host_bytes)
        for budget_gib in budgets_gib:
            budget = int(budget_gib * GIB)
            walls, cpus, plan = [], [], None
            for _ in range(repeats):
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                plan = plan_offload_for(cfg, budget, host, cost)
                walls.append(time.perf_counter() - start_wall)
                cpus.append(time.process_time() - start_cpu)
            best = min(range(repeats), key=walls.__getitem__)
            _, model = prices_and_model(cfg, cost, budget, host)
            first = model.solve(mip_rel_gap=PlannerOptions().mip_rel_gap)
            _, exact_model = prices_and_model(cfg, cost, budget, host)
            exact = exact_model.solve(time_limit_s=120, mip_rel_gap=1e-6)
            chosen = exact_model.evaluate(choice_of(plan))
            gap = chosen.objective / exact.objective - 1
            print(f"| {n} | {budget_gib:g} GiB | {first.solve_s:.3f} s | {walls[best]:.3f} s ({cpus[best]:.3f} s) | "
                  f"{plan.search['milp_step_s']:.2f} s | {plan.predicted_step_s:.2f} s | "
                  f"{plan.predicted_peak_device_bytes / GIB:.1f} GiB | {gap:+.3%} | {plan.summary()[:70]} |")


def family_comparison(kind: str) -> None:
    print(f"\n## Against the prefix/suffix family, 8-block GPT (d_model 2048), micro-batch 8 x 1024, bf16, on {kind}")
    cfg = model_config(8, "gpt3-1.3b", 8, 1024)
    cost = RooflineCost(describe(cfg), get_kind(kind), "bf16")
    prices, unbounded = prices_and_model(cfg, cost)
    resident = unbounded.evaluate(((0, 0, 0),) * 10).peak_device_bytes
    host = 200 * GIB
    family = [choice_of(OffloadPlan.prefix_suffix(8, r, s, c)) for r, s, c in itertools.product(range(9), repeat=3)]
    print("| budget (of plain peak) | planner, simulated | family best, simulated | ratio | family members that fit |")
    print("|---|---|---|---|---|")
    ratios = []
    for fraction in (0.8, 0.6, 0.5, 0.4, 0.3, 0.25):
        budget = int(fraction * resident)
        try:
            plan = plan_offload_for(cfg, budget, host, cost)
        except ConfigError as e:  # below the smallest budget any plan fits
            print(f"| {fraction:.0%} ({budget / GIB:.1f} GiB) | no plan fits: the smallest is {str(e).partition('fits is ')[2].split(' (')[0] or e} | - | - | - |")
            continue
        _, model = prices_and_model(cfg, cost, budget, host)
        fits = model.feasible(model.values(family))
        members = [ch for ch, ok in zip(family, fits) if ok]
        if not members:
            print(f"| {fraction:.0%} ({budget / GIB:.1f} GiB) | {plan.predicted_step_s * 1e3:.1f} ms | none fits "
                  f"(the family keeps embedding and head resident) | - | 0 of {len(family)} |")
            continue
        family_best = min(simulate_offload(prices, ch).step_s for ch in members)
        ratios.append(plan.predicted_step_s / family_best)
        print(f"| {fraction:.0%} ({budget / GIB:.1f} GiB) | {plan.predicted_step_s * 1e3:.1f} ms | "
              f"{family_best * 1e3:.1f} ms | {ratios[-1]:.3f} | {len(members)} of {len(family)} |")
    if ratios:
        print(f"median ratio {statistics.median(ratios):.3f}, worst {max(ratios):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="gpt3-175b,gpt3-13b", help=f"model shapes, of {', '.join(SHAPES)}")
    parser.add_argument("--blocks", default="24,48,96")
    parser.add_argument("--budgets-gib", default="80,40,20")
    parser.add_argument("--kind", default="H100-SXM")
    parser.add_argument("--family-kind", default="A100-40GB")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"# bench_offload_planner, {datetime.datetime.now().isoformat(timespec='minutes')}, "
          f"{platform.node()}, {platform.processor() or platform.machine()}, python {platform.python_version()}")
    for preset in args.presets.split(","):
        solve_times(preset, [int(b) for b in args.blocks.split(",")], [float(b) for b in args.budgets_gib.split(",")],
                    args.kind, args.repeats)
    family_comparison(args.family_kind)


if __name__ == "__main__":
    main()

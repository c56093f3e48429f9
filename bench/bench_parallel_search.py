"""Search time of the cluster planner against cluster size (64 to 4,096 devices, three kinds).

Each cluster has the proportions of configs/clusters/mixed.toml (a quarter A100-80GB, a
quarter H100-SXM, half MI250X dies, nodes of 8, the same links). For each size and model the
benchmark plans a step of `--global-batch` sequences of `--seq-len` tokens and prints the
wall time to find the plan, to simulate it, and to plan each kind alone for the upper
bound, the CPU time of all three (steadier than wall time on a shared machine), and the
predicted throughput and efficiency against that bound. It runs on a CPU;
nothing here needs a GPU.

    python bench/bench_parallel_search.py [--sizes 64,256,1024] [--models llama2-70b,llama-140b]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

from hetrain.errors import ConfigError
from hetrain.hardware.cluster import parse_cluster
from hetrain.model.presets import get_preset
from hetrain.plan.cluster.planner import plan_cluster


def mixed_cluster(n_devices: int):
    """A cluster like configs/clusters/mixed.toml with n_devices devices (a multiple of 32)."""
    quarter_nodes = n_devices // 32
    text = f"""
        name = "mixed-{n_devices}"
        [[group]]
        name = "a100"
        kind = "A100-80GB"
        nodes = {quarter_nodes}
        devices_per_node = 8
        intra_node_gbytes_per_s = 300
        inter_node_gbytes_per_s = 200
        [[group]]
        name = "h100"
        kind = "H100-SXM"
        nodes = {quarter_nodes}
        devices_per_node = 8
        intra_node_gbytes_per_s = 450
        inter_node_gbytes_per_s = 400
        [[group]]
        name = "mi250x"
        kind = "MI250X-GCD"
        nodes = {2 * quarter_nodes}
        devices_per_node = 8
        intra_node_gbytes_per_s = 100
        inter_node_gbytes_per_s = 100
        intra_node_latency_us = 5
        inter_node_latency_us = 12
        [[link]]
        groups = ["a100", "h100"]
        gbytes_per_s = 200
        """
    return parse_cluster("\n".join(line.strip() for line in text.splitlines()), f"mixed-{n_devices}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,128,256,512,1024,2048,4096")
    parser.add_argument("--models", default="llama2-70b,llama-140b")
    parser.add_argument("--global-batch", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=4096)
    args = parser.parse_args()
    print(f"# {datetime.date.today()} {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"# global batch {args.global_batch} x seq_len {args.seq_len}")
    header = (f"{'model':<12} {'devices':>7} {'search s':>9} {'simulate s':>10} {'bound s':>8} {'cpu s':>6} "
              f"{'step s':>8} {'tokens/s':>10} {'eff %':>6}  plan")
    print(header)
    for name in args.models.split(","):
        cfg = get_preset(name)
        for n in (int(s) for s in args.sizes.split(",")):
            cluster = mixed_cluster(n)
            start, cpu_start = time.perf_counter(), time.process_time()
            try:
                plan = plan_cluster(cfg, cluster, args.global_batch, args.seq_len)
            except ConfigError as err:
                print(f"{name:<12} {n:>7} {time.perf_counter() - start:>9.2f}  no plan: {err}")
                continue
            s, pred = plan.search, plan.prediction
            layout = " | ".join(f"{'->'.join(p.groups)} dp{p.dp} x{len(p.stages)}st mb{p.micro_batch}x{p.n_microbatches}"
                                for p in plan.pipelines)
            cpu_s = time.process_time() - cpu_start
            print(f"{name:<12} {n:>7} {s['search_s']:>9.2f} {s['predict_s']:>10.2f} {s['upper_bound_s']:>8.2f} {cpu_s:>6.2f} "
                  f"{pred['step_s']:>8.3f} {pred['tokens_per_s']:>10,.0f} "
                  f"{100 * plan.upper_bound['efficiency']:>6.1f}  {layout}", flush=True)


if __name__ == "__main__":
    main()

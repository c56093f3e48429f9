"""Helpers for the cluster-plan tests: plans written by hand on a local CPU cluster, torchrun, results.

Plans here are plain data, as `hetrain plan --cluster` writes them, so a test can ask for an
exact layout (a non-uniform split, two pipelines sharing the batch) that the planner might not
choose for a tiny model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from hetrain.hardware.cluster import cluster_to_dict, load_cluster, parse_cluster
from hetrain.model.presets import get_preset
from hetrain.plan.cluster.plan import ClusterPlan, PipelinePlan, StagePlan, interleave

REPO = Path(__file__).resolve().parents[2]
LOCAL_CPU = REPO / "configs" / "clusters" / "local-cpu.toml"
N_LAYER = 5
SEQ_LEN = 32


def model(**extra) -> dict:
    return dataclasses.asdict(dataclasses.replace(get_preset("tiny"), n_layer=N_LAYER, **extra))


def one_group_cluster(devices: int, label: str = "cpu-a") -> dict:
    """A cluster of `devices` CPU processes in one group."""
    text = (f'name = "cpu{devices}"\n[[group]]\nname = "{label}"\nkind = "cpu"\nlabel = "{label}"\nnodes = 1\n'
            f"devices_per_node = {devices}\nintra_node_gbytes_per_s = 2\ninter_node_gbytes_per_s = 2\n")
    return cluster_to_dict(parse_cluster(text))


def local_cpu() -> dict:
    return cluster_to_dict(load_cluster(LOCAL_CPU))


def pipeline(groups: list[str], blocks: list[int], *, tp: int = 1, dp: int = 1, micro_batch: int = 2,
             n_microbatches: int = 4, recompute: list[int] | None = None, stage_groups: list[str] | None = None,
             virtual_stages: int = 1, policies: list[list[dict]] | None = None) -> PipelinePlan:
    """A pipeline whose stage s holds blocks[s] blocks (recompute[s] of them recomputed whole, or
    policies[s]: its plan.json recompute groups, hetrain.plan.cluster.recompute_plan)."""
    recompute = recompute or [0] * len(blocks)
    stage_groups = stage_groups or [groups[0]] * len(blocks)
    stages, first = [], 0
    for s, (n, r, g) in enumerate(zip(blocks, recompute, stage_groups)):
        policy = {"blocks": policies[s]} if policies and policies[s] else {}
        stages.append(StagePlan(g, g, tp, first, n, r, embedding=s == 0, head=s == len(blocks) - 1,
                                recompute=policy))
        first += n
    pipe = PipelinePlan(groups, [tp] * len(groups), dp, micro_batch, n_microbatches, stages)
    return interleave(pipe, virtual_stages) if virtual_stages > 1 else pipe


def write_plan(path: Path, cluster: dict, pipelines: list[PipelinePlan], options: dict | None = None,
               **model_extra) -> Path:
    plan = ClusterPlan(model=model(**model_extra), cluster=cluster, global_batch=sum(p.samples_per_step for p in pipelines),
                       seq_len=SEQ_LEN, options=options or {}, pipelines=pipelines,
                       prediction={"step_s": 0.01, "stages": []})
    plan.save(path)
    return path


def torchrun_cmd(nproc: int, args: list[str], node: tuple[int, int, int] | None = None) -> list[str]:
    """torchrun on one node (--standalone), or node (rank, nnodes, port) of a c10d rendezvous on 127.0.0.1."""
    launch = ["--standalone"] if node is None else [
        "--nnodes", str(node[1]), "--node-rank", str(node[0]), "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{node[2]}", "--rdzv-id", "hetrain-test"]
    return [sys.executable, "-m", "torch.distributed.run", *launch, "--nproc_per_node", str(nproc),
            "-m", "hetrain.cli", "train", *args]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def torchrun(nproc: int, args: list[str], cwd, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(nproc, args), cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())}


def records(run_dir) -> list[dict]:
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def write_hf_plan(path: Path, cluster: dict, pipelines: list[PipelinePlan], folder) -> Path:
    """A hand-written plan for the transformers model in `folder`, recorded as `hetrain plan
    --cluster FILE --hf.path folder` records it."""
    from hetrain.model.spec import ModelSpec

    model = ModelSpec.hf_folder(str(folder))
    plan = ClusterPlan(model=model.record, hf=model.hf, cluster=cluster,
                       global_batch=sum(p.samples_per_step for p in pipelines), seq_len=SEQ_LEN, options={},
                       pipelines=pipelines, prediction={"step_s": 0.01, "stages": []})
    plan.save(path)
    return path

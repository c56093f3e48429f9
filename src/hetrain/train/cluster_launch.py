"""Entry point for running a cluster plan: `torchrun ... -m hetrain.cli train --plan.file plan.json`.

`train_cluster_plan(cfg)` is what `hetrain train` calls when --plan.file is a cluster plan. It
checks, before any process group exists, that the plan can run here (its stage list, the
world size torchrun launched, this rank's device kind), takes the model and sequence length
from the plan, then starts torch.distributed with the configured timeout (run.dist_timeout_s),
makes the plan's process groups (hetrain.pipeline.communicator) and runs the loop
(hetrain.train.cluster_trainer). One node: `torchrun --standalone --nproc_per_node N`; several:
one torchrun per node with `--nnodes K --node-rank i --rdzv-backend c10d --rdzv-endpoint
HOST:PORT` (docs/pipeline.md). This module wires; it must not train, plan or communicate itself.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from hetrain.config import Config
from hetrain.errors import ConfigError
from hetrain.model.gpt import ModelConfig
from hetrain.pipeline.placement import Layout, check_device, check_world, place_plan
from hetrain.plan.cluster.plan import PLAN_FORMAT, ClusterPlan


def is_cluster_plan(path: str) -> bool:
    """Whether the file is a plan from `hetrain plan --cluster` (not an offload plan)."""
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            return json.load(f).get("format") == PLAN_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_cluster_plan(path: str) -> ClusterPlan:
    try:
        return ClusterPlan.load(os.path.expanduser(path))
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"plan file '{path}' is not a readable cluster plan ({e}); make one with "
                          f"`hetrain plan --cluster FILE`") from None


def config_for_plan(cfg: Config, plan: ClusterPlan) -> Config:
    """The run's config with the plan's model and sequence length (the plan was made for them).

    A plan for a transformers model runs the folder it names (or --hf.path, when given), which
    must still hold the architecture the plan was made for."""
    if plan.hf:
        return _hf_config_for_plan(cfg, plan)
    if cfg.hf.path:
        raise ConfigError(f"plan file '{cfg.plan.file}' was made for hetrain's GPT, not a transformers model; drop "
                          f"--hf.path, or re-plan with `hetrain plan --cluster FILE --hf.path {cfg.hf.path}`")
    try:
        model = ModelConfig(**plan.model)
        model.validate()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"plan file '{cfg.plan.file}' describes no valid model ({e}); re-plan") from None
    if plan.seq_len > model.max_seq_len:
        raise ConfigError(f"plan file '{cfg.plan.file}' has seq_len {plan.seq_len} above the model's max_seq_len "
                          f"{model.max_seq_len}; re-plan")
    train = dataclasses.replace(cfg.train, seq_len=plan.seq_len)
    return dataclasses.replace(cfg, model=model, train=train)


def _hf_config_for_plan(cfg: Config, plan: ClusterPlan) -> Config:
    from hetrain.model.hf import config_key, load_hf_config

    path = cfg.hf.path or plan.hf.get("path", "")
    config = load_hf_config(path)  # ConfigError naming --hf.path when the folder is gone
    if config_key(config) != plan.hf.get("config"):
        raise ConfigError(f"the model at '{path}' is not the one plan file '{cfg.plan.file}' was made for (its "
                          f"config.json differs); re-plan with `hetrain plan --cluster FILE --hf.path {path}`")
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and plan.seq_len > limit:
        raise ConfigError(f"plan file '{cfg.plan.file}' has seq_len {plan.seq_len} above the model's "
                          f"max_position_embeddings {limit}; re-plan")
    train = dataclasses.replace(cfg.train, seq_len=plan.seq_len)
    return dataclasses.replace(cfg, hf=dataclasses.replace(cfg.hf, path=path), train=train)


def check_cluster(plan: ClusterPlan, path: str) -> None:
    """ConfigError unless the cluster file has the plan's groups: the same names, kinds and device counts."""
    from hetrain.hardware.cluster import cluster_to_dict, load_cluster

    def shape(groups):
        return {g["name"]: (g.get("label", g["kind"]), g["nodes"] * g["devices_per_node"]) for g in groups}

    have, want = shape(cluster_to_dict(load_cluster(path))["group"]), shape(plan.cluster["group"])
    for name, (kind, devices) in want.items():
        if have.get(name) != (kind, devices):
            found = f"{have[name][1]} x {have[name][0]}" if name in have else "no such group"
            raise ConfigError(f"the plan runs group '{name}' as {devices} x {kind} but cluster file '{path}' has "
                              f"{found}; re-plan for this cluster or drop --plan.cluster")


def prepare(cfg: Config) -> tuple[Config, ClusterPlan, Layout, int]:
    """Everything that can fail on input, for this process: (config, plan, layout, rank)."""
    plan = load_cluster_plan(cfg.plan.file)
    cfg = config_for_plan(cfg, plan)
    if cfg.run.recompute_full_rerun and cfg.hf.path:  # hf.path may come from the plan file
        raise ConfigError("run.recompute_full_rerun applies to hetrain's own models; this plan trains a "
                          "transformers model: drop --run.recompute_full_rerun")
    layout = place_plan(plan)
    if cfg.plan.cluster:
        check_cluster(plan, cfg.plan.cluster)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_world(layout, world, cfg.plan.file)
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    check_device(layout.places[rank], torch.cuda.device_count() if torch.cuda.is_available() else 0, local)
    return cfg, plan, layout, rank


def train_cluster_plan(cfg: Config) -> int:
    """Run the cluster plan cfg.plan.file in this process (one of the plan's ranks). Exit code."""
    from hetrain.config import format_config
    from hetrain.train.cluster_trainer import ClusterTrainer

    cfg, plan, layout, rank = prepare(cfg)
    print(format_config(cfg), flush=True)
    trainer = ClusterTrainer(cfg, plan, layout, rank)
    try:
        trainer.fit()
    except KeyboardInterrupt:
        return 130
    return 0

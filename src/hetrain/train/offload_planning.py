"""The offload plan a Config asks for: its cost model, its budgets, and `hetrain plan`'s output.

hetrain.plan.offload.planner searches over a model, a batch shape, a cost model and budgets;
this module reads those from the Config: `default_cost` (this machine's profile, profiling the
model now when that is worth it, else the catalog), `resolve_budgets` (memory.device_budget and
memory.host_budget, a share of plain training's need on a CPU or of the GPU's memory),
`plan_for_config` (what `hetrain train` runs) and `run_offload_planning` (what `hetrain plan`
runs: the table printed, plan.json written). It wires; it must not price or search.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from hetrain.config import Config, parse_bytes, parse_device_budget
from hetrain.errors import ConfigError
from hetrain.plan.offload.plan import OffloadPlan
from hetrain.plan.offload.planner import PlannerOptions, plain_peak_bytes, plan_offload
from hetrain.predict.cost import CostModel
from hetrain.train.job import batch_shape, describe, job_cost, model_spec, profile_job, training_threads
from hetrain.units import fmt_bytes

HOST_BUDGET_FRACTION = 0.8
"""Default host budget: this share of the machine's RAM (config: memory.host_budget)."""
GPU_BUDGET_FRACTION = 0.9
"""memory.device_budget 'auto' on a GPU: this share of its memory; the rest is left to the CUDA
context, the allocator's fragmentation and the kernels' workspaces, which the plan does not count."""
AUTO_CPU_SHARE = 0.5
"""memory.device_budget 'auto' on a CPU: this share of what plain training would hold. Small
enough that the default job's plan mixes recomputation, streamed weights and CPU updates."""



def default_cost(cfg: Config) -> CostModel:
    """This machine's profile when it has the model, else the catalog kind (see cost_model). On
    a CPU device with no profile of this model and no --hardware.device_kind, the model is
    profiled now (seconds for small models, cached): the catalog's CPU entry is a placeholder
    whose times are off by several fold, and a plan should be priced by what this machine does."""
    from hetrain.predict.profiler import ProfileOptions
    from hetrain.predict.profile_store import load_profile

    desc = describe(cfg)
    if cfg.hardware.device_kind:
        return job_cost(cfg, None, desc)
    profile = load_profile(cfg.hardware.profile_dir)
    if profile is not None:
        try:
            return job_cost(cfg, profile, desc)
        except ConfigError:  # the profile has no entry for this model
            pass
    if _gpu_memory_bytes(cfg) is not None:
        return job_cost(cfg, None, desc)  # the catalog's figures for this GPU
    too_big = _profile_too_big(cfg)
    if too_big:
        print(f"hetrain: {too_big}; pricing the plan with the catalog's 'cpu' figures instead (a roofline, off by "
              f"several fold on a CPU): run `hetrain profile` to measure anyway, or name --hardware.device_kind",
              flush=True)
        return job_cost(cfg, None, desc)
    print("hetrain: profiling this model on this CPU for the planner (once; cached under hardware.profile_dir)",
          flush=True)
    profile, _, _ = profile_job(cfg, ProfileOptions(collectives=False))
    return job_cost(cfg, profile, desc)


PROFILE_MAX_S = 120.0
"""The longest the planner profiles a model by itself before falling back to the catalog."""
PROFILE_MAX_RAM_SHARE = 0.25
"""The largest share of host RAM a profile the planner starts by itself may take."""


def _profile_too_big(cfg: Config) -> str:
    """Why profiling `cfg`'s model on this CPU is not worth it ('' when it is): the estimate of
    hetrain.predict.profiler at this CPU's matmul rate (measured in a tenth of a second),
    against PROFILE_MAX_S and PROFILE_MAX_RAM_SHARE of this machine's RAM."""
    import torch

    from hetrain.hardware.probe import probe
    from hetrain.predict.profiler import estimate_profile
    from hetrain.train.metrics import measure_matmul_flops

    before = torch.get_num_threads()
    torch.set_num_threads(training_threads(cfg))
    try:
        rate = measure_matmul_flops(torch.device("cpu"), torch.float32, n=512, min_s=0.1)
    finally:
        torch.set_num_threads(before)
    est = estimate_profile(_fp32_description(cfg), rate)
    ram = probe().host_ram_bytes
    if est.peak_bytes > PROFILE_MAX_RAM_SHARE * ram:
        return (f"profiling one block of this model here would take {fmt_bytes(est.peak_bytes)}, over "
                f"{PROFILE_MAX_RAM_SHARE:.0%} of this machine's {fmt_bytes(ram)} of RAM")
    if est.seconds > PROFILE_MAX_S:
        return f"profiling one block of this model here would take about {est.seconds / 60:.0f} min"
    return ""


def _fp32_description(cfg: Config):
    """The description of `cfg`'s model and micro-batch in fp32 (what the profiler builds)."""
    return model_spec(cfg).describe_batch(dataclasses.replace(batch_shape(cfg), dtype="fp32"))


def plan_offload_for(cfg: Config, device_budget_bytes: int | None, host_budget_bytes: int | None,
                     cost: CostModel | None = None, options: PlannerOptions = PlannerOptions()) -> OffloadPlan:
    """hetrain.plan.offload.planner.plan_offload for `cfg`'s model and batch (cost: default_cost)."""
    return plan_offload(model_spec(cfg), batch_shape(cfg), cost or default_cost(cfg), device_budget_bytes,
                        host_budget_bytes, options, clip=cfg.train.grad_clip > 0)


def plain_peak_for(cfg: Config, cost: CostModel) -> int:
    """What plain training of `cfg`'s model and batch holds on the device at its peak."""
    return plain_peak_bytes(model_spec(cfg), batch_shape(cfg), cost, clip=cfg.train.grad_clip > 0)


def _gpu_memory_bytes(cfg: Config) -> int | None:
    """The memory of the GPU the plan is for: the catalog kind's when hardware.device_kind names
    one (None for the 'cpu' kind), else this machine's first GPU, if any."""
    if cfg.hardware.device_kind:
        from hetrain.hardware.catalog import get_kind

        kind = get_kind(cfg.hardware.device_kind)
        return None if kind.name == "cpu" else kind.memory_bytes
    if cfg.run.device == "cpu":
        return None
    from hetrain.hardware.probe import probe

    accelerators = probe().accelerators
    return accelerators[0].memory_bytes if accelerators else None


@dataclass(frozen=True)
class ConfigBudgets:
    """The budgets memory.* resolves to, and how the device budget was chosen."""

    device_bytes: int | None
    """None: no limit."""
    host_bytes: int
    how: str
    plain_when_resident: bool
    """'auto' on a GPU: plain training when the plan offloads nothing."""


def resolve_budgets(cfg: Config, cost: CostModel | None = None) -> ConfigBudgets:
    """The budgets of memory.* (see MemoryConfig); the host budget defaults to
    HOST_BUDGET_FRACTION of the RAM. The cost model (default_cost when None) is used only for a
    share of plain training's need."""
    from hetrain.hardware.probe import probe

    kind, value = parse_device_budget(cfg.memory.device_budget)
    host = parse_bytes("memory.host_budget", cfg.memory.host_budget)
    if host is None:
        host = int(HOST_BUDGET_FRACTION * probe().host_ram_bytes)
    if kind == "none":
        return ConfigBudgets(None, host, "no device limit (memory.device_budget none)", False)
    if kind == "bytes":
        return ConfigBudgets(int(value), host, f"memory.device_budget {cfg.memory.device_budget}", False)
    gpu = _gpu_memory_bytes(cfg)
    if kind == "auto" and gpu is not None:
        return ConfigBudgets(int(GPU_BUDGET_FRACTION * gpu), host,
                             f"auto: {GPU_BUDGET_FRACTION:.0%} of the GPU's {fmt_bytes(gpu)}", True)
    share = AUTO_CPU_SHARE if kind == "auto" else value
    plain = plain_peak_for(cfg, cost or default_cost(cfg))
    budget = int(share * plain)
    how = f"{share:.0%} of the {fmt_bytes(plain)} plain training would hold"
    if kind == "auto":
        how = f"auto on a CPU: {how}; --memory.device_budget none trains plainly"
    if gpu is not None and budget > GPU_BUDGET_FRACTION * gpu:
        budget = int(GPU_BUDGET_FRACTION * gpu)
        how += f", capped at {GPU_BUDGET_FRACTION:.0%} of the GPU's {fmt_bytes(gpu)}"
    return ConfigBudgets(budget, host, how, False)


def _plan_for_budgets(cfg: Config, budgets: ConfigBudgets, cost: CostModel | None) -> OffloadPlan:
    plan = plan_offload_for(cfg, budgets.device_bytes, budgets.host_bytes, cost or default_cost(cfg))
    device = fmt_bytes(budgets.device_bytes) if budgets.device_bytes else "unlimited"
    plan.note = f"Device budget {device}: {budgets.how}. " + plan.note
    return plan


def plan_for_config(cfg: Config, cost: CostModel | None = None) -> OffloadPlan | None:
    """The plan `hetrain train` runs for memory.*: None for plain training (device budget 'none',
    or 'auto' on a GPU whose budget holds the whole model), else the planned OffloadPlan."""
    if parse_device_budget(cfg.memory.device_budget)[0] == "none":
        return None  # before any cost model: plain training needs no profile
    cost = cost or default_cost(cfg)
    budgets = resolve_budgets(cfg, cost)
    plan = _plan_for_budgets(cfg, budgets, cost)
    if budgets.plain_when_resident and not any(
            l.act == "recompute" or l.weights == "host" or l.optim == "host" for l in plan.layers):
        return None
    return plan


def run_offload_planning(cfg: Config, out_dir: str | os.PathLike, cost: CostModel | None = None) -> OffloadPlan:
    """Plan for the budgets of `cfg.memory`, print the table, write `out_dir/plan.json`."""
    cost = cost or default_cost(cfg)
    plan = _plan_for_budgets(cfg, resolve_budgets(cfg, cost), cost)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan.save(out / "plan.json")
    print(plan.table())
    print(f"hetrain: plan written to {out / 'plan.json'} (planned in {plan.search['time_s']:.2f} s)")
    return plan

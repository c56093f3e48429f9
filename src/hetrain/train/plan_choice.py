"""Which offload plan a training run executes, or None for plain training.

The trainer asks once, before anything is built: `--plan.file` as is (checked against this
model and batch); on a resume, the plan the checkpoint ran, unless this run's memory settings
or plan file differ from that run's (then it plans again and says so); else the planner's
plan for `memory.*` (rank 0 plans, every rank gets its plan). This module decides and
prints the plan; it does not build models or engines.
"""

from __future__ import annotations

from hetrain.config import Config, parse_device_budget, to_dict
from hetrain.errors import ConfigError
from hetrain.plan.offload.plan import PLAN_FORMAT, OffloadPlan, shape_of
from hetrain.train.checkpoint import CheckpointMeta
from hetrain.train.distributed import Ranks


def plan_shape(cfg: Config) -> dict:
    """The model and batch shape an offload plan must have been made for (OffloadPlan.made_for)."""
    from hetrain.train.job import model_spec

    t = cfg.train
    return shape_of(model_spec(cfg).key(), t.micro_batch, t.seq_len, t.dtype)


def n_blocks(cfg: Config) -> int:
    """Blocks of the model `cfg` trains (hetrain's preset, or the Hugging Face model at hf.path)."""
    from hetrain.train.job import model_spec

    return model_spec(cfg).n_blocks


def same_memory_settings(cfg: Config, saved: dict) -> bool:
    """Whether `cfg` asks for the memory settings of the run whose config is `saved`."""
    now = to_dict(cfg)
    return (all(saved.get("memory", {}).get(k) == v for k, v in now["memory"].items())
            and saved.get("plan", {}).get("file", "") == now["plan"]["file"])


def _describe(plan: OffloadPlan | None) -> str:
    return plan.summary() if plan is not None else "plain training"


def _saved_run(resume: CheckpointMeta) -> tuple[bool, str]:
    """(whether the checkpoint's run was one this trainer can run again, what it ran): plain
    training or an offload plan, not a cluster plan."""
    if resume.plan is None:
        return True, "plain training"
    if resume.plan.get("format", PLAN_FORMAT) != PLAN_FORMAT:
        return False, f"a {resume.plan.get('format')} plan"
    return True, OffloadPlan.from_dict(resume.plan).summary()


def unplannable(cfg: Config) -> str:
    """Why offload plans cannot drive the model `cfg` trains under memory.device_budget 'auto'
    ('' when they can: hetrain's GPT always, a Hugging Face model when hetrain can describe
    it); such a model trains plainly. With a budget or a plan file it is a ConfigError naming
    the fix instead. Cheap (a config read): the trainer asks before it reads the data."""
    kind = parse_device_budget(cfg.memory.device_budget)[0]
    if not cfg.hf.path or (kind == "none" and not cfg.plan.file):
        return ""
    from hetrain.train.job import describe

    try:
        describe(cfg)
    except ConfigError as e:
        if cfg.plan.file or kind != "auto":
            raise
        return str(e)
    return ""


def choose_plan(cfg: Config, ranks: Ranks, resume: CheckpointMeta | None) -> OffloadPlan | None:
    """The plan this run executes (printed as a table), or None for plain training. Under
    data parallelism plain training runs the resident plan: the engine averages gradients."""
    kind, budget = parse_device_budget(cfg.memory.device_budget)
    why = unplannable(cfg)
    if why:
        print(f"hetrain: training plainly under memory.device_budget auto: {why}", flush=True)
        return None
    if cfg.plan.file:
        try:
            plan = OffloadPlan.load(cfg.plan.file)
            plan.validate(n_blocks(cfg))
            plan.check_made_for(plan_shape(cfg))
        except ValueError as e:
            raise ConfigError(f"plan file '{cfg.plan.file}': {e}") from None
        if kind == "bytes":
            plan.device_budget_bytes = int(budget)
    elif resume is not None and same_memory_settings(cfg, resume.config) and _saved_run(resume)[0]:
        plan = OffloadPlan.from_dict(resume.plan) if resume.plan is not None else None
        print(f"hetrain: resuming under the plan the checkpoint ran ({_describe(plan)})", flush=True)
    else:
        from hetrain.train.offload_planning import plan_for_config

        plan = ranks.from_main(plan_for_config(cfg) if ranks.is_main else None)  # rank 0 plans for all
        if resume is not None:
            print(f"hetrain: re-planned for this run (the checkpoint ran {_saved_run(resume)[1]}; now "
                  f"{_describe(plan)})", flush=True)
    if plan is None and ranks.world > 1:
        plan = OffloadPlan.resident(n_blocks(cfg))
    if plan is not None:
        print(plan.table(), flush=True)
    return plan

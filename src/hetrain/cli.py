"""Command line: `hetrain train`, `hetrain estimate`, and the planning commands.

Every command takes `--config FILE.toml` and `--section.key value` overrides (see
`hetrain COMMAND --help`). Bad input is one line on stderr and exit code 2, before any work
starts. This module parses arguments and dispatches; the work lives in the packages.
"""

from __future__ import annotations

import os
import sys

from hetrain.config import format_config, format_help, load_config
from hetrain.errors import ConfigError, RankLost
from hetrain.files import check_output_dir

USAGE = """usage: hetrain COMMAND [--config FILE.toml] [--section.key VALUE ...]

commands:
  train      train a model (default: the 'small' preset on the Python standard library source)
  estimate   memory and step-time breakdown for a model and batch, without training
  plan       the fastest offload plan for one device under memory.device_budget and
             memory.host_budget (per block: recompute, stream weights, CPU optimizer); prints
             the table, writes run.dir/plan.json for `hetrain train --plan.file`.
             With --cluster FILE: the fastest data/tensor/pipeline-parallel plan for a cluster
             of mixed accelerators (pin any of --plan.tp/pp/dp/micro_batch); writes
             run.dir/plan.json, report.txt and timeline.png, which
             `torchrun ... -m hetrain.cli train --plan.file run.dir/plan.json` runs
  profile    measure this machine for the predictor (layer times, optimizer, copies, collectives)
             and cache it under hardware.profile_dir; --no-collectives skips the all-reduce test,
             --remeasure re-measures the machine-level figures
  simulate   predict a step (this machine's profile, or --hardware.device_kind KIND): step time,
             critical path, utilisation, peak memory; writes run.dir/sim_trace.json and
             run.dir/sim_timeline.png

`hetrain COMMAND --help` lists every config key with its default and meaning."""


def _split_config(args: list[str]) -> tuple[str | None, list[str]]:
    path, rest, i = None, [], 0
    while i < len(args):
        if args[i] == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a TOML file path, e.g. --config configs/default.toml")
            path, i = args[i + 1], i + 2
        elif args[i].startswith("--config="):
            path, i = args[i].split("=", 1)[1], i + 1
        else:
            rest.append(args[i])
            i += 1
    return path, rest


def cmd_train(args: list[str]) -> int:
    from hetrain.train.trainer import Trainer

    path, overrides = _split_config(["--log.trace=true" if a == "--trace" else a for a in args])
    cfg = load_config(path, overrides)
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun, rank 0 speaks for all; errors still reach stderr
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    if cfg.plan.file:
        from hetrain.train.cluster_launch import is_cluster_plan, train_cluster_plan

        if is_cluster_plan(cfg.plan.file):  # a plan from `hetrain plan --cluster`: one process per device
            return train_cluster_plan(cfg)
    print(format_config(cfg), flush=True)
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    except KeyboardInterrupt:
        return 130
    return 0


def cmd_estimate(args: list[str]) -> int:
    from hetrain.estimate import estimate_report
    from hetrain.train.job import batch_shape, model_spec

    path, overrides = _split_config(args)
    cfg = load_config(path, overrides)
    print(estimate_report(model_spec(cfg), batch_shape(cfg)))
    return 0


def cmd_profile(args: list[str]) -> int:
    from hetrain.predict.profiler import ProfileOptions
    from hetrain.predict.profile_store import format_profile
    from hetrain.train.job import profile_job

    flags = {"--no-collectives", "--remeasure"}
    path, overrides = _split_config([a for a in args if a not in flags])
    cfg = load_config(path, overrides)
    options = ProfileOptions(collectives="--no-collectives" not in args, remeasure_machine="--remeasure" in args)
    profile, entry, saved = profile_job(cfg, options)
    print(format_profile(profile, entry))
    print(f"hetrain: profile saved to {saved}")
    return 0


def cmd_simulate(args: list[str]) -> int:
    from pathlib import Path

    from hetrain.predict.profile_store import require_profile
    from hetrain.predict.step_graph import format_prediction
    from hetrain.train.job import model_spec, predict_job
    from hetrain.trace import plot_timeline, write_chrome_trace

    path, overrides = _split_config(args)
    cfg = load_config(path, overrides)
    check_output_dir(cfg.run.dir, "run.dir")
    profile = None if cfg.hardware.device_kind else require_profile(cfg.hardware.profile_dir)
    pred = predict_job(cfg, profile)
    print(format_prediction(pred))
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    title = (f"predicted step of {model_spec(cfg).label()}, micro_batch={cfg.train.micro_batch} x "
             f"{cfg.train.grad_accum}, seq_len={cfg.train.seq_len}, {cfg.train.dtype}: "
             f"{pred.step_s * 1e3:.1f} ms ({pred.source})")
    write_chrome_trace(pred.sim.events, run_dir / "sim_trace.json", memory=pred.sim.memory_timeline,
                       metadata={"name": "hetrain simulate", "step_s": pred.step_s, "source": pred.source,
                                 "peak_device_bytes": pred.peak_device_bytes})
    pools = {p: samples for p, samples in pred.sim.memory_timeline.items() if pred.sim.peak_bytes[p] > 0}
    plot_timeline(pred.sim.events, run_dir / "sim_timeline.png", title=title, memory=pools)
    print(f"hetrain: wrote {run_dir / 'sim_trace.json'} (open in https://ui.perfetto.dev) and "
          f"{run_dir / 'sim_timeline.png'}")
    return 0


def cmd_plan(args: list[str]) -> int:
    path, overrides = _split_config(["--plan.cluster" if a == "--cluster" else a for a in args])
    cfg = load_config(path, overrides)
    check_output_dir(cfg.run.dir, "run.dir")
    if not cfg.plan.cluster:
        from hetrain.train.offload_planning import run_offload_planning

        run_offload_planning(cfg, cfg.run.dir)
        return 0
    from hetrain.plan.cluster.cost import PredictorOptions
    from hetrain.model.spec import ModelSpec
    from hetrain.plan.cluster.planner import Pins, SearchOptions, format_report, run_cluster_planning
    from hetrain.predict.profile_store import measured_curves

    pins = Pins(cfg.plan.tp, cfg.plan.pp, cfg.plan.dp, cfg.plan.micro_batch, cfg.plan.mixed_tp)
    # A kind whose profile lies in hardware.profile_dir (made on such a device) is priced by its
    # measured matmul curve.
    curves = {kind: [c.max_efficiency, c.overhead_s, c.attention_efficiency, c.source]
              for kind, c in measured_curves(cfg.hardware.profile_dir, cfg.plan.dtype).items()}
    # A transformers model from --hf.path is planned from its config.json (hetrain.model.spec).
    model = ModelSpec.hf_folder(cfg.hf.path) if cfg.hf.path else cfg.model
    plan = run_cluster_planning(model, cfg.plan.cluster, cfg.plan.global_batch, cfg.train.seq_len, cfg.run.dir,
                                SearchOptions(pins=pins, recompute=cfg.plan.recompute,
                                              try_distributed_optimizer=cfg.plan.distributed_optimizer == "auto"), cfg.plan.virtual_stages,
                                PredictorOptions(matmul_curves=curves, compute_dtype=cfg.plan.dtype,
                                                 distributed_optimizer=cfg.plan.distributed_optimizer == "true",
                                                 overlap_grad_reduce=cfg.plan.overlap_grad_reduce))
    print(format_report(plan))
    print(f"hetrain: wrote {cfg.run.dir}/plan.json, report.txt and timeline.png")
    return 0


COMMANDS = {"train": cmd_train, "estimate": cmd_estimate, "profile": cmd_profile, "simulate": cmd_simulate,
            "plan": cmd_plan}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"hetrain: error: unknown command '{command}'; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if "-h" in args or "--help" in args:
        print(USAGE.splitlines()[0] + "\n")
        print(format_help())
        return 0
    try:
        return COMMANDS[command](args)
    except ConfigError as e:
        print(f"hetrain: error: {e}", file=sys.stderr)
        return 2
    except RankLost as e:
        print(f"hetrain: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a file the run needs could not be read or written (disk full, permissions)
        where = f" '{e.filename}'" if e.filename else ""
        print(f"hetrain: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

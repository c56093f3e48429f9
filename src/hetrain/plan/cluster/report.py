"""Human-readable output of a cluster plan: the text report and the timeline PNG.

`format_report` turns a ClusterPlan (with its stored prediction and upper bound) into the
table a user reads to see what the planner chose and why it is fast; `write_timeline`
draws one step of every pipeline's first replica, one lane per stage. This module only
formats and draws: it must not change or re-plan anything (the timeline re-runs the
predictor to get its events, and nothing else).
"""

from __future__ import annotations

from hetrain.units import GIB
from hetrain.plan.cluster.plan import ClusterPlan, device_stages
from hetrain.plan.cluster.plan_prediction import TIME_USES, predict_plan
from hetrain.plan.cluster.recompute_split import format_recompute


def _si(x: float) -> str:
    return f"{x:,.0f}"


def _where_reduced(plan: ClusterPlan) -> str:
    """Where the replicas' gradient reduction runs, as the predictor priced it."""
    from hetrain.hardware.catalog import get_kind

    if not (plan.options or {}).get("overlap_grad_reduce", True):
        return "after the backward"
    gloo = {not get_kind(g["kind"]).collectives_beside_compute for g in plan.cluster["group"]}
    inside = "block by block inside the backward (sync ms: what is left after it)"
    after = "after the backward on CPU processes (gloo reduces on the cores the backward uses)"
    if gloo == {True}:
        return after
    return inside if gloo == {False} else f"{inside}; {after}"


FILL_AND_DRAIN_NOTE = 0.05
"""The report explains a pipeline's fill and drain when it is at least this share of the step."""


def fill_and_drain(plan: ClusterPlan) -> list[str]:
    """Per pipeline whose fill and drain is FILL_AND_DRAIN_NOTE of its time or more, a line saying so:
    S stages of equal time and m micro-batches idle (S - 1) / (m + S - 1) of a 1F1B step, and
    interleaving V chunks divides the S - 1 by V (the textbook figures, which stages that differ in
    time or tail only approach)."""
    lines = []
    for p, pipe in enumerate(plan.pipelines):
        n_stages, v, m = len(pipe.stages) // pipe.virtual_stages, pipe.virtual_stages, pipe.n_microbatches
        share = (n_stages - 1) / v / (m + (n_stages - 1) / v)
        if share < FILL_AND_DRAIN_NOTE:
            continue
        how = "interleaved 1F1B" if v > 1 else "1F1B"
        lines.append(f"P{p}: {how} over {n_stages} stages and {m} micro-batches idles about {100 * share:.0f}% "
                     f"of the step filling and draining the pipeline; more micro-batches (a larger global batch, "
                     f"fewer replicas) or fewer stages lower it")
    return lines


def format_report(plan: ClusterPlan) -> str:
    """The plan as text: pipelines, stages, per-kind throughput and memory, efficiency, search cost."""
    pred, model, cluster = plan.prediction, plan.model, plan.cluster
    n_devices = sum(g["nodes"] * g["devices_per_node"] for g in cluster["group"])
    lines = [
        f"Cluster plan: model {model.get('preset', '?')} ({model['n_layer']} blocks, d_model {model['d_model']}), "
        f"global batch {plan.global_batch} x seq_len {plan.seq_len} on cluster '{cluster['name']}' ({n_devices} devices)",
        f"Predicted step {pred['step_s']:.3f} s, {_si(pred['tokens_per_s'])} tokens/s, "
        f"{_si(pred['model_tflops_per_s'])} model TFLOP/s in total",
    ]
    options = plan.options or {}
    if options.get("distributed_optimizer"):
        if options.get("compute_dtype", "bf16") == "fp32":
            lines.append("AdamW state sharded over each stage's replicas (ZeRO-1): each replica updates its share "
                         "of the stage's parameters and broadcasts the fp32 weights")
        else:
            lines.append("fp32 masters and AdamW state sharded over each stage's replicas (ZeRO-1): each replica keeps "
                         "and updates its share of the stage's parameters and broadcasts its bf16 weights")
    to_owners = options.get("distributed_optimizer") and len(plan.pipelines) == 1
    lines.append(("Gradients are reduced to the replica that updates them " if to_owners else
                  "Gradients are all-reduced across replicas ") + _where_reduced(plan))
    if options.get("compute_dtype", "bf16") == "fp32":
        lines.append("Priced in fp32, as hetrain's runtime runs a plan by default (--train.dtype fp32)")
    else:
        lines.append("Priced in bf16: one bf16 copy of the fp32 weights per step, bf16 activations, fp32 gradients "
                     "and optimizer state; run it with --train.dtype bf16 (the runtime's default is fp32, which "
                     "--plan.dtype fp32 prices)")
    ub = plan.upper_bound
    if ub:
        parts = []
        for kind, v in ub["kinds"].items():
            how = "" if v["fits"] else " (does not fit alone: its compute at the predictor's efficiency)"
            parts.append(f"{kind} alone {_si(v['tokens_per_s'])}{how}")
        lines.append(f"Efficiency against the upper bound: {100 * ub['efficiency']:.1f}% "
                     f"(upper bound {_si(ub['tokens_per_s'])} tokens/s = {' + '.join(parts)})")
    if pred.get("device_s"):  # plan files written before 2026-12-06 lack it
        total = sum(pred["device_s"].values())
        uses = ", ".join(f"{TIME_USES[cat]} {100 * v / total:.1f}%" for cat, v in pred["device_s"].items() if v > 0)
        lines.append(f"Where the devices' time goes (all devices, one step): {uses}")
        lines += [f"  {line}" for line in fill_and_drain(plan)]
    lines += ["", "Pipelines (each replicated dp times; stages in order)"]
    for p, pipe in enumerate(plan.pipelines):
        tps = ", ".join(f"{g} tp {t}" for g, t in zip(pipe.groups, pipe.tp))
        n_stages = len(pipe.stages) // pipe.virtual_stages
        inter = f" x {pipe.virtual_stages} interleaved chunks" if pipe.virtual_stages > 1 else ""
        lines.append(f"  P{p}: {' -> '.join(pipe.groups)}; dp {pipe.dp}; {tps}; {n_stages} stages{inter}; "
                     f"micro-batch {pipe.micro_batch} x {pipe.n_microbatches} micro-batches "
                     f"= {pipe.samples_per_step} samples per step; {pipe.devices} devices; "
                     f"predicted {pred['pipeline_step_s'][p]:.3f} s")
    if plan.idle_groups:
        lines.append(f"  idle groups: {', '.join(plan.idle_groups)}")
    mixed = [f"P{p}" for p, pipe in enumerate(plan.pipelines) if len(set(pipe.tp)) > 1]
    if mixed:
        lines.append(f"  not runnable yet: {', '.join(mixed)} mix TP degrees (--plan.mixed_tp true), and the "
                     f"pipeline runtime pairs neighbouring stages TP rank by TP rank; this plan is a prediction")
    lines += ["", "Stages (one replica)",
              "  pipe stage  group        kind          tp  blocks       recomp  fwd ms   bwd ms   sync ms  "
              "peak GiB / usable"]
    for st, chunks in zip(pred["stages"], (c for pipe in plan.pipelines for c in device_stages(pipe))):
        blocks = ",".join(f"{c.first_block}-{c.first_block + c.n_blocks - 1}" for c in chunks) \
            + ("+emb" if chunks[0].embedding else "") + ("+head" if chunks[-1].head else "")
        lines.append(f"  P{st['pipeline']:<3} S{st['stage']:<4} {st['group']:<12} {st['kind']:<13} {st['tp']:<3} "
                     f"{blocks:<12} {st['n_recompute_blocks']:<7} {1e3 * st['fwd_s']:<8.1f} "
                     f"{1e3 * st['bwd_s']:<8.1f} {1e3 * st['sync_s']:<8.1f} "
                     f"{st['peak_bytes'] / GIB:.1f} / {st['capacity_bytes'] / GIB:.1f}")
    recompute = format_recompute(plan)
    lines += [""] + recompute if recompute else []
    lines += ["", "Device kinds",
              "  kind           busy  idle  TFLOP/s/device  MFU     peak memory"]
    for kind, k in pred["kinds"].items():
        mem = f"{k['peak_bytes'] / GIB:.1f} of {k['capacity_bytes'] / GIB:.1f} GiB" if k["devices"] else "-"
        lines.append(f"  {kind:<14} {k['devices']:<5} {k['idle_devices']:<5} "
                     f"{k['model_tflops_per_device']:<15.1f} {100 * k['mfu']:<6.1f}% {mem}")
    s = plan.search
    if s:
        ub_time = f"; upper-bound searches {s['upper_bound_s']:.2f} s" if "upper_bound_s" in s else ""
        lines += ["", f"Search: {s['search_s']:.2f} s to find the plan, {s['predict_s']:.2f} s to simulate it"
                      f"{ub_time}; {s['layouts']} pipeline layouts, {s['shapes']} shapes, {s['shapes_split']} split, "
                      f"{s['candidates_predicted']} predicted, {s['refine_moves']} refinement moves"]
        lines += [f"  note: {n}" for n in s.get("notes", [])]
    return "\n".join(lines)


def write_timeline(plan: ClusterPlan, path) -> None:
    """Draw one predicted step of every pipeline's first replica as a PNG."""
    from hetrain.trace import plot_timeline

    pred, events = predict_plan(plan)
    title = (f"{plan.model.get('preset', 'model')} on {plan.cluster['name']}: one step, "
             f"{pred.step_s:.3f} s predicted (first replica of each pipeline)")
    plot_timeline(events, path, title)

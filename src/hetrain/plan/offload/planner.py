"""The offload planner: the fastest per-layer placement that fits the device and host budgets.

`plan_offload(cfg, device_budget_bytes, host_budget_bytes)` prices every layer with the cost
model (offload_graph.layer_terms), solves the linear model of offload_milp.py for its best
few assignments (HiGHS through scipy.optimize.milp, each further one excluded by a no-good
cut), simulates each candidate's step on the offload step graph, and returns the candidate
the simulator finds fastest as an OffloadPlan, with the MILP's and the simulator's figures and
a paragraph saying which constraint binds and what each choice buys. A model that fits no plan
is a ConfigError giving the smallest device budget and host RAM that would fit.
`run_offload_planning(cfg, out_dir)` is what `hetrain plan` runs: budgets from the config,
the table printed, plan.json written. This module decides and explains; it must not execute
plans (the offload engine does) or price tasks itself (the cost model does).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hetrain.config import Config, parse_bytes, parse_device_budget
from hetrain.errors import ConfigError
from hetrain.plan.offload.graph import (Choice, OffloadPrices, OffloadSimulation, StepSettings, offload_prices,
                                        plan_of, simulate_offload)
from hetrain.plan.offload.milp import BUDGET_MARGIN, OffloadModel, Solution
from hetrain.plan.offload.plan import OffloadPlan, shape_of
from hetrain.predict.cost import (CostModel, compute_dtype_bytes, cost_model, describe_for, model_key, model_label,
                                  training_threads)
from hetrain.units import KIB, fmt_bytes

HOST_BUDGET_FRACTION = 0.8
"""Default host budget: this share of the machine's RAM (config: memory.host_budget)."""
GPU_BUDGET_FRACTION = 0.9
"""memory.device_budget 'auto' on a GPU: this share of its memory; the rest is left to the CUDA
context, the allocator's fragmentation and the kernels' workspaces, which the plan does not count."""
AUTO_CPU_SHARE = 0.5
"""memory.device_budget 'auto' on a CPU: this share of what plain training would hold. Small
enough that the default job's plan mixes recomputation, streamed weights and CPU updates."""


@dataclass(frozen=True)
class PlannerOptions:
    """Search settings of the offload planner."""

    candidates: int = 3
    """MILP solutions checked in the simulator (the best, then the next ones by no-good cuts)."""
    mip_rel_gap: float = 5e-3
    """HiGHS stops once its solution is proven within this fraction of the linear model's
    optimum; well below the linear model's own error against the simulator."""
    candidate_gap: float = 1e-2
    """The gap for the candidates after the first: they are there for the simulator to compare."""
    switch_margin: float = 0.01
    """A later candidate replaces the MILP's optimum only when the simulator finds it faster by
    more than this fraction: below it the two models disagree by less than their error, and the
    optimum does the least work."""
    time_limit_s: float = 10.0
    """Per MILP solve; the best solution found so far is used past it."""
    weight_buffers: int = 2
    prefetch_depth: int = 1
    overlap: bool = True
    """Cross-iteration overlap of the CPU updates with the next forward."""
    async_copies: bool | None = None
    """Copies on their own streams; None: yes on a GPU, no when the device is the CPU."""


def default_cost(cfg: Config) -> CostModel:
    """This machine's profile when it has the model, else the catalog kind (see cost_model). On
    a CPU device with no profile of this model and no --hardware.device_kind, the model is
    profiled now (seconds for small models, cached): the catalog's CPU entry is a placeholder
    whose times are off by several fold, and a plan should be priced by what this machine does."""
    from hetrain.predict.profiler import ProfileOptions, load_profile, run_profile

    desc = describe_for(cfg)
    if cfg.hardware.device_kind:
        return cost_model(cfg, desc, None)
    profile = load_profile(cfg.hardware.profile_dir)
    if profile is not None:
        try:
            return cost_model(cfg, desc, profile)
        except ConfigError:  # the profile has no entry for this model
            pass
    if _gpu_memory_bytes(cfg) is not None:
        return cost_model(cfg, desc, None)  # the catalog's figures for this GPU
    too_big = _profile_too_big(cfg)
    if too_big:
        print(f"hetrain: {too_big}; pricing the plan with the catalog's 'cpu' figures instead (a roofline, off by "
              f"several fold on a CPU): run `hetrain profile` to measure anyway, or name --hardware.device_kind",
              flush=True)
        return cost_model(cfg, desc, None)
    print("hetrain: profiling this model on this CPU for the planner (once; cached under hardware.profile_dir)",
          flush=True)
    profile, _, _ = run_profile(cfg, ProfileOptions(collectives=False))
    return cost_model(cfg, desc, profile)


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
    return describe_for(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, dtype="fp32")))


def step_settings(cfg: Config, cost: CostModel, options: PlannerOptions) -> StepSettings:
    tied = describe_for(cfg).tied_embeddings
    async_copies = cost.on_gpu if options.async_copies is None else options.async_copies
    return StepSettings(grad_accum=cfg.train.grad_accum, clip=cfg.train.grad_clip > 0, overlap=options.overlap,
                        async_copies=async_copies, weight_buffers=options.weight_buffers,
                        prefetch_depth=options.prefetch_depth,
                        compute_dtype_bytes=compute_dtype_bytes(cfg.train.dtype),
                        tied_embeddings=tied)


def plan_offload(cfg: Config, device_budget_bytes: int | None, host_budget_bytes: int | None,
                 cost: CostModel | None = None, options: PlannerOptions = PlannerOptions()) -> OffloadPlan:
    """The fastest plan for `cfg`'s model and batch within the budgets (None: no limit).

    ConfigError when no plan fits, naming the smallest device budget and host RAM that would.
    """
    start = time.perf_counter()
    cost = cost or default_cost(cfg)
    desc = describe_for(cfg)
    prices = offload_prices(desc, cost, step_settings(cfg, cost, options))
    model = OffloadModel(prices, device_budget_bytes, host_budget_bytes)
    found = candidates(model, options)
    solve_s = time.perf_counter() - start
    if not found:
        raise ConfigError(_no_fit_message(cfg, prices, device_budget_bytes, host_budget_bytes))
    sims = [simulate_offload(prices, sol.choice) for sol in found]
    best = min(range(len(found)), key=lambda i: (sims[i].step_s, i))
    if sims[best].step_s >= sims[0].step_s * (1 - options.switch_margin):
        best = 0
    sol, sim = found[best], sims[best]
    streaming, sim, extra_bytes = _streaming_settings(prices, sol, sim, device_budget_bytes)
    plan = plan_of(sol.choice, prefetch_depth=streaming.prefetch_depth, weight_buffers=streaming.weight_buffers,
                   overlap=options.overlap, device_budget_bytes=device_budget_bytes)
    for layer, nbytes in zip(plan.layers, layer_peak_bytes(prices, sol)):
        layer.predicted_device_bytes = nbytes
    for layer, t, (_, _, c) in zip(plan.layers, prices.terms, sol.choice):
        layer.predicted_s = sim.layer_compute_s.get(layer.name, 0.0) + (0 if c else t.optim_device_s)
    plan.predicted_step_s = sim.step_s
    plan.predicted_peak_device_bytes = math.ceil(sol.peak_device_bytes) + extra_bytes
    plan.predicted_host_bytes = math.ceil(sol.host_bytes)
    resident = model.evaluate(((0, 0, 0),) * len(prices.terms))
    plan.note = explain(prices, sol, sim, resident, Budgets(device_budget_bytes, host_budget_bytes), len(found), best,
                        options.switch_margin)
    if extra_bytes:
        plan.note += (f" A third weight buffer ({fmt_bytes(extra_bytes)}) fits and lets the engine fetch two uses "
                      f"ahead, which the simulator finds faster.")
    plan.search = {
        "solver": "HiGHS (scipy.optimize.milp)", "cost_source": cost.source, "milp_time_s": round(solve_s, 4),
        "mip_rel_gap": options.mip_rel_gap, "chosen_candidate": best, "milp_step_s": sol.step_s,
        "simulated_step_s": sim.step_s, "simulated_peak_device_bytes": sim.peak_device_bytes,
        "candidates": [{"milp_step_s": f.step_s, "simulated_step_s": s.step_s, "summary": plan_of(f.choice).summary()}
                       for f, s in zip(found, sims)],
        "loads_s": sol.loads_s, "main_thread_waits_s": sol.waits_s,
    }
    plan.made_for = shape_of(model_key(cfg), cfg.train.micro_batch, cfg.train.seq_len,
                             cfg.train.dtype)
    plan.validate(len(desc.blocks))
    plan.search["time_s"] = round(time.perf_counter() - start, 4)
    return plan


def polish(model: OffloadModel, sol: Solution) -> Solution:
    """Single-decision descent in closed form: make or undo one choice at a time (or stop
    streaming altogether, which also frees the buffer pool) while that lowers the objective and
    fits. HiGHS stops within its gap of the optimum; this removes what the gap lets through, such
    as a stream or a recomputation that buys nothing."""
    current, value = sol.choice, sol.objective
    while True:
        flips = []
        for l, triple in enumerate(current):
            for k, group in enumerate((model.r, model.s, model.c)):
                if model.ub[group[l]] == 0:  # recomputing the embedding or the head, pinned layers
                    continue
                new = list(triple)
                new[k] = 1 - new[k]
                flips.append(current[:l] + (tuple(new),) + current[l + 1:])
        if sum(s for _, s, _ in current) > 1:  # the buffer pool is freed only when no layer streams
            flips.append(tuple((r, 0, c) for r, _, c in current))
        if not flips:
            break
        x = model.values(flips)
        scores = np.where(model.feasible(x), model.objective_values(x), np.inf)
        best = int(np.argmin(scores))
        if not scores[best] < value - 1e-12 * max(1.0, abs(value)):
            break
        current, value = flips[best], float(scores[best])
    return sol if current == sol.choice else model.evaluate(current, sol.solve_s)


def candidates(model: OffloadModel, options: PlannerOptions) -> list[Solution]:
    """Up to `options.candidates` solutions in the MILP's order, each with other weight or
    optimizer placements than the ones before (a no-good cut over s and c). Recomputation is
    left out of the cut: for given placements the MILP already picks it, and the simulator
    prices it as the model does (compute on the main thread), so variants in recomputation alone
    would tell little. The first is solved to `mip_rel_gap` and polished, the others, there for
    the simulator to compare, to `candidate_gap`. A solution the closed form finds over a budget
    (solver round-off) is cut and skipped."""
    found: list[Solution] = []
    for _ in range(2 * options.candidates):
        if len(found) == options.candidates:
            break
        sol = model.solve(options.time_limit_s, options.candidate_gap if found else options.mip_rel_gap)
        if sol is None:
            break
        model.cuts.append(sol.choice)
        if not found:
            sol = polish(model, sol)
            model.cuts.append(sol.choice)
        if any(f.choice == sol.choice for f in found):
            continue
        if model.feasible(model.values([sol.choice]))[0]:
            found.append(sol)
    return found


def _streaming_settings(prices: OffloadPrices, sol: Solution, sim: OffloadSimulation,
                        device_budget_bytes: int | None) -> tuple[StepSettings, OffloadSimulation, int]:
    """Prefetch depth and buffer count: the MILP's (depth 1, two buffers), or one deeper with a
    third buffer when the plan streams weights, the extra buffer fits the budget and the
    simulator finds the step faster. Returns the settings, their simulation and the extra bytes."""
    st = prices.settings
    streamed = [t.compute_bytes for t, (_, s, _) in zip(prices.terms, sol.choice) if s]
    if not streamed:
        return st, sim, 0
    extra = max(streamed)
    if device_budget_bytes is not None and sol.peak_device_bytes + extra > device_budget_bytes:
        return st, sim, 0
    deeper = dataclasses.replace(st, prefetch_depth=st.prefetch_depth + 1, weight_buffers=st.weight_buffers + 1)
    deeper_sim = simulate_offload(dataclasses.replace(prices, settings=deeper), sol.choice)
    if deeper_sim.step_s < sim.step_s * (1 - 1e-3):
        return deeper, deeper_sim, extra
    return st, sim, 0


def layer_peak_bytes(prices: OffloadPrices, sol: Solution) -> list[int]:
    """Each layer's device bytes at the linear model's peak instant (the backward of
    `sol.peak_layer`): state, saved activations of the layers before, held gradients of the
    layers after, and the peak layer's recomputation and gradient in flight. With the model's
    buffers and the weight buffer pool they add up to the predicted peak."""
    st, p = prices.settings, sol.peak_layer
    out = []
    for l, (t, (r, s, c)) in enumerate(zip(prices.terms, sol.choice)):
        n = t.device_state_bytes(s, c, st)
        if l <= p:
            n += t.saved_recompute_bytes if r else t.saved_keep_bytes
        if not c and (l >= p or st.grad_accum > 1):
            n += t.grad_bytes
        if l == p:
            n += r * t.recompute_bytes + t.grad_transient_bytes(s, c, st)
        out.append(n)
    return out


def _names(prices: OffloadPrices, choice: Choice, k: int) -> list[str]:
    return [t.name for t, ch in zip(prices.terms, choice) if ch[k]]


def _listing(names: list[str]) -> str:
    if len(names) <= 4:
        return ", ".join(names)
    return f"{len(names)} layers ({names[0]} ... {names[-1]})"


def fmt_s(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


LOAD_NAMES = {"compute": "the main thread", "h2d": "host-to-device copies", "d2h": "device-to-host copies",
              "cpu_optim": "the CPU optimizer", "cores": "the host cores (main thread and CPU optimizer together)"}


@dataclass(frozen=True)
class Budgets:
    device_bytes: int | None
    host_bytes: int | None


def explain(prices: OffloadPrices, sol: Solution, sim: OffloadSimulation, resident: Solution, budgets: Budgets,
            n_candidates: int, chosen: int = 0, margin: float = 0.01) -> str:
    """One paragraph: what plain training would need, which constraint binds, what each kind of
    choice frees and costs, what bounds the step, and the MILP's and the simulator's step time."""
    st, terms, choice = prices.settings, prices.terms, sol.choice
    device, host = budgets.device_bytes, budgets.host_bytes
    parts = [f"Plain training would hold {fmt_bytes(resident.peak_device_bytes)} on the device at its peak "
             f"(step {fmt_s(resident.step_s)} in the model)" + (
                 f", over the {fmt_bytes(device)} budget." if device and resident.peak_device_bytes > device
                 else (f", within the {fmt_bytes(device)} budget." if device else "; there is no device budget."))]
    where = f"in the backward of {terms[sol.peak_layer].name}"
    if device:
        binds = sol.peak_device_bytes >= 0.98 * device
        parts.append(f"This plan peaks at {fmt_bytes(sol.peak_device_bytes)} {where} "
                     f"({sol.peak_device_bytes / device:.0%} of the budget{', which binds' if binds else ''}).")
    else:
        parts.append(f"This plan peaks at {fmt_bytes(sol.peak_device_bytes)} {where}.")
    host_note = f"Host memory holds {fmt_bytes(sol.host_bytes)}"
    if host:
        host_note += f" of the {fmt_bytes(host)} host budget" + (", which binds" if sol.host_bytes >= 0.98 * host else "")
    parts.append(host_note + ".")
    recompute, stream, cpu = (_names(prices, choice, k) for k in range(3))
    if recompute:
        freed = sum(t.saved_keep_bytes - t.saved_recompute_bytes for t, ch in zip(terms, choice) if ch[0])
        cost_s = st.grad_accum * sum(t.recompute_s for t, ch in zip(terms, choice) if ch[0])
        parts.append(f"Recomputing {_listing(recompute)} frees {fmt_bytes(freed)} of saved activations for "
                     f"{fmt_s(cost_s)} of extra compute per step.")
    if stream:
        freed = sum(t.compute_bytes for t, ch in zip(terms, choice) if ch[1])
        pool = st.weight_buffers * max(t.compute_bytes for t, ch in zip(terms, choice) if ch[1])
        copies_s = st.grad_accum * sum(t.fetches_per_microbatch * t.h2d_s for t, ch in zip(terms, choice) if ch[1])
        parts.append(f"Streaming the weights of {_listing(stream)} frees {fmt_bytes(freed - pool)} net of the "
                     f"{fmt_bytes(pool)} buffer pool for {fmt_s(copies_s)} of host-to-device copies per step.")
    if cpu:
        freed = sum(4 * t.flat_numel + t.adam_bytes + t.grad_bytes for t, ch in zip(terms, choice) if ch[2])
        parts.append(f"Updating {_listing(cpu)} on the CPU frees {fmt_bytes(freed)} of fp32 masters, Adam state "
                     f"and gradients for {fmt_s(sol.loads_s['cpu_optim'])} of CPU work per step.")
    if not (recompute or stream or cpu):
        parts.append("Everything stays on the device.")
    bound = max(sol.loads_s, key=sol.loads_s.get)
    loads = ", ".join(f"{k} {fmt_s(v)}" for k, v in sol.loads_s.items() if v > 0)
    parts.append(f"The step is bound by {LOAD_NAMES[bound]} ({loads})" + (
        f"; {fmt_s(sol.waits_s)} of the main thread's time is waiting for CPU updates, the global norm or weight "
        f"fetches"
        if sol.waits_s > 1e-3 * sol.step_s else "") + f". The MILP predicts {fmt_s(sol.step_s)} and the simulator "
                 f"{fmt_s(sim.step_s)} for this plan" + (
                     f", the fastest in simulation of {n_candidates} MILP candidates by more than {margin:.0%}." if chosen
                     else f"; no other of {n_candidates} MILP candidates simulates more than {margin:.0%} faster."))
    return " ".join(parts)


def _no_fit_message(cfg: Config, prices: OffloadPrices, device_budget_bytes: int | None,
                    host_budget_bytes: int | None) -> str:
    """Why no plan fits, with the smallest device budget (and the host RAM it needs) and, when
    the device budget is enough, the smallest host RAM at that budget."""
    least_model = OffloadModel(prices, None, None, objective="peak")
    least = least_model.solve(mip_rel_gap=1e-6)
    slack = 2 * BUDGET_MARGIN * least_model.byte_unit  # the solver keeps budgets this much tighter
    min_device = _round_up(least.peak_device_bytes + slack)
    host_at_min = OffloadModel(prices, min_device, None, objective="host").solve(mip_rel_gap=1e-6)
    what = (f"{model_label(cfg)} at "
            f"micro_batch={cfg.train.micro_batch}, seq_len={cfg.train.seq_len}, dtype={cfg.train.dtype}")
    msg = (f"no offload plan fits {what} in a device budget of "
           f"{fmt_bytes(device_budget_bytes) if device_budget_bytes else 'no limit'} and a host budget of "
           f"{fmt_bytes(host_budget_bytes) if host_budget_bytes else 'no limit'}: the smallest device budget any plan "
           f"fits is {fmt_bytes(min_device)} ({min_device} bytes, with {fmt_bytes(_round_up(host_at_min.host_bytes + slack))} "
           f"of host RAM)")
    if device_budget_bytes is None or device_budget_bytes >= min_device:
        need = OffloadModel(prices, device_budget_bytes, None, objective="host").solve(mip_rel_gap=1e-6)
        host = _round_up(need.host_bytes + slack)
        msg += (f", and with the device budget given, plans need at least {fmt_bytes(host)} ({host} bytes) of host "
                f"RAM; raise --memory.host_budget")
    else:
        msg += "; raise --memory.device_budget"
    return msg + ", or lower --train.micro_batch or --train.seq_len"


def _round_up(n_bytes: float) -> int:
    return int(math.ceil(n_bytes / KIB) * KIB)


def plain_peak_bytes(cfg: Config, cost: CostModel) -> int:
    """What plain training of `cfg`'s model and batch holds on the device at its peak: the
    resident plan's peak under the planner's model (equal to hetrain.memory's count on CPU)."""
    prices = offload_prices(describe_for(cfg), cost, step_settings(cfg, cost, PlannerOptions()))
    return math.ceil(OffloadModel(prices, None, None).evaluate(((0, 0, 0),) * len(prices.terms)).peak_device_bytes)


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
    plain = plain_peak_bytes(cfg, cost or default_cost(cfg))
    budget = int(share * plain)
    how = f"{share:.0%} of the {fmt_bytes(plain)} plain training would hold"
    if kind == "auto":
        how = f"auto on a CPU: {how}; --memory.device_budget none trains plainly"
    if gpu is not None and budget > GPU_BUDGET_FRACTION * gpu:
        budget = int(GPU_BUDGET_FRACTION * gpu)
        how += f", capped at {GPU_BUDGET_FRACTION:.0%} of the GPU's {fmt_bytes(gpu)}"
    return ConfigBudgets(budget, host, how, False)


def _plan_for_budgets(cfg: Config, budgets: ConfigBudgets, cost: CostModel | None) -> OffloadPlan:
    plan = plan_offload(cfg, budgets.device_bytes, budgets.host_bytes, cost or default_cost(cfg))
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

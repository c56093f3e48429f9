"""The offload planner: the fastest per-layer placement that fits the device and host budgets.

`plan_offload(spec, batch, cost, device_budget_bytes, host_budget_bytes)` prices every layer with the cost
model (offload_graph.layer_terms), solves the linear model of offload_milp.py for its best
few assignments (HiGHS through scipy.optimize.milp, each further one excluded by a no-good
cut), simulates each candidate's step on the offload step graph, and returns the candidate
the simulator finds fastest as an OffloadPlan, with the MILP's and the simulator's figures and
a paragraph saying which constraint binds and what each choice buys. A model that fits no plan
is a ConfigError giving the smallest device budget and host RAM that would fit.
It takes a model, a batch shape, a cost model and budgets; hetrain.train.offload_planning
reads them from the Config (`hetrain plan`, `hetrain train`). This module decides and explains; it must not execute
plans (the offload engine does) or price tasks itself (the cost model does).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np

from hetrain.errors import ConfigError
from hetrain.plan.offload.graph import (Choice, OffloadPrices, OffloadSimulation, StepSettings, offload_prices,
                                        plan_of, simulate_offload)
from hetrain.plan.offload.milp import BUDGET_MARGIN, OffloadModel, Solution
from hetrain.plan.offload.plan import OffloadPlan, shape_of
from hetrain.model.describe import ModelDescription
from hetrain.model.spec import BatchShape, ModelSpec
from hetrain.predict.cost import CostModel
from hetrain.units import KIB, fmt_bytes

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


def step_settings(desc: ModelDescription, batch: BatchShape, cost: CostModel, options: PlannerOptions,
                  clip: bool = True) -> StepSettings:
    async_copies = cost.on_gpu if options.async_copies is None else options.async_copies
    return StepSettings(grad_accum=batch.grad_accum, clip=clip, overlap=options.overlap,
                        async_copies=async_copies, weight_buffers=options.weight_buffers,
                        prefetch_depth=options.prefetch_depth, compute_dtype_bytes=batch.dtype_bytes,
                        tied_embeddings=desc.tied_embeddings)


def plan_offload(spec: ModelSpec, batch: BatchShape, cost: CostModel, device_budget_bytes: int | None,
                 host_budget_bytes: int | None, options: PlannerOptions = PlannerOptions(),
                 clip: bool = True) -> OffloadPlan:
    """The fastest plan for `spec`'s model at `batch` within the budgets (None: no limit),
    priced by `cost`; `clip`: the step clips the global gradient norm.

    ConfigError when no plan fits, naming the smallest device budget and host RAM that would.
    """
    start = time.perf_counter()
    desc = spec.describe_batch(batch)
    prices = offload_prices(desc, cost, step_settings(desc, batch, cost, options, clip))
    model = OffloadModel(prices, device_budget_bytes, host_budget_bytes)
    found = candidates(model, options)
    solve_s = time.perf_counter() - start
    if not found:
        raise ConfigError(_no_fit_message(spec, batch, prices, device_budget_bytes, host_budget_bytes))
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
    plan.made_for = shape_of(spec.key(), batch.micro_batch, batch.seq_len, batch.dtype)
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


def _no_fit_message(spec: ModelSpec, batch: BatchShape, prices: OffloadPrices, device_budget_bytes: int | None,
                    host_budget_bytes: int | None) -> str:
    """Why no plan fits, with the smallest device budget (and the host RAM it needs) and, when
    the device budget is enough, the smallest host RAM at that budget."""
    least_model = OffloadModel(prices, None, None, objective="peak")
    least = least_model.solve(mip_rel_gap=1e-6)
    slack = 2 * BUDGET_MARGIN * least_model.byte_unit  # the solver keeps budgets this much tighter
    min_device = _round_up(least.peak_device_bytes + slack)
    host_at_min = OffloadModel(prices, min_device, None, objective="host").solve(mip_rel_gap=1e-6)
    what = f"{spec.label()} at micro_batch={batch.micro_batch}, seq_len={batch.seq_len}, dtype={batch.dtype}"
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


def plain_peak_bytes(spec: ModelSpec, batch: BatchShape, cost: CostModel, clip: bool = True) -> int:
    """What plain training of `spec`'s model at `batch` holds on the device at its peak: the
    resident plan's peak under the planner's model (equal to hetrain.memory's count on CPU)."""
    desc = spec.describe_batch(batch)
    prices = offload_prices(desc, cost, step_settings(desc, batch, cost, PlannerOptions(), clip))
    return math.ceil(OffloadModel(prices, None, None).evaluate(((0, 0, 0),) * len(prices.terms)).peak_device_bytes)

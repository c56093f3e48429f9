"""The offload planner: its MILP against exhaustive enumeration, its plans against the AutoHete
prefix/suffix family in the simulator, budget sweeps, the no-fit error, its memory model against
the offload engine's ledger, and the 96-block solve time."""

import itertools
import json
import time

import numpy as np
import pytest
import torch

from hetrain.config import load_config
from hetrain.errors import ConfigError
from hetrain.hardware.catalog import get_kind
from hetrain.model.gpt import GPT
from hetrain.offload import OptimConfig, apply_plan
from hetrain.plan.offload.graph import choice_of, offload_prices, simulate_offload
from hetrain.plan.offload.milp import OffloadModel
from hetrain.plan.offload.plan import OffloadPlan
from hetrain.plan.offload.planner import PlannerOptions, candidates, step_settings
from hetrain.predict.cost import RooflineCost
from hetrain.train.job import batch_shape, describe
from hetrain.train.offload_planning import plan_offload_for, run_offload_planning

GIB = 2**30


def config(preset="tiny", n_layer=4, dtype="fp32", micro_batch=2, seq_len=32, **extra):
    overrides = {"model.preset": preset, "model.n_layer": str(n_layer), "train.dtype": dtype,
                 "train.micro_batch": str(micro_batch), "train.seq_len": str(seq_len)}
    overrides.update({k.replace("__", "."): str(v) for k, v in extra.items()})
    return load_config(None, overrides)


def gpu_config(preset="gpt3-1.3b", n_layer=8, micro_batch=8, seq_len=1024, **extra):
    return config(preset, n_layer, "bf16", micro_batch, seq_len, **extra)


def cost_for(cfg, kind):
    return RooflineCost(describe(cfg), get_kind(kind), cfg.train.dtype)


def model_for(cfg, kind, device_budget, host_budget, options=PlannerOptions()):
    cost = cost_for(cfg, kind)
    prices = offload_prices(describe(cfg), cost, step_settings(describe(cfg), batch_shape(cfg), cost, options))
    return prices, OffloadModel(prices, device_budget, host_budget)


def all_choices(n_layers, pinned=()):
    """Every per-layer (recompute, stream, CPU optimizer) assignment; recompute on blocks only;
    layers in `pinned` stay (0, 0, 0)."""
    per_layer = []
    for l in range(n_layers):
        block = 0 < l < n_layers - 1
        options = [(0, 0, 0)] if l in pinned else [(r, s, c) for r in ((0, 1) if block else (0,))
                                                   for s in (0, 1) for c in (0, 1)]
        per_layer.append(options)
    return list(itertools.product(*per_layer))


def resident_peak(prices, model):
    return model.evaluate(((0, 0, 0),) * len(prices.terms)).peak_device_bytes


# --- the MILP against exhaustive enumeration ------------------------------------------------------


CASES = {
    # config, device kind, device and host budgets as fractions of plain training's device peak and
    # of the host bytes of everything offloaded, layers pinned resident in both searches
    "bf16-gpu-tied-3-blocks": (lambda: gpu_config(n_layer=3), "H100-SXM", 0.6, 0.9, ()),
    "fp32-cpu-untied-accum-noclip-3-blocks": (
        lambda: config("tiny-llama", 3, train__grad_accum=2, train__grad_clip=0.0), "cpu", 0.6, 0.9, ()),
    "bf16-gpu-4-blocks-ordered": (lambda: gpu_config(n_layer=4, micro_batch=4), "A100-40GB", 0.7, 0.6, (0, 5)),
    "fp32-gpu-4-blocks-ordered": (lambda: gpu_config(n_layer=4, micro_batch=2, train__dtype="fp32"), "A100-80GB",
                                  0.8, 0.6, (0, 5)),
    # Six blocks, four of them interior: every ordering row of the MILP is exercised, with
    # activations larger than a block's gradient (recompute rows apply to all blocks) ...
    "bf16-gpu-6-blocks-large-activations": (lambda: gpu_config(n_layer=6, micro_batch=4), "H100-SXM", 0.6, 0.6,
                                            (0, 7)),
    # ... and smaller (recompute rows apply among CPU-updated blocks only), in fp32.
    "fp32-gpu-6-blocks-small-activations": (
        lambda: gpu_config(n_layer=6, micro_batch=1, seq_len=128, train__dtype="fp32"), "H100-SXM", 0.6, 0.6, (0, 7)),
}


def _objectives(model, choices):
    x = model.values(choices)
    return np.where(model.feasible(x), model.objective_values(x), np.inf)


@pytest.mark.parametrize("case", CASES)
def test_milp_finds_the_exhaustive_optimum(case):
    make_cfg, kind, device_fraction, host_fraction, pinned = CASES[case]
    cfg = make_cfg()
    prices, probe_model = model_for(cfg, kind, None, None)
    budget = device_fraction * resident_peak(prices, probe_model)
    host_budget = host_fraction * probe_model.evaluate(((1, 1, 1),) * len(prices.terms)).host_bytes
    model = OffloadModel(prices, budget, host_budget)
    for l in pinned:  # the same layers are pinned in the MILP and in the enumeration
        for group in (model.r, model.s, model.c):
            model.ub[group[l]] = 0.0
    choices = all_choices(len(prices.terms), pinned)
    objective = np.concatenate([_objectives(model, choices[i:i + 8192]) for i in range(0, len(choices), 8192)])
    best = int(np.argmin(objective))
    assert np.isfinite(objective[best]), "the case must leave some plan feasible"
    assert (objective < np.inf).sum() < len(choices), "the budgets must rule some plans out"

    sol = model.solve(mip_rel_gap=0.0)
    # Equal up to HiGHS's tolerances (1e-7 on its scaled rows); plans closer than that are ties.
    assert sol.objective == pytest.approx(objective[best], rel=1e-7, abs=1e-9)
    ties = np.flatnonzero(objective <= objective[best] * (1 + 1e-7))
    if len(ties) == 1:
        assert sol.choice == choices[best]
    else:
        assert choices.index(sol.choice) in ties
    # The closed form agrees with the solver on the chosen plan, and the plan fits.
    assert sol.peak_device_bytes <= budget * (1 + 1e-9) and sol.host_bytes <= host_budget * (1 + 1e-9)
    # With the planner's default gap (and its polish) the solution is within that gap of the optimum.
    loose = OffloadModel(prices, budget, host_budget)
    for l in pinned:
        for group in (loose.r, loose.s, loose.c):
            loose.ub[group[l]] = 0.0
    gap = PlannerOptions().mip_rel_gap
    assert candidates(loose, PlannerOptions(candidates=1))[0].objective <= objective[best] * (1 + gap) + 1e-9


def test_top_candidates_differ_in_placements_and_come_in_milp_order():
    cfg = gpu_config(n_layer=6)
    prices, model = model_for(cfg, "H100-SXM", None, None)
    model = OffloadModel(prices, 0.45 * resident_peak(prices, model), None)
    found = candidates(model, PlannerOptions(candidates=4, mip_rel_gap=0.0, candidate_gap=0.0))
    placements = [tuple((s, c) for _, s, c in f.choice) for f in found]
    assert len(set(placements)) == len(found) == 4
    for better, worse in zip(found, found[1:]):  # within the solver's tolerance
        assert better.objective <= worse.objective * (1 + 1e-7)


# --- plans in the simulator -----------------------------------------------------------------------


def test_plan_beats_the_best_prefix_suffix_plan_in_simulation():
    cfg = gpu_config(n_layer=8)
    cost = cost_for(cfg, "A100-40GB")
    prices, model = model_for(cfg, "A100-40GB", None, None)
    budget, host = int(0.5 * resident_peak(prices, model)), 200 * GIB
    model = OffloadModel(prices, budget, host)
    plan = plan_offload_for(cfg, budget, host, cost)
    n = len(prices.terms) - 2
    family = [choice_of(OffloadPlan.prefix_suffix(n, r, s, c)) for r, s, c in itertools.product(range(n + 1), repeat=3)]
    fits = model.feasible(model.values(family))
    family_best = min(simulate_offload(prices, ch).step_s for ch, ok in zip(family, fits) if ok)
    assert plan.predicted_step_s <= family_best * (1 + 1e-9)
    assert plan.search["simulated_step_s"] == plan.predicted_step_s
    assert plan.predicted_peak_device_bytes <= budget
    assert plan.search["simulated_peak_device_bytes"] <= plan.predicted_peak_device_bytes


def test_linear_model_tracks_the_simulator_on_prefix_suffix_plans():
    cfg = gpu_config(n_layer=8)
    prices, model = model_for(cfg, "H100-SXM", None, None)
    for r, s, c in [(0, 0, 0), (8, 0, 0), (0, 8, 0), (0, 0, 4), (3, 2, 6), (8, 8, 8)]:
        choice = choice_of(OffloadPlan.prefix_suffix(8, r, s, c))
        sol, sim = model.evaluate(choice), simulate_offload(prices, choice)
        assert sim.step_s == pytest.approx(sol.step_s, rel=0.05), (r, s, c)
        assert sim.peak_device_bytes <= sol.peak_device_bytes


# --- budgets --------------------------------------------------------------------------------------


def _offloaded_bytes(prices, choice):
    """Device bytes the choices free against plain training (state and saved activations)."""
    st = prices.settings
    return sum(t.device_state_bytes(0, 0, st) - t.device_state_bytes(s, c, st) + c * t.grad_bytes
               + r * (t.saved_keep_bytes - t.saved_recompute_bytes) for t, (r, s, c) in zip(prices.terms, choice))


def test_budget_sweep_moves_toward_offloading_and_stays_within_budget():
    cfg = gpu_config(n_layer=8)
    cost = cost_for(cfg, "H100-SXM")
    prices, model = model_for(cfg, "H100-SXM", None, None)
    peak = resident_peak(prices, model)
    host = 200 * GIB
    plans = [plan_offload_for(cfg, int(f * peak), host, cost) for f in (1.0, 0.7, 0.5, 0.42, 0.36)]
    # Everything fits: nothing recomputes or streams; a CPU update only where it is faster.
    assert all(r == s == 0 for r, s, _ in choice_of(plans[0]))
    resident = simulate_offload(prices, ((0, 0, 0),) * 10).step_s
    assert plans[0].predicted_step_s <= resident
    freed = [_offloaded_bytes(prices, choice_of(p)) for p in plans]
    milp_step = [p.search["milp_step_s"] for p in plans]
    for i, (f, p) in enumerate(zip((1.0, 0.7, 0.5, 0.42, 0.36), plans)):
        assert p.predicted_peak_device_bytes <= int(f * peak) and p.predicted_host_bytes <= host
        assert p.device_budget_bytes == int(f * peak)
        if i:
            assert freed[i] >= freed[i - 1]
            assert milp_step[i] >= milp_step[i - 1] * (1 - 1e-4)
    assert sum(map(sum, (l for l in choice_of(plans[-1])))) > 0


def test_no_plan_fits_names_the_smallest_budgets_that_do():
    cfg = gpu_config(n_layer=4)
    cost = cost_for(cfg, "H100-SXM")
    with pytest.raises(ConfigError) as err:
        plan_offload_for(cfg, 64 * 2**20, 200 * GIB, cost)
    msg = str(err.value)
    assert "smallest device budget any plan fits is" in msg and "raise --memory.device_budget" in msg
    min_device = int(msg.split("fits is ")[1].split("(")[1].split(" bytes")[0])
    plan = plan_offload_for(cfg, min_device, 200 * GIB, cost)  # the stated minimum fits ...
    assert plan.predicted_peak_device_bytes <= min_device
    with pytest.raises(ConfigError):  # ... and a little less does not
        plan_offload_for(cfg, min_device - 2 * 2**20, 200 * GIB, cost)
    # Host RAM too small for the device budget: the error gives the host RAM it needs.
    with pytest.raises(ConfigError) as err:
        plan_offload_for(cfg, min_device, 2**30, cost)
    msg = str(err.value)
    assert "raise --memory.host_budget" in msg
    need_host = int(msg.split("need at least ")[1].split("(")[1].split(" bytes")[0])
    plan = plan_offload_for(cfg, min_device, need_host, cost)
    assert plan.predicted_host_bytes <= need_host


# --- against the offload engine -------------------------------------------------------------------


@pytest.mark.parametrize("preset, dtype, fraction", [("tiny", "fp32", 0.6), ("tiny-llama", "bf16", 0.6),
                                                     ("tiny", "bf16", 0.45)])
def test_engine_stays_under_the_planned_peak(preset, dtype, fraction):
    """Plan a tiny model on CPU at a budget, then train it with the engine: the ledger's static
    bytes and peak stay under the planner's figures, which stay under the budget."""
    cfg = config(preset, dtype=dtype, micro_batch=4, seq_len=32)
    cost = cost_for(cfg, "cpu")
    prices, model = model_for(cfg, "cpu", None, None)
    budget = int(fraction * resident_peak(prices, model))
    plan = plan_offload_for(cfg, budget, 2**30, cost)
    assert plan.predicted_peak_device_bytes <= budget
    assert any(layer.act == "recompute" or layer.weights == "host" or layer.optim == "host" for layer in plan.layers)
    torch.manual_seed(0)
    engine = apply_plan(GPT(cfg.model), plan, OptimConfig(), "cpu",
                        compute_dtype=torch.float32 if dtype == "fp32" else torch.bfloat16)
    try:
        planned_static = prices.static_device_bytes(choice_of(plan))
        assert engine.static_device_bytes <= planned_static <= 1.01 * engine.static_device_bytes  # padding bound
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            batches = [(torch.randint(0, 256, (4, 32), generator=g), torch.randint(0, 256, (4, 32), generator=g))]
            engine.train_step(batches, 1e-3, 1.0)
        assert engine.peak_device_bytes <= plan.predicted_peak_device_bytes <= 1.05 * engine.peak_device_bytes
    finally:
        engine.close()


# --- output, speed ------------------------------------------------------------------------------


def test_run_offload_planning_prints_the_table_and_writes_plan_json(tmp_path, capsys):
    cfg = config(memory__device_budget="1MiB", memory__host_budget="1GiB")
    plan = run_offload_planning(cfg, tmp_path / "out", cost_for(cfg, "cpu"))
    out = capsys.readouterr().out
    assert "block.3" in out and "predicted: step" in out and "This plan peaks at" in out
    saved = OffloadPlan.load(tmp_path / "out" / "plan.json")
    assert saved == plan
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["device_budget_bytes"] == 2**20
    assert sum(l.predicted_device_bytes for l in plan.layers) <= plan.predicted_peak_device_bytes


def test_96_block_model_plans_within_a_second():
    cfg = config("gpt3-175b", 96, "bf16", micro_batch=1, seq_len=2048)
    cost = cost_for(cfg, "H100-SXM")
    plan_offload_for(cfg, 40 * GIB, 4000 * GIB, cost)  # warm imports and caches
    start = time.perf_counter()
    plan = plan_offload_for(cfg, 40 * GIB, 4000 * GIB, cost)
    elapsed_s = time.perf_counter() - start
    assert elapsed_s < 2.0, f"planning took {elapsed_s:.2f} s"
    assert plan.n_blocks == 96 and plan.predicted_peak_device_bytes <= 40 * GIB


# --- budgets from the config ------------------------------------------------------------------------


def test_default_job_plan_mixes_every_kind_of_decision():
    from hetrain.train.offload_planning import plain_peak_for, plan_for_config

    cfg = load_config(None, {"run.device": "cpu"})  # the default job, as on a machine without a GPU
    cost = cost_for(cfg, "cpu")
    plan = plan_for_config(cfg, cost)
    assert plan.device_budget_bytes == int(0.5 * plain_peak_for(cfg, cost))
    assert plan.predicted_peak_device_bytes <= plan.device_budget_bytes
    assert any(l.act == "recompute" for l in plan.layers)
    assert any(l.weights == "host" for l in plan.layers)
    assert any(l.optim == "host" for l in plan.layers)
    assert "auto on a CPU: 50% of the" in plan.note


def test_device_budget_forms(monkeypatch):
    from hetrain.train import offload_planning as offload_planner
    from hetrain.train.offload_planning import plain_peak_for, plan_for_config

    cfg = config(run__device="cpu")
    cost = cost_for(cfg, "cpu")
    plain = plain_peak_for(cfg, cost)
    assert plan_for_config(config(memory__device_budget="none"), cost) is None
    assert plan_for_config(config(memory__device_budget="70%"), cost).device_budget_bytes == int(0.7 * plain)
    assert plan_for_config(config(memory__device_budget="3MiB"), cost).device_budget_bytes == 3 * 2**20
    # 'auto' on a GPU: 90% of its memory; plain training (None) when the model fits there.
    monkeypatch.setattr(offload_planner, "_gpu_memory_bytes", lambda cfg: 80 * GIB)
    assert plan_for_config(config(), cost) is None
    monkeypatch.setattr(offload_planner, "_gpu_memory_bytes", lambda cfg: int(plain / 0.9 * 0.6))
    plan = plan_for_config(config(), cost)
    assert plan.device_budget_bytes == int(0.9 * int(plain / 0.9 * 0.6))
    assert plan.predicted_peak_device_bytes <= plan.device_budget_bytes
    # A share above what the GPU holds is capped at the GPU's budget.
    plan = plan_for_config(config(memory__device_budget="100%"), cost)
    assert plan.device_budget_bytes == int(0.9 * int(plain / 0.9 * 0.6)) and "capped at 90%" in plan.note

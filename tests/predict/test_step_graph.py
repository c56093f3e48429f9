"""Step graph and predictor: state bytes against the real module, peaks by hand and against the
trainer's accountant, serial step time, and `hetrain simulate`."""

import json
import time
from pathlib import Path

import pytest
import torch

from hetrain.cli import main
from hetrain.config import load_config
from hetrain.memory import MemoryAccountant
from hetrain.model.describe import describe_model
from hetrain.model.gpt import GPT
from hetrain.model.presets import get_preset
from hetrain.predict.cost import RooflineCost
from hetrain.hardware.catalog import get_kind
from hetrain.predict.simulator import Task
from hetrain.predict.step_graph import (
    StepGraphOptions, build_step_graph, build_step_tasks, param_tensors, predict_step, state_bytes,
)
from hetrain.trace import read_chrome_trace
from hetrain.train.job import describe, job_cost, predict_job
from hetrain.train.recipe import make_optimizer
from hetrain.train.trainer import Trainer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_state_bytes_match_the_module_and_fused_adamw(preset):
    cfg = get_preset(preset)
    model = GPT(cfg)
    state = state_bytes(describe_model(cfg, 2, 16, compute_dtype_bytes=4))
    tensors = param_tensors(cfg)
    assert len(list(model.blocks[0].parameters())) == tensors["block"]
    assert len(list(model.parameters())) == tensors["embedding"] + cfg.n_layer * tensors["block"] + tensors["head"]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer = make_optimizer(model, load_config(None, {}), torch.device("cpu"))
    optimizer.step()
    acct = MemoryAccountant(model, optimizer)
    assert acct.param_bytes == state.params_bytes + state.buffers_bytes
    assert acct.optimizer_bytes == state.adam_bytes
    acct.close()


def _tiny_cost(micro_batch=4, seq_len=32):
    desc = describe_model(get_preset("tiny"), micro_batch, seq_len, compute_dtype_bytes=4)
    return desc, RooflineCost(desc, get_kind("cpu"), "fp32")


def test_serial_plan_runs_in_trainer_order_and_takes_the_sum_of_its_tasks():
    desc, cost = _tiny_cost()
    tasks = build_step_tasks(desc, cost, grad_accum=2)
    names = [t.name for t in tasks]
    assert names[:4] == ["fwd embedding mb0", "fwd block.0 mb0", "fwd block.1 mb0", "fwd head mb0"]
    assert names[4:6] == ["bwd head mb0", "grad head"]
    assert names.index("fwd embedding mb1") > names.index("bwd embedding mb0")
    assert "grad head" in names and "grad head mb1" not in names  # gradients appear once per step
    assert names[-1] == "zero_grad" and names.index("norm") < names.index("optim block.0")
    graph = build_step_graph(desc, cost, StepGraphOptions(grad_accum=2))
    block = desc.blocks[0]
    # The second micro-batch's backward also adds into the gradients the first one left.
    assert graph.task("bwd block.0 mb0").duration_s == cost.bwd_s(block)
    assert graph.task("bwd block.0 mb1").duration_s == cost.bwd_s(block) + cost.grad_accumulate_s(block.params, 6)
    sim = graph.simulate()
    assert sim.step_s == pytest.approx(sum(t.duration_s for t in tasks), rel=1e-12)
    assert [e.name for e in sim.events] == names
    assert sim.utilisation == {"compute": pytest.approx(1.0)}


def test_peak_memory_by_hand():
    desc, cost = _tiny_cost()
    state = state_bytes(desc)
    params = desc.total_params * 4
    adam = 2 * desc.total_params * 4 + 4 * (2 + 2 * 6 + 1)   # exp_avg, exp_avg_sq, one step per tensor
    grads = desc.total_params * 4
    acts = sum(layer.act_bytes_total for layer in desc.layers())
    assert (state.params_bytes, state.adam_bytes, state.grads_bytes) == (params, adam, grads)
    # Two micro-batches: the second forward runs with every gradient held.
    peak = build_step_graph(desc, cost, StepGraphOptions(grad_accum=2)).simulate().peak_bytes["device"]
    assert peak == params + grads + adam + acts
    # One micro-batch of tiny: activations outweigh each layer's gradients, so the peak is the
    # end of the forward, before any gradient exists.
    peak = build_step_graph(desc, cost, StepGraphOptions(grad_accum=1)).simulate().peak_bytes["device"]
    assert peak == params + adam + acts
    # One sequence of 8 tokens: gradients outweigh activations; the peak is just after the last
    # backward, when every gradient is held and every activation is gone.
    desc, cost = _tiny_cost(micro_batch=1, seq_len=8)
    peak = build_step_graph(desc, cost).simulate().peak_bytes["device"]
    assert peak == params + adam + grads


def test_predicted_peak_equals_the_trainer_accountant(tiny_config):
    cfg = tiny_config(**{"train.grad_accum": 2, "train.steps": 3, "train.eval_every": 0, "train.ckpt_every": 0,
                         "hardware.device_kind": "cpu"})
    Trainer(cfg).fit()
    records = [json.loads(line) for line in (Path(cfg.run.dir) / "metrics.jsonl").read_text().splitlines()]
    steady = predict_job(cfg)
    first = predict_step(describe(cfg), job_cost(cfg), StepGraphOptions(grad_accum=2, steady_state=False))
    assert steady.peak_device_bytes == records[-1]["peak_device_bytes"]
    assert first.peak_device_bytes == records[0]["peak_device_bytes"]


def test_graph_is_extensible_by_name():
    # What an offload planner does: a weight prefetch on its own lane that a forward waits for.
    desc, cost = _tiny_cost()
    graph = build_step_graph(desc, cost)
    graph.add(Task("h2d.w.block.1", "h2d", 1.0, cat="h2d"), before="fwd block.1 mb0")
    graph.add_deps("fwd block.1 mb0", "h2d.w.block.1")
    sim = graph.simulate()
    compute = [t for t in graph.tasks if t.resource == "compute"]
    after = compute[[t.name for t in compute].index("fwd block.1 mb0"):]
    assert {e.name: e.start_s for e in sim.events}["fwd block.1 mb0"] == 1.0
    assert sim.step_s == pytest.approx(1.0 + sum(t.duration_s for t in after))
    with pytest.raises(KeyError, match="no task named"):
        graph.task("fwd block.9 mb0")


def test_96_block_model_predicts_in_well_under_a_second():
    cfg = load_config(None, {"model.preset": "gpt3-175b", "train.micro_batch": "1", "train.seq_len": "2048",
                             "train.grad_accum": "4", "train.dtype": "bf16", "hardware.device_kind": "H100-SXM"})
    t0 = time.perf_counter()
    pred = predict_job(cfg)
    assert time.perf_counter() - t0 < 1.0
    assert pred.device_memory_bytes == get_kind("H100-SXM").memory_bytes < pred.peak_device_bytes


def test_simulate_command_writes_trace_and_png(tmp_path, capsys):
    run_dir = tmp_path / "sim"
    rc = main(["simulate", "--model.preset", "gpt2-small", "--train.micro_batch", "4", "--train.seq_len", "512",
               "--train.dtype", "bf16", "--hardware.device_kind", "H100-SXM", "--run.dir", str(run_dir)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "predicted step:" in out and "critical path:" in out and "utilisation: compute" in out
    assert "peak device memory:" in out
    events = read_chrome_trace(run_dir / "sim_trace.json")
    assert {e.lane for e in events} == {"compute"} and [e.name for e in events[:2]] == ["cast", "fwd embedding mb0"]
    assert (run_dir / "sim_timeline.png").read_bytes()[:8] == PNG_MAGIC


def test_simulate_without_a_profile_says_how_to_make_one(tmp_path, capsys):
    rc = main(["simulate", "--model.preset", "tiny", "--train.seq_len", "32",
               "--hardware.profile_dir", str(tmp_path / "none"), "--run.dir", str(tmp_path / "sim")])
    assert rc == 2
    assert "hetrain profile" in capsys.readouterr().err
    assert not (tmp_path / "sim").exists()

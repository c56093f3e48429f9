"""Runs that survive faults and keep their record (one process; the torchrun faults are in
test_rank_faults.py): a checkpoint resumes exactly under any plan, the plan that ran is kept
with the run, partial saves are cleaned up, and a resume that has nothing to do, or would
repeat what is done, stops before it writes anything."""

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from hetrain.cli import main
from hetrain.plan.offload.plan import OffloadPlan
from hetrain.train import checkpoint as ckpt
from hetrain.train.trainer import Trainer
from tests_support import cli_args

# How each run chooses its plan: plain training, the planner under 'auto' (50% of plain on a
# CPU), a hand-made plan file (recompute, stream and CPU-update one block each).
PLANS = {
    "plain": {"memory.device_budget": "none"},
    "auto": {"memory.device_budget": "auto", "run.device": "cpu", "hardware.device_kind": "cpu"},
    "file": {"memory.device_budget": "auto"},  # plan.file is set in the test
}
# (first run's plan, resumed run's plan): every kind of checkpoint into every kind of run.
RESUMES = [("auto", "plain"), ("plain", "auto"), ("file", "plain"), ("plain", "file"), ("auto", "auto"),
           ("file", "auto")]


def plan_overrides(kind, tmp_path):
    values = dict(PLANS[kind])
    if kind == "file":
        path = tmp_path / "mixed.json"
        OffloadPlan.prefix_suffix(2, recompute=1, stream=1, cpu_optim=1).save(path)
        values["plan.file"] = str(path)
    return values


@pytest.fixture
def straight(tiny_config, tmp_path):
    """Ten plain steps without interruption: the reference every resume must equal."""
    return Trainer(tiny_config(tmp_path / "straight", **PLANS["plain"])).fit()


@pytest.mark.parametrize("first,then", RESUMES)
def test_any_checkpoint_resumes_exactly_under_any_plan(tiny_config, tmp_path, straight, first, then, capsys):
    Trainer(tiny_config(tmp_path / "a", **plan_overrides(first, tmp_path), **{"train.steps": 5,
                                                                              "train.decay_steps": 10})).fit()
    assert json.loads((tmp_path / "a" / "checkpoints" / "step_00000005" / "meta.json").read_text())["plan"] \
        == (None if first == "plain" else OffloadPlan.load(tmp_path / "a" / "plan.json").to_dict())
    capsys.readouterr()
    # The same folder, extended to 10 steps under another plan (the schedule kept by decay_steps).
    resumed = Trainer(tiny_config(tmp_path / "a", **plan_overrides(then, tmp_path),
                                  **{"run.resume": "auto", "train.decay_steps": 10})).fit()
    out = capsys.readouterr().out
    if first == then == "auto":
        assert "resuming under the plan the checkpoint ran" in out
    elif then != "file":
        assert "re-planned for this run" in out
    steps = range(6, 11)
    assert [resumed.losses[s] for s in steps] == pytest.approx([straight.losses[s] for s in steps], rel=1e-6)
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "a" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7, msg=key)


def test_the_plan_that_ran_is_kept_and_a_resume_with_another_budget_trains_plainly(tmp_path, corpus, straight):
    """The issue's check: 10 steps under the default (an offload plan on a CPU), then 10 more
    resumed with --memory.device_budget none, equal 20 plain steps; R/plan.json holds the plan.
    train.decay_steps 20 keeps the 20-step schedule in the first run (the cosine horizon
    follows train.steps otherwise, so a run extended later decays differently)."""
    run = tmp_path / "R"
    base = {"train.eval_every": 0, "train.ckpt_every": 5, "memory.device_budget": "auto",
            "hardware.device_kind": "cpu", "train.steps": 20, "train.decay_steps": 20}
    ref = tmp_path / "ref"
    assert main(["train", *cli_args(ref, corpus, **{**base, "memory.device_budget": "none"})]) == 0
    assert main(["train", *cli_args(run, corpus, **{**base, "train.steps": 10})]) == 0
    plan = OffloadPlan.load(run / "plan.json")
    assert plan.made_for["model.n_layer"] == 2 and any(l.optim == "host" for l in plan.layers)
    assert main(["train", *cli_args(run, corpus, **{**base, "run.resume": "auto",
                                                     "memory.device_budget": "none"})]) == 0
    losses = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    expected = {r["step"]: r["loss"] for r in map(json.loads, (ref / "metrics.jsonl").read_text().splitlines())}
    assert sorted(losses) == list(range(1, 21))
    assert [losses[s] for s in range(1, 21)] == pytest.approx([expected[s] for s in range(1, 21)], rel=1e-6)
    assert not (run / "plan.json").exists()  # the last run trained plainly: no stale plan beside it


def test_a_plan_file_for_another_model_is_refused(tiny_config, tmp_path, corpus, capsys):
    run = tmp_path / "p"
    args = ["--model.preset", "tiny", "--train.seq_len", "32", "--train.micro_batch", "4",
            "--hardware.device_kind", "cpu", "--memory.device_budget", "60%", "--run.dir", str(run)]
    assert main(["plan", *args]) == 0
    # Same number of blocks, another width: the plan's memory figures do not hold.
    bad = cli_args(tmp_path / "t", corpus, **{"plan.file": run / "plan.json", "model.d_model": 128})
    assert main(["train", *bad]) == 2
    err = capsys.readouterr().err
    assert "it was made for model.d_model=64, this run has 128" in err and "\n" not in err.strip()
    assert not (tmp_path / "t").exists()
    bad = cli_args(tmp_path / "t", corpus, **{"plan.file": run / "plan.json", "train.micro_batch": 8})
    assert main(["train", *bad]) == 2
    assert "train.micro_batch=4, this run has 8" in capsys.readouterr().err


def test_resume_with_nothing_to_train_writes_nothing(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(["train", *cli_args(run, corpus, **{"train.steps": 6, "train.ckpt_every": 3})]) == 0
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    for steps in (4, 6):  # 6: the run ended (and exported) at step 6
        assert main(["train", *cli_args(run, corpus, **{"train.steps": steps, "run.resume": "auto"})]) == 2
        err = capsys.readouterr().err
        assert "is at step 6 and train.steps is" in err and "raise --train.steps above 6" in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


def test_a_run_killed_between_its_last_checkpoint_and_its_export_finishes_the_export(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(["train", *cli_args(run, corpus, **{"train.steps": 4, "train.ckpt_every": 2})]) == 0
    exported = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").unlink()  # what a kill right after the last save leaves
    config = (run / "config.toml").read_text()
    assert main(["train", *cli_args(run, corpus, **{"train.steps": 4, "run.resume": "auto"})]) == 0
    assert "before its export" in capsys.readouterr().out
    assert load_file(run / "model.safetensors").keys() == load_file_bytes(exported).keys()
    for key, value in load_file_bytes(exported).items():
        assert torch.equal(load_file(run / "model.safetensors")[key], value)
    assert (run / "config.toml").read_text() == config
    # Finished and exported: a further resume has nothing to do, and says so.
    assert main(["train", *cli_args(run, corpus, **{"train.steps": 4, "run.resume": "auto"})]) == 2


def load_file_bytes(data: bytes) -> dict:
    from safetensors.torch import load

    return load(data)


def test_partial_saves_are_removed_and_never_resumed(tmp_path, corpus):
    run = tmp_path / "run"
    assert main(["train", *cli_args(run, corpus, **{"train.steps": 4, "train.ckpt_every": 2})]) == 0
    root = run / "checkpoints"
    dead_pid = 2**22 + 12345  # above Linux's pid_max: no such process
    for name in (f"step_00000006.tmp{dead_pid}", f"step_00000004.old{dead_pid}"):
        (root / name).mkdir()
        (root / name / "half-written").write_bytes(b"x" * 100)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000002", "step_00000004"]
    assert main(["train", *cli_args(run, corpus, **{"train.steps": 6, "train.ckpt_every": 2, "run.resume": "auto"})]) == 0
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000006"]
    # A partial save of a process that still runs (this one) is not touched by another.
    assert ckpt.remove_stale_partials(root) == []


def test_a_new_run_starts_its_metrics_afresh(tmp_path, corpus):
    run = tmp_path / "run"
    run.mkdir()
    # What a run killed before its first checkpoint leaves: rows, and a torn last line.
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n" + '{"step": 2, "lo')
    assert main(["train", *cli_args(run, corpus, **{"train.steps": 3})]) == 0
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"] != 9.0


def test_planning_a_model_too_large_to_profile_here_takes_the_catalog_and_says_so(tmp_path, capsys):
    start = time.perf_counter()
    rc = main(["plan", "--model.preset", "llama2-70b", "--train.seq_len", "4096", "--train.micro_batch", "1",
               "--train.dtype", "bf16", "--memory.device_budget", "40%", "--memory.host_budget", "4TiB",
               "--hardware.profile_dir", str(tmp_path / "profiles"), "--run.dir", str(tmp_path / "p")])
    out = capsys.readouterr().out
    assert rc == 0 and time.perf_counter() - start < 60
    assert "profiling one block of this model here would take" in out and "catalog's 'cpu' figures" in out
    assert not (tmp_path / "profiles").exists()  # nothing was profiled


def test_a_share_budget_is_capped_at_the_named_devices_memory(tmp_path, capsys):
    assert main(["plan", "--model.preset", "llama2-70b", "--train.seq_len", "4096", "--train.micro_batch", "1",
                 "--train.dtype", "bf16", "--memory.device_budget", "40%", "--hardware.device_kind", "H100-SXM",
                 "--memory.host_budget", "2TiB", "--run.dir", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    plan = OffloadPlan.load(tmp_path / "p" / "plan.json")
    assert plan.device_budget_bytes == int(0.9 * 80 * 2**30) and "capped at 90% of the GPU's 80.0 GiB" in out
    # The summary line counts what the paragraph counts (the embedding and head included).
    streamed = sum(l.weights == "host" for l in plan.layers)
    assert f"stream weights {streamed} (" in plan.summary() and f"weights of {streamed} layers" in out


def test_trace_under_an_offload_plan_pairs_predicted_and_measured_tasks(tiny_config, tmp_path, capsys):
    cfg = tiny_config(tmp_path / "t", **PLANS["auto"], **{"train.steps": 5, "train.grad_accum": 2,
                                                           "log.trace": "true", "log.trace_steps": 2,
                                                           "hardware.profile_dir": str(tmp_path / "prof")})
    Trainer(cfg).fit()
    assert "predicted beside measured" in capsys.readouterr().out
    trace = json.loads((tmp_path / "t" / "trace.json").read_text())
    lanes = {e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "thread_name"}
    assert {"compute", "cpu_optim"} <= lanes  # the engine's own lanes
    pairs = {p["task"]: p for p in trace["metadata"]["predicted_vs_measured"]}
    # Every block's forward and backward of both micro-batches is paired by its one name.
    for m in (0, 1):
        for i in (0, 1):
            for phase in ("fwd", "bwd"):
                assert f"{phase} block.{i} mb{m}" in pairs
    assert all(p["predicted_s"] > 0 and p["measured_s"] > 0 for p in pairs.values())

"""bench/gpu/run_all.sh, the one command a session lent a GPU runs, works: its dry run (every
step on the CPU at tiny sizes) passes here, so the script cannot rot between such sessions."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_the_report(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "bench/gpu/run_all.sh"), "--dry-run", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    steps = results["steps"]
    assert list(steps) == ["tests", "mixed", "peers", "predictor", "capacity", "bound"]
    assert steps["tests"]["status"] in ("ok", "skipped")  # the GPU tests skip themselves on a CPU
    for name in ("mixed", "peers", "bound", "predictor", "capacity"):
        assert steps[name]["status"] == "ok", (name, steps[name])
    peers = {r["system"]: r for r in steps["peers"]["rows"]}
    assert set(peers) == {"hetrain", "fsdp2-offload", "zero2-offload", "zero3-offload"}
    # The same model, seed and batches: hetrain and FSDP2 start from the same loss.
    assert peers["hetrain"]["ok"] and peers["fsdp2-offload"]["ok"]
    assert peers["hetrain"]["losses"][0] == pytest.approx(peers["fsdp2-offload"]["losses"][0], rel=1e-5)
    for row in peers.values():  # DeepSpeed either ran (where installed) or says why not
        assert row["ok"] or row["error"].startswith("skipped"), row
    assert all(r["engine_s"] > 0 and r["bound_s"] > 0 for r in steps["bound"]["rows"])
    assert all(r["meas_step_s"] > 0 for r in steps["predictor"]["rows"])
    assert steps["mixed"]["loss_max_rel_diff"] <= 1e-5 and steps["mixed"]["steps"] == 4
    assert any(r.get("largest_layers", 0) >= 1 for r in steps["capacity"]["rows"])
    report = (tmp_path / "results.md").read_text()
    assert "| peers | ok |" in report and "hetrain" in report
    assert "run_all.sh: exit 0" in (tmp_path / "log.txt").read_text()
    # hetrain's traces of its peers row: the engine's lanes and torch.profiler's step.
    lanes = {e.get("tid") for e in json.loads((tmp_path / "engine_trace.json").read_text())["traceEvents"]}
    assert len(lanes) >= 2
    assert (tmp_path / "hetrain_torch_trace.json.gz").stat().st_size > 0

"""Training through an offload plan equals plain training, end to end through the trainer."""

import json

import pytest
import torch

from hetrain.plan.offload.plan import OffloadPlan
from hetrain.train.trainer import Trainer


@pytest.fixture
def mixed_plan(tmp_path):
    # Block 0 recomputed with streamed weights, block 1 updated on the CPU, overlap on.
    plan = OffloadPlan.prefix_suffix(2, recompute=1, stream=1, cpu_optim=1)
    path = tmp_path / "plan.json"
    plan.save(path)
    return path


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_plan_file_trains_the_same_model(tiny_config, tmp_path, mixed_plan, dropout):
    """With dropout on, the recomputed block replays the random numbers of its forward (the same masks)."""
    extra = {"train.grad_accum": 2, "model.dropout": dropout}
    plain = Trainer(tiny_config(tmp_path / "plain", **extra)).fit()
    planned = Trainer(tiny_config(tmp_path / "planned", **extra, **{"plan.file": mixed_plan})).fit()
    steps = sorted(plain.losses)
    assert [planned.losses[s] for s in steps] == pytest.approx([plain.losses[s] for s in steps], rel=1e-6)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "planned" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)
    record = json.loads((tmp_path / "planned" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["peak_device_bytes"] > 0


def test_resume_under_a_plan_equals_uninterrupted(tiny_config, tmp_path, mixed_plan):
    straight = Trainer(tiny_config(tmp_path / "a", **{"plan.file": mixed_plan})).fit()
    step5 = tmp_path / "a" / "checkpoints" / "step_00000005"
    resumed = Trainer(tiny_config(tmp_path / "b", **{"plan.file": mixed_plan, "run.resume": step5})).fit()
    for step in range(6, 11):
        assert resumed.losses[step] == pytest.approx(straight.losses[step], rel=1e-6)


def test_plan_for_another_model_is_refused(tiny_config, tmp_path, capsys):
    from hetrain.errors import ConfigError

    path = tmp_path / "p4.json"
    OffloadPlan.resident(4).save(path)
    with pytest.raises(ConfigError, match="the plan has 4 blocks but the model has 2"):
        Trainer(tiny_config(**{"plan.file": path}))


def test_auto_budget_on_cpu_plans_prints_and_trains_the_same_model(tiny_config, tmp_path, capsys):
    plain = Trainer(tiny_config(tmp_path / "plain", **{"hardware.device_kind": "cpu"})).fit()
    capsys.readouterr()
    auto = Trainer(tiny_config(tmp_path / "auto", **{"memory.device_budget": "auto", "run.device": "cpu",
                                                     "hardware.device_kind": "cpu"}))
    out = capsys.readouterr().out
    assert "pred. memory" in out and "auto on a CPU: 50% of the" in out
    assert auto.plan is not None and auto.plan.predicted_peak_device_bytes <= auto.plan.device_budget_bytes
    auto = auto.fit()
    steps = sorted(plain.losses)
    assert [auto.losses[s] for s in steps] == pytest.approx([plain.losses[s] for s in steps], rel=1e-6)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "auto" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)

"""The trainer and the CLI on a CUDA device, end to end: an offload plan through the trainer
trains the model that plain training trains on the same GPU, and `hetrain train` under a
device budget plans, prints its plan and stays within the budget plus the transients the
plan does not count.

Skipped without a GPU (`pytest -m gpu` selects them).
"""

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from hetrain.cli import main
from hetrain.plan.offload.plan import OffloadPlan
from hetrain.train.trainer import Trainer
from tests_support import cli_args

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("no_tf32")]


def test_plan_file_through_the_trainer_on_cuda_equals_plain_training(tiny_config, tmp_path):
    plan = OffloadPlan.prefix_suffix(2, recompute=1, stream=1, cpu_optim=1)
    plan.save(tmp_path / "plan.json")
    cuda = {"run.device": "cuda", "train.grad_accum": 2}
    plain = Trainer(tiny_config(tmp_path / "plain", **cuda)).fit()
    planned = Trainer(tiny_config(tmp_path / "planned", **cuda, **{"plan.file": tmp_path / "plan.json"})).fit()
    steps = sorted(plain.losses)
    assert [planned.losses[s] for s in steps] == pytest.approx([plain.losses[s] for s in steps], rel=1e-5)
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "planned" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)


def test_cli_under_a_budget_on_cuda_plans_trains_and_stays_within_it(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    args = cli_args(run, corpus, **{"run.device": "cuda", "train.dtype": "bf16", "model.preset": "small",
                                    "train.seq_len": "128", "train.micro_batch": "8",
                                    "memory.device_budget": "40%", "train.steps": "12",
                                    "hardware.profile_dir": str(tmp_path / "profiles")})
    assert main(["train", *args]) == 0
    out = capsys.readouterr().out
    budget = re.search(r"Device budget ([\d.]+) (MiB|GiB)", out)
    assert "pred. memory" in out and budget, out[-3000:]
    budget_bytes = float(budget.group(1)) * (2**20 if budget.group(2) == "MiB" else 2**30)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 12 and all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    # The engine's ledger held it to the plan's budget (printed rounded to 0.1 of its unit).
    assert max(r["peak_device_bytes"] for r in records) <= budget_bytes * 1.001

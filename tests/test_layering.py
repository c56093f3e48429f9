"""The floors of the package, held by their imports (every import, including those inside
functions): predict/ prices, plan/ searches, the runtimes (offload/, pipeline/) execute plain-data
plans, train/ and the CLI wire them and alone read the Config."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "hetrain"

BELOW_TRAIN = ("predict", "plan", "offload", "pipeline", "model", "hardware")
"""Packages that take what they need (a model, a batch shape, budgets, a cost model), never the Config."""
PLAN_DATA = {"hetrain.plan.offload.plan", "hetrain.plan.cluster.plan", "hetrain.plan.cluster.recompute_plan"}
"""What a runtime may import from plan/: the plain-data formats of the plans it executes."""


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("hetrain")}


def modules(package: str) -> list[Path]:
    return sorted((SRC / package).rglob("*.py"))


@pytest.mark.parametrize("package", BELOW_TRAIN)
def test_nothing_below_train_reads_the_config_or_climbs_to_train(package):
    climbs = {f"{p.relative_to(SRC)}: {m}" for p in modules(package) for m in imports_of(p)
              if m == "hetrain.config" or m.startswith(("hetrain.config.", "hetrain.train", "hetrain.cli"))}
    assert not climbs, sorted(climbs)


@pytest.mark.parametrize("package", ["offload", "pipeline"])
def test_runtimes_import_plans_as_data_not_planners(package):
    planners = {f"{p.relative_to(SRC)}: {m}" for p in modules(package) for m in imports_of(p)
                if m.startswith("hetrain.plan.") and m not in PLAN_DATA
                and not any(m.startswith(d + ".") for d in PLAN_DATA)}
    assert not planners, sorted(planners)


def test_predict_imports_no_planner_or_runtime():
    climbs = {f"{p.relative_to(SRC)}: {m}" for p in modules("predict") for m in imports_of(p)
              if m.startswith(("hetrain.plan", "hetrain.offload", "hetrain.pipeline"))}
    assert not climbs, sorted(climbs)


def test_the_check_sees_a_climb(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from hetrain.config import Config\n    from hetrain.plan.offload.plan import OffloadPlan\n")
    assert {"hetrain.config", "hetrain.plan.offload.plan"} <= imports_of(bad)

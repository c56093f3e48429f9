import json
import textwrap
from pathlib import Path

import pytest

from hetrain.errors import ConfigError
from hetrain.hardware.cluster import load_cluster, parse_cluster
from hetrain.model.presets import get_preset
from hetrain.plan.cluster.planner import (ClusterPlan, SearchOptions, format_report, load_plan, plan_cluster, repredict,
                                   run_cluster_planning)
from hetrain.plan.cluster.cost import PredictorOptions

from .test_search import CASES, model, two_kinds

ROOT = Path(__file__).resolve().parents[3]
SMALL = two_kinds(2, 2, 1, 4)


def test_plan_round_trip_re_predicts_the_same_numbers(tmp_path):
    cfg, cluster, global_batch, seq_len = CASES["separate-pipelines"]
    plan = plan_cluster(cfg, cluster, global_batch, seq_len, PredictorOptions(max_micro_batch=4))
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = load_plan(path)
    assert loaded.pipelines == plan.pipelines
    assert loaded.prediction == json.loads(json.dumps(plan.prediction))
    again = repredict(loaded)
    assert again.prediction["step_s"] == pytest.approx(plan.prediction["step_s"], rel=1e-12)
    assert again.prediction["tokens_per_s"] == pytest.approx(plan.prediction["tokens_per_s"], rel=1e-12)
    for a, b in zip(again.prediction["stages"], plan.prediction["stages"]):
        assert a["peak_bytes"] == b["peak_bytes"]
        assert a["bwd_s"] == pytest.approx(b["bwd_s"], rel=1e-12)


def test_plan_is_plain_json_with_the_plan_fields(tmp_path):
    plan = plan_cluster(model(1024, 4), SMALL, 16, 1024, search_options=SearchOptions(upper_bound=False))
    plan.save(tmp_path / "plan.json")
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert doc["format"] == "hetrain.cluster_plan/1"
    pipe = doc["pipelines"][0]
    assert {"groups", "tp", "dp", "micro_batch", "n_microbatches", "stages"} <= set(pipe)
    assert sum(s["n_blocks"] for s in pipe["stages"]) == 4
    assert ClusterPlan.from_dict(doc).pipelines == plan.pipelines
    with pytest.raises(ValueError, match="format"):
        ClusterPlan.from_dict({**doc, "format": "other/9"})


def test_run_cluster_planning_writes_plan_report_and_timeline(tmp_path):
    cluster_file = tmp_path / "small.toml"
    cluster_file.write_text(textwrap.dedent("""\
        name = "small"
        [[group]]
        name = "a"
        kind = "A100-40GB"
        nodes = 2
        devices_per_node = 2
        intra_node_gbytes_per_s = 300
        inter_node_gbytes_per_s = 25
        [[group]]
        name = "b"
        kind = "MI250X-GCD"
        nodes = 1
        devices_per_node = 4
        intra_node_gbytes_per_s = 100
        inter_node_gbytes_per_s = 12.5
        """))
    plan = run_cluster_planning(model(2048, 6), cluster_file, 16, 2048, tmp_path / "run")
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"plan.json", "report.txt", "timeline.png"} <= files
    assert (tmp_path / "run" / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "run" / "report.txt").read_text()
    assert report.strip() == format_report(plan)
    assert "Efficiency against the upper bound" in report
    for needle in ("tokens/s", "MFU", "micro-batch", "peak GiB", "A100-40GB", "MI250X-GCD"):
        assert needle in report


def test_mixed_cluster_70b_reports_efficiency_against_the_upper_bound():
    cluster = load_cluster(ROOT / "configs/clusters/mixed.toml")
    plan = plan_cluster(get_preset("llama2-70b"), cluster, 1024, 4096)
    assert set(plan.upper_bound["kinds"]) == {"A100-80GB", "H100-SXM", "MI250X-GCD"}
    assert 0.5 < plan.upper_bound["efficiency"] <= 1.0
    assert plan.search["search_s"] < 10.0
    for stage in plan.prediction["stages"]:
        assert stage["peak_bytes"] <= stage["capacity_bytes"]
    assert "Efficiency against the upper bound" in format_report(plan)


def test_model_that_fits_nowhere_says_how_many_devices_would():
    cluster = parse_cluster(textwrap.dedent("""\
        [[group]]
        name = "g"
        kind = "RTX-4090"
        nodes = 1
        devices_per_node = 4
        intra_node_gbytes_per_s = 25
        inter_node_gbytes_per_s = 12.5
        """), "tiny.toml")
    with pytest.raises(ConfigError) as err:
        plan_cluster(get_preset("llama2-13b"), cluster, 8, 2048)
    msg = str(err.value)
    assert "fits no plan" in msg and "RTX-4090: at least" in msg and "the cluster has 4" in msg
    assert "\n" not in msg


def test_batch_that_no_micro_batching_divides():
    cluster = parse_cluster(textwrap.dedent("""\
        [[group]]
        name = "g"
        kind = "A100-80GB"
        nodes = 4
        devices_per_node = 8
        intra_node_gbytes_per_s = 300
        inter_node_gbytes_per_s = 200
        """), "wide.toml")
    # 2 blocks on 32 devices: at most 2 stages of 8, so every plan has dp >= 2.
    with pytest.raises(ConfigError, match="global batch 7 cannot be divided.*use a multiple of 2"):
        plan_cluster(model(1024, 2), cluster, 7, 1024)


def test_bad_inputs_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="global batch must be >= 1"):
        plan_cluster(model(1024, 2), SMALL, 0, 1024)
    with pytest.raises(ConfigError, match="seq_len"):
        plan_cluster(model(1024, 2), SMALL, 8, 1 << 20)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[group]]\nname = "g"\nkind = "A100-81GB"\nnodes = 1\ndevices_per_node = 8\n'
                   'intra_node_gbytes_per_s = 300\ninter_node_gbytes_per_s = 200\n')
    with pytest.raises(ConfigError, match=r"bad.toml:3: .*unknown device kind 'A100-81GB'"):
        run_cluster_planning(model(1024, 2), bad, 8, 1024, tmp_path / "run")

"""The offload Plan type: construction, checks with errors that name the fix, JSON, the table."""

import json

import pytest

from hetrain.plan.offload.plan import PLAN_FORMAT, LayerPlan, OffloadPlan


def test_resident_plan_keeps_everything_on_the_device():
    plan = OffloadPlan.resident(3)
    assert [l.name for l in plan.layers] == ["embedding", "block.0", "block.1", "block.2", "head"]
    assert all((l.act, l.weights, l.optim) == ("keep", "device", "device") for l in plan.layers)
    assert plan.n_blocks == 3 and not plan.streams_weights
    plan.validate(3)


def test_prefix_suffix_shape():
    plan = OffloadPlan.prefix_suffix(5, recompute=2, stream=1, cpu_optim=3, overlap=False)
    blocks = [(b.act, b.weights, b.optim) for b in plan.layers[1:-1]]
    assert blocks == [("recompute", "host", "device"), ("recompute", "device", "device"),
                      ("keep", "device", "host"), ("keep", "device", "host"), ("keep", "device", "host")]
    assert plan.layer("embedding").optim == plan.layer("head").optim == "device"
    assert plan.overlap is False
    assert plan.summary() == ("recompute 2 (blocks 0-1); stream weights 1 (block 0); "
                              "CPU optimizer 3 (blocks 2-4)")
    with pytest.raises(ValueError, match="cpu_optim=6 must be between 0 and the number of blocks"):
        OffloadPlan.prefix_suffix(5, cpu_optim=6)


def test_json_round_trip(tmp_path):
    plan = OffloadPlan.prefix_suffix(4, 1, 2, 3, prefetch_depth=2, weight_buffers=3, device_budget_bytes=2**30,
                                     predicted_step_s=1.5, note="why: the optimizer hides behind backward")
    plan.block(1).predicted_device_bytes = 123
    path = tmp_path / "plan.json"
    plan.save(path)
    assert json.loads(path.read_text())["format"] == PLAN_FORMAT
    assert OffloadPlan.load(path) == plan
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temporary left behind


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(prefetch_dept=1), "unknown key 'prefetch_dept'.*did you mean 'prefetch_depth'"),
    (lambda d: d["layers"][1].update(optimizer="host"), r"unknown key 'optimizer' in layers\[1\].*'optim'"),
    (lambda d: d.update(format="hetrain.cluster_plan/1"), "not an offload plan"),
    (lambda d: d["layers"][2].update(weights="cpu"), "layer block.1: weights='cpu' is not one of device, host"),
])
def test_bad_json_is_refused_with_the_fix(change, message):
    doc = OffloadPlan.resident(2).to_dict()
    change(doc)
    with pytest.raises(ValueError, match=message):
        OffloadPlan.from_dict(doc)


def test_unreadable_file_names_the_remedy(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON.*hetrain plan"):
        OffloadPlan.load(path)


def _plan_with(**changes):
    plan = OffloadPlan.resident(2)
    for key, value in changes.items():
        setattr(plan, key, value)
    return plan


@pytest.mark.parametrize("plan,message", [
    (OffloadPlan([LayerPlan("embedding"), LayerPlan("block.1"), LayerPlan("head")]),
     "layers\\[1\\] is named 'block.1', expected 'block.0'"),
    (OffloadPlan([LayerPlan("embedding"), LayerPlan("block.0", act="drop"), LayerPlan("head")]),
     "act='drop' is not one of keep, recompute"),
    (OffloadPlan([LayerPlan("embedding"), LayerPlan("block.0"), LayerPlan("head", act="recompute")]),
     "layer head: act='recompute' applies to transformer blocks only.*set act='keep'"),
    (_plan_with(prefetch_depth=-1), "prefetch_depth=-1 must be 0 or more"),
    (_plan_with(device_budget_bytes=0), "device_budget_bytes=0 must be positive, or None"),
    (OffloadPlan.prefix_suffix(2, stream=1, prefetch_depth=2, weight_buffers=2),
     "weight_buffers=2 is too few for prefetch_depth=2.*set weight_buffers >= 3"),
    (OffloadPlan([LayerPlan("embedding")]), "at least the embedding and the head"),
])
def test_validate_names_the_fix(plan, message):
    with pytest.raises(ValueError, match=message):
        plan.validate()


def test_validate_against_the_model():
    with pytest.raises(ValueError, match="the plan has 2 blocks but the model has 4; re-plan"):
        OffloadPlan.resident(2).validate(n_blocks=4)
    # Without streamed weights the buffer count does not matter.
    OffloadPlan.resident(2, prefetch_depth=3, weight_buffers=0).validate(2)


def test_table_has_one_row_per_layer_and_the_predictions():
    plan = OffloadPlan.prefix_suffix(3, 1, 1, 1, device_budget_bytes=3 * 2**30, predicted_step_s=0.25,
                                     predicted_peak_device_bytes=2 * 2**30, note="why this plan")
    plan.block(0).predicted_device_bytes = 5 * 2**20
    plan.block(0).predicted_s = 0.004
    lines = str(plan).splitlines()
    assert lines[0].split() == ["layer", "activations", "weights", "optimizer", "pred.", "memory", "pred.", "time"]
    rows = {line.split()[0]: line.split() for line in lines[2:7]}
    assert list(rows) == ["embedding", "block.0", "block.1", "block.2", "head"]
    assert rows["block.0"][1:] == ["recompute", "host", "device", "5.0", "MiB", "4.00", "ms"]
    assert rows["block.2"][1:4] == ["keep", "device", "host"]
    text = "\n".join(lines)
    assert "device budget 3.0 GiB" in text and "predicted: step 0.250 s, peak device 2.0 GiB" in text
    assert lines[-1] == "why this plan"
